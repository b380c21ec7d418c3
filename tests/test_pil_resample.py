"""PIL's bicubic resize reproduced bit for bit as tensor code (``crane.data.pil_resample``), the
resize that runs on the GPU for device-decoded JPEGs. PIL itself is the reference; the tensor
path runs on the CPU here (the same float64 products a GPU runs; exact, so device-independent),
and on CUDA where one exists. Real photos: ``test_device_decode``."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from data_fixtures import photo_like
from PIL import Image

from crane.data.pil_resample import bicubic_coefficients, pil_resize_uint8
from crane.data.transforms import _pil_vertical_first, resize_uint8

BICUBIC = Image.Resampling.BICUBIC


def _chw(im: Image.Image) -> torch.Tensor:
    arr = np.array(im)
    return torch.from_numpy(arr).permute(2, 0, 1) if arr.ndim == 3 else torch.from_numpy(arr)


def _vertical_first(h: int, w: int, oh: int, ow: int) -> bool:
    return _pil_vertical_first() and 0 < h - oh and 2 * (w - ow) < h - oh


def _check(im: Image.Image, oh: int, ow: int) -> None:
    want = _chw(im.resize((ow, oh), BICUBIC))
    got = pil_resize_uint8(_chw(im), oh, ow, _vertical_first(im.height, im.width, oh, ow))
    assert got.dtype == torch.uint8 and got.shape == want.shape
    diff = int((got != want).sum())
    assert diff == 0, f"{im.mode} {im.size} -> {(ow, oh)}: {diff} values differ"


@pytest.mark.parametrize(
    "hw, out",
    [
        ((2048, 2048), (518, 518)),  # a large photo: 17 taps, several blocks per pass
        ((1000, 1500), (518, 518)),  # VisA's size
        ((256, 256), (518, 518)),  # enlarging
        ((1000, 37), (518, 518)),  # tall: Pillow 13 runs the vertical pass first
        ((37, 1000), (518, 518)),
        ((518, 900), (518, 518)),  # one side unchanged: that pass is skipped
        ((123, 457), (517, 519)),  # enlarging one side, shrinking the other
        ((5, 7), (3, 11)),
        ((1, 1), (4, 4)),
        ((8, 8), (1, 1)),
    ],
)
@pytest.mark.parametrize("mode", ["RGB", "L"])
def test_equals_pil_on_noise(hw, out, mode):
    """Uniform noise: every output value's fixed-point sum lands anywhere, so a coefficient
    one unit off (of 2**22) or a wrong rounding shows up among the ~1e5-1e6 values."""
    arr = np.random.default_rng(sum(hw) + sum(out)).integers(0, 256, (*hw, 3), dtype=np.uint8)
    _check(Image.fromarray(arr).convert(mode), *out)


def test_equals_pil_on_random_geometries():
    rng = np.random.default_rng(5)
    for trial in range(40):
        h, w = (int(v) for v in rng.integers(1, 700, 2))
        oh, ow = (int(v) for v in rng.integers(1, 600, 2))
        _check(photo_like("RGB", (h, w), seed=trial), oh, ow)


def test_coefficients_sum_to_one_in_fixed_point_and_stay_in_the_image():
    for n_in, n_out in [(2048, 518), (256, 518), (518, 518), (7, 3), (1, 9)]:
        start, count, k = bicubic_coefficients(n_in, n_out)
        assert (start >= 0).all() and (start + count <= n_in).all() and (count >= 1).all()
        assert (k[np.arange(k.shape[1]) >= count[:, None]] == 0).all()
        # Each row is a normalised filter rounded to 22 bits: the sum is 2**22 within
        # the rounding of its taps.
        assert (np.abs(k.sum(axis=1) - (1 << 22)) <= count).all()


def test_batches_and_rejects_other_dtypes():
    ims = [photo_like("RGB", (90, 70), seed=s) for s in range(3)]
    batch = torch.stack([_chw(im) for im in ims])  # (3, 3, 90, 70)
    got = pil_resize_uint8(batch, 40, 50, _vertical_first(90, 70, 40, 50))
    for im, row in zip(ims, got, strict=True):
        assert torch.equal(row, _chw(im.resize((50, 40), BICUBIC)))
    with pytest.raises(TypeError, match="uint8"):
        pil_resize_uint8(batch.float(), 40, 50, False)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_resize_equals_pil():
    for seed, hw in enumerate([(2048, 2048), (1000, 1500), (1000, 37), (256, 300)]):
        im = photo_like("RGB", hw, seed=seed)
        got = resize_uint8(_chw(im).cuda()[None], 518)[0].cpu()
        assert torch.equal(got, _chw(im.resize((518, 518), BICUBIC))), hw


def test_rows_split_over_several_products_give_the_same_pixels(monkeypatch):
    """A pass whose intermediates exceed the budget runs in parts of rows (a 10k-px image on
    the GPU needed ≈ 12 bytes per input byte at once): the same pixels, row for row."""
    import crane.data.pil_resample as R

    arr = np.random.default_rng(4).integers(0, 256, (301, 437, 3), dtype=np.uint8)
    im = Image.fromarray(arr)
    seen = []
    real_bmm = torch.bmm

    def counted(a, b):
        seen.append(a.shape[1])
        return real_bmm(a, b)

    monkeypatch.setattr(R, "_PASS_BYTES", 50_000)  # (a few rows per product)
    monkeypatch.setattr(torch, "bmm", counted)
    _check(im, 518, 518)
    _check(im, 97, 131)
    assert len(seen) > 20 and max(seen) < 3 * 301  # split: no product takes every row


def test_out_of_gpu_memory_resizing_falls_back_to_the_host_with_the_same_pixels(
    monkeypatch, caplog
):
    """(Simulated here: the group's product raises as CUDA would.) The batch keeps its images
    instead of failing; the host resize gives the same pixels."""
    import logging

    import crane.data.transforms as T

    rng = np.random.default_rng(5)
    images = [torch.from_numpy(rng.integers(0, 256, (3, 90, 70), dtype=np.uint8)) for _ in range(3)]
    images.append(torch.from_numpy(rng.integers(0, 256, (1, 64, 64), dtype=np.uint8)))
    want = T.resize_each(images, 56)
    real, calls = T.resize_uint8, []

    def short_of_memory(pixels, size):
        calls.append(pixels.shape[0])
        if len(calls) == 1:  # (the first group, as one product)
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")
        return real(pixels, size)

    monkeypatch.setattr(T, "resize_uint8", short_of_memory)
    with caplog.at_level(logging.WARNING):
        got = T.resize_each(images, 56)
    assert "out of GPU memory resizing 3 image(s) of 90x70 px" in caplog.text
    assert calls[:4] == [3, 1, 1, 1]  # (then the host, one image at a time)
    for a, b in zip(got, want, strict=True):
        assert torch.equal(a, b)
