"""Pipelines: losses, training (+ exact resume), evaluation, prediction, calibration."""

from __future__ import annotations

import csv
import json
import math
import re

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from crane.data import AnomalyDataset
from crane.engine.calibrate import f1_optimal_threshold, fpr_threshold
from crane.engine.evaluate import evaluate, paper_protocol, write_report
from crane.engine.losses import crane_loss, dice_loss, focal_loss
from crane.engine.predict import Detector, run_predict
from crane.engine.runtime import nan_score_message
from crane.engine.train import TrainSettings, train
from crane.errors import CraneError, ImageReadError
from crane.metrics import METRICS
from crane.models import create_model
from crane.models.crane import TrainOutput

SIZE = 112  # 8x8 patch grid: fast, still exercises every code path


def test_focal_matches_reference_formula():
    g = torch.Generator().manual_seed(0)
    probs = torch.softmax(torch.randn(2, 2, 5, 5, generator=g), 1)
    target = (torch.rand(2, 5, 5, generator=g) > 0.7).float()
    # Reference (AnomalyCLIP/Crane FocalLoss): flatten, one-hot via scatter, clamp, +smooth, mean.
    logit = probs.view(2, 2, -1).permute(0, 2, 1).reshape(-1, 2)
    idx = target.view(-1, 1).long()
    onehot = torch.zeros(idx.shape[0], 2).scatter_(1, idx, 1).clamp(1e-5, 1 - 1e-5)
    pt = (onehot * logit).sum(1) + 1e-5
    ref = (-((1 - pt) ** 2) * pt.log()).mean()
    torch.testing.assert_close(focal_loss(probs, target), ref)


def test_dice_matches_naive_loop():
    g = torch.Generator().manual_seed(1)
    p = torch.rand(3, 4, 4, generator=g)
    t = (torch.rand(3, 4, 4, generator=g) > 0.5).float()
    vals = [(2 * (p[i] * t[i]).sum() + 1) / (p[i].sum() + t[i].sum() + 1) for i in range(3)]
    torch.testing.assert_close(dice_loss(p, t), 1 - sum(vals) / 3)


def test_crane_loss_weights_and_set_multiplicity():
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(1, 2, 4, 2, generator=g)
    out = TrainOutput(patch_logits=logits, image_logits=torch.randn(2, 2, generator=g))
    masks = torch.zeros(2, 4, 4)
    masks[0, :2, :2] = 1
    labels = torch.tensor([1, 0])
    one, p1 = crane_loss(out, masks, labels, 4, 1)
    four, p4 = crane_loss(out, masks, labels, 4, 4)
    # Nearest upsampling of a 2x2 grid to 4x4 = each patch repeated in a 2x2 block.
    probs = logits.softmax(-1)[0].permute(0, 2, 1).reshape(2, 2, 2, 2)
    up = probs.repeat_interleave(2, -1).repeat_interleave(2, -2)
    focal, dice = focal_loss(up, masks), dice_loss(up[:, 1], masks)
    ce = F.cross_entropy(out.image_logits, labels)
    torch.testing.assert_close(one, 2 * focal + 2 * dice + 0.2 * ce)
    torch.testing.assert_close(four, 8 * focal + 8 * dice + 0.2 * ce)


def _train(root, run, epochs, stop=None, resume=False):
    model = create_model("tiny", seed=111, image_size=SIZE)
    ds = AnomalyDataset(root, "test", image_size=SIZE)
    res = train(
        model,
        ds,
        run,
        TrainSettings(epochs=epochs, batch_size=4),
        progress=False,
        resume=resume,
        stop_after_epoch=stop,
        device="cpu",
    )
    return model, res


def test_resume_is_exact(synth, tmp_path):
    full, res_full = _train(synth, tmp_path / "full", 3)
    _train(synth, tmp_path / "cut", 3, stop=1)
    assert json.loads((tmp_path / "cut" / "resume.json").read_text())["epochs_done"] == 1
    resumed, res_resumed = _train(synth, tmp_path / "cut", 3, resume=True)
    for (k, a), (_, b) in zip(
        full.prompt_learner.state_dict().items(),
        resumed.prompt_learner.state_dict().items(),
        strict=True,
    ):
        assert torch.equal(a, b), k
    assert res_resumed.epoch_losses == res_full.epoch_losses
    assert sorted(p.name for p in (tmp_path / "full").iterdir() if p.is_dir()) == [
        "epoch_1",
        "epoch_2",
        "epoch_3",
    ]
    # a finished run reloads as a model
    again = create_model(str(tmp_path / "full"))
    assert torch.equal(again.prompt_learner.ctx_pos, full.prompt_learner.ctx_pos)


def _same_prompts(a, b):
    for (k, x), (_, y) in zip(
        a.prompt_learner.state_dict().items(), b.prompt_learner.state_dict().items(), strict=True
    ):
        assert torch.equal(x, y), k


@pytest.mark.parametrize("crash_in", ["top-level save", "resume.json"])
def test_resume_after_a_crash_while_saving_is_exact(synth, tmp_path, crash_in, caplog):
    """A run killed while it saves epoch 2 (after epoch 2's folder, before resume.json names
    it) resumes from epoch 1's prompts *and* optimizer state, never a mix of the two epochs
    (before: the top-level prompts of epoch 1 with the optimizer state of epoch 2)."""
    from unittest import mock

    import crane.engine.train as T

    full, res_full = _train(synth, tmp_path / "full", 3)
    real = T.save_model if crash_in == "top-level save" else T._save_resume
    calls = []

    def crash_on_epoch_2(*args, **kw):
        calls.append(1)
        # save_model runs twice an epoch (epoch folder, top level); _save_resume once
        if len(calls) == (4 if crash_in == "top-level save" else 2):
            raise KeyboardInterrupt
        return real(*args, **kw)

    name = "save_model" if crash_in == "top-level save" else "_save_resume"
    with mock.patch.object(T, name, crash_on_epoch_2), pytest.raises(KeyboardInterrupt):
        _train(synth, tmp_path / "cut", 3)
    assert json.loads((tmp_path / "cut" / "resume.json").read_text())["epochs_done"] == 1
    assert "stopped with 1 of 3 epochs saved in" in caplog.text and "--resume" in caplog.text
    assert not (tmp_path / "cut" / ".feature_cache.npy").exists()
    resumed, res_resumed = _train(synth, tmp_path / "cut", 3, resume=True)
    _same_prompts(full, resumed)
    assert res_resumed.epoch_losses == res_full.epoch_losses
    log = (tmp_path / "cut" / "train_log.jsonl").read_text().splitlines()
    assert [json.loads(line) for line in log] == res_full.epoch_losses


