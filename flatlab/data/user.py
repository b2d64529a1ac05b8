"""Data sets from user factories: ``"package.module:factory"`` (see :mod:`flatlab.factory`).

The factory is called with the data set's keyword arguments, plus ``seed`` and ``data_dir``
when its signature names them, and returns either

* a flatlab :class:`Dataset` (used as it is; flatlab sets its name and spec), or
* ``(train, test)`` or ``(train, val, test)``: torch-style data sets (``len(ds)``, ``ds[i]``)
  whose items are ``(x, y)``; ``x`` a tensor, numpy array, number or PIL image (-> ``(C, H,
  W)`` uint8), ``y`` an integer class index.

Converted examples are stacked into one tensor per split: floating inputs as float32 (used as
given, so the factory does its own scaling); uint8 inputs stay uint8 and are standardised per
channel with training-split statistics by :meth:`Dataset.normalize`; other integer inputs (token
ids) stay as they are. ``num_classes`` is ``len(train.classes)`` where the training set has
``classes`` (torchvision data sets do), else the largest label + 1.
"""

from __future__ import annotations

import os
from dataclasses import replace
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from flatlab.data.dataset import Dataset, channel_statistics
from flatlab.errors import FlatlabError
from flatlab.factory import call_arguments, import_factory


def load_factory_dataset(name: str, *, seed: int, data_dir: str | os.PathLike | None,
                         trust_code: bool, kwargs: dict[str, Any], spec: dict) -> Dataset:
    """Call the factory ``name`` (imported only with ``trust_code``) and convert its result."""
    factory = import_factory(name, what="dataset", trust_code=trust_code)
    arguments = call_arguments(
        factory, name, kwargs, always={},
        if_named={"seed": seed, "data_dir": None if data_dir is None else str(data_dir)},
        what="dataset")
    try:
        result = factory(**arguments)
    except FlatlabError:
        raise
    except (TypeError, ValueError) as err:
        raise FlatlabError(f"dataset {name!r} with {kwargs or 'default arguments'}: "
                           f"{type(err).__name__}: {err}") from None
    if isinstance(result, Dataset):
        return replace(result, name=name, spec=spec)
    if not isinstance(result, tuple | list) or len(result) not in (2, 3):
        raise FlatlabError(f"dataset factory {name!r} returned {type(result).__name__}; expected "
                           f"a flatlab Dataset, (train, test) or (train, val, test)")
    splits = [_stack(part, f"{name!r} {split}") for part, split in
              zip(result, ("train", "test") if len(result) == 2 else ("train", "val", "test"),
                  strict=True)]
    (x_train, y_train), (x_test, y_test) = splits[0], splits[-1]
    labels = [int(y.max()) + 1 for _, y in splits if len(y)]
    num_classes = max(labels, default=1)
    classes = getattr(result[0], "classes", None)
    if isinstance(classes, list | tuple) and len(classes) >= num_classes:
        num_classes, classes = len(classes), tuple(str(c) for c in classes)
    else:
        classes = ()
    mean = std = None
    if x_train.dtype == torch.uint8:
        mean, std = channel_statistics(x_train)
    x_val, y_val = splits[1] if len(splits) == 3 else (None, None)
    return Dataset(name=name, x_train=x_train, y_train=y_train, x_test=x_test, y_test=y_test,
                   num_classes=num_classes, input_shape=tuple(x_train.shape[1:]), spec=spec,
                   x_val=x_val, y_val=y_val, mean=mean, std=std, classes=classes)


def _stack(data: Any, what: str) -> tuple[Tensor, Tensor]:
    """One split of ``(x, y)`` items -> ``(x stacked, y int64)``, preallocated (one copy)."""
    try:
        n = len(data)
    except TypeError:
        raise FlatlabError(f"dataset {what} split has no len(): not a map-style data set"
                           ) from None
    if n == 0:
        raise FlatlabError(f"dataset {what} split is empty")
    x_out: Tensor | None = None
    y_out = torch.empty(n, dtype=torch.int64)
    for i in range(n):
        item = data[i]
        if not isinstance(item, tuple | list) or len(item) != 2:
            raise FlatlabError(f"dataset {what} split: item {i} is not an (x, y) pair")
        x, y = _example(item[0], what, i), _label(item[1], what, i)
        if x_out is None:
            x_out = torch.empty((n, *x.shape), dtype=x.dtype)
        elif x.shape != x_out.shape[1:] or x.dtype != x_out.dtype:
            raise FlatlabError(f"dataset {what} split: item {i} is {x.dtype} {tuple(x.shape)}, "
                               f"item 0 was {x_out.dtype} {tuple(x_out.shape[1:])}")
        x_out[i] = x
        y_out[i] = y
    assert x_out is not None
    return x_out, y_out


def _example(x: Any, what: str, i: int) -> Tensor:
    if isinstance(x, Image.Image):
        pixels = np.asarray(x)
        x = torch.from_numpy(pixels.reshape(*pixels.shape[:2], -1).copy()).permute(2, 0, 1)
    try:
        tensor = torch.as_tensor(x)
    except (TypeError, ValueError, RuntimeError):
        raise FlatlabError(f"dataset {what} split: input {i} is {type(x).__name__}, not a "
                           f"tensor, array, number or PIL image") from None
    if tensor.is_floating_point():
        return tensor.to(torch.float32)
    if tensor.dtype == torch.bool or tensor.is_complex():
        raise FlatlabError(f"dataset {what} split: input {i} has dtype {tensor.dtype}")
    return tensor


def _label(y: Any, what: str, i: int) -> int:
    if isinstance(y, Tensor) and y.numel() == 1 and not y.is_floating_point():
        y = y.item()
    elif isinstance(y, np.ndarray | np.generic) and y.size == 1:
        y = y.item()
    if isinstance(y, bool) or not isinstance(y, int):
        raise FlatlabError(f"dataset {what} split: label {i} is {y!r}, not an integer class")
    return y
