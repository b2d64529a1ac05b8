"""Typed analysis results: the ``analysis.json`` schema, versioned.

:class:`Analysis` (the run's settings and one :class:`CheckpointResult` per checkpoint, plus an
optional :class:`Interpolation`) is what :func:`flatlab.analysis.analyze` returns and what the
report and the studies read, by attribute. ``Analysis.to_json()`` gives the plain dict written
to ``analysis.json``; ``Analysis.from_json(d)`` / :func:`read_analysis` read it back.

Versions (``schema_version``):

- 1: flatlab 0.1.0 files, which have no ``schema_version`` field; read as version 1 with the
  same fields (a missing field reads as ``None``);
- 2: adds ``schema_version`` (first key) and, only where computed, the paper metrics
  ``trace_paper``, ``trace_paper_stderr``, ``lambda_paper`` per checkpoint and
  ``paper_batch_size`` (an int, or ``"all"``: the whole analysis subset as one Hessian).

A file with a newer version than this flatlab knows is refused (:class:`FlatlabError`).

Numbers are plain Python floats, NaN and infinities are stored as ``None`` (JSON has no
spelling for them). Checkpoint metadata (``model``, ``dataset``, ``optimizer`` specs,
``metrics``) is kept as the mappings the checkpoint holds: its schema belongs to
:mod:`flatlab.checkpoint`.

For scripts written against flatlab 0.1.0, where ``analyze`` returned the dict, every result
also answers ``result["key"]``, ``result.get("key")``, ``keys()`` and ``items()`` with the
values of ``to_json()`` (a read-only view; new code should use attributes).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from flatlab.errors import FlatlabError

SCHEMA_VERSION = 2
LEGACY_SCHEMA_VERSION = 1  # files without a schema_version field (flatlab 0.1.0)

Floats = tuple[float | None, ...]
Matrix = tuple[tuple[float | None, ...], ...]


def finite(value: Any) -> float | None:
    """``float(value)``, or ``None`` for a missing, NaN or infinite value."""
    if value is None:
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def floats(values: Any) -> Floats | None:
    return None if values is None else tuple(finite(v) for v in values)


def matrix(rows: Any) -> Matrix | None:
    return None if rows is None else tuple(tuple(finite(v) for v in row) for row in rows)


def _plain(value: Any) -> Any:
    """JSON form of a field value: dataclasses via ``to_json``, tuples as lists."""
    if hasattr(value, "to_json"):
        return value.to_json()
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    if isinstance(value, float):
        return finite(value)
    return value


class _JsonView:
    """Read-only dict-style access to ``to_json()`` (flatlab 0.1.0's dict results)."""

    def to_json(self) -> dict:  # pragma: no cover - every subclass defines it
        raise NotImplementedError

    def __getitem__(self, key: str) -> Any:
        return self.to_json()[key]

    def get(self, key: str, default: Any = None) -> Any:
        return self.to_json().get(key, default)

    def keys(self):
        return self.to_json().keys()

    def items(self):
        return self.to_json().items()

    def __contains__(self, key: object) -> bool:
        return key in self.to_json()


@dataclass(frozen=True)
class LayerTrace(_JsonView):
    """One parameter tensor's share of the trace: ``tr(H_ll)`` with its standard error."""

    estimate: float | None
    stderr: float | None

    def to_json(self) -> dict:
        return {"estimate": self.estimate, "stderr": self.stderr}

    @classmethod
    def from_json(cls, d: Mapping) -> LayerTrace:
        return cls(finite(d.get("estimate")), finite(d.get("stderr")))


@dataclass(frozen=True)
class Density(_JsonView):
    """Spectral density: ``density`` on ``grid`` (integrates to 1), and the quadrature
    ``nodes`` / ``weights`` of each Lanczos run."""

    grid: Floats
    density: Floats
    nodes: Matrix
    weights: Matrix

    def to_json(self) -> dict:
        return {"grid": list(self.grid), "density": list(self.density),
                "nodes": _plain(self.nodes), "weights": _plain(self.weights)}

    @classmethod
    def from_json(cls, d: Mapping) -> Density:
        return cls(floats(d.get("grid")) or (), floats(d.get("density")) or (),
                   matrix(d.get("nodes")) or (), matrix(d.get("weights")) or ())


@dataclass(frozen=True)
class Slice1D(_JsonView):
    """Loss (and accuracy) at ``W + alpha d`` for each ``alpha``."""

    alphas: Floats
    loss: Floats
    accuracy: Floats | None = None

    def to_json(self) -> dict:
        return {"alphas": list(self.alphas), "loss": list(self.loss),
                "accuracy": _plain(self.accuracy)}

    @classmethod
    def from_json(cls, d: Mapping) -> Slice1D:
        return cls(floats(d["alphas"]), floats(d["loss"]), floats(d.get("accuracy")))


@dataclass(frozen=True)
class Slice2D(_JsonView):
    """``loss[i][j]`` at ``W + alphas[i] d_x + betas[j] d_y``."""

    alphas: Floats
    betas: Floats
    loss: Matrix
    accuracy: Matrix | None = None

    def to_json(self) -> dict:
        return {"alphas": list(self.alphas), "betas": list(self.betas),
                "loss": _plain(self.loss), "accuracy": _plain(self.accuracy)}

    @classmethod
    def from_json(cls, d: Mapping) -> Slice2D:
        return cls(floats(d["alphas"]), floats(d["betas"]), matrix(d["loss"]),
                   matrix(d.get("accuracy")))


@dataclass(frozen=True)
class Interpolation(_JsonView):
    """Loss (and accuracy) at ``(1 - alpha) W_start + alpha W_end``; JSON keys ``from``/``to``."""

    start: str
    end: str
    alphas: Floats
    loss: Floats
    accuracy: Floats | None = None

    def to_json(self) -> dict:
        return {"from": self.start, "to": self.end, "alphas": list(self.alphas),
                "loss": list(self.loss), "accuracy": _plain(self.accuracy)}

    @classmethod
    def from_json(cls, d: Mapping) -> Interpolation:
        return cls(str(d.get("from", "A")), str(d.get("to", "B")), floats(d["alphas"]),
                   floats(d["loss"]), floats(d.get("accuracy")))


def _optional(cls, value: Any):
    return None if not value else cls.from_json(value)


@dataclass(frozen=True)
class CheckpointResult(_JsonView):
    """Everything measured on one checkpoint (``None``: not computed), and what the checkpoint's
    metadata says about it."""

    name: str
    path: str | None = None
    run_dir: str | None = None
    model: Mapping | None = None           # the checkpoint's model spec
    dataset: Mapping | None = None         # ... data set spec
    optimizer: Mapping | None = None       # ... optimizer spec: {"name", "kwargs"}
    epoch: int | None = None
    grad_evals: int | None = None
    seed: int | None = None                # training seed
    metrics: Mapping = field(default_factory=dict)  # final metrics.csv row (train_loss, ...)
    num_samples: int | None = None         # analysis samples
    loss: float | None = None              # at W on the analysis samples
    accuracy: float | None = None
    trace: float | None = None
    trace_stderr: float | None = None
    trace_matvecs: int | None = None
    trace_method: str | None = None
    trace_per_layer: Mapping[str, LayerTrace] | None = None
    eigenvalues: Floats | None = None      # descending
    eigenvalue_residuals: Floats | None = None
    eigen_converged: tuple[bool, ...] | None = None
    eigen_matvecs: int | None = None
    density: Density | None = None
    landscape_1d: Slice1D | None = None
    landscape_2d: Slice2D | None = None
    trace_paper: float | None = None       # schema 2: conv + head weights only (the paper's)
    trace_paper_stderr: float | None = None
    lambda_paper: float | None = None      # schema 2: sum of per-layer Rayleigh quotients

    @property
    def method(self) -> str:
        """The optimizer's name, lower case ("" when unknown)."""
        return str((self.optimizer or {}).get("name", "")).lower()

    @property
    def hyperparameters(self) -> dict:
        """The optimizer's keyword arguments."""
        return dict((self.optimizer or {}).get("kwargs") or {})

    def metric(self, name: str) -> float | None:
        """A final training metric (``test_acc``, ``train_loss``, ...), ``None`` if absent."""
        return finite((self.metrics or {}).get(name))

    @property
    def lambda_1(self) -> float | None:
        return self.eigenvalues[0] if self.eigenvalues else None

    def to_json(self) -> dict:
        d = {name: _plain(getattr(self, name)) for name in _ENTRY_FIELDS}
        for name in _SCHEMA_2_FIELDS:  # written only when computed: 0.1.0 readers never see them
            if getattr(self, name) is not None:
                d[name] = getattr(self, name)
        return d

    @classmethod
    def from_json(cls, d: Mapping) -> CheckpointResult:
        per_layer = d.get("trace_per_layer")
        converged = d.get("eigen_converged")
        return cls(
            name=str(d["name"]), path=d.get("path"), run_dir=d.get("run_dir"),
            model=d.get("model"), dataset=d.get("dataset"), optimizer=d.get("optimizer"),
            epoch=d.get("epoch"), grad_evals=d.get("grad_evals"), seed=d.get("seed"),
            metrics=dict(d.get("metrics") or {}), num_samples=d.get("num_samples"),
            loss=finite(d.get("loss")), accuracy=finite(d.get("accuracy")),
            trace=finite(d.get("trace")), trace_stderr=finite(d.get("trace_stderr")),
            trace_matvecs=d.get("trace_matvecs"), trace_method=d.get("trace_method"),
            trace_per_layer=None if per_layer is None else {
                str(k): LayerTrace.from_json(v) for k, v in per_layer.items()},
            eigenvalues=floats(d.get("eigenvalues")),
            eigenvalue_residuals=floats(d.get("eigenvalue_residuals")),
            eigen_converged=None if converged is None else tuple(bool(c) for c in converged),
            eigen_matvecs=d.get("eigen_matvecs"),
            density=_optional(Density, d.get("density")),
            landscape_1d=_optional(Slice1D, d.get("landscape_1d")),
            landscape_2d=_optional(Slice2D, d.get("landscape_2d")),
            trace_paper=finite(d.get("trace_paper")),
            trace_paper_stderr=finite(d.get("trace_paper_stderr")),
            lambda_paper=finite(d.get("lambda_paper")))


_SCHEMA_2_FIELDS = ("trace_paper", "trace_paper_stderr", "lambda_paper")
_ENTRY_FIELDS = tuple(name for name in CheckpointResult.__dataclass_fields__
                      if name not in _SCHEMA_2_FIELDS)


@dataclass(frozen=True)
class Analysis(_JsonView):
    """One ``analyze`` call: its settings, one result per checkpoint, the interpolation."""

    checkpoints: tuple[CheckpointResult, ...]
    flatlab_version: str | None = None
    command: str | None = None
    samples: int | str | None = None       # an int, or "all"
    seed: int | None = None
    mode: str | None = None
    batch_size: int | None = None
    landscape_bn: str | None = None
    landscape_range: float | None = None
    interpolation: Interpolation | None = None
    paper_batch_size: int | str | None = None  # schema 2, with paper metrics: an int or "all"
    schema_version: int = SCHEMA_VERSION

    def __post_init__(self) -> None:
        object.__setattr__(self, "checkpoints", tuple(self.checkpoints))

    @property
    def names(self) -> list[str]:
        return [ck.name for ck in self.checkpoints]

    def checkpoint(self, name: str) -> CheckpointResult:
        for ck in self.checkpoints:
            if ck.name == name:
                return ck
        raise FlatlabError(f"no checkpoint named {name!r}; the analysis holds "
                           f"{', '.join(self.names) or 'none'}")

    def to_json(self) -> dict:
        return {"schema_version": self.schema_version,
                "flatlab_version": self.flatlab_version, "command": self.command,
                "samples": self.samples, "seed": self.seed, "mode": self.mode,
                "batch_size": self.batch_size, "landscape_bn": self.landscape_bn,
                "landscape_range": self.landscape_range,
                **({} if self.paper_batch_size is None
                   else {"paper_batch_size": self.paper_batch_size}),
                "checkpoints": [ck.to_json() for ck in self.checkpoints],
                "interpolation": _plain(self.interpolation)}

    @classmethod
    def from_json(cls, d: Mapping) -> Analysis:
        """Read any known schema version (a file without the field is version 1)."""
        if not isinstance(d, Mapping):
            raise FlatlabError(f"an analysis is a JSON object, got {type(d).__name__}")
        version = d.get("schema_version", LEGACY_SCHEMA_VERSION)
        if not isinstance(version, int) or version > SCHEMA_VERSION:
            raise FlatlabError(f"analysis schema_version {version!r} is newer than this "
                               f"flatlab reads ({SCHEMA_VERSION}); upgrade flatlab")
        try:
            checkpoints = tuple(CheckpointResult.from_json(ck) for ck in d.get("checkpoints")
                                or ())
            interpolation = _optional(Interpolation, d.get("interpolation"))
        except (KeyError, TypeError, ValueError) as err:
            raise FlatlabError(f"not a flatlab analysis: {err!r}") from None
        return cls(checkpoints=checkpoints, flatlab_version=d.get("flatlab_version"),
                   command=d.get("command"), samples=d.get("samples"), seed=d.get("seed"),
                   mode=d.get("mode"), batch_size=d.get("batch_size"),
                   landscape_bn=d.get("landscape_bn"), landscape_range=d.get("landscape_range"),
                   interpolation=interpolation, paper_batch_size=d.get("paper_batch_size"),
                   schema_version=SCHEMA_VERSION)

    @classmethod
    def coerce(cls, analysis: Analysis | Mapping) -> Analysis:
        """``analysis`` itself, or a dict of the ``analysis.json`` schema read as one."""
        return analysis if isinstance(analysis, Analysis) else cls.from_json(analysis)


def read_analysis(path: str | os.PathLike) -> Analysis:
    """Read an ``analysis.json`` of any known schema version."""
    path = Path(path)
    try:
        return Analysis.from_json(json.loads(path.read_text(encoding="utf-8")))
    except OSError as err:
        raise FlatlabError(f"cannot read {str(path)!r}: {err.strerror or err}") from None
    except json.JSONDecodeError as err:
        raise FlatlabError(f"{str(path)!r} is not JSON: {err}") from None

