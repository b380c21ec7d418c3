"""SPEC.md's formulas written out independently in the tests (constants as the SPEC gives
them, not imported), against the model and the metrics: D-Attn and E-Attn sets, scores and
maps (§5), the training logits, deep text prompts, the presets' values, the position
embedding's resize, legacy AUPRO's float32 thresholds and FPR limit, soft masks, the
decision rule and the CSV columns. The tiny models' biases and LayerNorm affines (0 and 1
after random initialisation) are perturbed so that bias and affine mistakes show. (Written
from a mutation review: each test fails for a plausible one-point bug the suite missed.)"""

from __future__ import annotations

import math

import numpy as np
import open_clip
import pytest
import torch
import torch.nn.functional as F
from scipy.ndimage import gaussian_filter

from crane.config import get_config
from crane.metrics import aupro
from crane.metrics.functional import pixel_auroc
from crane.models import create_model

CLIP_MEAN = torch.tensor([0.48145466, 0.4578275, 0.40821073]).view(1, 3, 1, 1)
CLIP_STD = torch.tensor([0.26862954, 0.26130258, 0.27577711]).view(1, 3, 1, 1)
IN_MEAN = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
IN_STD = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)


def _perturb(module, seed=0, scale=0.2):
    """Random biases and LayerNorm affines (random init leaves them 0 / 1)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if name.endswith("bias") or (p.dim() == 1 and "ln" in name) or "norm" in name:
                p.add_(torch.randn(p.shape, generator=g) * scale)


@pytest.fixture(scope="module")
def images():
    g = torch.Generator().manual_seed(1)
    return torch.randn(2, 3, 224, 224, generator=g)


@pytest.fixture(scope="module")
def model():
    m = create_model("tiny+")
    _perturb(m.vision.visual, 0)
    _perturb(m.vision.dino, 1)
    with torch.no_grad():
        for p in m.prompt_learner.parameters():
            p.add_(torch.randn_like(p))
    return m


def test_presets_hold_the_spec_values():
    p, c = get_config("crane+"), get_config("crane")
    assert (p.dattn_gamma, p.dattn_beta, p.dattn_layer) == (3.0, 1.2, 24)
    assert p.eattn_start == 6 and p.feature_layers == (24,) and p.attn_type == "qq+kk+vv"
    assert (p.pixel_temperature, p.image_temperature, p.train_image_temperature) == (
        0.07,
        0.07,
        0.01,
    )
    assert p.sigma == 4.0 and p.fusion_alpha == 0.5 and p.map_combine == "logit_mean"
    assert p.dattn_threshold_scope == "image" and p.image_size == 518
    assert c.map_combine == "soft_mean" and c.train_set_multiplicity == 4 and not c.use_dattn
    assert (p.n_ctx, p.n_deep, p.deep_len) == (12, 8, 4)
    from crane.engine.train import TrainSettings

    s = TrainSettings()
    assert (s.lr, tuple(s.betas), s.batch_size, s.epochs, s.seed) == (1e-3, (0.6, 0.999), 8, 5, 111)


def test_dattn_set_equals_spec_formula(model, images):
    """SPEC §3 D-Attn written out: DINO gets ImageNet-normalised pixels; W row-softmax of
    3(S - 1.2 mean_image(S)) with S'<0 dropped; v from ln_1(h_23 + MHA(ln_1(h_23)))."""
    clip = model.text_encoder.clip
    dino = model.vision.dino
    pixels = images * CLIP_STD + CLIP_MEAN
    with torch.no_grad():
        f = dino.forward_features((pixels - IN_MEAN) / IN_STD)[:, dino.num_prefix_tokens :]
        f = F.normalize(f, dim=-1)
        s = f @ f.transpose(1, 2)
        sp = 3 * (s - 1.2 * s.mean((1, 2), keepdim=True))
        sp[sp < 0] = float("-inf")
        w = torch.softmax(sp, -1)
        inputs = []
        last = clip.visual.transformer.resblocks[-1]
        h = last.register_forward_pre_hook(lambda m, a: inputs.append(a[0].clone()))
        clip.encode_image(images)
        h.remove()
        h23 = inputs[0]
        x = h23 + last.attention(last.ln_1(h23))
        wv, bv = last.attn.in_proj_weight.chunk(3)[2], last.attn.in_proj_bias.chunk(3)[2]
        v = (last.ln_1(x) @ wv.t() + bv)[:, 1:]
        d = (w @ v) @ last.attn.out_proj.weight.t() + last.attn.out_proj.bias
        ref = F.normalize(clip.visual.ln_post(d) @ clip.visual.proj, dim=-1)
        ours = model.encode_images(images).patch_sets[0]
    torch.testing.assert_close(ours, ref, atol=2e-5, rtol=1e-4)


