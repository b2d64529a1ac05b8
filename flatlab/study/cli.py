"""``python -m flatlab.study PRESET [...]``: run a study preset.

    python -m flatlab.study scratch [--quick] [--jobs N] [--shard I/N] [--out DIR]
    python -m flatlab.study transfer [--quick] [--jobs N] [--shard I/N] [--out DIR]
    python -m flatlab.study demo [--quick] [--epochs N] [--out DIR]

A preset is a module with ``NAME``, ``DESCRIPTION``, ``configure(parser)`` (its flags) and
``run(args, argv) -> exit status``.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType

from flatlab.distributed import hold_directory
from flatlab.errors import ArgumentParser, run_cli
from flatlab.study import demo, scratch, transfer

PRESETS = {preset.NAME: preset for preset in (scratch, transfer, demo)}


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
    preset = PRESETS[args.preset]
    with hold_directory(_held_directory(preset, args)):  # one writer per --out at a time
        return preset.run(args, argv[argv.index(args.preset) + 1:])


def _held_directory(preset: ModuleType, args: argparse.Namespace) -> Path:
    """The preset's output directory (``--out`` or its default); with ``--shard I/N`` the
    shard's own ``OUT/shards/I-of-N``, so the shards of one study run side by side."""
    out = getattr(args, "out", None)
    if out is None:
        quick = getattr(args, "quick", False) and hasattr(preset, "QUICK_OUT")
        out = preset.QUICK_OUT if quick else preset.DEFAULT_OUT
    shard = getattr(args, "shard", None)
    if shard is not None:
        return Path(out) / "shards" / f"{shard.index}-of-{shard.count}"
    return Path(out)


if __name__ == "__main__":
    raise SystemExit(run_cli(main, prog="flatlab.study"))
