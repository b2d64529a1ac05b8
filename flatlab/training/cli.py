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
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from flatlab import distributed
from flatlab.errors import ArgumentParser, FlatlabError, run_cli
from flatlab.factory import is_factory_name
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
    p.add_argument("--trust-code", action="store_true", help="allow importing the "
                   "package.module:factory a resumed run's saved config names (naming it on "
                   "the command line or in --config already allows it)")
    p.add_argument("--trust-pickle", action="store_true", help="allow --init-from to read a "
                   "torch.save (.pt/.pth) file, with torch.load(weights_only=True)")
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
    elif f.rule.choices and not f.rule.pattern:
        kind["metavar"] = "{" + ",".join(f.rule.choices) + "}"
    return kind


def _help(f: Declared) -> str:
    """The declared help, with the default where it says something (argparse-escaped)."""
    text = f.rule.help
    if f.value_type is not dict and f.default is not None and f.default is not False:
        text += f" (default {f.default})"
    return text.replace("%", "%%")


@dataclass(frozen=True)
class Command:
    """A parsed command line: the validated config and how to run it."""

    config: TrainConfig
    resume: bool
    progress: bool
    trust_code: bool
    trust_pickle: bool


def parse_command(argv: Sequence[str] | None = None) -> Command:
    """Command line -> :class:`Command`; never trains.

    Consent to import code: ``--trust-code``, or every ``package.module:factory`` in the config
    named by the user now (a flag or the ``--config`` file): a fresh run's config is the user's
    own words; a resumed run's saved config is a file.
    """
    args = vars(build_parser().parse_args(argv))
    resume = bool(args.pop("resume", False))
    progress = not args.pop("no_progress", False)
    trust_code = bool(args.pop("trust_code", False))
    trust_pickle = bool(args.pop("trust_pickle", False))
    config = saved_config(args.get("out")) if resume else TrainConfig()
    named = set(args)
    if "config" in args:
        path = args.pop("config")
        config = TrainConfig.from_toml(path, base=config)
        named |= _keys_of(path)
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
    config = TrainConfig.from_dict(values, source=PROG, base=config).validate()
    factories = [key for key in ("model", "dataset") if is_factory_name(getattr(config, key))]
    trust_code = trust_code or not resume or all(key in named for key in factories)
    return Command(config, resume, progress, trust_code, trust_pickle)


def parse_args(argv: Sequence[str] | None = None) -> tuple[TrainConfig, bool, bool]:
    """Command line -> ``(validated config, resume, progress)``; never trains."""
    command = parse_command(argv)
    return command.config, command.resume, command.progress


def _keys_of(path: str) -> set[str]:
    """The keys a TOML file sets (it has been read successfully already)."""
    return set(tomllib.loads(Path(path).read_text(encoding="utf-8")))


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
    except RecursionError:
        raise FlatlabError(f"{flag} {key}=...: the value is nested too deeply") from None
    return key, value


def main(argv: Sequence[str] | None = None) -> int:
    """Parse, train; under torchrun start (and end) the process group."""
    command = parse_command(argv)
    # a caller's process group is left alone
    started = (not distributed.is_initialized()
               and distributed.init_from_env(command.config.device))
    try:
        train(command.config, progress=command.progress, resume=command.resume,
              trust_code=command.trust_code, trust_pickle=command.trust_pickle)
    finally:
        if started:
            distributed.cleanup()
    return 0


def run(argv: Sequence[str] | None = None) -> int:
    """``main`` with errors as one stderr line and an exit status (the console entry point)."""
    return run_cli(main, argv, prog=PROG)
