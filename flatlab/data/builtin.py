"""The built-in data sets: each loader returns float32 tensors, every split fixed by seed.

=============  =======================================================  ===============
name           source                                                   one example
=============  =======================================================  ===============
``mnist1d``    generated locally by the ``mnist1d`` package, cached     ``(40,)``
``digits``     scikit-learn's 8x8 digits, stratified 1437/360 split     ``(1, 8, 8)``
``cifar10``    python-pickle files the user already has (``data_dir``)  ``(3, 32, 32)``
``cifar100``   python-pickle files the user already has (``data_dir``)  ``(3, 32, 32)``
``synthetic``  teacher-student: a random MLP labels Gaussian inputs     ``(20,)``
=============  =======================================================  ===============

Features are standardised with statistics of the training split only (one mean/std for
mnist1d, digits and synthetic; one per colour channel for CIFAR). Nothing is downloaded.
CIFAR pickles are read with a restricted unpickler that can rebuild numpy arrays and plain
Python values and nothing else, so a hostile file cannot run code.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import pickle
import random
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from flatlab.errors import FlatlabError
from flatlab.io import WriteError, atomic_path


def cache_dir() -> Path:
    """Where generated data is cached: ``$FLATLAB_CACHE``, else ``~/.cache/flatlab``."""
    env = os.environ.get("FLATLAB_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "flatlab"


# --------------------------------------------------------------------------- loaders
# Each returns (x_train, y_train, x_test, y_test, num_classes) with x float32, y int64.

Arrays = tuple[Tensor, Tensor, Tensor, Tensor, int]


def _mnist1d(*, seed: int, data_dir: Any, num_samples: int = 5000, train_split: float = 0.8,
             shuffle_seq: bool = False, generation_seed: int = 42, classes: Any = None,
             train_size: Any = None) -> Arrays:
    """MNIST-1D (Greydanus 2020) as the package generates it; ``generation_seed=42`` and the
    defaults give the standard 4000/1000 benchmark split, whatever ``seed`` is.

    ``classes`` (e.g. ``[5, 6, 7, 8, 9]``) keeps those classes in both splits, relabelled
    ``0..len(classes)-1`` in the order given; ``train_size`` then keeps the first that many
    training examples (the generated order is already random). Standardised afterwards."""
    args = {"num_samples": int(num_samples), "train_split": float(train_split),
            "shuffle_seq": bool(shuffle_seq), "seed": int(generation_seed)}
    if args["num_samples"] < 20 or not 0.0 < args["train_split"] < 1.0:
        raise FlatlabError(f"mnist1d needs num_samples >= 20 and 0 < train_split < 1, got {args}")
    key = hashlib.sha256(json.dumps(args, sort_keys=True).encode()).hexdigest()[:16]
    path = cache_dir() / f"mnist1d-{key}.npz"
    arrays = _read_npz(path)
    if arrays is None:
        arrays = _generate_mnist1d(args)
        try:
            with atomic_path(path) as tmp, open(tmp, "wb") as fh:
                np.savez(fh, **arrays)
        except (OSError, WriteError):
            pass  # an unwritable cache only costs the next run two seconds
    x, y = arrays["x"].astype(np.float32), arrays["y"].astype(np.int64)
    x_test, y_test = arrays["x_test"].astype(np.float32), arrays["y_test"].astype(np.int64)
    x, y, x_test, y_test, num_classes = class_subset(x, y, x_test, y_test, 10, classes,
                                                     train_size)
    mean, std = x.mean(), x.std()
    return (_tensor((x - mean) / std), torch.from_numpy(y),
            _tensor((x_test - mean) / std), torch.from_numpy(y_test), num_classes)


def class_subset(x: np.ndarray, y: np.ndarray, x_test: np.ndarray, y_test: np.ndarray,
                 num_classes: int, classes: Any = None, train_size: Any = None
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, int]:
    """Keep ``classes`` (relabelled ``0..len-1`` in the order given) in both splits, then the
    first ``train_size`` training examples; ``None`` keeps everything."""
    if classes is not None:
        if (not isinstance(classes, list | tuple) or not classes
                or not all(isinstance(c, int) and not isinstance(c, bool) for c in classes)
                or len(set(classes)) != len(classes)
                or not all(0 <= c < num_classes for c in classes)):
            raise FlatlabError(f"classes must be a list of distinct class indices in "
                               f"[0, {num_classes}), got {classes!r}")
        relabel = np.full(num_classes, -1, dtype=np.int64)
        relabel[list(classes)] = np.arange(len(classes))
        keep, keep_test = relabel[y] >= 0, relabel[y_test] >= 0
        x, y = x[keep], relabel[y[keep]]
        x_test, y_test = x_test[keep_test], relabel[y_test[keep_test]]
        num_classes = len(classes)
    if train_size is not None:
        if isinstance(train_size, bool) or not isinstance(train_size, int) or train_size < 1:
            raise FlatlabError(f"train_size must be a positive integer, got {train_size!r}")
        if train_size > len(y):
            raise FlatlabError(f"train_size {train_size} exceeds the {len(y)} training "
                               f"examples")
        x, y = x[:train_size], y[:train_size]
    return x, y, x_test, y_test, num_classes


def _generate_mnist1d(args: dict) -> dict[str, np.ndarray]:
    from mnist1d.data import get_dataset_args, make_dataset

    full = get_dataset_args(as_dict=True)
    full.update(args)
    py_state, np_state = random.getstate(), np.random.get_state()
    try:  # make_dataset reseeds the global RNGs; give them back untouched
        data = make_dataset(_Namespace(full))
    finally:
        random.setstate(py_state)
        np.random.set_state(np_state)
    return {k: np.ascontiguousarray(data[k]) for k in ("x", "y", "x_test", "y_test")}


class _Namespace:
    def __init__(self, values: dict) -> None:
        self.__dict__.update(values)


def _read_npz(path: Path) -> dict[str, np.ndarray] | None:
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as npz:
            arrays = {k: npz[k] for k in ("x", "y", "x_test", "y_test")}
    except Exception:  # a corrupt or foreign cache file is regenerated
        return None
    return arrays


def _digits(*, seed: int, data_dir: Any, test_size: int = 360, classes: Any = None,
            train_size: Any = None) -> Arrays:
    """scikit-learn's 1797 8x8 digits; a stratified split seeded by ``seed`` (1437/360).
    ``classes`` and ``train_size`` select as for mnist1d (:func:`class_subset`)."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    bunch = load_digits()
    x = bunch.images.astype(np.float32)[:, None] / 16.0
    y = bunch.target.astype(np.int64)
    if not 10 <= int(test_size) <= len(y) - 10:
        raise FlatlabError(f"digits test_size must be in [10, {len(y) - 10}], got {test_size}")
    x_train, x_test, y_train, y_test = train_test_split(
        x, y, test_size=int(test_size), stratify=y, random_state=seed)
    x_train, y_train, x_test, y_test, num_classes = class_subset(
        x_train, y_train, x_test, y_test, 10, classes, train_size)
    mean, std = x_train.mean(), x_train.std()
    return (_tensor((x_train - mean) / std), torch.from_numpy(y_train),
            _tensor((x_test - mean) / std), torch.from_numpy(y_test), num_classes)


