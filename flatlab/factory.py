"""User factories named ``"package.module:factory"``: consent, import, and the call convention.

Models and data sets share one convention:

* A name with a colon is a factory: ``package.module`` is imported and ``factory`` (a dotted
  attribute path, e.g. ``timm:create_model``) is looked up in it.
* Importing runs the module's code. flatlab does it only with consent (``trust_code=True``;
  on the command line ``--trust-code``, or the user naming the factory there). A name that came
  from a file (checkpoint metadata, a study plan) without consent is refused *before* anything
  is imported, with one line that says what the file asks to import and how to allow it.
* The factory receives the user's keyword arguments plus the context flatlab has (models:
  ``num_classes`` always, ``input_shape``; data sets: ``seed``, ``data_dir``). A context value is
  passed only when the factory's signature names it as a parameter; a ``**kwargs`` catch-all
  does not count (``timm.create_model`` forwards ``**kwargs`` to the model class, which would
  choke on an ``input_shape``). Unknown user arguments are refused by name unless the factory
  takes ``**kwargs``.
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from flatlab._compat import ensure_torchvision_importable
from flatlab.errors import FlatlabError


def is_factory_name(name: str) -> bool:
    """True for ``"package.module:factory"`` names (as opposed to registry names)."""
    return ":" in name


def check_consent(name: str, *, what: str, trust_code: bool, source: str | None = None) -> None:
    """Refuse (FlatlabError, nothing imported) a factory name without the user's consent.

    ``what`` names the kind ("model", "dataset"); ``source`` is the file the name came from.
    """
    module_name, _, attr = name.partition(":")
    if not module_name or not attr or not all(p.isidentifier() for p in module_name.split(".")):
        raise FlatlabError(f"{what} {name!r}: expected 'package.module:factory'")
    if not trust_code:
        named = f"{source} names {what} {name!r}, which" if source else f"{what} {name!r}"
        raise FlatlabError(
            f"{named} would import module {module_name!r} and run its code; not imported. "
            f"If you trust it, pass --trust-code (trust_code=True in Python)")


def import_factory(name: str, *, what: str, trust_code: bool) -> Callable[..., Any]:
    """Import ``package.module`` and return its attribute ``factory`` (a callable).

    Refused unless ``trust_code`` (see :func:`check_consent`).
    """
    check_consent(name, what=what, trust_code=trust_code)
    module_name, _, attr = name.partition(":")
    ensure_torchvision_importable()  # timm, torchvision and user modules may import torchvision
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise FlatlabError(f"{what} {name!r}: cannot import {module_name!r} ({err})") from None
    factory: Any = module
    for part in attr.split("."):
        if not hasattr(factory, part):
            raise FlatlabError(f"{what} {name!r}: module {module_name!r} has no {attr!r}")
        factory = getattr(factory, part)
    if not callable(factory):
        raise FlatlabError(f"{what} {name!r}: {attr!r} is not callable")
    return factory


def call_arguments(factory: Callable[..., Any], name: str, kwargs: Mapping[str, Any], *,
                   always: Mapping[str, Any], if_named: Mapping[str, Any],
                   what: str) -> dict[str, Any]:
    """The keyword arguments to call ``factory`` with (see the module docstring).

    ``always`` go in whatever the signature says (the factory must accept them by name or
    through ``**kwargs``); ``if_named`` go in only where the signature names them.
    """
    try:
        params = inspect.signature(factory).parameters
    except (TypeError, ValueError):  # builtins without a signature: pass what we must
        return {**kwargs, **always}
    takes_any = any(p.kind is p.VAR_KEYWORD for p in params.values())
    named = {n for n, p in params.items()
             if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
    context = set(always) | set(if_named)
    clash = sorted(set(kwargs) & context)
    if clash:
        raise FlatlabError(f"{what} {name!r}: {', '.join(clash)} is set by flatlab from the data, "
                           f"not as an argument")
    if not takes_any:
        for key in always:
            if key not in named:
                raise FlatlabError(f"{what} factory {name!r} does not accept {key}=")
        _refuse_unknown(what, name, kwargs, [n for n in params if n in named - context])
    return {**kwargs, **always, **{k: v for k, v in if_named.items() if k in named}}


def _refuse_unknown(what: str, name: str, kwargs: Mapping[str, Any],
                    accepted: Iterable[str]) -> None:
    accepted = list(accepted)
    unknown = sorted(set(kwargs) - set(accepted))
    if unknown:
        raise FlatlabError(f"{what} {name!r} got unknown argument(s) {', '.join(unknown)}; "
                           f"accepted: {', '.join(accepted) or 'none'}")
