"""One optimizer step on one batch, undoing a step, and evaluating a model.

Every optimizer takes ``optimizer.step(closure)`` with an LBFGS-style closure (plain SGD takes
one too), so NSO, SAM, ASAM, RWP and SGD share this code path. The statistics of a step (loss,
correct predictions) come from its first forward pass, and are summed over the processes so
that every rank sees the global batch's numbers and takes the same branch afterwards.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from flatlab import distributed
from flatlab.optim import PerturbationOptimizer
from flatlab.runtime import autocast
from flatlab.training.build import Parts

EVAL_BATCH_SIZE = 1024


# the columns of a step's statistics (``StepOutcome.stats``)
LOSS_SUM, CORRECT, COUNT, NON_FINITE, STOP = range(5)


@dataclass(frozen=True)
class StepOutcome:
    """What one step did, as tensors on the device (reading them would wait for the step).

    ``stats``: float64 ``[loss sum, correct, count, non-finite ranks, stop requests]`` of the
    global batch (summed over processes; loss sum, correct and count are 0 on a rank whose loss
    was not finite). ``bad_loss``: this rank's first non-finite loss of the step (0 if none).
    ``passes``: forward/backward passes on this rank.
    """

    stats: Tensor
    bad_loss: Tensor
    passes: int


def train_step(parts: Parts, x: Tensor, y: Tensor, *, precision: str,
               stop: Callable[[], bool] | None = None) -> StepOutcome:
    """``optimizer.step(closure)`` on the model inputs ``x`` and labels ``y``. ``stop``, asked
    once the passes are done: whether this process asks every process to stop (the answer
    travels in the statistics' all-reduce, so all ranks learn it at the same step). No host
    synchronisation.

    With ``parts.scaler`` (fp16) the closure back-propagates the scaled loss and the scaler
    unscales, skips a step with inf/NaN gradients and adapts the scale: a perturbation optimizer
    takes it as ``step(closure, scaler=scaler)``, a plain one through ``scaler.step``.
    """
    losses: list[Tensor] = []
    first: list[Tensor] = []
    scaler = parts.scaler

    def closure() -> Tensor:
        parts.optimizer.zero_grad(set_to_none=True)
        with autocast(parts.device, precision):
            out = parts.model(x)
        loss = parts.criterion(out.float(), y)
        (loss if scaler is None else scaler.scale(loss)).backward()
        losses.append(loss.detach())
        if not first:
            first.append((out.detach().argmax(dim=1) == y).sum())
        return loss

    if scaler is None:
        parts.optimizer.step(closure)
    elif isinstance(parts.optimizer, PerturbationOptimizer):
        parts.optimizer.step(closure, scaler=scaler)
        scaler.update()
    else:
        closure()
        scaler.step(parts.optimizer)
        scaler.update()
    values = (torch.stack(losses) if losses
              else torch.zeros(1, device=parts.device)).to(torch.float64)
    finite = torch.isfinite(values)
    all_finite = finite.all()
    zero = values.new_zeros(())
    correct = first[0].to(torch.float64) if first else zero
    stats = torch.stack([torch.where(all_finite, values[0] * len(y), zero),
                         torch.where(all_finite, correct, zero),
                         all_finite.to(torch.float64) * len(y),
                         (~all_finite).to(torch.float64),
                         zero + float(stop is not None and stop())])
    if parts.world > 1:
        stats = distributed.all_reduce_sum(stats)
    bad = values.gather(0, (~finite).to(torch.uint8).argmax().reshape(1))[0]
    return StepOutcome(stats=stats, bad_loss=torch.where(all_finite, zero, bad),
                       passes=len(losses))


def describe_problem(non_finite: float, bad_loss: float) -> str | None:
    """The message for a step's ``non_finite`` count and this rank's ``bad_loss``."""
    if not non_finite:
        return None
    if not math.isfinite(bad_loss):
        return f"loss is {bad_loss}"
    return "loss is not finite on another process"


Snapshot = tuple[list[Tensor], dict]


def snapshot(parts: Parts) -> Snapshot:
    """Copies of the weights, buffers and optimizer state, for :func:`undo`."""
    return ([t.detach().clone() for t in parts.module.state_dict().values()],
            copy.deepcopy(parts.optimizer.state_dict()))


@torch.no_grad()
def undo(parts: Parts, saved: Snapshot) -> None:
    """Put back what :func:`snapshot` copied (exactly: copies, not arithmetic)."""
    tensors, optimizer_state = saved
    for current, old in zip(parts.module.state_dict().values(), tensors, strict=True):
        current.copy_(old)
    parts.optimizer.load_state_dict(optimizer_state)


@torch.no_grad()
def evaluate(model: nn.Module, x: Tensor, y: Tensor, *, batch_size: int = EVAL_BATCH_SIZE,
             transform: Callable[[Tensor], Tensor] | None = None) -> tuple[float, float]:
    """Mean cross-entropy and accuracy of ``model`` in eval mode (train mode is restored);
    ``transform`` turns each stored batch into model inputs (``Dataset.normalize``)."""
    was_training = model.training
    model.eval()
    loss_sum, correct = 0.0, 0
    try:
        for start in range(0, len(y), batch_size):
            xb, yb = x[start:start + batch_size], y[start:start + batch_size]
            out = model(xb if transform is None else transform(xb))
            loss_sum += nn.functional.cross_entropy(out, yb, reduction="sum").item()
            correct += int((out.argmax(dim=1) == yb).sum())
    finally:
        model.train(was_training)
    n = max(len(y), 1)
    return loss_sum / n, correct / n
