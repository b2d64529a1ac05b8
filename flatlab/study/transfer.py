"""The transfer study: the paper's own setting, scaled to CPU. Pretrain on a source task, then
fine-tune every layer plus a new head on a related target task with Adam, NSO, SAM, ASAM, RWP.

    python -m flatlab.study transfer [--quick] [--jobs N] [--shard I/N] [--out DIR]

Settings (offline, five classes each side, labels relabelled 0..4):

* ``mnist1d-cnn1d-bn``: source = classes 0-4 of a fresh MNIST-1D generation (25,000 samples,
  generation seed 7, ~10,000 training examples); target = classes 5-9 of the standard split
  (generation seed 42), the first 750 training examples of those classes, of which 1/3 (250)
  are the validation split and 500 the training split; test = the standard test set's classes
  5-9 (~490). Model: ``cnn1d`` widened to 64 channels with BatchNorm (``norm="batch"``).
* ``digits-resnet8``: scikit-learn digits, source = classes 0-4 of the training split, target =
  classes 5-9 (20% of its ~716 training examples held out for validation); ``resnet`` depth 8.

Pretraining (:data:`SOURCES`): one source model per setting, plain Adam, cosine schedule;
its weights minus the head become ``backbone.safetensors``, and every fine-tuning run starts
from it (``--init-from`` + ``--init-partial``: a new, seed-initialised head; see
:mod:`flatlab.study.transfer_measure`).

Protocol (the paper's official code): base Adam with ``amsgrad=True``, weight decay 0, batch
32, E = 30 epochs, StepLR(10, 0.1) (stretched with the run: 2E -> every 20 epochs),
``--keep best`` (best validation accuracy; ties lower loss). The learning rate is chosen once
per setting on validation from {3e-4, 1e-3, 3e-3} with plain Adam (2 seeds) and shared by
every arm. ρ and σ are swept on the validation split (geometric grids of ratio 1.5 over a
factor of about 40, :data:`SWEEP`), chosen by validation accuracy of the best-validation
checkpoint averaged over 2 seeds; the final runs use 5 seeds shared across arms.

BatchNorm statistics at W: flatlab's optimizers get ``model=``, so the running statistics keep
the values of the *first* pass of each step. SAM, ASAM and RWP take their clean pass at W
first; NSO runs with ``clean_pass=True`` (``--clean-pass``), a pass at W whose gradient has
weight 0, as the official code does. That pass is counted: NSO k=1 makes 3 passes per step,
k=2 5, so the "same gradient evaluations" arms (SAM's 2 passes x E) are NSO k=1 at 20 epochs
and k=2 at 12 (the issue's "E/2" assumed 4 passes for k=2).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import shlex
import time
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path

import pandas as pd
import torch

from flatlab.data import Dataset, load_dataset
from flatlab.errors import FlatlabError
from flatlab.study.plan import (
    Method,
    RunSpec,
    Setting,
    Shard,
    StudyConfig,
    add_study_flags,
)
from flatlab.study.plan import final_runs as plan_final_runs
from flatlab.study.plan import sweep_runs as plan_sweep_runs
from flatlab.study.runner import (
    RESULT_COLUMNS,
    planned_rows,
    pool_map,
    read_metrics,
    read_results,
    run_all,
    train_logged,
)
from flatlab.study.statistics import select_hyperparameters
from flatlab.study.transfer_measure import (
    MEASURE_COLUMNS,
    backbone_path,
    measure,
    pretrain,
    pretrain_config,
)
from flatlab.train import TrainConfig

NAME = "transfer"
DESCRIPTION = ("The paper's setting on CPU: pretrain, then fine-tune with Adam, NSO, SAM, ASAM, "
               "RWP on MNIST-1D and digits; the paper's metrics next to full-Hessian ones.")
TITLE = "Transfer study: does NSO fine-tune to flatter minima than SAM, ASAM, RWP and Adam?"
DEFAULT_OUT = Path("reports/transfer")
DEFAULT_RUNS = Path("runs/study-transfer")
QUICK_OUT = Path("runs/study-transfer-quick")
COLUMNS = (*RESULT_COLUMNS, *(c for c in MEASURE_COLUMNS if c not in RESULT_COLUMNS),
           "lr")

ADAM = Method("adam", "sgd")  # "sgd" = the base optimizer alone, here Adam
METHODS: tuple[Method, ...] = (
    ADAM, Method("sam", "sam"), Method("asam", "asam"), Method("rwp", "rwp"),
    Method("nso", "nso", 1, baseline=False, train_args={"clean_pass": True}),
    Method("nso-filter", "nso", 1, baseline=False, sweep="nso-filter",
           train_args={"noise": "filter", "clean_pass": True}),
    Method("nso k=2", "nso", 2, baseline=False, train_args={"clean_pass": True}),
)
LEARNING_RATES = (3e-4, 1e-3, 3e-3)


def geometric(start: float, count: int, ratio: float = 1.5) -> tuple[float, ...]:
    """``start * ratio**i`` for ``i < count``, rounded to 3 significant digits."""
    return tuple(float(f"{start * ratio ** i:.3g}") for i in range(count))


# Ten values each, ratio 1.5: a factor of 38 from the small end the issue names, so that
# validation accuracy can fall off on both sides of the chosen value (the report checks it).
SWEEP: dict[str, tuple[str, tuple[float, ...]]] = {
    "sam": ("rho", geometric(0.005, 10)),           # 0.005 ... 0.192 (paper: mostly 0.01)
    "asam": ("rho", geometric(0.05, 10)),           # 0.05 ... 1.92 (ASAM paper: 0.5-2)
    "rwp": ("sigma", geometric(0.002, 10)),         # filter-relative, 0.002 ... 0.0769
    "nso": ("sigma", geometric(0.002, 10)),         # absolute, 0.002 ... 0.0769 (paper ~0.01)
    "nso-filter": ("sigma", geometric(0.002, 10)),  # filter-relative, 0.002 ... 0.0769
}
# lambda_paper's power iteration per batch: the official maximum of 100 iterations and the
# stopping tolerance 1e-3 of one version of the official file (the other uses 1e-8)
PAPER_MAX_ITER, PAPER_TOL = 100, 1e-3
# Hutch++ products: the estimator's standard error is small next to the spread over seeds
# (full run of 2026-11-30 with 100 products: median trace_se / trace 1.1%, max 3.5%; the
# trace's coefficient of variation over 5 seeds 3-135%), so finals take 50, sweeps 10
SWEEP_TRACE_MATVECS = 10  # sweep runs: Hutch++ products for the Pareto plots
PROTOCOL = {"base_optimizer": "adam", "base_kwargs": {"amsgrad": True}, "keep": "best",
            "schedule": "step", "step_every": 10, "gamma": 0.1}
MNIST1D_TARGET = {"classes": [5, 6, 7, 8, 9], "train_size": 750}
SETTINGS = (
    Setting("mnist1d-cnn1d-bn", "mnist1d", "cnn1d", epochs=30, dataset_kwargs=MNIST1D_TARGET,
            model_kwargs={"channels": 64, "norm": "batch"}),
    Setting("digits-resnet8", "digits", "resnet", epochs=30,
            dataset_kwargs={"classes": [5, 6, 7, 8, 9]}, model_kwargs={"depth": 8}),
)
VALIDATION = {"mnist1d-cnn1d-bn": 1 / 3, "digits-resnet8": 0.2}
def study_config(settings: Sequence[Setting], *, quick: bool = False, seeds: int = 5,
                 methods: Sequence[Method] = METHODS) -> StudyConfig:
    """The fine-tuning plan: protocol fields shared, validation held out in every run.
    ``quick``: one grid value per baseline, two for NSO, one sweep seed, small budgets."""
    if quick:
        sweep = {name: (arg, (values[1], values[-1]) if name == "nso" else (values[1],))
                 for name, (arg, values) in SWEEP.items()}
        return StudyConfig(settings=tuple(settings), seeds=tuple(range(seeds)), sweep=sweep,
                           methods=tuple(methods), batch_size=32, lr=1e-3, weight_decay=0.0,
                           schedule="step", samples=128, trace_matvecs=12, landscape=(),
                           train_args=PROTOCOL, sweep_seeds=(0,), final_validation=True)
    return StudyConfig(settings=tuple(settings), seeds=tuple(range(seeds)), sweep=SWEEP,
                       methods=tuple(methods), batch_size=32, lr=1e-3, weight_decay=0.0,
                       schedule="step", samples=1000, trace_matvecs=50, eigen_tol=1e-4,
                       landscape=(),
                       train_args=PROTOCOL, sweep_seeds=(0, 1), final_validation=True)


# --------------------------------------------------------------------------- one run


@functools.lru_cache(maxsize=8)
def _dataset(name: str, seed: int, kwargs_json: str) -> Dataset:
    return load_dataset(name, seed=seed, **json.loads(kwargs_json))


def splits(config: TrainConfig) -> tuple[Dataset, Dataset]:
    """The run's data (training split with validation held out) and the real test split."""
    kwargs = dict(config.dataset_kwargs)
    train = _dataset(config.dataset, config.data_seed, json.dumps(kwargs, sort_keys=True))
    for key in ("validation_fraction", "validation_seed"):
        kwargs.pop(key, None)
    test = _dataset(config.dataset, config.data_seed, json.dumps(kwargs, sort_keys=True))
    return train, test


