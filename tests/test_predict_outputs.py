"""What ``run_predict`` writes, under inputs and events that broke it (from a review): long
names, huge JPEG overlays, linked folders on resume, a full disk at the end, an interrupted
``--overwrite``, a switched overlay format, odd thresholds, scores on the threshold."""

from __future__ import annotations

import csv
import json
import logging
import os
import time
from pathlib import Path

import numpy as np
import pytest
from data_fixtures import deny
from PIL import Image

import crane.engine.predict as P
from crane.engine.predict import Detector, run_predict
from crane.errors import CraneError
from crane.files import fit_file_name
from crane.models import create_model
from crane.viz import JPEG_MAX_SIDE, save_jpeg

SIZE = 56


def detector(seed=0, **kw):
    return Detector(create_model("tiny", image_size=SIZE, seed=seed), device="cpu", **kw)


def image(path, value=None, size=(40, 36), seed=0):
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    px = rng.integers(0, 256, (*size[::-1], 3), dtype=np.uint8) if value is None else None
    Image.fromarray(px if px is not None else np.full((*size[::-1], 3), value, np.uint8)).save(path)
    return path


def interrupted(det, n):
    """``det`` whose ``predict_iter`` stops (as Ctrl-C would) after yielding ``n`` results."""
    real = det.predict_iter

    def stop(paths, progress=False):
        for i, r in enumerate(real(paths, progress=progress)):
            if i == n:
                raise KeyboardInterrupt
            yield r

    det.predict_iter = stop
    return det


def rows(out):
    return list(csv.DictReader(open(out / "predictions.csv", encoding="utf-8")))


def test_long_names_and_deep_folders_fit_the_file_system(tmp_path):
    """An output name near 255 bytes (or deep folders flattened into one name) failed with
    ENAMETOOLONG at the temp file, and a resume failed the same way."""
    src = tmp_path / "in"
    long = image(src / ("x" * 241 + ".png"))
    deep = src / "a"
    for i in range(4):
        deep = deep / ("sub" + "y" * 60 + str(i))
    nested = image(deep / "img.png", seed=1)
    short = image(src / "short.png", seed=2)
    out = tmp_path / "out"
    run_predict(detector(), [src], out, progress=False, save_maps=True)
    names = sorted(p.name for p in (out / "overlays").iterdir())
    assert len(names) == 3 and all(len(os.fsencode(n)) <= 255 for n in names)
    assert "short.png" in names
    assert {r["path"] for r in rows(out)} == {str(long), str(nested), str(short)}
    assert sorted(p.stem for p in (out / "maps").iterdir()) == sorted(Path(n).stem for n in names)
    # Cut names stay apart and do not depend on anything but the name.
    a, b = "é" * 150 + "1", "é" * 150 + "2"
    assert fit_file_name(a) != fit_file_name(b) and fit_file_name(a) == fit_file_name(a)
    assert len(os.fsencode(fit_file_name(a))) <= 200 and fit_file_name("short") == "short"


def test_jpeg_overlays_of_line_scan_images_are_scaled_to_fit(tmp_path, caplog):
    wide = Image.new("RGB", (JPEG_MAX_SIDE + 100, 2), (10, 200, 30))
    with caplog.at_level(logging.WARNING):
        save_jpeg(wide, tmp_path / "wide.jpg")
    with Image.open(tmp_path / "wide.jpg") as im:
        assert im.size == (JPEG_MAX_SIDE, 2) and im.format == "JPEG"
    assert "a JPEG holds at most 65500 px a side" in caplog.text
    save_jpeg(Image.new("RGB", (30, 20)), tmp_path / "small.jpg")
    with Image.open(tmp_path / "small.jpg") as im:
        assert im.size == (30, 20)


def test_overlay_write_errors_name_the_image(tmp_path, monkeypatch):
    src = image(tmp_path / "in" / "a.png")

    def full(path, data):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("crane.viz.atomic_write_bytes", full)
    with pytest.raises(OSError, match=r"cannot write the overlay of .*a\.png to .*No space"):
        run_predict(detector(), [src], tmp_path / "out", progress=False, write_threads=0)


