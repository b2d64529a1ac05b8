"""Loss and accuracy at points ``W(c) = W0 + sum_j c_j d_j`` of weight space.

``W0`` is the model's state (parameters and buffers) or a given ``base``, ``d_j`` are
directions (dicts name -> tensor, missing names mean zero). The loss is
``sum_b n_b * loss_b / N`` over the batches of ``data`` (:mod:`flatlab.evaluation`).

The model itself is never copied, modified or moved: every point is evaluated with
:func:`torch.func.functional_call` on a dict of tensors, and several points at once under
:func:`torch.func.vmap` (falling back to a loop over points where a model cannot be vmapped).
Module training flags are set for the duration of a call and restored afterwards.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import vmap

from flatlab import distributed as dist_helpers
from flatlab.errors import FlatlabError
from flatlab.evaluation import (
    MODES,
    Batch,
    Forward,
    as_batches,
    batchnorm_layers,
    check_choice,
    iterate_batches,
    loss_at,
    module_mode,
)

__all__ = ["evaluate_points", "BN_MODES", "VECTORIZE"]

BN_MODES = ("stored", "recompute")
VECTORIZE = ("auto", "vmap", "loop")

LossFn = Callable[[Any, Any], Tensor]
Direction = Mapping[str, Tensor]

# Bytes of stacked parameters one vmapped chunk of points may hold (the auto chunk size).
_CHUNK_PARAM_BYTES = 256 * 2**20
_DEFAULT_CHUNK = 16


def _bn_buffer_names(model: nn.Module) -> dict[str, tuple[str, str, str]]:
    """BatchNorm module name -> (running_mean, running_var, num_batches_tracked) full names."""
    out = {}
    for module_name, _ in batchnorm_layers(model):
        prefix = f"{module_name}." if module_name else ""
        out[module_name] = (prefix + "running_mean", prefix + "running_var",
                            prefix + "num_batches_tracked")
    return out


def _check_tensors(label: str, tensors: Mapping[str, Tensor],
                   reference: Mapping[str, Tensor]) -> None:
    for name, t in tensors.items():
        if name not in reference:
            raise FlatlabError(f"{label} has {name!r}, which is not a parameter or buffer of "
                               "the model")
        if t.shape != reference[name].shape:
            raise FlatlabError(f"{label}[{name!r}] has shape {tuple(t.shape)}, the model's is "
                               f"{tuple(reference[name].shape)}")


class _Points:
    """Builds the state dicts for points ``base + sum_j c_j d_j`` (one or a stacked chunk)."""

    def __init__(self, model: nn.Module, directions: Sequence[Direction],
                 base: Mapping[str, Tensor] | None):
        params = {n: p.detach() for n, p in model.named_parameters()}
        buffers = dict(model.named_buffers())
        base = dict(base or {})
        _check_tensors("base", base, {**params, **buffers})
        self.params = {n: base.get(n, p).detach().to(p.device) for n, p in params.items()}
        self.buffers = {n: base.get(n, b).detach().to(b.device) for n, b in buffers.items()}
        known = {**self.params, **self.buffers}
        self.directions: list[dict[str, Tensor]] = []
        for j, d in enumerate(directions):
            _check_tensors(f"direction {j}", d, known)
            self.directions.append({
                name: t.detach().to(device=known[name].device, dtype=known[name].dtype)
                for name, t in d.items() if known[name].is_floating_point()})
        moving = set().union(*self.directions) if self.directions else set()
        self.moving_params = [n for n in self.params if n in moving]
        self.moving_buffers = [n for n in self.buffers if n in moving]

    def _combine(self, name: str, base: Tensor, coords: Tensor, stacked: bool) -> Tensor:
        out = base.unsqueeze(0) if stacked else base
        for j, direction in enumerate(self.directions):
            d = direction.get(name)
            if d is None:
                continue
            if stacked:
                c = coords[:, j].to(device=d.device, dtype=d.dtype)
                out = out + c.view(-1, *([1] * d.dim())) * d
            else:
                out = out + float(coords[j]) * d
        return out

    def params_at(self, coords: Tensor, stacked: bool) -> dict[str, Tensor]:
        """Moving parameters at ``coords`` (shape (m,), or (c, m) stacked along dim 0)."""
        return {n: self._combine(n, self.params[n], coords, stacked) for n in self.moving_params}

    def buffers_at(self, coords: Tensor, stacked: bool, *, fresh: bool) -> dict[str, Tensor]:
        """Buffers that move with the point; with ``fresh`` every buffer as a new tensor (so a
        train-mode forward may update it in place), stacked ``c`` times when ``stacked``."""
        out = {n: self._combine(n, self.buffers[n], coords, stacked)
               for n in self.moving_buffers}
        if fresh:
            c = coords.shape[0] if stacked else None
            for n, b in self.buffers.items():
                if n not in out:
                    out[n] = b.unsqueeze(0).repeat(c, *([1] * b.dim())) if stacked else b.clone()
        return out


def _forward_stats(model: nn.Module, loss_fn: LossFn, forward: Forward | None,
                   params: Mapping[str, Tensor], buffers: Mapping[str, Tensor],
                   batch: Batch) -> tuple[Tensor, Tensor]:
    """Mean loss and number of correct predictions on one batch (NaN when not a classifier)."""
    loss, outputs = loss_at(model, loss_fn, (dict(params), dict(buffers)), batch, forward)
    y = batch.y
    if (isinstance(outputs, Tensor) and outputs.dim() == 2 and isinstance(y, Tensor)
            and y.dim() == 1 and not y.is_floating_point()):
        correct = (outputs.argmax(dim=-1) == y).sum().to(torch.float64)
    else:
        correct = torch.full((), math.nan, dtype=torch.float64, device=loss.device)
    return loss.detach(), correct


class _Evaluator:
    """Evaluates chunks of points on all batches, vmapped or one point at a time."""

    def __init__(self, model: nn.Module, loss_fn: LossFn, data: Any, points: _Points, *,
                 mode: str, bn: str, forward: Forward | None = None):
        self.model, self.loss_fn, self.points, self.forward = model, loss_fn, points, forward
        self.batches: Iterable[Any] = as_batches(data)
        self.mode, self.bn = mode, bn
        self.device = next(iter(points.params.values())).device if points.params else None
        self.bn_names = _bn_buffer_names(model) if bn == "recompute" else {}

    def _run(self, stacked: bool) -> Callable[..., tuple[Tensor, Tensor]]:
        """``run(params, buffers, batch)``: one point, or a stacked chunk under vmap."""
        def one(params, buffers, batch):
            return _forward_stats(self.model, self.loss_fn, self.forward, params, buffers, batch)

        if not stacked:
            return one
        params_static = {n: p for n, p in self.points.params.items()
                         if n not in self.points.moving_params}

        def call(params, buffers, batch):
            moving = {n: params[n] for n in self.points.moving_params}
            batched_buffers = {n: b for n, b in buffers.items()
                               if n in self.points.moving_buffers or self._fresh_buffers}
            static_buffers = {n: b for n, b in buffers.items() if n not in batched_buffers}

            def at(p, b):
                return one({**params_static, **p}, {**static_buffers, **b}, batch)

            return vmap(at, randomness="error")(moving, batched_buffers)

        return call

    @property
    def _fresh_buffers(self) -> bool:
        # train mode and BN recomputation need per-point buffers a forward pass may write to
        return self.mode == "train" or self.bn == "recompute"

    # ---- BatchNorm statistics ---------------------------------------------------------
    def recomputed_buffers(self, coords: Tensor, stacked: bool) -> dict[str, Tensor]:
        """Buffers at the point(s) with BN running statistics recomputed from the data."""
        params = {**self.points.params, **self.points.params_at(coords, stacked)}
        buffers = self.points.buffers_at(coords, stacked, fresh=True)
        sums: dict[str, Tensor] = {}
        num_batches = 0
        run = self._run(stacked)
        with torch.no_grad(), module_mode(self.model, "bn-stats"):
            for batch in iterate_batches(self.batches, self.device):
                for names in self.bn_names.values():
                    for n in names[:2]:
                        buffers[n].zero_()  # momentum 1: the forward pass writes the batch stat
                run(params, buffers, batch)
                for names in self.bn_names.values():
                    for n in names[:2]:
                        stat = buffers[n].to(torch.float64)
                        sums[n] = stat if n not in sums else sums[n] + stat
                num_batches += 1
        if num_batches == 0:
            raise FlatlabError("data has no batches")
        for mean_name, var_name, count_name in self.bn_names.values():
            for n in (mean_name, var_name):
                buffers[n] = (sums[n] / num_batches).to(buffers[n].dtype)
            buffers[count_name] = torch.full_like(buffers[count_name], num_batches)
        return buffers

    # ---- loss and accuracy ------------------------------------------------------------
    def sums(self, coords: Tensor, stacked: bool) -> tuple[Tensor, Tensor, int]:
        """Per-point ``sum_b n_b loss_b`` and correct counts (float64), and ``N``."""
        if self.bn == "recompute":
            buffers = self.recomputed_buffers(coords, stacked)
        else:
            buffers = {**self.points.buffers, **self.points.buffers_at(
                coords, stacked, fresh=self.mode == "train")}
        params = {**self.points.params, **self.points.params_at(coords, stacked)}
        run = self._run(stacked)
        shape = (coords.shape[0],) if stacked else ()
        loss_sum = torch.zeros(shape, dtype=torch.float64)
        correct = torch.zeros(shape, dtype=torch.float64)
        count = 0
        with torch.no_grad(), module_mode(self.model, self.mode):
            for batch in iterate_batches(self.batches, self.device):
                loss, right = run(params, buffers, batch)
                loss_sum += batch.size * loss.to(torch.float64).cpu()
                correct += right.cpu()
                count += batch.size
        if count == 0:
            raise FlatlabError("data holds no samples")
        return loss_sum, correct, count


def _chunk_size(points: _Points, requested: int | None) -> int:
    if requested is not None:
        if not (isinstance(requested, int) and requested >= 1):
            raise FlatlabError(f"chunk_size={requested!r} is not one of None or a positive int")
        return requested
    moving_bytes = sum(points.params[n].numel() * points.params[n].element_size()
                       for n in points.moving_params)
    return max(1, min(_DEFAULT_CHUNK, _CHUNK_PARAM_BYTES // max(moving_bytes, 1)))


def evaluate_points(model: nn.Module, loss_fn: LossFn, data: Any, coords: Any,
                    directions: Sequence[Direction], *, base: Mapping[str, Tensor] | None = None,
                    mode: str = "eval", bn: str = "stored", forward: Forward | None = None,
                    chunk_size: int | None = None, vectorize: str = "auto",
                    distributed: bool = False, progress: bool = False) -> dict[str, Tensor]:
    """Loss and accuracy at the points ``base + sum_j coords[p, j] * directions[j]``.

    ``coords``: shape ``(n, m)`` with ``m = len(directions)``. ``base``: tensors replacing the
    model's parameters/buffers (default: the model's own). ``data``: one ``(x, y, *extra)``
    batch or a re-iterable of batches, moved to the model's device one batch at a time;
    ``forward(model, x)`` replaces ``model(x)`` (:mod:`flatlab.evaluation`). Memory holds one
    batch's activations times ``chunk_size`` points (auto: up to 16, at most 256 MiB of
    stacked parameters). ``vectorize``: "vmap" evaluates a chunk of points in one vmapped pass,
    "loop" one point at a time, "auto" uses vmap for models without convolutions (where it
    measured faster) and falls back to the loop where the model cannot be vmapped (e.g.
    dropout in train mode). Both give the same numbers up to float rounding.

    ``distributed=True`` (torch.distributed initialised): rank r evaluates points r, r + W, ...
    and the results are summed across ranks, so every rank returns all points; each rank must
    be given the same ``data``.

    Returns ``{"loss": (n,), "accuracy": (n,)}`` as float64 CPU tensors; accuracy is NaN when
    the outputs are not class scores ``(batch, classes)`` with integer targets.
    """
    check_choice("mode", mode, MODES)
    check_choice("bn", bn, BN_MODES)
    if bn == "recompute" and mode == "train":
        raise FlatlabError("bn='recompute' only makes sense with mode='eval' (train mode "
                           "normalises with batch statistics)")
    check_choice("vectorize", vectorize, VECTORIZE)
    if forward is not None and not callable(forward):
        raise TypeError(f"forward must be a callable forward(model, x), got "
                        f"{type(forward).__name__}")
    coords = torch.as_tensor(coords, dtype=torch.float64).cpu()
    if coords.dim() != 2 or coords.shape[1] != len(directions):
        raise FlatlabError(f"coords must have shape (n, {len(directions)}), got "
                           f"{tuple(coords.shape)}")
    if distributed and not dist_helpers.is_initialized():
        raise FlatlabError("distributed=True needs an initialised torch.distributed process "
                           "group (run under torchrun and call init_process_group first)")
    points = _Points(model, directions, base)
    evaluator = _Evaluator(model, loss_fn, data, points, mode=mode, bn=bn, forward=forward)
    n = coords.shape[0]
    indices = list(range(n))
    if distributed:
        indices = indices[dist_helpers.rank()::dist_helpers.world_size()]

    loss_sum = torch.zeros(n, dtype=torch.float64)
    correct = torch.zeros(n, dtype=torch.float64)
    count = 0
    chunk = _chunk_size(points, chunk_size)
    use_vmap = bool(points.moving_params) and (
        vectorize == "vmap" or (vectorize == "auto" and not _has_convolution(model)))
    bar = _progress_bar(len(indices), progress)
    position = 0
    while position < len(indices):
        idx = indices[position:position + chunk] if use_vmap else indices[position:position + 1]
        if use_vmap:
            try:
                s, c, count = evaluator.sums(coords[idx], stacked=True)
            except Exception:
                if vectorize == "vmap":
                    raise
                use_vmap = False  # e.g. an op without a batching rule, or dropout in train mode
                continue
        else:
            s, c, count = evaluator.sums(coords[idx[0]], stacked=False)
        loss_sum[idx] = s
        correct[idx] = c
        position += len(idx)
        if bar is not None:
            bar.update(len(idx))
    if bar is not None:
        bar.close()

    if distributed:
        device = evaluator.device or torch.device("cpu")
        # each point was evaluated on exactly one rank; the others hold 0 for it
        packed = dist_helpers.all_reduce_sum(torch.stack([loss_sum, correct]).to(device))
        loss_sum, correct = packed[0].cpu(), packed[1].cpu()
        total = torch.tensor([float(count)], dtype=torch.float64, device=device)
        count = int(dist_helpers.all_reduce_max(total).item())  # a rank without points has 0
    if count == 0:
        return {"loss": torch.full((n,), math.nan, dtype=torch.float64),
                "accuracy": torch.full((n,), math.nan, dtype=torch.float64)}
    return {"loss": loss_sum / count, "accuracy": correct / count}


def _has_convolution(model: nn.Module) -> bool:
    # vmap turns a convolution with per-point weights into a grouped convolution, which on CPU
    # measured 1.1-3x slower than a loop over points (ResNet-8); linear layers batch well.
    return any(isinstance(m, nn.modules.conv._ConvNd) for m in model.modules())


def _progress_bar(total: int, enabled: bool) -> Any:
    if not enabled:
        return None
    from tqdm.auto import tqdm  # optional: only imported when a bar is asked for

    return tqdm(total=total, desc="landscape", unit="pt", leave=False)
