"""Does NSO find flatter minima than SGD, SAM, ASAM and RWP? The paper's comparison at CPU scale.

    python benchmarks/flatness_study.py [--out reports/flatness] [--seeds 3] [--jobs 1]
    python benchmarks/flatness_study.py --quick          # smoke test (< 2 min), runs/flatness-quick

Settings (real data, all offline): MNIST-1D with an MLP and with a 1-D CNN, scikit-learn digits
with a small 2-D CNN. Methods: SGD, SAM, ASAM, RWP, NSO with k = 1 and NSO with k = 2.

Budgets. A step of SAM, ASAM, RWP (one perturbation plus the clean pass) or NSO k=1 (W+U and
W-U) costs 2 forward/backward passes, SGD 1, NSO k=2 4 (counted by
``flatlab.optim.gradient_evaluations_per_step`` and checked against the passes the training
loop actually made). Every method trains with the same batch size, so passes per example = passes
per step x epochs. Two comparisons:

* **same epochs**: every method E epochs (SGD then spends half and NSO k=2 twice the passes);
* **same gradient evaluations**: every method 2E passes per example, the budget of SAM at E
  epochs: SGD trains 2E epochs, NSO k=2 E/2 epochs (the cosine schedule spans the shorter run),
  the 2-pass methods are the same runs as above.

Hyperparameters. The learning rate, momentum, weight decay, batch size and schedule are shared
by all methods. rho (SAM, ASAM) and sigma (NSO, RWP) are chosen per setting by a sweep over
the grids in ``SWEEP``, trained with seed 0 on 80% of the training split and scored by accuracy on
the held-out 20% (``Dataset.split_validation``; the test split is never seen). NSO k=2 uses
the sigma chosen for NSO k=1. Final runs then train on the full training split with seeds
0..S-1.

Measurements (final runs): test accuracy after the last epoch; on a fixed subset of 1000
training examples (the same for every run of a data set), model in eval mode, the trace of the
full-parameter Hessian of the mean cross-entropy (Hutch++, 100 products, with its standard
error) and its top eigenvalue (Lanczos, Ritz residual tolerance 1e-4), both through
``flatlab.analyze.analyze``. Reported per setting and method: mean and sample standard deviation
(ddof = 1) over seeds; and the relative change of NSO against the *best* baseline in the same
budget group, best meaning the baseline with the best mean of the quantity compared (lowest
trace, lowest top eigenvalue, highest accuracy), next to the paper's numbers.

Outputs in ``--out``: ``results.csv`` (one row per run, sweep runs included), ``sweep.csv``,
``summary.csv`` (aggregated), ``comparison.csv`` (NSO vs best baseline), ``report.md`` and
``index.html`` (the regenerating command at the top), ``figures/*.png``, one
``flatlab.report`` page per setting for the seed-0 runs (``<setting>/index.html``: training
curves, eigenvalues, 1-D loss slices) and ``analysis/<key>.json`` (each final run's analysis
entry and training curve, so the report regenerates from ``--out`` alone). Checkpoints go to
``--runs-dir``. The study is resumable: a run whose key (a hash of its full configuration)
already has a row in ``results.csv`` is not run again, and an interrupted training run resumes
from its last saved epoch.
"""

from __future__ import annotations

import contextlib
import hashlib
import html
import json
import math
import os
import shlex
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field, replace
from fractions import Fraction
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from flatlab.errors import ArgumentParser, DivergenceError, FlatlabError, run_cli
from flatlab.io import atomic_path, atomic_write_text

DEFAULT_OUT = Path("reports/flatness")
DEFAULT_RUNS = Path("runs/flatness-study")
# TrainConfig fields added after the study first ran, at the value that reproduces the earlier
# behaviour: left out of a run's key at that value, so results.csv and the cached runs stay valid
_NEUTRAL = {"precision": "fp32", "independent_noise": False}
_UNSET = object()
QUICK_OUT = Path("runs/flatness-quick")
RESULTS_CSV, SWEEP_CSV, SUMMARY_CSV, COMPARISON_CSV = (
    "results.csv", "sweep.csv", "summary.csv", "comparison.csv")
SAME_EPOCHS, SAME_GRADS = "same epochs", "same gradient evaluations"
BUDGETS = (SAME_EPOCHS, SAME_GRADS)
REFERENCE_OPTIMIZER = "sam"  # "same gradient evaluations" = this method's passes at E epochs
QUANTITIES = ("test_acc", "trace", "lambda_1")
HIGHER_IS_BETTER = {"test_acc": True, "trace": False, "lambda_1": False}
# The paper's headline numbers (relative change of NSO; accuracy in percentage points).
PAPER = {
    "trace": "-17.7% (v3, vs 4 baselines); -12.6% (v1, vs SAM)",
    "lambda_1": "-12.8% (v3); -7.8% (v1, vs SAM)",
    "test_acc": "up to +1.8 pts (v3); up to +2.4 pts (v4)",
}


# --------------------------------------------------------------------------- the plan


@dataclass(frozen=True)
class Method:
    """One optimizer configuration compared in the study."""

    label: str                      # "nso k=2"
    optimizer: str                  # flatlab.optim name; also which sweep it takes its value from
    num_perturbs: int | None = None
    baseline: bool = True           # False: one of the NSO variants under test


METHODS: tuple[Method, ...] = (
    Method("sgd", "sgd"), Method("sam", "sam"), Method("asam", "asam"), Method("rwp", "rwp"),
    Method("nso k=1", "nso", 1, baseline=False), Method("nso k=2", "nso", 2, baseline=False),
)


@dataclass(frozen=True)
class Setting:
    """A data set and model; ``epochs`` is E, the "same epochs" budget."""

    name: str
    dataset: str
    model: str
    epochs: int
    dataset_kwargs: dict = field(default_factory=dict)
    model_kwargs: dict = field(default_factory=dict)


@dataclass(frozen=True)
class StudyConfig:
    """Everything the study varies; :func:`full_config` and :func:`quick_config` fill it."""

    settings: tuple[Setting, ...]
    seeds: tuple[int, ...]
    sweep: dict[str, tuple[str, tuple[float, ...]]]  # optimizer -> (argument, values)
    methods: tuple[Method, ...] = METHODS
    validation_fraction: float = 0.2
    validation_seed: int = 0
    sweep_seed: int = 0
    batch_size: int = 128
    lr: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 5e-4
    schedule: str = "cosine"
    samples: int = 1000         # analysis subset of the training split
    trace_matvecs: int = 100
    eigen_tol: float = 1e-4
    landscape: tuple[str, ...] = ("1d",)
    analysis_seed: int = 0


