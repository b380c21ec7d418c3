"""``run_predict(resume=True)`` / ``crane predict --resume``: a run that stopped part way is
continued from its progress file, predicting only the images it had not finished, and ends
with the same files as a run that never stopped."""

from __future__ import annotations

import csv
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from crane.engine.predict import Detector, Prediction, run_predict
from crane.engine.progress import PROGRESS_FILE
from crane.errors import CraneError
from crane.models import create_model

SIZE = 56


@pytest.fixture
def images(tmp_path):
    src = tmp_path / "in"
    (src / "sub").mkdir(parents=True)
    rng = np.random.default_rng(3)
    paths = []
    for i in range(7):
        folder = src / "sub" if i % 3 == 0 else src
        p = folder / f"{i}.png"
        Image.fromarray(rng.integers(0, 256, (40 + 4 * i, 48, 3), dtype=np.uint8)).save(p)
        paths.append(p)
    return src


def detector(threshold=0.5):
    return Detector(create_model("tiny", image_size=SIZE, seed=0), device="cpu", batch_size=2,
                    threshold=threshold)  # fmt: skip


class Stop(Exception):
    pass


def stop_after(det, n, error=KeyboardInterrupt):
    """Make ``det.predict_iter`` stop (as Ctrl-C would) after yielding ``n`` results, and
    record the inputs each call is asked for."""
    real = det.predict_iter
    asked = []

    def predict_iter(inputs, progress=False):
        inputs = list(inputs)
        asked.append(inputs)
        for i, r in enumerate(real(inputs, progress=progress)):
            if i == n:
                raise error()
            yield r

    det.predict_iter = predict_iter
    return asked


def same_outputs(a, b):
    """The same files, rows and maps; values as close as batch composition allows (an image
    batched with others may differ from itself alone in the last float bits)."""
    names = [sorted(p.relative_to(d).as_posix() for d in [d] for p in d.rglob("*") if p.is_file())
             for d in (a, b)]  # fmt: skip
    assert names[0] == names[1]
    rows = [list(csv.DictReader(open(d / "predictions.csv"))) for d in (a, b)]
    assert [(r["path"], r["decision"]) for r in rows[0]] == [
        (r["path"], r["decision"]) for r in rows[1]
    ]  # input order
    for x, y in zip(*rows, strict=True):
        for key in ("image_score", "max_pixel_score"):
            assert float(x[key]) == pytest.approx(float(y[key]), abs=2e-6)
    for name in names[0]:
        if name.endswith(".npy"):
            np.testing.assert_allclose(np.load(a / name), np.load(b / name), atol=1e-5)
        elif name.endswith(".png"):
            pa, pb = (np.asarray(Image.open(d / name), dtype=int) for d in (a, b))
            assert np.abs(pa - pb).max() <= 1, name


@pytest.mark.parametrize("save_maps", [False, True])
def test_resumed_run_writes_what_an_uninterrupted_one_does(images, tmp_path, save_maps):
    kw = dict(progress=False, save_maps=save_maps, write_threads=2)
    whole = run_predict(detector(), [images], tmp_path / "whole", **kw)
    out = tmp_path / "out"
    det = detector()
    asked = stop_after(det, 3)
    with pytest.raises(KeyboardInterrupt):
        run_predict(det, [images], out, **kw)
    assert not (out / "predictions.csv").exists()
    recorded = (out / PROGRESS_FILE).read_text().splitlines()
    assert len(recorded) == 1 + 3  # the header and the three finished images
    with pytest.raises(CraneError, match="holds an interrupted run; pass --resume"):
        run_predict(detector(), [images], out, **kw)

    det = detector()
    asked = stop_after(det, 10**6)
    summary = run_predict(det, [images], out, resume=True, **kw)
    done = [json.loads(line)["path"] for line in recorded[1:]]
    assert len(asked) == 1 and set(asked[0]).isdisjoint(done) and len(asked[0]) == 7 - 3
    assert summary["n_resumed"] == 3 and summary["n_images"] == whole["n_images"] == 7
    assert summary["n_anomalous"] == whole["n_anomalous"]
    same_outputs(out, tmp_path / "whole")
    assert not (out / PROGRESS_FILE).exists()
    with pytest.raises(CraneError, match="no interrupted run to resume \\(its run finished\\)"):
        run_predict(detector(), [images], out, resume=True, **kw)


