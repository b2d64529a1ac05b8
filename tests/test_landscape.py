"""Loss-landscape slices: exact against direct evaluation of a perturbed copy of the model."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

from flatlab import landscape as L


class TinyCNN(nn.Module):
    """Conv + BatchNorm + GroupNorm + LayerNorm + Linear: every kind of parameter."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 4, 3)
        self.bn = nn.BatchNorm2d(4)
        self.gn = nn.GroupNorm(2, 4)
        self.fc = nn.Linear(4 * 4 * 4, 6)
        self.ln = nn.LayerNorm(6)
        self.head = nn.Linear(6, 3)

    def forward(self, x):
        h = torch.relu(self.gn(self.bn(self.conv(x))))
        return self.head(torch.tanh(self.ln(self.fc(h.flatten(1)))))


def _cnn_and_data(seed=0, n=22, batch=8):
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = TinyCNN()
    x = torch.randn(n, 2, 6, 6, generator=gen)
    y = torch.randint(0, 3, (n,), generator=gen)
    model.train()
    with torch.no_grad():  # non-trivial running statistics
        model(x * 2 + 1)
    model.eval()
    data = [(x[i:i + batch], y[i:i + batch]) for i in range(0, n, batch)]
    return model, data


def _direct(model, data, loss_fn, directions=(), coefs=(), *, mode="eval", update_bn=False):
    """Loss and accuracy of a deep copy of the model moved to W + sum c_j d_j."""
    m = copy.deepcopy(model)
    with torch.no_grad():
        for name, p in m.named_parameters():
            for d, c in zip(directions, coefs, strict=True):
                if name in d:
                    p.add_(c * d[name])
    if update_bn:
        m.eval()
        for mod in m.modules():
            if isinstance(mod, nn.modules.batchnorm._BatchNorm):
                mod.train()
        torch.optim.swa_utils.update_bn(data, m)
    m.train(mode == "train")
    total, correct, count = 0.0, 0, 0
    with torch.no_grad():
        for x, y in data:
            out = m(x)
            total += len(y) * float(loss_fn(out, y).to(torch.float64))
            if not y.is_floating_point():
                correct += int((out.argmax(-1) == y).sum())
            count += len(y)
    return total / count, correct / count, m


def _snapshot(model):
    return ({k: v.clone() for k, v in model.state_dict().items()},
            [(name, m.training, getattr(m, "momentum", None)) for name, m in model.named_modules()])


def _assert_unchanged(model, snap):
    state, flags = snap
    now = model.state_dict()
    assert now.keys() == state.keys()
    for k, v in state.items():
        assert torch.equal(now[k], v), k
    assert [(n, m.training, getattr(m, "momentum", None))
            for n, m in model.named_modules()] == flags


# --------------------------------------------------------------------------- directions


def test_filter_normalised_direction_matches_weight_filter_norms():
    model, _ = _cnn_and_data()
    d = L.random_direction(model, generator=torch.Generator().manual_seed(3))
    assert d.keys() == dict(model.named_parameters()).keys()
    zero = {"conv.bias", "bn.weight", "bn.bias", "gn.weight", "gn.bias", "fc.bias", "ln.weight",
            "ln.bias", "head.bias"}
    assert L.excluded_parameter_names(model) == zero
    for name, p in model.named_parameters():
        if name in zero:
            assert torch.count_nonzero(d[name]) == 0, name
        else:
            w_norm = p.detach().flatten(1).norm(dim=1)
            d_norm = d[name].flatten(1).norm(dim=1)
            torch.testing.assert_close(d_norm, w_norm, rtol=1e-6, atol=0)
            assert d[name].shape == p.shape


def test_include_bias_bn_normalises_whole_tensor_and_keeps_weight_draws():
    model, _ = _cnn_and_data()
    with torch.no_grad():
        model.bn.weight.uniform_(0.5, 2.0)
    plain = L.random_direction(model, generator=torch.Generator().manual_seed(3))
    full = L.random_direction(model, generator=torch.Generator().manual_seed(3),
                              include_bias_bn=True)
    for name, p in model.named_parameters():
        if name in L.excluded_parameter_names(model):
            torch.testing.assert_close(full[name].norm(), p.detach().norm(), rtol=1e-6, atol=1e-9)
        else:
            assert torch.equal(full[name], plain[name])


