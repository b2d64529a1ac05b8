"""Data sets from "package.module:factory": conversion of what factories return, and consent."""

from __future__ import annotations

import sys
import textwrap

import numpy as np
import pytest
import torch

from flatlab.data import Dataset, dataset_from_spec, load_dataset
from flatlab.errors import FlatlabError

MODULE = textwrap.dedent("""
    import pathlib
    import numpy as np
    import torch
    from PIL import Image
    from torch.utils.data import TensorDataset

    pathlib.Path(MARKER).write_text("imported")  # proof that the module's code ran

    def tensors(n=6, seed=0):
        g = torch.Generator().manual_seed(seed)
        x = torch.randn(2 * n, 4, generator=g, dtype=torch.float64)
        y = torch.arange(2 * n) % 3
        return TensorDataset(x[:n], y[:n]), TensorDataset(x[n:], y[n:])

    def three(n=4):
        train, test = tensors(n)
        return train, TensorDataset(torch.zeros(2, 4), torch.tensor([0, 2])), test

    class Pictures:
        classes = ["a", "b", "c", "d"]  # more classes than the labels used

        def __init__(self, n, offset):
            rng = np.random.default_rng(offset)
            self.images = [rng.integers(0, 256, (5, 6, 3), dtype=np.uint8) for _ in range(n)]

        def __len__(self):
            return len(self.images)

        def __getitem__(self, i):
            return Image.fromarray(self.images[i]), np.int64(i % 2)

    def pictures():
        return Pictures(6, 0), Pictures(3, 1)

    def seeded(seed, data_dir, n=3):
        x = torch.full((2 * n, 1), float(seed))
        return TensorDataset(x[:n], torch.zeros(n, dtype=torch.long)), \\
            TensorDataset(x[n:], torch.ones(n, dtype=torch.long))

    def any_kwargs(**kwargs):
        assert "seed" not in kwargs and "data_dir" not in kwargs, kwargs
        return tensors(**kwargs)

    def ready(seed):
        x = torch.randn(4, 2)
        return DATASET(name="mine", x_train=x, y_train=torch.tensor([0, 1, 0, 1]), x_test=x,
                       y_test=torch.tensor([1, 1, 0, 0]), num_classes=2, input_shape=(2,),
                       spec={})

    def not_pairs():
        return [(1, 2, 3)], [(1, 2, 3)]

    def float_labels():
        return [(torch.zeros(2), 0.5)], [(torch.zeros(2), 1.0)]

    def wrong():
        return "a data set"
""")


@pytest.fixture
def user_data(tmp_path, monkeypatch):
    marker = tmp_path / "marker"
    package = tmp_path / "pkg_data_factory"
    package.mkdir()
    (package / "__init__.py").write_text("")
    source = MODULE.replace("MARKER", repr(str(marker)))
    source = source.replace("DATASET(", "__import__('flatlab.data').data.Dataset(")
    (package / "sets.py").write_text(source)
    monkeypatch.syspath_prepend(str(tmp_path))
    yield "pkg_data_factory.sets", marker
    for name in ("pkg_data_factory.sets", "pkg_data_factory"):
        sys.modules.pop(name, None)


def test_train_test_tensor_datasets(user_data):
    module, _ = user_data
    ds = load_dataset(f"{module}:tensors", trust_code=True, n=5, seed=2)  # seed: named, passed
    g = torch.Generator().manual_seed(2)
    x = torch.randn(10, 4, generator=g, dtype=torch.float64).float()
    assert ds.x_train.dtype == torch.float32 and torch.equal(ds.x_train, x[:5])
    assert torch.equal(ds.x_test, x[5:]) and torch.equal(ds.y_test, torch.arange(5, 10) % 3)
    assert ds.num_classes == 3 and ds.input_shape == (4,) and ds.mean is None
    assert ds.spec == {"name": f"{module}:tensors", "seed": 2, "kwargs": {"n": 5}}
    rebuilt = dataset_from_spec(ds.spec, trust_code=True)
    assert torch.equal(rebuilt.x_train, ds.x_train)


