"""Model registry: every entry trains on its data sets' shapes; user factories; clear errors."""

from __future__ import annotations

import importlib.util
import subprocess
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


# --------------------------------------------------------------------------- factory convention

@pytest.fixture
def conventions(tmp_path, monkeypatch):
    marker = tmp_path / "imported"
    (tmp_path / "conventions.py").write_text(textwrap.dedent(f"""
        from torch import nn
        open({str(marker)!r}, "w").write("x")
        SEEN = []

        def named(input_shape, num_classes):
            SEEN.append(("named", input_shape, num_classes))
            return nn.Linear(input_shape[-1], num_classes)

        def catch_all(num_classes, **kwargs):  # like timm.create_model: no input_shape for it
            SEEN.append(("catch_all", num_classes, kwargs))
            return nn.Linear(3, num_classes)

        def no_classes(width=2):
            return nn.Linear(3, width)
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    yield marker
    sys.modules.pop("conventions", None)


def test_input_shape_only_when_the_signature_names_it(conventions):
    build_model("conventions:named", (2, 3), 4, trust_code=True)
    build_model("conventions:catch_all", (2, 3), 5, trust_code=True, depth=7)
    seen = sys.modules["conventions"].SEEN
    assert seen == [("named", (2, 3), 4), ("catch_all", 5, {"depth": 7})]
    with pytest.raises(FlatlabError, match="'conventions:no_classes' does not accept "
                                           "num_classes="):
        build_model("conventions:no_classes", (3,), 2, trust_code=True)
    with pytest.raises(FlatlabError, match="input_shape is set by flatlab from the data"):
        build_model("conventions:named", (3,), 2, trust_code=True, input_shape=[3])


def test_factory_import_needs_consent(conventions):
    with pytest.raises(FlatlabError, match="model 'conventions:named' would import module "
                                           "'conventions' and run its code; not imported"):
        build_model("conventions:named", (3,), 2)
    assert not conventions.exists() and "conventions" not in sys.modules
    build_model("conventions:named", (3,), 2, trust_code=True)
    assert conventions.exists()


def _real(package):
    from flatlab._compat import ensure_torchvision_importable

    ensure_torchvision_importable()  # CPU torch beside a CUDA torchvision wheel
    return pytest.importorskip(package)


def test_torchvision_resnet18_random_init():
    torchvision = _real("torchvision")
    torch.manual_seed(0)
    model = build_model("torchvision.models:resnet18", (3, 32, 32), 10, trust_code=True)
    assert isinstance(model, torchvision.models.ResNet) and model.fc.out_features == 10
    assert sum(p.numel() for p in model.parameters()) == 11_181_642
    out = model.eval()(torch.randn(2, 3, 32, 32))
    assert out.shape == (2, 10) and torch.isfinite(out).all()


def test_timm_create_model_random_init():
    timm = _real("timm")
    torch.manual_seed(0)
    model = build_model("timm:create_model", (3, 32, 32), 10, trust_code=True,
                        model_name="resnet18")
    assert model.default_cfg["architecture"] == "resnet18" and model.num_classes == 10
    assert sum(p.numel() for p in model.parameters()) == 11_181_642
    assert model.eval()(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    with pytest.raises(FlatlabError, match="model 'timm:create_model'.*Unknown model"):
        build_model("timm:create_model", (3, 32, 32), 10, trust_code=True,
                    model_name="resnet_nonexistent")
    assert timm.__version__ >= "1.0"


def test_torchvision_import_workaround_in_a_fresh_process():
    """Without the workaround `import torchvision` dies on this CPU-torch machine."""
    if importlib.util.find_spec("torchvision") is None:
        pytest.skip("torchvision is not installed")
    code = ("from flatlab._compat import ensure_torchvision_importable as e; e(); e(); "
            "import torchvision, timm; print(torchvision.models.resnet18(num_classes=3).fc)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == "Linear(in_features=512, out_features=3, bias=True)"
