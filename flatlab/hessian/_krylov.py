"""Vectors stored in the operator's dtype, coefficients in float64: the shared kernel of the
Lanczos, Hutch++ and SLQ estimators.

Vectors are rows of ``(r, P)`` tensors (each vector contiguous). Every inner product
(:func:`dots`, :func:`gram`, :func:`norm`, and the coefficients :func:`project_out` removes) is
a sum of float32 partial sums over 64 entries, accumulated in float64. One BLAS call is not
accurate enough on millions of entries: measured on 4.35M float32 entries, a sum of squares
comes out with a relative error of 2e-5 from ``torch.dot``, 5e-3 from a 1 x P matrix product
and 5e-4 from ``torch.linalg.vector_norm``, against 5e-10 here; Gram-Schmidt with BLAS
coefficients left overlaps of 4e-5 in a Lanczos basis of a Hessian-like spectrum (whose few
large entries dominate every running sum), and the Ritz values 1e-5 off.

Reductions are single calls, not Python loops over chunks: on a busy machine every small
multi-threaded call waits for its threads (a loop measured 7x slower).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
from torch import Tensor

from flatlab.errors import FlatlabError

PARTIAL = 64  # entries per float32 partial sum of an accurate reduction
_COMBINE_BYTES = 1 << 22  # temporary of combine_rows
_PARTIAL_BYTES = 1 << 23  # temporaries of gram
_DGKS = 2 ** -0.5  # Gram-Schmidt again when a pass removed more than this share of the norm


def resolve_basis_device(op: Any, device: str | torch.device | None) -> torch.device:
    """Where bases live: ``device`` (e.g. ``"cpu"`` while products run on a GPU) or the
    operator's device."""
    if device is None:
        return torch.device(op.device)
    try:
        return torch.device(device)
    except (RuntimeError, TypeError) as err:
        raise FlatlabError(f"basis_device={device!r} is not a torch device") from err


