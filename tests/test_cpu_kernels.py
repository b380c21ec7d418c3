"""CPU matrix products and attention through oneDNN (``crane.models.kernels``, issue 6): fp32,
and bf16 under ``--precision bf16``.

Each kernel is compared with an fp64 computation of the same thing, the switch and every
condition that sends a call back to torch's kernels is checked by counting the aten ops that
ran, and a whole tiny+ forward is compared between the two kernel sets.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from op_counter import OpCounter
from torch.nn.attention import SDPBackend, sdpa_kernel

from crane.engine.predict import Detector
from crane.errors import CraneError
from crane.models import create_model, kernels

ONEDNN = "mkldnn._linear_pointwise.default"
FUSED_CPU = "aten._scaled_dot_product_flash_attention_for_cpu.default"

pytestmark = pytest.mark.skipif(
    not kernels.onednn_available(), reason="this torch build has no oneDNN linear op"
)


def _rand(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(autouse=True)
def _default_setting(monkeypatch):
    monkeypatch.delenv(kernels.ENV_VAR, raising=False)
    # The tiny shapes here are below where oneDNN's attention pays off: take it anyway, in
    # blocks of 8 queries so that the block loop runs (the size rule has its own test).
    monkeypatch.setattr(kernels, "ATTENTION_MIN_TOKENS", 0)
    monkeypatch.setattr(kernels, "ATTENTION_MIN_HEAD_DIM", 0)
    monkeypatch.setattr(kernels, "ATTENTION_BLOCK_ROWS", 8)
    monkeypatch.setattr(kernels, "ATTENTION_ISA", (kernels._cpu_capability(),))
    # (oneDNN the default here whatever the CPU: these tests are about its paths)
    monkeypatch.setattr(kernels, "ONEDNN_DEFAULT_ISA", (kernels._cpu_capability(),))
    kernels.set_cpu_kernels(None)
    yield
    kernels.set_cpu_kernels(None)


@pytest.mark.parametrize(
    "x_shape, bias, transpose_x",
    [
        ((37, 24), True, False),
        ((2, 19, 24), True, False),
        ((3, 24), False, False),
        ((24, 37), True, True),
    ],
)
def test_linear_is_fp32_linear_on_onednn(x_shape, bias, transpose_x):
    x = _rand(*x_shape)
    x = x.t() if transpose_x else x  # a strided input is fine (oneDNN takes it as it is)
    w, b = _rand(40, 24, seed=1), (_rand(40, seed=2) if bias else None)
    with OpCounter() as rec:
        y = kernels.linear(x, w, b)
    assert rec.ops.get(ONEDNN) == 1 and "aten.addmm.default" not in rec.ops
    ref = F.linear(x.double(), w.double(), None if b is None else b.double())
    assert y.dtype == torch.float32 and y.shape == ref.shape
    torch.testing.assert_close(y.double(), ref, atol=1e-5, rtol=1e-5)


def _falls_back(fn) -> bool:
    with OpCounter() as rec:
        fn()
    return ONEDNN not in rec.ops


def test_linear_falls_back_to_torch_where_onednn_must_not_run(monkeypatch):
    x, w, b = _rand(8, 6), _rand(5, 6, seed=1), _rand(5, seed=2)
    assert not _falls_back(lambda: kernels.linear(x, w, b))
    with kernels.cpu_kernels("torch"):
        assert _falls_back(lambda: kernels.linear(x, w, b))
    assert not _falls_back(lambda: kernels.linear(x, w, b))  # restored on exit
    assert _falls_back(lambda: kernels.linear(x.bfloat16(), w.bfloat16(), b.bfloat16()))
    monkeypatch.setattr(kernels, "native_bf16", lambda: False)  # bf16 autocast: see below
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert _falls_back(lambda: kernels.linear(x, w, b))
    assert _falls_back(lambda: kernels.linear(x, w.t().contiguous().t(), b))  # strided weight
    assert _falls_back(lambda: kernels.linear(x[0], w, b))  # a vector
    assert kernels.linear(x[:0], w, b).shape == (0, 5)  # no rows: torch's op
    # An autograd graph to record: torch's op (oneDNN's has no backward), gradients right.
    xg = x.clone().requires_grad_(True)
    with OpCounter() as rec:
        kernels.linear(xg, w, b).sum().backward()
    assert ONEDNN not in rec.ops
    torch.testing.assert_close(xg.grad, w.sum(0).expand_as(x))
    with torch.no_grad():
        assert not _falls_back(lambda: kernels.linear(xg, w, b))
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    assert _falls_back(lambda: kernels.linear(x, w, b))


def test_environment_variable_and_bad_names(monkeypatch):
    x, w = _rand(4, 3), _rand(2, 3, seed=1)
    monkeypatch.setenv(kernels.ENV_VAR, "Torch")
    assert kernels.get_cpu_kernels() == "torch"
    assert _falls_back(lambda: kernels.linear(x, w))
    with kernels.cpu_kernels("onednn"):  # the API wins over the environment
        assert not _falls_back(lambda: kernels.linear(x, w))
    monkeypatch.setenv(kernels.ENV_VAR, "mkl")
    with pytest.raises(CraneError, match=r"\$CRANE_CPU_KERNELS must be one of onednn, torch"):
        kernels.linear(x, w)
    with pytest.raises(CraneError, match="cpu_kernels must be one of onednn, torch, got 'fast'"):
        kernels.set_cpu_kernels("fast")


@pytest.mark.parametrize(
    "shape_q, shape_kv", [((2, 3, 17, 8), (2, 3, 17, 8)), ((1, 4, 1, 16), (1, 4, 29, 16))]
)
def test_attention_is_sdpa_on_onednn(shape_q, shape_kv):
    q, k, v = _rand(*shape_q), _rand(*shape_kv, seed=1), _rand(*shape_kv, seed=2)
    q = q * 3  # sharper rows: softmax errors show
    with OpCounter() as rec:
        out = kernels.attention(q, k, v)
    b, h, n = shape_q[:3]
    blocks = -(-n // kernels.ATTENTION_BLOCK_ROWS)
    assert rec.ops.get(ONEDNN) == 2 * b * h * blocks and FUSED_CPU not in rec.ops
    ref = F.scaled_dot_product_attention(q.double(), k.double(), v.double())
    assert out.shape == ref.shape
    torch.testing.assert_close(out.double(), ref, atol=1e-6, rtol=1e-5)
    # Heads merge back into (B, N, H·d) without a copy.
    assert out.transpose(1, 2).is_contiguous()


def test_attention_sum_shares_one_product_with_v():
    # E-Attn's form: Σ_t softmax(t tᵀ/√d) v over t ∈ {q, k, v}, views of one projection.
    qkv = _rand(2, 19, 3 * 3 * 8) * 2
    q, k, v = (t.view(2, 19, 3, 8).transpose(1, 2) for t in qkv.chunk(3, -1))
    pairs = [(q, q), (k, k), (v, v)]
    with OpCounter() as rec:
        out = kernels.attention_sum(pairs, v)
    blocks = -(-19 // kernels.ATTENTION_BLOCK_ROWS)
    # Per image, head and block of queries: a product and a softmax per pair, one product with v.
    assert rec.ops.get("aten.softmax.int_out") == 3 * 2 * 3 * blocks
    assert rec.ops.get(ONEDNN) == 4 * 2 * 3 * blocks and FUSED_CPU not in rec.ops
    ref = sum(F.scaled_dot_product_attention(t.double(), t.double(), v.double()) for t in (q, k, v))
    torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=1e-5)
    with kernels.cpu_kernels("torch"):  # torch's kernels: the terms summed in order, as before
        plain = kernels.attention_sum(pairs, v)
        want = F.scaled_dot_product_attention(q, q, v) + F.scaled_dot_product_attention(k, k, v)
        assert torch.equal(plain, want + F.scaled_dot_product_attention(v, v, v))


def test_attention_takes_onednn_only_where_it_pays_off(monkeypatch):
    monkeypatch.setattr(kernels, "ATTENTION_MIN_TOKENS", 512)
    monkeypatch.setattr(kernels, "ATTENTION_MIN_HEAD_DIM", 32)
    monkeypatch.setattr(kernels, "ATTENTION_BLOCK_ROWS", 512)
    for shape, onednn in [((1, 2, 511, 32), False), ((1, 2, 512, 16), False),
                          ((1, 2, 600, 32), True)]:  # fmt: skip
        q = _rand(*shape)
        assert _falls_back(lambda q=q: kernels.attention(q, q, q)) is not onednn
    # A class-token query over many keys counts its keys.
    q, k = _rand(1, 2, 1, 32), _rand(1, 2, 600, 32, seed=1)
    assert not _falls_back(lambda: kernels.attention(q, k, k))
    # Only on AVX-512 CPUs (with oneDNN held to AVX2 it was slower); linear layers on AVX2 too.
    monkeypatch.setattr(kernels, "ATTENTION_ISA", ("AVX512",))
    monkeypatch.setattr(kernels, "_cpu_capability", lambda: "AVX2")
    assert _falls_back(lambda: kernels.attention(q, k, k))
    w = _rand(5, 32, seed=2)
    assert not _falls_back(lambda: kernels.linear(k, w))


def test_other_cpus_keep_torchs_kernels(monkeypatch):
    monkeypatch.setattr(kernels, "_cpu_capability", lambda: "SVE256")  # e.g. an ARM server
    kernels.onednn_available.cache_clear()
    try:
        x, w = _rand(4, 3), _rand(2, 3, seed=1)
        assert not kernels.onednn_available()
        assert _falls_back(lambda: kernels.linear(x, w))
    finally:
        kernels.onednn_available.cache_clear()


def test_attention_from_strided_projections_and_the_math_switch():
    # q/k/v as the models make them: views of one (B, N, 3·H·d) projection.
    qkv = _rand(2, 11, 3 * 2 * 8)
    q, k, v = (t.view(2, 11, 2, 8).transpose(1, 2) for t in qkv.chunk(3, -1))
    out = kernels.attention(q, k, v)
    ref = F.scaled_dot_product_attention(q.double(), k.double(), v.double())
    torch.testing.assert_close(out.double(), ref, atol=1e-6, rtol=1e-5)
    with sdpa_kernel([SDPBackend.MATH]), OpCounter() as rec:  # --attention math: torch's
        kernels.attention(q, k, v)
    assert ONEDNN not in rec.ops and "aten._safe_softmax.default" in rec.ops
    with kernels.cpu_kernels("torch"), OpCounter() as rec:
        kernels.attention(q, k, v)
    assert ONEDNN not in rec.ops and rec.ops.get(FUSED_CPU) == 1


def test_swapped_linear_keeps_its_state_dict():
    net = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.GELU(), torch.nn.Linear(5, 2))
    x = _rand(3, 6)
    with torch.no_grad():
        before = net(x)
    keys = list(net.state_dict())
    kernels.swap_linears(net)
    assert all(type(m) is kernels.Linear for m in (net[0], net[2]))
    assert list(net.state_dict()) == keys
    with torch.no_grad(), OpCounter() as rec:
        after = net(x)
    assert rec.ops.get(ONEDNN) == 2
    torch.testing.assert_close(after, before, atol=1e-6, rtol=1e-6)


def _onednn_attention_heads(model, batch: int) -> int:
    """(image, head) pairs of the attentions in one tiny+ forward: CLIP's blocks, three per
    E-Attn block, DINOv2's."""
    cfg, v = model.cfg, model.vision
    calls = v.n_layers + 3 * (v.n_layers - cfg.eattn_start + 1)
    dino_heads = v.dino.blocks[0].attn.num_heads
    return batch * (calls * v.n_heads + len(v.dino.blocks) * dino_heads)


