"""Matrix-free Hessian operators.

:class:`HessianOperator` represents the Hessian of the dataset-average loss

.. math::

    L(w) = \\frac{1}{N} \\sum_b n_b \\, \\ell_b(w), \\qquad
    H = \\nabla^2 L(w) = \\sum_b \\frac{n_b}{N} \\nabla^2 \\ell_b(w),

where batch :math:`b` holds :math:`n_b` of the :math:`N` samples and :math:`\\ell_b` is the
*mean* loss over it (``loss_fn(model(x_b), y_b)``). Only products :math:`H V` are ever formed,
for one vector ``(P,)`` or a block ``(P, b)``; a block costs one pass over the data.

Two ways to differentiate twice:

``"forward"`` (forward-over-reverse)
    :math:`H v = \\partial_\\varepsilon \\nabla \\ell(w + \\varepsilon v)|_0`: ``torch.func.jvp``
    of ``torch.func.grad``, vmapped over the ``b`` tangents. The primal forward/backward is
    computed once per chunk of data and shared by all ``b`` tangents.
``"double_backward"``
    :math:`H v = \\nabla_w (\\nabla \\ell(w)^\\top v)`: ``torch.autograd.grad`` of the gradient
    (built with ``create_graph=True``), batched over a block with ``is_grads_batched``.

Either way a streamed product costs a gradient (the primal pass) plus the second-order pass,
about 3 gradients for one vector. Keeping every batch's gradient graph between products
(``cache``, eval mode, when it fits in memory) removes the primal pass: a product then costs
the second backward alone, about 2 gradients, which is the arithmetic floor for an exact
product on an MLP (6 matrix products per layer against the gradient's 3). Measured on this
project's CPU benchmark (``benchmarks/hessian_speed.py``, one thread; time of one product and
of a block of 8 per vector, as multiples of one full-data gradient):

==========================  ==================  ==================
path                        MLP 289k: 1 / 8     CNN 21k: 1 / 8
==========================  ==================  ==================
cached double backward      1.98 / 2.00         1.29 / 1.29
streamed forward-over-rev.  3.54 / 2.31         2.41 / 1.63
streamed double backward    3.10 / 2.62         2.34 / 1.58
==========================  ==================  ==================

so ``backend="auto"`` uses the cache when it applies, and otherwise double backward for a
single vector and forward-over-reverse for a block (falling back to double backward, with a
warning, where forward-mode AD is not implemented, e.g. ``mse_loss`` in torch 2.13). With the
cache a block is one second backward per vector over the cached graphs: vmapping that backward
(``is_grads_batched``) measured 1.5x slower per vector.

Any object with ``size``, ``dtype``, ``device`` and ``matvec`` is an operator for the
estimators in :mod:`flatlab.hessian`; :class:`DenseOperator` wraps an explicit matrix.
"""

from __future__ import annotations

import contextlib
import math
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import torch
from torch import Tensor, nn
from torch.func import functional_call

from flatlab.distributed import all_reduce_sum
from flatlab.errors import FlatlabError

__all__ = ["LinearOperator", "DenseOperator", "HessianOperator", "MODES", "BACKENDS"]

MODES = ("eval", "train")
BACKENDS = ("auto", "forward", "double_backward")

# Elements (rows x activation size x vectors) one vmapped chunk may hold. Above this, CPUs fall
# out of cache and per-vector cost grows (measured: a CNN block of 8 costs 5.5x a gradient per
# vector at 256 images per chunk and 2.1x at 32). See ``_chunk_rows``.
_CHUNK_ELEMENTS = 2**22

_NORM_TYPES: tuple[type[nn.Module], ...] = tuple(
    t for t in (
        nn.modules.batchnorm._NormBase,  # BatchNorm*, InstanceNorm*, SyncBatchNorm
        nn.GroupNorm,
        nn.LayerNorm,
        getattr(nn, "RMSNorm", None),
        nn.LocalResponseNorm,
    ) if t is not None
)


