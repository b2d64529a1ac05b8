"""One writer per directory (train, train --resume, analyze --out, study --out: two real
processes), full disks (a file-size limit in a child ``python -m flatlab.train``), and the
training loop's host reads per step."""

from __future__ import annotations

import json
import os
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from flatlab.analysis.cli import main as analyze_main
from flatlab.checkpoint import load_state, read_checkpoint
from flatlab.errors import run_cli
from flatlab.study.cli import main as study_main
from flatlab.training import TrainConfig, train
from flatlab.training.cli import main

TESTS = Path(__file__).resolve().parent
ROOT = TESTS.parent
TINY = ["--dataset", "synthetic", "--model", "mlp", "--model-arg", "hidden=[64]",
        "--no-progress", "--device", "cpu", "--schedule", "none"]


def _env(**extra: str) -> dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS="1", **extra)
    env["PYTHONPATH"] = os.pathsep.join([str(TESTS), str(ROOT), env.get("PYTHONPATH", "")])
    return env


def _train_process(args: list[str], **popen) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "flatlab.train", *args], text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, **popen)


def _files(run_dir: Path) -> dict[str, tuple[bytes, int]]:
    """A directory's files (bytes, mtime), its lock file aside."""
    return {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in sorted(run_dir.iterdir())
            if p.name != ".lock"}


def _wait_for(path: Path, proc: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, f"{path} did not appear"
        time.sleep(0.02)


def _one_line(proc: subprocess.CompletedProcess | tuple, code: int) -> str:
    returncode, err = (proc.returncode, proc.stderr) if hasattr(proc, "returncode") else proc
    assert returncode == code, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


# --------------------------------------------------------------------------- one writer


@pytest.mark.slow
def test_a_second_train_or_resume_of_a_running_run_exits_2_naming_the_holder(tmp_path):
    run_dir, gate = tmp_path / "run", tmp_path / "gate"
    gate.mkdir()
    args = ["--dataset", "synthetic", "--model", "reliability_probe:probe", "--epochs", "2",
            "--no-progress", "--out", str(run_dir)]
    first = _train_process(args, env=_env(PROBE_GATE=f"6:{gate}"))  # waits in epoch 2, step 6
    try:
        _wait_for(gate / "started", first)
        before = _files(run_dir)
        assert read_checkpoint(run_dir / "model.safetensors")[1]["epoch"] == 1
        other = [_train_process([*args, "--optimizer", "sam", "--rho", "0.1"], env=_env()),
                 _train_process(["--out", str(run_dir), "--resume", "--trust-code",
                                 "--no-progress"], env=_env())]
        for proc in other:
            _, err = proc.communicate(timeout=120)
            line = _one_line((proc.returncode, err), 2)
            assert f"{run_dir.resolve()} is in use by pid {first.pid}" in line
        assert _files(run_dir) == before  # nothing of the first run touched
    finally:
        (gate / "release").touch()
        out, err = first.communicate(timeout=120)
    assert first.returncode == 0, err
    assert read_checkpoint(run_dir / "model.safetensors")[1]["epoch"] == 2


@pytest.fixture
def held(tmp_path):
    """A directory held by another process (``flatlab.io.lock_directory``); yields (dir, pid)."""
    folder = tmp_path / "held"
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys; from flatlab.io import lock_directory\n"
         f"with lock_directory({str(folder)!r}):\n print('held', flush=True); sys.stdin.read()"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=_env())
    assert holder.stdout.readline().strip() == "held"
    (folder / "analysis.json").write_text("{}\n")  # the holder's file
    yield folder, holder.pid
    holder.communicate("", timeout=60)


def test_analyze_and_study_refuse_an_out_directory_in_use(tmp_path, held, capsys):
    folder, pid = held
    checkpoint = train(TrainConfig(dataset="synthetic", model="mlp", model_kwargs={
        "hidden": [8]}, epochs=1, out=str(tmp_path / "run")), progress=False).checkpoint
    before = _files(folder)
    code = run_cli(analyze_main, [str(checkpoint), "--trace", "--trace-matvecs", "4",
                                  "--samples", "16", "--no-progress", "--out", str(folder)],
                   prog="flatlab.analyze")
    line = _one_line((code, capsys.readouterr().err), 2)
    assert f"{folder.resolve()} is in use by pid {pid}" in line
    code = run_cli(study_main, ["scratch", "--quick", "--out", str(folder)],
                   prog="flatlab.study")
    line = _one_line((code, capsys.readouterr().err), 2)
    assert f"{folder.resolve()} is in use by pid {pid}" in line
    assert _files(folder) == before