def test_runs_saved_before_the_epoch_folders_held_the_optimizer_still_resume(synth, tmp_path):
    """Earlier runs kept the optimizer state at the top level (resume.safetensors) beside the
    latest prompts; they resume exactly as before."""
    full, _ = _train(synth, tmp_path / "full", 2)
    _train(synth, tmp_path / "old", 2, stop=1)
    old = tmp_path / "old"
    (old / "epoch_1" / "optimizer.safetensors").rename(old / "resume.safetensors")
    resumed, _ = _train(synth, old, 2, resume=True)
    _same_prompts(full, resumed)


def test_resume_refuses_another_model_or_dataset(synth, tmp_path):
    _train(synth, tmp_path / "r", 3, stop=1)
    ds = AnomalyDataset(synth, "test", image_size=SIZE)
    other = create_model("tiny", seed=111, image_size=SIZE, fusion_alpha=0.25)
    with pytest.raises(CraneError, match=r"model differs.*fusion_alpha: 0.5 → 0.25"):
        train(other, ds, tmp_path / "r", TrainSettings(epochs=3, batch_size=4), resume=True,
              progress=False, device="cpu")  # fmt: skip
    model = create_model("tiny", seed=111, image_size=SIZE)
    fewer = torch.utils.data.Subset(ds, range(len(ds) - 1))
    with pytest.raises(CraneError, match=f"trained on {len(ds)} images"):
        train(model, fewer, tmp_path / "r", TrainSettings(epochs=3, batch_size=4), resume=True,
              progress=False, device="cpu")  # fmt: skip
    with pytest.raises(CraneError, match="betas"):
        train(model, ds, tmp_path / "r", TrainSettings(epochs=3, batch_size=4, betas=(0.9, 0.99)),
              resume=True, progress=False, device="cpu")  # fmt: skip


def test_a_failed_feature_encoding_leaves_no_cache_file(synth, tmp_path):
    """The memory-mapped feature cache (gigabytes for a real dataset) is removed when encoding
    fails, and the run folder can be used again."""

    class Breaks(torch.utils.data.Dataset):
        def __init__(self, ds):
            self.ds = ds

        def __len__(self):
            return len(self.ds)

        def __getitem__(self, i):
            if i == len(self.ds) - 1:
                raise OSError("disk gone")
            return self.ds[i]

    ds = AnomalyDataset(synth, "test", image_size=SIZE)
    model = create_model("tiny", seed=111, image_size=SIZE)
    run = tmp_path / "r"
    with pytest.raises(OSError, match="disk gone"):
        train(model, Breaks(ds), run, TrainSettings(epochs=1, batch_size=4), progress=False,
              device="cpu", cache_location="mmap")  # fmt: skip
    assert not (run / ".feature_cache.npy").exists()


def test_training_refuses_to_clobber_a_run(synth, tmp_path):
    _train(synth, tmp_path / "r", 1)
    with pytest.raises(CraneError, match="not empty"):
        _train(synth, tmp_path / "r", 1)
    with pytest.raises(CraneError, match="no interrupted run"):
        _train(synth, tmp_path / "empty", 1, resume=True)


def test_anomalous_images_without_masks_count_in_image_metrics_only(synth, tmp_path, caplog):
    """missing_mask="warn" keeps anomalous images without a mask: their empty mask would mark
    their defects normal, so they count in the image metrics but not in the pixel ones. Training
    leaves them out (its losses compare maps with masks)."""
    import copy
    import dataclasses
    import logging

    model = create_model("tiny+", image_size=SIZE)
    ds = AnomalyDataset(synth, "test", image_size=SIZE)
    drop = next(i for i, s in enumerate(ds.samples) if s.anomaly and s.cls_name == "tile")
    unmasked = copy.copy(ds)
    unmasked.samples = list(ds.samples)
    unmasked.samples[drop] = dataclasses.replace(ds.samples[drop], mask_path="")
    without = copy.copy(ds)
    without.samples = [s for i, s in enumerate(ds.samples) if i != drop]
    kw = dict(device=torch.device("cpu"), batch_size=3, progress=False)
    with caplog.at_level(logging.WARNING):
        got = evaluate(model, unmasked, **kw).report.per_class["tile"]
    full = evaluate(model, ds, **kw).report.per_class["tile"]
    less = evaluate(model, without, **kw).report.per_class["tile"]
    for key, value in got.items():
        want = full[key] if key.startswith("image") else less[key]
        assert value == pytest.approx(want, nan_ok=True), key
    assert got["pixel_auroc"] != pytest.approx(full["pixel_auroc"])  # the dropped mask counted
    assert "1 anomalous images have no mask" in caplog.text

    settings = TrainSettings(epochs=1, batch_size=4)
    res = train(create_model("tiny", image_size=SIZE), unmasked, tmp_path / "r", settings,
                progress=False, device="cpu")  # fmt: skip
    assert json.loads((tmp_path / "r" / "resume.json").read_text())["n_images"] == len(ds) - 1
    assert res.epoch_losses
    none = copy.copy(ds)
    none.samples = [dataclasses.replace(s, mask_path="") for s in ds.samples]
    with pytest.raises(CraneError, match="training needs pixel masks"):
        train(create_model("tiny", image_size=SIZE), none, tmp_path / "r2", settings,
              progress=False, device="cpu")  # fmt: skip


