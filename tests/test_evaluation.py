"""flatlab.evaluation: the one bias rule, modes, batches and the loss at given weights, and that
hessian and landscape share them (same selection, same errors for the same bad input)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from flatlab import evaluation as E
from flatlab import landscape
from flatlab.errors import FlatlabError
from flatlab.hessian import HessianOperator, select_parameters


class Mixed(nn.Module):
    """Every kind of parameter the bias rule has to decide on."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv1d(2, 4, 3)                       # weight 3-D, bias 1-D
        self.bn = nn.BatchNorm1d(4)                          # norm layer: weight, bias
        self.act = nn.PReLU(4)                               # 1-D slope named "weight"
        self.attn = nn.MultiheadAttention(4, 2, batch_first=True)  # in_proj_bias (1-D)
        self.ln = nn.LayerNorm(4)
        self.scale = nn.Parameter(torch.ones(4))             # layer-scale vector
        self.head = nn.Linear(4, 3, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.act(self.bn(self.conv(x))).transpose(1, 2)   # (n, L, 4)
        h = self.ln(h + self.attn(h, h, h, need_weights=False)[0]) * self.scale
        return self.head(h.mean(1))


def test_bias_rule_is_dimension_or_norm_layer_and_shared_by_hessian_and_landscape():
    model = Mixed()
    expected = {"conv.bias", "bn.weight", "bn.bias", "act.weight", "attn.in_proj_bias",
                "attn.out_proj.bias", "ln.weight", "ln.bias", "scale"}
    assert E.bias_and_norm_names(model) == expected
    assert landscape.excluded_parameter_names(model) == expected
    weights = [n for n, _ in select_parameters(model, "weights")]
    assert weights == ["conv.weight", "attn.in_proj_weight", "attn.out_proj.weight",
                       "head.weight"]
    direction = landscape.random_direction(model, generator=torch.Generator().manual_seed(0))
    assert {n for n, d in direction.items() if not d.any()} == expected


def test_a_norm_layer_with_a_2d_parameter_is_still_excluded():
    class Norm2d(nn.LayerNorm):
        pass

    model = nn.Sequential(nn.Linear(3, 4), Norm2d((2, 2)))
    assert "1.weight" in E.bias_and_norm_names(model)
    assert model[1].weight.dim() == 2


def test_module_mode_sets_and_restores_every_flag_and_batchnorm_momentum():
    model = nn.Sequential(nn.Linear(3, 3), nn.BatchNorm1d(3), nn.Dropout(0.5))
    model[0].train()
    model[1].eval()
    model[1].momentum = 0.3
    model[2].train()
    before = [m.training for m in model.modules()]
    with E.module_mode(model, "bn-stats"):
        assert [m.training for m in model] == [False, True, False]
        assert model[1].momentum == 1.0
    assert [m.training for m in model.modules()] == before and model[1].momentum == 0.3
    with pytest.raises(RuntimeError), E.module_mode(model, "train"):
        assert all(m.training for m in model.modules())
        raise RuntimeError
    assert [m.training for m in model.modules()] == before


def test_batches_single_list_extras_dicts_and_size():
    x, y = torch.randn(5, 3), torch.arange(5)
    assert E.as_batches((x, y)) == [(x, y)]
    assert E.as_batches((x, y, "meta")) == [(x, y, "meta")]
    assert E.as_batches(({"a": x}, y)) == [({"a": x}, y)]
    two = [(x, y), (x, y)]
    assert E.as_batches(two) is two
    batch = next(E.iterate_batches([({"ids": x[:, 0].long(), "b": x}, y, ["f"] * 5)], None))
    assert batch.size == 5 and set(batch.x) == {"ids", "b"} and batch.y is y
    rows = E.batch_rows(batch.x, 1, 3)
    assert torch.equal(rows["b"], x[1:3])
    with pytest.raises(TypeError, match="re-iterable.*one-shot iterator"):
        E.as_batches(iter(two))
    with pytest.raises(TypeError, match="sequence"):
        next(E.iterate_batches([x], None))


def test_loss_at_given_weights_equals_the_model_at_those_weights():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()
    x, y = torch.randn(6, 3, dtype=torch.float64), torch.randint(0, 2, (6,))
    moved = {n: p.detach() + 0.1 for n, p in model.named_parameters()}
    batch = E.Batch(x, y, 6)
    loss, out = E.loss_at(model, nn.CrossEntropyLoss(), (moved,), batch)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1)
        expected = nn.functional.cross_entropy(model(x), y)
    assert torch.equal(loss, expected) and out.shape == (6, 2)
    with pytest.raises(FlatlabError, match="scalar"):
        E.loss_at(model, nn.CrossEntropyLoss(reduction="none"), (moved,), batch)


def test_extra_batch_items_are_ignored_by_hessian_and_landscape():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()
    x, y = torch.randn(9, 3, dtype=torch.float64), torch.randint(0, 2, (9,))
    plain = [(x[:4], y[:4]), (x[4:], y[4:])]
    extra = [(x[:4], y[:4], torch.arange(4), "a"), (x[4:], y[4:], torch.arange(5), "b")]
    v = torch.randn(sum(p.numel() for p in model.parameters()), 2, dtype=torch.float64)
    ce = nn.CrossEntropyLoss()
    assert torch.equal(HessianOperator(model, ce, extra).matvec(v),
                       HessianOperator(model, ce, plain).matvec(v))
    d = landscape.random_direction(model, generator=torch.Generator().manual_seed(0))
    a = landscape.slice_1d(model, ce, extra, d, [0.0, 0.5])
    b = landscape.slice_1d(model, ce, plain, d, [0.0, 0.5])
    assert torch.equal(a["loss"], b["loss"]) and torch.equal(a["accuracy"], b["accuracy"])


def test_same_bad_input_raises_the_same_class_in_hessian_and_landscape():
    model = nn.Linear(3, 2)
    data = [(torch.randn(4, 3), torch.randint(0, 2, (4,)))]
    ce = nn.CrossEntropyLoss()
    d = landscape.random_direction(model)

    def both(**kwargs):
        yield lambda: HessianOperator(model, ce, kwargs.get("data", data),
                                      mode=kwargs.get("mode", "eval"))
        yield lambda: landscape.slice_1d(model, ce, kwargs.get("data", data), d, [0.0],
                                         mode=kwargs.get("mode", "eval"))

    for call in both(mode="test"):
        with pytest.raises(FlatlabError, match=r"mode='test' is not one of eval, train"):
            call()
    for call in both(data=iter(data)):
        with pytest.raises(TypeError, match="re-iterable.*one-shot iterator"):
            call()
    not_a_pair = [torch.randn(4, 3)]
    with pytest.raises(TypeError, match="every batch must be a sequence"):
        HessianOperator(model, ce, not_a_pair).matvec(torch.zeros(8))
    with pytest.raises(TypeError, match="every batch must be a sequence"):
        landscape.slice_1d(model, ce, not_a_pair, d, [0.0])
    assert issubclass(FlatlabError, ValueError)
