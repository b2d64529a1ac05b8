"""Workarounds for broken third-party installs (environment problems, not flatlab features).

:func:`ensure_torchvision_importable`: PyPI's default ``torchvision`` wheel is built against
CUDA torch. Installed beside a CPU-only torch (as on CPU machines that pin the ``+cpu`` wheel),
its ``_C`` extension fails to load, and ``import torchvision`` then dies in
``torchvision/_meta_registrations.py`` registering fake kernels for ``torchvision::nms``, an
operator that only the extension defines ("operator torchvision::nms does not exist"). ``timm``
imports torchvision, so it dies too. Defining the two operator schemas before the first import
lets torchvision import; the models work, only the detection ops (``nms``) stay unavailable.
"""

from __future__ import annotations

import importlib.machinery
import importlib.util
import sys

import torch

_FALLBACK_LIBRARY: torch.library.Library | None = None  # kept alive: it owns the schemas


def ensure_torchvision_importable() -> None:
    """Make ``import torchvision`` work beside a CPU torch when its ``_C`` extension cannot load.

    A no-op when torchvision is absent, already imported, or its extension loads (then the real
    operators are registered, exactly as ``import torchvision`` would register them). Otherwise
    it defines the ``torchvision::nms`` and ``torchvision::qnms`` schemas (no kernels), which is
    all ``import torchvision`` needs.
    """
    global _FALLBACK_LIBRARY
    if _FALLBACK_LIBRARY is not None or "torchvision" in sys.modules or _has_nms():
        return
    spec = importlib.util.find_spec("torchvision")
    if spec is None or not spec.submodule_search_locations:
        return
    if _load_extension(list(spec.submodule_search_locations)):
        return
    library = torch.library.Library("torchvision", "DEF")
    library.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    library.define("qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    _FALLBACK_LIBRARY = library


def _has_nms() -> bool:
    try:
        torch.ops.torchvision.nms  # noqa: B018  (raises AttributeError when undefined)
    except (AttributeError, RuntimeError):
        return False
    return True


def _load_extension(locations: list[str]) -> bool:
    """Load torchvision's ``_C`` extension the way torchvision does; False if it cannot load."""
    loader = (importlib.machinery.ExtensionFileLoader, importlib.machinery.EXTENSION_SUFFIXES)
    for location in locations:
        found = importlib.machinery.FileFinder(location, loader).find_spec("_C")
        if found is None or found.origin is None:
            continue
        try:
            torch.ops.load_library(found.origin)
        except (OSError, ImportError, RuntimeError):
            return False
        return True
    return False
