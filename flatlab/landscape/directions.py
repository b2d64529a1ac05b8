"""Directions in weight space (Li et al. 2018, "Visualizing the loss landscape of neural nets").

A direction is a dict ``name -> tensor`` (missing names mean zero).

- :func:`random_direction`: Gaussian, filter-normalised: each filter (slice along dim 0) of
  each weight is rescaled to the norm of the matching filter of the weight. Bias-like
  parameters (at most one dimension, or of a normalisation layer: the one rule of
  :func:`flatlab.evaluation.bias_and_norm_names`) are zero unless ``include_bias_bn=True``,
  in which case each such tensor is rescaled as a whole to the norm of the parameter.
- :func:`eigenvector_direction`: a flat Hessian eigenvector split into a dict.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn

from flatlab.errors import FlatlabError
from flatlab.evaluation import bias_and_norm_names

__all__ = ["random_direction", "eigenvector_direction", "excluded_parameter_names"]


def excluded_parameter_names(model: nn.Module) -> set[str]:
    """Names of the parameters Li et al. leave out of random directions: the bias-like ones
    (:func:`flatlab.evaluation.bias_and_norm_names`)."""
    return set(bias_and_norm_names(model))


def random_direction(model: nn.Module, *, generator: torch.Generator | None = None,
                     filter_normalize: bool = True,
                     include_bias_bn: bool = False) -> dict[str, Tensor]:
    """A Gaussian direction over every parameter of ``model`` (Li et al. 2018).

    One ``randn`` draw per parameter, in ``named_parameters()`` order, from ``generator`` (a
    CPU generator; ``None`` uses torch's global one), so the same generator state gives the
    same direction on every device and whatever the flags. With ``filter_normalize`` each
    filter ``d[i]`` of a weight with >= 2 dimensions is scaled to ``||w[i]|| / ||d[i]||``.
    Bias-like parameters (see :func:`excluded_parameter_names`) are zero unless
    ``include_bias_bn``, then scaled as a whole to ``||w|| / ||d||``. Parameters that do not
    require grad are zero. Returns detached tensors on each parameter's device.
    """
    excluded = bias_and_norm_names(model)
    direction: dict[str, Tensor] = {}
    for name, param in model.named_parameters():
        w = param.detach()
        draw_dtype = w.dtype if w.dtype in (torch.float32, torch.float64) else torch.float32
        d = torch.randn(w.shape, generator=generator, dtype=draw_dtype, device="cpu")
        d = d.to(device=w.device, dtype=w.dtype)
        if not param.requires_grad or (name in excluded and not include_bias_bn):
            d.zero_()
        elif filter_normalize:
            if name in excluded:  # bias-like: as a whole
                d.mul_(w.norm() / (d.norm() + 1e-10))
            else:
                w_norm = w.flatten(1).norm(dim=1)
                d_norm = d.flatten(1).norm(dim=1)
                d.mul_((w_norm / (d_norm + 1e-10)).view(-1, *([1] * (w.dim() - 1))))
        direction[name] = d
    return direction


def eigenvector_direction(op: Any, vector: Tensor) -> dict[str, Tensor]:
    """Split a flat vector over ``op``'s parameters (``op.param_names``, ``op.param_shapes``,
    e.g. a column of ``top_eigenvalues(op).eigenvectors``) into a direction dict."""
    vector = torch.as_tensor(vector)
    if vector.dim() == 2 and vector.shape[1] == 1:
        vector = vector[:, 0]
    shapes = [torch.Size(s) for s in op.param_shapes]
    total = sum(math.prod(s) for s in shapes)
    if vector.dim() != 1 or vector.numel() != total:
        raise FlatlabError(f"vector of shape {tuple(vector.shape)} does not match the "
                           f"operator's {total} parameters")
    pieces = torch.split(vector.detach(), [math.prod(s) for s in shapes])
    return {name: piece.reshape(shape)
            for name, shape, piece in zip(op.param_names, shapes, pieces, strict=True)}
