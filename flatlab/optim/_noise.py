"""Noise for the perturbation optimizers: one ``torch.Generator``, scaled Gaussian draws."""

from __future__ import annotations

import math

import torch
from torch import Tensor

NOISE_TYPES = ("absolute", "filter")
#: mixed into every noise seed, so the noise stream never equals ``torch.manual_seed(seed)``'s
NOISE_SEED_SALT = 0x5EED_F1A7


def mix_seed(seed: int, salt: int) -> int:
    """A 63-bit seed from ``(seed, salt)`` (splitmix64 finaliser): deterministic, well spread."""
    z = (seed * 0x9E3779B97F4A7C15 + salt + 0x632BE59BD9B4E019) & 0xFFFFFFFFFFFFFFFF
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
    return (z ^ (z >> 31)) >> 1


def noise_generator(seed: int, device: torch.device | str = "cpu", *,
                    rank: int | None = None) -> torch.Generator:
    """The generator of the perturbation noise for ``seed``: seeded with
    ``mix_seed(seed, NOISE_SEED_SALT)`` (then ``mix_seed(., rank)`` when ``rank`` is given).

    The salt keeps the noise independent of everything else seeded with the same number: a
    run that calls ``torch.manual_seed(seed)`` to initialise its weights and passes the same
    ``seed`` to NSO would otherwise draw ``U_1 / sigma`` equal to the initial weights' normals.
    """
    mixed = mix_seed(int(seed), NOISE_SEED_SALT)
    if rank is not None:
        mixed = mix_seed(mixed, int(rank))
    return torch.Generator(device=device).manual_seed(mixed)


def standard_normals(generator: torch.Generator, like: list[Tensor]) -> list[Tensor]:
    """``Z ~ N(0, I)`` for every tensor in ``like``, from one call on ``generator``.

    One flat vector of ``sum(numel)`` numbers is drawn (float32, or float64 when a tensor is
    float64) on the generator's device and split in order into views shaped like ``like``
    (cast to each tensor's dtype and device where they differ). One call instead of one per
    tensor keeps the draw cheap on GPUs (one kernel) and CPUs (one dispatch).
    """
    dtype = torch.float64 if any(t.dtype == torch.float64 for t in like) else torch.float32
    flat = torch.empty(sum(t.numel() for t in like), dtype=dtype, device=generator.device)
    flat.normal_(generator=generator)
    chunks = flat.split([t.numel() for t in like])
    return [z.view(t.shape).to(device=t.device, dtype=t.dtype) for z, t in zip(chunks, like,
                                                                              strict=True)]


def scale_noise(units: list[Tensor], weights: list[Tensor], sigmas: list[float],
                noises: list[str]) -> list[Tensor]:
    r"""Turn standard normal draws into the perturbations ``U`` (in place), tensor by tensor.

    * ``"absolute"``: :math:`U = \sigma Z \sim \mathcal N(0, \sigma^2 I)`.
    * ``"filter"``: for a tensor with two or more dimensions each output filter ``j`` (a slice
      along dim 0: one row of a Linear weight, one output channel of a Conv kernel) gets
      :math:`U_j = \sigma \lVert W_j \rVert_2 Z_j`; a 0-D/1-D tensor (bias, norm scale) is one
      filter: :math:`U = \sigma \lVert W \rVert_2 Z`.
    """
    absolute = [(z, s) for z, s, n in zip(units, sigmas, noises, strict=True) if n == "absolute"]
    if absolute:
        torch._foreach_mul_([z for z, _ in absolute], [s for _, s in absolute])
    for z, w, sigma, noise in zip(units, weights, sigmas, noises, strict=True):
        if noise == "absolute":
            continue
        if w.dim() < 2:
            z.mul_(sigma * torch.linalg.vector_norm(w))
        else:
            norms = torch.linalg.vector_norm(w.flatten(1), dim=1).mul_(sigma)
            z.mul_(norms.view(-1, *([1] * (w.dim() - 1))))
    return units


def check_sigma_and_noise(sigma: float, noise: str) -> None:
    """``ValueError`` naming the value unless ``sigma >= 0`` (finite) and ``noise`` is known."""
    if not (sigma >= 0.0 and math.isfinite(sigma)):
        raise ValueError(f"Invalid sigma: {sigma!r} (must be >= 0)")
    if noise not in NOISE_TYPES:
        raise ValueError(f"Invalid noise: {noise!r} (choose 'absolute' or 'filter')")