def test_an_image_whose_files_are_missing_or_whose_line_was_cut_is_done_again(images, tmp_path):
    out = tmp_path / "out"
    det = detector()
    stop_after(det, 4)
    with pytest.raises(KeyboardInterrupt):
        run_predict(det, [images], out, progress=False)
    lines = (out / PROGRESS_FILE).read_text().splitlines(keepends=True)
    first, last = json.loads(lines[1])["path"], json.loads(lines[4])["path"]
    (out / PROGRESS_FILE).write_text("".join(lines[:4]) + lines[4][:25])  # died mid-line
    assert Path(first).parent == images  # (so its overlay is named by its stem)
    overlay = out / "overlays" / f"{Path(first).stem}.png"
    overlay.unlink()  # queued but never written
    det = detector()
    asked = stop_after(det, 10**6)
    summary = run_predict(det, [images], out, resume=True, progress=False)
    redone = {json.loads(line)["path"] for line in lines[1:4]} - {first}
    assert first in asked[0] and last in asked[0] and not redone & set(asked[0])
    assert len(asked[0]) == 7 - 2
    assert summary["n_resumed"] == 2 and summary["n_images"] == 7
    rows = list(csv.DictReader(open(out / "predictions.csv")))
    assert len(rows) == 7 and overlay.is_file()


def test_resume_refuses_another_model_inputs_or_options(images, tmp_path):
    out = tmp_path / "out"
    det = detector()
    stop_after(det, 2, Stop)
    with pytest.raises(Stop):
        run_predict(det, [images], out, progress=False)
    other = Detector(create_model("tiny", image_size=SIZE, seed=1), device="cpu", threshold=0.5)
    cases = [
        (dict(detector=detector(threshold=0.7)), "threshold"),
        (dict(detector=other), "backbone weights \\(--clip-weights, --dino-weights\\), prompts"),
        (dict(inputs=[images / "sub"]), "input files, number of input files"),
        (dict(save_maps=True), "--save-maps"),
        (dict(overlay_format="jpg"), "overlay option \\(--no-overlays, --overlay-format\\)"),
    ]
    before = (out / PROGRESS_FILE).read_bytes()
    for change, named in cases:
        kw = {"detector": detector(), "inputs": [images], "progress": False, **change}
        with pytest.raises(CraneError, match=f"started with other {named} "):
            run_predict(kw.pop("detector"), kw.pop("inputs"), out, resume=True, **kw)
    assert (out / PROGRESS_FILE).read_bytes() == before  # a refused resume changes nothing
    with pytest.raises(CraneError, match="not both"):
        run_predict(detector(), [images], out, resume=True, overwrite=True, progress=False)
    with pytest.raises(CraneError, match="no interrupted run"):
        run_predict(detector(), [images], tmp_path / "elsewhere", resume=True, progress=False)
    (out / PROGRESS_FILE).write_text("not json\n{}\n")
    with pytest.raises(CraneError, match="line 1 is not a progress record"):
        run_predict(detector(), [images], out, resume=True, progress=False)
    summary = run_predict(detector(), [images], out, overwrite=True, progress=False)
    assert summary["n_resumed"] == 0 and summary["n_images"] == 7


def test_cli_resume(images, tmp_path, monkeypatch, capsys, caplog):
    from crane.cli import main

    out = tmp_path / "out"
    argv = ["predict", str(images), "--model", "tiny", "--out", str(out), "--no-progress",
            "--threshold", "0.5"]  # fmt: skip
    real = Detector.predict_iter
    calls = []

    def stopping(self, inputs, progress=False):
        calls.append(list(inputs))
        for i, r in enumerate(real(self, calls[-1], progress=progress)):
            if i == 3 and len(calls) == 1:
                raise KeyboardInterrupt
            yield r

    monkeypatch.setattr(Detector, "predict_iter", stopping)
    assert main(argv) == 130
    assert "crane: interrupted" in capsys.readouterr().err
    assert "stopped after 3 of 7 images; `crane predict ... --resume`" in caplog.text
    assert main(argv) == 2
    assert "holds an interrupted run" in capsys.readouterr().err
    assert main([*argv, "--resume"]) == 0
    assert len(calls[1]) == 4
    assert len(list(csv.DictReader(open(out / "predictions.csv")))) == 7