# --------------------------------------------------------------------------- full disks


def _file_size_limit(limit: int):
    def limit_child() -> None:  # SIGXFSZ ignored: write() fails with EFBIG instead of killing
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    return limit_child


@pytest.fixture(scope="module")
def two_epochs(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("straight") / "run"
    assert main([*TINY, "--epochs", "2", "--out", str(out)]) == 0
    return out


@pytest.mark.parametrize("fails", ["config.toml", "model.safetensors",
                                   "train_state.safetensors"])
@pytest.mark.slow
def test_a_failed_write_exits_2_and_the_previous_state_resumes(tmp_path, two_epochs, fails):
    run_dir = tmp_path / "run"
    assert main([*TINY, "--epochs", "1", "--out", str(run_dir)]) == 0
    sizes = {name: (run_dir / name).stat().st_size for name in
             ("config.toml", "metrics.csv", "model.safetensors", "train_state.safetensors")}
    assert sizes["metrics.csv"] < sizes["config.toml"] < sizes["model.safetensors"] < (
        sizes["train_state.safetensors"]) // 2
    # a limit just under the file that is to fail (and above every smaller one)
    limit = sizes[fails] - 64
    before = _files(run_dir)
    proc = _train_process(["--out", str(run_dir), "--resume", "--epochs", "2", "--no-progress"],
                          env=_env(), preexec_fn=_file_size_limit(limit))
    _, err = proc.communicate(timeout=120)
    line = _one_line((proc.returncode, err), 2)
    assert f"cannot write {run_dir / fails}" in line and "file-size limit" in line
    assert not list(run_dir.glob(".*.tmp"))  # no temporary file left behind
    after = _files(run_dir)
    assert after["train_state.safetensors"] == before["train_state.safetensors"]
    state = load_state(run_dir / "train_state.safetensors")
    assert (state["epoch"], state["step"]) == (1, 4)
    if fails != "train_state.safetensors":  # written before the state: the previous version
        assert after["model.safetensors"] == before["model.safetensors"]
    read_checkpoint(run_dir / "model.safetensors")  # whole (epoch 1, or 2 when only the state
    # failed; the resumed run writes epoch 2 again either way)
    assert main(["--out", str(run_dir), "--resume", "--epochs", "2", "--no-progress"]) == 0
    expected, resumed = (read_checkpoint(d / "model.safetensors")[0] for d in (two_epochs,
                                                                                run_dir))
    assert all(torch.equal(expected[k], resumed[k]) for k in expected)


# --------------------------------------------------------------------------- host reads


CONVERSIONS = ("item", "tolist", "__bool__", "__float__", "__int__", "__index__", "numpy")


def _reads_in_one_epoch(monkeypatch, tmp_path, train_size: int, **changes) -> int:
    """Tensor -> Python conversions (each one waits for the device on a GPU) in a one-epoch run
    of ``train_size / 16`` steps."""
    counts = [0]
    for name in CONVERSIONS:
        original = getattr(torch.Tensor, name)

        def counted(self, *args, _original=original, **kwargs):
            counts[0] += 1
            return _original(self, *args, **kwargs)
        monkeypatch.setattr(torch.Tensor, name, counted)
    try:
        train(TrainConfig(dataset="synthetic", dataset_kwargs={"train_size": train_size,
                                                               "test_size": 64},
                          model="mlp", model_kwargs={"hidden": [8]}, epochs=1, batch_size=16,
                          out=str(tmp_path / f"r{train_size}"), **changes), progress=False)
    finally:
        monkeypatch.undo()
    return counts[0]


@pytest.mark.parametrize("changes, per_step", [
    ({"optimizer": "sgd"}, 1), ({"optimizer": "nso", "sigma": 0.05}, 1),
    ({"optimizer": "sam", "rho": 0.1}, 1), ({"optimizer": "sgd", "on_nan": "skip"}, 1)])
def test_the_training_loop_reads_one_lagged_flag_pair_per_step(monkeypatch, tmp_path, changes,
                                                                per_step):
    """Proxy for host synchronisations on CPU: conversions per step = the difference between a
    32-step and a 16-step epoch over 16. One per step: the previous step's (non-finite, stop)
    flags, copied without blocking (``--on-nan skip``: this step's, as it must decide now);
    the sums are read only at saves and epoch ends. (Before: 7 per step.)"""
    short = _reads_in_one_epoch(monkeypatch, tmp_path, 256, **changes)
    long = _reads_in_one_epoch(monkeypatch, tmp_path, 512, **changes)
    assert (long - short) == 16 * per_step, (short, long)


def _resume_with_a_file_size_limit(run_dir: str, limit: int) -> tuple[int, str]:
    """In a spawned rank: resume ``run_dir`` to 2 epochs under ``ulimit -f`` (in bytes)."""
    import contextlib
    import io

    _file_size_limit(limit)()
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        code = run_cli(main, ["--out", run_dir, "--resume", "--epochs", "2", "--no-progress"],
                       prog="flatlab.train")
    return code, err.getvalue()


@pytest.mark.slow
def test_a_failed_write_under_two_processes_stops_every_rank_with_exit_2(tmp_path):
    """Rank 0 cannot write the checkpoint of epoch 2: both ranks end with one line and exit 2
    (rank 1 does not wait in the next collective for a rank that has stopped)."""
    from flatlab import distributed

    run_dir = tmp_path / "run"
    assert main([*TINY, "--epochs", "1", "--out", str(run_dir)]) == 0
    before = _files(run_dir)
    limit = (run_dir / "model.safetensors").stat().st_size - 64
    results = distributed.spawn(_resume_with_a_file_size_limit, 2,
                                args=(str(run_dir), limit), timeout=120)
    assert [code for code, _ in results] == [2, 2], results
    assert "cannot write" in results[0][1] and "rank 0 could not write" in results[1][1]
    for _, err in results:
        assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    after = _files(run_dir)
    assert {k: after[k] for k in ("model.safetensors", "train_state.safetensors")} == {
        k: before[k] for k in ("model.safetensors", "train_state.safetensors")}
    assert not list(run_dir.glob(".*.tmp"))


# --------------------------------------------------------------------------- consent


@pytest.fixture
def marker_module(tmp_path, monkeypatch):
    """A module whose import writes ``imported``; yields that path."""
    (tmp_path / "consent_marker.py").write_text(
        f"open({str(tmp_path / 'imported')!r}, 'w').write('x')\n"
        "def make(*args, **kwargs):\n    raise RuntimeError('called')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    yield tmp_path / "imported"
    assert "consent_marker" not in sys.modules
    sys.modules.pop("consent_marker", None)


def test_init_from_a_checkpoint_naming_code_imports_nothing(tmp_path, marker_module, capsys):
    """``train --init-from FILE`` takes tensors only: the metadata's model and dataset
    factories are never imported."""
    from safetensors.torch import save_file

    from flatlab.models import build_model

    weights = build_model("mlp", (20,), 4, hidden=[8]).state_dict()
    hostile = tmp_path / "hostile.safetensors"
    save_file(weights, str(hostile), metadata={"flatlab": json.dumps({
        "format_version": 1, "model": {"name": "consent_marker:make", "kwargs": {}},
        "dataset": {"name": "consent_marker:make", "kwargs": {}}})})
    code = run_cli(main, ["--dataset", "synthetic", "--model", "mlp", "--model-arg",
                          "hidden=[8]", "--epochs", "1", "--no-progress", "--init-from",
                          str(hostile), "--out", str(tmp_path / "r")], prog="flatlab.train")
    assert code == 0, capsys.readouterr().err
    assert not marker_module.exists()


def test_a_study_run_directory_naming_code_is_refused_without_an_import(tmp_path, marker_module):
    """A study reuses a run directory only if its config.toml is the plan's: one that names
    code is another configuration, refused before anything is built."""
    from flatlab.errors import FlatlabError
    from flatlab.study.runner import train_or_resume

    plan = TrainConfig(dataset="synthetic", model="mlp", model_kwargs={"hidden": [8]},
                       epochs=1, out=str(tmp_path / "run"))
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "config.toml").write_text(
        TrainConfig(dataset="synthetic", model="consent_marker:make", epochs=1).to_toml())
    with pytest.raises(FlatlabError, match="different configuration"):
        train_or_resume(plan, progress=False)
    assert not marker_module.exists()
