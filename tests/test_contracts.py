"""Contracts the README, SPEC and docstrings state, checked against independent references
(hand-written CSVs and trees, PIL's own conversions and resizes, sklearn, the README's
values): VisA's CSV and missing masks, HeadCT ids, duplicate paths, grey-alpha masks and
palette-alpha images, exact resume and divergence guards, evaluate's pixel metrics over
normal images and its resume fingerprint, calibration's stated precision and adjacent
floats, prompt-shape errors, TorchScript storage bounds, chunk alignment, CLI defaults.
(From a mutation review: each test fails for a plausible one-point bug the suite missed;
the code names in the docstrings are that review's mutation ids.)"""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch
from data_fixtures import make_mvtec_class, write_image, write_mask
from PIL import Image
from torchvision import transforms as T

from crane.data.layouts import prepare
from crane.errors import DatasetError

# --------------------------------------------------------------------------- layouts / meta


def _visa(root, rows):
    """rows: (object, split, label, stem, write_mask_file); the CSV always names the mask."""
    lines = ["object,split,label,image,mask"]
    for obj, split, label, stem, mask_file in rows:
        sub = "Normal" if label.lower() == "normal" else "Anomaly"
        img = f"{obj}/Data/Images/{sub}/{stem}.JPG"
        write_image(root / img, fmt="JPEG")
        mask = ""
        if sub == "Anomaly":
            mask = f"{obj}/Data/Masks/Anomaly/{stem}.png"
            if mask_file:
                write_mask(root / mask, value=1)
        lines.append(f"{obj},{split},{label},{img},{mask}")
    (root / "split_csv").mkdir(parents=True, exist_ok=True)
    (root / "split_csv" / "1cls.csv").write_text("\n".join(lines) + "\n")


def test_visa_mask_named_in_the_csv_but_absent_follows_the_missing_mask_policy(tmp_path):
    """L01 (layouts.py:577): a mask path the CSV names whose file is absent is a missing mask
    (policy error/skip/warn), not an index entry pointing at nothing ("files missing")."""
    _visa(tmp_path, [("pcb1", "test", "normal", "0000", False),
                     ("pcb1", "test", "anomaly", "000", True),
                     ("pcb1", "test", "anomaly", "001", False)])  # fmt: skip
    gone = "pcb1/Data/Images/Anomaly/001.JPG"
    with pytest.raises(DatasetError, match=r"anomalous images without a mask") as info:
        prepare("visa", tmp_path)
    assert gone in str(info.value)
    warn = prepare("visa", tmp_path, missing_mask="warn")
    masks = {s.img_path: s.mask_path for s in warn["test"]["pcb1"] if s.anomaly}
    assert masks == {"pcb1/Data/Images/Anomaly/000.JPG": "pcb1/Data/Masks/Anomaly/000.png",
                     gone: ""}  # fmt: skip
    skip = prepare("visa", tmp_path, missing_mask="skip")
    assert [s.img_path for s in skip["test"]["pcb1"] if s.anomaly] == [
        "pcb1/Data/Images/Anomaly/000.JPG"
    ]


def test_visa_split_and_label_are_read_without_case(tmp_path):
    """L02 (layouts.py:559): "Train"/"TEST" in the split column are the train/test splits, as
    "Normal"/"Anomaly" are labels (the code lower-cases both)."""
    _visa(tmp_path, [("pcb1", "Train", "Normal", "0000", True),
                     ("pcb1", "TEST", "normal", "0001", True),
                     ("pcb1", "Test", "Anomaly", "000", True)])  # fmt: skip
    meta = prepare("visa", tmp_path)
    assert [s.img_path for s in meta["train"]["pcb1"]] == ["pcb1/Data/Images/Normal/0000.JPG"]
    assert sorted((s.img_path, s.anomaly) for s in meta["test"]["pcb1"]) == [
        ("pcb1/Data/Images/Anomaly/000.JPG", 1),
        ("pcb1/Data/Images/Normal/0001.JPG", 0),
    ]


def test_headct_zero_padded_ids_find_unpadded_file_names(tmp_path):
    """L04 (layouts.py:760): the id 007 in labels.csv is image 7 whether the file is named
    007.png or 7.png (the code tries the unpadded number too)."""
    for name in ("7.png", "12.png"):
        write_image(tmp_path / "head_ct" / name, mode="L")
    (tmp_path / "labels.csv").write_text("id,hemorrhage\n007,1\n0012,0\n")
    meta = prepare("headct", tmp_path)
    got = {s.img_path: s.anomaly for s in meta["test"]["brain"]}
    assert got == {"head_ct/7.png": 1, "head_ct/12.png": 0}