def test_resume_takes_the_same_inputs_spelled_otherwise(images, tmp_path, monkeypatch):
    """Started with relative paths in one folder, resumed with absolute ones from another."""
    monkeypatch.chdir(images.parent)
    out = tmp_path / "out"
    det = detector()
    stop_after(det, 3)
    with pytest.raises(KeyboardInterrupt):
        run_predict(det, [images.name], out, progress=False)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)  # (where the recorded relative paths name nothing)
    det = detector()
    asked = stop_after(det, 10**6)
    summary = run_predict(det, [images], out, resume=True, progress=False)
    assert summary["n_resumed"] == 3 and len(asked[0]) == 4
    rows = list(csv.DictReader(open(out / "predictions.csv")))
    assert all(Path(r["path"]).is_absolute() for r in rows) and len(rows) == 7  # one spelling


def test_an_image_is_recorded_only_once_its_files_are_written(images, tmp_path, monkeypatch):
    """A record vouches for its overlay: an image whose overlay failed to write (or, in a
    killed run, was still queued) is not recorded, so a resume predicts it again instead of
    taking whatever file of that name an earlier run left there."""
    import crane.engine.predict as predict_module

    real = predict_module.write_overlay
    failing = sorted(str(p) for p in images.rglob("*.png"))[2]

    def write_overlay(path, image, amap, *a, **k):
        if str(image) == failing:
            raise OSError("disk full")
        return real(path, image, amap, *a, **k)

    monkeypatch.setattr(predict_module, "write_overlay", write_overlay)
    out = tmp_path / "out"
    with pytest.raises(OSError, match="disk full"):
        run_predict(detector(), [images], out, progress=False, write_threads=2)
    recorded = [json.loads(x)["path"] for x in (out / PROGRESS_FILE).read_text().splitlines()[1:]]
    assert failing not in recorded and recorded  # (the run stops at the failure it sees)
    names = predict_module._output_names(predict_module.expand_inputs([images]))
    for path in recorded:  # every record's overlay is on disk
        assert (out / "overlays" / f"{names[path]}.png").is_file()
    monkeypatch.setattr(predict_module, "write_overlay", real)
    (out / "overlays").mkdir(exist_ok=True)
    (out / "overlays" / ".0.png.abc123.tmp").write_bytes(b"half")  # a killed run's temp file
    det = detector()
    asked = stop_after(det, 10**6)
    summary = run_predict(det, [images], out, resume=True, progress=False)
    assert failing in asked[0] and sorted(asked[0] + recorded) == sorted(
        str(p) for p in images.rglob("*.png")
    )  # exactly the images not recorded
    assert summary["n_images"] == 7
    assert not list((out / "overlays").glob(".*.tmp"))


