"""``python -m flatlab.analyze``: the command line over :func:`flatlab.analysis.analyze`.

Every input (flags, files, names) is checked before anything is written; bad input is one
line on stderr and exit status 2 (:func:`flatlab.errors.run_cli`).
"""

from __future__ import annotations

import math
import shlex
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from flatlab import distributed, landscape
from flatlab.analysis.loading import default_out_dir, load_checkpoints
from flatlab.analysis.options import CHECKPOINT_CHOICES, LANDSCAPES, TRACE_METHODS, AnalyzeOptions
from flatlab.analysis.outputs import write_outputs
from flatlab.analysis.runner import analyze
from flatlab.errors import ArgumentParser, FlatlabError, run_cli
from flatlab.training.cli import parse_pair  # --model-arg/--dataset-arg: as train reads them

PROG = "flatlab.analyze"


def _samples(text: str) -> int | None:
    if text == "all":
        return None
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise FlatlabError(f"--samples must be a positive integer or 'all', got {text!r}")
    return value


def _int_at_least(minimum: int, flag: str) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise FlatlabError(f"{flag} must be an integer >= {minimum}, got {text!r}") from None
        if value < minimum:
            raise FlatlabError(f"{flag} must be an integer >= {minimum}, got {text!r}")
        return value
    return parse


def _positive_float(flag: str) -> Callable[[str], float]:
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            value = math.nan
        if not (math.isfinite(value) and value > 0):
            raise FlatlabError(f"{flag} must be a positive number, got {text!r}")
        return value
    return parse


def build_parser() -> ArgumentParser:
    p = ArgumentParser(
        prog=PROG,
        description="Hessian trace, top eigenvalues, spectral density and loss landscapes of "
                    "flatlab checkpoints. With none of --trace/--eigenvalues/--density/"
                    "--landscape/--paper-metrics: trace, top-5 eigenvalues, density and a 1-D "
                    "slice.")
    p.add_version()
    p.add_argument("checkpoints", nargs="+", metavar="CHECKPOINT_OR_RUN_DIR")
    what = p.add_argument_group("what to compute")
    what.add_argument("--trace", action="store_true", help="Hessian trace with standard error")
    what.add_argument("--eigenvalues", type=_int_at_least(1, "--eigenvalues"), metavar="K",
                      help="top-K Hessian eigenvalues (Lanczos)")
    what.add_argument("--density", action="store_true", help="spectral density (SLQ)")
    what.add_argument("--landscape", action="append", choices=LANDSCAPES,
                      help="loss slice along random filter-normalised directions "
                           "(repeat for both)")
    what.add_argument("--paper-metrics", action="store_true",
                      help="the paper's trace_paper (conv + head weights) and lambda_paper "
                           "(per-layer-normalised power iteration)")
    what.add_argument("--interpolate", nargs=2, metavar=("A", "B"),
                      help="loss on the straight line between two of the checkpoints "
                           "(names or paths)")
    how = p.add_argument_group("how")
    how.add_argument("--checkpoint", choices=CHECKPOINT_CHOICES, default="final",
                     help="in a run directory: final (model.safetensors, default) or best "
                          "(best.safetensors, from train --keep best)")
    how.add_argument("--paper-batch-size", type=_int_at_least(1, "--paper-batch-size"),
                     metavar="B", help="paper metrics on each batch of B samples, averaged (the "
                     "official aggregate; default: the whole subset as one Hessian)")
    how.add_argument("--samples", type=_samples, default=1000, metavar="N|all",
                     help="seeded subset of training examples (default 1000)")
    how.add_argument("--batch-size", type=_int_at_least(1, "--batch-size"), default=256)
    how.add_argument("--seed", type=_int_at_least(0, "--seed"), default=0)
    how.add_argument("--mode", choices=landscape.MODES, default="eval")
    how.add_argument("--trace-matvecs", type=_int_at_least(1, "--trace-matvecs"), default=100,
                     metavar="M", help="Hessian-vector products for the trace (default 100)")
    how.add_argument("--trace-method", choices=TRACE_METHODS, default="hutch++")
    how.add_argument("--density-runs", type=_int_at_least(1, "--density-runs"), default=4,
                     metavar="R", help="stochastic Lanczos quadrature runs (default 4)")
    how.add_argument("--density-steps", type=_int_at_least(1, "--density-steps"), default=64,
                     metavar="S", help="Lanczos steps per density run (default 64)")
    how.add_argument("--grid-points", type=_int_at_least(3, "--grid-points"), metavar="N",
                     help="odd number of points per axis (default 21 1-D, 11 2-D)")
    how.add_argument("--landscape-range", type=_positive_float("--landscape-range"),
                     default=1.0, metavar="R", help="alpha in [-R, R] (default 1)")
    how.add_argument("--bn", choices=landscape.BN_MODES, default="stored",
                     help="BatchNorm statistics for slices: stored (default) or recompute "
                          "at each point")
    how.add_argument("--device", default="auto")
    how.add_argument("--threads", type=_int_at_least(0, "--threads"), default=0,
                     help="CPU threads (default 0: one for models under 1M parameters, else "
                          "torch's default)")
    given = p.add_argument_group("model and data (instead of the checkpoint's; a plain state "
                                 "dict needs --model and --dataset)")
    given.add_argument("--model", default=None, metavar="NAME",
                       help="registry model or package.module:factory (naming it is consent "
                            "to import it), e.g. timm:create_model")
    given.add_argument("--model-arg", action="append", default=[], metavar="KEY=VALUE",
                       help="model argument (repeatable, TOML value), e.g. "
                            "model_name=\"resnet18\"")
    given.add_argument("--dataset", default=None, metavar="NAME",
                       help="data set name, folder, or package.module:factory")
    given.add_argument("--dataset-arg", action="append", default=[], metavar="KEY=VALUE",
                       help="data set argument (repeatable, TOML value), e.g. image_size=32")
    given.add_argument("--data-dir", default=None,
                       help="image folder (DIR/train|val|test/CLASS/*) or data directory; "
                            "replaces the one a checkpoint recorded")
    given.add_argument("--trust-code", action="store_true",
                       help="allow importing a package.module:factory a checkpoint names")
    given.add_argument("--trust-pickle", action="store_true",
                       help="allow torch.save checkpoints (loaded with weights_only=True)")
    out = p.add_argument_group("output")
    out.add_argument("--out", default=None, metavar="DIR",
                     help="output directory (default: RUN/analysis for one run directory, "
                          "else analysis/ beside the first run)")
    out.add_argument("--report", action="store_true",
                     help="also write the HTML/Markdown report (automatic with several "
                          "checkpoints)")
    out.add_argument("--baseline", default=None, metavar="NAME",
                     help="checkpoint the report compares against")
    out.add_argument("--no-progress", action="store_true")
    return p


