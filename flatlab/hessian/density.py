"""Spectral density by stochastic Lanczos quadrature (SLQ).

The spectral density :math:`\\phi(t) = \\frac1P \\sum_{i=1}^P \\delta(t - \\lambda_i)` is
estimated (Ubaru, Chen, Saad 2017; Ghorbani, Krishnan, Xiao 2019) from ``num_runs``
independent Lanczos runs started at normalised Rademacher vectors :math:`v_r`. For any
:math:`f`, :math:`v_r^\\top f(H) v_r \\approx \\sum_i \\tau_{ri}^2 f(\\theta_{ri})` where
:math:`\\theta_{ri}` are the eigenvalues (*nodes*) of the run's tridiagonal :math:`T_r` and
:math:`\\tau_{ri}` the first components of its eigenvectors (*weights* :math:`\\tau^2`, summing
to 1 per run). Averaging the runs and smoothing each node with a Gaussian of width
:math:`\\sigma`:

.. math::

    \\hat\\phi(t) = \\frac1R \\sum_{r=1}^R \\sum_i \\tau_{ri}^2\\,
        \\frac{1}{\\sigma\\sqrt{2\\pi}} e^{-(t-\\theta_{ri})^2 / 2\\sigma^2}.

Since :math:`\\sum_i \\tau_{ri}^2 \\theta_{ri} = (T_r)_{11} = v_r^\\top H v_r`, the mean of
:math:`\\hat\\phi` is exactly the Hutchinson estimate of :math:`\\operatorname{tr}(H)/P` from the
same vectors (``DensityResult.mean``).

The runs are computed together: each step is one ``matvec`` with a ``(P, num_runs)`` block,
and each column keeps its own tridiagonal and is reorthogonalised (twice, float64) against its
own basis only. A run whose Krylov space becomes invariant stops there (its remaining nodes
carry weight 0).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import scipy.linalg
import torch
from torch import Tensor

from flatlab.errors import FlatlabError
from flatlab.hessian._common import apply, check_operator, generator, rademacher

__all__ = ["DensityResult", "spectral_density"]

_BREAKDOWN = 1e-10
_DGKS = 2 ** -0.5  # second reorthogonalisation pass when the norm fell below this


@dataclass(frozen=True)
class DensityResult:
    """Result of :func:`spectral_density` (all float64, on the CPU).

    ``nodes`` and ``weights`` ``(num_runs, num_steps)`` (weights sum to 1 per run; padding
    after an early stop has weight 0), ``grid`` and ``density`` (integrates to 1 on ``grid``
    by the trapezoid rule), ``sigma`` (absolute smoothing width), ``mean`` (the quadrature's
    mean eigenvalue, an estimate of ``tr(H) / P``), ``matvecs`` (products used).
    """

    nodes: Tensor
    weights: Tensor
    grid: Tensor
    density: Tensor
    sigma: float
    mean: float
    matvecs: int


def _block_lanczos_runs(op: Any, starts: Tensor, steps: int) -> tuple[Tensor, Tensor, Tensor]:
    """Independent Lanczos runs, one per column of ``starts`` (unit columns), all products
    through one block ``matvec`` per step. Returns ``alphas (R, steps)``, ``betas (R, steps)``
    and the number of valid steps per run."""
    size, runs = starts.shape
    # basis[r, j] = run r's j-th Lanczos vector: each run's vectors are contiguous rows, so the
    # reorthogonalisation is two batched matrix products without copying the basis
    basis = torch.empty(runs, steps, size, dtype=torch.float64, device=starts.device)
    alphas = torch.zeros(runs, steps, dtype=torch.float64)
    betas = torch.zeros(runs, steps, dtype=torch.float64)
    lengths = torch.full((runs,), steps, dtype=torch.long)
    alive = torch.ones(runs, dtype=torch.bool, device=starts.device)
    q = starts.clone()
    for j in range(steps):
        basis[:, j] = q.T
        w = apply(op, q)
        alpha = (q * w).sum(dim=0)
        w -= alpha * q
        if j > 0:
            w -= betas[:, j - 1].to(w.device) * basis[:, j - 1].T
        done = basis[:, : j + 1]                                  # (runs, j + 1, size)
        rows = w.T.unsqueeze(2)                                   # (runs, size, 1)
        # classical Gram-Schmidt against the whole basis, repeated only where it removed much
        # of w (DGKS criterion, eta = 1/sqrt(2)): once is enough while orthogonality holds
        for _ in range(2):
            before = torch.linalg.vector_norm(rows, dim=(1, 2))
            coefficients = torch.bmm(done, rows)                  # (runs, j + 1, 1)
            rows = rows - torch.bmm(done.transpose(1, 2), coefficients)
            if bool((torch.linalg.vector_norm(rows, dim=(1, 2)) >= _DGKS * before).all()):
                break
        w = rows.squeeze(2).T
        beta = torch.linalg.vector_norm(w, dim=0)
        alphas[:, j] = torch.where(alive, alpha, 0.0).cpu()
        if j == steps - 1:
            break
        scale = alphas[:, : j + 1].abs().amax(dim=1).to(beta.device)
        stopping = alive & (beta <= _BREAKDOWN * scale.clamp_min(np.finfo(float).tiny))
        lengths[stopping.cpu()] = j + 1
        alive &= ~stopping
        betas[:, j] = torch.where(alive, beta, 0.0).cpu()
        q = torch.where(alive, w / beta.clamp_min(np.finfo(float).tiny), 0.0)
    return alphas, betas, lengths


def spectral_density(op: Any, *, num_runs: int = 4, num_steps: int = 64,
                     grid: Tensor | np.ndarray | None = None, grid_size: int = 1000,
                     sigma: float = 0.01, seed: int = 0) -> DensityResult:
    """Smoothed eigenvalue density of a symmetric operator by SLQ (see module doc).

    Args:
        op: symmetric operator (``size``, ``dtype``, ``device``, ``matvec``).
        num_runs: independent Lanczos runs (one block column each).
        num_steps: Lanczos steps per run (capped at ``P``); costs ``num_runs * num_steps``
            products in ``num_steps`` block calls.
        grid: points to evaluate the density at (default: ``grid_size`` points spanning the
            nodes plus 5 sigma on either side).
        grid_size: number of grid points when ``grid`` is not given.
        sigma: Gaussian width relative to the spread of the nodes (``max - min``).
        seed: seeds the Rademacher start vectors (identical on every rank).

    >>> import torch
    >>> from flatlab.hessian import DenseOperator
    >>> d = torch.linspace(0.0, 1.0, 50, dtype=torch.float64)
    >>> result = spectral_density(DenseOperator(torch.diag(d)), num_runs=2, num_steps=50)
    >>> round(float(torch.trapezoid(result.density, result.grid)), 6)
    1.0
    """
    check_operator(op)
    if num_runs < 1 or num_steps < 1:
        raise FlatlabError(f"num_runs and num_steps must be positive, got {num_runs}, "
                           f"{num_steps}")
    if sigma <= 0:
        raise FlatlabError(f"sigma must be positive, got {sigma}")
    steps = min(num_steps, op.size)
    starts = rademacher(op.size, num_runs, generator(seed), op.device) / math.sqrt(op.size)
    alphas, betas, lengths = _block_lanczos_runs(op, starts, steps)
    nodes = torch.zeros(num_runs, steps, dtype=torch.float64)
    weights = torch.zeros(num_runs, steps, dtype=torch.float64)
    for r in range(num_runs):
        length = int(lengths[r])
        a = alphas[r, :length].numpy()
        if length == 1:
            theta, vectors = a, np.ones((1, 1))
        else:
            theta, vectors = scipy.linalg.eigh_tridiagonal(a, betas[r, :length - 1].numpy())
        nodes[r, :length] = torch.from_numpy(theta)
        nodes[r, length:] = float(theta[-1])
        weights[r, :length] = torch.from_numpy(vectors[0] ** 2)
    valid = weights > 0
    low, high = float(nodes[valid].min()), float(nodes[valid].max())
    width = high - low if high > low else max(abs(high), 1.0)
    smoothing = sigma * width
    if grid is None:
        if grid_size < 2:
            raise FlatlabError(f"grid_size must be at least 2, got {grid_size}")
        grid_t = torch.linspace(low - 5 * smoothing, high + 5 * smoothing, grid_size,
                                dtype=torch.float64)
    else:
        grid_t = torch.as_tensor(grid, dtype=torch.float64).reshape(-1)
        if grid_t.numel() < 2 or not bool((grid_t[1:] > grid_t[:-1]).all()):
            raise FlatlabError("grid must hold at least 2 increasing points")
    gauss = torch.exp(-0.5 * ((grid_t[:, None] - nodes.reshape(1, -1)) / smoothing) ** 2)
    density = gauss @ weights.reshape(-1) / (num_runs * smoothing * math.sqrt(2 * math.pi))
    area = float(torch.trapezoid(density, grid_t))
    if not area > 0:
        raise FlatlabError("the grid does not cover the spectrum (density is zero on it)")
    density = density / area
    mean = float((weights * nodes).sum() / num_runs)
    return DensityResult(nodes, weights, grid_t, density, smoothing, mean, num_runs * steps)
