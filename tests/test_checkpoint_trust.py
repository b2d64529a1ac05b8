"""Code named in files runs only with consent; plain state dicts load with a given model spec."""

from __future__ import annotations

import json
import sys
import textwrap
import time

import pytest
import torch
from safetensors.torch import save_file

from flatlab.checkpoint import (
    init_from,
    load_dataset_for,
    load_model,
    read_checkpoint,
    save_checkpoint,
)
from flatlab.errors import FlatlabError
from flatlab.models import build_model

SPEC = {"name": "mlp", "kwargs": {"hidden": [8]}, "input_shape": [20], "num_classes": 4}


def _model():
    torch.manual_seed(0)
    return build_model("mlp", (20,), 4, hidden=[8])


def _same(model, reference):
    state = model.state_dict()
    assert list(state) == list(reference.state_dict())
    for name, tensor in reference.state_dict().items():
        assert torch.equal(state[name], tensor), name


@pytest.fixture
def evil(tmp_path, monkeypatch):
    """A package whose import writes a marker file, with a model and a dataset factory."""
    marker = tmp_path / "marker"
    package = tmp_path / "evil_pkg"
    package.mkdir()
    (package / "__init__.py").write_text(f"open({str(marker)!r}, 'a').write('imported\\n')\n")
    (package / "nets.py").write_text(textwrap.dedent("""
        import torch
        from flatlab.models import build_model

        def make(input_shape, num_classes, hidden=(8,)):
            return build_model("mlp", input_shape, num_classes, hidden=hidden)

        def data(seed):
            from flatlab.data import load_dataset
            return load_dataset("synthetic", seed=seed)
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    yield marker
    for name in ("evil_pkg.nets", "evil_pkg"):
        sys.modules.pop(name, None)


def _hostile(path, model_name="evil_pkg.nets:make", dataset=None):
    meta = {"model": {**SPEC, "name": model_name},
            "dataset": dataset or {"name": "synthetic", "seed": 0, "kwargs": {}}}
    save_checkpoint(path, _model(), meta)
    return path


def test_model_factory_in_a_checkpoint_needs_consent(tmp_path, evil):
    path = _hostile(tmp_path / "m.safetensors")
    with pytest.raises(FlatlabError) as info:
        load_model(path)
    assert str(info.value) == (
        f"{path} names model 'evil_pkg.nets:make', which would import module 'evil_pkg.nets' "
        f"and run its code; not imported. If you trust it, pass --trust-code "
        f"(trust_code=True in Python)")
    assert not evil.exists() and "evil_pkg" not in sys.modules
    model, _ = load_model(path, trust_code=True)
    _same(model, _model())
    assert evil.read_text() == "imported\n"


def test_naming_the_factory_yourself_is_consent(tmp_path, evil):
    path = _hostile(tmp_path / "m.safetensors")
    model, meta = load_model(path, model_spec={"name": "evil_pkg.nets:make"})
    _same(model, _model())
    assert meta["model"]["name"] == "evil_pkg.nets:make" and evil.exists()


def test_dataset_factory_in_a_checkpoint_needs_consent(tmp_path, evil):
    dataset = {"name": "evil_pkg.nets:data", "seed": 3, "kwargs": {}}
    path = _hostile(tmp_path / "m.safetensors", model_name="mlp", dataset=dataset)
    model, meta = load_model(path)  # a registry model: no consent needed
    _same(model, _model())
    with pytest.raises(FlatlabError, match="names dataset 'evil_pkg.nets:data', which would "
                                           "import module 'evil_pkg.nets'.*--trust-code"):
        load_dataset_for(meta)
    assert not evil.exists() and "evil_pkg" not in sys.modules
    data = load_dataset_for(meta, trust_code=True)
    assert data.spec["name"] == "evil_pkg.nets:data" and len(data.y_train) == 512
    assert evil.exists()


def test_init_from_a_hostile_checkpoint_imports_nothing(tmp_path, evil):
    path = _hostile(tmp_path / "m.safetensors")
    target = build_model("mlp", (20,), 4, hidden=[8])
    init_from(target, path)
    _same(target, _model())
    assert not evil.exists() and "evil_pkg" not in sys.modules


def test_this_s_never_prints_the_zen(tmp_path, capsys):
    path = tmp_path / "zen.safetensors"
    save_checkpoint(path, _model(), {"model": {**SPEC, "name": "this:s"}})
    already = "this" in sys.modules
    with pytest.raises(FlatlabError, match="names model 'this:s', which would import module "
                                           "'this'"):
        load_model(path)
    out = capsys.readouterr()
    assert "Beautiful is better than ugly" not in out.out + out.err
    assert ("this" in sys.modules) == already


def test_plain_safetensors_loads_with_a_model_spec(tmp_path):
    path = tmp_path / "plain.safetensors"
    save_file({f"module.{k}": v for k, v in _model().state_dict().items()}, str(path),
              metadata={"format": "pt"})
    with pytest.raises(FlatlabError, match="has no flatlab metadata .*no model spec.*--model"):
        load_model(path)
    model, meta = load_model(path, model_spec=SPEC)  # DDP's "module." prefix is stripped
    assert meta == {} and not model.training
    _same(model, _model())
    with pytest.raises(FlatlabError, match="needs input_shape and num_classes"):
        load_model(path, model_spec={"name": "mlp"})
    with pytest.raises(FlatlabError, match=r"'3.weight' has shape \(4, 8\), the model expects "
                                           r"\(8, 8\)"):
        load_model(path, model_spec={**SPEC, "kwargs": {"hidden": [8, 8]}})


def test_trusted_pickle_loads_with_a_model_spec(tmp_path):
    path = tmp_path / "weights.pt"
    torch.save(_model().state_dict(), path)
    with pytest.raises(FlatlabError, match="--trust-pickle"):
        load_model(path, model_spec=SPEC)
    model, meta = load_model(path, trust_pickle=True, model_spec=SPEC)
    assert meta == {}
    _same(model, _model())


def test_caller_spec_replaces_the_files_key_by_key(tmp_path):
    path = tmp_path / "m.safetensors"
    save_checkpoint(path, _model(), {"model": SPEC})
    model, _ = load_model(path, model_spec={"kwargs": {"hidden": [8]}})
    _same(model, _model())
    with pytest.raises(FlatlabError, match="unknown model spec key.*'colour'"):
        load_model(path, model_spec={"colour": "red"})


@pytest.mark.parametrize("kwargs, message", [
    ({"depth": 6 * 10**9 + 2}, "depth=6000000002 cannot fit the .* weights in the file"),
    ({"width": 1e300}, "width=1e\\+300 cannot fit"),
    ({"depth": 8, "width": 10**12}, "width=1000000000000 cannot fit"),
])
def test_huge_registry_models_from_files_are_refused_before_building(tmp_path, kwargs, message):
    path = tmp_path / "m.safetensors"
    save_checkpoint(path, _model(), {"model": {"name": "resnet", "kwargs": kwargs,
                                               "input_shape": [3, 8, 8], "num_classes": 4}})
    start = time.monotonic()
    with pytest.raises(FlatlabError, match=message):
        load_model(path)
    assert time.monotonic() - start < 10


def test_oversized_model_is_compared_on_the_meta_device_first(tmp_path, monkeypatch):
    """hidden=[20000]*3 passes the size rule (the file holds 50k weights) but would allocate
    3.2 GB; the dry run on the meta device finds the mismatch without allocating."""
    import flatlab.checkpoint.rebuild as rebuild

    devices = []

    def recording_build(*args, **kwargs):
        devices.append(str(torch.get_default_device()))
        return build_model(*args, **kwargs)

    monkeypatch.setattr(rebuild, "build_model", recording_build)
    torch.manual_seed(0)
    path = tmp_path / "m.safetensors"
    spec = {**SPEC, "kwargs": {"hidden": [20000, 20000, 20000]}}
    save_checkpoint(path, build_model("mlp", (20,), 4, hidden=[2000]), {"model": spec})
    with pytest.raises(FlatlabError, match=r"'1.weight' has shape \(2000, 20\), the model "
                                           r"expects \(20000, 20\)"):
        load_model(path)
    assert devices == ["meta"]
    save_checkpoint(path, _model(), {"model": SPEC})
    _same(load_model(path)[0], _model())
    assert devices == ["meta", "meta", "cpu"]  # a fitting model is then built for real


@pytest.mark.parametrize("model", [
    {**SPEC, "input_shape": "20"}, {**SPEC, "input_shape": [0]}, {**SPEC, "num_classes": True},
    {**SPEC, "num_classes": 2**40}, {**SPEC, "kwargs": [1]}, {**SPEC, "name": 5},
    {**SPEC, "kwargs": {"hidden": [float("nan")]}}, {**SPEC, "kwargs": {"hidden": "abc"}},
    {**SPEC, "kwargs": {"hidden": [[8]]}}, {**SPEC, "name": "../../etc/passwd:x"},
])
def test_malformed_model_specs_are_clean_errors(tmp_path, model):
    path = tmp_path / "m.safetensors"
    save_file(_model().state_dict(), str(path),
              metadata={"flatlab": json.dumps({"format_version": 1, "model": model})})
    read_checkpoint(path)
    with pytest.raises(FlatlabError):
        load_model(path)
