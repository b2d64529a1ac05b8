"""``python -m flatlab.analyze``: checkpoints -> curvature and landscape numbers -> files.

For each checkpoint (a ``.safetensors`` file or a run directory) the model and its data set are
rebuilt from the checkpoint's metadata, a fixed seeded subset of ``samples`` training examples
is drawn (the same examples for every checkpoint on the same data), and on it:

- ``loss``, ``accuracy``: the dataset-average loss (batches weighted by n_b / N) and accuracy;
- ``trace``: Hutch++ (or Hutchinson) estimate of tr(H) with its standard error, per layer too;
- ``eigenvalues``: top-k eigenvalues of the full Hessian (Lanczos), residuals, convergence;
- ``density``: spectral density (stochastic Lanczos quadrature);
- ``landscape_1d`` / ``landscape_2d``: loss and accuracy along one / two filter-normalised random
  directions (Li et al. 2018), alpha in ``[-range, range]``;
- ``interpolation``: loss and accuracy on the straight line between two of the checkpoints.

The loss is cross-entropy (``nn.CrossEntropyLoss``), the model in ``mode`` ("eval": stored
BatchNorm statistics, no dropout). Every random thing derives from ``seed``.

:func:`analyze` returns the ``analysis.json`` dict and writes nothing; :func:`write_outputs`
writes ``analysis.json``, ``summary.csv`` and per-checkpoint figures under
``plots/<name>/``; :func:`main` is the command line.
"""

from __future__ import annotations

import csv
import io
import json
import math
import re
import shlex
import sys
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

import flatlab
from flatlab import distributed, landscape
from flatlab.errors import ArgumentParser, FlatlabError, run_cli
from flatlab.io import atomic_write_text
from flatlab.runtime import exact_float32, set_threads

ANALYSIS_JSON = "analysis.json"
SUMMARY_CSV = "summary.csv"
PLOTS_DIR = "plots"  # the report owns figures/; per-checkpoint figures live under plots/<name>/
LANDSCAPES = ("1d", "2d")
HESSIAN_STAGES = ("trace", "eigenvalues", "density")  # the stages that share one operator
TRACE_METHODS = ("hutch++", "hutchinson")  # as flatlab.hessian.TRACE_METHODS
MIN_TRACE_MATVECS = {"hutch++": 4, "hutchinson": 2}
DEFAULT_GRID = {"1d": 21, "2d": 11, "interpolation": 21}
SUMMARY_COLUMNS = ("name", "optimizer", "epoch", "grad_evals", "test_acc", "train_loss", "loss",
                   "accuracy", "trace", "trace_stderr")


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
    device: str = "auto"
    threads: int = 0                     # CPU threads; 0: one for models under 1M parameters
    data_dir: str | None = None
    trust_pickle: bool = False
    progress: bool = True
    command: str | None = None           # recorded in analysis.json

    def validate(self) -> None:
        """Raise :class:`FlatlabError` naming the first bad value and what is accepted."""
        def positive_int(name: str, value: Any, minimum: int = 1) -> None:
            if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
                raise FlatlabError(f"{name} must be an integer >= {minimum}, got {value!r}")

        positive_int("eigenvalues", self.eigenvalues, 0)
        if self.samples is not None:
            positive_int("samples", self.samples)
        positive_int("seed", self.seed, 0)
        positive_int("batch_size", self.batch_size)
        positive_int("trace_matvecs", self.trace_matvecs, MIN_TRACE_MATVECS.get(
            self.trace_method, 1))
        positive_int("density_runs", self.density_runs)
        positive_int("density_steps", self.density_steps)
        positive_int("threads", self.threads, 0)
        if self.mode not in landscape.MODES:
            raise FlatlabError(f"mode must be one of {', '.join(landscape.MODES)}, "
                               f"got {self.mode!r}")
        if self.trace_method not in TRACE_METHODS:
            raise FlatlabError(f"trace method must be one of {', '.join(TRACE_METHODS)}, "
                               f"got {self.trace_method!r}")
        for kind in self.landscape:
            if kind not in LANDSCAPES:
                raise FlatlabError(f"landscape must be one of {', '.join(LANDSCAPES)}, "
                                   f"got {kind!r}")
        if self.grid_points is not None:
            positive_int("grid_points", self.grid_points, 3)
            if self.grid_points % 2 == 0:
                raise FlatlabError(f"grid_points must be odd so that alpha = 0 (the checkpoint) "
                                   f"is on the grid, got {self.grid_points}")
        if not (isinstance(self.landscape_range, int | float) and math.isfinite(
                self.landscape_range) and self.landscape_range > 0):
            raise FlatlabError(f"landscape range must be a positive number, "
                               f"got {self.landscape_range!r}")
        if not (isinstance(self.eigen_tol, int | float) and self.eigen_tol > 0):
            raise FlatlabError(f"eigen_tol must be a positive number, got {self.eigen_tol!r}")
        if self.bn not in landscape.BN_MODES:
            raise FlatlabError(f"bn must be one of {', '.join(landscape.BN_MODES)}, "
                               f"got {self.bn!r}")
        if self.bn == "recompute" and self.mode == "train":
            raise FlatlabError("--bn recompute needs --mode eval (train mode normalises with "
                               "batch statistics)")
        if self.interpolate is not None and len(self.interpolate) != 2:
            raise FlatlabError(f"interpolate takes two checkpoints, got {self.interpolate!r}")