def _cifar10(*, seed: int, data_dir: Any) -> Arrays:
    """CIFAR-10 from ``data_batch_1..5`` and ``test_batch`` (the python version)."""
    root = _find_cifar_dir(data_dir, "cifar10", "cifar-10-batches-py",
                           [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"])
    train = [_read_cifar_pickle(root / f"data_batch_{i}", b"labels", 10) for i in range(1, 6)]
    x_test, y_test = _read_cifar_pickle(root / "test_batch", b"labels", 10)
    x_train = np.concatenate([x for x, _ in train])
    y_train = np.concatenate([y for _, y in train])
    return (*_cifar_tensors(x_train, y_train, x_test, y_test), 10)


def _cifar100(*, seed: int, data_dir: Any) -> Arrays:
    """CIFAR-100 (fine labels) from ``train`` and ``test`` (the python version)."""
    root = _find_cifar_dir(data_dir, "cifar100", "cifar-100-python", ["train", "test"])
    x_train, y_train = _read_cifar_pickle(root / "train", b"fine_labels", 100)
    x_test, y_test = _read_cifar_pickle(root / "test", b"fine_labels", 100)
    return (*_cifar_tensors(x_train, y_train, x_test, y_test), 100)


def _synthetic(*, seed: int, data_dir: Any, train_size: int = 512, test_size: int = 256,
               input_shape: Any = (20,), num_classes: int = 4,
               teacher_hidden: int = 32) -> Arrays:
    """Teacher-student data: x ~ N(0, I); y = argmax of a random tanh MLP teacher's logits."""
    shape = tuple(int(s) for s in (input_shape if isinstance(input_shape, list | tuple)
                                   else (input_shape,)))
    sizes = {"train_size": train_size, "test_size": test_size, "num_classes": num_classes,
             "teacher_hidden": teacher_hidden}
    if any(int(v) < 1 for v in sizes.values()) or not shape or min(shape) < 1:
        raise FlatlabError(f"synthetic sizes must be positive, got {sizes}, input_shape={shape}")
    if int(num_classes) < 2:
        raise FlatlabError(f"synthetic num_classes must be >= 2, got {num_classes}")
    gen = torch.Generator().manual_seed(seed)
    dim = int(np.prod(shape))
    w1 = torch.randn(dim, int(teacher_hidden), generator=gen) / dim ** 0.5
    w2 = torch.randn(int(teacher_hidden), int(num_classes), generator=gen)
    x = torch.randn(int(train_size) + int(test_size), dim, generator=gen)
    y = (torch.tanh(x @ w1) @ w2).argmax(dim=1)
    x = x.reshape(-1, *shape)
    n = int(train_size)
    return x[:n].contiguous(), y[:n].contiguous(), x[n:].contiguous(), y[n:].contiguous(), \
        int(num_classes)


LOADERS: dict[str, Callable[..., Arrays]] = {
    "mnist1d": _mnist1d, "digits": _digits, "cifar10": _cifar10, "cifar100": _cifar100,
    "synthetic": _synthetic,
}


# --------------------------------------------------------------------------- CIFAR files

def _latin1_bytes(text: Any, encoding: str = "latin1") -> bytes:
    """The only use of ``_codecs.encode`` in a Python 3 protocol-2 pickle: bytes as latin-1 text."""
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
        raise pickle.UnpicklingError("refusing _codecs.encode other than str -> latin-1 bytes")
    return text.encode("latin1")


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """Rebuilds numpy arrays and plain Python values; any other global is refused unloaded."""

    _ALLOWED = {
        (prefix + module, name)
        for prefix in ("numpy.core.", "numpy._core.")
        for module, name in (("multiarray", "_reconstruct"), ("multiarray", "scalar"),
                             ("numeric", "_frombuffer"))
    } | {("numpy", "ndarray"), ("numpy", "dtype")}

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in self._ALLOWED:
            return super().find_class(module, name)
        if (module, name) == ("_codecs", "encode"):
            return _latin1_bytes
        raise pickle.UnpicklingError(f"refusing to load global {module}.{name}")


def _read_cifar_pickle(path: Path, label_key: bytes, num_classes: int) -> tuple[np.ndarray,
                                                                                np.ndarray]:
    try:
        data = path.read_bytes()
        batch = _NumpyOnlyUnpickler(io.BytesIO(data), encoding="bytes").load()
    except Exception as err:  # hostile or broken bytes: any failure is the file's fault
        raise FlatlabError(f"{path} is not a CIFAR python batch file ({err})") from None
    if not isinstance(batch, dict) or b"data" not in batch or label_key not in batch:
        keys = sorted(batch) if isinstance(batch, dict) else type(batch).__name__
        raise FlatlabError(f"{path} is not a CIFAR batch: expected keys b'data' and "
                           f"{label_key!r}, found {keys}")
    x = np.asarray(batch[b"data"])
    try:
        y = np.asarray(batch[label_key], dtype=np.int64)
    except (TypeError, ValueError):
        raise FlatlabError(f"{path}: labels {label_key!r} are not integers") from None
    if x.dtype != np.uint8 or x.ndim != 2 or x.shape[1] != 3 * 32 * 32:
        raise FlatlabError(f"{path}: b'data' must be uint8 of shape (N, 3072), "
                           f"got {x.dtype} {x.shape}")
    if y.shape != (len(x),) or (len(y) and (y.min() < 0 or y.max() >= num_classes)):
        raise FlatlabError(f"{path}: expected {len(x)} labels in [0, {num_classes}), "
                           f"got shape {y.shape}")
    return x.reshape(-1, 3, 32, 32), y


def _find_cifar_dir(data_dir: Any, name: str, subdir: str, files: list[str]) -> Path:
    if data_dir is None:
        raise FlatlabError(f"{name} is read from local files: pass --data-dir with "
                           f"{', '.join(files)} (the python version, e.g. {subdir}/)")
    try:
        root = Path(data_dir).expanduser()
    except RuntimeError as err:  # "~nobody/x"
        raise FlatlabError(f"data dir {str(data_dir)!r}: {err}") from None
    if not root.is_dir():
        raise FlatlabError(f"data dir {str(root)!r} for {name} does not exist")
    for candidate in (root, root / subdir):
        if all((candidate / f).is_file() for f in files):
            return candidate
    present = sorted(p.name for p in root.iterdir())[:20]
    raise FlatlabError(f"{name} needs {', '.join(files)} in {str(root)!r} or its {subdir}/; "
                       f"found: {', '.join(present) or 'nothing'}")


def _cifar_tensors(x_train: np.ndarray, y_train: np.ndarray, x_test: np.ndarray,
                   y_test: np.ndarray) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    x_train = x_train.astype(np.float32) / 255.0
    x_test = x_test.astype(np.float32) / 255.0
    mean = x_train.mean(axis=(0, 2, 3), keepdims=True)
    std = x_train.std(axis=(0, 2, 3), keepdims=True) + 1e-8
    return (_tensor((x_train - mean) / std), torch.from_numpy(y_train),
            _tensor((x_test - mean) / std), torch.from_numpy(y_test))


# --------------------------------------------------------------------------- helpers

def _tensor(array: np.ndarray) -> Tensor:
    return torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32))
