"""The throughput paths (issue 6): uint8 transfer + device normalisation, device-side map
resizing, frozen-weight casting, TF32 DINO, the pipelined predict loop. CPU tests check they
compute what the plain paths compute; the ``cuda`` ones run where a GPU exists (the device
machine) and compare CUDA against CPU."""

from __future__ import annotations

import contextlib
import copy
import os
from unittest import mock

import numpy as np
import pytest
import torch
from data_fixtures import photo_like
from op_counter import OpCounter
from PIL import Image
from torch.utils._python_dispatch import TorchDispatchMode

from crane.data.transforms import image_to_tensor, image_to_uint8, normalize_uint8
from crane.engine.predict import Detector, Failure, Prediction, resize_maps
from crane.errors import CraneError
from crane.models import create_model, kernels
from crane.models.vision import tf32_matmuls
from crane.viz import resize_map

SIZE = 112
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def _image(mode: str, seed: int = 0, hw=(70, 95)) -> Image.Image:
    rng = np.random.default_rng(seed)
    rgb = Image.fromarray(rng.integers(0, 256, (*hw, 3), dtype=np.uint8))
    if mode == "P":
        return rgb.convert("P", palette=Image.Palette.ADAPTIVE)
    return rgb.convert(mode)


@pytest.mark.parametrize("mode", ["RGB", "L", "P", "RGBA", "LA", "I;16", "CMYK"])
def test_uint8_path_is_bitwise_the_float_path(mode):
    im = _image("L" if mode == "I;16" else mode)
    if mode == "I;16":
        im = Image.fromarray(np.asarray(im).astype(np.uint16) * 257)
    ref = image_to_tensor(im, SIZE)
    px = image_to_uint8(im, SIZE)
    assert px.dtype == torch.uint8 and px.shape == (3, SIZE, SIZE)
    assert torch.equal(normalize_uint8(px), ref)
    assert torch.equal(normalize_uint8(px[None])[0], ref)  # batched


@pytest.mark.parametrize("mode", ["RGB", "L"])
@pytest.mark.parametrize(
    "hw", [(3 * SIZE + 7, 4 * SIZE), (SIZE, 2 * SIZE + 1), (SIZE, SIZE), (4 * SIZE, SIZE + 20)]
)
def test_fast_uint8_shrink_is_torchs_kernel_and_within_a_level_of_pil(mode, hw):
    """The last shape shrinks the height by more than twice as many pixels as the width:
    Pillow 13 runs its vertical pass first there, and so must the fast path."""
    from torchvision.transforms.v2 import functional as TF

    from crane.data.transforms import _pil_vertical_first

    im = photo_like(mode, hw)
    fast, ref = image_to_uint8(im, SIZE, fast=True), image_to_uint8(im, SIZE)
    assert fast.dtype == torch.uint8 and fast.shape == (3, SIZE, SIZE) and fast.is_contiguous()
    # Independent calls of the same kernel: torchvision's resize of the CHW uint8 tensor.
    chw = torch.from_numpy(np.array(im.convert("RGB"))).permute(2, 0, 1).contiguous()
    bicubic = TF.InterpolationMode.BICUBIC
    if hw[0] == 4 * SIZE and _pil_vertical_first():
        chw = TF.resize(chw, [SIZE, hw[1]], interpolation=bicubic, antialias=True)
    tv = TF.resize(chw, [SIZE, SIZE], interpolation=bicubic, antialias=True)
    assert torch.equal(fast, tv)
    diff = (fast.int() - ref.int()).abs()
    assert diff.max() <= 2 and (diff > 0).float().mean() < 0.02
    if mode == "L":
        assert torch.equal(fast[0], fast[1]) and torch.equal(fast[0], fast[2])


@pytest.mark.parametrize(
    "mode, hw",
    [("RGB", (SIZE - 1, 3 * SIZE)), ("L", (50, 60)), ("P", (2 * SIZE, 2 * SIZE))]
    + [(m, (2 * SIZE, 3 * SIZE)) for m in ("RGBA", "LA", "1", "I;16", "CMYK")],
)
def test_fast_uint8_takes_the_reference_path_for_enlarging_and_other_modes(mode, hw):
    """Enlarging, palette (PIL resizes it nearest), alpha (premultiplied) and bilevel images
    keep PIL's exact pixels; 16-bit and CMYK are converted first, then shrunk the fast way."""
    im = photo_like("RGB", hw) if mode in ("I;16", "CMYK") else photo_like(mode, hw)
    if mode == "I;16":
        im = Image.fromarray(np.asarray(im.convert("L")).astype(np.uint16) * 257)
    elif mode == "CMYK":
        im = im.convert("CMYK")
    fast, ref = image_to_uint8(im, SIZE, fast=True), image_to_uint8(im, SIZE)
    if mode in ("I;16", "CMYK"):
        assert (fast.int() - ref.int()).abs().max() <= 2
    else:
        assert torch.equal(fast, ref)


def test_fast_uint8_on_a_real_visa_photo():
    from data_fixtures import shared_data_dir

    data = shared_data_dir()
    if data is None:
        pytest.skip("shared sample data not available")
    with Image.open(data / "visa/fryum/Data/Images/Normal/000.JPG") as im:
        im.load()
        fast, ref = image_to_uint8(im, 518, fast=True), image_to_uint8(im, 518)
    diff = (fast.int() - ref.int()).abs()
    assert diff.max() <= 3 and (diff > 0).float().mean() < 0.01


def test_read_image_tensor_fast_resize_needs_uint8(tmp_path):
    from crane.data.transforms import read_image_tensor

    photo_like("RGB", (40, 50)).save(tmp_path / "a.png")
    with pytest.raises(ValueError, match="as_uint8"):
        read_image_tensor(tmp_path / "a.png", 32, fast_resize=True)


@pytest.mark.parametrize("hw", [(300, 410), (40, 33), (SIZE, 2 * SIZE)])
def test_device_map_resize_matches_pil(hw):
    maps = torch.rand(3, SIZE, SIZE, generator=torch.Generator().manual_seed(1))
    out = resize_maps(maps, *hw)
    assert out.shape == (3, *hw)
    for m, o in zip(maps, out, strict=True):
        ref = resize_map(m.numpy(), *hw)
        np.testing.assert_allclose(o.numpy(), ref, atol=2e-5)  # PIL: float weights
    assert resize_maps(maps, SIZE, SIZE) is maps


def test_cast_frozen_matmuls_changes_nothing_under_autocast():
    x = torch.randn(2, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(0))
    ref = create_model("tiny+", image_size=SIZE, seed=3)
    cast = create_model("tiny+", image_size=SIZE, seed=3)

    def nbytes(m):
        return sum(p.numel() * p.element_size() for p in m.parameters())

    before = nbytes(cast.vision.visual.transformer)
    cast.cast_frozen_matmuls(torch.bfloat16)
    after = nbytes(cast.vision.visual.transformer)
    blk = cast.vision.visual.transformer.resblocks[0]
    assert blk.mlp.c_fc.weight.dtype == blk.attn.in_proj_weight.dtype == torch.bfloat16
    assert blk.attn.out_proj.weight.dtype == torch.float32  # D-Attn uses it in fp32
    assert cast.vision.visual.proj.dtype == torch.float32
    assert next(cast.vision.dino.parameters()).dtype == torch.float32  # dino_fp32
    assert after < 0.55 * before
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        a, b = ref(x), cast(x)
    assert torch.equal(a.anomaly_maps, b.anomaly_maps)
    assert torch.equal(a.image_scores, b.image_scores)
    with pytest.raises(CraneError, match="autocast"):
        cast(x)
    with pytest.raises(ValueError):
        ref.cast_frozen_matmuls(torch.float32)


