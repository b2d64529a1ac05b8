"""Checkpoint files: safetensors with one JSON metadata entry, read and written without pickle.

A checkpoint (``model.safetensors``) holds the model's ``state_dict`` (buffers included) and
one metadata entry, ``"flatlab"``, whose JSON value has exactly these keys:

=================  ===========================================================================
flatlab_version    version of flatlab that wrote it
format_version     :data:`FORMAT_VERSION`; a newer one is refused
model              ``{"name", "kwargs", "input_shape", "num_classes"}``: ``build_model`` args
dataset            ``{"name", "seed", "kwargs", ...}``: ``dataset_from_spec`` rebuilds the data
optimizer          ``{"name", "kwargs"}``
epoch, step        completed epochs and optimizer steps
grad_evals         forward/backward passes spent so far
metrics            ``{"train_loss", "train_acc", "test_loss", "test_acc", ...}``
seed, run_name     the training seed and the run directory's name
init_from          where the initial weights came from (``InitReport.metadata()``), if given
checksum           ``"sha256:..."`` over the tensors (written automatically, checked on read)
=================  ===========================================================================

Unknown keys, a newer format, a truncated or corrupted file and ``torch.save`` (pickle) files
are refused with a :class:`FlatlabError`. A pickle file is only opened when the caller passes
``trust_pickle=True``, and then only with ``torch.load(weights_only=True)``. Reading a file
never imports anything.
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
                 "step", "grad_evals", "metrics", "seed", "run_name", "init_from", "checksum")
_REQUIRED_KEYS = ("format_version",)


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
    meta["checksum"] = checksum(tensors)
    write_safetensors(path, tensors, {"flatlab": dumps(meta)})


def read_checkpoint(path: str | os.PathLike, *,
                    trust_pickle: bool = False) -> tuple[dict[str, Tensor], dict]:
    """Read and validate a flatlab checkpoint: ``(state_dict, metadata)``.

    A ``torch.save`` file is refused unless ``trust_pickle``; then it is read with
    ``torch.load(weights_only=True)`` and comes back with empty metadata. A safetensors file
    without flatlab metadata is refused (:func:`read_weights` accepts it).
    """
    path = resolve_checkpoint(path)
    tensors, meta, kind = _read(path, trust_pickle)
    if kind == "plain":
        raise FlatlabError(f"{path} has no 'flatlab' metadata: not a flatlab checkpoint")
    return tensors, meta


def read_weights(path: str | os.PathLike, *,
                 trust_pickle: bool = False) -> tuple[dict[str, Tensor], dict]:
    """Read any state dict: a flatlab checkpoint (validated, with its metadata), a plain
    ``.safetensors`` file (empty metadata), or, with ``trust_pickle``, a ``torch.save`` state
    dict (``weights_only=True``; empty metadata)."""
    tensors, meta, _ = _read(resolve_checkpoint(path), trust_pickle)
    return tensors, meta


def file_sha256(path: str | os.PathLike) -> str:
    """``"sha256:<hex>"`` of a file's bytes, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(1 << 20):
            digest.update(block)
    return "sha256:" + digest.hexdigest()


def _read(path: Path, trust_pickle: bool) -> tuple[dict[str, Tensor], dict, str]:
    """``(tensors, metadata, kind)`` with kind ``"flatlab"``, ``"plain"`` or ``"pickle"``."""
    if sniff(path) == "pickle":
        if not trust_pickle:
            raise FlatlabError(
                f"{path} is a pickle (torch.save) file, which can run code when loaded; refusing. "
                f"If you trust it, pass --trust-pickle (loads with torch.load(weights_only=True))")
        return _load_trusted_pickle(path), {}, "pickle"
    tensors, raw_meta = read_safetensors(path)
    if "flatlab" not in raw_meta:
        return tensors, {}, "plain"
    meta = loads(raw_meta["flatlab"], path)
    _check_keys(meta, str(path))
    for key in _REQUIRED_KEYS:
        if key not in meta:
            raise FlatlabError(f"{path}: metadata lacks {key!r}")
    check_version(meta["format_version"], path)
    verify_checksum(meta.get("checksum"), tensors, path)
    return tensors, meta, "flatlab"


def resolve_checkpoint(path_or_run_dir: str | os.PathLike) -> Path:
    """A checkpoint file, or a run directory -> its ``model.safetensors``."""
    try:
        path = Path(path_or_run_dir).expanduser()
        path.stat()
    except (RuntimeError, ValueError) as err:  # "~nobody/x", NUL bytes
        raise FlatlabError(f"checkpoint {str(path_or_run_dir)[:200]!r}: bad path ({err})") from None
    except OSError:
        pass  # reported below as missing
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


# --------------------------------------------------------------------------- file level

_PICKLE_MAGIC = (b"PK\x03\x04", b"\x80")  # torch.save zip archive; raw pickle protocol >= 2
_MAX_HEADER = 100_000_000  # safetensors' own limit on the JSON header


def sniff(path: Path) -> str:
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


def read_safetensors(path: Path) -> tuple[dict[str, Tensor], dict[str, str]]:
    try:
        with safe_open(str(path), framework="pt", device="cpu") as fh:
            meta = fh.metadata() or {}
            tensors = {name: fh.get_tensor(name) for name in fh.keys()}  # noqa: SIM118
    except Exception as err:  # the file's fault whatever the parser says
        raise FlatlabError(f"{path} is a truncated or corrupted safetensors file ({err})") from None
    return tensors, meta


def write_safetensors(path: str | os.PathLike, tensors: dict[str, Tensor],
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
        shown = ", ".join(repr(k)[:60] for k in unknown[:5]) + (", ..." if len(unknown) > 5 else "")
        raise FlatlabError(f"{where}: unknown metadata key(s) {shown}; "
                           f"known: {', '.join(METADATA_KEYS)}")


def check_version(version: Any, path: Path) -> None:
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise FlatlabError(f"{path}: bad format_version {repr(version)[:60]}")
    if version > FORMAT_VERSION:
        raise FlatlabError(f"{path} has format_version {version}, newer than this flatlab "
                           f"({flatlab.__version__}) reads (up to {FORMAT_VERSION}); "
                           f"upgrade flatlab")


def checksum(tensors: Mapping[str, Tensor]) -> str:
    digest = hashlib.sha256()
    for name in sorted(tensors):
        tensor = tensors[name].detach().cpu().contiguous()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return "sha256:" + digest.hexdigest()


def verify_checksum(expected: Any, tensors: Mapping[str, Tensor], path: Path) -> None:
    if expected is None:
        return
    if not isinstance(expected, str) or expected != checksum(tensors):
        raise FlatlabError(f"{path} is corrupted: tensor data does not match its checksum")


def dumps(obj: Any) -> str:
    try:
        return json.dumps(obj, allow_nan=True, sort_keys=False)
    except (TypeError, ValueError) as err:
        raise TypeError(f"metadata is not JSON-able: {err}") from None


def loads(text: str, path: Path) -> dict:
    try:
        obj = json.loads(text)
    except (ValueError, RecursionError) as err:  # ValueError: also ints over 4300 digits
        raise FlatlabError(f"{path}: metadata is not valid JSON ({err})") from None
    if not isinstance(obj, dict):
        raise FlatlabError(f"{path}: metadata must be a JSON object")
    return obj