def test_evaluate_streams_into_complete_reports(synth, tmp_path):
    model = create_model("tiny+", image_size=SIZE)
    ds = AnomalyDataset(synth, "test", image_size=SIZE)
    res = evaluate(
        model,
        ds,
        device=torch.device("cpu"),
        batch_size=3,
        progress=False,
        visualize_dir=tmp_path / "viz",
    )
    assert res.n_images == 16 and set(res.report.per_class) == {"tile", "plate"}
    files = write_report(res.report, tmp_path / "out", {"dataset": "synth"})
    rows = list(csv.DictReader(open(files["csv"])))
    assert [r["class"] for r in rows] == ["tile", "plate", "mean"]
    data = json.loads(files["json"].read_text())
    for k, v in data["mean"].items():
        assert v is None or 0 <= v <= 1, k
    assert "| **mean** |" in files["md"].read_text()
    assert len(list((tmp_path / "viz").rglob("*.png"))) == 16
    # Where the time went: every activity, each part of the run, together all of it but
    # setup (on the CPU the forward is in "launch").
    from crane.engine.evaluate import TIMINGS

    t = res.timings
    assert list(t) == list(TIMINGS) and all(v >= 0 for v in t.values())
    assert t["launch"] > 0 and t["metrics"] > 0 and t["finalize"] > 0 and t["outputs"] > 0
    assert 0.9 * res.seconds <= sum(t.values()) <= res.seconds


def test_binned_evaluate_reports_its_bounds_in_every_file(synth, tmp_path):
    from crane.engine.evaluate import report_markdown
    from crane.metrics import make_report

    model = create_model("tiny+", image_size=SIZE)
    ds = AnomalyDataset(synth, "test", image_size=SIZE)
    kw = dict(device=torch.device("cpu"), batch_size=8, progress=False)
    exact = evaluate(model, ds, **kw).report
    binned = evaluate(model, ds, metric_mode="binned", **kw).report
    files = write_report(binned, tmp_path / "out", {"dataset": "synth"})
    rows = {r["class"]: r for r in csv.DictReader(open(files["csv"]))}
    data = json.loads(files["json"].read_text())
    assert list(rows) == ["tile", "plate", "mean"]
    for cls in rows:
        want = exact.mean if cls == "mean" else exact.per_class[cls]
        for metric, value in want.items():
            got, bound = float(rows[cls][metric]), float(rows[cls][f"{metric}_bound"])
            json_bound = data["mean_bounds" if cls == "mean" else "bounds"]
            if cls != "mean":
                json_bound = json_bound[cls]
            assert json_bound[metric] <= bound <= json_bound[metric] * 1.01 + 1e-6
            # (the printed range holds the exact value; an exact one is rounded to 6 decimals)
            assert abs(got - value) <= (bound if bound > 0 else 5e-7), (cls, metric)
            if metric.startswith("image"):
                assert bound == 0.0  # image metrics are exact in both modes
    assert float(rows["mean"]["pixel_auroc_bound"]) > 0
    coarse = evaluate(model, ds, metric_mode="binned", num_bins=8, **kw).report
    for metric in ("pixel_auroc", "pixel_aupro"):
        wide = coarse.mean_bounds[metric]
        assert wide > 10 * binned.mean_bounds[metric]  # 8 bins: far looser than 65536
        assert abs(coarse.mean[metric] - exact.mean[metric]) <= wide
    md = files["md"].read_text()
    assert "±" in md and "certified bound" in md
    assert "±" not in report_markdown(exact)  # exact mode: as before
    # No finite bound, and an estimate that could not be made although the exact value may exist.
    odd = make_report(
        {"a": {"pixel_aupro": math.nan, "pixel_auroc": 0.9}},
        aupro="legacy",
        mode="binned",
        bounds={"a": {"pixel_aupro": math.inf, "pixel_auroc": 0.001}},
    )
    line = report_markdown(odd).splitlines()[2]
    assert "n/a ±inf" in line and "90.0 ±0.10" in line
    write_report(odd, tmp_path / "odd", {})
    odd_rows = list(csv.DictReader(open(tmp_path / "odd" / "metrics.csv")))
    assert odd_rows[0]["pixel_aupro"] == "" and odd_rows[0]["pixel_aupro_bound"] == "inf"
    assert odd_rows[1]["class"] == "mean" and odd_rows[1]["pixel_aupro_bound"] == "inf"


def test_image_level_dataset_gives_undefined_pixel_metrics(tmp_path):
    root = tmp_path / "brain"
    for sub, n in (("no", 3), ("yes", 3)):
        (root / "brain_tumor_dataset" / sub).mkdir(parents=True)
        for i in range(n):
            Image.fromarray(
                np.full((40, 50), 30 * i + (100 if sub == "yes" else 0), np.uint8)
            ).save(root / "brain_tumor_dataset" / sub / f"{i}.jpg")
    from crane.engine.common import open_dataset

    ds = open_dataset(root, "brainmri", "test", SIZE)
    res = evaluate(
        create_model("tiny", image_size=SIZE), ds, device=torch.device("cpu"), progress=False
    )
    m = res.report.mean
    assert math.isnan(m["pixel_auroc"]) and math.isnan(m["pixel_aupro"])
    assert 0 <= m["image_auroc"] <= 1


def test_evaluate_and_train_take_device_names_and_refuse_another_image_size(synth, tmp_path):
    model = create_model("tiny", image_size=SIZE)
    ds = AnomalyDataset(synth, "test", image_size=SIZE, classes=["tile"])
    by_name = evaluate(model, ds, device="cpu", progress=False).report.mean
    assert by_name == evaluate(model, ds, device=torch.device("cpu"), progress=False).report.mean
    other = AnomalyDataset(synth, "test", image_size=2 * SIZE, classes=["tile"])
    says = f"resizes images to {2 * SIZE} px but the model (tiny) takes {SIZE} px"
    with pytest.raises(CraneError, match=re.escape(says)):
        evaluate(model, other, device="cpu", progress=False)
    with pytest.raises(CraneError, match=re.escape(says)):
        train(model, other, tmp_path / "run", TrainSettings(epochs=1), progress=False)
    assert not (tmp_path / "run").exists()  # refused before anything was written