@runtime_checkable
class LinearOperator(Protocol):
    """What the estimators need: a symmetric ``P x P`` operator given by its products."""

    @property
    def size(self) -> int: ...

    @property
    def dtype(self) -> torch.dtype: ...

    @property
    def device(self) -> torch.device: ...

    def matvec(self, v: Tensor) -> Tensor: ...


class DenseOperator:
    """An explicit symmetric matrix as an operator (for tests and doctests).

    ``param_names`` / ``param_shapes`` optionally split the ``P`` coordinates into named
    blocks, so per-block estimates (``trace(...).per_param``) can be checked on dense matrices.

    >>> import torch
    >>> op = DenseOperator(torch.diag(torch.tensor([3.0, 1.0], dtype=torch.float64)))
    >>> op.matvec(torch.ones(2, dtype=torch.float64))
    tensor([3., 1.], dtype=torch.float64)
    """

    def __init__(self, matrix: Tensor, *, param_names: Sequence[str] | None = None,
                 param_shapes: Sequence[Sequence[int]] | None = None) -> None:
        if matrix.ndim != 2 or matrix.shape[0] != matrix.shape[1]:
            raise FlatlabError(f"DenseOperator needs a square matrix, got shape "
                               f"{tuple(matrix.shape)}")
        if not torch.allclose(matrix, matrix.T, rtol=1e-5, atol=1e-8 * float(matrix.abs().max())):
            raise FlatlabError("DenseOperator needs a symmetric matrix")
        self.matrix = matrix
        if (param_names is None) != (param_shapes is None):
            raise FlatlabError("give both param_names and param_shapes, or neither")
        if param_names is not None and param_shapes is not None:
            shapes = [torch.Size(s) for s in param_shapes]
            if sum(s.numel() for s in shapes) != matrix.shape[0] or len(shapes) != len(
                    param_names):
                raise FlatlabError("param_shapes must partition the matrix's rows, one per name")
            self.param_names: list[str] = list(param_names)
            self.param_shapes: list[torch.Size] = shapes

    @property
    def size(self) -> int:
        return self.matrix.shape[0]

    @property
    def dtype(self) -> torch.dtype:
        return self.matrix.dtype

    @property
    def device(self) -> torch.device:
        return self.matrix.device

    def matvec(self, v: Tensor) -> Tensor:
        """``matrix @ v`` for ``v`` of shape ``(P,)`` or ``(P, b)``, in ``v``'s dtype."""
        return (self.matrix @ v.to(self.matrix.dtype)).to(v.dtype)


def _norm_param_names(model: nn.Module) -> frozenset[str]:
    names = set()
    for prefix, module in model.named_modules():
        if isinstance(module, _NORM_TYPES):
            names.update(f"{prefix}.{n}" if prefix else n
                         for n, _ in module.named_parameters(recurse=False))
    return frozenset(names)


def select_parameters(model: nn.Module, params: Any = None) -> list[tuple[str, nn.Parameter]]:
    """Resolve the ``params`` argument of :class:`HessianOperator` to ``(name, parameter)`` pairs.

    ``None``: every parameter with ``requires_grad``; ``"weights"``: those, minus biases and
    normalisation-layer parameters; a list of names; or a predicate ``(name, param) -> bool``.
    The result follows the model's parameter order (shared parameters appear once).
    """
    named = list(model.named_parameters())
    if params is None:
        chosen = [(n, p) for n, p in named if p.requires_grad]
    elif isinstance(params, str):
        if params != "weights":
            raise FlatlabError(f"params={params!r} is not understood; use None (all trainable), "
                               "'weights', a list of parameter names or a predicate")
        norm = _norm_param_names(model)
        chosen = [(n, p) for n, p in named
                  if p.requires_grad and n not in norm and n.rsplit(".", 1)[-1] != "bias"]
    elif callable(params):
        chosen = [(n, p) for n, p in named if params(n, p)]
    else:
        wanted = list(params)
        known = {n for n, _ in named}
        unknown = [n for n in wanted if n not in known]
        if unknown:
            listing = ", ".join(n for n, _ in named[:12]) + (", ..." if len(named) > 12 else "")
            raise FlatlabError(f"unknown parameter name(s) {unknown}; the model has: {listing}")
        wanted_set = set(wanted)
        chosen = [(n, p) for n, p in named if n in wanted_set]
    if not chosen:
        raise FlatlabError("no parameters selected for the Hessian (params selects nothing)")
    dtypes = {p.dtype for _, p in chosen}
    devices = {p.device for _, p in chosen}
    if len(dtypes) > 1 or len(devices) > 1:
        raise FlatlabError("the selected parameters must share one dtype and one device, got "
                           f"{sorted(map(str, dtypes))} on {sorted(map(str, devices))}")
    return chosen