# --------------------------------------------------------------------------- loading


@dataclass
class LoadedCheckpoint:
    """A checkpoint resolved, its model rebuilt and its data set loaded (before any analysis)."""

    name: str
    path: Path
    run_dir: Path | None
    model: nn.Module
    metadata: dict
    dataset: Any = field(repr=False)


class SubsetBatches:
    """Re-iterable ``(x, y)`` batches of ``x[indices]``, ``y[indices]``, gathered one batch at a
    time (memory: one batch), moved to ``device``."""

    def __init__(self, x: Tensor, y: Tensor, indices: Tensor, batch_size: int,
                 device: torch.device | str = "cpu"):
        self.x, self.y, self.indices = x, y, indices
        self.batch_size, self.device = batch_size, torch.device(device)

    def __len__(self) -> int:
        return math.ceil(len(self.indices) / self.batch_size)

    @property
    def num_samples(self) -> int:
        return len(self.indices)

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        for start in range(0, len(self.indices), self.batch_size):
            idx = self.indices[start:start + self.batch_size]
            yield self.x[idx].to(self.device), self.y[idx].to(self.device)


def sample_indices(num_train: int, samples: int | None, seed: int) -> Tensor:
    """The analysis subset: ``samples`` distinct training indices (sorted), drawn with ``seed``;
    all of them when ``samples`` is None or at least ``num_train``."""
    if samples is None or samples >= num_train:
        return torch.arange(num_train)
    perm = torch.randperm(num_train, generator=torch.Generator().manual_seed(seed))
    return perm[:samples].sort().values


def _run_dir_of(path: Path) -> Path | None:
    parent = path.parent
    if path.name == "model.safetensors" or any(
            (parent / f).is_file() for f in ("metrics.csv", "config.toml")):
        return parent
    return None


def _base_name(path: Path, run_dir: Path | None) -> str:
    if run_dir is not None and path.name == "model.safetensors":
        return run_dir.resolve().name or "model"
    if run_dir is not None:
        return f"{run_dir.resolve().name}/{path.stem}"
    return path.stem


def unique_names(paths: Sequence[Path]) -> list[str]:
    """Run directory names (file stems for loose files), prefixed by parent directories where two
    would otherwise collide: ``runs/a/nso``, ``runs/b/nso`` -> ``a/nso``, ``b/nso``."""
    run_dirs = [_run_dir_of(p) for p in paths]
    names = [_base_name(p, r) for p, r in zip(paths, run_dirs, strict=True)]
    depth = [0] * len(paths)
    while len(set(names)) < len(names):
        changed = False
        clashing = {name for name in names if names.count(name) > 1}
        for i, name in enumerate(names):
            if name in clashing:
                anchor = (run_dirs[i] or paths[i].with_suffix("")).resolve()
                parents = anchor.parents
                if depth[i] < len(parents) - 1:
                    depth[i] += 1
                    names[i] = f"{parents[depth[i] - 1].name}/{name}"
                    changed = True
        if not changed:
            break
    seen: dict[str, int] = {}
    for i, name in enumerate(names):  # last resort: numbered
        if names.count(name) > 1:
            seen[name] = seen.get(name, 0) + 1
            names[i] = f"{name}-{seen[name]}"
    return names