def test_detector_casts_only_models_it_owns():
    model = create_model("tiny", image_size=SIZE)
    Detector(model, device="cpu", precision="bf16")
    assert model.matmul_dtype is None  # a model passed in is left alone by default
    Detector(model, device="cpu", precision="bf16", cast_weights=True)
    assert model.matmul_dtype is torch.bfloat16
    with pytest.raises(CraneError, match="autocast"):
        Detector(model, device="cpu").predict_tensor(torch.zeros(1, 3, SIZE, SIZE))
    # A model it loads itself: cast under autocast, on the CPU too (no per-call weight casts).
    own = Detector("tiny", device="cpu", precision="bf16", image_size=SIZE)
    assert own.model.matmul_dtype is torch.bfloat16
    assert Detector("tiny", device="cpu", image_size=SIZE).model.matmul_dtype is None


def test_tf32_dino_stays_out_of_torch_compile():
    """The TF32 DINOv2 helper is never traced into a compiled caller's graph (the TF32 switch
    would not carry into compiled code), and it restores the TF32 flags."""
    from crane.models.vision import _dino_features_tf32

    dino = create_model("tiny+", image_size=SIZE).vision.dino
    captured: list[str] = []

    def backend(gm, example_inputs):
        captured.extend(str(n.target) for n in gm.graph.nodes if n.op == "call_function")
        return gm.forward

    x = torch.randn(1, 3, SIZE, SIZE)
    mm = torch.backends.cuda.matmul.allow_tf32
    f = torch.compile(lambda t: _dino_features_tf32(dino, t + 1) * 2, backend=backend)
    with torch.no_grad():
        out = f(x)
        torch.testing.assert_close(out, dino.forward_features(x + 1) * 2)
    assert captured, "the caller was compiled"
    assert not any("linear" in t or "layer_norm" in t or "conv" in t for t in captured), captured
    assert torch.backends.cuda.matmul.allow_tf32 == mm


def test_tf32_tail_only_under_autocast_on_cuda_when_asked():
    """cfg.tail_tf32 moves the fp32 tail (D-Attn mixing, ln_post/proj) to TF32 only under
    autocast on CUDA; the helper runs its function with the TF32 switch on, outside
    torch.compile's graphs, and restores it. Off or elsewhere: the strict fp32 path,
    unchanged (bitwise, on the CPU)."""
    from types import SimpleNamespace
    from unittest import mock

    from crane.models.vision import _dattn_mix, _in_tf32, _project_fp32

    on = create_model("tiny+", image_size=SIZE, seed=2, tail_tf32=True)
    off = create_model("tiny+", image_size=SIZE, seed=2)
    assert not off.cfg.tail_tf32  # off by default
    cuda, cpu = SimpleNamespace(device=torch.device("cuda")), torch.zeros(1)
    for amp in (False, True):
        with mock.patch.object(torch, "is_autocast_enabled", return_value=amp):
            assert on.vision.tail_tf32(cuda) is amp
            assert not on.vision.tail_tf32(cpu) and not off.vision.tail_tf32(cuda)
    # On the CPU the option changes nothing.
    x = torch.randn(2, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(0))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        a, b = on(x), off(x)
    assert torch.equal(a.anomaly_maps, b.anomaly_maps)
    assert torch.equal(a.image_scores, b.image_scores)
    # The helper: TF32 on inside, restored after, and not traced into a compiled caller.
    mm = torch.backends.cuda.matmul.allow_tf32
    seen = []

    def probe(t):
        seen.append(torch.backends.cuda.matmul.allow_tf32)
        return t * 3

    captured: list[str] = []

    def backend(gm, example_inputs):
        captured.extend(str(n.target) for n in gm.graph.nodes if n.op == "call_function")
        return gm.forward

    w = torch.randn(8, 8)
    f = torch.compile(
        lambda t: _in_tf32(_dattn_mix, t, t[:, :, :8] + 1, w, w[0]) * 2, backend=backend
    )
    t = torch.softmax(torch.randn(2, 8, 8), -1)
    torch.testing.assert_close(f(t), _dattn_mix(t, t[:, :, :8] + 1, w, w[0]) * 2)
    assert captured and not any("bmm" in c or "linear" in c for c in captured), captured
    assert _in_tf32(probe, torch.ones(1)).item() == 3 and seen == [True]
    assert torch.backends.cuda.matmul.allow_tf32 == mm
    tokens = torch.randn(2, 5, 8)
    ref = torch.nn.functional.normalize(
        torch.nn.functional.layer_norm(tokens, (8,), w[0], w[1], 1e-5) @ w, dim=-1
    )
    torch.testing.assert_close(_project_fp32(tokens, w[0], w[1], 1e-5, w), ref)


def test_tf32_context_restores_global_flags():
    mm, cd = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    with tf32_matmuls(True):
        assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32
    assert (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32) == (mm, cd)
    with tf32_matmuls(False):
        assert torch.backends.cuda.matmul.allow_tf32 == mm


def _tf32_flags():
    return torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32


def test_tf32_settings_hold_for_their_block_whatever_other_threads_do():
    """TF32 switches are process-wide: a thread wanting strict fp32 waits while another
    thread's TF32 block runs (instead of computing in TF32), and overlapping blocks restore
    the flags as they found them (two threads used to leave TF32 on for good)."""
    import threading
    import time

    from crane.models.vision import strict_fp32

    before = _tf32_flags()
    a_inside, a_may_leave = threading.Event(), threading.Event()
    seen: dict[str, object] = {}

    def tf32_thread():
        with tf32_matmuls(True):
            a_inside.set()
            a_may_leave.wait(10)
            seen["a"] = _tf32_flags()

    def strict_thread():
        a_inside.wait(10)
        with strict_fp32(torch.device("cuda")):
            seen["b"] = _tf32_flags()

    threads = [threading.Thread(target=f) for f in (tf32_thread, strict_thread)]
    for t in threads:
        t.start()
    a_inside.wait(10)
    time.sleep(0.2)
    assert "b" not in seen  # the strict block waits for the TF32 one
    a_may_leave.set()
    for t in threads:
        t.join(10)
    assert seen == {"a": (True, True), "b": (False, False)}
    assert _tf32_flags() == before
    # strict fp32 overrides what the process set (torch's default lets cuDNN use TF32), and
    # is a no-op off CUDA
    torch.backends.cudnn.allow_tf32 = True
    try:
        with strict_fp32(torch.device("cuda")):
            assert _tf32_flags() == (False, False)
            with tf32_matmuls(True):  # the opt-in TF32 parts nest inside
                assert _tf32_flags() == (True, True)
            assert _tf32_flags() == (False, False)
        with strict_fp32(torch.device("cpu")):
            assert torch.backends.cudnn.allow_tf32
    finally:
        torch.backends.cudnn.allow_tf32 = before[1]