SWEEP: dict[str, tuple[str, tuple[float, ...]]] = {
    # SAM/ASAM grids were widened twice where the sweep kept choosing an edge value
    "sam": ("rho", (0.02, 0.05, 0.1, 0.2, 0.5, 1.0)),
    "asam": ("rho", (0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0)),
    "rwp": ("sigma", (0.01, 0.02, 0.05, 0.1)),   # filter-relative noise (RWP's default)
    "nso": ("sigma", (0.01, 0.02, 0.05, 0.1)),   # absolute noise (NSO's default)
}


def full_config(seeds: int = 3) -> StudyConfig:
    """The committed study: about half an hour on 2 idle CPU cores (see README-study)."""
    return StudyConfig(
        settings=(Setting("mnist1d-mlp", "mnist1d", "mlp", epochs=60),
                  Setting("mnist1d-cnn1d", "mnist1d", "cnn1d", epochs=60),
                  Setting("digits-cnn", "digits", "cnn", epochs=40)),
        seeds=tuple(range(seeds)), sweep=SWEEP)


def quick_config(seeds: int = 1) -> StudyConfig:
    """Smoke test: one setting, 4 epochs, a 2-point sweep, smaller analysis budgets."""
    return StudyConfig(
        settings=(Setting("mnist1d-mlp", "mnist1d", "mlp", epochs=4),),
        seeds=tuple(range(seeds)),
        sweep={name: (arg, (values[0], values[-2])) for name, (arg, values) in SWEEP.items()},
        samples=256, trace_matvecs=30, landscape=())


def passes_per_step(optimizer: str, num_perturbs: int | None = None) -> int:
    """Forward/backward passes one step of this optimizer makes (by the library's count)."""
    from flatlab.optim import build_optimizer, gradient_evaluations_per_step

    param = torch.zeros(1, requires_grad=True)
    opt = build_optimizer(optimizer, [param], lr=0.1, num_perturbs=num_perturbs)
    return gradient_evaluations_per_step(opt)


def matched_epochs(epochs: int, passes: int, reference_passes: int) -> int:
    """Epochs that give ``passes`` per step the budget of ``reference_passes`` x ``epochs``."""
    total = epochs * reference_passes
    if total % passes:
        raise FlatlabError(f"cannot match the gradient budget: {epochs} epochs x "
                           f"{reference_passes} passes is not a multiple of {passes} passes per "
                           f"step; choose E divisible by {passes // math.gcd(passes, total)}")
    return total // passes


@dataclass(frozen=True)
class Variant:
    """A method at one epoch count, and the budget comparisons it belongs to."""

    name: str                   # "nso k=2 (E/2)"
    method: Method
    epochs: int
    passes: int                 # per step
    budgets: tuple[str, ...]

    @property
    def passes_per_example(self) -> int:
        return self.epochs * self.passes


def plan_variants(methods: Sequence[Method], epochs: int) -> list[Variant]:
    """Each method at E epochs ("same epochs") and at the epochs that match the reference
    optimizer's passes at E epochs ("same gradient evaluations"); equal runs are merged."""
    reference = passes_per_step(REFERENCE_OPTIMIZER)
    variants: dict[tuple[str, int], Variant] = {}
    for method in methods:
        passes = passes_per_step(method.optimizer, method.num_perturbs)
        for budget in BUDGETS:
            e = epochs if budget == SAME_EPOCHS else matched_epochs(epochs, passes, reference)
            key = (method.label, e)
            if key in variants:
                variants[key] = replace(variants[key], budgets=variants[key].budgets + (budget,))
                continue
            name = method.label if e == epochs else f"{method.label} ({_epochs_label(e, epochs)})"
            variants[key] = Variant(name, method, e, passes, (budget,))
    return list(variants.values())


def _epochs_label(e: int, epochs: int) -> str:
    ratio = Fraction(e, epochs)
    if ratio.denominator == 1:
        return f"{ratio.numerator}E"
    if ratio.numerator == 1:
        return f"E/{ratio.denominator}"
    return f"{e} epochs"


@dataclass(frozen=True)
class RunSpec:
    """One training run (and, for final runs, its analysis)."""

    phase: str                  # "sweep" | "final"
    setting: Setting
    variant: Variant
    seed: int
    hyper: dict                 # {"rho": 0.05} / {"sigma": 0.02} / {}
    config: dict                # flatlab.train.TrainConfig fields (out filled in later)
    analysis: dict | None       # AnalyzeOptions fields; None for sweep runs

    @property
    def key(self) -> str:
        """Hash of everything that determines the run's numbers."""
        ignore = {"out", "device", "threads"}
        payload = {"phase": self.phase, "variant": self.variant.name,
                   "budgets": self.variant.budgets,
                   "config": {k: v for k, v in self.config.items()
                              if k not in ignore and _NEUTRAL.get(k, _UNSET) != v},
                   "analysis": self.analysis}
        text = json.dumps(payload, sort_keys=True, default=str)
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    @property
    def run_name(self) -> str:
        hyper = "".join(f"-{k}{v:g}" for k, v in self.hyper.items())
        slug = self.variant.name.replace(" ", "").replace("=", "").replace("/", "over")
        slug = slug.replace("(", "-").replace(")", "")
        return f"{self.setting.name}/{self.phase}/{slug}{hyper}-seed{self.seed}-{self.key[:8]}"


def train_config(study: StudyConfig, setting: Setting, variant: Variant, seed: int,
                 hyper: dict, *, validation: bool) -> dict:
    """The ``TrainConfig`` fields of one run (validated by building it)."""
    from flatlab.train import TrainConfig

    dataset_kwargs = dict(setting.dataset_kwargs)
    if validation:
        dataset_kwargs.update(validation_fraction=study.validation_fraction,
                              validation_seed=study.validation_seed)
    config = TrainConfig(
        dataset=setting.dataset, dataset_kwargs=dataset_kwargs, model=setting.model,
        model_kwargs=dict(setting.model_kwargs), optimizer=variant.method.optimizer,
        num_perturbs=variant.method.num_perturbs, epochs=variant.epochs,
        batch_size=study.batch_size, lr=study.lr, momentum=study.momentum,
        weight_decay=study.weight_decay, schedule=study.schedule, seed=seed, device="cpu",
        **{k: float(v) for k, v in hyper.items()})
    return config.validate().to_dict()


