"""The optimizer semantics, pinned by exact cases (quadratics, hand-computed steps)."""

from __future__ import annotations

import copy
import io
import re
import warnings

import pytest
import torch
from torch import nn

from flatlab.optim import (
    ASAM,
    NSO,
    OPTIMIZERS,
    RWP,
    SAM,
    build_optimizer,
    gradient_evaluations_per_step,
    noise_generator,
)

# ---------------------------------------------------------------------------------------- helpers


class Quadratic(nn.Module):
    """f(W) = 1/2 (v - c)^T A (v - c) with v the flattened (matrix, vector) parameters."""

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.matrix = nn.Parameter(torch.randn(3, 4, generator=g, dtype=torch.float64))
        self.vector = nn.Parameter(torch.randn(5, generator=g, dtype=torch.float64))
        m = torch.randn(17, 17, generator=g, dtype=torch.float64)
        self.register_buffer("A", m @ m.T / 17 + torch.eye(17, dtype=torch.float64))
        self.register_buffer("c", torch.randn(17, generator=g, dtype=torch.float64))

    def forward(self) -> torch.Tensor:
        d = torch.cat([self.matrix.reshape(-1), self.vector]) - self.c
        return 0.5 * d @ self.A @ d

    def gradient(self, matrix: torch.Tensor, vector: torch.Tensor) -> list[torch.Tensor]:
        g = self.A @ (torch.cat([matrix.reshape(-1), vector]) - self.c)
        return [g[:12].view(3, 4), g[12:]]


def quadratic_closure(model: Quadratic, optimizer, calls: list | None = None):
    def closure():
        optimizer.zero_grad()
        loss = model()
        loss.backward()
        if calls is not None:
            calls.append([p.detach().clone() for p in model.parameters()])
        return loss
    return closure


def mlp(seed: int = 0, batchnorm: bool = False, dtype=torch.float64) -> nn.Module:
    torch.manual_seed(seed)
    layers = [nn.Linear(6, 8), nn.BatchNorm1d(8) if batchnorm else nn.Identity(), nn.Tanh(),
              nn.Linear(8, 3)]
    return nn.Sequential(*layers).to(dtype)


def batch(dtype=torch.float64, n: int = 16):
    g = torch.Generator().manual_seed(123)
    return torch.randn(n, 6, generator=g, dtype=dtype), torch.randint(0, 3, (n,), generator=g)


def mlp_closure(model, optimizer, x, y, calls: list | None = None):
    def closure():
        optimizer.zero_grad()
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        if calls is not None:
            calls.append([p.detach().clone() for p in model.parameters()])
        return loss
    return closure


def params_of(model: nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in model.parameters()]


def documented_normals(generator, like):
    """The documented draw: one flat N(0, I) vector over all tensors, split in order."""
    flat = torch.randn(sum(t.numel() for t in like), generator=generator, dtype=like[0].dtype)
    return [z.view(t.shape) for z, t in zip(flat.split([t.numel() for t in like]), like,
                                            strict=True)]


METHODS = {
    "nso": lambda p, **kw: NSO(p, sigma=0.05, num_perturbs=2, **kw),
    "nso_one_sided_clean": lambda p, **kw: NSO(p, sigma=0.05, two_sided=False, clean_weight=0.3,
                                               noise="filter", **kw),
    "nso_clean_pass": lambda p, **kw: NSO(p, sigma=0.05, clean_pass=True, **kw),
    "sam": lambda p, **kw: SAM(p, rho=0.05, **kw),
    "asam": lambda p, **kw: ASAM(p, **kw),
    "rwp": lambda p, **kw: RWP(p, sigma=0.05, **kw),
}

# ---------------------------------------------------------------------------------------- NSO


@pytest.mark.parametrize("noise", ["absolute", "filter"])
def test_two_sided_nso_on_quadratic_equals_clean_base_step(noise):
    model, reference = Quadratic(), Quadratic()
    nso = NSO(model.parameters(), sigma=0.3, num_perturbs=2, noise=noise, seed=1, lr=0.05,
              momentum=0.9, weight_decay=1e-3)
    sgd = torch.optim.SGD(reference.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-3)
    calls: list = []
    for _ in range(3):
        nso.step(quadratic_closure(model, nso, calls))
        sgd.step(quadratic_closure(reference, sgd))
    for p, q in zip(model.parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-13)
    # and the passes really were perturbed (by far more than the agreement above)
    assert (calls[0][0] - calls[1][0]).abs().max() > 0.1


def test_one_sided_nso_on_quadratic_differs_from_clean_step():
    model, reference = Quadratic(), Quadratic()
    nso = NSO(model.parameters(), sigma=0.3, two_sided=False, seed=1, lr=0.05)
    sgd = torch.optim.SGD(reference.parameters(), lr=0.05)
    nso.step(quadratic_closure(model, nso))
    sgd.step(quadratic_closure(reference, sgd))
    assert (model.matrix - reference.matrix).abs().max() > 1e-3


@pytest.mark.parametrize(
    ("kwargs", "expected"),
    [({"num_perturbs": 3}, 6), ({"num_perturbs": 3, "two_sided": False}, 3),
     ({"num_perturbs": 3, "clean_weight": 0.2}, 7),
     ({"num_perturbs": 2, "two_sided": False, "clean_weight": 0.5}, 3)],
)
def test_nso_closure_calls(kwargs, expected):
    model = Quadratic()
    nso = NSO(model.parameters(), lr=0.1, **kwargs)
    calls: list = []
    nso.step(quadratic_closure(model, nso, calls))
    assert len(calls) == expected == nso.gradient_evaluations
    assert gradient_evaluations_per_step(nso) == expected


