"""Loss landscapes: directions in weight space, 1-D slices, 2-D grids and interpolation.

A slice evaluates the dataset-average loss and accuracy at points

    W(c) = W0 + sum_j c_j d_j

where ``W0`` is the model's state (parameters and buffers), ``d_j`` are directions (dicts
name -> tensor, missing names mean zero) and ``c`` are the point's coordinates. The loss is
``sum_b n_b * loss_b / N`` over the batches of ``data``; batches, modes, ``forward`` and the
bias rule are those of :mod:`flatlab.evaluation`, shared with :mod:`flatlab.hessian`.

- :mod:`flatlab.landscape.directions`: random filter-normalised and eigenvector directions.
- :mod:`flatlab.landscape.points`: :func:`evaluate_points`, the engine every slice uses (the
  model is never copied or modified; chunks of points are vmapped).
- here: :func:`slice_1d`, :func:`slice_2d`, :func:`interpolate` (the straight line
  ``(1 - a) A + a B`` between two states, buffers too) and :func:`recompute_bn_stats`.

BatchNorm: ``bn="stored"`` (default) evaluates with the running statistics stored in the
model (eval mode). ``bn="recompute"`` first recomputes them at every point from ``data``: one
pass with only the BatchNorm layers in train mode (everything else, e.g. dropout, stays in
eval mode), the running mean and unbiased variance set to the average over batches of each
batch's statistics. That is what ``torch.optim.swa_utils.update_bn`` computes (momentum=None,
cumulative average) on a copy of the model at that point. See :func:`recompute_bn_stats`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from flatlab.errors import FlatlabError
from flatlab.evaluation import MODES, Forward
from flatlab.landscape.directions import (
    eigenvector_direction,
    excluded_parameter_names,
    random_direction,
)
from flatlab.landscape.points import (
    BN_MODES,
    Direction,
    LossFn,
    _Evaluator,
    _Points,
    evaluate_points,
)

__all__ = [
    "random_direction",
    "eigenvector_direction",
    "excluded_parameter_names",
    "evaluate_points",
    "slice_1d",
    "slice_2d",
    "interpolate",
    "recompute_bn_stats",
    "MODES",
    "BN_MODES",
]


def slice_1d(model: nn.Module, loss_fn: LossFn, data: Any, direction: Direction, alphas: Any,
             *, mode: str = "eval", bn: str = "stored", **kwargs: Any) -> dict[str, Tensor]:
    """Loss and accuracy along ``W + alpha d`` for each alpha in ``alphas``.

    Returns ``{"alphas", "loss", "accuracy"}`` (float64 CPU tensors). Extra keyword arguments
    (``forward``, ``chunk_size``, ``vectorize``, ``distributed``, ``progress``, ``base``) go to
    :func:`evaluate_points`.
    """
    alphas = torch.as_tensor(alphas, dtype=torch.float64).reshape(-1)
    result = evaluate_points(model, loss_fn, data, alphas[:, None], [direction], mode=mode,
                             bn=bn, **kwargs)
    return {"alphas": alphas, **result}


def slice_2d(model: nn.Module, loss_fn: LossFn, data: Any, dir_x: Direction, dir_y: Direction,
             alphas: Any, betas: Any, *, mode: str = "eval", bn: str = "stored",
             **kwargs: Any) -> dict[str, Tensor]:
    """Loss and accuracy on the grid ``W + alpha d_x + beta d_y``.

    Returns ``{"alphas", "betas", "loss", "accuracy"}`` with ``loss[i, j]`` at
    ``(alphas[i], betas[j])``; keyword arguments as :func:`slice_1d`.
    """
    alphas = torch.as_tensor(alphas, dtype=torch.float64).reshape(-1)
    betas = torch.as_tensor(betas, dtype=torch.float64).reshape(-1)
    grid_a, grid_b = torch.meshgrid(alphas, betas, indexing="ij")
    coords = torch.stack([grid_a.reshape(-1), grid_b.reshape(-1)], dim=1)
    result = evaluate_points(model, loss_fn, data, coords, [dir_x, dir_y], mode=mode, bn=bn,
                             **kwargs)
    shape = (len(alphas), len(betas))
    return {"alphas": alphas, "betas": betas, "loss": result["loss"].reshape(shape),
            "accuracy": result["accuracy"].reshape(shape)}


def interpolate(model: nn.Module, state_a: Mapping[str, Tensor], state_b: Mapping[str, Tensor],
                loss_fn: LossFn, data: Any, alphas: Any, *, mode: str = "eval",
                bn: str = "stored", **kwargs: Any) -> dict[str, Tensor]:
    """Loss and accuracy along ``(1 - alpha) A + alpha B`` between two states of ``model``'s
    architecture (``state_dict``-like: parameters and buffers). Floating-point buffers (BN
    running statistics) are interpolated too; integer ones are taken from ``A``. Computed as
    ``(1 - alpha) * A + alpha * B`` so alpha = 0 and 1 give exactly ``A`` and ``B``.
    """
    names = [n for n, _ in model.named_parameters()] + [n for n, _ in model.named_buffers()]
    for label, state in (("state_a", state_a), ("state_b", state_b)):
        missing = [n for n in names if n not in state]
        if missing:
            raise FlatlabError(f"{label} lacks {', '.join(missing[:5])}"
                               + (" ..." if len(missing) > 5 else ""))
    floating = [n for n in names if state_a[n].is_floating_point()]
    base = {n: (torch.zeros_like(state_a[n]) if n in floating else state_a[n]) for n in names}
    dir_a = {n: state_a[n] for n in floating}
    dir_b = {n: state_b[n] for n in floating}
    alphas = torch.as_tensor(alphas, dtype=torch.float64).reshape(-1)
    coords = torch.stack([1 - alphas, alphas], dim=1)
    result = evaluate_points(model, loss_fn, data, coords, [dir_a, dir_b], base=base, mode=mode,
                             bn=bn, **kwargs)
    return {"alphas": alphas, **result}


def recompute_bn_stats(model: nn.Module, data: Any, *, direction: Direction | None = None,
                       alpha: float = 0.0, base: Mapping[str, Tensor] | None = None,
                       forward: Forward | None = None) -> dict[str, Tensor]:
    """BatchNorm running statistics at ``base + alpha * direction`` recomputed from ``data``,
    as ``bn="recompute"`` uses them; the model is not changed.

    Equal to ``torch.optim.swa_utils.update_bn`` on a copy of the model at that point (with
    only the BatchNorm layers in train mode): running mean and unbiased variance averaged over
    batches, ``num_batches_tracked`` = number of batches. Returns every buffer of the model.
    """
    points = _Points(model, [direction or {}], base)
    evaluator = _Evaluator(model, _no_loss, data, points, mode="eval", bn="recompute",
                           forward=forward)
    buffers = evaluator.recomputed_buffers(torch.tensor([float(alpha)], dtype=torch.float64),
                                           stacked=False)
    return {**points.buffers, **buffers}


def _no_loss(outputs: Any, targets: Any) -> Tensor:
    """A scalar that ignores its inputs: recomputing statistics needs forward passes only."""
    return torch.zeros(())