def analysis_fields(study: StudyConfig) -> dict:
    return {"trace": True, "eigenvalues": 1, "density": False, "landscape": list(study.landscape),
            "samples": study.samples, "seed": study.analysis_seed, "mode": "eval",
            "trace_matvecs": study.trace_matvecs, "trace_method": "hutch++",
            "eigen_tol": study.eigen_tol}


def sweep_runs(study: StudyConfig) -> list[RunSpec]:
    """Seed-0 runs on the validation split, one per swept method x value (at E epochs)."""
    runs = []
    for setting in study.settings:
        variants = plan_variants(study.methods, setting.epochs)
        done: set[str] = set()
        for variant in variants:
            opt = variant.method.optimizer
            if opt not in study.sweep or opt in done or variant.epochs != setting.epochs:
                continue
            done.add(opt)
            arg, values = study.sweep[opt]
            for value in values:
                hyper = {arg: value}
                runs.append(RunSpec("sweep", setting, variant, study.sweep_seed, hyper,
                                    train_config(study, setting, variant, study.sweep_seed,
                                                 hyper, validation=True), None))
    return runs


def final_runs(study: StudyConfig, chosen: dict[tuple[str, str], dict]) -> list[RunSpec]:
    """Every variant x seed on the full training split, with the chosen hyperparameters."""
    runs = []
    for setting in study.settings:
        for variant in plan_variants(study.methods, setting.epochs):
            hyper = chosen.get((setting.name, variant.method.optimizer), {})
            for seed in study.seeds:
                runs.append(RunSpec("final", setting, variant, seed, hyper,
                                    train_config(study, setting, variant, seed, hyper,
                                                 validation=False), analysis_fields(study)))
    return runs


# --------------------------------------------------------------------------- running


def execute(run: RunSpec, runs_dir: Path, out: Path) -> dict:
    """Train ``run`` (resuming a half-finished one), analyse it if final; return its row."""
    from flatlab.train import STATE_NAME, TrainConfig, train

    run_dir = runs_dir / run.run_name
    config = TrainConfig.from_dict(dict(run.config, out=str(run_dir)))
    row = _row_header(run)
    run_dir.mkdir(parents=True, exist_ok=True)
    resume = (run_dir / STATE_NAME).is_file()  # a killed run continues from its last save
    try:
        with open(run_dir / "train.log", "a", encoding="utf-8") as log, \
                contextlib.redirect_stdout(log):
            result = train(config, progress=False, resume=resume)
    except DivergenceError as err:
        row.update(status=f"diverged: {err}".splitlines()[0][:200])
        return row
    last = result.metrics[-1]
    row.update(status="ok", grad_evals=int(last["grad_evals"]),
               steps=int(last["grad_evals"]) // run.variant.passes,
               train_seconds=float(last["seconds"]),
               **{k: float(last[k]) for k in ("train_loss", "train_acc", "test_loss",
                                              "test_acc")})
    if run.analysis is None:
        return row
    from flatlab.analyze import AnalyzeOptions, analyze

    options = AnalyzeOptions(**{**run.analysis, "landscape": tuple(run.analysis["landscape"])},
                             device="cpu", progress=False)
    started = time.perf_counter()
    analysis = analyze([result.checkpoint], options)
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
        "metrics": result.metrics}
    atomic_write_text(out / "analysis" / f"{run.key}.json",
                      json.dumps(record, allow_nan=False, separators=(",", ":")) + "\n")
    return row


RESULT_COLUMNS = (
    "key", "phase", "setting", "dataset", "model", "variant", "method", "optimizer",
    "num_perturbs", "baseline", "budgets", "hyperparameter", "hyper_value", "epochs",
    "passes_per_step", "seed", "eval_split", "status", "steps", "grad_evals", "train_loss",
    "train_acc", "test_loss", "test_acc", "trace", "trace_stderr", "trace_matvecs", "lambda_1",
    "lambda_1_residual", "lambda_1_converged", "eigen_matvecs", "analysis_loss",
    "analysis_accuracy", "train_seconds", "analysis_seconds", "run_name")


def _row_header(run: RunSpec) -> dict:
    (arg, value), = run.hyper.items() if run.hyper else ((None, None),)
    return {
        "key": run.key, "phase": run.phase, "setting": run.setting.name,
        "dataset": run.setting.dataset, "model": run.setting.model,
        "variant": run.variant.name, "method": run.variant.method.label,
        "optimizer": run.variant.method.optimizer,
        "num_perturbs": run.variant.method.num_perturbs,
        "baseline": run.variant.method.baseline, "budgets": ";".join(run.variant.budgets),
        "hyperparameter": arg, "hyper_value": value, "epochs": run.variant.epochs,
        "passes_per_step": run.variant.passes, "seed": run.seed,
        "eval_split": "validation" if run.phase == "sweep" else "test",
        "run_name": run.run_name,
    }


def read_results(out: Path) -> pd.DataFrame:
    path = out / RESULTS_CSV
    if not path.is_file():
        return pd.DataFrame(columns=list(RESULT_COLUMNS))
    try:
        return pd.read_csv(path, dtype={"key": str})
    except (OSError, ValueError, pd.errors.EmptyDataError) as err:
        raise FlatlabError(f"cannot read {path} ({err}); move it away to start afresh") from None


def write_csv(frame: pd.DataFrame, path: Path) -> None:
    with atomic_path(path) as tmp:
        frame.to_csv(tmp, index=False, float_format="%.8g")


def run_all(runs: Sequence[RunSpec], out: Path, runs_dir: Path, *, jobs: int,
            say: Callable[[str], None]) -> pd.DataFrame:
    """Run what ``results.csv`` lacks (by key), appending each row as it finishes."""
    results = read_results(out)
    have = set(results["key"].astype(str))
    todo = [r for r in runs if r.key not in have]
    if len(todo) < len(runs):
        say(f"{len(runs) - len(todo)} of {len(runs)} {runs[0].phase} runs already in "
            f"{out / RESULTS_CSV}; running {len(todo)}")
    rows = results.to_dict("records")

    def record(run: RunSpec, row: dict, i: int) -> None:
        rows.append(row)
        write_csv(pd.DataFrame(rows, columns=list(RESULT_COLUMNS)), out / RESULTS_CSV)
        say(f"[{i}/{len(todo)}] {_describe(run, row)}")

    if jobs <= 1:
        for i, run in enumerate(todo, 1):
            record(run, execute(run, runs_dir, out), i)
    else:
        import multiprocessing

        with ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
            futures = {pool.submit(execute, run, runs_dir, out): run for run in todo}
            for i, future in enumerate(as_completed(futures), 1):
                record(futures[future], future.result(), i)
    return pd.DataFrame(rows, columns=list(RESULT_COLUMNS))