@pytest.mark.parametrize(
    ("optimizer", "expected"),
    [(lambda p: SAM(p, lr=0.1), 2), (lambda p: ASAM(p, lr=0.1), 2),
     (lambda p: RWP(p, lr=0.1), 2), (lambda p: RWP(p, lr=0.1, clean_weight=0.0), 1),
     (lambda p: RWP(p, lr=0.1, num_perturbs=3), 4)],
)
def test_other_methods_closure_calls(optimizer, expected):
    model = Quadratic()
    opt = optimizer(model.parameters())
    calls: list = []
    opt.step(quadratic_closure(model, opt, calls))
    assert len(calls) == expected == gradient_evaluations_per_step(opt)


def test_plain_optimizer_counts_one_evaluation():
    assert gradient_evaluations_per_step(torch.optim.SGD(Quadratic().parameters(), lr=0.1)) == 1


@pytest.mark.parametrize("method", sorted(METHODS))
def test_lr_zero_leaves_weights_bit_identical(method):
    model = mlp(dtype=torch.float32)
    before = params_of(model)
    big = {"nso": {"sigma": 5.0}, "rwp": {"sigma": 5.0}, "nso_one_sided_clean": {"sigma": 5.0},
           "nso_clean_pass": {"sigma": 5.0},
           "sam": {"rho": 5.0}, "asam": {"rho": 50.0}}[method]
    opt = METHODS[method](model.parameters(), lr=0.0, momentum=0.9, weight_decay=0.1)
    for group in opt.param_groups:
        group.update(big)
    x, y = batch(torch.float32)
    calls: list = []
    for _ in range(3):
        opt.step(mlp_closure(model, opt, x, y, calls))
    assert any((c[0] - before[0]).abs().max() > 0.5 for c in calls)  # the passes moved far
    for p, q in zip(model.parameters(), before, strict=True):
        assert torch.equal(p, q)


def expected_nso_gradient(model, x, y, generator, *, sigma, num_perturbs, two_sided,
                          clean_weight, noise):
    """The NSO gradient computed independently: same draws, autograd at each point."""
    weights = params_of(model)

    def grad_at(point):
        probe = copy.deepcopy(model)
        with torch.no_grad():
            for p, value in zip(probe.parameters(), point, strict=True):
                p.copy_(value)
        loss = nn.functional.cross_entropy(probe(x), y)
        return torch.autograd.grad(loss, list(probe.parameters()))

    total = [torch.zeros_like(w) for w in weights]
    if clean_weight > 0:
        total = [t + clean_weight * g for t, g in zip(total, grad_at(weights), strict=True)]
    signs = (1, -1) if two_sided else (1,)
    for _ in range(num_perturbs):
        draws = []
        for w, u in zip(weights, documented_normals(generator, weights), strict=True):
            if noise == "absolute":
                scale = sigma
            elif w.dim() >= 2:
                scale = sigma * w.flatten(1).norm(dim=1).view(-1, *([1] * (w.dim() - 1)))
            else:
                scale = sigma * w.norm()
            draws.append(u * scale)
        for sign in signs:
            point = [w + sign * u for w, u in zip(weights, draws, strict=True)]
            for t, g in zip(total, grad_at(point), strict=True):
                t += (1 - clean_weight) / (num_perturbs * len(signs)) * g
    return total


@pytest.mark.parametrize(
    "config",
    [dict(num_perturbs=2, two_sided=True, clean_weight=0.0, noise="absolute"),
     dict(num_perturbs=3, two_sided=False, clean_weight=0.25, noise="filter"),
     dict(num_perturbs=1, two_sided=True, clean_weight=0.5, noise="filter")],
)
def test_nso_step_is_base_step_on_accumulated_gradient(config):
    model, reference = mlp(), mlp()
    x, y = batch()
    nso = NSO(model.parameters(), sigma=0.2, seed=7, lr=0.1, momentum=0.9, **config)
    sgd = torch.optim.SGD(reference.parameters(), lr=0.1, momentum=0.9)
    generator = noise_generator(7)
    for _ in range(3):  # later steps: momentum buffers and a moved W are involved too
        expected = expected_nso_gradient(model, x, y, generator, sigma=0.2, **config)
        nso.step(mlp_closure(model, nso, x, y))
        for p, g in zip(reference.parameters(), expected, strict=True):
            p.grad = g.clone()
        sgd.step()
        for p, q, g in zip(model.parameters(), reference.parameters(), expected, strict=True):
            torch.testing.assert_close(p, q, rtol=0, atol=1e-14)
            torch.testing.assert_close(p.grad, g, rtol=0, atol=1e-14)  # grad left = the sum


def test_nso_returns_clean_loss_or_mean_of_perturbed_losses():
    model = Quadratic()
    nso = NSO(model.parameters(), sigma=0.5, num_perturbs=2, seed=3, lr=0.0)
    losses: list = []

    def closure():
        nso.zero_grad()
        loss = model()
        loss.backward()
        losses.append(loss.item())
        return loss

    clean = model().item()
    result = nso.step(closure)
    assert isinstance(result, torch.Tensor) and not result.requires_grad
    assert result.item() == pytest.approx(sum(losses) / 4, rel=1e-14)
    assert result.item() != pytest.approx(clean, rel=1e-6)
    with_clean = NSO(model.parameters(), sigma=0.5, clean_weight=0.1, seed=3, lr=0.0)
    assert with_clean.step(quadratic_closure(model, with_clean)).item() == clean


# ---------------------------------------------------------------------------------------- SAM


