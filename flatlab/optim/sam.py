"""Sharpness-Aware Minimization (Foret et al. 2021) and adaptive SAM (ASAM; Kwon et al. 2021)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.optim import Optimizer

from flatlab.optim._perturb import Closure, PerturbationOptimizer


class SAM(PerturbationOptimizer):
    r"""Sharpness-Aware Minimization: descend with the gradient at the worst nearby point.

    .. math::
        \begin{aligned}
            &g_0 \leftarrow \nabla f(W), \qquad
                T \leftarrow \begin{cases} |W| \text{ (elementwise)} & \text{adaptive} \\
                                         1 & \text{otherwise} \end{cases} \\
            &\varepsilon \leftarrow \rho \, \frac{T^2 \odot g_0}{\lVert T \odot g_0 \rVert_2}
                \qquad (\lVert\cdot\rVert_2 \text{ over all parameters}) \\
            &g \leftarrow \nabla f(W + \varepsilon), \qquad
                W \leftarrow \text{base\_optimizer.step}(W, g)
        \end{aligned}

    Two ``closure()`` calls per step on the same minibatch; ``W`` is restored from a saved copy
    before the base step. ``adaptive=True`` is ASAM's scale-invariant neighbourhood.

    Args:
        params: parameters or parameter groups (groups may override ``rho``, ``adaptive``).
        base_optimizer: optimizer class built on the same param groups (default SGD).
        rho: neighbourhood radius (> 0).
        adaptive: scale the neighbourhood elementwise by ``|W|`` (ASAM).
        model: the model (or its DDP wrapper). Given, its buffers (BatchNorm running
            statistics) keep the values from the first pass, at ``W``; under DDP both passes
            run in ``no_sync()`` and two all-reduces per step average ``g_0`` (so
            :math:`\varepsilon` is the single-process one) and ``g``.
        **base_kwargs: ``lr``, ``momentum``, ``weight_decay``, ... for the base optimizer.

    ``step(closure)`` returns the loss at ``W`` (the first pass). With
    ``step(closure, scaler=scaler)`` (fp16, see ``flatlab.optim``) :math:`\varepsilon` is
    computed from the unscaled :math:`g_0`.
    """

    def __init__(
        self,
        params: Any,
        base_optimizer: type[Optimizer] = torch.optim.SGD,
        *,
        rho: float = 0.05,
        adaptive: bool = False,
        model: nn.Module | None = None,
        **base_kwargs: Any,
    ) -> None:
        super().__init__(params, base_optimizer, {"rho": rho, "adaptive": adaptive},
                         base_kwargs, model=model)

    def _check_group(self, group: dict[str, Any]) -> None:
        if not group["rho"] > 0.0:
            raise ValueError(f"Invalid rho: {group['rho']!r} (must be > 0)")

    @property
    def gradient_evaluations(self) -> int:
        return 2

    @torch.no_grad()
    def step(self, closure: Closure | None = None, *,  # type: ignore[override]
             scaler: torch.amp.GradScaler | None = None) -> Any:
        closure = self._require_closure(closure, type(self).__name__)
        with self._perturbation_step(scaler):
            loss = self._evaluate(closure, weight=0.0)
            directions, norms = [], []  # rho * T^2 g_0 and the pieces of ||T g_0||
            for (group, _), w, g in zip(self._trainable(), self._saved_weights(),
                                        self._pass_gradients(), strict=True):
                if g is None:
                    directions.append(None)
                    continue
                t = w.abs() if group["adaptive"] else None
                tg = g if t is None else g * t
                norms.append(torch.linalg.vector_norm(tg))
                directions.append(tg.mul(group["rho"]) if t is None else tg.mul_(t * group["rho"]))
            if norms:
                scale = 1.0 / (torch.linalg.vector_norm(torch.stack(norms)) + 1e-12)
                self._move_to([None if d is None else d.mul_(scale) for d in directions])
            self._evaluate(closure, weight=1.0)
        return loss


class ASAM(SAM):
    r"""Adaptive SAM: :class:`SAM` with ``adaptive=True`` and ``rho=0.5`` by default, i.e.
    :math:`\varepsilon = \rho\, |W|^2 \odot g_0 / \lVert |W| \odot g_0 \rVert_2`."""

    def __init__(
        self,
        params: Any,
        base_optimizer: type[Optimizer] = torch.optim.SGD,
        *,
        rho: float = 0.5,
        model: nn.Module | None = None,
        **base_kwargs: Any,
    ) -> None:
        super().__init__(params, base_optimizer, rho=rho, adaptive=True, model=model,
                         **base_kwargs)
