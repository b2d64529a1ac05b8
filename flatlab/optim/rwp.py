"""Random Weight Perturbation (RWP; Li et al. 2022/2024), the one-sided noise baseline."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.optim import Optimizer

from flatlab.optim.nso import NSO


class RWP(NSO):
    r"""Random weight perturbation mixed with the clean gradient (one-sided, filter noise).

    .. math::
        \begin{aligned}
            &U_1, \dots, U_k:\ U_{i,j} \sim \mathcal N(0, (\sigma \lVert W_j \rVert_2)^2 I)
                \text{ per output filter } j \\
            &g \leftarrow \lambda \nabla f(W) + \frac{1 - \lambda}{k}
                \sum_{i=1}^{k} \nabla f(W + U_i), \qquad
            W \leftarrow \text{base\_optimizer.step}(W, g)
        \end{aligned}

    This is :class:`~flatlab.optim.NSO` with ``two_sided=False``, ``noise="filter"`` and
    ``clean_weight=0.5`` by default: ``k + 1`` passes per step (2 by default). The clean pass
    runs first, so with ``model=`` given the BatchNorm running statistics come from ``W``.
    See :class:`NSO` for the arguments (``noise="absolute"`` is allowed too).
    """

    def __init__(
        self,
        params: Any,
        base_optimizer: type[Optimizer] = torch.optim.SGD,
        *,
        sigma: float = 0.01,
        noise: str = "filter",
        clean_weight: float = 0.5,
        num_perturbs: int = 1,
        generator: torch.Generator | None = None,
        seed: int | None = None,
        independent_noise: bool = False,
        model: nn.Module | None = None,
        **base_kwargs: Any,
    ) -> None:
        super().__init__(params, base_optimizer, sigma=sigma, num_perturbs=num_perturbs,
                         two_sided=False, clean_weight=clean_weight, noise=noise,
                         generator=generator, seed=seed, independent_noise=independent_noise,
                         model=model, **base_kwargs)
