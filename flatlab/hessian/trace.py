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

Memory (bytes per parameter; ``s`` = bytes per element of the operator's dtype, ``b`` =
``block_size``, ``q = num_matvecs // 3``): Hutchinson streams its probes, ``16 b`` (float64
probes and products; default ``b = 8``: 128). Hutch++ holds only its sketch: ``q s`` for
:math:`Q` (built in place from :math:`HS`, orthonormalised by two passes of the eigenvalue form
of Cholesky QR), ``q / 8`` for the signs of :math:`S` (bit-packed) and ``2 b s + 8 b`` for
the block in flight (default ``b = 1``): 100 products on a float32 model take
:math:`33 \\times 4 + 4 + 16 = 152`. Both add one block's working memory in the operator.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from flatlab.errors import FlatlabError
from flatlab.hessian._common import (
    apply,
    block_sizes,
    check_operator,
    generator,
    param_slices,
)
from flatlab.hessian._krylov import (
    dots,
    gram,
    orthonormalize_rows,
    pack_signs,
    product,
    project_out,
    resolve_basis_device,
    unpack_signs,
)

__all__ = ["TRACE_METHODS", "TraceResult", "trace"]

TRACE_METHODS = ("hutch++", "hutchinson")
DEFAULT_BLOCK_SIZE = {"hutchinson": 8, "hutch++": 1}
DRAW = 8  # probes drawn per call of the generator (independent of block_size)
_FILL_SEED = 0x5EED  # offset of the generator that completes a rank-deficient sketch


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


def _probe_blocks(size: int, count: int, block_size: int, gen: torch.Generator,
                  dtype: torch.dtype, device: torch.device) -> Iterator[Tensor]:
    """``count`` Rademacher probes as ``(P, b)`` blocks of ``block_size`` columns, drawn
    :data:`DRAW` columns at a time (as ``rademacher(P, 8, gen)``; kept bit-packed), so the
    probes do not depend on ``block_size``."""
    packed, taken, drawn = torch.zeros(0, 0, dtype=torch.uint8), 0, 0
    for width in block_sizes(count, block_size):
        pieces = []
        while width:
            if taken == packed.shape[1]:
                columns = min(DRAW, count - drawn)
                packed = pack_signs(torch.randint(0, 2, (size, columns), generator=gen,
                                                  dtype=torch.int8))
                taken, drawn = 0, drawn + columns
            step = min(width, packed.shape[1] - taken)
            pieces.append(unpack_signs(packed, size, slice(taken, taken + step), dtype, device))
            taken, width = taken + step, width - step
        yield pieces[0] if len(pieces) == 1 else torch.cat(pieces, dim=1)


def _hutchinson_samples(op: Any, count: int, block_size: int, gen: torch.Generator,
                        slices: list[slice]) -> tuple[Tensor, Tensor]:
    """Values ``z_i^T H z_i`` (``(count,)``) and their per-slice parts (``(len(slices),
    count)``), one block of float64 probes at a time."""
    totals, parts = [], []
    for probes in _probe_blocks(op.size, count, block_size, gen, torch.float64, op.device):
        products = apply(op, probes).mul_(probes)
        del probes
        totals.append(products.sum(dim=0).cpu())
        parts.append(torch.stack([products[sl].sum(dim=0) for sl in slices]).cpu())
    if not totals:
        return torch.zeros(0, dtype=torch.float64), torch.zeros(len(slices), 0,
                                                                dtype=torch.float64)
    return torch.cat(totals), torch.cat(parts, dim=1)


def _projected_samples(op: Any, count: int, block_size: int, gen: torch.Generator,
                       basis: Tensor, slices: list[slice]) -> tuple[Tensor, Tensor]:
    """As :func:`_hutchinson_samples` for the probes :math:`(I - QQ^\\top) g` (``basis`` =
    the rows of :math:`Q`), projected twice in the basis' dtype."""
    totals = torch.zeros(count, dtype=torch.float64)
    parts = torch.zeros(len(slices), count, dtype=torch.float64)
    done = 0
    for block in _probe_blocks(op.size, count, block_size, gen, basis.dtype, basis.device):
        probes = block.T.contiguous()
        width = probes.shape[0]
        del block
        for row in probes:
            for _ in range(2):
                project_out(basis, row)
        products = product(op, probes)
        for i in range(width):
            pieces = torch.stack([dots(probes[i, None, sl], products[i, sl])[0]
                                  for sl in slices])
            parts[:, done + i] = pieces
            totals[done + i] = pieces.sum()
        done += width
        del probes, products
    return totals, parts


