"""docs/own-data.md runs as written: every ```python block is a file of tests/snippets/ byte for
byte, and the page's ```bash commands run in order, with tiny settings, in a scratch directory
(the snippets that no other test runs are run there, in page order)."""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGE = ROOT / "docs" / "own-data.md"
SNIPPETS = ROOT / "tests" / "snippets"
BLOCK = re.compile(r"^```(\w+)\n(.*?)^```", re.S | re.M)
# snippets executed (and checked) by other tests: the page only has to copy them exactly
RUN_ELSEWHERE = {"fp16_loop.py": "test_fp16_snippet.py", "hf_hessian.py":
                 "test_docs_snippets_api.py", "scipy_eigsh.py": "test_docs_snippets_api.py"}
# the page's values -> tiny ones (values of flags the commands already give)
TINY = {"--classes": "3", "--train": "4", "--val": "2", "--test": "2", "--epochs": "1",
        "--samples": "8", "--eigenvalues": "1"}
TINY_EXTRA = {"flatlab.analyze": ["--trace-matvecs", "4", "--no-progress"],
              "flatlab.train": ["--no-progress"]}


def blocks(language: str | None = None) -> list[tuple[str, str]]:
    return [(lang, text) for lang, text in BLOCK.findall(PAGE.read_text(encoding="utf-8"))
            if language is None or lang == language]


def snippet_named(text: str) -> Path | None:
    for path in sorted(SNIPPETS.glob("*.py")):
        if path.read_text(encoding="utf-8") == text:
            return path
    return None


def commands(text: str) -> list[list[str]]:
    """The shell commands of a block (``\\``-continued lines joined)."""
    return [shlex.split(line) for line in text.replace("\\\n", " ").splitlines() if line.strip()]


def tiny(argv: list[str]) -> list[str]:
    out = list(argv)
    for i, arg in enumerate(out[:-1]):
        if arg in TINY:
            out[i + 1] = TINY[arg]
    module = out[2] if out[1:2] == ["-m"] else None
    return out + TINY_EXTRA.get(module, [])


def test_every_python_block_is_a_snippet_file():
    python = blocks("python")
    assert len(python) >= 5
    for _, text in python:
        path = snippet_named(text)
        assert path is not None, f"docs/own-data.md has a Python block that is no file of " \
                                 f"tests/snippets/:\n{text[:300]}"
    named = {snippet_named(text).name for _, text in python}
    assert set(RUN_ELSEWHERE) <= named
    for snippet, test_file in RUN_ELSEWHERE.items():  # ... and those tests do run them
        assert snippet in (ROOT / "tests" / test_file).read_text(encoding="utf-8")


def test_the_commands_name_real_flags():
    for _, text in blocks("bash"):
        for argv in commands(text):
            if argv[1:2] != ["-m"]:
                continue
            help_text = subprocess.run([sys.executable, "-m", argv[2], "--help"],
                                       capture_output=True, text=True, cwd=ROOT,
                                       timeout=120).stdout
            for flag in (a for a in argv if a.startswith("--")):
                assert re.search(rf"(?<![\w-]){re.escape(flag)}(?![\w-])", help_text), \
                    f"{argv[2]} --help has no {flag}"


@pytest.mark.slow
def test_the_page_runs_in_order_with_tiny_settings(tmp_path):
    pytest.importorskip("timm")
    (tmp_path / "tests").symlink_to(ROOT / "tests")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT),
                                                       os.environ.get("PYTHONPATH", "")])}
    ran = []
    for lang, text in blocks():
        if lang == "python":
            path = snippet_named(text)
            if path.name in RUN_ELSEWHERE:
                continue
            argvs = [["python", str(path)]]
        elif lang == "bash":
            argvs = commands(text)
        else:
            continue
        for argv in argvs:
            assert argv[0] == "python", argv
            argv = tiny([sys.executable, *argv[1:]])
            proc = subprocess.run(argv, cwd=tmp_path, env=env, capture_output=True, text=True,
                                  timeout=600)
            assert proc.returncode == 0, f"{shlex.join(argv)}\n{proc.stderr[-2000:]}"
            ran.append((argv, proc))
    assert len(ran) == 6
    train_out = next(p.stdout for a, p in ran if "flatlab.train" in a)
    assert "2 re-initialised: fc.weight, fc.bias" in train_out
    best = json.loads((tmp_path / "runs/e2e/analysis-best/analysis.json").read_text())
    plain = json.loads((tmp_path / "analysis-finetuned/analysis.json").read_text())
    [ck_best], [ck_plain] = best["checkpoints"], plain["checkpoints"]
    assert ck_best["path"].endswith("best.safetensors") and len(ck_best["eigenvalues"]) == 1
    assert ck_best["model"]["kwargs"] == {"model_name": "resnet18"}
    # the same weights with and without flatlab's metadata: the same loss and trace
    assert ck_plain["loss"] == ck_best["loss"]
    assert ck_plain["trace"] == ck_best["trace"]
