"""A model factory for the reliability tests (never imported by flatlab itself).

``probe`` builds a small MLP (plus an optional zero ``ballast`` buffer that makes its files
bigger). Its training forward passes are counted, and environment variables set by a test make
pass number N do something to its own process, as a cluster or a user would from outside:

- ``PROBE_SIGNAL="RANK:N:SIGNAME"``: send SIGNAME to this process at pass N (``RANK`` ``*`` for
  every rank, else only torchrun rank RANK);
- ``PROBE_GATE="N:DIR"``: at pass N write ``DIR/started`` (this pid) and wait until
  ``DIR/release`` exists (at most 120 s);
- ``PROBE_STORM="RUN_DIR:LOG"``: from the signal on, a thread sends SIGTERM and SIGINT again
  and again for as long as a temporary file of the training state exists in RUN_DIR (a save
  is being written), one line in LOG per signal. SIGTERM and SIGINT are ignored when this
  module is imported, so that a signal of the storm arriving after the run cannot kill the
  process (the trainer installs its own handlers for the run and restores these).
"""

from __future__ import annotations

import math
import os
import signal
import threading
import time
from pathlib import Path

import torch
from torch import nn

if os.environ.get("PROBE_STORM"):
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)


class Probe(nn.Module):
    def __init__(self, input_shape, num_classes, hidden: int = 16, ballast: int = 0) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Flatten(), nn.Linear(math.prod(input_shape), hidden),
                                  nn.ReLU(), nn.Linear(hidden, num_classes))
        if ballast:
            self.register_buffer("ballast", torch.zeros(ballast))
        self.calls = 0

    def forward(self, x):
        if self.training:
            self.calls += 1
            _act(self.calls)
        return self.body(x)


def probe(input_shape, num_classes, hidden: int = 16, ballast: int = 0) -> Probe:
    return Probe(input_shape, num_classes, hidden, ballast)


def _act(calls: int) -> None:
    rank = os.environ.get("RANK", "0")
    spec = os.environ.get("PROBE_SIGNAL")
    if spec:
        who, at, name = spec.split(":")
        if int(at) == calls and who in ("*", rank):
            os.kill(os.getpid(), getattr(signal, name))
            if os.environ.get("PROBE_STORM"):
                threading.Thread(target=_storm, daemon=True).start()
    gate = os.environ.get("PROBE_GATE")
    if gate:
        at, folder = gate.split(":", 1)
        if int(at) == calls:
            Path(folder, "started").write_text(str(os.getpid()))
            deadline = time.monotonic() + 120
            while not Path(folder, "release").exists() and time.monotonic() < deadline:
                time.sleep(0.01)


def _storm() -> None:
    run_dir, log = os.environ["PROBE_STORM"].split(":", 1)
    deadline = time.monotonic() + 60
    with open(log, "a") as out:
        while time.monotonic() < deadline:
            if list(Path(run_dir).glob(".train_state.safetensors.*.tmp")):
                for signum in (signal.SIGTERM, signal.SIGINT):
                    os.kill(os.getpid(), signum)
                    out.write(f"{signum}\n")
                    out.flush()
            else:
                time.sleep(0.0002)
