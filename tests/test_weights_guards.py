"""What weight, prompt and checkpoint loading refuses or reports (from a review): files that
would give silently wrong numbers, hand-edited configs, prompts of another preset, files
that are not what they are named."""

from __future__ import annotations

import json
import logging
import math
import shutil
import zipfile

import pytest
import torch

from crane.config import CraneConfig, get_config
from crane.errors import CheckpointError, CraneError, WeightsError
from crane.models import create_model, save_model
from crane.models import weights as W
from crane.models.factory import PACKAGED_OFFICIAL, names_a_run, resolve_official

SIZE = 112


@pytest.fixture
def run(tmp_path):
    model = create_model("tiny", image_size=SIZE, seed=3)
    return save_model(model, tmp_path / "run")


def _edit_config(run, **changes):
    path = run / "config.json"
    meta = json.loads(path.read_text())
    for key, value in changes.items():
        if value is ...:
            del meta["config"][key]
        elif key in ("backbone_seed", "image_threshold"):
            meta[key] = value
        else:
            meta["config"][key] = value
    path.write_text(json.dumps(meta))


def test_a_config_lacking_a_field_takes_its_own_presets_value(run):
    """It took crane+'s (map_combine logit_mean for a soft_mean tiny run: maps moved 0.24)."""
    _edit_config(run, map_combine=..., train_set_multiplicity=...)
    cfg = create_model(str(run)).cfg
    assert (cfg.map_combine, cfg.train_set_multiplicity) == ("soft_mean", 4)  # tiny's
    _edit_config(run, name=...)
    with pytest.raises(CheckpointError, match="lacks .*map_combine.* and names no preset"):
        create_model(str(run))


@pytest.mark.parametrize(
    ("field", "value", "says"),
    [
        ("n_ctx", "12", "config field n_ctx must be an integer, got '12'"),
        ("n_ctx", 12.0, "n_ctx must be an integer"),
        ("feature_layers", 4, "feature_layers must be a list of block numbers"),
        ("use_dattn", "false", "use_dattn must be true or false"),
        ("sigma", "4.0", "sigma must be a number"),
        ("clip_overrides", None, "clip_overrides must be a mapping"),
        ("backbone_seed", "abc", "backbone_seed must be an integer"),
        ("image_threshold", "0.5", "image_threshold must be a finite number"),
    ],
)
def test_wrong_types_in_a_config_are_one_message(run, field, value, says):
    _edit_config(run, **{field: value})
    with pytest.raises(CheckpointError, match=says):
        create_model(str(run))


def test_configs_are_read_with_their_types():
    import numpy as np

    cfg = get_config("tiny", sigma=4, fusion_alpha=1, feature_layers=[4])
    assert (cfg.sigma, cfg.fusion_alpha, cfg.feature_layers) == (4.0, 1.0, (4,))
    assert isinstance(cfg.sigma, float)
    cfg = get_config("tiny", image_context_inference=np.bool_(True), image_size=np.int64(112))
    assert cfg.image_context_inference is True and type(cfg.image_size) is int
    assert CraneConfig.from_dict(cfg.to_dict()) == cfg


def test_a_config_from_a_newer_crane_says_so(run):
    path = run / "config.json"
    meta = json.loads(path.read_text())
    meta["version"] = 99
    path.write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match=r"written by a newer crane .* upgrade crane"):
        create_model(str(run))


def test_prompts_of_the_other_preset_are_reported(tmp_path, caplog):
    plus = save_model(create_model("tiny+", image_size=SIZE), tmp_path / "plus")
    with caplog.at_level(logging.WARNING):
        create_model("tiny", image_size=SIZE, prompts=str(plus))
    assert "were trained with tiny+, this model is tiny (without D-Attn)" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        create_model("tiny+", image_size=SIZE, prompts=str(plus))
    assert caplog.text == ""


