"""Checkpoints: round trips, metadata contract, hostile and broken files, crash-safe writes."""

from __future__ import annotations

import json
import os
import pickle
import signal
import subprocess
import sys
import textwrap
import time
import zipfile

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from flatlab.checkpoint import (
    FORMAT_VERSION,
    load_dataset_for,
    load_model,
    load_state,
    read_checkpoint,
    resolve_checkpoint,
    save_checkpoint,
    save_state,
)
from flatlab.errors import FlatlabError
from flatlab.models import build_model

MODEL_SPEC = {"name": "mlp", "kwargs": {"hidden": [8]}, "input_shape": [20], "num_classes": 4}
META = {"model": MODEL_SPEC, "dataset": {"name": "synthetic", "seed": 1, "kwargs": {}},
        "optimizer": {"name": "nso", "kwargs": {"sigma": 0.01}}, "epoch": 3, "step": 12,
        "grad_evals": 24, "metrics": {"train_loss": 0.5, "train_acc": 0.8, "test_loss": 0.6,
                                      "test_acc": 0.75}, "seed": 0, "run_name": "demo"}


def _model():
    torch.manual_seed(0)
    return build_model("mlp", (20,), 4, hidden=[8])


@pytest.fixture
def ckpt(tmp_path):
    path = tmp_path / "run" / "model.safetensors"
    save_checkpoint(path, _model(), META)
    return path


def _equal_states(a, b):
    assert sorted(a) == sorted(b)
    for name in a:
        assert torch.equal(a[name], b[name]), name


def test_round_trip_and_metadata_keys(ckpt):
    state, meta = read_checkpoint(ckpt)
    _equal_states(state, _model().state_dict())
    assert set(meta) == set(META) | {"flatlab_version", "format_version", "checksum"}
    assert meta["format_version"] == FORMAT_VERSION and meta["checksum"].startswith("sha256:")
    assert {k: meta[k] for k in META} == META
    model, meta2 = load_model(ckpt.parent)  # a run directory resolves to its model.safetensors
    assert not model.training and meta2 == meta
    _equal_states(model.state_dict(), _model().state_dict())
    data = load_dataset_for(meta)
    assert data.spec == META["dataset"] and model(data.x_test).shape == (256, 4)


def test_buffers_are_saved(tmp_path):
    torch.manual_seed(0)
    model = build_model("resnet", (1, 8, 8), 3, depth=8, width=2)
    model.train()
    model(torch.randn(6, 1, 8, 8))  # moves BN running statistics away from their init
    meta = {"model": {"name": "resnet", "kwargs": {"depth": 8, "width": 2},
                      "input_shape": [1, 8, 8], "num_classes": 3}}
    save_checkpoint(tmp_path / "m.safetensors", model, meta)
    loaded, _ = load_model(tmp_path / "m.safetensors")
    _equal_states(loaded.state_dict(), model.state_dict())
    assert any("running_mean" in k for k in loaded.state_dict())


def test_header_length_byte_0x80_is_not_mistaken_for_pickle(tmp_path):
    path = tmp_path / "m.safetensors"
    save_checkpoint(path, _model(), {"run_name": ""})
    start = (0x80 - path.read_bytes()[0]) % 256
    for pad in range(start, start + 16):  # pad the JSON header: its length's low byte -> 0x80
        save_checkpoint(path, _model(), {"run_name": "x" * pad})
        if path.read_bytes()[0] == 0x80:
            break
    else:
        pytest.fail("no padding gave a header length with low byte 0x80")
    state, meta = read_checkpoint(path)
    assert meta["run_name"] == "x" * pad
    _equal_states(state, _model().state_dict())


def test_missing_paths(tmp_path):
    with pytest.raises(FlatlabError, match="does not exist"):
        read_checkpoint(tmp_path / "nope.safetensors")
    (tmp_path / "other.safetensors").write_bytes(b"")
    with pytest.raises(FlatlabError, match="has no model.safetensors; found other.safetensors"):
        resolve_checkpoint(tmp_path)


# --------------------------------------------------------------------------- hostile input

class _Payload:
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _zip_pickle(path, obj):
    torch.save(obj, path)
    assert zipfile.is_zipfile(path)