def test_tiny_plus_forward_on_onednn_matches_torchs_kernels(monkeypatch):
    monkeypatch.setattr(kernels, "ATTENTION_BLOCK_ROWS", 10**6)  # one block per head
    model = create_model("tiny+", image_size=112, seed=3)
    x = _rand(2, 3, 112, 112, seed=4)
    det = Detector(model, device="cpu")
    det.predict_tensor(x)  # text features: computed once, kept
    with kernels.cpu_kernels("torch"), OpCounter() as ref_ops:
        s_ref, m_ref = det.predict_tensor(x)
    with OpCounter() as ops:
        s, m = det.predict_tensor(x)
    assert ONEDNN not in ref_ops.ops
    assert FUSED_CPU not in ops.ops  # every attention took the oneDNN path
    softmaxes = ops.ops.get("aten.softmax.int_out", 0)  # in place, one per (image, head)
    assert softmaxes == _onednn_attention_heads(model, 2)
    # A product per softmax, one with v per attention (E-Attn's three terms share it) and
    # image and head; the rest are the linear layers (CLIP: qkv, out_proj of both paths,
    # MLP ×2; DINOv2: qkv, proj, MLP ×2; D-Attn: values and out_proj).
    cfg, v = model.cfg, model.vision
    with_v = 2 * (2 * v.n_layers - cfg.eattn_start + 1) * v.n_heads
    with_v += 2 * len(v.dino.blocks) * v.dino.blocks[0].attn.num_heads
    linears = 4 * v.n_layers + (v.n_layers - cfg.eattn_start + 1) + 4 * len(v.dino.blocks) + 2
    assert ops.ops[ONEDNN] == softmaxes + with_v + linears
    torch.testing.assert_close(m, m_ref, atol=1e-5, rtol=0)
    torch.testing.assert_close(s, s_ref, atol=1e-5, rtol=0)
    assert not torch.equal(m, m_ref)  # other kernels did run