def test_model_runs_its_fp32_work_under_strict_fp32(monkeypatch):
    """Every CraneModel entry point (vision, text, scoring heads, training head) and the
    compiled call of scoring_forward run inside strict_fp32 on the model's device."""
    import contextlib

    import crane.engine.runtime as runtime
    import crane.models.crane as crane_mod

    entered = []

    @contextlib.contextmanager
    def spy(device):
        entered.append(device if isinstance(device, str) else torch.device(device).type)
        yield

    monkeypatch.setattr(crane_mod, "strict_fp32", spy)
    monkeypatch.setattr(runtime, "strict_fp32", spy)
    model = create_model("tiny+", image_size=SIZE).eval()
    x = torch.randn(1, 3, SIZE, SIZE)
    with torch.no_grad():
        vis = model.encode_images(x)
    assert entered == ["cpu"]
    with torch.no_grad():
        model.predict_from_features(vis, SIZE)
    assert entered[1:] == ["cpu"] * (len(entered) - 1) and len(entered) >= 2
    n = len(entered)
    model.forward_train(vis)
    assert len(entered) > n
    monkeypatch.setattr(runtime, "strict_fp32", lambda device: spy(f"runtime:{device}"))
    n = len(entered)
    runtime.scoring_forward(model, torch.device("cpu"))(x)
    assert "runtime:cpu" in entered[n:]  # (the compiled call's own: the model's can't switch)


def test_a_cast_model_refuses_another_autocast_dtype():
    model = create_model("tiny", image_size=SIZE).eval().cast_frozen_matmuls(torch.bfloat16)
    x = torch.randn(1, 3, SIZE, SIZE)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        model(x)  # its own dtype: fine
    for ctx in (torch.autocast("cpu", dtype=torch.float16), contextlib.nullcontext()):
        with torch.no_grad(), ctx, pytest.raises(CraneError, match="stored in torch.bfloat16"):
            model(x)


_TF32_NEW_API = """
import sys, torch
from crane.models import create_model
from crane.models.vision import _dino_features_tf32, tf32_matmuls
m, conv = torch.backends.cuda.matmul, torch.backends.cudnn.conv
m.fp32_precision, conv.fp32_precision = sys.argv[1], sys.argv[2]
before = (m.fp32_precision, conv.fp32_precision)
with tf32_matmuls(True):
    assert (m.fp32_precision, conv.fp32_precision) == ("tf32", "tf32")
assert (m.fp32_precision, conv.fp32_precision) == before
dino = create_model("tiny+", image_size=112).vision.dino
with torch.no_grad():
    _dino_features_tf32(dino, torch.randn(1, 3, 112, 112), True)
assert (m.fp32_precision, conv.fp32_precision) == before
print("ok")
"""


@pytest.mark.parametrize("matmul,conv", [("tf32", "tf32"), ("ieee", "ieee")])
def test_tf32_context_with_torchs_new_precision_api(matmul, conv):
    """A process that set torch's newer ``fp32_precision`` settings (after which torch raises
    on reading ``allow_tf32``): the TF32 switch and DINOv2's fp32 path (every Crane+ image on
    a GPU) work through that API and restore it. In a fresh interpreter: the API choice is
    process-wide."""
    import subprocess
    import sys

    r = subprocess.run(
        [sys.executable, "-c", _TF32_NEW_API, matmul, conv], capture_output=True, text=True
    )
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr[-2000:]


def _files(tmp_path, n=7):
    paths = []
    for i in range(n):
        hw = (90, 120) if i % 3 else (SIZE, SIZE)
        p = tmp_path / f"{i}.png"
        _image("RGB", seed=i, hw=hw).save(p)
        paths.append(str(p))
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not an image")
    paths.insert(4, str(bad))  # mid-batch for batch sizes 2 and 3
    return paths


def _same(a, b, atol=1e-5):
    """Same inputs, same order, same values (within ``atol``: batch composition changes the
    float rounding)."""
    assert [r.path for r in a] == [r.path for r in b]
    for x, y in zip(a, b, strict=True):
        assert type(x) is type(y)
        if isinstance(x, Prediction):
            assert x.score == pytest.approx(y.score, abs=atol)
            np.testing.assert_allclose(x.anomaly_map, y.anomaly_map, atol=atol)


def _reference(model, paths):
    """One image at a time through the float preprocessing and PIL map resize."""
    out = {}
    for p in paths:
        try:
            im = Image.open(p)
            im.load()
        except OSError:
            continue
        x = image_to_tensor(im, SIZE)[None]
        with torch.no_grad():
            r = model(x)
        out[p] = (
            float(r.image_scores[0]),
            resize_map(r.anomaly_maps[0].numpy(), im.height, im.width),
        )
    return out


@pytest.mark.parametrize("workers", [0, 2])
def test_predict_iter_order_failures_and_values(tmp_path, workers):
    paths = _files(tmp_path)
    model = create_model("tiny", image_size=SIZE)
    ref = _reference(model, paths)
    det = Detector(model, device="cpu", batch_size=3, workers=workers)
    got = list(det.predict_iter(paths))
    assert [r.path for r in got] == paths  # input order, failures in place
    assert isinstance(got[4], Failure) and "bad.png" in got[4].path
    for r in got:
        if isinstance(r, Prediction):
            score, amap = ref[r.path]
            assert r.score == pytest.approx(score, abs=1e-5)
            assert r.anomaly_map.dtype == np.float32 and r.anomaly_map.shape == amap.shape
            np.testing.assert_allclose(r.anomaly_map, amap, atol=1e-5)


def test_fast_decode_keeps_model_input_resolution(tmp_path):
    """Draft decoding never goes below the model input: a 4x larger JPEG is decoded at 1/2
    scale for a model whose input is just under half its size, not at 1/4."""
    from crane.data.imageio import open_image

    big = Image.fromarray(
        np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)
    ).resize((4 * SIZE, 4 * SIZE))
    big.save(tmp_path / "big.jpg", quality=90)
    det = Detector(create_model("tiny", image_size=SIZE + 14), device="cpu", fast_decode=True)
    assert open_image(tmp_path / "big.jpg", det.draft).size == (2 * SIZE, 2 * SIZE)


def test_fast_decode_workers_shrink_with_torchs_kernel(tmp_path):
    """What a fast-decode loader hands over: the draft-decoded image shrunk the fast way (and
    the exact loader: PIL's pixels of the full decode), for files and in-memory images."""
    from crane.data.imageio import open_image
    from crane.engine.predict import _Decode

    size = SIZE + 14
    photo_like("RGB", (4 * SIZE, 5 * SIZE)).save(tmp_path / "big.jpg", quality=90)
    path = tmp_path / "big.jpg"
    fast, exact = _Decode(size, draft=size), _Decode(size)
    got = fast[(0, path)]
    assert got["ok"] and got["hw"] == (4 * SIZE, 5 * SIZE)
    assert torch.equal(got["image"], image_to_uint8(open_image(path, size), size, fast=True))
    assert torch.equal(exact[(0, path)]["image"], image_to_uint8(open_image(path), size))
    pil = photo_like("RGB", (3 * SIZE, 3 * SIZE))
    assert torch.equal(fast[(1, pil)]["image"], image_to_uint8(pil, size, fast=True))
    assert not torch.equal(fast[(1, pil)]["image"], exact[(1, pil)]["image"])