def planned_rows(rows: pd.DataFrame, runs: Sequence[RunSpec]) -> pd.DataFrame:
    """The rows of ``runs``, in plan order; rows of runs no longer planned (a grid value or a
    chosen hyperparameter that changed) stay in results.csv but are left out."""
    position = rows["key"].astype(str).map({run.key: i for i, run in enumerate(runs)})
    return rows[position.notna()].iloc[position.dropna().argsort()]


def _describe(run: RunSpec, row: dict) -> str:
    hyper = ", ".join(f"{k}={v:g}" for k, v in run.hyper.items())
    head = (f"{run.phase} {run.setting.name} {run.variant.name}"
            f"{' (' + hyper + ')' if hyper else ''} seed {run.seed}: ")
    if row.get("status") != "ok":
        return head + str(row.get("status"))
    text = (f"{row['eval_split']} acc {100 * row['test_acc']:.2f}%, {row['grad_evals']} passes, "
            f"train {row['train_seconds']:.1f} s")
    if row.get("trace") is not None:
        text += (f"; trace {row['trace']:.4g} ± {row['trace_stderr']:.2g}, "
                 f"λ1 {row['lambda_1']:.4g}, analysis {row['analysis_seconds']:.1f} s")
    return head + text


# --------------------------------------------------------------------------- aggregation


def select_hyperparameters(rows: pd.DataFrame) -> tuple[dict[tuple[str, str], dict],
                                                         pd.DataFrame]:
    """Per setting and optimizer, the swept value with the highest validation accuracy (ties:
    lower validation loss, then the smaller value). Returns the choices and the sweep table."""
    sweep = rows[(rows["phase"] == "sweep") & (rows["status"] == "ok")].copy()
    chosen: dict[tuple[str, str], dict] = {}
    sweep["chosen"] = False
    for (setting, optimizer), group in sweep.groupby(["setting", "optimizer"], sort=False):
        order = group.sort_values(["test_acc", "test_loss", "hyper_value"],
                                  ascending=[False, True, True])
        best = order.iloc[0]
        chosen[(setting, optimizer)] = {str(best["hyperparameter"]): float(best["hyper_value"])}
        sweep.loc[best.name, "chosen"] = True
    table = sweep[["setting", "optimizer", "hyperparameter", "hyper_value", "epochs",
                   "test_acc", "test_loss", "chosen"]].rename(
        columns={"test_acc": "val_acc", "test_loss": "val_loss"})
    return chosen, table.reset_index(drop=True)


def summarize(rows: pd.DataFrame) -> pd.DataFrame:
    """One row per (setting, variant) of the final runs: n, mean and sample std (ddof=1) of
    test accuracy, trace and top eigenvalue over seeds; budgets and hyperparameters."""
    final = rows[(rows["phase"] == "final") & (rows["status"] == "ok")]
    out = []
    for (setting, variant), group in final.groupby(["setting", "variant"], sort=False):
        first = group.iloc[0]
        row = {"setting": setting, "variant": variant, "method": first["method"],
               "optimizer": first["optimizer"], "baseline": bool(first["baseline"]),
               "budgets": first["budgets"], "hyperparameter": _hyper_text(first),
               "epochs": int(first["epochs"]), "passes_per_step": int(first["passes_per_step"]),
               "grad_evals": float(group["grad_evals"].mean()), "n": len(group),
               "seeds": " ".join(str(int(s)) for s in sorted(group["seed"]))}
        for q in (*QUANTITIES, "train_loss", "analysis_loss", "trace_stderr"):
            values = pd.to_numeric(group[q], errors="coerce").to_numpy(dtype=float)
            row[f"{q}_mean"] = float(np.mean(values))
            row[f"{q}_std"] = float(np.std(values, ddof=1)) if len(values) > 1 else math.nan
        row["lambda_1_unconverged"] = int((group["lambda_1_converged"].astype(str)
                                           .str.lower() == "false").sum())
        out.append(row)
    return pd.DataFrame(out)


def _hyper_text(row: Any) -> str:
    arg, value = row["hyperparameter"], row["hyper_value"]
    if not isinstance(arg, str) or pd.isna(value):
        return ""
    noise = {"rwp": " (filter)", "nso": " (absolute)"}.get(row["optimizer"], "")
    return f"{arg}={float(value):g}{noise}"


def change(quantity: str, value: float, reference: float) -> float:
    """NSO's change against a reference: accuracy in percentage points, the rest relative."""
    if quantity == "test_acc":
        return 100.0 * (value - reference)
    if reference == 0 or not math.isfinite(reference):
        return math.nan
    from flatlab.report import relative_change

    result = relative_change(value, reference)
    return math.nan if result is None else result


def compare(summary: pd.DataFrame) -> pd.DataFrame:
    """NSO variants against the best baseline (by mean; see :data:`HIGHER_IS_BETTER`) and
    against SAM, per setting and budget group; plus the mean change over settings."""
    rows = []
    if summary.empty:
        return pd.DataFrame()
    for setting, table in summary.groupby("setting", sort=False):
        for budget in BUDGETS:
            group = table[table["budgets"].str.split(";").apply(lambda b, x=budget: x in b)]
            baselines, nsos = group[group["baseline"]], group[~group["baseline"]]
            if baselines.empty:
                continue
            for _, nso in nsos.iterrows():
                for q in QUANTITIES:
                    means = baselines[f"{q}_mean"]
                    best = baselines.loc[means.idxmax() if HIGHER_IS_BETTER[q] else means.idxmin()]
                    sam = baselines[baselines["optimizer"] == "sam"]
                    rows.append({
                        "setting": setting, "budget": budget, "nso": nso["variant"],
                        "quantity": q, "nso_mean": nso[f"{q}_mean"], "nso_std": nso[f"{q}_std"],
                        "best_baseline": best["variant"], "best_mean": best[f"{q}_mean"],
                        "best_std": best[f"{q}_std"],
                        "change": change(q, nso[f"{q}_mean"], best[f"{q}_mean"]),
                        "t": _welch_t(nso, best, q),
                        "change_vs_sam": (change(q, nso[f"{q}_mean"], sam.iloc[0][f"{q}_mean"])
                                          if len(sam) else math.nan),
                        "paper": PAPER[q]})
    frame = pd.DataFrame(rows)
    if frame.empty or frame["setting"].nunique() < 2:
        return frame
    mean_rows = []
    for (budget, nso, q), group in frame.groupby(["budget", "nso", "quantity"], sort=False):
        mean_rows.append({"setting": f"mean over {len(group)} settings", "budget": budget,
                          "nso": nso, "quantity": q, "change": group["change"].mean(),
                          "change_vs_sam": group["change_vs_sam"].mean(), "paper": PAPER[q],
                          "best_baseline": "per setting"})
    return pd.concat([frame, pd.DataFrame(mean_rows)], ignore_index=True)


