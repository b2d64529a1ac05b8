"""Training loop and ``python -m flatlab.train``.

One loop for every optimizer: each step calls ``optimizer.step(closure)`` with an LBFGS-style
closure (plain SGD takes one too), so NSO, SAM, ASAM, RWP and SGD share the same code path.
A run directory ``runs/NAME`` receives:

* ``config.toml``: the resolved configuration (``--config runs/NAME/config.toml`` re-runs it);
* ``metrics.csv``: one row per epoch (rewritten atomically after each epoch);
* ``model.safetensors``: the weights after the latest epoch, with metadata (see
  :mod:`flatlab.checkpoint`);
* ``train_state.safetensors``: everything ``--resume`` needs to continue bit-identically
  (weights, optimizer state including NSO's noise generator, scheduler, RNG, data position).

Data order: epoch ``e`` visits the training set in ``torch.randperm`` order from a generator
seeded with ``seed + e``, exactly as ``torch.utils.data.DistributedSampler(shuffle=True,
seed=seed)`` after ``set_epoch(e)`` does (:func:`epoch_order`), so a resumed run sees the same
batches.

Under ``torchrun --nproc_per_node N -m flatlab.train ...`` the model is wrapped in
``DistributedDataParallel``; ``batch_size`` stays the *global* batch: rank r takes every N-th
index of the epoch's order (``DistributedSampler``) in batches of ``batch_size / N``, so step s
of an N-process run sees the same examples as step s of a 1-process run, and the gradient
averaged over ranks is the one-process gradient (to rounding). Perturbation optimizers run
their passes in ``no_sync()`` and all-reduce once per step (see :mod:`flatlab.optim`). Only the
main process (rank 0) writes files or prints. ``precision="bf16"`` runs the forward passes
under ``torch.autocast(bfloat16)``; weights, optimizer state, NSO's noise and the saved weight
copies stay float32.

A NaN or infinite loss stops the run (:class:`~flatlab.errors.DivergenceError`, exit status 3)
with the files of the last completed save left untouched; ``on_nan="skip"`` instead undoes that
step (weights, buffers and optimizer state) and counts it in ``metrics.csv``.
"""

from __future__ import annotations

import copy
import csv
import dataclasses
import io
import math
import re
import sys
import time
import tomllib
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

import flatlab
from flatlab import distributed
from flatlab.checkpoint import CHECKPOINT_NAME, load_state, save_checkpoint, save_state
from flatlab.data import DATASETS, Dataset, load_dataset
from flatlab.errors import ArgumentParser, DivergenceError, FlatlabError, run_cli
from flatlab.io import atomic_write_text
from flatlab.models import MODELS, build_model
from flatlab.runtime import DEVICES, resolve_device, seed_everything, set_threads

STATE_NAME = "train_state.safetensors"
METRICS_NAME = "metrics.csv"
CONFIG_NAME = "config.toml"
METRICS_COLUMNS = ("epoch", "train_loss", "train_acc", "test_loss", "test_acc", "seconds",
                   "grad_evals", "lr", "skipped_steps")
OPTIMIZER_NAMES = ("sgd", "sam", "asam", "rwp", "nso")
SCHEDULES = ("none", "step", "cosine")
ON_NAN = ("stop", "skip")
NOISE_TYPES = ("absolute", "filter")
PRECISIONS = ("fp32", "bf16")
EVAL_BATCH_SIZE = 1024
_RUN_FILES = (CHECKPOINT_NAME, STATE_NAME, METRICS_NAME, CONFIG_NAME)
# what may change when a run is resumed (everything else must match the saved config)
_RESUMABLE_CHANGES = ("epochs", "device", "precision",
                      "threads", "save_every_steps", "on_nan", "data_dir",
                      "out")


# --------------------------------------------------------------------------- configuration