def _map_tensors(fn: Callable[[Tensor], Tensor], obj: Any) -> Any:
    if isinstance(obj, Tensor):
        return fn(obj)
    if isinstance(obj, (tuple, list)):
        return type(obj)(_map_tensors(fn, o) for o in obj)
    if isinstance(obj, dict):
        return {k: _map_tensors(fn, o) for k, o in obj.items()}
    return obj


def _for_autograd(tensor: Tensor) -> Tensor:
    """Inference-mode tensors (from a loader run under ``inference_mode``) cannot be saved
    for backward; a copy made outside inference mode can."""
    return tensor.clone() if tensor.is_inference() else tensor


def _rows(obj: Any, start: int, stop: int) -> Any:
    return _map_tensors(lambda t: t[start:stop], obj)


def _first_tensor(obj: Any) -> Tensor | None:
    if isinstance(obj, Tensor):
        return obj
    values = obj.values() if isinstance(obj, dict) else obj if isinstance(obj, (tuple, list)) \
        else ()
    for o in values:
        t = _first_tensor(o)
        if t is not None:
            return t
    return None


def _is_single_batch(data: Any) -> bool:
    return (isinstance(data, (tuple, list)) and len(data) == 2
            and not isinstance(data[0], (tuple, list)) and isinstance(data[1], Tensor))


@dataclass
class _Graph:
    """One batch's gradient with its autograd graph kept (``create_graph=True``)."""

    leaves: list[Tensor]   # detached views of the selected parameters, requires_grad
    outputs: list[Tensor]  # gradients that depend on w (others add nothing to H)
    live: list[int]        # their positions among the selected parameters
    count: int             # samples in the batch
    loss: float
    gradient: Tensor       # flat, detached