def test_directions_are_deterministic_given_a_generator():
    model, _ = _cnn_and_data()
    a = L.random_direction(model, generator=torch.Generator().manual_seed(5))
    b = L.random_direction(model, generator=torch.Generator().manual_seed(5))
    c = L.random_direction(model, generator=torch.Generator().manual_seed(6))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["conv.weight"], c["conv.weight"])
    raw = L.random_direction(model, generator=torch.Generator().manual_seed(5),
                             filter_normalize=False)
    # unnormalised draw: the filter-normalised direction is a per-filter rescaling of it
    ratio = a["fc.weight"] / raw["fc.weight"]
    torch.testing.assert_close(ratio, ratio[:, :1].expand_as(ratio))


def test_eigenvector_direction_splits_by_operator_layout():
    class FakeOp:
        param_names = ["fc.weight", "head.bias"]
        param_shapes = [torch.Size([6, 64]), torch.Size([3])]

    v = torch.arange(6 * 64 + 3, dtype=torch.float64)
    d = L.eigenvector_direction(FakeOp(), v)
    assert list(d) == FakeOp.param_names
    assert torch.equal(d["fc.weight"], v[:384].reshape(6, 64))
    assert torch.equal(d["head.bias"], v[384:])
    with pytest.raises(ValueError, match="does not match"):
        L.eigenvector_direction(FakeOp(), v[:-1])


# --------------------------------------------------------------------------- slices


@pytest.mark.parametrize("vectorize", ["loop", "vmap"])
def test_slice_at_zero_equals_model_loss(vectorize):
    model, data = _cnn_and_data()
    loss_fn = nn.CrossEntropyLoss()
    d = L.random_direction(model, generator=torch.Generator().manual_seed(0))
    out = L.slice_1d(model, loss_fn, data, d, [0.0, 0.5], vectorize=vectorize)
    loss, acc, _ = _direct(model, data, loss_fn)
    if vectorize == "loop":
        assert out["loss"][0].item() == loss  # bit for bit: same ops, same weights
    else:
        assert out["loss"][0].item() == pytest.approx(loss, rel=1e-6)
    assert out["accuracy"][0].item() == acc


def test_slice_1d_of_linear_least_squares_is_exact_parabola():
    """Linear model + MSE: the loss along any line is a parabola; the slice must match both a
    perturbed copy and the parabola through three of its points."""
    gen = torch.Generator().manual_seed(1)
    model = nn.Linear(5, 2).double()
    x = torch.randn(30, 5, generator=gen, dtype=torch.float64)
    y = torch.randn(30, 2, generator=gen, dtype=torch.float64)
    data = [(x[:16], y[:16]), (x[16:], y[16:])]  # unequal batches: weighting by n_b / N
    loss_fn = nn.MSELoss()
    d = L.random_direction(model, generator=gen, include_bias_bn=True)
    alphas = torch.tensor([-1.0, -0.3, 0.0, 0.4, 1.0, 2.5], dtype=torch.float64)
    out = L.slice_1d(model, loss_fn, data, d, alphas)
    for a, got in zip(alphas.tolist(), out["loss"].tolist(), strict=True):
        assert got == pytest.approx(_direct(model, data, loss_fn, [d], [a])[0], rel=1e-10)
    coef = torch.linalg.solve(torch.vander(alphas[[0, 2, 4]], 3), out["loss"][[0, 2, 4]])
    torch.testing.assert_close(torch.vander(alphas, 3) @ coef, out["loss"], rtol=1e-10, atol=0)
    assert torch.isnan(out["accuracy"]).all()  # regression: no accuracy