def gram(rows: Tensor, other: Tensor | None = None) -> Tensor:
    """``rows @ other.T`` (default ``other = rows``) as float64 ``(r, q)`` on the CPU: batched
    products over :data:`PARTIAL`-entry slices, summed in float64 (in column blocks whose
    ``(slices, r, q)`` temporary stays below :data:`_PARTIAL_BYTES`)."""
    other = rows if other is None else other
    if rows.dtype == torch.float64:
        return (rows @ other.T.to(torch.float64)).cpu()
    other = other.to(rows.dtype)
    size = rows.shape[1]
    head = size // PARTIAL * PARTIAL
    block = PARTIAL * max(1, _PARTIAL_BYTES // (8 * max(rows.shape[0] * other.shape[0], 1)))
    total = (rows[:, head:] @ other[:, head:].T).to(torch.float64)
    for start in range(0, head, block):
        stop = min(start + block, head)
        count = (stop - start) // PARTIAL
        left = rows[:, start:stop].reshape(rows.shape[0], count, PARTIAL).transpose(0, 1)
        right = other[:, start:stop].reshape(other.shape[0], count, PARTIAL).permute(1, 2, 0)
        total += torch.bmm(left, right).sum(dim=0, dtype=torch.float64)
    return total.cpu()


def dots(rows: Tensor, vector: Tensor) -> Tensor:
    """``rows @ vector`` as float64 ``(r,)`` on the CPU, accurately (see :func:`gram`)."""
    if rows.shape[0] != 1 or rows.dtype == torch.float64:
        return gram(rows, vector[None])[:, 0]
    row, vector = rows[0], vector.to(rows.dtype)
    head = row.numel() // PARTIAL * PARTIAL
    partial = torch.einsum("nc,nc->n", row[:head].view(-1, PARTIAL),
                           vector[:head].view(-1, PARTIAL))
    total = partial.sum(dtype=torch.float64) + torch.dot(row[head:], vector[head:])
    return total.reshape(1).cpu()


def norm(vector: Tensor) -> float:
    """Euclidean norm of one vector, accurately (float32 norms of 64 entries, combined in
    float64).

    >>> import torch
    >>> vector = torch.rand(4_000_000, generator=torch.Generator().manual_seed(0))
    >>> exact = float(vector.double().norm())
    >>> plain = float(torch.linalg.vector_norm(vector))  # one float32 reduction
    >>> abs(norm(vector) / exact - 1) < 1e-9, abs(plain / exact - 1) > 1e-5
    (True, True)
    """
    if vector.dtype == torch.float64:
        return float(torch.linalg.vector_norm(vector))
    head = vector.numel() // PARTIAL * PARTIAL
    partial = torch.linalg.vector_norm(vector[:head].view(-1, PARTIAL), dim=1)
    total = (partial.to(torch.float64) ** 2).sum() + float(vector[head:].double().square().sum())
    return math.sqrt(float(total))


def project_out(rows: Tensor, vector: Tensor) -> None:
    """``vector -= rows.T @ (rows @ vector)`` in place (the coefficients by :func:`gram`)."""
    if rows.shape[0]:
        coefficients = gram(rows, vector[None])[:, 0]
        vector.addmv_(rows.T, coefficients.to(device=rows.device, dtype=rows.dtype),
                      alpha=-1.0)


def orthogonalize(rows: Tensor, vector: Tensor) -> float:
    """Remove from ``vector`` (in place) its components along the orthonormal ``rows``:
    classical Gram-Schmidt, a second pass when the first removed more than 30% of the norm
    (Daniel, Gragg, Kaufman, Stewart 1976). Returns the norm after."""
    before = float(torch.linalg.vector_norm(vector))  # a rough norm is enough to decide
    project_out(rows, vector)
    size = norm(vector)
    if size < _DGKS * before:
        project_out(rows, vector)
        size = norm(vector)
    return size


def combine_rows(rows: Tensor, mixing: Tensor, out: Tensor) -> None:
    """``out = mixing.T @ rows`` (``mixing`` float64 ``(r, q)``) in column chunks whose
    temporary is at most :data:`_COMBINE_BYTES`; ``out`` may be ``rows[:q]`` itself (every
    chunk is read before it is written)."""
    weights = mixing.T.to(device=rows.device, dtype=rows.dtype)
    itemsize = torch.finfo(rows.dtype).bits // 8
    step = max(4096, _COMBINE_BYTES // (itemsize * max(weights.shape[0], 1)))
    for start in range(0, rows.shape[1], step):
        stop = min(start + step, rows.shape[1])
        out[:, start:stop] = weights @ rows[:, start:stop]


def orthonormalize_rows(rows: Tensor, fill: torch.Generator) -> None:
    """Make the rows of ``rows`` orthonormal in place, spanning what they span.

    Two passes of the eigenvalue form of Cholesky QR (SVQB): with :math:`G = YY^\\top =
    U\\Lambda U^\\top` (float64), :math:`Y \\leftarrow \\Lambda^{-1/2}U^\\top Y`. Directions
    with :math:`\\Lambda_i` at rounding level are dependent; they are dropped and the missing
    rows filled with Gaussian vectors from ``fill`` orthogonalised against the rest, so the
    rows end orthonormal and as many as they started (as a Householder QR would give).
    """
    count = rows.shape[0]
    eps = torch.finfo(rows.dtype).eps
    kept = count
    for _ in range(2):
        if kept == 0:
            break
        values, vectors = np.linalg.eigh(gram(rows[:kept]).numpy())
        good = values > 1e3 * eps * max(float(values[-1]), 0.0)
        mixing = vectors[:, good][:, ::-1] / np.sqrt(values[good][::-1])
        kept = int(good.sum())
        combine_rows(rows[:mixing.shape[0]], torch.from_numpy(mixing.copy()), rows[:kept])
    for index in range(kept, count):
        row = gaussian_row(rows.shape[1], fill, rows)
        rows[index] = row / orthogonalize(rows[:index], row)


def gaussian_row(size: int, gen: torch.Generator, like: Tensor) -> Tensor:
    """One standard normal vector (drawn in float64 on the CPU, like
    :func:`flatlab.hessian._common.gaussian`) in ``like``'s dtype and device."""
    return torch.randn(size, generator=gen, dtype=torch.float64).to(like.device, like.dtype)


def product(op: Any, vectors: Tensor) -> Tensor:
    """``H`` applied to the rows of ``vectors`` (``(P,)`` or ``(b, P)``), returned as fresh
    rows in ``vectors``' dtype and device (the operator sees a ``(P,)`` vector or a ``(P, b)``
    block on its own device)."""
    device = torch.device(op.device)
    moved = vectors.to(device)
    out = op.matvec(moved if vectors.ndim == 1 else moved.T)
    out = out.to(device=vectors.device, dtype=vectors.dtype)
    if vectors.ndim == 2:
        out = out.T.contiguous()
    if out.data_ptr() == vectors.data_ptr() or out.data_ptr() == moved.data_ptr():
        out = out.clone()  # an operator that hands back its input must not alias our rows
    return out


def pack_signs(signs: Tensor) -> Tensor:
    """``(P, c)`` 0/1 int8 -> ``(ceil(P/8), c)`` uint8 bit planes (8x less memory); ``signs``
    is overwritten."""
    size, columns = signs.shape
    head = size - size % 8
    bits = signs.view(torch.uint8)
    packed = torch.empty(-(-size // 8), columns, dtype=torch.uint8)
    torch.sum(bits[:head].view(-1, 8, columns).mul_(_SHIFTS), dim=1, dtype=torch.uint8,
              out=packed[:head // 8])
    if head < size:
        packed[-1] = (bits[head:] * _SHIFTS[0, :size - head]).sum(dim=0, dtype=torch.uint8)
    return packed


def unpack_signs(packed: Tensor, size: int, columns: slice, dtype: torch.dtype,
                 device: torch.device) -> Tensor:
    """Columns ``columns`` of the packed 0/1 matrix as a ``(P, c)`` block of +-1."""
    planes = packed[:, columns]
    bits = (planes[:, None, :] & _SHIFTS).ne_(0).reshape(-1, planes.shape[1])[:size]
    return bits.to(device=device, dtype=dtype).mul_(2.0).sub_(1.0)


_SHIFTS = torch.tensor([1, 2, 4, 8, 16, 32, 64, 128], dtype=torch.uint8)[None, :, None]
