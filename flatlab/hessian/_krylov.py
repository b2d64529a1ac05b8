"""Vectors stored in the operator's dtype, coefficients in float64: the shared kernel of the
Lanczos, Hutch++ and SLQ estimators.

Vectors are rows of ``(r, P)`` tensors (each vector contiguous). Inner products run as BLAS
calls in the storage dtype on chunks of :data:`CHUNK` entries and are summed over the chunks in
float64: in float32 the error is about 1e-8 of :math:`\\|a\\|\\|b\\|` where one BLAS call over
millions of entries gives 1e-5 (and ``torch.linalg.vector_norm`` 1e-4). No helper allocates a
vector of length ``P`` beyond what it is handed, except :func:`orthonormalize_rows` and the
random vectors (one row each).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
from torch import Tensor

from flatlab.errors import FlatlabError

CHUNK = {"cpu": 1 << 16}  # entries per BLAS call in a reduction; other devices: one call
_SECOND_PASS = 8.0  # repeat Gram-Schmidt when the left-over overlap exceeds this many eps


def resolve_basis_device(op: Any, device: str | torch.device | None) -> torch.device:
    """Where bases live: ``device`` (e.g. ``"cpu"`` while products run on a GPU) or the
    operator's device."""
    if device is None:
        return torch.device(op.device)
    try:
        return torch.device(device)
    except (RuntimeError, TypeError) as err:
        raise FlatlabError(f"basis_device={device!r} is not a torch device") from err


def bounds(size: int, device: torch.device) -> list[tuple[int, int]]:
    """``[(start, stop)]`` chunks of ``range(size)`` for a float64-summed reduction."""
    step = CHUNK.get(device.type, size) or 1
    return [(start, min(start + step, size)) for start in range(0, max(size, 1), step)]


def dots(rows: Tensor, vector: Tensor) -> Tensor:
    """``rows @ vector`` as float64 ``(r,)`` (chunked BLAS, float64 sums; see module doc)."""
    if rows.shape[0] == 0:
        return torch.zeros(0, dtype=torch.float64)
    if rows.dtype == torch.float64:
        return torch.mv(rows, vector.to(torch.float64)).cpu()
    vector = vector.to(rows.dtype)
    parts = [torch.mv(rows[:, a:b], vector[a:b]) for a, b in bounds(vector.numel(),
                                                                    vector.device)]
    return torch.stack(parts).to(torch.float64).sum(dim=0).cpu()


def gram(rows: Tensor, other: Tensor | None = None) -> Tensor:
    """``rows @ other.T`` (default ``other = rows``) as float64 ``(r, q)``, chunked like
    :func:`dots`."""
    other = rows if other is None else other
    if rows.dtype == torch.float64:
        return (rows @ other.T).cpu()
    parts = [rows[:, a:b] @ other[:, a:b].T for a, b in bounds(rows.shape[1], rows.device)]
    return torch.stack(parts).to(torch.float64).sum(dim=0).cpu()


def norm(vector: Tensor) -> float:
    """Euclidean norm of one vector (float64 sum of chunked squares)."""
    return math.sqrt(max(float(dots(vector[None], vector)[0]), 0.0))


def subtract(vector: Tensor, rows: Tensor, coefficients: Tensor) -> None:
    """``vector -= rows.T @ coefficients`` in place (one BLAS call)."""
    if rows.shape[0]:
        vector.addmv_(rows.T, coefficients.to(device=rows.device, dtype=rows.dtype),
                      alpha=-1.0)


def orthogonalize(rows: Tensor, vector: Tensor) -> tuple[Tensor, float]:
    """Remove from ``vector`` (in place) its components along ``rows``: classical Gram-Schmidt,
    a second pass only where the first left an overlap above rounding. Returns the float64
    coefficients (``rows @ vector`` before, summed over the passes) and the norm after."""
    coefficients = dots(rows, vector)
    subtract(vector, rows, coefficients)
    left = dots(rows, vector)
    size = norm(vector)
    eps = torch.finfo(rows.dtype).eps if rows.shape[0] else 0.0
    if rows.shape[0] and float(left.norm()) > _SECOND_PASS * eps * max(size, 1e-300):
        subtract(vector, rows, left)
        coefficients = coefficients + left
        size = norm(vector)
    return coefficients, size


def combine_rows(rows: Tensor, mixing: Tensor, out: Tensor) -> None:
    """``out = mixing.T @ rows`` chunk by chunk (``mixing`` float64 ``(r, q)``); ``out`` may be
    ``rows[:q]`` itself (every chunk is read before it is written)."""
    weights = mixing.T.to(device=rows.device, dtype=rows.dtype)
    step = CHUNK.get(rows.device.type, 1 << 22)
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
        _, size = orthogonalize(rows[:index], row)
        rows[index] = row / size


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
    """``(P, c)`` 0/1 int8 -> ``(ceil(P/8), c)`` uint8 bit planes (8x less memory)."""
    size, columns = signs.shape
    packed = torch.empty(-(-size // 8), columns, dtype=torch.uint8)
    rows = 1 << 16  # a multiple of 8: chunks keep the temporaries small
    for start in range(0, size, rows):
        piece = signs[start:start + rows].to(torch.uint8)
        pad = -piece.shape[0] % 8
        if pad:
            piece = torch.cat([piece, piece.new_zeros(pad, columns)])
        packed[start // 8:start // 8 + piece.shape[0] // 8] = (
            piece.view(-1, 8, columns) * _SHIFTS).sum(dim=1, dtype=torch.uint8)
    return packed


def unpack_signs(packed: Tensor, size: int, columns: slice, device: torch.device) -> Tensor:
    """Columns ``columns`` of the packed 0/1 matrix as a float64 ``(P, c)`` block of +-1."""
    planes = packed[:, columns]
    bits = (planes[:, None, :] & _SHIFTS).ne(0).reshape(-1, planes.shape[1])[:size]
    return bits.to(device=device, dtype=torch.float64) * 2.0 - 1.0


_SHIFTS = torch.tensor([1, 2, 4, 8, 16, 32, 64, 128], dtype=torch.uint8)[None, :, None]
