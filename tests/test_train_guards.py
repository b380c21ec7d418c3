"""What training refuses or reports: a resume that would mix data, backbones or precisions,
divergence, damaged run files, label-less sets, two runs into one folder, leftovers."""

from __future__ import annotations

import dataclasses
import json
import logging
import shutil
import threading

import numpy as np
import pytest
import torch

import crane.engine.train as T
from crane.data import AnomalyDataset
from crane.engine.train import TrainSettings, train
from crane.errors import CraneError
from crane.models import create_model

SIZE = 112


def _run(
    root, run, *, epochs=2, stop=None, resume=False, model=None, amp=None, overwrite=False, **kw
):
    model = model or create_model("tiny", seed=111, image_size=SIZE)
    ds = kw.pop("ds", None) or AnomalyDataset(root, "test", image_size=SIZE, **kw)
    return train(
        model, ds, run, TrainSettings(epochs=epochs, batch_size=4), progress=False,
        resume=resume, stop_after_epoch=stop, device="cpu", autocast_dtype=amp,
        overwrite=overwrite,
    )  # fmt: skip


@pytest.fixture
def copy_of(synth, tmp_path):
    def make(name="data"):
        return shutil.copytree(synth, tmp_path / name)

    return make


def test_resume_refuses_other_images_backbone_or_precision(copy_of, tmp_path):
    """Each was accepted silently (same image count): the resumed model mixed two datasets,
    two backbones or two encodings, and its config.json named only the last. A byte-identical
    copy of the data elsewhere (staged to a node's disk) resumes."""
    data = copy_of()
    run = tmp_path / "run"
    _run(data, run, stop=1)
    with pytest.raises(CraneError, match=r"the images differ .*class order: --classes"):
        _run(data, run, resume=True, classes=["plate", "tile"])
    with pytest.raises(CraneError, match="its features were encoded in fp32, now in bf16"):
        _run(data, run, resume=True, amp=torch.bfloat16)
    seven = create_model("tiny", seed=7, image_size=SIZE)  # another random backbone
    with pytest.raises(CraneError, match="frozen backbone weights differ"):
        _run(data, run, resume=True, model=seven)
    staged = copy_of("staged")  # the same files under another root
    _run(staged, run, resume=True)
    from PIL import Image

    mask = sorted((data / "tile" / "ground_truth").rglob("*.png"))[0]
    saved = mask.read_bytes()
    pixels = np.asarray(Image.open(mask)).copy()
    pixels[:, : pixels.shape[1] // 2] = 0  # another valid mask, its file maybe the same size
    Image.fromarray(pixels).save(mask)
    with pytest.raises(CraneError, match="files changed since it trained on them"):
        _run(data, run, epochs=3, resume=True)
    mask.write_bytes(saved)
    changed = sorted((data / "tile" / "test" / "good").iterdir())[0]
    changed.write_bytes(changed.read_bytes() + b"\0")  # an image changed on disk
    with pytest.raises(CraneError, match="files changed since it trained on them"):
        _run(data, run, epochs=3, resume=True)


def test_divergence_stops_with_a_message_and_saves_no_nan(synth, tmp_path, monkeypatch, caplog):
    """The loss turns NaN in epoch 2: the run stops before that step, keeps epoch 1 (finite,
    strict JSON) and does not suggest --resume, which would diverge again."""
    real = T.crane_loss
    calls = []

    def nan_in_epoch_2(*args, **kw):
        loss, parts = real(*args, **kw)
        calls.append(1)
        if len(calls) > 4:  # (4 steps an epoch: 16 images, batch 4)
            parts = {**parts, "loss": float("nan")}
        return loss, parts

    monkeypatch.setattr(T, "crane_loss", nan_in_epoch_2)
    run = tmp_path / "r"
    with pytest.raises(CraneError, match=r"diverged: the loss became nan in epoch 2, step 1") as e:
        with caplog.at_level(logging.WARNING):
            _run(synth, run, epochs=3)
    assert "start a new run with a lower --lr" in str(e.value) and "epoch_1" in str(e.value)
    assert "--resume" not in caplog.text and "nothing to resume" not in caplog.text
    assert json.loads((run / "resume.json").read_text())["epochs_done"] == 1
    assert not (run / "epoch_2").exists()
    prompts = create_model(str(run / "epoch_1")).prompt_learner.state_dict()
    assert all(torch.isfinite(t).all() for t in prompts.values())

    def refuse(constant):
        raise AssertionError(f"a file holds {constant}")

    files = [*run.rglob("*.json"), run / "train_log.jsonl"]
    for f in files:
        for line in f.read_text().splitlines() if f.suffix == ".jsonl" else [f.read_text()]:
            json.loads(line, parse_constant=refuse)
    assert len(files) >= 4
    # a real divergence, as the optimizer takes it: also refused, nothing saved
    model = create_model("tiny", seed=111, image_size=SIZE)
    ds = AnomalyDataset(synth, "test", image_size=SIZE)
    monkeypatch.setattr(T, "crane_loss", real)
    with pytest.raises(CraneError, match="training diverged"):
        train(model, ds, tmp_path / "r2", TrainSettings(epochs=3, batch_size=4, lr=1e30),
              progress=False, device="cpu")  # fmt: skip


@pytest.mark.parametrize(
    "damage",
    ["resume.json truncated", "resume.json without scalars", "optimizer truncated",
     "prompts truncated"],
)  # fmt: skip
def test_damaged_run_files_are_one_message(synth, tmp_path, damage):
    run = tmp_path / "run"
    _run(synth, run, stop=1)
    resume = run / "resume.json"
    if damage == "resume.json truncated":
        resume.write_text(resume.read_text()[:40])
    elif damage == "resume.json without scalars":
        meta = json.loads(resume.read_text())
        del meta["scalars"]
        resume.write_text(json.dumps(meta))
    else:
        f = (
            run
            / "epoch_1"
            / (
                "optimizer.safetensors"
                if damage == "optimizer truncated"
                else "prompts.safetensors"
            )
        )
        f.write_bytes(f.read_bytes()[:20])
    with pytest.raises(CraneError, match=f"cannot resume {run}: .*"):
        _run(synth, run, resume=True)


def test_a_damaged_prompt_file_is_a_checkpoint_error(synth, tmp_path):
    from crane.errors import CheckpointError

    run = tmp_path / "run"
    _run(synth, run, epochs=1)
    f = run / "prompts.safetensors"
    f.write_bytes(f.read_bytes()[:20])
    with pytest.raises(CheckpointError, match="is not a readable safetensors file"):
        create_model(str(run))


def test_a_training_set_without_anomalies_is_refused(synth, tmp_path):
    ds = AnomalyDataset(synth, "train", image_size=SIZE)  # MVTec-style train: all normal
    with pytest.raises(CraneError, match="the train split to train on has no anomalous image"):
        train(create_model("tiny", image_size=SIZE), ds, tmp_path / "r", progress=False,
              device="cpu")  # fmt: skip
    assert not (tmp_path / "r").exists()  # refused before anything was made


def test_a_run_that_fails_before_its_first_epoch_leaves_no_folder(synth, tmp_path, caplog):
    """Nor the parent folders it made for it."""

    class Breaks(torch.utils.data.Dataset):
        def __init__(self, ds):
            self.ds, self.samples, self.root = ds, ds.samples, ds.root

        def __len__(self):
            return len(self.ds)

        def __getitem__(self, i):
            raise OSError("disk gone")

    ds = AnomalyDataset(synth, "test", image_size=SIZE)
    with pytest.raises(OSError), caplog.at_level(logging.WARNING):
        train(create_model("tiny", image_size=SIZE), Breaks(ds), tmp_path / "a" / "b" / "r",
              progress=False, device="cpu")  # fmt: skip
    assert "stopped before the first epoch was saved: nothing to resume" in caplog.text
    assert "--resume" not in caplog.text
    assert not (tmp_path / "a").exists()
    kept = tmp_path / "kept"  # a folder that was there stays
    kept.mkdir()
    with pytest.raises(OSError):
        train(create_model("tiny", image_size=SIZE), Breaks(ds), kept, progress=False,
              device="cpu")  # fmt: skip
    assert kept.is_dir()


def test_a_second_training_into_a_live_run_is_refused(synth, tmp_path, monkeypatch):
    run = tmp_path / "run"
    inside, leave = threading.Event(), threading.Event()
    real = T.FeatureCache.build

    def slow_build(*a, **kw):
        inside.set()
        leave.wait(30)
        return real(*a, **kw)

    monkeypatch.setattr(T.FeatureCache, "build", slow_build)
    first = threading.Thread(target=lambda: _run(synth, run, epochs=1))
    first.start()
    try:
        assert inside.wait(30)
        for kwargs in ({}, {"resume": True}):
            with pytest.raises(CraneError, match="another crane train or calibrate is writing"):
                _run(synth, run, epochs=1, **kwargs)
        with pytest.raises(CraneError, match="another crane train"):
            ds = AnomalyDataset(synth, "test", image_size=SIZE)
            train(create_model("tiny", image_size=SIZE), ds, run, overwrite=True, progress=False,
                  device="cpu")  # fmt: skip
    finally:
        leave.set()
        first.join(60)
    assert (run / "prompts.safetensors").is_file()
    _run(synth, run, epochs=2, resume=True)  # the lock file it keeps is no obstacle


def test_leftovers_of_a_killed_run_do_not_block_a_new_one(synth, tmp_path):
    """A killed run's lock file and memory-mapped cache are not a run: a new run into the
    folder goes ahead (it said 'not empty' while `--resume` said 'no interrupted run')."""
    run = tmp_path / "run"
    run.mkdir()
    (run / ".train.lock").write_text("")
    (run / ".feature_cache.npy").write_bytes(b"\0" * 64)
    _run(synth, run, epochs=1)
    assert not (run / ".feature_cache.npy").exists()


def test_the_memory_mapped_cache_leaves_the_folder_at_once(synth, tmp_path, monkeypatch):
    seen = []
    real = T._epochs

    def spy(model, cache, run_dir, *a, **kw):
        seen.append(sorted(p.name for p in run_dir.iterdir()))
        return real(model, cache, run_dir, *a, **kw)

    monkeypatch.setattr(T, "_epochs", spy)
    model = create_model("tiny", seed=111, image_size=SIZE)
    ds = AnomalyDataset(synth, "test", image_size=SIZE)
    train(model, ds, tmp_path / "r", TrainSettings(epochs=1, batch_size=4), progress=False,
          device="cpu", cache_location="mmap")  # fmt: skip
    assert seen and ".feature_cache.npy" not in seen[0]  # (while the features are in use)


def test_resume_and_overwrite_together_are_refused(synth, tmp_path):
    with pytest.raises(CraneError, match="pick one"):
        train(create_model("tiny", image_size=SIZE), AnomalyDataset(synth, "test", image_size=SIZE),
              tmp_path / "r", resume=True, overwrite=True, progress=False)  # fmt: skip


def test_overwrite_removes_a_half_written_epoch_folder(synth, tmp_path):
    run = tmp_path / "run"
    _run(synth, run, epochs=1)
    half = run / "epoch_4"
    half.mkdir()
    shutil.copy(run / "epoch_1" / "prompts.safetensors", half / "prompts.safetensors")
    (half / ".config.json.abc.tmp").write_text("{")
    mine = run / "epoch_9"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    model = create_model("tiny", seed=111, image_size=SIZE)
    ds = AnomalyDataset(synth, "test", image_size=SIZE)
    train(model, ds, run, TrainSettings(epochs=1, batch_size=4), overwrite=True, progress=False,
          device="cpu")  # fmt: skip
    assert not half.exists() and (mine / "notes.txt").is_file()


def test_overwrite_keeps_what_a_user_put_in_an_epoch_folder(synth, tmp_path):
    """--overwrite removes an earlier run's checkpoint files, not the folder they are in:
    an evaluation written into epoch_2/ and notes stay (rmtree deleted them)."""
    run = tmp_path / "run"
    _run(synth, run, epochs=2)
    (run / "epoch_2" / "eval").mkdir()
    (run / "epoch_2" / "eval" / "metrics.json").write_text("{}")
    (run / "epoch_2" / "NOTES.txt").write_text("my notes")
    _run(synth, run, epochs=1, overwrite=True)
    assert sorted(p.name for p in (run / "epoch_2").iterdir()) == ["NOTES.txt", "eval"]
    assert (run / "epoch_2" / "eval" / "metrics.json").read_text() == "{}"
    assert (run / "epoch_1" / "config.json").is_file()  # the new run's


@pytest.mark.parametrize("mine", ["config.json", "prompts.safetensors", "both"])
def test_overwrite_refuses_to_write_over_a_users_own_config_or_prompts(synth, tmp_path, mine):
    run = tmp_path / "run"
    run.mkdir()
    names = ["config.json", "prompts.safetensors"] if mine == "both" else [mine]
    for name in names:
        (run / name).write_text('{"my": "experiment settings"}')
    (run / "notes.txt").write_text("notes")
    with pytest.raises(CraneError, match=r"--overwrite: .* not written by a crane run") as err:
        _run(synth, run, epochs=1, overwrite=True)
    assert " and ".join(names) in str(err.value)
    for name in names:
        assert (run / name).read_text() == '{"my": "experiment settings"}'
    if mine == "both":  # a crane run's own files are replaced as before
        other = tmp_path / "other"
        _run(synth, other, epochs=1)
        _run(synth, other, epochs=1, overwrite=True)


def test_overwrite_takes_a_run_killed_between_its_models_two_writes(synth, tmp_path):
    """A kill between the first save's prompts.safetensors and config.json leaves the
    prompts alone beside a complete epoch_1/: still the run's, not refused as a user's."""
    run = tmp_path / "run"
    _run(synth, run, epochs=1)
    for name in ("config.json", "resume.json", "train_log.jsonl"):
        (run / name).unlink(missing_ok=True)
    assert (run / "prompts.safetensors").is_file() and (run / "epoch_1" / "config.json").is_file()
    assert T._foreign_run_files(run) == []
    (run / "epoch_1" / "config.json").write_text('{"mine": 1}')  # not a crane checkpoint
    assert T._foreign_run_files(run) == ["prompts.safetensors"]


def test_an_unknown_dataset_name_is_refused_also_with_a_meta_json(synth):
    from crane.engine.common import open_dataset

    with pytest.raises(CraneError, match="nosuch"):
        open_dataset(synth, "nosuch", "test", SIZE)


def test_cli_resume_takes_the_runs_options(synth, tmp_path, capsys):
    """`crane train --out RUN --resume` alone continues a run: every option not given is
    the run's (it built the default crane+ and asked for its weights); one given that
    differs is refused as before."""
    from crane.cli import main

    run = str(tmp_path / "run")
    link = tmp_path / "data"  # a root through a symlink (/tmp on macOS): its own run resumes
    link.symlink_to(synth)
    args = ["train", "--dataset", "mvtec", "--root", str(link), "--preset", "tiny",
            "--image-size", str(SIZE), "--batch-size", "4", "--lr", "2e-3", "--seed", "5",
            "--precision", "bf16", "--classes", "plate", "tile", "--no-progress",
            "--out", run]  # fmt: skip
    assert main([*args, "--epochs", "2"]) == 0
    full = create_model(run)
    assert main([*args, "--epochs", "1", "--overwrite"]) == 0
    capsys.readouterr()
    assert main(["train", "--out", run, "--resume", "--epochs", "2", "--no-progress"]) == 0
    assert "epoch 2: loss" in capsys.readouterr().out
    resumed = create_model(run)
    assert torch.equal(full.prompt_learner.ctx_pos, resumed.prompt_learner.ctx_pos)
    assert main(["train", "--out", run, "--resume", "--epochs", "3", "--lr", "1e-3"]) == 2
    assert "it was trained with lr=0.002, now lr=0.001" in capsys.readouterr().err
    assert main(["train", "--out", run, "--resume", "--epochs", "2"]) == 0
    assert "already holds 2 epochs: nothing to train" in capsys.readouterr().out
    assert main(["train", "--out", str(tmp_path / "new")]) == 2
    assert "crane train needs --dataset and --root" in capsys.readouterr().err
    # a run saved before runs recorded their precision: a bare resume needs --precision
    resume = tmp_path / "run" / "resume.json"
    meta = json.loads(resume.read_text())
    del meta["fingerprint"]
    resume.write_text(json.dumps(meta))
    assert main(["train", "--out", run, "--resume", "--epochs", "3"]) == 2
    assert "pass the --precision it was trained with" in capsys.readouterr().err


def test_calibrate_is_refused_while_a_training_writes_the_run(copy_of, tmp_path, caplog):
    """Its threshold, reported as stored, was replaced by the training's next epoch; a
    training resumed after a calibration says that it drops the threshold."""
    import fcntl

    from crane.cli import main
    from crane.models.checkpoint import update_threshold

    data, run = copy_of(), tmp_path / "run"
    _run(data, run, stop=1)
    argv = ["calibrate", "--model", str(run), "--root", str(data), "--no-progress"]
    with open(run / T._RunLock.NAME, "a") as held:
        fcntl.flock(held, fcntl.LOCK_EX)  # (a training's lock)
        assert main(argv) == 2
    assert json.loads((run / "config.json").read_text())["image_threshold"] is None
    with caplog.at_level(logging.WARNING):
        assert main(argv) == 0  # (the interrupted run: calibrated, with a warning)
    assert "after epoch 1 of 2 (an interrupted training)" in caplog.text
    assert json.loads((run / "config.json").read_text())["image_threshold"] is not None
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        _run(data, run, resume=True)
    assert "run crane calibrate again" in caplog.text
    update_threshold(run, 0.5, {"mode": "f1"})
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        _run(data, run, resume=True)  # (nothing left to train: the threshold stays)
    assert "calibrate again" not in caplog.text
    assert json.loads((run / "config.json").read_text())["image_threshold"] == 0.5


def test_resume_with_another_image_size_names_it(copy_of, tmp_path):
    """(It said the frozen backbone weights differ: the position embedding is resized.)"""
    data, run = copy_of(), tmp_path / "run"
    _run(data, run, stop=1)
    small = create_model("tiny", seed=111, image_size=56)
    ds = AnomalyDataset(data, "test", image_size=56)
    with pytest.raises(CraneError, match="image_size: 112 → 56"):
        _run(data, run, resume=True, model=small, ds=ds)


# ---------------------------------------------------------------- 27th-session review


def test_a_calibrated_models_threshold_is_not_carried_into_trained_prompts(synth, tmp_path, caplog):
    """Training from a calibrated run (``create_model(RUN)``, ``crane train --preset RUN``)
    kept its threshold in every new epoch and the new top-level model, and predict then
    decided with it; the warning said it was dropped."""
    from crane.models.checkpoint import update_threshold

    base = tmp_path / "base"
    _run(synth, base, epochs=1)
    update_threshold(base, 0.2756, {"how": "test"})
    calibrated = create_model(str(base))
    assert calibrated.image_threshold == pytest.approx(0.2756)
    with caplog.at_level(logging.WARNING):
        _run(synth, tmp_path / "ft", epochs=1, model=calibrated)
    assert "image threshold (0.2756) was calibrated on its prompts before this" in caplog.text
    for where in (tmp_path / "ft", tmp_path / "ft" / "epoch_1"):
        assert json.loads((where / "config.json").read_text())["image_threshold"] is None
    assert create_model(str(tmp_path / "ft")).image_threshold is None
    # Resumed through the API from the calibrated run itself: dropped as well.
    _run(synth, tmp_path / "cut", epochs=2, stop=1)
    update_threshold(tmp_path / "cut", 0.5, {"how": "test"})
    _run(synth, tmp_path / "cut", epochs=2, resume=True, model=create_model(str(tmp_path / "cut")))
    assert json.loads((tmp_path / "cut" / "config.json").read_text())["image_threshold"] is None
    # A run already trained as far as asked keeps its own calibration (nothing retrained).
    update_threshold(tmp_path / "cut", 0.5, {"how": "test"})
    model = create_model(str(tmp_path / "cut"))
    _run(synth, tmp_path / "cut", epochs=2, resume=True, model=model)
    assert model.image_threshold == 0.5


def test_resume_on_another_subset_of_the_same_size_is_refused(synth, tmp_path):
    from torch.utils.data import Subset

    ds = AnomalyDataset(synth, "test", image_size=SIZE)
    n = len(ds)
    first, other = Subset(ds, list(range(0, n - 4))), Subset(ds, list(range(4, n)))
    _run(synth, tmp_path / "run", stop=1, ds=first)
    with pytest.raises(CraneError, match="the images differ"):
        _run(synth, tmp_path / "run", resume=True, ds=other)
    # Nested subsets pick through each other: the same samples resume.
    nested = Subset(Subset(ds, list(range(n))), list(range(0, n - 4)))
    assert T._samples_and_root(nested)[0] == T._samples_and_root(first)[0]
    _run(synth, tmp_path / "run", resume=True, ds=nested)


def test_overwrite_keeps_the_earlier_run_until_the_new_one_saves(synth, tmp_path, caplog):
    """--overwrite removed the earlier run before encoding: a new run that failed there (a
    corrupt image, Ctrl-C) left nothing."""
    run = tmp_path / "run"
    _run(synth, run, epochs=1)
    before = sorted(p.name for p in run.iterdir())
    model = create_model("tiny", seed=111, image_size=SIZE)

    def broken(*args, **kwargs):
        raise KeyboardInterrupt

    ds = AnomalyDataset(synth, "test", image_size=SIZE)
    with caplog.at_level(logging.WARNING), pytest.raises(KeyboardInterrupt):
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(T.FeatureCache, "build", broken)
            train(model, ds, run, TrainSettings(epochs=1, batch_size=4), progress=False,
                  overwrite=True, device="cpu")  # fmt: skip
    assert sorted(p.name for p in run.iterdir()) == before
    assert "the earlier run in" in caplog.text and "is left as it was" in caplog.text
    assert "nothing to resume" not in caplog.text
    # Once the new run saves, the earlier run's epochs are gone.
    (run / "epoch_7").mkdir()
    shutil.copytree(run / "epoch_1", run / "epoch_7", dirs_exist_ok=True)
    train(model, ds, run, TrainSettings(epochs=1, batch_size=4), progress=False,
          overwrite=True, device="cpu")  # fmt: skip
    assert not (run / "epoch_7").exists() and (run / "epoch_1").is_dir()
    assert json.loads((run / "resume.json").read_text())["epochs_done"] == 1


def test_an_old_format_run_killed_while_saving_after_a_resume_resumes_exactly(synth, tmp_path):
    """Runs saved before the epoch folders held the optimizer state: this crane rewrites the
    top-level model before resume.json, so after a crash between the two the top level holds
    the next epoch's prompts, which the resume paired with the earlier optimizer state."""
    from unittest import mock

    full = create_model("tiny", seed=111, image_size=SIZE)
    _run(synth, tmp_path / "full", epochs=3, model=full)
    old = tmp_path / "old"
    _run(synth, old, epochs=3, stop=1)
    (old / "epoch_1" / "optimizer.safetensors").rename(old / "resume.safetensors")

    def killed(*args, **kwargs):
        raise KeyboardInterrupt

    with mock.patch.object(T, "_save_resume", killed), pytest.raises(KeyboardInterrupt):
        _run(synth, old, epochs=3, resume=True)
    assert json.loads((old / "resume.json").read_text())["epochs_done"] == 1
    resumed = create_model("tiny", seed=111, image_size=SIZE)
    _run(synth, old, epochs=3, resume=True, model=resumed)
    for (k, a), (_, b) in zip(
        full.prompt_learner.state_dict().items(),
        resumed.prompt_learner.state_dict().items(),
        strict=True,
    ):
        assert torch.equal(a, b), k


def test_seeds_of_any_size_and_the_folder_message(synth, tmp_path):
    """A timestamp as --seed overflowed torch's generator after the whole encoding pass;
    seeds in torch's range keep their epoch order (runs resume across versions)."""
    big = 1_732_700_000_000_000_000
    order = T._epoch_order(10, big, 3)
    assert sorted(order.tolist()) == list(range(10))
    expected = torch.randperm(
        10, generator=torch.Generator().manual_seed((big * 1_000_003 + 3) % 2**64)
    )
    assert torch.equal(order, expected)
    small = torch.randperm(10, generator=torch.Generator().manual_seed(111 * 1_000_003 + 2))
    assert torch.equal(T._epoch_order(10, 111, 2), small)
    # A folder with files but no resume state: --resume would say there is nothing to resume.
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "epoch_1").mkdir()
    with pytest.raises(
        CraneError, match=r"holds no run to resume \(resume.json missing\); pass --overwrite"
    ):
        T.prepare_run_dir(tmp_path / "run", resume=False, overwrite=False)