def test_released_files_of_the_other_preset_are_reported(tmp_path, caplog):
    """The release's folder names say which preset trained a file given by path."""
    crane_file = resolve_official("mvtec", "crane")
    copy = tmp_path / "trained_on_mvtec_crane" / "epoch_5.pth"
    copy.parent.mkdir()
    shutil.copy(crane_file, copy)
    from crane.models.factory import load_prompt_state

    with caplog.at_level(logging.WARNING):
        load_prompt_state(str(copy), get_config("crane+"))
    assert "were trained with crane, this model is crane+" in caplog.text
    assert PACKAGED_OFFICIAL.is_dir()


def test_a_copied_release_file_is_known_by_its_sha256(tmp_path, caplog):
    """A released file copied under another name (no release folder around it) is known by
    the SHA256 the packaged sums list: the other preset's prompts are reported (they were
    used without a word); a file of one's own is not."""
    from crane.models.factory import load_prompt_state

    copy = tmp_path / "my_prompts.pth"
    shutil.copy(resolve_official("visa", "crane+"), copy)
    with caplog.at_level(logging.WARNING):
        load_prompt_state(str(copy), get_config("crane"))
    assert "were trained with crane+, this model is crane" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        load_prompt_state(str(copy), get_config("crane+"))
    assert caplog.text == ""


def test_a_bare_prompts_file_loads(tmp_path, run):
    bare = tmp_path / "mine.safetensors"
    shutil.copy(run / "prompts.safetensors", bare)
    model = create_model("tiny", image_size=SIZE, prompts=str(bare))
    saved = create_model(str(run))
    assert torch.equal(model.prompt_learner.ctx_pos, saved.prompt_learner.ctx_pos)


@pytest.mark.parametrize("bad", ["int", "nan"])
def test_prompts_of_integers_or_nan_are_refused(tmp_path, bad):
    state = dict(create_model("tiny", image_size=SIZE).prompt_learner.state_dict())
    state["ctx_pos"] = (
        state["ctx_pos"].to(torch.int16) if bad == "int" else state["ctx_pos"] * float("nan")
    )
    says = "holds torch.int16 values" if bad == "int" else "holds NaN or infinite values"
    with pytest.raises(CheckpointError, match=says):
        create_model("tiny", image_size=SIZE, prompts=state)


def test_a_released_style_file_with_a_bad_prompt_learner_is_refused(tmp_path):
    from crane.models.checkpoint import load_released_prompts

    path = tmp_path / "epoch_5.pth"
    torch.save({"prompt_learner": [1, 2]}, path)
    with pytest.raises(CheckpointError, match="is not a mapping of tensors"):
        load_released_prompts(path)


@pytest.mark.parametrize("bad", ["int", "nan"])
def test_weights_of_integers_or_nan_are_refused(tmp_path, bad):
    module = torch.nn.Linear(3, 2)
    sd = {k: v.clone() for k, v in module.state_dict().items()}
    sd["weight"] = sd["weight"].to(torch.int32) if bad == "int" else sd["weight"] / 0
    says = "file torch.int32 vs model torch.float32" if bad == "int" else "NaN or infinite"
    with pytest.raises(WeightsError, match=says):
        W.load_into(module, sd, tmp_path / "w.pt", "CLIP")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
def test_all_finite_matches_isfinite(dtype):
    """(float8 included below: no aminmax for it on the CPU.)"""
    gen = torch.Generator().manual_seed(3)
    base = torch.randn(64, 33, generator=gen).to(dtype)
    cases = [base, base.t(), base[:, ::2], base[:0]]
    for value in (float("nan"), float("inf"), -float("inf")):
        for index in ((0, 0), (63, 32), (17, 5)):
            bad = base.clone()
            bad[index] = value
            cases += [bad, bad.t()]
    for t in cases:
        assert W.all_finite(t) == bool(torch.isfinite(t).all()), (t.shape, t.stride())
    assert W.all_finite(torch.tensor([1, 2], dtype=torch.int64))
    f8 = torch.tensor([1.0, -2.0, 0.5]).to(torch.float8_e5m2)
    assert W.all_finite(f8) and not W.all_finite(torch.tensor([1.0, math.inf]).to(f8.dtype))


