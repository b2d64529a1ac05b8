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
step (weights, buffers and optimizer state) and counts it in ``metrics.csv``. The statistics
stay on the device (:mod:`.tally`): with ``on_nan="stop"`` the loop reads one step's flags
after queueing the next, so no step waits for the GPU; ``"skip"`` must decide before the next
step and reads every step's flags at once.

One process writes a run directory at a time: ``DIR/.lock`` is held
(:func:`flatlab.distributed.hold_directory`) from before the directory is read until the run
ends; a second process is refused at once, naming the holder's pid. SIGTERM, SIGINT and SIGUSR1
(:mod:`.preempt`) end the run after the current step with the full training state saved
(:class:`~flatlab.errors.Interrupted`: exit 143, 130 for SIGINT); under torchrun the stop
request travels in the step's statistics all-reduce, so every rank stops after the same step.
"""

from __future__ import annotations

import contextlib
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from flatlab import distributed
from flatlab.augment import crop_flip
from flatlab.checkpoint import CHECKPOINT_NAME, save_checkpoint
from flatlab.errors import DivergenceError, FlatlabError, Interrupted
from flatlab.training import rundir
from flatlab.training.build import build
from flatlab.training.config import TrainConfig
from flatlab.training.preempt import StopSignals
from flatlab.training.rundir import (
    BEST_NAME,
    CONFIG_NAME,
    METRICS_COLUMNS,
    METRICS_NAME,
    STATE_NAME,
    VAL_COLUMNS,
)
from flatlab.training.schedule import batches_of, epoch_order
from flatlab.training.state import (
    EpochTotals,
    Progress,
    checkpoint_metadata,
    restore_train_state,
    save_train_state,
)
from flatlab.training.step import (
    NON_FINITE,
    STOP,
    describe_problem,
    evaluate,
    snapshot,
    train_step,
    undo,
)
from flatlab.training.tally import Tally

BAR_SECONDS = 1.0  # a progress bar on a terminal reads the device sums at most this often


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
        self.signals = StopSignals()
        self.held = contextlib.ExitStack()  # the directory lock, released when the run ends
        try:
            # an existing directory is held before it is read; a new one only once the input
            # has been checked (bad input creates nothing)
            locked = distributed.all_ranks_true(self.out_dir.is_dir())
            if locked:
                self.held.enter_context(distributed.hold_directory(self.out_dir))
            saved = rundir.check_run_dir(self.out_dir, config, resume)
            self.parts = build(config, fresh=saved is None, trust_code=trust_code,
                               trust_pickle=trust_pickle)
            report = self.parts.init_report
            self.progress = Progress(init_from=report.metadata() if report is not None else None)
            self.saved_at: tuple[int, int] | None = None  # (epoch, step) of the last state save
            if saved is not None:
                self.progress = restore_train_state(saved, config, self.parts)
                self.saved_at = (self.progress.epoch, self.progress.step)
            if not locked:
                self.held.enter_context(distributed.hold_directory(self.out_dir))
                rundir.check_run_dir(self.out_dir, config, resume)  # nobody started it meanwhile
        except BaseException:
            self.held.close()
            raise

    def run(self) -> TrainResult:
        """Train the remaining epochs; the files exist on every rank when it returns. A stop
        signal ends it early with the state saved (:class:`~flatlab.errors.Interrupted`)."""
        with self.held, self.signals.installed():
            return self._run()

    def _run(self) -> TrainResult:
        fresh = self.saved_at is None
        distributed.barrier()  # every rank has checked the run directory before rank 0 writes
        if fresh:
            if distributed.is_main_process():
                self.out_dir.mkdir(parents=True, exist_ok=True)
            self._save_state()  # step 0: from here on --resume always has something to load
        self._written(self._write_config)
        say(self._headline())
        if self.parts.init_report is not None:
            say(self._init_line())
        if not fresh:
            say(f"resuming from epoch {self.progress.epoch}, step {self.progress.step}")
        while self.progress.epoch < self.config.epochs:
            self._train_epoch()
        if not fresh and self.progress.metrics:
            self._written(self._write_outputs)  # idempotent: a kill after the last state save
            # loses nothing
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
        batches = batches_of(order.to(p.device), c.batch_size // p.world)
        started = time.perf_counter()
        bar = tqdm(total=len(batches), initial=at.batch, desc=f"epoch {at.epoch + 1}/"
                   f"{c.epochs}", leave=False, dynamic_ncols=True, file=sys.stderr,
                   disable=not (self.show_progress and distributed.is_main_process()
                                and sys.stderr.isatty()))
        totals = at.partial
        tally = Tally(totals, p.device, first_step=at.step - at.batch)
        shown = time.perf_counter()
        stop = False
        try:
            while at.batch < len(batches) and not stop:
                lr = p.optimizer.param_groups[0]["lr"]
                flags = self._step(batches[at.batch], totals, tally)
                totals.lr = lr
                at.batch += 1
                at.step += 1
                p.scheduler.step()
                if flags is not None and flags[0]:  # the previous step's loss was not finite
                    self._settle(tally, totals)
                # one process: its own signal; several: any rank's, as all-reduced
                stop = self.signals.requested if p.world == 1 else bool(flags and flags[1])
                if not bar.disable and time.perf_counter() - shown > BAR_SECONDS:
                    tally.settle(totals)  # rank 0 alone: numbers only, no decision
                    shown = time.perf_counter()
                    seconds = totals.seconds + shown - started
                    bar.set_postfix(loss=f"{totals.loss_sum / max(totals.count, 1):.4f}",
                                    acc=f"{totals.correct / max(totals.count, 1):.3f}",
                                    samples_s=f"{totals.count / max(seconds, 1e-9):.0f}",
                                    refresh=False)
                bar.update(1)
                save = (c.save_every_steps and at.step % c.save_every_steps == 0) or stop
                if save and at.batch < len(batches):
                    stop = self._settle(tally, totals) or stop
                    self._clock(totals, started)
                    started = time.perf_counter()
                    self._save_state()
        finally:
            bar.close()
        if at.batch < len(batches):
            raise self._interrupted()
        stop = self._settle(tally, totals) or stop
        if totals.skipped == len(batches):
            raise DivergenceError(f"every step of epoch {at.epoch + 1} had a non-finite loss "
                                  f"and was skipped; {self._last_good()}")
        self._end_epoch(totals, started)
        if stop:
            raise self._interrupted()

    def _settle(self, tally: Tally, totals: EpochTotals) -> bool:
        """Bring the device sums into ``totals``; raise :class:`DivergenceError` if a step had
        a non-finite loss (nothing has been written since the last save). Returns whether any
        process asked to stop (the same answer on every rank)."""
        settled = tally.settle(totals)
        if settled.non_finite:
            at = self.progress
            problem = describe_problem(settled.non_finite, settled.bad_loss)
            raise DivergenceError(
                f"{problem} at step {settled.bad_step} (epoch {at.epoch + 1}, batch "
                f"{settled.bad_step - tally.first_step}); stopped. {self._last_good()} "
                f"(or retry with --on-nan skip, a lower --lr)")
        return bool(settled.stop) or (self.parts.world == 1 and self.signals.requested)

    def _interrupted(self) -> Interrupted:
        at = self.progress
        where = (f"epoch {at.epoch + 1}, batch {at.batch}" if at.batch else
                 f"the end of epoch {at.epoch}")
        return Interrupted(
            f"stopped by {self.signals.name or 'a stop request on another process'} after step "
            f"{at.step} ({where}); state saved in {self.state_path}; resume with: "
            f"python -m flatlab.train --out {self.out_dir} --resume",
            exit_code=self.signals.exit_code)

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
        best = c.keep == "best" and val is not None and _better(val, at.best)
        if best:
            at.best = {"epoch": at.epoch, "val_acc": val[1], "val_loss": val[0]}
        self._written(lambda: self._write_outputs(best=best))
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

    def _step(self, index: torch.Tensor, totals: EpochTotals, tally: Tally
              ) -> tuple[float, float] | None:
        """One optimizer step; returns the (non-finite, stop) flags of a step the host may
        read without waiting (the previous one; with ``on_nan="skip"`` this one, after undoing
        it if its loss was not finite)."""
        p, at = self.parts, self.progress
        skip = self.config.on_nan == "skip"
        saved = snapshot(p) if skip else None
        x = p.x_train[index]
        if p.augment is not None:
            x = crop_flip(x, p.augment)
        outcome = train_step(p, p.data.normalize(x), p.y_train[index],
                             precision=self.config.precision,
                             stop=lambda: self.signals.requested)
        at.grad_evals += outcome.passes
        if saved is None:
            return tally.add(outcome, at.step + 1)
        # skip: decide now (one read per step)
        non_finite, stop, bad_loss = torch.stack(
            [outcome.stats[NON_FINITE], outcome.stats[STOP], outcome.bad_loss]).tolist()
        if describe_problem(non_finite, bad_loss) is None:
            tally.add(outcome, at.step + 1, lagged=False)
        else:
            undo(p, saved)
            totals.skipped += 1
        return 0.0, stop

    # ---- files
    def _written(self, write: Callable[[], None]) -> None:
        """``write()`` on every rank (rank 0 writes). A failed write (disk full, file-size
        limit: a :class:`~flatlab.io.WriteError`, the previous file intact) raises a one-line
        error on every rank, so that no rank waits in a collective for one that has stopped."""
        failed: FlatlabError | None = None
        try:
            write()
        except FlatlabError as err:
            failed = err
        if not distributed.all_ranks_true(failed is None):
            raise failed or FlatlabError(f"rank 0 could not write to {self.out_dir}; stopped")

    def _save_state(self) -> None:
        self._written(lambda: save_train_state(self.state_path, self.config, self.parts,
                                               self.progress))
        self.saved_at = (self.progress.epoch, self.progress.step)

    def _write_config(self) -> None:
        if distributed.is_main_process():
            rundir.remove_stale_temp_files(self.out_dir)
            rundir.write_config(self.out_dir, self.config)

    def _write_outputs(self, best: bool = False) -> None:
        """``metrics.csv`` and ``model.safetensors`` (and with ``best``, ``best.safetensors``)."""
        if not distributed.is_main_process():
            return
        columns = METRICS_COLUMNS + (VAL_COLUMNS if self.parts.x_val is not None else ())
        rundir.write_metrics(self.out_dir, self.progress.metrics, columns)
        metadata = checkpoint_metadata(self.config, self.parts.data, self.progress,
                                       self.out_dir.name)
        save_checkpoint(self.out_dir / CHECKPOINT_NAME, self.parts.module, metadata)
        if best:
            save_checkpoint(self.out_dir / BEST_NAME, self.parts.module, metadata)

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
