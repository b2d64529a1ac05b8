"""Loss landscapes: directions in weight space, 1-D slices, 2-D grids and interpolation.

A slice evaluates the dataset-average loss and accuracy at points

    W(c) = W0 + sum_j c_j d_j

where ``W0`` is the model's state (parameters and buffers), ``d_j`` are directions (dicts
name -> tensor, missing names mean zero) and ``c`` are the point's coordinates. The loss is
``sum_b n_b * loss_b / N`` over the batches of ``data``.

The model itself is never copied, modified or moved: every point is evaluated with
:func:`torch.func.functional_call` on a dict of tensors, and several points at once under
:func:`torch.func.vmap` (falling back to a loop over points where a model cannot be vmapped).
Module training flags are set for the duration of a call and restored afterwards.

Directions (Li et al. 2018, "Visualizing the loss landscape of neural nets"):

- :func:`random_direction`: Gaussian direction, filter-normalised: each filter (slice along
  dim 0) of each weight is rescaled to the norm of the matching filter of the weight. Biases
  (parameters with <= 1 dimension) and normalisation-layer parameters (BatchNorm, LayerNorm,
  GroupNorm, InstanceNorm, RMSNorm) are zero unless ``include_bias_bn=True``, in which case
  each such tensor is rescaled as a whole to the norm of the parameter.
- :func:`eigenvector_direction`: a flat Hessian eigenvector split into a dict.
- :func:`interpolate`: the straight line ``(1 - a) A + a B`` between two states (buffers too).

BatchNorm: ``bn="stored"`` (default) evaluates with the running statistics stored in the
model (eval mode). ``bn="recompute"`` first recomputes them at every point from ``data``: one
pass with only the BatchNorm layers in train mode (everything else, e.g. dropout, stays in
eval mode), the running mean and unbiased variance set to the average over batches of each
batch's statistics. That is what ``torch.optim.swa_utils.update_bn`` computes (momentum=None,
cumulative average) on a copy of the model at that point. See :func:`recompute_bn_stats`.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence

import torch
from torch import Tensor, nn
from torch.func import functional_call, vmap

from flatlab import distributed as dist_helpers

__all__ = [
    "random_direction",
    "eigenvector_direction",
    "excluded_parameter_names",
    "evaluate_points",
    "slice_1d",
    "slice_2d",
    "interpolate",
    "recompute_bn_stats",
    "MODES",
    "BN_MODES",
]

MODES = ("eval", "train")
BN_MODES = ("stored", "recompute")
VECTORIZE = ("auto", "vmap", "loop")

LossFn = Callable[[Tensor, Tensor], Tensor]
Direction = Mapping[str, Tensor]

_NORM_TYPES: tuple[type, ...] = (
    nn.modules.batchnorm._NormBase,  # BatchNorm*d, SyncBatchNorm, InstanceNorm*d
    nn.LayerNorm,
    nn.GroupNorm,
    nn.LocalResponseNorm,
) + ((nn.RMSNorm,) if hasattr(nn, "RMSNorm") else ())

# Bytes of stacked parameters one vmapped chunk of points may hold (the auto chunk size).
_CHUNK_PARAM_BYTES = 256 * 2**20
_DEFAULT_CHUNK = 16


# --------------------------------------------------------------------------- directions


def excluded_parameter_names(model: nn.Module) -> set[str]:
    """Names of the parameters Li et al. leave out of random directions: biases (tensors with
    at most one dimension) and every parameter of a normalisation layer."""
    names = {name for name, p in model.named_parameters() if p.dim() <= 1}
    for module_name, module in model.named_modules():
        if isinstance(module, _NORM_TYPES):
            prefix = f"{module_name}." if module_name else ""
            names.update(prefix + name for name, _ in module.named_parameters(recurse=False))
    return names


def random_direction(model: nn.Module, *, generator: torch.Generator | None = None,
                     filter_normalize: bool = True,
                     include_bias_bn: bool = False) -> dict[str, Tensor]:
    """A Gaussian direction over every parameter of ``model`` (Li et al. 2018).

    One ``randn`` draw per parameter, in ``named_parameters()`` order, from ``generator`` (a
    CPU generator; ``None`` uses torch's global one), so the same generator state gives the
    same direction on every device and whatever the flags. With ``filter_normalize`` each
    filter ``d[i]`` of a weight with >= 2 dimensions is scaled to ``||w[i]|| / ||d[i]||``.
    Biases and normalisation-layer parameters (see :func:`excluded_parameter_names`) are zero
    unless ``include_bias_bn``, then scaled as a whole to ``||w|| / ||d||``. Parameters that
    do not require grad are zero. Returns detached tensors on each parameter's device.
    """
    excluded = excluded_parameter_names(model)
    direction: dict[str, Tensor] = {}
    for name, param in model.named_parameters():
        w = param.detach()
        draw_dtype = w.dtype if w.dtype in (torch.float32, torch.float64) else torch.float32
        d = torch.randn(w.shape, generator=generator, dtype=draw_dtype, device="cpu")
        d = d.to(device=w.device, dtype=w.dtype)
        if not param.requires_grad or (name in excluded and not include_bias_bn):
            d.zero_()
        elif filter_normalize:
            if w.dim() <= 1 or name in excluded:
                d.mul_(w.norm() / (d.norm() + 1e-10))
            else:
                w_norm = w.flatten(1).norm(dim=1)
                d_norm = d.flatten(1).norm(dim=1)
                d.mul_((w_norm / (d_norm + 1e-10)).view(-1, *([1] * (w.dim() - 1))))
        direction[name] = d
    return direction


def eigenvector_direction(op, vector: Tensor) -> dict[str, Tensor]:
    """Split a flat vector over ``op``'s parameters (``op.param_names``, ``op.param_shapes``,
    e.g. a column of ``top_eigenvalues(op).eigenvectors``) into a direction dict."""
    vector = torch.as_tensor(vector)
    if vector.dim() == 2 and vector.shape[1] == 1:
        vector = vector[:, 0]
    shapes = [torch.Size(s) for s in op.param_shapes]
    total = sum(math.prod(s) for s in shapes)
    if vector.dim() != 1 or vector.numel() != total:
        raise ValueError(f"vector of shape {tuple(vector.shape)} does not match the operator's "
                         f"{total} parameters")
    pieces = torch.split(vector.detach(), [math.prod(s) for s in shapes])
    return {name: piece.reshape(shape)
            for name, shape, piece in zip(op.param_names, shapes, pieces, strict=True)}


# --------------------------------------------------------------------------- data, modes


def _batches(data) -> Sequence | Iterable:
    """``(x, y)`` -> ``[(x, y)]``; anything else is an iterable of batches (re-iterated)."""
    if isinstance(data, tuple) and len(data) == 2 and isinstance(data[0], Tensor):
        return [data]
    if isinstance(data, Iterator):
        raise TypeError("data must be re-iterable (a list of batches, a DataLoader), "
                        "not a one-shot iterator")
    return data


@contextlib.contextmanager
def _modes(model: nn.Module, mode: str) -> Iterator[None]:
    """Put the model in ``mode`` ("eval", "train" or "bn-stats": only BatchNorm layers in train
    mode with momentum 1, so a forward pass stores each batch's statistics); restore after."""
    saved = [(m, m.training, getattr(m, "momentum", None)) for m in model.modules()]
    try:
        if mode == "bn-stats":
            model.eval()
            for m in _batchnorms(model):
                m.train()
                m.momentum = 1.0
        else:
            model.train(mode == "train")
        yield
    finally:
        for m, training, momentum in saved:
            m.training = training
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.momentum = momentum


def _batchnorms(model: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    return [m for m in model.modules()
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]


def _bn_buffer_names(model: nn.Module) -> dict[str, tuple[str, str, str]]:
    """BatchNorm module name -> (running_mean, running_var, num_batches_tracked) full names."""
    out = {}
    for module_name, m in model.named_modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats:
            prefix = f"{module_name}." if module_name else ""
            out[module_name] = (prefix + "running_mean", prefix + "running_var",
                                prefix + "num_batches_tracked")
    return out


# --------------------------------------------------------------------------- evaluation


class _Points:
    """Builds the state dicts for points ``base + sum_j c_j d_j`` (one or a stacked chunk)."""

    def __init__(self, model: nn.Module, directions: Sequence[Direction],
                 base: Mapping[str, Tensor] | None):
        params = {n: p.detach() for n, p in model.named_parameters()}
        buffers = {n: b for n, b in model.named_buffers()}
        known = params.keys() | buffers.keys()
        base = dict(base or {})
        for name, t in base.items():
            if name not in known:
                raise ValueError(f"base has {name!r}, which is not a parameter or buffer of the "
                                 "model")
            ref = params.get(name, buffers.get(name))
            if t.shape != ref.shape:
                raise ValueError(f"base[{name!r}] has shape {tuple(t.shape)}, the model's "
                                 f"{tuple(ref.shape)}")
        self.params = {n: base.get(n, p).detach().to(p.device) for n, p in params.items()}
        self.buffers = {n: base.get(n, b).detach().to(b.device) if b is not None else None
                        for n, b in buffers.items()}
        self.directions: list[dict[str, Tensor]] = []
        for j, d in enumerate(directions):
            conv = {}
            for name, t in d.items():
                if name not in known:
                    raise ValueError(f"direction {j} has {name!r}, which is not a parameter or "
                                     "buffer of the model")
                ref = self.params.get(name, self.buffers.get(name))
                if t.shape != ref.shape:
                    raise ValueError(f"direction {j}[{name!r}] has shape {tuple(t.shape)}, "
                                     f"the model's is {tuple(ref.shape)}")
                if not ref.is_floating_point():
                    continue
                conv[name] = t.detach().to(device=ref.device, dtype=ref.dtype)
            self.directions.append(conv)
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
                if n in out or b is None:
                    continue
                out[n] = b.unsqueeze(0).repeat(c, *([1] * b.dim())) if stacked else b.clone()
        return out


def _forward_stats(model: nn.Module, loss_fn: LossFn, params: Mapping[str, Tensor],
                   buffers: Mapping[str, Tensor], x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
    """Mean loss and number of correct predictions on one batch (NaN when not a classifier)."""
    outputs = functional_call(model, (dict(params), dict(buffers)), (x,), strict=False)
    loss = loss_fn(outputs, y)
    if outputs.dim() == 2 and y.dim() == 1 and not y.is_floating_point():
        correct = (outputs.argmax(dim=-1) == y).sum().to(torch.float64)
    else:
        correct = torch.full((), math.nan, dtype=torch.float64, device=outputs.device)
    return loss.detach(), correct


class _Evaluator:
    """Evaluates chunks of points on all batches, vmapped or one point at a time."""

    def __init__(self, model: nn.Module, loss_fn: LossFn, data, points: _Points, *, mode: str,
                 bn: str):
        self.model, self.loss_fn, self.points = model, loss_fn, points
        self.batches = _batches(data)
        self.mode, self.bn = mode, bn
        self.device = next(iter(points.params.values())).device if points.params else None
        self.bn_names = _bn_buffer_names(model) if bn == "recompute" else {}

    def _to_device(self, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        if self.device is None:
            return x, y
        return x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)

    # ---- BatchNorm statistics ---------------------------------------------------------
    def recomputed_buffers(self, coords: Tensor, stacked: bool) -> dict[str, Tensor]:
        """Buffers at the point(s) with BN running statistics recomputed from the data."""
        params = {**self.points.params, **self.points.params_at(coords, stacked)}
        buffers = self.points.buffers_at(coords, stacked, fresh=True)
        sums: dict[str, Tensor] = {}
        num_batches = 0
        run = self._vmapped(_forward_stats) if stacked else _forward_stats
        with torch.no_grad(), _modes(self.model, "bn-stats"):
            for x, y in self.batches:
                x, y = self._to_device(x, y)
                for names in self.bn_names.values():
                    for n in names[:2]:
                        buffers[n].zero_()  # momentum 1: the forward pass writes the batch stat
                run(self.model, self.loss_fn, params, buffers, x, y)
                for names in self.bn_names.values():
                    for n in names[:2]:
                        stat = buffers[n].to(torch.float64)
                        sums[n] = stat if n not in sums else sums[n] + stat
                num_batches += 1
        if num_batches == 0:
            raise ValueError("data has no batches")
        for mean_name, var_name, count_name in self.bn_names.values():
            for n in (mean_name, var_name):
                buffers[n] = (sums[n] / num_batches).to(buffers[n].dtype)
            buffers[count_name] = torch.full_like(buffers[count_name], num_batches)
        return buffers

    # ---- loss and accuracy ------------------------------------------------------------
    def _vmapped(self, fn):
        params_static = {n: p for n, p in self.points.params.items()
                         if n not in self.points.moving_params}

        def call(model, loss_fn, params, buffers, x, y):
            moving = {n: params[n] for n in self.points.moving_params}
            batched_buffers = {n: b for n, b in buffers.items() if b is not None
                               and (n in self.points.moving_buffers or self._fresh_buffers)}
            static_buffers = {n: b for n, b in buffers.items() if n not in batched_buffers}

            def one(p, b):
                return fn(model, loss_fn, {**params_static, **p}, {**static_buffers, **b}, x, y)

            return vmap(one, randomness="error")(moving, batched_buffers)

        return call

    @property
    def _fresh_buffers(self) -> bool:
        # train mode and BN recomputation need per-point buffers a forward pass may write to
        return self.mode == "train" or self.bn == "recompute"

    def sums(self, coords: Tensor, stacked: bool) -> tuple[Tensor, Tensor, int]:
        """Per-point ``sum_b n_b loss_b`` and correct counts (float64), and ``N``."""
        if self.bn == "recompute":
            buffers = self.recomputed_buffers(coords, stacked)
        else:
            buffers = {**self.points.buffers, **self.points.buffers_at(
                coords, stacked, fresh=self.mode == "train")}
        params = {**self.points.params, **self.points.params_at(coords, stacked)}
        run = self._vmapped(_forward_stats) if stacked else _forward_stats
        shape = (coords.shape[0],) if stacked else ()
        loss_sum = torch.zeros(shape, dtype=torch.float64)
        correct = torch.zeros(shape, dtype=torch.float64)
        count = 0
        with torch.no_grad(), _modes(self.model, self.mode):
            for x, y in self.batches:
                x, y = self._to_device(x, y)
                n = int(y.shape[0])
                loss, right = run(self.model, self.loss_fn, params, buffers, x, y)
                loss_sum += n * loss.to(torch.float64).cpu()
                correct += right.cpu()
                count += n
        if count == 0:
            raise ValueError("data has no examples")
        return loss_sum, correct, count


def _chunk_size(points: _Points, requested: int | None) -> int:
    if requested is not None:
        if requested < 1:
            raise ValueError(f"chunk_size must be >= 1, got {requested}")
        return requested
    moving_bytes = sum(points.params[n].numel() * points.params[n].element_size()
                       for n in points.moving_params)
    return max(1, min(_DEFAULT_CHUNK, _CHUNK_PARAM_BYTES // max(moving_bytes, 1)))


def evaluate_points(model: nn.Module, loss_fn: LossFn, data, coords, directions:
                    Sequence[Direction], *, base: Mapping[str, Tensor] | None = None,
                    mode: str = "eval", bn: str = "stored", chunk_size: int | None = None,
                    vectorize: str = "auto", distributed: bool = False,
                    progress: bool = False) -> dict[str, Tensor]:
    """Loss and accuracy at the points ``base + sum_j coords[p, j] * directions[j]``.

    ``coords``: shape ``(n, m)`` with ``m = len(directions)``. ``base``: tensors replacing the
    model's parameters/buffers (default: the model's own). ``data``: one ``(x, y)`` batch or a
    re-iterable of batches, moved to the model's device one batch at a time. Memory holds one
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
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if bn not in BN_MODES:
        raise ValueError(f"bn must be one of {BN_MODES}, got {bn!r}")
    if bn == "recompute" and mode == "train":
        raise ValueError('bn="recompute" only makes sense with mode="eval" (train mode '
                         "normalises with batch statistics)")
    if vectorize not in VECTORIZE:
        raise ValueError(f"vectorize must be one of {VECTORIZE}, got {vectorize!r}")
    coords = torch.as_tensor(coords, dtype=torch.float64).cpu()
    if coords.dim() != 2 or coords.shape[1] != len(directions):
        raise ValueError(f"coords must have shape (n, {len(directions)}), got "
                         f"{tuple(coords.shape)}")
    points = _Points(model, directions, base)
    evaluator = _Evaluator(model, loss_fn, data, points, mode=mode, bn=bn)
    n = coords.shape[0]
    indices = list(range(n))
    if distributed:
        if not dist_helpers.is_initialized():
            raise ValueError("distributed=True needs an initialised torch.distributed group")
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


def _progress_bar(total: int, enabled: bool):
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc="landscape", unit="pt", leave=False)


# --------------------------------------------------------------------------- slices


def slice_1d(model: nn.Module, loss_fn: LossFn, data, direction: Direction, alphas, *,
             mode: str = "eval", bn: str = "stored", **kwargs) -> dict[str, Tensor]:
    """Loss and accuracy along ``W + alpha d`` for each alpha in ``alphas``.

    Returns ``{"alphas", "loss", "accuracy"}`` (float64 CPU tensors). Extra keyword arguments
    (``chunk_size``, ``vectorize``, ``distributed``, ``progress``, ``base``) go to
    :func:`evaluate_points`.
    """
    alphas = torch.as_tensor(alphas, dtype=torch.float64).reshape(-1)
    result = evaluate_points(model, loss_fn, data, alphas[:, None], [direction], mode=mode,
                             bn=bn, **kwargs)
    return {"alphas": alphas, **result}


def slice_2d(model: nn.Module, loss_fn: LossFn, data, dir_x: Direction, dir_y: Direction,
             alphas, betas, *, mode: str = "eval", bn: str = "stored",
             **kwargs) -> dict[str, Tensor]:
    """Loss and accuracy on the grid ``W + alpha d_x + beta d_y``.

    Returns ``{"alphas", "betas", "loss", "accuracy"}`` with ``loss[i, j]`` at
    ``(alphas[i], betas[j])``.
    """
    alphas = torch.as_tensor(alphas, dtype=torch.float64).reshape(-1)
    betas = torch.as_tensor(betas, dtype=torch.float64).reshape(-1)
    grid_a, grid_b = torch.meshgrid(alphas, betas, indexing="ij")
    coords = torch.stack([grid_a.reshape(-1), grid_b.reshape(-1)], dim=1)
    result = evaluate_points(model, loss_fn, data, coords, [dir_x, dir_y], mode=mode, bn=bn,
                             **kwargs)
    shape = (len(alphas), len(betas))
    return {"alphas": alphas, "betas": betas, "loss": result["loss"].reshape(shape),
            "accuracy": result["accuracy"].reshape(shape)}


def interpolate(model: nn.Module, state_a: Mapping[str, Tensor], state_b: Mapping[str, Tensor],
                loss_fn: LossFn, data, alphas, *, mode: str = "eval", bn: str = "stored",
                **kwargs) -> dict[str, Tensor]:
    """Loss and accuracy along ``(1 - alpha) A + alpha B`` between two states of ``model``'s
    architecture (``state_dict``-like: parameters and buffers). Floating-point buffers (BN
    running statistics) are interpolated too; integer ones are taken from ``A``. Computed as
    ``(1 - alpha) * A + alpha * B`` so alpha = 0 and 1 give exactly ``A`` and ``B``.
    """
    names = [n for n, _ in model.named_parameters()] + [n for n, b in model.named_buffers()
                                                          if b is not None]
    for label, state in (("state_a", state_a), ("state_b", state_b)):
        missing = [n for n in names if n not in state]
        if missing:
            raise ValueError(f"{label} lacks {', '.join(missing[:5])}"
                             + (" ..." if len(missing) > 5 else ""))
    floating = [n for n in names if state_a[n].is_floating_point()]
    base = {n: (torch.zeros_like(state_a[n]) if n in floating else state_a[n]) for n in names}
    dir_a = {n: state_a[n] for n in floating}
    dir_b = {n: state_b[n] for n in floating}
    alphas = torch.as_tensor(alphas, dtype=torch.float64).reshape(-1)
    coords = torch.stack([1 - alphas, alphas], dim=1)
    result = evaluate_points(model, loss_fn, data, coords, [dir_a, dir_b], base=base, mode=mode,
                             bn=bn, **kwargs)
    return {"alphas": alphas, **result}


def recompute_bn_stats(model: nn.Module, data, *, direction: Direction | None = None,
                       alpha: float = 0.0,
                       base: Mapping[str, Tensor] | None = None) -> dict[str, Tensor]:
    """BatchNorm running statistics at ``base + alpha * direction`` recomputed from ``data``,
    as ``bn="recompute"`` uses them; the model is not changed.

    Equal to ``torch.optim.swa_utils.update_bn`` on a copy of the model at that point (with
    only the BatchNorm layers in train mode): running mean and unbiased variance averaged over
    batches, ``num_batches_tracked`` = number of batches. Returns every buffer of the model.
    """
    points = _Points(model, [direction or {}], base)
    evaluator = _Evaluator(model, lambda out, y: out.sum() * 0, data, points, mode="eval",
                           bn="recompute")
    buffers = evaluator.recomputed_buffers(torch.tensor([float(alpha)], dtype=torch.float64),
                                           stacked=False)
    return {**{n: b for n, b in points.buffers.items() if b is not None}, **buffers}
