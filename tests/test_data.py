"""Data registry: shapes, dtypes, determinism, caching, CIFAR files (real layout and hostile)."""

from __future__ import annotations

import pickle
import random

import numpy as np
import pytest
import torch

from flatlab.data import DATASETS, dataset_from_spec, load_dataset
from flatlab.data import builtin as data_module
from flatlab.errors import FlatlabError


def _check_arrays(ds, n_train, n_test, shape, num_classes):
    assert ds.x_train.shape == (n_train, *shape) and ds.x_test.shape == (n_test, *shape)
    assert ds.y_train.shape == (n_train,) and ds.y_test.shape == (n_test,)
    assert ds.x_train.dtype == ds.x_test.dtype == torch.float32
    assert ds.y_train.dtype == ds.y_test.dtype == torch.int64
    assert ds.input_shape == shape and ds.num_classes == num_classes
    assert 0 <= int(ds.y_train.min()) and int(ds.y_train.max()) < num_classes
    assert torch.isfinite(ds.x_train).all() and torch.isfinite(ds.x_test).all()


def test_registry_names_and_unknown_name_lists_them():
    assert DATASETS == ("mnist1d", "digits", "cifar10", "cifar100", "synthetic", "folder")
    with pytest.raises(FlatlabError, match="unknown dataset 'mnist2d'.*mnist1d, digits, cifar10"):
        load_dataset("mnist2d")


def test_unknown_dataset_argument_is_named():
    with pytest.raises(FlatlabError, match="unknown argument.*wobble.*accepted: train_size"):
        load_dataset("synthetic", wobble=3)


# --------------------------------------------------------------------------- synthetic

def test_synthetic_shapes_and_seed_determinism():
    a = load_dataset("synthetic", seed=3)
    _check_arrays(a, 512, 256, (20,), 4)
    b = load_dataset("synthetic", seed=3)
    c = load_dataset("synthetic", seed=4)
    assert torch.equal(a.x_train, b.x_train) and torch.equal(a.y_test, b.y_test)
    assert not torch.equal(a.x_train, c.x_train)
    # the teacher uses every class (labels are not degenerate)
    assert len(torch.unique(a.y_train)) == 4


def test_synthetic_image_shape_and_sizes():
    ds = load_dataset("synthetic", train_size=10, test_size=5, input_shape=[1, 8, 8],
                      num_classes=3)
    _check_arrays(ds, 10, 5, (1, 8, 8), 3)
    assert ds.spec == {"name": "synthetic", "seed": 0,
                       "kwargs": {"train_size": 10, "test_size": 5, "input_shape": [1, 8, 8],
                                  "num_classes": 3}}
    rebuilt = dataset_from_spec(ds.spec)
    assert torch.equal(rebuilt.x_train, ds.x_train)


def test_global_rng_untouched_by_loading():
    torch.manual_seed(1)
    before = torch.get_rng_state()
    load_dataset("synthetic", seed=9)
    assert torch.equal(torch.get_rng_state(), before)


# --------------------------------------------------------------------------- digits

def test_digits_split_is_stratified_standardised_and_seeded():
    ds = load_dataset("digits")
    _check_arrays(ds, 1437, 360, (1, 8, 8), 10)
    counts = torch.bincount(ds.y_test, minlength=10)
    assert int(counts.min()) >= 35 and int(counts.max()) <= 37  # 360 / 10 classes, stratified
    assert abs(float(ds.x_train.mean())) < 1e-5 and abs(float(ds.x_train.std()) - 1) < 1e-3
    again = load_dataset("digits")
    other = load_dataset("digits", seed=1)
    assert torch.equal(ds.x_test, again.x_test) and torch.equal(ds.y_train, again.y_train)
    assert not torch.equal(ds.y_test, other.y_test)


