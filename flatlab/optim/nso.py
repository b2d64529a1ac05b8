"""Noise Stability Optimization (Ju, Li, Zhang; arXiv 2306.08553)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.optim import Optimizer

from flatlab.optim._noise import check_sigma_and_noise
from flatlab.optim._perturb import Closure, PerturbationOptimizer


class NSO(PerturbationOptimizer):
    r"""Noise Stability Optimization: descend on :math:`F(W) = E_U f(W + U)`.

    .. math::
        \begin{aligned}
            &U_1, \dots, U_k \sim \mathcal N(0, \sigma^2 I) \quad
                \text{(or per-filter: std } \sigma \lVert W_j \rVert \text{, see below)} \\
            &g \leftarrow \lambda \nabla f(W) + \frac{1 - \lambda}{k} \sum_{i=1}^{k}
                \tfrac12 \big[\nabla f(W + U_i) + \nabla f(W - U_i)\big]
                \quad \text{(one-sided: } \nabla f(W + U_i) \text{)} \\
            &W \leftarrow \text{base\_optimizer.step}(W, g)
        \end{aligned}

    with :math:`k` = ``num_perturbs`` and :math:`\lambda` = ``clean_weight``. Every gradient
    is taken on the same minibatch (one ``closure()`` call each); ``W`` is restored from a
    saved copy before the base step. Passes per step: ``2k`` (``k`` one-sided), plus one
    clean pass at ``W`` (run first) when :math:`\lambda > 0` or ``clean_pass``. Since
    :math:`F \approx f + \tfrac{\sigma^2}{2}\operatorname{tr} H`, NSO penalises the Hessian
    trace; the two-sided average cancels the odd-order terms of the Taylor expansion.

    Args:
        params: parameters or parameter groups (groups may override ``sigma`` and ``noise``).
        base_optimizer: optimizer class built on the same param groups (default SGD).
        sigma: noise scale (>= 0).
        num_perturbs: number of draws ``k`` per step (>= 1).
        two_sided: evaluate at ``W + U`` and ``W - U`` (True) or ``W + U`` only.
        clean_weight: weight :math:`\lambda \in [0, 1]` of the clean gradient.
        clean_pass: take the clean pass at ``W`` even when :math:`\lambda = 0` (its gradient
            then has weight 0 and the update is unchanged): with ``model=``, BatchNorm running
            statistics are then ``W``'s, as in the paper's official code, for one more pass
            per step.
        noise: ``"absolute"``: :math:`U \sim \mathcal N(0, \sigma^2 I)`; ``"filter"``: each
            output filter ``W_j`` (slice along dim 0) gets std :math:`\sigma \lVert W_j\rVert_2`,
            a 0-D/1-D tensor (bias, norm scale) std :math:`\sigma \lVert W \rVert_2`.
        generator: ``torch.Generator`` for the noise (on the parameters' device).
        seed: seed of the noise: the generator is ``noise_generator(seed)``, which mixes a
            salt into it, so the same number may seed the weights too (default:
            ``torch.initial_seed()``).
        independent_noise: under torch.distributed, mix the rank into the seed (different
            noise on every rank); by default every rank draws the same noise.
        model: the model (or its ``DistributedDataParallel`` wrapper). Given, its buffers
            (BatchNorm running statistics) keep the values from the *first* pass of each
            step (the clean pass at ``W`` if there is one, else the pass at ``W + U_1``), and
            under DDP the passes run in ``no_sync()`` with one gradient all-reduce per step.
        **base_kwargs: ``lr``, ``momentum``, ``weight_decay``, ... for the base optimizer.

    ``step(closure)`` returns the clean loss when it computed one, else the mean of the
    perturbed losses. ``step(closure, scaler=scaler)`` (then ``scaler.update()``) is the fp16
    recipe: the closure calls ``scaler.scale(loss).backward()``; see ``flatlab.optim``.
    """

    _global_hyperparameters = ("num_perturbs", "two_sided", "clean_weight", "clean_pass")

    def __init__(
        self,
        params: Any,
        base_optimizer: type[Optimizer] = torch.optim.SGD,
        *,
        sigma: float = 0.01,
        num_perturbs: int = 1,
        two_sided: bool = True,
        clean_weight: float = 0.0,
        clean_pass: bool = False,
        noise: str = "absolute",
        generator: torch.Generator | None = None,
        seed: int | None = None,
        independent_noise: bool = False,
        model: nn.Module | None = None,
        **base_kwargs: Any,
    ) -> None:
        if isinstance(num_perturbs, bool) or not isinstance(num_perturbs, int) or num_perturbs < 1:
            raise ValueError(f"Invalid num_perturbs: {num_perturbs!r} (must be an integer >= 1)")
        if not 0.0 <= clean_weight <= 1.0:
            raise ValueError(f"Invalid clean_weight: {clean_weight!r} (must be in [0, 1])")
        self.num_perturbs, self.two_sided = num_perturbs, bool(two_sided)
        self.clean_weight = float(clean_weight)
        self.clean_pass = bool(clean_pass)
        super().__init__(params, base_optimizer, {"sigma": sigma, "noise": noise}, base_kwargs,
                         model=model, uses_noise=True, generator=generator, seed=seed,
                         independent_noise=independent_noise)

    def _check_group(self, group: dict[str, Any]) -> None:
        check_sigma_and_noise(group["sigma"], group["noise"])

    @property
    def gradient_evaluations(self) -> int:
        sides = 2 if self.two_sided else 1
        return sides * self.num_perturbs + (1 if self._has_clean_pass else 0)

    @property
    def _has_clean_pass(self) -> bool:
        return self.clean_weight > 0 or self.clean_pass

    @torch.no_grad()
    def step(self, closure: Closure | None = None, *,  # type: ignore[override]
             scaler: torch.amp.GradScaler | None = None) -> Any:
        closure = self._require_closure(closure, type(self).__name__)
        signs = (1.0, -1.0) if self.two_sided else (1.0,)
        weight = (1.0 - self.clean_weight) / (self.num_perturbs * len(signs))
        clean_loss, losses = None, []
        with self._perturbation_step(scaler):
            if self._has_clean_pass:
                clean_loss = self._evaluate(closure, self.clean_weight)
            for _ in range(self.num_perturbs):
                noise = self._draw_noise()
                for sign in signs:
                    self._move_to(noise, sign)
                    losses.append(self._evaluate(closure, weight))
        if clean_loss is not None:
            return clean_loss
        if any(loss is None for loss in losses):  # a closure that returns nothing
            return None
        perturbed = [loss.detach() if torch.is_tensor(loss) else loss for loss in losses]
        return sum(perturbed) / len(perturbed)