def test_no_root_hint_when_the_root_holds_several_folders(tmp_path):
    """L05 (layouts.py:150): the "did you mean --root X?" hint is for a root holding exactly
    one folder (an archive's top folder); with several, picking the first is a guess."""
    make_mvtec_class(tmp_path / "a_copy", "bottle")
    make_mvtec_class(tmp_path / "b_other", "bottle")
    with pytest.raises(DatasetError) as info:
        prepare("mvtec", tmp_path)
    assert "did you mean" not in str(info.value)


def test_duplicates_are_found_through_dot_segments():
    """D01 (meta.py:213): ``a/./b.png`` and ``a//b.png`` name ``a/b.png``: one image listed
    twice in a split (counted twice by every metric) is a duplicate."""
    from crane.data.meta import Sample, new_meta, validate_meta

    for alias in ("bottle/test/./good/000.png", "bottle/test//good/000.png"):
        meta = new_meta()
        meta["test"]["bottle"] = [
            Sample("bottle/test/good/000.png", "", "bottle", "good", 0),
            Sample(alias, "", "bottle", "good", 0),
        ]
        with pytest.raises(DatasetError, match="duplicate entry"):
            validate_meta(meta)


def test_summary_total_row_counts_masks_not_anomalies():
    """D02 (meta.py:427): the (all) row's masks column is the number of samples with a mask;
    an anomalous image kept without one (--missing-mask warn) is not counted there."""
    from crane.data.meta import Sample, format_summary, new_meta

    meta = new_meta()
    meta["test"]["a"] = [
        Sample("a/good/0.png", "", "a", "good", 0),
        Sample("a/bad/1.png", "a/gt/1.png", "a", "bad", 1),
        Sample("a/bad/2.png", "", "a", "bad", 1),  # no mask
    ]
    meta["test"]["b"] = [Sample("b/bad/0.png", "", "b", "bad", 1)]  # no mask
    total = [line.split() for line in format_summary(meta).splitlines() if "(all)" in line]
    assert total == [["test", "(all)", "1", "3", "1"]]  # normal, anomalous, masks by hand


# --------------------------------------------------------------------------- imageio


def test_float_pixels_reaching_exactly_two_are_0_255_data(tmp_path):
    """I02 (imageio.py:93): the docstring's rule "a largest value of 2 or more: [0, 255]";
    only values strictly between 1 and 2 are refused."""
    from crane.data.imageio import image_from_array, open_image

    arr = np.array([[0.0, 1.0, 2.0]], np.float32)
    assert np.asarray(image_from_array(arr)).tolist() == [[0, 1, 2]]
    Image.fromarray(np.tile(arr, (4, 1)), mode="F").save(tmp_path / "two.tif")
    assert np.asarray(open_image(tmp_path / "two.tif"))[0].tolist() == [0, 1, 2]


def test_palette_alpha_images_are_read_as_their_rgba_equivalent():
    """I05 (imageio.py:216): a PA image (palette + alpha) is treated as the RGBA image it
    stands for: the reference pipeline on ``pa.convert("RGBA")`` (premultiplied resize, then
    RGB), not an RGB conversion before the resize (which lets hidden colours bleed)."""
    from crane.constants import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD
    from crane.data.imageio import normalize_mode
    from crane.data.transforms import image_to_tensor

    rng = np.random.default_rng(0)
    rgb = Image.fromarray(rng.integers(0, 256, (23, 31, 3), dtype=np.uint8))
    pa = rgb.convert("P").convert("PA")
    pa.putalpha(Image.fromarray(rng.integers(0, 256, (23, 31), dtype=np.uint8)))
    assert normalize_mode(pa).mode == "RGBA"
    reference = T.Compose([
        T.Resize((40, 40), interpolation=T.InterpolationMode.BICUBIC),
        T.Lambda(lambda im: im.convert("RGB")), T.ToTensor(),
        T.Normalize(OPENAI_CLIP_MEAN, OPENAI_CLIP_STD),
    ])  # fmt: skip
    assert torch.equal(image_to_tensor(pa, 40), reference(pa.convert("RGBA")))


