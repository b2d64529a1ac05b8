"""Running a plan: train-or-resume one run, a process pool, shards, and ``results.csv``.

:func:`train_or_resume` is the one code path that turns a ``TrainConfig`` into a finished run
directory (the demo and every study use it): a finished run with the same configuration is
reused, an interrupted one resumes from its last saved epoch, a directory holding a different
run is refused. :func:`execute` adds the analysis of a final run and returns its row of
``results.csv``; :func:`run_all` runs what ``results.csv`` lacks, by key, on ``jobs``
processes, and with a :class:`~flatlab.study.plan.Shard` only the shard's part.

Shards write ``OUT/shards/results-I-of-N.csv`` (one writer per file, so shards may share
``OUT`` on a network file system, or their ``OUT`` folders may be copied into one). Every
invocation reads ``results.csv`` and all shard files as one table, so a later plain invocation
aggregates the shards' finished runs without re-running them.
"""

from __future__ import annotations

import contextlib
import json
import math
import multiprocessing
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import pandas as pd

from flatlab.analyze import AnalyzeOptions, analyze
from flatlab.checkpoint import CHECKPOINT_NAME, read_checkpoint
from flatlab.errors import DivergenceError, FlatlabError
from flatlab.io import atomic_path, atomic_write_text
from flatlab.study.plan import DEFAULT_NOISE, RunSpec, Shard
from flatlab.train import CONFIG_NAME, METRICS_NAME, STATE_NAME, TrainConfig, train

RESULTS_CSV = "results.csv"
SHARDS_DIR = "shards"
ANALYSIS_DIR = "analysis"
RESULT_COLUMNS = (
    "key", "phase", "setting", "dataset", "model", "variant", "method", "optimizer",
    "num_perturbs", "noise", "baseline", "budgets", "sweep", "hyperparameter", "hyper_value",
    "epochs", "passes_per_step", "seed", "eval_split", "status", "steps", "grad_evals",
    "train_loss", "train_acc", "test_loss", "test_acc", "trace", "trace_stderr",
    "trace_matvecs", "lambda_1", "lambda_1_residual", "lambda_1_converged", "eigen_matvecs",
    "analysis_loss", "analysis_accuracy", "train_seconds", "analysis_seconds", "run_name")
_CONFIG_IGNORES = ("out", "device", "data_dir")  # where a run lives and runs, not what it is

Item = TypeVar("Item")


@dataclass(frozen=True)
class RunOutcome:
    """A finished run: ``status`` is "trained", "resumed" or "reused"."""

    status: str
    checkpoint: Path
    metrics: list[dict]         # the rows of metrics.csv


def train_or_resume(config: TrainConfig, *, progress: bool = True) -> RunOutcome:
    """Train ``config`` into ``config.out`` unless a finished run with the same config is there.

    Raises :class:`FlatlabError`, touching nothing, where ``config.out`` holds files but no
    config, a run with another configuration, or an unfinished run without its saved state.
    """
    run_dir = Path(config.out)
    saved_path = run_dir / CONFIG_NAME
    if not saved_path.is_file():
        if run_dir.is_dir() and any(run_dir.iterdir()):
            raise FlatlabError(f"{run_dir} exists but holds no {CONFIG_NAME}; remove it or "
                               f"choose another --out")
        result = train(config, progress=progress)
        return RunOutcome("trained", result.checkpoint, result.metrics)
    saved = TrainConfig.from_toml(saved_path)
    differ = [f"{key}: {getattr(saved, key)!r} there, {value!r} here"
              for key, value in config.to_dict().items()
              if key not in _CONFIG_IGNORES and getattr(saved, key) != value]
    if differ:
        raise FlatlabError(f"{run_dir} holds a run with a different configuration "
                           f"({'; '.join(differ)}); remove that directory or choose another "
                           f"--out")
    checkpoint = run_dir / CHECKPOINT_NAME
    if checkpoint.is_file() and read_checkpoint(checkpoint)[1].get("epoch") == config.epochs:
        return RunOutcome("reused", checkpoint, read_metrics(run_dir / METRICS_NAME))
    if not (run_dir / STATE_NAME).is_file():
        raise FlatlabError(f"{run_dir} holds an unfinished run without {STATE_NAME}; remove it "
                           f"or choose another --out")
    result = train(config, progress=progress, resume=True)
    return RunOutcome("resumed", result.checkpoint, result.metrics)


def read_metrics(path: Path) -> list[dict]:
    """``metrics.csv`` as the list of per-epoch dicts ``train`` returns."""
    return pd.read_csv(path).to_dict("records")


