"""Data sets as in-memory tensors: a registry, image folders, user factories; all seeded.

=============  ============================================================================
``mnist1d``    generated locally by the ``mnist1d`` package, cached (see
``digits``     :mod:`flatlab.data.builtin` for these five)
``cifar10``
``cifar100``
``synthetic``
``folder``     ``DIR/{train,val,test}/CLASS/*.png|jpg|jpeg`` (:mod:`flatlab.data.folder`)
``pkg.mod:f``  a user factory (:mod:`flatlab.data.user`); imported only with ``trust_code``
=============  ============================================================================

Every data set also takes ``validation_fraction`` (and ``validation_seed``): that part of the
training split becomes the validation split and the test split (see
:meth:`Dataset.split_validation`). A data set's ``spec`` rebuilds it with
:func:`dataset_from_spec`; an image folder's spec also pins the folder's file list.
"""

from __future__ import annotations

import inspect
import os
from collections.abc import Callable
from typing import Any

from flatlab.data.builtin import LOADERS, cache_dir
from flatlab.data.dataset import Dataset, channel_statistics
from flatlab.data.folder import load_folder
from flatlab.data.user import load_factory_dataset
from flatlab.errors import FlatlabError
from flatlab.factory import check_consent, is_factory_name

__all__ = ["DATASETS", "Dataset", "cache_dir", "channel_statistics", "dataset_from_spec",
           "load_dataset"]

DATASETS: tuple[str, ...] = ("mnist1d", "digits", "cifar10", "cifar100", "synthetic", "folder")

# kwargs every data set accepts: hold out part of the training split for validation.
_VALIDATION_KWARGS = ("validation_fraction", "validation_seed")
_FOLDER_SPEC_KEYS = ("data_dir", "fingerprint", "files")
_MAX_SEED = 2**32 - 1  # scikit-learn's random_state limit; torch takes larger


def load_dataset(name: str, /, *, seed: int = 0, data_dir: str | os.PathLike | None = None,
                 trust_code: bool = False, **kwargs: Any) -> Dataset:
    """Load a registered data set, an image folder, or a user factory's data.

    ``seed`` fixes any random split or generation. Extra ``kwargs`` go to the loader
    (``mnist1d``: ``num_samples``, ``train_split``, ``shuffle_seq``, ``generation_seed``;
    ``digits``: ``test_size``; ``synthetic``: ``train_size``, ``test_size``, ``input_shape``,
    ``num_classes``, ``teacher_hidden``; ``folder``: ``image_size``, ``grayscale``; a factory:
    its own). A factory's module is imported only with ``trust_code=True``.
    """
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed <= _MAX_SEED:
        raise FlatlabError(f"dataset seed must be an integer in [0, {_MAX_SEED}], got {seed!r}")
    validation = {k: kwargs.pop(k) for k in _VALIDATION_KWARGS if k in kwargs}
    spec = {"name": name, "seed": seed, "kwargs": _jsonable(kwargs)}
    if is_factory_name(name):
        dataset = load_factory_dataset(name, seed=seed, data_dir=data_dir, trust_code=trust_code,
                                       kwargs=kwargs, spec=spec)
    elif name == "folder":
        expected = {"expected_fingerprint": kwargs.pop("_fingerprint", None),
                    "expected_files": kwargs.pop("_files", None)}
        _check_kwargs("dataset 'folder'", load_folder, kwargs,
                      skip=("seed", "data_dir", *expected, "threads"))
        dataset = load_folder(seed=seed, data_dir=data_dir, **expected, **kwargs)
    elif name in LOADERS:
        dataset = _load_builtin(name, seed, data_dir, kwargs, spec)
    else:
        raise FlatlabError(f"unknown dataset {name!r}; choose one of {', '.join(DATASETS)} "
                           f"or 'package.module:factory'")
    if validation:
        if "validation_fraction" not in validation:
            raise FlatlabError("validation_seed given without validation_fraction")
        try:
            fraction = float(validation["validation_fraction"])
            val_seed = int(validation.get("validation_seed", 0))
        except (TypeError, ValueError, OverflowError):
            raise FlatlabError(f"bad validation arguments {validation!r}") from None
        if not 0 <= val_seed <= _MAX_SEED:
            raise FlatlabError(f"validation_seed must be in [0, {_MAX_SEED}], got {val_seed}")
        dataset = dataset.split_validation(fraction, val_seed)
    return dataset


