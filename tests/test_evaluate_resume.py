"""``evaluate(progress_file=..., resume=True)`` / ``crane evaluate --resume``: each finished
class is recorded as the evaluation goes; a stopped run resumes with the classes it had not
finished and reports the same metrics as a run that never stopped."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch

import crane.engine.evaluate as evaluate_module
from crane.data import AnomalyDataset
from crane.engine.evaluate import evaluate
from crane.errors import CraneError
from crane.models import create_model

SIZE = 56
CPU = torch.device("cpu")


@pytest.fixture
def model():
    return create_model("tiny+", image_size=SIZE, seed=0)


def count_forwards(monkeypatch, stop_at=None):
    """Count the images of each forward call; raise KeyboardInterrupt at call ``stop_at``."""
    real = evaluate_module.scoring_forward
    calls = []

    def scoring_forward(*args, **kwargs):
        forward = real(*args, **kwargs)

        def counted(images):
            calls.append(images.shape[0])
            if stop_at is not None and len(calls) == stop_at:
                raise KeyboardInterrupt
            return forward(images)

        return counted

    monkeypatch.setattr(evaluate_module, "scoring_forward", scoring_forward)
    return calls


def same_report(a, b):
    assert list(a.per_class) == list(b.per_class)
    for table_a, table_b in ((a.per_class, b.per_class), ({"mean": a.mean}, {"mean": b.mean})):
        for cls, vals in table_a.items():
            for k, v in vals.items():
                w = table_b[cls][k]
                assert (math.isnan(v) and math.isnan(w)) or v == pytest.approx(w, abs=1e-9), k


@pytest.mark.parametrize("mode", ["exact", "binned"])
def test_a_stopped_evaluation_resumes_with_the_classes_it_had_not_finished(
    synth, tmp_path, monkeypatch, model, mode
):
    ds = AnomalyDataset(synth, "test", image_size=SIZE)
    kw = dict(device=CPU, batch_size=4, progress=False, metric_mode=mode, num_bins=256)
    whole = evaluate(model, ds, **kw)
    path = tmp_path / "ev" / "progress.jsonl"
    count_forwards(monkeypatch, stop_at=4)  # batches 1-2 are tile's, 3-4 plate's
    with pytest.raises(KeyboardInterrupt):
        evaluate(model, ds, progress_file=path, **kw)
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert lines[0]["crane"] == "evaluate" and [r["class"] for r in lines[1:]] == ["tile"]
    assert lines[1]["n_images"] == 8

    calls = count_forwards(monkeypatch)
    res = evaluate(model, ds, progress_file=path, resume=True, **kw)
    assert sum(calls) == 8 and res.n_images == 8 and res.n_resumed == 8  # plate's only
    same_report(res.report, whole.report)
    if mode == "binned":
        assert res.report.bounds["tile"] == whole.report.bounds["tile"]
        assert res.report.mean_bounds == pytest.approx(whole.report.mean_bounds)
    # Every class recorded: a resume only rebuilds the report.
    calls.clear()
    again = evaluate(model, ds, progress_file=path, resume=True, **kw)
    assert calls == [] and again.n_resumed == 16
    same_report(again.report, whole.report)


def test_resume_refuses_other_settings_and_redoes_a_class_without_its_overlays(
    synth, tmp_path, monkeypatch, model
):
    ds = AnomalyDataset(synth, "test", image_size=SIZE)
    path = tmp_path / "progress.jsonl"
    viz = tmp_path / "viz"
    kw = dict(device=CPU, batch_size=4, progress=False, visualize_dir=viz)
    count_forwards(monkeypatch, stop_at=4)
    with pytest.raises(KeyboardInterrupt):
        evaluate(model, ds, progress_file=path, **kw)
    before = path.read_bytes()
    other_backbone = copy.deepcopy(model)  # (the same prompts: another --dino-weights file)
    with torch.no_grad():
        other_backbone.vision.dino.cls_token.add_(1.0)
    for change, named in [
        (dict(aupro="legacy"), "aupro"),
        (dict(metric_mode="binned"), "metric_mode, --bins"),
        (dict(dataset=AnomalyDataset(synth, "test", ["tile"], image_size=SIZE)), "dataset images"),
        (
            dict(model=create_model("tiny+", image_size=SIZE, seed=1)),
            r"backbone weights \(--clip-weights, --dino-weights\), prompts",
        ),
        (dict(model=other_backbone), r"backbone weights \(--clip-weights, --dino-weights\) "),
        (dict(visualize_dir=tmp_path / "other"), "--visualize folder"),
        (dict(batch_size=2), "--batch-size"),
    ]:
        args = {"model": model, "dataset": ds, **kw, **change}
        with pytest.raises(CraneError, match=f"started with other {named}"):
            evaluate(args.pop("model"), args.pop("dataset"), progress_file=path, resume=True,
                     **args)  # fmt: skip
    assert path.read_bytes() == before
    with pytest.raises(CraneError, match="needs the progress_file"):
        evaluate(model, ds, resume=True, **kw)

    next((viz / "tile").iterdir()).unlink()  # an overlay that was never written
    calls = count_forwards(monkeypatch)
    res = evaluate(model, ds, progress_file=path, resume=True, **kw)
    assert sum(calls) == 16 and res.n_resumed == 0  # tile again, for its overlays
    assert len(list((viz / "tile").iterdir())) == 8


def test_cli_evaluate_resume(synth, tmp_path, monkeypatch, capsys, caplog):
    from crane.cli import main

    out = tmp_path / "ev"
    argv = ["evaluate", "--dataset", "mvtec", "--root", str(synth), "--model", "tiny+",
            "--batch-size", "4", "--no-progress", "--out", str(out)]  # fmt: skip
    count_forwards(monkeypatch, stop_at=4)
    assert main(argv) == 130
    assert "1 of 2 classes are recorded" in caplog.text and "--resume" in caplog.text
    assert main(argv) == 2
    assert "holds an interrupted run" in capsys.readouterr().err
    calls = count_forwards(monkeypatch)
    assert main([*argv, "--resume"]) == 0
    assert sum(calls) == 8
    assert "8 more from the interrupted run" in capsys.readouterr().out
    data = json.loads((out / "metrics.json").read_text())
    assert data["n_images"] == 16 and data["n_images_resumed"] == 8
    assert list(data["per_class"]) == ["tile", "plate"]
    assert not (out / "progress.jsonl").exists()
    assert main([*argv, "--resume"]) == 2
    assert "no interrupted run to resume (its run finished)" in capsys.readouterr().err


def test_a_class_with_an_unreadable_image_is_recorded_when_the_next_class_starts(
    synth, tmp_path, monkeypatch, model
):
    """Skipped images never arrive, so their class never counted down to zero: it is complete
    once a later class's images come (the dataset lists classes in order)."""
    import shutil

    root = tmp_path / "data"
    shutil.copytree(synth, root)
    bad = sorted((root / "tile" / "test" / "good").glob("*.png"))[0]
    bad.write_bytes(b"not a png")
    ds = AnomalyDataset(root, "test", image_size=SIZE, on_error="skip")
    path = tmp_path / "progress.jsonl"
    count_forwards(monkeypatch, stop_at=4)  # tile: 7 readable images, then plate's
    with pytest.raises(KeyboardInterrupt):
        evaluate(model, ds, device=CPU, batch_size=4, progress=False, progress_file=path)
    records = [json.loads(line) for line in path.read_text().splitlines()[1:]]
    assert [(r["class"], r["n_images"]) for r in records] == [("tile", 7)]
    calls = count_forwards(monkeypatch)
    res = evaluate(model, ds, device=CPU, batch_size=4, progress=False, progress_file=path,
                   resume=True)  # fmt: skip
    assert sum(calls) == 8 and res.n_resumed == 7
    whole = evaluate(model, ds, device=CPU, batch_size=4, progress=False)
    same_report(res.report, whole.report)


