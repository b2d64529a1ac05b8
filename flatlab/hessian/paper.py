r"""The paper's curvature quantities, as its official code computes them, each named for what it is.

Ju, Li, Zhang (arXiv 2306.08553) report a Hessian trace and a "top eigenvalue" measured by
``exps_on_image_datasets/utils/hessian.py`` of VirtuosoResearch/Noise-stability-optimization
(``get_layers``, ``compute_hessians_trace``, ``compute_eigenvalue``; the version with the
signature ``(model, loss, device, ...)`` called by ``compute_hessian_traces.py``, commit
6909338). Neither is the full-Hessian quantity flatlab reports as ``trace`` / ``lambda1``:

* **parameters** (:func:`paper_parameters`): the *weights* of the convolutions and of the
  classification head only; no biases, no normalisation layers;
* **trace** (:func:`paper_trace`): Hutchinson with Rademacher probes over those weights, one
  probe at a time, stopping when the running mean changes by less than ``tol = 1e-3``
  relative, or after 100 probes:
  :math:`|\bar t_m - \bar t_{m-1}| < 10^{-3} (|\bar t_{m-1}| + 10^{-6})` with
  :math:`\bar t_0 = 0`;
* **top eigenvalue** (:func:`paper_top_eigenvalue`, ``lambda_paper``): power iteration in which
  each layer's block of the direction is normalised on its own,
  :math:`v_l \leftarrow (Hv)_l / (\lVert (Hv)_l \rVert + 10^{-6})`, reporting the sum of the
  per-layer Rayleigh quotients :math:`\sum_l \langle (Hv)_l, v_l \rangle`. For a
  block-diagonal :math:`H` this converges to :math:`\sum_l \lambda_{\max}(H_{ll})`; for a
  rank-one :math:`H = \lambda u u^\top` it is :math:`\lambda (\sum_l \lVert u_l \rVert)^2`,
  up to :math:`L \lambda` with :math:`L` layers: closer to a trace than to
  :math:`\lambda_{\max}`;
* the official script evaluates both on each minibatch's Hessian (eval mode, training split,
  until a sample budget is spent) and reports the mean over batches (:func:`batch_mean`).
  For the trace that mean is the trace of the average Hessian (equal batch sizes); for
  ``lambda_paper`` it is not, so the batch size is part of the definition.

:func:`norm_trace` is flatlab's scale-aware companion,
:math:`\sum_l \lVert W_l \rVert^2 \operatorname{tr}(H_{ll}) / n_l`: for a convolution
followed by BatchNorm, :math:`f` is invariant to the scale of :math:`W_l`, so
:math:`\operatorname{tr} H_{ll} \propto 1/\lVert W_l \rVert^2` and a raw trace falls just
because the weights grew; the product does not.

Every function takes any operator with ``size``, ``dtype``, ``device``, ``matvec``; the layer
blocks come from its ``param_names`` / ``param_shapes`` (:class:`HessianOperator`, or
:class:`DenseOperator` with those arguments). Extra memory: a few vectors of ``P`` float64
(8 bytes per parameter each) and, for the trace, one block of ``block_size`` probes.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from flatlab.errors import FlatlabError
from flatlab.hessian._common import (
    apply,
    block_sizes,
    check_operator,
    gaussian,
    generator,
    param_slices,
    rademacher,
)
from flatlab.hessian.trace import TraceResult

__all__ = ["NormTraceResult", "PaperEigenResult", "batch_mean", "norm_trace",
           "paper_parameters", "paper_top_eigenvalue", "paper_trace"]

_CONVOLUTIONS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_SHORTCUT_NAMES = ("downsample", "shortcut")
_EPS = 1e-6  # the official code's guard, in both normalisation and stopping rules


def paper_parameters(model: nn.Module, *, skip_shortcuts: bool = False) -> list[str]:
    """Names of the parameters the paper measures: every convolution's ``weight`` (1-D, 2-D,
    3-D) and the ``weight`` of the head, the last ``nn.Linear`` in module order.

    Official rule (``get_layers``): ``Conv2d`` modules whose name contains ``"conv"`` plus the
    ``Linear`` named ``pred_head``. On torchvision/timm ResNets the name test also drops the
    1x1 shortcut convolutions (``downsample.0``); ``skip_shortcuts=True`` drops convolutions
    whose name contains ``downsample`` or ``shortcut`` to reproduce that. Pass the result as
    ``HessianOperator(..., params=paper_parameters(model))``.
    """
    names = [f"{prefix}.weight" for prefix, module in model.named_modules()
             if isinstance(module, _CONVOLUTIONS) and module.weight is not None
             and not (skip_shortcuts and any(s in prefix for s in _SHORTCUT_NAMES))]
    heads = [prefix for prefix, module in model.named_modules() if isinstance(module, nn.Linear)]
    if heads:
        names.append(f"{heads[-1]}.weight")
    if not names:
        raise FlatlabError(f"{type(model).__name__} has no convolution and no nn.Linear: "
                           "the paper's parameter selection is empty")
    order = {name: i for i, (name, _) in enumerate(model.named_parameters())}
    return sorted((n for n in names if n in order), key=order.__getitem__)


def _blocks(op: Any) -> list[tuple[str, slice]]:
    return param_slices(op) or [("all", slice(0, op.size))]


def paper_trace(op: Any, *, max_probes: int = 100, tol: float = 1e-3, seed: int = 0,
                block_size: int = 8) -> TraceResult:
    r"""The official trace estimate: Hutchinson, stopping on a small relative change.

    Probe :math:`m` adds :math:`t_m = z_m^\top H z_m` (Rademacher :math:`z_m`); the estimate
    is the mean of the first :math:`m` values for the first :math:`m` with
    :math:`|\bar t_m - \bar t_{m-1}| < \mathrm{tol}\,(|\bar t_{m-1}| + 10^{-6})`
    (:math:`\bar t_0 = 0`), or :math:`m` = ``max_probes``. ``stderr`` is
    :math:`s/\sqrt m` over those values, ``per_param`` the per-layer means (as the official
    per-layer traces). Probes are computed ``block_size`` at a time (one pass over the data
    for the block) and drawn one by one, so the result does not depend on ``block_size``;
    ``num_matvecs`` counts every product computed (up to ``block_size - 1`` past the stop).

    >>> import torch
    >>> from flatlab.hessian import DenseOperator
    >>> result = paper_trace(DenseOperator(torch.diag(torch.arange(1.0, 5.0).double())))
    >>> result.estimate, len(result.samples)  # z^T D z = tr D for every Rademacher z
    (10.0, 2)
    """
    check_operator(op)
    if max_probes < 1 or block_size < 1 or not tol > 0:
        raise FlatlabError(f"paper_trace needs max_probes >= 1, block_size >= 1 and tol > 0; "
                           f"got {max_probes}, {block_size}, {tol}")
    gen, blocks = generator(seed), _blocks(op)
    samples: list[Tensor] = []
    parts: list[Tensor] = []
    previous, stop, computed = 0.0, None, 0
    for width in block_sizes(max_probes, block_size):
        probes = torch.cat([rademacher(op.size, 1, gen, op.device) for _ in range(width)], dim=1)
        products = probes * apply(op, probes)
        computed += width
        samples.append(products.sum(dim=0).cpu())
        parts.append(torch.stack([products[sl].sum(dim=0) for _, sl in blocks]).cpu())
        values = torch.cat(samples)
        for m in range(len(values) - width + 1, len(values) + 1):
            running = float(values[:m].mean())
            if abs(running - previous) / (abs(previous) + _EPS) < tol:
                stop = m
                break
            previous = running
        if stop is not None:
            break
    used = stop or max_probes
    values, per_block = torch.cat(samples)[:used], torch.cat(parts, dim=1)[:, :used]

    def mean_and_stderr(x: Tensor) -> tuple[float, float]:
        return float(x.mean()), float(x.std() / math.sqrt(used)) if used > 1 else math.nan

    estimate, stderr = mean_and_stderr(values)
    per_param = ({name: mean_and_stderr(per_block[i]) for i, (name, _) in enumerate(blocks)}
                 if param_slices(op) else {})
    return TraceResult(estimate, stderr, computed, "hutchinson", per_param, 0.0, values)


@dataclass(frozen=True)
class PaperEigenResult:
    """Result of :func:`paper_top_eigenvalue` (``lambda_paper``) or :func:`batch_mean`.

    ``estimate``: the sum of ``per_param`` (per-layer Rayleigh quotients); ``stderr``: NaN
    for one operator, the standard error over batches for :func:`batch_mean`;
    ``iterations`` (= products), ``converged`` and ``relative_change`` (of the sum at the
    last iteration) describe the power iteration (summed / all / largest over batches).
    """

    estimate: float
    per_param: dict[str, float] = field(default_factory=dict)
    iterations: int = 0
    converged: bool = False
    relative_change: float = math.nan
    stderr: float = math.nan


def _normalise_blocks(v: Tensor, blocks: list[tuple[str, slice]]) -> Tensor:
    out = torch.empty_like(v)
    for _, sl in blocks:
        out[sl] = v[sl] / (float(torch.linalg.vector_norm(v[sl])) + _EPS)
    return out


def paper_top_eigenvalue(op: Any, *, max_iter: int = 100, tol: float = 1e-8,
                         seed: int = 0) -> PaperEigenResult:
    r"""``lambda_paper``: the official per-layer-normalised power iteration (module doc).

    From a Gaussian start (each block normalised), every iteration normalises each block
    :math:`v_l \leftarrow v_l / (\lVert v_l \rVert + 10^{-6})`, takes one product
    :math:`h = Hv` (the whole :math:`H`, cross-layer blocks included), records the quotients
    :math:`q_l = \langle h_l, v_l \rangle` and sets :math:`v_l \leftarrow h_l /
    (\lVert h_l \rVert + 10^{-6})`. It stops when :math:`|\sum q^{\text{prev}} - \sum q| <
    \mathrm{tol}\,(|\sum q^{\text{prev}}| + 10^{-6})` and then, like the official code,
    reports the previous iteration's :math:`q` (their difference is below ``tol``); else
    the last one after ``max_iter`` products. Defaults are the official ones (``tol=1e-8``;
    another version of the file uses ``1e-3``). Operators without ``param_names`` are one
    block: plain power iteration (largest-magnitude eigenvalue).

    >>> import torch
    >>> from flatlab.hessian import DenseOperator
    >>> h = torch.block_diag(torch.diag(torch.tensor([3.0, 1.0])), torch.diag(torch.tensor(
    ...     [0.5, 2.0, 0.1]))).double()
    >>> op = DenseOperator(h, param_names=["a", "b"], param_shapes=[(2,), (3,)])
    >>> round(paper_top_eigenvalue(op).estimate, 4)  # 3 + 2, while lambda_max(H) = 3
    5.0
    """
    check_operator(op)
    if max_iter < 1 or not tol > 0:
        raise FlatlabError(f"paper_top_eigenvalue needs max_iter >= 1 and tol > 0; got "
                           f"{max_iter}, {tol}")
    blocks = _blocks(op)
    v = _normalise_blocks(gaussian(op.size, 1, generator(seed), op.device)[:, 0], blocks)
    quotients: list[float] | None = None
    change, converged, iterations = math.nan, False, 0
    while iterations < max_iter:
        iterations += 1
        v = _normalise_blocks(v, blocks)  # the official orthnormal(vs, []) step
        h = apply(op, v[:, None])[:, 0]
        current = [float(h[sl] @ v[sl]) for _, sl in blocks]
        v = _normalise_blocks(h, blocks)
        if quotients is not None:
            change = abs(sum(quotients) - sum(current)) / (abs(sum(quotients)) + _EPS)
            if change < tol:
                converged = True
                break
        quotients = current
    assert quotients is not None
    per_param = {name: q for (name, _), q in zip(blocks, quotients, strict=True)}
    return PaperEigenResult(sum(quotients), per_param, iterations, converged, change)


def batch_mean(results: Sequence[PaperEigenResult]) -> PaperEigenResult:
    """The official aggregate over minibatches: the mean of per-batch results (per layer and
    in total), with the standard error of the mean over batches as ``stderr``."""
    if not results:
        raise FlatlabError("batch_mean needs at least one result")
    estimates = torch.tensor([r.estimate for r in results], dtype=torch.float64)
    stderr = (float(estimates.std() / math.sqrt(len(results))) if len(results) > 1
              else math.nan)
    per_param = {name: sum(r.per_param[name] for r in results) / len(results)
                 for name in results[0].per_param}
    return PaperEigenResult(float(estimates.mean()), per_param,
                            sum(r.iterations for r in results),
                            all(r.converged for r in results),
                            max(r.relative_change for r in results), stderr)


@dataclass(frozen=True)
class NormTraceResult:
    """Result of :func:`norm_trace`: ``estimate``, ``stderr`` (an upper bound, see there) and
    ``per_param`` (each layer's term :math:`\\lVert W_l\\rVert^2 \\operatorname{tr} H_{ll} /
    n_l`)."""

    estimate: float
    stderr: float
    per_param: dict[str, float]


def norm_trace(result: TraceResult, weights: Mapping[str, Tensor] | nn.Module,
               ) -> NormTraceResult:
    r"""Scale-aware trace :math:`\sum_l \lVert W_l \rVert^2 \operatorname{tr}(H_{ll}) / n_l`
    from a trace result's per-layer breakdown (``result.per_param``), with :math:`n_l` the
    number of entries of :math:`W_l` (``weights``: a model or ``{name: tensor}``).

    ``stderr`` is :math:`\sum_l c_l\,\mathrm{se}_l` with :math:`c_l = \lVert W_l\rVert^2/n_l`:
    the per-layer estimates share their probes and are correlated, and this sum bounds the
    standard error of the weighted sum whatever the correlations.
    """
    if not result.per_param:
        raise FlatlabError("norm_trace needs a per-layer trace: estimate it on an operator "
                           "with param_names (HessianOperator, or DenseOperator(param_names=))")
    tensors = dict(weights.named_parameters()) if isinstance(weights, nn.Module) else weights
    missing = [name for name in result.per_param if name not in tensors]
    if missing:
        raise FlatlabError(f"norm_trace: no weights given for {missing}")
    per_param, stderr = {}, 0.0
    for name, (estimate, se) in result.per_param.items():
        w = tensors[name].detach()
        scale = float(torch.linalg.vector_norm(w.double())) ** 2 / w.numel()
        per_param[name] = scale * estimate
        stderr += scale * se
    return NormTraceResult(sum(per_param.values()), stderr, per_param)
