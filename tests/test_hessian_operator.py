"""HessianOperator against exact Hessians (torch.func.hessian of the flattened loss)."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse.linalg
import torch
from torch import nn
from torch.func import functional_call

from flatlab.errors import FlatlabError
from flatlab.hessian import HessianOperator, top_eigenvalues

BATCH_SIZES = (7, 3, 10)  # unequal on purpose: weights must be n_b / N
CE = nn.CrossEntropyLoss()
# the three ways to form products: streamed forward-over-reverse, streamed double backward,
# and double backward from cached graphs
PATHS = {"forward": {"backend": "forward", "cache": False},
         "double_backward": {"backend": "double_backward", "cache": False},
         "cached": {"backend": "double_backward", "cache": True}}


class WithUnused(nn.Module):
    """A model with a parameter and a submodule that the forward pass never touches."""

    def __init__(self) -> None:
        super().__init__()
        self.used = nn.Linear(5, 3)
        self.idle = nn.Linear(4, 2)
        self.offset = nn.Parameter(torch.randn(3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.used(x))


def make_case(name: str, *, samples: int = 20, dtype: torch.dtype = torch.float64):
    """``(model, x, y)``: tiny float64 models whose full Hessian is cheap to form."""
    torch.manual_seed(0)
    if name == "mlp":
        model = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 3))
        shape = (5,)
    elif name == "cnn":
        model = nn.Sequential(nn.Conv2d(1, 3, 3), nn.BatchNorm2d(3), nn.ReLU(), nn.Flatten(),
                              nn.Linear(3 * 4 * 4, 3))
        bn = model[1]
        with torch.no_grad():  # non-trivial eval-mode statistics and affine parameters
            bn.running_mean.uniform_(-0.5, 0.5)
            bn.running_var.uniform_(0.5, 2.0)
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.uniform_(-0.5, 0.5)
        shape = (1, 6, 6)
    elif name == "unused":
        model = WithUnused()
        shape = (5,)
    else:
        raise ValueError(name)
    model = model.to(dtype).eval()
    x = torch.randn(samples, *shape, dtype=dtype)
    y = torch.randint(0, 3, (samples,))
    return model, x, y


def split(x: torch.Tensor, y: torch.Tensor, sizes=BATCH_SIZES) -> list[tuple]:
    return list(zip(torch.split(x, list(sizes)), torch.split(y, list(sizes)), strict=True))


def flat_loss(model: nn.Module, x, y, names=None, loss_fn=CE):
    """``(loss as a function of the flat parameter vector, current flat vector)``."""
    named = dict(model.named_parameters())
    names = list(named) if names is None else names
    shapes = [named[n].shape for n in names]
    others = {n: p.detach() for n, p in named.items() if n not in names}
    flat = torch.cat([named[n].detach().reshape(-1) for n in names])

    def loss(vector):
        pieces = torch.split(vector, [s.numel() for s in shapes])
        params = {n: t.reshape(s) for n, t, s in zip(names, pieces, shapes, strict=True)}
        buffers = {n: b.clone() for n, b in model.named_buffers()}
        return loss_fn(functional_call(model, (params, others, buffers), (x,)), y)

    return loss, flat


def exact_hessian(model: nn.Module, x, y, names=None, loss_fn=CE) -> torch.Tensor:
    """Full Hessian of ``loss_fn(model(x), y)`` (eval mode) over the named parameters."""
    loss, flat = flat_loss(model, x, y, names, loss_fn)
    saved = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        return torch.func.hessian(loss)(flat)
    finally:
        for module, training in saved:
            module.training = training


def train_mode_products(model: nn.Module, x, y, block: torch.Tensor) -> torch.Tensor:
    """``H @ block`` in train mode by reverse-over-reverse (torch.autograd.functional.hvp).

    Not torch.func.hessian: on torch 2.13 its jacfwd-of-jacrev is ~5% off for train-mode
    BatchNorm, while reverse-over-reverse agrees with both flatlab backends to 1e-15.
    """
    loss, flat = flat_loss(model, x, y)
    saved = [(m, m.training) for m in model.modules()]
    model.train()
    try:
        return torch.stack([torch.autograd.functional.hvp(loss, flat, col)[1]
                            for col in block.T], dim=1)
    finally:
        for module, training in saved:
            module.training = training


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.linalg.norm(a - b) / torch.linalg.norm(b))


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("name", ["mlp", "cnn", "unused"])
def test_matvec_single_and_block_match_exact_hessian(name, path):
    model, x, y = make_case(name)
    hessian = exact_hessian(model, x, y)
    op = HessianOperator(model, CE, split(x, y), **PATHS[path])
    assert op.size == hessian.shape[0] == sum(p.numel() for p in model.parameters())
    gen = torch.Generator().manual_seed(1)
    v = torch.randn(op.size, dtype=torch.float64, generator=gen)
    block = torch.randn(op.size, 4, dtype=torch.float64, generator=gen)
    single = op.matvec(v)
    assert single.shape == v.shape and single.dtype == torch.float64
    assert rel_err(single, hessian @ v) < 1e-10
    product = op.matvec(block)
    assert product.shape == block.shape
    assert rel_err(product, hessian @ block) < 1e-10
    assert op.num_matvecs == 5
    assert op.cached == (path == "cached")


def test_unused_parameters_give_zero_rows():
    model, x, y = make_case("unused")
    op = HessianOperator(model, CE, split(x, y))
    product = op.matvec(torch.randn(op.size, 3, dtype=torch.float64))
    rows = op.unflatten(torch.arange(op.size))
    for name in ("idle.weight", "idle.bias", "offset"):
        assert torch.count_nonzero(product[rows[name].reshape(-1)]) == 0
    assert torch.count_nonzero(product[rows["used.weight"].reshape(-1)]) > 0


def test_batches_weighted_by_size_not_averaged():
    model, x, y = make_case("mlp")
    batches = split(x, y)
    hessian = exact_hessian(model, x, y)
    v = torch.randn(hessian.shape[0], dtype=torch.float64)
    product = HessianOperator(model, CE, batches).matvec(v)
    assert rel_err(product, hessian @ v) < 1e-10
    # the unweighted mean of the batch Hessians is a different matrix: the check has teeth
    naive = sum(exact_hessian(model, bx, by) for bx, by in batches) / len(batches)
    assert rel_err(naive @ v, hessian @ v) > 1e-3


def test_single_batch_and_dataloader_inputs():
    model, x, y = make_case("mlp")
    hessian = exact_hessian(model, x, y)
    v = torch.randn(hessian.shape[0], dtype=torch.float64)
    assert rel_err(HessianOperator(model, CE, (x, y)).matvec(v), hessian @ v) < 1e-10
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=6)
    assert rel_err(HessianOperator(model, CE, loader).matvec(v), hessian @ v) < 1e-10


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("context", [torch.no_grad, torch.inference_mode])
def test_products_work_inside_no_grad_and_inference_mode(path, context):
    model, x, y = make_case("mlp")
    hessian = exact_hessian(model, x, y)
    v = torch.randn(hessian.shape[0], 2, dtype=torch.float64)
    with context():  # e.g. an evaluation script, with data made there too
        data = split(x.clone(), y.clone())
        op = HessianOperator(model, CE, data, **PATHS[path])
        product, single = op.matvec(v), op.matvec(v[:, 0])
        loss, _ = op.loss_and_gradient()
    assert rel_err(product, hessian @ v) < 1e-10 and rel_err(single, hessian @ v[:, 0]) < 1e-10
    assert loss == pytest.approx(CE(model(x), y).item(), rel=1e-12)


def test_float32_model_accumulates_in_float64_and_returns_input_dtype():
    model, x, y = make_case("mlp")
    hessian = exact_hessian(model, x, y)
    model32 = make_case("mlp", dtype=torch.float32)[0]
    op = HessianOperator(model32, CE, split(x.float(), y))
    assert op.dtype == torch.float32
    v = torch.randn(op.size, 2, dtype=torch.float64)
    assert op.matvec(v).dtype == torch.float64
    assert op.matvec(v.float()).dtype == torch.float32
    assert rel_err(op.matvec(v), hessian @ v) < 1e-5


@pytest.mark.parametrize("backend", ["forward", "double_backward"])
def test_chunked_products_equal_unchunked(backend):
    model, x, y = make_case("cnn")
    v = torch.randn(sum(p.numel() for p in model.parameters()), 3, dtype=torch.float64)
    whole = HessianOperator(model, CE, split(x, y), chunk_size=None, backend=backend,
                            cache=False).matvec(v)
    chunked = HessianOperator(model, CE, split(x, y), chunk_size=2, backend=backend,
                              cache=False).matvec(v)
    assert rel_err(chunked, whole) < 1e-12


def test_loss_and_gradient_is_the_dataset_average():
    model, x, y = make_case("cnn")
    loss, grad = HessianOperator(model, CE, split(x, y)).loss_and_gradient()
    full = CE(model(x), y)
    expected = torch.cat([g.reshape(-1) for g in torch.autograd.grad(full, model.parameters())])
    assert loss == pytest.approx(full.item(), rel=1e-12)
    assert rel_err(grad, expected) < 1e-12
    assert all(p.grad is None for p in model.parameters())  # nothing written into .grad


def test_parameter_selection_gives_the_hessian_sub_block():
    model, x, y = make_case("cnn")
    data = split(x, y)
    by_name = HessianOperator(model, CE, data, params=["4.weight", "1.weight"])
    assert by_name.param_names == ["1.weight", "4.weight"]  # the model's order
    weights = HessianOperator(model, CE, data, params="weights")
    assert weights.param_names == ["0.weight", "4.weight"]  # no biases, no BatchNorm
    predicate = HessianOperator(model, CE, data, params=lambda n, p: n.endswith("bias"))
    assert predicate.param_names == ["0.bias", "1.bias", "4.bias"]
    for op in (by_name, weights, predicate):
        hessian = exact_hessian(model, x, y, names=op.param_names)
        v = torch.randn(op.size, 2, dtype=torch.float64)
        assert rel_err(op.matvec(v), hessian @ v) < 1e-10


@pytest.mark.parametrize("path", PATHS)
def test_train_mode_uses_batch_statistics_and_leaves_the_model_alone(path):
    model, x, y = make_case("cnn")
    model.train()
    model[1].eval()  # a mixed configuration that must come back exactly
    stats = {n: b.clone() for n, b in model.named_buffers()}
    op = HessianOperator(model, CE, (x, y), mode="train", **PATHS[path])
    v = torch.randn(op.size, 2, dtype=torch.float64)
    train_products = train_mode_products(model, x, y, v)
    assert rel_err(op.matvec(v), train_products) < 1e-10
    op.loss_and_gradient()
    assert model.training and not model[1].training and model[4].training
    for name, buffer in model.named_buffers():
        assert torch.equal(buffer, stats[name]), name
    # eval mode on the same model differs (running statistics): the mode really is applied
    eval_hessian = exact_hessian(model, x, y)
    assert rel_err(HessianOperator(model, CE, (x, y)).matvec(v), eval_hessian @ v) < 1e-10
    assert rel_err(eval_hessian @ v, train_products) > 1e-3
    assert model.training and not model[1].training


def test_determinism_check_catches_train_mode_dropout():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 16), nn.Tanh(), nn.Dropout(0.5), nn.Linear(16, 3)).double()
    x, y = torch.randn(20, 5, dtype=torch.float64), torch.randint(0, 3, (20,))
    for cache in (False, True):  # the check never reads the cache
        with pytest.raises(FlatlabError, match="differ.*dropout"):
            HessianOperator(model, CE, (x, y), mode="train", check_determinism=True,
                            cache=cache)
    assert model.training  # restored after the failure too
    HessianOperator(model, CE, (x, y), mode="eval", check_determinism=True)


def test_auto_backend_falls_back_where_forward_mode_fails():
    # torch's forward-over-reverse rule for mse_loss fails ("ZeroTensors are immutable")
    model = nn.Linear(3, 1, bias=False).double()
    x = torch.randn(8, 3, dtype=torch.float64)
    data = (x, torch.randn(8, 1, dtype=torch.float64))
    eye = torch.eye(3, dtype=torch.float64)
    with pytest.raises(RuntimeError):
        HessianOperator(model, nn.MSELoss(), data, backend="forward").matvec(eye)
    op = HessianOperator(model, nn.MSELoss(), data, cache=False)
    with pytest.warns(UserWarning, match="double_backward"):
        product = op.matvec(eye)  # a block: auto tries forward-over-reverse first
    assert torch.allclose(product, 2 * x.T @ x / 8, rtol=1e-12)


def test_cache_follows_in_place_changes_of_the_model():
    model, x, y = make_case("cnn")
    op = HessianOperator(model, CE, split(x, y))  # eval mode, tiny: auto caches
    v = torch.randn(op.size, 2, dtype=torch.float64)
    op.matvec(v)
    assert op.cached
    loss, grad = op.loss_and_gradient()  # served from the cache
    uncached = HessianOperator(model, CE, split(x, y), cache=False)
    assert loss == pytest.approx(uncached.loss_and_gradient()[0], rel=1e-12)
    assert rel_err(grad, uncached.loss_and_gradient()[1]) < 1e-12
    with torch.no_grad():  # an optimizer step, a load_state_dict: in place
        model[4].weight.mul_(1.5)
        model[1].running_var.add_(0.5)
    assert rel_err(op.matvec(v), exact_hessian(model, x, y) @ v) < 1e-10
    assert op.loss_and_gradient()[0] == pytest.approx(CE(model(x), y).item(), rel=1e-12)


def test_cache_auto_respects_the_memory_budget_and_train_mode():
    model, x, y = make_case("mlp")
    hessian = exact_hessian(model, x, y)
    v = torch.randn(hessian.shape[0], dtype=torch.float64)
    small = HessianOperator(model, CE, split(x, y), cache_bytes=1000)
    assert rel_err(small.matvec(v), hessian @ v) < 1e-10 and not small.cached
    train = HessianOperator(model, CE, split(x, y), mode="train")
    train.matvec(v)
    assert not train.cached  # train mode may be random: never cached unless asked
    op = HessianOperator(model, CE, split(x, y))
    op.matvec(v)
    assert op.cached
    op.clear_cache()
    assert not op.cached


def test_unflatten_and_flatten_round_trip():
    model, x, y = make_case("cnn")
    op = HessianOperator(model, CE, (x, y))
    vector = op.parameters_vector()
    pieces = op.unflatten(vector)
    assert list(pieces) == op.param_names
    assert all(pieces[n].shape == s for n, s in zip(op.param_names, op.param_shapes, strict=True))
    assert torch.equal(pieces["4.weight"], model[4].weight.detach())
    assert torch.equal(op.flatten(pieces), vector)


def test_bad_inputs_raise_one_line_errors():
    model, x, y = make_case("mlp")
    with pytest.raises(FlatlabError, match="unknown parameter name.*'nope'.*0.weight"):
        HessianOperator(model, CE, (x, y), params=["nope"])
    with pytest.raises(FlatlabError, match="selects nothing"):
        HessianOperator(model, CE, (x, y), params=lambda n, p: False)
    with pytest.raises(FlatlabError, match="mode='test'.*eval, train"):
        HessianOperator(model, CE, (x, y), mode="test")
    # a wrong kind of object is a TypeError, in hessian and landscape alike
    with pytest.raises(TypeError, match="re-iterable.*one-shot iterator"):
        HessianOperator(model, CE, iter(split(x, y)))
    with pytest.raises(FlatlabError, match="torch.distributed"):
        HessianOperator(model, CE, (x, y), distributed=True)
    with pytest.raises(FlatlabError, match="chunk_size"):
        HessianOperator(model, CE, (x, y), mode="train", chunk_size=4)
    with pytest.raises(FlatlabError, match="cache"):
        HessianOperator(model, CE, (x, y), backend="forward", cache=True)
    op = HessianOperator(model, CE, (x, y))
    with pytest.raises(FlatlabError, match=r"matvec expects shape \(75,\)"):
        op.matvec(torch.zeros(74))
    with pytest.raises(FlatlabError, match="no samples"):
        HessianOperator(model, CE, []).matvec(torch.zeros(op.size))


def test_to_scipy_gives_float64_products_and_blocks_in_one_pass():
    model, x, y = make_case("cnn")
    hessian = exact_hessian(model, x, y)
    op = HessianOperator(model.float(), CE, split(x.float(), y))
    calls = []
    matvec = op.matvec
    op.matvec = lambda v: calls.append(tuple(v.shape)) or matvec(v)
    linear = op.to_scipy()
    assert linear.shape == (op.size, op.size) and linear.dtype == np.float64
    gen = np.random.default_rng(0)
    v, block = gen.standard_normal(op.size), gen.standard_normal((op.size, 4))
    single, product = linear.matvec(v), linear.matmat(block)
    assert single.dtype == product.dtype == np.float64
    assert calls == [(op.size,), (op.size, 4)]  # the block is one product call
    assert rel_err(torch.from_numpy(single), hessian @ torch.from_numpy(v)) < 1e-6
    assert rel_err(torch.from_numpy(product), hessian @ torch.from_numpy(block)) < 1e-6
    assert np.array_equal(linear.rmatvec(v), linear.matvec(v))  # symmetric


def test_scipy_eigsh_agrees_with_top_eigenvalues_and_the_dense_hessian():
    model, x, y = make_case("mlp", samples=40)
    hessian = exact_hessian(model, x, y)
    op = HessianOperator(model, CE, split(x, y, (15, 25)))
    values = np.sort(scipy.sparse.linalg.eigsh(op.to_scipy(), k=3, which="LA")[0])[::-1]
    exact = torch.linalg.eigvalsh(hessian).flip(0)[:3].numpy()
    np.testing.assert_allclose(values, exact, rtol=1e-10)
    ours = top_eigenvalues(op, k=3, tol=1e-10).eigenvalues.numpy()
    np.testing.assert_allclose(ours, values, rtol=1e-10)


class TwoInputs(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(5, 3), nn.Linear(2, 3)

    def forward(self, first: torch.Tensor, second: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.a(first)) * self.b(second)


@pytest.mark.parametrize("path", PATHS)
def test_forward_with_tuple_and_dict_inputs_gives_the_exact_hessian(path):
    torch.manual_seed(0)
    model = TwoInputs().double()
    first, second = torch.randn(20, 5, dtype=torch.float64), torch.randn(20, 2, dtype=torch.float64)
    y = torch.randint(0, 3, (20,))
    params = dict(model.named_parameters())
    flat = torch.cat([p.detach().reshape(-1) for p in params.values()])

    def loss(vector):
        pieces = torch.split(vector, [p.numel() for p in params.values()])
        named = {n: t.reshape(p.shape) for (n, p), t in zip(params.items(), pieces, strict=True)}
        return CE(functional_call(model, named, (first, second)), y)

    hessian = torch.func.hessian(loss)(flat)
    gen = torch.Generator().manual_seed(1)
    block = torch.randn(flat.numel(), 3, dtype=torch.float64, generator=gen)
    tuples = [((f, s), t) for f, s, t in zip(first.split(list(BATCH_SIZES)),
                                             second.split(list(BATCH_SIZES)),
                                             y.split(list(BATCH_SIZES)), strict=True)]
    op = HessianOperator(model, CE, tuples, forward=lambda m, x: m(*x), **PATHS[path])
    assert rel_err(op.matvec(block), hessian @ block) < 1e-10
    dicts = [({"first": f, "second": s}, t) for (f, s), t in tuples]
    op = HessianOperator(model, CE, dicts, forward=lambda m, x: m(**x), chunk_size=2,
                         **PATHS[path])
    assert rel_err(op.matvec(block), hessian @ block) < 1e-10
    assert rel_err(op.matvec(block[:, 0]), hessian @ block[:, 0]) < 1e-10
    with pytest.raises(TypeError, match="forward must be a callable"):
        HessianOperator(model, CE, dicts, forward="logits")
