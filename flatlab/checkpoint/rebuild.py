"""Rebuild a model (and its data) from a weights file, importing nothing without consent.

A model spec is ``{"name", "kwargs", "input_shape", "num_classes"}`` (``build_model``'s
arguments). It comes from the checkpoint's metadata, or from the caller (``model_spec``, e.g.
``analyze --model``), whose keys replace the file's. The spec is checked before anything is
built: plain JSON types, positive sizes, and a factory name (``pkg.mod:f``) only with consent:
``trust_code=True``, or the caller naming the model itself.

A registry model named by a file is first built on the ``meta`` device (no memory) and compared
with the file's tensors name by name and shape by shape; only a model that fits is built for
real, so metadata asking for a huge model cannot allocate more than the file holds. Integer
arguments larger than the file's number of weights, and lists longer than its number of
tensors, cannot fit and are refused before that dry run (a ``depth`` of 10**9 would otherwise
loop for hours even on ``meta``).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from flatlab.checkpoint.files import read_weights, resolve_checkpoint
from flatlab.checkpoint.transfer import strip_prefix
from flatlab.data import Dataset, dataset_from_spec
from flatlab.errors import FlatlabError
from flatlab.factory import check_consent, is_factory_name
from flatlab.models import build_model, is_registry_model

_MAX_SIZE = 2**31 - 1
_SPEC_KEYS = ("name", "kwargs", "input_shape", "num_classes")


def load_model(path: str | os.PathLike, *, device: str | torch.device = "cpu",
               trust_pickle: bool = False, trust_code: bool = False,
               model_spec: Mapping[str, Any] | None = None) -> tuple[nn.Module, dict]:
    """Rebuild the model a weights file needs and load the weights: ``(model.eval(), metadata)``.

    ``model_spec`` (the caller's own words, so its factory needs no further consent) replaces
    the file's model spec key by key; files without flatlab metadata (a plain ``.safetensors``
    state dict, a ``torch.save`` one with ``trust_pickle``) need it, with ``input_shape`` and
    ``num_classes``, and come back with empty metadata. Their names may carry one common prefix
    (``module.``, ``model.``), stripped as :func:`init_from` does. A factory named only by the
    file is imported only with ``trust_code=True``.
    """
    path = resolve_checkpoint(path)
    state, meta = read_weights(path, trust_pickle=trust_pickle)
    file_spec = meta.get("model")
    if model_spec is None and not isinstance(file_spec, dict):
        what = "has no flatlab metadata" if not meta else "metadata has no model spec"
        raise FlatlabError(f"{path} {what} ({{'name', 'kwargs', ...}}), so no model spec: name "
                           f"the model (--model NAME; model_spec= in Python)")
    spec = {**(file_spec if isinstance(file_spec, dict) else {}), **(model_spec or {})}
    name, kwargs, input_shape, num_classes = _checked_spec(spec, str(path))
    named_by_caller = model_spec is not None and "name" in model_spec
    if is_factory_name(name) and not named_by_caller:
        check_consent(name, what="model", trust_code=trust_code, source=str(path))
    if is_registry_model(name):
        _check_sizes(kwargs, state, str(path))
        with torch.device("meta"):  # a dry run: names and shapes, no memory
            expected = build_model(name, input_shape, num_classes, **kwargs).state_dict()
    else:
        model = build_model(name, input_shape, num_classes, trust_code=True, **kwargs)
        expected = model.state_dict()
    if not meta:
        state = strip_prefix(state, list(expected))
    check_fit(expected, state, source=str(path))
    if is_registry_model(name):
        model = build_model(name, input_shape, num_classes, **kwargs)
    model.load_state_dict(dict(state))
    return model.to(device).eval(), meta


def load_weights(model: nn.Module, state: Mapping[str, Tensor], *, source: str = "checkpoint"
                 ) -> None:
    """``model.load_state_dict(state)`` after checking every name and shape (FlatlabError)."""
    check_fit(model.state_dict(), state, source=source)
    model.load_state_dict(dict(state))


def check_fit(expected: Mapping[str, Tensor], state: Mapping[str, Tensor], *,
              source: str) -> None:
    """FlatlabError unless ``state`` has exactly ``expected``'s names with the same shapes."""
    for name, tensor in expected.items():
        if name not in state:
            raise FlatlabError(f"{source} does not fit the model: missing weight {name!r} "
                               f"{tuple(tensor.shape)}")
        if tuple(state[name].shape) != tuple(tensor.shape):
            raise FlatlabError(f"{source} does not fit the model: {name!r} has shape "
                               f"{tuple(state[name].shape)}, the model expects "
                               f"{tuple(tensor.shape)}")
    extra = [name for name in state if name not in expected]
    if extra:
        raise FlatlabError(f"{source} does not fit the model: unexpected weight {extra[0]!r}"
                           + (f" (and {len(extra) - 1} more)" if len(extra) > 1 else ""))


