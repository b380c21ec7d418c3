"""Model tests on the tiny presets (CPU): each compares against an independent computation."""

from __future__ import annotations

import math

import numpy as np
import open_clip
import pytest
import torch
import torch.nn.functional as F
from scipy.ndimage import gaussian_filter

from crane.config import ATTN_TYPES, CraneConfig, get_config, list_models
from crane.errors import CheckpointError, CraneError
from crane.models import create_model, save_model, scoring
from crane.models.vision import clip_mlp, dattn_weights

torch.set_grad_enabled(True)


@pytest.fixture(scope="module")
def tiny_plus():
    return create_model("tiny+")


@pytest.fixture(scope="module")
def images():
    g = torch.Generator().manual_seed(1)
    return torch.randn(3, 3, 224, 224, generator=g)


def clip_of(model):
    return model.text_encoder.clip


def test_registry_lists_presets():
    assert {"crane", "crane+", "tiny", "tiny+"} <= set(list_models())
    with pytest.raises(CraneError, match="unknown model preset 'nope'; presets: "):
        get_config("nope")
    with pytest.raises(CraneError, match=r"as a run directory: no such folder"):
        create_model("./runs/missing")
    with pytest.raises(CraneError, match="attn_type"):
        get_config("tiny", attn_type="xx")
    with pytest.raises(
        CraneError, match="unknown config fields attntype, bogus; the fields are name,"
    ):
        create_model("tiny", attntype="vv", bogus=1)
    with pytest.raises(CraneError, match="unknown config field bogus; the fields are name,"):
        CraneConfig.from_dict({**get_config("tiny").to_dict(), "bogus": 1})
    assert CraneConfig.from_dict(get_config("tiny+").to_dict()) == get_config("tiny+")


def test_tiny_build_is_deterministic(images):
    a, b = create_model("tiny+"), create_model("tiny+")
    with torch.no_grad():
        oa, ob = a(images), b(images)
    assert torch.equal(oa.anomaly_maps, ob.anomaly_maps)
    assert torch.equal(oa.image_scores, ob.image_scores)


def test_global_feature_equals_open_clip(tiny_plus, images):
    clip = clip_of(tiny_plus)
    with torch.no_grad():
        ours = tiny_plus.encode_images(images).global_feat
        ref = clip.encode_image(images, normalize=True)
    assert ours.shape == ref.shape
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-5)


def _quick_gelu_mlp(width=32, act=None, seed=0):
    torch.manual_seed(seed)
    block = open_clip.transformer.ResidualAttentionBlock(
        width, 4, act_layer=act or open_clip.transformer.QuickGELU
    )
    return block.mlp


def test_clip_mlp_equals_open_clip_mlp():
    mlp = _quick_gelu_mlp()
    x = torch.randn(2, 7, 32) * 3
    with torch.no_grad():
        ref = mlp(x)
        ours = clip_mlp(mlp, x)
        naive = mlp.c_proj(
            (lambda h: h * torch.sigmoid(1.702 * h))(x @ mlp.c_fc.weight.t() + mlp.c_fc.bias)
        )
    assert ours.shape == ref.shape == (2, 7, 32)
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ours, naive, atol=1e-5, rtol=1e-5)
    # A non-contiguous input (the cls-only slice of the last block) goes the same way.
    with torch.no_grad():
        torch.testing.assert_close(clip_mlp(mlp, x[:, :1]), mlp(x[:, :1]), atol=1e-5, rtol=1e-5)


def test_clip_mlp_gradients_and_autocast():
    mlp = _quick_gelu_mlp(seed=1)
    x = torch.randn(3, 5, 32, requires_grad=True)
    clip_mlp(mlp, x).pow(2).sum().backward()  # in-place SiLU must not break autograd
    g_ours, x.grad = x.grad.clone(), None
    mlp(x).pow(2).sum().backward()
    torch.testing.assert_close(g_ours, x.grad, atol=1e-5, rtol=1e-4)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        low, ref = clip_mlp(mlp, x), mlp(x)
    assert low.dtype == ref.dtype == torch.bfloat16
    torch.testing.assert_close(low.float(), ref.float(), atol=3e-2, rtol=3e-2)