# -- bf16 (``--precision bf16``) ----------------------------------------------------------------

needs_bf16 = pytest.mark.skipif(
    not torch.ops.mkldnn._is_mkldnn_bf16_supported(), reason="torch's oneDNN bf16 ops refuse here"
)


@pytest.fixture
def bf16_cpu(monkeypatch):
    """Run the bf16 paths whatever this CPU's bf16 speed (its check has a test of its own)."""
    monkeypatch.setattr(kernels, "native_bf16", lambda: True)


@needs_bf16
def test_linear_under_bf16_autocast_is_autocasts_product_on_onednn(bf16_cpu, monkeypatch):
    x, w, b = _rand(2, 37, 24), _rand(40, 24, seed=1), _rand(40, seed=2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        want = F.linear(x, w, b)  # what autocast makes of it: bf16 operands, a bf16 result
        with OpCounter() as rec:
            got = kernels.linear(x, w, b)
        with OpCounter() as rec_cast:  # weights stored in bf16 (cast_frozen_matmuls): the same
            got_cast = kernels.linear(x, w.bfloat16(), b)
        assert kernels.linear_on_onednn(x, w) and kernels.linear_on_onednn(x, w.bfloat16())
    assert rec.ops.get(ONEDNN) == 1 and "aten.addmm.default" not in rec.ops
    assert rec_cast.ops.get(ONEDNN) == 1
    assert got.dtype == want.dtype == torch.bfloat16
    assert torch.equal(got, got_cast)
    # Exact products of the bf16 operands, rounded once to bf16 at the end.
    exact = F.linear(*(t.bfloat16().double() for t in (x, w, b)))
    torch.testing.assert_close(got.double(), exact, rtol=2**-8, atol=1e-6)
    torch.testing.assert_close(got, want, rtol=2**-7, atol=1e-2)
    # fp16 autocast, a CPU without native bf16, or fp32 without autocast: not this path.
    with torch.autocast("cpu", dtype=torch.float16):
        assert _falls_back(lambda: kernels.linear(x, w, b))
    monkeypatch.setattr(kernels, "native_bf16", lambda: False)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert _falls_back(lambda: kernels.linear(x, w, b))
        assert not kernels.linear_on_onednn(x, w)


def _bf16_qkv(b=2, n=19, h=3, d=8, sharp=2.0):
    """bf16 q/k/v as the vision loop gets them: head views of one bf16 projection."""
    qkv = (_rand(b, n, 3 * h * d) * sharp).bfloat16()
    return [t.view(b, n, h, d).transpose(1, 2) for t in qkv.chunk(3, -1)]


def _fused_reference(pairs, v, low=None):
    """fp64 attention on the given values: exact scores, softmax, the probabilities summed over
    the pairs (and rounded to ``low``, as fused CUDA kernels and bf16 products take them), then
    an exact product with v."""
    p = sum(
        torch.softmax(q.double() @ k.double().transpose(-1, -2) / q.shape[-1] ** 0.5, dim=-1)
        for q, k in pairs
    )
    return (p if low is None else p.to(low).double()) @ v.double()


@needs_bf16
def test_bf16_attention_on_onednn_keeps_scores_and_softmax_in_fp32(bf16_cpu):
    q, k, v = _bf16_qkv()
    pairs = [(q, q), (k, k), (v, v)]
    with OpCounter() as rec:
        out = kernels.attention_sum(pairs, v)
    blocks = -(-19 // kernels.ATTENTION_BLOCK_ROWS)
    assert rec.ops.get(ONEDNN) == 4 * 2 * 3 * blocks and FUSED_CPU not in rec.ops
    assert out.dtype == torch.bfloat16 and out.transpose(1, 2).is_contiguous()
    want = _fused_reference(pairs, v, torch.bfloat16)
    # Only the result's rounding to bf16 is left (half an ulp: 2^-9 relative).
    torch.testing.assert_close(out.double(), want, rtol=2**-8, atol=1e-6)
    # Against exact attention, no further off than torch's fused bf16 kernel (which rounds
    # each term's output: summed probabilities are rounded once here).
    exact = sum(F.scaled_dot_product_attention(*(t.double() for t in (a, b, v))) for a, b in pairs)
    fused = sum(F.scaled_dot_product_attention(a, b, v) for a, b in pairs)
    assert (out.double() - exact).abs().max() <= (fused.double() - exact).abs().max()
    # Plain attention (one pair), and a class-token query.
    one = kernels.attention(q, k, v)
    torch.testing.assert_close(one.double(), _fused_reference([(q, k)], v, torch.bfloat16),
                               rtol=2**-8, atol=1e-6)  # fmt: skip
    cls = kernels.attention(q[:, :, :1], k, v)
    assert torch.equal(cls, one[:, :, :1])


@needs_bf16
def test_bf16_attention_falls_back_where_it_must(bf16_cpu, monkeypatch):
    q, k, v = _bf16_qkv()
    with kernels.cpu_kernels("torch"), OpCounter() as rec:
        kernels.attention(q, k, v)
    assert ONEDNN not in rec.ops and rec.ops.get(FUSED_CPU) == 1
    with pytest.raises(RuntimeError, match="same dtype"):  # mixed dtypes: torch's error
        kernels.attention(q, k, v.float())
    assert _falls_back(lambda: kernels.attention(q.half(), k.half(), v.half()))
    monkeypatch.setattr(kernels, "native_bf16", lambda: False)
    assert _falls_back(lambda: kernels.attention(q, k, v))


@needs_bf16
def test_native_bf16_follows_the_cpu(monkeypatch):
    kernels.native_bf16.cache_clear()
    try:
        for avx512_bf16, amx, want in ((True, False, True), (False, True, True),
                                       (False, False, False)):  # fmt: skip
            monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda v=avx512_bf16: v)
            monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda v=amx: v)
            kernels.native_bf16.cache_clear()
            assert kernels.native_bf16() is want
    finally:
        kernels.native_bf16.cache_clear()