def test_a_state_dict_saved_from_openais_archive_keeps_its_extras_out(tmp_path):
    sd = {"w": torch.ones(2), "input_resolution": torch.tensor(336), "attn_mask": torch.ones(2)}
    torch.save(sd, tmp_path / "sd.pt")
    assert set(W.load_state_dict_file(tmp_path / "sd.pt")) == {"w"}


@pytest.mark.parametrize(
    ("content", "says"),
    [
        (b"version https://git-lfs.github.com/spec/v1\noid sha256:abc\n", "Git LFS pointer"),
        (b"<!DOCTYPE html><html><body>Sign in</body></html>", "a web page"),
        (b"", "the file is empty"),
        (b"just some text\n", "not a format it knows"),
    ],
)
def test_unreadable_weight_files_say_what_they_are(tmp_path, content, says):
    path = tmp_path / "ViT-L-14-336px.pt"
    path.write_bytes(content)
    with pytest.raises(WeightsError, match=says) as info:
        W.load_state_dict_file(path)
    assert "weights_only" not in str(info.value)


def test_a_safetensors_file_under_another_name_loads(tmp_path):
    from safetensors.torch import save_file

    save_file({"w": torch.arange(3.0)}, tmp_path / "pytorch_model.bin")
    assert torch.equal(
        W.load_state_dict_file(tmp_path / "pytorch_model.bin")["w"], torch.arange(3.0)
    )


def test_a_torch_file_under_a_safetensors_name_loads(tmp_path):
    """Read as what it is (it was refused as "a torch file holding more than tensors")."""
    torch.save({"w": torch.arange(3.0)}, tmp_path / "weights.safetensors")
    assert torch.equal(
        W.load_state_dict_file(tmp_path / "weights.safetensors")["w"], torch.arange(3.0)
    )
    (tmp_path / "bad.safetensors").write_bytes(b"neither")
    with pytest.raises(WeightsError, match="bad.safetensors"):
        W.load_state_dict_file(tmp_path / "bad.safetensors")


def test_a_prompt_state_dict_that_does_not_fit_is_named_briefly():
    """The error names "the prompt state dict given", not the dict's whole text (26k
    characters)."""
    sd = create_model("tiny", image_size=56).prompt_learner.state_dict()
    sd["ctx_pos"] = sd["ctx_pos"][..., :-1]
    with pytest.raises(CheckpointError) as err:
        create_model("tiny", image_size=56, prompts=sd)
    msg = str(err.value)
    assert "the prompt state dict given" in msg and "ctx_pos" in msg and len(msg) < 600


def _zero_inside_the_tensor(path, values: torch.Tensor) -> None:
    raw = bytearray(path.read_bytes())
    at = raw.find(values.numpy().tobytes()[:256])
    assert at > 0
    raw[at + 64 : at + 128] = bytes(64)  # finite, wrong values: nothing else would notice
    path.write_bytes(bytes(raw))


def test_a_weight_file_damaged_inside_a_tensor_is_refused(tmp_path, monkeypatch):
    """A torch file's zip members carry CRC-32s: bytes changed inside a tensor are caught
    (they loaded silently, as finite wrong weights); an intact file is read for the check
    once, and again once it changes."""
    monkeypatch.setenv(W.CACHE_ENV, str(tmp_path / "cache"))
    values = torch.linspace(0.5, 1.5, 4096)
    torch.save({"w": values, "b": torch.ones(3)}, tmp_path / "sd.pt")
    checks: list[str] = []
    real = zipfile.ZipFile.testzip

    def counting(self):
        checks.append(self.filename)
        return real(self)

    monkeypatch.setattr(zipfile.ZipFile, "testzip", counting)
    for _ in range(2):
        assert torch.equal(W.load_state_dict_file(tmp_path / "sd.pt")["w"], values)
    assert len(checks) == 1  # remembered in the cache folder
    assert (tmp_path / "cache" / W.VERIFIED_FILE).is_file()

    _zero_inside_the_tensor(tmp_path / "sd.pt", values)
    with pytest.raises(WeightsError, match=r"sd\.pt is damaged: its member .*data/\d+ fails"):
        W.load_state_dict_file(tmp_path / "sd.pt")
    assert len(checks) == 2  # (a changed file is checked again)


