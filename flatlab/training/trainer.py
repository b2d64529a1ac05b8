"""The training loop: ``train(config)`` builds a run, trains it fresh or resumed, writes files.

Data order: epoch ``e`` visits the training set in ``torch.randperm`` order from a generator
seeded with ``seed + e``, exactly as ``torch.utils.data.DistributedSampler(shuffle=True,
seed=seed)`` after ``set_epoch(e)`` does (:func:`~.schedule.epoch_order`), so a resumed run sees
the same batches.

Under ``torchrun --nproc_per_node N`` the model is wrapped in ``DistributedDataParallel``;
``batch_size`` stays the *global* batch: rank r takes every N-th index of the epoch's order in
batches of ``batch_size / N``, so step s of an N-process run sees the same examples as step s of
a 1-process run, and the gradient averaged over ranks is the one-process gradient (to rounding).
Perturbation optimizers run their passes in ``no_sync()`` and all-reduce once per step. Only the
main process (rank 0) writes files or prints. ``precision="bf16"`` (``"fp16"``) runs the
forward passes under ``torch.autocast(bfloat16)`` (``float16``, with a ``GradScaler`` whose
state is resumed); weights, optimizer state, NSO's noise and the saved weight copies stay
float32.

Training batches go through ``--augment`` (crop-flip, from its own generator) and then the data
set's ``normalize``; evaluation batches only through ``normalize``. With a validation split the
epoch's row gains ``val_loss``/``val_acc``, and ``keep="best"`` writes ``best.safetensors``
whenever validation accuracy improves (ties: lower validation loss).

A NaN or infinite loss stops the run (:class:`~flatlab.errors.DivergenceError`, exit status 3)
with the files of the last completed save left untouched; ``on_nan="skip"`` instead undoes that
step (weights, buffers and optimizer state) and counts it in ``metrics.csv``.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from flatlab import distributed
from flatlab.augment import crop_flip
from flatlab.checkpoint import CHECKPOINT_NAME, save_checkpoint
from flatlab.errors import DivergenceError
from flatlab.training import rundir
from flatlab.training.build import build
from flatlab.training.config import TrainConfig
from flatlab.training.rundir import (
    BEST_NAME,
    CONFIG_NAME,
    METRICS_COLUMNS,
    METRICS_NAME,
    STATE_NAME,
    VAL_COLUMNS,
)
from flatlab.training.schedule import batches_of, epoch_order
from flatlab.training.state import EpochTotals, Progress, restore_train_state, save_train_state
from flatlab.training.step import evaluate, snapshot, train_step, undo


@dataclass
class TrainResult:
    """Where a run wrote its files, and its per-epoch metrics (the rows of ``metrics.csv``)."""

    out_dir: Path
    checkpoint: Path
    metrics: list[dict]


def train(config: TrainConfig, *, progress: bool = True, resume: bool = False,
          trust_code: bool = False, trust_pickle: bool = False) -> TrainResult:
    """Train as ``config`` says; with ``resume`` continue the run in ``config.out`` exactly.

    ``trust_code`` allows importing a ``package.module:factory`` model or data set;
    ``trust_pickle`` reading a ``torch.save`` file for ``config.init_from``.
    """
    config.validate()
    threads = torch.get_num_threads()
    try:
        return Trainer(config, progress=progress, resume=resume, trust_code=trust_code,
                       trust_pickle=trust_pickle).run()
    finally:
        torch.set_num_threads(threads)  # a library call leaves the process as it found it


def say(message: str) -> None:
    """Print on the main process only."""
    if distributed.is_main_process():
        print(message, flush=True)


class Trainer:
    """One run: its directory, its parts, its progress; :meth:`run` trains to the last epoch."""

    def __init__(self, config: TrainConfig, *, progress: bool = True, resume: bool = False,
                 trust_code: bool = False, trust_pickle: bool = False) -> None:
        self.config = config
        self.show_progress = progress
        self.out_dir = rundir.resolve_out_dir(config, resume)
        self.state_path = self.out_dir / STATE_NAME
        saved = rundir.check_run_dir(self.out_dir, config, resume)
        self.parts = build(config, fresh=saved is None, trust_code=trust_code,
                           trust_pickle=trust_pickle)
        report = self.parts.init_report
        self.progress = Progress(init_from=report.metadata() if report is not None else None)
        self.saved_at: tuple[int, int] | None = None  # (epoch, step) of the last state save
        if saved is not None:
            self.progress = restore_train_state(saved, config, self.parts)
            self.saved_at = (self.progress.epoch, self.progress.step)

    def run(self) -> TrainResult:
        """Train the remaining epochs; the files exist on every rank when it returns."""
        fresh = self.saved_at is None
        distributed.barrier()  # every rank has checked the run directory before rank 0 writes
        if fresh:
            if distributed.is_main_process():
                self.out_dir.mkdir(parents=True, exist_ok=True)
            self._save_state()  # step 0: from here on --resume always has something to load
        if distributed.is_main_process():
            rundir.remove_stale_temp_files(self.out_dir)
            rundir.write_config(self.out_dir, self.config)
        say(self._headline())
        if self.parts.init_report is not None:
            say(self._init_line())
        if not fresh:
            say(f"resuming from epoch {self.progress.epoch}, step {self.progress.step}")
        while self.progress.epoch < self.config.epochs:
            self._train_epoch()
        if not fresh and self.progress.metrics:
            self._write_outputs()  # idempotent: a kill after the last state save loses nothing
        last = self.progress.metrics[-1] if self.progress.metrics else {}
        say(f"done: test accuracy {100 * last.get('test_acc', float('nan')):.2f}% after "
            f"{self.config.epochs} epochs in {self.progress.elapsed:.1f} s\n"
            f"wrote {self.out_dir / CHECKPOINT_NAME} (weights + metadata), "
            f"{self.out_dir / METRICS_NAME} (one row per epoch), "
            f"{self.out_dir / CONFIG_NAME} (re-runnable config), "
            f"{self.state_path} (for --resume)")
        distributed.barrier()
        return TrainResult(self.out_dir, self.out_dir / CHECKPOINT_NAME,
                           list(self.progress.metrics))

    def _headline(self) -> str:
        c, p = self.config, self.parts
        return (f"flatlab.train: {c.dataset} ({len(p.y_train)} train / {len(p.y_test)} test)"
                f" | {c.model} ({p.num_params:,} parameters) | {c.optimizer}, "
                f"{p.grad_evals_per_step} gradient evaluation(s) per step | {c.epochs} epochs x "
                f"{p.batches_per_epoch} steps | {p.device}"
                + (f" x {p.world} processes" if p.world > 1 else "")
                + (f" ({p.threads} thread{'s' * (p.threads > 1)})"
                   if p.device.type == "cpu" else "") + f" -> {self.out_dir}")

    def _init_line(self) -> str:
        report = self.parts.init_report
        assert report is not None
        line = (f"init from {report.path}: {len(report.loaded)} tensors loaded, "
                f"{len(report.reinitialised)} re-initialised")
        return line + (f": {', '.join(report.reinitialised)}" if report.reinitialised else "")

    # ---- one epoch
    def _train_epoch(self) -> None:
        c, p, at = self.config, self.parts, self.progress
        order = epoch_order(len(p.y_train), c.seed, at.epoch, rank=distributed.rank(),
                            world_size=p.world)
        batches = batches_of(order, c.batch_size // p.world)
        started = time.perf_counter()
        bar = tqdm(total=len(batches), initial=at.batch, desc=f"epoch {at.epoch + 1}/"
                   f"{c.epochs}", leave=False, dynamic_ncols=True, file=sys.stderr,
                   disable=not (self.show_progress and distributed.is_main_process()
                                and sys.stderr.isatty()))
        totals = at.partial
        try:
            while at.batch < len(batches):
                lr = p.optimizer.param_groups[0]["lr"]
                self._step(batches[at.batch].to(p.device), totals)
                totals.lr = lr
                at.batch += 1
                at.step += 1
                p.scheduler.step()
                if totals.count:
                    seconds = totals.seconds + time.perf_counter() - started
                    bar.set_postfix(loss=f"{totals.loss_sum / totals.count:.4f}",
                                    acc=f"{totals.correct / totals.count:.3f}",
                                    samples_s=f"{totals.count / max(seconds, 1e-9):.0f}",
                                    refresh=False)
                bar.update(1)
                if (c.save_every_steps and at.step % c.save_every_steps == 0
                        and at.batch < len(batches)):
                    self._clock(totals, started)
                    started = time.perf_counter()
                    self._save_state()
        finally:
            bar.close()
        if totals.skipped == len(batches):
            raise DivergenceError(f"every step of epoch {at.epoch + 1} had a non-finite loss "
                                  f"and was skipped; {self._last_good()}")
        self._end_epoch(totals, started)

    def _end_epoch(self, totals: EpochTotals, started: float) -> None:
        """Evaluate, append the epoch's row, write the files and the state."""
        c, p, at = self.config, self.parts, self.progress
        test_loss, test_acc = evaluate(p.module, p.x_test, p.y_test,
                                       transform=p.data.normalize)
        val = None
        if p.x_val is not None and p.y_val is not None:
            val = ((test_loss, test_acc) if p.x_val is p.x_test else
                   evaluate(p.module, p.x_val, p.y_val, transform=p.data.normalize))
        self._clock(totals, started)
        row = {"epoch": at.epoch + 1,
               "train_loss": totals.loss_sum / max(totals.count, 1),
               "train_acc": totals.correct / max(totals.count, 1),
               "test_loss": test_loss, "test_acc": test_acc,
               "seconds": round(at.elapsed, 3), "grad_evals": at.grad_evals,
               "lr": totals.lr, "skipped_steps": totals.skipped}
        if val is not None:
            row.update(val_loss=val[0], val_acc=val[1])
        at.metrics.append(row)
        at.epoch += 1
        at.batch = 0
        at.partial = EpochTotals()
        self._write_outputs()
        if c.keep == "best" and val is not None and _better(val, at.best):
            at.best = {"epoch": at.epoch, "val_acc": val[1], "val_loss": val[0]}
            if distributed.is_main_process():
                save_checkpoint(self.out_dir / BEST_NAME, p.module, self._metadata())
        self._save_state()
        say(f"epoch {row['epoch']:>3}/{c.epochs}  train loss {row['train_loss']:.4f} "
            f"acc {100 * row['train_acc']:.2f}%  test loss {test_loss:.4f} "
            f"acc {100 * test_acc:.2f}%"
            + (f"  val loss {val[0]:.4f} acc {100 * val[1]:.2f}%" if val is not None else "")
            + f"  lr {row['lr']:.3g}  {at.elapsed:.1f}s"
            + (f"  skipped {totals.skipped}" if totals.skipped else "")
            + ("  (best)" if at.best is not None and at.best["epoch"] == at.epoch else ""))

    def _clock(self, totals: EpochTotals, started: float) -> None:
        now = time.perf_counter() - started
        totals.seconds += now
        self.progress.elapsed += now

    def _step(self, index: torch.Tensor, totals: EpochTotals) -> None:
        """One optimizer step; a non-finite loss stops the run or (``on_nan="skip"``) is undone."""
        p, at = self.parts, self.progress
        saved = snapshot(p) if self.config.on_nan == "skip" else None
        x = p.x_train[index]
        if p.augment is not None:
            x = crop_flip(x, p.augment)
        outcome = train_step(p, p.data.normalize(x), p.y_train[index],
                             precision=self.config.precision)
        at.grad_evals += outcome.passes
        if outcome.problem is None:
            totals.loss_sum += outcome.loss_sum
            totals.correct += outcome.correct
            totals.count += outcome.count
            return
        if saved is None:
            raise DivergenceError(
                f"{outcome.problem} at step {at.step + 1} (epoch {at.epoch + 1}, batch "
                f"{at.batch + 1}); stopped. {self._last_good()} "
                f"(or retry with --on-nan skip, a lower --lr)")
        undo(p, saved)
        totals.skipped += 1

    # ---- files
    def _save_state(self) -> None:
        save_train_state(self.state_path, self.config, self.parts, self.progress)
        self.saved_at = (self.progress.epoch, self.progress.step)

    def _write_outputs(self) -> None:
        if not distributed.is_main_process():
            return
        columns = METRICS_COLUMNS + (VAL_COLUMNS if self.parts.x_val is not None else ())
        rundir.write_metrics(self.out_dir, self.progress.metrics, columns)
        save_checkpoint(self.out_dir / CHECKPOINT_NAME, self.parts.module, self._metadata())

    def _metadata(self) -> dict:
        """The checkpoint's metadata: what rebuilds model and data, and how they were trained."""
        c, data, at = self.config, self.parts.data, self.progress
        last = at.metrics[-1] if at.metrics else {}
        return {
            "model": {"name": c.model, "kwargs": c.model_kwargs,
                      "input_shape": list(data.input_shape), "num_classes": data.num_classes},
            "dataset": data.spec,
            "optimizer": {"name": c.optimizer, "kwargs": c.record()},
            "epoch": at.epoch, "step": at.step, "grad_evals": at.grad_evals,
            "metrics": {k: last.get(k) for k in ("train_loss", "train_acc", "test_loss",
                                                 "test_acc")
                        + (VAL_COLUMNS if "val_loss" in last else ())},
            "seed": c.seed, "run_name": self.out_dir.name,
            **({"init_from": at.init_from} if at.init_from is not None else {}),
        }

    def _last_good(self) -> str:
        if self.saved_at is None or self.saved_at[1] == 0:
            return "No training step had been saved yet."
        epoch, step = self.saved_at
        model = (f"; {self.out_dir / CHECKPOINT_NAME} holds epoch {epoch}"
                 if (self.out_dir / CHECKPOINT_NAME).exists() else "")
        return f"Last good state kept: {self.state_path} (epoch {epoch}, step {step}){model}."


def _better(val: tuple[float, float], best: dict | None) -> bool:
    """Higher validation accuracy, or the same with lower validation loss."""
    loss, acc = val
    return best is None or (acc, -loss) > (best["val_acc"], -best["val_loss"])
