"""JPEG decoding on the model's device (``Detector(device_decode=True)``, ``crane predict
--device-decode``): the workers only read JPEG files and the main process decodes them with
torchvision (nvJPEG on CUDA) and resizes them as PIL does. On the CPU torchvision's decoder is
libjpeg-turbo, so these tests check the whole path against the reference pixels; the ``cuda``
ones run where a GPU exists."""

from __future__ import annotations

import glob
import io
import math
import os
from collections.abc import Sequence
from pathlib import Path
from unittest import mock

import numpy as np
import pytest
import torch
from data_fixtures import photo_like, shared_data_dir
from PIL import Image

from crane.data import jpeg_decoders
from crane.data import transforms as transforms_module
from crane.data.imageio import read_jpeg
from crane.data.transforms import (
    _pil_resize_tensor,
    decode_jpegs,
    read_image_tensor,
    read_jpeg_tensor,
    resize_uint8,
)
from crane.engine import batching as batching_module
from crane.engine import predict as predict_module
from crane.engine.predict import Detector, Failure, Prediction, check_device_decode
from crane.errors import CraneError
from crane.models import create_model

SIZE = 112
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def _jpeg_bytes(im: Image.Image, **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format="JPEG", quality=90, **kw)
    return buf.getvalue()


def _pil_pixels(im: Image.Image, size: int) -> torch.Tensor:
    """The reference: PIL's bicubic resize, then RGB, as uint8 (3, size, size)."""
    rgb = im.resize((size, size), Image.Resampling.BICUBIC).convert("RGB")
    return torch.from_numpy(np.array(rgb)).permute(2, 0, 1)


@pytest.fixture
def device_decodes(monkeypatch):
    """The files' bytes of every ``decode_jpegs`` call the device path makes, a list per call
    (the up-front device check is done before counting)."""
    check_device_decode(torch.device("cpu"))
    calls: list[list[bytes]] = []
    real = predict_module.decode_jpegs

    def counting(data, size, device):
        calls.append([bytes(d.numpy()) for d in data])
        return real(data, size, device)

    monkeypatch.setattr(predict_module, "decode_jpegs", counting)
    return calls


# --- reading JPEG files in the workers -------------------------------------------------------