# --- CUDA (run on the device machine; skipped elsewhere) ------------------------------------


@cuda
def test_cuda_fp32_matches_cpu():
    x = torch.randn(2, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(0))
    model = create_model("tiny+", image_size=SIZE, seed=5)
    s_cpu, m_cpu = Detector(model, device="cpu").predict_tensor(x)
    s_gpu, m_gpu = Detector(model, device="cuda").predict_tensor(x)
    # Strict fp32 on the GPU too (strict_fp32: the Gaussian's cuDNN convolutions ran in TF32
    # by torch's default before the 25th session, which this test allowed with 2e-3; 1e-4 is
    # an estimate of fp32 summation-order noise, not yet run on a GPU).
    torch.testing.assert_close(m_gpu.cpu(), m_cpu, atol=1e-4, rtol=0)
    torch.testing.assert_close(s_gpu.cpu(), s_cpu, atol=1e-4, rtol=0)


@cuda
@pytest.mark.parametrize("preset", ["tiny", "tiny+"])
def test_cuda_bf16_cast_weights_within_guard(preset):
    x = torch.randn(4, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(0))
    s32, m32 = Detector(
        create_model(preset, image_size=SIZE, seed=2), device="cuda"
    ).predict_tensor(x)
    fast = Detector(
        create_model(preset, image_size=SIZE, seed=2),
        device="cuda",
        precision="bf16",
        cast_weights=True,
    )
    assert fast.model.matmul_dtype is torch.bfloat16
    s16, m16 = fast.predict_tensor(x)
    assert (m16 - m32).abs().max() <= 1e-2
    assert (s16 - s32).abs().max() <= 1e-2


@cuda
@pytest.mark.parametrize("compile_model", [False, True])
def test_cuda_tf32_tail_within_guard(compile_model):
    """cfg.tail_tf32 on CUDA under bf16: close to the strict-fp32 tail (TF32's 10-bit
    mantissa in the D-Attn mixing and projections only), eager and compiled (the TF32 part
    runs outside the compiled graphs), and the global TF32 switch is restored.

    Compiled, the TF32 part is a graph break, so Inductor fuses the bf16 code around it
    differently too: on an H100 (17th session) the compiled maps with and without the TF32
    tail differed by 3.2e-3, eager ones by less than 2e-3. Both must stay within the
    benchmark's accuracy guard (1e-2) of the fp32 reference."""
    x = torch.randn(4, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(0))
    mm = torch.backends.cuda.matmul.allow_tf32
    model = create_model("tiny+", image_size=SIZE, seed=2)
    ref = [t.cpu() for t in Detector(model, device="cuda", precision="fp32").predict_tensor(x)]
    out = {}
    for tail in (False, True):
        det = Detector(
            create_model("tiny+", image_size=SIZE, seed=2, tail_tf32=tail),
            device="cuda",
            precision="bf16",
            compile=compile_model,
        )
        out[tail] = [t.cpu() for t in det.predict_tensor(x)]
        for got, want in zip(out[tail], ref, strict=True):
            assert (got - want).abs().max() <= 1e-2
    tol = 5e-3 if compile_model else 2e-3
    torch.testing.assert_close(out[True][1], out[False][1], atol=tol, rtol=0)
    torch.testing.assert_close(out[True][0], out[False][0], atol=tol, rtol=0)
    assert torch.backends.cuda.matmul.allow_tf32 == mm


@cuda
def test_cuda_pipelined_predict_matches_cpu(tmp_path):
    paths = _files(tmp_path, n=9)
    model = create_model("tiny+", image_size=SIZE, seed=4)
    cpu = list(Detector(model, device="cpu", batch_size=2).predict_iter(paths))
    gpu = list(Detector(model, device="cuda", batch_size=2, workers=2).predict_iter(paths))
    _same(gpu, cpu, atol=2e-3)


@cuda
def test_cuda_uint8_normalisation_bitwise():
    px = torch.randint(0, 256, (2, 3, 16, 16), dtype=torch.uint8)
    assert torch.equal(normalize_uint8(px.cuda()).cpu(), normalize_uint8(px))


def test_cli_predict_map_size_and_dino_bf16(tmp_path):
    from crane.cli import main

    src = tmp_path / "in"
    src.mkdir()
    for i in range(2):
        _image("RGB", seed=i, hw=(90, 120)).save(src / f"{i}.png")
    base = [
        "predict",
        str(src),
        "--model",
        "tiny+",
        "--no-progress",
        "--save-maps",
        "--no-overlays",
    ]
    assert main([*base, "--out", str(tmp_path / "a")]) == 0
    assert main([*base, "--out", str(tmp_path / "b"), "--map-size", "model"]) == 0
    big = np.load(tmp_path / "a" / "maps" / "0.npy")
    small = np.load(tmp_path / "b" / "maps" / "0.npy")
    assert big.shape == (90, 120) and small.shape == (224, 224)
    np.testing.assert_allclose(resize_map(small, 90, 120), big, atol=2e-5)
    out = tmp_path / "c"
    argv = [*base, "--out", str(out), "--precision", "bf16", "--dino-bf16"]
    assert main(argv) == 0
    assert np.abs(np.load(out / "maps" / "0.npy") - big).max() < 2e-2


@pytest.mark.parametrize(
    ("flags", "fp32", "attn_fp16", "fp16"),
    [
        ([], True, True, False),  # the preset's default: fp32 DINOv2 with fp16 attention
        (["--dino-precision", "fp32"], True, False, False),
        (["--dino-precision", "fp16-attention"], True, True, False),
        (["--dino-precision", "bf16"], False, True, False),
        (["--dino-precision", "fp16"], False, True, True),
        (["--dino-bf16"], False, True, False),
    ],
)
def test_cli_dino_precision_sets_the_config(flags, fp32, attn_fp16, fp16):
    from crane.cli import build_parser
    from crane.cli.pipelines import _load_model

    predict = ["predict", "x.png", "--out", "o"]
    for cmd in (predict, ["evaluate", "--dataset", "mvtec", "--root", "r"]):
        if "--dino-bf16" in flags and cmd[0] == "evaluate":
            continue  # predict's older spelling only
        args = build_parser().parse_args([*cmd, "--model", "tiny+", *flags])
        cfg = _load_model(args)[0].cfg
        assert (cfg.dino_fp32, cfg.dino_attn_fp16, cfg.dino_fp16) == (fp32, attn_fp16, fp16)


def test_cli_dino_precision_overrides_what_a_run_stored(tmp_path):
    from crane.cli import build_parser
    from crane.cli.pipelines import _load_model
    from crane.models.checkpoint import save_checkpoint

    run = tmp_path / "run"
    stored = create_model("tiny+", image_size=SIZE, dino_fp32=False, dino_fp16=True)
    save_checkpoint(run, stored.cfg, stored.prompt_learner.state_dict())
    for flag, want in (("fp16-attention", (True, False)), ("bf16", (False, False))):
        args = build_parser().parse_args(
            ["predict", "x.png", "--out", "o", "--model", str(run), "--dino-precision", flag]
        )
        cfg = _load_model(args)[0].cfg
        assert (cfg.dino_fp32, cfg.dino_fp16) == want, flag


