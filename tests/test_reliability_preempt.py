"""Graceful preemption: SIGTERM, SIGINT or SIGUSR1 mid-epoch -> the step finishes, the full state
is saved, one line says how to resume, exit 143 (130 for SIGINT); the resumed run's final
weights are bit-identical to an uninterrupted run's, on one process and on two (gloo)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from flatlab import distributed
from flatlab.checkpoint import load_state, read_checkpoint
from flatlab.training.cli import main

TESTS = Path(__file__).resolve().parent
ROOT = TESTS.parent
# 256 examples in global batches of 16: 16 steps per epoch, 2 epochs; NSO (k=1): 2 training
# passes per step, so pass 41 is in step 21 = epoch 2, batch 5
RUN = ["--dataset", "synthetic", "--dataset-arg", "train_size=256", "--dataset-arg",
       "test_size=64", "--model", "reliability_probe:probe", "--epochs", "2", "--batch-size",
       "16", "--optimizer", "nso", "--sigma", "0.05", "--device", "cpu", "--no-progress"]
STEPS_PER_EPOCH = 16


@pytest.fixture(autouse=True)
def _probe_importable(monkeypatch):
    monkeypatch.syspath_prepend(str(TESTS))
    for name in ("PROBE_SIGNAL", "PROBE_GATE", "PROBE_STORM"):
        monkeypatch.delenv(name, raising=False)


def _weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return read_checkpoint(run_dir / "model.safetensors")[0]


def _run(args: list[str], **env: str) -> subprocess.CompletedProcess:
    environ = dict(os.environ, OMP_NUM_THREADS="1", **env)
    environ["PYTHONPATH"] = os.pathsep.join([str(TESTS), str(ROOT), environ.get("PYTHONPATH", "")])
    return subprocess.run([sys.executable, "-m", "flatlab.train", *args], env=environ,
                          capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def straight(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("straight") / "run"
    sys.path.insert(0, str(TESTS))
    try:
        assert main([*RUN, "--out", str(out)]) == 0
    finally:
        sys.path.remove(str(TESTS))
    return out


def _assert_stopped_mid_epoch(proc, run_dir: Path, code: int) -> dict:
    assert proc.returncode == code, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert f"resume with: python -m flatlab.train --out {run_dir} --resume" in lines[0]
    state = load_state(run_dir / "train_state.safetensors")
    assert 0 < state["batch"] < STEPS_PER_EPOCH and state["epoch"] == 1  # mid epoch 2
    assert not list(run_dir.glob(".*.tmp"))
    return state


@pytest.mark.slow
@pytest.mark.parametrize("name, code", [("SIGTERM", 143), ("SIGINT", 130), ("SIGUSR1", 143)])
def test_signal_mid_epoch_saves_and_resume_is_bit_identical(tmp_path, straight, name, code):
    run_dir = tmp_path / "run"
    proc = _run([*RUN, "--out", str(run_dir)], PROBE_SIGNAL=f"*:41:{name}")
    state = _assert_stopped_mid_epoch(proc, run_dir, code)
    assert f"stopped by {name} after step 21 (epoch 2, batch 5)" in proc.stderr
    assert state["step"] == 21  # the step the signal arrived in was finished, nothing more
    assert main(["--out", str(run_dir), "--resume", "--no-progress", "--trust-code"]) == 0
    expected, resumed = _weights(straight), _weights(run_dir)
    assert all(torch.equal(expected[k], resumed[k]) for k in expected)
    assert (run_dir / "metrics.csv").read_text().count("\n") == 3  # header + 2 epochs


@pytest.mark.slow
def test_a_signal_in_the_last_step_of_an_epoch_stops_after_that_epoch(tmp_path, straight):
    run_dir = tmp_path / "run"
    proc = _run([*RUN, "--out", str(run_dir)], PROBE_SIGNAL="*:32:SIGTERM")  # step 16 of 16
    assert proc.returncode == 143, proc.stderr
    assert "stopped by SIGTERM after step 16 (the end of epoch 1)" in proc.stderr
    state = load_state(run_dir / "train_state.safetensors")
    assert (state["epoch"], state["batch"], state["step"]) == (1, 0, 16)
    assert (run_dir / "metrics.csv").read_text().count("\n") == 2  # the epoch's row is written
    assert main(["--out", str(run_dir), "--resume", "--no-progress", "--trust-code"]) == 0
    expected, resumed = _weights(straight), _weights(run_dir)
    assert all(torch.equal(expected[k], resumed[k]) for k in expected)


@pytest.mark.slow
def test_a_storm_of_signals_during_the_save_corrupts_nothing(tmp_path):
    """From the first SIGTERM on, SIGTERM and SIGINT arrive again and again while the state
    file is being written (a 4 MB ballast buffer makes the write take a while)."""
    ballast = ["--model-arg", "ballast=1000000"]
    sys.path.insert(0, str(TESTS))
    try:
        assert main([*RUN, *ballast, "--out", str(tmp_path / "straight")]) == 0
    finally:
        sys.path.remove(str(TESTS))
    run_dir, log = tmp_path / "run", tmp_path / "storm.log"
    proc = _run([*RUN, *ballast, "--out", str(run_dir)], PROBE_SIGNAL="*:41:SIGTERM",
                PROBE_STORM=f"{run_dir}:{log}")
    _assert_stopped_mid_epoch(proc, run_dir, 143)
    assert log.is_file() and len(log.read_text().split()) >= 2  # signals hit the save
    assert main(["--out", str(run_dir), "--resume", "--no-progress", "--trust-code"]) == 0
    expected, resumed = _weights(tmp_path / "straight"), _weights(run_dir)
    assert all(torch.equal(expected[k], resumed[k]) for k in expected)


# --------------------------------------------------------------------------- two processes


def _straight_interrupted_resumed(two: list[str], straight: str, run_dir: str) -> list[int]:
    """On each spawned rank: an uninterrupted run, the same run with rank 1 signalled at pass
    41, and its resumption (one process group for all three: start-up is the slow part)."""
    from flatlab.errors import run_cli

    sys.path.insert(0, str(TESTS))
    codes = [run_cli(main, [*two, "--out", straight], prog="flatlab.train")]
    os.environ["PROBE_SIGNAL"] = f"1:41:{signal.SIGTERM.name}"
    codes.append(run_cli(main, [*two, "--out", run_dir], prog="flatlab.train"))
    del os.environ["PROBE_SIGNAL"]
    if distributed.is_main_process():  # the writer: its state file is complete
        state = load_state(Path(run_dir) / "train_state.safetensors")
        codes.append((state["epoch"], state["step"]))
    codes.append(run_cli(main, ["--out", run_dir, "--resume", "--no-progress", "--trust-code"],
                         prog="flatlab.train"))
    return codes


@pytest.mark.slow
def test_two_processes_stop_at_the_same_step_and_resume_bit_identically(tmp_path, monkeypatch):
    """Only rank 1 is signalled; rank 0 learns it through the step statistics' all-reduce and
    both stop after the same step, rank 0 saving the state."""
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(TESTS), str(ROOT),
                                                      os.environ.get("PYTHONPATH", "")]))
    straight, run_dir = tmp_path / "straight", tmp_path / "run"
    codes = distributed.spawn(_straight_interrupted_resumed, 2, args=(
        [*RUN, "--threads", "1"], str(straight), str(run_dir)), timeout=240)
    # signalled in step 21; its flag is read (one step late) once step 22 is queued: both
    # ranks stop after step 22, mid epoch 2
    assert codes == [[0, 143, (1, 22), 0], [0, 143, 0]]
    expected, resumed = _weights(straight), _weights(run_dir)
    assert all(torch.equal(expected[k], resumed[k]) for k in expected)