def test_detector_inputs_and_map_sizes(synth, tmp_path):
    det = Detector(create_model("tiny", image_size=SIZE), device="cpu", batch_size=2, threshold=0.5)
    img = Image.fromarray(np.random.default_rng(0).integers(0, 255, (60, 90, 3), dtype=np.uint8))
    preds = det.predict([img, np.asarray(img)])
    assert [p.anomaly_map.shape for p in preds] == [(60, 90), (60, 90)]
    assert preds[0].score == pytest.approx(preds[1].score)
    assert preds[0].is_anomalous == (preds[0].score >= 0.5)
    folder = det.predict(synth / "tile" / "test" / "good")
    assert len(folder) == 3 and all(p.anomaly_map.shape == (128, 128) for p in folder)
    with pytest.raises(CraneError):
        det.predict(tmp_path / "missing.png")


def test_detector_reads_arrays_and_tensors_as_their_uint8_image():
    det = Detector(create_model("tiny", image_size=SIZE), device="cpu", batch_size=1)
    rgb = np.random.default_rng(1).integers(0, 256, (36, 44, 3), dtype=np.uint8)
    grey = rgb[..., 0]
    t = torch.from_numpy(rgb).permute(2, 0, 1)
    same_rgb = {
        "float32 [0, 1]": rgb.astype(np.float32) / 255,
        "float64 [0, 255]": rgb.astype(np.float64),
        "uint16": rgb.astype(np.uint16) * 257,
        "uint16 big-endian": (rgb.astype(np.uint16) * 257).astype(">u2"),
        "int64": rgb.astype(np.int64),
        "non-contiguous": np.asfortranarray(rgb),
        "uint8 tensor (C, H, W)": t,
        "float tensor [0, 1]": t.float() / 255,
    }
    same_grey = {
        "(H, W, 1)": grey[..., None],
        "(1, H, W) tensor": torch.from_numpy(grey)[None],
        "(H, W) tensor": torch.from_numpy(grey),
    }
    ref_rgb = det.predict(rgb)[0].score
    ref_grey = det.predict(grey)[0].score
    assert ref_rgb != ref_grey
    for name, x in same_rgb.items():
        assert det.predict(x)[0].score == ref_rgb, name
    for name, x in same_grey.items():
        assert det.predict(x)[0].score == ref_grey, name
    # a 4-D array or tensor is a batch
    flipped = np.ascontiguousarray(rgb[:, ::-1])
    ref_flipped = det.predict(flipped)[0].score
    assert [p.score for p in det.predict(np.stack([rgb, flipped]))] == [ref_rgb, ref_flipped]
    batch = torch.stack([t, torch.from_numpy(flipped).permute(2, 0, 1)])
    assert [p.score for p in det.predict(batch)] == [ref_rgb, ref_flipped]
    p = det.predict(rgb)[0]
    assert repr(p) == (
        f"Prediction(path=None, score={p.score!r}, anomaly_map=<float32 (36, 44)>, threshold=None)"
    )


@pytest.mark.parametrize(
    ("bad", "says"),
    [
        (np.zeros((3, 20, 30), np.uint8), "channels first"),
        (np.zeros((20, 30, 2), np.uint8), "got shape (20, 30, 2)"),
        (np.zeros((0, 30, 3), np.uint8), "no pixels"),
        (np.full((20, 30), np.nan, np.float32), "NaN"),
        (np.full((20, 30), 300.0), "[0, 1] or [0, 255]"),
        (np.full((20, 30, 3), 1.02, np.float32), "reaches 1.02, just above 1"),
        (torch.full((3, 20, 30), 1.5), "reaches 1.5, just above 1"),
        (np.full((20, 30), -5, np.int16), "values 0..255, got -5..-5"),
        (np.zeros((20, 30), np.complex64), "not an image"),
        (torch.zeros(20, 30, 3, dtype=torch.uint8), "(C, H, W)"),
        (torch.zeros(20, 30, 3, dtype=torch.uint8), "channels last? tensors are channels first"),
    ],
)
def test_detector_refuses_unusable_arrays_clearly(bad, says):
    det = Detector(create_model("tiny", image_size=SIZE), device="cpu")
    with pytest.raises(ImageReadError, match=re.escape(says)):
        det.predict(bad)
    ok = np.zeros((20, 30, 3), np.uint8)  # predict_iter reports it and goes on
    out = list(det.predict_iter([bad, ok]))
    assert out[0].path == "<input 0>" and says in out[0].error
    assert out[1].anomaly_map.shape == (20, 30)