def test_set_multiplicity_below_one_is_refused():
    from crane.config import CraneConfig

    for bad in (0, -4):
        with pytest.raises(CraneError, match="train_set_multiplicity .* must be >= 1"):
            CraneConfig().replace(train_set_multiplicity=bad)


def test_multi_layer_sets_counted_several_times_are_named(synth, tmp_path, caplog):
    model = create_model("tiny", seed=111, image_size=SIZE, feature_layers=(3, 4))
    assert model.cfg.train_set_multiplicity == 4
    with caplog.at_level(logging.WARNING):
        _run(synth, tmp_path / "run", epochs=1, model=model)
    assert "each of the 2 E-Attn patch sets (layers 3, 4) counts 4 times" in caplog.text
    caplog.clear()
    one = create_model(
        "tiny", seed=111, image_size=SIZE, feature_layers=(3, 4), train_set_multiplicity=1
    )
    with caplog.at_level(logging.WARNING):
        _run(synth, tmp_path / "one", epochs=1, model=one)
    assert "counts" not in caplog.text


def test_non_finite_frozen_features_are_blamed_on_precision_not_lr(synth, tmp_path):
    """An fp16/bf16 overflow in the backbones gives NaN features once, when the cache is
    built: stopped there with the image named and the precision advice, not as a divergence
    that asks for a lower --lr (no step has been taken)."""
    from crane.models.vision import VisionOutput

    model = create_model("tiny+", seed=111, image_size=SIZE)
    real = model.encode_images
    calls = []

    def encode(images):  # the second batch's first image overflowed
        vis = real(images)
        calls.append(1)
        if len(calls) == 2:
            p = vis.patch_sets.clone()
            p[:, 0, 0, :] = float("inf")
            vis = VisionOutput(vis.global_feat, p)
        return vis

    model.encode_images = encode
    ds = AnomalyDataset(synth, "test", image_size=SIZE)
    with pytest.raises(CraneError, match=r"1 training image\(s\) are not finite") as e:
        train(model, ds, tmp_path / "run", TrainSettings(epochs=1, batch_size=4),
              device="cpu", progress=False, autocast_dtype=torch.bfloat16)  # fmt: skip
    assert ds.samples[4].img_path in str(e.value) and "--precision fp32" in str(e.value)
    assert "--lr" not in str(e.value)


