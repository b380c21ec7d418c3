"""Outputs written beside the predict/evaluate loop (crane.engine.writer): every job runs, off
the caller's thread, with bounded memory; failures reach the caller after the other jobs have
finished; the files are the same bytes as when written in the loop."""

from __future__ import annotations

import threading
import time
import warnings

import numpy as np
import pytest
import torch
from PIL import Image
from scipy import ndimage

from crane.engine.predict import Detector, run_predict
from crane.engine.writer import OutputWriter, default_write_threads
from crane.errors import CraneError
from crane.models import create_model
from crane.viz import jet, overlay, resize_map, save_png, write_overlay

SIZE = 56


def test_jobs_run_on_writer_threads_and_all_finish():
    done, names = [], set()

    def job(i):
        time.sleep(0.01)
        names.add(threading.current_thread().name)
        done.append(i)

    with OutputWriter(3) as writer:
        for i in range(12):
            writer.submit(job, i)
    assert sorted(done) == list(range(12))
    assert names and all(n.startswith("crane-write") for n in names)


def test_submit_waits_once_max_pending_jobs_are_queued():
    started = []
    gate = threading.Event()

    def job(i):
        started.append(i)
        gate.wait(5)

    writer = OutputWriter(1, max_pending=2)
    writer.submit(job, 0)
    writer.submit(job, 1)
    t = threading.Thread(target=writer.submit, args=(job, 2))
    t.start()
    t.join(0.2)
    assert t.is_alive()  # the third job waits for the first to finish
    gate.set()
    t.join(5)
    assert not t.is_alive()
    writer.close()
    assert started == [0, 1, 2]


def test_a_failure_surfaces_after_the_other_jobs_ran(caplog):
    done = []

    def job(i):
        if i in (2, 4):
            raise OSError(f"disk full at {i}")
        time.sleep(0.005)
        done.append(i)

    writer = OutputWriter(2, max_pending=100)
    for i in range(8):
        writer.submit(job, i)
    with pytest.raises(OSError, match="disk full at 2"):
        writer.close()
    assert sorted(done) == [0, 1, 3, 5, 6, 7]
    assert "disk full at 4" in caplog.text  # the second failure is logged, not lost


def test_an_error_in_the_loop_keeps_it_and_still_writes_what_was_queued():
    done = []
    with pytest.raises(KeyError):
        with OutputWriter(2) as writer:
            for i in range(4):
                writer.submit(lambda i=i: (time.sleep(0.01), done.append(i)))
            raise KeyError("loop failed")
    assert sorted(done) == [0, 1, 2, 3]


def test_zero_threads_writes_in_the_callers_thread():
    seen = []
    with OutputWriter(0) as writer:
        writer.submit(lambda: seen.append(threading.current_thread()))
        assert seen == [threading.current_thread()]  # already done at submit
    with pytest.raises(ValueError, match=">= 0"):
        OutputWriter(-1)
    assert 1 <= default_write_threads() <= 8