def test_grey_alpha_masks_are_their_grey_channel(tmp_path):
    """I07 (imageio.py:270): an LA mask is binarised as the reference's ``convert("L") > 0``:
    by its grey values, never by its alpha channel."""
    from crane.data.imageio import open_mask

    grey = np.zeros((10, 12), np.uint8)
    grey[2:5, 3:7] = 255
    alpha = np.full((10, 12), 255, np.uint8)
    alpha[2:5, 3:5] = 0  # a transparent part of the defect, an opaque background
    Image.fromarray(np.stack([grey, alpha], -1), mode="LA").save(tmp_path / "la.png")
    with Image.open(tmp_path / "la.png") as im:
        assert im.mode == "LA"
        want = np.asarray(im.convert("L")) > 0
    assert np.array_equal(open_mask(tmp_path / "la.png"), want)
    assert want.sum() == 12


# --------------------------------------------------------------------------- training

SIZE = 112


def _tiny():
    from crane.models import create_model

    return create_model("tiny", seed=111, image_size=SIZE)


def test_train_resume_with_another_seed_is_refused(synth, tmp_path):
    """T01 (train.py:225): the seed draws every epoch's batch order; a resume with another
    seed would not end with the weights of an uninterrupted run (as batch size and lr)."""
    from crane.data import AnomalyDataset
    from crane.engine.train import TrainSettings, train
    from crane.errors import CraneError

    ds = AnomalyDataset(synth, "test", image_size=SIZE)
    run = tmp_path / "r"
    train(_tiny(), ds, run, TrainSettings(epochs=2, batch_size=4, seed=111), stop_after_epoch=1,
          progress=False, device="cpu")  # fmt: skip
    with pytest.raises(CraneError, match="seed=111, now seed=5"):
        train(_tiny(), ds, run, TrainSettings(epochs=2, batch_size=4, seed=5), resume=True,
              progress=False, device="cpu")  # fmt: skip


def test_an_infinite_loss_stops_training_as_nan_does(synth, tmp_path, monkeypatch):
    """T03 (train.py:662): "the loss became NaN or infinite" (TrainingDiverged's docstring):
    an infinite loss stops the run before the optimizer step."""
    import crane.engine.train as T
    from crane.data import AnomalyDataset

    real = T.crane_loss

    def infinite(*args, **kwargs):
        loss, parts = real(*args, **kwargs)
        return loss, {**parts, "loss": float("inf")}

    monkeypatch.setattr(T, "crane_loss", infinite)
    ds = AnomalyDataset(synth, "test", image_size=SIZE)
    with pytest.raises(T.TrainingDiverged, match="the loss became inf in epoch 1, step 1"):
        T.train(_tiny(), ds, tmp_path / "r", T.TrainSettings(epochs=1, batch_size=4),
                progress=False, device="cpu")  # fmt: skip


@pytest.mark.parametrize("lr", [0.0, float("nan")])
def test_train_refuses_a_learning_rate_that_is_not_positive(synth, tmp_path, lr):
    """T16 (train.py:425): "training needs ... lr > 0": lr 0 would train nothing for the whole
    run, NaN fails inside torch with another error."""
    from crane.data import AnomalyDataset
    from crane.engine.train import TrainSettings, train
    from crane.errors import CraneError

    ds = AnomalyDataset(synth, "test", image_size=SIZE)
    with pytest.raises(CraneError, match="lr > 0"):
        train(_tiny(), ds, tmp_path / "r", TrainSettings(epochs=1, batch_size=4, lr=lr),
              progress=False, device="cpu")  # fmt: skip


# --------------------------------------------------------------------------- evaluation

EVAL_SIZE = 56


def test_evaluate_pixel_auroc_counts_the_normal_images_pixels(synth):
    """E09 (evaluate.py:265): pixel metrics run over every test image whose pixels' truth is
    known: the normal images (all pixels normal) included. Reference: sklearn over the maps
    the model gives image by image and the dataset's masks."""
    from sklearn.metrics import roc_auc_score

    from crane.data import AnomalyDataset
    from crane.engine.evaluate import evaluate
    from crane.models import create_model

    model = create_model("tiny+", image_size=EVAL_SIZE, seed=0)
    ds = AnomalyDataset(synth, "test", image_size=EVAL_SIZE)
    report = evaluate(model, ds, device="cpu", batch_size=4, progress=False).report
    maps, masks = {}, {}
    model.eval()
    with torch.no_grad():
        for i, s in enumerate(ds.samples):
            item = ds[i]
            m = model(item["image"][None]).anomaly_maps[0]
            maps.setdefault(s.cls_name, []).append(m.double().flatten().numpy())
            masks.setdefault(s.cls_name, []).append(item["mask"][0].flatten().numpy() > 0.5)
    assert any(not s.anomaly for s in ds.samples)
    for cls in maps:
        want = roc_auc_score(np.concatenate(masks[cls]), np.concatenate(maps[cls]))
        assert report.per_class[cls]["pixel_auroc"] == pytest.approx(want, abs=1e-4), cls