def test_resume_tells_apart_files_that_share_an_absolute_path(tmp_path, monkeypatch):
    """``x.png`` and ``a/../x.png`` with ``a`` a link into ``d/e`` are two files; a resume
    matched its records by absolute path and gave one the other's row."""
    monkeypatch.chdir(tmp_path)
    image(Path("x.png"), seed=1)
    image(Path("d/x.png"), value=200)
    Path("d/e").mkdir()
    os.symlink("d/e", "a")
    inputs = ["a/../x.png", "x.png"]
    kw = dict(progress=False, overlays=False)
    run_predict(detector(), inputs, "whole", **kw)
    det = interrupted(detector(), 1)
    with pytest.raises(KeyboardInterrupt):
        run_predict(det, inputs, "out", **kw)
    run_predict(detector(), inputs, "out", resume=True, **kw)
    whole = {r["path"]: float(r["image_score"]) for r in rows(Path("whole"))}
    assert abs(whole["a/../x.png"] - whole["x.png"]) > 1e-3
    resumed = {r["path"]: float(r["image_score"]) for r in rows(Path("out"))}
    assert resumed.keys() == whole.keys()
    for path, score in whole.items():  # (batched otherwise: equal up to float rounding)
        assert resumed[path] == pytest.approx(score, abs=1e-6), path


def test_a_full_disk_at_the_tables_keeps_every_image_recorded(tmp_path, monkeypatch, caplog):
    src = tmp_path / "in"
    for i in range(6):
        image(src / f"{i}.png", seed=i)
    real_overlay, real_write = P.write_overlay, P.atomic_write_bytes

    def slow_overlay(*args, **kwargs):
        time.sleep(0.05)
        return real_overlay(*args, **kwargs)

    def write(path, data):
        if Path(path).name == "predictions.csv":
            raise OSError(28, "No space left on device")
        return real_write(path, data)

    monkeypatch.setattr(P, "write_overlay", slow_overlay)
    monkeypatch.setattr(P, "atomic_write_bytes", write)
    out = tmp_path / "out"
    with caplog.at_level(logging.WARNING), pytest.raises(OSError, match="No space"):
        run_predict(detector(batch_size=2), [src], out, progress=False, write_threads=3)
    assert "all 6 images done; `crane predict ... --resume`" in caplog.text
    assert len((out / "progress.jsonl").read_text().splitlines()) == 1 + 6
    monkeypatch.setattr(P, "atomic_write_bytes", real_write)
    summary = run_predict(detector(batch_size=2), [src], out, progress=False, resume=True)
    assert summary["n_resumed"] == 6 and len(rows(out)) == 6


def test_an_interrupted_overwrite_leaves_no_earlier_table(tmp_path):
    src = tmp_path / "in"
    for i in range(4):
        image(src / f"{i}.png", seed=i)
    out = tmp_path / "out"
    run_predict(detector(), [src], out, progress=False)
    det = interrupted(detector(seed=5), 2)
    with pytest.raises(KeyboardInterrupt):
        run_predict(det, [src], out, progress=False, overwrite=True, write_threads=0)
    assert not (out / "predictions.csv").exists() and not (out / "summary.json").exists()
    assert (out / "progress.jsonl").is_file()


def test_switching_overlay_format_names_the_earlier_overlays(tmp_path, caplog):
    src = tmp_path / "in"
    for i in range(3):
        image(src / f"{i}.png", seed=i)
    out = tmp_path / "out"
    run_predict(detector(), [src], out, progress=False)
    with caplog.at_level(logging.WARNING):
        run_predict(detector(), [src], out, progress=False, overwrite=True, overlay_format="jpg")
    assert "3 file(s) in" in caplog.text and "are not from this run" in caplog.text


def test_thresholds_are_finite_numbers_and_scores_are_written_whole(tmp_path):
    with pytest.raises(CraneError, match="finite number, got nan"):
        detector(threshold=float("nan"))
    with pytest.raises(CraneError, match="must be a number"):
        detector(threshold="high")
    src = tmp_path / "in"
    for i in range(4):
        image(src / f"{i}.png", seed=i)
    scores = sorted(r.score for r in detector().predict(sorted(src.iterdir())))
    # A threshold between two scores closer than the 6 decimals the CSV used to show.
    t = np.float32(np.nextafter(np.float32(scores[1]), np.float32(1)))
    det = detector(threshold=t)
    assert type(det.threshold) is float
    summary = run_predict(det, [src], tmp_path / "out", progress=False, overlays=False)
    assert json.loads((tmp_path / "out" / "summary.json").read_text())["threshold"] == float(t)
    assert summary["n_anomalous"] == 2
    for r in rows(tmp_path / "out"):
        assert (float(r["image_score"]) >= float(t)) == (r["decision"] == "anomalous")
        assert float(r["image_score"]) in scores


