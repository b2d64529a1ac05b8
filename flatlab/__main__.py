"""``python -m flatlab`` and the ``flatlab`` command: one entry point for the tools.

    flatlab train [...]      = python -m flatlab.train [...]
    flatlab analyze [...]    = python -m flatlab.analyze [...]
    flatlab study PRESET ... = python -m flatlab.study PRESET ...
    flatlab demo [...]       = python -m flatlab.demo [...]

Each subcommand hands the rest of the command line to that tool's ``main(argv)``; its module is
imported only when chosen, so ``flatlab --help`` stays fast.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Sequence

from flatlab.errors import ArgumentParser, run_cli

# subcommand -> (module with main(argv), one-line help)
COMMANDS = {
    "train": ("flatlab.train", "train a model with NSO, SAM, ASAM, RWP or SGD"),
    "analyze": ("flatlab.analyze", "Hessian trace, eigenvalues, density and loss landscapes of "
                                   "checkpoints, with a comparison report"),
    "study": ("flatlab.study.cli", "run a study preset (scratch, demo): sweeps, seeds, paired "
                                   "statistics, report"),
    "demo": ("flatlab.demo", "train SGD, SAM and NSO on MNIST-1D and write reports/demo"),
}


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(prog="flatlab",
                            description="Find and measure flat minima. Run `flatlab COMMAND "
                                        "--help` for a command's flags.")
    parser.add_version()
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (_, text) in COMMANDS.items():
        commands.add_parser(name, help=text, add_help=False)
    return parser


def dispatch(argv: Sequence[str]) -> int:
    """Parse the subcommand, hand the rest of ``argv`` to its tool's ``main``."""
    args, rest = build_parser().parse_known_args(argv[:1])
    module = importlib.import_module(COMMANDS[args.command][0])
    return module.main(list(argv[1:]) + rest)


def main(argv: Sequence[str] | None = None) -> int:
    """The ``flatlab`` command: returns its exit status (bad input: one stderr line, 2)."""
    return run_cli(dispatch, list(sys.argv[1:] if argv is None else argv), prog="flatlab")


if __name__ == "__main__":
    raise SystemExit(main())
