"""Configuration fields declared once: type, default, constraint, help text and flag.

A config class is a dataclass deriving from :class:`DeclaredConfig` whose fields are made with
:func:`option`::

    lr: float = option(0.1, "peak learning rate", low=0.0)

The annotation is the type, the first argument the default, the keywords the constraint
(``choices``, ``low``/``high`` bounds) and how the field appears elsewhere (``flag``,
``metavar``, whether it may change on resume, whether the checkpoint records it). Type checking,
validation, TOML reading and writing (here) and the argparse parser (:mod:`.cli`) are all
generated from these declarations, so adding a hyperparameter is one declaration.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import math
import re
import tomllib
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from flatlab.errors import FlatlabError
from flatlab.training.toml_writer import toml_key, toml_value

RECORD = ("always", "changed")


@dataclass(frozen=True)
class Rule:
    """What one field accepts and how it is named outside Python.

    ``choices``: the accepted strings; ``pattern`` (a regex) accepts more, described to the
    user by ``pattern_text``; ``noun`` words the refusal ("unknown model 'x'"). ``low`` and
    ``high`` bound a number (``*_open``: strict). ``flag`` defaults to ``--name-with-dashes``.
    ``resumable``: may differ when a run is resumed.
    ``in_file``: written to the TOML file at all; ``write_default``: written even when equal to
    the default. ``record``: ``"always"`` or ``"changed"`` (when not the default) in the
    checkpoint's optimizer record, under ``record_as`` (default: the name). ``only_with =
    (other, values)``: a value other than the default needs field ``other`` in ``values``
    (``values=None``: ``other`` set to anything but its default).
    """

    help: str
    choices: tuple[str, ...] = ()
    pattern: str | None = None
    pattern_text: str = ""
    noun: str = ""
    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    flag: str = ""
    metavar: str | None = None
    resumable: bool = False
    in_file: bool = True
    write_default: bool = True
    record: str | None = None
    record_as: str = ""
    only_with: tuple[str, tuple[str, ...] | None] | None = None


def option(default: Any, help: str, **rule: Any) -> Any:
    """A dataclass field carrying its :class:`Rule` (a dict default must be empty: ``{}``)."""
    metadata = {"rule": Rule(help=help, **rule)}
    if rule.get("record") not in (None, *RECORD):
        raise ValueError(f"record must be one of {RECORD}, got {rule['record']!r}")
    if isinstance(default, dict):
        if default:
            raise ValueError("a dict option's default must be empty")
        return dataclasses.field(default_factory=dict, metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


@dataclass(frozen=True)
class Declared:
    """One declared field: ``name``, accepted ``types``, ``default`` and its :class:`Rule`."""

    name: str
    types: tuple[type, ...]
    default: Any
    rule: Rule

    @property
    def flag(self) -> str:
        return self.rule.flag or "--" + self.name.replace("_", "-")

    @property
    def value_type(self) -> type:
        """The type of a set value (``float`` for ``float | None``)."""
        return next(t for t in self.types if t is not type(None))

    def coerce(self, value: Any, source: str) -> Any:
        """``value`` if its type is accepted (an int becomes a float where floats are
        wanted; a bool is never a number), else a FlatlabError naming ``source``."""
        if isinstance(value, bool) and bool not in self.types:
            pass
        elif isinstance(value, int) and float in self.types:
            return float(value)
        elif isinstance(value, self.types):
            if dict in self.types:
                _check_plain(self.name, value, source)
                return copy.deepcopy(value)
            return value
        wanted = " or ".join("none" if t is type(None) else t.__name__ for t in self.types)
        raise FlatlabError(f"{source}: {self.name!r} must be {wanted}, got "
                           f"{type(value).__name__} {_short(value)}")

    def check(self, value: Any) -> None:
        """The constraint: one of ``choices`` (or ``pattern``), within the bounds."""
        rule = self.rule
        if value is None and type(None) in self.types:
            return
        if rule.choices and value not in rule.choices and not (
                rule.pattern and isinstance(value, str) and re.fullmatch(rule.pattern, value)):
            refusal = f"unknown {rule.noun}" if rule.noun else "invalid choice"
            raise FlatlabError(f"{self.flag}: {refusal} {value!r}; choose one of "
                               f"{', '.join(rule.choices)}{rule.pattern_text}")
        if rule.low is not None or rule.high is not None:
            _bounded(self.flag, value, rule)

    def check_applies(self, config: DeclaredConfig) -> None:
        """``only_with``: a value set away from the default must be one that acts."""
        if self.rule.only_with is None or getattr(config, self.name) == self.default:
            return
        other, values = self.rule.only_with
        declared = next(f for f in config.declared() if f.name == other)
        current = getattr(config, other)
        if values is None and current == declared.default:
            raise FlatlabError(f"{self.flag} applies only with {declared.flag}")
        if values is not None and current not in values:
            raise FlatlabError(f"{self.flag} applies to {' and '.join(values)} only, not "
                               f"{declared.flag} {current!r}")


T = TypeVar("T", bound="DeclaredConfig")


class DeclaredConfig:
    """Base of a dataclass of :func:`option` fields: conversions and validation, generated."""

    @classmethod
    def declared(cls) -> tuple[Declared, ...]:
        return _declared(cls)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON/TOML-able values (``None`` kept)."""
        return {f.name: copy.deepcopy(getattr(self, f.name)) for f in self.declared()}

    @classmethod
    def from_dict(cls: type[T], values: dict[str, Any], *, source: str = "config",
                  base: T | None = None) -> T:
        """Type-checked construction: unknown keys and wrong types raise one-line FlatlabErrors.

        Keys missing from ``values`` keep their value in ``base`` (default: the defaults).
        """
        fields = {f.name: f for f in cls.declared()}
        merged = (base or cls()).to_dict()
        for key, value in values.items():
            if key not in fields:
                raise FlatlabError(f"{source}: unknown key {key!r}; known keys: "
                                   f"{', '.join(fields)}")
            merged[key] = fields[key].coerce(value, source)
        return cls(**merged)

    @classmethod
    def from_toml(cls: type[T], path: str | Path, *, base: T | None = None) -> T:
        """Read a TOML config file (see :meth:`to_toml`)."""
        path = Path(path)
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            raise FlatlabError(f"config file {str(path)!r} does not exist") from None
        except (OSError, UnicodeDecodeError) as err:
            raise FlatlabError(f"cannot read config file {str(path)!r}: {err}") from None
        return cls.from_toml_text(text, source=str(path), base=base)

    @classmethod
    def from_toml_text(cls: type[T], text: str, *, source: str = "config",
                       base: T | None = None) -> T:
        try:
            values = tomllib.loads(text)
        except tomllib.TOMLDecodeError as err:
            raise FlatlabError(f"{source}: invalid TOML ({err})") from None
        except RecursionError:  # tomllib recurses once per level of [[[...]]] or {a = {...}}
            raise FlatlabError(f"{source}: invalid TOML (nested too deeply)") from None
        return cls.from_dict(values, source=source, base=base)

    def to_toml(self, *, comment: str = "") -> str:
        """TOML text that :meth:`from_toml` reads back to an equal config: ``None`` values,
        empty tables and fields declared ``write_default=False`` at their default are left out
        (they read back as the default)."""
        lines = [f"# {line}" for line in comment.splitlines()]
        tables = []
        for f in self.declared():
            value = getattr(self, f.name)
            if (value is None or not f.rule.in_file
                    or (not f.rule.write_default and value == f.default)):
                continue
            if isinstance(value, dict):
                if value:
                    tables.append((f.name, value))
            else:
                lines.append(f"{f.name} = {toml_value(value)}")
        for key, table in tables:
            lines += ["", f"[{key}]"] + [f"{toml_key(k)} = {toml_value(v)}"
                                         for k, v in table.items()]
        return "\n".join(lines) + "\n"

    def validate(self: T) -> T:
        """Check every value's type and constraint, then the ``only_with`` rules; the first bad
        value raises a FlatlabError naming its flag."""
        for f in self.declared():
            value = getattr(self, f.name)
            f.coerce(value, f.flag)
            f.check(value)
        for f in self.declared():
            f.check_applies(self)
        return self

    def record(self) -> dict[str, Any]:
        """The fields declared ``record=``: ``"always"``, or ``"changed"`` when not the default."""
        return {f.rule.record_as or f.name: copy.deepcopy(getattr(self, f.name))
                for f in self.declared()
                if f.rule.record == "always"
                or (f.rule.record == "changed" and getattr(self, f.name) != f.default)}