def test_sam_matches_hand_computed_step():
    model = Quadratic()
    w = params_of(model)
    sam = SAM(model.parameters(), rho=0.1, lr=0.05)
    loss = sam.step(quadratic_closure(model, sam))
    g0 = model.gradient(*w)
    norm = torch.sqrt(sum((g ** 2).sum() for g in g0))
    eps = [0.1 * g / norm for g in g0]
    g = model.gradient(*(wi + e for wi, e in zip(w, eps, strict=True)))
    for p, wi, gi in zip(model.parameters(), w, g, strict=True):
        torch.testing.assert_close(p, wi - 0.05 * gi, rtol=0, atol=1e-14)
    assert loss.item() == pytest.approx(Quadratic()().item(), rel=1e-15)


def test_asam_matches_hand_computed_step_with_elementwise_weight_scaling():
    model = Quadratic()
    w = params_of(model)
    asam = ASAM(model.parameters(), lr=0.05)
    assert asam.param_groups[0]["rho"] == 0.5 and asam.param_groups[0]["adaptive"]
    asam.step(quadratic_closure(model, asam))
    g0 = model.gradient(*w)
    norm = torch.sqrt(sum(((wi.abs() * g) ** 2).sum() for wi, g in zip(w, g0, strict=True)))
    eps = [0.5 * wi.abs() ** 2 * g / norm for wi, g in zip(w, g0, strict=True)]
    g = model.gradient(*(wi + e for wi, e in zip(w, eps, strict=True)))
    for p, wi, gi in zip(model.parameters(), w, g, strict=True):
        torch.testing.assert_close(p, wi - 0.05 * gi, rtol=0, atol=1e-14)


def test_sam_perturbation_has_length_rho():
    model = Quadratic()
    w = params_of(model)
    sam = SAM(model.parameters(), rho=0.2, lr=0.0)
    calls: list = []
    sam.step(quadratic_closure(model, sam, calls))
    assert [torch.equal(a, b) for a, b in zip(calls[0], w, strict=True)] == [True, True]
    length = torch.sqrt(sum(((a - b) ** 2).sum() for a, b in zip(calls[1], w, strict=True)))
    assert length.item() == pytest.approx(0.2, rel=1e-12)


# ---------------------------------------------------------------------------------------- state


@pytest.mark.parametrize("method", sorted(METHODS))
@pytest.mark.parametrize("base", [torch.optim.SGD, torch.optim.Adam])
def test_state_dict_round_trip_gives_identical_next_steps(method, base):
    x, y = batch()
    kwargs = {"lr": 0.05, "momentum": 0.9} if base is torch.optim.SGD else {"lr": 0.01}
    model = mlp()
    extra = {"seed": 5} if method in ("nso", "rwp", "nso_one_sided_clean") else {}
    opt = METHODS[method](model.parameters(), base_optimizer=base, **extra, **kwargs)
    for _ in range(2):
        opt.step(mlp_closure(model, opt, x, y))
    buffer = io.BytesIO()
    torch.save(opt.state_dict(), buffer)  # tensors + plain values only: loads without pickle
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)

    twin = copy.deepcopy(model)
    other = {"seed": 99} if extra else {}
    resumed = METHODS[method](twin.parameters(), base_optimizer=base, **other, **kwargs)
    resumed.load_state_dict(saved)
    assert resumed.param_groups[0] is resumed.base_optimizer.param_groups[0]
    assert resumed.state is resumed.base_optimizer.state
    for _ in range(2):
        opt.step(mlp_closure(model, opt, x, y))
        resumed.step(mlp_closure(twin, resumed, x, y))
    for p, q in zip(model.parameters(), twin.parameters(), strict=True):
        assert torch.equal(p, q)


def test_state_dict_holds_optimizer_state_hyperparameters_and_generator_only():
    model = mlp()
    x, y = batch()
    nso = NSO(model.parameters(), sigma=0.07, num_perturbs=3, clean_weight=0.2, noise="filter",
              seed=1, lr=0.1, momentum=0.9)
    nso.step(mlp_closure(model, nso, x, y))
    state = nso.state_dict()
    assert set(state) == {"state", "param_groups", "flatlab"}
    assert all(set(s) == {"momentum_buffer"} for s in state["state"].values())
    assert state["param_groups"][0]["sigma"] == 0.07
    assert state["param_groups"][0]["noise"] == "filter"
    assert state["flatlab"]["generator_state"].dtype == torch.uint8
    assert {k: v for k, v in state["flatlab"].items() if k != "generator_state"} == {
        "num_perturbs": 3, "two_sided": True, "clean_weight": 0.2, "clean_pass": False}
    fresh = NSO(mlp().parameters(), lr=0.5)
    fresh.load_state_dict(state)
    loaded = (fresh.num_perturbs, fresh.clean_weight, fresh.param_groups[0]["sigma"])
    assert loaded == (3, 0.2, 0.07)
    assert fresh.param_groups[0]["lr"] == 0.1 and fresh.base_optimizer.param_groups[0]["lr"] == 0.1
    assert torch.equal(fresh.state_dict()["flatlab"]["generator_state"],
                       state["flatlab"]["generator_state"])


@pytest.mark.parametrize("method", ["nso", "sam"])
@pytest.mark.parametrize(
    "make_scheduler",
    [lambda opt: torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5),
     lambda opt: torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=4)],
)
def test_lr_scheduler_works_without_warnings(method, make_scheduler):
    model = Quadratic()
    opt = METHODS[method](model.parameters(), lr=0.1, momentum=0.9)
    lrs = []
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        scheduler = make_scheduler(opt)
        for _ in range(4):
            opt.step(quadratic_closure(model, opt))
            scheduler.step()
            lrs.append(opt.base_optimizer.param_groups[0]["lr"])
    assert lrs[-1] < 0.1 and len(set(lrs)) >= 2
    assert lrs[-1] == scheduler.get_last_lr()[0]