def train_logged(run: RunSpec, runs_dir: Path) -> tuple[TrainConfig, dict, Any]:
    """Train ``run`` (or resume or reuse it) in ``RUNS_DIR/<run_name>``, its log in
    ``RUNS_DIR/<run_name>.log``; return its config, its row header and the training outcome,
    or ``None`` for the outcome (and the row's status saying why) when the run diverged."""
    run_dir = runs_dir / run.run_name
    config = TrainConfig.from_dict(dict(run.config, out=str(run_dir)))
    row = row_header(run)
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    try:
        with open(run_dir.with_name(run_dir.name + ".log"), "a", encoding="utf-8") as log, \
                contextlib.redirect_stdout(log):
            return config, row, train_or_resume(config, progress=False)
    except DivergenceError as err:
        row.update(status=f"diverged: {err}".splitlines()[0][:200])
        return config, row, None


def execute(run: RunSpec, runs_dir: Path, out: Path) -> dict:
    """Train ``run`` (or resume or reuse it), analyse it if final; return its results row.

    The training log goes to ``RUNS_DIR/<run_name>.log``; a final run's analysis entry and
    training curve to ``OUT/analysis/<key>.json`` (what the report is drawn from).
    """
    config, row, outcome = train_logged(run, runs_dir)
    if outcome is None:
        return row
    last = outcome.metrics[-1]
    row.update(status="ok", grad_evals=int(last["grad_evals"]),
               steps=int(last["grad_evals"]) // run.variant.passes,
               train_seconds=float(last["seconds"]),
               **{k: float(last[k]) for k in ("train_loss", "train_acc", "test_loss",
                                              "test_acc")})
    if run.analysis is None:
        return row
    options = AnalyzeOptions(**{**run.analysis, "landscape": tuple(run.analysis["landscape"])},
                             device="cpu", progress=False)
    started = time.perf_counter()
    analysis = analyze([outcome.checkpoint], options)
    entry = analysis["checkpoints"][0]
    eig = entry.get("eigenvalues") or [None]
    row.update(analysis_seconds=round(time.perf_counter() - started, 3),
               analysis_loss=entry.get("loss"), analysis_accuracy=entry.get("accuracy"),
               trace=entry.get("trace"), trace_stderr=entry.get("trace_stderr"),
               trace_matvecs=entry.get("trace_matvecs"), lambda_1=eig[0],
               lambda_1_residual=(entry.get("eigenvalue_residuals") or [None])[0],
               lambda_1_converged=(entry.get("eigen_converged") or [None])[0],
               eigen_matvecs=entry.get("eigen_matvecs"))
    record = {"key": run.key, "run_name": run.run_name, "analysis": {
        k: v for k, v in analysis.items() if k != "checkpoints"}, "entry": entry,
        "metrics": outcome.metrics}
    atomic_write_text(out / ANALYSIS_DIR / f"{run.key}.json",
                      json.dumps(record, allow_nan=False, separators=(",", ":")) + "\n")
    return row


def row_header(run: RunSpec) -> dict:
    """The columns of a results row known before the run: what it is, not what it measured."""
    (arg, value), = run.hyper.items() if run.hyper else ((None, None),)
    method = run.variant.method
    return {
        "key": run.key, "phase": run.phase, "setting": run.setting.name,
        "dataset": run.setting.dataset, "model": run.setting.model,
        "variant": run.variant.name, "method": method.label, "optimizer": method.optimizer,
        "num_perturbs": method.num_perturbs,
        "noise": run.config.get("noise") or DEFAULT_NOISE.get(method.optimizer),
        "baseline": method.baseline, "budgets": ";".join(run.variant.budgets),
        "sweep": method.sweep_name, "hyperparameter": arg, "hyper_value": value,
        "epochs": run.variant.epochs, "passes_per_step": run.variant.passes, "seed": run.seed,
        "eval_split": "validation" if run.phase == "sweep" else "test",
        "run_name": run.run_name,
    }


# --------------------------------------------------------------------------- results.csv


def shard_csv(out: Path, shard: Shard) -> Path:
    return out / SHARDS_DIR / f"results-{shard.index}-of-{shard.count}.csv"


def _read_csv(path: Path) -> pd.DataFrame:
    try:
        return pd.read_csv(path, dtype={"key": str})
    except (OSError, ValueError, pd.errors.EmptyDataError) as err:
        raise FlatlabError(f"cannot read {path} ({err}); move it away to start afresh") from None


