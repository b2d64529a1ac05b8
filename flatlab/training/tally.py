"""The running statistics of the epoch in progress, kept on the device.

Reading a CUDA tensor on the host (``.item()``, ``float()``, ``bool()``) waits until every
kernel queued before it has run: one read per step drains the GPU queue at every step. So each
step's statistics (:func:`~.step.train_step`: loss sum, correct, count, non-finite ranks,
stop requests) are added to a float64 tensor on the device, and the host reads the sums only
where it needs numbers: at a save, at the end of an epoch, and for a progress bar on a
terminal (at most once a second).

The decisions a loop has to take at every step (did a loss go non-finite? did any process
receive a stop signal?) use the flags of the *previous* step: :meth:`Tally.add` copies the
new step's two flags, without blocking, into pinned host memory and records a CUDA event; the
flags it returns are the last step's, read once the next step has been queued, when their copy
is long done. The GPU queue never empties; a NaN stops the run one step late (no file is
written in between, so the last completed save is still the last good state).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from flatlab.training.state import EpochTotals
from flatlab.training.step import CORRECT, COUNT, LOSS_SUM, NON_FINITE, STOP, StepOutcome


class Tally:
    """Device sums of one epoch, starting from ``totals`` (a resumed epoch's partial sums);
    ``first_step``: how many steps came before this epoch (steps are numbered from 1)."""

    def __init__(self, totals: EpochTotals, device: torch.device, first_step: int) -> None:
        self.device = device
        self.first_step = first_step
        self.sums = torch.tensor([totals.loss_sum, totals.correct, totals.count, 0.0, 0.0],
                                 dtype=torch.float64, device=device)
        # the first step with a non-finite loss (0: none yet) and this rank's loss there
        self.bad = torch.zeros(2, dtype=torch.float64, device=device)
        self._pending: tuple[Tensor, torch.cuda.Event | None] | None = None

    def add(self, outcome: StepOutcome, step: int, *, lagged: bool = True
            ) -> tuple[float, float] | None:
        """Add step number ``step``; with ``lagged``: the (non-finite, stop) flags of the step
        added before it (``None`` for the first), without waiting for this one."""
        stats = outcome.stats
        first = (stats[NON_FINITE] > 0) & (self.bad[0] == 0)
        found = torch.stack([stats.new_full((), float(step)), outcome.bad_loss])
        self.bad = torch.where(first, found, self.bad)
        self.sums += stats
        if not lagged:
            return None
        flags = stats[NON_FINITE:STOP + 1]
        if self.device.type == "cuda":
            host = torch.empty(flags.shape, dtype=flags.dtype, pin_memory=True)
            host.copy_(flags, non_blocking=True)
            event = torch.cuda.Event()
            event.record()
        else:
            host, event = flags.clone(), None
        previous, self._pending = self._pending, (host, event)
        if previous is None:
            return None
        host, event = previous
        if event is not None:
            event.synchronize()
        non_finite, stop = host.tolist()
        return non_finite, stop

    def settle(self, totals: EpochTotals) -> Settled:
        """Read the sums into ``totals`` (one host synchronisation) and say what happened so
        far this epoch. A step with a non-finite loss contributes no sums."""
        values = torch.cat([self.sums, self.bad]).tolist()
        totals.loss_sum = values[LOSS_SUM]
        totals.correct = round(values[CORRECT])
        totals.count = round(values[COUNT])
        return Settled(non_finite=values[NON_FINITE], stop=values[STOP],
                       bad_step=round(values[5]), bad_loss=values[6])


@dataclass(frozen=True)
class Settled:
    """The epoch so far: steps with a non-finite loss (on some rank), stop requests, the
    first non-finite step's number (0: none) and this rank's loss there."""

    non_finite: float
    stop: float
    bad_step: int
    bad_loss: float