def test_base_step_uses_the_scheduled_lr():
    model, reference = Quadratic(), Quadratic()
    nso = NSO(model.parameters(), sigma=0.0, lr=0.1)
    sgd = torch.optim.SGD(reference.parameters(), lr=0.1)
    schedulers = [torch.optim.lr_scheduler.StepLR(o, step_size=1, gamma=0.1) for o in (nso, sgd)]
    for _ in range(3):
        nso.step(quadratic_closure(model, nso))
        sgd.step(quadratic_closure(reference, sgd))
        for s in schedulers:
            s.step()
    for p, q in zip(model.parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-15)
    assert nso.param_groups[0]["lr"] == pytest.approx(1e-4)


# ---------------------------------------------------------------------------------------- BN


def one_forward_buffers(model, weights, x):
    probe = copy.deepcopy(model)
    with torch.no_grad():
        for p, w in zip(probe.parameters(), weights, strict=True):
            p.copy_(w)
    probe.train()
    probe(x)
    return [b.clone() for b in probe.buffers()]


@pytest.mark.parametrize("clean_weight", [0.0, 0.4])
def test_nso_batchnorm_stats_come_from_the_first_pass_only(clean_weight):
    model = mlp(batchnorm=True)
    x, y = batch()
    w = params_of(model)
    nso = NSO(model.parameters(), sigma=0.3, num_perturbs=2, clean_weight=clean_weight, seed=4,
              lr=0.1, model=model)
    generator = noise_generator(4)
    first_noise = [0.3 * z for z in documented_normals(generator, w)]
    first_point = w if clean_weight > 0 else [a + u for a, u in zip(w, first_noise, strict=True)]
    expected = one_forward_buffers(model, first_point, x)
    nso.step(mlp_closure(model, nso, x, y))
    bn = model[1]
    assert bn.num_batches_tracked.item() == 1
    for b, e in zip(model.buffers(), expected, strict=True):
        torch.testing.assert_close(b, e, rtol=0, atol=1e-15)
    # without model= every pass updates the statistics (what model= is for)
    unprotected = mlp(batchnorm=True)
    opt = NSO(unprotected.parameters(), sigma=0.3, num_perturbs=2, clean_weight=clean_weight,
              seed=4, lr=0.1)
    opt.step(mlp_closure(unprotected, opt, x, y))
    assert unprotected[1].num_batches_tracked.item() == opt.gradient_evaluations


def test_nso_clean_pass_takes_batchnorm_stats_at_w_and_leaves_the_update_unchanged():
    x, y = batch()
    models, steps = [], []
    for clean_pass in (False, True):
        model = mlp(batchnorm=True)
        nso = NSO(model.parameters(), sigma=0.3, num_perturbs=2, seed=4, lr=0.1, model=model,
                  clean_pass=clean_pass)
        at_w = one_forward_buffers(model, params_of(model), x)
        closure = mlp_closure(model, nso, x, y)
        losses = []

        def counted(closure=closure, losses=losses):
            loss = closure()
            losses.append(float(loss.detach()))
            return loss

        returned = nso.step(counted)
        models.append(model)
        steps.append((nso.gradient_evaluations, losses, float(returned.detach()), at_w))
    (passes_off, losses_off, _, _), (passes_on, losses_on, returned_on, at_w) = steps
    assert (passes_off, passes_on) == (4, 5) and len(losses_on) == 5
    # the extra pass is the first, at W: the step returns its (clean) loss ...
    assert returned_on == losses_on[0]
    # ... the perturbed passes see the same noise, and the update ignores the clean gradient
    assert losses_on[1:] == losses_off
    for p, q in zip(models[0].parameters(), models[1].parameters(), strict=True):
        assert torch.equal(p, q)
    # the running statistics are those of one forward pass at W, counted once
    for b, e in zip(models[1].buffers(), at_w, strict=True):
        torch.testing.assert_close(b, e, rtol=0, atol=1e-15)
    assert models[1][1].num_batches_tracked.item() == 1
    assert not torch.allclose(models[0][1].running_mean, models[1][1].running_mean)


def test_build_optimizer_takes_clean_pass_for_nso_only():
    param = torch.zeros(3, requires_grad=True)
    assert build_optimizer("nso", [param], lr=0.1, clean_pass=True).gradient_evaluations == 3
    with pytest.raises(ValueError, match="clean_pass does not apply"):
        build_optimizer("sam", [param], lr=0.1, clean_pass=True)

@pytest.mark.parametrize("method", ["sam", "asam", "rwp"])
def test_sam_and_rwp_batchnorm_stats_come_from_the_clean_pass(method):
    model = mlp(batchnorm=True)
    x, y = batch()
    expected = one_forward_buffers(model, params_of(model), x)
    opt = METHODS[method](model.parameters(), lr=0.1, model=model)
    opt.step(mlp_closure(model, opt, x, y))
    for b, e in zip(model.buffers(), expected, strict=True):
        torch.testing.assert_close(b, e, rtol=0, atol=1e-15)


# ---------------------------------------------------------------------------------------- noise


def perturbations_seen(seed=None, generator=None, global_seed=0, steps=2, **kwargs):
    torch.manual_seed(global_seed)
    model = Quadratic()
    w = params_of(model)
    nso = NSO(model.parameters(), sigma=0.1, lr=0.0, seed=seed, generator=generator, **kwargs)
    calls: list = []
    for _ in range(steps):
        nso.step(quadratic_closure(model, nso, calls))
    return [[p - q for p, q in zip(c, w, strict=True)] for c in calls]


