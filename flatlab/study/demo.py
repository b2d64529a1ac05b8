"""The demo preset: train SGD, SAM and NSO on MNIST-1D, analyse them together, write the report.

    python -m flatlab.demo [--out reports/demo] [--epochs N] [--quick]
    python -m flatlab.study demo [...]            # the same

The three runs share everything (data, MLP, learning rate, schedule, seed) except the optimizer:
SGD with momentum, SAM (rho 0.05) and NSO (sigma 0.02 absolute noise, the top of the
paper's sweep range; one two-sided perturbation: 2 gradient evaluations per step, like SAM).
The MLP overfits MNIST-1D (train ~96%, test ~65%), which leaves room for flatness to matter.
The runs go to ``OUT/runs/{sgd,sam,nso}`` (trained by the study runner's
:func:`~flatlab.study.runner.train_or_resume`); then each is analysed on the same 1000 training
samples (Hessian trace, top-5 eigenvalues, spectral density, 1-D and 2-D loss slices, SGD -> NSO
interpolation) and ``OUT/index.html`` / ``OUT/report.md`` compare them against SGD.
``--quick`` trains 5 epochs and analyses 256 samples with small budgets (a smoke test, not a
result).

Re-running into the same ``OUT`` reuses every finished run whose configuration matches, resumes
an interrupted one, and refuses (exit 2, nothing touched) where ``OUT/runs/NAME`` holds a run
with a different configuration.
"""

from __future__ import annotations

import argparse
import shlex
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from flatlab.analyze import AnalyzeOptions, analyze, write_outputs
from flatlab.errors import ArgumentParser, FlatlabError
from flatlab.report import write_report
from flatlab.study.runner import train_or_resume
from flatlab.train import TrainConfig

NAME = "demo"
DEFAULT_OUT = "reports/demo"
DEFAULT_EPOCHS = 40
QUICK_EPOCHS = 5
BASELINE = "sgd"
DESCRIPTION = ("Train SGD, SAM and NSO on MNIST-1D, analyse their Hessians and loss "
               "landscapes, and write an HTML/Markdown report.")
# name -> optimizer settings; everything else is shared (see demo_configs)
METHODS: dict[str, dict] = {
    "sgd": {"optimizer": "sgd"},
    "sam": {"optimizer": "sam", "rho": 0.05},
    "nso": {"optimizer": "nso", "sigma": 0.02, "num_perturbs": 1},
}
SHARED = {"dataset": "mnist1d", "model": "mlp", "batch_size": 128, "lr": 0.05, "momentum": 0.9,
          "weight_decay": 5e-4, "schedule": "cosine", "seed": 0, "device": "cpu"}


def demo_configs(out: str | Path, *, epochs: int) -> dict[str, TrainConfig]:
    """The three :class:`~flatlab.train.TrainConfig` objects, keyed by run name."""
    return {name: TrainConfig(**SHARED, **method, epochs=epochs,
                              out=str(Path(out) / "runs" / name)).validate()
            for name, method in METHODS.items()}


def analysis_options(*, quick: bool, command: str | None = None,
                     progress: bool = True) -> AnalyzeOptions:
    """What the demo measures (smaller budgets with ``quick``)."""
    options = AnalyzeOptions(trace=True, eigenvalues=5, density=True, landscape=("1d", "2d"),
                             samples=1000, seed=0, trace_matvecs=100,
                             interpolate=(BASELINE, "nso"), device="cpu", progress=progress,
                             command=command)
    if quick:
        options.samples, options.eigenvalues, options.trace_matvecs = 256, 3, 20
        options.grid_points, options.density_runs, options.density_steps = 5, 2, 16
    options.validate()
    return options