def scorecard(comparison: pd.DataFrame) -> pd.DataFrame:
    """Per budget, NSO variant and quantity: settings where NSO beats the best baseline (and
    by |t| >= 2), and settings where it beats SAM."""
    per_setting = comparison[~comparison["setting"].str.startswith("mean over")]
    rows = []
    for (budget, nso, q), group in per_setting.groupby(["budget", "nso", "quantity"],
                                                       sort=False):
        sign = 1.0 if HIGHER_IS_BETTER[q] else -1.0
        better = sign * group["change"] > 0
        clear = better & (sign * group["t"] >= 2)
        rows.append({"budget": budget, "NSO": nso,
                     "quantity": {"test_acc": "test acc", "lambda_1": "λ1"}.get(q, q),
                     "better than best baseline": f"{int(better.sum())} of {len(group)}",
                     "by ≥ 2 s.e.": f"{int(clear.sum())} of {len(group)}",
                     "better than SAM": f"{int((sign * group['change_vs_sam'] > 0).sum())} of "
                                        f"{len(group)}"})
    return pd.DataFrame(rows)


def _welch_t(a: Any, b: Any, q: str) -> float:
    """(mean_a - mean_b) / sqrt(s_a^2/n_a + s_b^2/n_b): how many standard errors apart."""
    se = math.sqrt(a[f"{q}_std"] ** 2 / a["n"] + b[f"{q}_std"] ** 2 / b["n"])
    if not math.isfinite(se) or se == 0:
        return math.nan
    return (a[f"{q}_mean"] - b[f"{q}_mean"]) / se


# --------------------------------------------------------------------------- the report


def _pm(mean: float, std: float, fmt: str = "{:.4g}", scale: float = 1.0) -> str:
    if mean is None or not math.isfinite(mean):
        return "n/a"
    text = fmt.format(scale * mean)
    return text if std is None or not math.isfinite(std) else f"{text} ± {fmt.format(scale * std)}"


def results_table(summary: pd.DataFrame, setting: str) -> pd.DataFrame:
    table = summary[summary["setting"] == setting]
    return pd.DataFrame({
        "method": table["variant"],
        "hyperparameter": table["hyperparameter"],
        "epochs": table["epochs"].astype(int),
        "passes/example": (table["epochs"] * table["passes_per_step"]).astype(int),
        "grad evals": table["grad_evals"].round().astype(int),
        "comparisons": table["budgets"].str.replace(";", ", "),
        "test acc (%)": [_pm(m, s, "{:.2f}", 100) for m, s in
                         zip(table["test_acc_mean"], table["test_acc_std"], strict=True)],
        "trace": [_pm(m, s) for m, s in zip(table["trace_mean"], table["trace_std"],
                                             strict=True)],
        "trace s.e. (mean)": [f"{v:.2g}" if math.isfinite(v) else "n/a"
                              for v in table["trace_stderr_mean"]],
        "λ1": [_pm(m, s) + ("*" if u else "") for m, s, u in
               zip(table["lambda_1_mean"], table["lambda_1_std"],
                   table["lambda_1_unconverged"], strict=True)],
        "train loss at W": [_pm(m, s, "{:.3g}") for m, s in
                            zip(table["analysis_loss_mean"], table["analysis_loss_std"],
                                strict=True)],
        "n": table["n"],
    })


def comparison_table(comparison: pd.DataFrame) -> pd.DataFrame:
    def fmt(q: str, v: float) -> str:
        if v is None or not math.isfinite(v):
            return "n/a"
        return f"{v:+.2f} pts" if q == "test_acc" else f"{100 * v:+.1f}%"

    def t(v: float) -> str:
        return f"{v:+.1f}" if v is not None and math.isfinite(v) else ""

    return pd.DataFrame({
        "setting": comparison["setting"], "budget": comparison["budget"],
        "NSO": comparison["nso"],
        "quantity": comparison["quantity"].map({"test_acc": "test acc", "trace": "trace",
                                                "lambda_1": "λ1"}),
        "best baseline": comparison["best_baseline"],
        "NSO vs best": [fmt(q, v) for q, v in zip(comparison["quantity"], comparison["change"],
                                                   strict=True)],
        "t": [t(v) for v in comparison.get("t", pd.Series([math.nan] * len(comparison)))],
        "NSO vs SAM": [fmt(q, v) for q, v in zip(comparison["quantity"],
                                                  comparison["change_vs_sam"], strict=True)],
        "paper": comparison["paper"],
    })


def plot_setting(summary: pd.DataFrame, setting: str):
    """Bars with standard-deviation whiskers: test accuracy, trace and λ1 per method."""
    from matplotlib.figure import Figure

    from flatlab.report import METHOD_COLORS

    table = summary[summary["setting"] == setting]
    fig = Figure(figsize=(13, 3.8), layout="constrained")
    axes = fig.subplots(1, 3)
    x = np.arange(len(table))
    colors = [METHOD_COLORS.get(o, "#7f7f7f") for o in table["optimizer"]]
    hatches = ["//" if "(" in v else ("xx" if "k=2" in v else "") for v in table["variant"]]
    for ax, (q, label, scale) in zip(axes, (("test_acc", "test accuracy (%)", 100),
                                            ("trace", "Hessian trace", 1),
                                            ("lambda_1", "top eigenvalue λ1", 1)), strict=True):
        means = scale * table[f"{q}_mean"].to_numpy(dtype=float)
        stds = scale * np.nan_to_num(table[f"{q}_std"].to_numpy(dtype=float))
        bars = ax.bar(x, means, yerr=stds, color=colors, capsize=3, edgecolor="black",
                      linewidth=0.5)
        for bar, hatch in zip(bars, hatches, strict=True):
            bar.set_hatch(hatch)
        ax.set_xticks(x, table["variant"], rotation=45, ha="right", fontsize=8)
        ax.set_title(label)
        ax.grid(axis="y", alpha=0.3)
        if q == "test_acc" and np.isfinite(means).any():
            low = np.nanmin(means - stds)
            ax.set_ylim(max(0.0, low - 0.5 * (np.nanmax(means + stds) - low) - 0.5), None)
    fig.suptitle(f"{setting}: mean ± std over seeds (hatching: // other epoch count than E, "
                 f"xx NSO k=2 at E epochs = twice the passes)")
    return fig