def same(a, b) -> bool:
    return all(torch.equal(p, q) for x, z in zip(a, b, strict=True)
               for p, q in zip(x, z, strict=True))


def test_noise_is_reproducible_from_the_seed_and_independent_of_the_global_rng():
    assert same(perturbations_seen(seed=3, global_seed=0),
                perturbations_seen(seed=3, global_seed=1))
    assert not same(perturbations_seen(seed=3), perturbations_seen(seed=4))
    # seed=None: derived from the global seed, so seed_everything(s) still reproduces runs
    assert same(perturbations_seen(global_seed=8), perturbations_seen(global_seed=8))
    assert not same(perturbations_seen(global_seed=8), perturbations_seen(global_seed=9))
    generator = noise_generator(3)
    assert same(perturbations_seen(generator=generator), perturbations_seen(seed=3))


def test_noise_does_not_touch_the_global_rng():
    model = Quadratic()
    nso = NSO(model.parameters(), sigma=0.1, num_perturbs=3, seed=0, lr=0.1)
    torch.manual_seed(0)
    before = torch.get_rng_state()
    nso.step(quadratic_closure(model, nso))
    assert torch.equal(torch.get_rng_state(), before)


def test_two_sided_passes_use_opposite_draws():
    steps = perturbations_seen(seed=2, steps=1, num_perturbs=2)
    for plus, minus in (steps[0:2], steps[2:4]):
        for u, v in zip(plus, minus, strict=True):
            torch.testing.assert_close(v, -u, rtol=0, atol=1e-15)
    assert not torch.allclose(steps[0][0], steps[2][0])


def test_filter_noise_has_the_documented_per_filter_scale():
    torch.manual_seed(0)
    rows = torch.tensor([0.1, 1.0, 3.0, 10.0]).view(4, 1)
    weight = nn.Parameter(torch.randn(4, 250) * rows)
    conv = nn.Parameter(torch.randn(3, 2, 5, 5) * torch.tensor([0.5, 1.0, 2.0]).view(3, 1, 1, 1))
    bias = nn.Parameter(torch.randn(50))
    params = [weight, conv, bias]
    sigma = 0.05
    nso = NSO(params, sigma=sigma, noise="filter", num_perturbs=40, two_sided=False, seed=0,
              lr=0.0)
    draws: list = [[] for _ in params]
    saved = [p.detach().clone() for p in params]

    def closure():
        loss = sum((p ** 2).sum() for p in params)
        loss.backward()
        for d, p, w in zip(draws, params, saved, strict=True):
            d.append(p.detach() - w)
        return loss

    for _ in range(10):
        nso.step(closure)
    for d, w in zip(draws, saved, strict=True):
        u = torch.stack(d)  # (400, *shape)
        if w.dim() >= 2:
            std = u.transpose(0, 1).reshape(w.shape[0], -1).std(dim=1)
            expected = sigma * w.flatten(1).norm(dim=1)
        else:
            std, expected = u.std().view(1), (sigma * w.norm()).view(1)
        # >= 20000 samples per filter: relative standard error < 0.5%; 2% is 4 sigma
        torch.testing.assert_close(std, expected, rtol=0.02, atol=0)
    absolute = perturbations_seen(seed=0, steps=30, num_perturbs=10)
    stacked = torch.cat([u.reshape(-1) for step in absolute for u in step])
    assert stacked.std().item() == pytest.approx(0.1, rel=0.03)


# ---------------------------------------------------------------------------------------- checks


@pytest.mark.parametrize(
    ("make", "value"),
    [(lambda p: NSO(p, sigma=-0.5), "-0.5"), (lambda p: NSO(p, num_perturbs=0), "0"),
     (lambda p: NSO(p, num_perturbs=1.5), "1.5"), (lambda p: NSO(p, clean_weight=1.5), "1.5"),
     (lambda p: NSO(p, clean_weight=-0.1), "-0.1"), (lambda p: NSO(p, noise="gauss"), "'gauss'"),
     (lambda p: RWP(p, sigma=-2.0), "-2.0"), (lambda p: SAM(p, rho=0.0), "0.0"),
     (lambda p: SAM(p, rho=-0.05), "-0.05"), (lambda p: ASAM(p, rho=-1.0), "-1.0"),
     (lambda p: NSO([{"params": p[:1]}, {"params": p[1:], "sigma": -3.0}]), "-3.0")],
)
def test_constructor_rejects_bad_hyperparameters_naming_the_value(make, value):
    params = list(Quadratic().parameters())
    with pytest.raises(ValueError, match=r"Invalid \w+: " + re.escape(value) + " "):
        make(params)


def test_step_without_closure_is_an_error():
    with pytest.raises(ValueError, match="closure"):
        NSO(Quadratic().parameters(), lr=0.1).step()


@pytest.mark.parametrize("method", sorted(METHODS))
def test_unused_parameters_keep_no_gradient_and_do_not_crash(method):
    model = mlp()
    model.unused = nn.Parameter(torch.ones(4, 2, dtype=torch.float64))
    x, y = batch()
    opt = METHODS[method](model.parameters(), lr=0.1, momentum=0.9, weight_decay=0.1)
    for _ in range(2):
        opt.step(mlp_closure(model, opt, x, y))
    assert model.unused.grad is None
    assert torch.equal(model.unused, torch.ones(4, 2, dtype=torch.float64))
    assert model[0].weight.grad is not None


