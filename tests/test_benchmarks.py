"""benchmarks/: floor.py's FLOP count against an analytic count of the architecture and its
replay of recorded calls; throughput.py and variants.py run through every part on tiny models
(the commands a GPU session runs, so that a script error costs no device time)."""

from __future__ import annotations

import importlib
import json
import re
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from crane.models import create_model
from crane.models import kernels as kernels_mod

ROOT = Path(__file__).resolve().parents[1]


def _bench(name: str):
    folder = str(ROOT / "benchmarks")  # the scripts import throughput.py beside them
    if folder not in sys.path:
        sys.path.insert(0, folder)
    return importlib.import_module(name)


@pytest.fixture(scope="module")
def floor():
    return _bench("floor")


@pytest.fixture(scope="module")
def throughput():
    return _bench("throughput")


@pytest.fixture(scope="module")
def variants():
    return _bench("variants")


def analytic_vision_flops(model, batch: int) -> int:
    """2 × multiply-adds of Crane's vision side, written from the architecture (SPEC §3)."""
    cfg = model.cfg
    visual = model.vision.visual
    blocks = visual.transformer.resblocks
    L, W = len(blocks), visual.conv1.out_channels
    p = visual.conv1.kernel_size[0]
    n = (cfg.image_size // p) ** 2
    t = n + 1
    hidden = blocks[0].mlp.c_fc.out_features
    e = visual.proj.shape[1]
    terms = len(cfg.attn_type.split("+"))
    f = 2 * n * 3 * p * p * W  # patch embedding
    for i in range(1, L + 1):
        dattn_here = cfg.use_dattn and i == cfg.dattn_layer
        lq = 1 if (i == L and not dattn_here) else t  # last block: class token only
        f += 2 * t * W * 3 * W  # q, k, v for every token
        f += 4 * lq * t * W + 2 * lq * W * W  # attention (all heads) + out_proj
        if i >= cfg.eattn_start:
            f += terms * 4 * t * t * W + 2 * t * W * W  # E-Attn terms + out_proj
        if dattn_here:
            f += 2 * t * W * W + 2 * n * n * W + 2 * n * W * W  # values, W·v, out_proj
        f += 2 * 2 * (1 if i == L else t) * W * hidden  # MLP
    sets = len(cfg.feature_layers) + int(cfg.use_dattn)
    f += 2 * W * e + sets * 2 * n * W * e  # ln_post → proj of g and every patch set
    if cfg.use_dattn:
        dino = model.vision.dino
        c = dino.embed_dim
        td = n + dino.num_prefix_tokens
        dh = dino.blocks[0].mlp.fc1.out_features
        f += 2 * n * 3 * p * p * c  # patch embedding (same 14-px patches)
        f += len(dino.blocks) * (2 * td * c * 3 * c + 4 * td * td * c + 2 * td * c * c)
        f += len(dino.blocks) * 2 * 2 * td * c * dh
        f += 2 * n * n * c  # cosine similarities for the D-Attn weights
    return batch * f


@pytest.mark.parametrize("preset", ["tiny", "tiny+"])
def test_recorded_flops_equal_the_architecture(floor, preset, monkeypatch):
    from crane.models import kernels

    model = create_model(preset, pretrained=False).eval()
    x = torch.randn(2, 3, model.cfg.image_size, model.cfg.image_size)
    if kernels.onednn_available():  # the default fp32 CPU kernels: oneDNN products only
        # (the tiny models' attentions too, below the size where the default takes them)
        monkeypatch.setattr(kernels, "ATTENTION_MIN_TOKENS", 0)
        monkeypatch.setattr(kernels, "ATTENTION_MIN_HEAD_DIM", 0)
        monkeypatch.setattr(kernels, "ATTENTION_ISA", (kernels._cpu_capability(),))  # (AVX2 too)
        rec = floor.OpRecorder()
        with torch.inference_mode(), rec, kernels.cpu_kernels("onednn"):
            model.encode_images(x)
        cats = rec.by_category()
        assert set(cats) == {"gemm"}  # each head's attention: two products
        # ... but E-Attn's terms share one product with v: 2·N²·d per head and term saved.
        cfg, visual = model.cfg, model.vision.visual
        tokens = (cfg.image_size // visual.conv1.kernel_size[0]) ** 2 + 1
        width, layers = visual.conv1.out_channels, model.vision.n_layers
        terms = len(cfg.attn_type.split("+"))
        saved = (terms - 1) * (layers - cfg.eattn_start + 1) * 2 * 2 * tokens**2 * width
        assert cats["gemm"]["flops"] == analytic_vision_flops(model, 2) - saved
    rec = floor.OpRecorder()
    with torch.inference_mode(), rec, kernels.cpu_kernels("torch"):
        model.encode_images(x)
    cats = rec.by_category()
    assert sum(row["flops"] for row in cats.values()) == analytic_vision_flops(model, 2)
    cfg = model.cfg
    terms = len(cfg.attn_type.split("+"))
    n_attn = len(model.vision.visual.transformer.resblocks)  # normal path
    n_attn += terms * (n_attn - cfg.eattn_start + 1)  # E-Attn
    if cfg.use_dattn:
        n_attn += len(model.vision.dino.blocks)
    assert cats["attention"]["calls"] == n_attn
    # The patch embeddings run as GEMMs (PatchConv): no convolution left, one GEMM each with
    # K = 3·14·14, the same FLOPs (the total above).
    assert "conv" not in cats
    k = 3 * 14 * 14

    def is_patch_gemm(c):  # (B·N, 3·14·14) patches times a (3·14·14, C) weight
        mats = [a.shape for a in c.args if isinstance(a, floor.TensorSpec) and len(a.shape) == 2]
        return c.category == "gemm" and any(m[1] == k for m in mats)

    patch = [c for c in rec.calls.values() if is_patch_gemm(c)]
    assert sum(c.count for c in patch) == 1 + int(cfg.use_dattn)


def test_records_layouts_and_replays_them(floor):
    a = torch.randn(33, 40)
    w = torch.randn(24, 40)
    q = torch.randn(2, 3, 17, 8)
    rec = floor.OpRecorder()
    with torch.inference_mode(), rec:
        for _ in range(3):
            F.linear(a, w, torch.randn(24))
        F.scaled_dot_product_attention(q, q, q[..., :4])
        torch.bmm(torch.randn(5, 6, 7), torch.randn(5, 7, 9))
    calls = {c.func.__name__: c for c in rec.calls.values()}
    assert set(calls) == {"addmm.default", "scaled_dot_product_attention.default", "bmm.default"}
    mm = calls["addmm.default"]
    assert mm.count == 3 and mm.flops == 2 * 33 * 40 * 24
    # The weight is replayed transposed, as F.linear passes it to the GEMM.
    assert mm.args[2].shape == (40, 24) and mm.args[2].stride == (1, 40)
    assert calls["scaled_dot_product_attention.default"].flops == 2 * 6 * 17 * 17 * (8 + 4)
    assert calls["bmm.default"].flops == 2 * 5 * 6 * 7 * 9
    assert [c.func.__name__ for c in rec.sequence] == ["addmm.default"] * 3 + [
        "scaled_dot_product_attention.default",
        "bmm.default",
    ]
    replayer = floor.Replayer(rec.sequence, torch.device("cpu"))
    assert all(not c.samples for c in rec.calls.values())  # the warm-up pass is not recorded
    total = replayer.run()
    assert [len(c.samples) for c in rec.calls.values()] == [3, 1, 1]
    assert total == pytest.approx(sum(sum(c.samples) for c in rec.calls.values()))
    assert all(c.seconds > 0 for c in rec.calls.values())
    cats = rec.by_category()
    assert cats["gemm"]["s"] == pytest.approx(3 * mm.seconds + calls["bmm.default"].seconds)
    assert cats["gemm"]["flops"] == 3 * mm.flops + calls["bmm.default"].flops


def test_main_writes_json_and_reports_the_target(floor, tmp_path, capsys):
    out = tmp_path / "floor.json"
    argv = ["--preset", "tiny", "--reps", "1", "--target-s", "1e-9", "--json", str(out)]
    assert floor.main(argv) == 0
    text = capsys.readouterr().out
    assert "below the floor: not reachable" in text
    res = json.loads(out.read_text())
    assert len(res["floor_runs_s"]) == len(res["whole_runs_s"]) == 1
    assert res["floor_s"] == res["floor_runs_s"][0] > 0
    assert res["gflop"] * 1e9 == sum(r["flops"] for r in res["categories"].values())
    assert sum(c["count"] for c in res["calls"]) == sum(
        r["calls"] for r in res["categories"].values()
    )
    assert res["rest_s"] == pytest.approx(res["whole_s"] - res["floor_s"])  # one round


def test_replay_runs_each_call_under_its_recorded_tf32_switches(floor):
    from crane.models.vision import tf32_matmuls

    a, b = torch.randn(8, 8), torch.randn(8, 8)
    rec = floor.OpRecorder()
    with torch.inference_mode(), rec:
        torch.mm(a, b)
        with tf32_matmuls(True):  # as DINOv2's part of the forward on CUDA
            torch.mm(a, b)
    assert [c.tf32 for c in rec.sequence] == [floor._tf32_flags(), (True, True)]
    assert len(rec.calls) == 2  # same layout, different switches: two distinct calls
    seen = []
    probe = floor.Call(lambda: seen.append(floor._tf32_flags()), (), {}, 0, (True, False))
    before = floor._tf32_flags()
    floor.Replayer([probe], torch.device("cpu")).run()
    assert seen == [(True, False)] * 2  # warm-up and timed pass
    assert floor._tf32_flags() == before


def test_tensor_specs_rebuild_strided_and_expanded_layouts(floor):
    base = torch.randn(4, 6)
    for x in (base, base.t(), base[:, ::2], base[:1].expand(5, 6), torch.zeros(0, 3)):
        y = floor._spec(x).make(torch.device("cpu"))
        assert y.shape == x.shape and y.stride() == x.stride() and y.dtype == x.dtype
    assert (
        floor._spec(torch.ones(3, dtype=torch.bool)).make(torch.device("cpu")).dtype == torch.bool
    )


def test_throughput_runs_every_part_with_config_changes(throughput, tmp_path, monkeypatch):
    made, kernels = [], []
    real_create, real_detector = throughput.create_model, throughput.Detector

    def spy(name, **kw):
        made.append((name, kw))
        return real_create(name, **kw)

    class DetectorSpy(real_detector):
        def __init__(self, *a, **kw):
            kernels.append((kw.get("precision"), kw.get("attention", "auto")))
            super().__init__(*a, **kw)

    monkeypatch.setattr(throughput, "create_model", spy)
    monkeypatch.setattr(throughput, "Detector", DetectorSpy)
    out = tmp_path / "t.json"
    argv = [
        "--device", "cpu", "--presets", "tiny+", "--amp", "bf16", "--batch", "2",
        "--files", "3", "--workers", "1", "--eval-images", "4", "--train-images", "4",
        "--e2e", "fast-model", "--e2e-workers", "1", "0", "--e2e-threads", "1", "0",
        "--cfg", "dino_attn_fp16=true", "map_combine=logit_mean", "--attention", "math",
        "--json", str(out),
    ]  # fmt: skip
    threads = torch.get_num_threads()
    assert throughput.main(argv) == 0
    # The optimised model path at both batches and the end-to-end Detector got the kernel.
    assert kernels.count(("bf16", "math")) == 3 and ("fp32", "math") not in kernels
    assert made == [
        ("tiny+", {"pretrained": False, "dino_attn_fp16": True, "map_combine": "logit_mean"})
    ]
    res = json.loads(out.read_text())
    assert res["cfg_overrides"] == {"dino_attn_fp16": True, "map_combine": "logit_mean"}
    assert res["attention"] == "math" and {r["attention"] for r in res["model"]} == {"math"}
    assert res["dino_layer_scale"] == 1.0
    assert [r["batch"] for r in res["model"]] == [2, 1]
    for row in res["model"]:
        assert row["opt_bf16_img_s"] > 0 and row["max_abs_diff_map"] <= 1e-2
        # fp32 with torch's CPU kernels beside the default oneDNN ones (crane.models.kernels)
        if not kernels_mod.onednn_available():  # (not an x86 CPU with AVX2/AVX-512)
            assert "opt_fp32_torch_kernels_img_s" not in row
            continue
        # (the default row ran this CPU's default kernels, the other row the others: on AVX2
        # both rows ran torch's before, and the ratio said oneDNN against torch)
        default = kernels_mod.default_cpu_kernels()
        other = "torch" if default == "onednn" else "onednn"
        assert row["cpu_kernels"] == default and f"opt_fp32_{default}_kernels_img_s" not in row
        rate = {default: row["opt_fp32_img_s"], other: row[f"opt_fp32_{other}_kernels_img_s"]}
        assert row["onednn_vs_torch_kernels"] == pytest.approx(rate["onednn"] / rate["torch"])
    # Only the combination asked for, at each worker and thread count asked for (one
    # Detector); the thread count is restored afterwards.
    # First the fp32 baseline (exact decode, maps at input size) the others are measured
    # against, in the same run.
    baseline, *optimised = res["end_to_end"]
    assert baseline["role"] == "baseline_fp32" and baseline["precision"] == "fp32"
    assert (baseline["fast_decode"], baseline["map_size"], baseline["workers"]) == (
        False, "input", 1
    )  # fmt: skip
    assert kernels.count(("fp32", "auto")) == 1 + 2  # the baseline, and bench_model's twice
    rows = [(r["workers"], r["main_threads"]) for r in optimised]
    assert threads > 1  # (2 cores here) so that the two thread counts differ
    assert rows == [(1, 1), (1, threads), (0, 1), (0, threads)]  # 0: as it was
    assert torch.get_num_threads() == threads
    for e2e in res["end_to_end"]:
        assert e2e["main_cpu_per_s"] > 0
    for e2e in optimised:
        assert (e2e["fast_decode"], e2e["map_size"], e2e["n_files"]) == (True, "model", 3)
        assert e2e["precision"] == "bf16"
        ratio = e2e["end_to_end_img_s"] / baseline["end_to_end_img_s"]
        assert e2e["speedup_vs_fp32_baseline"] == pytest.approx(ratio)
        # The rate after the first batch is the rate of the later batches' work (it was
        # divided by the time of one batch fewer: thousands of img/s on the CPU).
        # (a loose bound: the first batch's share of a 3-file run swings with the machine's
        # load — 11× was seen on a busy 2-core box — where that bug gave ~1000×)
        assert 0 < e2e["after_first_batch_img_s"] < 50 * e2e["end_to_end_img_s"]
    e2e = optimised[0]
    modes = [
        (d["fast_decode"], d["fast_resize"], d["device_decode"], d["device_resize"])
        for d in res["decode"]
    ]
    assert list(zip(modes, [d["loader"] for d in res["decode"]], strict=True)) == [
        ((False, False, False, False), "batches"), ((False, False, False, False), "predict"),
        ((True, False, False, False), "batches"), ((True, False, False, False), "predict"),
        ((True, True, False, False), "batches"), ((True, True, False, False), "predict"),
        ((False, False, True, False), "predict"),  # JPEGs decoded on the device (main process)
        ((False, False, False, True), "predict"),  # decoded by the workers, resized on the device
    ]  # fmt: skip
    assert res["decode_accuracy"] == []  # only with a device-decode end-to-end run
    assert all(d["n_files"] == 3 for d in res["decode"])
    # The workers' own decode time per image, and the share of the run they spent on it.
    for row in (*res["decode"], e2e):
        assert row["worker_ms_per_image"] > 0 and 0 < row["workers_busy"] <= 1
    assert 0 <= e2e["main_wait_transfer_s"] <= e2e["main_wait_chunks_s"]
    assert e2e["main_wait_chunks_s"] <= e2e["main_wait_loader_s"]
    for row in res["decode"]:
        assert 0 <= row["main_wait_transfer_s"] <= row["main_wait_s"] <= row["total_s"]
    assert len(res["latency"]) == len(res["train"]) == len(res["evaluate"]) == 1
    # Training: the uncached fp32 baseline beside the cached epochs, in the same run.
    train = res["train"][0]
    assert train["baseline_fp32_uncached_images"] == 4 and train["baseline_fp32_uncached_img_s"] > 0
    assert train["baseline_fp32_uncached_epoch_s"] == pytest.approx(
        4 / train["baseline_fp32_uncached_img_s"]
    )
    assert train["cached_epoch_speedup"] == pytest.approx(
        train["baseline_fp32_uncached_epoch_s"] / train["cached_epoch_s"]
    )
    assert 0 < train["first_epoch_speedup"] < train["cached_epoch_speedup"]
    latency = res["latency"][0]  # one file per call, the last with the JPEG decoded on the device
    assert all(latency[f"{k}_ms"] > 0 for k in ("no_workers", "fresh", "kept", "device_decode"))
    assert res["evaluate"][0]["n_images"] == 8
    assert res["evaluate"][0]["max_abs_diff_mean_metrics"] <= 1e-2
    # Images resized on the device (here the CPU): the optimised path's inputs, its metrics.
    assert res["evaluate"][0]["opt_device_resize_img_s"] > 0
    assert res["evaluate"][0]["max_abs_diff_device_resize"] <= 1e-6


def test_cpu_peak_memory_is_the_growth_since_the_reset(throughput):
    cpu = torch.device("cpu")
    big = np.ones(64 * 2**20, np.uint8)  # 64 MiB, touched
    del big
    throughput.reset_peak(cpu)
    assert throughput.peak_mem_mb(cpu) < 32  # not the lifetime peak (the 64 MiB above)
    held = np.ones(48 * 2**20, np.uint8)
    assert throughput.peak_mem_mb(cpu) >= 40
    del held


def test_throughput_accuracy_guard_fails_the_run(throughput, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(throughput, "MAP_GUARD", 0.0)  # any bf16 difference now fails it
    out = tmp_path / "t.json"
    argv = ["--device", "cpu", "--presets", "tiny", "--amp", "bf16", "--batch", "2",
            "--only", "model", "--json", str(out)]  # fmt: skip
    assert throughput.main(argv) == 1
    assert "ACCURACY GUARD FAILED: tiny batch 2" in capsys.readouterr().err
    rows = json.loads(out.read_text())["model"]
    assert [r["map_guard_ok"] for r in rows] == [False, False]


def test_throughput_json_is_strict(throughput, tmp_path):
    path = tmp_path / "r.json"
    throughput.save({"a": float("nan"), "b": [1.0, float("inf")], "c": {"d": 2}}, str(path))
    assert json.loads(path.read_text(), parse_constant=pytest.fail) == {
        "a": None, "b": [1.0, None], "c": {"d": 2}
    }  # fmt: skip


def test_throughput_device_decode_rows_and_accuracy(throughput, tmp_path):
    """End to end with JPEGs decoded on the device (here the CPU: torchvision's decoder) and
    with images resized on the device, the decode-only rows of those loaders, and how far
    device and fast decoding are from the reference pixels, maps and scores."""
    out = tmp_path / "t.json"
    argv = [
        "--device", "cpu", "--presets", "tiny", "--batch", "2", "--files", "3",
        "--workers", "1", "--only", "e2e", "--e2e", "device-model", "exact-input",
        "resize-input", "--decode", "device", "resize", "--no-e2e-baseline", "--json", str(out),
    ]  # fmt: skip
    assert throughput.main(argv) == 0
    res = json.loads(out.read_text())
    e2e = [
        (r["device_decode"], r["device_resize"], r["fast_decode"], r["map_size"])
        for r in res["end_to_end"]
    ]
    assert e2e == [
        (True, False, False, "model"), (False, False, False, "input"), (False, True, False, "input")
    ]  # fmt: skip
    assert all(r["n_files"] == 3 for r in res["end_to_end"])
    device, resize = res["decode"]
    assert device["device_decode"] and not device["device_resize"]
    assert resize["device_resize"] and not resize["device_decode"]
    for row in (device, resize):
        assert row["loader"] == "predict" and row["n_files"] == 3
    (acc,) = res["decode_accuracy"]
    rows = {r["decode"]: r for r in acc["rows"]}
    assert acc["n_files"] == 3 and set(rows) == {"device", "fast"}
    # On the CPU the device path's decoder is libjpeg-turbo and its resize PIL's: the
    # reference pixels. Fast decoding differs.
    assert rows["device"]["max_level_diff"] == 0 and rows["device"]["max_abs_diff_score"] == 0
    assert rows["fast"]["max_level_diff"] > 0 and rows["fast"]["frac_values_differ"] > 0.1
    for r in rows.values():
        assert 0 <= r["max_abs_diff_map"] < 0.5 and 0 <= r["max_abs_diff_score"] < 0.5


def test_chunk_timer_splits_waiting_for_workers_from_transfer(throughput, monkeypatch):
    """Blocked while the worker still decodes → wait only; blocked on a chunk the worker had
    finished long before → all of it is transfer. On a stand-in clock: exact seconds."""
    clock = [100.0]
    monkeypatch.setattr(throughput.time, "perf_counter", lambda: clock[0])

    def chunks():
        clock[0] += 0.05
        yield {"done_at": clock[0]}  # finished just now: the wait was decoding
        clock[0] += 0.04
        yield {"done_at": 0.0}  # finished long ago: the wait was handing it over

    timer = throughput.ChunkTimer()
    assert len(list(timer.wrap(chunks()))) == 2
    assert timer.wait == pytest.approx(0.09)
    assert timer.transfer == pytest.approx(0.04)


def test_throughput_json_keeps_the_rows_of_a_run_cut_short(throughput, tmp_path, monkeypatch):
    def cut(*a, **k):  # as if the device call's time ran out during the latency part
        raise KeyboardInterrupt

    monkeypatch.setattr(throughput, "bench_latency", cut)
    out = tmp_path / "t.json"
    argv = [
        "--device", "cpu", "--presets", "tiny", "--batch", "2", "--files", "2",
        "--workers", "0", "--only", "e2e", "latency", "--e2e", "fast-model",
        "--decode", "fast", "--no-e2e-baseline", "--json", str(out),
    ]  # fmt: skip
    with pytest.raises(KeyboardInterrupt):
        throughput.main(argv)
    res = json.loads(out.read_text())
    assert [(d["fast_resize"], d["loader"]) for d in res["decode"]] == [
        (True, "batches"), (True, "predict")
    ]  # fmt: skip
    assert len(res["end_to_end"]) == 1
    assert res["end_to_end"][0]["n_files"] == 2 and res["latency"] == []


def test_throughput_quick_mode_keeps_only_presets_and_sizes(throughput, tmp_path, monkeypatch):
    calls = []

    def fake(part):
        def bench(base, device, *args):
            calls.append((part, base.cfg.name, args))
            row = {"preset": base.cfg.name}
            if part == "end_to_end":  # a row per worker count
                return [{**row, "end_to_end_img_s": 1.0}]
            return row

        return bench

    for part in ("model", "end_to_end", "latency", "train", "evaluate"):
        monkeypatch.setattr(throughput, f"bench_{part}", fake(part))

    def model(preset, *a, **k):  # no full-size model is built
        return SimpleNamespace(cfg=SimpleNamespace(name=preset))

    monkeypatch.setattr(throughput, "random_model", model)
    monkeypatch.setattr(
        throughput, "make_jpegs", lambda folder, n, px, w: [f"{i}.jpg" for i in range(n)]
    )

    def make_eval(root, n, px, workers):
        calls.append(("make_eval_dataset", n, px, workers))
        root.mkdir()

    monkeypatch.setattr(throughput, "make_eval_dataset", make_eval)
    monkeypatch.setattr(throughput, "bench_decode", lambda *a: {"n_files": len(a[0])})
    out = tmp_path / "q.json"
    # Only the asked-for parts and presets; the quick sizes fill what was not given.
    assert throughput.main(["--device", "cpu", "--quick", "--presets", "tiny", "--only", "model",
                            "train", "--batch", "4", "--json", str(out)]) == 0  # fmt: skip
    assert calls == [  # --quick: the optimised path in bf16, so the accuracy guard is computed
        ("model", "tiny", (4, "bf16", 3, False, "auto")),
        ("train", "tiny", (64, 3, "bf16", 256)),
    ]
    assert json.loads(out.read_text())["model"] == [{"preset": "tiny"}]
    # A full-size preset: one image through the model part, whatever else was asked for.
    calls.clear()
    assert throughput.main(["--device", "cpu", "--quick", "--presets", "tiny", "crane",
                            "--only", "e2e", "model", "--e2e", "fast-model"]) == 0  # fmt: skip
    paths = [f"{i}.jpg" for i in range(32)]
    assert calls == [
        ("model", "tiny", (8, "bf16", 3, False, "auto")),
        ("end_to_end", "tiny", (paths, 8, 2, "fp32")),  # the fp32 baseline
        (
            "end_to_end",
            "tiny",
            (paths, 8, 2, "bf16", True, "model", False, "auto", None, False, False),
        ),
        ("model", "crane", (1, "bf16", 1, False, "auto")),
    ]
    calls.clear()
    assert (
        throughput.main(["--device", "cpu", "--quick", "--presets", "crane", "--only", "train"])
        == 0
    )
    assert calls == []
    # Writing the evaluate dataset's PNGs is slow: it comes after end to end and latency, which
    # a run cut short should not lose to it; written by the DataLoader worker count.
    assert throughput.main(["--device", "cpu", "--quick", "--presets", "tiny", "--only", "eval",
                            "latency", "e2e", "--e2e", "fast-model", "--eval-images", "6",
                            "--workers", "3"]) == 0  # fmt: skip
    assert [c[0] for c in calls] == [
        "end_to_end", "end_to_end", "latency", "make_eval_dataset", "evaluate"
    ]  # fmt: skip
    assert calls[3] == ("make_eval_dataset", 6, 1024, 3)


def test_random_models_get_unit_layer_scale(throughput):
    from timm.layers import LayerScale

    def gammas(model):
        return torch.cat([m.gamma for m in model.modules() if isinstance(m, LayerScale)])

    kept = throughput.random_model("tiny+", timm_layer_scale=True)
    assert torch.all(gammas(kept) == 1e-5)  # timm's DINOv2 init: blocks add ~nothing
    model = throughput.random_model("tiny+")
    n_blocks = len(model.vision.dino.blocks)
    assert gammas(model).numel() == 2 * n_blocks * model.vision.dino.embed_dim
    assert torch.all(gammas(model) == 1)
    # Only LayerScale moved: every other weight is the seeded init.
    a, b = kept.state_dict(), model.state_dict()
    assert [k for k in a if not torch.equal(a[k], b[k])] == [
        f"vision.dino.blocks.{i}.{ls}.gamma" for i in range(n_blocks) for ls in ("ls1", "ls2")
    ]
    # At 1, DINOv2's blocks change its output (at 1e-5 they hardly do).
    x = torch.randn(1, 3, 224, 224)

    def blocks_share(m):  # how far the blocks move the output from the embedding alone
        dino = m.vision.dino
        with torch.no_grad():
            embed = dino.norm(dino._pos_embed(dino.patch_embed(x)))
            return ((dino.forward_features(x) - embed).norm() / embed.norm()).item()

    assert blocks_share(kept) < 1e-3 < 0.1 < blocks_share(model)


def test_throughput_rejects_unknown_config_fields(throughput, capsys):
    assert throughput.cfg_override("attn_type=vv") == ("attn_type", "vv")
    assert throughput.cfg_override("dattn_gamma=2.5") == ("dattn_gamma", 2.5)
    with pytest.raises(SystemExit):
        throughput.main(["--cfg", "no_such_field=1"])
    assert "no_such_field=1" in capsys.readouterr().err


def test_variants_table_on_tiny_models(variants, tmp_path):
    out = tmp_path / "v.json"
    argv = ["--device", "cpu", "--tiny", "--batch", "2", "--reps", "1", "--json", str(out)]
    assert variants.main(argv) == 0
    res = json.loads(out.read_text())
    assert res["preset"] == "tiny+"
    rows = {r["variant"]: r for r in res["rows"]}
    assert list(rows)[0] == "fp32 (reference)" and "tiny (no DINO), bf16 default" in rows
    assert len(rows) == 15 and all(r["img_s"] > 0 for r in res["rows"])
    guarded = [r for r in res["rows"] if "max_abs_diff_map" in r]
    assert len(guarded) == 13  # every Crane+ variant against the fp32 reference
    # The CPU has one fused attention kernel: cuDNN first computes exactly the default; and
    # no TF32 (the tail option applies on CUDA only).
    default = rows["bf16 default (cast weights, DINO fp32+TF32, fp16 attention)"]
    for same in ("bf16 default, cuDNN attention first", "bf16 default, TF32 tail"):
        assert rows[same]["max_abs_diff_map"] == default["max_abs_diff_map"], same
    # DINOv2's own share: its attention's fp16 rounding moves the maps less than bf16 DINOv2.
    attn16 = rows["fp32 except DINO attention fp16"]["max_abs_diff_map"]
    assert 0 < attn16 < rows["fp32 except DINO bf16"]["max_abs_diff_map"]
    # All of DINOv2 in fp16 (10-bit mantissa) moves them less than in bf16 (7 bits).
    dino16 = rows["fp32 except DINO fp16"]["max_abs_diff_map"]
    assert 0 < dino16 < rows["fp32 except DINO bf16"]["max_abs_diff_map"]
    # Within the guard wherever DINOv2 stays in fp32 (DINOv2 in bf16 is an opt-in trade).
    assert all(
        0 < r["max_abs_diff_map"] <= 1e-2 for r in guarded if "DINO bf16" not in r["variant"]
    )


def test_variants_select_runs_only_matching_rows(variants, tmp_path, monkeypatch):
    out = tmp_path / "v.json"
    argv = ["--device", "cpu", "--tiny", "--batch", "2", "--reps", "1", "--json", str(out)]
    built = []
    make = variants.random_model
    monkeypatch.setattr(
        variants, "random_model", lambda *a, **k: built.append(a[0]) or make(*a, **k)
    )
    # With --compile but no compiled variant selected: nothing compiles, no row gets a
    # compile time it did not spend, and unselected variants' models are never built.
    assert variants.main([*argv, "--compile", "--select", "except DINO bf16"]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [r["variant"] for r in rows] == ["fp32 (reference)", "fp32 except DINO bf16"]
    assert not any("compile_plus_timing_s" in r for r in rows)
    assert built == ["tiny+"]  # not the tiny (no DINO) row's model


def test_variants_json_keeps_the_rows_of_a_run_cut_short(variants, tmp_path, monkeypatch):
    out = tmp_path / "v.json"
    argv = ["--device", "cpu", "--tiny", "--batch", "2", "--reps", "1", "--json", str(out)]
    from data_fixtures import stop_on_call

    # (as if the device call's time ran out during row 3)
    monkeypatch.setattr(variants, "timed", stop_on_call(variants.timed, 3))
    with pytest.raises(KeyboardInterrupt):
        variants.main(argv)
    res = json.loads(out.read_text())
    assert [r["variant"] for r in res["rows"]] == [
        "fp32 (reference)",
        "bf16 default (cast weights, DINO fp32+TF32, fp16 attention)",
    ]
    assert res["device"] == "cpu" and res["dino_layer_scale"] == 1.0
    assert res["rows"][1]["max_abs_diff_map"] > 0


def test_dino_autocast_only_puts_dinov2_alone_under_autocast(variants):
    dino = create_model("tiny+").vision.dino
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        ref = dino.forward_features(x)
        with variants.dino_autocast_only(dino, torch.bfloat16):
            half = dino.forward_features(x)
            assert not torch.is_autocast_enabled("cpu")  # only inside DINOv2's forward
        assert "forward_features" not in vars(dino)  # the class's method again
        assert torch.equal(dino.forward_features(x), ref)
    assert half.dtype == torch.float32 and 0 < (half - ref).abs().max() < 0.1 * ref.abs().max()


def _run_pending(
    tmp_path, steps: str, budget: int, least: int | None = None, out: str = "out", hang=True
):
    """pending_gpu.sh with a stand-in interpreter: compiled runs hang (``hang``), pytest
    fails."""
    fake = tmp_path / "python"
    fake.write_text(
        "#!/usr/bin/env bash\n"
        "[[ $1 == -c ]] && exit 0\n"  # the import check
        'echo "ran: $*"\n'
        + ('[[ "$*" == *--compile* ]] && exec sleep 60\n' if hang else "")
        + "[[ $1 == -m && $2 == pytest ]] && exit 1\n"
        "exit 0\n"
    )
    fake.chmod(0o755)
    env = {"PATH": "/usr/bin:/bin", "PYTHON": str(fake), "HOME": str(tmp_path)}
    if least is not None:
        env["PENDING_GPU_LEAST_S"] = str(least)
    out = tmp_path / out
    proc = subprocess.run(
        ["bash", str(ROOT / "benchmarks" / "pending_gpu.sh"), steps, str(out), str(budget)],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    return proc, out


def test_pending_gpu_runs_steps_in_order_within_the_budget(tmp_path):
    t = time.monotonic()
    proc, out = _run_pending(tmp_path, "variants,compiled,floor", budget=4, least=2)
    assert time.monotonic() - t < 30  # the hanging step was cut at the budget, not waited for
    assert proc.returncode == 1
    summary = proc.stdout.split("=== summary")[1].splitlines()
    assert summary[1].startswith("variants: ok")
    assert summary[2].startswith("compiled: cut at the budget")
    assert summary[3].startswith("floor: skipped")
    log = (out / "log.txt").read_text()
    assert f"variants.py --device cuda --batch 32 --json {out}/variants_b32.json" in log
    assert "--compile --select torch.compile" in log
    assert "floor.py" not in log


def test_pending_gpu_skips_steps_once_the_budget_is_spent_even_with_no_minimum(tmp_path):
    """With PENDING_GPU_LEAST_S=0 a step met with 0 s left ran under ``timeout 0``: no limit."""
    proc, out = _run_pending(tmp_path, "compiled,floor", budget=2, least=0)
    summary = proc.stdout.split("=== summary")[1].splitlines()
    assert summary[1].startswith("compiled: cut at the budget")
    assert summary[2].startswith("floor: skipped")
    assert "floor.py" not in (out / "log.txt").read_text()


def test_the_training_baselines_peak_holds_one_model_as_the_optimised_runs(throughput,
                                                                          monkeypatch):  # fmt: skip
    """The optimised run's copy of the model was made before the uncached baseline, whose
    peak device memory then counted two models (2 GB too many for Crane+ on CUDA)."""
    import gc

    from crane.models.crane import CraneModel

    base = create_model("tiny", image_size=56, seed=0)
    alive, real = [], throughput.reset_peak

    def counted(device):
        gc.collect()
        alive.append(sum(isinstance(o, CraneModel) for o in gc.get_objects()) - 1)  # (not base)
        real(device)

    monkeypatch.setattr(throughput, "reset_peak", counted)
    throughput.bench_train(base, torch.device("cpu"), n=8, epochs=1, amp="fp32")
    assert alive[:2] == [1, 1]  # (the baseline's model; then the optimised run's alone)


def test_benchmark_json_is_written_without_touching_a_sibling_tmp_file(tmp_path, throughput):
    mine = tmp_path / "run.tmp"
    mine.write_text("a user's file")
    throughput.save({"a": 1}, str(tmp_path / "run.json"))
    assert json.loads((tmp_path / "run.json").read_text()) == {"a": 1}
    assert mine.read_text() == "a user's file"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run.json", "run.tmp"]


def test_pending_gpu_reports_failures_and_rejects_unknown_steps(tmp_path):
    proc, _ = _run_pending(tmp_path, "tests,model", budget=0)
    assert proc.returncode == 1
    assert "tests: exit 1" in proc.stdout and "model: ok" in proc.stdout
    # A step whose useful minimum does not fit is skipped, not started.
    proc, out = _run_pending(tmp_path, "compiled", budget=30, out="second")
    # (29 when the script's setup crossed a second boundary: it counts whole seconds)
    assert re.search(r"compiled: skipped \((29|30) s left, needs at least 120 s\)", proc.stdout)
    assert "ran:" not in (out / "log.txt").read_text()
    proc, _ = _run_pending(tmp_path, "variants,no-such-step", budget=0)
    assert proc.returncode == 2 and "unknown step no-such-step" in proc.stderr


def test_outputs_benchmark_rows_and_files(tmp_path, capsys):
    outputs = _bench("outputs")
    out = tmp_path / "o.json"
    argv = ["--files", "3", "--px", "96", "--size", "28", "--threads", "0", "2", "--maps",
            "--json", str(out)]  # fmt: skip
    assert outputs.main(argv) == 0
    res = json.loads(out.read_text())
    pil, ours = "Pillow, level 1, RLE", "Up filter, level 1, RLE"
    assert [(r["threads"], r["format"]) for r in res["rows"]] == [
        (0, "Pillow default (level 6)"), (0, pil), (0, ours), (2, pil), (2, ours),
        (2, "JPEG q90"),
    ]  # fmt: skip
    assert all(r["img_s"] > 0 and r["overlay_mb"] > 0 for r in res["rows"])
    assert "| 2 | Up filter, level 1, RLE |" in capsys.readouterr().out
    assert outputs.main([*argv[:-2], "--skip-baseline", "--json", str(out)]) == 0
    assert [r["threads"] for r in json.loads(out.read_text())["rows"]] == [0, 0, 2, 2, 2]


def test_attention_benchmark_rows_and_per_image_sums(tmp_path, capsys):
    bench = _bench("attention")
    out = tmp_path / "a.json"
    argv = ["--device", "cpu", "--tokens", "100", "--reps", "1", "--json", str(out)]
    assert bench.main(argv) == 0
    res = json.loads(out.read_text())
    rows = res["rows"]
    # On the CPU: no fp16 DINOv2 row; each shape times torch's fused kernel and math once.
    assert [r["shape"] for r in rows[::5]] == [
        "CLIP ViT-L/14 (E-Attn q=k)",
        "DINOv2-B/14, fp32 attention",
    ]
    for shape in {r["shape"] for r in rows}:
        mine = {r["setting"]: r for r in rows if r["shape"] == shape}
        assert list(mine) == ["auto", "cudnn", "flash", "efficient", "math"]
        assert (mine["auto"]["kernel"], mine["math"]["kernel"]) == ("flash", "math")
        for name in ("cudnn", "flash", "efficient"):
            assert mine[name]["same_as"] == "auto" and "ms_per_call" not in mine[name]
        for name in ("auto", "math"):
            r = mine[name]
            assert 0 < r["max_abs_diff"] < 1e-5  # both against the materialised fp32 reference
            assert r["tflop_s"] == pytest.approx(r["gflop_per_call"] / r["ms_per_call"])
        heads = 16 if shape.startswith("CLIP") else 12
        assert mine["auto"]["gflop_per_call"] == pytest.approx(4 * heads * 100 * 100 * 64 / 1e9)
    ms = {(r["shape"][:4], r["setting"]): r.get("ms_per_call") for r in rows}
    for s in res["per_image"]:
        own = "math" if s["setting"] == "math" else "auto"
        assert s["ms"] == pytest.approx(81 * ms[("CLIP", own)] + 12 * ms[("DINO", own)])
    assert "| DINOv2-B/14, fp32 attention | math | math/math |" in capsys.readouterr().out


def test_floor_replays_under_the_attention_kernel_asked_for(floor, tmp_path):
    kernels = {}
    for name in ("auto", "math"):
        out = tmp_path / f"{name}.json"
        argv = ["--preset", "tiny", "--reps", "1", "--attention", name, "--json", str(out),
                "--cpu-kernels", "torch"]  # torch's fused CPU attention  # fmt: skip
        assert floor.main(argv) == 0  # the replay checks it runs the recorded kernels
        res = json.loads(out.read_text())
        assert res["attention"] == name and res["cpu_kernels"] == "torch"
        attn = [c for c in res["calls"] if c["category"] == "attention"]
        kernels[name] = {c["op"].split(" [")[0] for c in attn}
        # tiny: 4 CLIP blocks + 3 E-Attn terms in each of blocks 2-4 (text features come first).
        assert sum(c["count"] for c in attn) == 4 + 3 * 3
    assert kernels == {
        "auto": {"scaled_dot_product_attention.default (flash)"},
        "math": {"scaled_dot_product_attention.default (math)"},
    }


def test_floor_refuses_a_replay_that_would_run_another_attention_kernel(floor):
    from crane.engine.runtime import attention_kernels

    q = torch.randn(1, 2, 16, 8)
    rec = floor.OpRecorder()
    with torch.inference_mode(), rec, attention_kernels("math"):
        F.scaled_dot_product_attention(q, q, q)
    (call,) = rec.sequence
    assert call.kernel == "math" and call.category == "attention"
    with attention_kernels("math"):
        floor.Replayer(rec.sequence, torch.device("cpu")).run()
    with pytest.raises(RuntimeError, match="would run the flash kernel"):
        floor.Replayer(rec.sequence, torch.device("cpu"))


def test_rebatch_benchmark_rows_and_the_two_joins_agree(tmp_path, capsys):
    bench = _bench("rebatch")
    out = tmp_path / "r.json"
    argv = ["--files", "10", "--px", "40", "--size", "28", "--batch", "4", "--workers", "2",
            "--chunks", "3", "1", "--threads", "1", "--reps", "1", "--json", str(out)]  # fmt: skip
    assert bench.main(argv) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [(r["join"], r["chunk"]) for r in rows] == [
        ("cat+pin", 3), ("direct", 3), ("cat+pin", 1), ("direct", 1)
    ]  # fmt: skip
    assert all(r["img_s"] > 0 and r["join_ms_per_batch"] >= 0 for r in rows)
    assert "| direct | 1 | 1 |" in capsys.readouterr().out
    # The old join, kept for comparison, gives the same batches as the product's.
    g = torch.Generator().manual_seed(1)
    chunks = [torch.randint(0, 256, (k, 3, 4, 4), generator=g, dtype=torch.uint8) for k in (3, 3)]
    for n in (2, 3, 5, 6):
        a, ra = bench.JOINS["cat+pin"](chunks, n, False)
        b, rb = bench.JOINS["direct"](chunks, n, False)
        assert torch.equal(a, b)
        assert torch.equal(torch.cat(ra) if ra else a[:0], torch.cat(rb) if rb else b[:0])


def test_dataset_loader_benchmark_rows_and_the_two_loaders_agree(tmp_path, capsys):
    bench = _bench("dataset_loader")
    out, data = tmp_path / "d.json", tmp_path / "data"
    argv = ["--per-class", "5", "--px", "40", "--size", "28", "--batch", "4", "--workers", "2",
            "--model-ms", "0", "30", "--reps", "1", "--data", str(data),
            "--json", str(out)]  # fmt: skip
    assert bench.main(argv) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [(r["loader"], r["model_ms_per_batch"]) for r in rows] == [
        ("whole", 0), ("chunked", 0), ("whole", 30), ("chunked", 30)
    ]  # fmt: skip
    assert all(r["n_images"] == 10 and 0 < r["first_batch_s"] < r["total_s"] for r in rows)
    # Held 30 ms per batch (3 batches): the paced rows cannot beat the pace.
    assert all(r["total_s"] >= 0.09 and r["model_only_img_s"] == 4 / 0.03 for r in rows[2:])
    assert "| chunked | 30 |" in capsys.readouterr().out
    # The old loader, kept for comparison, gives the product's batches.
    from crane.data import AnomalyDataset

    ds = AnomalyDataset(data, "test", image_size=28)
    cpu = torch.device("cpu")
    old = list(bench.LOADERS["whole"](ds, 4, 0, cpu))
    new = list(bench.LOADERS["chunked"](ds, 4, 2, cpu))
    assert [b["path"] for b in old] == [b["path"] for b in new]
    for a, b in zip(old, new, strict=True):
        assert torch.equal(a["image"], b["image"]) and torch.equal(a["mask"], b["mask"])
        assert torch.equal(a["label"], b["label"])


def test_pending_gpu_all_runs_every_step_once_in_order(tmp_path):
    """``all`` expands to every step the script knows, each run once with its command (a
    stand-in interpreter: nothing runs for real)."""
    script = (ROOT / "benchmarks" / "pending_gpu.sh").read_text()
    known = re.search(r"declare -A least=\((.*?)\)\n", script, re.S).group(1)
    names = set(re.findall(r"\[([a-z0-9-]+)\]=", known))
    proc, out = _run_pending(tmp_path, "all", budget=0, hang=False)
    ran = re.findall(r"^=== ([a-z0-9-]+) \(\d\d:\d\d:\d\d\)$", (out / "log.txt").read_text(), re.M)
    assert ran[:3] == ["tests", "compiled", "floor"] and sorted(ran) == sorted(names)
    log = (out / "log.txt").read_text()
    assert "rebatch.py --workers 16 --batch 32 --files 1024 --chunks 2 8 --threads 0 2" in log
    assert "--only train" in log and "--e2e exact-input resize-input fast-input fast-model" in log
    assert "--only eval --eval-images 256" in log
    assert "dataset_loader.py --workers 16 --per-class 256 --px 1024 --model-ms 0 190" in log


@pytest.mark.skipif(not kernels_mod.onednn_available(), reason="no oneDNN linear on this CPU")
def test_cpu_kernels_benchmark_rows(tmp_path, monkeypatch, capsys):
    bench = _bench("cpu_kernels")
    monkeypatch.setattr(bench, "GEMMS", {"small": (37, 24, 40, 3)})
    monkeypatch.setattr(
        bench, "ATTENTIONS", {"small attention": (2, 29, 1, 5), "small E-Attn": (2, 29, 3, 4)}
    )
    out = tmp_path / "k.json"
    argv = ["--reps", "1", "--rounds", "2", "--preset", "tiny+", "--image-size", "112",
            "--json", str(out)]  # fmt: skip
    assert bench.main(argv) == 0
    res = json.loads(out.read_text())
    assert [r["op"] for r in res["ops"]] == ["small", "small attention", "small E-Attn"]
    gemm, attn, eattn = res["ops"]
    assert gemm["gflop"] == pytest.approx(2 * 37 * 24 * 40 / 1e9)
    assert attn["gflop"] == pytest.approx(4 * 2 * 29 * 29 * 64 / 1e9)
    assert eattn["gflop"] == pytest.approx(3 * attn["gflop"])
    for row in res["ops"]:
        for kind in ("torch", "onednn"):
            assert row[f"{kind}_max_abs_err"] < 1e-4  # both against fp64
            assert row[f"{kind}_s_per_image"] == pytest.approx(
                row[f"{kind}_ms"] * row["calls_per_image"] / 1e3
            )
        assert row["speedup"] == pytest.approx(row["torch_ms"] / row["onednn_ms"])
    whole = res["whole"]
    assert len(whole["torch_s_all"]) == len(whole["onednn_s_all"]) == 2
    assert 0 < whole["max_abs_diff_map"] <= 1e-5  # other kernels ran; rounding only
    assert "whole image (tiny+, 112²" in capsys.readouterr().out


@pytest.mark.skipif(
    not kernels_mod.onednn_available() or not torch.ops.mkldnn._is_mkldnn_bf16_supported(),
    reason="no oneDNN linear, or no oneDNN bf16 on this CPU",
)
def test_cpu_kernels_benchmark_bf16_rows(tmp_path, monkeypatch, capsys):
    bench = _bench("cpu_kernels")
    monkeypatch.setattr(kernels_mod, "native_bf16", lambda: True)  # whatever its bf16 speed
    for name, value in (("MIN_TOKENS", 0), ("MIN_HEAD_DIM", 0)):
        monkeypatch.setattr(kernels_mod, f"ATTENTION_{name}", value)  # at these sizes too
    monkeypatch.setattr(kernels_mod, "ATTENTION_ISA", (kernels_mod._cpu_capability(),))
    monkeypatch.setattr(
        bench, "GEMMS", {"CLIP small": (37, 24, 40, 3), "DINOv2 small": (37, 24, 40, 2)}
    )
    monkeypatch.setattr(
        bench,
        "ATTENTIONS",
        {"CLIP small E-Attn": (2, 29, 3, 4), "DINOv2 small attention": (2, 29, 1, 5)},
    )
    out = tmp_path / "k.json"
    argv = ["--reps", "1", "--rounds", "2", "--preset", "tiny+", "--image-size", "112",
            "--precision", "bf16", "--json", str(out)]  # fmt: skip
    assert bench.main(argv) == 0
    res = json.loads(out.read_text())
    assert res["precision"] == "bf16" and res["native_bf16"] is True
    rows = {r["op"]: r for r in res["ops"]}
    assert rows["CLIP small"]["bf16_autocast"] and rows["CLIP small E-Attn"]["bf16_autocast"]
    assert not rows["DINOv2 small"]["bf16_autocast"]
    for kind in ("torch", "onednn"):
        # CLIP's bf16 products and attention: bf16's rounding (2^-9), not fp32's.
        assert 1e-4 < rows["CLIP small"][f"{kind}_max_abs_err"] < 5e-2
        assert 1e-4 < rows["CLIP small E-Attn"][f"{kind}_max_abs_err"] < 1e-1
        assert rows["DINOv2 small"][f"{kind}_max_abs_err"] < 1e-5  # fp32 products
        assert 1e-5 < rows["DINOv2 small attention"][f"{kind}_max_abs_err"] < 1e-2  # fp16-rounded
    whole = res["whole"]
    assert whole["precision"] == "bf16" and 0 < whole["max_abs_diff_map"] <= 1e-2
    # The fp32 default ran in the same rounds: its time and the bf16 maps' distance from it.
    assert len(whole["fp32_onednn_s_all"]) == len(whole["onednn_s_all"]) == 2
    assert whole["vs_fp32_speedup"] == pytest.approx(whole["fp32_onednn_s"] / whole["onednn_s"])
    assert 0 < whole["vs_fp32_max_abs_diff_map"] <= 1e-2
    assert "whole image (tiny+, 112², bf16" in capsys.readouterr().out


def test_host_names_the_cpu_generation(throughput, monkeypatch):
    import builtins
    import io

    text = "processor\t: 0\nvendor_id\t: AuthenticAMD\ncpu family\t: 25\nmodel\t\t: 1\n"
    text += "model name\t: AMD EPYC\n\nprocessor\t: 1\nmodel name\t: other\n"
    real_open = builtins.open
    monkeypatch.setattr(
        builtins,
        "open",
        lambda path, *a, **k: (
            io.StringIO(text) if path == "/proc/cpuinfo" else real_open(path, *a, **k)
        ),
    )
    assert throughput.cpu_model() == "AMD EPYC (family 25, model 1)"
    info = throughput.host()
    assert info["cpu"] == "AMD EPYC (family 25, model 1)" and info["cpu_count"] >= 1
    assert info["cpu_capability"] == torch.backends.cpu.get_cpu_capability()


@pytest.mark.parametrize("main_copy", [False, True])
def test_decode_supply_rows(tmp_path, main_copy):
    """The three routes over the same files: with ``device_resize`` every (large) image
    arrives unresized — through the workers' reused buffers, or a new segment each — without
    it none does; the summary holds one row per route. ``--main-copy`` is recorded."""
    bench = _bench("decode_supply")
    out = tmp_path / "s.json"
    argv = ["--files", "4", "--px", "300", "--size", "224", "--batch", "2", "--workers", "1"]
    argv += ["--main-copy"] if main_copy else []
    assert bench.main([*argv, "--reps", "1", "--json", str(out)]) == 0
    res = json.loads(out.read_text())
    rows = {(r["device_resize"], r["handover_pool"]): r for r in res["rows"]}
    assert sorted(rows) == [(False, True), (True, False), (True, True)]
    assert rows[True, True]["n_unresized"] == rows[True, False]["n_unresized"] == 4
    assert rows[False, True]["n_unresized"] == 0
    assert all(r["n_files"] == 4 and r["img_s"] > 0 for r in res["rows"])
    assert [s["device_resize"] for s in res["summary"]] == [False, True, True]
    assert all(r["heap_reuse"] and r["main_copy"] == main_copy for r in res["rows"])