@pytest.mark.parametrize("vectorize", ["loop", "vmap"])
def test_slice_2d_matches_direct_evaluation(vectorize):
    model, data = _cnn_and_data()
    loss_fn = nn.CrossEntropyLoss()
    gen = torch.Generator().manual_seed(2)
    dx, dy = L.random_direction(model, generator=gen), L.random_direction(model, generator=gen)
    alphas, betas = [-0.5, 0.0, 0.8], [-0.25, 0.6]
    out = L.slice_2d(model, loss_fn, data, dx, dy, alphas, betas, vectorize=vectorize,
                     chunk_size=4)
    assert out["loss"].shape == (3, 2) and out["accuracy"].shape == (3, 2)
    for i, a in enumerate(alphas):
        for j, b in enumerate(betas):
            loss, acc, _ = _direct(model, data, loss_fn, [dx, dy], [a, b])
            assert out["loss"][i, j].item() == pytest.approx(loss, rel=1e-6)
            assert out["accuracy"][i, j].item() == acc


@pytest.mark.parametrize("mode,bn",
                         [("eval", "stored"), ("eval", "recompute"), ("train", "stored")])
def test_vmap_and_loop_agree(mode, bn):
    model, data = _cnn_and_data(seed=4)
    loss_fn = nn.CrossEntropyLoss()
    d = L.random_direction(model, generator=torch.Generator().manual_seed(1))
    alphas = torch.linspace(-1, 1, 7)
    loop = L.slice_1d(model, loss_fn, data, d, alphas, mode=mode, bn=bn, vectorize="loop")
    for chunk in (1, 3, 16):
        vm = L.slice_1d(model, loss_fn, data, d, alphas, mode=mode, bn=bn, vectorize="vmap",
                        chunk_size=chunk)
        torch.testing.assert_close(vm["loss"], loop["loss"], rtol=1e-6, atol=0)
        torch.testing.assert_close(vm["accuracy"], loop["accuracy"], rtol=0, atol=0)


def test_train_mode_matches_copy_in_train_mode():
    model, data = _cnn_and_data(seed=5)
    loss_fn = nn.CrossEntropyLoss()
    d = L.random_direction(model, generator=torch.Generator().manual_seed(1))
    out = L.slice_1d(model, loss_fn, data, d, [0.0, 0.7], mode="train")
    for k, a in enumerate([0.0, 0.7]):
        loss, acc, _ = _direct(model, data, loss_fn, [d], [a], mode="train")
        assert out["loss"][k].item() == pytest.approx(loss, rel=1e-6)
    # batch statistics differ from the stored ones: the two modes must give different numbers
    assert out["loss"][0].item() != pytest.approx(_direct(model, data, loss_fn)[0], rel=1e-4)


def test_model_unchanged_by_slices():
    model, data = _cnn_and_data(seed=6)
    model.train()
    model.gn.eval()  # a mixed set of flags must come back exactly
    model.bn.momentum = 0.3
    snap = _snapshot(model)
    loss_fn = nn.CrossEntropyLoss()
    gen = torch.Generator().manual_seed(0)
    d, e = L.random_direction(model, generator=gen), L.random_direction(model, generator=gen)
    for vectorize in ("loop", "vmap"):
        for mode, bn in (("eval", "stored"), ("eval", "recompute"), ("train", "stored")):
            L.slice_1d(model, loss_fn, data, d, [-1.0, 1.0], mode=mode, bn=bn,
                       vectorize=vectorize)
            _assert_unchanged(model, snap)
        L.slice_2d(model, loss_fn, data, d, e, [0.5], [0.5], vectorize=vectorize)
        _assert_unchanged(model, snap)
    other = {k: v + 1 if v.is_floating_point() else v for k, v in model.state_dict().items()}
    L.interpolate(model, model.state_dict(), other, loss_fn, data, [0.5], bn="recompute")
    L.recompute_bn_stats(model, data, direction=d, alpha=0.5)
    _assert_unchanged(model, snap)