def test_dino_fp16_needs_dinov2_out_of_fp32():
    with pytest.raises(CraneError, match="dino_fp16=True .* needs dino_fp32=False"):
        create_model("tiny+", image_size=SIZE, dino_fp16=True)


def _unit_layer_scale(model):
    for blk in model.vision.dino.blocks:  # timm's 1e-5 init would hide DINOv2's precision
        blk.ls1.gamma.data.fill_(1.0)
        blk.ls2.gamma.data.fill_(1.0)
    return model


class _MatmulDtypes(TorchDispatchMode):
    """The weight-side input dtype of every addmm/mm run inside it (linear layers, PatchConv)."""

    def __init__(self):
        super().__init__()
        self.seen: list[torch.dtype] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in (torch.ops.aten.addmm.default, torch.ops.aten.mm.default):
            self.seen.append(args[-1].dtype)
        return func(*args, **(kwargs or {}))


def test_dino_fp16_runs_dinov2_matmuls_in_fp16_under_any_autocast():
    x = torch.randn(2, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(0))
    model = _unit_layer_scale(create_model("tiny+", image_size=SIZE, seed=2))
    vis = model.vision
    outs = {}
    with torch.no_grad():
        plain = vis.dino_tokens(x)
        for name, changes in (
            ("fp16", {"dino_fp32": False, "dino_fp16": True}),
            ("bf16", {"dino_fp32": False, "dino_fp16": False}),
        ):
            vis.cfg = vis.cfg.replace(**changes)
            with torch.autocast("cpu", dtype=torch.bfloat16), _MatmulDtypes() as rec:
                outs[name] = vis.dino_tokens(x)
            # Every DINOv2 matmul (patch embedding included) ran in the dtype asked for.
            assert set(rec.seen) == {torch.float16 if name == "fp16" else torch.bfloat16}
        assert torch.equal(vis.dino_tokens(x), plain)  # plain fp32 runs are never affected
    err = {n: float((o.float() - plain).abs().max() / plain.abs().max()) for n, o in outs.items()}
    # fp16 keeps 3 more mantissa bits than bf16: several times closer to fp32.
    assert 0 < err["fp16"] < err["bf16"] / 3, err


def test_dino_fp16_cast_weights_change_nothing_and_maps_stay_within_guard():
    x = torch.randn(2, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(0))
    base = _unit_layer_scale(create_model("tiny+", image_size=SIZE, seed=3))
    s32, m32 = Detector(base, device="cpu").predict_tensor(x)
    fp16 = copy.deepcopy(base)
    fp16.cfg = fp16.vision.cfg = base.cfg.replace(dino_fp32=False, dino_fp16=True)
    cast = copy.deepcopy(fp16).cast_frozen_matmuls(torch.bfloat16)
    assert cast.vision.dino.blocks[0].mlp.fc1.weight.dtype == torch.float16
    assert cast.vision.visual.transformer.resblocks[0].mlp.c_fc.weight.dtype == torch.bfloat16
    s16, m16 = Detector(fp16, device="cpu", precision="bf16").predict_tensor(x)
    sc, mc = Detector(cast, device="cpu", precision="bf16").predict_tensor(x)
    assert torch.equal(mc, m16) and torch.equal(sc, s16)  # stored = cast by autocast per call
    assert 0 < (m16 - m32).abs().max() <= 1e-2
    assert (s16 - s32).abs().max() <= 1e-2


def test_cli_dino_precision_conflict_is_refused():
    from crane.cli import build_parser
    from crane.cli.pipelines import _load_model

    argv = ["predict", "x.png", "--out", "o", "--model", "tiny+", "--dino-bf16"]
    args = build_parser().parse_args([*argv, "--dino-precision", "fp32"])
    with pytest.raises(CraneError, match="contradicts"):
        _load_model(args)


@pytest.mark.parametrize(("batch", "workers"), [(3, 0), (3, 2), (5, 2), (16, 2)])
def test_chunked_loading_keeps_input_order_and_batch_sizes(tmp_path, batch, workers):
    """Workers decode chunks smaller than a batch; the main process joins them into exact
    batches. Failures anywhere (first, consecutive, last) come out in input order."""
    good = []
    for i in range(8):
        p = tmp_path / f"g{i}.png"
        _image("RGB", seed=i, hw=(40, 50)).save(p)
        good.append(str(p))
    bad = []
    for i in range(4):
        p = tmp_path / f"b{i}.png"
        p.write_bytes(b"broken")
        bad.append(str(p))
    paths = [bad[0], *good[:4], bad[1], bad[2], *good[4:], bad[3]]
    det = Detector(create_model("tiny", image_size=SIZE), device="cpu", batch_size=batch)
    det.workers = workers
    sizes = []
    launch = det._launch
    det._launch = lambda b: (sizes.append(len(b["ok"])), launch(b))[1]
    got = list(det.predict_iter(paths))
    assert [r.path for r in got] == paths
    assert [isinstance(r, Failure) for r in got] == [p in bad for p in paths]
    full, rest = divmod(len(good), batch)
    assert [s for s in sizes if s] == [batch] * full + ([rest] if rest else [])


# --- evaluation and training inputs: uint8 pixels, bool masks, pipelined metric updates -----


def test_uint8_dataset_items_are_the_float_items(synth):
    from crane.data import AnomalyDataset
    from crane.errors import DatasetError

    ds = AnomalyDataset(synth, "test", image_size=SIZE)
    view = ds.uint8_view()
    assert ds.pixels == "float" and view.pixels == "uint8" and ds.clip_normalised
    assert view.uint8_view() is view
    n_masked = 0
    for i in range(len(ds)):
        a, b = ds[i], view[i]
        assert b["image"].dtype == torch.uint8 and b["mask"].dtype == torch.bool
        assert torch.equal(normalize_uint8(b["image"]), a["image"])
        assert torch.equal(b["mask"], a["mask"] > 0.5)
        assert torch.equal(a["mask"], b["mask"].float())
        n_masked += int(b["mask"].any())
        assert {k: v for k, v in a.items() if k not in ("image", "mask")} == {
            k: v for k, v in b.items() if k not in ("image", "mask")
        }
    assert n_masked == 10  # 5 anomalous images per class, all with masks
    assert not AnomalyDataset(synth, "test", image_size=SIZE, mean=None, std=None).clip_normalised
    with pytest.raises(DatasetError, match="pixels must be one of"):
        AnomalyDataset(synth, "test", pixels="half")


@pytest.mark.parametrize("mode", ["exact", "binned"])
def test_evaluate_uint8_inputs_give_identical_reports(synth, mode):
    from crane.data import AnomalyDataset
    from crane.engine.evaluate import evaluate

    model = create_model("tiny+", image_size=SIZE, seed=3)
    ds = AnomalyDataset(synth, "test", image_size=SIZE)
    kw = dict(device=torch.device("cpu"), batch_size=3, progress=False, metric_mode=mode)
    fast = evaluate(model, ds, **kw)
    slow = evaluate(model, ds, uint8_inputs=False, **kw)
    assert ds.pixels == "float"  # the caller's dataset is left as it was
    assert fast.n_images == slow.n_images == 16
    assert fast.report.per_class == slow.report.per_class
    # The pixel metrics are defined and not degenerate, so a wrong mask would show.
    for cls in ("tile", "plate"):
        assert 0 < fast.report.per_class[cls]["pixel_auroc"] < 1


