"""Model registry: every entry trains on its data sets' shapes; user factories; clear errors."""

from __future__ import annotations

import sys
import textwrap

import pytest
import torch
from torch import nn

from flatlab.errors import FlatlabError
from flatlab.models import MODELS, build_model

# (model, kwargs, input shape): each registry model on the data shapes it is meant for
CASES = [
    ("mlp", {}, (40,)),                                  # mnist1d
    ("mlp", {"hidden": [16]}, (1, 8, 8)),                # digits
    ("mlp", {"hidden": []}, (20,)),                      # synthetic, logistic regression
    ("cnn1d", {}, (40,)),                                # mnist1d
    ("cnn1d", {"channels": 8}, (2, 30)),                 # multi-channel 1-D input
    ("cnn", {}, (1, 8, 8)),                              # digits
    ("cnn", {"channels": [8, 8, 8]}, (3, 32, 32)),       # cifar
    ("resnet", {"depth": 8, "width": 4}, (1, 8, 8)),     # digits
    ("resnet", {"depth": 8, "width": 4}, (3, 32, 32)),   # cifar
]


def test_registry_names():
    assert MODELS == ("mlp", "cnn1d", "cnn", "resnet")
    assert {name for name, _, _ in CASES} == set(MODELS)


@pytest.mark.parametrize("name, kwargs, shape", CASES)
def test_forward_backward_on_dataset_shapes(name, kwargs, shape):
    torch.manual_seed(0)
    model = build_model(name, shape, 7, **kwargs)
    x = torch.randn(5, *shape)
    out = model(x)
    assert out.shape == (5, 7)
    nn.functional.cross_entropy(out, torch.arange(5) % 7).backward()
    for pname, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), pname
    assert any(float(p.grad.abs().sum()) > 0 for p in model.parameters())


def test_same_seed_same_initial_weights():
    torch.manual_seed(3)
    a = build_model("resnet", (3, 8, 8), 10, depth=8, width=4)
    torch.manual_seed(3)
    b = build_model("resnet", (3, 8, 8), 10, depth=8, width=4)
    for (name, ta), tb in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        assert torch.equal(ta, tb), name


def test_cnn1d_is_mnist1d_convbase():
    """Greydanus' ConvBase on 40 features: 25 channels, lengths 40 -> 19 -> 10 -> 5, 125 -> 10."""
    model = build_model("cnn1d", (40,), 10)
    convs = [m for m in model.modules() if isinstance(m, nn.Conv1d)]
    assert [(c.in_channels, c.out_channels, c.kernel_size[0], c.stride[0]) for c in convs] == [
        (1, 25, 5, 2), (25, 25, 3, 2), (25, 25, 3, 2)]
    assert model.classifier.in_features == 125
    assert sum(p.numel() for p in model.parameters()) == 5210


def test_resnet_depth_and_batchnorm_modes():
    model = build_model("resnet", (3, 32, 32), 10)  # ResNet-20, width 16
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d) and m.kernel_size == (3, 3)]
    assert len(convs) == 19  # + the classifier = 20 weight layers
    assert sum(p.numel() for p in model.parameters()) == 272_474  # He et al.: 0.27M
    bn = next(m for m in model.modules() if isinstance(m, nn.BatchNorm2d))
    model.train()
    model(torch.randn(4, 3, 32, 32))
    assert int(bn.num_batches_tracked) == 1
    model.eval()
    model(torch.randn(4, 3, 32, 32))
    assert int(bn.num_batches_tracked) == 1  # eval mode uses, never updates, running stats


@pytest.mark.parametrize("name, shape, message", [
    ("transformer", (40,), "unknown model 'transformer'; choose one of mlp, cnn1d, cnn, resnet"),
    ("cnn", (40,), r"cnn needs image input \(C, H, W\)"),
    ("resnet", (40,), "resnet needs image input"),
    ("cnn1d", (3, 8, 8), "cnn1d needs 1-D input"),
])
def test_unsuitable_model_is_a_clear_error(name, shape, message):
    with pytest.raises(FlatlabError, match=message):
        build_model(name, shape, 10)


def test_bad_kwargs_are_named():
    with pytest.raises(FlatlabError, match="unknown argument.*widht.*accepted: depth, width"):
        build_model("resnet", (3, 8, 8), 10, widht=8)
    with pytest.raises(FlatlabError, match="depth must be 6n\\+2"):
        build_model("resnet", (3, 8, 8), 10, depth=9)
    with pytest.raises(FlatlabError, match="hidden sizes must be positive"):
        build_model("mlp", (4,), 2, hidden=[0])


@pytest.fixture
def user_module(tmp_path, monkeypatch):
    (tmp_path / "my_models.py").write_text(textwrap.dedent("""
        import math
        from torch import nn

        def linear(input_shape, num_classes, bias=True):
            return nn.Sequential(nn.Flatten(), nn.Linear(math.prod(input_shape), num_classes,
                                                         bias=bias))

        def not_a_model(input_shape, num_classes):
            return "model"

        NOT_CALLABLE = 3
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    yield "my_models"
    sys.modules.pop("my_models", None)


def test_user_factory(user_module):
    model = build_model(f"{user_module}:linear", (1, 8, 8), 10, trust_code=True, bias=False)
    assert model(torch.randn(2, 1, 8, 8)).shape == (2, 10)
    assert model[1].bias is None


@pytest.mark.parametrize("spec, message", [
    ("no_such_module_xyz:f", "cannot import 'no_such_module_xyz'"),
    ("my_models:missing", "has no 'missing'"),
    ("my_models:NOT_CALLABLE", "not callable"),
    ("my_models:not_a_model", "returned str, not a torch.nn.Module"),
    ("my_models:", "expected 'package.module:factory'"),
])
def test_bad_user_factory(user_module, spec, message):
    with pytest.raises(FlatlabError, match=message):
        build_model(spec, (4,), 2, trust_code=True)


def test_user_factory_unknown_kwarg(user_module):
    with pytest.raises(FlatlabError, match="unknown argument.*colour.*accepted: bias"):
        build_model("my_models:linear", (4,), 2, trust_code=True, colour="red")