def load_checkpoints(checkpoints: Sequence[str | Path], options: AnalyzeOptions
                     ) -> list[LoadedCheckpoint]:
    """Resolve every checkpoint, rebuild its model and data set. Raises :class:`FlatlabError`
    for a missing or corrupt file, a checkpoint given twice, or bad options; writes nothing."""
    from flatlab.checkpoint import load_dataset_for, load_model, resolve_checkpoint
    from flatlab.runtime import resolve_device

    options.validate()
    if not checkpoints:
        raise FlatlabError("no checkpoint given")
    device = distributed.device_for(resolve_device(options.device))
    paths = [resolve_checkpoint(c) for c in checkpoints]
    seen: dict[Path, str] = {}
    for given, path in zip(checkpoints, paths, strict=True):
        key = path.resolve()
        if key in seen:
            raise FlatlabError(f"checkpoint {str(path)!r} given twice ({seen[key]!r} and "
                               f"{str(given)!r})")
        seen[key] = str(given)
    names = unique_names(paths)
    datasets: dict[str, Any] = {}
    loaded = []
    for name, path in zip(names, paths, strict=True):
        model, meta = load_model(path, device=device, trust_pickle=options.trust_pickle)
        key = json.dumps(meta.get("dataset"), sort_keys=True)
        if key not in datasets:
            datasets[key] = load_dataset_for(meta, data_dir=options.data_dir)
        loaded.append(LoadedCheckpoint(name=name, path=path, run_dir=_run_dir_of(path),
                                       model=model, metadata=meta, dataset=datasets[key]))
    if options.interpolate is not None:
        _interpolation_pair(loaded, options.interpolate)
    return loaded


def _find(loaded: Sequence[LoadedCheckpoint], ref: str) -> LoadedCheckpoint:
    for ck in loaded:
        if ref == ck.name:
            return ck
    ref_path = Path(ref).expanduser()
    if ref_path.exists():
        target = ref_path.resolve()
        for ck in loaded:
            if target in (ck.path.resolve(), ck.run_dir.resolve() if ck.run_dir else None):
                return ck
    raise FlatlabError(f"--interpolate {ref!r} is not one of the analysed checkpoints; choose "
                       f"from {', '.join(ck.name for ck in loaded)} (or their paths)")


def _interpolation_pair(loaded: Sequence[LoadedCheckpoint], refs: Sequence[str]
                        ) -> tuple[LoadedCheckpoint, LoadedCheckpoint]:
    a, b = _find(loaded, refs[0]), _find(loaded, refs[1])
    if a is b:
        raise FlatlabError(f"--interpolate needs two different checkpoints, got {a.name!r} twice")
    sa, sb = a.model.state_dict(), b.model.state_dict()
    if sa.keys() != sb.keys() or any(sa[k].shape != sb[k].shape for k in sa):
        raise FlatlabError(f"cannot interpolate {a.name!r} and {b.name!r}: different "
                           f"architectures")
    if a.dataset.spec != b.dataset.spec:
        raise FlatlabError(f"cannot interpolate {a.name!r} and {b.name!r}: trained on different "
                           f"data sets")
    return a, b


# --------------------------------------------------------------------------- analysis


def _stages(options: AnalyzeOptions) -> list[str]:
    stages = ["loss"]
    stages += ["trace"] if options.trace else []
    stages += ["eigenvalues"] if options.eigenvalues else []
    stages += ["density"] if options.density else []
    stages += [f"landscape {kind}" for kind in options.landscape]
    return stages


def _grid(options: AnalyzeOptions, kind: str) -> Tensor:
    n = options.grid_points or DEFAULT_GRID[kind]
    if kind == "interpolation":
        return torch.linspace(0.0, 1.0, n, dtype=torch.float64)
    r = float(options.landscape_range)
    return torch.linspace(-r, r, n, dtype=torch.float64)


def analyze(checkpoints: Sequence[str | Path] | Sequence[LoadedCheckpoint],
            options: AnalyzeOptions | None = None) -> dict:
    """Analyse checkpoints (paths/run directories, or :func:`load_checkpoints` output) and return
    the ``analysis.json`` dict. Writes nothing. On CUDA every product runs in full float32
    (TF32 off while it runs), so the numbers match the CPU's to rounding."""
    with exact_float32():
        return _analyze(checkpoints, options)


