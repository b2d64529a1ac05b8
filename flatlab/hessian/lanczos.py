"""Extreme eigenvalues by Lanczos with full reorthogonalisation.

Starting from a random unit vector :math:`q_1`, Lanczos builds an orthonormal basis
:math:`V_m = [q_1, \\dots, q_m]` of the Krylov space :math:`\\mathcal K_m(H, q_1)` in which
:math:`V_m^\\top H V_m = T_m` is tridiagonal (diagonal :math:`\\alpha`, off-diagonal
:math:`\\beta`):

.. math::

    H V_m = V_m T_m + \\beta_m q_{m+1} e_m^\\top .

The Ritz pair :math:`(\\theta_i, x_i = V_m s_i)` from :math:`T_m s_i = \\theta_i s_i` has residual
:math:`\\|H x_i - \\theta_i x_i\\| = \\beta_m |s_{m,i}|` (the *Ritz estimate*, exact in exact
arithmetic), and some eigenvalue of :math:`H` lies within that distance of :math:`\\theta_i`.
A value is *converged* when :math:`\\beta_m |s_{m,i}| \\le \\mathrm{tol}\\cdot
\\max(|\\theta_i|, \\sqrt{\\epsilon}\\,\\max_j|\\theta_j|)` (:math:`\\epsilon` of the operator's
dtype; the floor only matters for eigenvalues near zero). The space grows until all ``k``
wanted values converge or ``max_matvecs`` products are spent.

The Ritz estimate assumes exact products. Once it falls below the operator's own rounding
(float32 Hessian products carry relative errors around 1e-7) it keeps shrinking while the true
residual does not, so after the iteration stops the true residuals are computed with one extra
block of ``k`` products; those are reported, and a value counts as converged only if its true
residual passes the same test.

Every new vector is orthogonalised against the whole basis twice (classical Gram-Schmidt,
"twice is enough"), in float64, so no spurious copies of converged eigenvalues appear. If
:math:`\\beta_m` vanishes the Krylov space is invariant; Lanczos then restarts with a random
vector orthogonal to the basis (``T`` becomes block diagonal), which also lets it find repeated
eigenvalues on small operators. Lanczos does not stop right after such a breakdown, and after
a restart the new block's own extreme Ritz value must converge as well.
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
from flatlab.hessian._common import apply, check_operator, gaussian, generator

__all__ = ["EIGEN_WHICH", "EigenResult", "top_eigenvalues"]

EIGEN_WHICH = ("largest", "smallest")
_BREAKDOWN = 1e-10  # beta below this times |theta|_max: invariant subspace


@dataclass(frozen=True)
class EigenResult:
    """Result of :func:`top_eigenvalues`.

    ``eigenvalues`` ``(k,)`` float64, descending (algebraic); ``eigenvectors`` ``(P, k)`` in
    the operator's dtype (unit columns); ``residuals`` the true residual norms
    :math:`\\|Hx_i - \\theta_i x_i\\|` (from one extra block of ``k`` products);
    ``converged`` ``(k,)`` bool (the Ritz test passed *and* the true residual meets the same
    bound); ``matvecs`` products used, the ``k`` extra included; ``which``.
    """

    eigenvalues: Tensor
    eigenvectors: Tensor
    residuals: Tensor
    converged: Tensor
    matvecs: int
    which: str


def _ritz(alphas: list[float], betas: list[float]) -> tuple[np.ndarray, np.ndarray]:
    """Eigenvalues (ascending) and eigenvectors of the tridiagonal ``T``."""
    if len(alphas) == 1:
        return np.array(alphas), np.ones((1, 1))
    return scipy.linalg.eigh_tridiagonal(np.array(alphas), np.array(betas))


def _orthogonalise(w: Tensor, basis: Tensor) -> Tensor:
    for _ in range(2):
        w = w - basis @ (basis.T @ w)
    return w


def top_eigenvalues(op: Any, k: int = 5, *, tol: float = 1e-4, which: str = "largest",
                    max_matvecs: int | None = None, seed: int = 0) -> EigenResult:
    """The ``k`` largest (or smallest) eigenvalues of a symmetric operator, by Lanczos.

    Args:
        op: symmetric operator (``size``, ``dtype``, ``device``, ``matvec``).
        k: how many eigenvalues.
        tol: relative Ritz-residual tolerance (see the module docstring); 0 spends the whole
            budget.
        which: ``"largest"`` or ``"smallest"`` (algebraic; "smallest" shows negative curvature).
        max_matvecs: budget for the Krylov space (default ``max(100, 30 k)``, never more than
            ``P``); ``k`` more products check the residuals. Values still unconverged are
            returned with ``converged=False`` and a warning.
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
    budget = max(100, 30 * k) if max_matvecs is None else max_matvecs
    if budget < k:
        raise FlatlabError(f"max_matvecs={budget} is smaller than k={k}")
    budget = min(budget, size)
    floor = math.sqrt(torch.finfo(op.dtype).eps)
    gen = generator(seed)
    device = op.device
    basis = torch.empty(size, min(budget, 32), dtype=torch.float64, device=device)
    q = gaussian(size, 1, gen, device)[:, 0]
    q /= torch.linalg.vector_norm(q)
    alphas: list[float] = []
    betas: list[float] = []
    steps = block_start = 0
    while True:
        if steps == basis.shape[1]:
            grown = torch.empty(size, min(2 * steps, budget), dtype=torch.float64, device=device)
            grown[:, :steps] = basis
            basis = grown
        basis[:, steps] = q
        w = apply(op, q[:, None])[:, 0]
        alpha = float(q @ w)
        w -= alpha * q
        if steps > 0:
            w -= betas[-1] * basis[:, steps - 1]
        steps += 1
        w = _orthogonalise(w, basis[:, :steps])
        beta = float(torch.linalg.vector_norm(w))
        alphas.append(alpha)
        theta, vectors = _ritz(alphas, betas)
        wanted = (np.arange(len(theta))[::-1][:k] if which == "largest"
                  else np.arange(len(theta))[:k][::-1])
        scale = float(np.abs(theta).max())
        all_residuals = beta * np.abs(vectors[-1])
        bound = tol * np.maximum(np.abs(theta), floor * scale)
        converged = all_residuals[wanted] <= bound[wanted]
        if block_start > 0:
            # After a restart, the current block's extreme Ritz value bounds the rest of the
            # spectrum; it must converge too before the top k can be trusted.
            inside = np.flatnonzero((vectors[block_start:] ** 2).sum(axis=0) > 0.5)
            edge = inside[-1] if which == "largest" else inside[0]
            converged_edge = all_residuals[edge] <= bound[edge]
        else:
            converged_edge = True
        breakdown = beta <= _BREAKDOWN * max(scale, np.finfo(float).tiny)
        if steps >= budget or (steps >= k and converged.all() and converged_edge
                               and not breakdown):
            break
        if breakdown:
            # Invariant subspace: the rest of the spectrum lives in its orthogonal complement
            # (repeated eigenvalues, small P). Continue from a fresh direction there.
            w = _orthogonalise(gaussian(size, 1, gen, device)[:, 0], basis[:, :steps])
            betas.append(0.0)
            block_start = steps
            q = w / torch.linalg.vector_norm(w)
        else:
            betas.append(beta)
            q = w / beta
    ritz_vectors = basis[:, :steps] @ torch.from_numpy(vectors[:, wanted].copy()).to(device)
    ritz_vectors /= torch.linalg.vector_norm(ritz_vectors, dim=0)
    values = torch.from_numpy(theta[wanted].copy())
    # True residuals, one extra block product: the Ritz estimate cannot see the operator's own
    # rounding (float32 products), so it is trusted to steer the iteration but not to report.
    true = torch.linalg.vector_norm(apply(op, ritz_vectors) - ritz_vectors * values.to(device),
                                    dim=0).cpu()
    matvecs = steps + k
    converged = converged & (true.numpy() <= bound[wanted])
    result = EigenResult(
        eigenvalues=values,
        eigenvectors=ritz_vectors.to(op.dtype),
        residuals=true,
        converged=torch.from_numpy(converged.copy()),
        matvecs=matvecs,
        which=which,
    )
    if not converged.all():
        bad = ", ".join(f"lambda_{i + 1}={theta[j]:.6g} (residual {float(true[i]):.2g})"
                        for i, j in enumerate(wanted) if not converged[i])
        warnings.warn(f"top_eigenvalues: {int((~converged).sum())} of {k} eigenvalues did not "
                      f"converge to tol={tol} within {matvecs} products: {bad}; raise "
                      "max_matvecs or tol (a float32 model cannot resolve residuals much "
                      "below 1e-6 of the largest eigenvalue)", stacklevel=2)
    return result
