"""--resume after a real SIGKILL gives bit-identical final weights to an uninterrupted run."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from flatlab.checkpoint import load_state, read_checkpoint
from flatlab.errors import FlatlabError
from flatlab.training import TrainConfig, train
from flatlab.training.cli import main

# 1024 examples in batches of 16: 64 steps per epoch, 3 epochs; state saved every 5 steps
RUN = ["--dataset", "synthetic", "--dataset-arg", "train_size=1024", "--model", "mlp",
       "--model-arg", "hidden=[32]", "--epochs", "3", "--batch-size", "16",
       "--save-every-steps", "5", "--no-progress"]
METHODS = {"nso": ["--optimizer", "nso", "--sigma", "0.05", "--num-perturbs", "2"],
           "sam": ["--optimizer", "sam", "--rho", "0.1"]}
TOTAL_STEPS = 3 * 64


def _weights(run_dir):
    return read_checkpoint(Path(run_dir) / "model.safetensors")[0]


def _start(args):
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).resolve().parents[1]),
                                         env.get("PYTHONPATH", "")])
    return subprocess.Popen([sys.executable, "-m", "flatlab.train", *args], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def _kill_after_saves(args, state_path, saves):
    """Run the CLI and SIGKILL it as soon as it has replaced its state file ``saves`` times."""
    proc = _start(args)
    seen: set[tuple[int, int]] = set()
    try:
        while proc.poll() is None and len(seen) < saves:
            try:
                stat = state_path.stat()
                seen.add((stat.st_ino, stat.st_mtime_ns))
            except FileNotFoundError:
                pass
            time.sleep(0.002)
    finally:
        proc.send_signal(signal.SIGKILL)
        _, err = proc.communicate()
    assert proc.returncode == -signal.SIGKILL, f"run ended before the kill: {err}"
    return load_state(state_path)


@pytest.mark.parametrize("method", ["nso", "sam"])
def test_resume_after_sigkill_is_bit_identical(tmp_path, method):
    args = [*RUN, *METHODS[method]]
    assert main([*args, "--out", str(tmp_path / "straight")]) == 0
    run = tmp_path / "killed"
    state_path = run / "train_state.safetensors"
    # first kill: early in epoch 1 (mid-epoch state, data order and noise half consumed)
    first = _kill_after_saves([*args, "--out", str(run)], state_path, saves=4)
    assert 0 < first["step"] < TOTAL_STEPS
    # second kill: the resumed process itself is killed later on
    second = _kill_after_saves([*args, "--out", str(run), "--resume"], state_path, saves=20)
    assert first["step"] < second["step"] < TOTAL_STEPS
    # a third, uninterrupted resume finishes the run
    assert main(["--out", str(run), "--resume", "--no-progress"]) == 0
    straight, resumed = _weights(tmp_path / "straight"), _weights(run)
    for name in straight:
        assert torch.equal(straight[name], resumed[name]), name
    assert (run / "metrics.csv").read_text().count("\n") == 4  # header + 3 epochs, once each
    final = load_state(state_path)
    assert (final["epoch"], final["step"]) == (3, TOTAL_STEPS)
    assert not list(run.glob(".*.tmp"))


def _tiny(out, **changes):
    values = dict(dataset="synthetic", model="mlp", model_kwargs={"hidden": [8]}, epochs=2,
                  optimizer="nso", sigma=0.05, out=str(out))
    values.update(changes)
    return TrainConfig(**values)


def test_resume_of_a_finished_run_changes_nothing_and_can_extend_it(tmp_path):
    train(_tiny(tmp_path / "a"), progress=False)
    before = _weights(tmp_path / "a")
    result = train(_tiny(tmp_path / "a"), progress=False, resume=True)
    assert len(result.metrics) == 2
    after = _weights(tmp_path / "a")
    assert all(torch.equal(before[k], after[k]) for k in before)
    result = train(_tiny(tmp_path / "a", epochs=3), progress=False, resume=True)
    assert [row["epoch"] for row in result.metrics] == [1, 2, 3]


def test_resume_refuses_a_changed_hyperparameter(tmp_path):
    train(_tiny(tmp_path / "a", epochs=1), progress=False)
    with pytest.raises(FlatlabError, match="--sigma 0.1 differs from the run's 0.05"):
        main(["--out", str(tmp_path / "a"), "--resume", "--sigma", "0.1"])


def test_resume_without_state_is_a_clear_error(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(FlatlabError, match="has no train_state.safetensors to resume from"):
        main(["--out", str(tmp_path / "empty"), "--resume"])
    with pytest.raises(FlatlabError, match="has no train_state.safetensors to resume from"):
        train(_tiny(tmp_path / "empty"), resume=True)


def test_resume_from_a_corrupt_state_is_a_clear_error(tmp_path):
    train(_tiny(tmp_path / "a", epochs=1), progress=False)
    state = tmp_path / "a" / "train_state.safetensors"
    state.write_bytes(state.read_bytes()[:-10])
    with pytest.raises(FlatlabError, match="truncated or corrupted"):
        main(["--out", str(tmp_path / "a"), "--resume"])