def test_lazily_opened_pil_images_that_fail_to_decode_are_failures(tmp_path):
    """PIL decodes an opened file when its pixels are first read: in the decode step, where a
    truncated file raised a bare OSError that ended the whole iteration."""
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (90, 100, 3), dtype=np.uint8)).save(tmp_path / "a.jpg")
    data = (tmp_path / "a.jpg").read_bytes()
    (tmp_path / "cut.jpg").write_bytes(data[: len(data) // 2])
    odd = Image.new("La", (30, 20))  # (a mode no conversion to RGB exists for)
    det = Detector(create_model("tiny", image_size=SIZE), device="cpu")
    with pytest.raises(ImageReadError, match="input 0 could not be decoded"):
        det.predict(Image.open(tmp_path / "cut.jpg"))
    out = list(det.predict_iter([Image.open(tmp_path / "cut.jpg"), odd, tmp_path / "a.jpg"]))
    assert [type(r).__name__ for r in out] == ["Failure", "Failure", "Prediction"]
    assert "truncated" in out[0].error and out[2].anomaly_map.shape == (90, 100)


def test_run_predict_writes_everything_and_survives_bad_files(synth, tmp_path):
    src = tmp_path / "in"
    src.mkdir()
    for p in (synth / "plate" / "test" / "good").glob("*.png"):
        (src / p.name).write_bytes(p.read_bytes())
    (src / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    det = Detector(create_model("tiny", image_size=SIZE), device="cpu", threshold=0.4)
    summary = run_predict(det, [src], tmp_path / "out", save_maps=True, progress=False)
    assert summary["n_images"] == 3 and summary["n_failed"] == 1
    assert summary["failed"][0]["path"].endswith("broken.png")
    rows = list(csv.DictReader(open(tmp_path / "out" / "predictions.csv")))
    assert len(rows) == 3 and {r["decision"] for r in rows} <= {"normal", "anomalous"}
    for r in rows:
        assert (float(r["image_score"]) >= 0.4) == (r["decision"] == "anomalous")
    maps = sorted((tmp_path / "out" / "maps").glob("*.npy"))
    assert len(maps) == 3 and np.load(maps[0]).shape == (128, 128)
    assert len(list((tmp_path / "out" / "overlays").glob("*.png"))) == 3
    assert float(rows[0]["max_pixel_score"]) == pytest.approx(
        float(np.load(maps[0]).max()), abs=1e-6
    )
    with pytest.raises(CraneError, match="already holds predictions"):
        run_predict(det, [src], tmp_path / "out", progress=False)


def _poison_dino(model, image: int):
    """A NaN in one token of one image's DINOv2 features, as an fp16 overflow would leave."""

    def hook(module, inputs, out):
        out = out.clone()
        out[image, -1, 0] = float("nan")  # a patch token (not a prefix one)
        return out

    return model.vision.dino.blocks[-1].register_forward_hook(hook)


def test_nan_scores_become_failures_not_numbers(synth, tmp_path):
    """A NaN inside the model reaches that image's score only; predict reports it as a failure
    with the fix, the other images keep their results, and nothing NaN is written."""
    model = create_model("tiny+", image_size=SIZE)
    files = sorted((synth / "plate" / "test" / "good").glob("*.png"))
    det = Detector(model, device="cpu", batch_size=3)
    clean = [r.score for r in det.predict_iter(files)]
    handle = _poison_dino(model, image=1)
    out = list(det.predict_iter(files))
    assert [type(r).__name__ for r in out] == ["Prediction", "Failure", "Prediction"]
    assert out[1].reason == "nan" and out[1].path == str(files[1])
    assert "NaN" in out[1].error and "weights" in out[1].error  # fp32: not an overflow
    assert [out[0].score, out[2].score] == [clean[0], clean[2]]
    first = re.escape(str(files[1]))
    with pytest.raises(CraneError, match=f"^{first}: the model's anomaly score is NaN") as err:
        det.predict(files)
    assert not isinstance(err.value, ImageReadError)
    summary = run_predict(det, files, tmp_path / "out", overlays=False, progress=False)
    assert summary["n_images"] == 2 and summary["failed"][0]["reason"] == "nan"
    rows = list(csv.DictReader(open(tmp_path / "out" / "predictions.csv")))
    assert all(math.isfinite(float(r["image_score"])) for r in rows)
    handle.remove()


def test_nan_score_message_names_the_setting_to_change():
    cfg = create_model("tiny+", image_size=SIZE).cfg
    assert "--dino-precision fp32" in nan_score_message(cfg, torch.bfloat16)
    off = cfg.replace(dino_attn_fp16=False)
    assert "bfloat16 autocast" in nan_score_message(off, torch.bfloat16)
    fp16 = cfg.replace(dino_fp32=False, dino_fp16=True)
    assert "DINOv2 ran in fp16" in nan_score_message(fp16, torch.bfloat16)
    assert "--dino-precision bf16" in nan_score_message(fp16, torch.bfloat16)
    assert "weights" in nan_score_message(cfg, None)


def test_evaluate_refuses_nan_scores(synth):
    model = create_model("tiny+", image_size=SIZE)
    ds = AnomalyDataset(synth, "test", image_size=SIZE)
    _poison_dino(model, image=2)
    with pytest.raises(CraneError, match="NaN .*first image: .*png, 1 in this batch"):
        evaluate(model, ds, device=torch.device("cpu"), batch_size=3, progress=False)


def test_calibration_thresholds_against_brute_force():
    rng = np.random.default_rng(3)
    scores = np.round(rng.random(200), 2)
    labels = (rng.random(200) < 0.4).astype(int)
    t, stats = f1_optimal_threshold(scores, labels)
    best = 0.0
    for c in np.unique(scores):
        pred = scores >= c
        tp = (pred & (labels == 1)).sum()
        f1 = 2 * tp / (pred.sum() + labels.sum())
        best = max(best, f1)
    assert stats["f1"] == pytest.approx(best)
    pred = scores >= t
    assert 2 * (pred & (labels == 1)).sum() / (pred.sum() + labels.sum()) == pytest.approx(best)
    for target in (0.0, 0.05, 0.2):
        t, st = fpr_threshold(scores, labels, target)
        fpr = (scores[labels == 0] >= t).mean()
        assert fpr <= target + 1e-12 and st["fpr"] == pytest.approx(fpr)
        # no lower distinct score would still satisfy the target
        lower = scores[scores < t]
        if lower.size:
            assert (scores[labels == 0] >= lower.max()).mean() > target


@pytest.mark.parametrize("seed", range(20))
def test_calibrated_thresholds_keep_a_margin_from_every_score(seed):
    """A threshold on (or one float step from) an image's score flips that image's decision
    when its score moves in the last float32 bit (another batch size): the threshold lies
    midway between the neighbouring scores, and decisions match the stated statistics for
    scores moved by far more than float32 rounding."""
    rng = np.random.default_rng(seed)
    n = int(rng.integers(4, 60))
    scores = rng.random(n).astype(np.float32)
    scores[rng.integers(0, n, n // 4)] = scores[0]  # ties
    labels = rng.random(n) < 0.5
    labels[:2] = [True, False]
    distinct = np.unique(scores.astype(np.float64))
    gap = np.diff(distinct).min() if distinct.size > 1 else 1.0
    for t, stats in (
        f1_optimal_threshold(scores, labels),
        fpr_threshold(scores, labels, 0.1),
        fpr_threshold(scores, labels, 0.0),
    ):
        margin = np.abs(scores.astype(np.float64) - t).min()
        assert margin >= gap / 2 * (1 - 1e-12)
        for jitter in (-1e-6 * gap, 0.0, 1e-6 * gap):
            pred = scores + jitter >= t
            if "f1" in stats:
                tp = (pred & labels).sum()
                assert 2 * tp / (pred.sum() + labels.sum()) == pytest.approx(stats["f1"])
            else:
                assert pred[~labels].mean() == pytest.approx(stats["fpr"])
                assert pred[labels].mean() == pytest.approx(stats["recall"])


def test_calibration_refuses_scores_it_cannot_use():
    with pytest.raises(CraneError, match="1 score\\(s\\) are NaN or infinite"):
        fpr_threshold([0.1, math.nan, 0.9, 0.8], [0, 0, 1, 1], 0.0)
    with pytest.raises(CraneError, match="NaN or infinite"):
        f1_optimal_threshold([0.1, math.inf], [0, 1])
    with pytest.raises(CraneError, match="3 scores for 4 labels"):
        f1_optimal_threshold([0.1, 0.2, 0.3], [0, 1, 0, 1])
    # A target a rounding step below 1 allows n - 1 false positives of n, not n.
    t, stats = fpr_threshold([0.1, 0.2, 0.9], [0, 0, 1], 1 - 1e-12)
    assert stats["fpr"] == 0.5 and 0.1 < t <= 0.2
    # 0.29 * 100 is 28.999999999999996 in floats: still 29 false positives of 100 allowed.
    normal = np.linspace(0.0, 0.99, 100)
    t, stats = fpr_threshold(np.r_[normal, 1.0], np.r_[np.zeros(100), 1], 0.29)
    assert stats["fpr"] == 0.29


def test_thresholds_on_one_distinct_score_keep_a_margin():
    """All calibration scores equal: no neighbour to go midway to; the threshold still sits
    clear of the score, so a float32 drift of it does not flip the decisions."""
    scores, labels = np.full(4, 0.5, np.float32), np.array([0, 1, 0, 1], bool)
    for t, flags_all in ((f1_optimal_threshold(scores, labels)[0], True),
                         (fpr_threshold(scores, labels, 0.1)[0], False)):  # fmt: skip
        assert abs(t - 0.5) >= 1e-5
        for drift in (-1e-6, 0.0, 1e-6):
            assert ((scores + np.float32(drift)) >= t).all() == flags_all


def test_paper_protocol_table():
    assert paper_protocol("mvtec", "crane+") == {
        "prompts": "official:visa",
        "map_combine": "logit_mean",
    }
    assert paper_protocol("visa", "crane") == {
        "prompts": "official:mvtec",
        "map_combine": "soft_mean",
    }
    assert paper_protocol("dagm", "crane+")["map_combine"] == "soft_mean"
    assert paper_protocol("isic", "crane+") == {
        "prompts": "official:mvtec-medical",
        "map_combine": "soft_mean",
    }
    assert paper_protocol("isic", "crane")["prompts"] == "official:mvtec"
    # --dataset takes any case and _ for -: so does the protocol (MVTec's own prompts would
    # have been used on MVTec, which they were trained on)
    for spelled, canonical in [("MVTec", "mvtec"), ("cvc_colondb", "cvc-colondb"),
                               ("HeadCT", "headct"), ("DAGM", "dagm")]:  # fmt: skip
        assert paper_protocol(spelled, "crane+") == paper_protocol(canonical, "crane+")
    assert paper_protocol("MVTec", "crane+")["prompts"] == "official:visa"


@pytest.mark.parametrize("preset", ["tiny", "tiny+"])
def test_compiled_detector_matches_eager(preset):
    """torch.compile path (inductor, CPU here) gives the eager results."""
    model = create_model(preset, image_size=SIZE)
    x = torch.randn(2, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(0))
    eager = Detector(model, device="cpu").predict_tensor(x)
    compiled = Detector(model, device="cpu", compile=True).predict_tensor(x)
    for a, b in zip(eager, compiled, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_compiled_text_features_keep_the_fp16_rounding_of_the_deep_tokens():
    """SPEC §4's quirk survives torch.compile: with image-context inference the text features
    are computed inside the compiled graph, where inductor dropped the fp16 round trip."""
    model = create_model("tiny+", image_size=SIZE, image_context_inference=True)
    with torch.no_grad():  # (deep tokens far from fp16 values: the rounding shows)
        for p in model.prompt_learner.compound_prompts_text:
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(1)) * 0.5)
        x = torch.randn(2, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(2))
        ctx = model.encode_images(x).global_feat
        eager = model.text_features(context=ctx)
        compiled = torch.compile(model.text_features)(context=ctx)
        for p in model.prompt_learner.compound_prompts_text:
            p.copy_(p.half().float())  # (what the rounding gives: the same features)
        rounded = model.text_features(context=ctx)
    torch.testing.assert_close(eager, rounded, rtol=0, atol=1e-6)
    torch.testing.assert_close(compiled, eager, rtol=0, atol=1e-6)


def test_bf16_autocast_close_to_fp32():
    """The mixed-precision path (bf16 autocast; CPU here, CUDA in production) stays within the
    accuracy guard of the speed benchmark: maps within 1e-2 of fp32."""
    model = create_model("tiny+", image_size=SIZE)
    x = torch.randn(2, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(0))
    s32, m32 = Detector(model, device="cpu").predict_tensor(x)
    s16, m16 = Detector(model, device="cpu", precision="bf16").predict_tensor(x)
    assert m16.dtype == torch.float32
    assert (m16 - m32).abs().max() <= 1e-2
    assert (s16 - s32).abs().max() <= 1e-2
    with pytest.raises(CraneError, match="fp16 needs a CUDA"):
        Detector(model, device="cpu", precision="fp16")


def test_fast_decode_for_large_jpegs_is_close_and_keeps_true_size(tmp_path):
    rng = np.random.default_rng(0)
    base = rng.integers(0, 255, (48, 64, 3), dtype=np.uint8)
    big = Image.fromarray(base).resize((2048, 1536), Image.Resampling.BICUBIC)
    big.save(tmp_path / "big.jpg", quality=92)
    model = create_model("tiny", image_size=SIZE)
    exact = Detector(model, device="cpu").predict(tmp_path / "big.jpg")[0]
    fast = Detector(model, device="cpu", fast_decode=True).predict(tmp_path / "big.jpg")[0]
    assert fast.anomaly_map.shape == exact.anomaly_map.shape == (1536, 2048)
    assert abs(fast.score - exact.score) < 1e-2
    assert np.abs(fast.anomaly_map - exact.anomaly_map).max() < 5e-2


def test_memory_mapped_feature_cache_trains_identically(synth, tmp_path):
    ds = AnomalyDataset(synth, "test", image_size=SIZE)
    weights = []
    for loc in ("ram", "mmap"):
        model = create_model("tiny", seed=111, image_size=SIZE)
        res = train(
            model,
            ds,
            tmp_path / loc,
            TrainSettings(epochs=2, batch_size=4),
            progress=False,
            device="cpu",
            cache_location=loc,
        )
        assert res.cache_location == loc
        assert not (tmp_path / loc / ".feature_cache.npy").exists()  # removed after training
        weights.append(model.prompt_learner.state_dict())
    for k in weights[0]:
        assert torch.equal(weights[0][k], weights[1][k]), k


def test_overlay_names_of_evaluate_never_collide(tmp_path):
    """VisA's specie is "" for all images, so Normal/023.JPG and Anomaly/023.JPG both became
    `_023.png` (10 of the shared VisA sample's 150 overlays were lost); Y92.jpg beside Y92.png
    likewise. Names that do not collide keep the `<specie>_<stem>` form."""
    from types import SimpleNamespace

    from crane.data.meta import Sample
    from crane.engine.evaluate import _overlay_names

    rows = [
        ("fryum/Data/Images/Normal/023.JPG", "", 0),
        ("fryum/Data/Images/Anomaly/023.JPG", "", 1),
        ("fryum/Data/Images/Anomaly/024.JPG", "", 1),
        ("brain/yes/Y92.jpg", "yes", 1),
        ("brain/yes/Y92.png", "yes", 1),
    ]
    samples = [Sample(p, "", p.split("/")[0], sp, a) for p, sp, a in rows]
    ds = SimpleNamespace(root=tmp_path, samples=samples)
    names = _overlay_names(ds)
    got = {p[len(str(tmp_path)) + 1 :]: n for p, n in names.items()}
    assert got == {
        "fryum/Data/Images/Normal/023.JPG": "Normal__023",
        "fryum/Data/Images/Anomaly/023.JPG": "Anomaly__023",
        "fryum/Data/Images/Anomaly/024.JPG": "_024",
        "brain/yes/Y92.jpg": "Y92.jpg",
        "brain/yes/Y92.png": "Y92.png",
    }


def test_overwrite_leaves_files_that_are_not_a_runs(tmp_path):
    from crane.engine.train import _remove_earlier_run, prepare_run_dir

    (tmp_path / "epoch_1").mkdir()
    (tmp_path / "epoch_1" / "notes.txt").write_text("mine")
    (tmp_path / "notes.txt").write_text("mine too")
    assert prepare_run_dir(tmp_path, resume=False, overwrite=True) is False
    _remove_earlier_run(tmp_path)  # (what --overwrite does before the new run's first save)
    assert (tmp_path / "epoch_1" / "notes.txt").is_file()
    assert (tmp_path / "notes.txt").is_file()
    # A config.json of the user's own would be written over by the new run: refused.
    (tmp_path / "config.json").write_text('{"mine": true}')
    with pytest.raises(CraneError, match="config.json not written by a crane run"):
        prepare_run_dir(tmp_path, resume=False, overwrite=True)
    assert (tmp_path / "config.json").read_text() == '{"mine": true}'


def test_a_class_named_mean_keeps_its_row_and_bounds(tmp_path):
    """A class may be called "mean": its bounds and the mean's are kept apart, and every file
    tells its row from the mean row."""
    from crane.engine.evaluate import report_markdown
    from crane.metrics import make_report

    report = make_report(
        {"mean": {"pixel_auroc": 0.9}, "Mean (all classes)": {"pixel_auroc": 0.5}},
        aupro="mvtec",
        mode="binned",
        bounds={"mean": {"pixel_auroc": 0.01}, "Mean (all classes)": {"pixel_auroc": 0.03}},
    )
    assert report.bounds["mean"]["pixel_auroc"] == 0.01  # not overwritten by the mean's
    assert report.mean_bounds["pixel_auroc"] == pytest.approx(0.02)
    files = write_report(report, tmp_path, {})
    rows = list(csv.DictReader(open(files["csv"])))
    assert [r["class"] for r in rows] == ["mean", "Mean (all classes)", "(mean (all classes))"]
    assert [float(r["pixel_auroc_bound"]) for r in rows] == pytest.approx([0.01, 0.03, 0.02])
    data = json.loads(files["json"].read_text())
    assert data["bounds"]["mean"]["pixel_auroc"] == 0.01
    assert data["mean_bounds"]["pixel_auroc"] == pytest.approx(0.02)
    assert data["mean"]["pixel_auroc"] == pytest.approx(0.7)
    md = report_markdown(report).splitlines()
    assert md[2] == "| mean | n/a | n/a | n/a | 90.0 ±1.0 | n/a | n/a |"
    assert md[4] == "| **(mean (all classes))** | n/a | n/a | n/a | 70.0 ±2.0 | n/a | n/a |"
    assert report.format_table().splitlines()[-1].startswith("(mean (all classes))")
    piped = make_report({"a|b": {"pixel_auroc": 0.5}}, aupro="mvtec")
    assert (
        report_markdown(piped).splitlines()[2] == "| a\\|b | n/a | n/a | n/a | 50.0 | n/a | n/a |"
    )


def _bounded_reports():
    """(exact, binned) reports of two classes: "edge", where the binned AUROC's estimate
    reaches its bound exactly (one normal pixel below one anomalous pixel in a bin of 4), and
    "fine", 65536 bins on a random map (a bound far below the value's printed 0.1 %)."""
    from crane.metrics import MetricAccumulator

    maps = np.full((1, 3, 6), 0.1, np.float32)
    masks = np.zeros((1, 3, 6), bool)
    maps[0, 1:, :4], masks[0, 1:, :4] = 0.9, True
    maps[0, 0, 4] = 0.55
    maps[0, 0, 5], masks[0, 0, 5] = 0.70, True
    rng = np.random.default_rng(0)
    fine = rng.random((1, 64, 64)).astype(np.float32)
    fine_masks = fine + rng.normal(0, 0.3, fine.shape) > 0.6
    exact, binned = MetricAccumulator(mode="exact"), MetricAccumulator(mode="binned", num_bins=4)
    binned_fine = MetricAccumulator(mode="binned")
    for acc in (exact, binned):
        acc.update("edge", None, [1], maps, masks)
    exact.update("fine", None, [1], fine, fine_masks)
    binned_fine.update("fine", None, [1], fine, fine_masks)
    got = binned.compute()
    got_fine = binned_fine.compute()
    got.per_class["fine"], got.bounds["fine"] = got_fine.per_class["fine"], got_fine.bounds["fine"]
    return exact.compute(), got


def test_printed_binned_ranges_hold_the_exact_values(tmp_path):
    """Every 'estimate ± bound' a binned report prints — in memory, in metrics.csv (6
    decimals) and in metrics.md (percent) — contains the exact value: bounds are rounded up,
    and the printed bound covers the printed value's rounding."""
    from crane.engine.evaluate import report_markdown

    exact, binned = _bounded_reports()
    edge = binned.bounds["edge"]["pixel_auroc"]
    assert abs(exact.per_class["edge"]["pixel_auroc"] - binned.per_class["edge"]["pixel_auroc"])
    assert edge == pytest.approx(abs(exact.per_class["edge"]["pixel_auroc"] - 0.99382716), abs=1e-8)
    files = write_report(binned, tmp_path, {})
    rows = {r["class"]: r for r in csv.DictReader(open(files["csv"]))}
    md_rows = {
        line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:-1]]
        for line in report_markdown(binned).splitlines()[2:4]
    }
    checked = 0
    for cls in ("edge", "fine"):
        for k, metric in enumerate(METRICS):
            want, bound = exact.per_class[cls][metric], binned.bounds[cls][metric]
            if not (0 < bound < math.inf):
                continue
            assert abs(want - binned.per_class[cls][metric]) <= bound, (cls, metric)
            v, b = float(rows[cls][metric]), float(rows[cls][f"{metric}_bound"])
            assert v - b <= want <= v + b, (cls, metric, rows[cls][metric], b)
            assert b <= bound + 1e-6 + 0.01 * bound  # rounded up, not inflated
            text, shown = md_rows[cls][k].split(" ±")
            assert float(text) - float(shown) <= 100 * want <= float(text) + float(shown)
            checked += 1
    assert checked >= 4
    # The random map's AUROC: its bound is far below 0.1 %, so more decimals are printed.
    fine_cell = md_rows["fine"][METRICS.index("pixel_auroc")]
    assert len(fine_cell.split(" ±")[0].split(".")[1]) >= 3


def test_calibrate_checks_the_labels_before_scoring_and_names_dataset(synth, tmp_path, capsys,
                                                                       monkeypatch):  # fmt: skip
    """F1 calibration on an all-normal split failed only after every image was scored (40
    minutes of Crane+ on a CPU for VisA's train split); an unprepared root read as the generic
    layout failed without naming --dataset."""
    import crane.engine.predict as P
    from crane.cli import main
    from crane.models import save_model

    run = save_model(create_model("tiny", image_size=SIZE), tmp_path / "run")
    scored = []
    real = P.Detector.predict_iter
    monkeypatch.setattr(
        P.Detector, "predict_iter", lambda self, paths: (scored.append(1), real(self, paths))[1]
    )
    args = ["calibrate", "--model", str(run), "--root", str(synth)]
    assert main([*args, "--split", "train", "--no-progress"]) == 2
    assert "F1 calibration needs both normal and anomalous" in capsys.readouterr().err
    assert main([*args, "--split", "train", "--mode", "fpr", "--no-progress"]) == 0
    assert scored == [1]  # (only the run that could calibrate scored its images)
    empty = tmp_path / "raw"
    (empty / "images").mkdir(parents=True)
    assert main(["calibrate", "--model", str(run), "--root", str(empty)]) == 2
    err = capsys.readouterr().err
    assert "read as the generic layout; pass --dataset NAME" in err and "Traceback" not in err


def test_evaluate_overlay_names_fit_the_file_system(synth, tmp_path):
    """An image name of 254 bytes gave an overlay name over 255: its write stopped the whole
    evaluation (no metrics), and every --resume stopped the same way."""
    import dataclasses
    import os
    import shutil
    from pathlib import Path

    from crane.data.meta import read_meta, write_meta

    root = shutil.copytree(synth, tmp_path / "data")
    meta = read_meta(root)
    good = meta["test"]["tile"][0]
    long_rel = str(Path(good.img_path).with_name("p" * 250 + ".png"))
    (root / good.img_path).rename(root / long_rel)
    meta["test"]["tile"][0] = dataclasses.replace(good, img_path=long_rel)
    write_meta(root, meta, overwrite=True)
    ds = AnomalyDataset(root, "test", image_size=SIZE)
    res = evaluate(create_model("tiny", image_size=SIZE), ds, device=torch.device("cpu"),
                   batch_size=4, progress=False, visualize_dir=tmp_path / "viz")  # fmt: skip
    assert res.n_images == 16
    names = [p.name for p in (tmp_path / "viz" / "tile").iterdir()]
    assert len(names) == 8 and max(len(os.fsencode(n)) for n in names) <= 255


def test_reports_stay_utf8_for_names_that_are_not(tmp_path):
    """A class (or root) name that is not UTF-8 stopped evaluate at its very end with a
    UnicodeEncodeError: no metrics written, and a resume failed the same way."""
    import os

    from crane.metrics import METRICS, MetricsReport

    odd = os.fsdecode(b"caf\xe9")
    values = dict.fromkeys(METRICS, 0.5)
    report = MetricsReport(per_class={odd: values}, mean=values, aupro="mvtec", mode="exact")
    files = write_report(report, tmp_path, {"root": os.fsdecode(b"/data/" + b"caf\xe9")})
    for kind in ("md", "csv"):
        assert "caf\\xe9" in files[kind].read_bytes().decode("utf-8")
    data = json.loads(files["json"].read_bytes().decode("utf-8"))
    assert data["root"] == "/data/caf\\xe9" and list(data["per_class"]) == ["caf\\xe9"]