def test_vision_loop_takes_the_one_silu_mlp(tiny_plus, images):
    """The model's CLIP blocks qualify: their QuickGELU modules never run."""
    calls = []
    blocks = tiny_plus.vision.visual.transformer.resblocks
    hooks = [b.mlp.register_forward_hook(lambda *a: calls.append(1)) for b in blocks]
    try:
        with torch.no_grad():
            tiny_plus.encode_images(images[:1])
    finally:
        for h in hooks:
            h.remove()
    assert calls == []


def test_clip_mlp_leaves_other_mlps_to_their_modules():
    mlp = _quick_gelu_mlp(act=torch.nn.GELU)
    x = torch.randn(2, 4, 32)
    with torch.no_grad():
        assert torch.equal(clip_mlp(mlp, x), mlp(x))
    mlp = _quick_gelu_mlp()
    mlp.c_fc.bias = None
    with torch.no_grad():
        assert torch.equal(clip_mlp(mlp, x), mlp(x))


def _explicit_eattn_sets(model, images, attn_type):
    """SPEC §3 written out with explicit softmax matrices, driven by open_clip's own forward.

    Hidden states h_{l-1} are captured with hooks on the unmodified module.
    """
    clip = clip_of(model)
    cfg = model.cfg
    inputs = []
    hooks = [
        blk.register_forward_pre_hook(lambda m, args, kw=None: inputs.append(args[0].clone()))
        for blk in clip.visual.transformer.resblocks
    ]
    with torch.no_grad():
        clip.encode_image(images)
    for h in hooks:
        h.remove()
    z = inputs[cfg.eattn_start - 1]
    out = {}
    for idx in range(cfg.eattn_start, len(inputs) + 1):
        blk = clip.visual.transformer.resblocks[idx - 1]
        y = blk.ln_1(inputs[idx - 1])
        qkv = y @ blk.attn.in_proj_weight.t() + blk.attn.in_proj_bias
        nh = blk.attn.num_heads
        b, n, d3 = qkv.shape
        q, k, v = (t.reshape(b, n, nh, -1).transpose(1, 2) for t in qkv.chunk(3, -1))
        dh = q.shape[-1]
        src = {"qq": q, "kk": k, "vv": v}
        a = sum(
            torch.softmax(src[p] @ src[p].transpose(-1, -2) / math.sqrt(dh), -1)
            for p in attn_type.split("+")
        )
        hv = (a @ v).transpose(1, 2).reshape(b, n, -1)
        z = z + hv @ blk.attn.out_proj.weight.t() + blk.attn.out_proj.bias
        out[idx] = z[:, 1:]
    return {
        k: F.normalize(clip.visual.ln_post(v) @ clip.visual.proj, dim=-1) for k, v in out.items()
    }


@pytest.mark.parametrize("attn_type", ATTN_TYPES)
def test_eattn_equals_explicit_softmax(images, attn_type):
    model = create_model("tiny", attn_type=attn_type, feature_layers=(2, 3, 4))
    with torch.no_grad():
        sets = model.encode_images(images).patch_sets
        ref = _explicit_eattn_sets(model, images, attn_type)
    for i, layer in enumerate((2, 3, 4)):
        torch.testing.assert_close(sets[i], ref[layer], atol=1e-5, rtol=1e-5)


def test_text_features_equal_encode_text_of_template():
    model = create_model("tiny", n_deep=0)
    clip = clip_of(model)
    tok = open_clip.get_tokenizer(model.cfg.clip_model)
    x_id = tok(["X"])[0, 1]
    with torch.no_grad():
        x_emb = clip.token_embedding.weight[x_id]
        model.prompt_learner.ctx_pos.copy_(x_emb.expand_as(model.prompt_learner.ctx_pos))
        model.prompt_learner.ctx_neg.copy_(x_emb.expand_as(model.prompt_learner.ctx_neg))
        ours = model.text_features()
        ref = clip.encode_text(
            tok(["X X X X X X X X X X X X object.", "X X X X X X X X X X X X damaged object."]),
            normalize=True,
        )
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-5)


