"""Checkpoints and training state: safetensors files with JSON metadata, never pickle.

A checkpoint (``model.safetensors``) holds the model's ``state_dict`` (buffers included) and
one metadata entry, ``"flatlab"``, whose JSON value has exactly these keys:

=================  ===========================================================================
flatlab_version    version of flatlab that wrote it
format_version     :data:`FORMAT_VERSION`; a newer one is refused
model              ``{"name", "kwargs", "input_shape", "num_classes"}``: ``build_model`` args
dataset            ``{"name", "seed", "kwargs"}``: ``dataset_from_spec`` rebuilds the data
optimizer          ``{"name", "kwargs"}``
epoch, step        completed epochs and optimizer steps
grad_evals         forward/backward passes spent so far
metrics            ``{"train_loss", "train_acc", "test_loss", "test_acc"}`` of the last epoch
seed, run_name     the training seed and the run directory's name
checksum           ``"sha256:..."`` over the tensors (written automatically, checked on read)
=================  ===========================================================================

Unknown keys, a newer format, a truncated or corrupted file, weights that do not fit the model
the metadata names, and ``torch.save`` (pickle) files are refused with a :class:`FlatlabError`.
A pickle file is only opened when the caller passes ``trust_pickle=True``, and then only with
``torch.load(weights_only=True)``.

Training state (``train_state.safetensors``, for ``--resume``) is an arbitrary nested structure
of dicts, lists, tuples, numbers, strings and tensors (optimizer and scheduler state dicts, RNG
states as uint8 tensors, counters): :func:`save_state` stores the tensors as safetensors entries
and the rest as JSON with placeholders, so :func:`load_state` restores it exactly.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor, nn

import flatlab
from flatlab.errors import FlatlabError
from flatlab.io import atomic_path

FORMAT_VERSION = 1
CHECKPOINT_NAME = "model.safetensors"
METADATA_KEYS = ("flatlab_version", "format_version", "model", "dataset", "optimizer", "epoch",
                 "step", "grad_evals", "metrics", "seed", "run_name", "checksum")
_REQUIRED_KEYS = ("format_version",)
_STATE_KEY = "flatlab_state"


# --------------------------------------------------------------------------- checkpoints

def save_checkpoint(path: str | os.PathLike, model: nn.Module, metadata: Mapping[str, Any]) -> None:
    """Write ``model.state_dict()`` and ``metadata`` (JSON) to ``path`` atomically.

    ``flatlab_version``, ``format_version`` and ``checksum`` are filled in; other keys must be
    among :data:`METADATA_KEYS`.
    """
    meta = dict(metadata)
    _check_keys(meta, str(path))
    tensors = {name: t.detach().to("cpu", copy=True).contiguous()
               for name, t in model.state_dict().items()}
    meta["flatlab_version"] = flatlab.__version__
    meta["format_version"] = FORMAT_VERSION
    meta["checksum"] = _checksum(tensors)
    _write_safetensors(path, tensors, {"flatlab": _dumps(meta)})


def read_checkpoint(path: str | os.PathLike, *,
                    trust_pickle: bool = False) -> tuple[dict[str, Tensor], dict]:
    """Read and validate a checkpoint: ``(state_dict, metadata)``.

    A ``torch.save`` file is refused unless ``trust_pickle``; then it is read with
    ``torch.load(weights_only=True)`` and comes back with empty metadata.
    """
    path = resolve_checkpoint(path)
    kind = _sniff(path)
    if kind == "pickle":
        if not trust_pickle:
            raise FlatlabError(
                f"{path} is a pickle (torch.save) file, which can run code when loaded; refusing. "
                f"If you trust it, pass --trust-pickle (loads with torch.load(weights_only=True))")
        return _load_trusted_pickle(path), {}
    tensors, raw_meta = _read_safetensors(path)
    if "flatlab" not in raw_meta:
        raise FlatlabError(f"{path} has no 'flatlab' metadata: not a flatlab checkpoint")
    meta = _loads(raw_meta["flatlab"], path)
    _check_keys(meta, str(path))
    for key in _REQUIRED_KEYS:
        if key not in meta:
            raise FlatlabError(f"{path}: metadata lacks {key!r}")
    _check_version(meta["format_version"], path)
    _verify_checksum(meta.get("checksum"), tensors, path)
    return tensors, meta


def resolve_checkpoint(path_or_run_dir: str | os.PathLike) -> Path:
    """A checkpoint file, or a run directory -> its ``model.safetensors``."""
    path = Path(path_or_run_dir).expanduser()
    if path.is_dir():
        candidate = path / CHECKPOINT_NAME
        if not candidate.is_file():
            found = sorted(p.name for p in path.glob("*.safetensors")
                           if not p.name.startswith("train_state"))
            hint = f"; found {', '.join(found)}" if found else ""
            raise FlatlabError(f"run directory {str(path)!r} has no {CHECKPOINT_NAME}{hint}")
        return candidate
    if not path.exists():
        raise FlatlabError(f"checkpoint {str(path)!r} does not exist")
    if not path.is_file():
        raise FlatlabError(f"checkpoint {str(path)!r} is not a file")
    return path


def load_model(path: str | os.PathLike, *, device: str | torch.device = "cpu",
               trust_pickle: bool = False) -> tuple[nn.Module, dict]:
    """Rebuild the model a checkpoint names and load its weights: ``(model.eval(), metadata)``."""
    from flatlab.models import build_model

    path = resolve_checkpoint(path)
    state, meta = read_checkpoint(path, trust_pickle=trust_pickle)
    spec = meta.get("model")
    if not isinstance(spec, dict) or not isinstance(spec.get("name"), str):
        raise FlatlabError(f"{path}: metadata has no model spec ({{'name', 'kwargs', ...}}), so "
                           f"the model cannot be rebuilt")
    kwargs = spec.get("kwargs") or {}
    if "input_shape" in spec and "num_classes" in spec:
        input_shape, num_classes = spec["input_shape"], spec["num_classes"]
    else:
        data = load_dataset_for(meta)
        input_shape, num_classes = data.input_shape, data.num_classes
    model = build_model(spec["name"], input_shape, num_classes, **kwargs)
    load_weights(model, state, source=str(path))
    return model.to(device).eval(), meta


def load_weights(model: nn.Module, state: Mapping[str, Tensor], *, source: str = "checkpoint"
                 ) -> None:
    """``model.load_state_dict(state)`` after checking every name and shape (FlatlabError)."""
    expected = model.state_dict()
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
    model.load_state_dict(dict(state))


def load_dataset_for(metadata: Mapping[str, Any], *, data_dir: str | os.PathLike | None = None):
    """The data set a checkpoint was trained on, rebuilt from its metadata."""
    from flatlab.data import dataset_from_spec

    spec = metadata.get("dataset")
    if not isinstance(spec, dict):
        raise FlatlabError("checkpoint metadata has no dataset spec; pass the data explicitly")
    return dataset_from_spec(spec, data_dir=data_dir)


# --------------------------------------------------------------------------- training state

def save_state(path: str | os.PathLike, state: Mapping[str, Any]) -> None:
    """Write a nested structure of containers, plain values and tensors to ``path`` atomically."""
    tensors: dict[str, Tensor] = {}
    skeleton = _encode(dict(state), tensors)
    header = {"format_version": FORMAT_VERSION, "flatlab_version": flatlab.__version__,
              "checksum": _checksum(tensors), "state": skeleton}
    _write_safetensors(path, tensors, {_STATE_KEY: _dumps(header)})


def load_state(path: str | os.PathLike) -> dict:
    """Read what :func:`save_state` wrote; tensors come back on the CPU."""
    path = Path(path)
    if not path.is_file():
        raise FlatlabError(f"training state {str(path)!r} does not exist")
    if _sniff(path) == "pickle":
        raise FlatlabError(f"{path} is a pickle file, not flatlab training state; refusing")
    tensors, raw_meta = _read_safetensors(path)
    if _STATE_KEY not in raw_meta:
        raise FlatlabError(f"{path} is not flatlab training state")
    header = _loads(raw_meta[_STATE_KEY], path)
    if set(header) != {"format_version", "flatlab_version", "checksum", "state"}:
        raise FlatlabError(f"{path}: unexpected training-state header keys {sorted(header)}")
    _check_version(header["format_version"], path)
    _verify_checksum(header["checksum"], tensors, path)
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


# --------------------------------------------------------------------------- file level

_PICKLE_MAGIC = (b"PK\x03\x04", b"\x80")  # torch.save zip archive; raw pickle protocol >= 2
_MAX_HEADER = 100_000_000  # safetensors' own limit on the JSON header


def _sniff(path: Path) -> str:
    """``"safetensors"``, ``"pickle"``, or a FlatlabError for anything else.

    A safetensors file is an 8-byte little-endian header length, then that many bytes of JSON
    object; it is recognised by that structure first, since its first byte may well be 0x80.
    """
    with open(path, "rb") as fh:
        head = fh.read(9)
        size = os.fstat(fh.fileno()).st_size
        if len(head) == 9 and head[8:9] == b"{":
            (header_len,) = struct.unpack("<Q", head[:8])
            if header_len <= min(size - 8, _MAX_HEADER):
                fh.seek(8)
                try:
                    if isinstance(json.loads(fh.read(header_len)), dict):
                        return "safetensors"
                except (ValueError, RecursionError):
                    pass
    if any(head.startswith(magic) for magic in _PICKLE_MAGIC):
        return "pickle"
    if len(head) < 9:
        raise FlatlabError(f"{path} is not a safetensors file (only {size} bytes: truncated?)")
    raise FlatlabError(f"{path} is not a safetensors file (bad header: truncated or corrupted)")


def _read_safetensors(path: Path) -> tuple[dict[str, Tensor], dict[str, str]]:
    try:
        with safe_open(str(path), framework="pt", device="cpu") as fh:
            meta = fh.metadata() or {}
            tensors = {name: fh.get_tensor(name) for name in fh.keys()}  # noqa: SIM118
    except Exception as err:  # the file's fault whatever the parser says
        raise FlatlabError(f"{path} is a truncated or corrupted safetensors file ({err})") from None
    return tensors, meta


def _write_safetensors(path: str | os.PathLike, tensors: dict[str, Tensor],
                       metadata: dict[str, str]) -> None:
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)


def _load_trusted_pickle(path: Path) -> dict[str, Tensor]:
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise FlatlabError(f"{path}: torch.load(weights_only=True) refused or failed "
                           f"({str(err).splitlines()[0] if str(err) else type(err).__name__})"
                           ) from None
    for key in ("state_dict", "model_state_dict", "model"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
            break
    if not isinstance(obj, dict) or not all(isinstance(k, str) and isinstance(v, Tensor)
                                            for k, v in obj.items()):
        raise FlatlabError(f"{path}: expected a state_dict (names -> tensors) in the torch.save "
                           f"file")
    return dict(obj)


def _check_keys(meta: Mapping[str, Any], where: str) -> None:
    unknown = sorted(set(meta) - set(METADATA_KEYS))
    if unknown:
        raise FlatlabError(f"{where}: unknown metadata key(s) {', '.join(map(repr, unknown))}; "
                           f"known: {', '.join(METADATA_KEYS)}")


def _check_version(version: Any, path: Path) -> None:
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise FlatlabError(f"{path}: bad format_version {version!r}")
    if version > FORMAT_VERSION:
        raise FlatlabError(f"{path} has format_version {version}, newer than this flatlab "
                           f"({flatlab.__version__}) reads (up to {FORMAT_VERSION}); "
                           f"upgrade flatlab")


def _checksum(tensors: Mapping[str, Tensor]) -> str:
    digest = hashlib.sha256()
    for name in sorted(tensors):
        tensor = tensors[name].detach().cpu().contiguous()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return "sha256:" + digest.hexdigest()


def _verify_checksum(expected: Any, tensors: Mapping[str, Tensor], path: Path) -> None:
    if expected is None:
        return
    if not isinstance(expected, str) or expected != _checksum(tensors):
        raise FlatlabError(f"{path} is corrupted: tensor data does not match its checksum")


def _dumps(obj: Any) -> str:
    try:
        return json.dumps(obj, allow_nan=True, sort_keys=False)
    except (TypeError, ValueError) as err:
        raise TypeError(f"metadata is not JSON-able: {err}") from None


def _loads(text: str, path: Path) -> dict:
    try:
        obj = json.loads(text)
    except (json.JSONDecodeError, RecursionError) as err:
        raise FlatlabError(f"{path}: metadata is not valid JSON ({err})") from None
    if not isinstance(obj, dict):
        raise FlatlabError(f"{path}: metadata must be a JSON object")
    return obj