def test_split_validation_holds_out_part_of_train_and_round_trips():
    ds = load_dataset("synthetic", train_size=100, test_size=10)
    val = ds.split_validation(0.2, seed=5)
    assert len(val.y_train) == 80 and len(val.y_test) == 20
    # the held-out examples are training examples, disjoint from the new training split
    rows = {tuple(r.tolist()) for r in ds.x_train}
    new_train = {tuple(r.tolist()) for r in val.x_train}
    held_out = {tuple(r.tolist()) for r in val.x_test}
    assert held_out <= rows and new_train <= rows and not held_out & new_train
    rebuilt = dataset_from_spec(val.spec)
    assert torch.equal(rebuilt.x_test, val.x_test) and torch.equal(rebuilt.y_train, val.y_train)
    assert torch.equal(load_dataset("synthetic", train_size=100, test_size=10,
                                    validation_fraction=0.2, validation_seed=5).x_test,
                       val.x_test)
    with pytest.raises(FlatlabError, match="fraction must be in"):
        ds.split_validation(1.5, seed=0)


# --------------------------------------------------------------------------- mnist1d

@pytest.fixture(scope="module")
def mnist1d_cache(tmp_path_factory):
    cache = tmp_path_factory.mktemp("cache")
    mp = pytest.MonkeyPatch()
    mp.setenv("FLATLAB_CACHE", str(cache))
    py_state, np_state = random.getstate(), np.random.get_state()
    ds = load_dataset("mnist1d")
    assert random.getstate() == py_state  # mnist1d reseeds the global RNGs; we give them back
    assert np.array_equal(np.random.get_state()[1], np_state[1])
    yield cache, ds
    mp.undo()


def test_mnist1d_standard_split(mnist1d_cache):
    cache, ds = mnist1d_cache
    _check_arrays(ds, 4000, 1000, (40,), 10)
    assert abs(float(ds.x_train.mean())) < 1e-5 and abs(float(ds.x_train.std()) - 1) < 1e-3
    assert torch.bincount(ds.y_train, minlength=10).min() > 300
    files = list(cache.glob("mnist1d-*.npz"))
    assert len(files) == 1
    with np.load(files[0], allow_pickle=False) as npz:  # plain arrays, no pickle inside
        assert npz["x"].shape == (4000, 40)


def test_mnist1d_cache_hit_does_not_regenerate(mnist1d_cache, monkeypatch):
    cache, first = mnist1d_cache
    monkeypatch.setenv("FLATLAB_CACHE", str(cache))

    def fail(args):
        raise AssertionError("regenerated despite the cache")

    monkeypatch.setattr(data_module, "_generate_mnist1d", fail)
    again = load_dataset("mnist1d", seed=7)  # seed does not change the standard split
    assert torch.equal(again.x_train, first.x_train) and torch.equal(again.y_test, first.y_test)


def test_mnist1d_corrupt_cache_is_regenerated(mnist1d_cache, monkeypatch, tmp_path):
    cache, first = mnist1d_cache
    monkeypatch.setenv("FLATLAB_CACHE", str(tmp_path))
    name = next(cache.glob("mnist1d-*.npz")).name
    (tmp_path / name).write_bytes(b"not an npz file")
    calls = []
    real = data_module._generate_mnist1d
    monkeypatch.setattr(data_module, "_generate_mnist1d",
                        lambda args: calls.append(args) or real(args))
    again = load_dataset("mnist1d")
    assert len(calls) == 1 and torch.equal(again.x_train, first.x_train)
    with np.load(tmp_path / name, allow_pickle=False) as npz:  # the cache was repaired
        assert npz["x_test"].shape == (1000, 40)


# --------------------------------------------------------------------------- CIFAR files

def _batch(n, label_key, num_classes, rng, protocol):
    payload = {b"batch_label": b"fabricated",
               b"data": rng.integers(0, 256, size=(n, 3072), dtype=np.uint8),
               label_key: [int(v) for v in rng.integers(0, num_classes, size=n)]}
    return pickle.dumps(payload, protocol=protocol)