def test_deep_tokens_change_text_and_are_fp16_rounded():
    model = create_model("tiny")
    with torch.no_grad():
        base = model.text_features()
        # Moving a deep token by less than fp16 resolution changes nothing (reference quirk).
        tok = torch.randn(4, 64, generator=torch.Generator().manual_seed(0)).half().float()
        model.prompt_learner.compound_prompts_text[0].copy_(tok)
        a = model.text_features()
        # 1e-5 relative is below fp16's resolution (about 5e-4 relative)
        model.prompt_learner.compound_prompts_text[0].copy_(tok * (1 + 1e-5))
        b = model.text_features()
        model.prompt_learner.compound_prompts_text[0].copy_(torch.randn(4, 64))
        c = model.text_features()
    assert not torch.allclose(base, a)
    assert torch.equal(a, b)
    assert not torch.allclose(a, c)


def test_image_context_inserts_one_token_and_shifts_eot():
    model = create_model("tiny")
    pl = model.prompt_learner
    g = F.normalize(torch.randn(2, 64), dim=-1)
    emb, eot = pl.prompts(g)
    emb0, eot0 = pl.prompts()
    assert emb.shape == (2, 2, 77, 64)
    assert torch.equal(eot, (eot0 + 1).expand(2, 2))
    n = model.cfg.n_ctx
    assert torch.equal(emb[1, 0, 1 + n], g[1])  # right after the learnable tokens
    assert torch.equal(emb[0, 1, 2 + n :], emb0[1, 1 + n : -1])  # suffix shifted by one


def test_dattn_per_image_independent_of_batch(images):
    model = create_model("tiny+")
    with torch.no_grad():
        alone = model(images[:1])
        together = model(images)
    torch.testing.assert_close(
        alone.anomaly_maps[0], together.anomaly_maps[0], atol=1e-5, rtol=1e-5
    )
    torch.testing.assert_close(
        alone.image_scores[0], together.image_scores[0], atol=1e-6, rtol=1e-5
    )


def test_dattn_batch_scope_matches_reference_formula_by_hand():
    # Two images, three 2-d tokens each (already unit norm).
    f = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [0.6, 0.8]], [[1.0, 0.0], [1.0, 0.0], [0.8, 0.6]]])
    s = torch.einsum("bmc,bnc->bmn", f, f)
    # Reference: mean over the whole batch tensor, S' = 3(S - 1.2 mean), S' < 0 -> -inf.
    m = s.mean()
    sp = 3 * (s - 1.2 * m)
    sp[sp < 0] = float("-inf")
    ref = torch.softmax(sp, -1)
    ours = dattn_weights(f, 3.0, 1.2, "batch")
    torch.testing.assert_close(ours, ref)
    # Worked value: image 0, row 0 keeps S=1 and S=0.6 (mean = 0.7533.. → cut at 0.904):
    assert float(m) == pytest.approx(
        (1 + 0 + 0.6 + 0 + 1 + 0.8 + 0.6 + 0.8 + 1 + 1 + 1 + 0.8 + 1 + 1 + 0.8 + 0.8 + 0.8 + 1) / 18
    )
    assert ours[0, 0, 1] == 0 and ours[0, 0, 2] == 0 and ours[0, 0, 0] == 1
    # Per-image scope differs for image 0 (its own mean is lower) and never depends on image 1.
    per = dattn_weights(f, 3.0, 1.2, "image")
    torch.testing.assert_close(per[:1], dattn_weights(f[:1], 3.0, 1.2, "image"))
    assert not torch.allclose(per, ours)