def test_resume_through_a_link_that_now_points_elsewhere(tmp_path, monkeypatch):
    """Records match by place first; where the folder's link was re-pointed (data staged
    again, times kept as cp -p or rsync -a keep them), by absolute path when that names one
    input. A file whose size or modification time differs is predicted again."""
    import shutil

    monkeypatch.chdir(tmp_path)
    Path("stage2").mkdir()
    for i in range(3):
        image(Path("stage1") / f"{i}.png", seed=i)
        shutil.copy2(Path("stage1") / f"{i}.png", Path("stage2") / f"{i}.png")
    os.symlink("stage1", "data")
    det = interrupted(detector(), 1)
    with pytest.raises(KeyboardInterrupt):
        run_predict(det, ["data"], "out", progress=False, overlays=False)
    os.unlink("data")
    os.symlink("stage2", "data")
    summary = run_predict(detector(), ["data"], "out", progress=False, overlays=False, resume=True)
    assert summary["n_resumed"] == 1 and summary["n_images"] == 3


def test_names_that_fitted_before_keep_them_and_links_to_nothing_are_named(tmp_path, caplog):
    src = tmp_path / "in"
    stem = "n" * 230  # (fitted the earlier temp names too: a resumed run finds its files)
    image(src / f"{stem}.png")
    os.symlink(tmp_path / "gone.png", src / "gone.png")
    with caplog.at_level(logging.WARNING):
        assert P.expand_inputs([src]) == [str(src / f"{stem}.png")]
    assert "1 image link(s) point to no file and are left out" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        assert P.expand_inputs([str(src / "*.png")]) == [str(src / f"{stem}.png")]
    assert "point to no file" in caplog.text
    run_predict(detector(), [src], tmp_path / "out", progress=False)
    assert [p.name for p in (tmp_path / "out" / "overlays").iterdir()] == [f"{stem}.png"]


def test_an_input_changed_or_gone_before_its_overlay_gets_none_and_the_run_goes_on(
    tmp_path, caplog
):
    from crane.engine.predict import _input_overlay, _stamp

    src = tmp_path / "a.png"
    Image.fromarray(np.zeros((20, 30, 3), np.uint8)).save(src)
    stamp = _stamp(str(src))
    amap = np.zeros((20, 30), np.float32)
    _input_overlay(tmp_path / "ok.png", str(src), amap, stamp)
    assert (tmp_path / "ok.png").is_file()
    Image.fromarray(np.full((40, 30, 3), 9, np.uint8)).save(src)  # rewritten by a camera
    with caplog.at_level(logging.WARNING):
        _input_overlay(tmp_path / "changed.png", str(src), amap, stamp)
        src.unlink()
        _input_overlay(tmp_path / "gone.png", str(src), amap, stamp)
    assert not (tmp_path / "changed.png").exists() and not (tmp_path / "gone.png").exists()
    assert caplog.text.count("changed or went away after it was scored") == 2


def test_recursive_patterns_walk_each_folder_once(tmp_path):
    """glob's ** follows a link back up the tree 40 times (two such links: it never ends);
    each image is found once, by its shortest path."""
    from crane.engine.predict import expand_inputs

    root = tmp_path / "r"
    (root / "line1").mkdir(parents=True)
    (root / "line2").mkdir()
    for f in (root / "line1" / "a.png", root / "line2" / "b.png", root / "c.png"):
        Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(f)
    (root / "line1" / "up").symlink_to("..", target_is_directory=True)
    (root / "line2" / "up").symlink_to("..", target_is_directory=True)
    (root / ".hidden").mkdir()
    Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(root / ".hidden" / "h.png")
    want = sorted(str(root / p) for p in ("c.png", "line1/a.png", "line2/b.png"))
    assert sorted(expand_inputs([f"{root}/**/*.png"])) == want
    assert expand_inputs([f"{root}/**/a*.png"]) == [str(root / "line1" / "a.png")]
    assert expand_inputs([f"{root}/line*/*.png"]) == want[1:]  # (no **: glob as before)


