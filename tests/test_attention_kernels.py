"""``attention``: which fused attention kernel the model's attentions try first (issue 6).

CPU tests check the settings the context leaves and restores, that ``math`` really runs the
unfused kernel in every attention of a forward (CLIP, E-Attn, DINOv2) with the same results,
and that every pipeline passes the choice on. The ``cuda`` tests (device machine) check that
``cudnn`` reaches cuDNN's kernel and that it stays within the accuracy guard.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from op_counter import OpCounter
from torch.nn.attention import SDPBackend, sdpa_kernel

from crane.engine.predict import Detector
from crane.engine.runtime import (
    ATTENTION_KERNELS,
    attention_kernel_used,
    attention_kernels,
    scoring_forward,
)
from crane.errors import CraneError
from crane.models import create_model
from crane.models.kernels import cpu_kernels, onednn_available

SIZE = 112
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

FUSED_CPU = "aten._scaled_dot_product_flash_attention_for_cpu.default"
MATH_SOFTMAX = "aten._safe_softmax.default"  # the math kernel's softmax (D-Attn's is softmax)


def _state():
    return (
        torch._C._get_sdp_priority_order(),
        torch.backends.cuda.cudnn_sdp_enabled(),
        torch.backends.cuda.flash_sdp_enabled(),
        torch.backends.cuda.mem_efficient_sdp_enabled(),
        torch.backends.cuda.math_sdp_enabled(),
    )


@pytest.mark.parametrize("name", ["cudnn", "flash", "efficient"])
def test_named_kernel_goes_first_then_torchs_order_and_is_restored(name):
    before = _state()
    default = [int(i) for i in before[0]]
    first = int(getattr(SDPBackend, ATTENTION_KERNELS[name]))
    with attention_kernels(name):
        order = [int(i) for i in torch._C._get_sdp_priority_order()]
        assert order == [first] + [i for i in default if i != first]
        # Nothing switched off: a call the first kernel cannot serve falls back.
        assert _state()[1:] == (True, True, True, True)
    assert _state() == before


def test_auto_changes_nothing_and_math_runs_only_the_unfused_kernel():
    before = _state()
    q = torch.randn(1, 2, 10, 8)
    with attention_kernels("auto"):
        assert _state() == before
        assert attention_kernel_used(q, q, q) == "flash"  # torch's fused CPU kernel
    with attention_kernels("math"):
        assert attention_kernel_used(q, q, q) == "math"
        assert _state()[1:] == (False, False, False, True)
    assert _state() == before


def test_backends_switched_off_before_stay_off():
    with sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.MATH]):
        with attention_kernels("efficient"):
            assert not torch.backends.cuda.cudnn_sdp_enabled()
            assert torch.backends.cuda.mem_efficient_sdp_enabled()  # asked for by name
            order = [int(i) for i in torch._C._get_sdp_priority_order()]
            assert order[0] == int(SDPBackend.EFFICIENT_ATTENTION)
        assert not torch.backends.cuda.mem_efficient_sdp_enabled()


def test_unknown_kernel_name_is_refused_up_front():
    model = create_model("tiny", image_size=SIZE)
    with pytest.raises(CraneError, match="attention must be one of auto, cudnn"):
        Detector(model, device="cpu", attention="fa3")
    with pytest.raises(CraneError, match="attention must be one of"):
        scoring_forward(model, torch.device("cpu"), attention="")


def test_named_kernels_need_a_torch_with_sdpa_priorities(monkeypatch):
    from crane.engine import runtime

    monkeypatch.setattr(runtime, "_sdpa_api", lambda: None)  # as on an older torch
    model = create_model("tiny", image_size=SIZE)
    x = torch.zeros(1, 3, SIZE, SIZE)
    for name in ("cudnn", "math"):
        with pytest.raises(CraneError, match=f"--attention {name} needs a torch whose"):
            Detector(model, device="cpu", attention=name)
    Detector(model, device="cpu", attention="auto").predict_tensor(x)  # auto needs nothing
    with attention_kernels("auto"):
        pass


def _attention_calls(model) -> int:
    """Fused attentions in one forward: CLIP's blocks, three per E-Attn block, DINOv2's."""
    cfg, v = model.cfg, model.vision
    n = v.n_layers + 3 * (v.n_layers - cfg.eattn_start + 1)
    return n + (len(v.dino.blocks) if v.dino is not None else 0)


def test_detector_math_runs_every_attention_unfused_with_the_same_results():
    model = create_model("tiny+", image_size=SIZE, seed=1)
    x = torch.randn(2, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(0))
    Detector(model, device="cpu").predict_tensor(x)  # text features: computed once, kept
    runs = {}
    for name in ("auto", "math", "cudnn"):
        det = Detector(model, device="cpu", attention=name)
        with cpu_kernels("torch"), OpCounter() as rec:  # torch's SDPA (oneDNN's: below)
            runs[name] = det.predict_tensor(x)
        runs[name + "_ops"] = rec.ops
    # fp32 CPU products on oneDNN (the default on AVX-512 CPUs): math still runs torch's
    # reference attention
    with cpu_kernels("onednn"), OpCounter() as rec:
        Detector(model, device="cpu", attention="math").predict_tensor(x)
    assert rec.ops.get(MATH_SOFTMAX) == _attention_calls(model)
    if onednn_available():  # an x86 CPU with AVX2/AVX-512
        assert rec.ops.get("mkldnn._linear_pointwise.default", 0) > 0  # the linear layers
    expected = _attention_calls(model)
    assert expected == 4 + 3 * 3 + 2  # tiny+: 4 CLIP blocks, E-Attn from block 2, 2 DINOv2 blocks
    assert runs["auto_ops"].get(FUSED_CPU) == expected
    assert runs["auto_ops"].get(MATH_SOFTMAX, 0) == 0
    assert runs["math_ops"].get(FUSED_CPU, 0) == 0
    assert runs["math_ops"].get(MATH_SOFTMAX) == expected
    # On the CPU torch has one fused kernel: asking for cuDNN first changes nothing.
    assert runs["cudnn_ops"] == runs["auto_ops"]
    for a, b in zip(runs["cudnn"], runs["auto"], strict=True):
        assert torch.equal(a, b)
    (s_auto, m_auto), (s_math, m_math) = runs["auto"], runs["math"]
    torch.testing.assert_close(m_math, m_auto, atol=1e-5, rtol=0)
    torch.testing.assert_close(s_math, s_auto, atol=1e-5, rtol=0)
    assert not torch.equal(m_math, m_auto)  # another kernel did run: rounding differs


def test_compiled_detectors_keep_their_own_attention_kernels(monkeypatch):
    """torch.compile bakes the kernels into its graph and does not guard on torch's global
    attention settings: each Detector's graph must be traced under its own setting, and not
    serve another one (with the setting entered around the compiled call, a second compiled
    model of the same class ran the first one's kernel)."""
    from torch._dynamo.backends.common import aot_autograd

    traced: list[list[str]] = []

    def keep_ops(gm, example_inputs):  # the graph as traced, run as it is (no inductor)
        traced.append([str(n.target) for n in gm.graph.nodes if n.op == "call_function"])
        return gm

    real, backend = torch.compile, aot_autograd(fw_compiler=keep_ops)
    # One backend for every compile, as "inductor" is (a new one per call would recompile).
    monkeypatch.setattr(torch, "compile", lambda m, mode=None: real(m, backend=backend))
    model = create_model("tiny", image_size=SIZE, seed=0)
    x = torch.randn(2, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(0))
    Detector(model, device="cpu").predict_tensor(x)  # text features: computed once, eagerly
    expected = _attention_calls(model)  # 13 for tiny
    eager = Detector(model, device="cpu").predict_tensor(x)

    def traced_ops(name: str) -> list[str]:
        traced.clear()
        s, m = Detector(model, device="cpu", compile=True, attention=name).predict_tensor(x)
        torch.testing.assert_close(m, eager[1], atol=1e-5, rtol=0)
        return [op for graph in traced for op in graph]

    torch._dynamo.reset()
    try:
        runs = [traced_ops(name) for name in ("auto", "math", "auto", "auto")]
    finally:
        torch._dynamo.reset()
    auto, math, again, same = runs
    assert auto.count(FUSED_CPU) == expected and MATH_SOFTMAX not in auto
    assert math.count(MATH_SOFTMAX) == expected and FUSED_CPU not in math
    assert again.count(FUSED_CPU) == expected and MATH_SOFTMAX not in again
    assert same == []  # the same setting again: the cached graphs serve it


def test_evaluate_and_the_training_feature_cache_pass_the_choice_on(synth):
    from crane.data import AnomalyDataset
    from crane.engine.evaluate import evaluate
    from crane.engine.features import FeatureCache

    model = create_model("tiny+", image_size=SIZE, seed=3)
    ds = AnomalyDataset(synth, "test", image_size=SIZE)
    cpu = torch.device("cpu")
    kw = dict(device=cpu, batch_size=8, progress=False)
    Detector(model, device="cpu").predict_tensor(torch.zeros(1, 3, SIZE, SIZE))  # text, once
    reports, caches, ops = {}, {}, {}
    for name in ("auto", "math"):
        with cpu_kernels("torch"), OpCounter() as rec:  # torch's SDPA: its kernels counted
            reports[name] = evaluate(model, ds, attention=name, **kw).report.per_class
            caches[name] = FeatureCache.build(model, ds, cpu, 8, attention=name, progress=False)
        ops[name] = rec.ops
    per_forward = _attention_calls(model)
    forwards = 2 * 2  # evaluate and the cache: 16 images in 2 batches each
    assert ops["math"].get(MATH_SOFTMAX) == forwards * per_forward
    assert ops["math"].get(FUSED_CPU, 0) == 0
    assert ops["auto"].get(FUSED_CPU) == forwards * per_forward
    for cls in ("tile", "plate"):
        for metric, value in reports["auto"][cls].items():
            assert reports["math"][cls][metric] == pytest.approx(value, abs=1e-3), metric
    torch.testing.assert_close(
        caches["math"].patch_sets, caches["auto"].patch_sets, atol=1e-5, rtol=0
    )
    with pytest.raises(CraneError, match="attention must be one of"):
        FeatureCache.build(model, ds, cpu, 8, attention="cuDNN", progress=False)


def test_train_encodes_its_features_under_the_choice(synth, tmp_path, monkeypatch):
    from crane.data import AnomalyDataset
    from crane.engine import train as train_mod

    seen = []
    build = train_mod.FeatureCache.build

    def spy(*args, **kwargs):
        seen.append(kwargs.get("attention"))
        return build(*args, **kwargs)

    monkeypatch.setattr(train_mod.FeatureCache, "build", spy)
    model = create_model("tiny", image_size=SIZE, seed=0)
    ds = AnomalyDataset(synth, "test", image_size=SIZE)
    settings = train_mod.TrainSettings(epochs=1, batch_size=8)
    train_mod.train(
        model, ds, tmp_path / "run", settings, device="cpu", progress=False, attention="math"
    )
    assert seen == ["math"]


# --- CUDA (run on the device machine; skipped elsewhere) ------------------------------------


@cuda
def test_cuda_cudnn_first_reaches_cudnn_and_matches_flash():
    from crane.models.vision import _heads

    g = torch.Generator(device="cuda").manual_seed(0)
    # CLIP ViT-L/14's attention at 518 px: 16 heads of 64 over 1370 tokens, laid out as the
    # vision loop passes them (views of one qkv projection); E-Attn's q = k.
    qkv = torch.randn(2, 1370, 3 * 1024, device="cuda", generator=g).to(torch.bfloat16)
    q, _, v = (_heads(t, 16) for t in qkv.chunk(3, -1))
    with attention_kernels("math"):  # fp32 reference on the same (bf16) inputs
        ref = F.scaled_dot_product_attention(q.float(), q.float(), v.float())
    with attention_kernels("flash"):
        assert attention_kernel_used(q, q, v) == "flash"
        flash = F.scaled_dot_product_attention(q, q, v)
    with attention_kernels("cudnn"):
        used = attention_kernel_used(q, q, v)
        out = F.scaled_dot_product_attention(q, q, v)
    if used != "cudnn":
        pytest.skip(f"this torch/cuDNN serves the call with {used}, not cuDNN")
    # Both bf16 kernels round their output to bf16: cuDNN's error as small as flash's.
    err_cudnn = float((out.float() - ref).abs().max())
    err_flash = float((flash.float() - ref).abs().max())
    assert 0 < err_flash and err_cudnn <= 2 * err_flash + 1e-3, (err_cudnn, err_flash)
    # fp32 inputs: cuDNN's and flash's kernels take half precision only; the fallback serves.
    with attention_kernels("cudnn"):
        assert attention_kernel_used(q.float(), q.float(), v.float()) in ("efficient", "math")


@cuda
@pytest.mark.parametrize("name", ["cudnn", "efficient", "math"])
def test_cuda_bf16_detector_within_guard_whatever_kernel(name):
    x = torch.randn(4, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(0))
    s32, m32 = Detector(
        create_model("tiny+", image_size=SIZE, seed=2), device="cuda"
    ).predict_tensor(x)
    det = Detector(
        create_model("tiny+", image_size=SIZE, seed=2),
        device="cuda",
        precision="bf16",
        attention=name,
    )
    s16, m16 = det.predict_tensor(x)
    assert (m16 - m32).abs().max() <= 1e-2
    assert (s16 - s32).abs().max() <= 1e-2


def test_compiled_forward_fills_the_text_cache_before_the_compiled_call(monkeypatch):
    """Under CUDA graphs a tensor the compiled call caches lives in the graph's memory pool,
    which the next call reuses: the static text features are computed eagerly first, in
    fp32 as the scoring head computes them, and again only when the prompts change."""
    model = create_model("tiny", image_size=SIZE)
    seen = []

    def fake_compile(module, mode=None):
        def compiled(x):
            seen.append(module._text_cache is not None)
            return module(x)

        return compiled

    monkeypatch.setattr(torch, "compile", fake_compile)
    run = scoring_forward(model, torch.device("cpu"), compile="reduce-overhead")
    x = torch.randn(1, 3, SIZE, SIZE)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        scores, maps = run(x)
    assert seen == [True]
    assert model._text_cache[1].dtype == torch.float32
    with torch.no_grad():
        torch.testing.assert_close(model._text_cache[1], model.text_features())
    cached = model._text_cache[1]
    run(x)
    assert model._text_cache[1] is cached  # not recomputed while the prompts stay
    with torch.no_grad():
        model.prompt_learner.ctx_pos.add_(1)
    run(x)
    assert model._text_cache[1] is not cached
    with torch.no_grad():
        torch.testing.assert_close(model._text_cache[1], model.text_features())