def test_read_jpeg_takes_rgb_and_grey_jpegs_whole_and_leaves_the_rest(tmp_path):
    photo = photo_like("RGB", (60, 80))
    cases = {
        "rgb.jpg": _jpeg_bytes(photo),
        "grey.jpg": _jpeg_bytes(photo.convert("L")),
        "progressive.jpg": _jpeg_bytes(photo, progressive=True),
        "padded.jpg": _jpeg_bytes(photo) + b"\x00" * 7,  # zero padding after the marker
    }
    for name, data in cases.items():
        (tmp_path / name).write_bytes(data)
        got = read_jpeg(tmp_path / name)
        assert got is not None, name
        assert got[0] == data and got[1] == (60, 80), name

    whole = _jpeg_bytes(photo)
    (tmp_path / "truncated.jpg").write_bytes(whole[: len(whole) * 2 // 3])
    (tmp_path / "trailing.jpg").write_bytes(whole + b"more data")
    photo.convert("CMYK").save(tmp_path / "cmyk.jpg", quality=90)
    photo.save(tmp_path / "photo.png")
    (tmp_path / "text.jpg").write_bytes(b"not an image")
    for name in ("truncated.jpg", "trailing.jpg", "cmyk.jpg", "photo.png", "text.jpg", "nope.jpg"):
        assert read_jpeg(tmp_path / name) is None, name


# --- resizing as PIL does -----------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["RGB", "L"])
@pytest.mark.parametrize(
    "hw",
    [(3 * SIZE + 7, 4 * SIZE), (4 * SIZE, SIZE + 20), (SIZE, 2 * SIZE + 1)]
    + [(SIZE // 2 + 3, SIZE - 9), (SIZE, SIZE)],
)
@pytest.mark.parametrize("resize", [resize_uint8, _pil_resize_tensor])
def test_resize_uint8_equals_pil(mode, hw, resize):
    """Shrinking (a tall image too, which Pillow 13 resizes vertical pass first), one side
    unchanged, enlarging, and no change at all; grey images resized as their RGB expansion
    (PIL resizes the L image, then converts). Both the CPU route (PIL) and the tensor route
    a GPU takes (run here on the CPU)."""
    im = photo_like(mode, hw, seed=sum(hw))
    rgb = torch.from_numpy(np.array(im.convert("RGB"))).permute(2, 0, 1)
    got = resize(rgb, SIZE)
    assert got.dtype == torch.uint8 and got.shape == (3, SIZE, SIZE)
    assert torch.equal(got, _pil_pixels(im, SIZE))
    if hw == (SIZE, SIZE):
        assert torch.equal(got, rgb)


def test_resize_uint8_on_the_shared_photos():
    """Bitwise the reference pixels on real photos (VisA's 1500x1000 JPEGs, Brain MRI scans
    smaller than the model input)."""
    shared = shared_data_dir()
    if shared is None:
        pytest.skip("../shared/data is not beside the checkout")
    files = sorted(glob.glob(str(shared / "visa" / "**" / "*.JPG"), recursive=True))[:2]
    files += sorted(glob.glob(str(shared / "brainmri" / "**" / "*.jpg"), recursive=True))[:4]
    assert len(files) == 6
    for path in files:
        ref, _ = read_image_tensor(path, 518, as_uint8=True)
        with Image.open(path) as im:
            rgb = torch.from_numpy(np.array(im.convert("RGB"))).permute(2, 0, 1)
        assert torch.equal(resize_uint8(rgb, 518), ref), path
        assert torch.equal(_pil_resize_tensor(rgb, 518), ref), path


# --- decoding a batch ----------------------------------------------------------------------------


@pytest.fixture(params=jpeg_decoders.DECODERS)
def decoder(request, monkeypatch):
    """Each JPEG decoder in turn (TorchCodec where it is installed)."""
    if request.param == "torchcodec":
        pytest.importorskip("torchcodec")
    monkeypatch.setenv(jpeg_decoders.ENV_VAR, request.param)
    return request.param


def test_decode_jpegs_matches_the_reference_and_isolates_a_bad_stream(tmp_path, decoder):
    ims = [photo_like("RGB", (150, 170), seed=1), photo_like("L", (90, 130), seed=2)]
    ims.append(photo_like("RGB", (100, 100), seed=3))
    data = [torch.frombuffer(bytearray(_jpeg_bytes(im)), dtype=torch.uint8) for im in ims]
    good = decode_jpegs(data, SIZE, "cpu")
    for raw, pixels in zip(data, good, strict=True):
        decoded = Image.open(io.BytesIO(raw.numpy().tobytes()))
        assert pixels.shape == (3, SIZE, SIZE) and pixels.dtype == torch.uint8
        # Both decoders' CPU decoder is libjpeg-turbo, as PIL's: the reference pixels exactly.
        assert torch.equal(pixels, _pil_pixels(decoded, SIZE))

    # Same-size images are resized together, a few at a time: each keeps its own pixels.
    same = [photo_like("RGB", (60, 130), seed=20 + k) for k in range(11)]
    raw = [torch.frombuffer(bytearray(_jpeg_bytes(im)), dtype=torch.uint8) for im in same]
    together = decode_jpegs([*raw[:5], data[1], *raw[5:]], SIZE, "cpu")
    alone = [decode_jpegs([r], SIZE, "cpu")[0] for r in raw]
    assert torch.equal(together[5], good[1])
    for got, want in zip([*together[:5], *together[6:]], alone, strict=True):
        assert torch.equal(got, want)

    broken = bytearray(_jpeg_bytes(ims[0]))
    broken[2:] = bytes(len(broken) - 4) + b"\xff\xd9"  # header gone, end marker kept
    mixed = decode_jpegs(
        [data[0], torch.frombuffer(broken, dtype=torch.uint8), data[2]], SIZE, "cpu"
    )
    assert isinstance(mixed[1], RuntimeError)
    assert torch.equal(mixed[0], good[0]) and torch.equal(mixed[2], good[2])


# --- the decoders: torchvision's and TorchCodec's ------------------------------------------------


def _exif_jpeg(im: Image.Image, orientation: int, extra: Sequence[bytes] = ()) -> bytes:
    """``im`` as a JPEG whose EXIF says ``orientation``, with ``extra`` segments (whole
    marker segments) inserted right after SOI."""
    exif = Image.Exif()
    exif[0x0112] = orientation
    data = _jpeg_bytes(im, exif=exif.tobytes())
    return data[:2] + b"".join(extra) + data[2:]


def _segment(marker: int, payload: bytes) -> bytes:
    return bytes([0xFF, marker]) + (len(payload) + 2).to_bytes(2, "big") + payload


XMP = _segment(0xE1, b"http://ns.adobe.com/xap/1.0/\x00<x:xmpmeta/>")
ICC = _segment(0xE2, b"ICC_PROFILE\x00\x01\x01" + bytes(40))


@pytest.mark.parametrize("orientation", range(1, 9))
def test_decoders_keep_the_stored_pixels_of_an_exif_rotated_jpeg(orientation, decoder):
    """PIL's ``Image.open`` (the reference) and torchvision keep the stored pixels whatever
    the EXIF orientation; TorchCodec would rotate or mirror them (checked here, so this test
    would fail without the EXIF segments removed): the device path gives the reference."""
    photo = photo_like("RGB", (SIZE + 30, 2 * SIZE - 10), seed=30 + orientation)
    for extra in [(), (XMP, ICC)]:  # EXIF the first APP1 segment, or after XMP's
        raw = _exif_jpeg(photo, orientation, extra=extra)
        data = torch.frombuffer(bytearray(raw), dtype=torch.uint8)
        with Image.open(io.BytesIO(raw)) as ref:
            assert ref.getexif()[0x0112] == orientation
            want = _pil_pixels(ref, SIZE)
        assert torch.equal(decode_jpegs([data, data], SIZE, "cpu")[1], want)
    if decoder == "torchcodec" and orientation != 1:
        from torchcodec.decoders import decode_jpeg

        # TorchCodec's own orientation, on the JPEG without the extra segments (its CPU
        # decoder reads only the first APP1 segment): not the stored pixels.
        simple = torch.frombuffer(bytearray(_exif_jpeg(photo, orientation)), dtype=torch.uint8)
        stored = decode_jpeg(jpeg_decoders.without_exif(simple))
        applied = decode_jpeg(simple)
        assert stored.shape == (3, *photo.size[::-1])
        assert applied.shape != stored.shape or not torch.equal(applied, stored)


def test_torchcodec_gets_no_tiff_header_in_an_app1_segment_under_another_prefix(monkeypatch):
    """TorchCodec's CPU decoder reads an orientation from the first APP1 segment whatever its
    6-byte prefix (PIL only from ``Exif\\0\\0``): such a segment is removed too."""
    pytest.importorskip("torchcodec")
    monkeypatch.setenv(jpeg_decoders.ENV_VAR, "torchcodec")
    photo = photo_like("RGB", (SIZE + 10, 2 * SIZE - 6), seed=44)
    raw = _exif_jpeg(photo, 6).replace(b"Exif\x00\x00", b"Exif\x00\xff", 1)
    data = torch.frombuffer(bytearray(raw), dtype=torch.uint8)
    with Image.open(io.BytesIO(raw)) as ref:
        want = _pil_pixels(ref, SIZE)
    assert torch.equal(decode_jpegs([data], SIZE, "cpu")[0], want)


def test_without_exif_removes_only_the_exif_segments():
    photo = photo_like("RGB", (40, 50), seed=40)
    plain = _jpeg_bytes(photo)
    data = torch.frombuffer(bytearray(plain), dtype=torch.uint8)
    assert jpeg_decoders.without_exif(data) is data  # nothing to remove: the same bytes

    raw = _exif_jpeg(photo, 6, extra=[XMP, b"\xff", ICC])  # a fill byte before a marker
    cut = jpeg_decoders.without_exif(torch.frombuffer(bytearray(raw), dtype=torch.uint8))
    got = bytes(cut.numpy())
    assert b"Exif\x00\x00" not in got and len(got) < len(raw)
    assert XMP in got and ICC in got  # other APP1 (XMP) and APP2 (ICC) segments stay
    exif_at = raw.index(b"Exif\x00\x00") - 4
    seg_len = int.from_bytes(raw[exif_at + 2 : exif_at + 4], "big")
    assert got == raw[:exif_at] + raw[exif_at + 2 + seg_len :]
    with Image.open(io.BytesIO(got)) as im, Image.open(io.BytesIO(raw)) as orig:
        assert 0x0112 not in im.getexif()  # still a JPEG, of the same stored pixels
        assert torch.equal(_pil_pixels(im, SIZE), _pil_pixels(orig, SIZE))


def _with_junk_before_exif(raw: bytes) -> bytes:
    """``raw`` (a JPEG with EXIF) with junk bytes before its EXIF segment: libjpeg skips
    them with a warning (PIL reads the file), a walk of the segments stops there."""
    exif_at = raw.index(b"Exif\x00\x00") - 4
    return raw[:exif_at] + b"junk" + raw[exif_at:]


def test_without_exif_refuses_a_header_it_cannot_walk_only_when_it_holds_exif():
    photo = photo_like("RGB", (40, 50), seed=41)
    bad = _with_junk_before_exif(_exif_jpeg(photo, 3))
    got = jpeg_decoders.without_exif(torch.frombuffer(bytearray(bad), dtype=torch.uint8))
    assert isinstance(got, RuntimeError) and "EXIF" in str(got)

    plain = _jpeg_bytes(photo)
    odd = plain[:2] + b"junk" + plain[2:]  # no EXIF anywhere: left as it is
    data = torch.frombuffer(bytearray(odd), dtype=torch.uint8)
    assert jpeg_decoders.without_exif(data) is data


def test_a_jpeg_whose_exif_cannot_be_removed_is_decoded_on_the_host(monkeypatch, tmp_path):
    """Under TorchCodec such a JPEG gets an error from the device path, and the Detector
    decodes it on the host: the reference pixels, as every other image."""
    pytest.importorskip("torchcodec")
    monkeypatch.setenv(jpeg_decoders.ENV_VAR, "torchcodec")
    photo = photo_like("RGB", (SIZE + 9, SIZE + 40), seed=42)
    (tmp_path / "odd.jpg").write_bytes(_with_junk_before_exif(_exif_jpeg(photo, 6)))
    photo.save(tmp_path / "fine.jpg", quality=90)
    paths = [os.fspath(tmp_path / n) for n in ("odd.jpg", "fine.jpg")]
    data = [read_jpeg_tensor(p)[0] for p in paths]  # both taken for the device
    got = decode_jpegs(data, SIZE, "cpu")
    assert isinstance(got[0], RuntimeError) and isinstance(got[1], torch.Tensor)

    model = create_model("tiny", image_size=SIZE, seed=4)
    with Detector(model, device="cpu", batch_size=2) as ref:
        want, want_px = _run(ref, paths)
    with Detector(model, device="cpu", batch_size=2, device_decode=True) as dev:
        got, got_px = _run(dev, paths)
    assert all(isinstance(r, Prediction) for r in got + want)
    assert torch.equal(got_px, want_px)


def test_jpeg_decoder_choice(monkeypatch):
    import torchvision.io

    monkeypatch.delenv(jpeg_decoders.ENV_VAR, raising=False)
    assert jpeg_decoders.jpeg_decoder() == "torchvision"  # while it has decode_jpeg
    monkeypatch.setenv(jpeg_decoders.ENV_VAR, " TorchCodec ")
    assert jpeg_decoders.jpeg_decoder() == "torchcodec"
    monkeypatch.setenv(jpeg_decoders.ENV_VAR, "nvjpeg")
    with pytest.raises(CraneError, match="CRANE_JPEG_DECODER='nvjpeg'.*torchvision, torchcodec"):
        jpeg_decoders.jpeg_decoder()
    monkeypatch.delenv(jpeg_decoders.ENV_VAR)
    monkeypatch.delattr(torchvision.io, "decode_jpeg")  # a torchvision that removed it
    assert jpeg_decoders.jpeg_decoder() == "torchcodec"


def test_device_decode_without_torchcodec_says_how_to_install_it(monkeypatch):
    import sys

    monkeypatch.setenv(jpeg_decoders.ENV_VAR, "torchcodec")
    monkeypatch.setattr(predict_module, "_PROBE_JPEG", {})
    for name in ("torchcodec", "torchcodec.decoders"):
        monkeypatch.setitem(sys.modules, name, None)  # import fails: not installed
    with pytest.raises(CraneError) as err:
        check_device_decode(torch.device("cpu"))
    msg = str(err.value)
    assert msg.startswith("device_decode: torchcodec") and "ModuleNotFoundError" in msg
    assert "pip install torchcodec" in msg and "CRANE_JPEG_DECODER" in msg
    assert "--device-decode" in msg and "\n" not in msg
    # The probe is per decoder: torchvision's is checked on its own.
    monkeypatch.setenv(jpeg_decoders.ENV_VAR, "torchvision")
    check_device_decode(torch.device("cpu"))
    assert predict_module._PROBE_JPEG[("cpu", "torchvision")] is None


# --- the Detector ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def mixed_inputs(tmp_path_factory):
    """Every kind of input the device path must route: JPEGs it decodes (RGB, grey,
    progressive), files it leaves to the CPU (PNG, CMYK and truncated JPEGs), a JPEG that
    passes the header check but no decoder reads (a bad Huffman table), a missing file, an
    in-memory image."""
    root = tmp_path_factory.mktemp("mixed")
    photo = photo_like("RGB", (2 * SIZE + 5, 3 * SIZE), seed=7)
    photo.save(root / "a.jpg", quality=90)
    photo_like("L", (SIZE + 40, SIZE + 11), seed=8).save(root / "b.jpg", quality=85)
    photo_like("RGB", (3 * SIZE, 2 * SIZE), seed=9).save(
        root / "c.jpg", quality=90, progressive=True
    )
    photo_like("RGB", (SIZE + 3, SIZE + 30), seed=10).save(root / "d.png")
    photo_like("RGB", (SIZE + 50, SIZE + 20), seed=11).convert("CMYK").save(root / "e.jpg")
    whole = _jpeg_bytes(photo)
    (root / "f.jpg").write_bytes(whole[: len(whole) // 2])
    bad = bytearray(whole)
    dht = bad.find(b"\xff\xc4")  # a Huffman table whose code counts add up to > 256
    bad[dht + 5 : dht + 21] = b"\xff" * 16
    (root / "g.jpg").write_bytes(bytes(bad))
    photo_like("RGB", (SIZE * 2, SIZE * 2), seed=12).save(root / "h.jpg", quality=95)
    paths = [os.fspath(root / f"{c}.{'png' if c == 'd' else 'jpg'}") for c in "abcdefgh"]
    return [
        *paths[:4],
        os.fspath(root / "missing.jpg"),
        *paths[4:],
        photo_like("RGB", (90, 90), 13),
    ]


def _run(det: Detector, inputs: list) -> tuple[list, torch.Tensor]:
    """The results and, in order, every uint8 pixel row the model was given."""
    seen = []
    forward = det._predict

    def spy(images):
        seen.append(images.cpu())
        return forward(images)

    with mock.patch.object(det, "_predict", spy):
        results = list(det.predict_iter(inputs))
    return results, torch.cat(seen)


@pytest.mark.parametrize("workers", [0, 2])
def test_detector_device_decode_matches_the_cpu_path(
    mixed_inputs, workers, decoder, device_decodes
):
    model = create_model("tiny+", image_size=SIZE, seed=3)
    ref = Detector(model, device="cpu", batch_size=3, workers=workers)
    try:
        want, want_px = _run(ref, mixed_inputs)
        assert device_decodes == []
        with Detector(
            model, device="cpu", batch_size=3, workers=workers, device_decode=True
        ) as dev:
            got, got_px = _run(dev, mixed_inputs)
    finally:
        ref.close()
    decoded_on_device = [data for call in device_decodes for data in call]

    # a, b, c, g and h reach the device decoder; d, e and f (PNG, CMYK, truncated) do not.
    names = [p for p in mixed_inputs if isinstance(p, str)]
    sent = {n for n in names if os.path.exists(n) and Path(n).read_bytes() in decoded_on_device}
    assert sorted(Path(n).stem for n in sent) == ["a", "b", "c", "g", "h"]
    assert [type(r) for r in got] == [type(r) for r in want]
    assert [type(r).__name__ for r in want].count("Failure") == 3  # missing, f, g
    for r, w in zip(got, want, strict=True):
        assert r.path == w.path
        if isinstance(w, Failure):
            assert (r.error, r.reason) == (w.error, w.reason)  # g: PIL's own message
            continue
        assert r.anomaly_map.shape == w.anomaly_map.shape
        assert r.score == pytest.approx(w.score, abs=2e-3)
    # On the CPU the device path's decoder and resize are the reference's: the same pixels.
    assert torch.equal(got_px, want_px)


def test_a_jpeg_the_device_rejects_is_decoded_on_the_host(mixed_inputs, caplog):
    """If nvJPEG refuses a stream PIL reads, the image gets exactly the reference pixels."""
    model = create_model("tiny", image_size=SIZE, seed=4)
    jpegs = [mixed_inputs[0], mixed_inputs[1]]
    real = predict_module.decode_jpegs

    def refuse_first(data, size, device):
        out = real(data, size, device)
        return [RuntimeError("Error while decoding JPEG images: code 2"), *out[1:]]

    with Detector(model, device="cpu", batch_size=2) as ref:
        _, want_px = _run(ref, jpegs)
    with (
        Detector(model, device="cpu", batch_size=2, device_decode=True) as dev,
        mock.patch.object(predict_module, "decode_jpegs", refuse_first),
    ):
        got, got_px = _run(dev, jpegs)
    assert all(isinstance(r, Prediction) for r in got)
    assert torch.equal(got_px[0], want_px[0])
    assert torch.equal(got_px[1], want_px[1])
    assert "device JPEG decoding failed" in caplog.text and "a.jpg" in caplog.text


def test_device_decoding_out_of_memory_falls_back_per_image(mixed_inputs, monkeypatch, caplog):
    """nvJPEG running out of device memory on a batch: the batch is decoded one image at a
    time, an image that still does not fit gets its error, and the Detector decodes that
    one on the host: every image keeps the reference pixels and the run goes on."""
    import torchvision.io

    real = torchvision.io.decode_jpeg
    too_big = bytes(read_jpeg(mixed_inputs[0])[0])
    calls: list[int] = []

    def short_of_memory(data, **kw):
        calls.append(len(data) if isinstance(data, list) else 1)
        if isinstance(data, list) or bytes(data.numpy()) == too_big:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")
        return real(data, **kw)

    jpegs = [mixed_inputs[0], mixed_inputs[1], mixed_inputs[8]]  # a.jpg, b.jpg (grey), h.jpg
    monkeypatch.setenv(jpeg_decoders.ENV_VAR, "torchvision")
    monkeypatch.setattr(jpeg_decoders, "batched", lambda name: True)
    data = [read_jpeg_tensor(p)[0] for p in jpegs]
    want = decode_jpegs(data, SIZE, "cpu")
    monkeypatch.setattr(torchvision.io, "decode_jpeg", short_of_memory)
    got = decode_jpegs(data, SIZE, "cpu")
    assert calls == [3, 1, 1, 1]
    assert isinstance(got[0], torch.cuda.OutOfMemoryError)
    assert torch.equal(got[1], want[1]) and torch.equal(got[2], want[2])

    model = create_model("tiny", image_size=SIZE, seed=4)
    with Detector(model, device="cpu", batch_size=3) as ref:
        _, want_px = _run(ref, jpegs)
    with Detector(model, device="cpu", batch_size=3, device_decode=True) as dev:
        results, got_px = _run(dev, jpegs)
    assert all(isinstance(r, Prediction) for r in results)
    for g, w in zip(got_px, want_px, strict=True):
        assert torch.equal(g, w)
    assert "device JPEG decoding failed (CUDA out of memory" in caplog.text


def test_with_fast_decode_the_files_left_to_the_cpu_decode_the_fast_way(tmp_path):
    """``fast_decode`` and ``device_decode`` together: JPEGs are decoded on the device as
    always (on the CPU the reference pixels: torchvision's decoder is libjpeg-turbo, the
    resize PIL's), the rest (here a PNG and a CMYK JPEG) the fast way."""
    photo_like("RGB", (3 * SIZE, 2 * SIZE + 9), seed=30).save(tmp_path / "a.jpg", quality=90)
    photo_like("RGB", (2 * SIZE, 3 * SIZE), seed=31).save(tmp_path / "b.png")
    photo_like("RGB", (3 * SIZE, 3 * SIZE), seed=32).convert("CMYK").save(tmp_path / "c.jpg")
    paths = [os.fspath(tmp_path / n) for n in ("a.jpg", "b.png", "c.jpg")]
    model = create_model("tiny", image_size=SIZE, seed=4)
    with Detector(model, device="cpu", batch_size=3, fast_decode=True, device_decode=True) as det:
        got, pixels = _run(det, paths)
    assert all(isinstance(r, Prediction) for r in got)
    exact = [read_image_tensor(p, SIZE, as_uint8=True)[0] for p in paths]
    fast = [
        read_image_tensor(p, SIZE, draft=SIZE, as_uint8=True, fast_resize=True)[0] for p in paths
    ]
    assert torch.equal(pixels[0], exact[0]) and not torch.equal(exact[0], fast[0])
    assert torch.equal(pixels[1], fast[1]) and torch.equal(pixels[2], fast[2])


@pytest.fixture
def device_resizes(monkeypatch):
    """The (C, H, W) shapes of the images each ``resize_each`` call of predict resizes."""
    calls: list[list[tuple[int, ...]]] = []
    real = predict_module.resize_each

    def counting(images, size):
        calls.append([tuple(im.shape) for im in images])
        return real(images, size)

    monkeypatch.setattr(predict_module, "resize_each", counting)
    return calls


@pytest.mark.parametrize("workers, route", [(0, "cpu"), (2, "cpu"), (2, "tensor")])
def test_detector_device_resize_gives_the_reference_pixels(
    mixed_inputs, workers, route, device_resizes, monkeypatch
):
    """Large RGB and grey images reach the device unresized and come out as the workers
    would have made them; small ones, CMYK files and in-memory images take their usual
    routes, failures stay in place. ``route="tensor"`` resizes with the tensor code a GPU
    runs instead of PIL."""
    if route == "tensor":
        monkeypatch.setattr(transforms_module, "resize_uint8", _pil_resize_tensor)
    model = create_model("tiny+", image_size=SIZE, seed=3)
    with Detector(model, device="cpu", batch_size=3, workers=workers) as ref:
        want, want_px = _run(ref, mixed_inputs)
    assert device_resizes == []
    with Detector(model, device="cpu", batch_size=3, workers=workers, device_resize=True) as det:
        got, got_px = _run(det, mixed_inputs)
        got2, got2_px = _run(det, mixed_inputs)  # the kept workers refill their buffers
        if workers:  # every buffer handed over came back (released tokens are negative)
            state = det._loader[1].dataset.handover._state
            assert (state < 0).sum() >= 2 and (state > 0).sum() == 0
    assert torch.equal(got_px, want_px) and torch.equal(got2_px, want_px)
    assert [r.path for r in got2] == [r.path for r in got]
    assert [type(r) for r in got] == [type(r) for r in want]
    for r, w in zip(got, want, strict=True):
        assert r.path == w.path
        if isinstance(w, Prediction):
            assert r.score == pytest.approx(w.score, abs=1e-6)
            np.testing.assert_allclose(r.anomaly_map, w.anomaly_map, atol=1e-6)
    shapes = sorted(s for call in device_resizes for s in call)
    # a (229x336 RGB), b (152x123 grey), c (336x224 progressive), h (224x224): larger than
    # 112x112; the PNG d (115x142) too; the 90x90 array is not; the CMYK e is resized in CMYK
    # on the host, as the reference does.
    assert shapes == sorted(
        2 * [(3, 229, 336), (1, 152, 123), (3, 336, 224), (3, 115, 142), (3, 224, 224)]
    )


def test_device_resize_with_device_decode_and_against_fast_decode(mixed_inputs, device_resizes):
    """With ``device_decode`` the JPEGs go to the device decoder and the rest (the PNG) are
    resized on the device (the CMYK JPEG is resized in CMYK on the host, as the reference
    does); ``fast_decode`` gives up the reference pixels, so asking for both is an error."""
    model = create_model("tiny", image_size=SIZE, seed=4)
    with Detector(model, device="cpu", batch_size=4) as ref:
        _, want_px = _run(ref, mixed_inputs)
    with Detector(model, device="cpu", batch_size=4, device_decode=True, device_resize=True) as det:
        _, got_px = _run(det, mixed_inputs)
    assert torch.equal(got_px, want_px)
    shapes = [s for call in device_resizes for s in call]
    assert sorted(shapes) == [(3, 115, 142)]  # d.png
    with pytest.raises(CraneError, match="choose one"):
        Detector(model, device="cpu", fast_decode=True, device_resize=True)


def test_device_resize_warns_when_shared_memory_is_short(monkeypatch, caplog, tmp_path):
    """Chunks of full-size photos need room in /dev/shm (a container's default is 64 MB)."""
    import types

    from crane.engine.predict import decode_loader

    def statvfs(free_mb):
        return lambda path: types.SimpleNamespace(f_bavail=free_mb << 8, f_frsize=4096)

    monkeypatch.setattr(batching_module.os, "statvfs", statvfs(64))
    decode_loader(518, None, 32, 8, device_resize=True)  # 8 workers x 2 chunks x 4 photos
    assert (
        "bus error" in caplog.text and "64 MB free" in caplog.text and "--shm-size" in caplog.text
    )
    caplog.clear()
    decode_loader(518, None, 32, 8)  # the default route ships 518 x 518 pixels
    monkeypatch.setattr(batching_module.os, "statvfs", statvfs(4096))
    decode_loader(518, None, 32, 8, device_resize=True)
    assert caplog.text == ""


def test_failures_keep_input_order_when_a_whole_batch_fails(mixed_inputs, tmp_path):
    """A batch whose JPEGs all fail on the device and on the host, with a worker's failure
    between them: the results still come out in input order."""
    bad = next(p for p in mixed_inputs if isinstance(p, str) and Path(p).stem == "g")
    again = tmp_path / "g2.jpg"
    again.write_bytes(Path(bad).read_bytes())
    inputs = [bad, os.fspath(tmp_path / "missing.jpg"), os.fspath(again), mixed_inputs[0]]
    model = create_model("tiny", image_size=SIZE, seed=4)
    with Detector(model, device="cpu", batch_size=2, device_decode=True) as det:
        got = list(det.predict_iter(inputs))
    assert [r.path for r in got] == inputs
    assert [type(r) for r in got] == [Failure, Failure, Failure, Prediction]


def test_chunks_carry_each_payload_once():
    """Records leave the workers without their tensors: the stacked pixel rows and the joined
    JPEG bytes are the only tensors of a chunk (each tensor costs a shared-memory segment)."""
    from crane.engine.predict import _collate, _rebatch

    px = [torch.full((3, 4, 4), k, dtype=torch.uint8) for k in range(3)]
    jp = [torch.arange(5, dtype=torch.uint8), torch.arange(3, dtype=torch.uint8) + 100]
    items = [
        {"ok": True, "image": px[0], "hw": (4, 4), "path": "p0", "i": 0},
        {"ok": True, "jpeg": jp[0], "hw": (9, 9), "path": "j1", "i": 1},
        {"ok": False, "path": "x2", "error": "bad", "i": 2},
        {"ok": True, "image": px[1], "hw": (4, 4), "path": "p3", "i": 3},
        {"ok": True, "jpeg": jp[1], "hw": (8, 8), "path": "j4", "i": 4},
        {"ok": True, "image": px[2], "hw": (4, 4), "path": "p5", "i": 5},
    ]
    chunk = _collate(items)
    assert not any(isinstance(v, torch.Tensor) for rec in chunk["ok"] for v in rec.values())
    assert torch.equal(chunk["images"], torch.stack(px))
    assert torch.equal(chunk["jpegs"], torch.cat(jp))
    first, second = _rebatch([chunk], batch_size=3, pin=False)
    assert [r["i"] for r in first["ok"]] == [0, 1, 3] and [r["i"] for r in second["ok"]] == [4, 5]
    assert torch.equal(first["images"], torch.stack(px[:2]))  # rows of 0 and 3
    assert torch.equal(first["ok"][1]["jpeg"], jp[0]) and torch.equal(
        second["ok"][0]["jpeg"], jp[1]
    )
    assert torch.equal(second["images"], px[2][None])
    assert [i for i, _ in first["failed"]] == [2] and not second["failed"]


def test_device_decode_is_checked_up_front(monkeypatch):
    model = create_model("tiny", image_size=SIZE, seed=4)
    monkeypatch.setenv(jpeg_decoders.ENV_VAR, "torchvision")
    monkeypatch.setattr(predict_module, "_PROBE_JPEG", {})
    Detector(model, device="cpu", device_decode=True)  # torchvision decodes on the CPU

    def no_nvjpeg(*_):
        raise RuntimeError("decode_jpegs_cuda: torchvision not compiled with nvJPEG support")

    monkeypatch.setattr(predict_module, "_PROBE_JPEG", {})
    monkeypatch.setattr(predict_module, "decode_jpegs", no_nvjpeg)
    with pytest.raises(CraneError) as err:
        check_device_decode(torch.device("cpu"))
    msg = str(err.value)
    assert "nvJPEG support" in msg and "--device-decode" in msg and "torchvision" in msg
    with pytest.raises(CraneError):  # remembered: not probed again
        check_device_decode(torch.device("cpu"))
    assert list(predict_module._PROBE_JPEG) == [("cpu", "torchvision")]


def test_cli_predict_device_decode_and_resize(tmp_path, device_decodes, device_resizes):
    """``crane predict --device-decode`` decodes the JPEGs through the device path,
    ``--device-resize`` resizes them there; on the CPU both give the CPU path's scores."""
    import csv

    from crane.cli import main

    for k in range(3):  # larger than the tiny preset's 224 x 224 input
        photo_like("RGB", (250 + 10 * k, 230), seed=k).save(tmp_path / f"{k}.jpg", quality=90)
    scores = {}
    runs = (("cpu", []), ("device", ["--device-decode"]), ("resize", ["--device-resize"]))
    for name, extra in runs:
        out = tmp_path / name
        argv = ["predict", str(tmp_path / "*.jpg"), "--model", "tiny", "--out", str(out)]
        assert main([*argv, "--no-progress", "--no-overlays", *extra]) == 0
        rows = csv.DictReader(open(out / "predictions.csv"))
        scores[name] = {r["path"]: float(r["image_score"]) for r in rows}
        assert len(scores[name]) == 3
        assert sum(map(len, device_decodes)) == (0 if name == "cpu" else 3)
        assert sum(map(len, device_resizes)) == (3 if name == "resize" else 0)
    for path, score in scores["cpu"].items():
        assert scores["device"][path] == pytest.approx(score, abs=1e-6)
        assert scores["resize"][path] == pytest.approx(score, abs=1e-6)


# --- evaluate -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def jpeg_synth(synth, tmp_path_factory):
    """The shared synthetic dataset with its test images as JPEGs (masks stay PNG)."""
    import json
    import shutil

    root = tmp_path_factory.mktemp("jpeg_synth")
    shutil.copytree(synth, root, dirs_exist_ok=True)
    meta = json.loads((root / "meta.json").read_text())
    for samples in meta["test"].values():
        for s in samples:
            png = root / s["img_path"]
            s["img_path"] = s["img_path"][: -len(".png")] + ".jpg"
            Image.open(png).convert("RGB").save(root / s["img_path"], quality=90)
            png.unlink()
    (root / "meta.json").write_text(json.dumps(meta))
    return root


def _evaluate_inputs(ds, **kw):
    """evaluate's result and the uint8 pixels its forward passes were given, in order."""
    from crane.engine import evaluate as evaluate_module

    seen = []
    real = evaluate_module.model_input

    def spy(images, device):
        seen.append(images.cpu())
        return real(images, device)

    model = create_model("tiny+", image_size=SIZE, seed=6)
    with mock.patch.object(evaluate_module, "model_input", spy):
        res = evaluate_module.evaluate(
            model, ds, device=torch.device("cpu"), batch_size=3, progress=False, **kw
        )
    return res, torch.cat(seen)


@pytest.mark.parametrize("option", ["device_decode", "device_resize"])
def test_evaluate_device_decode_matches_the_cpu_path(
    jpeg_synth, device_decodes, device_resizes, option
):
    """The dataset's 128-px JPEGs (larger than the 112-px input) decoded on the device, or
    decoded by the workers and resized on the device: the reference inputs and metrics."""
    from crane.data import AnomalyDataset

    ds = AnomalyDataset(jpeg_synth, "test", image_size=SIZE)
    want, want_px = _evaluate_inputs(ds)
    assert device_decodes == [] and device_resizes == []
    got, got_px = _evaluate_inputs(ds, workers=2, **{option: True})
    routed = device_decodes if option == "device_decode" else device_resizes
    assert sum(map(len, routed)) == got.n_images == want.n_images == 16
    if option == "device_resize":
        assert device_decodes == [] and {s for c in device_resizes for s in c} == {(3, 128, 128)}
    assert torch.equal(got_px, want_px)
    for cls, metrics in want.report.per_class.items():
        for name, value in metrics.items():
            other = got.report.per_class[cls][name]
            assert (value is None) == (other is None)
            if value is not None:
                assert other == pytest.approx(value, abs=1e-6), (cls, name)


def _with_a_bad_jpeg(jpeg_synth: Path, tmp_path: Path, rel: str) -> tuple[Path, Path]:
    """A copy of the JPEG dataset whose image ``rel`` no decoder reads."""
    import shutil

    root = tmp_path / "ds"
    shutil.copytree(jpeg_synth, root)
    bad = root / rel
    data = bytearray(bad.read_bytes())
    dht = data.find(b"\xff\xc4")  # a Huffman table no decoder accepts
    data[dht + 5 : dht + 21] = b"\xff" * 16
    bad.write_bytes(bytes(data))
    return root, bad


def test_evaluate_device_decode_skips_or_raises_on_a_bad_jpeg(jpeg_synth, tmp_path, caplog):

    from crane.data import AnomalyDataset
    from crane.errors import ImageReadError

    root, _ = _with_a_bad_jpeg(jpeg_synth, tmp_path, "tile/test/good/001.jpg")
    res, _ = _evaluate_inputs(
        AnomalyDataset(root, "test", image_size=SIZE, on_error="skip"), device_decode=True
    )
    assert res.n_images == 15
    assert "skipping" in caplog.text and "001.jpg" in caplog.text
    with pytest.raises(ImageReadError, match="001.jpg"):
        _evaluate_inputs(AnomalyDataset(root, "test", image_size=SIZE), device_decode=True)


def test_evaluate_device_decode_on_real_visa_jpegs(device_decodes):
    """VisA's camera JPEGs (1500x1000 px, with their PNG masks): 8 anomalous and 8 normal
    fryum images evaluated three ways (decoded on the CPU, on the device, resized on the
    device): the same inputs, so the same metrics."""
    from crane.data import AnomalyDataset, prepare

    shared = shared_data_dir()
    if shared is None:
        pytest.skip("../shared/data is not beside the checkout")
    meta = prepare("visa", shared / "visa")
    samples = meta["test"]["fryum"]
    bad = [s for s in samples if s.anomaly][:8]
    good = [s for s in samples if not s.anomaly][:8]
    meta["test"]["fryum"] = bad + good
    ds = AnomalyDataset(shared / "visa", "test", meta=meta, image_size=SIZE)
    want, want_px = _evaluate_inputs(ds)
    got, got_px = _evaluate_inputs(ds, device_decode=True, workers=2)
    assert sum(map(len, device_decodes)) == got.n_images == want.n_images == 16
    resized, resized_px = _evaluate_inputs(ds, device_resize=True, workers=2)
    assert torch.equal(got_px, want_px) and torch.equal(resized_px, want_px)
    for name, value in want.report.per_class["fryum"].items():
        assert got.report.per_class["fryum"][name] == pytest.approx(value, abs=1e-6), name
        assert resized.report.per_class["fryum"][name] == pytest.approx(value, abs=1e-6), name


def test_cli_evaluate_device_decode(jpeg_synth, tmp_path, device_decodes):
    import json

    from crane.cli import main

    out = tmp_path / "eval"
    argv = ["evaluate", "--dataset", "mvtec", "--root", str(jpeg_synth), "--model", "tiny"]
    assert main([*argv, "--out", str(out), "--no-progress", "--device-decode"]) == 0
    assert sum(map(len, device_decodes)) == 16
    assert json.loads((out / "metrics.json").read_text())["n_images"] == 16


def test_cli_evaluate_and_train_device_resize(jpeg_synth, tmp_path, device_resizes):
    """``--device-resize`` reaches evaluate and the training feature cache (the tiny preset's
    224-px input: the 128-px images are not larger, so pass a 112-px image size to train)."""
    import json

    from crane.cli import main

    out = tmp_path / "eval"
    argv = ["evaluate", "--dataset", "mvtec", "--root", str(jpeg_synth), "--model", "tiny"]
    assert main([*argv, "--out", str(out), "--no-progress", "--device-resize"]) == 0
    assert json.loads((out / "metrics.json").read_text())["n_images"] == 16
    assert device_resizes == []  # 128 x 128 is not larger than the tiny preset's 224 x 224
    run = tmp_path / "run"
    argv = ["train", "--dataset", "mvtec", "--root", str(jpeg_synth), "--preset", "tiny"]
    argv += ["--out", str(run), "--epochs", "1", "--image-size", str(SIZE), "--no-progress"]
    assert main([*argv, "--device-resize"]) == 0
    assert sum(map(len, device_resizes)) == 16


# --- training: the feature cache's one encoding pass ---------------------------------------------


@pytest.mark.parametrize("option", ["device_decode", "device_resize"])
def test_feature_cache_device_decode_matches_the_cpu_path(
    jpeg_synth, device_decodes, device_resizes, option
):
    from crane.data import AnomalyDataset
    from crane.engine.features import FeatureCache

    model = create_model("tiny+", image_size=SIZE, seed=6).eval()
    ds = AnomalyDataset(jpeg_synth, "test", image_size=SIZE)
    cpu = torch.device("cpu")
    want = FeatureCache.build(model, ds, cpu, batch_size=3, progress=False)
    assert device_decodes == [] and device_resizes == []
    got = FeatureCache.build(
        model, ds, cpu, batch_size=3, workers=2, progress=False, **{option: True}
    )
    routed = device_decodes if option == "device_decode" else device_resizes
    assert sum(map(len, routed)) == len(got) == len(want) == 16
    assert got.paths == want.paths
    assert torch.equal(got.masks, want.masks) and torch.equal(got.labels, want.labels)
    assert got.masks.any()  # the anomalous samples' masks came through
    # The same pixels (on the CPU both routes give the reference's) in the same batches.
    torch.testing.assert_close(got.global_feat, want.global_feat, atol=1e-6, rtol=0)
    torch.testing.assert_close(got.patch_sets, want.patch_sets, atol=1e-6, rtol=0)


def test_feature_cache_device_decode_skips_or_raises_on_a_bad_jpeg(jpeg_synth, tmp_path, caplog):

    from crane.data import AnomalyDataset
    from crane.engine.features import FeatureCache
    from crane.errors import ImageReadError

    root, bad = _with_a_bad_jpeg(jpeg_synth, tmp_path, "plate/test/good/000.jpg")
    model = create_model("tiny", image_size=SIZE, seed=6).eval()
    kw = dict(batch_size=4, progress=False, device_decode=True)
    ds = AnomalyDataset(root, "test", image_size=SIZE, on_error="skip")
    cache = FeatureCache.build(model, ds, torch.device("cpu"), **kw)
    assert len(cache) == 15 and str(bad) not in cache.paths
    assert cache.masks.shape[0] == cache.labels.shape[0] == cache.patch_sets.shape[0] == 15
    assert "skipping" in caplog.text and "000.jpg" in caplog.text
    with pytest.raises(ImageReadError, match="000.jpg"):
        FeatureCache.build(
            model, AnomalyDataset(root, "test", image_size=SIZE), torch.device("cpu"), **kw
        )


def test_cli_train_and_calibrate_device_decode(jpeg_synth, tmp_path, device_decodes):
    from crane.cli import main

    out = tmp_path / "run"
    argv = ["train", "--dataset", "mvtec", "--root", str(jpeg_synth), "--preset", "tiny"]
    argv += ["--out", str(out), "--epochs", "1", "--batch-size", "8", "--no-progress"]
    assert main([*argv, "--device-decode"]) == 0
    assert sum(map(len, device_decodes)) == 16
    assert (out / "train_log.jsonl").exists()
    # calibrate's scores with the JPEGs decoded on the device: the same F1-optimal threshold
    # up to the scores' small differences (test_detector_device_decode_matches_the_cpu_path).
    import json

    thresholds = []
    for extra in ([], ["--device-decode"]):
        argv = ["calibrate", "--model", str(out), "--root", str(jpeg_synth), "--no-progress"]
        assert main([*argv, *extra]) == 0
        thresholds.append(json.loads((out / "config.json").read_text())["image_threshold"])
    assert sum(map(len, device_decodes)) == 32
    assert thresholds[1] == pytest.approx(thresholds[0], abs=2e-3)


# --- CUDA (run on the device machine; skipped elsewhere) ------------------------------------------


@cuda
def test_cuda_decode_is_close_to_the_reference_pixels(mixed_inputs, decoder):
    """nvJPEG's inverse DCT and chroma upsampling may round differently from libjpeg-turbo's:
    after the shrink to the model input the pixels stay within a few levels."""
    check_device_decode(torch.device("cuda"))
    paths = [p for p in mixed_inputs if isinstance(p, str) and Path(p).stem in "abch"]
    data = [read_jpeg_tensor(p)[0] for p in paths]
    got = decode_jpegs(data, SIZE, "cuda")
    for path, pixels in zip(paths, got, strict=True):
        assert pixels.is_cuda and pixels.shape == (3, SIZE, SIZE)
        ref, _ = read_image_tensor(path, SIZE, as_uint8=True)
        d = (pixels.cpu().int() - ref.int()).abs().float()
        assert d.mean() < 1.0 and d.max() <= 8, (path, d.mean(), d.max())


@cuda
def test_cuda_detector_device_decode_matches_the_cpu_path(mixed_inputs):
    model = create_model("tiny+", image_size=SIZE, seed=3)
    with Detector(model, device="cuda", batch_size=3) as ref:
        want = list(ref.predict_iter(mixed_inputs))
    with Detector(model, device="cuda", batch_size=3, device_decode=True) as dev:
        got = list(dev.predict_iter(mixed_inputs))
    assert [type(r) for r in got] == [type(r) for r in want]
    for r, w in zip(got, want, strict=True):
        assert r.path == w.path
        if isinstance(w, Prediction):
            assert r.anomaly_map.shape == w.anomaly_map.shape
            assert r.score == pytest.approx(w.score, abs=2e-2)


@cuda
@pytest.mark.parametrize("workers", [0, 2])
def test_cuda_detector_device_resize_gives_the_reference_pixels(mixed_inputs, workers):
    """On the GPU (float64 products; the loader's thread pins the full-size pixels with
    workers): the same pixels as the default path, hence the same results."""
    model = create_model("tiny+", image_size=SIZE, seed=3)
    with Detector(model, device="cuda", batch_size=3, workers=workers) as ref:
        want, want_px = _run(ref, mixed_inputs)
    with Detector(model, device="cuda", batch_size=3, workers=workers, device_resize=True) as det:
        got, got_px = _run(det, mixed_inputs)
    assert torch.equal(got_px, want_px)
    assert [type(r) for r in got] == [type(r) for r in want]
    for r, w in zip(got, want, strict=True):
        if isinstance(w, Prediction):
            assert r.score == pytest.approx(w.score, abs=1e-6)


@cuda
@pytest.mark.parametrize(
    "option, global_tol, patch_tol, metric_tol",
    [("device_decode", 2e-2, 1e-1, 0.1), ("device_resize", 1e-5, 1e-5, 1e-5)],
)
def test_cuda_evaluate_and_feature_cache_on_the_device(
    jpeg_synth, option, global_tol, patch_tol, metric_tol
):
    """evaluate and the training feature cache with nvJPEG (which may round a few levels
    differently: results close to the CPU-decoded ones) or resizing on the GPU (pinned by the
    loader's thread; the reference inputs: the same results), the same samples in order."""
    from crane.data import AnomalyDataset
    from crane.engine.evaluate import evaluate
    from crane.engine.features import FeatureCache

    model = create_model("tiny+", image_size=SIZE, seed=6).eval()
    ds = AnomalyDataset(jpeg_synth, "test", image_size=SIZE)
    gpu = torch.device("cuda")
    kw = dict(batch_size=3, workers=2, progress=False)
    want = FeatureCache.build(model, ds, gpu, **kw)
    got = FeatureCache.build(model, ds, gpu, **{option: True}, **kw)
    assert got.paths == want.paths and torch.equal(got.labels, want.labels)
    assert torch.equal(got.masks, want.masks)
    torch.testing.assert_close(got.global_feat, want.global_feat, atol=global_tol, rtol=0)
    torch.testing.assert_close(got.patch_sets, want.patch_sets, atol=patch_tol, rtol=0)
    ref = evaluate(model, ds, device=gpu, **kw)
    dev = evaluate(model, ds, device=gpu, **{option: True}, **kw)
    assert dev.n_images == ref.n_images == 16
    for cls, metrics in ref.report.per_class.items():
        for name, value in metrics.items():
            other = dev.report.per_class[cls][name]
            assert math.isnan(other) == math.isnan(value), (cls, name)
            if not math.isnan(value):
                assert other == pytest.approx(value, abs=metric_tol), (cls, name)
