"""Flat-minimum optimizers: NSO, SAM, ASAM, RWP on top of any ``torch.optim`` base optimizer.

All of them take ``step(closure)`` with an LBFGS-style closure (zero the gradients, compute the
loss on the current batch, ``backward()``, return the loss)::

    optimizer = NSO(model.parameters(), sigma=0.01, num_perturbs=1, lr=0.1, momentum=0.9,
                    model=model)

    def closure():
        optimizer.zero_grad()
        loss = loss_fn(model(x), y)
        loss.backward()
        return loss

    loss = optimizer.step(closure)

Mixed precision (fp16 autocast with ``torch.amp.GradScaler``): the closure scales the loss as
in any AMP loop, the scaler goes to ``step``, and ``scaler.update()`` follows every step::

    scaler = torch.amp.GradScaler(device)

    def closure():
        optimizer.zero_grad()
        with torch.autocast(device, dtype=torch.float16):
            loss = loss_fn(model(x), y)
        scaler.scale(loss).backward()
        return loss

    loss = optimizer.step(closure, scaler=scaler)
    scaler.update()

The passes' gradients are unscaled once per step; if any pass produced inf/NaN the base step
is skipped, ``W`` is left exactly as it was and ``scaler.update()`` lowers the scale.
``scaler.step(optimizer, closure)`` raises a ``TypeError`` naming this recipe. The noise seed
is salted (:func:`noise_generator`), so one ``seed`` may seed both the weights and the noise.
"""

from __future__ import annotations

import inspect
from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import Tensor, nn
from torch.optim import Optimizer

from flatlab.optim._noise import noise_generator
from flatlab.optim._perturb import NOISE_TYPES, PerturbationOptimizer
from flatlab.optim.nso import NSO
from flatlab.optim.rwp import RWP
from flatlab.optim.sam import ASAM, SAM

__all__ = [
    "ASAM", "BASE_OPTIMIZERS", "NOISE_TYPES", "NSO", "OPTIMIZERS", "RWP", "SAM",
    "PerturbationOptimizer", "build_optimizer", "gradient_evaluations_per_step",
    "noise_generator",
]

OPTIMIZERS: tuple[str, ...] = ("sgd", "sam", "asam", "rwp", "nso")
BASE_OPTIMIZERS: dict[str, type[Optimizer]] = {
    "sgd": torch.optim.SGD, "adam": torch.optim.Adam, "adamw": torch.optim.AdamW,
}
_METHODS: dict[str, type[PerturbationOptimizer]] = {
    "sam": SAM, "asam": ASAM, "rwp": RWP, "nso": NSO,
}
_METHOD_ARGS: dict[str, tuple[str, ...]] = {
    "sgd": (),
    "sam": ("rho",),
    "asam": ("rho",),
    "rwp": ("sigma", "num_perturbs", "noise", "clean_weight"),
    "nso": ("sigma", "num_perturbs", "noise", "clean_weight", "clean_pass"),
}


def build_optimizer(
    name: str,
    params: Iterable[Tensor] | Iterable[dict[str, Any]],
    *,
    lr: float,
    momentum: float = 0.9,
    weight_decay: float = 0.0,
    sigma: float | None = None,
    num_perturbs: int | None = None,
    rho: float | None = None,
    noise: str | None = None,
    clean_weight: float | None = None,
    clean_pass: bool | None = None,
    seed: int = 0,
    base: str = "sgd",
    model: nn.Module | None = None,
    independent_noise: bool = False,
    base_kwargs: Mapping[str, Any] | None = None,
) -> Optimizer:
    """Build an optimizer by name (one of :data:`OPTIMIZERS`) on base ``base``.

    ``"sgd"`` is the base optimizer alone (plain ``torch.optim.SGD`` by default); the others
    wrap it. Method arguments left ``None`` take the method's default; giving one that the
    method does not use (``sigma`` for SAM, ``rho`` for NSO) is an error. ``momentum`` applies
    to the SGD base only (Adam/AdamW keep their betas). ``seed`` seeds the noise generator of
    NSO/RWP (salted: :func:`noise_generator`); ``model`` and ``independent_noise`` are passed
    on (see :class:`NSO`). ``base_kwargs`` are further keyword arguments of the base optimizer
    (``amsgrad``, ``betas``, ...); ``lr``, ``weight_decay`` and ``momentum`` have their own.
    """
    if name not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {name!r}; choose one of {', '.join(OPTIMIZERS)}")
    if base not in BASE_OPTIMIZERS:
        raise ValueError(
            f"unknown base optimizer {base!r}; choose one of {', '.join(BASE_OPTIMIZERS)}")
    given = {"sigma": sigma, "num_perturbs": num_perturbs, "rho": rho, "noise": noise,
             "clean_weight": clean_weight, "clean_pass": clean_pass}
    given = {key: value for key, value in given.items() if value is not None}
    unused = sorted(set(given) - set(_METHOD_ARGS[name]))
    if unused:
        takes = ", ".join(_METHOD_ARGS[name]) or "no method arguments"
        raise ValueError(f"{', '.join(unused)} does not apply to optimizer {name!r} "
                         f"(it takes: {takes})")
    base_cls = BASE_OPTIMIZERS[base]
    options = dict(base_kwargs or {})
    base_kwargs = {"lr": lr, "weight_decay": weight_decay}
    if base == "sgd":
        base_kwargs["momentum"] = momentum
    base_kwargs.update(_base_options(base, options))
    if name == "sgd":
        return base_cls(params, **base_kwargs)
    if name in ("nso", "rwp"):
        given.update(seed=seed, independent_noise=independent_noise)
    return _METHODS[name](params, base_cls, model=model, **given, **base_kwargs)


def _base_options(base: str, options: dict[str, Any]) -> dict[str, Any]:
    """Extra keyword arguments of base optimizer ``base``, checked by name (lists -> tuples)."""
    own = sorted(set(options) & {"params", "lr", "weight_decay", "momentum"})
    if own:
        raise ValueError(f"base optimizer option(s) {', '.join(own)} have their own arguments")
    accepted = [p for p in inspect.signature(BASE_OPTIMIZERS[base]).parameters if p != "params"]
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        raise ValueError(f"unknown option(s) {', '.join(unknown)} for base optimizer {base!r}; "
                         f"accepted: {', '.join(accepted)}")
    return {k: tuple(v) if isinstance(v, list) else v for k, v in options.items()}


def gradient_evaluations_per_step(optimizer: Optimizer) -> int:
    """Forward/backward passes per ``step()``: SGD (any plain optimizer) 1, SAM/ASAM 2,
    NSO ``2k`` (``k`` one-sided) + 1 with a clean pass, RWP ``k + 1``."""
    if isinstance(optimizer, PerturbationOptimizer):
        return optimizer.gradient_evaluations
    return 1