def test_a_run_stopped_between_its_top_level_files_resumes(synth, tmp_path, monkeypatch):
    """Killed after the top-level prompts of epoch 2 and before its config.json: the pair no
    longer matches (create_model refuses it), but the run resumes from epoch_1 and finishes,
    and its settings are read as the CLI's --resume reads them."""
    import crane.models.checkpoint as ckpt
    from crane.errors import CheckpointError

    run = tmp_path / "run"
    real = ckpt.atomic_write_bytes

    def killed(path, data):
        if path == run / ckpt.CONFIG and (run / "epoch_2").is_dir():
            raise KeyboardInterrupt
        return real(path, data)

    monkeypatch.setattr(ckpt, "atomic_write_bytes", killed)
    with pytest.raises(KeyboardInterrupt):
        _run(synth, run, epochs=3)
    monkeypatch.setattr(ckpt, "atomic_write_bytes", real)
    fix = r"it is a training run stopped while saving .*train --out .* --resume. completes it"
    with pytest.raises(CheckpointError, match=r"not the prompts file .*: " + fix):
        create_model(str(run))
    assert create_model(str(run / "epoch_1")).cfg.name == "tiny"  # (as the message says)
    assert T.run_settings(run)["epochs"] == 3
    res = _run(synth, run, epochs=3, resume=True)
    assert res is not None
    assert create_model(str(run)).cfg.name == "tiny"