def _reference_overlay(image, amap, mask=None, alpha=0.5, vmin=0.0, vmax=1.0):
    """The overlay as first written (plain expressions, a temporary per step)."""
    rgb = np.asarray(image.convert("RGB"), dtype=np.float32)
    h, w = rgb.shape[:2]
    m = resize_map(np.asarray(amap, dtype=np.float32), h, w)
    m = (m - vmin) / max(vmax - vmin, 1e-12)
    v = np.clip(m, 0, 1)
    r, g, b = (np.clip(1.5 - np.abs(4 * v - k), 0, 1) for k in (3, 2, 1))
    heat = (np.stack([r, g, b], -1) * 255).round().astype(np.uint8)
    out = (1 - alpha) * rgb + alpha * heat.astype(np.float32)
    if mask is not None:
        fg = np.asarray(mask) > 0
        edge = fg & ~ndimage.binary_erosion(fg, iterations=max(1, min(h, w) // 256))
        out[edge] = (0, 255, 0)
    return out.clip(0, 255).astype(np.uint8), heat


@pytest.mark.parametrize(
    "mode, kw", [("RGB", {}), ("L", {"alpha": 0.3, "vmin": 0.2, "vmax": 0.7}), ("RGBA", {})]
)
def test_overlay_and_jet_are_bitwise_the_reference_formulas(mode, kw):
    rng = np.random.default_rng(1)
    im = Image.fromarray(rng.integers(0, 256, (90, 130, 3), dtype=np.uint8)).convert(mode)
    amap = rng.normal(0.5, 0.4, (23, 31)).astype(np.float32)  # values outside [0, 1] too
    mask = np.zeros((90, 130), np.uint8)
    mask[20:50, 30:90] = 1
    full = rng.normal(0.5, 0.4, (90, 130)).astype(np.float32)  # already the image's size
    for a in (amap, full):
        before = a.copy()
        for m in (None, mask):
            ref, heat = _reference_overlay(im, a, m, **kw)
            assert np.array_equal(np.asarray(overlay(im, a, m, **kw)), ref)
        assert np.array_equal(a, before)  # the caller's map is not changed in place
    lo, hi = kw.get("vmin", 0.0), kw.get("vmax", 1.0)
    assert np.array_equal(jet((full - lo) / (hi - lo)), heat)  # heat: of the last map, full


def test_overlay_of_odd_inputs():
    """A NaN in the map is drawn as 0 without spreading; a colour mask counts any non-zero
    channel; a 16-bit image object is scaled like a 16-bit file, not clipped at 255; an empty
    value range is refused."""
    rng = np.random.default_rng(2)
    im = Image.fromarray(rng.integers(0, 256, (40, 60, 3), dtype=np.uint8))
    amap = rng.random((40, 60)).astype(np.float32)
    holed = amap.copy()
    holed[10, 10] = np.nan
    zero = amap.copy()
    zero[10, 10] = 0.0
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # (NaN cast to uint8 warned)
        assert np.array_equal(np.asarray(overlay(im, holed)), np.asarray(overlay(im, zero)))
    small = amap[::4, ::4].copy()
    small[2, 2] = np.nan  # resized: NaN must not reach its neighbours
    zsmall = small.copy()
    zsmall[2, 2] = 0.0
    assert np.array_equal(np.asarray(overlay(im, small)), np.asarray(overlay(im, zsmall)))
    mask = np.zeros((40, 60), np.uint8)
    mask[5:25, 10:40] = 1
    rgba_mask = np.zeros((40, 60, 4), np.uint8)
    rgba_mask[5:25, 10:40, 1] = 255
    assert np.array_equal(
        np.asarray(overlay(im, amap, rgba_mask)), np.asarray(overlay(im, amap, mask))
    )
    grey16 = rng.integers(0, 65536, (40, 60), dtype=np.uint16)
    im16 = Image.fromarray(grey16)
    assert im16.mode == "I;16"
    scaled = Image.fromarray((grey16 // 257).astype(np.uint8))  # what a 16-bit file becomes
    from crane.data.imageio import normalize_mode

    assert np.array_equal(
        np.asarray(overlay(im16, amap)), np.asarray(overlay(normalize_mode(im16), amap))
    )
    assert (
        abs(np.asarray(overlay(im16, amap)).astype(int) - np.asarray(overlay(scaled, amap))).max()
        <= 1
    )
    with pytest.raises(ValueError, match="vmax must be above vmin"):
        overlay(im, amap, vmin=0.5, vmax=0.5)
    # crane's own mask layout (1, H, W) and a (1, H, W) map, as arrays or tensors
    want = np.asarray(overlay(im, amap, mask))
    for m in (mask[None], torch.from_numpy(mask[None]), mask[..., None]):
        assert np.array_equal(np.asarray(overlay(im, amap, m)), want)
    assert np.array_equal(np.asarray(overlay(im, torch.from_numpy(amap)[None], mask)), want)
    with pytest.raises(ValueError, match=r"mask must be .* got shape \(2, 40, 60\)"):
        overlay(im, amap, np.stack([mask, mask]))


def test_overlay_png_is_lossless_with_the_fast_options(tmp_path):
    rng = np.random.default_rng(0)
    im = Image.fromarray(rng.integers(0, 256, (40, 60, 3), dtype=np.uint8))
    amap = rng.random((10, 10)).astype(np.float32)
    ov = overlay(im, amap)
    save_png(ov, tmp_path / "a.png")
    save_png(ov, tmp_path / "slow.png", fast=False)
    assert (tmp_path / "a.png").read_bytes() != (tmp_path / "slow.png").read_bytes()
    for name in ("a.png", "slow.png"):
        with Image.open(tmp_path / name) as back:
            assert np.array_equal(np.asarray(back), np.asarray(ov))
    im.save(tmp_path / "src.png")
    write_overlay(tmp_path / "b.png", tmp_path / "src.png", amap)  # from the file
    assert (tmp_path / "b.png").read_bytes() == (tmp_path / "a.png").read_bytes()
    assert not list(tmp_path.glob(".*.tmp"))  # atomic: no temp file left behind


def _png_chunks(data: bytes) -> list[tuple[bytes, bytes]]:
    """(type, payload) of every chunk, each CRC checked (PNG spec: over type and payload)."""
    import struct
    import zlib

    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    chunks, at = [], 8
    while at < len(data):
        (n,) = struct.unpack(">I", data[at : at + 4])
        kind, payload = data[at + 4 : at + 8], data[at + 8 : at + 8 + n]
        (crc,) = struct.unpack(">I", data[at + 8 + n : at + 12 + n])
        assert crc == zlib.crc32(kind + payload), kind
        chunks.append((kind, payload))
        at += 12 + n
    return chunks


@pytest.mark.parametrize(
    "shape", [(1, 1), (1, 7), (9, 1), (37, 53), (1, 1, 3), (5, 1, 3), (33, 70, 3), (21, 18, 4)]
)
def test_png_bytes_decode_to_the_same_pixels(shape):
    """png_bytes against the PNG spec, undone by hand (every row filtered Up: the byte minus
    the byte above, modulo 256), and against Pillow's decoder."""
    import io
    import struct
    import zlib

    from crane.viz import png_bytes

    rng = np.random.default_rng(sum(shape))
    a = rng.integers(0, 256, shape, dtype=np.uint8)
    a[: shape[0] // 2] = 200  # a flat band too, where run-length coding kicks in
    data = png_bytes(a)
    chunks = _png_chunks(data)
    assert [k for k, _ in chunks] == [b"IHDR", b"IDAT", b"IEND"] and chunks[2][1] == b""
    w, h, depth, color, comp, filt, interlace = struct.unpack(">IIBBBBB", chunks[0][1])
    channels = 1 if a.ndim == 2 else shape[2]
    assert (w, h, depth, comp, filt, interlace) == (shape[1], shape[0], 8, 0, 0, 0)
    assert color == {1: 0, 3: 2, 4: 6}[channels]
    raw = zlib.decompress(chunks[1][1])
    stride = shape[1] * channels + 1
    assert len(raw) == shape[0] * stride
    prev = [0] * (stride - 1)
    rows = []
    for y in range(shape[0]):
        line = raw[y * stride : (y + 1) * stride]
        assert line[0] == 2  # Up
        prev = [(v + p) % 256 for v, p in zip(line[1:], prev, strict=True)]
        rows.append(prev)
    assert np.array_equal(np.array(rows, np.uint8).reshape(a.shape), a)
    with Image.open(io.BytesIO(data)) as im:
        assert im.mode == {1: "L", 3: "RGB", 4: "RGBA"}[channels]
        assert np.array_equal(np.asarray(im), a)


def test_png_bytes_splits_long_data_into_idat_chunks(monkeypatch):
    import io
    import zlib

    from crane import viz

    a = np.random.default_rng(5).integers(0, 256, (30, 40, 3), dtype=np.uint8)
    whole = viz.png_bytes(a)
    monkeypatch.setattr(viz, "_IDAT_MAX", 1000)
    data = viz.png_bytes(a)
    chunks = _png_chunks(data)
    idat = [p for k, p in chunks if k == b"IDAT"]
    assert len(idat) > 3 and all(len(p) <= 1000 for p in idat)
    assert [k for k, _ in chunks] == [b"IHDR", *[b"IDAT"] * len(idat), b"IEND"]
    assert b"".join(idat) == _png_chunks(whole)[1][1]  # the same stream, cut
    assert len(zlib.decompress(b"".join(idat))) == 30 * (40 * 3 + 1)
    with Image.open(io.BytesIO(data)) as im:
        assert np.array_equal(np.asarray(im), a)


def test_png_bytes_refuses_what_it_cannot_write():
    from crane.viz import png_bytes

    for bad in (np.zeros((4, 4), np.uint16), np.zeros((4, 4, 2), np.uint8), np.zeros(4, np.uint8)):
        with pytest.raises(ValueError, match="uint8 pixels"):
            png_bytes(bad)
    for empty in (np.zeros((0, 4), np.uint8), np.zeros((3, 0, 3), np.uint8)):
        with pytest.raises(ValueError, match="at least one pixel"):
            png_bytes(empty)


def test_save_png_other_modes_go_through_pillow(tmp_path):
    """Palette and 1-bit images keep their mode (Pillow writes them); grey, RGB and RGBA
    take png_bytes."""
    rng = np.random.default_rng(3)
    rgb = Image.fromarray(rng.integers(0, 256, (20, 30, 3), dtype=np.uint8))
    for mode in ("P", "1", "L", "RGBA"):
        im = rgb.convert(mode)
        save_png(im, tmp_path / f"{mode}.png")
        with Image.open(tmp_path / f"{mode}.png") as back:
            assert back.mode == mode and np.array_equal(np.asarray(back), np.asarray(im))
    from crane.viz import png_bytes

    grey = rgb.convert("L")
    assert (tmp_path / "L.png").read_bytes() == png_bytes(np.asarray(grey))


def test_run_predict_writes_the_same_files_with_and_without_threads(synth, tmp_path):
    files = sorted((synth / "plate" / "test").rglob("*.png"))[:5]
    det = Detector(create_model("tiny", image_size=SIZE), device="cpu", batch_size=2)
    for threads in (0, 3):
        run_predict(
            det, files, tmp_path / f"out{threads}", save_maps=True, progress=False,
            write_threads=threads,
        )  # fmt: skip
    for sub in ("overlays", "maps"):
        a = sorted((tmp_path / "out0" / sub).iterdir())
        b = sorted((tmp_path / "out3" / sub).iterdir())
        assert [p.name for p in a] == [p.name for p in b] and len(a) == 5
        assert all(x.read_bytes() == y.read_bytes() for x, y in zip(a, b, strict=True))


def test_run_predict_reports_a_write_failure(synth, tmp_path):
    files = sorted((synth / "plate" / "test" / "good").glob("*.png"))[:2]
    det = Detector(create_model("tiny", image_size=SIZE), device="cpu")
    out = tmp_path / "out"
    out.mkdir()
    (out / "overlays").write_text("a file where the overlay folder should be")
    with pytest.raises(OSError):
        run_predict(det, files, out, progress=False, write_threads=2)
    assert not (out / "predictions.csv").exists()  # nothing claims outputs that are missing


def test_jpeg_overlays_on_request(synth, tmp_path):
    files = sorted((synth / "plate" / "test" / "good").glob("*.png"))[:2]
    det = Detector(create_model("tiny", image_size=SIZE), device="cpu")
    run_predict(det, files, tmp_path / "out", progress=False, overlay_format="jpg")
    written = sorted((tmp_path / "out" / "overlays").iterdir())
    assert [p.suffix for p in written] == [".jpg", ".jpg"]
    r = det.predict(files[0])[0]
    with Image.open(written[0]) as jpg:
        assert jpg.format == "JPEG" and jpg.size == Image.open(files[0]).size
        ref = np.asarray(overlay(Image.open(files[0]), r.anomaly_map), dtype=float)
        assert np.abs(np.asarray(jpg, dtype=float) - ref).mean() < 8  # lossy, but the overlay
    with pytest.raises(CraneError, match="overlay format"):
        run_predict(det, files, tmp_path / "o2", progress=False, overlay_format="gif")
    with pytest.raises(ValueError, match=".png or .jpg"):
        write_overlay(tmp_path / "x.bmp", Image.open(files[0]), r.anomaly_map)


def test_a_failed_save_leaves_no_file_behind(tmp_path):
    from crane.viz import save_jpeg

    rgba = Image.new("RGBA", (8, 8))
    with pytest.raises(OSError):
        save_jpeg(rgba, tmp_path / "a.jpg")  # JPEG has no alpha channel
    assert list(tmp_path.iterdir()) == []
    # The encode succeeds but the rename fails (a folder holds the name): the temp file goes.
    (tmp_path / "b.png").mkdir()
    with pytest.raises(OSError):
        save_png(Image.new("RGB", (8, 8)), tmp_path / "b.png")
    assert [p.name for p in tmp_path.iterdir()] == ["b.png"]


def test_output_names_never_collide():
    """x.png / x.jpg, a/b.png / a__b.png, one file named two ways, and names that differ in
    case only each get an output name of their own (before, they shared one: the last
    overlay won, and two writer threads racing on one temp file aborted the run)."""
    from crane.engine.predict import _output_names

    paths = ["d/x.png", "d/x.jpg", "d/a/b.png", "d/a__b.png", "./d/y.png", "d/y.png"]
    paths += ["d/Z.png", "d/z.png", "d/u.png"]
    names = _output_names(paths)
    assert len({n.casefold() for n in names.values()}) == len(paths)
    assert names["d/x.png"] == "x.png" and names["d/x.jpg"] == "x.jpg"
    assert names["d/a/b.png"] == "a__b" and names["d/a__b.png"] == "a__b~2"
    assert names["./d/y.png"] == "y" and names["d/y.png"] == "y~2"
    assert names["d/u.png"] == "u"  # no collision: the plain stem, as before
    # The names do not depend on the order of the inputs (a resumed run may list them
    # otherwise): "~2" goes by absolute path.
    for order in (paths[::-1], sorted(paths), paths[3:] + paths[:3]):
        assert _output_names(order) == names


def test_run_predict_with_colliding_names_writes_every_file(tmp_path):
    rng = np.random.default_rng(0)
    src = tmp_path / "in"
    (src / "a").mkdir(parents=True)
    files = []
    for i, rel in enumerate(["x.png", "x.bmp", "a/b.png", "a__b.png"] * 1):
        im = Image.fromarray(rng.integers(0, 256, (40 + 10 * i, 40, 3), dtype=np.uint8))
        im.save(src / rel)
        files.append(src / rel)
    det = Detector(create_model("tiny", image_size=SIZE), device="cpu", batch_size=2)
    out = tmp_path / "out"
    run_predict(det, [src], out, save_maps=True, progress=False, write_threads=4)
    maps = {p.name: np.load(p) for p in (out / "maps").iterdir()}
    assert sorted(maps) == ["a__b.npy", "a__b~2.npy", "x.bmp.npy", "x.png.npy"]
    assert sorted(m.shape for m in maps.values()) == [(40, 40), (50, 40), (60, 40), (70, 40)]
    assert len(list((out / "overlays").iterdir())) == 4
    assert not [p for p in out.rglob(".*")]  # no temp files left


def test_rerun_into_an_output_folder_inside_the_inputs_skips_its_files(tmp_path):
    src = tmp_path / "in"
    src.mkdir()
    rng = np.random.default_rng(1)
    for i in range(2):
        Image.fromarray(rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)).save(src / f"{i}.png")
    det = Detector(create_model("tiny", image_size=SIZE), device="cpu")
    out = src / "results"
    for _ in range(2):  # the second run finds the first run's overlays under the input folder
        summary = run_predict(det, [src], out, progress=False, overwrite=True)
        assert summary["n_images"] == 2
    assert sorted(p.name for p in (out / "overlays").iterdir()) == ["0.png", "1.png"]
    with pytest.raises(CraneError, match="outside the overlay folder"):
        run_predict(det, [out], out, progress=False, overwrite=True)


def test_outputs_get_the_permissions_open_would_give(tmp_path):
    """Atomic writes go through mkstemp (mode 0o600); results must not stay unreadable to
    the people the user's umask lets read them."""
    import os

    from crane.files import atomic_write_bytes, new_file_mode

    old = os.umask(0o027)
    try:
        assert new_file_mode() == 0o640
        atomic_write_bytes(tmp_path / "a.bin", b"x")
        assert (tmp_path / "a.bin").stat().st_mode & 0o777 == 0o640
        det = Detector(create_model("tiny", image_size=SIZE), device="cpu")
        img = tmp_path / "i.png"
        Image.fromarray(np.zeros((40, 40, 3), np.uint8)).save(img)
        run_predict(det, [img], tmp_path / "out", progress=False, write_threads=2)
    finally:
        os.umask(old)
    for f in ("predictions.csv", "summary.json", "overlays/i.png"):
        assert (tmp_path / "out" / f).stat().st_mode & 0o777 == 0o640, f
    # A file replaced keeps its own permissions, as open(path, "w") would: private stays so.
    os.chmod(tmp_path / "a.bin", 0o600)
    atomic_write_bytes(tmp_path / "a.bin", b"y")
    assert (tmp_path / "a.bin").stat().st_mode & 0o777 == 0o600
    assert (tmp_path / "a.bin").read_bytes() == b"y"


def test_overwrite_warns_about_an_earlier_runs_files(tmp_path, caplog):
    import logging

    rng = np.random.default_rng(2)
    files = []
    for i in range(3):
        files.append(tmp_path / f"{i}.png")
        Image.fromarray(rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)).save(files[-1])
    det = Detector(create_model("tiny", image_size=SIZE), device="cpu")
    out = tmp_path / "out"
    run_predict(det, files, out, progress=False, save_maps=True)
    with caplog.at_level(logging.WARNING):
        run_predict(det, files[:1], out, progress=False, overwrite=True)
    assert "2 file(s) in" in caplog.text and "overlays" in caplog.text
    assert "3 file(s) in" in caplog.text and "maps" in caplog.text  # no maps this time
