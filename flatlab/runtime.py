"""Device choice, seeding, threads and numeric precision shared by the command-line tools."""

from __future__ import annotations

import contextlib
import random
from collections.abc import Iterator

import numpy as np
import torch

from flatlab.errors import FlatlabError

DEVICES = ("auto", "cpu", "cuda")
# --precision: the dtype the forward passes run in under torch.autocast (None: no autocast)
AUTOCAST_DTYPES: dict[str, torch.dtype | None] = {"fp32": None, "bf16": torch.bfloat16,
                                                  "fp16": torch.float16}


def resolve_device(name: str = "auto") -> torch.device:
    """``"auto"`` -> CUDA when available, else CPU; ``"cuda"`` without a GPU is a user error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.split(":")[0] not in ("cpu", "cuda"):
        raise FlatlabError(f"unknown device {name!r}; choose one of {', '.join(DEVICES)}")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise FlatlabError(f"device {name!r} requested but CUDA is not available on this machine")
    return torch.device(name)


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (all devices) for reproducible runs."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


SMALL_MODEL = 1_000_000  # parameters; below this, threads=0 means one CPU thread


def set_threads(threads: int, num_params: int, device: torch.device) -> int:
    """Apply ``threads`` to torch's intra-op pool and return the number now in use.

    ``threads=0`` picks: one thread for a model under :data:`SMALL_MODEL` parameters on the CPU
    (intra-op threading does not pay for itself on small layers, and on a busy machine its
    spinning threads make a small model many times slower), else torch's current setting.
    """
    if threads == 0 and device.type == "cpu" and num_params < SMALL_MODEL:
        threads = 1
    if threads > 0:
        torch.set_num_threads(threads)
    return torch.get_num_threads()


@contextlib.contextmanager
def exact_float32() -> Iterator[None]:
    """Full float32 matmuls and convolutions on CUDA while inside: TF32 off for cuBLAS and cuDNN
    (cuDNN allows it by default, ~1e-3 relative error), the previous flags restored after. On
    the CPU it changes nothing. Curvature numbers then match the CPU's to rounding."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def autocast(device: torch.device, precision: str) -> torch.autocast:
    """``torch.autocast`` for ``precision`` (a key of :data:`AUTOCAST_DTYPES`) on ``device``;
    disabled for ``"fp32"``. Weights and optimizer state are untouched: only the operations
    inside run in the lower precision."""
    dtype = AUTOCAST_DTYPES[precision]
    return torch.autocast(device.type, dtype=dtype or torch.bfloat16, enabled=dtype is not None)
