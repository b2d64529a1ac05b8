"""What each optimizer step sees: the data order of an epoch and the learning-rate factor."""

from __future__ import annotations

import math

import torch
from torch import Tensor


def epoch_order(num_samples: int, seed: int, epoch: int, *, rank: int = 0,
                world_size: int = 1) -> Tensor:
    """Indices this rank visits in ``epoch``: ``DistributedSampler(shuffle=True, seed=seed,
    drop_last=False)`` after ``set_epoch(epoch)``, for any ``world_size`` (1: a permutation)."""
    generator = torch.Generator().manual_seed(seed + epoch)
    indices = torch.randperm(num_samples, generator=generator)
    total = math.ceil(num_samples / world_size) * world_size
    if total > num_samples:
        repeats = math.ceil((total - num_samples) / num_samples)
        indices = torch.cat([indices, indices.repeat(repeats)[: total - num_samples]])
    return indices[rank:total:world_size]


def batches_of(order: Tensor, batch_size: int) -> list[Tensor]:
    """Consecutive batches of ``order``; a final batch of one example is dropped (BatchNorm
    cannot normalise a single example in training mode)."""
    batches = list(order.split(batch_size))
    if len(batches) > 1 and len(batches[-1]) == 1:
        batches.pop()
    return batches


def lr_factor(schedule: str, step: int, total_steps: int, *, gamma: float = 0.1,
              drop_every: int = 0) -> float:
    """Learning-rate multiplier at optimizer step ``step`` of ``total_steps``.

    ``none``: 1; ``cosine``: ``(1 + cos(pi * step / total)) / 2``; ``step``: ``gamma ** d``
    after ``d`` drops, one every ``drop_every`` steps (StepLR with ``step_size = step_every``
    epochs stepped per epoch is ``drop_every = step_every * steps_per_epoch``) or, with
    ``drop_every = 0``, one after half and one after three quarters of the steps.
    """
    if schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * min(step, total_steps) / total_steps))
    if schedule == "step":
        if drop_every:
            return gamma ** (step // drop_every)
        return gamma ** ((step >= total_steps // 2) + (step >= (3 * total_steps) // 4))
    return 1.0