def test_a_damaged_copy_that_kept_the_modification_time_is_checked_again(tmp_path, monkeypatch):
    """`cp -p` / `rsync -a` keep the modification time: a damaged copy put in place of a
    checked file is another file (inode, change time) and is checked."""
    import os

    monkeypatch.setenv(W.CACHE_ENV, str(tmp_path / "cache"))
    values = torch.linspace(0.5, 1.5, 4096)
    path = tmp_path / "clip.pt"
    torch.save({"w": values}, path)
    W.load_state_dict_file(path)  # checked, recorded
    copy = tmp_path / "copy.pt"
    shutil.copy(path, copy)
    _zero_inside_the_tensor(copy, values)
    st = path.stat()
    os.utime(copy, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert copy.stat().st_size == st.st_size
    os.replace(copy, path)
    with pytest.raises(WeightsError, match="fails its CRC-32 check"):
        W.load_state_dict_file(path)


def test_a_torch_file_saved_without_crcs_loads(tmp_path):
    """torch.serialization.set_crc32_options(False) writes every CRC as 0; torch reads such
    files, and so does crane (it refused them as damaged)."""
    torch.serialization.set_crc32_options(False)
    try:
        torch.save({"w": torch.arange(10.0)}, tmp_path / "nocrc.pt")
    finally:
        torch.serialization.set_crc32_options(True)
    with zipfile.ZipFile(tmp_path / "nocrc.pt") as zf:
        assert all(i.CRC == 0 for i in zf.infolist())
    assert torch.equal(W.load_state_dict_file(tmp_path / "nocrc.pt")["w"], torch.arange(10.0))


def test_a_torchscript_archive_damaged_inside_a_tensor_is_refused(tmp_path):
    class M(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.linspace(0.5, 1.5, 4096))

        def forward(self, x):
            return x * self.w

    values = M().w.detach().clone()
    torch.jit.script(M()).save(str(tmp_path / "ts.pt"))
    assert W.is_torchscript(tmp_path / "ts.pt")
    _zero_inside_the_tensor(tmp_path / "ts.pt", values)
    with pytest.raises(WeightsError, match="fails its CRC-32 check"):
        W.load_state_dict_file(tmp_path / "ts.pt")


def test_a_folder_given_as_weights_is_named_as_one(tmp_path):
    with pytest.raises(WeightsError, match="names .*, a folder, not a file"):
        W.resolve_local(tmp_path, W.CLIP_ENV, W.CLIP_FILENAMES, "--clip-weights", "CLIP")


@pytest.mark.parametrize(("value", "offline"), [("false", False), ("off", False), ("1", True)])
def test_offline_switch_words(monkeypatch, value, offline):
    monkeypatch.setenv(W.OFFLINE_ENVS[0], value)
    for k in W.OFFLINE_ENVS[1:]:
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setattr(W.socket, "create_connection", _reachable)
    monkeypatch.setattr(W, "_resolve", lambda host, port: [(host, port)])
    assert W._offline() is offline


class _reachable:  # (a connection that succeeds: the network is up)
    def __init__(self, *a, **kw):
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def test_a_folder_named_like_a_preset_does_not_hide_it(tmp_path, monkeypatch, caplog):
    import crane.models.factory as factory

    monkeypatch.setattr(factory, "_WARNED", set())
    monkeypatch.chdir(tmp_path)
    (tmp_path / "tiny").mkdir()  # e.g. an earlier `--out tiny` of predictions
    assert not names_a_run("tiny")
    assert create_model("tiny", image_size=SIZE).cfg.name == "tiny"
    save_model(create_model("tiny", image_size=SIZE), tmp_path / "tiny", overwrite=True)
    with caplog.at_level(logging.WARNING):
        assert names_a_run("tiny")
    assert "the run folder tiny is used, not the preset" in caplog.text
    assert names_a_run("elsewhere.safetensors") and not names_a_run("tiny+")


def test_sha256sums_in_binary_mode_still_check_the_file(tmp_path, monkeypatch):
    rel = "trained_on_mvtec_cranep/epoch_5.pth"
    official = tmp_path / "official"
    (official / "trained_on_mvtec_cranep").mkdir(parents=True)
    shutil.copy(PACKAGED_OFFICIAL / rel, official / rel)
    digest = "0" * 64  # (not the file's)
    for line in (f"{digest} *{rel}", f"{digest}  ./{rel}"):
        (official / "SHA256SUMS").write_text(line + "\n")
        monkeypatch.setenv("CRANE_OFFICIAL_PROMPTS", str(official))
        with pytest.raises(CheckpointError, match="does not match its SHA256"):
            resolve_official("mvtec", "crane+")


def test_the_known_released_sets_are_the_presets_own():
    with pytest.raises(CheckpointError, match=r"known: \['mvtec', 'visa'\]"):
        resolve_official("mvtec-medical", "crane")


def test_a_bad_prompt_file_is_reported_before_the_backbones_are_looked_for(monkeypatch):
    monkeypatch.setenv("CRANE_OFFLINE", "1")
    monkeypatch.setenv("CRANE_CACHE_DIR", "/nonexistent-cache")  # (no weights anywhere)
    with pytest.raises(CheckpointError, match="prompt file /nonexistent.pth does not exist"):
        create_model("crane+", prompts="/nonexistent.pth")


def test_weight_files_a_model_does_not_use_are_reported(tmp_path, caplog):
    with caplog.at_level(logging.WARNING):
        create_model("tiny", image_size=SIZE, clip_weights=tmp_path / "x.pt")
    assert "--clip-weights not used: this model's backbones are random" in caplog.text


def test_an_intact_torch_file_of_objects_is_not_called_damaged(tmp_path):
    import argparse

    path = tmp_path / "ckpt.pt"
    torch.save({"model": {"w": torch.ones(1)}, "args": argparse.Namespace(lr=1)}, path)
    with pytest.raises(WeightsError, match="holding more than tensors") as info:
        W.load_state_dict_file(path)
    assert "damaged" not in str(info.value)


def test_a_zip_that_is_no_torch_file_is_named_as_such(tmp_path):
    import numpy as np

    np.savez(tmp_path / "weights.npz", w=np.ones(3))
    path = tmp_path / "ViT-L-14-336px.pt"
    (tmp_path / "weights.npz").rename(path)
    with pytest.raises(WeightsError, match="a zip archive, not a torch file"):
        W.load_state_dict_file(path)


def test_a_runs_threshold_is_not_used_with_other_prompts(run, tmp_path, caplog):
    """The threshold was calibrated on the run's own prompts' scores."""
    from crane.models.checkpoint import update_threshold

    update_threshold(run, 0.7, {"mode": "f1"})
    other = save_model(create_model("tiny", image_size=SIZE, seed=9), tmp_path / "other")
    assert create_model(str(run)).image_threshold == 0.7
    for own in (run, run / "prompts.safetensors"):
        assert create_model(str(run), prompts=str(own)).image_threshold == 0.7
    assert create_model(str(run), prompts=str(other)).image_threshold is None
    from crane.engine.predict import Detector

    with caplog.at_level(logging.WARNING):  # (said where decisions would be made)
        assert Detector(str(run), prompts=str(other), device="cpu").threshold is None
    assert "found for its own prompts, not for these" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING):  # (a threshold of its own: nothing to say)
        assert Detector(str(run), prompts=str(other), device="cpu", threshold=0.3).threshold == 0.3
    assert not caplog.text
    state = create_model(str(other)).prompt_learner.state_dict()
    det = Detector(str(run), prompts=state, device="cpu")  # (prompts as tensors)
    assert det.threshold is None and det.prompts is None