def dataset_from_spec(spec: dict, *, data_dir: str | os.PathLike | None = None,
                      trust_code: bool = False) -> Dataset:
    """Rebuild a data set from its ``spec`` (as stored in a checkpoint's metadata).

    The spec comes from a file, so a factory named in it is imported only with
    ``trust_code=True``. An image folder is read from ``data_dir`` if given, else from the
    folder the spec names, and must still have the file list it had (fingerprint).
    """
    if not isinstance(spec, dict) or not isinstance(spec.get("name"), str):
        raise FlatlabError(f"dataset spec must be a dict with a 'name', got {spec!r}"[:300])
    name = spec["name"]
    allowed = {"name", "seed", "kwargs"} | (set(_FOLDER_SPEC_KEYS) if name == "folder" else set())
    unknown = set(spec) - allowed
    if unknown:
        raise FlatlabError(f"dataset spec has unknown keys {sorted(unknown)}")
    kwargs = spec.get("kwargs") or {}
    if not isinstance(kwargs, dict) or any(not isinstance(k, str) or k.startswith("_")
                                           for k in kwargs):
        raise FlatlabError(f"dataset spec kwargs must be a dict of arguments, got {kwargs!r}"
                           [:300])
    if is_factory_name(name):
        check_consent(name, what="dataset", trust_code=trust_code, source="a stored dataset spec")
    if name == "folder":
        recorded = {k: spec.get(k) for k in ("data_dir", "fingerprint")}
        if not all(isinstance(v, str) for v in recorded.values()):
            raise FlatlabError("folder dataset spec needs 'data_dir' and 'fingerprint' strings")
        data_dir = data_dir if data_dir is not None else recorded["data_dir"]
        kwargs = {**kwargs, "_fingerprint": recorded["fingerprint"], "_files": spec.get("files")}
    return load_dataset(name, seed=spec.get("seed", 0), data_dir=data_dir,
                        trust_code=trust_code, **kwargs)


def _load_builtin(name: str, seed: int, data_dir: Any, kwargs: dict, spec: dict) -> Dataset:
    loader = LOADERS[name]
    _check_kwargs(f"dataset {name!r}", loader, kwargs, skip=("seed", "data_dir"))
    try:
        x_train, y_train, x_test, y_test, num_classes = loader(seed=seed, data_dir=data_dir,
                                                               **kwargs)
    except FlatlabError:
        raise
    except (TypeError, ValueError, OverflowError, RuntimeError, MemoryError) as err:
        # the arguments' fault (wrong types, sizes too large to allocate)
        raise FlatlabError(f"dataset {name!r} with {kwargs}: {type(err).__name__}: "
                           f"{str(err).splitlines()[0] if str(err) else ''}"[:500]) from None
    return Dataset(name=name, x_train=x_train, y_train=y_train, x_test=x_test, y_test=y_test,
                   num_classes=num_classes, input_shape=tuple(x_train.shape[1:]), spec=spec)


def _check_kwargs(what: str, fn: Callable, kwargs: dict, skip: tuple[str, ...] = ()) -> None:
    accepted = [p for p in inspect.signature(fn).parameters if p not in skip]
    unknown = sorted(set(kwargs) - set(accepted))
    if unknown:
        raise FlatlabError(f"{what} got unknown argument(s) {', '.join(unknown)}; accepted: "
                           f"{', '.join(accepted + list(_VALIDATION_KWARGS)) or 'none'}")


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, bool | int | float | str) or value is None:
        return value
    raise FlatlabError(f"dataset argument {value!r} is not a plain value (number, string, list)")