def test_a_second_run_into_a_live_runs_folder_is_refused(images, tmp_path):
    """While a run appends to its progress file (and holds its lock), a --resume or
    --overwrite run into the same folder must not replace that file."""
    import fcntl

    out = tmp_path / "out"
    det = detector()
    stop_after(det, 2)
    with pytest.raises(KeyboardInterrupt):
        run_predict(det, [images], out, progress=False)
    before = (out / PROGRESS_FILE).read_bytes()
    with open(out / PROGRESS_FILE) as live:  # as the running process holds it
        fcntl.flock(live.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        for kw in (dict(resume=True), dict(overwrite=True)):
            with pytest.raises(CraneError, match="another crane predict is running into"):
                run_predict(detector(), [images], out, progress=False, **kw)
        assert (out / PROGRESS_FILE).read_bytes() == before
    summary = run_predict(detector(), [images], out, resume=True, progress=False)
    assert summary["n_resumed"] == 2  # the lock gone, the resume goes ahead


def test_resume_takes_the_inputs_in_another_order(images, tmp_path):
    out = tmp_path / "out"
    det = detector()
    stop_after(det, 3)
    with pytest.raises(KeyboardInterrupt):
        run_predict(det, [images, images / "sub"], out, progress=False)
    det = detector()
    asked = stop_after(det, 10**6)
    summary = run_predict(det, [images / "sub", images], out, resume=True, progress=False)
    assert summary["n_resumed"] == 3 and len(asked[0]) == 4 and summary["n_images"] == 7


def test_two_runs_resuming_into_one_folder_at_once(tmp_path, monkeypatch):
    """The second run opens the progress file just as the first has checked its lock and
    is replacing it: it waits for the first one's turn and is refused, instead of both
    locking a different file and one appending to a deleted one."""
    from crane.engine import progress

    path = tmp_path / PROGRESS_FILE
    path.write_text(json.dumps({"crane": "predict", "settings": {"a": 1}}) + "\n")
    real, opened, refused = progress.atomic_write_bytes, {}, []
    monkeypatch.setattr(progress, "_FOLDER_WAIT_S", 0.2)

    def in_the_window(target, data):
        if not opened and not refused:  # the first run is between its check and its replace
            try:
                opened["B"] = progress.open_progress(path, "predict", {"a": 1})
            except CraneError as exc:
                refused.append(str(exc))
        real(target, data)

    monkeypatch.setattr(progress, "atomic_write_bytes", in_the_window)
    with progress.open_progress(path, "predict", {"a": 1}) as first:
        progress.append(first, {"x": "A"})
        assert not opened and "another crane predict is running into" in refused[0]
        assert os.fstat(first.fileno()).st_ino == path.stat().st_ino
    assert [json.loads(x) for x in path.read_text().splitlines()][1:] == [{"x": "A"}]


def test_two_runs_starting_into_one_folder_at_once(tmp_path, monkeypatch):
    """Both found no progress file; the first creates it (exclusively), the second is
    refused instead of replacing it."""
    from crane.engine import progress

    path = tmp_path / PROGRESS_FILE
    first = progress.open_progress(path, "predict", {"a": 1})
    try:
        monkeypatch.setattr(type(path), "exists", lambda self: False)  # as if it had looked first
        with pytest.raises(CraneError, match="another crane predict is running into"):
            progress.open_progress(path, "predict", {"a": 2})
        monkeypatch.undo()
        with pytest.raises(CraneError, match="another crane predict is running into"):
            progress.open_progress(path, "predict", {"a": 2})  # (locked)
    finally:
        first.close()
    with progress.open_progress(path, "predict", {"a": 3}) as again:  # the first one is done
        progress.append(again, {"x": 1})
    assert [json.loads(x) for x in path.read_text().splitlines()] == [
        {"crane": "predict", "settings": {"a": 3}}, {"x": 1}
    ]  # fmt: skip


def test_resume_refuses_other_backbone_weights(tmp_path, images):
    """Same config and prompts, other CLIP weights (another --clip-weights file): the scores
    of two models would share one CSV."""
    det = detector()
    stop_after(det, 3)
    with pytest.raises(KeyboardInterrupt):
        run_predict(det, [images], tmp_path / "out", progress=False, write_threads=0)
    other = detector()
    with torch.no_grad():
        other.model.vision.visual.proj.add_(0.5)
    with pytest.raises(CraneError, match=r"other backbone weights \(--clip-weights"):
        run_predict(other, [images], tmp_path / "out", progress=False, resume=True)
    inside = detector()  # (changed in one block alone, as a merged LoRA: it resumed)
    with torch.no_grad():
        inside.model.vision.visual.transformer.resblocks[0].mlp.c_fc.weight.mul_(1.01)
    with pytest.raises(CraneError, match=r"other backbone weights inside the blocks"):
        run_predict(inside, [images], tmp_path / "out", progress=False, resume=True)


def test_the_sampled_backbone_digest_holds_for_cast_weights():
    """Weights cast for autocast (cast_weights, the CLI's default under bf16) and the same
    weights uncast give one digest under that precision: a resume toggling the cast resumes."""
    from crane.engine.progress import backbone_sample_digest

    plain = create_model("tiny+", image_size=56, seed=2)
    cast = create_model("tiny+", image_size=56, seed=2).cast_frozen_matmuls(torch.bfloat16)
    assert backbone_sample_digest(plain, torch.bfloat16) == backbone_sample_digest(
        cast, torch.bfloat16
    )
    assert backbone_sample_digest(plain, None) != backbone_sample_digest(cast, None)
    fp16 = create_model("tiny+", image_size=56, seed=2).cast_frozen_matmuls(torch.float16)
    assert backbone_sample_digest(plain, torch.float16) == backbone_sample_digest(
        fp16, torch.float16
    )


def test_a_refused_resume_leaves_a_live_runs_temp_files(tmp_path, images):
    import fcntl

    det = detector()
    stop_after(det, 2)
    out = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        run_predict(det, [images], out, progress=False, write_threads=0)
    tmp = out / "overlays" / ".3.png.abc123.tmp"  # a live run's overlay, half written
    tmp.write_bytes(b"half")
    with open(out / PROGRESS_FILE, "a") as live:
        fcntl.flock(live, fcntl.LOCK_EX)  # (the live run's lock; flock is per open file)
        with pytest.raises(CraneError, match="another crane predict is running"):
            run_predict(detector(), [images], out, progress=False, resume=True)
    assert tmp.read_bytes() == b"half"
    run_predict(detector(), [images], out, progress=False, resume=True)  # (lock released)
    assert not tmp.exists()


def test_output_folder_above_the_inputs(tmp_path, images):
    """``crane predict proj/images --out proj``: the images are inputs, the run's own overlays
    (from an earlier run too) are not."""
    proj = tmp_path / "proj"
    images.rename(proj)
    first = run_predict(detector(), [proj], proj, progress=False)
    assert first["n_images"] == 7
    again = run_predict(detector(), [proj], proj, progress=False, overwrite=True)
    assert again["n_images"] == 7  # (not its 7 overlays too)


def test_hidden_folders_and_files_are_left_out_of_folder_scans(tmp_path, images):
    from crane.engine.predict import expand_inputs

    shutil.copy(images / "1.png", images / "._1.png")  # (macOS AppleDouble files)
    (images / ".ipynb_checkpoints").mkdir()
    shutil.copy(images / "1.png", images / ".ipynb_checkpoints" / "1-checkpoint.png")
    found = expand_inputs([images])
    assert len(found) == 7 and not any("/." in f for f in found)
    assert expand_inputs([images / "._1.png"]) == [str(images / "._1.png")]  # named: kept


def test_folder_scans_take_every_still_image_format_and_name_what_they_leave_out(tmp_path, caplog):
    """PGM/PPM/PBM, GIF and JFIF files are images to a folder scan (they were left out
    silently); other files are counted in a log line, hidden ones not."""
    import logging

    from crane.engine.predict import expand_inputs

    rng = np.random.default_rng(5)
    grey = Image.fromarray(rng.integers(0, 256, (30, 40), np.uint8))
    rgb = Image.fromarray(rng.integers(0, 256, (30, 40, 3), np.uint8))
    folder = tmp_path / "in"
    (folder / ".cache").mkdir(parents=True)
    grey.save(folder / "a.pgm")
    rgb.save(folder / "b.ppm")
    grey.convert("1").save(folder / "c.pbm")
    rgb.convert("P").save(folder / "d.gif")
    rgb.save(folder / "e.jfif", format="JPEG")
    rgb.save(folder / "f.PNG")
    (folder / "notes.txt").write_text("line 3, lot 7")
    (folder / "labels.csv").write_text("a,1")
    (folder / ".cache" / "x.bin").write_bytes(b"0")
    with caplog.at_level(logging.INFO, logger="crane.engine.predict"):
        found = expand_inputs([folder])
    assert [Path(f).name for f in found] == ["a.pgm", "b.ppm", "c.pbm", "d.gif", "e.jfif", "f.PNG"]
    assert "left out 2 files under" in caplog.text and "labels.csv, notes.txt" in caplog.text
    model = create_model("tiny", image_size=112, seed=0)
    with Detector(model, device="cpu", batch_size=3) as det:
        results = list(det.predict_iter(found))
    assert all(isinstance(r, Prediction) for r in results)
    assert [r.anomaly_map.shape for r in results] == [(30, 40)] * 6


def test_file_names_that_are_not_utf8(tmp_path, images):
    import os

    odd = Path(os.fsdecode(bytes(images) + b"/caf\xe9.png"))
    try:
        shutil.copy(images / "1.png", odd)
    except (OSError, UnicodeError):  # pragma: no cover - a file system that refuses them
        pytest.skip("this file system refuses names that are not UTF-8")
    out = tmp_path / "out"
    det = detector()
    stop_after(det, 3)
    with pytest.raises(KeyboardInterrupt):
        run_predict(det, [images], out, progress=False, write_threads=0)
    summary = run_predict(detector(), [images], out, progress=False, resume=True)
    assert summary["n_images"] == 8 and summary["n_resumed"] == 3
    # (the CSV stays valid UTF-8: the byte is written as an escape)
    assert b"caf\\xe9.png" in (out / "predictions.csv").read_bytes()
    (out / "predictions.csv").read_bytes().decode("utf-8")
    assert (out / "overlays" / os.fsdecode(b"caf\xe9.png")).is_file()


def test_a_file_named_twice_is_predicted_once(tmp_path, images):
    import os

    from crane.engine.predict import expand_inputs

    one = images / "1.png"
    other = os.path.join(str(images), ".", "1.png")
    assert expand_inputs([one, other, images / "sub" / ".." / "1.png"]) == [str(one)]
    summary = run_predict(detector(), [images, other], tmp_path / "out", progress=False)
    assert summary["n_images"] == 7
    (images / "link.png").symlink_to(one)  # (a file of its own: datasets of links keep rows)
    assert len(expand_inputs([images])) == 8
    # "lnk/../x.png" through a linked folder is the file beside the link's target
    a, b = tmp_path / "a", tmp_path / "b"
    (b / "sub").mkdir(parents=True)
    a.mkdir()
    shutil.copy(one, a / "x.png")
    shutil.copy(images / "2.png", b / "x.png")
    (a / "lnk").symlink_to(b / "sub")
    through = os.path.join(str(a), "lnk", "..", "x.png")
    assert expand_inputs([a / "x.png", through]) == [str(a / "x.png"), through]


def test_a_run_started_by_an_older_crane_resumes_with_a_warning(tmp_path, images, caplog):
    """Settings an older crane did not record (the backbone digest) cannot be checked: said,
    not refused."""
    det = detector()
    stop_after(det, 3)
    out = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        run_predict(det, [images], out, progress=False, write_threads=0)
    lines = (out / PROGRESS_FILE).read_text().splitlines()
    head = json.loads(lines[0])
    del head["settings"]["backbone_sha256"]
    (out / PROGRESS_FILE).write_text("\n".join([json.dumps(head), *lines[1:]]) + "\n")
    with caplog.at_level("WARNING"):
        summary = run_predict(detector(), [images], out, progress=False, resume=True)
    assert "did not record its backbone weights" in caplog.text
    assert summary["n_resumed"] == 3 and summary["n_images"] == 7
    # any other setting missing from a header: refused, not waved through
    det = detector()
    stop_after(det, 3)
    with pytest.raises(KeyboardInterrupt):
        run_predict(det, [images], out, progress=False, write_threads=0, overwrite=True)
    lines = (out / PROGRESS_FILE).read_text().splitlines()
    head = json.loads(lines[0])
    del head["settings"]["map_size"]
    (out / PROGRESS_FILE).write_text("\n".join([json.dumps(head), *lines[1:]]) + "\n")
    with pytest.raises(CraneError, match="started with other map_size"):
        run_predict(detector(), [images], out, progress=False, resume=True)


def test_a_resume_predicts_again_an_image_rewritten_since_it_was_scored(images, tmp_path):
    kw = dict(progress=False, write_threads=2)
    out = tmp_path / "out"
    det = detector()
    stop_after(det, 3)
    with pytest.raises(KeyboardInterrupt):
        run_predict(det, [images], out, **kw)
    first = json.loads((out / PROGRESS_FILE).read_text().splitlines()[1])["path"]
    rng = np.random.default_rng(9)
    Image.fromarray(rng.integers(0, 256, (30, 30, 3), dtype=np.uint8)).save(first)
    det = detector()
    asked = stop_after(det, 10**6)
    summary = run_predict(det, [images], out, resume=True, **kw)
    assert first in asked[0] and len(asked[0]) == 7 - 2 and summary["n_resumed"] == 2
    rows = {r["path"]: r for r in csv.DictReader(open(out / "predictions.csv"))}
    alone = detector().predict(first)[0]
    assert float(rows[first]["image_score"]) == pytest.approx(alone.score, abs=2e-6)
