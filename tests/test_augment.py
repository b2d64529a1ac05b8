"""crop_flip: equals a per-example reference loop, is driven by its generator only, checks input."""

from __future__ import annotations

import pytest
import torch

from flatlab.augment import crop_flip


def _reference(x, generator, padding):
    """One example at a time: the same draws, slicing and flipping written out."""
    n, _, height, width = x.shape
    offsets = torch.randint(0, 2 * padding + 1, (n, 2), generator=generator)
    flips = torch.randint(0, 2, (n,), generator=generator)
    padded = torch.nn.functional.pad(x, (padding,) * 4)
    out = []
    for i in range(n):
        a, b = offsets[i].tolist()
        window = padded[i, :, a:a + height, b:b + width]
        out.append(window.flip(-1) if flips[i] else window)
    return torch.stack(out), offsets, flips


@pytest.mark.parametrize("dtype", [torch.uint8, torch.float32])
@pytest.mark.parametrize("padding, shape", [(4, (64, 3, 8, 8)), (2, (9, 1, 5, 7)),
                                            (0, (16, 2, 3, 3))])
def test_matches_reference_loop(dtype, padding, shape):
    x = torch.randint(0, 256, shape).to(dtype)
    out = crop_flip(x, torch.Generator().manual_seed(5), padding)
    want, offsets, flips = _reference(x, torch.Generator().manual_seed(5), padding)
    assert out.dtype == dtype and out.shape == x.shape and out.is_contiguous()
    assert torch.equal(out, want)
    if shape[0] == 64:  # every offset and both flips occur, so the test covers them
        assert set(offsets.flatten().tolist()) == set(range(9))
        assert 0 < int(flips.sum()) < 64


def test_padding_is_zero_and_input_untouched():
    x = torch.full((32, 1, 4, 4), 7.0)
    before = x.clone()
    out = crop_flip(x, torch.Generator().manual_seed(0), padding=4)
    assert torch.equal(x, before)
    assert set(out.unique().tolist()) == {0.0, 7.0}
    assert (out == 0).any(dim=(1, 2, 3)).sum() > 20  # most windows reach into the padding


def test_same_generator_state_same_batch_resumable():
    x = torch.randn(10, 3, 6, 6)
    g = torch.Generator().manual_seed(1)
    crop_flip(x, g)
    saved = g.get_state()
    second = crop_flip(x, g)
    third = crop_flip(x, g)
    g2 = torch.Generator()
    g2.set_state(saved)  # a resumed run restores the generator and continues bit-exactly
    assert torch.equal(crop_flip(x, g2), second) and torch.equal(crop_flip(x, g2), third)
    assert not torch.equal(second, third)
    torch.manual_seed(0)
    global_state = torch.get_rng_state()
    crop_flip(x, g)
    assert torch.equal(torch.get_rng_state(), global_state)  # the global RNG is not used


@pytest.mark.parametrize("shape", [(4, 3, 10), (4, 10), (2, 1, 3, 3, 3)])
def test_only_image_batches(shape):
    with pytest.raises(ValueError, match=r"needs an image batch \(N, C, H, W\)"):
        crop_flip(torch.zeros(shape), torch.Generator())


@pytest.mark.parametrize("padding", [-1, 1.5, True])
def test_bad_padding(padding):
    with pytest.raises(ValueError, match="padding must be a non-negative integer"):
        crop_flip(torch.zeros(1, 1, 2, 2), torch.Generator(), padding)