def test_a_runs_threshold_goes_with_overrides_that_move_scores(run, caplog):
    from crane.engine.predict import Detector
    from crane.models.checkpoint import update_threshold

    update_threshold(run, 0.7, {"mode": "f1"})
    for same in (
        {"image_temperature": create_model(str(run)).cfg.image_temperature},
        {"tail_tf32": True},
        {"train_image_temperature": 0.5},
        {"map_combine": "logit_mean"},
        {"sigma": 2.0},
    ):  # fmt: skip (maps only)
        assert create_model(str(run), **same).image_threshold == 0.7, same
    for moves in ({"image_temperature": 1.0}, {"attn_type": "vv"}, {"fusion_alpha": 0.0}):
        assert create_model(str(run), **moves).image_threshold is None, moves
    with caplog.at_level(logging.WARNING):
        assert Detector(str(run), device="cpu", image_temperature=1.0).threshold is None
    assert "found for the run's own image_temperature" in caplog.text


def test_a_threshold_is_dropped_once_the_prompts_change(run, tmp_path, caplog):
    """Prompts loaded into the model object (as the Detector's message suggests) or trained
    further make the threshold another model's: it is not used, nor saved."""
    from crane.engine.predict import Detector
    from crane.models.checkpoint import update_threshold

    update_threshold(run, 0.7, {"mode": "f1"})
    model = create_model(str(run))
    model.to(torch.float64)  # (a cast alone keeps it: the same prompts)
    assert model.image_threshold == 0.7
    model = create_model(str(run))
    other = create_model("tiny", image_size=SIZE, seed=9).prompt_learner.state_dict()
    model.prompt_learner.load_state_dict(other)
    with caplog.at_level(logging.WARNING):
        assert Detector(model, device="cpu").threshold is None
    assert "set for other prompts" in caplog.text
    save_model(model, tmp_path / "saved")
    assert create_model(str(tmp_path / "saved")).image_threshold is None
    model.image_threshold = 0.2  # (set now: these prompts')
    assert Detector(model, device="cpu").threshold == 0.2


