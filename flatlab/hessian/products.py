"""Sums of per-batch Hessian products, streamed or from cached gradient graphs.

:class:`BatchProducts` computes :math:`\\sum_b n_b H_b V` and :math:`\\sum_b n_b
(\\ell_b, \\nabla \\ell_b)` over one process's data; :class:`~flatlab.hessian.HessianOperator`
divides by :math:`N` (after summing over ranks). How a product is formed and why is in the
docstring of :mod:`flatlab.hessian.operator`.

Attention: PyTorch's fused CPU/GPU attention kernels have no second derivative (and no forward
mode), so every product runs under ``sdpa_kernel(SDPBackend.MATH)`` (:func:`math_attention`),
which restores the caller's choice afterwards. Any other operation without a second
derivative ends in one :class:`NotImplementedError` line that says what to do.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from flatlab.evaluation import (
    Batch,
    Forward,
    batch_rows,
    first_tensor,
    functional_outputs,
    iterate_batches,
    loss_at,
    module_mode,
)

# Elements (rows x activation size x vectors) one vmapped chunk may hold. Above this, CPUs fall
# out of cache and per-vector cost grows (measured: a CNN block of 8 costs 5.5x a gradient per
# vector at 256 images per chunk and 2.1x at 32). See ``BatchProducts._chunk_rows``.
_CHUNK_ELEMENTS = 2**22


@contextlib.contextmanager
def math_attention() -> Iterator[None]:
    """Scaled-dot-product attention on its twice-differentiable MATH path for the duration
    (the fused kernels have neither a double backward nor forward-mode AD)."""
    try:
        from torch.nn.attention import SDPBackend, sdpa_kernel
    except ImportError:  # torch < 2.3 has no kernel choice; nothing to select
        yield
        return
    with sdpa_kernel(SDPBackend.MATH):
        yield


@contextlib.contextmanager
def second_derivatives_required() -> Iterator[None]:
    """Turn autograd's "derivative for X is not implemented" into one actionable line."""
    try:
        yield
    except RuntimeError as err:
        found = re.search(r"derivative for (\S+) is not implemented", str(err))
        if found is None:
            raise
        raise NotImplementedError(
            f"a Hessian product needs the second derivative of every operation, and torch has "
            f"none for {found.group(1)}: use a twice-differentiable implementation of that "
            f"layer (HuggingFace: attn_implementation='eager')") from err


@dataclass
class _Graph:
    """One batch's gradient with its autograd graph kept (``create_graph=True``)."""

    leaves: list[Tensor]   # detached views of the selected parameters, requires_grad
    outputs: list[Tensor]  # gradients that depend on w (others add nothing to H)
    live: list[int]        # their positions among the selected parameters
    count: int             # samples in the batch
    loss: float
    gradient: Tensor       # flat, detached