def test_folders_and_files_that_cannot_be_looked_at_are_reported(tmp_path, monkeypatch, caplog):
    """(Simulated: the tests run as root, whom permissions do not stop.) An unreadable folder
    is named in a warning, not passed over in silence; a file whose type cannot be told is
    read, and reported among the failures, instead of stopping the scan."""
    import crane.engine.predict as P

    root = tmp_path / "in"
    (root / "locked").mkdir(parents=True)
    Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(root / "ok.png")
    real_walk = os.walk

    def walk(top, **kw):
        for entry in real_walk(top, **kw):
            if Path(entry[0]).name == "locked":
                kw["onerror"](PermissionError(13, "Permission denied", entry[0]))
                continue
            yield entry

    monkeypatch.setattr(P.os, "walk", walk)
    with caplog.at_level(logging.WARNING):
        assert P.expand_inputs([root]) == [str(root / "ok.png")]
    assert "could not be read" in caplog.text and "locked: Permission denied" in caplog.text
    deny(monkeypatch, "is_file", lambda p: p.name == "secret.png")
    assert P.expand_inputs([root / "secret.png"]) == [str(root / "secret.png")]


def test_file_names_that_are_not_utf8_keep_the_outputs_valid_utf8(tmp_path):
    """One Latin-1 file name made the whole predictions.csv invalid UTF-8 (csv and pandas
    refused every row) and summary.json hold a lone surrogate escape strict parsers refuse:
    such bytes are written as \\xNN escapes."""
    src = tmp_path / "in"
    src.mkdir()
    rng = np.random.default_rng(0)
    for name in (b"ok.png", "café.png".encode("latin-1")):
        Image.fromarray(rng.integers(0, 256, (30, 40, 3), dtype=np.uint8)).save(
            os.path.join(os.fsencode(src), name), format="PNG"
        )
    with open(os.path.join(os.fsencode(src), b"bad\xe9.png"), "wb") as f:
        f.write(b"not an image")
    det = Detector(create_model("tiny", image_size=56, seed=0), device="cpu", threshold=0.5)
    run_predict(det, [src], tmp_path / "out", progress=False, overlays=False)
    with open(tmp_path / "out" / "predictions.csv", encoding="utf-8", newline="") as f:
        paths = sorted(r["path"] for r in csv.DictReader(f))
    assert paths == [str(src / "caf\\xe9.png"), str(src / "ok.png")]
    summary = json.loads((tmp_path / "out" / "summary.json").read_bytes().decode("utf-8"))
    json.dumps(summary, ensure_ascii=False).encode("utf-8")  # (raises on a lone surrogate)
    failed = summary["failed"]
    assert [x["path"] for x in failed] == [str(src / "bad\\xe9.png")]


def test_pil_inputs_that_cannot_be_loaded_fail_alone_with_workers(tmp_path):
    """A lazily opened PIL image that cannot be decoded (closed by its ``with`` block, a
    truncated file) failed while it was pickled for a decode worker, in the queue's thread:
    the chunk was dropped and predict_iter waited forever. Now each is a Failure, in order,
    with its reason (PIL's assert on a closed file gave an empty message)."""
    import io
    import threading

    rng = np.random.default_rng(1)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (40, 50, 3), dtype=np.uint8)).save(buf, format="PNG")
    good = Image.open(io.BytesIO(buf.getvalue()))
    with Image.open(io.BytesIO(buf.getvalue())) as closed:
        pass
    truncated = Image.open(io.BytesIO(buf.getvalue()[: len(buf.getvalue()) // 2]))
    inputs = [good, closed, truncated, Image.open(io.BytesIO(buf.getvalue()))]
    det = Detector(create_model("tiny", image_size=56, seed=0), device="cpu", batch_size=2,
                   workers=2)  # fmt: skip
    out: list = []
    t = threading.Thread(target=lambda: out.extend(det.predict_iter(inputs)), daemon=True)
    t.start()
    t.join(120)
    det.close()
    assert not t.is_alive(), "predict_iter hung"
    assert [type(r).__name__ for r in out] == ["Prediction", "Failure", "Failure", "Prediction"]
    assert out[1].error.startswith("input 1 could not be decoded: ") and out[1].error[-1] != " "
    assert "truncated" in out[2].error