def test_bn_recompute_equals_update_bn_on_a_copy():
    model, data = _cnn_and_data(seed=7)
    loss_fn = nn.CrossEntropyLoss()
    d = L.random_direction(model, generator=torch.Generator().manual_seed(1))
    stats = L.recompute_bn_stats(model, data, direction=d, alpha=0.8)
    _, _, ref = _direct(model, data, loss_fn, [d], [0.8], update_bn=True)
    for name, buf in ref.named_buffers():
        torch.testing.assert_close(stats[name], buf, rtol=1e-6, atol=1e-7)
    assert not torch.allclose(stats["bn.running_mean"], model.bn.running_mean)
    out = L.slice_1d(model, loss_fn, data, d, [0.0, 0.8], bn="recompute")
    for k, a in enumerate([0.0, 0.8]):
        loss, acc, _ = _direct(model, data, loss_fn, [d], [a], update_bn=True)
        assert out["loss"][k].item() == pytest.approx(loss, rel=1e-5)
        assert out["accuracy"][k].item() == acc


def test_interpolation_endpoints_equal_each_state_and_midpoint_matches():
    model_a, data = _cnn_and_data(seed=8)
    model_b, _ = _cnn_and_data(seed=9)
    loss_fn = nn.CrossEntropyLoss()
    sa, sb = model_a.state_dict(), model_b.state_dict()
    out = L.interpolate(model_a, sa, sb, loss_fn, data, [0.0, 0.5, 1.0], vectorize="loop")
    assert out["loss"][0].item() == _direct(model_a, data, loss_fn)[0]
    assert out["loss"][2].item() == _direct(model_b, data, loss_fn)[0]
    mid = copy.deepcopy(model_a)
    mid.load_state_dict({k: (0.5 * sa[k] + 0.5 * sb[k]) if sa[k].is_floating_point() else sa[k]
                         for k in sa})
    assert out["loss"][1].item() == pytest.approx(_direct(mid, data, loss_fn)[0], rel=1e-6)
    vm = L.interpolate(model_a, sa, sb, loss_fn, data, [0.0, 0.5, 1.0], vectorize="vmap")
    torch.testing.assert_close(vm["loss"], out["loss"], rtol=1e-6, atol=0)
    with pytest.raises(ValueError, match="lacks"):
        L.interpolate(model_a, sa, {k: v for k, v in sb.items() if k != "fc.weight"}, loss_fn,
                      data, [0.5])


def test_eigenvector_slice_matches_direct():
    model, data = _cnn_and_data(seed=10)
    loss_fn = nn.CrossEntropyLoss()

    class Op:  # an operator over two of the parameters only
        param_names = ["fc.weight", "head.weight"]
        param_shapes = [model.fc.weight.shape, model.head.weight.shape]

    v = torch.randn(sum(math.prod(s) for s in Op.param_shapes), generator=torch.Generator()
                    .manual_seed(0))
    d = L.eigenvector_direction(Op(), v / v.norm())
    out = L.slice_1d(model, loss_fn, data, d, [0.0, 2.0])
    assert out["loss"][1].item() == pytest.approx(_direct(model, data, loss_fn, [d], [2.0])[0],
                                                  rel=1e-6)


def test_dropout_in_train_mode_falls_back_to_the_loop():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Dropout(0.5), nn.Linear(8, 3))
    x, y = torch.randn(10, 4), torch.randint(0, 3, (10,))
    d = L.random_direction(model, generator=torch.Generator().manual_seed(0))
    with pytest.raises(RuntimeError):
        L.slice_1d(model, nn.CrossEntropyLoss(), (x, y), d, [0.0, 1.0], mode="train",
                   vectorize="vmap")
    out = L.slice_1d(model, nn.CrossEntropyLoss(), (x, y), d, [0.0, 1.0], mode="train")
    assert torch.isfinite(out["loss"]).all()
    # eval mode: dropout off, deterministic, vmap works
    a = L.slice_1d(model, nn.CrossEntropyLoss(), (x, y), d, [0.0, 1.0])
    b = L.slice_1d(model, nn.CrossEntropyLoss(), (x, y), d, [0.0, 1.0], vectorize="loop")
    torch.testing.assert_close(a["loss"], b["loss"], rtol=1e-6, atol=0)