def _analyze(checkpoints: Sequence[str | Path] | Sequence[LoadedCheckpoint],
             options: AnalyzeOptions | None) -> dict:
    from tqdm.auto import tqdm

    options = options or AnalyzeOptions()
    if checkpoints and all(isinstance(c, LoadedCheckpoint) for c in checkpoints):
        loaded = list(checkpoints)
        options.validate()
    else:
        loaded = load_checkpoints(checkpoints, options)
    torch.manual_seed(options.seed)
    loss_fn = nn.CrossEntropyLoss()
    stages = _stages(options)
    saved_threads = torch.get_num_threads()
    set_threads(options.threads, max(sum(p.numel() for p in ck.model.parameters())
                                     for ck in loaded), next(loaded[0].model.parameters()).device)
    bar = tqdm(total=len(loaded) * len(stages) + (options.interpolate is not None),
               disable=not options.progress or not distributed.is_main_process(),
               desc="analyze", unit="stage", file=sys.stderr)
    entries = []
    batches_of: dict[str, SubsetBatches] = {}
    try:
        for ck in loaded:
            batches = _batches_for(ck, options)
            batches_of[ck.name] = batches
            entry = _entry_header(ck, batches.num_samples)
            op = None  # one HessianOperator per checkpoint, shared by its Hessian stages
            for stage in stages:
                bar.set_description(f"{ck.name}: {stage}")
                if op is None and stage in HESSIAN_STAGES:
                    op = _hessian_operator(ck, batches, loss_fn, options)
                entry.update(_run_stage(stage, ck, batches, loss_fn, options, op))
                bar.update()
            op = None  # frees its cached gradient graphs before the next checkpoint
            entries.append(entry)
        interpolation = None
        if options.interpolate is not None:
            a, b = _interpolation_pair(loaded, options.interpolate)
            bar.set_description(f"interpolate {a.name} -> {b.name}")
            result = landscape.interpolate(
                a.model, a.model.state_dict(), b.model.state_dict(), loss_fn,
                batches_of[a.name], _grid(options, "interpolation"), mode=options.mode,
                bn=options.bn, distributed=distributed.world_size() > 1)
            interpolation = {"from": a.name, "to": b.name, **_lists(result)}
            bar.update()
    finally:
        bar.close()
        torch.set_num_threads(saved_threads)  # a library call leaves the process as it was
    return _jsonable({
        "flatlab_version": flatlab.__version__,
        "command": options.command,
        "samples": options.samples if options.samples is not None else "all",
        "seed": options.seed,
        "mode": options.mode,
        "batch_size": options.batch_size,
        "landscape_bn": options.bn,
        "landscape_range": options.landscape_range,
        "checkpoints": entries,
        "interpolation": interpolation,
    })


def _batches_for(ck: LoadedCheckpoint, options: AnalyzeOptions) -> SubsetBatches:
    data = ck.dataset
    indices = sample_indices(len(data.y_train), options.samples, options.seed)
    device = next(ck.model.parameters()).device
    return SubsetBatches(data.x_train, data.y_train, indices, options.batch_size, device)


def _entry_header(ck: LoadedCheckpoint, num_samples: int) -> dict:
    meta = ck.metadata
    return {
        "name": ck.name,
        "path": str(ck.path),
        "run_dir": str(ck.run_dir) if ck.run_dir is not None else None,
        "model": meta.get("model"),
        "dataset": meta.get("dataset"),
        "optimizer": meta.get("optimizer"),
        "epoch": meta.get("epoch"),
        "grad_evals": meta.get("grad_evals"),
        "seed": meta.get("seed"),
        "metrics": meta.get("metrics") or {},
        "num_samples": num_samples,
        "loss": None, "accuracy": None,
        "trace": None, "trace_stderr": None, "trace_matvecs": None, "trace_method": None,
        "trace_per_layer": None,
        "eigenvalues": None, "eigenvalue_residuals": None, "eigen_converged": None,
        "eigen_matvecs": None,
        "density": None,
        "landscape_1d": None,
        "landscape_2d": None,
    }


