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

**Reorthogonalisation.** ``reorthogonalize="local"`` (the default) runs the plain three-term
recurrence (Paige's ordering: :math:`w = Hq_j - \\beta_{j-1} q_{j-1}`, :math:`\\alpha_j = q_j^\\top
w`, :math:`w \\mathrel{-}= \\alpha_j q_j`): each vector is orthogonal to the two before it
only. In floating point the basis then loses orthogonality and converged extreme eigenvalues
reappear as "ghost" nodes, but the quadrature stays accurate: the ghosts share the weight of
the eigenvalue they copy (Greenbaum 1989; Chen, Trogdon, Ubaru 2021), so the smoothed density
and every moment match full reorthogonalisation to within the Monte Carlo error (measured in
``benchmarks/hessian_accuracy.py``). ``"full"`` orthogonalises every vector against the whole
basis of its run (classical Gram-Schmidt, a second pass where needed): exact nodes, at the
price of ``num_steps`` stored vectors per run and a Gram-Schmidt sweep per step.

**Blocks.** ``block_size`` runs are in flight at a time; each Lanczos step is one ``matvec``
with a ``(P, block_size)`` block and every run keeps its own tridiagonal. A run whose Krylov
space becomes invariant stops there (its remaining nodes carry weight 0, and it takes no more
products).

**Memory** (bytes per parameter, ``s`` = bytes per element of the operator's dtype, ``b`` =
``block_size``): local reorthogonalisation keeps two vectors per run and the new block, and
hands the operator a gathered copy of the block and transposes its answer: ``5 b s`` (4 runs of
a float32 model: 80); full keeps every vector of the runs in flight, ``b (num_steps + 3) s``.
Plus ``num_runs`` bytes for the start vectors' signs and one block's working memory in the
operator. Vectors live on ``basis_device`` (default: the operator's device).
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
from flatlab.hessian._common import block_sizes, check_operator, generator
from flatlab.hessian._krylov import dots, norm, orthogonalize, product, resolve_basis_device

__all__ = ["DensityResult", "REORTHOGONALIZATION", "spectral_density"]

REORTHOGONALIZATION = ("local", "full")
_BREAKDOWN = 1e-10


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


def _lanczos_runs(op: Any, starts: Tensor, steps: int, full: bool,
                  ) -> tuple[Tensor, Tensor, Tensor, int]:
    """Independent Lanczos runs from the unit rows of ``starts`` ``(b, P)``, all products of a
    step through one block ``matvec``. Returns ``alphas (b, steps)``, ``betas (b, steps)``,
    the number of valid steps per run and the products used."""
    runs, size = starts.shape
    depth = steps if full else 2  # vector j of run r lives in vectors[r, j % depth]
    vectors = torch.empty(runs, depth, size, dtype=starts.dtype, device=starts.device)
    vectors[:, 0] = starts
    alphas = torch.zeros(runs, steps, dtype=torch.float64)
    betas = torch.zeros(runs, steps, dtype=torch.float64)
    lengths = torch.full((runs,), steps, dtype=torch.long)
    alive = list(range(runs))
    used = 0
    for j in range(steps):
        current = j % depth
        w = product(op, vectors[alive, current])
        used += len(alive)
        for i, r in enumerate(alive):
            if j > 0:
                w[i].add_(vectors[r, (j - 1) % depth], alpha=-float(betas[r, j - 1]))
            alpha = float(dots(vectors[r, current, None], w[i])[0])
            w[i].add_(vectors[r, current], alpha=-alpha)
            beta = orthogonalize(vectors[r, :j + 1], w[i]) if full else norm(w[i])
            alphas[r, j] = alpha
            if j == steps - 1:
                continue
            if beta <= _BREAKDOWN * max(float(alphas[r, :j + 1].abs().max()), 1e-300):
                lengths[r] = j + 1  # invariant Krylov space: this run is exact and stops
                continue
            betas[r, j] = beta
            torch.mul(w[i], 1.0 / beta, out=vectors[r, (j + 1) % depth])
        alive = [r for r in alive if lengths[r] == steps]
        del w
        if not alive:
            break
    return alphas, betas, lengths, used


def spectral_density(op: Any, *, num_runs: int = 4, num_steps: int = 64,
                     grid: Tensor | np.ndarray | None = None, grid_size: int = 1000,
                     sigma: float = 0.01, seed: int = 0, reorthogonalize: str = "local",
                     block_size: int = 4,
                     basis_device: str | torch.device | None = None) -> DensityResult:
    """Smoothed eigenvalue density of a symmetric operator by SLQ (see module doc).

    Extra memory: ``5 block_size`` vectors in the operator's dtype with local
    reorthogonalisation (default: 80 bytes per parameter for a float32 model), ``block_size
    (num_steps + 3)`` with full; plus one block's working memory in the operator.

    Args:
        op: symmetric operator (``size``, ``dtype``, ``device``, ``matvec``).
        num_runs: independent Lanczos runs (one block column each).
        num_steps: Lanczos steps per run (capped at ``P``); costs up to ``num_runs *
            num_steps`` products.
        grid: points to evaluate the density at (default: ``grid_size`` points spanning the
            nodes plus 5 sigma on either side).
        grid_size: number of grid points when ``grid`` is not given.
        sigma: Gaussian width relative to the spread of the nodes (``max - min``).
        seed: seeds the Rademacher start vectors (identical on every rank).
        reorthogonalize: ``"local"`` (default) or ``"full"`` (see module doc).
        block_size: runs in flight at a time (vectors per ``matvec`` call).
        basis_device: where the Lanczos vectors live (default: the operator's device).

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
    if reorthogonalize not in REORTHOGONALIZATION:
        raise FlatlabError(f"reorthogonalize={reorthogonalize!r} is not one of "
                           f"{', '.join(REORTHOGONALIZATION)}")
    if block_size < 1:
        raise FlatlabError(f"block_size must be positive, got {block_size}")
    steps = min(num_steps, op.size)
    device = resolve_basis_device(op, basis_device)
    # the same draws as rademacher(P, num_runs, gen), one byte per run and parameter
    signs = torch.randint(0, 2, (op.size, num_runs), generator=generator(seed),
                          dtype=torch.int8)
    scale = 1.0 / math.sqrt(op.size)
    alphas = torch.zeros(num_runs, steps, dtype=torch.float64)
    betas = torch.zeros(num_runs, steps, dtype=torch.float64)
    lengths = torch.zeros(num_runs, dtype=torch.long)
    matvecs = start = 0
    for width in block_sizes(num_runs, block_size):
        starts = signs[:, start:start + width].T.to(device=device, dtype=op.dtype) * 2.0 - 1.0
        starts *= scale
        a, b, n, used = _lanczos_runs(op, starts, steps, reorthogonalize == "full")
        alphas[start:start + width], betas[start:start + width] = a, b
        lengths[start:start + width] = n
        matvecs += used
        start += width
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
    return DensityResult(nodes, weights, grid_t, density, smoothing, mean, matvecs)