class Page:
    """Blocks rendered to both Markdown and HTML (headings, text, tables, images)."""

    def __init__(self, title: str) -> None:
        self.title, self.blocks = title, []

    def h(self, text: str, level: int = 2) -> None:
        self.blocks.append(("h", level, text))

    def p(self, text: str) -> None:
        self.blocks.append(("p", text))

    def code(self, text: str) -> None:
        self.blocks.append(("code", text))

    def items(self, items: Iterable[str]) -> None:
        self.blocks.append(("ul", list(items)))

    def table(self, frame: pd.DataFrame) -> None:
        self.blocks.append(("table", frame))

    def image(self, rel: str, alt: str) -> None:
        self.blocks.append(("img", rel, alt))

    def markdown(self) -> str:
        from flatlab.report import markdown_table

        parts = [f"# {self.title}\n"]
        for block in self.blocks:
            kind = block[0]
            if kind == "h":
                parts.append(f"{'#' * block[1]} {block[2]}\n")
            elif kind == "p":
                parts.append(block[1] + "\n")
            elif kind == "code":
                parts.append(f"```\n{block[1]}\n```\n")
            elif kind == "ul":
                parts.append("\n".join(f"- {item}" for item in block[1]) + "\n")
            elif kind == "table":
                parts.append(markdown_table(block[1].astype(str)) + "\n")
            else:
                parts.append(f"![{block[2]}]({block[1]})\n")
        return "\n".join(parts)

    def html(self) -> str:
        e = html.escape
        css = ("body{font-family:system-ui,sans-serif;max-width:1300px;margin:2em auto;"
               "padding:0 1em;color:#222;line-height:1.45}table{border-collapse:collapse;"
               "font-size:.85em;margin:.6em 0}th,td{border:1px solid #ccc;padding:.2em .5em}"
               "th{background:#f2f2f2}code,pre{background:#f6f6f6;padding:.1em .3em}"
               "img{max-width:100%}")
        parts = [f"<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
                 f"<title>{e(self.title)}</title><style>{css}</style></head><body>\n"
                 f"<h1>{e(self.title)}</h1>\n"]
        for block in self.blocks:
            kind = block[0]
            if kind == "h":
                parts.append(f"<h{block[1]}>{e(block[2])}</h{block[1]}>\n")
            elif kind == "p":
                parts.append(f"<p>{_inline_html(block[1])}</p>\n")
            elif kind == "code":
                parts.append(f"<pre>{e(block[1])}</pre>\n")
            elif kind == "ul":
                parts.append("<ul>" + "".join(f"<li>{_inline_html(i)}</li>"
                                              for i in block[1]) + "</ul>\n")
            elif kind == "table":
                parts.append(block[1].to_html(index=False, border=0, na_rep="n/a") + "\n")
            else:
                parts.append(f"<figure><img src=\"{e(block[1])}\" alt=\"{e(block[2])}\">"
                             f"</figure>\n")
        parts.append("</body></html>\n")
        return "".join(parts)


def _inline_html(text: str) -> str:
    """Escape, then turn `code` spans and [text](link) into HTML."""
    import re

    text = html.escape(text, quote=False)
    text = re.sub(r"`([^`]+)`", r"<code>\1</code>", text)
    return re.sub(r"\[([^\]]+)\]\(([^)\s]+)\)", r'<a href="\2">\1</a>', text)


def write_setting_report(study: StudyConfig, setting: Setting, rows: pd.DataFrame, out: Path,
                         command: str) -> Path | None:
    """``flatlab.report.write_report`` page of the setting's seed-0 final runs."""
    from flatlab.report import write_report

    seed = min(study.seeds)
    final = rows[(rows["phase"] == "final") & (rows["status"] == "ok")
                 & (rows["setting"] == setting.name) & (rows["seed"] == seed)]
    checkpoints, metrics, analysis = [], {}, None
    for _, row in final.iterrows():
        path = out / "analysis" / f"{row['key']}.json"
        if not path.is_file():
            return None
        record = json.loads(path.read_text(encoding="utf-8"))
        entry = dict(record["entry"], name=row["variant"])
        checkpoints.append(entry)
        metrics[row["variant"]] = pd.DataFrame(record["metrics"])
        analysis = record["analysis"]
    if not checkpoints:
        return None
    analysis = dict(analysis, checkpoints=checkpoints, interpolation=None, command=None)
    baseline = "sgd" if "sgd" in metrics else None
    return write_report(analysis, out / setting.name, baseline=baseline, metrics=metrics,
                        command=command,
                        title=f"flatness study, {setting.name}: the seed-{seed} runs")


@dataclass
class StudyResult:
    index: Path                 # the report's index.html
    summary: pd.DataFrame       # summary.csv
    comparison: pd.DataFrame    # comparison.csv