@functools.cache
def _declared(cls: type) -> tuple[Declared, ...]:
    hints = typing.get_type_hints(cls)
    out = []
    for f in dataclasses.fields(cls):
        if "rule" not in f.metadata:
            raise TypeError(f"{cls.__name__}.{f.name} is not declared with option()")
        hint = hints[f.name]
        if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
            accepted = tuple(typing.get_origin(t) or t for t in typing.get_args(hint))
        else:
            accepted = (typing.get_origin(hint) or hint,)
        default = {} if f.default is dataclasses.MISSING else f.default
        out.append(Declared(f.name, accepted, default, f.metadata["rule"]))
    return tuple(out)


def _check_plain(key: str, value: Any, source: str) -> None:
    """Table values: str keys; numbers, strings, booleans and lists/tables of them."""
    if isinstance(value, dict):
        for k, v in value.items():
            if not isinstance(k, str):
                raise FlatlabError(f"{source}: {key!r} keys must be strings, got {k!r}")
            _check_plain(f"{key}.{k}", v, source)
    elif isinstance(value, list):
        for v in value:
            _check_plain(key, v, source)
    elif not isinstance(value, bool | int | float | str):
        raise FlatlabError(f"{source}: {key!r} holds {type(value).__name__} {_short(value)}; "
                           f"only numbers, strings, booleans, lists and tables are allowed")


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _bounded(flag: str, value: Any, rule: Rule) -> None:
    low, high = rule.low, rule.high
    ok = isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
    if ok and low is not None:
        ok = value > low if rule.low_open else value >= low
    if ok and high is not None:
        ok = value < high if rule.high_open else value <= high
    if not ok:
        lo = "" if low is None else ("(" if rule.low_open else "[") + f"{low}"
        hi = "" if high is None else f"{high}" + (")" if rule.high_open else "]")
        if low is not None and high is not None:
            bound = f"in {lo}, {hi}"
        elif low is not None:
            bound = f"{'>' if rule.low_open else '>='} {low}"
        else:
            bound = f"{'<' if rule.high_open else '<='} {high}"

        raise FlatlabError(f"{flag} must be {bound}, got {value!r}")