def execute(run: RunSpec, runs_dir: Path, out: Path) -> dict:
    """Fine-tune ``run`` (or reuse it) and measure it: sweep runs cheaply (loss, trace, test
    accuracy), final runs fully (:func:`~flatlab.study.transfer_measure.measure`). The row's
    ``test_acc``/``test_loss`` are the best-validation checkpoint's validation numbers for a
    sweep run (what selection reads) and its test numbers for a final run."""
    run_dir = runs_dir / run.run_name
    config, row, outcome = train_logged(run, runs_dir)
    row["lr"] = config.lr
    if outcome is None:
        return row
    metrics = read_metrics(run_dir / "metrics.csv")
    last = metrics[-1]
    best = max(metrics, key=lambda m: (m["val_acc"], -m["val_loss"]))
    row.update(status="ok", grad_evals=int(last["grad_evals"]),
               steps=int(last["grad_evals"]) // run.variant.passes,
               train_seconds=float(last["seconds"]), train_loss=float(last["train_loss"]),
               train_acc=float(last["train_acc"]), val_acc_best=float(best["val_acc"]))
    train, test = splits(config)
    started = time.perf_counter()
    noise = config.noise or ("absolute" if config.optimizer == "nso" else "filter")
    measured = measure(run_dir / "best.safetensors", outcome.checkpoint,
                       Path(config.init_from), train, test, samples=run.analysis["samples"]
                       if run.analysis else 1000,
                       trace_matvecs=run.analysis["trace_matvecs"] if run.analysis
                       else SWEEP_TRACE_MATVECS,
                       eigen_tol=run.analysis["eigen_tol"] if run.analysis else 1e-4,
                       paper_max_iter=run.analysis["paper_max_iter"] if run.analysis else 1,
                       paper_tol=run.analysis["paper_tol"] if run.analysis else PAPER_TOL,
                       paper=run.analysis is not None,
                       sigma=config.sigma if config.optimizer in ("nso", "rwp") else None,
                       noise=noise)
    row.update(measured, analysis_seconds=round(time.perf_counter() - started, 3),
               trace_stderr=measured["trace_se"])
    if run.phase == "sweep":
        row.update(test_acc=float(best["val_acc"]), test_loss=float(best["val_loss"]))
    else:
        row.update(test_acc=measured["test_acc_best"], analysis_loss=measured["train_loss_at_w"],
                   lambda_1=measured["lambda1"],
                   lambda_1_residual=measured["lambda1_residual"])
    return row


