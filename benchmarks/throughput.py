"""Throughput and memory of predict (model only / end to end from files) and training epochs.

Compares, in the same run, an fp32 eager *baseline* path (reference-style: text features
recomputed per batch, Gaussian smoothing with scipy on the CPU, one image at a time through
post-processing) with the *optimised* path (cached text features, smoothing/fusion on the
device, autocast bf16 where the device supports it with bf16-stored frozen matmul weights,
optional torch.compile). Weights are random: speed does not depend on their values.

  python benchmarks/throughput.py --device cpu --quick          # tiny presets + 1 full-size image
  python benchmarks/throughput.py --device cuda --json out.json        # full-size presets
  python benchmarks/throughput.py --device cuda --presets crane+ --only e2e --files 2048
  python benchmarks/throughput.py --device cuda --presets crane+ --only eval
  python benchmarks/throughput.py --device cuda --presets crane+ --only e2e --e2e fast-model \
      --cfg dino_fp32=false --compile     # the fastest end-to-end configuration measured

Evaluate: ``crane evaluate``'s loop over an MVTec-layout PNG dataset with masks (2 classes,
1024 px), exact streaming metrics included; fp32 float inputs vs the optimised path.

End to end: photo-like 2048-px JPEGs, decoded by DataLoader workers (exact and --fast-decode),
maps at input size and at model size, plus the input pipeline alone (decode only) and where the
main thread's time goes. Its ``baseline_fp32`` row is not the model rows' reference-style
baseline: it is crane's own fp32 path (cached text features, smoothing on the device, crane's
kernels) with the reference's exact decode and maps at input size, so its "vs fp32 baseline"
ratios are smaller than the model rows' and not comparable with them. Training: features
encoded once, then epochs over the cache.
``--cfg FIELD=VALUE`` changes the model config of every preset (for instance the DINOv2
precision options), ``--compile`` compiles the optimised model and end-to-end paths.
Prints tables; --json writes every figure (updated after each row). Accuracy guard:
max |bf16 − fp32| of maps and scores on the same inputs; a map difference above 1e-2 is
reported and makes the exit status 1. Peak memory: tensor memory allocated on CUDA; on the CPU
the RSS growth over the step (the weights already resident not counted). See also
``variants.py`` (which speed options pay off).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import gc
import json
import os
import platform
import resource
import sys
import tempfile
import time
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from unittest import mock

import numpy as np
import torch
from PIL import Image
from scipy.ndimage import gaussian_filter

import crane.engine.predict as predict_module
from crane.config import CraneConfig
from crane.constants import ATTENTION_KERNELS
from crane.engine.predict import Detector, Prediction, check_device_decode
from crane.engine.runtime import autocast_dtype
from crane.errors import CraneError
from crane.files import strict_json
from crane.models import create_model, kernels, scoring, vision


def _status_kb(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise KeyError(key)


def _malloc_trim() -> None:
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


class PeakRss:
    """Peak RSS (bytes) beyond the RSS at :meth:`start`, via Linux's VmHWM, which writing 5
    to /proc/self/clear_refs restarts. Freed heap is handed back first (``malloc_trim``):
    otherwise glibc keeps the previous step's buffers and a step that reuses them shows no
    growth. Where /proc cannot do this (``exact`` False), the process's lifetime peak RSS."""

    def __init__(self) -> None:
        self.base = 0
        self.exact = True

    def start(self) -> None:
        gc.collect()
        _malloc_trim()
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # reset VmHWM to the current RSS
            self.base = _status_kb("VmRSS")
            self.exact = True
        except (OSError, KeyError):
            self.exact = False

    def peak(self) -> int:
        if not self.exact:
            return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        return max(_status_kb("VmHWM") - self.base, 0) * 1024


_cpu_peak = PeakRss()


def peak_mem_mb(device: torch.device) -> float:
    """CUDA: peak tensor memory allocated since :func:`reset_peak`. CPU: how far the process's
    RSS rose above its level at :func:`reset_peak` (the step's working memory; the weights
    already resident are not counted; :class:`PeakRss`)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return _cpu_peak.peak() / 2**20


def peak_reserved_mb(device: torch.device) -> float | None:
    """What the caching allocator held at peak (what nvidia-smi would show, minus context)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_reserved(device) / 2**20
    return None


