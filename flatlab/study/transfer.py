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
32, E = 30 epochs, StepLR(10, 0.1) (stretched with the run: 2E -> every 20, E/2 -> every 5
epochs), ``--keep best`` (best validation accuracy; ties lower loss). The learning rate is
chosen once per setting on validation from {3e-4, 1e-3, 3e-3} with plain Adam (2 seeds) and
shared by every arm. ρ and σ are swept on the validation split (geometric grids of ratio 1.5,
:data:`SWEEP`), chosen by validation accuracy of the best-validation checkpoint averaged over
2 seeds; the final runs use 5 seeds shared across arms.

BatchNorm: flatlab's optimizers get ``model=``, so the running statistics keep the values of
the *first* pass of each step: SAM, ASAM and RWP take a clean pass at W first (statistics at
W); NSO with clean weight 0 has no pass at W, so its statistics come from ``W + U_1`` (the
official code spends one extra pass at W with weight 0 to get W's statistics). flatlab does not
spend that pass; the difference is the running average of per-batch statistics at ``W + U``
instead of ``W``; it is reported as a deviation from the official protocol.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import hashlib
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
    key_config,
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
    train_or_resume,
)
from flatlab.study.statistics import select_hyperparameters
from flatlab.study.transfer_measure import MEASURE_COLUMNS, measure, write_backbone
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
    Method("nso", "nso", 1, baseline=False),
    Method("nso-filter", "nso", 1, baseline=False, sweep="nso-filter",
           train_args={"noise": "filter"}),
    Method("nso k=2", "nso", 2, baseline=False),
)
LEARNING_RATES = (3e-4, 1e-3, 3e-3)


def geometric(start: float, count: int, ratio: float = 1.5) -> tuple[float, ...]:
    """``start * ratio**i`` for ``i < count``, rounded to 3 significant digits."""
    return tuple(float(f"{start * ratio ** i:.3g}") for i in range(count))


# Four or five values each (compute on 2 shared CPU cores): ratio 1.5 over a narrow window.
SWEEP: dict[str, tuple[str, tuple[float, ...]]] = {
    "sam": ("rho", geometric(0.005, 5)),           # 0.005 ... 0.0253 (paper: mostly 0.01)
    "asam": ("rho", geometric(0.05, 4)),           # 0.05 ... 0.169
    "rwp": ("sigma", geometric(0.003, 4)),         # filter-relative, 0.003 ... 0.0101
    "nso": ("sigma", geometric(0.003, 4)),         # absolute, 0.003 ... 0.0101 (paper 0.008-0.012)
    "nso-filter": ("sigma", geometric(0.002, 4)),  # filter-relative, 0.002 ... 0.00675
}
# lambda_paper's power iteration per batch: the official maximum of 100 iterations and the
# stopping tolerance 1e-3 of one version of the official file (the other uses 1e-8)
PAPER_MAX_ITER, PAPER_TOL = 100, 1e-3
SWEEP_TRACE_MATVECS = 20  # sweep runs: Hutch++ products for the Pareto plots
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
# The source task of each setting: TrainConfig fields of its one pretraining run.
SOURCES: dict[str, dict] = {
    "mnist1d-cnn1d-bn": {"dataset_kwargs": {"classes": [0, 1, 2, 3, 4], "num_samples": 25000,
                                            "generation_seed": 7}, "epochs": 10},
    "digits-resnet8": {"dataset_kwargs": {"classes": [0, 1, 2, 3, 4]}, "epochs": 30},
}
PRETRAIN = {"optimizer": "sgd", "base_optimizer": "adam", "lr": 1e-3, "weight_decay": 0.0,
            "batch_size": 64, "schedule": "cosine", "seed": 0, "device": "cpu"}


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
                       schedule="step", samples=1000, trace_matvecs=50, eigen_tol=1e-3,
                       landscape=(),
                       train_args=PROTOCOL, sweep_seeds=(0, 1), final_validation=True)


# --------------------------------------------------------------------------- pretraining


def pretrain_config(setting: Setting, runs_dir: Path, *, epochs: int | None = None
                    ) -> TrainConfig:
    """The source model's run: the setting's data set and model on the source classes."""
    source = SOURCES[setting.name]
    fields = dict(PRETRAIN, dataset=setting.dataset, dataset_kwargs=source["dataset_kwargs"],
                  model=setting.model, model_kwargs=dict(setting.model_kwargs),
                  epochs=epochs or source["epochs"])
    key = hashlib.sha256(json.dumps(key_config(fields), sort_keys=True,
                                    default=str).encode()).hexdigest()[:8]
    return TrainConfig(**fields, out=str(runs_dir / setting.name / f"pretrain-{key}")).validate()


def pretrain(config: TrainConfig) -> dict:
    """Train (or reuse) a source model, write its head-less ``backbone.safetensors`` beside
    it; return ``{"backbone", "test_acc", "seconds", "status"}``."""
    run_dir = Path(config.out)
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    with open(run_dir.with_name(run_dir.name + ".log"), "a", encoding="utf-8") as log, \
            contextlib.redirect_stdout(log):
        outcome = train_or_resume(config, progress=False)
    backbone = backbone_path(config)
    if not backbone.is_file():
        write_backbone(outcome.checkpoint, backbone)
    last = outcome.metrics[-1]
    return {"backbone": str(backbone), "test_acc": float(last["test_acc"]),
            "seconds": float(last["seconds"]), "status": outcome.status}


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


def backbone_path(config: TrainConfig) -> Path:
    """Where :func:`pretrain` writes the head-less weights of the source run ``config``."""
    run_dir = Path(config.out)
    return run_dir.with_name(run_dir.name + "-backbone.safetensors")


# --------------------------------------------------------------------------- CLI preset


def configure(parser: argparse.ArgumentParser) -> None:
    """The transfer study's flags."""
    add_study_flags(parser, default_out=DEFAULT_OUT, quick_out=QUICK_OUT,
                    default_runs=DEFAULT_RUNS,
                    quick_help="smoke test: one setting, 4 epochs, 2 seeds, 2-point sweeps",
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
    if args.quick:
        settings = tuple(replace(s, epochs=4) for s in settings)
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
                                  wall_seconds=time.perf_counter() - started)
    print(f"report: {index} (also {index.with_name('report.md')}, {out / 'results.csv'})")
    return 0