def _hessian_operator(ck: LoadedCheckpoint, batches: SubsetBatches, loss_fn,
                      options: AnalyzeOptions):
    """The checkpoint's Hessian on the analysis subset; under torchrun each rank takes a shard
    of the samples and every product is all-reduced."""
    from flatlab import hessian

    if distributed.world_size() > 1:
        shard = SubsetBatches(batches.x, batches.y, distributed.shard(batches.indices),
                              batches.batch_size, batches.device)
        return hessian.HessianOperator(ck.model, loss_fn, shard, mode=options.mode,
                                       distributed=True)
    return hessian.HessianOperator(ck.model, loss_fn, batches, mode=options.mode)


def _run_stage(stage: str, ck: LoadedCheckpoint, batches: SubsetBatches, loss_fn,
               options: AnalyzeOptions, op) -> dict:
    """One measurement of one checkpoint. The Hessian stages get the checkpoint's operator
    ``op``, shared so that they build its cached gradient graphs once (same numbers)."""
    model = ck.model
    # Under torchrun, loss and landscape points are split across ranks (each rank sees the whole
    # subset); Hessian products shard the samples and all-reduce.
    spread = distributed.world_size() > 1
    if stage == "loss":
        at = landscape.evaluate_points(model, loss_fn, batches, torch.zeros(1, 0), [],
                                       mode=options.mode, distributed=spread)
        return {"loss": float(at["loss"][0]), "accuracy": float(at["accuracy"][0])}
    if stage.startswith("landscape"):
        kind = stage.split()[1]
        gen = torch.Generator().manual_seed(options.seed)
        kwargs = dict(mode=options.mode, bn=options.bn, progress=False, distributed=spread)
        if kind == "1d":
            direction = landscape.random_direction(model, generator=gen)
            result = landscape.slice_1d(model, loss_fn, batches, direction,
                                        _grid(options, "1d"), **kwargs)
        else:
            dir_x = landscape.random_direction(model, generator=gen)
            dir_y = landscape.random_direction(model, generator=gen)
            grid = _grid(options, "2d")
            result = landscape.slice_2d(model, loss_fn, batches, dir_x, dir_y, grid, grid,
                                        **kwargs)
        return {f"landscape_{kind}": _lists(result)}

    from flatlab import hessian

    if stage == "trace":
        res = hessian.trace(op, num_matvecs=options.trace_matvecs, method=options.trace_method,
                            seed=options.seed)
        per_layer = {name: {"estimate": float(est), "stderr": float(err)}
                     for name, (est, err) in (getattr(res, "per_param", None) or {}).items()}
        return {"trace": float(res.estimate), "trace_stderr": float(res.stderr),
                "trace_matvecs": int(res.num_matvecs), "trace_method": str(res.method),
                "trace_per_layer": per_layer}
    if stage == "eigenvalues":
        k = min(options.eigenvalues, op.size)
        res = hessian.top_eigenvalues(op, k=k, tol=options.eigen_tol, seed=options.seed)
        return {"eigenvalues": _floats(res.eigenvalues),
                "eigenvalue_residuals": _floats(res.residuals),
                "eigen_converged": [bool(c) for c in _tolist(res.converged)],
                "eigen_matvecs": int(res.matvecs)}
    if stage == "density":
        res = hessian.spectral_density(op, num_runs=options.density_runs,
                                       num_steps=options.density_steps, seed=options.seed)
        return {"density": {"grid": _floats(res.grid), "density": _floats(res.density),
                            "nodes": _tolist(res.nodes), "weights": _tolist(res.weights)}}
    raise AssertionError(stage)


def _tolist(value) -> Any:
    if isinstance(value, Tensor):
        return value.detach().cpu().tolist()
    if hasattr(value, "tolist"):
        return value.tolist()
    return list(value)


def _floats(value) -> list:
    return [float(v) for v in _tolist(value)]


def _lists(result: Mapping[str, Tensor]) -> dict:
    return {key: _tolist(value) for key, value in result.items()}


def _jsonable(obj: Any) -> Any:
    """Plain JSON values: NaN and infinities become None (JSON has no spelling for them)."""
    if isinstance(obj, Mapping):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, Tensor):
        return _jsonable(obj.detach().cpu().tolist())
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if hasattr(obj, "item") and not isinstance(obj, str | bytes):  # numpy scalars
        return _jsonable(obj.item())
    return obj


