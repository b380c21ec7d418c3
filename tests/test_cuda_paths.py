"""Paths that only a CUDA device exercises: the CLI commands on the GPU against the CPU,
binned evaluation's per-batch NaN check there, the exact device resize split in rows, and
real CUDA out-of-memory errors (not planted ones) in a batch's forward, in the exact metrics'
ranking and in the device resize. ``benchmarks/pending_gpu.sh tests`` runs them (``-k
cuda``). Where the logic does not depend on the device, the test also runs on the CPU, so
the test itself is checked here; the planted-error versions of the out-of-memory paths are
in ``test_out_of_memory``, ``test_metrics_streaming`` and ``test_pil_resample``."""

from __future__ import annotations

import contextlib
import csv
import json
import logging

import numpy as np
import pytest
import torch
from test_cli import crane
from test_engine import _poison_dino
from test_metrics_streaming import _assert_reports_equal, dataset, feed

from crane.data import AnomalyDataset, make_synthetic_dataset
from crane.data.transforms import resize_each
from crane.engine.evaluate import evaluate
from crane.engine.runtime import scoring_forward
from crane.errors import CraneError
from crane.metrics import MetricAccumulator
from crane.models import create_model

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
SIZE = 112


@contextlib.contextmanager
def cuda_memory_limit(extra_bytes: int):
    """Let torch's allocator on the current CUDA device reserve at most what it reserves now
    plus ``extra_bytes``: past that it raises a real ``torch.OutOfMemoryError`` (after
    freeing its cache, as when another process holds the rest of the GPU)."""
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    total = torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory
    torch.cuda.set_per_process_memory_fraction((torch.cuda.memory_reserved() + extra_bytes) / total)
    try:
        yield
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0)
        torch.cuda.empty_cache()


def _rows(path) -> dict[str, dict[str, str]]:
    with open(path, encoding="utf-8", newline="") as f:
        return {r["path"]: r for r in csv.DictReader(f)}


@cuda
def test_cuda_cli_train_evaluate_predict_match_the_cpu(tmp_path):
    """The commands a user runs, on the GPU (fp32, then predict in bf16 within the accuracy
    guard) against the same commands on the CPU: a run trained on each, the same metrics,
    scores and maps from one run, and no progress file left by a finished predict."""
    data = tmp_path / "synth"
    make_synthetic_dataset(
        data, seed=0, classes=("tile", "plate"), n_train=2, n_test_good=3, n_test_bad=5, size=128
    )
    common = ["--batch-size", "4", "--no-progress"]
    losses = {}
    for device in ("cpu", "cuda"):
        run = tmp_path / f"run_{device}"
        crane("train", "--dataset", "mvtec", "--root", str(data), "--out", str(run),
              "--preset", "tiny+", "--image-size", str(SIZE), "--epochs", "2",
              "--precision", "fp32", "--device", device, *common)  # fmt: skip
        log = [json.loads(x) for x in open(run / "train_log.jsonl")]
        losses[device] = [e["loss"] for e in log]
        assert (run / "epoch_2" / "prompts.safetensors").is_file()
    # (the same seed, data order and initial prompts: only float rounding differs)
    assert losses["cuda"] == pytest.approx(losses["cpu"], rel=1e-3)

    run = tmp_path / "run_cpu"
    metrics = {}
    for device in ("cpu", "cuda"):
        out = tmp_path / f"ev_{device}"
        crane("evaluate", "--dataset", "mvtec", "--root", str(data), "--model", str(run),
              "--out", str(out), "--device", device, *common)  # fmt: skip
        metrics[device] = json.loads((out / "metrics.json").read_text())
    for cls, values in metrics["cpu"]["per_class"].items():
        for k, v in values.items():
            got = metrics["cuda"]["per_class"][cls][k]
            assert got == pytest.approx(v, abs=2e-3, nan_ok=True), (cls, k)

    files = [str(data / "tile" / "test"), str(data / "plate" / "test")]
    pred, maps = {}, {}
    for device, extra in (("cpu", []), ("cuda", []), ("cuda-bf16", ["--precision", "bf16"])):
        out = tmp_path / f"pred_{device}"
        crane("predict", *files, "--model", str(run), "--out", str(out), "--no-overlays",
              "--save-maps", "--device", device.split("-")[0], *extra, *common)  # fmt: skip
        pred[device] = _rows(out / "predictions.csv")
        maps[device] = {p.name: np.load(p) for p in (out / "maps").glob("*.npy")}
        summary = json.loads((out / "summary.json").read_text())
        assert summary["n_images"] == 16 and summary["n_failed"] == 0
        assert not (out / "progress.jsonl").exists()  # (a finished run leaves none)
    for device, tol in (("cuda", 2e-3), ("cuda-bf16", 1e-2)):
        assert pred[device].keys() == pred["cpu"].keys() and len(pred["cpu"]) == 16
        assert maps[device].keys() == maps["cpu"].keys() and len(maps["cpu"]) == 16
        for path, row in pred["cpu"].items():
            got = float(pred[device][path]["image_score"])
            assert got == pytest.approx(float(row["image_score"]), abs=tol), (device, path)
        for name, m in maps["cpu"].items():
            assert np.abs(maps[device][name] - m).max() <= tol, (device, name)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("mode", ["exact", "binned"])
