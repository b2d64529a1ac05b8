"""The in-memory :class:`Dataset` every loader returns, and per-channel input statistics."""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch
from torch import Tensor

from flatlab.errors import FlatlabError


@dataclass(frozen=True)
class Dataset:
    """Train, test and (optional) validation tensors of one data set, and how to rebuild it.

    ``x_*`` hold ``(N, *input_shape)`` examples as stored: float32 model inputs for the built-in
    data sets, **uint8** for image folders and uint8 factory data (4x less memory). Pass every
    batch through :meth:`normalize` before the model; for float storage it is the identity, so
    code that always calls it works for both. ``y_*`` are int64 class indices.
    ``spec`` is JSON-able: ``dataset_from_spec(spec)`` returns the same tensors.

    ``x_val``/``y_val`` are the validation split when there is one (an image folder's ``val/``,
    or ``validation_fraction``, which also makes it the test split). ``mean``/``std`` are the
    per-channel statistics of the training split's ``x / 255`` (uint8 storage only);
    ``classes`` names the classes where the source has names (folder names).
    """

    name: str
    x_train: Tensor
    y_train: Tensor
    x_test: Tensor
    y_test: Tensor
    num_classes: int
    input_shape: tuple[int, ...]
    spec: dict
    x_val: Tensor | None = None
    y_val: Tensor | None = None
    mean: Tensor | None = None
    std: Tensor | None = None
    classes: tuple[str, ...] = field(default=())

    def __post_init__(self) -> None:
        splits = [("train", self.x_train, self.y_train), ("test", self.x_test, self.y_test)]
        if (self.x_val is None) != (self.y_val is None):
            raise FlatlabError(f"dataset {self.name!r}: x_val and y_val go together")
        if self.x_val is not None:
            splits.append(("val", self.x_val, self.y_val))
        for split, x, y in splits:
            if not isinstance(x, Tensor) or not isinstance(y, Tensor):
                raise FlatlabError(f"dataset {self.name!r}: {split} split is not tensors")
            if tuple(x.shape[1:]) != tuple(self.input_shape) or y.shape != (len(x),):
                raise FlatlabError(f"dataset {self.name!r}: {split} split has x {tuple(x.shape)}"
                                   f" and y {tuple(y.shape)}, expected (N, *{self.input_shape})"
                                   f" and (N,)")
            if y.dtype != torch.int64:
                raise FlatlabError(f"dataset {self.name!r}: {split} labels are {y.dtype}, "
                                   f"not int64 class indices")
            if len(y) and (int(y.min()) < 0 or int(y.max()) >= self.num_classes):
                raise FlatlabError(f"dataset {self.name!r}: {split} labels must lie in "
                                   f"[0, {self.num_classes})")
            if x.dtype != self.x_train.dtype:
                raise FlatlabError(f"dataset {self.name!r}: {split} split is {x.dtype}, "
                                   f"train is {self.x_train.dtype}")
        if self.x_train.dtype == torch.uint8 and (self.mean is None or self.std is None):
            raise FlatlabError(f"dataset {self.name!r}: uint8 storage needs mean and std")

    @property
    def has_validation(self) -> bool:
        """Whether there is a validation split (``x_val``, ``y_val``)."""
        return self.x_val is not None

    def normalize(self, x: Tensor) -> Tensor:
        """Model inputs from stored examples: ``(x / 255 - mean) / std`` per channel for uint8,
        ``x`` itself for any other dtype. Works on any device (statistics follow ``x``)."""
        if x.dtype != torch.uint8 or self.mean is None or self.std is None:
            return x
        mean = self.mean.to(x.device)
        std = self.std.to(x.device)
        return (x.to(torch.float32) / 255.0 - mean) / std

    def split_validation(self, fraction: float, seed: int = 0) -> Dataset:
        """Hold out ``fraction`` of the training split (seeded shuffle) as the validation split.

        It becomes the test split too; the real test split is dropped, so model selection
        never sees it.
        """
        if not 0.0 < fraction < 1.0:
            raise FlatlabError(f"validation fraction must be in (0, 1), got {fraction!r}")
        if self.has_validation:
            raise FlatlabError(f"dataset {self.name!r} already has a validation split; "
                               f"validation_fraction would replace it")
        n = len(self.y_train)
        n_val = int(round(n * fraction))
        if n_val < 1 or n_val >= n:
            raise FlatlabError(
                f"validation fraction {fraction} of {n} training examples leaves an empty split")
        order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
        val, train = order[:n_val], order[n_val:]
        kwargs = dict(self.spec["kwargs"], validation_fraction=fraction, validation_seed=seed)
        x_val, y_val = self.x_train[val], self.y_train[val]
        return replace(self, x_train=self.x_train[train], y_train=self.y_train[train],
                       x_test=x_val, y_test=y_val, x_val=x_val, y_val=y_val,
                       spec=dict(self.spec, kwargs=kwargs))


def channel_statistics(x: Tensor, *, chunk: int = 1024) -> tuple[Tensor, Tensor]:
    """Mean and population std of ``x / 255`` per channel for uint8 ``x`` (dim 1 of ``(N, C,
    ...)``; one value for ``(N, L)``), plus 1e-8 on the std as the CIFAR loader does.

    Exact: byte-value histograms (integer counts, a chunk of examples at a time, no float copy
    of ``x``), then ``mean = sum_v n_v v / n`` and ``var = sum_v n_v (v - mean)^2 / n`` over
    the 256 values in float64. Returned as float32 shaped to broadcast against a batch:
    ``(C, 1, ..., 1)`` or ``()``.
    """
    if x.dtype != torch.uint8:
        raise TypeError(f"channel_statistics needs uint8 data, got {x.dtype}")
    per_channel = x.dim() >= 3
    channels = x.shape[1] if per_channel else 1
    counts = torch.zeros(channels, 256, dtype=torch.int64)
    for start in range(0, len(x), chunk):
        block = x[start:start + chunk]
        for c in range(channels):
            values = block[:, c] if per_channel else block
            counts[c] += torch.bincount(values.reshape(-1), minlength=256)
    levels = torch.arange(256, dtype=torch.float64) / 255.0
    total = counts.sum(dim=1).clamp_min(1).to(torch.float64)
    mean = (counts * levels).sum(dim=1) / total
    var = (counts * (levels - mean[:, None]).square()).sum(dim=1) / total
    std = var.sqrt() + 1e-8
    shape = (-1, *([1] * (x.dim() - 2))) if per_channel else ()
    return mean.to(torch.float32).reshape(shape), std.to(torch.float32).reshape(shape)