@pytest.mark.parametrize("writer", ["raw", "zip"])
def test_malicious_pickle_refused_even_when_trusted(tmp_path, writer):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    payload = {"weight": _Payload(marker)}
    if writer == "raw":
        path.write_bytes(pickle.dumps(payload, protocol=2))
    else:
        _zip_pickle(path, payload)
    marker.unlink(missing_ok=True)  # (torch.save does not run __reduce__'s result; be sure)
    with pytest.raises(FlatlabError, match="pickle.*refusing.*--trust-pickle"):
        read_checkpoint(path)
    with pytest.raises(FlatlabError, match="weights_only=True"):
        read_checkpoint(path, trust_pickle=True)
    with pytest.raises(FlatlabError):
        load_model(path, trust_pickle=True)
    assert not marker.exists()


def test_trusted_plain_state_dict_loads(tmp_path):
    path = tmp_path / "weights.pt"
    torch.save(_model().state_dict(), path)
    with pytest.raises(FlatlabError, match="--trust-pickle"):
        read_checkpoint(path)
    state, meta = read_checkpoint(path, trust_pickle=True)
    assert meta == {}
    _equal_states(state, _model().state_dict())
    with pytest.raises(FlatlabError, match="no model spec"):
        load_model(path, trust_pickle=True)


@pytest.mark.parametrize("cut", [0, 5, 8, 60, -1, -40])
def test_truncated_safetensors(ckpt, cut):
    blob = ckpt.read_bytes()
    ckpt.write_bytes(blob[:cut])
    with pytest.raises(FlatlabError, match="truncated|corrupted"):
        read_checkpoint(ckpt)


def test_corrupted_tensor_bytes_fail_the_checksum(ckpt):
    blob = bytearray(ckpt.read_bytes())
    blob[-3] ^= 0xFF  # inside the last tensor's data, header intact
    ckpt.write_bytes(bytes(blob))
    with pytest.raises(FlatlabError, match="corrupted: tensor data does not match its checksum"):
        read_checkpoint(ckpt)


def test_garbage_and_foreign_files(tmp_path):
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(os.urandom(64) + b"x" * 100)
    with pytest.raises(FlatlabError, match="not a safetensors file|truncated or corrupted"):
        read_checkpoint(garbage)
    foreign = tmp_path / "foreign.safetensors"
    save_file({"w": torch.zeros(2)}, str(foreign), metadata={"format": "pt"})
    with pytest.raises(FlatlabError, match="no 'flatlab' metadata"):
        read_checkpoint(foreign)


def _with_metadata(path, meta):
    save_file({"w": torch.zeros(2)}, str(path), metadata={"flatlab": meta})


@pytest.mark.parametrize("meta, message", [
    (json.dumps({"format_version": 1, "favourite_colour": "red"}),
     "unknown metadata key.*favourite_colour"),
    (json.dumps({"format_version": FORMAT_VERSION + 1}), "newer than this flatlab.*upgrade"),
    (json.dumps({"format_version": "1"}), "bad format_version"),
    (json.dumps({"epoch": 1}), "lacks 'format_version'"),
    ("{not json", "not valid JSON"),
    (json.dumps([1, 2]), "must be a JSON object"),
])
def test_bad_metadata(tmp_path, meta, message):
    path = tmp_path / "m.safetensors"
    _with_metadata(path, meta)
    with pytest.raises(FlatlabError, match=message):
        read_checkpoint(path)


def test_weights_that_do_not_fit_the_model(tmp_path):
    path = tmp_path / "m.safetensors"
    wrong = {**META, "model": {**MODEL_SPEC, "kwargs": {"hidden": [16]}}}
    save_checkpoint(path, _model(), wrong)  # weights of hidden=[8], metadata says [16]
    with pytest.raises(FlatlabError, match=r"'1.weight' has shape \(8, 20\), the model expects "
                                           r"\(16, 20\)"):
        load_model(path)
    renamed = {**META, "model": {**MODEL_SPEC, "name": "cnn1d", "kwargs": {}}}
    save_checkpoint(path, _model(), renamed)
    with pytest.raises(FlatlabError, match="does not fit the model: missing weight "
                                           "'features.0.weight'"):
        load_model(path)


