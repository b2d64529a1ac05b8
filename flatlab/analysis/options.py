"""What ``analyze`` computes and how: :class:`AnalyzeOptions` and the accepted values."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from flatlab import landscape
from flatlab.errors import FlatlabError

LANDSCAPES = ("1d", "2d")
TRACE_METHODS = ("hutch++", "hutchinson")  # as flatlab.hessian.TRACE_METHODS (tested)
MIN_TRACE_MATVECS = {"hutch++": 4, "hutchinson": 2}
DEFAULT_GRID = {"1d": 21, "2d": 11, "interpolation": 21}
CHECKPOINT_CHOICES = ("final", "best")  # which file of a run directory: model / best.safetensors


@dataclass
class AnalyzeOptions:
    """What to compute and how. The defaults are what ``python -m flatlab.analyze RUN`` does."""

    trace: bool = True
    eigenvalues: int = 5                 # top-k; 0 skips
    density: bool = True
    landscape: tuple[str, ...] = ("1d",)  # any of "1d", "2d"
    samples: int | None = 1000           # None: the whole training split
    seed: int = 0
    mode: str = "eval"                   # model mode for every measurement
    batch_size: int = 256
    trace_matvecs: int = 100
    trace_method: str = "hutch++"
    eigen_tol: float = 1e-4
    density_runs: int = 4                # SLQ: independent Lanczos runs ...
    density_steps: int = 64              # ... of this many steps each
    grid_points: int | None = None       # per axis; None: 21 (1-D, interpolation), 11 (2-D)
    landscape_range: float = 1.0         # alpha, beta in [-range, range]
    bn: str = "stored"                   # landscape BatchNorm statistics: stored | recompute
    interpolate: tuple[str, str] | None = None  # two checkpoint names or paths
    paper_metrics: bool = False          # trace_paper and lambda_paper (the paper's definitions)
    paper_batch_size: int | None = None  # their Hessians: None the whole subset; B: per batch
    checkpoint: str = "final"            # in a run directory: final (model) or best
    device: str = "auto"
    threads: int = 0                     # CPU threads; 0: one for models under 1M parameters
    data_dir: str | None = None
    model: str | None = None             # the caller's model (registry or factory name) ...
    model_kwargs: dict[str, Any] = field(default_factory=dict)  # ... and its arguments
    dataset: str | None = None           # the caller's data set (a plain state dict needs both)
    dataset_kwargs: dict[str, Any] = field(default_factory=dict)
    trust_code: bool = False             # import a factory named only by a checkpoint's metadata
    trust_pickle: bool = False
    progress: bool = True
    command: str | None = None           # recorded in analysis.json

    def validate(self) -> None:
        """Raise :class:`FlatlabError` naming the first bad value and what is accepted."""
        _integer("eigenvalues", self.eigenvalues, 0)
        if self.samples is not None:
            _integer("samples", self.samples)
        _integer("seed", self.seed, 0)
        _integer("batch_size", self.batch_size)
        _integer("trace_matvecs", self.trace_matvecs,
                 MIN_TRACE_MATVECS.get(self.trace_method, 1))
        _integer("density_runs", self.density_runs)
        _integer("density_steps", self.density_steps)
        _integer("threads", self.threads, 0)
        if self.paper_batch_size is not None:
            _integer("paper_batch_size", self.paper_batch_size)
            if not self.paper_metrics:
                raise FlatlabError("paper_batch_size applies to the paper metrics: add "
                                   "--paper-metrics (paper_metrics=True)")
        _choice("mode", self.mode, landscape.MODES)
        _choice("trace method", self.trace_method, TRACE_METHODS)
        for kind in self.landscape:
            _choice("landscape", kind, LANDSCAPES)
        _choice("checkpoint", self.checkpoint, CHECKPOINT_CHOICES)
        if self.grid_points is not None:
            _integer("grid_points", self.grid_points, 3)
            if self.grid_points % 2 == 0:
                raise FlatlabError(f"grid_points must be odd so that alpha = 0 (the checkpoint) "
                                   f"is on the grid, got {self.grid_points}")
        if not (isinstance(self.landscape_range, int | float) and math.isfinite(
                self.landscape_range) and self.landscape_range > 0):
            raise FlatlabError(f"landscape range must be a positive number, "
                               f"got {self.landscape_range!r}")
        if not (isinstance(self.eigen_tol, int | float) and self.eigen_tol > 0):
            raise FlatlabError(f"eigen_tol must be a positive number, got {self.eigen_tol!r}")
        _choice("bn", self.bn, landscape.BN_MODES)
        if self.bn == "recompute" and self.mode == "train":
            raise FlatlabError("--bn recompute needs --mode eval (train mode normalises with "
                               "batch statistics)")
        for what in ("model", "dataset"):
            name, kwargs = getattr(self, what), getattr(self, f"{what}_kwargs")
            if name is not None and (not isinstance(name, str) or not name):
                raise FlatlabError(f"{what} must be a name, got {name!r}")
            if not isinstance(kwargs, dict):
                raise FlatlabError(f"{what}_kwargs must be a dict, got {kwargs!r}")
            if kwargs and name is None:
                raise FlatlabError(f"--{what}-arg ({what}_kwargs) applies to the {what} named "
                                   f"with --{what} ({what}=...): name it")
        if self.interpolate is not None and len(self.interpolate) != 2:
            raise FlatlabError(f"interpolate takes two checkpoints, got {self.interpolate!r}")

    def grid(self, kind: str) -> tuple[float, float, int]:
        """``(start, stop, points)`` of the ``kind`` axis ("1d", "2d" or "interpolation")."""
        points = self.grid_points or DEFAULT_GRID[kind]
        if kind == "interpolation":
            return 0.0, 1.0, points
        return -float(self.landscape_range), float(self.landscape_range), points


def _integer(name: str, value: Any, minimum: int = 1) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise FlatlabError(f"{name} must be an integer >= {minimum}, got {value!r}")


def _choice(name: str, value: Any, accepted: tuple[str, ...]) -> None:
    if value not in accepted:
        raise FlatlabError(f"{name} must be one of {', '.join(accepted)}, got {value!r}")