def write_study_report(study: StudyConfig, rows: pd.DataFrame, out: Path, *, command: str,
                       wall_seconds: float | None = None, new_runs: int = 0) -> StudyResult:
    """results.csv rows -> sweep/summary/comparison CSVs, figures, report.md, index.html."""
    from flatlab.report import save_figure

    planned = sweep_runs(study)
    swept = planned_rows(rows, planned)
    chosen, sweep = select_hyperparameters(swept)
    planned += final_runs(study, chosen)
    used = planned_rows(rows, planned)
    summary = summarize(used)
    comparison = compare(summary)
    write_csv(sweep, out / SWEEP_CSV)
    write_csv(summary, out / SUMMARY_CSV)
    write_csv(comparison, out / COMPARISON_CSV)

    page = Page("Flatness study: does NSO find flatter minima than SGD, SAM, ASAM and RWP?")
    page.p("Regenerate with:")
    page.code(command)
    page.p("Generated by `benchmarks/flatness_study.py`; every number below comes from "
           f"[{RESULTS_CSV}]({RESULTS_CSV}) (one row per run). Aggregates: "
           f"[{SUMMARY_CSV}]({SUMMARY_CSV}), [{COMPARISON_CSV}]({COMPARISON_CSV}), "
           f"[{SWEEP_CSV}]({SWEEP_CSV}).")
    ok = used[used["status"] == "ok"]
    train_min = pd.to_numeric(ok["train_seconds"], errors="coerce").sum() / 60
    analysis_min = pd.to_numeric(ok["analysis_seconds"], errors="coerce").sum() / 60
    timing = (f"Time recorded in results.csv (wall clock of each run, one CPU thread each, "
              f"on whatever else the machine was doing): {train_min:.1f} min training + "
              f"{analysis_min:.1f} min Hessian analysis over {len(used)} runs "
              f"({(used['phase'] == 'sweep').sum()} sweep, {(used['phase'] == 'final').sum()} "
              "final).")
    if wall_seconds is not None:
        timing += (f" The invocation that wrote this report ran {new_runs} new run(s) in "
                   f"{wall_seconds / 60:.1f} min (the rest were reused from results.csv).")
    page.p(timing)
    failed = used[used["status"] != "ok"]
    if len(failed):
        page.p(f"{len(failed)} run(s) did not finish (diverged) and are left out of the "
               "aggregates: " + "; ".join(f"{r.run_name}: {r.status}"
                                          for r in failed.itertuples()))
    missing = len(planned) - len(used)
    if missing:
        page.p(f"**Incomplete**: {missing} planned run(s) have no result yet.")

    page.h("Setup")
    page.table(pd.DataFrame([{
        "setting": s.name, "data": s.dataset + (f" {s.dataset_kwargs}" if s.dataset_kwargs
                                                else ""),
        "model": s.model + (f" {s.model_kwargs}" if s.model_kwargs else ""),
        "E (epochs)": s.epochs, "batch": study.batch_size, "lr (peak)": study.lr,
        "schedule": study.schedule, "momentum": study.momentum,
        "weight decay": study.weight_decay, "seeds": " ".join(map(str, study.seeds))}
        for s in study.settings]))
    ref = passes_per_step(REFERENCE_OPTIMIZER)
    page.items([
        "**Budgets.** Passes per step (forward + backward, counted by the training loop and "
        "equal to `gradient_evaluations_per_step`): SGD 1; SAM, ASAM, RWP (clean + one "
        "perturbed pass) and NSO k=1 (W+U, W−U) 2; NSO k=2 4. All methods use the same batch "
        "size, so passes per example = passes per step × epochs. *Same epochs*: every method E "
        f"epochs. *Same gradient evaluations*: every method {ref}E passes per example (SAM's "
        "budget at E epochs): SGD trains 2E epochs, NSO k=2 E/2 epochs (its cosine schedule "
        "spans the shorter run); the 2-pass methods are shared by both comparisons. The "
        "'grad evals' column is the measured total.",
        "**Hyperparameters.** Shared by all methods: learning rate, momentum, weight decay, "
        "batch size, cosine schedule. Swept per setting on a validation split "
        f"({study.validation_fraction:.0%} of the training split held out, seed "
        f"{study.validation_seed}; the test split is never used for selection), seed "
        f"{study.sweep_seed}, E epochs, picked by validation accuracy (ties: lower validation "
        "loss): " + "; ".join(f"{opt} {arg} ∈ {{{', '.join(f'{v:g}' for v in vals)}}}"
                              for opt, (arg, vals) in study.sweep.items())
        + ". NSO noise is absolute (N(0, σ²I)), RWP noise filter-relative with clean weight "
        "0.5 (the library defaults). NSO k=2 uses the σ chosen for NSO k=1.",
        f"**Measurements.** Test accuracy after the last epoch. On a fixed subset of "
        f"{study.samples} training examples (the same for all runs on a data set; analysis "
        f"seed {study.analysis_seed}), model in eval mode, loss = mean cross-entropy: trace of "
        f"the full-parameter Hessian by Hutch++ with {study.trace_matvecs} Hessian-vector "
        "products (its standard error is reported per run; the table shows the mean over seeds "
        "of those errors next to the spread over seeds) and top eigenvalue λ1 by Lanczos "
        f"(Ritz residual tolerance {study.eigen_tol:g}; * marks a run that did not converge), "
        "via `flatlab.analyze.analyze`.",
        "**Aggregation.** Mean ± sample standard deviation (ddof = 1) over seeds. NSO is "
        "compared with the *best baseline* of the same budget group, best = the baseline "
        "(SGD, SAM, ASAM, RWP) with the best mean of the quantity compared (highest accuracy, "
        "lowest trace, lowest λ1), so each quantity may have a different best baseline. Trace "
        "and λ1 changes are relative, (NSO − best) / |best|; accuracy changes are differences in "
        "percentage points. t = difference / sqrt(s₁²/n₁ + s₂²/n₂) (Welch's statistic; "
        "|t| < 2 is within seed noise at these n). 'NSO vs SAM' is the paper-v1 comparison.",
    ])

    page.h("Hyperparameter sweep (validation split)")
    if not sweep.empty:
        shown = sweep.copy()
        shown["val acc (%)"] = (100 * shown.pop("val_acc")).map("{:.2f}".format)
        shown["val loss"] = shown.pop("val_loss").map("{:.4f}".format)
        shown["hyper_value"] = shown["hyper_value"].map("{:g}".format)
        shown["chosen"] = shown["chosen"].map({True: "✓", False: ""})
        page.table(shown)
        edges = [f"{r.setting} {r.optimizer} {r.hyperparameter}={r.hyper_value:g}"
                 for r in sweep[sweep["chosen"]].itertuples()
                 if r.optimizer in study.sweep and len(study.sweep[r.optimizer][1]) > 2
                 and r.hyper_value in (min(study.sweep[r.optimizer][1]),
                                       max(study.sweep[r.optimizer][1]))]
        if edges:
            page.p("Chosen at the edge of its grid (the best value may lie beyond it): "
                   + "; ".join(edges) + f". The validation split holds "
                   f"{study.validation_fraction:.0%} of the training examples, so accuracy "
                   "differences of a few tenths of a point between grid values are within noise.")

    page.h("Results")
    figures = out / "figures"
    for setting in study.settings:
        if summary.empty or setting.name not in set(summary["setting"]):
            continue
        page.h(setting.name, 3)
        page.table(results_table(summary, setting.name))
        fig_path = figures / f"{setting.name}.png"
        save_figure(plot_setting(summary, setting.name), fig_path)
        page.image(f"figures/{setting.name}.png", f"{setting.name}: accuracy, trace, λ1")
        index = write_setting_report(study, setting, used, out, command)
        if index is not None:
            page.p(f"Training curves, eigenvalues and 1-D loss slices of the seed-"
                   f"{min(study.seeds)} runs: [{setting.name}/index.html]"
                   f"({setting.name}/index.html) ([report.md]({setting.name}/report.md)).")

    page.h("NSO against the best baseline, next to the paper")
    if not comparison.empty:
        card = scorecard(comparison)
        if not card.empty:
            page.p("Scorecard: in how many settings NSO comes out better (higher accuracy, "
                   "lower trace, lower λ1) than the best baseline of its budget group, how "
                   "many of those by at least two standard errors (t ≤ −2 for trace and λ1, "
                   "t ≥ 2 for accuracy), and in how many settings it is better than SAM.")
            page.table(card)
        page.table(comparison_table(comparison))
    page.p("Paper: Ju, Li, Zhang, Noise Stability Optimization (arXiv 2306.08553): v1 reports "
           "trace −12.6% and top eigenvalue −7.8% against SAM averaged over eight data sets; v3 "
           "trace −17.7%, top eigenvalue −12.8% against four sharpness-reducing baselines and "
           "up to +1.8% test accuracy fine-tuning ResNet-34 (v4: −15.8% / −9.7%, up to +2.4%). "
           "Their top eigenvalue is a sum of per-layer power iterations; here λ1 is the top "
           "eigenvalue of the full Hessian. Their setting is fine-tuning pretrained ResNets; "
           "this study trains small networks from scratch on CPU-sized data, so it checks the "
           "direction and rough size of the effect, not the paper's exact numbers.")
    page.p("Reading the numbers: the Hessian of the cross-entropy shrinks as the training loss "
           "goes to zero (the softmax saturates), so a run that fits the training set harder "
           "also looks flatter, and an under-trained run (few epochs, or too much noise) can "
           "look flat without being better. Read trace and λ1 together with 'train loss at W' "
           "(the clean loss on the analysis subset, eval mode) and test accuracy in the tables "
           "above; t values within ±2 are within seed-to-seed noise. (The training loop's own "
           "train loss, in results.csv, comes from each step's first pass, which for NSO is at "
           "W + U, so it overstates NSO's clean training loss.)")
    md = page.markdown()
    atomic_write_text(out / "report.md", md)
    index = out / "index.html"
    atomic_write_text(index, page.html())
    return StudyResult(index, summary, comparison)