def test_unknown_key_refused_on_save(tmp_path):
    with pytest.raises(FlatlabError, match="unknown metadata key.*'notes'"):
        save_checkpoint(tmp_path / "m.safetensors", _model(), {"notes": "x"})
    assert not list(tmp_path.iterdir())  # nothing written


# --------------------------------------------------------------------------- training state

def test_state_round_trip_is_exact(tmp_path):
    model = _model()
    from flatlab.optim import build_optimizer

    opt = build_optimizer("nso", model.parameters(), lr=0.1, sigma=0.01, seed=3)
    x, y = torch.randn(8, 20), torch.randint(0, 4, (8,))

    def closure():
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        return loss

    opt.step(closure)
    state = {"optimizer": opt.state_dict(), "rng": torch.get_rng_state(),
             "nested": {3: (1, 2.5, None, "x", True), "list": [torch.zeros(()), torch.ones(0)],
                        "__dunder": 1},
             "floats": [float("nan"), float("inf"), 1e-300, 0.1 + 0.2],
             "dtypes": [torch.arange(3, dtype=torch.int64), torch.tensor([True, False]),
                        torch.randn(2, 3, dtype=torch.float64), torch.zeros(2, dtype=torch.uint8)]}
    save_state(tmp_path / "s.safetensors", state)
    back = load_state(tmp_path / "s.safetensors")
    assert back["nested"][3] == (1, 2.5, None, "x", True) and back["nested"]["__dunder"] == 1
    assert back["floats"][0] != back["floats"][0] and back["floats"][1:] == state["floats"][1:]
    for a, b in zip(back["dtypes"], state["dtypes"], strict=True):
        assert a.dtype == b.dtype and torch.equal(a, b)
    assert back["nested"]["list"][0].shape == () and back["nested"]["list"][1].shape == (0,)
    assert torch.equal(back["rng"], state["rng"])
    # a fresh optimizer loaded from the saved state takes exactly the same next step
    twin = _model()
    twin.load_state_dict(model.state_dict())
    opt2 = build_optimizer("nso", twin.parameters(), lr=0.1, sigma=0.01, seed=99)
    opt2.load_state_dict(back["optimizer"])

    def closure2():
        opt2.zero_grad()
        loss = nn.functional.cross_entropy(twin(x), y)
        loss.backward()
        return loss

    opt.step(closure)
    opt2.step(closure2)
    _equal_states(model.state_dict(), twin.state_dict())


def test_state_refuses_what_it_cannot_store_and_hostile_files(tmp_path):
    with pytest.raises(TypeError, match="cannot store object"):
        save_state(tmp_path / "s.safetensors", {"x": object()})
    marker = tmp_path / "pwned"
    path = tmp_path / "train_state.safetensors"
    path.write_bytes(pickle.dumps({"state": _Payload(marker)}, protocol=4))
    with pytest.raises(FlatlabError, match="pickle file.*refusing"):
        load_state(path)
    assert not marker.exists()
    save_checkpoint(path, _model(), {})
    with pytest.raises(FlatlabError, match="not flatlab training state"):
        load_state(path)


# --------------------------------------------------------------------------- crash safety

WRITER = textwrap.dedent("""
    import sys, torch
    from torch import nn
    from flatlab.checkpoint import save_checkpoint, save_state
    model = nn.Linear(1000, 1000)   # 4 MB of weights per file
    i = 0
    while True:
        with torch.no_grad():
            model.weight.fill_(i)
            model.bias.fill_(i)
        save_checkpoint(sys.argv[1], model, {"epoch": i})
        save_state(sys.argv[2], {"i": i, "w": model.weight})
        i += 1
        print(i, flush=True)
""")


@pytest.mark.parametrize("delay", [0.0, 0.15, 0.4])
def test_sigkill_while_writing_leaves_a_loadable_file(tmp_path, delay):
    ckpt, state = tmp_path / "model.safetensors", tmp_path / "train_state.safetensors"
    proc = subprocess.Popen([sys.executable, "-c", WRITER, str(ckpt), str(state)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "1", proc.stderr.read()
        time.sleep(delay)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    tensors, meta = read_checkpoint(ckpt)
    assert torch.all(tensors["weight"] == meta["epoch"]) and torch.all(tensors["bias"] ==
                                                                        meta["epoch"])
    saved = load_state(state)
    assert torch.all(saved["w"] == saved["i"])