def test_a_dataset_that_interleaves_classes_is_still_evaluated(synth, model):
    """Classes finalise early only where the samples come class by class."""
    ds = AnomalyDataset(synth, "test", image_size=SIZE)
    whole = evaluate(model, ds, device=CPU, batch_size=4, progress=False)
    mixed = AnomalyDataset(synth, "test", image_size=SIZE)
    tile = [s for s in mixed.samples if s.cls_name == "tile"]
    plate = [s for s in mixed.samples if s.cls_name == "plate"]
    mixed.samples = [s for pair in zip(tile, plate, strict=True) for s in pair]
    res = evaluate(model, mixed, device=CPU, batch_size=4, progress=False)
    for cls in ("tile", "plate"):
        for k, v in whole.report.per_class[cls].items():
            assert res.report.per_class[cls][k] == pytest.approx(v, abs=1e-6, nan_ok=True), k


def test_a_class_none_of_whose_images_can_be_read_is_left_out(synth, tmp_path, model):
    """With --skip-bad, a class whose every image is unreadable is not in the report (and the
    classes around it are finalised as usual)."""
    import shutil

    from crane.data import make_synthetic_dataset

    root = tmp_path / "data"
    make_synthetic_dataset(root, seed=0, classes=("tile", "plate", "wood"), n_train=1,
                           n_test_good=2, n_test_bad=2, size=64)  # fmt: skip
    for f in (root / "plate" / "test").rglob("*.png"):
        f.write_bytes(b"broken")
    ds = AnomalyDataset(root, "test", image_size=SIZE, on_error="skip")
    path = tmp_path / "progress.jsonl"
    res = evaluate(model, ds, device=CPU, batch_size=2, progress=False, progress_file=path)
    assert list(res.report.per_class) == ["tile", "wood"] and res.n_images == 8
    records = [json.loads(line) for line in path.read_text().splitlines()[1:]]
    assert [(r["class"], r["n_images"]) for r in records] == [("tile", 4), ("plate", 0),
                                                              ("wood", 4)]  # fmt: skip
    shutil.rmtree(root)