def test_an_error_in_the_closure_leaves_the_weights_as_they_were():
    model = Quadratic()
    w = params_of(model)
    nso = NSO(model.parameters(), sigma=1.0, num_perturbs=2, lr=0.1)
    calls = []

    def closure():
        calls.append(1)
        if len(calls) == 3:
            raise FloatingPointError("diverged")
        return quadratic_closure(model, nso)()

    with pytest.raises(FloatingPointError):
        nso.step(closure)
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), w, strict=True))


# ---------------------------------------------------------------------------------------- factory


def test_build_optimizer_builds_each_method_with_defaults():
    params = list(Quadratic().parameters())
    built = {name: build_optimizer(name, params, lr=0.1) for name in OPTIMIZERS}
    assert type(built["sgd"]) is torch.optim.SGD
    assert built["sgd"].param_groups[0]["momentum"] == 0.9
    assert [type(built[n]) for n in ("sam", "asam", "rwp", "nso")] == [SAM, ASAM, RWP, NSO]
    assert built["nso"].param_groups[0]["sigma"] == 0.01 and built["nso"].num_perturbs == 1
    assert built["asam"].param_groups[0]["rho"] == 0.5
    assert built["rwp"].param_groups[0]["noise"] == "filter" and built["rwp"].clean_weight == 0.5
    assert [gradient_evaluations_per_step(built[n]) for n in OPTIMIZERS] == [1, 2, 2, 2, 2]
    nso = build_optimizer("nso", params, lr=0.1, sigma=0.02, num_perturbs=2, clean_weight=0.1,
                          noise="filter", base="adamw", weight_decay=0.01)
    assert type(nso.base_optimizer) is torch.optim.AdamW
    assert nso.param_groups[0]["weight_decay"] == 0.01 and nso.gradient_evaluations == 5
    assert type(build_optimizer("sgd", params, lr=0.1, base="adam")) is torch.optim.Adam
    a, b = (build_optimizer("nso", params, lr=0.1, seed=s) for s in (1, 1))
    assert torch.equal(a.generator.get_state(), b.generator.get_state())


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [({"name": "adam"}, "unknown optimizer 'adam'; choose one of sgd, sam, asam, rwp, nso"),
     ({"name": "nso", "base": "rmsprop"}, "unknown base optimizer 'rmsprop'"),
     ({"name": "sam", "sigma": 0.1}, "sigma does not apply to optimizer 'sam' (it takes: rho)"),
     ({"name": "nso", "rho": 0.1}, "rho does not apply to optimizer 'nso'"),
     ({"name": "nso", "sigma": -1.0}, "Invalid sigma: -1.0")],
)
def test_build_optimizer_rejects_bad_input(kwargs, message):
    with pytest.raises(ValueError) as error:
        build_optimizer(params=Quadratic().parameters(), lr=0.1, **kwargs)
    assert message in str(error.value)


# ---------------------------------------------------------------------------------------- seed


def test_noise_seed_is_salted_so_u1_is_independent_of_an_init_with_the_same_seed():
    # worst case: the weights are the first normals of torch.manual_seed(seed); without the
    # salt U_1 / sigma was exactly those numbers (correlation 1.0)
    seed, sigma = 5, 0.1
    torch.manual_seed(seed)
    model = nn.Linear(60, 50, bias=False)
    with torch.no_grad():
        torch.manual_seed(seed)
        model.weight.copy_(torch.randn(50, 60))
    init = model.weight.detach().clone()
    nso = NSO(model.parameters(), sigma=sigma, seed=seed, lr=0.0)
    seen: list = []
    x = torch.randn(4, 60)

    def closure():
        nso.zero_grad()
        seen.append(model.weight.detach().clone())
        loss = model(x).pow(2).mean()
        loss.backward()
        return loss

    nso.step(closure)
    u1 = ((seen[0] - init) / sigma).flatten()
    assert torch.isclose(u1, init.flatten(), rtol=0, atol=1e-4).sum() == 0
    correlation = torch.corrcoef(torch.stack([u1, init.flatten()]))[0, 1]
    assert abs(correlation) < 4 / 3000**0.5  # 4 standard deviations of a null correlation
    assert u1.std().item() == pytest.approx(1.0, abs=0.05)  # it is still N(0, 1) noise
    # the documented stream: noise_generator(seed), whatever the global RNG did meanwhile
    expected = torch.randn(3000, generator=noise_generator(seed))
    torch.testing.assert_close(u1, expected, rtol=0, atol=1e-5)


def test_seed_none_is_the_global_seed():
    assert same(perturbations_seen(global_seed=11), perturbations_seen(seed=11, global_seed=11))


# ---------------------------------------------------------------------------------------- fp16


def amp_closure(model, optimizer, x, y, scaler, *, poison_pass=None, autocast=False,
                poison=float("inf")):
    """A closure as in the fp16 recipe; ``poison_pass``: put ``poison`` into one gradient
    entry of that pass (0-based), as an fp16 overflow would."""
    passes: list = []

    def closure():
        optimizer.zero_grad()
        with torch.autocast("cpu", dtype=torch.float16, enabled=autocast):
            loss = nn.functional.cross_entropy(model(x), y)
        (loss if scaler is None else scaler.scale(loss)).backward()
        if len(passes) == poison_pass:
            list(model.parameters())[-2].grad.view(-1)[3] = poison
        passes.append(1)
        return loss
    return closure


def scaler(scale=2.0**16, **kwargs):
    return torch.amp.GradScaler("cpu", init_scale=scale, **kwargs)