def test_eattn_bias_added_once_per_block(model, images):
    """The E-Attn set against test_models' explicit-softmax reference, here with random
    biases and LayerNorm affines (out_proj's bias once per block)."""
    from test_models import _explicit_eattn_sets

    layer = model.cfg.feature_layers[-1]
    ref = _explicit_eattn_sets(model, images, model.cfg.attn_type)[layer]
    with torch.no_grad():
        ours = model.encode_images(images).patch_sets[1]
    torch.testing.assert_close(ours, ref, atol=2e-5, rtol=1e-4)


def test_scores_and_maps_follow_spec_section_5(model, images):
    with torch.no_grad():
        vis = model.encode_images(images)
        out = model(images)
        g_t = model.text_features()  # (2, E) [normal, anomalous]
        z, g = vis.patch_sets, vis.global_feat
        logits = z @ g_t.t() / 0.07  # (S, B, N, 2)
        n = int(math.isqrt(z.shape[2]))
        up = F.interpolate(
            logits.permute(0, 1, 3, 2).reshape(-1, 2, n, n),
            size=(224, 224),
            mode="bilinear",
            align_corners=False,
        ).view(z.shape[0], z.shape[1], 2, 224, 224)
        raw = torch.softmax(up.mean(0), 1)[:, 1].double().numpy()  # logit_mean
        maps = np.stack([gaussian_filter(m, 4) for m in raw])
        w = torch.softmax(logits.mean(0), -1)[..., 1]
        c = F.normalize((w[..., None] * z.mean(0)).sum(1), dim=-1)
        gp = F.normalize(0.5 * c + 0.5 * g, dim=-1)
        score = torch.softmax(gp @ g_t.t() / 0.07, -1)[:, 1]
    np.testing.assert_allclose(out.anomaly_maps.numpy(), maps, atol=1e-5)
    torch.testing.assert_close(out.image_scores, score, atol=1e-5, rtol=1e-5)


def test_deep_tokens_enter_before_text_blocks_2_to_n_plus_1():
    model = create_model("tiny")
    clip = model.text_encoder.clip
    pl = model.prompt_learner
    tok = open_clip.get_tokenizer(model.cfg.clip_model)
    x_emb = clip.token_embedding.weight[tok(["X"])[0, 1]]
    with torch.no_grad():
        pl.ctx_pos.copy_(x_emb.expand_as(pl.ctx_pos))
        pl.ctx_neg.copy_(x_emb.expand_as(pl.ctx_neg))
        for p in pl.compound_prompts_text:
            p.copy_(torch.randn_like(p))
        deep = [p.half().float() for p in pl.compound_prompts_text]
        blocks = clip.transformer.resblocks

        def put(j):
            def hook(m, args, kwargs):
                x = args[0].clone()
                x[:, 1 : 1 + pl.deep_len] = deep[j]
                return (x, *args[1:]), kwargs

            return hook

        hooks = [
            blocks[j + 1].register_forward_pre_hook(put(j), with_kwargs=True)
            for j in range(len(deep))
        ]
        ref = clip.encode_text(
            tok(["X X X X X X X X X X X X object.", "X X X X X X X X X X X X damaged object."]),
            normalize=True,
        )
        for h in hooks:
            h.remove()
        ours = model.text_features()
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-5)


def _naive_legacy(maps, masks):
    """cal_pro_score as the reference writes it: float64 thresholds, score > t, FPR < 0.3."""
    from skimage import measure
    from sklearn.metrics import auc

    lo, hi = float(maps.min()), float(maps.max())
    fprs, pros = [], []
    for th in np.arange(lo, hi, (hi - lo) / 200):
        binary = maps.astype(np.float64) > th
        pro = [
            b[r.coords[:, 0], r.coords[:, 1]].mean()
            for b, m in zip(binary, masks, strict=True)
            for r in measure.regionprops(measure.label(m))
        ]
        fprs.append((binary & ~masks).sum() / (~masks).sum())
        pros.append(np.mean(pro))
    fprs, pros = np.array(fprs), np.array(pros)
    keep = fprs < 0.3
    x = fprs[keep]
    return auc((x - x.min()) / (x.max() - x.min()), pros[keep])


def test_legacy_aupro_scores_on_float32_thresholds():
    """float32 scores exactly on the float32 roundings of the float64 thresholds."""
    rng = np.random.default_rng(0)
    levels = np.arange(201) / 200.0  # lo=0, hi=1: thresholds i/200 in float64
    maps = rng.choice(levels.astype(np.float32), size=(4, 24, 24)).astype(np.float32)
    maps[0, 0, 0], maps[0, 0, 1] = 0.0, 1.0
    masks = np.zeros(maps.shape, bool)
    masks[:, 5:15, 5:15] = True
    maps[masks] = np.minimum(maps[masks] + np.float32(0.3), np.float32(1.0))
    assert abs(aupro(torch.from_numpy(maps), masks, "legacy") - _naive_legacy(maps, masks)) < 1e-9


