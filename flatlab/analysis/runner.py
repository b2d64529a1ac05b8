"""``analyze``: loaded checkpoints -> :class:`~flatlab.analysis.results.Analysis`.

For each checkpoint, on a fixed seeded subset of ``samples`` training examples (the same
examples for every checkpoint on the same data), the chosen stages run in order:

- ``loss``: the dataset-average loss (batches weighted by n_b / N) and accuracy at W;
- ``trace``: Hutch++ (or Hutchinson) estimate of tr(H) with its standard error, per layer too;
- ``eigenvalues``: top-k eigenvalues of the full Hessian (Lanczos), residuals, convergence;
- ``density``: spectral density (stochastic Lanczos quadrature);
- ``paper``: the paper's trace (conv + head weights) and per-layer power-iteration quantity;
- ``landscape 1d`` / ``landscape 2d``: loss and accuracy along one / two filter-normalised random
  directions (Li et al. 2018), alpha in ``[-range, range]``;

then ``interpolation``: the straight line between two of the checkpoints. The loss is
cross-entropy, the model in ``mode`` ("eval": stored BatchNorm statistics, no dropout). Every
random thing derives from ``seed``. Each stage is a function of a :class:`Measurement` returning
the :class:`CheckpointResult` fields it fills; :data:`STAGES` maps stage names to them. The
Hessian stages share the checkpoint's one ``HessianOperator`` (its cached gradient graphs are
built once; the numbers are those of each stage alone).

Under torchrun, loss and landscape points are split across ranks (each rank sees the whole
subset) and gathered; Hessian products shard the samples and all-reduce.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

import flatlab
from flatlab import distributed, hessian, landscape
from flatlab.analysis.loading import (
    LoadedCheckpoint,
    SubsetBatches,
    analysis_batches,
    interpolation_pair,
    load_checkpoints,
)
from flatlab.analysis.options import AnalyzeOptions
from flatlab.analysis.results import (
    Analysis,
    CheckpointResult,
    Density,
    Interpolation,
    LayerTrace,
    Slice1D,
    Slice2D,
    finite,
    floats,
    matrix,
)
from flatlab.errors import FlatlabError
from flatlab.runtime import exact_float32, set_threads

Forward = Callable[[nn.Module, Any], Any]  # forward(model, x) -> outputs, instead of model(x)


@dataclass
class Measurement:
    """What a stage measures on: one checkpoint, its analysis batches, the loss and options."""

    checkpoint: LoadedCheckpoint
    batches: SubsetBatches
    loss_fn: Callable[[Tensor, Tensor], Tensor]
    options: AnalyzeOptions
    forward: Forward | None = None
    _operator: Any = field(default=None, repr=False)

    @property
    def model(self) -> nn.Module:
        return self.checkpoint.model

    @property
    def spread(self) -> bool:
        """Under torchrun: evaluation points are split across ranks."""
        return distributed.world_size() > 1

    def forward_kwargs(self) -> dict:
        """``{"forward": f}`` when the caller gave one (passed to every evaluation)."""
        return {} if self.forward is None else {"forward": self.forward}

    def operator(self):
        """The checkpoint's Hessian on the analysis subset, built on first use and shared by
        the Hessian stages; under torchrun each rank takes a shard of the samples."""
        if self._operator is None:
            spread = self.spread
            data = self.batches.shard() if spread else self.batches
            extra = {"distributed": True} if spread else {}
            self._operator = hessian.HessianOperator(self.model, self.loss_fn, data,
                                                     mode=self.options.mode,
                                                     **extra, **self.forward_kwargs())
        return self._operator

    def release(self) -> None:
        """Drop the operator (and its cached gradient graphs)."""
        self._operator = None


Stage = Callable[[Measurement], dict[str, Any]]


def measure_loss(m: Measurement) -> dict[str, Any]:
    at = landscape.evaluate_points(m.model, m.loss_fn, m.batches, torch.zeros(1, 0), [],
                                   mode=m.options.mode, distributed=m.spread,
                                   **m.forward_kwargs())
    return {"loss": finite(at["loss"][0]), "accuracy": finite(at["accuracy"][0])}


def measure_trace(m: Measurement) -> dict[str, Any]:
    res = hessian.trace(m.operator(), num_matvecs=m.options.trace_matvecs,
                        method=m.options.trace_method, seed=m.options.seed)
    per_layer = {name: LayerTrace(finite(est), finite(err))
                 for name, (est, err) in (getattr(res, "per_param", None) or {}).items()}
    return {"trace": finite(res.estimate), "trace_stderr": finite(res.stderr),
            "trace_matvecs": int(res.num_matvecs), "trace_method": str(res.method),
            "trace_per_layer": per_layer}


def measure_eigenvalues(m: Measurement) -> dict[str, Any]:
    op = m.operator()
    res = hessian.top_eigenvalues(op, k=min(m.options.eigenvalues, op.size),
                                  tol=m.options.eigen_tol, seed=m.options.seed)
    return {"eigenvalues": floats(_tolist(res.eigenvalues)),
            "eigenvalue_residuals": floats(_tolist(res.residuals)),
            "eigen_converged": tuple(bool(c) for c in _tolist(res.converged)),
            "eigen_matvecs": int(res.matvecs)}


def measure_density(m: Measurement) -> dict[str, Any]:
    res = hessian.spectral_density(m.operator(), num_runs=m.options.density_runs,
                                   num_steps=m.options.density_steps, seed=m.options.seed)
    return {"density": Density(floats(_tolist(res.grid)), floats(_tolist(res.density)),
                               matrix(_tolist(res.nodes)), matrix(_tolist(res.weights)))}


def _axis(options: AnalyzeOptions, kind: str) -> Tensor:
    start, stop, points = options.grid(kind)
    return torch.linspace(start, stop, points, dtype=torch.float64)


def _slice_kwargs(m: Measurement) -> dict[str, Any]:
    return dict(mode=m.options.mode, bn=m.options.bn, progress=False, distributed=m.spread,
                **m.forward_kwargs())


def measure_landscape_1d(m: Measurement) -> dict[str, Any]:
    gen = torch.Generator().manual_seed(m.options.seed)
    direction = landscape.random_direction(m.model, generator=gen)
    res = landscape.slice_1d(m.model, m.loss_fn, m.batches, direction, _axis(m.options, "1d"),
                             **_slice_kwargs(m))
    return {"landscape_1d": Slice1D(floats(_tolist(res["alphas"])), floats(_tolist(res["loss"])),
                                    floats(_tolist(res["accuracy"])))}


def measure_landscape_2d(m: Measurement) -> dict[str, Any]:
    gen = torch.Generator().manual_seed(m.options.seed)
    dir_x = landscape.random_direction(m.model, generator=gen)
    dir_y = landscape.random_direction(m.model, generator=gen)
    grid = _axis(m.options, "2d")
    res = landscape.slice_2d(m.model, m.loss_fn, m.batches, dir_x, dir_y, grid, grid,
                             **_slice_kwargs(m))
    return {"landscape_2d": Slice2D(floats(_tolist(res["alphas"])), floats(_tolist(res["betas"])),
                                    matrix(_tolist(res["loss"])),
                                    matrix(_tolist(res["accuracy"])))}


def _paper_operator(m: Measurement, batches: SubsetBatches):
    return hessian.HessianOperator(m.model, m.loss_fn, batches, mode=m.options.mode,
                                   params=hessian.paper_parameters(m.model),
                                   **m.forward_kwargs())


def measure_paper(m: Measurement) -> dict[str, Any]:
    """``trace_paper`` (Hutchinson over the convolution and head weights, stopping at a 1e-3
    relative change) and ``lambda_paper`` (the per-layer-normalised power iteration), as the
    paper's official code computes them (:mod:`flatlab.hessian.paper`): on the Hessian of the
    whole analysis subset, or with ``paper_batch_size`` on each batch of that many samples,
    averaged over batches (the official aggregate; the batch size is then part of the
    definition)."""
    if m.spread:
        raise FlatlabError("--paper-metrics runs in one process (not under torchrun)")
    size = m.options.paper_batch_size
    whole = m.batches
    parts = [whole] if size is None else [whole.subset(chunk)
                                          for chunk in whole.indices.split(size)]
    traces, eigens = [], []
    for part in parts:
        op = _paper_operator(m, part)
        traces.append(hessian.paper_trace(op, seed=m.options.seed))
        eigens.append(hessian.paper_top_eigenvalue(op, seed=m.options.seed))
    lam = eigens[0] if len(eigens) == 1 else hessian.batch_mean(eigens)
    if len(traces) == 1:
        trace, stderr = traces[0].estimate, traces[0].stderr
    else:  # the mean over batches, its standard error over batches
        values = torch.tensor([t.estimate for t in traces], dtype=torch.float64)
        trace, stderr = float(values.mean()), float(values.std() / len(values) ** 0.5)
    return {"trace_paper": finite(trace), "trace_paper_stderr": finite(stderr),
            "lambda_paper": finite(lam.estimate)}


STAGES: dict[str, Stage] = {
    "loss": measure_loss,
    "trace": measure_trace,
    "eigenvalues": measure_eigenvalues,
    "density": measure_density,
    "paper": measure_paper,
    "landscape 1d": measure_landscape_1d,
    "landscape 2d": measure_landscape_2d,
}


def planned_stages(options: AnalyzeOptions) -> list[str]:
    """The stage names ``options`` asks for, in the order they run."""
    chosen = {"loss": True, "trace": options.trace, "eigenvalues": options.eigenvalues > 0,
              "density": options.density, "paper": options.paper_metrics}
    chosen.update({f"landscape {kind}": kind in options.landscape for kind in ("1d", "2d")})
    return [name for name in STAGES if chosen.get(name)]


def run_stage(name: str, measurement: Measurement) -> dict[str, Any]:
    """One stage on one checkpoint: the result fields it fills."""
    return STAGES[name](measurement)


def analyze(checkpoints: Sequence[str | Path] | Sequence[LoadedCheckpoint],
            options: AnalyzeOptions | None = None, *, forward: Forward | None = None
            ) -> Analysis:
    """Analyse checkpoints (paths/run directories, or :func:`load_checkpoints` output); writes
    nothing. ``forward(model, x) -> outputs`` replaces ``model(x)`` in every evaluation
    (e.g. ``lambda m, x: m(**x).logits``). On CUDA every product runs in full float32 (TF32
    off while it runs), so the numbers match the CPU's to rounding."""
    with exact_float32():
        return _analyze(checkpoints, options or AnalyzeOptions(), forward)


