"""Training-time augmentation, computed on whole batches and driven by an explicit generator.

``crop_flip`` is the standard CIFAR augmentation (He et al. 2016): pad each image by ``p``
pixels of zeros, cut a random ``H x W`` window, and mirror it left-right with probability 1/2.
For example ``n`` with offsets ``(a_n, b_n)`` drawn uniformly from ``{0, ..., 2p}`` and flip
bit ``f_n``::

    out[n, c, i, j] = padded[n, c, a_n + i, b_n + (W - 1 - j if f_n else j)]

The random numbers come only from ``generator`` (``3N`` integers per call, drawn on the
generator's device), so the same generator state gives the same batch: saving and restoring
the generator's state makes a resumed run bit-exact. Apply it to training batches only.

Zero padding means black for stored uint8 images (as torchvision's ``RandomCrop(padding=4)``
before ``Normalize``) and the channel mean for standardised float inputs; either works, the
first matches the literature.
"""

from __future__ import annotations

import torch
from torch import Tensor

from flatlab.errors import FlatlabError

AUGMENTATIONS: tuple[str, ...] = ("none", "crop-flip")


def crop_flip(x: Tensor, generator: torch.Generator, padding: int = 4) -> Tensor:
    """Random ``padding``-pixel crop and horizontal flip of every image in ``x`` ``(N, C, H, W)``.

    Returns a new tensor of ``x``'s shape, dtype and device. Only image batches are accepted
    (else a FlatlabError, a ValueError): shifting or mirroring a 1-D signal changes its meaning
    in data-set specific ways.

    >>> x = torch.arange(4.0).reshape(1, 1, 2, 2)
    >>> out = crop_flip(x, torch.Generator().manual_seed(0), padding=0)  # flip only
    >>> bool(torch.equal(out, x) or torch.equal(out, x.flip(-1)))
    True
    """
    if x.dim() != 4:
        raise FlatlabError(f"crop_flip needs an image batch (N, C, H, W), got shape "
                           f"{tuple(x.shape)}; use --augment none for other data")
    if isinstance(padding, bool) or not isinstance(padding, int) or padding < 0:
        raise FlatlabError(f"crop_flip padding must be a non-negative integer, got {padding!r}")
    n, _, height, width = x.shape
    draws = torch.randint(0, 2 * padding + 1, (n, 2), generator=generator,
                          device=generator.device).to(x.device)
    flips = torch.randint(0, 2, (n,), generator=generator,
                          device=generator.device).to(x.device, torch.bool)
    padded = torch.nn.functional.pad(x, (padding,) * 4) if padding else x
    cols = torch.arange(width, device=x.device)
    rows = draws[:, :1] + torch.arange(height, device=x.device)             # (N, H)
    cols = draws[:, 1:] + torch.where(flips[:, None], width - 1 - cols, cols)  # (N, W)
    batch = torch.arange(n, device=x.device)[:, None, None]
    # advanced indices on dims 0, 2, 3 around a slice: the result is (N, H, W, C)
    out = padded[batch, :, rows[:, :, None], cols[:, None, :]]
    return out.permute(0, 3, 1, 2).contiguous()
