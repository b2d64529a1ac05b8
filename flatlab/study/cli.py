"""``python -m flatlab.study PRESET [...]``: run a study preset.

    python -m flatlab.study scratch [--quick] [--jobs N] [--shard I/N] [--out DIR]
    python -m flatlab.study demo [--quick] [--epochs N] [--out DIR]

A preset is a module with ``NAME``, ``DESCRIPTION``, ``configure(parser)`` (its flags) and
``run(args, argv) -> exit status``.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from flatlab.errors import ArgumentParser, run_cli
from flatlab.study import demo, scratch

PRESETS = {preset.NAME: preset for preset in (scratch, demo)}


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(prog="flatlab.study",
                            description="Run a study preset: train its runs (resumable, "
                                        "in parallel, or one shard of them), measure them, and "
                                        "write its report.")
    parser.add_version()
    presets = parser.add_subparsers(dest="preset", required=True, metavar="PRESET")
    for name, preset in PRESETS.items():
        configure = presets.add_parser(name, help=preset.DESCRIPTION,
                                       description=preset.DESCRIPTION)
        preset.configure(configure)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    return PRESETS[args.preset].run(args, argv[argv.index(args.preset) + 1:])


if __name__ == "__main__":
    raise SystemExit(run_cli(main, prog="flatlab.study"))