@pytest.mark.parametrize(
    ("change", "says"),
    [
        ({"image_size": 0}, "positive multiple of the patch size 14"),
        ({"feature_layers": [9]}, r"config layers \[9\] .* outside 1\.\.4"),
    ],
)
def test_a_run_config_with_impossible_layers_or_size_is_a_clear_error(run, change, says):
    """A config.json read from a file must not crash deep inside the model."""
    _edit_config(run, **change)
    with pytest.raises(CraneError, match=says):
        create_model(str(run))


def test_an_impossible_dattn_layer_is_refused_where_dattn_runs(run, tmp_path):
    plus = save_model(create_model("tiny+", image_size=SIZE, seed=3), tmp_path / "plus")
    _edit_config(plus, dattn_layer=9)
    with pytest.raises(CraneError, match=r"config layers \[9\] .* outside 1\.\.4"):
        create_model(str(plus))
    _edit_config(run, dattn_layer=9)  # (unused without D-Attn)
    assert create_model(str(run)).cfg.dattn_layer == 9


# ---------------------------------------------------------------- 27th-session review


def test_a_safetensors_file_named_is_the_file_loaded(run, tmp_path):
    """A .safetensors file inside a run folder was replaced by the run's own
    prompts.safetensors (also a typo'd name, or the optimizer state of an epoch folder)."""
    from safetensors.torch import save_file

    from crane.models.factory import load_prompt_state

    mine = create_model("tiny", image_size=SIZE, seed=9).prompt_learner.state_dict()
    save_file({k: v.contiguous() for k, v in mine.items()}, str(run / "mine.safetensors"))
    model = create_model("tiny", image_size=SIZE, prompts=run / "mine.safetensors")
    for k, v in mine.items():
        assert torch.equal(model.prompt_learner.state_dict()[k], v), k
    with pytest.raises(CheckpointError, match="promts.safetensors does not exist"):
        load_prompt_state(run / "promts.safetensors", get_config("tiny"))
    save_file({"0.exp_avg": torch.zeros(3)}, str(run / "optimizer.safetensors"))
    with pytest.raises(CraneError):  # (its keys are no prompt learner's)
        create_model("tiny", image_size=SIZE, prompts=run / "optimizer.safetensors")
    with pytest.raises(CheckpointError, match="is not a run's prompts.safetensors: name the run"):
        create_model(str(run / "mine.safetensors"))
    # The run's own file still names the run.
    own = create_model(str(run / "prompts.safetensors"))
    assert torch.equal(own.prompt_learner.ctx_pos, create_model(str(run)).prompt_learner.ctx_pos)


