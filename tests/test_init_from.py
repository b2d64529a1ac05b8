"""init_from: matched tensors copied bit for bit, new heads kept fresh, missing names, prefixes."""

from __future__ import annotations

import pickle

import pytest
import torch
from safetensors.torch import save_file

from flatlab.checkpoint import choose_prefix, file_sha256, init_from, save_checkpoint
from flatlab.errors import FlatlabError
from flatlab.models import build_model


def _resnet(num_classes, seed):
    torch.manual_seed(seed)
    model = build_model("resnet", (3, 8, 8), num_classes, depth=8, width=4)
    model.train()
    model(torch.randn(4, 3, 8, 8))  # BN running statistics (buffers) move off their init
    return model


def _clone_state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


HEAD = ["head.2.weight", "head.2.bias"]


@pytest.fixture
def pretrained(tmp_path):
    source = _resnet(10, seed=0)
    path = tmp_path / "pretrained.safetensors"
    save_checkpoint(path, source, {"model": {"name": "resnet", "kwargs": {"depth": 8, "width": 4},
                                             "input_shape": [3, 8, 8], "num_classes": 10}})
    return path, _clone_state(source)


def test_new_head_keeps_its_fresh_init_every_other_tensor_is_copied(pretrained):
    path, source = pretrained
    model = _resnet(5, seed=1)
    fresh = _clone_state(model)
    report = init_from(model, path)
    after = model.state_dict()
    assert report.reinitialised == HEAD and report.missing == []
    assert report.loaded == [k for k in after if k not in HEAD]
    assert len(report.loaded) == len(after) - 2 > 30
    for name in report.loaded:  # every matched tensor, bitwise (BN buffers included)
        assert after[name].dtype == source[name].dtype
        assert torch.equal(after[name], source[name]), name
        assert after[name].data_ptr() == fresh_ptr(model, name)  # copied in place
    for name in HEAD:
        assert torch.equal(after[name], fresh[name]), name
    assert sorted(report.unused) == sorted(HEAD) and report.prefix == ""
    assert report.path == str(path) and report.sha256 == file_sha256(path)
    assert report.metadata() == {"path": str(path), "sha256": report.sha256, "prefix": "",
                                 "loaded": len(report.loaded), "reinitialised": HEAD,
                                 "missing": []}
    assert any("running_mean" in n for n in report.loaded)


def fresh_ptr(model, name):
    return dict(model.named_parameters(), **dict(model.named_buffers()))[name].data_ptr()


def test_missing_tensors_are_an_error_unless_partial(tmp_path):
    source = _resnet(10, seed=0)
    state = _clone_state(source)
    dropped = ["stem.0.weight", "stages.0.bn1.running_var"]
    for name in dropped:
        del state[name]
    path = tmp_path / "plain.safetensors"
    save_file(state, str(path))
    model = _resnet(10, seed=1)
    before = _clone_state(model)
    with pytest.raises(FlatlabError, match=r"lacks 2 of the model's tensors: stem.0.weight, "
                                           r"stages.0.bn1.running_var; pass --init-partial"):
        init_from(model, path)
    for name, tensor in model.state_dict().items():  # nothing was touched
        assert torch.equal(tensor, before[name]), name
    report = init_from(model, path, partial=True)
    assert report.missing == dropped and report.reinitialised == dropped
    after = model.state_dict()
    for name in dropped:
        assert torch.equal(after[name], before[name])
    for name in report.loaded:
        assert torch.equal(after[name], state[name]), name


@pytest.mark.parametrize("prefix", ["module.", "model.", "module.model."])
def test_prefixed_state_dicts(tmp_path, prefix):
    source = _resnet(10, seed=0)
    state = {prefix + k: v for k, v in _clone_state(source).items()}
    state["loss_fn.weight"] = torch.ones(3)  # something outside the model, as Lightning keeps
    path = tmp_path / "prefixed.safetensors"
    save_file(state, str(path))
    model = _resnet(10, seed=1)
    report = init_from(model, path)
    assert report.prefix == prefix and report.reinitialised == []
    assert report.unused == ["loss_fn.weight"]
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, state[prefix + name]), name
    explicit = init_from(_resnet(10, seed=2), path, prefix=prefix)
    assert explicit.loaded == report.loaded
    with pytest.raises(FlatlabError, match="no tensor of .* matches the model by name and shape"):
        init_from(_resnet(10, seed=2), path, prefix="")


def test_choose_prefix_prefers_the_shortest_on_ties():
    names = ["a.weight", "b.weight"]
    source = {"a.weight": 0, "b.weight": 0, "x.a.weight": 0, "x.b.weight": 0}
    assert choose_prefix(source, names) == ""
    assert choose_prefix({"x.a.weight": 0, "x.b.weight": 0, "b.weight": 0}, names) == "x."


def test_pickle_needs_trust_and_loads_only_weights(tmp_path):
    source = _resnet(10, seed=0)
    path = tmp_path / "weights.pth"
    torch.save({"state_dict": source.state_dict(), "epoch": 3}, path)
    model = _resnet(10, seed=1)
    with pytest.raises(FlatlabError, match="pickle.*refusing.*--trust-pickle"):
        init_from(model, path)
    report = init_from(model, path, trust_pickle=True)
    assert report.reinitialised == []
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, source.state_dict()[name]), name
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    evil = tmp_path / "evil.pt"
    evil.write_bytes(pickle.dumps({"weight": Payload()}, protocol=2))
    with pytest.raises(FlatlabError, match="weights_only=True"):
        init_from(model, evil, trust_pickle=True)
    assert not marker.exists()


def test_dtype_is_converted_to_the_models(tmp_path):
    torch.manual_seed(0)
    model = build_model("mlp", (4,), 3, hidden=[5])
    half = {k: v.to(torch.float16) for k, v in model.state_dict().items()}
    save_file(half, str(tmp_path / "half.safetensors"))
    target = build_model("mlp", (4,), 3, hidden=[5])
    init_from(target, tmp_path / "half.safetensors")
    for name, tensor in target.state_dict().items():
        assert tensor.dtype == torch.float32 and torch.equal(tensor, half[name].float())