def test_resume_through_the_api_needs_the_file_and_takes_any_precision_name(synth, tmp_path, model):
    ds = AnomalyDataset(synth, "test", ["tile"], image_size=SIZE)
    with pytest.raises(CraneError, match="no interrupted evaluation to resume"):
        evaluate(model, ds, device=CPU, progress=False, progress_file=tmp_path / "none.jsonl",
                 resume=True)  # fmt: skip
    path = tmp_path / "p.jsonl"
    evaluate(model, ds, device=CPU, progress=False, progress_file=path, amp_dtype=torch.float32)
    head = json.loads(path.read_text().splitlines()[0])
    assert head["settings"]["precision"] == "fp32"


def test_a_refused_resume_leaves_a_live_runs_temp_files(synth, tmp_path, monkeypatch, model):
    import fcntl

    ds = AnomalyDataset(synth, "test", image_size=SIZE)
    path, viz = tmp_path / "progress.jsonl", tmp_path / "viz"
    kw = dict(device=CPU, batch_size=4, progress=False, visualize_dir=viz, progress_file=path)
    count_forwards(monkeypatch, stop_at=2)
    with pytest.raises(KeyboardInterrupt):
        evaluate(model, ds, **kw)
    monkeypatch.undo()
    folder = viz / "tile"
    folder.mkdir(parents=True, exist_ok=True)
    live = folder / ".x.png.abc123.tmp"  # a live run's overlay, half written
    live.write_bytes(b"half")
    with open(path, "a") as held:
        fcntl.flock(held, fcntl.LOCK_EX)  # (the live run's lock)
        with pytest.raises(CraneError, match="another crane evaluate is running"):
            evaluate(model, ds, resume=True, **kw)
    assert live.read_bytes() == b"half"
    evaluate(model, ds, resume=True, **kw)
    assert not live.exists()


@pytest.mark.parametrize(
    ("preset", "extra"), [("tiny", {}), ("tiny+", {"dattn_threshold_scope": "batch"})]
)
def test_a_resume_rebuilds_the_batch_it_starts_in(tmp_path, monkeypatch, preset, extra):
    """Classes of 7 images in batches of 4: batch 2 holds tile's last 3 images and plate's
    first. A resume after tile runs that batch again (tile's images dropped), so every map
    is computed in the batch it had: identical results, with the batch-wide D-Attn threshold
    too (which depends on the whole batch), and in the last bits on a CPU by default."""
    from crane.data import make_synthetic_dataset

    make_synthetic_dataset(tmp_path / "d", seed=0, classes=("tile", "plate", "fabric"),
                           n_train=1, n_test_good=3, n_test_bad=4, size=64)  # fmt: skip
    ds = AnomalyDataset(tmp_path / "d", "test", image_size=SIZE)
    model = create_model(preset, image_size=SIZE, seed=0, **extra)
    kw = dict(device=CPU, batch_size=4, progress=False)
    whole = evaluate(model, ds, **kw)
    path = tmp_path / "ev" / "progress.jsonl"
    count_forwards(monkeypatch, stop_at=4)  # in plate's images: tile recorded
    with pytest.raises(KeyboardInterrupt):
        evaluate(model, ds, progress_file=path, **kw)
    calls = count_forwards(monkeypatch)
    res = evaluate(model, ds, progress_file=path, resume=True, **kw)
    assert calls[0] == 4 and sum(calls) == 3 + 14  # tile's last 3 again, then plate, fabric
    assert res.n_images == 14 and res.n_resumed == 7
    for cls, values in whole.report.per_class.items():
        for k, v in values.items():
            w = res.report.per_class[cls][k]
            assert (math.isnan(v) and math.isnan(w)) or v == w, (cls, k)
    calls.clear()  # every class recorded: the report is rebuilt, nothing runs
    again = evaluate(model, ds, progress_file=path, resume=True, **kw)
    assert calls == [] and again.n_resumed == 21