# --------------------------------------------------------------------------- the pipeline


def stage_settings(settings: Sequence[Setting], backbones: dict[str, str],
                   lrs: dict[str, float] | None = None) -> tuple[Setting, ...]:
    """Settings with their backbone (and chosen learning rate) as per-setting train args."""
    out = []
    for s in settings:
        args = {"init_from": backbones[s.name], "init_partial": True}
        if lrs is not None:
            args["lr"] = lrs[s.name]
        out.append(replace(s, train_args=args))
    return tuple(out)


def per_setting(study: StudyConfig, setting: Setting) -> StudyConfig:
    return replace(study, settings=(setting,), validation_fraction=VALIDATION[setting.name])


def planned(study: StudyConfig, stage: str, chosen: dict | None = None) -> list[RunSpec]:
    """Sweep (``chosen is None``) or final runs, each setting with its validation fraction."""
    runs: list[RunSpec] = []
    for setting in study.settings:
        one = per_setting(study, setting)
        runs += plan_sweep_runs(one) if stage == "sweep" else plan_final_runs(one, chosen or {})
    max_iter = PAPER_MAX_ITER if study.samples >= 1000 else 10
    return [replace(run, analysis=dict(run.analysis, paper_max_iter=max_iter,
                                       paper_tol=PAPER_TOL))
            if run.analysis else run for run in runs]