@pytest.mark.parametrize("rounding", [torch.float16, torch.bfloat16])
def test_fp32_attention_rounded_as_a_half_precision_kernel(rounding):
    # DINOv2's fp16 attention (half_precision_attention) on fp32 activations.
    qkv = _rand(2, 21, 3 * 2 * 8) * 2
    q, k, v = (t.view(2, 21, 2, 8).transpose(1, 2) for t in qkv.chunk(3, -1))
    with OpCounter() as rec:
        out = kernels.attention(q, k, v, rounding=rounding)
    assert rec.ops.get(ONEDNN) and FUSED_CPU not in rec.ops
    assert out.dtype == torch.float32 and out.transpose(1, 2).is_contiguous()
    assert torch.equal(out, out.to(rounding).float())  # the result is rounded, like the kernel's
    low = [t.to(rounding) for t in (q, k, v)]
    want = _fused_reference([(low[0], low[1])], low[2])  # probabilities kept in fp32
    ulp = 2**-10 if rounding == torch.float16 else 2**-7
    torch.testing.assert_close(out.double(), want, rtol=ulp, atol=1e-6)
    # torch's kernels: SDPA on the cast tensors, exactly as before.
    with kernels.cpu_kernels("torch"), OpCounter() as rec:
        plain = kernels.attention(q, k, v, rounding=rounding)
    assert ONEDNN not in rec.ops
    assert torch.equal(plain, F.scaled_dot_product_attention(*low).float())
    # torch's fused CPU kernel computes the same thing, as closely.
    err, err_plain = ((t.double() - want).abs().max() for t in (out, plain))
    assert err <= 1.5 * err_plain
    torch.testing.assert_close(out, plain, rtol=0, atol=ulp * float(v.abs().max()))
    with pytest.raises(ValueError, match="needs fp32 tensors"):
        kernels.attention(q.bfloat16(), k.bfloat16(), v.bfloat16(), rounding=torch.float16)