def test_batch_loader_hands_over_uint8_only_where_bitwise_equal(synth):
    from crane.data import AnomalyDataset
    from crane.engine.runtime import batch_loader, model_input

    cpu = torch.device("cpu")
    ds = AnomalyDataset(synth, "test", image_size=SIZE)
    fast = next(iter(batch_loader(ds, 4, 0, cpu)))
    slow = next(iter(batch_loader(ds, 4, 0, cpu, uint8=False)))
    assert fast["image"].dtype == torch.uint8 and fast["mask"].dtype == torch.bool
    assert slow["image"].dtype == torch.float32 and ds.pixels == "float"
    assert torch.equal(model_input(fast["image"], cpu), slow["image"])
    assert torch.equal(fast["mask"], slow["mask"] > 0.5)
    assert fast["path"] == slow["path"] == [ds[i]["path"] for i in range(4)]  # in order
    # Another normalisation cannot be applied on the device bitwise: floats as given.
    other = AnomalyDataset(synth, "test", image_size=SIZE, mean=None, std=None)
    assert next(iter(batch_loader(other, 4, 0, cpu)))["image"].dtype == torch.float32


def test_uint8_dataset_refuses_another_normalisation(synth):
    from crane.data import AnomalyDataset
    from crane.errors import DatasetError

    with pytest.raises(DatasetError, match="CLIP statistics"):
        AnomalyDataset(synth, "test", image_size=SIZE, mean=None, std=None, pixels="uint8")
    with pytest.raises(DatasetError, match="CLIP statistics"):
        AnomalyDataset(synth, "test", image_size=SIZE, mean=(0.5,) * 3, pixels="uint8")
    with pytest.raises(DatasetError, match="CLIP statistics"):
        AnomalyDataset(synth, "test", image_size=SIZE, mean=None, std=None).uint8_view()


def test_feature_cache_uint8_inputs_match_float(synth):
    from torch.utils.data import Dataset

    from crane.data import AnomalyDataset
    from crane.engine.features import FeatureCache

    class Plain(Dataset):  # not an AnomalyDataset: handed over as is (float images)
        def __init__(self, ds):
            self.ds = ds

        def __len__(self):
            return len(self.ds)

        def __getitem__(self, i):
            return self.ds[i]

    model = create_model("tiny+", image_size=SIZE, seed=6).eval()
    ds = AnomalyDataset(synth, "test", image_size=SIZE)
    cpu = torch.device("cpu")
    a = FeatureCache.build(model, ds, cpu, batch_size=4, progress=False)
    b = FeatureCache.build(model, Plain(ds), cpu, batch_size=4, progress=False)
    assert ds.pixels == "float"
    for name in ("global_feat", "patch_sets", "masks", "labels"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name


def test_feature_cache_build_moves_the_model_to_the_device(synth):
    """FeatureCache.build moves the model to its device first, as evaluate and train do (a CPU
    model handed over with a CUDA device failed on an H100 in the 16th session)."""
    from unittest import mock

    from crane.data import AnomalyDataset
    from crane.engine.features import FeatureCache

    model = create_model("tiny+", image_size=SIZE, seed=6).eval()
    ds = AnomalyDataset(synth, "test", image_size=SIZE)
    cpu = torch.device("cpu")
    calls = []

    def encode(images):
        calls.append(spy.call_args_list[:])  # .to must already have been called
        return real_encode(images)

    real_encode = model.encode_images
    with (
        mock.patch.object(model, "to", wraps=model.to) as spy,
        mock.patch.object(model, "encode_images", side_effect=encode),
    ):
        FeatureCache.build(model, ds, cpu, batch_size=8, progress=False)
    assert calls and all(c == [mock.call(cpu)] for c in calls)


def test_cli_workers_default_and_validation(synth, tmp_path):
    from crane.cli import main
    from crane.cli.pipelines import _runtime

    class Args:
        device, precision, workers = "cpu", "fp32", None

    args = Args()
    _runtime(args)
    assert args.workers == 0  # on the CPU the model already uses every core
    argv = ["evaluate", "--dataset", "generic", "--root", str(synth), "--model", "tiny"]
    assert main([*argv, "--workers", "-1", "--out", str(tmp_path / "e")]) != 0
    assert main([*argv, "--workers", "2", "--no-progress", "--out", str(tmp_path / "e")]) == 0
    assert (tmp_path / "e" / "metrics.json").is_file()


@cuda
def test_cuda_pipelined_evaluate_matches_cpu(synth):
    """Metric updates on a side stream while the next batch runs: same metrics as the CPU
    (maps differ by ~1e-6 between devices, so near-tied pixels may swap ranks)."""
    from crane.data import AnomalyDataset
    from crane.engine.evaluate import evaluate

    model = create_model("tiny+", image_size=SIZE, seed=3)
    ds = AnomalyDataset(synth, "test", image_size=SIZE)
    kw = dict(batch_size=3, progress=False, workers=2)
    cpu = evaluate(model, ds, device=torch.device("cpu"), **kw).report
    gpu = evaluate(model, ds, device=torch.device("cuda"), **kw).report
    for cls, vals in cpu.per_class.items():
        for k, v in vals.items():
            assert gpu.per_class[cls][k] == pytest.approx(v, abs=2e-3, nan_ok=True), (cls, k)


def test_decode_workers_persist_across_calls_and_survive_abandoned_iterators(tmp_path):
    import os

    paths = _files(tmp_path, n=7)
    model = create_model("tiny", image_size=SIZE, seed=1)
    ref = list(Detector(model, device="cpu", batch_size=2).predict_iter(paths))
    with Detector(model, device="cpu", batch_size=2, workers=2) as det:
        _same(list(det.predict_iter(paths)), ref)
        pids = [w.pid for w in det._loader[1]._iterator._workers]
        assert len(pids) == 2
        # A caller that stops early, then new calls: leftovers are discarded, order kept.
        it = det.predict_iter(paths)
        next(it)
        it.close()
        _same(list(det.predict_iter(paths[::-1])), ref[::-1])
        # Two iterators open at once: the second gets its own loader.
        first = det.predict_iter(paths)
        got = [next(first)]
        _same(list(det.predict_iter(paths[:3])), ref[:3])
        got += list(first)
        _same(got, ref)
        _same(det.predict(paths[0]), ref[:1])
        assert [w.pid for w in det._loader[1]._iterator._workers] == pids  # same processes
    assert det._loader is None
    for pid in pids:  # close() stopped them
        try:
            os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            pass
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)