class HessianOperator:
    """Matrix-free Hessian of the dataset-average loss of ``model`` on ``data``.

    Args:
        model: any ``nn.Module``; products run on the device of its parameters.
        loss_fn: ``loss_fn(outputs, targets)`` returning the *mean* loss over the batch
            (``nn.CrossEntropyLoss()``, ``nn.MSELoss()``, ...).
        data: one ``(x, y)`` batch or a re-iterable of batches (a list, a ``DataLoader``);
            ``x`` is a tensor (or a tuple/dict of tensors passed as one argument). Batches are
            weighted by their size: ``H = sum_b (n_b / N) H_b``.
        params: which parameters ``w`` the Hessian is taken over; ``None`` (all with
            ``requires_grad``), ``"weights"`` (no biases, no normalisation-layer parameters),
            a list of names, or a predicate ``(name, param) -> bool``. The others are constants.
            The flat vector concatenates the chosen tensors in the model's order.
        mode: ``"eval"`` or ``"train"``: the module mode during every evaluation. The model's
            own modes (every submodule's) are restored afterwards. In ``"train"`` mode
            BatchNorm uses batch statistics, but the model's running statistics are never
            modified (the operator works on copies of all buffers).
        distributed: ``data`` is this process's shard; products, loss and gradient are summed
            over the ``torch.distributed`` group (sample count too), so every rank gets the
            single-process answer.
        backend: ``"auto"``, ``"forward"`` or ``"double_backward"`` (see the module docstring).
            ``"auto"``: cached graphs when they fit (below), else double backward for a
            single vector and forward-over-reverse for a block, falling back to double
            backward (with a warning) where forward-mode AD is not implemented.
        check_determinism: evaluate one product twice (without the cache) at construction and
            raise :class:`~flatlab.errors.FlatlabError` if the two differ (dropout in train
            mode, random augmentation, a loader that drops a random remainder).
        chunk_size: ``"auto"`` (default) splits each batch into chunks small enough to stay in
            cache when a block of vectors is vmapped (eval mode only, where samples are
            independent); an int sets the rows per chunk; ``None`` never splits. Requires the
            loss to be a per-sample mean, which ``loss_fn`` promises.
        cache: keep every batch's gradient graph between products, so a product costs only
            the second backward pass (about 2 gradients instead of 3). ``"auto"`` (default)
            caches in eval mode when the graphs' estimated size (4 copies of every submodule
            output) stays under ``cache_bytes``; ``True`` always (in train mode that freezes
            one draw of any dropout); ``False`` never. The cache is rebuilt when any parameter or
            buffer of the model changes in place (tracked by tensor version counters).
        cache_bytes: memory budget of ``cache="auto"`` (default 1 GiB).

    Parameters nothing depends on give zero rows and columns. Sums over batches are
    accumulated in float64; a product returns the dtype of the vector it was given.

    >>> import torch
    >>> model = torch.nn.Linear(3, 1, bias=False).double()
    >>> x = torch.randn(8, 3, dtype=torch.float64)
    >>> op = HessianOperator(model, torch.nn.MSELoss(), (x, torch.zeros(8, 1, dtype=torch.float64)))
    >>> torch.allclose(op.matvec(torch.eye(3, dtype=torch.float64)), 2 * x.T @ x / 8)
    True
    """

    def __init__(self, model: nn.Module, loss_fn: Callable[[Any, Any], Tensor], data: Any, *,
                 params: Any = None, mode: str = "eval", distributed: bool = False,
                 backend: str = "auto", check_determinism: bool = False,
                 chunk_size: int | str | None = "auto", cache: bool | str = "auto",
                 cache_bytes: int = 2**30) -> None:
        if mode not in MODES:
            raise FlatlabError(f"mode={mode!r} is not one of {', '.join(MODES)}")
        if backend not in BACKENDS:
            raise FlatlabError(f"backend={backend!r} is not one of {', '.join(BACKENDS)}")
        if not (chunk_size is None or chunk_size == "auto"
                or (isinstance(chunk_size, int) and chunk_size >= 1)):
            raise FlatlabError(f"chunk_size={chunk_size!r}: use 'auto', None or a positive int")
        if isinstance(chunk_size, int) and mode == "train":
            raise FlatlabError("chunk_size cannot be set in mode='train': BatchNorm statistics "
                               "depend on the batch, so batches are never split there")
        if cache not in ("auto", True, False):
            raise FlatlabError(f"cache={cache!r}: use 'auto', True or False")
        if cache is True and backend == "forward":
            raise FlatlabError("cache=True keeps double-backward graphs; it cannot be combined "
                               "with backend='forward'")
        if isinstance(model, nn.parallel.DistributedDataParallel):
            model = model.module  # products never need DDP's gradient hooks
        if distributed and not (torch.distributed.is_available()
                                and torch.distributed.is_initialized()):
            raise FlatlabError("distributed=True needs an initialised torch.distributed process "
                               "group (run under torchrun and call init_process_group first)")
        if _is_single_batch(data):
            self._batches: Iterable[Any] = [data]
        elif isinstance(data, Iterator) or not isinstance(data, Iterable):
            raise FlatlabError("data must be an (x, y) batch or a re-iterable collection of "
                               "batches (a list or a DataLoader), not a one-shot iterator")
        else:
            self._batches = data
        self.model = model
        self.loss_fn = loss_fn
        self.mode = mode
        self.distributed = distributed
        self.backend = backend
        self.chunk_size = chunk_size
        self.cache = cache
        self.cache_bytes = cache_bytes
        chosen = select_parameters(model, params)
        self.param_names: list[str] = [n for n, _ in chosen]
        self.param_shapes: list[torch.Size] = [p.shape for _, p in chosen]
        self._params = [p for _, p in chosen]
        chosen_ids = {id(p) for p in self._params}
        self._frozen_names = frozenset(n for n, p in model.named_parameters()
                                       if id(p) not in chosen_ids)
        self._forward_failed = False
        self._activations: tuple[int, int] | None = None  # (largest, total) per sample
        self._graphs: list[_Graph] | None = None
        self._graphs_state: tuple[int, ...] | None = None
        self._cache_too_big = False
        self._bypass_cache = False
        self.num_matvecs = 0  # products evaluated so far (columns of all blocks)
        if check_determinism:
            self.check_determinism()

    # ----------------------------------------------------------------- properties and helpers
    @property
    def size(self) -> int:
        """Number of parameters ``P`` (the operator is ``P x P``)."""
        return sum(s.numel() for s in self.param_shapes)

    @property
    def dtype(self) -> torch.dtype:
        return self._params[0].dtype

    @property
    def device(self) -> torch.device:
        return self._params[0].device

    @property
    def cached(self) -> bool:
        """Whether batch graphs are currently held in memory."""
        return self._graphs is not None

    def clear_cache(self) -> None:
        """Drop the cached graphs (they are rebuilt on the next product if caching applies)."""
        self._graphs = self._graphs_state = None

    def unflatten(self, vector: Tensor) -> dict[str, Tensor]:
        """Split a flat ``(P,)`` vector into ``{name: tensor shaped like the parameter}``."""
        pieces = torch.split(vector, [s.numel() for s in self.param_shapes])
        return {n: t.reshape(s) for n, t, s in zip(self.param_names, pieces, self.param_shapes,
                                                   strict=True)}

    def flatten(self, tensors: dict[str, Tensor]) -> Tensor:
        """Concatenate ``{name: tensor}`` (every selected name) into one flat ``(P,)`` vector."""
        return torch.cat([tensors[n].reshape(-1) for n in self.param_names])

    def parameters_vector(self) -> Tensor:
        """The current values of the selected parameters, flattened (a copy)."""
        return torch.cat([p.detach().reshape(-1) for p in self._params])

    @contextlib.contextmanager
    def _evaluation_mode(self) -> Iterator[None]:
        """The requested module mode, with autograd on even inside ``no_grad`` or
        ``inference_mode``; every submodule's own mode is restored afterwards."""
        saved = [(m, m.training) for m in self.model.modules()]
        self.model.train(self.mode == "train")
        try:
            with torch.inference_mode(False), torch.enable_grad():
                yield
        finally:
            for module, training in saved:
                module.training = training

    def _batch_loss(self, params: dict[str, Tensor], x: Any, y: Any) -> Tensor:
        """Mean loss of one batch as a function of the selected parameters.

        Frozen parameters enter as constants and buffers as fresh copies, so in-place updates
        (BatchNorm running statistics in train mode) never reach the model.
        """
        fixed = {n: t.detach() for n, t in self.model.named_parameters()
                 if n in self._frozen_names}
        buffers = {n: b.clone() for n, b in self.model.named_buffers()}
        outputs = functional_call(self.model, (params, fixed, buffers), (x,))
        loss = self.loss_fn(outputs, y)
        if loss.ndim != 0:
            raise FlatlabError("loss_fn must return a scalar (the mean loss over the batch), "
                               f"got shape {tuple(loss.shape)}")
        return loss

    def _primals(self) -> dict[str, Tensor]:
        return {n: p.detach() for n, p in zip(self.param_names, self._params, strict=True)}

    def _iterate(self) -> Iterator[tuple[Any, Any, int]]:
        """Yield ``(x, y, n)`` on the operator's device for every batch of the data."""
        device = self.device
        for batch in self._batches:
            if not (isinstance(batch, (tuple, list)) and len(batch) == 2):
                raise FlatlabError("every batch must be an (inputs, targets) pair, got "
                                   f"{type(batch).__name__}")
            x, y = (_map_tensors(lambda t: _for_autograd(t.to(device, non_blocking=True)), b)
                    for b in batch)
            first = y if isinstance(y, Tensor) and y.ndim > 0 else _first_tensor(x)
            if first is None:
                raise FlatlabError("cannot tell the batch size: targets must be a tensor")
            yield x, y, int(first.shape[0])

    def _chunks(self, x: Any, y: Any, n: int, width: int) -> Iterator[tuple[Any, Any, int]]:
        rows = self._chunk_rows(x, width)
        if rows >= n:
            yield x, y, n
            return
        for start in range(0, n, rows):
            stop = min(start + rows, n)
            yield (_rows(x, start, stop), _rows(y, start, stop), stop - start)

    def _chunk_rows(self, x: Any, width: int) -> int:
        """Rows per chunk so that ``rows * width * (largest activation per sample)`` stays below
        ``_CHUNK_ELEMENTS`` (eval mode, ``chunk_size="auto"``)."""
        if self.chunk_size is None or self.mode == "train":
            return 2**62
        if isinstance(self.chunk_size, int):
            return self.chunk_size
        largest, _ = self._activation_sizes(x)
        return max(1, _CHUNK_ELEMENTS // (width * largest))

    def _activation_sizes(self, x: Any) -> tuple[int, int]:
        """Per sample: the largest output of any submodule, and the sum over leaf modules."""
        if self._activations is None:
            sizes = [(1, False)]

            def record(module: nn.Module, inputs: Any, output: Any) -> None:
                tensor = _first_tensor(output)
                if tensor is not None:
                    sizes.append((tensor[:1].numel(), next(module.children(), None) is None))

            handles = [m.register_forward_hook(record) for m in self.model.modules()]
            try:
                with torch.no_grad(), self._evaluation_mode():
                    fixed = {n: t.detach() for n, t in self.model.named_parameters()}
                    buffers = {n: b.clone() for n, b in self.model.named_buffers()}
                    functional_call(self.model, (fixed, buffers), (_rows(x, 0, 1),))
            finally:
                for h in handles:
                    h.remove()
            self._activations = (max(n for n, _ in sizes), sum(n for n, leaf in sizes if leaf))
        return self._activations

    def _reduce(self, total: Tensor, count: int) -> tuple[Tensor, int]:
        """Sum ``total`` and the sample count over ranks (one all-reduce)."""
        if not self.distributed:
            return total, count
        packed = torch.cat([total.reshape(-1), total.new_tensor([float(count)])])
        all_reduce_sum(packed)
        return packed[:-1].reshape(total.shape), int(round(packed[-1].item()))

    def _split(self, block: Tensor) -> list[Tensor]:
        """``(b, P)`` -> one ``(b, *shape)`` view per selected parameter."""
        b = block.shape[0]
        pieces = torch.split(block, [s.numel() for s in self.param_shapes], dim=1)
        return [t.reshape(b, *s) for t, s in zip(pieces, self.param_shapes, strict=True)]

    # ----------------------------------------------------------------- cached graphs
    def _state(self) -> tuple[int, ...]:
        return tuple(t._version for t in (*self.model.parameters(), *self.model.buffers()))

    def _use_cache(self) -> bool:
        if self._bypass_cache or self.cache is False or self.backend == "forward":
            return False
        return self.cache is True or (self.mode == "eval" and not self._cache_too_big)

    def _build_graph(self, x: Any, y: Any, n: int, create_graph: bool) -> _Graph:
        leaves = [p.detach().requires_grad_(True) for p in self._params]
        with torch.enable_grad():
            loss = self._batch_loss(dict(zip(self.param_names, leaves, strict=True)), x, y)
            grads = torch.autograd.grad(loss, leaves, create_graph=create_graph,
                                        allow_unused=True, materialize_grads=True)
        live = [i for i, g in enumerate(grads) if g.requires_grad]
        gradient = torch.cat([g.detach().reshape(-1) for g in grads])
        return _Graph(leaves, [grads[i] for i in live], live, n, float(loss.detach()), gradient)

    def _cached_graphs(self) -> list[_Graph] | None:
        """The graphs of all batches, (re)built if the model changed; ``None`` when
        ``cache="auto"`` finds they would not fit in ``cache_bytes``."""
        state = self._state()
        if self._graphs is not None and self._graphs_state == state:
            return self._graphs
        self.clear_cache()
        graphs, estimate = [], 0
        element = torch.finfo(self.dtype).bits // 8
        for x, y, n in self._iterate():
            if self.cache == "auto":
                # saved tensors of forward + backward graph: ~4 copies of every activation
                estimate += 4 * n * self._activation_sizes(x)[1] * element
                if estimate > self.cache_bytes:
                    self._cache_too_big = True
                    return None
            graphs.append(self._build_graph(x, y, n, create_graph=True))
        self._graphs, self._graphs_state = graphs, state
        return graphs

    def _products_from_graphs(self, graphs: list[_Graph], block: Tensor) -> tuple[Tensor, int]:
        """``sum_batches n H_batch V`` from cached graphs: one second backward per vector
        (vmapping it with ``is_grads_batched`` measured 1.5x slower per vector)."""
        b = block.shape[0]
        tangents = self._split(block)
        total = torch.zeros(b, self.size, dtype=torch.float64, device=self.device)
        count = 0
        for graph in graphs:
            count += graph.count
            if not graph.outputs:
                continue
            for j in range(b):
                hv = torch.autograd.grad(graph.outputs, graph.leaves,
                                         [tangents[i][j] for i in graph.live], retain_graph=True,
                                         allow_unused=True, materialize_grads=True)
                total[j].add_(torch.cat([h.reshape(-1) for h in hv]), alpha=graph.count)
        return total, count

    # ----------------------------------------------------------------- streamed products
    def _hvp_forward(self, x: Any, y: Any, tangents: list[Tensor]) -> list[Tensor]:
        primals = self._primals()
        grad_fn = torch.func.grad(lambda p: self._batch_loss(p, x, y))

        def hvp(t: dict[str, Tensor]) -> dict[str, Tensor]:
            return torch.func.jvp(grad_fn, (primals,), (t,))[1]

        named = dict(zip(self.param_names, tangents, strict=True))
        if tangents[0].shape[0] == 1:
            out = hvp({n: t[0] for n, t in named.items()})
            return [out[n].unsqueeze(0) for n in self.param_names]
        out = torch.func.vmap(hvp, randomness="same")(named)
        return [out[n] for n in self.param_names]

    def _hvp_double_backward(self, x: Any, y: Any, tangents: list[Tensor]) -> list[Tensor]:
        graph = self._build_graph(x, y, 0, create_graph=True)
        b = tangents[0].shape[0]
        if not graph.outputs:
            return [torch.zeros(b, *s, dtype=self.dtype, device=self.device)
                    for s in self.param_shapes]
        grad_outputs = [tangents[i] for i in graph.live]
        if b == 1:
            hv = torch.autograd.grad(graph.outputs, graph.leaves, [t[0] for t in grad_outputs],
                                     allow_unused=True, materialize_grads=True)
            return [h.unsqueeze(0) for h in hv]
        try:
            return list(torch.autograd.grad(graph.outputs, graph.leaves, grad_outputs,
                                            allow_unused=True, materialize_grads=True,
                                            is_grads_batched=True, retain_graph=True))
        except RuntimeError:  # an op without a batching rule: one backward per vector
            columns = [torch.autograd.grad(graph.outputs, graph.leaves,
                                           [t[j] for t in grad_outputs], allow_unused=True,
                                           materialize_grads=True, retain_graph=True)
                       for j in range(b)]
            return [torch.stack(c) for c in zip(*columns, strict=True)]

    def _streamed_products(self, block: Tensor, backend: str) -> tuple[Tensor, int]:
        """``sum_chunks n_c H_c V`` (float64, shape ``(b, P)``) in one pass over the data."""
        b = block.shape[0]
        tangents = self._split(block)
        hvp = self._hvp_forward if backend == "forward" else self._hvp_double_backward
        total = torch.zeros(b, self.size, dtype=torch.float64, device=self.device)
        count = 0
        for x, y, n in self._iterate():
            for xc, yc, nc in self._chunks(x, y, n, b):
                pieces = hvp(xc, yc, tangents)
                # zeros for unused parameters may come back without the block dimension
                flat = [p.expand(b, *s).reshape(b, -1) for p, s in zip(
                    pieces, self.param_shapes, strict=True)]
                total.add_(torch.cat(flat, dim=1), alpha=nc)
                count += nc
        return total, count

    def _products(self, block: Tensor) -> tuple[Tensor, int]:
        if self._use_cache():
            graphs = self._cached_graphs()
            if graphs is not None:
                return self._products_from_graphs(graphs, block)
        if self.backend != "auto":
            return self._streamed_products(block, self.backend)
        if block.shape[0] == 1 or self._forward_failed:
            return self._streamed_products(block, "double_backward")
        try:
            return self._streamed_products(block, "forward")
        except (RuntimeError, NotImplementedError) as err:
            warnings.warn(f"forward-mode AD failed on this model ({str(err)[:200]}); "
                          "HessianOperator uses backend='double_backward' instead",
                          stacklevel=3)
            self._forward_failed = True
            return self._streamed_products(block, "double_backward")

    def matvec(self, v: Tensor) -> Tensor:
        """``H v`` for ``v`` of shape ``(P,)``, or ``H V`` for a block ``(P, b)`` in one pass.

        The product is computed in the parameters' dtype and summed over batches in float64;
        the result has ``v``'s shape and dtype and lives on the operator's device.
        """
        if v.ndim not in (1, 2) or v.shape[0] != self.size:
            raise FlatlabError(f"matvec expects shape ({self.size},) or ({self.size}, b), got "
                               f"{tuple(v.shape)}")
        block = v.reshape(self.size, -1).T.to(self.device, self.dtype).contiguous()
        with self._evaluation_mode():
            total, count = self._products(block)
        total, count = self._reduce(total, count)
        if count == 0:
            raise FlatlabError("data holds no samples")
        self.num_matvecs += block.shape[0]
        result = (total / count).T.to(v.dtype)
        return result.reshape(v.shape).contiguous()

    def loss_and_gradient(self) -> tuple[float, Tensor]:
        """Dataset-average loss and its gradient ``(P,)`` (float64 sums, returned in
        ``self.dtype``); summed over ranks when ``distributed``. Uses (and fills) the graph
        cache when caching applies."""
        count = 0
        with self._evaluation_mode():
            total = torch.zeros(self.size + 1, dtype=torch.float64, device=self.device)
            graphs = self._cached_graphs() if self._use_cache() else None
            if graphs is None:
                graphs = (self._build_graph(x, y, n, create_graph=False)
                          for x, y, n in self._iterate())
            for graph in graphs:
                total[:-1].add_(graph.gradient, alpha=graph.count)
                total[-1] += graph.loss * graph.count
                count += graph.count
        total, count = self._reduce(total, count)
        if count == 0:
            raise FlatlabError("data holds no samples")
        total = total / count
        return float(total[-1]), total[:-1].to(self.dtype)

    def check_determinism(self, *, rtol: float | None = None) -> None:
        """Evaluate one product twice (never from the cache); raise :class:`FlatlabError` if
        they differ by more than ``rtol`` (relative, default ``sqrt(eps)`` of the dtype)."""
        generator = torch.Generator().manual_seed(20240611)
        probe = torch.randint(0, 2, (self.size,), generator=generator).to(self.device) * 2.0 - 1
        self._bypass_cache = True
        try:
            first = self.matvec(probe.double())
            second = self.matvec(probe.double())
        finally:
            self._bypass_cache = False
        tol = math.sqrt(torch.finfo(self.dtype).eps) if rtol is None else rtol
        diff = float(torch.linalg.vector_norm(first - second))
        scale = float(torch.linalg.vector_norm(first)) or 1.0
        if not diff <= tol * scale:
            raise FlatlabError(
                f"two evaluations of the same Hessian-vector product differ (relative "
                f"difference {diff / scale:.2e} > {tol:.1e}): the loss is not a deterministic "
                f"function of the weights. Likely causes: dropout or other randomness with "
                f"mode={self.mode!r} (use mode='eval'), random data augmentation or a shuffling "
                f"loader that drops a random remainder (pre-compute fixed batches instead).")