def lr_study(study: StudyConfig) -> StudyConfig:
    """Stage 1: plain Adam swept over :data:`LEARNING_RATES`."""
    return replace(study, methods=(ADAM,), sweep={ADAM.sweep_name: ("lr", LEARNING_RATES)})


def run_transfer(study: StudyConfig, out: Path, runs_dir: Path, *, jobs: int = 1,
                 shard: Shard | None = None, pretrain_epochs: int | None = None,
                 run: bool = True, say: Callable[[str], None] = print) -> dict | None:
    """Pretrain, choose lr, sweep, choose ρ/σ, final runs; each setting goes as far as its
    previous stage is complete (other shards may still be running it). ``run=False`` runs
    nothing and plans from what ``results.csv`` has (the report of a partial study).
    Returns what the report needs; ``None`` for a shard."""
    out.mkdir(parents=True, exist_ok=True)
    configs = [pretrain_config(s, runs_dir, epochs=pretrain_epochs) for s in study.settings]
    if not run:
        configs = [c for c in configs if backbone_path(c).is_file()]
    sources = {}
    for config, result in pool_map(pretrain, configs, jobs=jobs):
        name = Path(config.out).parent.name
        sources[name] = dict(result, run=config.out, epochs=config.epochs)
        say(f"pretrained {name}: source test acc {100 * result['test_acc']:.2f}% "
            f"({result['status']})")
    sources = {s.name: sources[s.name] for s in study.settings if s.name in sources}  # plan order
    backbones = {name: s["backbone"] for name, s in sources.items()}
    settings = tuple(s for s in study.settings if s.name in sources)

    def stage(runs: list[RunSpec]) -> pd.DataFrame:
        if run:
            return run_all(runs, out, runs_dir, jobs=jobs, shard=shard, say=say,
                           execute=execute, columns=COLUMNS)
        return read_results(out, COLUMNS)

    def complete(rows: pd.DataFrame, runs: list[RunSpec], setting: Setting) -> pd.DataFrame | None:
        mine = [r for r in runs if r.setting.name == setting.name]
        done = planned_rows(rows, mine)
        return done if len(done) == len(mine) else None

    lr_runs = planned(lr_study(replace(study, settings=stage_settings(settings, backbones))),
                      "sweep")
    rows = stage(lr_runs)
    lrs = {}
    for setting in settings:
        done = complete(rows, lr_runs, setting)
        if done is not None:
            lrs[setting.name] = select_hyperparameters(done)[0][(setting.name,
                                                                 ADAM.sweep_name)]["lr"]
    say(f"learning rates: {lrs}")
    main = replace(study, settings=stage_settings([s for s in settings if s.name in lrs],
                                                  backbones, lrs))
    sweep = planned(main, "sweep")
    rows = stage(sweep)
    chosen: dict = {}
    swept = []
    for setting in main.settings:
        done = complete(rows, sweep, setting)
        if done is not None:
            chosen.update(select_hyperparameters(done)[0])
            swept.append(setting)
    for key, hyper in chosen.items():
        say(f"chosen for {key[0]}: {key[1]} {hyper}")
    final = planned(replace(main, settings=tuple(swept)), "final", chosen)
    rows = stage(final)
    if shard is not None:
        say(f"shard {shard} done; aggregate with the same command without --shard")
        return None
    missing = ([f"{s.name}: no pretrained model" for s in study.settings
                if s.name not in sources]
               + [f"{s.name}: learning-rate stage incomplete" for s in settings
                  if s.name not in lrs]
               + [f"{s.name}: sweep incomplete, no final runs" for s in main.settings
                  if s not in swept])
    return {"rows": rows, "lr_runs": lr_runs, "sweep": sweep, "final": final,
            "sources": sources, "lrs": lrs, "main": main, "missing": missing}