@pytest.mark.parametrize("method", sorted(METHODS))
@pytest.mark.parametrize("enabled", [True, False])
def test_scaled_step_equals_the_unscaled_step_gradients_unscaled_once(method, enabled):
    """A power-of-two scale is exact in binary floating point: unscaled once, the step is the
    fp32/fp64 step bit for bit; unscaled twice or never, it would be off by 2**16."""
    x, y = batch()
    extra = {"seed": 5} if method in ("nso", "rwp", "nso_one_sided_clean") else {}
    plain_model, scaled_model = mlp(), mlp()
    plain = METHODS[method](plain_model.parameters(), lr=0.1, momentum=0.9, **extra)
    scaled = METHODS[method](scaled_model.parameters(), lr=0.1, momentum=0.9, **extra)
    amp = torch.amp.GradScaler("cpu", init_scale=2.0**16, enabled=enabled)
    for _ in range(3):
        plain_loss = plain.step(amp_closure(plain_model, plain, x, y, None))
        scaled_loss = scaled.step(amp_closure(scaled_model, scaled, x, y, amp), scaler=amp)
        amp.update()
        assert torch.equal(plain_loss, scaled_loss)
        for p, q in zip(plain_model.parameters(), scaled_model.parameters(), strict=True):
            assert torch.equal(p, q)
            assert torch.equal(p.grad, q.grad)
    assert amp.get_scale() == (2.0**16 if enabled else 1.0)


@pytest.mark.parametrize(("method", "pass_index"),
                         [(m, i) for m in sorted(METHODS) for i in range(3)
                          if i < METHODS[m](mlp().parameters(), lr=0.1).gradient_evaluations])
@pytest.mark.parametrize("poison", [float("inf"), float("nan")])
def test_inf_or_nan_in_any_pass_skips_the_step_restores_w_and_lowers_the_scale(
        method, pass_index, poison):
    x, y = batch()
    model = mlp()
    opt = METHODS[method](model.parameters(), lr=0.1, momentum=0.9)
    amp = scaler()
    opt.step(amp_closure(model, opt, x, y, amp), scaler=amp)  # a normal step: momentum exists
    amp.update()
    weights = params_of(model)
    momentum = [opt.state[p]["momentum_buffer"].clone() for p in model.parameters()]
    calls: list = []

    def closure():
        calls.append(params_of(model))
        return poisoned()

    poisoned = amp_closure(model, opt, x, y, amp, poison_pass=pass_index, poison=poison)
    opt.step(closure, scaler=amp)
    assert len(calls) == opt.gradient_evaluations  # every pass ran
    assert any(not torch.equal(p, w) for c in calls  # and W moved in between
               for p, w in zip(c, weights, strict=True))
    amp.update()
    assert amp.get_scale() == 2.0**15  # the scale was lowered
    for p, w, m in zip(model.parameters(), weights, momentum, strict=True):
        assert torch.equal(p, w)  # W bit-exact
        assert torch.equal(opt.state[p]["momentum_buffer"], m)  # no base step
    opt.step(amp_closure(model, opt, x, y, amp), scaler=amp)  # and the next step is normal
    amp.update()
    assert not torch.equal(params_of(model)[0], weights[0])
    assert amp.get_scale() == 2.0**15


def test_a_skipped_step_is_no_adam_step_and_no_scheduler_warning():
    x, y = batch()
    model = mlp()
    opt = SAM(model.parameters(), torch.optim.Adam, rho=0.05, lr=0.01)
    amp = scaler()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        schedule = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
        opt.step(amp_closure(model, opt, x, y, amp, poison_pass=0), scaler=amp)
        amp.update()
        schedule.step()  # torch warns here when GradScaler skips a plain optimizer's step
    assert opt.state == {} or all(s["step"] == 0 for s in opt.state.values())
    assert torch.equal(params_of(model)[0], params_of(mlp())[0])


@pytest.mark.parametrize("method", sorted(METHODS))
def test_fp16_autocast_step_matches_the_fp32_step(method):
    x, y = batch(torch.float32, n=64)
    extra = {"seed": 5} if method in ("nso", "rwp", "nso_one_sided_clean") else {}
    models = [mlp(dtype=torch.float32) for _ in range(2)]
    opts = [METHODS[method](m.parameters(), lr=0.1, momentum=0.9, **extra) for m in models]
    amp = torch.amp.GradScaler("cpu")
    for _ in range(3):
        opts[0].step(amp_closure(models[0], opts[0], x, y, None))
        opts[1].step(amp_closure(models[1], opts[1], x, y, amp, autocast=True), scaler=amp)
        amp.update()
        for p, q in zip(models[0].parameters(), models[1].parameters(), strict=True):
            # fp16 has a 2**-11 relative rounding step: gradients agree to a few of those
            error = (p.grad - q.grad).norm() / p.grad.norm()
            assert 0 < error < 4e-3
            torch.testing.assert_close(q, p, rtol=0, atol=1e-4)
    assert amp.get_scale() == 2.0**16


def test_scaler_step_with_a_closure_raises_naming_the_recipe():
    x, y = batch()
    model = mlp()
    weights = params_of(model)
    opt = NSO(model.parameters(), sigma=0.1, lr=0.1)
    amp = scaler()
    closure = amp_closure(model, opt, x, y, amp)
    amp.scale(torch.ones(()))  # any earlier use of the scaler; else torch asserts first
    with pytest.raises(TypeError, match=re.escape("optimizer.step(closure, scaler=scaler)")):
        amp.step(opt, closure)
    assert all(torch.equal(p, w) for p, w in zip(model.parameters(), weights, strict=True))
    opt.step(closure, scaler=amp)  # the recipe still works afterwards
    amp.update()
    assert not torch.equal(params_of(model)[0], weights[0])
    assert amp.get_scale() == 2.0**16
    with pytest.raises(TypeError, match="torch.amp.GradScaler"):
        opt.step(closure, scaler=object())


