"""Image folders: ``DIR/{train,val,test}/CLASS/*.{png,jpg,jpeg}`` decoded into uint8 tensors.

Layout::

    DIR/train/CLASS/*.png|jpg|jpeg    required
    DIR/test/CLASS/...                required (classes may be a subset of train's)
    DIR/val/CLASS/...                 optional: the validation split

Classes are the sub-directories of ``train/``, sorted by name (label ``i`` is the ``i``-th);
files within a class are taken in name order. Hidden files (``.DS_Store``) are skipped; any
other file, or an image Pillow cannot decode, is a :class:`FlatlabError` naming it.

Images are decoded with Pillow by a thread pool (decoding and resizing release the GIL) straight
into one preallocated ``uint8`` tensor ``(N, C, H, W)``: 1 byte per pixel value, no float copy.
``image_size=N`` (or ``[H, W]``) resizes every image to that size (bilinear, aspect ratio not
kept); without it all images must already have one size. ``grayscale=True`` gives one channel,
otherwise RGB. Input statistics (per-channel mean/std of ``x / 255``) come from the training
split; :meth:`Dataset.normalize` applies them per batch.

The file list's fingerprint (sha256 over every image's relative path and size in bytes) goes
into the data set's spec with the folder's absolute path, so a checkpoint rebuilds exactly this
data, or says that the folder changed.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from flatlab.data.dataset import Dataset, channel_statistics
from flatlab.errors import FlatlabError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
SPLITS = ("train", "val", "test")


@dataclass(frozen=True)
class FolderListing:
    """Every image of an image folder, labelled, and the fingerprint of the list."""

    root: Path
    classes: tuple[str, ...]
    files: dict[str, list[tuple[str, int]]]  # split -> [(path, label)], absent split -> []
    fingerprint: str

    def counts(self) -> dict[str, int]:
        return {split: len(self.files[split]) for split in SPLITS}


def list_folder(data_dir: str | os.PathLike | None) -> FolderListing:
    """List ``DIR/{train,val,test}/CLASS/*`` (one level of classes, nothing recursive)."""
    if data_dir is None:
        raise FlatlabError("dataset 'folder' reads DIR/train/CLASS/*.png|jpg and DIR/test/...: "
                           "pass --data-dir DIR")
    try:
        root = Path(data_dir).expanduser().resolve()
    except (OSError, RuntimeError, TypeError, ValueError) as err:  # "~nobody/x", NUL bytes
        raise FlatlabError(f"image folder {str(data_dir)[:200]!r}: bad path ({err})") from None
    if not (root / "train").is_dir() or not (root / "test").is_dir():
        raise FlatlabError(f"image folder {str(root)!r} needs train/ and test/ sub-directories "
                           f"with one directory per class")
    classes = tuple(sorted(_class_dirs(root / "train")))
    if not classes:
        raise FlatlabError(f"image folder {str(root / 'train')!r} has no class directories")
    label = {name: i for i, name in enumerate(classes)}
    files: dict[str, list[tuple[str, int]]] = {}
    digest = hashlib.sha256()
    for split in SPLITS:
        files[split] = []
        if not (root / split).is_dir():
            continue
        for name in sorted(_class_dirs(root / split)):
            if name not in label:
                raise FlatlabError(f"{root / split / name}: class {name!r} is not in train/")
            for entry in _images(root / split / name):
                files[split].append((entry.path, label[name]))
                digest.update(f"{split}/{name}/{entry.name}\t{entry.stat().st_size}\n".encode())
        if not files[split] and split != "val":
            raise FlatlabError(f"image folder {str(root / split)!r} holds no images")
    return FolderListing(root, classes, files, "sha256:" + digest.hexdigest())


def load_folder(*, seed: int, data_dir: str | os.PathLike | None, image_size: Any = None,
                grayscale: bool = False, expected_fingerprint: str | None = None,
                expected_files: Any = None, threads: int | None = None) -> Dataset:
    """Decode an image folder (see the module docstring) into a uint8 :class:`Dataset`.

    ``expected_fingerprint`` (from a checkpoint's spec, with ``expected_files``, its file counts)
    makes a changed folder an error before anything is decoded. ``threads`` defaults to the
    CPUs this process may use.
    """
    listing = list_folder(data_dir)
    if expected_fingerprint is not None and expected_fingerprint != listing.fingerprint:
        then = (f"{_counts(expected_files)} files then, " if isinstance(expected_files, dict)
                and all(isinstance(expected_files.get(s), int) for s in SPLITS) else "")
        raise FlatlabError(
            f"image folder {str(listing.root)!r} changed since the checkpoint was written "
            f"({then}{_counts(listing.counts())} files now; the list of paths and sizes differs); "
            f"restore the original images or pass --data-dir to where they are")
    size = _size(image_size, listing)
    mode = "L" if grayscale else "RGB"
    if threads is None:
        threads = (len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
                   else os.cpu_count() or 1)
    with ThreadPoolExecutor(max_workers=threads) if threads > 1 else contextlib.nullcontext() \
            as pool:
        x = {split: _decode_all(files, size, mode, image_size is not None, pool)
             for split, files in listing.files.items()}
    y = {split: torch.tensor([label for _, label in files], dtype=torch.int64)
         for split, files in listing.files.items()}
    mean, std = channel_statistics(x["train"])
    kwargs = {k: v for k, v in (("image_size", image_size), ("grayscale", grayscale))
              if v not in (None, False)}
    spec = {"name": "folder", "seed": seed, "kwargs": kwargs, "data_dir": str(listing.root),
            "fingerprint": listing.fingerprint, "files": listing.counts()}
    has_val = len(y["val"]) > 0
    return Dataset(name="folder", x_train=x["train"], y_train=y["train"], x_test=x["test"],
                   y_test=y["test"], num_classes=len(listing.classes),
                   input_shape=tuple(x["train"].shape[1:]), spec=spec,
                   x_val=x["val"] if has_val else None, y_val=y["val"] if has_val else None,
                   mean=mean, std=std, classes=listing.classes)


def _class_dirs(split_dir: Path) -> list[str]:
    names = []
    for entry in os.scandir(split_dir):
        if entry.name.startswith("."):
            continue
        if not entry.is_dir():
            raise FlatlabError(f"{entry.path}: expected only class directories in "
                               f"{split_dir.name}/, found a file")
        names.append(entry.name)
    return names


def _images(class_dir: Path) -> list[os.DirEntry]:
    entries = []
    for entry in os.scandir(class_dir):
        if entry.name.startswith("."):
            continue
        if not entry.is_file() or not entry.name.lower().endswith(IMAGE_SUFFIXES):
            raise FlatlabError(f"{entry.path}: not a {'/'.join(IMAGE_SUFFIXES)} file; class "
                               f"directories may hold only images")
        entries.append(entry)
    return sorted(entries, key=lambda e: e.name)


def _size(image_size: Any, listing: FolderListing) -> tuple[int, int]:
    """(height, width) of every decoded image."""
    if image_size is None:
        first = listing.files["train"][0][0]
        with _opened(first) as img:
            return img.size[1], img.size[0]
    sizes = image_size if isinstance(image_size, Sequence) and not isinstance(image_size, str) \
        else [image_size, image_size]
    try:
        height, width = (int(s) for s in sizes)
    except (TypeError, ValueError):
        raise FlatlabError(f"image_size must be N or [H, W], got {image_size!r}") from None
    if min(height, width) < 1 or max(height, width) > 65536:
        raise FlatlabError(f"image_size must be between 1 and 65536, got {image_size!r}")
    return height, width


def _decode_all(files: list[tuple[str, int]], size: tuple[int, int], mode: str, resize: bool,
                pool: ThreadPoolExecutor | None, chunk: int = 64) -> Tensor:
    channels = 1 if mode == "L" else 3
    out = torch.empty((len(files), channels, *size), dtype=torch.uint8)
    target = out.numpy()  # shares memory: each thread writes its example in place

    def decode(i: int) -> None:
        path = files[i][0]
        with _opened(path) as img:
            try:
                img = img.convert(mode)
                if resize and img.size != (size[1], size[0]):
                    img = img.resize((size[1], size[0]), Image.Resampling.BILINEAR)
                pixels = np.asarray(img)
            except Exception as err:  # truncated or corrupt data: the file's fault
                raise FlatlabError(f"{path}: cannot decode the image ({err})") from None
        if pixels.shape[:2] != size:
            raise FlatlabError(f"{path} is {pixels.shape[1]}x{pixels.shape[0]}, the first training "
                               f"image {size[1]}x{size[0]}; pass image_size=N to resize all")
        target[i] = pixels.reshape(*size, channels).transpose(2, 0, 1)

    def decode_range(start: int) -> None:  # one task per chunk: futures cost ~0.1 ms each
        for i in range(start, min(start + chunk, len(files))):
            decode(i)

    if pool is None:
        for i in range(len(files)):
            decode(i)
        return out
    futures = [pool.submit(decode_range, start) for start in range(0, len(files), chunk)]
    try:
        for future in futures:
            future.result()
    finally:
        for future in futures:
            future.cancel()
    return out


@contextlib.contextmanager
def _opened(path: str) -> Iterator[Image.Image]:
    """``Image.open`` whose failure (not an image, unreadable) is a FlatlabError naming the file."""
    try:
        image = Image.open(path)
    except Exception as err:
        raise FlatlabError(f"{path}: not a readable image ({err})") from None
    with image:
        yield image


def _counts(counts: dict[str, int]) -> str:
    return " / ".join(f"{counts[s]} {s}" for s in SPLITS)
