"""Training state for ``--resume``: nested Python structures with tensors, stored without pickle.

Training state (``train_state.safetensors``) is an arbitrary nested structure of dicts, lists,
tuples, numbers, strings and tensors (optimizer and scheduler state dicts, RNG states as uint8
tensors, counters): :func:`save_state` stores the tensors as safetensors entries and the rest
as JSON with placeholders, so :func:`load_state` restores it exactly.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from torch import Tensor

import flatlab
from flatlab.checkpoint.files import (
    FORMAT_VERSION,
    check_version,
    checksum,
    dumps,
    loads,
    read_safetensors,
    sniff,
    verify_checksum,
    write_safetensors,
)
from flatlab.errors import FlatlabError

_STATE_KEY = "flatlab_state"


def save_state(path: str | os.PathLike, state: Mapping[str, Any]) -> None:
    """Write a nested structure of containers, plain values and tensors to ``path`` atomically."""
    tensors: dict[str, Tensor] = {}
    skeleton = _encode(dict(state), tensors)
    header = {"format_version": FORMAT_VERSION, "flatlab_version": flatlab.__version__,
              "checksum": checksum(tensors), "state": skeleton}
    write_safetensors(path, tensors, {_STATE_KEY: dumps(header)})


def load_state(path: str | os.PathLike) -> dict:
    """Read what :func:`save_state` wrote; tensors come back on the CPU."""
    path = Path(path)
    if not path.is_file():
        raise FlatlabError(f"training state {str(path)!r} does not exist")
    if sniff(path) == "pickle":
        raise FlatlabError(f"{path} is a pickle file, not flatlab training state; refusing")
    tensors, raw_meta = read_safetensors(path)
    if _STATE_KEY not in raw_meta:
        raise FlatlabError(f"{path} is not flatlab training state")
    header = loads(raw_meta[_STATE_KEY], path)
    if set(header) != {"format_version", "flatlab_version", "checksum", "state"}:
        raise FlatlabError(f"{path}: unexpected training-state header keys {sorted(header)}")
    check_version(header["format_version"], path)
    verify_checksum(header["checksum"], tensors, path)
    try:
        return _decode(header["state"], tensors)
    except (KeyError, TypeError, ValueError) as err:
        raise FlatlabError(f"{path}: malformed training state ({err})") from None


def _encode(value: Any, tensors: dict[str, Tensor]) -> Any:
    if isinstance(value, Tensor):
        key = f"t{len(tensors)}"
        tensors[key] = value.detach().to("cpu", copy=True).contiguous()
        return {"__tensor__": key}
    if isinstance(value, bool | int | float | str) or value is None:
        return value
    if isinstance(value, tuple):
        return {"__tuple__": [_encode(v, tensors) for v in value]}
    if isinstance(value, list):
        return [_encode(v, tensors) for v in value]
    if isinstance(value, dict):
        if all(isinstance(k, str) and not k.startswith("__") for k in value):
            return {k: _encode(v, tensors) for k, v in value.items()}
        return {"__items__": [[_encode(k, tensors), _encode(v, tensors)]
                              for k, v in value.items()]}
    raise TypeError(f"cannot store {type(value).__name__} in training state (no pickle)")


def _decode(value: Any, tensors: dict[str, Tensor]) -> Any:
    if isinstance(value, list):
        return [_decode(v, tensors) for v in value]
    if not isinstance(value, dict):
        return value
    if "__tensor__" in value:
        return tensors[value["__tensor__"]]
    if "__tuple__" in value:
        return tuple(_decode(v, tensors) for v in value["__tuple__"])
    if "__items__" in value:
        return {_hashable(_decode(k, tensors)): _decode(v, tensors) for k, v in value["__items__"]}
    return {k: _decode(v, tensors) for k, v in value.items()}


def _hashable(key: Any) -> Any:
    if isinstance(key, list | dict | Tensor):
        raise TypeError(f"unhashable key {key!r}")
    return key