def test_release_files_named_by_path_are_checked_against_their_sums(tmp_path, monkeypatch):
    import zipfile

    from crane.models.factory import load_prompt_state

    copy = shutil.copytree(PACKAGED_OFFICIAL, tmp_path / "official")
    path = copy / "trained_on_mvtec_crane" / "epoch_5.pth"
    assert (copy / "SHA256SUMS").is_file()
    load_prompt_state(path, get_config("crane"))  # intact: loads
    with zipfile.ZipFile(path) as z:
        info = max((i for i in z.infolist() if "/data/" in i.filename), key=lambda i: i.file_size)
    data = bytearray(path.read_bytes())
    start = info.header_offset + 30 + len(info.filename.encode()) + len(info.extra)
    data[start + info.file_size // 2] ^= 0x40  # one bit of a tensor: finite, still a zip
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="does not match its SHA256"):
        load_prompt_state(path, get_config("crane"))
    # official: names the release: checked against crane's own sums where the copy has none
    # (the authors' repository ships none).
    (copy / "SHA256SUMS").unlink()
    monkeypatch.setenv("CRANE_OFFICIAL_PROMPTS", str(copy))
    with pytest.raises(CheckpointError, match="does not match its SHA256.*--prompts PATH"):
        load_prompt_state("official:mvtec", get_config("crane"))
    load_prompt_state("official:visa", get_config("crane"))  # an intact file of that copy
    # A copy outside a release tree (no sums beside it) loads as before.
    alone = tmp_path / "alone" / "epoch_5.pth"
    alone.parent.mkdir()
    shutil.copy(PACKAGED_OFFICIAL / "trained_on_mvtec_crane" / "epoch_5.pth", alone)
    load_prompt_state(alone, get_config("crane"))


def test_a_run_of_random_full_size_backbones_rebuilds_them(tmp_path, caplog):
    """A full preset built with pretrained=False records its backbone seed; the reloaded run
    looked for pretrained weights instead (an error offline, other weights if any)."""
    model = create_model("crane", pretrained=False, image_size=56, seed=7)
    run = save_model(model, tmp_path / "run")
    again = create_model(str(run))
    assert again.backbone_seed == 7
    name = "vision.visual.transformer.resblocks.3.mlp.c_fc.weight"
    a, b = dict(model.named_parameters())[name], dict(again.named_parameters())[name]
    assert a.std() > 0 and torch.equal(a, b)
    with caplog.at_level(logging.WARNING), pytest.raises(WeightsError):
        create_model(str(run), pretrained=True)  # (no weights here: the usual error)
    assert "was trained on randomly initialised backbones (seed 7)" in caplog.text


def test_tilde_in_the_folder_variables_means_home(monkeypatch, tmp_path):
    from crane.models.factory import official_prompts_dir

    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv(W.CACHE_ENV, "~/.cache/cx")
    assert W.cache_dir() == tmp_path / ".cache" / "cx"
    monkeypatch.setenv("CRANE_OFFICIAL_PROMPTS", "~/official")
    assert official_prompts_dir() == tmp_path / "official"


def test_dinov2_teacher_checkpoints_give_their_backbone(tmp_path):
    teacher = {
        "backbone.cls_token": torch.zeros(1, 1, 8),
        "backbone.blocks.0.norm1.weight": torch.ones(8),
        "dino_head.mlp.0.weight": torch.zeros(4, 8),
        "ibot_head.mlp.0.weight": torch.zeros(4, 8),
    }
    torch.save({"teacher": teacher}, tmp_path / "teacher_checkpoint.pth")
    sd = W.load_state_dict_file(tmp_path / "teacher_checkpoint.pth")
    assert sorted(sd) == ["blocks.0.norm1.weight", "cls_token"]


