"""The README and docs/ say only what is true of the code: length, links, modules, flags, tests.

- README.md stays a short tour (at most 250 lines);
- every relative link in README.md and docs/*.md reaches an existing file (and heading);
- every ``-m flatlab.<module>`` command names a module that ``python -m`` can run;
- every flag docs/cli.md names for ``flatlab.train`` / ``flatlab.analyze`` is in its ``--help``;
- every ``tests/FILE.py::TEST`` reference (docs/reliability.md) names an existing test;
- docs/optimizers.md shows ``tests/snippets/fp16_loop.py`` verbatim.
"""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOC_FILES = [README, *sorted((ROOT / "docs").glob("*.md"))]
MAX_README_LINES = 250

LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
FENCE = re.compile(r"^```.*?^```", re.S | re.M)
MODULE = re.compile(r"-m\s+(flatlab(?:\.\w+)*)")
FLAG = re.compile(r"(?<![\w-])--[a-z][a-z0-9-]*")
TEST_REF = re.compile(r"tests/(test_\w+\.py)::(test_\w+)")


def _text(path: Path) -> str:
    return path.read_text(encoding="utf-8")


def _prose(path: Path) -> str:
    """The Markdown without its fenced code blocks (links there are not links)."""
    return FENCE.sub("", _text(path))


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces -> hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def _anchors(path: Path) -> set[str]:
    seen: dict[str, int] = {}
    anchors = set()
    for line in _prose(path).splitlines():
        match = re.match(r"#{1,6}\s+(.*)", line)
        if match:
            slug = _slug(match.group(1))
            count = seen.get(slug, 0)
            anchors.add(slug if count == 0 else f"{slug}-{count}")
            seen[slug] = count + 1
    return anchors


def test_doc_files_exist():
    names = {path.name for path in DOC_FILES}
    for name in ("README.md", "cli.md", "optimizers.md", "hessian.md", "reports.md",
                 "studies.md", "distributed.md", "reliability.md", "development.md"):
        assert name in names, name


def test_readme_is_short():
    lines = len(_text(README).splitlines())
    assert lines <= MAX_README_LINES, f"README.md has {lines} lines (at most {MAX_README_LINES})"


def _links() -> list[tuple[Path, str]]:
    return [(path, target) for path in DOC_FILES for target in LINK.findall(_prose(path))]


def test_the_link_pattern_finds_links():
    assert len(_links()) > 20


@pytest.mark.parametrize("path, target", _links(),
                         ids=lambda v: v.name if isinstance(v, Path) else v)
def test_relative_links_resolve(path, target):
    if re.match(r"[a-z][a-z0-9+.-]*:", target):  # http:, https:, mailto:
        return
    file_part, _, anchor = target.partition("#")
    dest = (path.parent / file_part).resolve() if file_part else path
    assert dest.exists(), f"{path.relative_to(ROOT)}: link to missing {target}"
    if anchor and dest.suffix == ".md":
        assert anchor in _anchors(dest), f"{path.relative_to(ROOT)}: no heading #{anchor}"


def _modules() -> list[str]:
    return sorted({m for path in DOC_FILES for m in MODULE.findall(_text(path))})


def test_the_module_pattern_finds_the_clis():
    assert {"flatlab.train", "flatlab.analyze"} <= set(_modules())


@pytest.mark.parametrize("module", _modules())
def test_documented_modules_can_be_run(module):
    spec = importlib.util.find_spec(module)
    assert spec is not None, f"python -m {module}: no such module"
    if spec.submodule_search_locations is not None:  # a package runs its __main__
        assert importlib.util.find_spec(f"{module}.__main__") is not None, module


def _cli_sections() -> dict[str, str]:
    """docs/cli.md's '## ... flatlab.train' and '## ... flatlab.analyze' sections."""
    sections = {}
    for block in re.split(r"^## ", _text(ROOT / "docs" / "cli.md"), flags=re.M)[1:]:
        title = block.splitlines()[0]
        for module in ("flatlab.train", "flatlab.analyze"):
            if module in title:
                sections[module] = block
    return sections


def _help_flags(module: str) -> set[str]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT),
                                                       os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, "-m", module, "--help"], capture_output=True,
                          text=True, cwd=ROOT, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return set(FLAG.findall(proc.stdout))


@pytest.mark.parametrize("module", ["flatlab.train", "flatlab.analyze"])
def test_cli_doc_flags_exist(module):
    sections = _cli_sections()
    assert module in sections, f"docs/cli.md has no section for {module}"
    documented = set(FLAG.findall(sections[module]))
    assert len(documented) > 10, documented
    known = _help_flags(module)
    assert not documented - known, f"docs/cli.md names flags {module} lacks: " \
                                   f"{sorted(documented - known)}"


def _test_refs() -> list[tuple[str, str]]:
    return sorted({ref for path in DOC_FILES for ref in TEST_REF.findall(_text(path))})


def test_reliability_names_its_tests():
    assert len(_test_refs()) > 30


@pytest.mark.parametrize("filename, name", _test_refs())
def test_named_tests_exist(filename, name):
    path = ROOT / "tests" / filename
    assert path.is_file(), f"tests/{filename} does not exist"
    assert re.search(rf"^\s*def {name}\(", _text(path), re.M), f"tests/{filename}::{name}"


def test_optimizers_page_copies_the_fp16_snippet_verbatim():
    """docs/optimizers.md shows the fp16 recipe that tests/test_fp16_snippet.py runs."""
    snippet = _text(ROOT / "tests" / "snippets" / "fp16_loop.py")
    assert f"```python\n{snippet}```" in _text(ROOT / "docs" / "optimizers.md")
