"""Fuzzed checkpoint metadata: always success or one FlatlabError, never another exception, and
never an import (a marker package records any import of itself)."""

from __future__ import annotations

import json
import sys

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file

from flatlab.checkpoint import METADATA_KEYS, load_dataset_for, load_model, read_checkpoint
from flatlab.errors import FlatlabError
from flatlab.models import MODELS, build_model

MARKER_PACKAGE = "fuzz_marker_pkg"
FACTORIES = ["this:s", f"{MARKER_PACKAGE}:make", f"{MARKER_PACKAGE}.sub:f", "os:system",
             "builtins:eval", "subprocess:run", "importlib:import_module", ":", "a:", ":b",
             "torchvision.models:resnet18", "timm:create_model"]
PATHS = ["../../etc/passwd", "/etc", "/", "~", "~nosuchuser/x", "..", "a\x00b", "C:\\Windows"]
SPEC = {"name": "mlp", "kwargs": {"hidden": [8]}, "input_shape": [20], "num_classes": 4}
SETTINGS = settings(max_examples=250, deadline=None, derandomize=True,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

leaves = (st.none() | st.booleans() | st.integers() | st.integers(-2**80, 2**80)
          | st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=20)
          | st.sampled_from(FACTORIES + PATHS + list(MODELS) + ["folder", "synthetic", "digits"]))
values = st.recursive(leaves, lambda inner: st.lists(inner, max_size=4)
                      | st.dictionaries(st.text(max_size=6), inner, max_size=4), max_leaves=16)
sizes = st.integers(-3, 40) | st.integers() | st.floats(allow_nan=True) | values
kwargs = st.dictionaries(st.sampled_from(["hidden", "depth", "width", "channels", "kernel_size",
                                          "bias", "model_name", "num_classes", "input_shape"])
                         | st.text(max_size=6), sizes | st.lists(sizes, max_size=5), max_size=3)
model_specs = st.fixed_dictionaries({}, optional={
    "name": st.sampled_from(FACTORIES + list(MODELS)) | st.text(max_size=10),
    "kwargs": kwargs | values, "input_shape": st.lists(sizes, max_size=4) | values,
    "num_classes": sizes})
# near misses of a spec that loads: one field replaced
near_misses = st.tuples(st.sampled_from(list(SPEC)), model_specs).map(
    lambda pair: {**SPEC, pair[0]: pair[1].get(pair[0], SPEC[pair[0]])})
# well-formed specs that name code: only consent stands between them and an import
factory_models = st.builds(lambda name, kw: {**SPEC, "name": name, "kwargs": kw},
                           st.sampled_from(FACTORIES), kwargs | st.just({}))
factory_datasets = st.builds(lambda name, kw: {"name": name, "seed": 0, "kwargs": kw},
                             st.sampled_from(FACTORIES), kwargs | st.just({}))
dataset_specs = st.fixed_dictionaries({}, optional={
    "name": st.sampled_from(FACTORIES + ["folder", "cifar10", "nope", ""]) | st.text(max_size=8),
    "seed": sizes, "kwargs": kwargs | values, "data_dir": st.sampled_from(PATHS) | values,
    "fingerprint": st.text(max_size=10) | values, "files": values})
models = factory_models | model_specs | near_misses | st.just(SPEC) | values
datasets = factory_datasets | dataset_specs | values
# files that read_checkpoint accepts, so the model and data specs are what gets tested ...
readable = st.fixed_dictionaries(
    {"format_version": st.just(1), "model": models, "dataset": datasets},
    optional={key: values for key in METADATA_KEYS
              if key not in ("format_version", "model", "dataset", "checksum")})
# ... and anything at all
anything = st.fixed_dictionaries(
    {"format_version": st.just(1) | values},
    optional={**{key: values for key in METADATA_KEYS if key != "format_version"},
              "model": models, "dataset": datasets, "extra": values})
metadata = readable | anything


@pytest.fixture(scope="module")
def marker(tmp_path_factory):
    root = tmp_path_factory.mktemp("fuzz")
    marker = root / "imported"
    package = root / MARKER_PACKAGE
    package.mkdir()
    (package / "__init__.py").write_text(
        f"open({str(marker)!r}, 'w').write('x')\ndef make(**kwargs):\n    return None\n")
    (package / "sub.py").write_text("def f(**kwargs):\n    return None\n")
    sys.path.insert(0, str(root))
    already = {name for name in ("this", "timm", "torchvision") if name in sys.modules}
    yield marker, root / "m.safetensors", already
    sys.path.remove(str(root))


def _weights():
    torch.manual_seed(0)
    return build_model("mlp", (20,), 4, hidden=[8]).state_dict()


WEIGHTS = _weights()


def _check(call) -> None:
    try:
        call()
    except FlatlabError:
        pass  # any other exception fails the test


def _no_imports(marker, already) -> None:
    assert not marker.exists(), "the marker package was imported"
    assert MARKER_PACKAGE not in sys.modules
    for name in ("this", "timm", "torchvision"):
        assert name not in sys.modules or name in already, name


@SETTINGS
@given(meta=metadata)
def test_fuzzed_metadata_is_read_cleanly_and_imports_nothing(marker, meta):
    marker_file, path, already = marker
    save_file(WEIGHTS, str(path), metadata={"flatlab": json.dumps(meta, allow_nan=True)})
    _check(lambda: read_checkpoint(path))
    _check(lambda: load_model(path))
    _check(lambda: load_model(path, trust_pickle=True, model_spec={"name": "mlp"}))
    if isinstance(meta.get("dataset"), dict):
        _check(lambda: load_dataset_for(meta))
    _no_imports(marker_file, already)


@settings(SETTINGS, max_examples=100)
@given(depth=st.integers(1, 200_000), text=st.text(max_size=40),
       wrap=st.sampled_from(['{"format_version": 1, "model": %s}', '{"model": {"kwargs": %s}}',
                             "%s", '{"format_version": 1, "dataset": {"name": %s}}']))
def test_fuzzed_metadata_text_deep_nesting_and_garbage(marker, depth, text, wrap):
    marker_file, path, already = marker
    for body in ("[" * depth + "]" * depth, "{\"a\": " * depth + "1" + "}" * depth,
                 text, json.dumps(text), "9" * (depth % 10_000 + 1)):
        save_file(WEIGHTS, str(path), metadata={"flatlab": wrap % body})
        _check(lambda: read_checkpoint(path))
        _check(lambda: load_model(path))
    _no_imports(marker_file, already)


def test_a_correct_spec_loads(marker):
    """The fuzzed files carry real weights: the exact spec must load (so successes happen)."""
    marker_file, path, already = marker
    save_file(WEIGHTS, str(path), metadata={"flatlab": json.dumps({"format_version": 1,
                                                                   "model": SPEC})})
    model, _ = load_model(path)
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, WEIGHTS[name])
