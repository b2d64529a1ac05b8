"""The run directory: its file names, choosing it, refusing to overwrite it, writing its text.

``runs/NAME`` holds ``config.toml`` (the resolved config, re-runnable), ``metrics.csv`` (one row
per epoch), ``model.safetensors`` (weights + metadata), ``train_state.safetensors`` (for
``--resume``) and, with ``--keep best``, ``best.safetensors``. Every write is atomic.
"""

from __future__ import annotations

import csv
import io
import re
from collections.abc import Sequence
from pathlib import Path

import flatlab
from flatlab.checkpoint import CHECKPOINT_NAME, load_state
from flatlab.errors import FlatlabError
from flatlab.io import atomic_write_text
from flatlab.training.config import TrainConfig

STATE_NAME = "train_state.safetensors"
METRICS_NAME = "metrics.csv"
CONFIG_NAME = "config.toml"
BEST_NAME = "best.safetensors"
RUN_FILES = (CHECKPOINT_NAME, STATE_NAME, METRICS_NAME, CONFIG_NAME, BEST_NAME)
METRICS_COLUMNS = ("epoch", "train_loss", "train_acc", "test_loss", "test_acc", "seconds",
                   "grad_evals", "lr", "skipped_steps")
VAL_COLUMNS = ("val_loss", "val_acc")  # appended when the data set has a validation split
STATE_KIND = "flatlab-train-state"


def resolve_out_dir(config: TrainConfig, resume: bool) -> Path:
    """``config.out``, else ``runs/DATASET-MODEL-OPTIMIZER`` numbered ``-2``, ``-3``, ... past
    directories that already hold a run."""
    if config.out is not None:
        return Path(config.out).expanduser()
    if resume:
        raise FlatlabError("--resume needs --out RUN_DIR (the run to continue)")
    model = re.sub(r"[^A-Za-z0-9_.-]+", "_", config.model.split(":")[-1])
    base = Path("runs") / f"{config.dataset}-{model}-{config.optimizer}"
    candidate, n = base, 1
    while any((candidate / name).exists() for name in RUN_FILES):
        n += 1
        candidate = base.with_name(f"{base.name}-{n}")
    return candidate


def check_run_dir(out_dir: Path, config: TrainConfig, resume: bool) -> dict | None:
    """A fresh run: ``None``, after checking ``out_dir`` holds no run. A resumed run: the saved
    training state, after checking that only resumable fields of the config changed."""
    if not resume:
        taken = [name for name in RUN_FILES if (out_dir / name).exists()]
        if taken:
            raise FlatlabError(f"{out_dir} already holds a run ({', '.join(taken)}); "
                               f"pass --resume to continue it or choose another --out")
        return None
    state = _read_state(out_dir)
    saved = TrainConfig.from_dict(state["config"], source=str(out_dir / STATE_NAME))
    resumable = [f for f in TrainConfig.declared() if f.rule.resumable]
    for f in TrainConfig.declared():
        if not f.rule.resumable and getattr(saved, f.name) != getattr(config, f.name):
            raise FlatlabError(
                f"--resume: {f.flag} {getattr(config, f.name)!r} differs from the run's "
                f"{getattr(saved, f.name)!r}; only {', '.join(r.flag for r in resumable)} "
                f"may change on resume")
    return state


def saved_config(out: str | None) -> TrainConfig:
    """The config a run was started with (for ``--resume``), from its training state."""
    if out is None:
        raise FlatlabError("--resume needs --out RUN_DIR (the run to continue)")
    run_dir = Path(out).expanduser()
    return TrainConfig.from_dict(_read_state(run_dir)["config"], source=str(run_dir / STATE_NAME))


def _read_state(run_dir: Path) -> dict:
    if not run_dir.is_dir():
        raise FlatlabError(f"--resume: run directory {str(run_dir)!r} does not exist")
    path = run_dir / STATE_NAME
    if not path.is_file():
        raise FlatlabError(f"--resume: {run_dir} has no {STATE_NAME} to resume from "
                           f"(start the run again without --resume)")
    state = load_state(path)
    if state.get("kind") != STATE_KIND or not isinstance(state.get("config"), dict):
        raise FlatlabError(f"{path} is not a flatlab training state")
    return state


def remove_stale_temp_files(out_dir: Path) -> None:
    """Temporary files left by a process killed while writing (``.NAME.*.tmp``)."""
    for name in RUN_FILES:
        for stale in out_dir.glob(f".{name}.*.tmp"):
            stale.unlink(missing_ok=True)


def write_config(out_dir: Path, config: TrainConfig) -> None:
    """``config.toml`` with a comment saying how to re-run it."""
    atomic_write_text(out_dir / CONFIG_NAME, config.to_toml(comment=(
        f"flatlab {flatlab.__version__} training config of {out_dir}\n"
        f"re-run: python -m flatlab.train --config {out_dir / CONFIG_NAME} "
        f"--out runs/NEW_NAME")))


def write_metrics(out_dir: Path, rows: Sequence[dict], columns: Sequence[str]) -> None:
    """``metrics.csv``: a header and one row per epoch."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(columns), lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(out_dir / METRICS_NAME, buffer.getvalue())
