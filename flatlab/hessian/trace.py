"""Stochastic trace estimation: Hutchinson and Hutch++, with standard errors.

Hutchinson (Rademacher probes :math:`z_i \\in \\{\\pm1\\}^P`, :math:`E[z z^\\top] = I`):

.. math::

    \\widehat{\\operatorname{tr}}(H) = \\frac1m \\sum_{i=1}^m z_i^\\top H z_i, \\qquad
    \\mathrm{se} = \\frac{s}{\\sqrt m},

with :math:`s` the sample standard deviation of the :math:`m` values :math:`z_i^\\top H z_i`.

Hutch++ (Meyer, Musco, Musco, Woodruff 2021) spends a third of the budget on a sketch
:math:`Q = \\operatorname{orth}(H S)`, a third on :math:`HQ`, and the rest on Hutchinson for
the deflated remainder:

.. math::

    \\widehat{\\operatorname{tr}}(H) = \\operatorname{tr}(Q^\\top H Q)
      + \\frac1l \\sum_{i=1}^l g_i'^\\top H g_i', \\qquad g_i' = (I - QQ^\\top) g_i .

Given :math:`Q` the first term is exact and the second is an unbiased Hutchinson estimate of
:math:`\\operatorname{tr}((I-QQ^\\top)H(I-QQ^\\top))`, so ``stderr`` is the Hutchinson standard
error of the second term alone (the conditional standard error, valid for any :math:`Q`).
It wins over plain Hutchinson when a few eigenvalues dominate :math:`\\|H\\|_F`.

Per-parameter breakdown: with coordinates split into parameter tensors :math:`s`,
:math:`\\operatorname{tr}(H) = \\sum_s \\operatorname{tr}(H_{ss})`. Hutchinson estimates each
:math:`\\operatorname{tr}(H_{ss})` by :math:`\\frac1m\\sum_i z_{i,s}^\\top (Hz_i)_s`. For Hutch++
the identity :math:`H = QQ^\\top H + (I-QQ^\\top) H QQ^\\top + (I-QQ^\\top)H(I-QQ^\\top)`
gives block :math:`s` the exact part
:math:`\\sum_{j \\in s} \\sum_c [Q \\odot (2HQ - QQ^\\top HQ)]_{jc}` (summing to
:math:`\\operatorname{tr}(Q^\\top HQ)` over all blocks) plus its slice of the Hutchinson part.
Each block estimate is unbiased and the blocks sum to the total.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from flatlab.errors import FlatlabError
from flatlab.hessian._common import (
    apply,
    apply_blocked,
    block_sizes,
    check_operator,
    generator,
    param_slices,
    rademacher,
)

__all__ = ["TRACE_METHODS", "TraceResult", "trace"]

TRACE_METHODS = ("hutch++", "hutchinson")
DEFAULT_BLOCK_SIZE = 8


@dataclass(frozen=True)
class TraceResult:
    """Result of :func:`trace`.

    ``estimate`` and ``stderr`` (standard error), ``num_matvecs`` products used, ``method``,
    ``per_param`` (``{name: (estimate, stderr)}``, empty for operators without parameter
    names; the estimates sum to ``estimate``), ``exact_part`` (Hutch++'s
    :math:`\\operatorname{tr}(Q^\\top H Q)`, 0 for Hutchinson) and ``samples`` (the values
    :math:`z_i^\\top H z_i` of the stochastic part).
    """

    estimate: float
    stderr: float
    num_matvecs: int
    method: str
    per_param: dict[str, tuple[float, float]] = field(default_factory=dict)
    exact_part: float = 0.0
    samples: Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.float64))


def _mean_and_stderr(values: Tensor) -> tuple[float, float]:
    count = values.shape[-1]
    if count == 0:
        return 0.0, 0.0
    stderr = float(values.std(dim=-1) / math.sqrt(count)) if count > 1 else math.nan
    return float(values.mean(dim=-1)), stderr


def _hutchinson_samples(op: Any, count: int, block_size: int, gen: torch.Generator,
                        project: Tensor | None, slices: list[tuple[str, slice]],
                        ) -> tuple[Tensor, Tensor]:
    """Values ``z_i^T H z_i`` (shape ``(count,)``) and their per-slice parts
    (``(len(slices), count)``); probes are projected by ``I - Q Q^T`` when ``project=Q``."""
    totals = [torch.zeros(0, dtype=torch.float64, device=op.device)]
    parts = [torch.zeros(len(slices), 0, dtype=torch.float64, device=op.device)]
    for width in block_sizes(count, block_size):
        probes = rademacher(op.size, width, gen, op.device)
        if project is not None:
            probes -= project @ (project.T @ probes)
        products = probes * apply(op, probes)
        totals.append(products.sum(dim=0))
        parts.append(torch.stack([products[sl].sum(dim=0) for _, sl in slices]) if slices
                     else products.new_zeros(0, width))
    return torch.cat(totals), torch.cat(parts, dim=1)


def trace(op: Any, *, num_matvecs: int = 100, method: str = "hutch++", seed: int = 0,
          block_size: int | None = None) -> TraceResult:
    """Estimate :math:`\\operatorname{tr}(H)` with ``num_matvecs`` products (see module doc).

    Args:
        op: a symmetric operator (``size``, ``dtype``, ``device``, ``matvec``).
        num_matvecs: product budget (Hutchinson: at least 2; Hutch++: at least 4).
        method: ``"hutch++"`` (default) or ``"hutchinson"``.
        seed: seeds the probes (a CPU generator: identical on every rank).
        block_size: probes per ``matvec`` call (default 8).

    >>> import torch
    >>> from flatlab.hessian import DenseOperator
    >>> a = torch.randn(200, 200, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    >>> result = trace(DenseOperator(a @ a.T), num_matvecs=60)
    >>> abs(result.estimate - torch.trace(a @ a.T).item()) < 4 * result.stderr
    True
    """
    check_operator(op)
    if method not in TRACE_METHODS:
        raise FlatlabError(f"method={method!r} is not one of {', '.join(TRACE_METHODS)}")
    minimum = 4 if method == "hutch++" else 2
    if num_matvecs < minimum:
        raise FlatlabError(f"{method} needs num_matvecs >= {minimum}, got {num_matvecs}")
    block_size = DEFAULT_BLOCK_SIZE if block_size is None else block_size
    if block_size < 1:
        raise FlatlabError(f"block_size must be positive, got {block_size}")
    gen = generator(seed)
    slices = param_slices(op)

    if method == "hutchinson":
        samples, parts = _hutchinson_samples(op, num_matvecs, block_size, gen, None, slices)
        per_param = {name: _mean_and_stderr(parts[i]) for i, (name, _) in enumerate(slices)}
        estimate, stderr = _mean_and_stderr(samples)
        return TraceResult(estimate, stderr, num_matvecs, method, per_param, 0.0, samples.cpu())

    sketch_size = min(num_matvecs // 3, op.size)
    sketch = apply_blocked(op, rademacher(op.size, sketch_size, gen, op.device), block_size)
    basis = torch.linalg.qr(sketch).Q
    h_basis = apply_blocked(op, basis, block_size)
    # Diagonal of QQ^T H + (I - QQ^T) H QQ^T, row by row (its sum is tr(Q^T H Q)).
    exact_rows = (basis * (2.0 * h_basis - basis @ (basis.T @ h_basis))).sum(dim=1)
    exact = float(exact_rows.sum())
    remaining = num_matvecs - 2 * sketch_size if sketch_size < op.size else 0
    samples, parts = _hutchinson_samples(op, remaining, block_size, gen, basis, slices)
    mean, stderr = _mean_and_stderr(samples)
    if remaining == 0:
        stderr = 0.0  # Q spans the whole space: the trace is exact
    per_param = {}
    for i, (name, sl) in enumerate(slices):
        part_mean, part_stderr = _mean_and_stderr(parts[i])
        per_param[name] = (float(exact_rows[sl].sum()) + part_mean,
                           0.0 if remaining == 0 else part_stderr)
    used = 2 * sketch_size + remaining
    return TraceResult(exact + mean, stderr, used, method, per_param, exact, samples.cpu())
