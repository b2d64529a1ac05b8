"""How flatlab evaluates a model: modes, parameter selection, batches, the loss at given weights.

:mod:`flatlab.hessian` and :mod:`flatlab.landscape` both evaluate the dataset-average loss

.. math::

    L(w) = \\frac{1}{N} \\sum_b n_b \\, \\ell_b(w), \\qquad
    \\ell_b(w) = \\mathrm{loss\\_fn}(\\mathrm{forward}(\\mathrm{model}_w, x_b), y_b),

and this module is where they agree on what that means.

Data
    ``data`` is one batch or a re-iterable collection of batches (a list, a ``DataLoader``;
    not a one-shot iterator, since every product or point makes its own pass). A batch is a
    sequence ``(x, y, *extra)``: ``x`` is the model input (a tensor, or a tuple/list/dict of
    tensors handed to ``forward`` as one object), ``y`` the targets handed to ``loss_fn``, and
    any further items (sample indices, weights, file names) are ignored: what the model needs
    belongs in ``x``, what the loss needs in ``y``. ``n_b`` is the first dimension of the first
    tensor in ``x`` (of ``y`` when ``x`` holds no tensor). One batch is recognised by its second
    item being a tensor; wrap a batch whose targets are not a tensor in a list.
Forward
    ``forward(model, x) -> outputs`` replaces ``model(x)`` (default). HuggingFace:
    ``lambda m, x: m(**x).logits``; several positional inputs: ``lambda m, x: m(*x)``.
Modes
    ``"eval"`` or ``"train"`` for every submodule while evaluating; the model's own flags (and
    BatchNorm momenta) are restored afterwards (:func:`module_mode`).
Bias and normalisation parameters (one rule)
    A parameter is *bias-like* when it has at most one dimension (``bias``, ``in_proj_bias``,
    a PReLU slope, a layer-scale vector) or belongs to a normalisation layer
    (:data:`NORM_TYPES`: BatchNorm, InstanceNorm, GroupNorm, LayerNorm, RMSNorm, LocalResponse
    Norm), whatever its name. This is the rule of Li et al. (2018) that random landscape
    directions leave out, and what ``HessianOperator(params="weights")`` leaves out.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call

from flatlab.errors import FlatlabError

__all__ = [
    "MODES",
    "NORM_TYPES",
    "Batch",
    "Forward",
    "as_batches",
    "batch_rows",
    "bias_and_norm_names",
    "check_choice",
    "first_tensor",
    "functional_outputs",
    "iterate_batches",
    "loss_at",
    "module_mode",
    "select_parameters",
    "unwrap",
]

MODES = ("eval", "train")

Forward = Callable[[nn.Module, Any], Any]

NORM_TYPES: tuple[type[nn.Module], ...] = tuple(
    t for t in (
        nn.modules.batchnorm._NormBase,  # BatchNorm*d, SyncBatchNorm, InstanceNorm*d
        nn.GroupNorm,
        nn.LayerNorm,
        getattr(nn, "RMSNorm", None),
        nn.LocalResponseNorm,
    ) if t is not None
)


def check_choice(name: str, value: Any, choices: Sequence[Any]) -> None:
    """Raise :class:`FlatlabError` (a ``ValueError``) unless ``value`` is one of ``choices``."""
    if value not in choices:
        raise FlatlabError(f"{name}={value!r} is not one of {', '.join(map(str, choices))}")


def unwrap(model: nn.Module) -> nn.Module:
    """The module inside ``DistributedDataParallel`` / ``DataParallel`` (evaluation never needs
    their gradient hooks); any other module unchanged."""
    if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
        return model.module
    return model


# --------------------------------------------------------------------------- parameters


def bias_and_norm_names(model: nn.Module) -> frozenset[str]:
    """Names of the bias-like parameters (see the module docstring): every parameter with at
    most one dimension and every parameter of a normalisation layer."""
    names = {name for name, p in model.named_parameters() if p.dim() <= 1}
    for module_name, module in model.named_modules():
        if isinstance(module, NORM_TYPES):
            prefix = f"{module_name}." if module_name else ""
            names.update(prefix + name for name, _ in module.named_parameters(recurse=False))
    return frozenset(names)


def select_parameters(model: nn.Module, params: Any = None) -> list[tuple[str, nn.Parameter]]:
    """Resolve a ``params`` argument to ``(name, parameter)`` pairs in the model's order.

    ``None``: every parameter with ``requires_grad``; ``"weights"``: those minus the bias-like
    ones (:func:`bias_and_norm_names`); a list of names; or a predicate
    ``(name, param) -> bool``. Shared parameters appear once.
    """
    named = list(model.named_parameters())
    if params is None:
        chosen = [(n, p) for n, p in named if p.requires_grad]
    elif isinstance(params, str):
        if params != "weights":
            raise FlatlabError(f"params={params!r} is not understood; use None (all trainable), "
                               "'weights', a list of parameter names or a predicate")
        excluded = bias_and_norm_names(model)
        chosen = [(n, p) for n, p in named if p.requires_grad and n not in excluded]
    elif callable(params):
        chosen = [(n, p) for n, p in named if params(n, p)]
    else:
        wanted = set(params)
        unknown = [n for n in params if n not in {m for m, _ in named}]
        if unknown:
            listing = ", ".join(n for n, _ in named[:12]) + (", ..." if len(named) > 12 else "")
            raise FlatlabError(f"unknown parameter name(s) {unknown}; the model has: {listing}")
        chosen = [(n, p) for n, p in named if n in wanted]
    if not chosen:
        raise FlatlabError("no parameters selected (params selects nothing)")
    dtypes = {p.dtype for _, p in chosen}
    devices = {p.device for _, p in chosen}
    if len(dtypes) > 1 or len(devices) > 1:
        raise FlatlabError("the selected parameters must share one dtype and one device, got "
                           f"{sorted(map(str, dtypes))} on {sorted(map(str, devices))}")
    return chosen


# --------------------------------------------------------------------------- modes


def batchnorm_layers(model: nn.Module) -> list[tuple[str, nn.modules.batchnorm._BatchNorm]]:
    """``(name, layer)`` for every BatchNorm layer that tracks running statistics."""
    return [(n, m) for n, m in model.named_modules()
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]


@contextlib.contextmanager
def module_mode(model: nn.Module, mode: str) -> Iterator[None]:
    """Every submodule in ``mode`` for the duration; each one's own flag restored after.

    ``"eval"``, ``"train"``, or ``"bn-stats"``: eval mode except the BatchNorm layers, which
    are in train mode with momentum 1, so a forward pass writes each batch's statistics into
    the running buffers (their momenta are restored too).
    """
    saved = [(m, m.training, getattr(m, "momentum", None)) for m in model.modules()]
    try:
        if mode == "bn-stats":
            model.eval()
            for _, layer in batchnorm_layers(model):
                layer.train()
                layer.momentum = 1.0
        else:
            model.train(mode == "train")
        yield
    finally:
        for m, training, momentum in saved:
            m.training = training
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.momentum = momentum


# --------------------------------------------------------------------------- batches


@dataclass(frozen=True)
class Batch:
    """One batch on the evaluation device: inputs, targets and the number of samples."""

    x: Any
    y: Any
    size: int


def map_tensors(fn: Callable[[Tensor], Tensor], obj: Any) -> Any:
    """``fn`` applied to every tensor in a tensor / tuple / list / mapping (others unchanged)."""
    if isinstance(obj, Tensor):
        return fn(obj)
    if isinstance(obj, (tuple, list)):
        items = [map_tensors(fn, o) for o in obj]
        return type(obj)(*items) if hasattr(obj, "_fields") else type(obj)(items)
    if isinstance(obj, Mapping):
        return {k: map_tensors(fn, o) for k, o in obj.items()}
    return obj


def first_tensor(obj: Any) -> Tensor | None:
    """The first tensor in a tensor / tuple / list / mapping, depth first; ``None`` if none."""
    if isinstance(obj, Tensor):
        return obj
    values = obj.values() if isinstance(obj, Mapping) else obj if isinstance(
        obj, (tuple, list)) else ()
    for o in values:
        t = first_tensor(o)
        if t is not None:
            return t
    return None


def batch_rows(obj: Any, start: int, stop: int) -> Any:
    """Samples ``start:stop`` of every tensor in ``obj`` (dim 0)."""
    return map_tensors(lambda t: t[start:stop], obj)


def _is_single_batch(data: Any) -> bool:
    return (isinstance(data, (tuple, list)) and len(data) >= 2 and isinstance(data[1], Tensor)
            and (first_tensor(data[0]) is not None or isinstance(data[0], Mapping)))


def as_batches(data: Any) -> Iterable[Any]:
    """``data`` as a re-iterable of batches: one batch becomes ``[batch]``."""
    if _is_single_batch(data):
        return [data]
    if isinstance(data, Iterator) or not isinstance(data, Iterable) or isinstance(
            data, (Tensor, str, Mapping)):
        raise TypeError("data must be an (x, y) batch or a re-iterable collection of batches "
                        f"(a list or a DataLoader), not {_describe(data)}")
    return data


def _describe(data: Any) -> str:
    return "a one-shot iterator" if isinstance(data, Iterator) else type(data).__name__


def iterate_batches(batches: Iterable[Any], device: torch.device | None, *,
                    for_autograd: bool = False) -> Iterator[Batch]:
    """Yield every batch of ``batches`` (from :func:`as_batches`) moved to ``device`` (``None``:
    left where it is). ``for_autograd`` copies inference-mode tensors (from a loader run under
    ``inference_mode``), which autograd could not save otherwise."""

    def move(t: Tensor) -> Tensor:
        t = t if device is None else t.to(device, non_blocking=True)
        return t.clone() if for_autograd and t.is_inference() else t

    for batch in batches:
        if not (isinstance(batch, (tuple, list)) and len(batch) >= 2):
            raise TypeError("every batch must be a sequence (inputs, targets, *extra), got "
                            f"{type(batch).__name__}")
        x, y = map_tensors(move, batch[0]), map_tensors(move, batch[1])
        first = first_tensor(x)
        if first is None or first.ndim == 0:
            first = y if isinstance(y, Tensor) and y.ndim > 0 else None
        if first is None:
            raise TypeError("cannot tell the batch size: the inputs (or the targets) must hold "
                            "a tensor with a batch dimension")
        yield Batch(x, y, int(first.shape[0]))


# --------------------------------------------------------------------------- the loss at w


class _WithForward(nn.Module):
    """``forward(model, x)`` as a module, so :func:`torch.func.functional_call` can swap the
    model's tensors while a user-given forward runs."""

    def __init__(self, model: nn.Module, forward: Forward) -> None:
        super().__init__()
        self.model = model
        self.call = forward

    def forward(self, x: Any) -> Any:
        return self.call(self.model, x)