@dataclass
class TrainConfig:
    """Everything that defines a training run; the TOML file and the flags set these fields.

    Method arguments left ``None`` (``sigma``, ``num_perturbs``, ``rho``, ``noise``,
    ``clean_weight``) take the optimizer's own default. ``out=None`` picks
    ``runs/<dataset>-<model>-<optimizer>`` (with ``-2``, ``-3``, ... if that is taken).
    """

    dataset: str = "mnist1d"
    dataset_kwargs: dict = field(default_factory=dict)
    data_seed: int = 0
    data_dir: str | None = None
    model: str = "cnn1d"
    model_kwargs: dict = field(default_factory=dict)
    optimizer: str = "sgd"
    base_optimizer: str = "sgd"
    sigma: float | None = None
    num_perturbs: int | None = None
    rho: float | None = None
    noise: str | None = None
    clean_weight: float | None = None
    independent_noise: bool = False
    epochs: int = 60
    batch_size: int = 128
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 5e-4
    label_smoothing: float = 0.0
    schedule: str = "cosine"
    seed: int = 0
    device: str = "auto"
    precision: str = "fp32"
    threads: int = 0
    save_every_steps: int = 0
    on_nan: str = "stop"
    out: str | None = None

    # ---- conversions
    def to_dict(self) -> dict[str, Any]:
        """Plain JSON/TOML-able values (``None`` kept)."""
        return {f.name: copy.deepcopy(getattr(self, f.name)) for f in dataclasses.fields(self)}

    @classmethod
    def from_dict(cls, values: dict[str, Any], *, source: str = "config",
                  base: TrainConfig | None = None) -> TrainConfig:
        """Type-checked construction: unknown keys and wrong types raise one-line FlatlabErrors.

        Keys missing from ``values`` keep their value in ``base`` (default: the defaults).
        """
        merged = (base or cls()).to_dict()
        for key, value in values.items():
            if key not in _FIELD_TYPES:
                raise FlatlabError(f"{source}: unknown key {key!r}; known keys: "
                                   f"{', '.join(_FIELD_TYPES)}")
            merged[key] = _check_type(key, value, source)
        return cls(**merged)

    @classmethod
    def from_toml(cls, path: str | Path, *, base: TrainConfig | None = None) -> TrainConfig:
        """Read a TOML config file (see :meth:`to_toml`)."""
        path = Path(path)
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            raise FlatlabError(f"config file {str(path)!r} does not exist") from None
        except (OSError, UnicodeDecodeError) as err:
            raise FlatlabError(f"cannot read config file {str(path)!r}: {err}") from None
        return cls.from_toml_text(text, source=str(path), base=base)

    @classmethod
    def from_toml_text(cls, text: str, *, source: str = "config",
                       base: TrainConfig | None = None) -> TrainConfig:
        try:
            values = tomllib.loads(text)
        except tomllib.TOMLDecodeError as err:
            raise FlatlabError(f"{source}: invalid TOML ({err})") from None
        return cls.from_dict(values, source=source, base=base)

    def to_toml(self, *, comment: str = "") -> str:
        """TOML text that :meth:`from_toml` reads back to an equal config (``out`` left out)."""
        lines = [f"# {line}" for line in comment.splitlines()]
        tables = []
        for key, value in self.to_dict().items():
            if value is None or key == "out":
                continue
            if isinstance(value, dict):
                if value:
                    tables.append((key, value))
            else:
                lines.append(f"{key} = {_toml_value(value)}")
        for key, table in tables:
            lines += ["", f"[{key}]"] + [f"{_toml_key(k)} = {_toml_value(v)}"
                                         for k, v in table.items()]
        return "\n".join(lines) + "\n"

    # ---- validation at the boundary
    def validate(self) -> TrainConfig:
        """Check every value; the first bad one raises a FlatlabError naming it."""
        _choice("dataset", self.dataset, DATASETS)
        if self.model not in MODELS and ":" not in self.model:
            raise FlatlabError(f"--model: unknown model {self.model!r}; choose one of "
                               f"{', '.join(MODELS)} or 'package.module:factory'")
        _choice("optimizer", self.optimizer, OPTIMIZER_NAMES)
        _choice("schedule", self.schedule, SCHEDULES)
        _choice("on_nan", self.on_nan, ON_NAN)
        _choice("precision", self.precision, PRECISIONS)
        if self.independent_noise and self.optimizer not in ("nso", "rwp"):
            raise FlatlabError(f"--independent-noise applies to nso and rwp only, not "
                               f"{self.optimizer!r}")
        if self.device not in DEVICES and not re.fullmatch(r"cuda:\d+", self.device):
            raise FlatlabError(f"--device: unknown device {self.device!r}; choose one of "
                               f"{', '.join(DEVICES)}")
        if self.noise is not None:
            _choice("noise", self.noise, NOISE_TYPES)
        _bounded("epochs", self.epochs, low=1)
        _bounded("batch_size", self.batch_size, low=1)
        _bounded("save_every_steps", self.save_every_steps, low=0)
        _bounded("threads", self.threads, low=0, high=1024)
        _bounded("seed", self.seed, low=0, high=2**32 - 1)
        _bounded("data_seed", self.data_seed, low=0, high=2**32 - 1)
        _bounded("lr", self.lr, low=0.0)
        _bounded("momentum", self.momentum, low=0.0, high=1.0, high_open=True)
        _bounded("weight_decay", self.weight_decay, low=0.0)
        _bounded("label_smoothing", self.label_smoothing, low=0.0, high=1.0, high_open=True)
        if self.sigma is not None:
            _bounded("sigma", self.sigma, low=0.0)
        if self.num_perturbs is not None:
            _bounded("num_perturbs", self.num_perturbs, low=1)
        if self.rho is not None:
            _bounded("rho", self.rho, low=0.0, low_open=True)
        if self.clean_weight is not None:
            _bounded("clean_weight", self.clean_weight, low=0.0, high=1.0)
        return self