def read_results(out: Path, columns: Sequence[str] = RESULT_COLUMNS) -> pd.DataFrame:
    """``results.csv`` and every shard's results as one table (one row per key, first wins)."""
    paths = [out / RESULTS_CSV, *sorted((out / SHARDS_DIR).glob("results-*-of-*.csv"))]
    frames = [_read_csv(path) for path in paths if path.is_file()]
    if not frames:
        return pd.DataFrame(columns=list(columns))
    rows = pd.concat(frames, ignore_index=True) if len(frames) > 1 else frames[0]
    rows = rows.drop_duplicates("key", keep="first").reset_index(drop=True)
    # columns added later, filled for rows written before them
    for column, default in (("noise", rows["optimizer"].map(DEFAULT_NOISE)),
                            ("sweep", rows["optimizer"])):
        rows[column] = (rows[column].astype(object).fillna(default.astype(object))
                        if column in rows else default)
    return rows[[c for c in columns if c in rows] + [c for c in rows if c not in columns]]


def write_csv(frame: pd.DataFrame, path: Path) -> None:
    """Atomically, floats to 8 significant digits."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        frame.to_csv(tmp, index=False, float_format="%.8g")


def pool_map(function: Callable[..., Any], items: Sequence[Item], *args: Any,
             jobs: int = 1) -> Iterator[tuple[Item, Any]]:
    """``(item, function(item, *args))`` as each finishes; ``jobs`` > 1: spawned processes."""
    if jobs <= 1:
        for item in items:
            yield item, function(item, *args)
        return
    with ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
        futures = {pool.submit(function, item, *args): item for item in items}
        for future in as_completed(futures):
            yield futures[future], future.result()


def run_all(runs: Sequence[RunSpec], out: Path, runs_dir: Path, *, jobs: int = 1,
            shard: Shard | None = None, say: Callable[[str], None] = print,
            execute: Callable[[RunSpec, Path, Path], dict] | None = None,
            columns: Sequence[str] = RESULT_COLUMNS) -> pd.DataFrame:
    """Run what the results lack (by key), and with ``shard`` only the shard's part, appending
    each row as it finishes; return every known row (all shards'). ``execute(run, runs_dir,
    out) -> row`` (a module-level function, for the process pool) and the results' ``columns``
    are the scratch study's unless a preset measures something else."""
    if execute is None:  # looked up at call time (tests replace the module's function)
        execute = globals()["execute"]
    results = read_results(out, columns)
    have = set(results["key"].astype(str))
    mine = shard.select(runs) if shard else list(runs)
    todo = [run for run in mine if run.key not in have]
    part = f" (shard {shard}: {len(mine)} of them)" if shard else ""
    if runs:
        say(f"{runs[0].phase} runs: {len(runs)} planned{part}, {len(mine) - len(todo)} "
            f"finished, running {len(todo)}")
    if shard:
        target = shard_csv(out, shard)
        own = _read_csv(target).to_dict("records") if target.is_file() else []
    else:
        target = out / RESULTS_CSV
        own = results.to_dict("records")
        if len(results) and (out / SHARDS_DIR).is_dir():
            write_csv(results, target)  # the shards' rows, aggregated
    new: list[dict] = []
    # longest first (epochs x passes per step), so that no long run is left alone at the end
    todo.sort(key=lambda run: -run.variant.epochs * run.variant.passes)
    for i, (run, row) in enumerate(pool_map(execute, todo, runs_dir, out, jobs=jobs), 1):
        own.append(row)
        new.append(row)
        write_csv(pd.DataFrame(own, columns=list(columns)), target)
        say(f"[{i}/{len(todo)}] {describe(run, row)}")
    frame = pd.DataFrame(results.to_dict("records") + new, columns=list(columns))
    return frame.astype({"key": str})


def planned_rows(rows: pd.DataFrame, runs: Iterable[RunSpec]) -> pd.DataFrame:
    """The rows of ``runs``, in plan order; rows of runs no longer planned (a grid value or a
    chosen hyperparameter that changed) stay in results.csv but are left out."""
    position = rows["key"].astype(str).map({run.key: i for i, run in enumerate(runs)})
    return rows[position.notna()].iloc[position.dropna().argsort()]


def describe(run: RunSpec, row: dict) -> str:
    """One progress line: the run and what it measured."""
    hyper = ", ".join(f"{k}={v:g}" for k, v in run.hyper.items())
    head = (f"{run.phase} {run.setting.name} {run.variant.name}"
            f"{' (' + hyper + ')' if hyper else ''} seed {run.seed}: ")
    if row.get("status") != "ok":
        return head + str(row.get("status"))
    text = (f"{row['eval_split']} acc {100 * row['test_acc']:.2f}%, {row['grad_evals']} passes, "
            f"train {row['train_seconds']:.1f} s")
    if row.get("trace") is not None:
        text += f"; trace {row['trace']:.4g} ± {row.get('trace_stderr', math.nan):.2g}"
        if row.get("lambda_1") is not None:
            text += f", λ1 {row['lambda_1']:.4g}"
        text += f", analysis {row['analysis_seconds']:.1f} s"
    return head + text