def load_dataset_for(metadata: Mapping[str, Any], *, data_dir: str | os.PathLike | None = None,
                     trust_code: bool = False) -> Dataset:
    """The data set a checkpoint was trained on, rebuilt from its metadata.

    A dataset factory named in the metadata is imported only with ``trust_code=True``.
    """
    spec = metadata.get("dataset")
    if not isinstance(spec, dict):
        raise FlatlabError("checkpoint metadata has no dataset spec; pass the data explicitly")
    return dataset_from_spec(spec, data_dir=data_dir, trust_code=trust_code)


def _checked_spec(spec: Mapping[str, Any], where: str
                  ) -> tuple[str, dict[str, Any], tuple[int, ...], int]:
    unknown = sorted(set(spec) - set(_SPEC_KEYS))
    if unknown:
        raise FlatlabError(f"{where}: unknown model spec key(s) "
                           f"{', '.join(repr(k)[:40] for k in unknown[:5])}")
    name, kwargs = spec.get("name"), spec.get("kwargs") or {}
    if not isinstance(name, str) or not name or len(name) > 300:
        raise FlatlabError(f"{where}: model name must be a string, got {repr(name)[:60]}")
    if not isinstance(kwargs, dict) or not all(isinstance(k, str) for k in kwargs):
        raise FlatlabError(f"{where}: model kwargs must be a dict of arguments, got "
                           f"{repr(kwargs)[:60]}")
    shape, num_classes = spec.get("input_shape"), spec.get("num_classes")
    if shape is None or num_classes is None:
        raise FlatlabError(f"{where}: the model spec needs input_shape and num_classes")
    if not isinstance(shape, list | tuple) or not shape or not all(_size(s) for s in shape):
        raise FlatlabError(f"{where}: input_shape must be a list of positive integers, got "
                           f"{repr(shape)[:60]}")
    if not _size(num_classes):
        raise FlatlabError(f"{where}: num_classes must be a positive integer, got "
                           f"{repr(num_classes)[:60]}")
    return name, dict(kwargs), tuple(shape), num_classes


def _size(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 1 <= value <= _MAX_SIZE


def _check_sizes(kwargs: Mapping[str, Any], state: Mapping[str, Tensor], where: str) -> None:
    numel = sum(t.numel() for t in state.values())

    def visit(key: str, value: Any) -> None:
        if isinstance(value, int | float) and not isinstance(value, bool) and abs(value) > numel:
            raise FlatlabError(f"{where}: model argument {key}={repr(value)[:40]} cannot fit the "
                               f"{numel} weights in the file")
        if isinstance(value, list | tuple | dict):
            if len(value) > len(state):
                raise FlatlabError(f"{where}: model argument {key} has {len(value)} entries, "
                                   f"more than the file's {len(state)} tensors")
            for item in value.values() if isinstance(value, dict) else value:
                visit(key, item)

    for key, value in kwargs.items():
        visit(key, value)
