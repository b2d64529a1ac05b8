"""Shared helpers of the estimators: seeded probes, operator checks, parameter slices."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from flatlab.errors import FlatlabError


def check_operator(op: Any) -> None:
    """Raise :class:`FlatlabError` unless ``op`` has ``size``, ``dtype``, ``device``, ``matvec``."""
    missing = [a for a in ("size", "dtype", "device", "matvec") if not hasattr(op, a)]
    if missing:
        raise FlatlabError(f"{type(op).__name__} is not a linear operator: it lacks "
                           f"{', '.join(missing)} (wrap a matrix in DenseOperator)")


def generator(seed: int) -> torch.Generator:
    """A CPU generator: the same seed gives the same probes on every rank and device."""
    return torch.Generator(device="cpu").manual_seed(int(seed))


def rademacher(size: int, columns: int, gen: torch.Generator, device: torch.device) -> Tensor:
    """``(size, columns)`` float64 matrix of independent +-1 entries."""
    signs = torch.randint(0, 2, (size, columns), generator=gen, dtype=torch.int8)
    return (signs.to(device=device, dtype=torch.float64) * 2.0) - 1.0


def gaussian(size: int, columns: int, gen: torch.Generator, device: torch.device) -> Tensor:
    """``(size, columns)`` float64 matrix of independent standard normal entries."""
    return torch.randn(size, columns, generator=gen, dtype=torch.float64).to(device)


def apply(op: Any, block: Tensor) -> Tensor:
    """``op.matvec`` on a float64 block, result float64 (operators return the input dtype)."""
    return op.matvec(block).to(torch.float64)


def param_slices(op: Any) -> list[tuple[str, slice]]:
    """``[(name, slice of the flat vector)]`` when ``op`` has ``param_names``/``param_shapes``."""
    names = getattr(op, "param_names", None)
    shapes = getattr(op, "param_shapes", None)
    if names is None or shapes is None:
        return []
    out, start = [], 0
    for name, shape in zip(names, shapes, strict=True):
        stop = start + torch.Size(shape).numel()
        out.append((name, slice(start, stop)))
        start = stop
    return out


def block_sizes(total: int, block_size: int) -> list[int]:
    """Split ``total`` products into blocks of at most ``block_size`` columns."""
    return [min(block_size, total - start) for start in range(0, total, block_size)]


def apply_blocked(op: Any, vectors: Tensor, block_size: int) -> Tensor:
    """``H @ vectors`` for a ``(P, m)`` float64 matrix, ``block_size`` columns per product."""
    out = torch.empty_like(vectors)
    start = 0
    for width in block_sizes(vectors.shape[1], block_size):
        out[:, start:start + width] = apply(op, vectors[:, start:start + width])
        start += width
    return out