def _analyze(checkpoints: Sequence[str | Path] | Sequence[LoadedCheckpoint],
             options: AnalyzeOptions, forward: Forward | None) -> Analysis:
    if checkpoints and all(isinstance(c, LoadedCheckpoint) for c in checkpoints):
        loaded = list(checkpoints)
        options.validate()
    else:
        loaded = load_checkpoints(checkpoints, options)
    torch.manual_seed(options.seed)
    loss_fn = nn.CrossEntropyLoss()
    stages = planned_stages(options)
    saved_threads = torch.get_num_threads()
    set_threads(options.threads, max(sum(p.numel() for p in ck.model.parameters())
                                     for ck in loaded), next(loaded[0].model.parameters()).device)
    bar = tqdm(total=len(loaded) * len(stages) + (options.interpolate is not None),
               disable=not options.progress or not distributed.is_main_process(),
               desc="analyze", unit="stage", file=sys.stderr)
    results, batches_of = [], {}
    try:
        for ck in loaded:
            m = Measurement(ck, analysis_batches(ck, options), loss_fn, options, forward)
            batches_of[ck.name] = m.batches
            fields: dict[str, Any] = {}
            for stage in stages:
                bar.set_description(f"{ck.name}: {stage}")
                fields.update(run_stage(stage, m))
                bar.update()
            m.release()  # frees the cached gradient graphs before the next checkpoint
            results.append(_result(ck, m.batches.num_samples, fields))
        interpolation = None
        if options.interpolate is not None:
            a, b = interpolation_pair(loaded, options.interpolate)
            bar.set_description(f"interpolate {a.name} -> {b.name}")
            res = landscape.interpolate(
                a.model, a.model.state_dict(), b.model.state_dict(), loss_fn, batches_of[a.name],
                _axis(options, "interpolation"), mode=options.mode, bn=options.bn,
                distributed=distributed.world_size() > 1,
                **({} if forward is None else {"forward": forward}))
            interpolation = Interpolation(a.name, b.name, floats(_tolist(res["alphas"])),
                                          floats(_tolist(res["loss"])),
                                          floats(_tolist(res["accuracy"])))
            bar.update()
    finally:
        bar.close()
        torch.set_num_threads(saved_threads)  # a library call leaves the process as it was
    return Analysis(
        checkpoints=tuple(results), flatlab_version=flatlab.__version__,
        command=options.command,
        samples=options.samples if options.samples is not None else "all", seed=options.seed,
        mode=options.mode, batch_size=options.batch_size, landscape_bn=options.bn,
        landscape_range=options.landscape_range, interpolation=interpolation,
        paper_batch_size=(options.paper_batch_size or "all") if options.paper_metrics else None)


def _result(ck: LoadedCheckpoint, num_samples: int, fields: dict[str, Any]) -> CheckpointResult:
    meta = ck.metadata
    return CheckpointResult(
        name=ck.name, path=str(ck.path),
        run_dir=str(ck.run_dir) if ck.run_dir is not None else None,
        model=meta.get("model"), dataset=meta.get("dataset"), optimizer=meta.get("optimizer"),
        epoch=meta.get("epoch"), grad_evals=meta.get("grad_evals"), seed=meta.get("seed"),
        metrics=meta.get("metrics") or {}, num_samples=num_samples, **fields)


def _tolist(value: Any) -> Any:
    if isinstance(value, Tensor):
        return value.detach().cpu().tolist()
    if hasattr(value, "tolist"):
        return value.tolist()
    return list(value)