def test_legacy_aupro_drops_points_at_exactly_the_fpr_limit():
    """10 normal pixels: several thresholds have FPR exactly 3/10 == 0.3, which the
    reference's ``fprs < 0.3`` leaves out."""
    normal = np.arange(10) / 10.0  # 0.0 .. 0.9
    anomalous = 0.55 + np.arange(10) / 22.0  # 0.55 .. 0.96
    maps = np.concatenate([normal, anomalous]).reshape(1, 4, 5)
    masks = np.zeros((1, 4, 5), bool)
    masks.reshape(-1)[10:] = True
    ours = aupro(maps, masks, "legacy")
    assert abs(ours - _naive_legacy(maps, masks)) < 1e-9


def test_training_image_logits_use_the_training_temperature():
    model = create_model("tiny")
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in model.prompt_learner.parameters():
            p.add_(torch.randn(p.shape, generator=g))
        vis = model.encode_images(torch.randn(2, 3, 224, 224, generator=g))
        out = model.forward_train(vis)
        text = model.text_features(context=vis.global_feat)  # (B, 2, E), context-guided
        z, gl = vis.patch_sets, vis.global_feat
        logits = torch.einsum("sbne,bce->sbnc", z, text) / 0.07
        w = torch.softmax(logits.mean(0), -1)[..., 1]
        c = F.normalize((w[..., None] * z.mean(0)).sum(1), dim=-1)
        gp = F.normalize(0.5 * c + 0.5 * gl, dim=-1)
        expected = torch.einsum("be,bce->bc", gp, text) / 0.01
    torch.testing.assert_close(out.patch_logits, logits, atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(out.image_logits, expected, atol=1e-3, rtol=1e-5)


def test_masks_are_thresholded_at_one_half():
    maps = np.array([[0.1, 0.95, 0.3, 0.9]])
    soft = np.array([[0.0, 0.4, 0.6, 1.0]])  # 0.4 is normal, 0.6 anomalous (docstring: > 0.5)
    assert pixel_auroc(maps, soft) == pixel_auroc(maps, soft > 0.5) == 0.5


def test_state_dicts_saved_from_a_wrapped_model_load(tmp_path):
    """DataParallel / DDP checkpoints prefix every key with 'module.'."""
    from crane.models import weights as W

    sd = {"a.weight": torch.randn(2, 2), "b.bias": torch.randn(2)}
    torch.save({"state_dict": {f"module.{k}": v for k, v in sd.items()}}, tmp_path / "w.pt")
    loaded = W.load_state_dict_file(tmp_path / "w.pt")
    assert loaded.keys() == sd.keys()
    for k in sd:
        assert torch.equal(loaded[k], sd[k])


def test_clip_position_embedding_is_resized_bilinearly_without_corner_alignment():
    """SPEC §2: patch part resized bilinear, align_corners=False, no antialias; class kept."""
    native = create_model("tiny", image_size=112).vision.visual.positional_embedding  # 8x8
    resized = create_model("tiny", image_size=224).vision.visual.positional_embedding  # 16x16
    d = native.shape[-1]
    patch = native[1:].reshape(1, 8, 8, d).permute(0, 3, 1, 2)
    up = F.interpolate(patch, size=(16, 16), mode="bilinear", align_corners=False, antialias=False)
    expected = torch.cat([native[:1], up.permute(0, 2, 3, 1).reshape(256, d)])
    torch.testing.assert_close(resized, expected, atol=0, rtol=0)


def test_a_score_equal_to_the_threshold_is_anomalous():
    """calibrate's thresholds are for the rule score >= t (crane.engine.calibrate)."""
    from crane.engine.predict import Prediction

    amap = np.zeros((4, 4), np.float32)
    amap[1, 2] = 0.75
    p = Prediction("x.png", 0.5, amap, 0.5)
    assert p.is_anomalous is True
    assert Prediction("x.png", float(np.nextafter(0.5, 0)), amap, 0.5).is_anomalous is False
    assert p.max_pixel_score == 0.75


def test_predictions_csv_columns_in_their_documented_order(tmp_path):
    from PIL import Image as PILImage

    from crane.engine.predict import Detector, run_predict

    px = np.random.default_rng(0).integers(0, 256, (36, 40, 3), dtype=np.uint8)
    PILImage.fromarray(px).save(tmp_path / "a.png")
    det = Detector(create_model("tiny", image_size=56), device="cpu", threshold=0.5)
    run_predict(det, [tmp_path / "a.png"], tmp_path / "out", overlays=False, progress=False)
    lines = (tmp_path / "out" / "predictions.csv").read_text().splitlines()
    assert lines[0] == "path,image_score,decision,max_pixel_score"
