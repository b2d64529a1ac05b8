"""Matrix-free Hessian operators.

:class:`HessianOperator` represents the Hessian of the dataset-average loss

.. math::

    L(w) = \\frac{1}{N} \\sum_b n_b \\, \\ell_b(w), \\qquad
    H = \\nabla^2 L(w) = \\sum_b \\frac{n_b}{N} \\nabla^2 \\ell_b(w),

where batch :math:`b` holds :math:`n_b` of the :math:`N` samples and :math:`\\ell_b` is the
*mean* loss over it (``loss_fn(forward(model, x_b), y_b)``, see :mod:`flatlab.evaluation`).
Only products :math:`H V` are ever formed, for one vector ``(P,)`` or a block ``(P, b)``; a
block costs one pass over the data.

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
estimators in :mod:`flatlab.hessian`; :class:`DenseOperator` wraps an explicit matrix, and
:func:`as_scipy` (``op.to_scipy()``) hands any of them to ``scipy.sparse.linalg``.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Sequence
from typing import Any, Protocol, runtime_checkable

import numpy as np
import scipy.sparse.linalg
import torch
from torch import Tensor, nn

from flatlab.distributed import all_reduce_sum
from flatlab.errors import FlatlabError
from flatlab.evaluation import MODES, Forward, as_batches, check_choice, select_parameters, unwrap
from flatlab.hessian.products import BatchProducts

__all__ = ["LinearOperator", "DenseOperator", "HessianOperator", "MODES", "BACKENDS", "as_scipy"]

BACKENDS = ("auto", "forward", "double_backward")


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


class HessianOperator:
    """Matrix-free Hessian of the dataset-average loss of ``model`` on ``data``.

    Args:
        model: any ``nn.Module``; products run on the device of its parameters.
        loss_fn: ``loss_fn(outputs, targets)`` returning the *mean* loss over the batch
            (``nn.CrossEntropyLoss()``, ``nn.MSELoss()``, ...).
        data: one ``(x, y, *extra)`` batch or a re-iterable of batches (a list, a
            ``DataLoader``); ``x`` is a tensor or a tuple/list/dict of tensors handed to
            ``forward`` as one object, extra items are ignored (:mod:`flatlab.evaluation`).
            Batches are weighted by their size: ``H = sum_b (n_b / N) H_b``.
        params: which parameters ``w`` the Hessian is taken over; ``None`` (all with
            ``requires_grad``), ``"weights"`` (no bias-like parameters: none with at most one
            dimension, none of a normalisation layer), a list of names, or a predicate
            ``(name, param) -> bool``. The others are constants. The flat vector concatenates
            the chosen tensors in the model's order.
        mode: ``"eval"`` or ``"train"``: the module mode during every evaluation. The model's
            own modes (every submodule's) are restored afterwards. In ``"train"`` mode
            BatchNorm uses batch statistics, but the model's running statistics are never
            modified (the operator works on copies of all buffers).
        forward: ``forward(model, x) -> outputs`` in place of ``model(x)``, e.g.
            ``lambda m, x: m(**x).logits`` for a HuggingFace model fed dicts of tensors.
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

    Attention runs on PyTorch's twice-differentiable MATH kernel while products are formed
    (the user's kernel choice is restored after). Parameters nothing depends on give zero rows
    and columns, and so does the ``padding_idx`` row of an ``nn.Embedding`` (torch defines its
    gradient as zero: it is a constant). Sums over batches are
    accumulated in float64; a product returns the dtype of the vector it was given.

    >>> import torch
    >>> model = torch.nn.Linear(3, 1, bias=False).double()
    >>> x = torch.randn(8, 3, dtype=torch.float64)
    >>> op = HessianOperator(model, torch.nn.MSELoss(), (x, torch.zeros(8, 1, dtype=torch.float64)))
    >>> torch.allclose(op.matvec(torch.eye(3, dtype=torch.float64)), 2 * x.T @ x / 8)
    True
    """

    def __init__(self, model: nn.Module, loss_fn: Callable[[Any, Any], Tensor], data: Any, *,
                 params: Any = None, mode: str = "eval", forward: Forward | None = None,
                 distributed: bool = False, backend: str = "auto",
                 check_determinism: bool = False, chunk_size: int | str | None = "auto",
                 cache: bool | str = "auto", cache_bytes: int = 2**30) -> None:
        check_choice("mode", mode, MODES)
        check_choice("backend", backend, BACKENDS)
        if not (chunk_size is None or chunk_size == "auto"
                or (isinstance(chunk_size, int) and chunk_size >= 1)):
            raise FlatlabError(f"chunk_size={chunk_size!r} is not one of 'auto', None or a "
                               "positive int")
        if isinstance(chunk_size, int) and mode == "train":
            raise FlatlabError("chunk_size cannot be set in mode='train': BatchNorm statistics "
                               "depend on the batch, so batches are never split there")
        check_choice("cache", cache, ("auto", True, False))
        if cache is True and backend == "forward":
            raise FlatlabError("cache=True keeps double-backward graphs; it cannot be combined "
                               "with backend='forward'")
        if forward is not None and not callable(forward):
            raise TypeError(f"forward must be a callable forward(model, x), got "
                            f"{type(forward).__name__}")
        if distributed and not (torch.distributed.is_available()
                                and torch.distributed.is_initialized()):
            raise FlatlabError("distributed=True needs an initialised torch.distributed process "
                               "group (run under torchrun and call init_process_group first)")
        self.model = model = unwrap(model)
        self.loss_fn = loss_fn
        self.forward = forward
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
        self._batches = BatchProducts(model, loss_fn, as_batches(data), chosen, forward=forward,
                                      mode=mode, chunk_size=chunk_size, cache=cache,
                                      cache_bytes=cache_bytes)
        self._forward_failed = False
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
        return self._batches.graphs is not None

    def clear_cache(self) -> None:
        """Drop the cached graphs (they are rebuilt on the next product if caching applies)."""
        self._batches.clear_cache()

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

    def to_scipy(self) -> scipy.sparse.linalg.LinearOperator:
        """This operator as a ``scipy.sparse.linalg.LinearOperator`` (see :func:`as_scipy`)."""
        return as_scipy(self)

    def _reduce(self, total: Tensor, count: int) -> tuple[Tensor, int]:
        """Sum ``total`` and the sample count over ranks (one all-reduce)."""
        if self.distributed:
            packed = torch.cat([total.reshape(-1), total.new_tensor([float(count)])])
            all_reduce_sum(packed)
            total, count = packed[:-1].reshape(total.shape), int(round(packed[-1].item()))
        if count == 0:
            raise FlatlabError("data holds no samples")
        return total, count

    # ----------------------------------------------------------------- products
    def _products(self, block: Tensor) -> tuple[Tensor, int]:
        batches = self._batches
        if batches.use_cache(self.backend):
            graphs = batches.cached_graphs()
            if graphs is not None:
                return batches.from_graphs(graphs, block)
        if self.backend != "auto":
            return batches.streamed(block, self.backend)
        if block.shape[0] == 1 or self._forward_failed:
            return batches.streamed(block, "double_backward")
        try:
            return batches.streamed(block, "forward")
        except (RuntimeError, NotImplementedError) as err:
            warnings.warn(f"forward-mode AD failed on this model ({str(err)[:200]}); "
                          "HessianOperator uses backend='double_backward' instead",
                          stacklevel=3)
            self._forward_failed = True
            return batches.streamed(block, "double_backward")

    def matvec(self, v: Tensor) -> Tensor:
        """``H v`` for ``v`` of shape ``(P,)``, or ``H V`` for a block ``(P, b)`` in one pass.

        The product is computed in the parameters' dtype and summed over batches in float64;
        the result has ``v``'s shape and dtype and lives on the operator's device.
        """
        if v.ndim not in (1, 2) or v.shape[0] != self.size:
            raise FlatlabError(f"matvec expects shape ({self.size},) or ({self.size}, b), got "
                               f"{tuple(v.shape)}")
        block = v.reshape(self.size, -1).T.to(self.device, self.dtype).contiguous()
        with self._batches.evaluating():
            total, count = self._products(block)
        total, count = self._reduce(total, count)
        self.num_matvecs += block.shape[0]
        result = (total / count).T.to(v.dtype)
        return result.reshape(v.shape).contiguous()

    def loss_and_gradient(self) -> tuple[float, Tensor]:
        """Dataset-average loss and its gradient ``(P,)`` (float64 sums, returned in
        ``self.dtype``); summed over ranks when ``distributed``. Uses (and fills) the graph
        cache when caching applies."""
        with self._batches.evaluating():
            total, count = self._batches.loss_and_gradient(self.backend)
        total, count = self._reduce(total, count)
        total = total / count
        return float(total[-1]), total[:-1].to(self.dtype)

    def check_determinism(self, *, rtol: float | None = None) -> None:
        """Evaluate one product twice (never from the cache); raise :class:`FlatlabError` if
        they differ by more than ``rtol`` (relative, default ``sqrt(eps)`` of the dtype)."""
        generator = torch.Generator().manual_seed(20240611)
        probe = torch.randint(0, 2, (self.size,), generator=generator).to(self.device) * 2.0 - 1
        self._batches.bypass_cache = True
        try:
            first = self.matvec(probe.double())
            second = self.matvec(probe.double())
        finally:
            self._batches.bypass_cache = False
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


def as_scipy(op: LinearOperator) -> scipy.sparse.linalg.LinearOperator:
    """``op`` as a symmetric ``scipy.sparse.linalg.LinearOperator`` of shape ``(P, P)``:
    float64 NumPy in and out. ``matvec`` maps to ``op.matvec`` on a ``(P,)`` vector and
    ``matmat`` on a ``(P, b)`` block in one call (one pass over the data for all columns).

    >>> import numpy as np, scipy.sparse.linalg, torch
    >>> dense = DenseOperator(torch.diag(torch.tensor([3.0, 2.0, 1.0], dtype=torch.float64)))
    >>> scipy.sparse.linalg.eigsh(as_scipy(dense), k=1, which="LA")[0]
    array([3.])
    """

    def apply(v: np.ndarray) -> np.ndarray:
        tensor = torch.from_numpy(np.ascontiguousarray(v, dtype=np.float64)).to(op.device)
        return op.matvec(tensor).detach().to("cpu", torch.float64).numpy()

    return scipy.sparse.linalg.LinearOperator((op.size, op.size), matvec=apply, rmatvec=apply,
                                              matmat=apply, rmatmat=apply, dtype=np.float64)
