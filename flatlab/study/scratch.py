"""The scratch study: does NSO find flatter minima than SGD, SAM, ASAM and RWP, training small
networks from scratch on CPU-sized real data?

    python -m flatlab.study scratch [--quick] [--jobs N] [--shard I/N] [--out DIR]

Settings (all offline): MNIST-1D with an MLP and with a 1-D CNN, scikit-learn digits with a
small 2-D CNN. Methods: SGD, SAM, ASAM, RWP, NSO with k = 1 and NSO with k = 2 (k=2 uses the σ
chosen for k=1), NSO k=1 with filter-relative noise (its own σ sweep), each at E epochs and at
the gradient budget of SAM at E epochs (see
:mod:`flatlab.study.plan`). Learning rate 0.05 (cosine), momentum 0.9, weight decay 5e-4,
batch 128 shared; ρ and σ swept per setting on a validation split with seed 0 (grids in
:data:`SWEEP`); final runs with seeds 0, 1, 2; trace (Hutch++, 100 products) and λ1 (Lanczos)
of the full Hessian on 1000 training examples; paired t tests over seeds
(:mod:`flatlab.study.statistics`).
"""

from __future__ import annotations

import argparse
import os
import shlex
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

import torch

from flatlab.errors import FlatlabError
from flatlab.reporting.page import markdown_table
from flatlab.study.pipeline import run_study
from flatlab.study.plan import Method, Setting, Shard, StudyConfig, add_study_flags
from flatlab.study.report import comparison_table
from flatlab.study.runner import RESULTS_CSV

NAME = "scratch"
DESCRIPTION = "NSO vs SGD, SAM, ASAM and RWP trained from scratch on MNIST-1D and digits."
TITLE = "Flatness study: does NSO find flatter minima than SGD, SAM, ASAM and RWP?"
DEFAULT_OUT = Path("reports/scratch")
DEFAULT_RUNS = Path("runs/study-scratch")
QUICK_OUT = Path("runs/study-scratch-quick")

METHODS: tuple[Method, ...] = (
    Method("sgd", "sgd"), Method("sam", "sam"), Method("asam", "asam"), Method("rwp", "rwp"),
    Method("nso k=1", "nso", 1, baseline=False), Method("nso k=2", "nso", 2, baseline=False),
)
# NSO with RWP's filter-relative noise, swept on its own grid (the committed study's 7th arm)
NSO_FILTER = Method("nso-filter k=1", "nso", 1, baseline=False, sweep="nso-filter",
                    train_args={"noise": "filter"})
SWEEP: dict[str, tuple[str, tuple[float, ...]]] = {
    # SAM/ASAM grids were widened twice where the sweep kept choosing an edge value
    "sam": ("rho", (0.02, 0.05, 0.1, 0.2, 0.5, 1.0)),
    "asam": ("rho", (0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0)),
    "rwp": ("sigma", (0.01, 0.02, 0.05, 0.1)),   # filter-relative noise (RWP's default)
    # geometric, ratio <= 1.5 (sigma^2/2 tr H: x2.25 per step at most)
    "nso": ("sigma", (0.005, 0.0075, 0.01, 0.015, 0.02, 0.03, 0.045, 0.0675, 0.1)),  # absolute
    "nso-filter": ("sigma", (0.002, 0.003, 0.0045, 0.00675, 0.01, 0.015, 0.0225, 0.034,
                             0.05)),   # filter-relative: std sigma x ||filter||
}
SETTINGS = (Setting("mnist1d-mlp", "mnist1d", "mlp", epochs=60),
            Setting("mnist1d-cnn1d", "mnist1d", "cnn1d", epochs=60),
            Setting("digits-cnn", "digits", "cnn", epochs=40))


def full_config(seeds: int = 3) -> StudyConfig:
    """The committed study: about 10 minutes on 2 idle CPU cores with ``--jobs 2``."""
    return StudyConfig(settings=SETTINGS, seeds=tuple(range(seeds)), sweep=SWEEP,
                       methods=(*METHODS, NSO_FILTER))


def quick_config(seeds: int = 1) -> StudyConfig:
    """Smoke test: one setting, 4 epochs, a 2-point sweep, smaller analysis budgets."""
    return StudyConfig(
        settings=(Setting("mnist1d-mlp", "mnist1d", "mlp", epochs=4),),
        seeds=tuple(range(seeds)), methods=METHODS,
        sweep={name: (arg, (values[0], values[-2])) for name, (arg, values) in SWEEP.items()},
        samples=256, trace_matvecs=30, landscape=())


def configure(parser: argparse.ArgumentParser) -> None:
    """The scratch study's flags."""
    add_study_flags(parser, default_out=DEFAULT_OUT, quick_out=QUICK_OUT,
                    default_runs=DEFAULT_RUNS,
                    quick_help="smoke test: one setting, 4 epochs, 1 seed, 2-point sweep",
                    seeds_help="number of seeds of the final runs (default 3; 1 with --quick)")
    parser.add_argument("--shard", type=Shard.parse, default=None, metavar="I/N",
                        help="run only the I-th of N parts of the plan (1 <= I <= N; "
                             "partitioned by run key) and write no report; a later invocation "
                             "without --shard aggregates all shards' runs")


def study_config(args: argparse.Namespace) -> StudyConfig:
    """The plan the parsed flags ask for."""
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
    return study


def run(args: argparse.Namespace, argv: Sequence[str]) -> int:
    """Run the study for parsed ``args``; print the comparison table and where the report is."""
    study = study_config(args)
    out = args.out or (QUICK_OUT if args.quick else DEFAULT_OUT)
    runs_dir = args.runs_dir or (out / "runs" if args.quick else DEFAULT_RUNS)
    command = "python -m flatlab.study scratch" + (" " + shlex.join(argv) if argv else "")
    torch.set_num_threads(1)
    os.environ.setdefault("OMP_NUM_THREADS", "1")  # inherited by the spawned workers
    result = run_study(study, out, runs_dir, title=TITLE, jobs=args.jobs, shard=args.shard,
                       command=command)
    if result is None:
        return 0
    if not result.comparison.empty:
        print(markdown_table(comparison_table(result.comparison).drop(columns="paper")))
    print(f"report: {result.index} (also {result.index.with_name('report.md')}, "
          f"{out / RESULTS_CSV})")
    return 0