def test_files_given_to_the_wrong_flag_say_which_flag_takes_them(tmp_path):
    from crane.models.checkpoint import load_released_prompts

    release = PACKAGED_OFFICIAL / "trained_on_mvtec_crane" / "epoch_5.pth"
    with pytest.raises(WeightsError, match="is a Crane prompt file .* pass it as --prompts"):
        W.load_state_dict_file(release)
    scripted = torch.jit.script(torch.nn.Linear(2, 2))
    scripted.save(str(tmp_path / "clip.pt"))
    with pytest.raises(CheckpointError, match="is a TorchScript archive .* --clip-weights"):
        load_released_prompts(tmp_path / "clip.pt")


def test_run_thresholds_must_be_finite_and_seeds_of_any_size_build(run):
    _edit_config(run, image_threshold=float("nan"))
    with pytest.raises(CheckpointError, match="image_threshold must be a finite number"):
        create_model(str(run))
    big = create_model("tiny", image_size=SIZE, seed=2**64 + 5)  # (a timestamp, a hash)
    same = create_model("tiny", image_size=SIZE, seed=5)
    a, b = dict(big.named_parameters()), dict(same.named_parameters())
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_save_model_checks_what_it_stores_before_writing(tmp_path):
    import numpy as np

    model = create_model("tiny", image_size=SIZE, seed=4)
    model.image_threshold = np.percentile(np.array([0.3, 0.4, 0.6], np.float32), 50)
    with pytest.raises(CraneError, match="finite"):
        model.image_threshold = float("nan")
    save_model(model, tmp_path / "a", source=tmp_path / "data")  # (a path: stored as text)
    loaded = create_model(str(tmp_path / "a"))
    assert loaded.image_threshold == pytest.approx(0.4)
    meta = json.loads((tmp_path / "a" / "config.json").read_text())
    assert meta["provenance"]["source"] == str(tmp_path / "data")
    with pytest.raises(CheckpointError, match="cannot store object"):
        save_model(model, tmp_path / "b", source=object())
    assert not (tmp_path / "b").exists() or not any((tmp_path / "b").iterdir())


def test_a_run_whose_prompts_file_is_another_saves_is_refused(tmp_path):
    """A save stopped between its two files (or a prompts file copied in) leaves prompts that
    are not the ones config.json (and its threshold) were saved with."""
    a = create_model("tiny", image_size=SIZE, seed=4)
    a.image_threshold = 0.25
    save_model(a, tmp_path / "a")
    save_model(create_model("tiny", image_size=SIZE, seed=5), tmp_path / "b")
    shutil.copy(tmp_path / "b" / "prompts.safetensors", tmp_path / "a" / "prompts.safetensors")
    with pytest.raises(CheckpointError, match="not the prompts file .*: save the run again"):
        create_model(str(tmp_path / "a"))


def test_a_run_read_between_a_saves_two_files_is_read_again(tmp_path, monkeypatch):
    """A reader racing a save (evaluating a run while it trains: its prompts are written, its
    config.json not yet) reads the pair again before refusing it."""
    import crane.models.checkpoint as ckpt

    save_model(create_model("tiny", image_size=SIZE, seed=4), tmp_path / "a")
    save_model(create_model("tiny", image_size=SIZE, seed=5), tmp_path / "b")
    (tmp_path / "a" / "prompts.safetensors").write_bytes(
        (tmp_path / "b" / "prompts.safetensors").read_bytes()
    )
    waits = []

    def config_written_meanwhile(seconds):
        waits.append(seconds)
        shutil.copy(tmp_path / "b" / "config.json", tmp_path / "a" / "config.json")

    monkeypatch.setattr(ckpt.time, "sleep", config_written_meanwhile)
    model = create_model(str(tmp_path / "a"))
    assert waits == [0.5] and model.backbone_seed == 5
