"""Extreme eigenvalues by restarted Lanczos (Krylov-Schur) with a bounded basis.

Starting from a random unit vector :math:`v_1`, Lanczos builds an orthonormal basis
:math:`V_n = [v_1, \\dots, v_n]` (rows of a ``(m, P)`` tensor in the operator's dtype) with

.. math::

    H V_n = V_n T_n + \\beta_n v_{n+1} e_n^\\top, \\qquad T_n = V_n^\\top H V_n ,

:math:`T_n` float64. A Ritz pair :math:`(\\theta_i, x_i = V_n s_i)` from :math:`T_n s_i =
\\theta_i s_i` has residual :math:`\\|H x_i - \\theta_i x_i\\| = \\beta_n |s_{n,i}|` (the *Ritz
estimate*), and some eigenvalue of :math:`H` lies within that distance of :math:`\\theta_i`. A
value is *converged* when :math:`\\beta_n |s_{n,i}| \\le \\mathrm{tol}\\cdot
\\max(|\\theta_i|, \\sqrt{\\epsilon}\\,\\max_j|\\theta_j|)` (:math:`\\epsilon` of the operator's
dtype; the floor only matters for eigenvalues near zero).

**Restarts.** When the basis holds ``m = max_basis`` vectors (default :math:`\\max(2k+8, 20)`),
the ``p`` Ritz vectors at the wanted end (``k`` plus half the rest) replace it,
:math:`V_p \\leftarrow V_m S_p`, and the relation above still holds with an arrowhead
:math:`T_{p+1}` (``diag(theta_p)`` bordered by :math:`\\beta_m s_{m,1..p}`) and
:math:`v_{p+1} = v_{m+1}` (thick restart, Wu and Simon 2000; Krylov-Schur, Stewart 2001, for a
symmetric operator). Lanczos then continues from there, so memory stays at ``m`` vectors
however many products convergence takes.

**Orthogonality.** Every new vector is orthogonalised against the whole basis (classical
Gram-Schmidt, repeated only where the first pass left an overlap above rounding), so no
spurious copies of converged eigenvalues appear. Inner products are BLAS calls on chunks of
65536 entries summed in float64 (:mod:`flatlab.hessian._krylov`); :math:`T`, the Ritz problem
and every norm are float64. If :math:`\\beta_n` vanishes the Krylov space is invariant:
Lanczos continues from a random vector orthogonal to the basis (``T`` becomes block diagonal),
which also finds repeated eigenvalues on small operators, and it does not stop before the
values found since such a breakdown have converged too.

**Certificate.** The Ritz estimate assumes exact products. Once it falls below the operator's
own rounding (float32 Hessian products carry relative errors around 1e-7) it keeps shrinking
while the true residual does not, so after the iteration stops the true residuals are computed
with ``k`` more products (one vector at a time); those are reported, and a value counts as
converged only if its true residual passes the same test.

**Memory** (bytes per parameter, ``s`` = bytes per element of the operator's dtype: 4 for
float32): ``(m + 1) s`` while iterating (the basis and the newest product), at most
``(m + k) s`` while the eigenvectors are formed, then ``k s + 16`` for the residual check;
plus what the operator itself needs for one product (``HessianOperator``: see its docstring).
Top-5 of a float32 model with the default ``m = 20``: 84 bytes per parameter. ``basis_device=
"cpu"`` keeps the basis in host memory while products run on the operator's device.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np
import scipy.linalg
import torch
from torch import Tensor

from flatlab.errors import FlatlabError
from flatlab.hessian._common import check_operator, generator
from flatlab.hessian._krylov import (
    combine_rows,
    dots,
    gaussian_row,
    norm,
    orthogonalize,
    product,
    resolve_basis_device,
)

__all__ = ["EIGEN_WHICH", "EigenResult", "default_basis", "top_eigenvalues"]

EIGEN_WHICH = ("largest", "smallest")
_BREAKDOWN = 1e-10  # beta below this times |theta|_max: invariant subspace


def default_basis(k: int) -> int:
    """Default ``max_basis`` for ``k`` eigenvalues: :math:`\\max(2k + 8, 20)`."""
    return max(2 * k + 8, 20)


@dataclass(frozen=True)
class EigenResult:
    """Result of :func:`top_eigenvalues`.

    ``eigenvalues`` ``(k,)`` float64, descending (algebraic); ``eigenvectors`` ``(P, k)`` in
    the operator's dtype (unit columns, each contiguous in memory: the transpose of a ``(k, P)``
    tensor); ``residuals`` the true residual norms :math:`\\|Hx_i - \\theta_i x_i\\|` (from
    ``k`` extra products); ``converged`` ``(k,)`` bool (the Ritz test passed *and* the true
    residual meets the same bound); ``matvecs`` products used, the ``k`` extra included;
    ``which``; ``restarts`` how often the basis was compressed.
    """

    eigenvalues: Tensor
    eigenvectors: Tensor
    residuals: Tensor
    converged: Tensor
    matvecs: int
    which: str
    restarts: int = 0


class _Projection:
    """The float64 projected matrix :math:`T`: an arrowhead over the ``p`` vectors kept at the
    last restart (``ritz`` on the diagonal, ``border`` coupling them to vector ``p``), then
    tridiagonal (``diagonal``, ``offdiagonal``)."""

    def __init__(self) -> None:
        self.ritz = np.zeros(0)
        self.border = np.zeros(0)
        self.diagonal: list[float] = []
        self.offdiagonal: list[float] = []

    @property
    def size(self) -> int:
        return self.ritz.size + len(self.diagonal)

    def eigh(self) -> tuple[np.ndarray, np.ndarray]:
        """Eigenvalues (ascending) and eigenvectors of :math:`T`."""
        diagonal = np.array(self.diagonal)
        if self.ritz.size == 0:
            if diagonal.size == 1:
                return diagonal, np.ones((1, 1))
            return scipy.linalg.eigh_tridiagonal(diagonal, np.array(self.offdiagonal))
        p = self.ritz.size
        matrix = np.diag(np.concatenate([self.ritz, diagonal]))
        matrix[p, :p] = matrix[:p, p] = self.border
        steps = np.arange(p, self.size - 1)
        matrix[steps, steps + 1] = matrix[steps + 1, steps] = self.offdiagonal
        return np.linalg.eigh(matrix)

    def restart(self, ritz: np.ndarray, border: np.ndarray) -> None:
        self.ritz, self.border = ritz, border
        self.diagonal, self.offdiagonal = [], []


def top_eigenvalues(op: Any, k: int = 5, *, tol: float = 1e-4, which: str = "largest",
                    max_matvecs: int | None = None, max_basis: int | None = None,
                    basis_device: str | torch.device | None = None,
                    seed: int = 0) -> EigenResult:
    """The ``k`` largest (or smallest) eigenvalues of a symmetric operator, by restarted
    Lanczos with at most ``max_basis`` basis vectors (see the module docstring).

    Extra memory: ``(max_basis + 1)`` vectors in the operator's dtype while iterating (top-5 of
    a float32 model: :math:`(20 + 1) \\times 4 = 84` bytes per parameter), plus one product's
    working memory in the operator.

    Args:
        op: symmetric operator (``size``, ``dtype``, ``device``, ``matvec``).
        k: how many eigenvalues.
        tol: relative Ritz-residual tolerance (see the module docstring); 0 spends the whole
            budget.
        which: ``"largest"`` or ``"smallest"`` (algebraic; "smallest" shows negative curvature).
        max_matvecs: budget of products for the iteration (default ``max(300, 60 k)``); ``k``
            more check the residuals. Values still unconverged are returned with
            ``converged=False`` and a warning.
        max_basis: basis vectors kept (default :func:`default_basis`, ``max(2k + 8, 20)``; at
            least ``k + 2``; capped at ``P``, where no restart is ever needed).
        basis_device: where the basis lives (default: the operator's device; ``"cpu"`` keeps it
            in host memory while the products run on a GPU).
        seed: seeds the random start (identical on every rank).

    >>> import torch
    >>> from flatlab.hessian import DenseOperator
    >>> d = torch.arange(1.0, 41.0, dtype=torch.float64)
    >>> result = top_eigenvalues(DenseOperator(torch.diag(d)), k=3)
    >>> [round(v, 4) for v in result.eigenvalues.tolist()], bool(result.converged.all())
    ([40.0, 39.0, 38.0], True)
    """
    check_operator(op)
    size = op.size
    if which not in EIGEN_WHICH:
        raise FlatlabError(f"which={which!r} is not one of {', '.join(EIGEN_WHICH)}")
    if not 1 <= k <= size:
        raise FlatlabError(f"k must be between 1 and the operator size {size}, got {k}")
    if not tol >= 0:
        raise FlatlabError(f"tol must be non-negative, got {tol}")
    budget = max(300, 60 * k) if max_matvecs is None else max_matvecs
    if budget < k:
        raise FlatlabError(f"max_matvecs={budget} is smaller than k={k}")
    width = default_basis(k) if max_basis is None else max_basis
    if width < min(k + 2, size):
        raise FlatlabError(f"max_basis must be at least k + 2 = {k + 2}, got {width}")
    width = min(width, size)
    keep = min(width - 1, k + max(1, (width - k) // 2))  # measured best of 7..14 for m=20
    largest = which == "largest"
    floor = math.sqrt(torch.finfo(op.dtype).eps)
    gen = generator(seed)
    basis = torch.empty(width, size, dtype=op.dtype, device=resolve_basis_device(op, basis_device))
    start = torch.randn(size, generator=gen, dtype=torch.float64)
    basis[0] = (start / torch.linalg.vector_norm(start)).to(basis.device)
    del start
    projection = _Projection()
    fresh = np.zeros(1)  # weight of each basis vector on directions drawn after a breakdown
    broken = False
    used = restarts = 0
    while True:
        n = projection.size + 1  # the basis vector just added is number n
        w = product(op, basis[n - 1])
        used += 1
        alpha = float(dots(basis[n - 1, None], w)[0])
        if projection.diagonal:  # the three-term recurrence (after a restart, GS does it)
            coefficients = torch.tensor([projection.offdiagonal[-1], alpha])
            w.addmv_(basis[n - 2:n].T, coefficients.to(w.device, w.dtype), alpha=-1.0)
        else:
            w.add_(basis[n - 1], alpha=-alpha)
        beta = orthogonalize(basis[:n], w)
        projection.diagonal.append(alpha)
        theta, vectors = projection.eigh()
        wanted = np.arange(n)[::-1][:k] if largest else np.arange(n)[:k][::-1]
        scale = float(np.abs(theta).max())
        estimates = beta * np.abs(vectors[-1])
        bound = tol * np.maximum(np.abs(theta), floor * scale)
        converged = estimates[wanted] <= bound[wanted]
        breakdown = beta <= _BREAKDOWN * max(scale, np.finfo(float).tiny)
        edge_ok = True
        if broken:
            # after a breakdown, the best value found in the new directions bounds the rest of
            # the spectrum; it must converge too before the top k can be trusted
            inside = np.flatnonzero((vectors ** 2 * fresh[:, None]).sum(axis=0) > 0.5)
            if inside.size:
                edge = inside[-1] if largest else inside[0]
                edge_ok = bool(estimates[edge] <= bound[edge])
        if (n >= k and converged.all() and edge_ok and not breakdown) or used >= budget \
                or n == size:
            break
        if n == width:  # compress to the p Ritz vectors at the wanted end
            kept = np.arange(n - keep, n) if largest else np.arange(keep)
            combine_rows(basis, torch.from_numpy(vectors[:, kept].copy()), basis[:keep])
            projection.restart(theta[kept], (0.0 if breakdown else beta) * vectors[-1, kept])
            fresh = np.append((vectors[:, kept] ** 2 * fresh[:, None]).sum(axis=0), 0.0)
            restarts += 1
            n = keep
        else:
            projection.offdiagonal.append(0.0 if breakdown else beta)
            fresh = np.append(fresh, 0.0)
        if breakdown:
            # invariant subspace: the rest of the spectrum lives in its orthogonal complement
            # (repeated eigenvalues, small P); continue from a fresh direction there
            w = gaussian_row(size, gen, basis)
            beta = orthogonalize(basis[:n], w)
            broken = True
        if broken:
            fresh[-1] = 1.0
        torch.mul(w, 1.0 / beta, out=basis[n])
        del w
    # the wanted Ritz vectors, unit rows of a fresh (k, P) tensor; then the basis is freed
    del w
    eigenvectors = torch.empty(k, size, dtype=op.dtype, device=basis.device)
    combine_rows(basis[:n], torch.from_numpy(vectors[:, wanted].copy()), eigenvectors)
    del basis
    values = torch.from_numpy(theta[wanted].copy())
    true = torch.zeros(k, dtype=torch.float64)
    for i in range(k):
        eigenvectors[i] /= norm(eigenvectors[i])
        # true residual: the Ritz estimate cannot see the operator's own rounding (float32
        # products), so it steers the iteration but is not reported
        residual = product(op, eigenvectors[i].to(torch.float64))
        residual.add_(eigenvectors[i], alpha=-float(values[i]))
        true[i] = norm(residual)
        del residual
    matvecs = used + k
    converged = converged & (true.numpy() <= bound[wanted])
    result = EigenResult(
        eigenvalues=values,
        eigenvectors=eigenvectors.T,
        residuals=true,
        converged=torch.from_numpy(converged.copy()),
        matvecs=matvecs,
        which=which,
        restarts=restarts,
    )
    if not converged.all():
        bad = ", ".join(f"lambda_{i + 1}={theta[j]:.6g} (residual {float(true[i]):.2g})"
                        for i, j in enumerate(wanted) if not converged[i])
        warnings.warn(f"top_eigenvalues: {int((~converged).sum())} of {k} eigenvalues did not "
                      f"converge to tol={tol} within {matvecs} products: {bad}; raise "
                      "max_matvecs or tol (a float32 model cannot resolve residuals much "
                      "below 1e-6 of the largest eigenvalue)", stacklevel=2)
    return result