def test_ctrl_c_inside_predict_iter_leaves_a_usable_detector(tmp_path):
    """A KeyboardInterrupt inside the loop (in a terminal SIGINT also stops the workers) closes
    the shared loader, so the next call starts fresh workers instead of failing on dead ones;
    a bad batch size or worker count is refused up front."""
    paths = _files(tmp_path, n=5)
    model = create_model("tiny", image_size=SIZE, seed=1)
    ref = list(Detector(model, device="cpu", batch_size=2).predict_iter(paths))
    with Detector(model, device="cpu", batch_size=2, workers=1) as det:
        _same(list(det.predict_iter(paths)), ref)
        assert det._loader is not None
        with mock.patch.object(det, "_collect", side_effect=KeyboardInterrupt):
            with pytest.raises(KeyboardInterrupt):
                list(det.predict_iter(paths))
        assert det._loader is None and not det._loader_busy
        _same(list(det.predict_iter(paths)), ref)
    for bad in (dict(batch_size=0), dict(batch_size=-1), dict(workers=-1)):
        with pytest.raises(CraneError, match="batch_size must be >= 1"):
            Detector(model, device="cpu", **bad)


@cuda
def test_cuda_graphs_compile_survives_the_pipelines(tmp_path, synth):
    """With CUDA graphs, a call overwrites the previous call's outputs; the pipelines read
    batch k after launching batch k+1, so the outputs must have been copied out."""
    from crane.data import AnomalyDataset
    from crane.engine.evaluate import evaluate

    paths = _files(tmp_path, n=9)
    model = create_model("tiny", image_size=SIZE, seed=4)
    eager = list(Detector(model, device="cuda", batch_size=2).predict_iter(paths))
    det = Detector(model, device="cuda", batch_size=2, compile="reduce-overhead")
    _same(list(det.predict_iter(paths)), eager, atol=2e-3)
    ds = AnomalyDataset(synth, "test", image_size=SIZE)
    kw = dict(device=torch.device("cuda"), batch_size=3, progress=False)
    a = evaluate(model, ds, **kw).report
    b = evaluate(model, ds, compile="reduce-overhead", **kw).report
    for cls, vals in a.per_class.items():
        for k, v in vals.items():
            assert b.per_class[cls][k] == pytest.approx(v, abs=2e-3, nan_ok=True), (cls, k)


def test_dino_half_precision_attention(monkeypatch):
    """DINOv2's attention modules are timm's outside the context; inside, with fp32 q/k/v the
    re-implemented path is bitwise timm's, with fp16 q/k/v it stays close."""
    from timm.models.vision_transformer import Attention

    from crane.models.backbones import _DinoAttention
    from crane.models.kernels import cpu_kernels
    from crane.models.vision import half_precision_attention

    model = create_model("tiny+", image_size=SIZE, seed=7)
    dino = model.vision.dino
    for blk in dino.blocks:  # timm initialises LayerScale at 1e-5: let attention matter
        blk.ls1.gamma.data.fill_(1.0)
    attn = [m for m in dino.modules() if isinstance(m, Attention)]
    assert attn and all(type(m) is _DinoAttention for m in attn)
    plain = copy.deepcopy(dino)
    for m in plain.modules():
        if type(m) is _DinoAttention:
            m.__class__ = Attention
    assert dino.state_dict().keys() == plain.state_dict().keys()
    x = torch.randn(2, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(0))
    with torch.no_grad(), cpu_kernels("torch"):  # bitwise: torch's fp32 CPU kernels
        ref = plain.forward_features(x)
        assert torch.equal(dino.forward_features(x), ref)
        with half_precision_attention(torch.float32):
            assert torch.equal(dino.forward_features(x), ref)
        with half_precision_attention(torch.float16):
            half = dino.forward_features(x)
        assert torch.equal(dino.forward_features(x), ref)  # the context is gone
    with torch.no_grad():  # oneDNN's fp32 kernels (the CPU default): the same up to rounding
        torch.testing.assert_close(dino.forward_features(x), ref, atol=1e-5, rtol=1e-5)
    err = (half - ref).abs().max() / ref.abs().max()
    assert 1e-5 < err < 2e-3, err  # fp16 rounding (2^-11 relative), not a different result
    if kernels.onednn_available():  # oneDNN's fp32 attention on the fp16-rounded values
        for name, value in (
            ("MIN_TOKENS", 0),
            ("MIN_HEAD_DIM", 0),
            ("ISA", (kernels._cpu_capability(),)),
        ):
            monkeypatch.setattr(kernels, f"ATTENTION_{name}", value)  # even at these sizes
        with (
            torch.no_grad(),
            kernels.cpu_kernels("onednn"),  # (the default on AVX-512 CPUs only)
            half_precision_attention(torch.float16),
            OpCounter() as rec,
        ):
            half_onednn = dino.forward_features(x)
        assert "aten._scaled_dot_product_flash_attention_for_cpu.default" not in rec.ops
        torch.testing.assert_close(half_onednn, half, atol=2e-3 * ref.abs().max(), rtol=0)
        err_onednn = (half_onednn - ref).abs().max() / ref.abs().max()
        assert 1e-5 < err_onednn < 2e-3, err_onednn
    # Through D-Attn to the maps (on CUDA the config's dino_attn_fp16 turns this on).
    det = Detector(model, device="cpu")
    s32, m32 = det.predict_tensor(x)
    with half_precision_attention(torch.float16):
        s16, m16 = det.predict_tensor(x)
    assert 0 < (m16 - m32).abs().max() <= 1e-2
    assert (s16 - s32).abs().max() <= 1e-2


def test_dino_fp16_attention_config_on_cpu():
    """``dino_attn_fp16`` under autocast = DINOv2 in fp32 with fp16 q/k/v, on the CPU as on
    CUDA; plain fp32 runs ignore it."""
    from crane.models.vision import half_precision_attention

    model = create_model("tiny+", image_size=SIZE, seed=2, dino_attn_fp16=True)
    for blk in model.vision.dino.blocks:  # LayerScale 1e-5 would hide attention's part
        blk.ls1.gamma.data.fill_(1.0)
    x = torch.randn(2, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(0))
    vis = model.vision
    with torch.no_grad():
        plain = vis.dino_tokens(x)
        with half_precision_attention():
            half = vis.dino_tokens(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            auto = vis.dino_tokens(x)
        vis.cfg = vis.cfg.replace(dino_attn_fp16=False)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            off = vis.dino_tokens(x)
    assert plain.dtype == auto.dtype == torch.float32
    assert torch.equal(auto, half) and not torch.equal(half, plain)
    assert torch.equal(off, plain)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=cuda)])
def test_dino_fp16_attention_within_guard(device):
    x = torch.randn(4, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(0))
    s32, m32 = Detector(
        create_model("tiny+", image_size=SIZE, seed=2), device=device
    ).predict_tensor(x)
    model = create_model("tiny+", image_size=SIZE, seed=2, dino_attn_fp16=True)
    s16, m16 = Detector(model, device=device, precision="bf16").predict_tensor(x)
    assert (m16 - m32).abs().max() <= 1e-2
    assert (s16 - s32).abs().max() <= 1e-2


_TEST_PID = os.getpid()


class _KillsWorker:
    """An input whose unpickling ends the decode worker that receives it."""

    def __init__(self):
        self.state = 1

    def __setstate__(self, state):
        if os.getpid() != _TEST_PID:
            os._exit(3)