class BatchProducts:
    """Per-batch losses, gradients and Hessian products of ``model`` on one process's data.

    Arguments are those of :class:`~flatlab.hessian.HessianOperator`, already checked;
    ``params`` are the selected ``(name, parameter)`` pairs.
    """

    def __init__(self, model: nn.Module, loss_fn: Callable[[Any, Any], Tensor],
                 batches: Iterable[Any], params: list[tuple[str, nn.Parameter]], *,
                 forward: Forward | None, mode: str, chunk_size: int | str | None,
                 cache: bool | str, cache_bytes: int) -> None:
        self.model, self.loss_fn, self.batches, self.forward = model, loss_fn, batches, forward
        self.mode, self.chunk_size, self.cache, self.cache_bytes = mode, chunk_size, cache, \
            cache_bytes
        self.names = [n for n, _ in params]
        self.params = [p for _, p in params]
        self.shapes = [p.shape for p in self.params]
        self.size = sum(s.numel() for s in self.shapes)
        self.dtype, self.device = self.params[0].dtype, self.params[0].device
        chosen = {id(p) for p in self.params}
        self._frozen = frozenset(n for n, p in model.named_parameters() if id(p) not in chosen)
        self._activations: tuple[int, int] | None = None  # (largest, total) per sample
        self.graphs: list[_Graph] | None = None
        self._graphs_state: tuple[int, ...] | None = None
        self._cache_too_big = False
        self.bypass_cache = False

    @contextlib.contextmanager
    def evaluating(self) -> Iterator[None]:
        """The requested module mode, autograd on (even inside ``no_grad`` or
        ``inference_mode``), twice-differentiable attention; all restored afterwards."""
        with module_mode(self.model, self.mode), torch.inference_mode(False), \
                torch.enable_grad(), math_attention(), second_derivatives_required():
            yield

    def batch_loss(self, params: dict[str, Tensor], batch: Batch) -> Tensor:
        """Mean loss of one batch as a function of the selected parameters. Frozen parameters
        enter as constants and buffers as fresh copies, so in-place updates (BatchNorm
        running statistics in train mode) never reach the model."""
        fixed = {n: t.detach() for n, t in self.model.named_parameters() if n in self._frozen}
        buffers = {n: b.clone() for n, b in self.model.named_buffers()}
        return loss_at(self.model, self.loss_fn, (params, fixed, buffers), batch,
                       self.forward)[0]

    def iterate(self) -> Iterator[Batch]:
        return iterate_batches(self.batches, self.device, for_autograd=True)

    def split(self, block: Tensor) -> list[Tensor]:
        """``(b, P)`` -> one ``(b, *shape)`` view per selected parameter."""
        b = block.shape[0]
        pieces = torch.split(block, [s.numel() for s in self.shapes], dim=1)
        return [t.reshape(b, *s) for t, s in zip(pieces, self.shapes, strict=True)]

    # ----------------------------------------------------------------- chunks of a batch
    def chunks(self, batch: Batch, width: int) -> Iterator[Batch]:
        rows = self._chunk_rows(batch.x, width)
        if rows >= batch.size:
            yield batch
            return
        for start in range(0, batch.size, rows):
            stop = min(start + rows, batch.size)
            yield Batch(batch_rows(batch.x, start, stop), batch_rows(batch.y, start, stop),
                        stop - start)

    def _chunk_rows(self, x: Any, width: int) -> int:
        """Rows per chunk so that ``rows * width * (largest activation per sample)`` stays below
        ``_CHUNK_ELEMENTS`` (eval mode, ``chunk_size="auto"``)."""
        if self.chunk_size is None or self.mode == "train":
            return 2**62
        if isinstance(self.chunk_size, int):
            return self.chunk_size
        largest, _ = self.activation_sizes(x)
        return max(1, _CHUNK_ELEMENTS // (width * largest))

    def activation_sizes(self, x: Any) -> tuple[int, int]:
        """Per sample: the largest output of any submodule, and the sum over leaf modules."""
        if self._activations is None:
            sizes = [(1, False)]

            def record(module: nn.Module, inputs: Any, output: Any) -> None:
                tensor = first_tensor(output)
                if tensor is not None:
                    sizes.append((tensor[:1].numel(), next(module.children(), None) is None))

            handles = [m.register_forward_hook(record) for m in self.model.modules()]
            try:
                with torch.no_grad(), self.evaluating():
                    fixed = {n: t.detach() for n, t in self.model.named_parameters()}
                    buffers = {n: b.clone() for n, b in self.model.named_buffers()}
                    functional_outputs(self.model, (fixed, buffers), batch_rows(x, 0, 1),
                                       self.forward)
            finally:
                for h in handles:
                    h.remove()
            self._activations = (max(n for n, _ in sizes), sum(n for n, leaf in sizes if leaf))
        return self._activations

    # ----------------------------------------------------------------- cached graphs
    def _state(self) -> tuple[int, ...]:
        return tuple(t._version for t in (*self.model.parameters(), *self.model.buffers()))

    def use_cache(self, backend: str) -> bool:
        if self.bypass_cache or self.cache is False or backend == "forward":
            return False
        return self.cache is True or (self.mode == "eval" and not self._cache_too_big)

    def clear_cache(self) -> None:
        self.graphs = self._graphs_state = None

    def build_graph(self, batch: Batch, create_graph: bool) -> _Graph:
        leaves = [p.detach().requires_grad_(True) for p in self.params]
        with torch.enable_grad():
            loss = self.batch_loss(dict(zip(self.names, leaves, strict=True)), batch)
            grads = torch.autograd.grad(loss, leaves, create_graph=create_graph,
                                        allow_unused=True, materialize_grads=True)
        live = [i for i, g in enumerate(grads) if g.requires_grad]
        gradient = torch.cat([g.detach().reshape(-1) for g in grads])
        return _Graph(leaves, [grads[i] for i in live], live, batch.size, float(loss.detach()),
                      gradient)

    def cached_graphs(self) -> list[_Graph] | None:
        """The graphs of all batches, (re)built if the model changed; ``None`` when
        ``cache="auto"`` finds they would not fit in ``cache_bytes``."""
        state = self._state()
        if self.graphs is not None and self._graphs_state == state:
            return self.graphs
        self.clear_cache()
        graphs, estimate = [], 0
        element = torch.finfo(self.dtype).bits // 8
        for batch in self.iterate():
            if self.cache == "auto":
                # saved tensors of forward + backward graph: ~4 copies of every activation
                estimate += 4 * batch.size * self.activation_sizes(batch.x)[1] * element
                if estimate > self.cache_bytes:
                    self._cache_too_big = True
                    return None
            graphs.append(self.build_graph(batch, create_graph=True))
        self.graphs, self._graphs_state = graphs, state
        return graphs

    def from_graphs(self, graphs: list[_Graph], block: Tensor) -> tuple[Tensor, int]:
        """``sum_batches n H_batch V`` from cached graphs: one second backward per vector
        (vmapping it with ``is_grads_batched`` measured 1.5x slower per vector)."""
        b = block.shape[0]
        tangents = self.split(block)
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
    def _hvp_forward(self, batch: Batch, tangents: list[Tensor]) -> list[Tensor]:
        primals = {n: p.detach() for n, p in zip(self.names, self.params, strict=True)}
        grad_fn = torch.func.grad(lambda p: self.batch_loss(p, batch))

        def hvp(t: dict[str, Tensor]) -> dict[str, Tensor]:
            return torch.func.jvp(grad_fn, (primals,), (t,))[1]

        named = dict(zip(self.names, tangents, strict=True))
        if tangents[0].shape[0] == 1:
            out = hvp({n: t[0] for n, t in named.items()})
            return [out[n].unsqueeze(0) for n in self.names]
        out = torch.func.vmap(hvp, randomness="same")(named)
        return [out[n] for n in self.names]

    def _hvp_double_backward(self, batch: Batch, tangents: list[Tensor]) -> list[Tensor]:
        graph = self.build_graph(batch, create_graph=True)
        b = tangents[0].shape[0]
        if not graph.outputs:
            return [torch.zeros(b, *s, dtype=self.dtype, device=self.device)
                    for s in self.shapes]
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

    def streamed(self, block: Tensor, backend: str) -> tuple[Tensor, int]:
        """``sum_chunks n_c H_c V`` (float64, shape ``(b, P)``) in one pass over the data."""
        b = block.shape[0]
        tangents = self.split(block)
        hvp = self._hvp_forward if backend == "forward" else self._hvp_double_backward
        total = torch.zeros(b, self.size, dtype=torch.float64, device=self.device)
        count = 0
        for batch in self.iterate():
            for chunk in self.chunks(batch, b):
                pieces = hvp(chunk, tangents)
                # zeros for unused parameters may come back without the block dimension
                flat = [p.expand(b, *s).reshape(b, -1) for p, s in zip(
                    pieces, self.shapes, strict=True)]
                total.add_(torch.cat(flat, dim=1), alpha=chunk.size)
                count += chunk.size
        return total, count

    def loss_and_gradient(self, backend: str) -> tuple[Tensor, int]:
        """``[sum_b n_b grad l_b, sum_b n_b l_b]`` (float64, ``(P + 1,)``) and ``N``; uses (and
        fills) the graph cache when caching applies."""
        total = torch.zeros(self.size + 1, dtype=torch.float64, device=self.device)
        count = 0
        graphs = self.cached_graphs() if self.use_cache(backend) else None
        if graphs is None:
            graphs = (self.build_graph(batch, create_graph=False) for batch in self.iterate())
        for graph in graphs:
            total[:-1].add_(graph.gradient, alpha=graph.count)
            total[-1] += graph.loss * graph.count
            count += graph.count
        return total, count