_FIELD_TYPES: dict[str, tuple[type, ...]] = {
    "dataset": (str,), "dataset_kwargs": (dict,), "data_seed": (int,),
    "data_dir": (str, type(None)), "model": (str,), "model_kwargs": (dict,),
    "optimizer": (str,), "base_optimizer": (str,), "sigma": (float, type(None)),
    "num_perturbs": (int, type(None)), "rho": (float, type(None)),
    "noise": (str, type(None)), "clean_weight": (float, type(None)),
    "independent_noise": (bool,), "epochs": (int,),
    "batch_size": (int,), "lr": (float,), "momentum": (float,), "weight_decay": (float,),
    "label_smoothing": (float,), "schedule": (str,), "seed": (int,), "device": (str,),
    "precision": (str,),
    "threads": (int,), "save_every_steps": (int,), "on_nan": (str,), "out": (str, type(None)),
}
assert tuple(_FIELD_TYPES) == tuple(f.name for f in dataclasses.fields(TrainConfig))


def _check_type(key: str, value: Any, source: str) -> Any:
    types = _FIELD_TYPES[key]
    if isinstance(value, bool) and bool not in types:
        pass  # bool is an int subclass: never accept it for a number
    elif isinstance(value, int) and float in types:
        return float(value)
    elif isinstance(value, types):
        if dict in types:
            _check_plain(key, value, source)
            return copy.deepcopy(value)
        return value
    wanted = " or ".join("none" if t is type(None) else t.__name__ for t in types)
    raise FlatlabError(f"{source}: {key!r} must be {wanted}, got {type(value).__name__} "
                       f"{_short(value)}")


def _check_plain(key: str, value: Any, source: str) -> None:
    """Model/dataset kwargs: str keys; numbers, strings, booleans and lists/tables of them."""
    if isinstance(value, dict):
        for k, v in value.items():
            if not isinstance(k, str):
                raise FlatlabError(f"{source}: {key!r} keys must be strings, got {k!r}")
            _check_plain(f"{key}.{k}", v, source)
    elif isinstance(value, list):
        for v in value:
            _check_plain(key, v, source)
    elif not isinstance(value, bool | int | float | str):
        raise FlatlabError(f"{source}: {key!r} holds {type(value).__name__} {_short(value)}; "
                           f"only numbers, strings, booleans, lists and tables are allowed")


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _choice(name: str, value: str, choices: Sequence[str]) -> None:
    if value not in choices:
        raise FlatlabError(f"{_flag(name)}: invalid choice {value!r}; choose one of "
                           f"{', '.join(choices)}")


def _bounded(name: str, value: float, *, low: float | None = None, high: float | None = None,
             low_open: bool = False, high_open: bool = False) -> None:
    ok = isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
    if ok and low is not None:
        ok = value > low if low_open else value >= low
    if ok and high is not None:
        ok = value < high if high_open else value <= high
    if not ok:
        lo = "" if low is None else ("(" if low_open else "[") + f"{low}"
        hi = "" if high is None else f"{high}" + (")" if high_open else "]")
        rule = (f"in {lo}, {hi}" if low is not None and high is not None
                else f"{'>' if low_open else '>='} {low}")
        raise FlatlabError(f"{_flag(name)} must be {rule}, got {value!r}")


def _toml_key(key: str) -> str:
    return key if re.fullmatch(r"[A-Za-z0-9_-]+", key) else _toml_string(key)


def _toml_string(text: str) -> str:
    out = []
    for ch in text:
        if ch in ('"', "\\"):
            out.append("\\" + ch)
        elif ord(ch) < 0x20 or ord(ch) == 0x7F:
            out.append(f"\\u{ord(ch):04x}")
        else:
            out.append(ch)
    return '"' + "".join(out) + '"'


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return repr(value)
    if isinstance(value, str):
        return _toml_string(value)
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{_toml_key(k)} = {_toml_value(v)}"
                               for k, v in value.items()) + "}"
    raise TypeError(f"cannot write {type(value).__name__} to TOML")


# --------------------------------------------------------------------------- results & helpers

@dataclass
class TrainResult:
    """Where a run wrote its files, and its per-epoch metrics (the rows of ``metrics.csv``)."""

    out_dir: Path
    checkpoint: Path
    metrics: list[dict]


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


@torch.no_grad()
def evaluate(model: nn.Module, x: Tensor, y: Tensor, *,
             batch_size: int = EVAL_BATCH_SIZE) -> tuple[float, float]:
    """Mean cross-entropy and accuracy of ``model`` in eval mode (train mode is restored)."""
    was_training = model.training
    model.eval()
    loss_sum, correct = 0.0, 0
    try:
        for start in range(0, len(y), batch_size):
            xb, yb = x[start:start + batch_size], y[start:start + batch_size]
            out = model(xb)
            loss_sum += nn.functional.cross_entropy(out, yb, reduction="sum").item()
            correct += int((out.argmax(dim=1) == yb).sum())
    finally:
        model.train(was_training)
    n = max(len(y), 1)
    return loss_sum / n, correct / n