# --------------------------------------------------------------------------- CLI preset


def configure(parser: argparse.ArgumentParser) -> None:
    """The transfer study's flags."""
    add_study_flags(parser, default_out=DEFAULT_OUT, quick_out=QUICK_OUT,
                    default_runs=DEFAULT_RUNS,
                    quick_help="smoke test: one setting, 150 target examples, 15 epochs, "
                               "2 seeds, 1-2-point sweeps",
                    seeds_help="fine-tuning seeds of the final runs (default 5; 2 with --quick)")
    parser.add_argument("--arms", nargs="+", default=None, metavar="ARM",
                        help=f"only these arms (default all: "
                             f"{', '.join(m.label for m in METHODS)}); run keys do not depend "
                             f"on it, so a later run with more arms reuses these runs")
    parser.add_argument("--report-only", action="store_true",
                        help="run nothing: write the report from what OUT/results.csv has "
                             "(a partial study shows the settings and stages it finished)")
    parser.add_argument("--shard", type=Shard.parse, default=None, metavar="I/N",
                        help="run only the I-th of N parts of each stage (by run key) and "
                             "write no report; a later invocation without --shard aggregates")


def run(args: argparse.Namespace, argv: Sequence[str]) -> int:
    """Run the study for parsed ``args``; print where the report is."""
    from flatlab.study.transfer_report import write_transfer_report  # noqa: PLC0415

    seeds = args.seeds if args.seeds is not None else (2 if args.quick else 5)
    if seeds < 1 or args.jobs < 1:
        raise FlatlabError("--seeds and --jobs must be >= 1")
    settings = SETTINGS
    if args.settings:
        known = {s.name: s for s in SETTINGS}
        unknown = [n for n in args.settings if n not in known]
        if unknown:
            raise FlatlabError(f"unknown setting(s) {', '.join(unknown)}; choose from "
                               f"{', '.join(known)}")
        settings = tuple(known[n] for n in args.settings)
    elif args.quick:
        settings = SETTINGS[:1]
    if args.quick:  # E = 15: the matched budgets of 3 and 5 passes per step are whole epochs
        settings = tuple(replace(s, epochs=15, dataset_kwargs={
            **s.dataset_kwargs, **({"train_size": 150} if "train_size" in s.dataset_kwargs
                                   else {})}) for s in settings)
    methods = METHODS
    if args.arms:
        known = {m.label: m for m in METHODS}
        unknown = [a for a in args.arms if a not in known]
        if unknown or ADAM.label not in args.arms:
            raise FlatlabError(f"--arms {' '.join(args.arms)}: choose from {', '.join(known)}, "
                               f"adam included (it chooses the learning rate)")
        methods = tuple(known[a] for a in args.arms)
    study = study_config(settings, quick=args.quick, seeds=seeds, methods=methods)
    out = args.out or (QUICK_OUT if args.quick else DEFAULT_OUT)
    runs_dir = args.runs_dir or (out / "runs" if args.quick else DEFAULT_RUNS)
    shown = [a for a in argv if a != "--report-only"]  # the command that makes these numbers
    command = "python -m flatlab.study transfer" + (" " + shlex.join(shown) if shown else "")
    torch.set_num_threads(1)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    started = time.perf_counter()
    result = run_transfer(study, out, runs_dir, jobs=args.jobs, shard=args.shard,
                          pretrain_epochs=2 if args.quick else None, run=not args.report_only)
    if result is None:
        return 0
    index = write_transfer_report(result, out, command=command,
                                  wall_seconds=None if args.report_only
                                  else time.perf_counter() - started)
    print(f"report: {index} (also {index.with_name('report.md')}, {out / 'results.csv'})")
    return 0