def test_evaluate_resume_refuses_a_dataset_whose_labels_changed(synth, tmp_path, monkeypatch):
    """E05 (evaluate.py:179): a resume must find the same labels: a normal image relabelled
    anomalous (no mask: an image-level label) changes the finished classes' image metrics."""
    import dataclasses

    from test_evaluate_resume import count_forwards

    from crane.data import AnomalyDataset
    from crane.engine.evaluate import evaluate
    from crane.errors import CraneError
    from crane.models import create_model

    model = create_model("tiny+", image_size=EVAL_SIZE, seed=0)
    ds = AnomalyDataset(synth, "test", image_size=EVAL_SIZE)
    path = tmp_path / "progress.jsonl"
    kw = dict(device=torch.device("cpu"), batch_size=4, progress=False)
    count_forwards(monkeypatch, stop_at=4)  # tile finished and recorded, plate not
    with pytest.raises(KeyboardInterrupt):
        evaluate(model, ds, progress_file=path, **kw)
    flip = next(i for i, s in enumerate(ds.samples) if s.cls_name == "tile" and not s.anomaly)
    relabelled = AnomalyDataset(synth, "test", image_size=EVAL_SIZE)
    relabelled.samples = list(ds.samples)
    relabelled.samples[flip] = dataclasses.replace(ds.samples[flip], anomaly=1)
    count_forwards(monkeypatch)
    with pytest.raises(CraneError, match="started with other dataset images"):
        evaluate(model, relabelled, progress_file=path, resume=True, **kw)


# --------------------------------------------------------------------------- calibration


def test_f1_calibration_states_the_precision_and_recall_of_its_threshold():
    """C01 (calibrate.py:63): the stated precision/recall/F1 are those of ``score >= t``
    (sklearn's, on the decisions the threshold makes)."""
    from sklearn.metrics import f1_score, precision_score, recall_score

    from crane.engine.calibrate import f1_optimal_threshold

    rng = np.random.default_rng(7)
    labels = rng.random(300) < 0.3
    scores = np.round(rng.random(300) * 0.6 + labels * 0.3, 3)
    t, stats = f1_optimal_threshold(scores, labels)
    pred = scores >= t
    assert stats["precision"] == pytest.approx(precision_score(labels, pred))
    assert stats["recall"] == pytest.approx(recall_score(labels, pred))
    assert stats["f1"] == pytest.approx(f1_score(labels, pred))
    assert stats["precision"] != pytest.approx(stats["recall"])  # (the data tells them apart)


def test_a_threshold_between_adjacent_floats_separates_them():
    """C02 (calibrate.py:43): two scores one float step apart have no midpoint; the threshold
    must still flag the higher and not the lower (the midpoint rounds onto the lower one)."""
    from crane.engine.calibrate import f1_optimal_threshold, fpr_threshold

    lo = 0.5
    hi = float(np.nextafter(lo, 1.0))
    scores, labels = np.array([lo, hi]), np.array([0, 1])
    t, stats = f1_optimal_threshold(scores, labels)
    assert stats["f1"] == 1.0 and (scores >= t).tolist() == [False, True]
    t, stats = fpr_threshold(scores, labels, 0.0)
    assert stats["fpr"] == 0.0 and (scores >= t).tolist() == [False, True]


# --------------------------------------------------------------------------- weights


def test_prompts_of_another_shape_or_with_extra_keys_are_checkpoint_errors():
    """P01/P04 (checkpoint.py:48, :54): a prompt state that does not fit is one
    CheckpointError naming the key (not torch's RuntimeError from load_state_dict)."""
    from crane.errors import CheckpointError
    from crane.models import create_model

    sd = {k: v.clone() for k, v in _tiny().prompt_learner.state_dict().items()}
    key = next(k for k, v in sd.items() if v.ndim >= 1)
    wrong = dict(sd)
    wrong[key] = torch.zeros(*sd[key].shape[:-1], sd[key].shape[-1] + 1)
    with pytest.raises(CheckpointError, match=re.escape(f"{key} has shape")):
        create_model("tiny", seed=111, image_size=SIZE, prompts=wrong)
    extra = {**sd, "ctx_extra": torch.zeros(2)}
    with pytest.raises(CheckpointError, match="unexpected ctx_extra"):
        create_model("tiny", seed=111, image_size=SIZE, prompts=extra)