def test_forgetting_scaler_update_is_an_error_and_leaves_w():
    x, y = batch()
    model = mlp()
    opt = SAM(model.parameters(), lr=0.1)
    amp = scaler()
    opt.step(amp_closure(model, opt, x, y, amp), scaler=amp)
    weights = params_of(model)
    with pytest.raises(RuntimeError, match=re.escape("Call scaler.update() after every")):
        opt.step(amp_closure(model, opt, x, y, amp), scaler=amp)
    assert all(torch.equal(p, w) for p, w in zip(model.parameters(), weights, strict=True))


# ---------------------------------------------------------------------------------------- DDP


DDP_METHODS = ("nso", "sam", "nso_independent", "nso_amp", "sam_amp")
#: the *_amp runs use a GradScaler; at step AMP_POISON_STEP only rank 1's first pass overflows
AMP_POISON_STEP = 1


def _ddp_worker(rank: int, world_size: int, store: str, out: str) -> None:
    import datetime
    import gc

    import torch.distributed as dist
    from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank,
                            world_size=world_size, timeout=datetime.timedelta(seconds=60))
    def run(method: str) -> None:
        ddp = nn.parallel.DistributedDataParallel(mlp())
        reduces = []

        def counting_hook(state, bucket, reduces=reduces):
            reduces.append(1)
            return allreduce_hook(None, bucket)

        ddp.register_comm_hook(None, counting_hook)
        opt = ddp_optimizer(method, ddp.parameters(), ddp)
        x, y = batch(n=16)
        shard = slice(rank * 8, (rank + 1) * 8)
        calls: list = []
        amp = scaler() if method.endswith("_amp") else None
        for step in range(3):
            poisoned = amp is not None and step == AMP_POISON_STEP and rank == 1
            closure = amp_closure(ddp, opt, x[shard], y[shard], amp,
                                  poison_pass=0 if poisoned else None)

            def recording(closure=closure):
                calls.append(params_of(ddp.module))
                return closure()

            opt.step(recording, scaler=amp)
            if amp is not None:
                amp.update()
        in_steps = len(reduces)
        nn.functional.cross_entropy(ddp(x[shard]), y[shard]).backward()  # counted
        torch.save({"weights": params_of(ddp.module), "reduces": in_steps,
                    "after_plain_backward": len(reduces), "first_point": calls[0],
                    "scale": 0.0 if amp is None else amp.get_scale()},
                   f"{out}/{method}-rank{rank}.pt")

    try:
        for method in DDP_METHODS:
            run(method)
    finally:
        # every DDP wrapper (its reducer holds the group) is gone before the group is
        # destroyed; otherwise gloo may abort the process at exit ("terminate called without
        # an active exception")
        gc.collect()
        dist.barrier()
        dist.destroy_process_group()


def ddp_optimizer(method, params, model):
    if method.startswith("sam"):
        return SAM(params, rho=0.1, lr=0.1, momentum=0.9, model=model)
    return NSO(params, sigma=0.1, num_perturbs=2, seed=3, lr=0.1, momentum=0.9, model=model,
               independent_noise=method == "nso_independent")


@pytest.fixture(scope="module")
def ddp_results(tmp_path_factory) -> dict[str, list[dict]]:
    """One 2-process gloo run (spawned, at most 120 s) of every method in DDP_METHODS."""
    import time

    import torch.multiprocessing as mp

    out = tmp_path_factory.mktemp("ddp")
    context = mp.spawn(_ddp_worker, args=(2, str(out / "store"), str(out)), nprocs=2,
                       join=False)
    deadline = time.monotonic() + 120
    while not context.join(timeout=1):
        if time.monotonic() > deadline:
            for process in context.processes:
                process.kill()
            pytest.fail("DDP workers did not finish in 120 s")
    return {m: [torch.load(out / f"{m}-rank{r}.pt", weights_only=True) for r in range(2)]
            for m in DDP_METHODS}


@pytest.mark.parametrize("method", DDP_METHODS)
def test_ddp_two_processes_match_one_process_without_inner_reduces(ddp_results, method):
    ranks = ddp_results[method]
    for result in ranks:
        assert result["reduces"] == 0  # inner passes ran in no_sync: DDP reduced nothing
        assert result["after_plain_backward"] > 0  # ... and the counter does see reductions
    for p, q in zip(ranks[0]["weights"], ranks[1]["weights"], strict=True):
        assert torch.equal(p, q)  # replicas never drift apart
    same_noise = all(torch.equal(p, q) for p, q in
                     zip(ranks[0]["first_point"], ranks[1]["first_point"], strict=True))
    assert same_noise == (method != "nso_independent")
    if method == "nso_independent":
        return
    model = mlp()
    opt = ddp_optimizer(method, model.parameters(), None)
    x, y = batch(n=16)
    amp = scaler() if method.endswith("_amp") else None
    for step in range(3):  # with a scaler: the step that overflowed on one rank is skipped
        poison = 0 if step == AMP_POISON_STEP and amp is not None else None
        opt.step(amp_closure(model, opt, x, y, amp, poison_pass=poison), scaler=amp)
        if amp is not None:
            amp.update()
    if amp is not None:
        assert [r["scale"] for r in ranks] == [2.0**15] * 2  # lowered on every rank
    for p, q in zip(model.parameters(), ranks[0]["weights"], strict=True):
        torch.testing.assert_close(p.detach(), q, rtol=0, atol=1e-12)