def test_dead_decode_worker_fails_the_call_not_the_detector(tmp_path):
    paths = _files(tmp_path, n=4)
    det = Detector(create_model("tiny", image_size=SIZE), device="cpu", batch_size=2, workers=2)
    ref = list(det.predict_iter(paths))
    with pytest.raises(RuntimeError, match="exited unexpectedly"):
        list(det.predict_iter([paths[0], _KillsWorker(), paths[1]]))
    _same(list(det.predict_iter(paths)), ref)  # fresh workers
    det.close()


def test_patch_conv_is_the_convolution_as_one_gemm():
    """PatchConv = nn.Conv2d (same state dict) for ViT patch embeddings, up to summation order;
    other convolutions run as nn.Conv2d; the built backbones use it."""
    from crane.models.backbones import PatchConv

    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 98, 70, generator=g)
    for bias in (False, True):  # CLIP's conv1 has no bias, DINOv2's has one
        ref = torch.nn.Conv2d(3, 32, 14, stride=14, bias=bias)
        conv = PatchConv(3, 32, 14, stride=14, bias=bias)
        conv.load_state_dict(ref.state_dict())
        want = ref(x)
        with mock.patch.object(torch.nn.Conv2d, "_conv_forward", side_effect=AssertionError):
            got = conv(x)  # the GEMM, not the convolution
        assert got.shape == want.shape == (2, 32, 7, 5)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        assert got.flatten(2).transpose(1, 2).is_contiguous()  # tokens without a copy
        with torch.autocast("cpu", dtype=torch.bfloat16):
            want16, got16 = ref(x), conv(x)
        assert got16.dtype == want16.dtype == torch.bfloat16
        torch.testing.assert_close(got16.float(), want.float(), rtol=2e-2, atol=5e-2)
    # Not a patch embedding (overlapping, padded, or a size the kernel does not divide):
    # exactly nn.Conv2d.
    for kw, size in (({"stride": 7}, 98), ({"stride": 14, "padding": 1}, 98), ({"stride": 14}, 99)):
        ref = torch.nn.Conv2d(3, 8, 14, **kw)
        conv = PatchConv(3, 8, 14, **kw)
        conv.load_state_dict(ref.state_dict())
        y = torch.randn(1, 3, size, size, generator=g)
        assert torch.equal(conv(y), ref(y))
    model = create_model("tiny+", image_size=SIZE)
    assert type(model.vision.visual.conv1) is PatchConv
    assert type(model.vision.dino.patch_embed.proj) is PatchConv


@pytest.mark.parametrize("pin", [False, True])
def test_take_rows_joins_chunks_in_order(pin):
    """The decode loader's batch assembly against torch.cat: the first n rows of the chunks,
    the rest left over as views (no copy); pinned (asked of torch.empty here: no CUDA on the
    test machine) or a view of the first chunk when it holds them all."""
    from unittest import mock

    from crane.engine import predict as predict_module

    real_empty = torch.empty
    asked = []

    def empty(*args, pin_memory=False, **kwargs):
        asked.append(pin_memory)
        return real_empty(*args, **kwargs)

    g = torch.Generator().manual_seed(0)
    for sizes in ([3], [3, 2, 5], [1, 1, 1, 1], [4, 4]):
        chunks = [
            torch.randint(0, 256, (k, 3, 5, 4), generator=g, dtype=torch.uint8) for k in sizes
        ]
        whole = torch.cat(chunks)
        for n in range(1, len(whole) + 1):
            asked.clear()
            with mock.patch.object(predict_module.torch, "empty", empty):
                rows, rest = predict_module._take_rows(chunks, n, pin)
            assert torch.equal(rows, whole[:n])
            left = torch.cat(rest) if rest else whole[:0]
            assert torch.equal(left, whole[n:])
            assert all(any(r.untyped_storage().data_ptr() == c.untyped_storage().data_ptr()
                           for c in chunks) for r in rest)  # fmt: skip
            copied = pin or n > sizes[0]
            assert asked == ([pin] if copied else [])
            if not copied:  # a view of the first chunk
                assert rows.data_ptr() == chunks[0].data_ptr()
    with (
        mock.patch.object(predict_module.torch, "empty", empty),
        pytest.raises(ValueError, match="3 rows in the chunks, 4 asked for"),
    ):
        predict_module._take_rows([torch.zeros(3, 2, dtype=torch.uint8)], 4, pin)


def test_pick_device_pins_the_cuda_index_and_refuses_a_missing_one(monkeypatch):
    """ "cuda" becomes the current device's index once (later uses in another thread, or after
    torch.cuda.set_device, would resolve it to another GPU); a device the machine lacks is a
    clear error."""
    from crane.engine.runtime import pick_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 1)
    for spec in (None, "auto", "cuda", torch.device("cuda")):
        assert pick_device(spec) == torch.device("cuda", 1)
    assert pick_device("cuda:0") == torch.device("cuda", 0)
    assert pick_device("cpu") == torch.device("cpu")
    with pytest.raises(CraneError, match=r"has 2 CUDA device\(s\), cuda:0 to cuda:1"):
        pick_device("cuda:2")
    with pytest.raises(CraneError, match="not a device"):
        pick_device("gpu")


_MATMUL_PRECISION = """
import sys, torch
from crane.models.vision import strict_fp32, tf32_matmuls
torch.set_float32_matmul_precision(sys.argv[1])
with strict_fp32(torch.device("cuda")):
    assert torch.get_float32_matmul_precision() == "highest"
    assert not torch.backends.cuda.matmul.allow_tf32
    with tf32_matmuls(True):
        assert torch.get_float32_matmul_precision() == "high"
    assert torch.get_float32_matmul_precision() == "highest"
assert torch.get_float32_matmul_precision() == sys.argv[1]
print("ok")
"""


@pytest.mark.parametrize("precision", ["medium", "high", "highest"])
def test_tf32_switches_keep_a_users_matmul_precision(precision):
    """A process that called torch.set_float32_matmul_precision keeps its setting, and can
    still read it (setting the legacy allow_tf32 flag made torch refuse the read for good
    after 'medium'). In a fresh interpreter: the API choice is process-wide."""
    import subprocess
    import sys

    r = subprocess.run(
        [sys.executable, "-c", _MATMUL_PRECISION, precision], capture_output=True, text=True
    )
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr[-2000:]


_ONEDNN_BACK = """
import torch
from crane.models.vision import strict_fp32, tf32_matmuls
torch.backends.cuda.matmul.allow_tf32 = True  # only cuBLAS's legacy flag
with strict_fp32(torch.device("cuda")):
    with tf32_matmuls(True):
        pass
with tf32_matmuls(True):
    pass
assert torch.backends.mkldnn.matmul.fp32_precision == "none"
assert torch.get_float32_matmul_precision() == "high"
print("ok")
"""


def test_tf32_switches_give_onednn_its_setting_back():
    """Switching cuBLAS through set_float32_matmul_precision also sets oneDNN's CPU matmuls;
    a process that had set only cuBLAS's flag gets oneDNN's own setting back (it was left
    at TF32). In a fresh interpreter: the settings are process-wide."""
    import subprocess
    import sys

    r = subprocess.run([sys.executable, "-c", _ONEDNN_BACK], capture_output=True, text=True)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr[-2000:]