# --------------------------------------------------------------------------- outputs


def dumps_json(obj: Any, indent: str = "  ", _level: int = 0) -> str:
    """JSON with objects indented and every list of numbers on one line (a 1000-point density
    stays one line, not 1000). NaN is refused: run :func:`_jsonable` first."""
    pad, inner = indent * _level, indent * (_level + 1)
    if isinstance(obj, Mapping) and obj:
        items = [f"{inner}{json.dumps(str(k))}: {dumps_json(v, indent, _level + 1)}"
                 for k, v in obj.items()]
        return "{\n" + ",\n".join(items) + "\n" + pad + "}"
    if isinstance(obj, list) and any(isinstance(v, Mapping | list) and v for v in obj):
        if all(isinstance(v, list) and not any(isinstance(w, Mapping | list) for w in v)
               for v in obj):  # a matrix: one row per line
            rows = [inner + json.dumps(v, allow_nan=False) for v in obj]
        else:
            rows = [inner + dumps_json(v, indent, _level + 1) for v in obj]
        return "[\n" + ",\n".join(rows) + "\n" + pad + "]"
    return json.dumps(obj, allow_nan=False)


def summary_rows(analysis: Mapping) -> list[dict]:
    """``summary.csv`` rows: one per checkpoint, ``lambda_1..lambda_k`` for the top-k."""
    k = max((len(ck.get("eigenvalues") or []) for ck in analysis["checkpoints"]), default=0)
    rows = []
    for ck in analysis["checkpoints"]:
        metrics = ck.get("metrics") or {}
        row = {"name": ck["name"], "optimizer": (ck.get("optimizer") or {}).get("name"),
               "epoch": ck.get("epoch"), "grad_evals": ck.get("grad_evals"),
               "test_acc": metrics.get("test_acc"), "train_loss": metrics.get("train_loss"),
               "loss": ck.get("loss"), "accuracy": ck.get("accuracy"), "trace": ck.get("trace"),
               "trace_stderr": ck.get("trace_stderr")}
        eig = ck.get("eigenvalues") or []
        for i in range(k):
            row[f"lambda_{i + 1}"] = eig[i] if i < len(eig) else None
        rows.append(row)
    return rows


def summary_csv(analysis: Mapping) -> str:
    rows = summary_rows(analysis)
    columns = list(SUMMARY_COLUMNS) + [c for c in (rows[0] if rows else {})
                                       if c not in SUMMARY_COLUMNS]
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: ("" if v is None else repr(v) if isinstance(v, float) else v)
                         for k, v in row.items()})
    return buf.getvalue()


def plot_path(out_dir: Path, name: str, figure: str) -> Path:
    """``out_dir/plots/<name>/<figure>.png`` with unsafe characters of ``name`` replaced."""
    safe = "/".join(re.sub(r"[^A-Za-z0-9._+-]", "_", part) or "_"
                    for part in name.split("/") if part not in ("", ".", ".."))
    return out_dir / PLOTS_DIR / (safe or "_") / f"{figure}.png"


def write_figures(analysis: Mapping, out_dir: Path) -> list[Path]:
    """Per-checkpoint PNGs (density, eigenvalues, 1-D and 2-D slices) and the interpolation."""
    from flatlab import report

    colors = report.checkpoint_colors(analysis["checkpoints"])
    written = []
    drawers = (("eigenvalues", report.plot_eigenvalues), ("density", report.plot_density),
               ("landscape_1d", report.plot_slices_1d), ("landscape_2d", report.plot_slices_2d))
    for ck in analysis["checkpoints"]:
        for figure, draw in drawers:
            fig = draw([ck], colors)
            if fig is not None:
                path = plot_path(out_dir, ck["name"], figure)
                report.save_figure(fig, path)
                written.append(path)
    fig = report.plot_interpolation(analysis.get("interpolation"), colors)
    if fig is not None:
        path = out_dir / PLOTS_DIR / "interpolation.png"
        report.save_figure(fig, path)
        written.append(path)
    return written