def test_only_prompts_get_gradients(images):
    model = create_model("tiny+")
    model.train()
    before = {
        k: v.clone() for k, v in model.state_dict().items() if not k.startswith("prompt_learner")
    }
    opt = torch.optim.Adam(model.trainable_parameters(), lr=1e-2)
    vis = model.encode_images(images)
    out = model.forward_train(vis)
    loss = out.patch_logits.softmax(-1)[..., 1].mean() + F.cross_entropy(
        out.image_logits, torch.tensor([0, 1, 1])
    )
    loss.backward()
    trainable = {id(p) for p in model.trainable_parameters()}
    for name, p in model.named_parameters():
        if id(p) in trainable:
            assert p.grad is not None and p.grad.abs().sum() > 0, name
        else:
            assert p.grad is None and not p.requires_grad, name
    opt.step()
    after = model.state_dict()
    for k, v in before.items():
        assert torch.equal(v, after[k]), k
    assert sum(p.numel() for p in model.trainable_parameters()) == 2 * 12 * 64 + 2 * 4 * 64


def test_full_size_trainable_count_matches_spec():
    # 43,008 = 2*12*768 + 8*4*768 (SPEC §4); counted from the config, no model built.
    cfg = get_config("crane+")
    assert 2 * cfg.n_ctx * 768 + cfg.n_deep * cfg.deep_len * 768 == 43008


@pytest.mark.parametrize(
    ("shape", "sigma"),
    [((518, 518), 4), ((37, 37), 4), ((5, 40), 4), ((2, 3, 64, 64), 4), ((37, 37), 1.4),
     ((37, 37), 2.4)],
)  # fmt: skip
def test_torch_gaussian_matches_scipy(shape, sigma):
    """(Other sigmas too: scipy's radius is int(4σ + 0.5), which 4 alone cannot tell apart
    from int(4σ).)"""
    rng = np.random.default_rng(0)
    x = rng.random(shape)
    ours = scoring.gaussian_blur(torch.from_numpy(x), sigma=sigma).numpy()
    if len(shape) == 2:
        ref = gaussian_filter(x, sigma=sigma)
    else:  # scipy on each map, as the reference does
        ref = np.stack([[gaussian_filter(m, sigma=sigma) for m in row] for row in x])
    np.testing.assert_allclose(ours, ref, atol=1e-12)
    ours32 = scoring.gaussian_blur(torch.from_numpy(x).float(), sigma=sigma).numpy()
    np.testing.assert_allclose(ours32, ref, atol=1e-5)


def test_map_combinations_match_reference_order():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 3, 16, 2, generator=g) * 3

    def up(t):
        t = F.interpolate(t.view(-1, 1, 4, 4), size=(12, 12), mode="bilinear", align_corners=False)
        return t.view(2, 3, 12, 12)

    soft = torch.stack([up(torch.softmax(logits, -1)[..., c]) for c in range(2)], -1).mean(0)[
        ..., 1
    ]
    torch.testing.assert_close(scoring.anomaly_map(logits, 12, "soft_mean"), soft)
    lm = torch.stack([up(logits[..., c]) for c in range(2)], -1).mean(0).softmax(-1)[..., 1]
    torch.testing.assert_close(scoring.anomaly_map(logits, 12, "logit_mean"), lm)


def test_outputs_in_unit_interval_and_shapes(tiny_plus, images):
    with torch.no_grad():
        out = tiny_plus(images)
    assert out.anomaly_maps.shape == (3, 224, 224)
    assert out.image_scores.shape == (3,)
    for t in (out.anomaly_maps, out.image_scores):
        assert torch.isfinite(t).all() and t.min() >= 0 and t.max() <= 1


def test_static_text_cache_tracks_prompt_changes(images):
    model = create_model("tiny")
    with torch.no_grad():
        a = model.static_text_features()
        assert model.static_text_features() is a
        model.prompt_learner.ctx_neg.add_(0.5)
        b = model.static_text_features()
    assert not torch.allclose(a, b)
    torch.testing.assert_close(b, model.text_features())