def _sketch(op: Any, size: int, block_size: int, gen: torch.Generator, fill: torch.Generator,
            device: torch.device) -> Tensor:
    """Rows of :math:`Q = \\operatorname{orth}(HS)` for ``size`` Rademacher columns of
    :math:`S` (the same draws as ``rademacher(P, size, gen)``), in the operator's dtype."""
    signs = torch.randint(0, 2, (op.size, size), generator=gen, dtype=torch.int8)
    packed = pack_signs(signs)
    del signs
    rows = torch.empty(size, op.size, dtype=op.dtype, device=device)
    start = 0
    for width in block_sizes(size, block_size):
        block = unpack_signs(packed, op.size, slice(start, start + width), op.dtype, device)
        rows[start:start + width] = product(op, block.T)
        del block
        start += width
    del packed
    orthonormalize_rows(rows, fill)
    return rows


def _exact_parts(op: Any, basis: Tensor, block_size: int, slices: list[slice]) -> Tensor:
    """Per slice, :math:`\\sum_{j \\in s} [QQ^\\top H + (I-QQ^\\top) H QQ^\\top]_{jj}`
    (float64; they sum to :math:`\\operatorname{tr}(Q^\\top H Q)`)."""
    count = basis.shape[0]
    projected = torch.zeros(count, count, dtype=torch.float64)   # Q^T H Q
    first = torch.zeros(len(slices), dtype=torch.float64)        # diag(Q Q^T H) per slice
    start = 0
    for width in block_sizes(count, block_size):
        products = product(op, basis[start:start + width])
        projected[:, start:start + width] = gram(basis, products)
        for i in range(width):
            first += torch.stack([dots(basis[start + i, None, sl], products[i, sl])[0]
                                  for sl in slices])
        start += width
        del products
    # diag(Q Q^T H Q Q^T) summed over a slice = <Q_s Q_s^T, Q^T H Q>
    second = torch.stack([(gram(basis[:, sl]) * projected.T).sum() for sl in slices])
    return 2.0 * first - second


def trace(op: Any, *, num_matvecs: int = 100, method: str = "hutch++", seed: int = 0,
          block_size: int | None = None,
          basis_device: str | torch.device | None = None) -> TraceResult:
    """Estimate :math:`\\operatorname{tr}(H)` with ``num_matvecs`` products (see module doc).

    Extra memory: Hutchinson ``16 b`` bytes per parameter (``b = block_size``); Hutch++ its
    sketch, ``num_matvecs // 3`` vectors in the operator's dtype (100 products, float32: about
    150 bytes per parameter in all); plus one block's working memory in the operator.

    Args:
        op: a symmetric operator (``size``, ``dtype``, ``device``, ``matvec``).
        num_matvecs: product budget (Hutchinson: at least 2; Hutch++: at least 4).
        method: ``"hutch++"`` (default) or ``"hutchinson"``.
        seed: seeds the probes (a CPU generator: identical on every rank).
        block_size: probes per ``matvec`` call (default 8 for Hutchinson, 1 for Hutch++, which
            already holds its sketch: each vector of a block costs the operator working memory).
        basis_device: where Hutch++ keeps its sketch (default: the operator's device).

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
    block_size = DEFAULT_BLOCK_SIZE[method] if block_size is None else block_size
    if block_size < 1:
        raise FlatlabError(f"block_size must be positive, got {block_size}")
    gen = generator(seed)
    named = param_slices(op)
    slices = [sl for _, sl in named] or [slice(0, op.size)]

    if method == "hutchinson":
        samples, parts = _hutchinson_samples(op, num_matvecs, block_size, gen, slices)
        per_param = {name: _mean_and_stderr(parts[i]) for i, (name, _) in enumerate(named)}
        estimate, stderr = _mean_and_stderr(samples)
        return TraceResult(estimate, stderr, num_matvecs, method, per_param, 0.0, samples)

    sketch_size = min(num_matvecs // 3, op.size)
    basis = _sketch(op, sketch_size, block_size, gen, generator(seed + _FILL_SEED),
                    resolve_basis_device(op, basis_device))
    exact_parts = _exact_parts(op, basis, block_size, slices)
    remaining = num_matvecs - 2 * sketch_size if sketch_size < op.size else 0
    samples, parts = _projected_samples(op, remaining, block_size, gen, basis, slices)
    del basis
    mean, stderr = _mean_and_stderr(samples)
    if remaining == 0:
        stderr = 0.0  # Q spans the whole space: the trace is exact
    per_param = {}
    for i, (name, _) in enumerate(named):
        part_mean, part_stderr = _mean_and_stderr(parts[i])
        per_param[name] = (float(exact_parts[i]) + part_mean,
                           0.0 if remaining == 0 else part_stderr)
    exact = float(exact_parts.sum())
    used = 2 * sketch_size + remaining
    return TraceResult(exact + mean, stderr, used, method, per_param, exact, samples)
