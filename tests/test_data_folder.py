"""Image folders: layout, exact pixels and statistics, resizing, broken files, fingerprints."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from flatlab.data import dataset_from_spec, load_dataset
from flatlab.data.folder import list_folder, load_folder
from flatlab.errors import FlatlabError

CLASSES = ("cat", "dog", "eel")  # written in another order below: labels follow sorted names


def _write(root, split, cls, name, pixels):
    path = root / split / cls / name
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path)
    return path


def _fabricate(root, rng, *, size=(6, 5), counts=(("train", 4), ("val", 2), ("test", 3))):
    """A folder of random RGB PNGs (lossless); returns {split: [(pixels HWC, label)]}."""
    truth = {}
    for split, per_class in counts:
        truth[split] = []
        for cls in ("eel", "cat", "dog"):
            for i in range(per_class):
                pixels = rng.integers(0, 256, size=(*size, 3), dtype=np.uint8)
                _write(root, split, cls, f"img{i:02d}.png", pixels)
        for cls in CLASSES:  # the order the loader must use: classes sorted, files by name
            for i in range(per_class):
                pixels = np.asarray(Image.open(root / split / cls / f"img{i:02d}.png"))
                truth[split].append((pixels, CLASSES.index(cls)))
    return truth


@pytest.fixture
def folder(tmp_path):
    root = tmp_path / "images"
    return root, _fabricate(root, np.random.default_rng(0))


def _stack(items):
    x = torch.from_numpy(np.stack([p for p, _ in items])).permute(0, 3, 1, 2)
    return x, torch.tensor([label for _, label in items])


def test_layout_pixels_labels_and_statistics(folder):
    root, truth = folder
    ds = load_dataset("folder", data_dir=root)
    assert ds.classes == CLASSES and ds.num_classes == 3 and ds.input_shape == (3, 6, 5)
    for split, x, y in (("train", ds.x_train, ds.y_train), ("val", ds.x_val, ds.y_val),
                        ("test", ds.x_test, ds.y_test)):
        want_x, want_y = _stack(truth[split])
        assert x.dtype == torch.uint8 and torch.equal(x, want_x), split
        assert torch.equal(y, want_y), split
    # statistics: per channel over the training split only, float64 reference
    train = np.stack([p for p, _ in truth["train"]]).astype(np.float64) / 255.0
    mean, std = train.mean(axis=(0, 1, 2)), train.std(axis=(0, 1, 2))
    assert np.allclose(ds.mean.flatten().numpy(), mean, rtol=0, atol=1e-7)
    assert np.allclose(ds.std.flatten().numpy(), std + 1e-8, rtol=0, atol=1e-7)
    inputs = ds.normalize(ds.x_test)
    reference = (np.stack([p for p, _ in truth["test"]]) / 255.0 - mean) / (std + 1e-8)
    assert inputs.dtype == torch.float32
    assert np.allclose(inputs.permute(0, 2, 3, 1).numpy(), reference, rtol=0, atol=1e-5)
    # normalised training inputs are standardised per channel
    train_inputs = ds.normalize(ds.x_train).transpose(0, 1).reshape(3, -1).double()
    assert torch.allclose(train_inputs.mean(1), torch.zeros(3, dtype=torch.float64), atol=1e-6)
    assert torch.allclose(train_inputs.std(1, unbiased=False), torch.ones(3, dtype=torch.float64),
                          atol=1e-5)


def test_built_in_datasets_are_unchanged_by_normalize():
    ds = load_dataset("synthetic", train_size=8, test_size=4)
    assert ds.mean is None and ds.normalize(ds.x_train) is ds.x_train
    assert not ds.has_validation


def test_resize_grayscale_and_spec_round_trip(folder):
    root, truth = folder
    ds = load_dataset("folder", data_dir=root, image_size=4, grayscale=True)
    assert ds.input_shape == (1, 4, 4)
    first = Image.fromarray(truth["train"][0][0]).convert("L").resize(
        (4, 4), Image.Resampling.BILINEAR)
    assert torch.equal(ds.x_train[0, 0], torch.from_numpy(np.array(first)))
    assert ds.spec["kwargs"] == {"image_size": 4, "grayscale": True}
    assert ds.spec["data_dir"] == str(root.resolve())
    assert ds.spec["files"] == {"train": 12, "val": 6, "test": 9}
    rebuilt = dataset_from_spec(ds.spec)
    for name in ("x_train", "y_train", "x_val", "y_val", "x_test", "y_test", "mean", "std"):
        assert torch.equal(getattr(rebuilt, name), getattr(ds, name)), name
    wide = load_dataset("folder", data_dir=root, image_size=[3, 7])
    assert wide.input_shape == (3, 3, 7)


def test_thread_count_does_not_change_the_data(folder):
    root, _ = folder
    one = load_folder(seed=0, data_dir=root, threads=1)
    four = load_folder(seed=0, data_dir=root, threads=4)
    assert torch.equal(one.x_train, four.x_train) and torch.equal(one.x_test, four.x_test)


def test_changed_folder_is_detected_and_a_moved_folder_still_loads(folder, tmp_path):
    root, truth = folder
    ds = load_dataset("folder", data_dir=root)
    moved = tmp_path / "elsewhere"
    shutil.copytree(root, moved)
    again = dataset_from_spec(ds.spec, data_dir=moved)  # same relative paths and sizes
    assert torch.equal(again.x_train, ds.x_train)
    _write(root, "train", "cat", "img99.png", truth["train"][0][0])
    with pytest.raises(FlatlabError, match="changed since the checkpoint was written "
                                           r"\(12 train / 6 val / 9 test files then, "
                                           "13 train / 6 val / 9 test files now"):
        dataset_from_spec(ds.spec)
    (root / "train" / "cat" / "img99.png").unlink()
    (root / "test" / "dog" / "img00.png").write_bytes(b"\x89PNG same name, new size")
    with pytest.raises(FlatlabError, match="changed since"):
        dataset_from_spec(ds.spec)


def test_validation_split_from_fraction_or_folder(folder, tmp_path):
    root, _ = folder
    with pytest.raises(FlatlabError, match="already has a validation split"):
        load_dataset("folder", data_dir=root, validation_fraction=0.25)
    shutil.rmtree(root / "val")
    ds = load_dataset("folder", data_dir=root, validation_fraction=0.25)
    assert len(ds.y_train) == 9 and len(ds.y_val) == 3 and ds.x_val is ds.x_test
    assert ds.x_val.dtype == torch.uint8 and ds.mean is not None
    assert torch.equal(dataset_from_spec(ds.spec).x_val, ds.x_val)


@pytest.mark.parametrize("content, message", [
    (b"this is not an image", "bad.png: not a readable image"),
    (None, "bad.png: cannot decode the image"),  # a PNG cut in half
])
def test_broken_image_is_named(folder, content, message):
    root, truth = folder
    path = root / "test" / "dog" / "bad.png"
    if content is None:
        _write(root, "test", "dog", "bad.png", truth["test"][0][0])
        content = path.read_bytes()[:60]
    path.write_bytes(content)
    with pytest.raises(FlatlabError, match=message):
        load_dataset("folder", data_dir=root)


def test_layout_errors(folder, tmp_path):
    root, truth = folder
    (root / "train" / "cat" / "notes.txt").write_text("hello")
    with pytest.raises(FlatlabError, match="notes.txt: not a .png/.jpg/.jpeg file"):
        load_dataset("folder", data_dir=root)
    (root / "train" / "cat" / "notes.txt").unlink()
    (root / "train" / "cat" / ".DS_Store").write_text("hidden files are skipped")
    (root / "train" / "cat" / "photo.JPG").write_bytes(b"")
    Image.fromarray(truth["train"][0][0]).save(root / "train" / "cat" / "photo.JPG", "JPEG")
    assert len(load_dataset("folder", data_dir=root).y_train) == 13
    _write(root, "test", "fox", "img.png", truth["test"][0][0])
    with pytest.raises(FlatlabError, match="class 'fox' is not in train/"):
        load_dataset("folder", data_dir=root)
    shutil.rmtree(root / "test" / "fox")
    _write(root, "test", "dog", "big.png", np.zeros((7, 7, 3), np.uint8))
    with pytest.raises(FlatlabError, match="big.png is 7x7.*pass image_size=N"):
        load_dataset("folder", data_dir=root)
    assert load_dataset("folder", data_dir=root, image_size=5).input_shape == (3, 5, 5)
    with pytest.raises(FlatlabError, match="pass --data-dir"):
        load_dataset("folder")
    with pytest.raises(FlatlabError, match="needs train/ and test/"):
        load_dataset("folder", data_dir=tmp_path)
    with pytest.raises(FlatlabError, match="image_size must be N or"):
        load_dataset("folder", data_dir=root, image_size="big")
    with pytest.raises(FlatlabError, match="unknown argument.*colour"):
        load_dataset("folder", data_dir=root, colour=True)


def test_fingerprint_covers_paths_and_sizes(folder):
    root, _ = folder
    before = list_folder(root).fingerprint
    (root / "train" / "cat" / "img00.png").rename(root / "train" / "cat" / "img00b.png")
    assert list_folder(root).fingerprint != before
    (root / "train" / "cat" / "img00b.png").rename(root / "train" / "cat" / "img00.png")
    assert list_folder(root).fingerprint == before
