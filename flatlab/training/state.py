"""Training progress and the training state that ``--resume`` continues bit-identically from.

``train_state.safetensors`` holds the config, the progress counters (epoch, batch within it,
step, gradient evaluations, seconds, finished rows of ``metrics.csv``, the partial totals of the
current epoch), the model, optimizer and scheduler state dicts (NSO's noise generator is in the
optimizer's), torch's RNG states and, with ``independent_noise`` on several processes, every
rank's noise generator state. Where they apply: every rank's augmentation generator state
(``augment``), the fp16 gradient scaler (``scaler``), the best epoch so far (``best``: epoch,
val_acc, val_loss) and what ``--init-from`` did (``init_from``).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from flatlab import distributed
from flatlab.checkpoint import save_state
from flatlab.data import Dataset
from flatlab.training.build import Parts
from flatlab.training.config import TrainConfig
from flatlab.training.rundir import STATE_KIND, VAL_COLUMNS


@dataclass
class EpochTotals:
    """Running sums of the epoch in progress."""

    loss_sum: float = 0.0
    correct: int = 0
    count: int = 0
    skipped: int = 0
    seconds: float = 0.0
    lr: float = 0.0


@dataclass
class Progress:
    """Where a run is: restored on resume, advanced by the loop."""

    epoch: int = 0
    batch: int = 0
    step: int = 0
    grad_evals: int = 0
    elapsed: float = 0.0
    metrics: list[dict] = field(default_factory=list)
    partial: EpochTotals = field(default_factory=EpochTotals)
    best: dict | None = None       # {"epoch", "val_acc", "val_loss"} of best.safetensors
    init_from: dict | None = None  # the checkpoint metadata entry of --init-from


def checkpoint_metadata(config: TrainConfig, data: Dataset, progress: Progress,
                        run_name: str) -> dict:
    """A checkpoint's metadata: what rebuilds model and data, and how they were trained."""
    last = progress.metrics[-1] if progress.metrics else {}
    return {
        "model": {"name": config.model, "kwargs": config.model_kwargs,
                  "input_shape": list(data.input_shape), "num_classes": data.num_classes},
        "dataset": data.spec,
        "optimizer": {"name": config.optimizer, "kwargs": config.record()},
        "epoch": progress.epoch, "step": progress.step, "grad_evals": progress.grad_evals,
        "metrics": {k: last.get(k) for k in ("train_loss", "train_acc", "test_loss", "test_acc")
                    + (VAL_COLUMNS if "val_loss" in last else ())},
        "seed": config.seed, "run_name": run_name,
        **({"init_from": progress.init_from} if progress.init_from is not None else {}),
    }


def save_train_state(path: Path, config: TrainConfig, parts: Parts, progress: Progress) -> None:
    """Write the training state (rank 0); a collective: every rank must call it."""
    noise_states = _gather_noise_states(config, parts)
    augment = _gather(parts.augment, parts.world) if parts.augment is not None else None
    if not distributed.is_main_process():
        return
    rng: dict[str, Any] = {"torch": torch.get_rng_state()}
    if parts.device.type == "cuda":
        rng["cuda"] = torch.cuda.get_rng_state_all()
    save_state(path, {
        "kind": STATE_KIND, "config": config.to_dict(),
        "epoch": progress.epoch, "batch": progress.batch, "step": progress.step,
        "grad_evals": progress.grad_evals, "elapsed": progress.elapsed,
        "metrics": progress.metrics, "partial": dataclasses.asdict(progress.partial),
        "model": parts.module.state_dict(), "optimizer": parts.optimizer.state_dict(),
        "scheduler": parts.scheduler.state_dict(), "rng": rng,
        **({"noise_states": noise_states} if noise_states is not None else {}),
        **_optional(augment=augment, best=progress.best, init_from=progress.init_from,
                    scaler=parts.scaler.state_dict() if parts.scaler is not None else None),
    })


def _optional(**entries: Any) -> dict[str, Any]:
    """The entries that apply (not None): a run without them saves the state it always did."""
    return {key: value for key, value in entries.items() if value is not None}


def restore_train_state(state: dict, config: TrainConfig, parts: Parts) -> Progress:
    """Load a saved state into ``parts`` and the RNGs; the progress it was saved at."""
    parts.module.load_state_dict(state["model"])
    parts.optimizer.load_state_dict(state["optimizer"])
    parts.scheduler.load_state_dict(state["scheduler"])
    _restore_noise(config, parts, state.get("noise_states"))
    torch.set_rng_state(state["rng"]["torch"])
    cuda_states = state["rng"].get("cuda") or []
    if parts.device.type == "cuda" and len(cuda_states) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda_states)
    if parts.augment is not None:
        _scatter(parts.augment, state.get("augment"), parts.world)
    if parts.scaler is not None and state.get("scaler"):
        parts.scaler.load_state_dict(state["scaler"])
    return Progress(epoch=int(state["epoch"]), batch=int(state["batch"]),
                    step=int(state["step"]), grad_evals=int(state["grad_evals"]),
                    elapsed=float(state["elapsed"]),
                    metrics=[dict(row) for row in state["metrics"]],
                    partial=EpochTotals(**state["partial"]), best=state.get("best"),
                    init_from=state.get("init_from"))


def _own_noise(config: TrainConfig, parts: Parts) -> torch.Generator | None:
    """The noise generator when every rank has its own stream, else None."""
    generator = getattr(parts.optimizer, "generator", None)
    if generator is None or not config.independent_noise or parts.world == 1:
        return None
    return generator


def _gather_noise_states(config: TrainConfig, parts: Parts) -> Tensor | None:
    """With ``independent_noise`` on several processes: every rank's noise generator state
    (one row per rank); otherwise None (rank 0's is in the optimizer state)."""
    generator = _own_noise(config, parts)
    if generator is None:
        return None
    return distributed.all_gather_cat(generator.get_state().unsqueeze(0))


def _restore_noise(config: TrainConfig, parts: Parts, noise_states: Tensor | None) -> None:
    """Give each rank its own noise stream back (the optimizer state holds rank 0's)."""
    generator = _own_noise(config, parts)
    if generator is None:
        return
    if noise_states is not None and len(noise_states) == parts.world:
        generator.set_state(noise_states[distributed.rank()].clone())  # own storage
    else:  # saved with another number of processes: new streams, one per rank
        seed = int(torch.randint(2**62, (1,), generator=generator))
        generator.manual_seed((seed + 1_000_003 * distributed.rank()) % 2**63)


def _gather(generator: torch.Generator, world: int) -> Tensor:
    """Every rank's state of its own ``generator``, one row per rank (a collective)."""
    state = generator.get_state().unsqueeze(0)
    return distributed.all_gather_cat(state) if world > 1 else state


def _scatter(generator: torch.Generator, states: Tensor | None, world: int) -> None:
    """This rank's row of :func:`_gather`'s states; with another number of processes (or none
    saved) the generator keeps the fresh stream it was seeded with."""
    if states is not None and len(states) == world:
        generator.set_state(states[distributed.rank()].clone())
