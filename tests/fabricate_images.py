"""Fabricate an image folder for flatlab's ``--dataset folder``: DIR/{train,val,test}/CLASS/*.png.

Class ``c`` is a sinusoidal grating with ``1 + c // 2`` cycles per image, vertical stripes for
even ``c`` and horizontal for odd, tinted with the class's own random colour, at a random phase
under uniform pixel noise: a small CNN learns it well above chance, and a horizontal flip or a
small crop (crop-flip augmentation) keeps the label. Seeded: the same arguments, the same bytes.

    python tests/fabricate_images.py DIR [--classes 10] [--size 32] [--train 40] [--val 10]
                                         [--test 10] [--seed 0]
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image


def make_image_folder(root: str | Path, *, classes: int = 10, size: int = 32, train: int = 40,
                      val: int = 10, test: int = 10, seed: int = 0) -> Path:
    """Write ``classes`` x (``train`` + ``val`` + ``test``) ``size`` x ``size`` RGB PNGs under
    ``root`` (class directories ``class00``, ``class01``, ...); ``val=0`` writes no ``val/``."""
    root = Path(root)
    rng = np.random.default_rng(seed)
    tints = rng.uniform(0.3, 1.0, size=(classes, 3))
    yy, xx = np.mgrid[0:size, 0:size] / size
    for split, count in (("train", train), ("val", val), ("test", test)):
        for c in range(classes):
            folder = root / split / f"class{c:02d}"
            folder.mkdir(parents=True, exist_ok=True)
            along = (yy if c % 2 else xx) * (1 + c // 2)
            for i in range(count):
                phase = rng.uniform(0, 2 * math.pi)
                grating = 0.5 + 0.5 * np.sin(2 * math.pi * along + phase)
                noise = rng.uniform(0, 60, (size, size, 3))
                pixels = 40 + 150 * grating[..., None] * tints[c] + noise
                Image.fromarray(pixels.clip(0, 255).astype(np.uint8)).save(folder / f"{i:04d}.png")
    return root


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("root")
    for name, default in (("classes", 10), ("size", 32), ("train", 40), ("val", 10),
                          ("test", 10), ("seed", 0)):
        p.add_argument(f"--{name}", type=int, default=default)
    args = vars(p.parse_args(argv))
    root = make_image_folder(args.pop("root"), **args)
    print(f"wrote {root}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