# --------------------------------------------------------------------------- command line


def run_study(study: StudyConfig, out: Path, runs_dir: Path, *, jobs: int = 1,
              command: str = "", say: Callable[[str], None] | None = None) -> StudyResult:
    """Sweep, select hyperparameters, final runs, report (see the module docstring)."""
    say = say or (lambda message: print(message, flush=True))
    started = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    runs = sweep_runs(study)
    before = len(read_results(out))
    rows = run_all(runs, out, runs_dir, jobs=jobs, say=say) if runs else read_results(out)
    chosen, _ = select_hyperparameters(planned_rows(rows, runs))
    for setting in study.settings:
        for optimizer in [o for o in study.sweep if o in {m.optimizer for m in study.methods}]:
            hyper = chosen.get((setting.name, optimizer))
            say(f"chosen for {setting.name}: {optimizer} {hyper}" if hyper else
                f"warning: no finished sweep run of {optimizer} on {setting.name}; its final "
                f"runs use the library default")
    rows = run_all(final_runs(study, chosen), out, runs_dir, jobs=jobs, say=say)
    return write_study_report(study, rows, out, command=command,
                              wall_seconds=time.perf_counter() - started,
                              new_runs=len(rows) - before)


def build_parser() -> ArgumentParser:
    p = ArgumentParser(prog="flatness_study", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=None,
                   help=f"output directory (default {DEFAULT_OUT}; with --quick {QUICK_OUT})")
    p.add_argument("--runs-dir", type=Path, default=None,
                   help=f"where checkpoints go (default {DEFAULT_RUNS}; with --quick "
                        f"OUT/runs)")
    p.add_argument("--quick", action="store_true",
                   help="smoke test: one setting, 4 epochs, 1 seed, 2-point sweep (< 2 min)")
    p.add_argument("--seeds", type=int, default=None,
                   help="number of seeds of the final runs (default 3; 1 with --quick)")
    p.add_argument("--settings", nargs="+", default=None, metavar="NAME",
                   help="only these settings (default: all)")
    p.add_argument("--jobs", type=int, default=1,
                   help="runs in parallel, one CPU thread each (default 1)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    seeds = args.seeds if args.seeds is not None else (1 if args.quick else 3)
    if seeds < 1 or args.jobs < 1:
        raise FlatlabError("--seeds and --jobs must be >= 1")
    study = quick_config(seeds) if args.quick else full_config(seeds)
    if args.settings:
        known = {s.name: s for s in study.settings}
        unknown = [n for n in args.settings if n not in known]
        if unknown:
            raise FlatlabError(f"unknown setting(s) {', '.join(unknown)}; choose from "
                               f"{', '.join(known)}")
        study = replace(study, settings=tuple(known[n] for n in args.settings))
    out = args.out or (QUICK_OUT if args.quick else DEFAULT_OUT)
    runs_dir = args.runs_dir or (out / "runs" if args.quick else DEFAULT_RUNS)
    command = "python benchmarks/flatness_study.py" + (" " + shlex.join(argv) if argv else "")
    torch.set_num_threads(1)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    result = run_study(study, out, runs_dir, jobs=args.jobs, command=command)
    if not result.comparison.empty:
        from flatlab.report import markdown_table

        table = comparison_table(result.comparison).drop(columns="paper")
        print(markdown_table(table.astype(str)))
    index = result.index
    print(f"report: {index} (also {index.with_name('report.md')}, {out / RESULTS_CSV})")
    return 0


if __name__ == "__main__":
    raise SystemExit(run_cli(main, prog="flatness_study"))
