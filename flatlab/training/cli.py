"""``python -m flatlab.train``: the parser, generated from :class:`TrainConfig`'s declarations.

Each field becomes one flag (``--name-with-dashes`` unless declared otherwise): a number or
string field takes one value, a boolean field is a switch that sets it, a table field
(``dataset_kwargs`` ...) takes repeatable ``KEY=VALUE`` pairs whose values are TOML. Flags
override ``--config FILE.toml``, which overrides a resumed run's saved config.
"""

from __future__ import annotations

import argparse
import re
import tomllib
from collections.abc import Sequence
from typing import Any

from flatlab import distributed
from flatlab.errors import ArgumentParser, FlatlabError, run_cli
from flatlab.training.config import TrainConfig
from flatlab.training.fields import Declared
from flatlab.training.rundir import saved_config
from flatlab.training.trainer import train

PROG = "flatlab.train"


def build_parser() -> ArgumentParser:
    """One flag per :class:`TrainConfig` field, plus ``--config``, ``--resume``,
    ``--no-progress`` and ``--version``; unset flags are absent from the namespace."""
    p = ArgumentParser(prog=PROG, argument_default=argparse.SUPPRESS,
                       description="Train a model with NSO, SAM, ASAM, RWP or SGD and write "
                                   "runs/NAME/{model.safetensors, metrics.csv, config.toml}. "
                                   "With no arguments: a CNN on MNIST-1D in about a minute.")
    p.add_argument("--config", metavar="FILE.toml", help="read settings from a TOML file; "
                   "flags given as well override it")
    for f in TrainConfig.declared():
        p.add_argument(f.flag, dest=f.name, help=_help(f), **_kind(f))
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its "
                   "last saved state")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_version()
    return p


def _kind(f: Declared) -> dict[str, Any]:
    if f.value_type is bool:
        return {"action": "store_const", "const": True}
    if f.value_type is dict:
        return {"action": "append", "metavar": f.rule.metavar or "KEY=VALUE"}
    kind: dict[str, Any] = {"type": f.value_type}
    if f.rule.metavar:
        kind["metavar"] = f.rule.metavar
    return kind


def _help(f: Declared) -> str:
    if f.value_type is dict:
        return f.rule.help
    if f.default is None or f.default is False:
        return f.rule.help
    return f"{f.rule.help} (default {f.default})"


def parse_args(argv: Sequence[str] | None = None) -> tuple[TrainConfig, bool, bool]:
    """Command line -> ``(validated config, resume, progress)``; never trains."""
    args = vars(build_parser().parse_args(argv))
    resume = bool(args.pop("resume", False))
    progress = not args.pop("no_progress", False)
    config = saved_config(args.get("out")) if resume else TrainConfig()
    if "config" in args:
        config = TrainConfig.from_toml(args.pop("config"), base=config)
    values: dict[str, Any] = {}
    for f in TrainConfig.declared():
        if f.name not in args:
            continue
        if f.value_type is dict:
            table = dict(getattr(config, f.name))
            table.update(parse_pair(pair, f.flag) for pair in args[f.name])
            values[f.name] = table
        else:
            values[f.name] = args[f.name]
    return TrainConfig.from_dict(values, source=PROG, base=config).validate(), resume, progress


def parse_pair(pair: str, flag: str) -> tuple[str, Any]:
    """``KEY=VALUE`` -> ``(key, value)``: the value is read as TOML, a bare word as a string."""
    key, sep, text = pair.partition("=")
    key = key.strip()
    if not sep or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", key):
        raise FlatlabError(f"{flag} expects KEY=VALUE, got {pair!r}")
    try:
        value = tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        value = text  # a bare word is a string
    return key, value


def main(argv: Sequence[str] | None = None) -> int:
    """Parse, train; under torchrun start (and end) the process group."""
    config, resume, progress = parse_args(argv)
    # a caller's process group is left alone
    started = not distributed.is_initialized() and distributed.init_from_env(config.device)
    try:
        train(config, progress=progress, resume=resume)
    finally:
        if started:
            distributed.cleanup()
    return 0


def run(argv: Sequence[str] | None = None) -> int:
    """``main`` with errors as one stderr line and an exit status (the console entry point)."""
    return run_cli(main, argv, prog=PROG)
