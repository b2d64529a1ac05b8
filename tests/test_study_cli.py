"""The command lines: ``python -m flatlab`` (subcommands, --version, one-line errors) and
``python -m flatlab.study scratch --quick`` end to end."""

from __future__ import annotations

import subprocess
import sys

import pandas as pd
import pytest

from flatlab import __version__
from flatlab.__main__ import main as flatlab_main
from flatlab.study import cli, plan, scratch
from flatlab.study.runner import RESULTS_CSV


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=120)


def test_python_m_flatlab_lists_the_subcommands():
    done = _run("-m", "flatlab", "--help")
    assert done.returncode == 0, done.stderr
    for command in ("train", "analyze", "study", "demo"):
        assert f"    {command} " in done.stdout
    version = _run("-m", "flatlab", "--version")
    assert version.returncode == 0 and version.stdout.strip() == f"flatlab {__version__}"


def test_flatlab_errors_are_one_line_and_exit_2(capsys):
    assert flatlab_main(["bogus"]) == 2
    assert flatlab_main(["study", "scratch", "--shard", "3/2"]) == 2
    assert flatlab_main(["study", "scratch", "--jo", "2"]) == 2     # no abbreviations
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 3 and "invalid choice: 'bogus'" in err[0]
    assert "--shard 3/2" in err[1] and "--jo" in err[2]


def test_flatlab_dispatches_to_the_study_and_demo_parsers(capsys):
    with pytest.raises(SystemExit) as done:
        flatlab_main(["study", "--help"])
    assert done.value.code == 0
    assert "scratch" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        flatlab_main(["demo", "--help"])
    assert "--epochs" in capsys.readouterr().out


@pytest.mark.slow
def test_quick_scratch_study_end_to_end(tmp_path, capsys):
    out = tmp_path / "quick"
    assert cli.main(["scratch", "--quick", "--out", str(out)]) == 0
    rows = pd.read_csv(out / RESULTS_CSV)
    planned = len(plan.sweep_runs(scratch.quick_config()))  # 2 values x 4 swept methods
    assert (rows["phase"] == "sweep").sum() == 2 * 4 == planned
    assert (rows["phase"] == "final").sum() == 8          # 8 variants x 1 seed
    assert (rows["status"] == "ok").all() and (rows["epochs"] <= 8).all()
    report = (out / "report.md").read_text()
    assert "python -m flatlab.study scratch --quick --out" in report
    assert "paired" in report and (out / "index.html").is_file()
    capsys.readouterr()
    assert cli.main(["scratch", "--quick", "--out", str(out)]) == 0   # resumable: no new run
    assert "running 0" in capsys.readouterr().out