class CountingBatches:
    """A re-iterable data source that records how often it was iterated."""

    def __init__(self, batches):
        self.batches, self.passes = batches, 0

    def __iter__(self):
        self.passes += 1
        yield from self.batches


def test_streams_batches_one_pass_per_chunk():
    model, data = _cnn_and_data()
    source = CountingBatches(data)
    d = L.random_direction(model, generator=torch.Generator().manual_seed(0))
    out = L.slice_1d(model, nn.CrossEntropyLoss(), source, d, torch.linspace(-1, 1, 10),
                     chunk_size=4, vectorize="vmap")
    assert source.passes == 3  # ceil(10 / 4) chunks, each one pass over the data
    L.slice_1d(model, nn.CrossEntropyLoss(), source, d, torch.linspace(-1, 1, 10),
               vectorize="loop")
    assert source.passes == 3 + 10
    ref = L.slice_1d(model, nn.CrossEntropyLoss(), data, d, torch.linspace(-1, 1, 10))
    torch.testing.assert_close(out["loss"], ref["loss"], rtol=1e-6, atol=0)
    with pytest.raises(TypeError, match="re-iterable"):
        L.slice_1d(model, nn.CrossEntropyLoss(), iter(data), d, [0.0])


def test_rejects_bad_arguments():
    model, data = _cnn_and_data()
    loss_fn = nn.CrossEntropyLoss()
    d = L.random_direction(model)
    with pytest.raises(ValueError, match="mode"):
        L.slice_1d(model, loss_fn, data, d, [0.0], mode="test")
    with pytest.raises(ValueError, match="recompute"):
        L.slice_1d(model, loss_fn, data, d, [0.0], mode="train", bn="recompute")
    with pytest.raises(ValueError, match="not a parameter"):
        L.slice_1d(model, loss_fn, data, {"nope": torch.zeros(1)}, [0.0])
    with pytest.raises(ValueError, match="shape"):
        L.slice_1d(model, loss_fn, data, {"fc.weight": torch.zeros(2, 2)}, [0.0])


# --------------------------------------------------------------------------- distributed


def test_distributed_needs_a_process_group():
    # the 2-process equality (points split across ranks, results gathered) is tested end to end
    # in tests/test_analyze.py::test_two_processes_give_the_single_process_analysis
    model, data = _cnn_and_data()
    d = L.random_direction(model, generator=torch.Generator().manual_seed(1))
    with pytest.raises(ValueError, match="initialised"):
        L.slice_1d(model, nn.CrossEntropyLoss(), data, d, [0.0], distributed=True)


# --------------------------------------------------------------------------- forward= and batches


@pytest.mark.parametrize("vectorize", ["loop", "vmap"])
def test_forward_with_dict_batches_and_extras_equals_plain_batches(vectorize):
    model, data = _cnn_and_data(seed=3)
    loss_fn = nn.CrossEntropyLoss()
    d = L.random_direction(model, generator=torch.Generator().manual_seed(4))
    dicts = [({"image": x, "unused": torch.zeros(len(y))}, y, "extra") for x, y in data]
    forward = lambda m, x: m(x["image"])  # noqa: E731
    for bn in ("stored", "recompute"):
        plain = L.slice_1d(model, loss_fn, data, d, [0.0, 0.6], bn=bn, vectorize=vectorize)
        mapped = L.slice_1d(model, loss_fn, dicts, d, [0.0, 0.6], bn=bn, vectorize=vectorize,
                            forward=forward)
        assert torch.equal(plain["loss"], mapped["loss"])
        assert torch.equal(plain["accuracy"], mapped["accuracy"])
    stats = L.recompute_bn_stats(model, dicts, direction=d, alpha=0.6, forward=forward)
    reference = L.recompute_bn_stats(model, data, direction=d, alpha=0.6)
    assert stats.keys() == reference.keys()
    assert all(torch.equal(stats[n], reference[n]) for n in stats)
    with pytest.raises(TypeError, match="forward must be a callable"):
        L.slice_1d(model, loss_fn, dicts, d, [0.0], forward="image")