def test_train_val_test_and_validation_fraction(user_data):
    module, _ = user_data
    ds = load_dataset(f"{module}:three", trust_code=True)
    assert ds.has_validation and ds.y_val.tolist() == [0, 2] and len(ds.y_test) == 4
    held = load_dataset(f"{module}:tensors", trust_code=True, validation_fraction=0.5)
    assert len(held.y_train) == 3 and held.x_val is held.x_test


def test_pil_images_become_uint8_with_statistics(user_data):
    module, _ = user_data
    ds = load_dataset(f"{module}:pictures", trust_code=True)
    assert ds.x_train.dtype == torch.uint8 and ds.input_shape == (3, 5, 6)
    rng = np.random.default_rng(0)
    first = rng.integers(0, 256, (5, 6, 3), dtype=np.uint8)
    assert torch.equal(ds.x_train[0], torch.from_numpy(first).permute(2, 0, 1))
    assert ds.num_classes == 4 and ds.classes == ("a", "b", "c", "d")
    assert ds.y_train.tolist() == [0, 1, 0, 1, 0, 1]
    train = ds.x_train.double() / 255
    assert torch.allclose(ds.mean.flatten().double(), train.mean(dim=(0, 2, 3)), atol=1e-7)
    normalized = ds.normalize(ds.x_train).transpose(0, 1).reshape(3, -1)
    assert torch.allclose(normalized.mean(1), torch.zeros(3), atol=1e-5)


def test_context_arguments_only_when_named(user_data, tmp_path):
    module, _ = user_data
    ds = load_dataset(f"{module}:seeded", seed=7, data_dir=tmp_path, trust_code=True)
    assert torch.all(ds.x_train == 7)
    load_dataset(f"{module}:any_kwargs", seed=7, data_dir=tmp_path, trust_code=True, n=2)
    with pytest.raises(FlatlabError, match="seed is set by flatlab from the data"):
        _pass_seed_as_argument(module)


def _pass_seed_as_argument(module):
    from flatlab.data.user import load_factory_dataset

    return load_factory_dataset(f"{module}:seeded", seed=0, data_dir=None, trust_code=True,
                                kwargs={"seed": 3}, spec={})


def test_factory_returning_a_dataset(user_data):
    module, _ = user_data
    ds = load_dataset(f"{module}:ready", trust_code=True)
    assert isinstance(ds, Dataset) and ds.name == f"{module}:ready"
    assert ds.spec["name"] == f"{module}:ready"


@pytest.mark.parametrize("factory, message", [
    ("not_pairs", "item 0 is not an \\(x, y\\) pair"),
    ("float_labels", "label 0 is 0.5, not an integer class"),
    ("wrong", "returned str; expected a flatlab Dataset"),
    ("tensors", "unknown argument.*colour; accepted: n$"),
])
def test_bad_factories(user_data, factory, message):
    module, _ = user_data
    kwargs = {"colour": 1} if factory == "tensors" else {}
    with pytest.raises(FlatlabError, match=message):
        load_dataset(f"{module}:{factory}", trust_code=True, **kwargs)


def test_nothing_is_imported_without_consent(user_data):
    module, marker = user_data
    name = f"{module}:tensors"
    with pytest.raises(FlatlabError, match=f"dataset '{name}' would import module '{module}' "
                                           f"and run its code; not imported.*--trust-code"):
        load_dataset(name)
    spec = {"name": name, "seed": 0, "kwargs": {}}
    with pytest.raises(FlatlabError, match="a stored dataset spec names dataset.*--trust-code"):
        dataset_from_spec(spec)
    assert not marker.exists() and module not in sys.modules
    assert "pkg_data_factory" not in sys.modules  # not even the parent package
    assert len(dataset_from_spec(spec, trust_code=True).y_train) == 6
    assert marker.exists()