def test_a_view_one_element_past_its_storage_is_refused(tmp_path, monkeypatch):
    """S01 (torchscript.py:115): a tensor whose last element is the one just past its storage
    (offset 1, 4 elements, in a storage of 4) is refused, stored or deflated."""
    import zipfile

    from test_torchscript import _crafted, _Obj, _one, _Stored, _Tensor

    from crane.errors import WeightsError
    from crane.models import weights as W

    for compress in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED):
        root = _Obj({"p": _Tensor(_Stored("0", 4), 1, (4,), (1,))})
        path = _crafted(tmp_path, monkeypatch, root, _one(4), compress=compress)
        with pytest.raises(WeightsError) as info:
            W.load_state_dict_file(path)
        assert "past the end of its storage" in str(info.value.__cause__)


# --------------------------------------------------------------------------- batching, files


def test_undecoded_images_first_met_after_decoded_ones_keep_the_rows_aligned():
    """B05 (batching.py:145): the first chunk holds decoded images only, a later one the first
    undecoded (JPEG) sample while samples of the first are still pending: every batch's
    image rows still belong to its samples."""
    from test_batching import _flatten, _Items, _reference, _same

    from crane.data import collate_skip_none
    from crane.engine.batching import ChunkedBatches

    ds = _Items(8, (), (2,))
    batches = list(ChunkedBatches(ds, 4, 2, collate_skip_none))  # chunks of 2 samples
    assert [len(b["path"]) for b in batches] == [4, 4]
    want = [dict(b, jpeg=b.get("jpeg", [None])) for b in _reference(ds)]
    for w in want:
        w.setdefault("image", None)
    _same(_flatten(batches), _flatten(want))


def test_names_of_exactly_the_limit_are_kept():
    """F02 (files.py:77): "``name`` unchanged if it takes at most ``limit`` bytes"."""
    from crane.files import fit_file_name

    for name in ("a" * 200, "é" * 100, "x" * 199):
        assert fit_file_name(name) == name
    assert fit_file_name("a" * 201) != "a" * 201


# --------------------------------------------------------------------------- CLI defaults


def test_train_defaults_are_the_readmes():
    """K01/K09 (pipelines.py _TRAIN_DEFAULTS): README: "the dataset's test split, 5 epochs,
    Adam lr 1e-3, ..., batch 8, seed 111", preset crane+, fp32."""
    from crane.cli import build_parser
    from crane.cli.pipelines import _train_defaults

    args = build_parser().parse_args(["train", "--dataset", "mvtec", "--root", "r", "--out", "o"])
    _train_defaults(args)
    got = (args.split, args.preset, args.epochs, args.lr, args.seed, args.batch_size,
           args.precision)  # fmt: skip
    assert got == ("test", "crane+", 5, 1e-3, 111, 8, "fp32")


def test_calibrate_fpr_target_defaults_to_five_percent(tmp_path, monkeypatch):
    """K02 (pipelines.py:732): README: "--target-fpr (default 0.05)"."""
    import crane.cli.pipelines as P
    from crane.cli import build_parser
    from crane.models import save_model

    run = tmp_path / "run"
    save_model(_tiny(), run)
    seen = []
    monkeypatch.setattr(P, "_calibrate", lambda args, device, target: seen.append(target) or 0)
    args = build_parser().parse_args(
        ["calibrate", "--model", str(run), "--root", str(tmp_path), "--mode", "fpr",
         "--device", "cpu"]
    )  # fmt: skip
    assert args.func(args) == 0
    assert seen == [0.05]


def test_cli_refuses_an_infinite_learning_rate_up_front(tmp_path, capsys):
    """K10 (pipelines.py:357): --lr inf is refused before any work, as --lr 0 and nan are
    (not after encoding the whole training set, when the first step diverges)."""
    from crane.cli import main

    argv = ["train", "--dataset", "mvtec", "--root", str(tmp_path), "--out", str(tmp_path / "o"),
            "--device", "cpu", "--lr"]  # fmt: skip
    for bad in ("inf", "0", "nan"):
        assert main([*argv, bad]) == 2
        assert f"--lr {float(bad)} is out of range" in capsys.readouterr().err
