"""Weight loading: real file formats, released prompt files, clear offline errors."""

from __future__ import annotations

import contextlib
import logging
import os
import subprocess
import sys
import threading
import time
import warnings
from pathlib import Path

import open_clip
import pytest
import timm
import torch

from crane.config import TINY_CLIP, TINY_DINO, get_config
from crane.errors import CheckpointError, WeightsError
from crane.models import create_model
from crane.models import weights as W
from crane.models.backbones import build_clip
from crane.models.checkpoint import load_released_prompts
from crane.models.vision import clip_matmul_weights

OFFICIAL = Path(__file__).resolve().parents[2] / "shared" / "checkpoints" / "crane-official"
needs_official = pytest.mark.skipif(
    not OFFICIAL.is_dir(), reason="../shared/checkpoints not present"
)


@pytest.fixture
def no_weights(tmp_path, monkeypatch):
    monkeypatch.setenv(W.CACHE_ENV, str(tmp_path / "empty-cache"))
    monkeypatch.setenv("CRANE_OFFLINE", "1")
    monkeypatch.delenv(W.CLIP_ENV, raising=False)
    monkeypatch.delenv(W.DINO_ENV, raising=False)


def test_missing_clip_weights_offline_is_one_clear_paragraph(no_weights):
    with pytest.raises(WeightsError) as exc:
        create_model("crane")
    msg = str(exc.value)
    assert "ViT-L-14-336px.pt" in msg and "--clip-weights" in msg and W.CLIP_ENV in msg
    assert W.CACHE_ENV in msg and "\n" not in msg
    # For Python users the keyword, and where to download the file.
    assert "(Python: clip_weights=...)" in msg
    assert "Hugging Face hub repository timm/vit_large_patch14_clip_336.openai" in msg


def test_missing_clip_and_dino_weights_are_named_in_one_paragraph(no_weights, tmp_path):
    """Crane+ without either file: one run's error names both (not CLIP now, DINOv2 next)."""
    with pytest.raises(WeightsError) as exc:
        create_model("crane+")
    msg = str(exc.value)
    assert "--clip-weights" in msg and W.CLIP_ENV in msg and "ViT-L-14-336px.pt" in msg
    assert "--dino-weights" in msg and W.DINO_ENV in msg and "dinov2_vitb14_reg4_pretrain" in msg
    assert "\n" not in msg
    # With the DINOv2 file in place, only CLIP's is asked for.
    dino = tmp_path / "empty-cache" / "dinov2_vitb14_reg4_pretrain.pth"
    dino.parent.mkdir(parents=True)
    dino.write_bytes(b"")
    with pytest.raises(WeightsError) as exc:
        create_model("crane+")
    assert "--clip-weights" in str(exc.value) and "--dino-weights" not in str(exc.value)


def test_missing_dino_weights_names_its_fix(no_weights, tmp_path):
    # An explicit path that does not exist is reported as such.
    with pytest.raises(WeightsError) as exc:
        create_model(
            "crane+", dino_weights=tmp_path / "nope.pth", clip_weights=tmp_path / "nope2.pt"
        )
    assert "does not exist" in str(exc.value)
    from crane.models.backbones import build_dino

    with pytest.raises(WeightsError) as exc:
        build_dino(get_config("crane+"))
    msg = str(exc.value)
    assert (
        "--dino-weights" in msg and W.DINO_ENV in msg and "dinov2_vitb14_reg4_pretrain.pth" in msg
    )


def test_cli_prints_weights_paragraph_without_traceback(tmp_path):
    env = {**os.environ, W.CACHE_ENV: str(tmp_path), "CRANE_OFFLINE": "1"}
    code = (
        "import sys\nfrom crane.errors import CraneError\nfrom crane.models import create_model\n"
        "try:\n    create_model('crane')\nexcept CraneError as e:\n    print(e); sys.exit(3)\n"
    )
    t = time.time()
    r = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120
    )
    assert r.returncode == 3 and "--clip-weights" in r.stdout
    assert time.time() - t < 60


def _network(monkeypatch, connect) -> None:
    """The probe's network as ``connect`` answers (``socket.create_connection``'s stand-in,
    each name its own address): no offline flag, proxy or mirror set."""
    for var in ("CRANE_OFFLINE", "HF_HUB_OFFLINE", "HTTPS_PROXY", "https_proxy", "ALL_PROXY",
                "all_proxy", "HF_ENDPOINT"):  # fmt: skip
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(W.socket, "create_connection", connect)
    monkeypatch.setattr(W, "_resolve", lambda host, port: [(host, port)])