def test_resume_refuses_a_backbone_changed_inside_a_block_or_another_attention(
    copy_of, tmp_path, caplog
):
    """The backbone check read a few tensors only (embeddings, projections): a CLIP changed in
    one block's attention weights (a merged LoRA) resumed; so did another --attention. Another
    device type is said: the features' rounding differs."""
    data = copy_of()
    run = tmp_path / "run"
    _run(data, run, stop=1)
    other = create_model("tiny", seed=111, image_size=SIZE)
    with torch.no_grad():
        other.vision.visual.transformer.resblocks[1].attn.in_proj_weight.mul_(1.01)
    with pytest.raises(CraneError, match=r"backbone weights differ \(inside their blocks\)"):
        _run(data, run, resume=True, model=other)
    ds = AnomalyDataset(data, "test", image_size=SIZE)
    with pytest.raises(CraneError, match="encoded with --attention auto, now with math"):
        train(create_model("tiny", seed=111, image_size=SIZE), ds, run,
              TrainSettings(epochs=2, batch_size=4), progress=False, resume=True, device="cpu",
              attention="math")  # fmt: skip
    meta = json.loads((run / "resume.json").read_text())
    assert meta["fingerprint"]["device"] == "cpu" and meta["fingerprint"]["attention"] == "auto"
    meta["fingerprint"]["device"] = "cuda"  # (as a run started on a GPU)
    (run / "resume.json").write_text(json.dumps(meta))
    with caplog.at_level(logging.WARNING, logger="crane.engine.train"):
        _run(data, run, resume=True)
    assert "encoded its features on cuda, this resume on cpu" in caplog.text