def test_a_resume_counts_a_jpeg_the_device_decode_dropped_in_its_batch(tmp_path, monkeypatch):
    """A JPEG the loader hands over but no device decoder reads takes a place in its batch
    and is dropped after batching: the resume rebuilds the batches with it."""
    import io

    from PIL import Image

    from crane.data import make_synthetic_dataset

    root = tmp_path / "d"
    make_synthetic_dataset(root, seed=0, classes=("tile", "plate", "fabric"), n_train=1,
                           n_test_good=3, n_test_bad=4, size=64)  # fmt: skip
    for f in sorted(root.glob("*/test/*/*.png")):  # (JPEG bytes; images known by content)
        buf = io.BytesIO()
        Image.open(f).convert("RGB").save(buf, format="JPEG", quality=90)
        f.write_bytes(buf.getvalue())
    bad_file = sorted(root.glob("tile/test/good/*.png"))[0]
    bad = bytearray(bad_file.read_bytes())
    dht = bad.find(b"\xff\xc4")
    bad[dht + 5 : dht + 21] = b"\xff" * 16  # a Huffman table no decoder takes
    bad_file.write_bytes(bytes(bad))
    model = create_model("tiny+", image_size=SIZE, seed=0, dattn_threshold_scope="batch")
    ds = AnomalyDataset(root, "test", image_size=SIZE, on_error="skip")
    kw = dict(device=CPU, batch_size=4, progress=False, device_decode=True)
    whole = evaluate(model, ds, **kw)
    path = tmp_path / "ev" / "progress.jsonl"
    count_forwards(monkeypatch, stop_at=6)
    with pytest.raises(KeyboardInterrupt):
        evaluate(model, ds, progress_file=path, **kw)
    records = [json.loads(line) for line in path.read_text().splitlines()[1:]]
    assert [(r["class"], r["n_images"], r["slots"]) for r in records] == [
        ("tile", 6, 7), ("plate", 7, 7)]  # fmt: skip
    count_forwards(monkeypatch)
    res = evaluate(model, ds, progress_file=path, resume=True, **kw)
    for k, v in whole.report.per_class["fabric"].items():
        w = res.report.per_class["fabric"][k]
        assert (math.isnan(v) and math.isnan(w)) or v == w, k


def test_a_batch_scope_resume_that_cannot_rebuild_its_batches_is_refused(tmp_path, monkeypatch):
    from crane.data import make_synthetic_dataset

    make_synthetic_dataset(tmp_path / "d", seed=0, classes=("tile", "plate"), n_train=1,
                           n_test_good=3, n_test_bad=4, size=64)  # fmt: skip
    model = create_model("tiny+", image_size=SIZE, seed=0, dattn_threshold_scope="batch")
    kw = dict(device=CPU, batch_size=4, progress=False)
    ds = AnomalyDataset(tmp_path / "d", "test", image_size=SIZE)
    path = tmp_path / "ev" / "progress.jsonl"
    count_forwards(monkeypatch, stop_at=4)
    with pytest.raises(KeyboardInterrupt):
        evaluate(model, ds, progress_file=path, **kw)
    lines = path.read_text().splitlines()
    record = json.loads(lines[1])
    record["n_images"] -= 1  # as if one of tile's images had been unreadable
    record["slots"] -= 1
    path.write_text("\n".join([lines[0], json.dumps(record)]) + "\n")
    count_forwards(monkeypatch)
    with pytest.raises(CraneError, match="cannot be resumed exactly"):
        evaluate(model, ds, progress_file=path, resume=True, **kw)