def test_cuda_evaluate_refuses_nan_scores_in_either_metric_mode(synth, device, mode):
    """The per-batch NaN check, on the device's scores, before any metric takes them."""
    model = create_model("tiny+", image_size=SIZE)
    ds = AnomalyDataset(synth, "test", image_size=SIZE)
    _poison_dino(model, image=2)
    with pytest.raises(CraneError, match="NaN .*first image: .*png, 1 in this batch"):
        evaluate(
            model, ds, device=torch.device(device), batch_size=3, metric_mode=mode, progress=False
        )


@pytest.mark.parametrize("device", DEVICES)
def test_cuda_resize_split_in_rows_gives_the_same_pixels(device, monkeypatch):
    """The exact resize's passes, cut into several products of rows (a budget of a few rows,
    as a photo of 10k px meets at the real one), give PIL's pixels on the device."""
    from PIL import Image

    import crane.data.pil_resample as R
    import crane.data.transforms as T

    arr = np.random.default_rng(4).integers(0, 256, (301, 437, 3), dtype=np.uint8)
    want = np.asarray(Image.fromarray(arr).resize((518, 518), Image.Resampling.BICUBIC))
    seen, real_bmm = [], torch.bmm

    def counted(a, b):
        seen.append((a.shape[1], a.device.type))
        return real_bmm(a, b)

    monkeypatch.setattr(R, "_PASS_BYTES", 50_000)
    if device == "cpu":  # (where PIL itself resizes: the GPU's tensor code instead)
        monkeypatch.setattr(T, "_pil_resize_cpu", T._pil_resize_tensor)
    monkeypatch.setattr(torch, "bmm", counted)
    pixels = torch.from_numpy(arr).permute(2, 0, 1).to(device)
    (got,) = resize_each([pixels], 518)
    assert got.device.type == device
    assert np.array_equal(got.permute(1, 2, 0).cpu().numpy(), want)
    assert len(seen) > 20 and max(n for n, _ in seen) < 3 * 301
    assert {d for _, d in seen} == {device}


@cuda
def test_cuda_a_batch_out_of_real_device_memory_runs_in_parts(caplog):
    """A real CUDA out-of-memory error (the allocator capped at 40 % of what a batch of 32
    needs: about 780 MB on the CPU): the batch runs again in smaller parts, with the whole
    batch's results."""
    device = torch.device("cuda")
    model = create_model("tiny+", image_size=518, seed=0).eval().to(device)
    x = torch.randn(32, 3, 518, 518, generator=torch.Generator().manual_seed(0)).to(device)
    forward = scoring_forward(model, device)
    with torch.no_grad():
        forward(x[:1])  # (kernels and workspaces set up before measuring)
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        ref_scores, ref_maps = forward(x)
        need = torch.cuda.max_memory_allocated() - base
        ref_scores, ref_maps = ref_scores.cpu(), ref_maps.cpu()
        assert need > 200 << 20  # (well above the allocator's 20 MB blocks)
        forward = scoring_forward(model, device)  # (a fresh one: no size known to fit)
        with caplog.at_level(logging.WARNING), cuda_memory_limit(int(0.4 * need)):
            scores, maps = forward(x)
            scores, maps = scores.cpu(), maps.cpu()
    message = [m for r in caplog.records if "memory for a batch of 32" in (m := r.getMessage())]
    assert message and "at a time from now on" in message[0]
    torch.testing.assert_close(scores, ref_scores, rtol=0, atol=1e-4)
    torch.testing.assert_close(maps, ref_maps, rtol=0, atol=1e-4)


@cuda
def test_cuda_a_class_out_of_real_device_memory_is_ranked_on_the_host(caplog):
    """A class whose pixel state fits on the GPU but whose ranking does not (a real CUDA
    out-of-memory error): ranked on the host, the CPU's results."""
    data = dataset(6, n=48, size=256, classes=("a", "b"))
    ref = MetricAccumulator()
    feed(ref, data, [16, 32])
    acc = MetricAccumulator(max_device_bytes=None)
    feed(acc, data, [16, 32], device="cuda")
    assert not any(s.pixels.on_host for s in acc._states.values())
    with (
        caplog.at_level(logging.WARNING, logger="crane.metrics.streaming"),
        cuda_memory_limit(8 << 20),  # (a class's scores alone are 6 MB; ranking needs ~5x)
    ):
        got = acc.compute()
    assert "ranking them on the host" in caplog.text
    _assert_reports_equal(got, ref.compute())


@cuda
def test_cuda_a_resize_out_of_real_device_memory_runs_on_the_host(caplog, monkeypatch):
    """2048-px photos on the GPU, with room for their stacked copy (24 MB) but not for the
    exact resize's float64 products (a real CUDA out-of-memory error inside them): resized on
    the host, the same pixels, back on the GPU."""
    import crane.data.pil_resample as R

    rng = np.random.default_rng(7)
    images = [
        torch.from_numpy(rng.integers(0, 256, (3, 2048, 2048), dtype=np.uint8)) for _ in range(2)
    ]
    want = resize_each(images, 518)
    on_gpu = [im.cuda() for im in images]
    real, passes = R._pass_last_dim, []

    def counted(x, out_size):
        passes.append(x.device.type)
        return real(x, out_size)

    monkeypatch.setattr(R, "_pass_last_dim", counted)
    with caplog.at_level(logging.WARNING), cuda_memory_limit(48 << 20):
        got = resize_each(on_gpu, 518)
    assert passes and passes[0] == "cuda"  # (the products started on the GPU, then failed)
    assert "out of GPU memory resizing 2 image(s) of 2048x2048 px" in caplog.text
    for a, b in zip(got, want, strict=True):
        assert a.device.type == "cuda" and torch.equal(a.cpu(), b)