def analyze_command(run_dirs: Sequence[str], options: AnalyzeOptions, out: str | Path) -> str:
    """The ``python -m flatlab.analyze`` command that computes the same analysis."""
    args = [*run_dirs, "--trace", "--eigenvalues", str(options.eigenvalues)]
    args += ["--density"] if options.density else []
    if (options.density_runs, options.density_steps) != (4, 64):
        args += ["--density-runs", str(options.density_runs),
                 "--density-steps", str(options.density_steps)]
    for kind in options.landscape:
        args += ["--landscape", kind]
    if options.grid_points is not None:
        args += ["--grid-points", str(options.grid_points)]
    args += ["--trace-matvecs", str(options.trace_matvecs), "--samples", str(options.samples),
             "--seed", str(options.seed), "--device", options.device,
             "--interpolate", *options.interpolate, "--out", str(out), "--baseline", BASELINE]
    return "python -m flatlab.analyze " + shlex.join(args)


def run_demo(out: str | Path = DEFAULT_OUT, *, epochs: int | None = None, quick: bool = False,
             progress: bool = True, command: str | None = None) -> Path:
    """Train (or reuse) the three runs, analyse them, write the report; return index.html."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise FlatlabError(f"--out {str(out)!r} exists and is not a directory")
    epochs = epochs or (QUICK_EPOCHS if quick else DEFAULT_EPOCHS)
    configs = demo_configs(out, epochs=epochs)
    command = command or "python -m flatlab.demo " + shlex.join(
        ["--out", str(out), "--epochs", str(epochs)] + (["--quick"] if quick else []))
    started = time.perf_counter()
    for name, config in configs.items():
        _say(f"[{time.perf_counter() - started:5.0f} s] {name}: {config.epochs} epochs in "
             f"{config.out}")
        outcome = train_or_resume(config, progress=progress)
        _say(f"[{time.perf_counter() - started:5.0f} s] {name}: {outcome.status}")
    run_dirs = [config.out for config in configs.values()]
    options = analysis_options(quick=quick, progress=progress)
    options.command = analyze_command(run_dirs, options, out)
    _say(f"[{time.perf_counter() - started:5.0f} s] analysing {', '.join(configs)} on "
         f"{options.samples} training samples")
    analysis = analyze(run_dirs, options)  # one CPU thread: the MLP is small
    write_outputs(analysis, out, figures=False)  # analysis.json, summary.csv; the report draws
    index = write_report(analysis, out, baseline=BASELINE, command=command,
                         title="flatlab demo: SGD vs SAM vs NSO on MNIST-1D")
    _say(f"[{time.perf_counter() - started:5.0f} s] done")
    return index


def _say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def configure(parser: argparse.ArgumentParser) -> None:
    """The demo's flags (``python -m flatlab.demo`` and ``python -m flatlab.study demo``)."""
    parser.add_argument("--out", default=DEFAULT_OUT, metavar="DIR",
                        help=f"report directory; runs go to DIR/runs/ (default {DEFAULT_OUT})")
    parser.add_argument("--epochs", type=int, default=None, metavar="N",
                        help=f"epochs per run (default {DEFAULT_EPOCHS}, {QUICK_EPOCHS} with "
                             f"--quick)")
    parser.add_argument("--quick", action="store_true",
                        help="smoke test: few epochs, small analysis budgets")
    parser.add_argument("--no-progress", action="store_true")


def run(args: argparse.Namespace, argv: Sequence[str]) -> int:
    """Run the demo for parsed ``args`` (``argv``: the flags, shown in the report's command)."""
    if args.epochs is not None and args.epochs < 1:
        raise FlatlabError(f"--epochs must be a positive integer, got {args.epochs}")
    shown = [arg for arg in argv if arg != "--no-progress"]  # does not change the output
    command = "python -m flatlab.demo" + (" " + shlex.join(shown) if shown else "")
    index = run_demo(args.out, epochs=args.epochs, quick=args.quick,
                     progress=not args.no_progress, command=command)
    print(f"report: {index} (also {index.with_name('report.md')})")
    return 0


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(prog="flatlab.demo", description=DESCRIPTION)
    parser.add_version()
    configure(parser)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    return run(build_parser().parse_args(argv), argv)