def _default_forward(model: nn.Module, x: Any) -> Any:
    return model(x)


def functional_outputs(model: nn.Module, tensors: Sequence[Mapping[str, Tensor]], x: Any,
                       forward: Forward | None = None) -> Any:
    """``forward(model, x)`` with the model's parameters and buffers replaced by ``tensors``
    (dicts name -> tensor; names not given keep the model's own). The model is not changed."""
    wrapper = _WithForward(model, forward or _default_forward)
    renamed = tuple({f"model.{n}": t for n, t in d.items()} for d in tensors)
    return functional_call(wrapper, renamed, (x,), strict=False)


def loss_at(model: nn.Module, loss_fn: Callable[[Any, Any], Tensor],
            tensors: Sequence[Mapping[str, Tensor]], batch: Batch,
            forward: Forward | None = None) -> tuple[Tensor, Any]:
    """``(loss_fn(forward(model_w, x), y), outputs)`` with ``w`` given by ``tensors`` (see
    :func:`functional_outputs`); the loss must be a scalar (the batch mean)."""
    outputs = functional_outputs(model, tensors, batch.x, forward)
    loss = loss_fn(outputs, batch.y)
    if not isinstance(loss, Tensor) or loss.ndim != 0:
        shape = tuple(loss.shape) if isinstance(loss, Tensor) else type(loss).__name__
        raise FlatlabError(f"loss_fn must return a scalar tensor (the mean loss over the batch), "
                           f"got {shape}")
    return loss, outputs