def test_cli_resume_takes_the_runs_attention(synth, tmp_path, capsys):
    from crane.cli import main

    run = str(tmp_path / "run")
    args = ["train", "--dataset", "mvtec", "--root", str(synth), "--preset", "tiny",
            "--image-size", str(SIZE), "--batch-size", "4", "--no-progress",
            "--out", run]  # fmt: skip
    assert main([*args, "--epochs", "1", "--attention", "math"]) == 0
    assert main(["train", "--out", run, "--resume", "--epochs", "2", "--no-progress"]) == 0
    meta = json.loads((tmp_path / "run" / "resume.json").read_text())
    assert meta["epochs_done"] == 2 and meta["fingerprint"]["attention"] == "math"
    capsys.readouterr()
    assert main(["train", "--out", run, "--resume", "--epochs", "3", "--attention", "auto"]) == 2
    assert "encoded with --attention math, now with auto" in capsys.readouterr().err


def test_a_subset_gets_the_checks_a_dataset_gets(synth, tmp_path, caplog):
    """train() takes torch Subsets (the resume fingerprint reads through them), but the label
    check and the filter of unmasked anomalous images read ``dataset.samples`` only: a Subset
    of normal images trained, and one with unmasked defects trained them as normal pixels."""
    from torch.utils.data import Subset

    ds = AnomalyDataset(synth, "test", image_size=SIZE)
    normal = [i for i, s in enumerate(ds.samples) if not s.anomaly]
    with pytest.raises(CraneError, match="split to train on has no anomalous image"):
        _run(synth, tmp_path / "a", ds=Subset(Subset(ds, list(range(len(ds)))), normal))
    unmasked = [i for i, s in enumerate(ds.samples) if s.anomaly][:2]
    for i in unmasked:  # (as missing_mask="warn" leaves them)
        ds.samples[i] = dataclasses.replace(ds.samples[i], mask_path="")
    picked = Subset(ds, list(range(len(ds)))[::-1])
    with caplog.at_level(logging.WARNING, logger="crane.engine.train"):
        view = T._with_pixel_truth(picked)
    assert "without the 2 anomalous images that have no mask" in caplog.text
    kept = T._samples_and_root(view)[0]
    assert len(kept) == len(ds) - 2 and all(s.has_mask or not s.anomaly for s in kept)
    assert kept == [s for s in ds.samples[::-1] if s.has_mask or not s.anomaly]


def test_a_finished_run_whose_pair_does_not_match_is_pointed_to_its_epochs(synth, tmp_path):
    """A resume trains nothing for a finished run: the message sent there did not help."""
    import shutil as sh

    from crane.errors import CheckpointError

    run = tmp_path / "run"
    _run(synth, run, epochs=2)
    sh.copy(run / "epoch_1" / "prompts.safetensors", run / "prompts.safetensors")
    with pytest.raises(CheckpointError, match=r"the training finished, so a resume would not "
                       r"rewrite it: its epoch_K folders"):  # fmt: skip
        create_model(str(run))