def test_a_class_with_no_readable_image_is_recorded_and_resumes_rebuild_around_it(
    tmp_path, monkeypatch
):
    """Its record (no metrics, its places in the batches) lets a batch-scope resume rebuild
    the batches after it, and a fully recorded run resume without running anything."""
    from crane.data import make_synthetic_dataset

    root = tmp_path / "d"
    make_synthetic_dataset(root, seed=0, classes=("tile", "plate", "fabric", "wood"),
                           n_train=1, n_test_good=3, n_test_bad=4, size=64)  # fmt: skip
    for f in (root / "plate" / "test").rglob("*.png"):
        f.write_bytes(b"not an image")
    model = create_model("tiny+", image_size=SIZE, seed=0, dattn_threshold_scope="batch")
    ds = AnomalyDataset(root, "test", image_size=SIZE, on_error="skip")
    kw = dict(device=CPU, batch_size=4, progress=False)
    whole = evaluate(model, ds, **kw)
    assert "plate" not in whole.report.per_class
    path = tmp_path / "ev" / "progress.jsonl"
    count_forwards(monkeypatch, stop_at=6)  # in wood's images: tile, plate, fabric recorded
    with pytest.raises(KeyboardInterrupt):
        evaluate(model, ds, progress_file=path, **kw)
    records = [json.loads(line) for line in path.read_text().splitlines()[1:]]
    assert [(r["class"], r["n_images"], r["slots"]) for r in records] == [
        ("tile", 7, 7), ("plate", 0, 0), ("fabric", 7, 7)]  # fmt: skip
    calls = count_forwards(monkeypatch)
    res = evaluate(model, ds, progress_file=path, resume=True, **kw)
    assert calls[0] == 4 and sum(calls) == 2 + 7  # fabric's last 2 again, then wood
    same_report(res.report, whole.report)
    assert list(res.report.per_class) == ["tile", "fabric", "wood"]
    calls.clear()
    again = evaluate(model, ds, progress_file=path, resume=True, **kw)
    assert calls == []
    same_report(again.report, whole.report)


def test_a_stopped_run_with_workers_resumes_in_the_same_process(synth, tmp_path, monkeypatch):
    """Its forked decode workers, kept alive by a traceback held as IPython holds one, had
    inherited the progress file's lock: the resume was refused as another run."""
    import sys

    ds = AnomalyDataset(synth, "test", image_size=SIZE)
    kw = dict(device=CPU, batch_size=4, workers=2, progress=False)
    path = tmp_path / "ev" / "progress.jsonl"
    count_forwards(monkeypatch, stop_at=4)  # (tile recorded)
    try:
        evaluate(create_model("tiny", image_size=SIZE, seed=0), ds, progress_file=path, **kw)
    except KeyboardInterrupt:
        held = sys.exc_info()  # (what IPython keeps in sys.last_traceback)
    count_forwards(monkeypatch)
    res = evaluate(create_model("tiny", image_size=SIZE, seed=0), ds, progress_file=path,
                   resume=True, **kw)  # fmt: skip
    assert res.n_images == 8 and held[0] is KeyboardInterrupt


def test_records_without_places_are_not_trusted_with_the_device_decode(synth, tmp_path):
    """Written before "slots" were recorded: their n_images may leave out JPEGs the device
    decode dropped, which held places in the batches."""
    from crane.engine.evaluate import _lead_in

    ds = AnomalyDataset(synth, "test", image_size=SIZE)  # tile: 8 images, then plate
    tile = [smp for smp in ds.samples if smp.cls_name == "tile"]
    new, old = {"tile": {"n_images": 8, "slots": 8}}, {"tile": {"n_images": 8}}
    assert _lead_in(ds, new, 3, "batch", device_decode=True) == tile[-2:]
    assert _lead_in(ds, old, 3, "batch", device_decode=False) == tile[-2:]
    assert _lead_in(ds, old, 3, "image", device_decode=True) == []
    with pytest.raises(CraneError, match="cannot be resumed exactly"):
        _lead_in(ds, old, 3, "batch", device_decode=True)
