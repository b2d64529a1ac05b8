"""Initialise a model from another model's weights (``--init-from``): fine-tuning, new heads.

Source files: a flatlab checkpoint (validated; its metadata is not used, so nothing is ever
imported), a plain ``.safetensors`` state dict, or a ``torch.save`` state dict with
``trust_pickle=True`` (read with ``weights_only=True``).

Matching, for each tensor ``name`` of ``model.state_dict()`` (parameters and buffers):

* ``prefix + name`` in the source with the same shape: copied (converted to the model's dtype
  and device; bit-identical when they agree) -> ``loaded``;
* present with another shape (a new classifier head): the model keeps its fresh
  initialisation -> ``reinitialised``;
* absent: a :class:`FlatlabError` listing every absent name, unless ``partial=True``, which
  keeps their fresh initialisation too (-> ``reinitialised`` and ``missing``).

``prefix`` is stripped from the source's names. ``None`` (the default) picks it: of ``""`` and
the dotted prefixes of the source's names up to two components (``module.`` from
DistributedDataParallel, ``model.`` from Lightning, ``module.model.``), the one under which
the most model names are found, the shortest on ties. ``prefix=""`` matches names as they are.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from flatlab.checkpoint.files import file_sha256, read_weights, resolve_checkpoint
from flatlab.errors import FlatlabError


@dataclass(frozen=True)
class InitReport:
    """What :func:`init_from` did. ``reinitialised`` includes ``missing``; ``unused`` lists the
    source's tensors that went nowhere (old head, optimizer leftovers)."""

    path: str
    sha256: str
    loaded: list[str]
    reinitialised: list[str]
    missing: list[str]
    unused: list[str]
    prefix: str

    def metadata(self) -> dict:
        """The checkpoint metadata entry ``init_from`` (JSON-able)."""
        return {"path": self.path, "sha256": self.sha256, "prefix": self.prefix,
                "loaded": len(self.loaded), "reinitialised": list(self.reinitialised),
                "missing": list(self.missing)}


def init_from(model: nn.Module, path: str | os.PathLike, *, prefix: str | None = None,
              partial: bool = False, trust_pickle: bool = False) -> InitReport:
    """Copy the tensors of the weights file ``path`` that match ``model`` by name and shape
    into it, in place (see the module docstring); returns what was loaded and what was not."""
    path = resolve_checkpoint(path)
    sha256 = file_sha256(path)
    source, _ = read_weights(path, trust_pickle=trust_pickle)
    target = model.state_dict()
    if prefix is None:
        prefix = choose_prefix(source, list(target))
    loaded, reinitialised, missing = [], [], []
    for name, tensor in target.items():
        found = source.get(prefix + name)
        if found is None:
            missing.append(name)
            reinitialised.append(name)
        elif tuple(found.shape) != tuple(tensor.shape):
            reinitialised.append(name)
        else:
            loaded.append(name)
    under = f" under prefix {prefix!r}" if prefix else ""
    if not loaded:
        raise FlatlabError(f"no tensor of {path} matches the model by name and shape{under} "
                           f"(model: {_names(list(target))}; file: {_names(list(source))})")
    if missing and not partial:
        raise FlatlabError(f"{path} lacks {len(missing)} of the model's tensors{under}: "
                           f"{_names(missing)}; pass --init-partial (partial=True) to keep their "
                           f"fresh initialisation")
    with torch.no_grad():
        for name in loaded:
            target[name].copy_(source[prefix + name])
    used = {prefix + name for name in loaded}
    return InitReport(path=str(path), sha256=sha256, loaded=loaded, reinitialised=reinitialised,
                      missing=missing, unused=[k for k in source if k not in used],
                      prefix=prefix)


def choose_prefix(source: Mapping[str, Tensor], names: Sequence[str]) -> str:
    """The prefix of the source's names under which most of ``names`` are found."""
    candidates = {""}
    for key in source:
        parts = key.split(".")
        for depth in range(1, min(len(parts), 3)):
            candidates.add(".".join(parts[:depth]) + ".")

    def score(prefix: str) -> int:
        return sum(prefix + name in source for name in names)

    return max(sorted(candidates, key=lambda p: (len(p), p)), key=score)


def strip_prefix(source: Mapping[str, Tensor], names: Sequence[str]) -> dict[str, Tensor]:
    """The source's tensors under :func:`choose_prefix`'s prefix, with the prefix removed."""
    prefix = choose_prefix(source, names)
    return {key[len(prefix):]: tensor for key, tensor in source.items() if key.startswith(prefix)}


def _names(names: list[str], limit: int = 8) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")
