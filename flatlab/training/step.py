"""One optimizer step on one batch, undoing a step, and evaluating a model.

Every optimizer takes ``optimizer.step(closure)`` with an LBFGS-style closure (plain SGD takes
one too), so NSO, SAM, ASAM, RWP and SGD share this code path. The statistics of a step (loss,
correct predictions) come from its first forward pass, and are summed over the processes so
that every rank sees the global batch's numbers and takes the same branch afterwards.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from flatlab import distributed
from flatlab.optim import PerturbationOptimizer
from flatlab.runtime import autocast
from flatlab.training.build import Parts

EVAL_BATCH_SIZE = 1024


@dataclass(frozen=True)
class StepOutcome:
    """What one step did: global ``loss_sum``/``correct``/``count`` when every rank's loss was
    finite, else ``problem`` ("loss is nan", ...); ``passes`` forward/backward on this rank."""

    loss_sum: float
    correct: int
    count: int
    passes: int
    problem: str | None


def train_step(parts: Parts, x: Tensor, y: Tensor, *, precision: str) -> StepOutcome:
    """``optimizer.step(closure)`` on the model inputs ``x`` and labels ``y``.

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
    values = torch.stack(losses).cpu() if losses else torch.zeros(1)
    finite = bool(torch.isfinite(values).all())
    # [loss sum, correct, count, non-finite ranks] of the global batch
    stats = torch.tensor([float(values[0]) * len(y) if finite else 0.0,
                          float(first[0]) if first and finite else 0.0,
                          float(len(y)) if finite else 0.0, 0.0 if finite else 1.0],
                         dtype=torch.float64)
    if parts.world > 1:
        stats = distributed.all_reduce_sum(stats.to(parts.device)).cpu()
    problem = None
    if stats[3] != 0:
        problem = (f"loss is {float(values[~torch.isfinite(values)][0])}" if not finite
                   else "loss is not finite on another process")
    return StepOutcome(loss_sum=float(stats[0]), correct=round(float(stats[1])),
                       count=round(float(stats[2])), passes=len(losses), problem=problem)


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