@pytest.mark.parametrize("protocol", [2, 5])
def test_cifar10_fabricated_directory(tmp_path, protocol):
    rng = np.random.default_rng(0)
    root = tmp_path / "cifar-10-batches-py"
    root.mkdir()
    for i in range(1, 6):
        (root / f"data_batch_{i}").write_bytes(_batch(4, b"labels", 10, rng, protocol))
    (root / "test_batch").write_bytes(_batch(3, b"labels", 10, rng, protocol))
    ds = load_dataset("cifar10", data_dir=tmp_path)  # the parent directory works too
    _check_arrays(ds, 20, 3, (3, 32, 32), 10)
    per_channel = ds.x_train.transpose(0, 1).reshape(3, -1)
    assert torch.allclose(per_channel.mean(1), torch.zeros(3), atol=1e-5)
    assert torch.allclose(per_channel.std(1, unbiased=False), torch.ones(3), atol=1e-4)
    # pixel layout: the 3072 bytes are (channel, row, col); per-channel train statistics
    raw = np.concatenate([pickle.loads((root / f"data_batch_{i}").read_bytes())[b"data"]
                          for i in range(1, 6)]).reshape(-1, 3, 32, 32) / 255.0
    mean = raw.mean(axis=(0, 2, 3), keepdims=True)
    std = raw.std(axis=(0, 2, 3), keepdims=True)
    assert np.allclose(ds.x_train.numpy(), (raw - mean) / std, atol=1e-5)
    labels = pickle.loads((root / "data_batch_1").read_bytes())[b"labels"]
    assert ds.y_train.tolist()[:4] == labels
    assert torch.equal(load_dataset("cifar10", data_dir=root).x_test, ds.x_test)


def test_cifar100_fabricated_directory(tmp_path):
    rng = np.random.default_rng(1)
    (tmp_path / "train").write_bytes(_batch(6, b"fine_labels", 100, rng, 2))
    (tmp_path / "test").write_bytes(_batch(2, b"fine_labels", 100, rng, 2))
    ds = load_dataset("cifar100", data_dir=tmp_path)
    _check_arrays(ds, 6, 2, (3, 32, 32), 100)


def test_cifar_missing_data_dir_and_files(tmp_path):
    with pytest.raises(FlatlabError, match="pass --data-dir"):
        load_dataset("cifar10")
    with pytest.raises(FlatlabError, match="does not exist"):
        load_dataset("cifar10", data_dir=tmp_path / "nope")
    (tmp_path / "readme.txt").write_text("x")
    with pytest.raises(FlatlabError, match="needs data_batch_1.*found: readme.txt"):
        load_dataset("cifar10", data_dir=tmp_path)


class _Payload:
    """Unpickling this creates a file: proof that code ran."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_cifar_malicious_pickle_is_refused_without_running(tmp_path):
    marker = tmp_path / "pwned"
    (tmp_path / "train").write_bytes(pickle.dumps({b"data": _Payload(marker),
                                                   b"fine_labels": [0]}, protocol=2))
    (tmp_path / "test").write_bytes(b"")
    with pytest.raises(FlatlabError, match="CIFAR python batch.*refusing to load global io.open"):
        load_dataset("cifar100", data_dir=tmp_path)
    assert not marker.exists()


@pytest.mark.parametrize("payload, message", [
    ({b"data": np.zeros((2, 3072), np.uint8), b"fine_labels": [0, 100]}, "labels in"),
    ({b"data": np.zeros((2, 100), np.uint8), b"fine_labels": [0, 1]}, "shape"),
    ({b"data": np.zeros((2, 3072), np.float32), b"fine_labels": [0, 1]}, "uint8"),
    ({b"pixels": np.zeros((2, 3072), np.uint8)}, "expected keys"),
    ([1, 2, 3], "expected keys"),
])
def test_cifar_wrong_content_is_a_clear_error(tmp_path, payload, message):
    (tmp_path / "train").write_bytes(pickle.dumps(payload, protocol=2))
    (tmp_path / "test").write_bytes(pickle.dumps(payload, protocol=2))
    with pytest.raises(FlatlabError, match=message):
        load_dataset("cifar100", data_dir=tmp_path)


def test_cifar_truncated_pickle(tmp_path):
    blob = _batch(3, b"fine_labels", 100, np.random.default_rng(0), 2)
    (tmp_path / "train").write_bytes(blob[: len(blob) // 2])
    (tmp_path / "test").write_bytes(blob)
    with pytest.raises(FlatlabError, match="not a CIFAR python batch file"):
        load_dataset("cifar100", data_dir=tmp_path)