def release(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        return
    _cpu_peak.start()


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def baseline_forward(model, images: torch.Tensor):
    """Reference-style inference: fp32, open_clip's MLP modules (QuickGELU as three elementwise
    passes), torch's CPU kernels (MKL, fused attention: not oneDNN's), text recomputed per
    batch, scipy Gaussian per map on CPU."""
    cfg = model.cfg
    with reference_mlp(), kernels.cpu_kernels("torch"):
        vis = model.encode_images(images)
    text = model.text_features(vis.global_feat if cfg.image_context_inference else None)
    logits = scoring.patch_logits(vis.patch_sets, text, cfg.pixel_temperature)
    maps = scoring.anomaly_map(logits, images.shape[-1], cfg.map_combine).cpu().numpy()
    maps = np.stack([gaussian_filter(m, sigma=cfg.sigma) for m in maps])
    fused = scoring.fused_image_feature(vis.patch_sets, logits, vis.global_feat, cfg.fusion_alpha)
    scores = torch.softmax(scoring.image_logits(fused, text, cfg.image_temperature), -1)[:, 1].cpu()
    return scores, maps


@contextlib.contextmanager
def reference_mlp():
    """Inside, the vision loop calls CLIP's MLP modules as open_clip defines them."""
    with mock.patch.object(vision, "clip_mlp", lambda mlp, x: mlp(x)):
        yield


def to_host(outputs: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
    """Results copied to the host, as the baseline's are (its Gaussian runs there) and as
    predict hands them out: the model-only rows time the same work on both sides (until the
    27th session the optimised rows left them on the device)."""
    return tuple(t.cpu() for t in outputs)


def time_it(fn, device, warmup=1, reps=3) -> float:
    """Median seconds of ``reps`` calls after ``warmup`` (one slow call, another process
    taking the cores for a moment, does not move it)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        sync(device)
        t = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t)
    return float(np.median(times))


def bench_model(
    base: torch.nn.Module,
    device: torch.device,
    batch: int,
    amp: str,
    reps: int,
    compile_model: bool,
    attention: str = "auto",
) -> dict:
    """``base`` stays on the CPU; the fp32 runs use it on the device, then it goes back and a
    copy with bf16-stored matmul weights runs the optimised path (measured alone for memory)."""
    cfg = base.cfg
    s = cfg.image_size
    x = torch.randn(batch, 3, s, s, generator=torch.Generator().manual_seed(batch)).to(device)
    out: dict = {"preset": cfg.name, "image_size": s, "batch": batch, "device": str(device)}
    model = base.to(device).eval()

    reset_peak(device)
    t = time_it(lambda: baseline_forward(model, x), device, reps=reps)
    out["baseline_fp32_img_s"] = batch / t
    out["baseline_peak_mb"] = peak_mem_mb(device)
    b_scores, b_maps = baseline_forward(model, x)

    det = Detector(model, device=device, precision="fp32", batch_size=batch)
    reset_peak(device)
    t = time_it(lambda: to_host(det.predict_tensor(x)), device, reps=reps)
    out["opt_fp32_img_s"] = batch / t
    out["opt_fp32_peak_mb"] = peak_mem_mb(device)
    s32, m32 = (t.cpu() for t in det.predict_tensor(x))
    out["baseline_vs_opt_fp32_max_abs_diff_map"] = float(np.abs(b_maps - m32.numpy()).max())
    out["baseline_vs_opt_fp32_max_abs_diff_score"] = float((b_scores - s32).abs().max())
    out["speedup_fp32"] = out["opt_fp32_img_s"] / out["baseline_fp32_img_s"]
    if device.type == "cpu" and kernels.onednn_available():
        # The optimised path with the fp32 CPU kernels that are not this CPU's default
        # (torch's on AVX-512, where oneDNN's are the default; oneDNN's on AVX2): what
        # oneDNN's bring, whichever the default is.
        default = out["cpu_kernels"] = kernels.get_cpu_kernels()
        other = "torch" if default == "onednn" else "onednn"
        with kernels.cpu_kernels(other):
            t = time_it(lambda: to_host(det.predict_tensor(x)), device, reps=reps)
        out[f"opt_fp32_{other}_kernels_img_s"] = batch / t
        rate = {default: out["opt_fp32_img_s"], other: batch / t}
        out["onednn_vs_torch_kernels"] = rate["onednn"] / rate["torch"]
    det = None
    base.to("cpu")
    release(device)

    if amp != "fp32":
        fast = copy.deepcopy(base)
        det_amp = Detector(
            fast,
            device=device,
            precision=amp,
            batch_size=batch,
            cast_weights=True,
            compile=compile_model,
            attention=attention,
        )
        det_amp.predict_tensor(x)  # warm-up: text features, compilation
        reset_peak(device)
        t = time_it(lambda: to_host(det_amp.predict_tensor(x)), device, warmup=1, reps=reps)
        out[f"opt_{amp}_img_s"] = batch / t
        out[f"opt_{amp}_peak_mb"] = peak_mem_mb(device)
        out[f"opt_{amp}_peak_reserved_mb"] = peak_reserved_mb(device)
        s16, m16 = (t.cpu() for t in det_amp.predict_tensor(x))
        out["max_abs_diff_map"] = float((m16 - m32).abs().max())
        out["max_abs_diff_score"] = float((s16 - s32).abs().max())
        out["map_guard_ok"] = out["max_abs_diff_map"] <= MAP_GUARD  # (False for NaN too)
        out[f"speedup_{amp}"] = out[f"opt_{amp}_img_s"] / out["baseline_fp32_img_s"]
        out["compiled"] = compile_model
        out["attention"] = attention
        del det_amp, fast
        release(device)
    return out


#: Issue 6's accuracy guard: max |reduced-precision map - fp32 map| on the same inputs.
MAP_GUARD = 1e-2


def make_jpegs(folder: Path, n: int, px: int, workers: int) -> list[str]:
    """Photo-like JPEGs (smooth shapes + sensor noise, ~q90): random noise would make the
    entropy decoder, not the pipeline, the subject of the benchmark."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = [str(folder / f"{i:05d}.jpg") for i in range(n)]
    with ProcessPoolExecutor(max(1, workers)) as pool:
        list(pool.map(_write_jpeg, [(p, px, i) for i, p in enumerate(paths)], chunksize=8))
    return paths


def _write_jpeg(args: tuple[str, int, int]) -> None:
    path, px, seed = args
    rng = np.random.default_rng(seed)
    low = rng.integers(0, 255, (24, 24, 3), dtype=np.uint8)
    im = Image.fromarray(low).resize((px, px), Image.Resampling.BICUBIC)
    arr = np.asarray(im, dtype=np.int16) + rng.integers(-6, 7, (px, px, 1), dtype=np.int16)
    Image.fromarray(arr.clip(0, 255).astype(np.uint8)).save(path, quality=90)


def bench_end_to_end(
    base: torch.nn.Module,
    device: torch.device,
    paths: list[str],
    batch: int,
    workers: int | list[int],
    amp: str,
    fast_decode: bool = False,
    map_size: str = "input",
    compile_model: bool = False,
    attention: str = "auto",
    main_threads: list[int] | None = None,
    device_decode: bool = False,
    device_resize: bool = False,
) -> Iterator[dict]:
    """Predict from the files, a row per worker count and main-process thread count (one
    Detector, so one compile). ``main_threads``: torch's intra-op threads in this process
    (``torch.set_num_threads``; 0 or none: as set when called), restored afterwards — on a GPU
    machine the main process's thread pool shares the cores with the decode workers."""
    counts = [workers] if isinstance(workers, int) else list(workers)
    threads_before = torch.get_num_threads()
    thread_counts = [n or threads_before for n in main_threads or [0]]
    det = Detector(
        copy.deepcopy(base),
        device=device,
        precision=amp,
        batch_size=batch,
        workers=counts[0],
        fast_decode=fast_decode,
        device_decode=device_decode,
        device_resize=device_resize,
        cast_weights=amp != "fp32",
        map_size=map_size,
        compile=compile_model,
        attention=attention,
    )
    try:
        for w in counts:
            det.workers = w
            for n in thread_counts:
                torch.set_num_threads(n)
                yield _end_to_end_row(det, base, device, paths, amp, compile_model)
    finally:
        torch.set_num_threads(threads_before)
        det.close()
        del det
        release(device)


def _end_to_end_row(det, base, device, paths, amp, compile_model) -> dict:
    batch, workers = det.batch_size, det.workers
    list(det.predict_iter(paths[: min(len(paths), 2 * batch)]))  # warm-up (workers, text)
    # Where the main thread's time goes: queuing device work, copying results back and
    # handing them out, or waiting for the DataLoader (the rest: blocked on the workers'
    # chunks, or joining them into pinned batches). And the workers' own decode time per
    # image, to set against the decode-only rows: the same per-image time with the workers
    # idle part of the run means they were starved of work; a longer one, that they ran
    # slower beside the model (CPU contention).
    spent = {"launch": 0.0, "collect": 0.0, "decode": 0.0}
    chunk_timer = ChunkTimer()
    launch, collect = Detector._launch, Detector._collect

    marks: list[tuple[float, int]] = []  # (when each launch returned, its images)

    def timed_launch(batch):
        spent["decode"] += sum(item["decode_s"] for item in batch["ok"])
        t0 = time.perf_counter()
        job = launch(det, batch)
        t1 = time.perf_counter()
        spent["launch"] += t1 - t0
        marks.append((t1, len(batch["ok"])))
        return job

    def timed_rebatch(chunks, *args, **kwargs):
        return rebatch(chunk_timer.wrap(chunks), *args, **kwargs)

    def timed_collect(job):
        t0 = time.perf_counter()
        out = list(collect(det, job))
        spent["collect"] += time.perf_counter() - t0
        yield from out

    rebatch = predict_module._rebatch
    reset_peak(device)
    cpu0 = _process_cpu_s()
    with (
        mock.patch.object(predict_module, "_rebatch", timed_rebatch),
        mock.patch.object(det, "_launch", timed_launch),
        mock.patch.object(det, "_collect", timed_collect),
    ):
        t = time.perf_counter()
        k, first = 0, None
        for r in det.predict_iter(paths):
            k += isinstance(r, Prediction)
            if first is None:  # the first batch through decode + model (workers already up)
                first = time.perf_counter() - t
        sync(device)
        dt = time.perf_counter() - t
    cpu = _process_cpu_s() - cpu0
    # After the first batch: the images of batches 2.. over the time from when batch 1's
    # results existed. On the CPU a launch runs the whole forward, so that is when batch 1's
    # launch returned (its first result comes only after batch 2's launch, which runs batch
    # 2); on CUDA a launch only queues work, and batch 1's results exist when the first of
    # them is handed out (the 24th-26th sessions anchored at batch 2's launch on CUDA too,
    # which counted most of batch 1's GPU time against batches 2..: read low).
    # On CUDA the pipeline hands out batch 1's first result only after batch 2 was decoded
    # and launched: counting batch 2's images over that time read high where decoding bounds
    # the rate (by one batch in N - 1, a review found); batch 2 is left out of the count too,
    # which can only read low (by as much where the GPU bounds it).
    after = None
    done_1 = first if device.type == "cuda" else (marks[0][0] - t if marks else None)
    before = marks[0][1] + (marks[1][1] if device.type == "cuda" and len(marks) > 1 else 0)
    if len(marks) > 2 - (device.type != "cuda") and done_1 is not None and dt > done_1:
        after = (k - before) / (dt - done_1)
    return {
        "preset": base.cfg.name,
        "n_files": k,
        "jpeg_px": Image.open(paths[0]).size[0],
        "workers": workers,
        "batch": batch,
        "precision": amp,
        "fast_decode": det.draft is not None,
        "device_decode": det.device_decode,
        "device_resize": det.device_resize,
        "map_size": det.map_size,
        "compiled": compile_model,
        "end_to_end_img_s": k / dt,
        "first_batch_s": first,
        "after_first_batch_img_s": after,
        "peak_mb": peak_mem_mb(device),
        "main_launch_s": spent["launch"],
        "main_collect_s": spent["collect"],
        "main_wait_loader_s": dt - spent["launch"] - spent["collect"],
        "main_wait_chunks_s": chunk_timer.wait,
        "main_wait_transfer_s": chunk_timer.transfer,
        "worker_ms_per_image": 1e3 * spent["decode"] / max(k, 1),
        "workers_busy": spent["decode"] / (max(workers, 1) * dt),
        "main_threads": torch.get_num_threads(),
        # CPU seconds this process (all its threads: the loop, torch's pool, the CUDA
        # driver's) used per second of the run: ≫ 1 means it takes cores from the workers.
        "main_cpu_per_s": cpu / dt,
        "total_s": dt,
    }


def _process_cpu_s() -> float:
    """User + system CPU seconds of this process so far (every thread; not its children)."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


class ChunkTimer:
    """Times the main thread's waits for decode-loader chunks. ``wait``: seconds blocked in
    the loader; ``transfer``: the part of it after the worker had finished the chunk (its
    ``done_at``) — handing the chunk between processes (pickling, shared memory, the queue,
    dispatching new work), not decoding."""

    def __init__(self):
        self.wait = self.transfer = 0.0

    def wrap(self, chunks):
        it = iter(chunks)
        while True:
            t0 = time.perf_counter()
            try:
                chunk = next(it)
            except StopIteration:
                self.wait += time.perf_counter() - t0
                return
            t1 = time.perf_counter()
            self.wait += t1 - t0
            self.transfer += t1 - max(t0, chunk["done_at"])
            yield chunk


def bench_latency(
    base: torch.nn.Module, device: torch.device, path: str, workers: int, amp: str, reps: int = 7
) -> dict:
    """One file per ``predict`` call (an inspection line): median ms per call with no
    workers, with ``workers`` started afresh for every call (the previous behaviour, forced
    here by ``close()``), with the persistent workers a Detector now keeps, and with no
    workers and the JPEG decoded on the device (``device_decode``; None with the reason where
    this torchvision cannot)."""
    det = Detector(
        copy.deepcopy(base),
        device=device,
        precision=amp,
        batch_size=1,
        cast_weights=amp != "fp32",
    )
    out: dict = {"preset": base.cfg.name, "workers": workers, "precision": amp}
    out["file_px"] = Image.open(path).size[0]
    for name, w, fresh, on_device in (
        ("no_workers", 0, False, False),
        ("fresh", workers, True, False),
        ("kept", workers, False, False),
        ("device_decode", 0, False, True),
    ):
        if on_device:
            try:
                check_device_decode(device)
            except CraneError as exc:
                out[f"{name}_ms"], out[f"{name}_error"] = None, str(exc)
                continue
        det.workers, det.device_decode = w, on_device
        det.predict(path)  # warm-up
        times = []
        for _ in range(reps):
            if fresh:
                det.close()
            sync(device)
            t = time.perf_counter()
            det.predict(path)
            sync(device)
            times.append(time.perf_counter() - t)
        out[f"{name}_ms"] = 1e3 * float(np.median(times))
    det.close()
    del det
    release(device)
    return out


DECODE_LOADERS = ("batches", "predict")
# --decode names → (fast JPEG decode, torch's shrink, JPEGs decoded on the device, images
# resized on the device): exact; fast decode with PIL's shrink (before torch's uint8 kernel
# took over); fast decode as predict runs it now; JPEGs read by the workers and decoded on
# the device; JPEGs decoded exactly by the workers and resized on the device.
DECODE_MODES = {
    "exact": (False, False, False, False),
    "fast-pil": (True, False, False, False),
    "fast": (True, True, False, False),
    "device": (False, False, True, False),
    "resize": (False, False, False, True),
}


def bench_decode(
    paths: list[str],
    size: int,
    batch: int,
    workers: int,
    fast: bool,
    loader: str = "batches",
    fast_resize: bool | None = None,
    device: torch.device | None = None,
    device_resize: bool = False,
) -> dict:
    """The input pipeline alone, no model: decode + resize in workers into pinned batches.
    ``loader="batches"``: whole batches per worker (prefetch 4) — the ceiling for end-to-end
    throughput on this machine's CPUs; ``"predict"``: exactly the loader ``Detector.predict``
    uses (chunks of ⌈batch / workers⌉ joined in the main process), so that its rate alone can
    be set against its rate beside the model. ``fast_resize``: shrink with torch's uint8
    kernel (default: with fast decoding, as predict does) or PIL's. ``device``: the workers
    only read the JPEGs, which are decoded and resized on that device in the main process
    (``Detector(device_decode=True)``; predict's loader only); with ``device_resize`` the
    workers decode them and ``device`` resizes them (``Detector(device_resize=True)``)."""
    from crane.engine.predict import _rebatch, batch_pixels, decode_loader

    draft = size if fast else None
    fast_resize = fast if fast_resize is None else fast_resize
    pin = torch.cuda.is_available()
    timer = ChunkTimer()
    if device is not None and loader != "predict":
        raise ValueError("decoding on the device takes predict's loader")
    if device_resize and device is None:
        raise ValueError("device_resize needs the device that resizes")
    if loader == "predict":
        chunks, jobs = decode_loader(
            size, draft, batch, workers, fast_resize=fast_resize,
            device_jpeg=device is not None and not device_resize, device_resize=device_resize,
            pin_memory=device_resize and pin,  # as Detector's loader
        )  # fmt: skip
        batches = _rebatch(timer.wrap(chunks), batch, pin=pin)
    else:
        whole, jobs = decode_loader(
            size, draft, batch, workers, chunk=batch, prefetch=4, pin_memory=pin,
            fast_resize=fast_resize,
        )  # fmt: skip
        batches = timer.wrap(whole)
    jobs.keys = list(enumerate(paths))
    t = time.perf_counter()
    k, busy = 0, 0.0
    for b in batches:
        if device is not None:
            _, b["ok"], _ = batch_pixels(b["ok"], b["images"], size, device, draft)
            sync(device)
        k += len(b["ok"])
        busy += sum(item["decode_s"] for item in b["ok"])
    dt = time.perf_counter() - t
    return {
        "n_files": k,
        "jpeg_px": Image.open(paths[0]).size[0],
        "image_size": size,
        "workers": workers,
        "fast_decode": fast,
        "fast_resize": fast_resize,
        "device_decode": device is not None and not device_resize,
        "device_resize": device_resize,
        "loader": loader,
        "decode_img_s": k / dt,
        "worker_ms_per_image": 1e3 * busy / max(k, 1),
        "workers_busy": busy / (max(workers, 1) * dt),
        "main_wait_s": timer.wait,
        "main_wait_transfer_s": timer.transfer,
        "total_s": dt,
    }


def bench_decode_accuracy(
    base: torch.nn.Module, device: torch.device, paths: list[str], amp: str
) -> dict:
    """How far the device-decoded and the fast-decoded model inputs are from the reference
    decode (PIL, full size) of the same JPEG files: levels of the uint8 pixels, then the maps
    (at the model's size) and scores of the model in ``amp`` from each against the
    reference's, on the same device and precision."""
    from crane.data.transforms import decode_jpegs, read_image_tensor, read_jpeg_tensor

    size = base.cfg.image_size
    ref = [read_image_tensor(p, size, as_uint8=True)[0] for p in paths]
    data = [read_jpeg_tensor(p)[0] for p in paths]
    inputs = {
        "device": [px.cpu() for px in decode_jpegs(data, size, device)],
        "fast": [
            read_image_tensor(p, size, draft=size, as_uint8=True, fast_resize=True)[0]
            for p in paths
        ],
    }
    det = Detector(
        copy.deepcopy(base), device=device, precision=amp, map_size="model",
        cast_weights=amp != "fp32",
    )  # fmt: skip
    want_scores, want_maps = det.predict_tensor(torch.stack(ref))
    out = {"preset": base.cfg.name, "precision": amp, "n_files": len(paths), "rows": []}
    for name, pixels in inputs.items():
        levels = (torch.stack(pixels).int() - torch.stack(ref).int()).abs()
        scores, maps = det.predict_tensor(torch.stack(pixels))
        out["rows"].append({
            "preset": base.cfg.name,
            "decode": name,
            "n_files": len(paths),
            "max_level_diff": int(levels.max()),
            "mean_level_diff": float(levels.float().mean()),
            "frac_values_differ": float((levels > 0).float().mean()),
            "max_abs_diff_map": float((maps - want_maps).abs().max()),
            "max_abs_diff_score": float((scores - want_scores).abs().max()),
        })  # fmt: skip
    del det
    release(device)
    return out


def make_eval_dataset(folder: Path, per_class: int, px: int, workers: int = 0) -> Path:
    """An MVTec-layout dataset (PNG images and masks, half of them anomalous) in 2 classes,
    written by ``workers`` processes (0.33 s per 1024-px image in one process)."""
    from crane.data import make_synthetic_dataset

    half = per_class // 2
    make_synthetic_dataset(
        folder, classes=("tile", "plate"), n_train=0, n_test_good=per_class - half,
        n_test_bad=half, size=px, workers=workers,
    )  # fmt: skip
    return folder


def bench_evaluate(
    base: torch.nn.Module, device: torch.device, root: Path, batch: int, workers: int, amp: str
) -> dict:
    """``evaluate`` end to end (decode in workers, model, streaming exact metrics with both
    AUPROs, per-class finalisation): fp32 with float inputs (the previous path) against the
    optimised path (uint8 inputs normalised on the device, ``amp`` with bf16-stored weights
    on CUDA), and the optimised path with the images resized on the device
    (``device_resize``: the same inputs), in the same run."""
    from crane.data import AnomalyDataset
    from crane.engine.evaluate import evaluate

    out: dict = {"preset": base.cfg.name, "workers": workers, "batch": batch, "precision": amp}
    ds = AnomalyDataset(root, "test", image_size=base.cfg.image_size)
    out["n_images"], out["png_px"] = len(ds), Image.open(root / ds.samples[0].img_path).size[0]
    # Warm-up (kernels, autotuning, the allocator) on the first two batches, not the whole
    # set: on the H200 whole-set warm-ups were 33 s of the step's 136.
    warm = copy.copy(ds)
    warm.samples = ds.samples[: 2 * batch]
    reports = {}
    runs = (("baseline_fp32_float", False, False), ("opt", True, False))
    for name, fast, on_device in (*runs, ("opt_device_resize", True, True)):
        model = copy.deepcopy(base).to(device)
        dtype = autocast_dtype(amp, device) if fast else None
        if fast and dtype is not None:
            model.cast_frozen_matmuls(dtype)
        kw = dict(device=device, amp_dtype=dtype, batch_size=batch, workers=workers)
        kw["device_resize"] = on_device
        evaluate(model, warm, progress=False, uint8_inputs=fast, **kw)  # warm-up
        reset_peak(device)
        res = evaluate(model, ds, progress=False, uint8_inputs=fast, **kw)
        out[f"{name}_img_s"] = res.n_images / res.seconds
        out[f"{name}_timings_s"] = res.timings  # where the main thread's time went
        out[f"{name}_peak_mb"] = peak_mem_mb(device)
        reports[name] = res.report.mean
        del model
        release(device)
    out["speedup"] = out["opt_img_s"] / out["baseline_fp32_float_img_s"]
    out["device_resize_vs_opt"] = out["opt_device_resize_img_s"] / out["opt_img_s"]
    a, b = reports["baseline_fp32_float"], reports["opt"]
    out["max_abs_diff_mean_metrics"] = max(abs(a[k] - b[k]) for k in a if a[k] == a[k])
    c = reports["opt_device_resize"]  # the same inputs as "opt": the same metrics
    out["max_abs_diff_device_resize"] = max(abs(b[k] - c[k]) for k in b if b[k] == b[k])
    return out


def bench_train(
    base: torch.nn.Module,
    device: torch.device,
    n: int,
    epochs: int,
    amp: str,
    baseline_n: int | None = None,
) -> dict:
    """Encode ``n`` images once (autocast ``amp``, as ``crane train --precision`` does), then
    time epochs over the cached features (batch 8, Adam on the prompts). Before that, the
    baseline: the reference's way to train, an fp32 epoch that runs the frozen backbones on
    every batch (no cache; open_clip's MLP modules and torch's CPU kernels, as the model-only
    baseline), timed over ``baseline_n`` of the images (default: all; fewer keep it short on
    a lent GPU) and given per image and as the time it would take for all ``n``."""
    from crane.engine.features import FeatureCache
    from crane.engine.losses import crane_loss

    s = base.cfg.image_size
    g = torch.Generator().manual_seed(0)
    m = n if baseline_n is None else min(n, max(8, baseline_n))  # (a batch at least)

    class _Random(torch.utils.data.Dataset):
        def __len__(self):
            return n

        def __getitem__(self, i):
            gi = torch.Generator().manual_seed(i)
            mask = torch.zeros(1, s, s)
            if i % 2:
                mask[:, s // 4 : s // 2, s // 4 : s // 2] = 1
            return {
                "image": torch.randn(3, s, s, generator=gi),
                "mask": mask,
                "label": i % 2,
                "path": f"img{i}",
            }

    data = _Random()
    # Baseline: an uncached fp32 epoch over the first m images (a copy of the prompts: the
    # optimised run below starts from the same ones).
    # (the only model on the device while it runs: the optimised run's copy is made after, so
    # the baseline's peak memory holds one model, as the optimised run's does)
    ref = copy.deepcopy(base).to(device)
    ref_opt = torch.optim.Adam(ref.trainable_parameters(), lr=1e-3, betas=(0.6, 0.999))
    ref.train()

    def ref_step(lo: int, hi: int, step: bool = True) -> None:
        items = [data[j] for j in range(lo, hi)]
        images = torch.stack([it["image"] for it in items]).to(device)
        masks = torch.stack([it["mask"][0] > 0.5 for it in items]).to(device)
        labels = torch.tensor([it["label"] for it in items], device=device)
        with torch.no_grad(), reference_mlp(), kernels.cpu_kernels("torch"):
            vis = ref.encode_images(images)
        out = ref.forward_train(vis)
        loss, _ = crane_loss(out, masks, labels, s, ref.cfg.train_set_multiplicity)
        ref_opt.zero_grad(set_to_none=True)
        loss.backward()
        if step:
            ref_opt.step()
        else:  # (the untimed warm-up: first-call costs out of the timing, prompts unchanged)
            ref_opt.zero_grad(set_to_none=True)

    ref_step(0, min(m, 8), step=False)
    sync(device)
    reset_peak(device)
    t = time.perf_counter()
    for i in range(0, m, 8):
        ref_step(i, min(m, i + 8))
    sync(device)
    baseline_s = time.perf_counter() - t
    baseline_peak = peak_mem_mb(device)
    ref = ref_opt = None  # (freed before the optimised run's model is made)
    release(device)
    model = copy.deepcopy(base).to(device)

    reset_peak(device)
    t = time.perf_counter()
    cache = FeatureCache.build(
        model,
        data,
        device,
        batch_size=32 if device.type == "cuda" else 8,
        workers=min(8, os.cpu_count() or 1) if device.type == "cuda" else 0,
        progress=False,
        autocast_dtype=autocast_dtype(amp, device),
    )
    sync(device)
    encode_s = time.perf_counter() - t
    encode_peak = peak_mem_mb(device)
    reset_peak(device)
    opt = torch.optim.Adam(model.trainable_parameters(), lr=1e-3, betas=(0.6, 0.999))
    model.train()
    times = []
    for _ in range(epochs):
        t = time.perf_counter()
        order = torch.randperm(n, generator=g)
        for i in range(0, n, 8):
            vis, masks, labels = cache.batch(order[i : i + 8], device)
            loss, _ = crane_loss(
                model.forward_train(vis), masks, labels, s, model.cfg.train_set_multiplicity
            )
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        sync(device)
        times.append(time.perf_counter() - t)
    baseline_img_s = m / baseline_s
    out = {
        "preset": base.cfg.name,
        "n_images": n,
        "image_size": s,
        "baseline_fp32_uncached_images": m,
        "baseline_fp32_uncached_img_s": baseline_img_s,
        "baseline_fp32_uncached_epoch_s": n / baseline_img_s,  # (all n images at that rate)
        "baseline_peak_mb": baseline_peak,
        "encode_precision": amp,
        "encode_once_s": encode_s,
        "encode_img_s": n / encode_s,
        "encode_peak_mb": encode_peak,
        "cached_epoch_s": float(np.median(times)),
        "epoch_img_s": n / float(np.median(times)),
        "epoch_peak_mb": peak_mem_mb(device),
        "epoch_times_s": times,
        "cache": cache.location,
        "cache_gb": (cache.patch_sets.numel() * cache.patch_sets.element_size()) / 1e9,
    }
    # Epochs after the first against the baseline's; and the first (encoding included).
    out["cached_epoch_speedup"] = out["baseline_fp32_uncached_epoch_s"] / out["cached_epoch_s"]
    first = encode_s + out["cached_epoch_s"]
    out["first_epoch_speedup"] = out["baseline_fp32_uncached_epoch_s"] / first
    del model, cache, opt
    release(device)
    return out


# --e2e names → (fast JPEG decode, map size, JPEGs decoded on the device).
# --e2e names → (fast decode, map size, JPEGs decoded on the device, resized on the device)
E2E_COMBOS = {
    "exact-input": (False, "input", False, False),
    "fast-input": (True, "input", False, False),
    "fast-model": (True, "model", False, False),
    "device-input": (False, "input", True, False),
    "device-model": (False, "model", True, False),
    "resize-input": (False, "input", False, True),
    "resize-model": (False, "model", False, True),
}
E2E_DEFAULT = ["exact-input", "fast-input", "fast-model"]


def cfg_override(text: str) -> tuple[str, object]:
    """``FIELD=VALUE`` for ``--cfg``: a :class:`CraneConfig` field, the value parsed as JSON
    (``true``, ``3``, ``"vv"``) or else taken as a string."""
    field, sep, raw = text.partition("=")
    names = {f.name for f in dataclasses.fields(CraneConfig)}
    if not sep or field not in names:
        raise argparse.ArgumentTypeError(
            f"{text!r}: expected FIELD=VALUE with FIELD one of {', '.join(sorted(names))}"
        )
    try:
        return field, json.loads(raw)
    except json.JSONDecodeError:
        return field, raw


def random_model(name: str, timm_layer_scale: bool = False, **overrides) -> torch.nn.Module:
    """A randomly initialised preset for benchmarking, with every LayerScale (DINOv2's) at 1
    unless ``timm_layer_scale``.

    timm initialises DINOv2's LayerScale at 1e-5, so in a randomly initialised model every
    block's attention and MLP add almost nothing and DINOv2's output is its patch embedding:
    an accuracy guard on such a model cannot see how DINOv2's precision moves the maps. At 1
    every branch counts in full (trained values are unknown here, so this is the stress case).
    Speed does not change."""
    from timm.layers import LayerScale

    model = create_model(name, pretrained=False, **overrides)
    if not timm_layer_scale:
        with torch.no_grad():
            for m in model.modules():
                if isinstance(m, LayerScale):
                    m.gamma.fill_(1.0)
    return model


def layer_scale_label(timm_layer_scale: bool) -> str | float:
    """What the JSON records as DINOv2's LayerScale (see :func:`random_model`)."""
    return "timm init (1e-5)" if timm_layer_scale else 1.0


def table(rows: list[dict], keys: list[str]) -> None:
    """A markdown table of ``rows``; nothing for a part that did not run."""
    if not rows:
        return
    keys = list(dict.fromkeys(keys))  # fp32 runs name the same column twice

    def cell(v):
        if isinstance(v, float):
            return f"{v:.3g}" if abs(v) < 1e-2 or abs(v) >= 1e4 else f"{v:.3f}"
        return "-" if v is None else str(v)

    print("\n| " + " | ".join(keys) + " |")
    print("|" + "---|" * len(keys))
    for r in rows:
        print("| " + " | ".join(cell(r.get(k)) for k in keys) + " |")


# Defaults of the size options; --quick: CPU-sized, every part on the tiny presets.
FULL_SIZES = {
    "batch": 32,
    "files": 512,
    "workers": min(16, os.cpu_count() or 1),
    "train_images": 1725,
    "eval_images": 256,
}
QUICK_SIZES = {"batch": 8, "files": 32, "workers": 2, "train_images": 64, "eval_images": 24}
QUICK_PARTS_PRESETS = ("tiny", "tiny+")  # the presets --quick runs every part for


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument(
        "--quick",
        action="store_true",
        help="CPU-sized: every part on the tiny presets at small sizes, plus one image through "
        "each full-size preset (model only); the size options below still apply when given",
    )
    ap.add_argument("--batch", type=int, default=None, help="default 32 (quick: 8)")
    ap.add_argument(
        "--amp",
        default=None,
        help="bf16 or fp16 for the optimised path (default: bf16 on CUDA and with --quick, "
        "else fp32)",
    )
    ap.add_argument(
        "--compile", action="store_true", help="torch.compile the optimised path (model, e2e)"
    )
    ap.add_argument(
        "--attention",
        default="auto",
        choices=list(ATTENTION_KERNELS),
        help="fused attention kernel tried first on the optimised path (model, e2e)",
    )
    ap.add_argument(
        "--cfg",
        nargs="+",
        default=[],
        type=cfg_override,
        metavar="FIELD=VALUE",
        help="model config changes for every preset, e.g. dino_attn_fp16=true (JSON values)",
    )
    ap.add_argument("--train-images", type=int, default=None, help="default 1725 (quick: 64)")
    ap.add_argument(
        "--train-baseline-images",
        type=int,
        default=256,
        help="images the uncached fp32 training baseline is timed over (at least 8; its "
        "epoch time for all --train-images is projected from their rate)",
    )
    ap.add_argument(
        "--presets",
        nargs="+",
        default=None,
        help="default crane crane+ (quick: tiny tiny+ crane crane+)",
    )
    ap.add_argument(
        "--files",
        type=int,
        default=None,
        help="JPEG files for the end-to-end run (default 512; quick: 32)",
    )
    ap.add_argument(
        "--workers",
        type=int,
        default=None,
        help="DataLoader workers end to end (default: the CPU count, at most 16; quick: 2)",
    )
    ap.add_argument(
        "--e2e-workers",
        nargs="+",
        type=int,
        default=None,
        help="end-to-end rows at each of these worker counts, one Detector (one compile) for "
        "all (default: --workers); fewer workers than cores tells CPU contention apart",
    )
    ap.add_argument(
        "--e2e-threads",
        nargs="+",
        type=int,
        default=None,
        help="end-to-end rows (for each worker count) at each of these torch intra-op thread "
        "counts in the main process (0 or default: torch's); fewer leaves cores to the workers",
    )
    ap.add_argument(
        "--only",
        nargs="+",
        default=["model", "e2e", "latency", "train", "eval"],
        choices=["model", "e2e", "latency", "train", "eval"],
        help="which parts to run (latency: one file per call, from the e2e files)",
    )
    ap.add_argument(
        "--e2e",
        nargs="+",
        default=E2E_DEFAULT,
        choices=list(E2E_COMBOS),
        help="end-to-end runs (exact, fast or device decode; maps at input or model size); "
        "with a device one, the decode accuracy rows too",
    )
    ap.add_argument(
        "--no-e2e-baseline",
        action="store_true",
        help="skip the end-to-end fp32 baseline row (exact decode, maps at input size, eager; "
        "over at most 8 batches of the files) that the e2e rows' speedup is measured against",
    )
    ap.add_argument(
        "--decode",
        nargs="*",
        default=list(DECODE_MODES),
        choices=list(DECODE_MODES),
        help="decode-only rows with the e2e part, each with both loaders (none: no value)",
    )
    ap.add_argument(
        "--eval-images",
        type=int,
        default=None,
        help="images per class (2 classes) for evaluate (default 256; quick: 24)",
    )
    ap.add_argument(
        "--timm-layer-scale",
        action="store_true",
        help="keep timm's 1e-5 LayerScale init in DINOv2 (default: 1, so the accuracy guard "
        "sees DINOv2's precision)",
    )
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    sizes = QUICK_SIZES if args.quick else FULL_SIZES
    for name, value in sizes.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    presets = args.presets or (
        [*QUICK_PARTS_PRESETS, "crane", "crane+"] if args.quick else ["crane", "crane+"]
    )
    device = torch.device(args.device)
    # The optimised path runs in bf16 on CUDA and with --quick (so the accuracy guard is
    # computed); a full CPU run stays fp32 unless --amp says otherwise.
    amp = args.amp or ("bf16" if device.type == "cuda" or args.quick else "fp32")
    autocast_dtype(amp, device)  # fp16 on a CPU fails now, not after the baseline's timing
    overrides = dict(args.cfg)
    results: dict = {
        "cfg_overrides": overrides,
        "dino_layer_scale": layer_scale_label(args.timm_layer_scale),
        "compiled": args.compile,
        "attention": args.attention,
        "device": torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "model": [],
        "end_to_end": [],
        "decode": [],
        "decode_accuracy": [],
        "train": [],
        "evaluate": [],
        "latency": [],
    }
    results["cpu"] = cpu_model()

    def record(part: str, row: dict) -> None:
        results[part].append(row)
        print(row, flush=True)
        save(results, args.json)  # after every row: a run cut short keeps what it measured

    def one_image(preset: str) -> bool:  # --quick: a full-size preset, one image, model only
        return args.quick and preset not in QUICK_PARTS_PRESETS

    def parts_of(preset: str) -> set[str]:
        return {"model"} & set(args.only) if one_image(preset) else set(args.only)

    for preset in presets:
        if one_image(preset) and set(args.only) - {"model"}:
            print(f"quick: {preset} runs one image through the model part only", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        want_files = args.files and any({"e2e", "latency"} & parts_of(p) for p in presets)
        paths = make_jpegs(Path(tmp), args.files, 2048, args.workers) if want_files else []
        modes = [DECODE_MODES[m] for m in args.decode] if paths and "e2e" in args.only else []
        for fast, fast_resize, on_device, resize in modes:
            for loader in ["predict"] if on_device or resize else DECODE_LOADERS:
                row = bench_decode(
                    paths, 518, args.batch, args.workers, fast, loader, fast_resize,
                    device if on_device or resize else None, resize,
                )  # fmt: skip
                record("decode", row)
        for preset in presets:
            parts = parts_of(preset)
            if not parts:
                continue
            base = random_model(preset, args.timm_layer_scale, **overrides)
            if one_image(preset):
                batches, reps, compile_model = (1,), 1, False
            else:
                batches = (args.batch,) if args.quick else (args.batch, 1)
                reps, compile_model = (3 if args.quick else 5), args.compile
            for batch in batches if "model" in parts else ():
                row = bench_model(base, device, batch, amp, reps, compile_model, args.attention)
                record("model", row)
            combos = [E2E_COMBOS[c] for c in args.e2e] if paths and "e2e" in parts else []
            if any(on_device for _, _, on_device, _ in combos):
                n = min(len(paths), 32)
                record("decode_accuracy", bench_decode_accuracy(base, device, paths[:n], amp))
            baseline = None
            if combos and not args.no_e2e_baseline:
                workers = args.e2e_workers or args.workers
                first = workers if isinstance(workers, int) else workers[0]
                (baseline,) = list(  # one row: one worker count, one thread count
                    bench_end_to_end(
                        base, device, paths[: 8 * args.batch], args.batch, first, "fp32"
                    )
                )
                baseline["role"] = "baseline_fp32"
                record("end_to_end", baseline)
            for fast, map_size, on_device, resize in combos:
                for row in bench_end_to_end(
                    base, device, paths, args.batch, args.e2e_workers or args.workers, amp,
                    fast, map_size, args.compile, args.attention, args.e2e_threads, on_device,
                    resize,
                ):  # fmt: skip
                    if baseline is not None:
                        ratio = row["end_to_end_img_s"] / baseline["end_to_end_img_s"]
                        row["speedup_vs_fp32_baseline"] = ratio
                        # (the baseline runs 8 batches, the rows all files: their first batch
                        # weighs less in the overall rates; the steady rates compare alike)
                        a = row.get("after_first_batch_img_s")
                        b = baseline.get("after_first_batch_img_s")
                        if a and b:
                            row["steady_speedup_vs_fp32_baseline"] = a / b
                    record("end_to_end", row)
            if paths and "latency" in parts:
                record("latency", bench_latency(base, device, paths[0], args.workers, amp))
            if "eval" in parts and args.eval_images:  # after e2e: writing its PNGs takes a while
                root = Path(tmp) / "eval"
                if not root.exists():
                    make_eval_dataset(root, args.eval_images, 1024, args.workers)
                record(
                    "evaluate",
                    bench_evaluate(base, device, root, args.batch, args.workers, amp),
                )
            if args.train_images and "train" in parts:
                row = bench_train(
                    base, device, args.train_images, 3, amp, args.train_baseline_images
                )
                record("train", row)
            del base
            release(device)

    print(
        f"device: {results['device']} ({results.get('cpu', '')}), threads {results['threads']}, "
        f"torch {results['torch']}, optimised precision {amp}, attention {args.attention}, "
        f"config changes {overrides or '-'}"
    )
    table(
        results["model"],
        [
            "preset",
            "image_size",
            "batch",
            "baseline_fp32_img_s",
            "opt_fp32_img_s",
            "opt_fp32_torch_kernels_img_s",
            "opt_fp32_onednn_kernels_img_s",
            f"opt_{amp}_img_s",
            "speedup_fp32",
            "onednn_vs_torch_kernels",
            f"speedup_{amp}",
            "baseline_peak_mb",
            f"opt_{amp}_peak_mb",
            f"opt_{amp}_peak_reserved_mb",
            "max_abs_diff_map",
            "max_abs_diff_score",
            "map_guard_ok",
        ],
    )
    table(
        results["end_to_end"],
        [
            "preset",
            "n_files",
            "jpeg_px",
            "workers",
            "batch",
            "precision",
            "fast_decode",
            "device_decode",
            "device_resize",
            "map_size",
            "compiled",
            "end_to_end_img_s",
            "speedup_vs_fp32_baseline",
            "steady_speedup_vs_fp32_baseline",
            "first_batch_s",
            "after_first_batch_img_s",
            "peak_mb",
            "main_launch_s",
            "main_collect_s",
            "main_wait_loader_s",
            "main_wait_chunks_s",
            "main_wait_transfer_s",
            "worker_ms_per_image",
            "workers_busy",
            "main_threads",
            "main_cpu_per_s",
        ],
    )
    if results["decode"]:
        table(
            results["decode"],
            [
                "n_files",
                "jpeg_px",
                "image_size",
                "workers",
                "fast_decode",
                "fast_resize",
                "device_decode",
                "device_resize",
                "loader",
                "decode_img_s",
                "worker_ms_per_image",
                "workers_busy",
                "main_wait_s",
                "main_wait_transfer_s",
                "total_s",
            ],
        )
    table(
        [row for part in results["decode_accuracy"] for row in part["rows"]],
        [
            "preset",
            "decode",
            "n_files",
            "max_level_diff",
            "mean_level_diff",
            "frac_values_differ",
            "max_abs_diff_map",
            "max_abs_diff_score",
        ],
    )
    table(
        results["train"],
        [
            "preset",
            "n_images",
            "image_size",
            "baseline_fp32_uncached_images",
            "baseline_fp32_uncached_img_s",
            "baseline_fp32_uncached_epoch_s",
            "encode_precision",
            "encode_once_s",
            "encode_img_s",
            "encode_peak_mb",
            "cached_epoch_s",
            "epoch_img_s",
            "cached_epoch_speedup",
            "first_epoch_speedup",
            "epoch_peak_mb",
            "cache",
            "cache_gb",
        ],
    )
    table(
        results["latency"],
        [
            "preset",
            "file_px",
            "workers",
            "precision",
            "no_workers_ms",
            "fresh_ms",
            "kept_ms",
            "device_decode_ms",
        ],  # fmt: skip
    )
    table(
        results["evaluate"],
        [
            "preset",
            "n_images",
            "png_px",
            "workers",
            "batch",
            "precision",
            "baseline_fp32_float_img_s",
            "opt_img_s",
            "speedup",
            "opt_device_resize_img_s",
            "device_resize_vs_opt",
            "baseline_fp32_float_peak_mb",
            "opt_peak_mb",
            "max_abs_diff_mean_metrics",
            "max_abs_diff_device_resize",
        ],
    )
    save(results, args.json)
    failed = [r for r in results["model"] if r.get("map_guard_ok") is False]
    if failed:
        for r in failed:
            print(
                f"ACCURACY GUARD FAILED: {r['preset']} batch {r['batch']}: max |{amp} - fp32| "
                f"of the maps {r['max_abs_diff_map']:.3g} > {MAP_GUARD}",
                file=sys.stderr,
            )
        return 1
    return 0


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo, with its family/model numbers where the name
    alone does not tell generations apart (a VM's "AMD EPYC"); the architecture elsewhere."""
    fields: dict[str, str] = {}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                fields.setdefault(key.strip(), value.strip())
                if not line.strip():
                    break  # the first processor's block is enough
    except OSError:
        pass
    name = fields.get("model name") or platform.processor() or platform.machine()
    if "cpu family" in fields and "model" in fields:
        name += f" (family {fields['cpu family']}, model {fields['model']})"
    return name


def host() -> dict:
    """The CPU a CPU-side benchmark ran on, for its JSON header."""
    return {
        "cpu": cpu_model(),
        "cpu_count": os.cpu_count(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),  # the ISA torch's kernels use
    }


def save(results: dict, path: str | None) -> None:
    """Write ``results`` to ``path`` atomically, through a temp file of its own (a fixed
    ``<name>.tmp`` replaced a file of that name, and raced another run's)."""
    if path:
        from crane.files import atomic_write_bytes

        Path(path).parent.mkdir(parents=True, exist_ok=True)
        text = json.dumps(strict_json(results), indent=2, allow_nan=False) + "\n"
        atomic_write_bytes(Path(path), text.encode())


if __name__ == "__main__":
    sys.exit(main())