def test_static_text_cache_sees_writes_that_bypass_version_counters(images):
    """``.data`` writes and torch's fused Adam leave the version counters as they were."""
    model = create_model("tiny").eval()
    with torch.no_grad():
        a = model.static_text_features()
        for p in model.prompt_learner.parameters():
            p.data.mul_(-1)  # (CPU prompts: their values are compared)
        b = model.static_text_features()
        torch.testing.assert_close(b, model.text_features())
        assert not torch.allclose(a, b)
    opt = torch.optim.AdamW(model.trainable_parameters(), lr=0.1, fused=True)
    versions = [p._version for p in model.trainable_parameters()]
    model.train()
    out = model.forward_train(model.encode_images(images[:1]))
    out.image_logits.logsumexp(-1).sum().backward()
    opt.step()
    assert [p._version for p in model.trainable_parameters()] == versions  # (the torch quirk)
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(model.static_text_features(), model.text_features())
        assert not torch.allclose(model.static_text_features(), b)
        c = model.static_text_features()
        model.prompt_learner.ctx_pos.data.zero_()
        model.clear_text_cache()
        assert not torch.allclose(model.static_text_features(), c)


@pytest.mark.parametrize("seed", [0, 111])
def test_checkpoint_round_trip_exact(tmp_path, images, seed):
    """Also the random backbones of a tiny preset: a run trained with ``--seed 111`` (crane
    train's default) reloads the backbones it was trained with, not seed 0's."""
    model = create_model("tiny+", seed=seed)
    with torch.no_grad():
        for p in model.prompt_learner.parameters():
            p.add_(torch.randn_like(p))
    model.image_threshold = 0.37
    save_model(model, tmp_path / "run", epoch=3)
    loaded = create_model(str(tmp_path / "run"))
    for (k, a), (_, b) in zip(
        model.prompt_learner.state_dict().items(),
        loaded.prompt_learner.state_dict().items(),
        strict=True,
    ):
        assert torch.equal(a, b), k
    assert loaded.image_threshold == 0.37 and loaded.cfg == model.cfg
    assert loaded.backbone_seed == seed
    for (k, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items(), strict=True):
        assert torch.equal(a, b), k
    with torch.no_grad():
        torch.testing.assert_close(
            loaded(images).anomaly_maps, model(images).anomaly_maps, atol=0, rtol=0
        )
    with pytest.raises(CheckpointError, match="already holds"):
        save_model(model, tmp_path / "run")
    # safetensors + JSON only: nothing to unpickle
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == [
        "config.json",
        "prompts.safetensors",
    ]


def test_checkpoint_shape_mismatch_is_clear(tmp_path):
    small = create_model("tiny")
    save_model(small, tmp_path / "t")
    with pytest.raises(CheckpointError, match="do not fit"):
        create_model("tiny", n_ctx=6, prompts=str(tmp_path / "t"))


def test_model_cast_to_bf16_still_scores_in_fp32(images):
    """create_model(dtype=bfloat16) runs the backbones in bf16; scores and maps stay fp32 and
    close to the fp32 model (measured: maps within 1.3e-2, scores within 7e-3)."""
    x = images[:, :, :112, :112]
    low = create_model("tiny+", image_size=112, dtype=torch.bfloat16)
    ref = create_model("tiny+", image_size=112)
    with torch.no_grad():
        a, b = low(x), ref(x)
    assert a.anomaly_maps.dtype == torch.float32 and a.image_scores.dtype == torch.float32
    assert (a.anomaly_maps - b.anomaly_maps).abs().max() < 3e-2
    assert (a.image_scores - b.image_scores).abs().max() < 3e-2


@pytest.mark.parametrize("preset", ["tiny", "tiny+"])
def test_images_of_another_size_are_refused(preset):
    """Without DINOv2 a 230-px image in a 224 model used to run, its last 6 pixel rows and
    columns silently dropped by the patch convolution, and still gave a 230-px map."""
    model = create_model(preset, image_size=112)
    with torch.no_grad():
        assert model(torch.randn(1, 3, 112, 112)).anomaly_maps.shape == (1, 112, 112)
        for shape in ((1, 3, 118, 118), (1, 3, 112, 118), (1, 1, 112, 112)):
            with pytest.raises(ValueError, match=r"takes \(B, 3, 112, 112\) images"):
                model(torch.randn(*shape))