@needs_bf16
@pytest.mark.parametrize("dino_fp32", [True, False], ids=["dino-fp32", "dino-bf16"])
def test_tiny_plus_bf16_forward_on_onednn_matches_torchs_kernels(bf16_cpu, monkeypatch, dino_fp32):
    monkeypatch.setattr(kernels, "ATTENTION_BLOCK_ROWS", 10**6)  # one block per head
    model = create_model("tiny+", image_size=112, seed=3, dino_fp32=dino_fp32)
    x = _rand(2, 3, 112, 112, seed=4)
    fp32 = Detector(model, device="cpu")
    s32, m32 = fp32.predict_tensor(x)
    det = Detector(model, device="cpu", precision="bf16", cast_weights=True)
    assert model.matmul_dtype == torch.bfloat16
    det.predict_tensor(x)
    with kernels.cpu_kernels("torch"), OpCounter() as ref_ops:
        s_ref, m_ref = det.predict_tensor(x)
    with OpCounter() as ops:
        s, m = det.predict_tensor(x)
    assert ONEDNN not in ref_ops.ops and ref_ops.ops.get("aten.addmm.default")
    # Every attention (CLIP's in bf16; DINOv2's fp16-rounded, or in bf16 when DINOv2 runs
    # under autocast too) and every linear layer on oneDNN; one addmm is left: DINOv2's patch
    # embedding (PatchConv's own GEMM).
    assert FUSED_CPU not in ops.ops and ops.ops.get("aten.addmm.default") == 1
    assert ops.ops.get("aten.softmax.int_out", 0) == _onednn_attention_heads(model, 2)
    # Both bf16 paths are bf16 approximations of the fp32 forward, equally close.
    err, err_ref = (m - m32).abs().max(), (m_ref - m32).abs().max()
    assert 0 < err <= 2 * err_ref + 1e-4 and err < 1e-2
    assert (s - s32).abs().max() < 1e-2