def options_from_args(args, argv: Sequence[str]) -> AnalyzeOptions:
    """The options the parsed flags ask for (validated)."""
    chosen = (args.trace or args.eigenvalues is not None or args.density or args.landscape
              or args.paper_metrics)
    options = AnalyzeOptions(
        samples=args.samples, seed=args.seed, mode=args.mode, batch_size=args.batch_size,
        trace_matvecs=args.trace_matvecs, trace_method=args.trace_method,
        density_runs=args.density_runs, density_steps=args.density_steps,
        grid_points=args.grid_points, landscape_range=args.landscape_range, bn=args.bn,
        interpolate=tuple(args.interpolate) if args.interpolate else None,
        paper_metrics=args.paper_metrics, paper_batch_size=args.paper_batch_size,
        checkpoint=args.checkpoint, device=args.device, threads=args.threads,
        data_dir=args.data_dir, model=args.model,
        model_kwargs=dict(parse_pair(pair, "--model-arg") for pair in args.model_arg),
        dataset=args.dataset,
        dataset_kwargs=dict(parse_pair(pair, "--dataset-arg") for pair in args.dataset_arg),
        trust_code=args.trust_code, trust_pickle=args.trust_pickle, progress=not args.no_progress,
        command="python -m flatlab.analyze " + shlex.join(argv))
    if chosen:
        options.trace = args.trace
        options.eigenvalues = args.eigenvalues or 0
        options.density = args.density
        options.landscape = tuple(dict.fromkeys(args.landscape or ()))
    options.validate()
    return options


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    options = options_from_args(args, argv)
    # under torchrun: start the process group (and end it); else, or if the caller already
    # started one, leave things as they are
    started = not distributed.is_initialized() and distributed.init_from_env(options.device)
    try:
        return _main(args, options)
    finally:
        if started:
            distributed.cleanup()


def _main(args, options: AnalyzeOptions) -> int:
    loaded = load_checkpoints(args.checkpoints, options)  # every input checked before writing
    out_dir = Path(args.out) if args.out is not None else default_out_dir(loaded)
    if out_dir.exists() and not out_dir.is_dir():
        raise FlatlabError(f"--out {str(out_dir)!r} exists and is not a directory")
    report = args.report or len(loaded) > 1
    if args.baseline is not None and args.baseline not in [ck.name for ck in loaded]:
        raise FlatlabError(f"--baseline {args.baseline!r} is not among the checkpoints; choose "
                           f"one of {', '.join(ck.name for ck in loaded)}")
    with distributed.hold_directory(out_dir):  # one writer per directory, for the whole run
        analysis = analyze(loaded, options)
        if distributed.is_main_process():
            try:
                path = write_outputs(analysis, out_dir, report=report, baseline=args.baseline)
            except OSError as err:  # full disk, no permission: each file is whole or untouched
                raise FlatlabError(f"cannot write to {str(out_dir)!r}: {err.strerror or err}") \
                    from None
            print(f"wrote {path}" + (f" and {out_dir / 'index.html'}" if report else ""))
        distributed.barrier()
    return 0


def console_main() -> int:
    """Entry point: :func:`main` with errors as one line and an exit status."""
    return run_cli(main, prog=PROG)