def test_no_hang_without_offline_flag(tmp_path, monkeypatch):
    """With no flag set, the reachability probe decides quickly (no network here)."""
    monkeypatch.setenv(W.CACHE_ENV, str(tmp_path))
    monkeypatch.delenv("CRANE_OFFLINE", raising=False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    for var in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(var, raising=False)
    t = time.time()
    unreachable = W.hub_unreachable()
    assert time.time() - t < 15
    if not unreachable:
        pytest.skip("this machine can reach the hub")


def test_a_hugging_face_mirror_is_probed_instead_of_the_hub(monkeypatch):
    """With ``HF_ENDPOINT`` (a mirror, where huggingface.co is blocked) the probe asks the
    mirror: it said "no network" although the mirror answered."""
    probed: list[tuple[str, int]] = []

    def connect(address, timeout=None):
        probed.append(address)
        if address[0] != "hf-mirror.example":
            raise OSError("unreachable")
        return contextlib.nullcontext()

    _network(monkeypatch, connect)
    monkeypatch.setenv("HF_ENDPOINT", "https://hf-mirror.example")
    assert not W.hub_unreachable()
    assert probed == [("hf-mirror.example", 443)]
    probed.clear()
    monkeypatch.setenv("HF_ENDPOINT", "http://hf-mirror.example:8080/")
    assert not W.hub_unreachable()  # (connect above accepts any port of the mirror)
    assert probed == [("hf-mirror.example", 8080)]
    probed.clear()
    monkeypatch.delenv("HF_ENDPOINT")
    assert W.hub_unreachable()
    # (OpenAI's host is not probed: open_clip downloads OpenAI's CLIP from the hub too)
    assert probed == [("huggingface.co", 443)]
    probed.clear()
    monkeypatch.setattr(W, "_has_hf_hub", lambda: False)  # (then open_clip uses OpenAI's URL)
    assert W.hub_unreachable() and probed == [("openaipublic.azureedge.net", 443)]


def test_a_probe_that_hangs_ends_in_time_and_tries_every_address(monkeypatch):
    """create_connection's timeout covers neither the name lookup (a DNS server that never
    answered held the probe 20 s) nor the sum over a host's addresses, which it tries in
    turn: a first address whose packets are dropped (a broken IPv6 route) hid the next one.
    The probe has a deadline for the lookup, then tries every address at once."""
    release = threading.Event()

    def hung_lookup(host, port):
        release.wait(30)  # (as getaddrinfo blocks, whatever the timeout)
        raise OSError("name lookup failed")

    def connect(address, timeout=None):
        if address[0] == "dead":
            release.wait(30)  # (dropped packets: no answer before the timeout)
            raise OSError("timed out")
        return contextlib.nullcontext()

    _network(monkeypatch, connect)
    monkeypatch.setattr(W, "_PROBE_S", 0.3)
    try:
        for resolve, unreachable in (
            (hung_lookup, True),
            (lambda host, port: [("dead", port)], True),  # (the connection hangs)
            (lambda host, port: [("dead", port), ("alive", port)], False),
        ):
            monkeypatch.setattr(W, "_resolve", resolve)
            for proxy in (None, "http://proxy.example:3128"):  # (the proxy's probe too)
                if proxy:
                    monkeypatch.setenv("HTTPS_PROXY", proxy)
                else:
                    monkeypatch.delenv("HTTPS_PROXY", raising=False)
                t = time.perf_counter()
                assert W.hub_unreachable() is unreachable, (resolve, proxy)
                assert time.perf_counter() - t < 2
    finally:
        release.set()


@pytest.mark.parametrize("endpoint", ["https://[hf-mirror.com", "https://.hf-mirror.com"])
def test_a_malformed_hf_endpoint_does_not_crash_the_probe(monkeypatch, endpoint):
    """A URL urllib cannot split, a host name IDNA cannot encode: the probe goes on (it
    raised ValueError / UnicodeError, a traceback for every model build)."""
    real = W.socket.create_connection

    def connect(address, timeout=None):
        if address[0].startswith("."):
            return real(address, timeout=timeout)  # (raises UnicodeError before any network)
        raise OSError("unreachable")

    _network(monkeypatch, connect)
    monkeypatch.setenv("HF_ENDPOINT", endpoint)
    assert W.hub_unreachable()


def test_a_proxy_that_does_not_answer_means_no_download(monkeypatch):
    """Behind a proxy the proxy itself is probed: a dead one stops at once with the offline
    message (the hub client's retries took about a minute); one that answers lets it try."""
    probed: list[tuple[str, int]] = []
    alive: set[str] = set()

    def connect(address, timeout=None):
        probed.append(address)
        if address[0] not in alive:
            raise OSError("connection refused")
        return contextlib.nullcontext()

    _network(monkeypatch, connect)
    monkeypatch.setenv("HTTPS_PROXY", "http://127.0.0.1:9")
    assert W.hub_unreachable() and probed == [("127.0.0.1", 9)]
    alive.add("proxy.example")
    probed.clear()
    monkeypatch.setenv("HTTPS_PROXY", "proxy.example")  # (no scheme, no port: http's 80)
    assert not W.hub_unreachable() and probed == [("proxy.example", 80)]
    probed.clear()
    monkeypatch.delenv("HTTPS_PROXY")
    monkeypatch.setenv("all_proxy", "socks5://proxy.example")
    assert not W.hub_unreachable() and probed == [("proxy.example", 1080)]
    # The hub's host in NO_PROXY: reached directly, so probed directly.
    probed.clear()
    monkeypatch.setenv("all_proxy", "http://127.0.0.1:9")
    monkeypatch.setenv("NO_PROXY", "localhost,.huggingface.co")
    monkeypatch.setenv("no_proxy", "localhost,.huggingface.co")
    alive.add("huggingface.co")
    assert not W.hub_unreachable() and probed == [("huggingface.co", 443)]


def _tiny_clip():
    return open_clip.create_model("ViT-L-14-336-quickgelu", pretrained=None, **TINY_CLIP).eval()


@pytest.mark.filterwarnings("ignore")
def test_openai_torchscript_archive_loads(tmp_path):
    src = _tiny_clip()
    img = torch.randn(1, 3, 112, 112)
    txt = open_clip.get_tokenizer("ViT-L-14-336-quickgelu")(["a"])
    traced = torch.jit.trace(src, (img, txt), strict=False, check_trace=False)
    traced.save(str(tmp_path / "ViT-L-14-336px.pt"))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        sd = W.load_state_dict_file(tmp_path / "ViT-L-14-336px.pt")
    assert not [w for w in caught if issubclass(w.category, FutureWarning)]  # jit's deprecation
    dst = _tiny_clip()
    with torch.no_grad():
        for p in dst.parameters():
            p.zero_()
    W.load_into(dst, sd, tmp_path / "x", "CLIP")
    for (k, a), (_, b) in zip(src.state_dict().items(), dst.state_dict().items(), strict=True):
        assert torch.equal(a, b), k


def test_wrong_architecture_file_is_clear(tmp_path):
    sd = _tiny_clip().state_dict()
    sd["visual.proj"] = torch.zeros(3, 3)
    torch.save(sd, tmp_path / "bad.pt")
    with pytest.raises(WeightsError, match="wrong shape"):
        W.load_into(
            _tiny_clip(), W.load_state_dict_file(tmp_path / "bad.pt"), tmp_path / "bad.pt", "CLIP"
        )
    (tmp_path / "junk.pt").write_bytes(b"not a torch file")
    with pytest.raises(WeightsError, match="cannot read"):
        W.load_state_dict_file(tmp_path / "junk.pt")


@needs_official
@pytest.mark.parametrize(
    "rel", sorted(p.relative_to(OFFICIAL).as_posix() for p in OFFICIAL.glob("*/epoch_*.pth"))
)
def test_released_prompt_files_read_safely(rel):
    sd = load_released_prompts(OFFICIAL / rel)
    assert sd["ctx_pos"].shape == (1, 1, 12, 768) and sd["ctx_neg"].shape == (1, 1, 12, 768)
    assert [tuple(sd[f"compound_prompts_text.{i}"].shape) for i in range(8)] == [(4, 768)] * 8
    assert (
        int(sd["tokenized_prompts_neg"].argmax()) == int(sd["tokenized_prompts_pos"].argmax()) + 1
    )


@needs_official
def test_released_prompts_refuse_a_tiny_model():
    with pytest.raises(CheckpointError, match="do not fit"):
        create_model("tiny", prompts=OFFICIAL / "trained_on_mvtec_crane" / "epoch_5.pth")


def _dinov2_original_format(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """timm → facebookresearch/dinov2 layout (register_tokens, mask_token, class pos)."""
    out = {}
    for k, v in model.state_dict().items():
        if k == "reg_token":
            out["register_tokens"] = v.clone()
        elif k == "pos_embed":
            out["pos_embed"] = torch.cat([torch.randn(1, 1, v.shape[-1]) * 0.02, v], dim=1)
        else:
            out[k] = v.clone()
    out["mask_token"] = torch.zeros(1, out["cls_token"].shape[-1])
    return out


@needs_official
def test_full_size_crane_plus_end_to_end_from_original_formats(tmp_path, monkeypatch, caplog):
    """Random full-size ViT-L/14-336 (OpenAI state dict) and DINOv2-B/14-reg4 (original format)
    load through the real local-file paths, with released prompts, on one 518×518 image."""
    monkeypatch.setenv(W.CACHE_ENV, str(tmp_path / "cache"))
    monkeypatch.setenv("CRANE_OFFLINE", "1")
    torch.manual_seed(5)
    clip = open_clip.create_model("ViT-L-14-336-quickgelu", pretrained=None)
    clip_sd = clip.state_dict()
    torch.save(clip_sd, tmp_path / "ViT-L-14-336px.pt")
    probe_clip = clip_sd["visual.transformer.resblocks.3.attn.in_proj_weight"].clone()
    del clip, clip_sd
    dino = timm.create_model(
        "vit_base_patch14_reg4_dinov2", pretrained=False, img_size=518, num_classes=0
    )
    dino_sd = _dinov2_original_format(dino)
    torch.save(dino_sd, tmp_path / "dinov2_vitb14_reg4_pretrain.pth")
    probe_dino = dino_sd["blocks.7.mlp.fc1.weight"].clone()
    # The same layout saved without its (inference-unused) mask token loads alike.
    del dino_sd["mask_token"]
    torch.save(dino_sd, tmp_path / "no_mask_token.pth")
    from crane.models.backbones import build_dino

    unmasked = build_dino(get_config("crane+"), tmp_path / "no_mask_token.pth")
    assert torch.equal(unmasked.blocks[7].mlp.fc1.weight, probe_dino)
    assert torch.equal(unmasked.reg_token, dino_sd["register_tokens"])
    del dino, dino_sd, unmasked

    monkeypatch.setenv(W.DINO_ENV, str(tmp_path / "dinov2_vitb14_reg4_pretrain.pth"))
    model = create_model(
        "crane+",
        clip_weights=tmp_path / "ViT-L-14-336px.pt",
        prompts=OFFICIAL / "trained_on_mvtec_cranep" / "epoch_5.pth",
    )
    vis = model.vision
    assert torch.equal(vis.visual.transformer.resblocks[3].attn.in_proj_weight, probe_clip)
    assert torch.equal(vis.dino.blocks[7].mlp.fc1.weight, probe_dino)
    assert vis.visual.positional_embedding.shape == (37 * 37 + 1, 1024)
    released = load_released_prompts(OFFICIAL / "trained_on_mvtec_cranep" / "epoch_5.pth")
    assert torch.equal(model.prompt_learner.ctx_neg, released["ctx_neg"])
    assert torch.equal(model.prompt_learner.token_suffix_neg, released["token_suffix_neg"])
    x = torch.randn(1, 3, 518, 518)
    with torch.no_grad():
        inner = model.encode_images(x)
        out = model.predict_from_features(inner, 518)
    assert inner.patch_sets.shape == (2, 1, 1369, 768)
    assert out.anomaly_maps.shape == (1, 518, 518) and out.image_scores.shape == (1,)
    for t in (out.anomaly_maps, out.image_scores):
        assert torch.isfinite(t).all() and t.min() >= 0 and t.max() <= 1
    # Built for bf16 inference: CLIP's matmul weights converted as the file is read are the
    # values casting the fp32 model gives, and every other tensor is the fp32 model's.
    low = create_model(
        "crane+",
        clip_weights=tmp_path / "ViT-L-14-336px.pt",
        prompts=OFFICIAL / "trained_on_mvtec_cranep" / "epoch_5.pth",
        matmul_dtype=torch.bfloat16,
    )
    assert low.matmul_dtype is torch.bfloat16
    cast = {id(w) for w in clip_matmul_weights(low.vision.visual)}
    # (build_clip itself made them in bf16: no fp32 copy came first)
    clip = build_clip(low.cfg, tmp_path / "ViT-L-14-336px.pt", True, torch.bfloat16)
    assert {w.dtype for w in clip_matmul_weights(clip.visual)} == {torch.bfloat16}
    del clip
    assert len(cast) == 1 + 3 * 24
    reference = dict(model.named_parameters())
    for name, w in low.named_parameters():
        want = reference[name].to(torch.bfloat16) if id(w) in cast else reference[name]
        assert w.dtype == want.dtype and torch.equal(w, want), name
    # DINOv2 overrides build a random DINOv2 (the weight file is not read): said, not silent.
    with caplog.at_level(logging.WARNING):
        odd = create_model(
            "crane+", clip_weights=tmp_path / "ViT-L-14-336px.pt", dino_overrides={"depth": 8}
        )
    assert "dino_overrides {'depth': 8}: DINOv2 is built randomly initialised" in caplog.text
    assert len(odd.vision.dino.blocks) == 8
    assert not torch.equal(odd.vision.dino.blocks[7].mlp.fc1.weight, probe_dino)


def _tiny_dino():
    return timm.create_model(
        "vit_base_patch14_reg4_dinov2", pretrained=False, img_size=56, num_classes=0, **TINY_DINO
    ).eval()


@pytest.mark.parametrize("build", [_tiny_clip, _tiny_dino], ids=["clip", "dino"])
def test_backbone_built_without_random_init_equals_the_loaded_one(build, tmp_path):
    """A module built under no_random_init and then loaded is the module the normal build
    loads: every parameter, every buffer (CLIP's non-persistent causal mask included), the
    requires_grad flags and the forward output."""
    torch.manual_seed(0)
    reference = build()
    torch.save(reference.state_dict(), tmp_path / "w.pt")
    with W.no_random_init():
        fast = build()
    W.load_into(fast, W.load_state_dict_file(tmp_path / "w.pt"), tmp_path / "w.pt", "test")
    ref_tensors = dict(reference.named_parameters()) | dict(reference.named_buffers())
    fast_tensors = dict(fast.named_parameters()) | dict(fast.named_buffers())
    assert ref_tensors.keys() == fast_tensors.keys()
    for name, tensor in ref_tensors.items():
        assert torch.equal(tensor, fast_tensors[name]), name
        assert tensor.requires_grad == fast_tensors[name].requires_grad, name
    if build is _tiny_clip:
        assert "attn_mask" in dict(reference.named_buffers())
        x = (torch.randn(2, 3, 112, 112), open_clip.get_tokenizer("ViT-L-14-336-quickgelu")(["a"]))
        with torch.no_grad():
            for a, b in zip(reference(*x), fast(*x), strict=True):
                assert torch.equal(a, b)
    else:
        x = torch.randn(2, 3, 56, 56)
        with torch.no_grad():
            assert torch.equal(reference(x), fast(x))


def test_no_random_init_skips_parameter_initialisers_only():
    def layers():
        return torch.nn.Sequential(
            torch.nn.Linear(64, 64), torch.nn.LayerNorm(64), torch.nn.MultiheadAttention(64, 4)
        )

    state = torch.random.get_rng_state()
    with W.no_random_init():
        built = layers()
        assert torch.equal(torch.random.get_rng_state(), state)  # no random numbers drawn
        plain = torch.zeros(1000).uniform_()  # a plain tensor is still filled
        assert plain.min() >= 0 and plain.max() <= 1 and plain.std() > 0.2
        built[0].weight.requires_grad_(False)  # metadata changes still apply
        assert not built[0].weight.requires_grad
    layers()
    assert not torch.equal(torch.random.get_rng_state(), state)  # drawn again outside
    after = torch.nn.Parameter(torch.zeros(1000))
    torch.nn.init.ones_(after)
    assert torch.equal(after, torch.ones(1000))


def test_no_random_init_applies_to_its_own_thread_only():
    torch.manual_seed(3)
    expected = torch.nn.Linear(32, 32).weight.detach().clone()
    got = {}

    def other_thread():
        torch.manual_seed(3)
        got["weight"] = torch.nn.Linear(32, 32).weight.detach().clone()

    with W.no_random_init():
        worker = threading.Thread(target=other_thread)
        worker.start()
        worker.join()
    assert torch.equal(got["weight"], expected)


def test_weight_files_are_memory_mapped_then_copied(tmp_path):
    """Plain torch files are read memory-mapped (no second full-size copy) and load_into
    copies the values, so the model no longer depends on the file; files in torch's legacy
    (pre-1.6) format still load."""
    torch.manual_seed(1)
    src = _tiny_clip()
    path = tmp_path / "clip.pt"
    torch.save(src.state_dict(), path)
    sd = W.load_state_dict_file(path)
    maps = Path("/proc/self/maps")
    if maps.exists():
        assert str(path) in maps.read_text()
    dst = _tiny_clip()
    W.load_into(dst, sd, path, "CLIP")
    del sd
    torch.save({k: torch.zeros_like(v) for k, v in src.state_dict().items()}, path)
    path.unlink()
    for (k, a), (_, b) in zip(src.state_dict().items(), dst.state_dict().items(), strict=True):
        assert torch.equal(a, b), k

    legacy = tmp_path / "legacy.pt"
    torch.save(src.state_dict(), legacy, _use_new_zipfile_serialization=False)
    sd = W.load_state_dict_file(legacy)
    assert all(torch.equal(sd[k], v) for k, v in src.state_dict().items())


def _hub_snapshot(cache: Path, repo_id: str, filename: str, revision: str = "0123abcd") -> Path:
    """The Hugging Face hub cache layout a download leaves (models--org--name/refs/main,
    snapshots/<revision>/<file>); returns the file's path, to be written by the caller."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / "main").write_text(revision)
    path = repo / "snapshots" / revision / filename
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


def test_offline_build_uses_the_download_an_online_run_left(tmp_path, monkeypatch):
    """timm/open_clip download into the hub layout under the cache directory; an offline run
    afterwards builds from that copy (full-size DINOv2, timm's safetensors) instead of failing."""
    from safetensors.torch import save_file

    from crane.models.backbones import _dino_hub, build_dino

    cfg = get_config("crane+")
    monkeypatch.setenv(W.CACHE_ENV, str(tmp_path / "cache"))
    monkeypatch.setenv("CRANE_OFFLINE", "1")
    monkeypatch.delenv(W.DINO_ENV, raising=False)
    with pytest.raises(WeightsError, match="--dino-weights"):
        build_dino(cfg)  # nothing cached yet
    torch.manual_seed(2)
    dino = timm.create_model(
        "vit_base_patch14_reg4_dinov2", pretrained=False, img_size=518, num_classes=0
    )
    repo_id, names = _dino_hub(cfg)
    assert repo_id == "timm/vit_base_patch14_reg4_dinov2.lvd142m" and "model.safetensors" in names
    save_file(dict(dino.state_dict()), str(_hub_snapshot(tmp_path / "cache", repo_id, names[0])))
    built = build_dino(cfg)
    for name, tensor in dino.state_dict().items():
        assert torch.equal(built.state_dict()[name], tensor), name


def test_clip_weights_found_in_crane_then_default_hub_cache(tmp_path, monkeypatch):
    import huggingface_hub.constants

    from crane.models.backbones import _clip_hub

    repo_id, names = _clip_hub(get_config("crane+"))
    assert repo_id == "timm/vit_large_patch14_clip_336.openai"
    assert names == ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")
    monkeypatch.setenv(W.CACHE_ENV, str(tmp_path / "crane"))
    monkeypatch.delenv(W.CLIP_ENV, raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hf"))

    def resolve():
        hub = (repo_id, names)
        return W.resolve_local(None, W.CLIP_ENV, W.CLIP_FILENAMES, "--clip-weights", "CLIP", hub)

    assert resolve() is None
    in_default = _hub_snapshot(tmp_path / "hf", repo_id, names[1])
    in_default.write_bytes(b"x")
    assert resolve() == in_default
    in_crane = _hub_snapshot(tmp_path / "crane", repo_id, names[0])
    in_crane.write_bytes(b"x")
    assert resolve() == in_crane  # crane's own cache first
    flat = tmp_path / "crane" / W.CLIP_FILENAMES[0]
    flat.write_bytes(b"x")
    assert resolve() == flat  # a file under its published name before any hub copy


def test_a_dinov2_file_without_registers_gets_a_clear_error(tmp_path):
    """The original DINOv2-B/14 file *without* registers (an easy mix-up with the _reg4_ one)
    failed inside timm's position-embedding resize with a bare RuntimeError."""
    from crane.errors import WeightsError
    from crane.models.backbones import build_dino

    torch.manual_seed(0)
    plain = timm.create_model("vit_base_patch14_dinov2", pretrained=False, img_size=518)
    torch.save(_dinov2_original_format(plain), tmp_path / "dinov2_vitb14_pretrain.pth")
    del plain
    with pytest.raises(WeightsError, match=r"dinov2_vitb14_pretrain\.pth does not fit.*reg4"):
        build_dino(get_config("crane+"), tmp_path / "dinov2_vitb14_pretrain.pth")


def test_a_dinov2_file_for_another_image_size_is_named_when_resampled(tmp_path, caplog):
    """timm resamples a file's position embeddings to the model's grid with an INFO line: a
    file saved at 224 px (16x16) gave a 518-px model other features without a word. The
    published 37x37 grid resampled for another --image-size is DINOv2's own way: no warning."""
    from crane.models.backbones import build_dino

    torch.manual_seed(0)
    for px in (224, 518):
        m = timm.create_model("vit_base_patch14_reg4_dinov2", pretrained=False, img_size=px)
        torch.save(m.state_dict(), tmp_path / f"dino_{px}.pth")
    del m
    with caplog.at_level(logging.WARNING, logger="crane.models.backbones"):
        build_dino(get_config("crane+"), tmp_path / "dino_224.pth")
    assert "dino_224.pth: DINOv2 position embeddings for a 16x16 patch grid (224-px" in caplog.text
    assert "resampled to this model's 37x37" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="crane.models.backbones"):
        small = build_dino(get_config("crane+", image_size=224), tmp_path / "dino_518.pth")
        build_dino(get_config("crane+"), tmp_path / "dino_518.pth")
        build_dino(get_config("crane+", image_size=224), tmp_path / "dino_224.pth")  # (its own)
    assert small.pos_embed.shape[1] == 16 * 16 and not caplog.records


def test_clip_overrides_on_a_pretrained_preset_say_the_backbones_are_random(caplog):
    """clip_overrides build both backbones randomly initialised: the weight files (and their
    environment variables) are never read, which went without a word for crane+."""
    six = {**TINY_CLIP, "vision_cfg": {**TINY_CLIP["vision_cfg"], "layers": 6}}
    small = dict(image_size=56, feature_layers=(6,), n_deep=2)
    plus = dict(small, dattn_layer=6, dino_overrides=TINY_DINO)
    with caplog.at_level(logging.WARNING, logger="crane.models.factory"):
        create_model("crane+", clip_overrides=six, **plus)
    assert "clip_overrides" in caplog.text
    assert "randomly initialised (CLIP and DINOv2)" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="crane.models.factory"):
        create_model("crane", clip_overrides=six, **small)
    assert "randomly initialised (CLIP), not from pretrained weights" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="crane.models.factory"):
        create_model("crane", pretrained=False, clip_overrides=six, **small)
        create_model("tiny", clip_overrides=six, **small)
    assert not caplog.records


def test_backbone_overrides_use_file_names_of_their_own(tmp_path, monkeypatch):
    """Another dino_model / clip_model is not offered the presets' files from the cache folder
    (a ViT-S DINOv2 was handed the ViT-B file), and the offline error names its own files."""
    from crane.models.backbones import build_dino, clip_filenames, dino_filenames

    monkeypatch.setenv(W.CACHE_ENV, str(tmp_path))
    monkeypatch.setenv("CRANE_OFFLINE", "1")
    small = get_config("crane+", dino_model="vit_small_patch14_reg4_dinov2.lvd142m")
    (tmp_path / W.DINO_FILENAMES[0]).write_bytes(b"the ViT-B file")  # (never opened)
    with pytest.raises(WeightsError, match="needs the file vit_small_patch14_reg4_dinov2"):
        build_dino(small)
    assert dino_filenames(get_config("crane+")) == W.DINO_FILENAMES
    assert clip_filenames(get_config("crane")) == W.CLIP_FILENAMES
    other = get_config("crane", clip_model="ViT-B-16", clip_pretrained="openai")
    assert clip_filenames(other)[0] == "ViT-B-16-openai.safetensors"
