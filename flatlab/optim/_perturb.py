"""Shared mechanics of the perturbation optimizers (NSO, SAM, ASAM, RWP).

Every method here evaluates the gradient of the *same* minibatch at a few points near the
current weights ``W`` and hands a weighted sum of those gradients to an ordinary base optimizer
(SGD, Adam, ...). Only *where* the points lie and *how* the gradients are weighted differ
between methods; everything else lives once in :class:`PerturbationOptimizer`:

* the base optimizer is built on the very same ``param_groups`` dicts, so learning-rate
  schedulers, ``zero_grad()`` and per-group hyperparameters act on both at once;
* ``W`` is saved into a copy before the first move and every move starts from that copy
  (``p = W + delta``); the exact ``W`` is restored by ``copy_``, never by subtraction;
* one closure call per pass (LBFGS convention), its gradient added with a weight to a sum that
  becomes ``p.grad`` for the base step;
* noise comes from the optimizer's own ``torch.Generator`` (data order, dropout and the global
  RNG are untouched; see ``_noise.py``); its state travels in ``state_dict()`` as a uint8
  tensor;
* with ``model=`` given: the model's buffers (BatchNorm running statistics) keep the values
  left by the *first* pass of each step; under ``DistributedDataParallel`` every pass runs in
  ``no_sync()`` and the summed gradient is averaged over ranks by one all-reduce per step;
* with ``scaler=`` (a ``torch.amp.GradScaler``): mixed precision, see below.

Mixed precision (fp16 autocast with a ``GradScaler``). The closure scales as usual
(``scaler.scale(loss).backward()``) and the step is ``optimizer.step(closure, scaler=scaler)``
followed by the usual ``scaler.update()``. The scaled gradients of the passes are summed as
they are (the scale is the same for every pass of a step) and ``scaler.step(base_optimizer)``
unscales the sum once, checks it for inf/NaN and skips the base step if it finds any; ``W``
is restored from the saved copy before that, so a skipped step leaves ``W`` bit-exact and
``scaler.update()`` lowers the scale. A pass whose gradient is not in the sum (SAM's ascent
pass) is unscaled on its own (a copy) for the direction it defines, and a non-finite value
in it is carried into the sum as NaN so that the one check sees it.
``scaler.step(optimizer, closure)`` cannot work for any closure optimizer (the scaler would
unscale the gradients before the closure has computed them): it raises a ``TypeError``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.optim import Optimizer

from flatlab.optim._noise import NOISE_TYPES, noise_generator, scale_noise, standard_normals

__all__ = ["NOISE_TYPES", "Closure", "PerturbationOptimizer"]

Closure = Callable[[], Any]


class PerturbationOptimizer(Optimizer):
    """Base class of flatlab's perturbation optimizers (see the module docstring).

    A subclass sets its hyperparameters, calls ``super().__init__`` and writes ``step`` with::

        with self._perturbation_step(scaler):     # save W; at the end restore W, base step
            loss = self._evaluate(closure, weight)    # one pass at the current point
            grads = self._pass_gradients()        # that pass's gradient (averaged over ranks)
            self._move_to(deltas, sign)           # p = W + sign * delta, from the saved copy
    """

    #: hyperparameters shared by all groups; saved in ``state_dict()["flatlab"]``
    _global_hyperparameters: tuple[str, ...] = ()
    #: makes ``GradScaler.step(optimizer, closure)`` call ``step`` without unscaling first, so
    #: that ``step`` can refuse it with a message instead of stepping on stale gradients
    _step_supports_amp_scaling = True

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        base_optimizer: type[Optimizer],
        defaults: dict[str, Any],
        base_kwargs: dict[str, Any],
        *,
        model: nn.Module | None = None,
        uses_noise: bool = False,
        generator: torch.Generator | None = None,
        seed: int | None = None,
        independent_noise: bool = False,
    ) -> None:
        super().__init__(params, defaults)
        self.base_optimizer = base_optimizer(self.param_groups, **base_kwargs)
        self.param_groups = self.base_optimizer.param_groups  # the same dicts: shared
        self.state = self.base_optimizer.state
        self.defaults.update(self.base_optimizer.defaults)
        self.model = model
        self._ddp = isinstance(model, nn.parallel.DistributedDataParallel)
        self.generator = (
            self._make_generator(generator, seed, independent_noise) if uses_noise else None
        )
        self._saved: list[Tensor] | None = None

    # ----------------------------------------------------------------- construction helpers
    def _check_group(self, group: dict[str, Any]) -> None:
        """Validate one parameter group's method hyperparameters (``ValueError``)."""

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        super().add_param_group(param_group)
        self._check_group(self.param_groups[-1])

    def _make_generator(
        self, generator: torch.Generator | None, seed: int | None, independent_noise: bool
    ) -> torch.Generator:
        if generator is not None:
            if seed is not None or independent_noise:
                raise ValueError("pass either generator= or seed=/independent_noise=, not both")
            return generator
        device = self.param_groups[0]["params"][0].device
        rank = None
        if independent_noise:
            rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
        return noise_generator(torch.initial_seed() if seed is None else seed, device, rank=rank)

    @property
    def gradient_evaluations(self) -> int:
        """Forward/backward passes (closure calls) per ``step()``."""
        raise NotImplementedError

    @staticmethod
    def _require_closure(closure: Closure | None, name: str) -> Closure:
        if closure is None:
            raise ValueError(
                f"{name}.step() needs a closure that zeroes the gradients, computes the loss on "
                "the current batch, calls backward() and returns the loss"
            )
        return closure

    # ----------------------------------------------------------------- the step machinery
    def _trainable(self) -> Iterator[tuple[dict[str, Any], Tensor]]:
        for group in self.param_groups:
            for p in group["params"]:
                if p.requires_grad:
                    yield group, p

    def _check_scaler(self, scaler: torch.amp.GradScaler | None) -> torch.amp.GradScaler | None:
        """The enabled scaler or ``None``; refuses ``GradScaler.step(optimizer, closure)``."""
        if hasattr(self, "found_inf"):  # set by GradScaler.step around its call of step()
            del self.found_inf
            if hasattr(self, "grad_scale"):
                del self.grad_scale
            raise TypeError(
                f"scaler.step({type(self).__name__}, closure) cannot unscale gradients that "
                "the closure has not computed yet: call optimizer.step(closure, scaler=scaler) "
                "and then scaler.update()")
        if scaler is not None and not isinstance(scaler, torch.amp.GradScaler):
            raise TypeError(f"scaler must be a torch.amp.GradScaler, got {type(scaler).__name__}")
        return scaler if scaler is not None and scaler.is_enabled() else None

    @contextlib.contextmanager
    def _perturbation_step(self, scaler: torch.amp.GradScaler | None = None) -> Iterator[None]:
        self._scaler = self._check_scaler(scaler)
        self._inv_scale: float | None = None
        self._nonfinite: Tensor | None = None  # sum of norms of gradients left out of the sum
        self._params = [p for _, p in self._trainable()]
        self._saved = [p.detach().clone() for p in self._params]
        self._at_saved = True  # the parameters hold exactly W
        # sum_j w_j g_j is kept as w_1 * (g_1 + sum_{j>1} (w_j / w_1) g_j): no copy of g_1
        self._grad_sum: list[Tensor | None] = [None] * len(self._params)
        self._sum_scale: float | None = None
        self._buffers = list(self.model.buffers()) if self.model is not None else []
        self._buffer_snapshot: list[Tensor] | None = None
        try:
            yield
            torch._foreach_copy_(self._params, self._saved)  # W exactly, also after errors
            grads = self._grad_sum
            present = [g for g in grads if g is not None]
            if self._sum_scale is not None and self._sum_scale != 1.0:
                torch._foreach_mul_(present, self._sum_scale)
            if self._nonfinite is not None and present:  # + 0 if finite, + NaN otherwise
                min(present, key=Tensor.numel).add_(self._nonfinite * 0.0)
            grads = self._average_over_ranks(grads) if self._ddp else grads
            for p, g in zip(self._params, grads, strict=True):
                p.grad = g
            if self._scaler is None:
                self.base_optimizer.step()
            else:  # unscale once, skip the step on inf/NaN, record it for scaler.update()
                self._scaler_step()
        except BaseException:
            torch._foreach_copy_(self._params, self._saved)
            raise
        finally:
            self._saved = self._grad_sum = self._buffer_snapshot = self._sum_scale = None
            self._scaler = self._nonfinite = None
            self._params, self._buffers = [], []

    def _scaler_step(self) -> None:
        assert self._scaler is not None
        try:
            self._scaler.step(self.base_optimizer)
        except RuntimeError as err:
            if "update()" not in str(err):
                raise
            raise RuntimeError(f"{err} Call scaler.update() after every "
                               "optimizer.step(closure, scaler=scaler).") from err

    def _saved_weights(self) -> list[Tensor]:
        """``W`` as saved at the start of the step (read-only), aligned with the passes."""
        assert self._saved is not None
        return self._saved

    def _move_to(self, deltas: list[Tensor | None], sign: float = 1.0) -> None:
        """Set every parameter to ``W + sign * delta`` (``None`` delta: ``W``)."""
        if not self._at_saved:
            torch._foreach_copy_(self._params, self._saved)
        self._at_saved = False
        moved = [(p, d) for p, d in zip(self._params, deltas, strict=True) if d is not None]
        if moved:
            params, deltas = zip(*moved, strict=True)
            torch._foreach_add_(list(params), list(deltas), alpha=sign)

    def _evaluate(self, closure: Closure, weight: float) -> Any:
        """Run one pass at the current point and add ``weight * grad`` to the step's sum."""
        for p in self._params:
            p.grad = None
        sync = self.model.no_sync() if self._ddp else contextlib.nullcontext()
        with sync, torch.enable_grad():
            loss = closure()
        if self._buffers:
            if self._buffer_snapshot is None:
                self._buffer_snapshot = [b.detach().clone() for b in self._buffers]
            else:
                for buffer, value in zip(self._buffers, self._buffer_snapshot, strict=True):
                    buffer.copy_(value)
        if weight == 0.0:
            if self._scaler is not None:  # not in the sum: remember whether it was finite
                grads = [p.grad for p in self._params if p.grad is not None]
                if grads:
                    norms = torch.stack(torch._foreach_norm(grads)).sum()
                    self._nonfinite = norms if self._nonfinite is None else self._nonfinite + norms
            return loss
        if self._sum_scale is None:
            self._sum_scale = weight
        relative = weight / self._sum_scale
        for i, p in enumerate(self._params):
            if p.grad is None:
                continue
            if self._grad_sum[i] is None:  # take the fresh gradient over (it is reset anyway)
                self._grad_sum[i] = p.grad if relative == 1.0 else p.grad.mul(relative)
            else:
                self._grad_sum[i].add_(p.grad, alpha=relative)
        return loss

    def _pass_gradients(self) -> list[Tensor | None]:
        """The last pass's gradients (averaged over ranks under DDP; unscaled copies under a
        scaler), aligned with the params."""
        grads = [p.grad for p in self._params]
        grads = self._average_over_ranks(grads) if self._ddp else grads
        if self._scaler is None:
            return grads
        if self._inv_scale is None:
            self._inv_scale = 1.0 / self._scaler.get_scale()
        present = [i for i, g in enumerate(grads) if g is not None]
        unscaled = torch._foreach_mul([grads[i] for i in present], self._inv_scale)
        for i, g in zip(present, unscaled, strict=True):
            grads[i] = g
        return grads

    def _average_over_ranks(self, tensors: list[Tensor | None]) -> list[Tensor | None]:
        """Mean over DDP ranks in one all-reduce; a slot stays ``None`` only if it is on all."""
        group = self.model.process_group
        present = torch.tensor([t is not None for t in tensors], dtype=torch.float32,
                               device=self._params[0].device)
        flat = torch.cat([
            *(p.new_zeros(p.numel()) if t is None else t.reshape(-1)
              for p, t in zip(self._params, tensors, strict=True)),
            present,
        ])
        dist.all_reduce(flat, group=group)
        flat[: -len(tensors)].div_(dist.get_world_size(group))
        out: list[Tensor | None] = []
        offset = 0
        for p, any_rank in zip(self._params, flat[-len(tensors):].tolist(), strict=True):
            chunk = flat[offset: offset + p.numel()]
            offset += p.numel()
            out.append(chunk.view_as(p).to(p.dtype) if any_rank > 0 else None)
        return out

    def _draw_noise(self) -> list[Tensor]:
        """One draw per parameter from its group's ``sigma`` and ``noise`` (around ``W``)."""
        assert self.generator is not None and self._saved is not None
        groups = [group for group, _ in self._trainable()]
        return scale_noise(standard_normals(self.generator, self._saved), self._saved,
                           [g["sigma"] for g in groups], [g["noise"] for g in groups])

    # ----------------------------------------------------------------- state
    def state_dict(self) -> dict[str, Any]:
        """Base optimizer state + param groups (all hyperparameters) + ``"flatlab"`` extras:
        the global hyperparameters and the noise generator state (uint8 tensor)."""
        state = super().state_dict()
        extra = {name: getattr(self, name) for name in self._global_hyperparameters}
        if self.generator is not None:
            extra["generator_state"] = self.generator.get_state()
        state["flatlab"] = extra
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        state_dict = dict(state_dict)
        extra = dict(state_dict.pop("flatlab", {}))
        super().load_state_dict(state_dict)
        # re-share the new state and groups with the base (its __setstate__ fixes its defaults)
        self.base_optimizer.__setstate__({"state": self.state, "param_groups": self.param_groups})
        for group in self.param_groups:
            for name, value in self.defaults.items():
                group.setdefault(name, value)
        generator_state = extra.pop("generator_state", None)
        if generator_state is not None and self.generator is not None:
            self.generator.set_state(generator_state.detach().to("cpu", torch.uint8))
        for name in self._global_hyperparameters:
            if name in extra:
                setattr(self, name, type(getattr(self, name))(extra[name]))