def test_a_model_built_and_run_under_inference_mode():
    """Prompt tensors made under torch.inference_mode have no version counter, which the
    static text cache keys on: such a model still scores, as one built outside it."""
    x = torch.randn(2, 3, 56, 56, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        want = create_model("tiny", image_size=56, seed=5).eval()(x)
    with torch.inference_mode():
        model = create_model("tiny", image_size=56, seed=5).eval()
        got = model(x)
        again = model(x)
    torch.testing.assert_close(got.image_scores, want.image_scores, rtol=0, atol=1e-6)
    torch.testing.assert_close(got.anomaly_maps, want.anomaly_maps, rtol=0, atol=1e-6)
    assert torch.equal(again.anomaly_maps, got.anomaly_maps)


def test_backbone_layers_and_patches_are_checked_where_they_matter():
    """D-Attn's layer is checked only where D-Attn runs (a 6-block CLIP serves ``crane`` with
    its unused default dattn_layer 24); a backbone whose patches are not 14 px, the grid the
    config computes, is refused at build time instead of failing at the first forward."""
    import copy

    from crane.config import TINY_CLIP

    six = copy.deepcopy(TINY_CLIP)
    six["vision_cfg"]["layers"] = 6
    model = create_model(
        "crane", pretrained=False, clip_overrides=six, image_size=56, feature_layers=(6,), n_deep=2
    )
    assert model.cfg.dattn_layer == 24 and not model.cfg.use_dattn
    assert model(torch.randn(1, 3, 56, 56)).anomaly_maps.shape == (1, 56, 56)
    with pytest.raises(CraneError, match=r"config layers \[24\]"):
        create_model("crane+", pretrained=False, clip_overrides=six, image_size=56,
                     dino_overrides={"depth": 2, "embed_dim": 64, "num_heads": 2},
                     feature_layers=(6,), n_deep=2)  # fmt: skip

    sixteen = copy.deepcopy(TINY_CLIP)
    sixteen["vision_cfg"]["patch_size"] = 16
    with pytest.raises(CraneError, match="16×16-px patches; crane runs backbones with 14-px"):
        create_model("tiny", clip_overrides=sixteen, image_size=112)


def test_the_prompts_initialisation_depends_on_the_seed_not_on_how_backbones_are_built(
    monkeypatch,
):
    """A download builds the backbone with the library's random initialisation before
    loading the weights, a local or cached file without it: one seed gave two different
    starting prompts (the first ``crane train --seed`` on a machine trained from others)."""
    from crane.models import factory

    # (the learnable tensors: the template buffers come from the random tiny backbone)
    want = dict(create_model("tiny+", seed=7, image_size=56).prompt_learner.named_parameters())
    real_clip, real_dino = factory.build_clip, factory.build_dino

    def drawing_clip(*args, **kw):
        torch.randn(1000)  # what a download's random initialisation draws first
        return real_clip(*args, **kw)

    def drawing_dino(*args, **kw):
        torch.rand(77)
        return real_dino(*args, **kw)

    monkeypatch.setattr(factory, "build_clip", drawing_clip)
    monkeypatch.setattr(factory, "build_dino", drawing_dino)
    got = dict(create_model("tiny+", seed=7, image_size=56).prompt_learner.named_parameters())
    assert want.keys() == got.keys()
    for key in want:
        assert torch.equal(got[key], want[key]), key
    other = create_model("tiny+", seed=8, image_size=56).prompt_learner.ctx_pos
    assert not torch.equal(other, want["ctx_pos"])


@pytest.mark.parametrize(
    ("override", "says"),
    [
        ({"n_ctx": 100}, "does not fit CLIP's 77-token context"),
        ({"anomaly_template": "badly " * 70 + "damaged object."}, "neg prompt .* does not fit"),
        ({"deep_len": 13}, "deep_len <= n_ctx = 12"),
        ({"n_deep": 4}, r"n_deep <= 3"),  # (tiny's text tower has 4 layers)
    ],
)
def test_text_fields_that_cannot_fit_the_text_tower_are_refused(override, says):
    """They were cut silently (a template truncated away), unused (deep prompts past the
    tower) or failed at the first prediction with a shape error."""
    with pytest.raises(CraneError, match=says):
        create_model("tiny", **override)
    create_model("tiny", n_ctx=60, n_deep=3, deep_len=12)  # (what fits is built)


def test_api_mistakes_are_crane_errors(tmp_path):
    from pathlib import Path

    from crane.config import CraneConfig, get_config
    from crane.engine.predict import Detector

    for call, says in [
        (lambda: create_model("tiny", seed="7"), "seed must be an integer"),
        (lambda: create_model("tiny", seed=1.5), "seed must be an integer"),
        (lambda: create_model("tiny", device="gpu"), "unknown device 'gpu'"),
        (lambda: CraneConfig(image_size="224"), "image_size must be an integer"),
        (lambda: Detector(torch.nn.Linear(2, 2), device="cpu"), "got Linear"),
        (lambda: get_config(7), "named by a string"),
    ]:
        with pytest.raises(CraneError, match=says):
            call()
    assert get_config(Path("tiny")) == get_config("tiny")
    assert CraneConfig(feature_layers=[24], dattn_gamma=3).feature_layers == (24,)
    assert create_model("tiny", seed=np.int64(3)).backbone_seed == 3


def test_a_model_pickled_by_an_earlier_crane_loads(images):
    """Its threshold was a plain attribute and its text cache a pair (torch.save(model))."""
    from crane.models.crane import CraneModel

    model = create_model("tiny").eval()
    with torch.no_grad():
        want = model(images).image_scores
    state = dict(model.__dict__)
    del state["_threshold"]
    state["image_threshold"] = 0.4
    state["_text_cache"] = (("key",), model.text_features())
    state["threshold_not_used"] = 0.3
    del state["backbone_seed"], state["matmul_dtype"]  # (pickled before those existed)
    old = CraneModel.__new__(CraneModel)
    old.__setstate__(state)
    assert old.image_threshold == 0.4 and old.threshold_not_used[0] == 0.3
    assert old.backbone_seed is None and old.matmul_dtype is None
    with torch.no_grad():
        torch.testing.assert_close(old(images).image_scores, want, rtol=0, atol=0)


def test_a_template_override_is_not_undone_by_the_prompt_files_buffers(tmp_path):
    """The prompt file's template buffers (token ids, embeddings) replaced the ones built from
    an ``anomaly_template`` override: the same scores, and a saved copy claiming the new one."""
    from crane.models import save_model

    run = save_model(create_model("tiny", seed=3, image_size=56), tmp_path / "run")
    base = create_model(str(run))
    alt = create_model(str(run), anomaly_template="scratched metal object.")
    fresh = create_model("tiny", seed=3, image_size=56, anomaly_template="scratched metal object.")
    a, b, f = (m.prompt_learner for m in (alt, base, fresh))
    for name in ("tokenized_prompts_neg", "token_prefix_neg", "token_suffix_neg"):
        assert torch.equal(getattr(a, name), getattr(f, name)), name
    assert not torch.equal(a.tokenized_prompts_neg, b.tokenized_prompts_neg)
    for name in ("tokenized_prompts_pos", "token_suffix_pos", "ctx_neg", "ctx_pos"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name  # (the run's learned ones)
    x = torch.rand(2, 3, 56, 56, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert not torch.allclose(alt(x).image_scores, base(x).image_scores)
    # The same override through prompts= on a preset; without one, the file's buffers stay.
    scratched = "scratched metal object."
    again = create_model("tiny", seed=3, image_size=56, prompts=run, anomaly_template=scratched)
    assert torch.equal(again.prompt_learner.token_suffix_neg, f.token_suffix_neg)
    kept = create_model("tiny", seed=9, image_size=56, prompts=run)
    assert torch.equal(kept.prompt_learner.token_suffix_neg, b.token_suffix_neg)