def lr_factor(schedule: str, step: int, total_steps: int) -> float:
    """Learning-rate multiplier at optimizer step ``step`` of ``total_steps``.

    ``none``: 1; ``cosine``: ``(1 + cos(pi * step / total)) / 2``; ``step``: 0.1 after half
    and 0.01 after three quarters of the steps.
    """
    if schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * min(step, total_steps) / total_steps))
    if schedule == "step":
        return 0.1 ** ((step >= total_steps // 2) + (step >= (3 * total_steps) // 4))
    return 1.0


def _is_main_process() -> bool:
    return distributed.is_main_process()


def _say(message: str) -> None:
    if _is_main_process():
        print(message, flush=True)


# --------------------------------------------------------------------------- the run

class _Run:
    """One training run: builds everything from a config, then trains (fresh or resumed)."""

    def __init__(self, config: TrainConfig, *, progress: bool, resume: bool) -> None:
        from flatlab.optim import build_optimizer, gradient_evaluations_per_step

        self.config = config
        self.progress = progress
        self.out_dir = _resolve_out_dir(config, resume)
        self.state_path = self.out_dir / STATE_NAME
        saved = self._check_run_dir(resume)
        self.device = distributed.device_for(resolve_device(config.device))
        self.world = distributed.world_size()
        if config.batch_size % self.world:
            raise FlatlabError(f"--batch-size {config.batch_size} (the global batch) must be "
                               f"divisible by the number of processes, {self.world}")
        seed_everything(config.seed)
        self.data: Dataset = load_dataset(config.dataset, seed=config.data_seed,
                                          data_dir=config.data_dir, **config.dataset_kwargs)
        # self.module: the network (save, load, evaluate); self.model: what the steps call,
        # DistributedDataParallel(self.module) under torchrun (replicas start from rank 0's)
        self.module = build_model(config.model, self.data.input_shape, self.data.num_classes,
                                  **config.model_kwargs).to(self.device)
        self.module.train()
        self.threads = set_threads(config.threads, sum(p.numel() for p in self.module.parameters()),
                                   self.device)
        self.model = distributed.wrap_model(self.module)
        try:
            self.optimizer = build_optimizer(
                config.optimizer, self.model.parameters(), lr=config.lr,
                momentum=config.momentum, weight_decay=config.weight_decay, sigma=config.sigma,
                num_perturbs=config.num_perturbs, rho=config.rho, noise=config.noise,
                clean_weight=config.clean_weight, seed=config.seed,
                base=config.base_optimizer, model=self.model,
                independent_noise=config.independent_noise)
        except ValueError as err:
            raise FlatlabError(f"--optimizer {config.optimizer}: {err}") from None
        self.grad_evals_per_step = gradient_evaluations_per_step(self.optimizer)
        self.criterion = nn.CrossEntropyLoss(label_smoothing=config.label_smoothing)
        self.batches_per_epoch = len(batches_of(
            epoch_order(len(self.data.y_train), 0, 0, world_size=self.world),
            config.batch_size // self.world))
        total_steps = config.epochs * self.batches_per_epoch
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda step: lr_factor(config.schedule, step, total_steps))
        self.x_train = self.data.x_train.to(self.device)
        self.y_train = self.data.y_train.to(self.device)
        self.x_test = self.data.x_test.to(self.device)
        self.y_test = self.data.y_test.to(self.device)
        # progress counters (restored on resume)
        self.epoch, self.batch, self.step, self.grad_evals = 0, 0, 0, 0
        self.elapsed = 0.0
        self.metrics: list[dict] = []
        self.partial = _EpochTotals()
        self.saved_at: tuple[int, int] | None = None  # (epoch, step) of the last state save
        if saved is not None:
            self._restore(saved)

    # ---- run directory
    def _check_run_dir(self, resume: bool) -> dict | None:
        if not resume:
            taken = [name for name in _RUN_FILES if (self.out_dir / name).exists()]
            if taken:
                raise FlatlabError(f"{self.out_dir} already holds a run ({', '.join(taken)}); "
                                   f"pass --resume to continue it or choose another --out")
            return None
        if not self.out_dir.is_dir():
            raise FlatlabError(f"--resume: run directory {str(self.out_dir)!r} does not exist")
        if not self.state_path.is_file():
            raise FlatlabError(f"--resume: {self.out_dir} has no {STATE_NAME} to resume from "
                               f"(start the run again without --resume)")
        state = load_state(self.state_path)
        if state.get("kind") != "flatlab-train-state" or not isinstance(state.get("config"),
                                                                         dict):
            raise FlatlabError(f"{self.state_path} is not a flatlab training state")
        saved = TrainConfig.from_dict(state["config"], source=str(self.state_path))
        for key in saved.to_dict():
            if key not in _RESUMABLE_CHANGES and getattr(saved, key) != getattr(self.config, key):
                raise FlatlabError(
                    f"--resume: {_flag(key)} {getattr(self.config, key)!r} differs from the run's "
                    f"{getattr(saved, key)!r}; only {', '.join(map(_flag, _RESUMABLE_CHANGES))} "
                    f"may change on resume")
        return state

    def _restore(self, state: dict) -> None:
        self.module.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self._restore_noise(state.get("noise_states"))
        torch.set_rng_state(state["rng"]["torch"])
        cuda_states = state["rng"].get("cuda") or []
        if self.device.type == "cuda" and len(cuda_states) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda_states)
        self.epoch, self.batch = int(state["epoch"]), int(state["batch"])
        self.step, self.grad_evals = int(state["step"]), int(state["grad_evals"])
        self.elapsed = float(state["elapsed"])
        self.metrics = [dict(row) for row in state["metrics"]]
        self.partial = _EpochTotals(**state["partial"])
        self.saved_at = (self.epoch, self.step)

    def _save_state(self) -> None:
        noise_states = self._noise_states()  # a collective: every rank calls _save_state
        if not _is_main_process():
            self.saved_at = (self.epoch, self.step)
            return
        rng: dict[str, Any] = {"torch": torch.get_rng_state()}
        if self.device.type == "cuda":
            rng["cuda"] = torch.cuda.get_rng_state_all()
        save_state(self.state_path, {
            "kind": "flatlab-train-state", "config": self.config.to_dict(),
            "epoch": self.epoch, "batch": self.batch, "step": self.step,
            "grad_evals": self.grad_evals, "elapsed": self.elapsed,
            "metrics": self.metrics, "partial": dataclasses.asdict(self.partial),
            "model": self.module.state_dict(), "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(), "rng": rng,
            **({"noise_states": noise_states} if noise_states is not None else {}),
        })
        self.saved_at = (self.epoch, self.step)

    def _noise_states(self) -> Tensor | None:
        """With ``independent_noise`` on several processes: every rank's noise generator state
        (one row per rank); otherwise None (rank 0's is in the optimizer state)."""
        generator = getattr(self.optimizer, "generator", None)
        if generator is None or not self.config.independent_noise or self.world == 1:
            return None
        return distributed.all_gather_cat(generator.get_state().unsqueeze(0))

    def _restore_noise(self, noise_states: Tensor | None) -> None:
        """Give each rank its own noise stream back (the optimizer state holds rank 0's)."""
        generator = getattr(self.optimizer, "generator", None)
        if generator is None or not self.config.independent_noise or self.world == 1:
            return
        if noise_states is not None and len(noise_states) == self.world:
            generator.set_state(noise_states[distributed.rank()].clone())  # own storage
        else:  # saved with another number of processes: new streams, one per rank
            seed = int(torch.randint(2**62, (1,), generator=generator))
            generator.manual_seed((seed + 1_000_003 * distributed.rank()) % 2**63)

    # ---- outputs
    def _write_outputs(self) -> None:
        if not _is_main_process():
            return
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=METRICS_COLUMNS, lineterminator="\n")
        writer.writeheader()
        writer.writerows(self.metrics)
        atomic_write_text(self.out_dir / METRICS_NAME, buffer.getvalue())
        last = self.metrics[-1] if self.metrics else {}
        save_checkpoint(self.out_dir / CHECKPOINT_NAME, self.module, {
            "model": {"name": self.config.model, "kwargs": self.config.model_kwargs,
                      "input_shape": list(self.data.input_shape),
                      "num_classes": self.data.num_classes},
            "dataset": self.data.spec,
            "optimizer": {"name": self.config.optimizer, "kwargs": self._optimizer_kwargs()},
            "epoch": self.epoch, "step": self.step, "grad_evals": self.grad_evals,
            "metrics": {k: last.get(k) for k in ("train_loss", "train_acc", "test_loss",
                                                 "test_acc")},
            "seed": self.config.seed, "run_name": self.out_dir.name,
        })

    def _optimizer_kwargs(self) -> dict[str, Any]:
        c = self.config
        kwargs = {"base": c.base_optimizer, "lr": c.lr, "momentum": c.momentum,
                  "weight_decay": c.weight_decay, "sigma": c.sigma,
                  "num_perturbs": c.num_perturbs, "rho": c.rho, "noise": c.noise,
                  "clean_weight": c.clean_weight, "schedule": c.schedule,
                  "batch_size": c.batch_size, "label_smoothing": c.label_smoothing,
                  "precision": None if c.precision == "fp32" else c.precision,
                  "independent_noise": c.independent_noise or None}
        return {k: v for k, v in kwargs.items() if v is not None}

    # ---- training
    def run(self) -> TrainResult:
        c = self.config
        fresh = self.saved_at is None
        distributed.barrier()  # every rank has checked the run directory before rank 0 writes
        if fresh:
            if _is_main_process():
                self.out_dir.mkdir(parents=True, exist_ok=True)
            self._save_state()  # step 0: from here on --resume always has something to load
        if _is_main_process():
            _remove_stale_temp_files(self.out_dir)
            atomic_write_text(self.out_dir / CONFIG_NAME, c.to_toml(comment=(
                f"flatlab {flatlab.__version__} training config of {self.out_dir}\n"
                f"re-run: python -m flatlab.train --config {self.out_dir / CONFIG_NAME} "
                f"--out runs/NEW_NAME")))
        n_params = sum(p.numel() for p in self.module.parameters())
        _say(f"flatlab.train: {c.dataset} ({len(self.y_train)} train / {len(self.y_test)} test)"
             f" | {c.model} ({n_params:,} parameters) | {c.optimizer}, {self.grad_evals_per_step}"
             f" gradient evaluation(s) per step | {c.epochs} epochs x {self.batches_per_epoch} "
             f"steps | {self.device}"
             + (f" x {self.world} processes" if self.world > 1 else "")
             + (f" ({self.threads} thread{'s' * (self.threads > 1)})"
                if self.device.type == "cpu" else "") + f" -> {self.out_dir}")
        if not fresh:
            _say(f"resuming from epoch {self.epoch}, step {self.step}")
        while self.epoch < c.epochs:
            self._train_epoch()
        if not fresh and self.metrics:
            self._write_outputs()  # idempotent: a kill after the last state save loses nothing
        last = self.metrics[-1] if self.metrics else {}
        _say(f"done: test accuracy {100 * last.get('test_acc', float('nan')):.2f}% after "
             f"{c.epochs} epochs in {self.elapsed:.1f} s\n"
             f"wrote {self.out_dir / CHECKPOINT_NAME} (weights + metadata), "
             f"{self.out_dir / METRICS_NAME} (one row per epoch), "
             f"{self.out_dir / CONFIG_NAME} (re-runnable config), "
             f"{self.state_path} (for --resume)")
        distributed.barrier()  # the files exist for every rank when train() returns
        return TrainResult(self.out_dir, self.out_dir / CHECKPOINT_NAME, list(self.metrics))

    def _train_epoch(self) -> None:
        from tqdm.auto import tqdm

        c = self.config
        order = epoch_order(len(self.y_train), c.seed, self.epoch, rank=distributed.rank(),
                            world_size=self.world)
        batches = batches_of(order, c.batch_size // self.world)
        started = time.perf_counter()
        bar = tqdm(total=len(batches), initial=self.batch, desc=f"epoch {self.epoch + 1}/"
                   f"{c.epochs}", leave=False, dynamic_ncols=True, file=sys.stderr,
                   disable=not (self.progress and _is_main_process() and sys.stderr.isatty()))
        totals = self.partial
        try:
            while self.batch < len(batches):
                index = batches[self.batch].to(self.device)
                lr = self.optimizer.param_groups[0]["lr"]
                self._train_step(self.x_train[index], self.y_train[index], totals)
                totals.lr = lr
                self.batch += 1
                self.step += 1
                self.scheduler.step()
                if totals.count:
                    seconds = totals.seconds + time.perf_counter() - started
                    bar.set_postfix(loss=f"{totals.loss_sum / totals.count:.4f}",
                                    acc=f"{totals.correct / totals.count:.3f}",
                                    samples_s=f"{totals.count / max(seconds, 1e-9):.0f}",
                                    refresh=False)
                bar.update(1)
                if (c.save_every_steps and self.step % c.save_every_steps == 0
                        and self.batch < len(batches)):
                    self._checkpoint_clock(totals, started)
                    started = time.perf_counter()
                    self._save_state()
        finally:
            bar.close()
        if totals.skipped == len(batches):
            raise DivergenceError(f"every step of epoch {self.epoch + 1} had a non-finite loss "
                                  f"and was skipped; {self._last_good()}")
        test_loss, test_acc = evaluate(self.module, self.x_test, self.y_test)
        self._checkpoint_clock(totals, started)
        row = {"epoch": self.epoch + 1,
               "train_loss": totals.loss_sum / max(totals.count, 1),
               "train_acc": totals.correct / max(totals.count, 1),
               "test_loss": test_loss, "test_acc": test_acc,
               "seconds": round(self.elapsed, 3), "grad_evals": self.grad_evals,
               "lr": totals.lr, "skipped_steps": totals.skipped}
        self.metrics.append(row)
        self.epoch += 1
        self.batch = 0
        self.partial = _EpochTotals()
        self._write_outputs()
        self._save_state()
        _say(f"epoch {row['epoch']:>3}/{c.epochs}  train loss {row['train_loss']:.4f} "
             f"acc {100 * row['train_acc']:.2f}%  test loss {test_loss:.4f} "
             f"acc {100 * test_acc:.2f}%  lr {row['lr']:.3g}  {self.elapsed:.1f}s"
             + (f"  skipped {totals.skipped}" if totals.skipped else ""))

    def _checkpoint_clock(self, totals: _EpochTotals, started: float) -> None:
        now = time.perf_counter() - started
        totals.seconds += now
        self.elapsed += now

    def _train_step(self, x: Tensor, y: Tensor, totals: _EpochTotals) -> None:
        """One ``optimizer.step(closure)``; statistics come from the step's first pass."""
        losses: list[Tensor] = []
        first: list[Tensor] = []

        bf16 = self.config.precision == "bf16"

        def closure() -> Tensor:
            self.optimizer.zero_grad(set_to_none=True)
            with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=bf16):
                out = self.model(x)
            loss = self.criterion(out.float(), y)
            loss.backward()
            losses.append(loss.detach())
            if not first:
                first.append((out.detach().argmax(dim=1) == y).sum())
            return loss

        snapshot = self._snapshot() if self.config.on_nan == "skip" else None
        self.optimizer.step(closure)
        self.grad_evals += len(losses)
        values = torch.stack(losses).cpu() if losses else torch.zeros(1)
        finite = bool(torch.isfinite(values).all())
        # [loss sum, correct, count, non-finite ranks] of the global batch: every rank gets the
        # same statistics and takes the same branch below
        stats = torch.tensor([float(values[0]) * len(y) if finite else 0.0,
                              float(first[0]) if first and finite else 0.0,
                              float(len(y)) if finite else 0.0, 0.0 if finite else 1.0],
                             dtype=torch.float64)
        if self.world > 1:
            stats = distributed.all_reduce_sum(stats.to(self.device)).cpu()
        if stats[3] == 0:
            totals.loss_sum += float(stats[0])
            totals.correct += round(float(stats[1]))
            totals.count += round(float(stats[2]))
            return
        what = (f"loss is {float(values[~torch.isfinite(values)][0])}" if not finite
                else "loss is not finite on another process")
        if snapshot is None:
            raise DivergenceError(
                f"{what} at step {self.step + 1} (epoch {self.epoch + 1}, batch "
                f"{self.batch + 1}); stopped. {self._last_good()} "
                f"(or retry with --on-nan skip, a lower --lr)")
        self._undo(snapshot)
        totals.skipped += 1

    def _snapshot(self) -> tuple[list[Tensor], dict]:
        return ([t.detach().clone() for t in self.module.state_dict().values()],
                copy.deepcopy(self.optimizer.state_dict()))

    @torch.no_grad()
    def _undo(self, snapshot: tuple[list[Tensor], dict]) -> None:
        tensors, optimizer_state = snapshot
        for current, saved in zip(self.module.state_dict().values(), tensors, strict=True):
            current.copy_(saved)
        self.optimizer.load_state_dict(optimizer_state)

    def _last_good(self) -> str:
        if self.saved_at is None or self.saved_at[1] == 0:
            return "No training step had been saved yet."
        epoch, step = self.saved_at
        model = (f"; {self.out_dir / CHECKPOINT_NAME} holds epoch {epoch}"
                 if (self.out_dir / CHECKPOINT_NAME).exists() else "")
        return f"Last good state kept: {self.state_path} (epoch {epoch}, step {step}){model}."


@dataclass
class _EpochTotals:
    loss_sum: float = 0.0
    correct: int = 0
    count: int = 0
    skipped: int = 0
    seconds: float = 0.0
    lr: float = 0.0


def _resolve_out_dir(config: TrainConfig, resume: bool) -> Path:
    if config.out is not None:
        return Path(config.out).expanduser()
    if resume:
        raise FlatlabError("--resume needs --out RUN_DIR (the run to continue)")
    model = re.sub(r"[^A-Za-z0-9_.-]+", "_", config.model.split(":")[-1])
    base = Path("runs") / f"{config.dataset}-{model}-{config.optimizer}"
    candidate, n = base, 1
    while any((candidate / name).exists() for name in _RUN_FILES):
        n += 1
        candidate = base.with_name(f"{base.name}-{n}")
    return candidate


def _remove_stale_temp_files(out_dir: Path) -> None:
    """Temporary files left by a process killed while writing (``.NAME.*.tmp``)."""
    for name in _RUN_FILES:
        for stale in out_dir.glob(f".{name}.*.tmp"):
            stale.unlink(missing_ok=True)


def train(config: TrainConfig, *, progress: bool = True, resume: bool = False) -> TrainResult:
    """Train as ``config`` says; with ``resume`` continue the run in ``config.out`` exactly."""
    config.validate()
    threads = torch.get_num_threads()
    try:
        return _Run(config, progress=progress, resume=resume).run()
    finally:
        torch.set_num_threads(threads)  # a library call leaves the process as it found it


# --------------------------------------------------------------------------- command line

def build_parser() -> ArgumentParser:
    p = ArgumentParser(prog="flatlab.train", allow_abbrev=False,
                       argument_default=__import__("argparse").SUPPRESS,
                       description="Train a model with NSO, SAM, ASAM, RWP or SGD and write "
                                   "runs/NAME/{model.safetensors, metrics.csv, config.toml}. "
                                   "With no arguments: a CNN on MNIST-1D in about a minute.")
    p.add_argument("--config", metavar="FILE.toml", help="read settings from a TOML file; "
                   "flags given as well override it")
    p.add_argument("--dataset", help=f"one of {', '.join(DATASETS)} (default mnist1d)")
    p.add_argument("--dataset-arg", action="append", metavar="KEY=VALUE",
                   help="data set argument (repeatable), e.g. train_size=256")
    p.add_argument("--data-dir", help="directory with CIFAR python files")
    p.add_argument("--data-seed", type=int, help="seed of the data split/generation (default 0)")
    p.add_argument("--model", help=f"one of {', '.join(MODELS)} or package.module:factory "
                   "(default cnn1d)")
    p.add_argument("--model-arg", action="append", metavar="KEY=VALUE",
                   help="model argument (repeatable), e.g. hidden=[64,64] or depth=20")
    p.add_argument("--optimizer", help=f"one of {', '.join(OPTIMIZER_NAMES)} (default sgd)")
    p.add_argument("--base-optimizer", help="base optimizer under the method: sgd, adam, "
                   "adamw (default sgd)")
    p.add_argument("--sigma", type=float, help="NSO/RWP noise scale")
    p.add_argument("--num-perturbs", type=int, help="NSO/RWP perturbations per step (k)")
    p.add_argument("--rho", type=float, help="SAM/ASAM radius")
    p.add_argument("--noise", help="NSO/RWP noise: absolute or filter")
    p.add_argument("--clean-weight", type=float, help="NSO/RWP weight of the clean gradient")
    p.add_argument("--independent-noise", action="store_const", const=True,
                   help="NSO/RWP under torchrun: a different noise draw on every process "
                        "(default: the same draw on all)")
    p.add_argument("--epochs", type=int, help="default 60")
    p.add_argument("--batch-size", type=int, help="default 128")
    p.add_argument("--lr", type=float, help="peak learning rate (default 0.1)")
    p.add_argument("--momentum", type=float, help="SGD momentum (default 0.9)")
    p.add_argument("--weight-decay", type=float, help="default 5e-4")
    p.add_argument("--label-smoothing", type=float, help="default 0")
    p.add_argument("--schedule", help="none, step or cosine (default cosine, per step)")
    p.add_argument("--seed", type=int, help="seed of init, data order and noise (default 0)")
    p.add_argument("--device", help="auto, cpu or cuda (default auto)")
    p.add_argument("--precision", help="fp32 or bf16 (autocast for the forward passes; "
                   "weights stay float32) (default fp32)")
    p.add_argument("--threads", type=int, help="CPU threads (default 0: one for models under "
                   "1M parameters, else torch's default)")
    p.add_argument("--out", metavar="RUN_DIR", help="run directory (default "
                   "runs/DATASET-MODEL-OPTIMIZER, numbered if taken)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its "
                   "last saved state")
    p.add_argument("--save-every-steps", type=int, metavar="N",
                   help="also save the training state every N steps (default: each epoch)")
    p.add_argument("--on-nan", help="stop (exit 3) or skip the step (default stop)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--version", action="version", version=f"flatlab {flatlab.__version__}")
    return p


_FLAG_FIELDS = ("dataset", "data_dir", "data_seed", "model", "optimizer", "base_optimizer",
                "sigma", "num_perturbs", "rho", "noise", "clean_weight", "independent_noise",
                "epochs", "batch_size",
                "lr", "momentum", "weight_decay", "label_smoothing", "schedule", "seed",
                "device", "precision", "threads", "out", "save_every_steps", "on_nan")


def parse_args(argv: Sequence[str] | None = None) -> tuple[TrainConfig, bool, bool]:
    """Command line -> ``(validated config, resume, progress)``; never trains."""
    args = vars(build_parser().parse_args(argv))
    resume = bool(args.pop("resume", False))
    progress = not args.pop("no_progress", False)
    config = TrainConfig()
    if resume:
        config = _saved_config(args.get("out"))
    if "config" in args:
        config = TrainConfig.from_toml(args["config"], base=config)
    flags = {key: args[key] for key in _FLAG_FIELDS if key in args}
    config = TrainConfig.from_dict(flags, source="flatlab.train", base=config)
    for key in ("dataset", "model"):
        pairs = args.get(f"{key}_arg")
        if pairs:
            kwargs = dict(getattr(config, f"{key}_kwargs"))
            kwargs.update(_parse_pair(pair, f"--{key}-arg") for pair in pairs)
            config = TrainConfig.from_dict({f"{key}_kwargs": kwargs}, source="flatlab.train",
                                           base=config)
    return config.validate(), resume, progress


def _saved_config(out: str | None) -> TrainConfig:
    """The config a run was started with (for --resume): from its state, else config.toml."""
    if out is None:
        raise FlatlabError("--resume needs --out RUN_DIR (the run to continue)")
    run_dir = Path(out).expanduser()
    if (run_dir / STATE_NAME).is_file():
        state = load_state(run_dir / STATE_NAME)
        if isinstance(state.get("config"), dict):
            return TrainConfig.from_dict(state["config"], source=str(run_dir / STATE_NAME))
    if not run_dir.is_dir():
        raise FlatlabError(f"--resume: run directory {str(run_dir)!r} does not exist")
    raise FlatlabError(f"--resume: {run_dir} has no {STATE_NAME} to resume from "
                       f"(start the run again without --resume)")


def _parse_pair(pair: str, flag: str) -> tuple[str, Any]:
    key, sep, text = pair.partition("=")
    key = key.strip()
    if not sep or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", key):
        raise FlatlabError(f"{flag} expects KEY=VALUE, got {pair!r}")
    try:
        value = tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        value = text  # a bare word is a string
    return key, value


def main(argv: Sequence[str] | None = None) -> int:
    config, resume, progress = parse_args(argv)
    # under torchrun: start the process group here and end it; a caller's group is left alone
    started = not distributed.is_initialized() and distributed.init_from_env(config.device)
    try:
        train(config, progress=progress, resume=resume)
    finally:
        if started:
            distributed.cleanup()
    return 0


if __name__ == "__main__":
    raise SystemExit(run_cli(main, prog="flatlab.train"))