def test_strided_biases_and_broadcast_attention_give_torchs_results():
    """oneDNN's linear reads the bias as dense, and the attention loop takes one batch and
    head count: a strided bias was read wrong (a stride-0 one past its storage), broadcast
    batches or heads answered for the first one only."""
    x, w = _rand(8, 6), _rand(5, 6, seed=1)
    for bias in (_rand(10, seed=2)[::2], _rand(1, seed=3).expand(5), _rand(1, seed=4)):
        torch.testing.assert_close(kernels.linear(x, w, bias), F.linear(x, w, bias))
    # (the fixture lowers the size rule: these small shapes take oneDNN's path where eligible)
    q, k, v = _rand(1, 2, 20, 8), _rand(2, 2, 20, 8, seed=1), _rand(2, 2, 20, 8, seed=2)
    for args in ((q, k, v), (q.expand(2, -1, -1, -1)[:, :1], k, v), (k, q, q)):
        try:
            want = F.scaled_dot_product_attention(*args)
        except RuntimeError:
            with pytest.raises(RuntimeError):
                kernels.attention(*args)
            continue
        torch.testing.assert_close(kernels.attention(*args), want)


def test_the_onednn_check_is_right_whatever_its_first_caller_runs_under():
    """Its answer is kept for the process: asked first under bf16 autocast or a float64
    default dtype, it said False for good."""
    kernels.onednn_available.cache_clear()
    default = torch.get_default_dtype()
    try:
        torch.set_default_dtype(torch.float64)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert kernels.onednn_available()
    finally:
        torch.set_default_dtype(default)
        kernels.onednn_available.cache_clear()