def write_outputs(analysis: Mapping, out_dir: str | Path, *, report: bool = False,
                  baseline: str | None = None, figures: bool = True) -> Path:
    """Write figures (``plots/NAME/*.png``, unless ``figures=False``), ``summary.csv``,
    ``analysis.json`` (last, each atomically) and with ``report`` the comparison report
    (``flatlab.report.write_report``). Returns the JSON path."""
    out_dir = Path(out_dir)
    if figures:
        write_figures(analysis, out_dir)
    atomic_write_text(out_dir / SUMMARY_CSV, summary_csv(analysis))
    path = out_dir / ANALYSIS_JSON
    atomic_write_text(path, dumps_json(analysis) + "\n")
    if report:
        from flatlab.report import write_report

        write_report(analysis, out_dir, baseline=baseline)
    return path


def default_out_dir(loaded: Sequence[LoadedCheckpoint]) -> Path:
    """One run directory -> ``RUN/analysis``; otherwise ``analysis/`` beside the first run
    directory (``runs/a``, ``runs/b`` -> ``runs/analysis``) or beside the first loose file."""
    first = loaded[0]
    if len(loaded) == 1 and first.run_dir is not None:
        return first.run_dir / "analysis"
    anchor = first.run_dir if first.run_dir is not None else first.path
    return anchor.parent / "analysis"


# --------------------------------------------------------------------------- command line


def _samples(text: str) -> int | None:
    if text == "all":
        return None
    try:
        value = int(text)
    except ValueError:
        raise FlatlabError(f"--samples must be a positive integer or 'all', got {text!r}") \
            from None
    if value < 1:
        raise FlatlabError(f"--samples must be a positive integer or 'all', got {text!r}")
    return value


def _int_at_least(minimum: int, flag: str):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise FlatlabError(f"{flag} must be an integer >= {minimum}, got {text!r}") from None
        if value < minimum:
            raise FlatlabError(f"{flag} must be an integer >= {minimum}, got {text!r}")
        return value
    return parse


def _positive_float(flag: str):
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise FlatlabError(f"{flag} must be a positive number, got {text!r}") from None
        if not (math.isfinite(value) and value > 0):
            raise FlatlabError(f"{flag} must be a positive number, got {text!r}")
        return value
    return parse


def build_parser() -> ArgumentParser:
    p = ArgumentParser(
        prog="flatlab.analyze",
        description="Hessian trace, top eigenvalues, spectral density and loss landscapes of "
                    "flatlab checkpoints. With none of --trace/--eigenvalues/--density/"
                    "--landscape: trace, top-5 eigenvalues, density and a 1-D slice.")
    p.add_argument("checkpoints", nargs="+", metavar="CHECKPOINT_OR_RUN_DIR")
    what = p.add_argument_group("what to compute")
    what.add_argument("--trace", action="store_true", help="Hessian trace with standard error")
    what.add_argument("--eigenvalues", type=_int_at_least(1, "--eigenvalues"), metavar="K",
                      help="top-K Hessian eigenvalues (Lanczos)")
    what.add_argument("--density", action="store_true", help="spectral density (SLQ)")
    what.add_argument("--landscape", action="append", choices=LANDSCAPES,
                      help="loss slice along random filter-normalised directions "
                           "(repeat for both)")
    what.add_argument("--interpolate", nargs=2, metavar=("A", "B"),
                      help="loss on the straight line between two of the checkpoints "
                           "(names or paths)")
    how = p.add_argument_group("how")
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
    how.add_argument("--data-dir", default=None)
    how.add_argument("--trust-pickle", action="store_true",
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
    chosen = args.trace or args.eigenvalues is not None or args.density or args.landscape
    options = AnalyzeOptions(
        samples=args.samples, seed=args.seed, mode=args.mode, batch_size=args.batch_size,
        trace_matvecs=args.trace_matvecs, trace_method=args.trace_method,
        density_runs=args.density_runs, density_steps=args.density_steps,
        grid_points=args.grid_points, landscape_range=args.landscape_range, bn=args.bn,
        interpolate=tuple(args.interpolate) if args.interpolate else None, device=args.device,
        threads=args.threads,
        data_dir=args.data_dir, trust_pickle=args.trust_pickle, progress=not args.no_progress,
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


if __name__ == "__main__":
    raise SystemExit(run_cli(main, prog="flatlab.analyze"))