def test_blocks_in_threads_neither_wait_for_nor_undo_each_other(monkeypatch):
    """A block's choice is its thread's: a block waiting on a worker thread that opens its own
    block finishes (a lock made that a deadlock), and overlapping blocks in two threads each
    see their own choice and leave the process as it was (a global made the first to end
    restore its previous choice under the other)."""
    import threading
    from concurrent.futures import ThreadPoolExecutor

    monkeypatch.setenv(kernels.ENV_VAR, "")  # (set but empty: the default)
    assert kernels.get_cpu_kernels() == "onednn"

    def inner():
        with kernels.cpu_kernels("onednn"):
            return kernels.get_cpu_kernels()

    with kernels.cpu_kernels("torch"), ThreadPoolExecutor(1) as pool:
        seen_inner = pool.submit(inner).result(timeout=20)
        seen_outer = kernels.get_cpu_kernels()
    assert (seen_inner, seen_outer) == ("onednn", "torch")

    a_inside, b_done = threading.Event(), threading.Event()
    seen = {}

    def a():
        with kernels.cpu_kernels("torch"):
            a_inside.set()
            b_done.wait(20)  # (b runs its whole block meanwhile)
            seen["a"] = kernels.get_cpu_kernels()

    def b():
        a_inside.wait(20)
        seen["b outside"] = kernels.get_cpu_kernels()
        with kernels.cpu_kernels("onednn"):
            seen["b"] = kernels.get_cpu_kernels()
        b_done.set()

    threads = [threading.Thread(target=a), threading.Thread(target=b)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert b_done.is_set()
    assert seen == {"a": "torch", "b outside": "onednn", "b": "onednn"}
    assert kernels.get_cpu_kernels() == "onednn"


def test_the_default_is_onednn_on_avx512_and_torch_elsewhere(monkeypatch):
    """Measured: oneDNN's fp32 products beat MKL's sgemm on an AVX-512 Zen 5 and lost to it
    on an AVX2 Zen 3 (RESULTS.md): the default follows the CPU; either can be chosen."""
    monkeypatch.setenv(kernels.ENV_VAR, "")
    monkeypatch.setattr(kernels, "ONEDNN_DEFAULT_ISA", ("AVX512",))  # (as shipped)
    for isa, want in (("AVX512", "onednn"), ("AVX2", "torch"), ("DEFAULT", "torch")):
        monkeypatch.setattr(kernels, "_cpu_capability", lambda isa=isa: isa)
        assert kernels.default_cpu_kernels() == want
        assert kernels.get_cpu_kernels() == want
        monkeypatch.setenv(kernels.ENV_VAR, "onednn")
        assert kernels.get_cpu_kernels() == "onednn"
        monkeypatch.setenv(kernels.ENV_VAR, "")
        with kernels.cpu_kernels("onednn"):
            assert kernels.get_cpu_kernels() == "onednn"


def test_bf16_on_a_cpu_without_native_bf16_is_warned_about(monkeypatch, caplog):
    """Emulated bf16 was 4x slower than fp32 on an AVX2 Zen 3: asking for it there says so."""
    import logging

    import crane.engine.runtime as R
    from crane.engine.runtime import autocast_dtype

    cpu = torch.device("cpu")
    for native, warned in ((False, True), (True, False)):
        monkeypatch.setattr(R, "_SAID", {})
        monkeypatch.setattr(kernels, "native_bf16", lambda native=native: native)
        caplog.clear()
        with caplog.at_level(logging.WARNING):
            assert autocast_dtype("bf16", cpu) is torch.bfloat16
            assert autocast_dtype("fp32", cpu) is None
        assert ("CPU without native bf16" in caplog.text) is warned
    # Once per process: the CLI and its Detector both asked, and it was said twice.
    monkeypatch.setattr(R, "_SAID", {})
    monkeypatch.setattr(kernels, "native_bf16", lambda: False)
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        autocast_dtype("bf16", cpu)
        autocast_dtype("bf16", cpu)
    assert caplog.text.count("CPU without native bf16") == 1
