"""Label-free prediction: :class:`Detector` (Python API) and the file-writing ``run_predict``."""

from __future__ import annotations

import csv
import fnmatch
import glob
import io
import itertools
import json
import logging
import math
import os
import threading
import time
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence, Sized
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import DataLoader, Dataset, Sampler
from tqdm.auto import tqdm

from crane.config import get_config, is_tiny
from crane.data import jpeg_decoders
from crane.data.handover import HandoverPool
from crane.data.imageio import (
    image_from_array,
    is_image_file,
    open_image,
    reference_mode,
    warn_broken_links,
)
from crane.data.transforms import (
    decode_jpegs,
    image_to_uint8,
    read_image_tensor,
    read_jpeg_tensor,
    resize_each,
    unresized_pixels,
)
from crane.engine import progress as progress_file
from crane.engine.batching import (
    check_shared_memory,
    chunk_plan,
    reuse_freed_memory,
    select_rows,
)
from crane.engine.batching import take_rows as _take_rows
from crane.engine.runtime import (
    autocast,
    autocast_dtype,
    first_line,
    is_out_of_memory,
    model_input,
    nan_score_message,
    pick_device,
    scoring_forward,
)
from crane.engine.writer import OutputWriter
from crane.errors import CraneError, ImageReadError
from crane.files import fit_file_name, strict_json, utf8_strings, utf8_text
from crane.models.checkpoint import atomic_write_bytes, finite_threshold
from crane.models.crane import CraneModel
from crane.models.factory import create_model, names_a_run
from crane.viz import OVERLAY_FORMATS, write_overlay

log = logging.getLogger(__name__)

ImageInput = str | os.PathLike | Image.Image | np.ndarray | torch.Tensor


@dataclass
class _Unloadable:
    """A PIL image input whose pixels could not be loaded in the main process: the error the
    decode code raises for it."""

    error: str


def _loaded(item: Any) -> Any:
    """``item``, with a lazily opened PIL image's pixels loaded now, in the main process: one
    that cannot be loaded (a truncated file, one closed by a ``with`` block) failed while it
    was pickled for a decode worker, in the queue's sender thread, which dropped its chunk and
    left the run waiting forever."""
    if isinstance(item, Image.Image):
        try:
            item.load()
        except (OSError, ValueError, SyntaxError, AssertionError) as exc:
            return _Unloadable(str(exc) or type(exc).__name__)
    return item


def _pil_input(item: Image.Image | np.ndarray | torch.Tensor) -> Image.Image:
    """An in-memory input as a PIL image: arrays channels last, tensors channels first (each
    library's convention), values as :func:`~crane.data.imageio.image_from_array` reads them."""
    if isinstance(item, _Unloadable):
        raise OSError(item.error)
    if isinstance(item, Image.Image):
        return item
    if isinstance(item, torch.Tensor):
        t = item.detach().cpu()
        if t.dim() == 3:
            if t.shape[0] not in (1, 3, 4):
                hint = " (channels last? tensors are channels first, arrays channels last)"
                raise ImageReadError(
                    "an image tensor must be (C, H, W) with C = 1, 3 or 4, or (H, W), got shape "
                    f"{tuple(t.shape)}" + (hint if t.shape[-1] in (1, 3, 4) else "")
                )
            t = t.permute(1, 2, 0)
        item = (t.float() if t.is_floating_point() else t).numpy()
    return image_from_array(item)


@dataclass(eq=False)
class Prediction:
    """One image's result. ``anomaly_map`` is float32 (H, W) at the image's own size.
    (Compared by identity: a field-wise ``==`` would compare the maps element-wise.)"""

    path: str | None
    score: float
    anomaly_map: np.ndarray = field(repr=False)
    threshold: float | None

    def __repr__(self) -> str:  # (the map's shape, not its million values)
        return (
            f"Prediction(path={self.path!r}, score={self.score!r}, "
            f"anomaly_map=<{self.anomaly_map.dtype} {tuple(self.anomaly_map.shape)}>, "
            f"threshold={self.threshold!r})"
        )

    @property
    def is_anomalous(self) -> bool | None:
        return None if self.threshold is None else bool(self.score >= self.threshold)

    @property
    def max_pixel_score(self) -> float:
        return float(self.anomaly_map.max())


@dataclass
class Failure:
    """An input without a result: ``reason`` is ``"unreadable"`` (decoding failed) or
    ``"nan"`` (the model's score came out NaN, e.g. an overflow in reduced precision)."""

    path: str
    error: str
    reason: str = "unreadable"

    def raise_(self) -> NoReturn:
        """Raise it: :class:`~crane.errors.ImageReadError` for an unreadable file, else
        :class:`~crane.errors.CraneError`."""
        if self.reason == "unreadable":
            raise ImageReadError(self.error)
        raise CraneError(f"{self.path}: {self.error}")


class _Decode(Dataset):
    """Decodes and resizes inputs (in DataLoader workers) to uint8 pixels; failures become
    records. Normalisation happens on the device (:func:`normalize_uint8`, bitwise equal).
    With ``device_jpeg``, JPEG files that :func:`~crane.data.imageio.read_jpeg` takes are only
    read (their bytes travel as ``"jpeg"``) and the main process decodes them on the device.
    With ``device_resize``, RGB and greyscale images larger than the model input travel
    decoded but not resized (``"raw"``, (H, W, C) uint8 in shared-memory buffers the workers
    reuse, :func:`~crane.data.transforms.unresized_pixels`) and are resized on the device,
    bitwise as PIL would (:func:`~crane.data.transforms.resize_each`).

    Keys are ``(input index, input)`` pairs handed out by :class:`_Jobs`, so long-lived
    workers can decode whatever a later ``predict`` call brings."""

    def __init__(
        self,
        size: int,
        draft: int | None = None,
        fast_resize: bool | None = None,
        device_jpeg: bool = False,
        device_resize: bool = False,
    ):
        # Fast decoding (a draft size) also shrinks with torch's uint8 kernel (image_to_uint8).
        self.size, self.draft, self.device_jpeg = size, draft, device_jpeg
        self.device_resize = device_resize and draft is None
        self.fast = draft is not None if fast_resize is None else fast_resize
        # Buffers the workers refill with full-size pixels (made here, before they start).
        self.handover = HandoverPool() if self.device_resize else None

    def __getitem__(self, key: tuple[int, ImageInput]) -> dict[str, Any]:
        t0 = time.perf_counter()
        out = self._decode(*key)
        out["decode_s"] = time.perf_counter() - t0  # the worker's time (benchmarks sum it)
        return out

    def _decode(self, i: int, item: ImageInput) -> dict[str, Any]:
        try:
            if isinstance(item, (str, os.PathLike)):
                jpeg = read_jpeg_tensor(item) if self.device_jpeg else None
                if jpeg is not None:
                    return {
                        "ok": True,
                        "jpeg": jpeg[0],
                        "hw": jpeg[1],
                        "path": os.fspath(item),
                        "i": i,
                    }
                if self.device_resize:
                    return self._decoded(i, open_image(item), os.fspath(item))
                pixels, (h, w) = read_image_tensor(
                    item, self.size, draft=self.draft, as_uint8=True, fast_resize=self.fast
                )
                return {"ok": True, "image": pixels, "hw": (h, w), "path": os.fspath(item), "i": i}
            try:
                pil = _pil_input(item)
                if self.device_resize:
                    return self._decoded(i, reference_mode(pil), None)
                pixels = image_to_uint8(pil, self.size, fast=self.fast)
            except (OSError, ValueError, SyntaxError, AssertionError) as exc:
                if isinstance(exc, CraneError):  # (one of those: its own message)
                    raise
                # A lazily opened PIL image decodes here: a truncated file, an odd mode, a
                # file already closed (PIL asserts then).
                why = str(exc) or type(exc).__name__  # (PIL's assert on a closed file: none)
                raise ImageReadError(f"input {i} could not be decoded: {why}") from exc
            return {
                "ok": True,
                "image": pixels,
                "hw": (pil.height, pil.width),
                "path": None,
                "i": i,
            }
        except CraneError as exc:
            return {
                "ok": False,
                "path": os.fspath(item) if isinstance(item, (str, os.PathLike)) else f"<input {i}>",
                "error": str(exc),
                "i": i,
            }

    def _decoded(self, i: int, image: Image.Image, path: str | None) -> dict[str, Any]:
        """A decoded image's record: its own pixels for the device to resize where
        :func:`~crane.data.transforms.unresized_pixels` takes the image, else resized here."""
        out = {"ok": True, "hw": (image.height, image.width), "path": path, "i": i}
        raw = unresized_pixels(image, self.size, self.handover)
        if raw is None:
            out["image"] = image_to_uint8(image, self.size)
        else:
            out["raw"] = raw
        return out


class _Jobs(Sampler):
    """Batch sampler of the decode loader: chunks of ``(index, input)`` keys of the current
    call, refilled by each ``predict_iter`` (the loader, and its workers, outlive calls).
    ``keys`` may be an iterator: it is read a chunk at a time as the loader asks for work
    (a few chunks per worker ahead), so a stream of inputs is scored as it comes."""

    def __init__(self, chunk: int):
        self.chunk = chunk
        self.keys: Iterable[tuple[int, ImageInput]] = []
        #: What the inputs' iterable raised: the input ends there, and ``predict_iter``
        #: raises it once the inputs read before it have their results.
        self.error: Exception | None = None

    def __iter__(self) -> Iterator[list[tuple[int, ImageInput]]]:
        keys, c = iter(self.keys), self.chunk
        while True:
            chunk = []
            try:
                chunk += itertools.islice(keys, c)  # (what it read stays in chunk)
            except Exception as exc:  # a camera disconnecting, a generator's own bug
                self.error = exc
            if chunk:
                yield chunk
            if len(chunk) < c or self.error is not None:
                return

    def __len__(self) -> int:
        if not isinstance(self.keys, Sized):
            raise TypeError("a stream of inputs has no length")
        return -(-len(self.keys) // self.chunk)


def _collate(batch: list[dict[str, Any]]) -> dict[str, Any]:
    """A chunk as one tensor per kind of payload: every tensor leaving a worker is copied into
    its own shared-memory segment, so the records keep none (``"image"`` rows are stacked in
    input order; ``"jpeg"`` bytes are joined, each record keeping its span) but ``"raw"``
    pixels, which already sit in shared memory (a worker's reused buffer)."""
    good = [b for b in batch if b["ok"]]
    ok = [{k: v for k, v in b.items() if k not in ("image", "jpeg")} for b in good]
    pixels = [b["image"] for b in good if "image" in b]
    jpegs = [b["jpeg"] for b in good if "jpeg" in b]
    start = 0
    for rec, b in zip(ok, good, strict=True):
        if "jpeg" in b:
            rec["jpeg_span"] = (start, start + len(b["jpeg"]))
            start += len(b["jpeg"])
    return {
        "images": torch.stack(pixels) if pixels else None,
        "jpegs": torch.cat(jpegs) if jpegs else None,
        "ok": ok,
        "failed": [(b["i"], Failure(b["path"], b["error"])) for b in batch if not b["ok"]],
        # When the worker finished this chunk (a system-wide monotonic clock on Linux, macOS
        # and Windows): benchmarks tell transfer time from decode time with it.
        "done_at": time.perf_counter(),
    }


def _rebatch(
    chunks: Iterable[dict[str, Any]], batch_size: int, pin: bool
) -> Iterator[dict[str, Any]]:
    """Join loader chunks into batches of ``batch_size`` readable images (the last may be
    smaller), in input order; each failure travels with the batch that precedes it in the
    input, so results come out in input order. With ``pin`` the images land in a pinned
    buffer (one copy) for an asynchronous transfer to the GPU. ``images`` holds
    the rows of the records without ``"jpeg"`` (undecoded bytes, a view of their chunk's) or
    ``"raw"`` (unresized pixels), in order."""
    ok: list[dict[str, Any]] = []
    images: list[torch.Tensor] = []
    failed: list[tuple[int, Failure]] = []

    def emit(n: int) -> dict[str, Any]:
        nonlocal ok, images, failed
        take, ok = ok[:n], ok[n:]
        rows = None
        n_rows = sum("jpeg" not in item and "raw" not in item for item in take)
        if n_rows:
            rows, images = _take_rows(images, n_rows, pin)
        last = take[-1]["i"]
        mine = [f for f in failed if f[0] < last]
        failed = [f for f in failed if f[0] >= last]
        return {"images": rows, "ok": take, "failed": mine}

    for c in chunks:
        failed += c["failed"]
        ok += c["ok"]
        for item in c["ok"]:
            if "jpeg_span" in item:
                item["jpeg"] = c["jpegs"][slice(*item.pop("jpeg_span"))]
        if c["images"] is not None:
            images.append(c["images"])
        while len(ok) >= batch_size:
            yield emit(batch_size)
    if ok:
        yield emit(len(ok))
    if failed:
        yield {"images": None, "ok": [], "failed": failed}


def _pinned_copy(t: torch.Tensor) -> torch.Tensor:
    """``t`` copied into pinned memory (torch's caching host allocator), through numpy: on
    this thread with the GIL released (see :func:`crane.engine.batching.take_rows`)."""
    out = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
    np.copyto(out.numpy(), t.numpy())
    return out


def decode_loader(
    size: int,
    draft: int | None,
    batch_size: int,
    workers: int,
    persistent: bool = False,
    *,
    chunk: int | None = None,
    prefetch: int | None = None,
    pin_memory: bool = False,
    fast_resize: bool | None = None,
    device_jpeg: bool = False,
    device_resize: bool = False,
) -> tuple[DataLoader, _Jobs]:
    """The loader :class:`Detector` decodes with: ``workers`` processes decode chunks of
    ⌈batch / workers⌉ inputs (set ``jobs.keys`` to ``(index, input)`` pairs before iterating),
    which :func:`_rebatch` joins into model batches. Chunks are collated as uint8 pixels,
    shrunk the fast way when ``draft`` is set (or as ``fast_resize`` says).
    ``chunk``/``prefetch``/``pin_memory``/``fast_resize`` change those choices (benchmarks
    compare them). ``device_jpeg``: JPEG files are read, not decoded; ``device_resize``: large
    images are decoded, not resized (see :class:`_Decode`)."""
    chunk, planned = chunk_plan(batch_size, workers, chunk)
    prefetch = planned if prefetch is None else prefetch
    if device_resize and workers:
        check_shared_memory(workers * prefetch * chunk)
    jobs = _Jobs(chunk)
    loader = DataLoader(
        _Decode(size, draft, fast_resize, device_jpeg, device_resize),
        batch_sampler=jobs,
        num_workers=workers,
        collate_fn=_collate,
        pin_memory=pin_memory,
        prefetch_factor=prefetch if workers else None,
        persistent_workers=persistent,
        worker_init_fn=reuse_freed_memory if device_resize else None,
        generator=torch.Generator(),  # (decoding draws nothing: the global RNG stays as it was)
    )
    return loader, jobs


@dataclass
class _InFlight:
    """One batch whose device work has been queued but whose results are not read yet."""

    ok: list[dict[str, Any]]
    failed: list[tuple[int, Failure]]  # (input index, failure)
    scores: torch.Tensor | None = None
    maps: list[torch.Tensor] | None = None  # per size group, on the device
    groups: list[list[int]] | None = None
    done: torch.cuda.Event | None = None


def batch_pixels(
    records: list[dict[str, Any]],
    rows: torch.Tensor | None,
    size: int,
    device: torch.device,
    draft: int | None = None,
) -> tuple[torch.Tensor | None, list[dict[str, Any]], list[tuple[int, Failure]]]:
    """A decode-loader batch's (B, 3, S, S) uint8 pixels: the workers' ``rows`` (those of the
    records without ``"jpeg"`` or ``"raw"``, in order), with the undecoded JPEGs decoded on
    ``device`` (:func:`~crane.data.transforms.decode_jpegs`) and the unresized pixels resized
    there (:func:`~crane.data.transforms.resize_each`) in their places. A JPEG the device
    decoder rejects is decoded on the host as the workers would (``draft``: fast decoding); if
    that fails too its record leaves the batch as a :class:`Failure`. Returns the pixels (None
    when no image is left), the records they belong to, and ``(input index, Failure)`` pairs."""
    at = [j for j, item in enumerate(records) if "jpeg" in item]
    at_raw = [j for j, item in enumerate(records) if "raw" in item]
    if not at and not at_raw:
        return rows, records, []
    decoded = decode_jpegs([records[j].pop("jpeg") for j in at], size, device) if at else []
    out = torch.empty((len(records), 3, size, size), dtype=torch.uint8, device=device)
    if rows is not None:
        # Row by row: indexing with a list would copy the index to the GPU synchronously,
        # making the host wait for the batch still running there.
        taken, rows = {*at, *at_raw}, rows.to(device, non_blocking=True)
        for k, j in enumerate(j for j in range(len(records)) if j not in taken):
            out[j] = rows[k]
    if at_raw:
        # (H, W, C) host arrays → (C, H, W) on the device, resized there. On CUDA through pinned
        # memory (predict's loader pins them already): a pageable copy would wait for the GPU.
        host = [records[j].pop("raw") for j in at_raw]
        if device.type == "cuda":
            host = [t if t.is_pinned() else _pinned_copy(t) for t in host]
        raw = [t.to(device, non_blocking=True).permute(2, 0, 1) for t in host]
        for j, pixels in zip(at_raw, resize_each(raw, size), strict=True):
            out[j] = pixels
    failed: list[tuple[int, Failure]] = []
    lost: set[int] = set()
    for j, pixels in zip(at, decoded, strict=True):
        if isinstance(pixels, RuntimeError):
            item = records[j]
            why = str(pixels).splitlines()[0]
            log.warning(
                "%s: device JPEG decoding failed (%s); decoding on the CPU", item["path"], why
            )
            try:
                pixels, _ = read_image_tensor(
                    item["path"], size, draft=draft, as_uint8=True, fast_resize=draft is not None
                )
            except CraneError as exc:
                failed.append((item["i"], Failure(item["path"], str(exc))))
                lost.add(j)
                continue
        out[j] = pixels.to(device, non_blocking=True)
    if lost:
        keep = [j for j in range(len(records)) if j not in lost]
        records = [records[j] for j in keep]
        out = torch.stack([out[j] for j in keep]) if keep else None
    return out, records, failed


def dataset_device_pixels(
    batch: dict[str, Any], size: int, device: torch.device, on_error: str
) -> tuple[dict[str, Any], torch.Tensor | None]:
    """A :meth:`AnomalyDataset.device_jpeg_view` or :meth:`~AnomalyDataset.device_resize_view`
    batch's uint8 pixels on ``device`` (:func:`batch_pixels`; evaluation and the training
    feature cache), and the batch without its image entries and without the samples whose
    JPEG no decoder reads (raising an :class:`~crane.errors.ImageReadError` instead when
    ``on_error`` is "raise"). ``batch["jpeg"]`` holds JPEG bytes (1-D), unresized pixels
    ((H, W, C)) or None per sample (see :func:`~crane.data.collate_skip_none`)."""

    def payload(data: torch.Tensor | None) -> dict[str, torch.Tensor]:
        if data is None:
            return {}
        return {"jpeg": data} if data.dim() == 1 else {"raw": data}

    records = [
        {"path": path, "i": k, **payload(data)}
        for k, (path, data) in enumerate(zip(batch["path"], batch["jpeg"], strict=True))
    ]
    pixels, kept, failed = batch_pixels(records, batch["image"], size, device)
    rest = {k: v for k, v in batch.items() if k not in ("image", "jpeg")}
    for _, failure in failed:
        if on_error == "raise":
            raise ImageReadError(failure.error)
        log.warning("skipping %s: %s", failure.path, failure.error)
    if failed:
        keep = [r["i"] for r in kept]
        rest = {
            k: v[keep] if isinstance(v, torch.Tensor) else [v[i] for i in keep]
            for k, v in rest.items()
        }
    return rest, pixels


_PROBE_JPEG: dict[tuple[str, str], str | None] = {}  # (device, decoder) → None or why not


def check_device_decode(device: torch.device) -> None:
    """Raise a :class:`~crane.errors.CraneError` naming the cause and the fix when JPEGs cannot
    be decoded on ``device`` (a torchvision without nvJPEG, TorchCodec not installed, for
    instance); checked once per device and decoder (:mod:`crane.data.jpeg_decoders`) by
    decoding a small JPEG there."""
    decoder = jpeg_decoders.jpeg_decoder()
    key = (str(device), decoder)
    if key not in _PROBE_JPEG:
        buf = io.BytesIO()
        Image.new("RGB", (16, 16), (90, 160, 30)).save(buf, format="JPEG")
        data = torch.frombuffer(bytearray(buf.getvalue()), dtype=torch.uint8)
        try:
            (pixels,) = decode_jpegs([data], 16, device)
            _PROBE_JPEG[key] = str(pixels) if isinstance(pixels, RuntimeError) else None
        except Exception as exc:  # an import error, a missing libnvjpeg, ...
            _PROBE_JPEG[key] = f"{type(exc).__name__}: {exc}"
    why = _PROBE_JPEG[key]
    if why is not None:
        raise CraneError(
            f"device_decode: {decoder} {jpeg_decoders.version(decoder)} cannot decode JPEGs "
            f"on {device} ({why.splitlines()[0]}). Install TorchCodec (`pip install "
            "torchcodec`; its Linux CUDA wheels include nvJPEG) or a torchvision up to 0.29 "
            f"built for this CUDA, pick one with {jpeg_decoders.ENV_VAR}=torchcodec or "
            "=torchvision, or decode on the CPU: drop --device-decode (device_decode=False)."
        )


def _released_default(model: str | os.PathLike) -> str | None:
    """The prompts a Detector built from ``model`` gets when none are given: for a full-size
    preset the released ones the CLI uses without a dataset (``official:mvtec``, see
    :func:`~crane.engine.evaluate.paper_protocol`), which random prompts would otherwise
    silently replace; None for a run directory (its own) and a tiny preset (random)."""
    from crane.engine.evaluate import paper_protocol

    if names_a_run(model):
        return None
    try:
        cfg = get_config(os.fspath(model))
    except CraneError:  # (no preset: create_model says so)
        return None
    if is_tiny(cfg):
        return None
    prompts = paper_protocol("", cfg.name)["prompts"]
    log.info("prompts: %s (the released prompts; prompts=... chooses others)", prompts)
    return prompts


def resize_maps(maps: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Bilinear resize of (B, H, W) maps, antialiased when shrinking: what PIL's BILINEAR
    does for :func:`crane.viz.resize_map`, on the maps' device."""
    if maps.shape[-2:] == (height, width):
        return maps
    # Antialiasing only changes anything when shrinking; the plain kernel is much faster.
    shrink = height < maps.shape[-2] or width < maps.shape[-1]
    return F.interpolate(
        maps[:, None], size=(height, width), mode="bilinear", align_corners=False, antialias=shrink
    )[:, 0]


class Detector:
    """Load a model once, then ``predict`` images, paths or folders.

    >>> det = Detector("runs/mvtec", device="cuda", precision="bf16")   # doctest: +SKIP
    >>> [p.score for p in det.predict(["a.png", "b.png"])]               # doctest: +SKIP

    ``model``: a preset, a run directory, or a model object. ``prompts`` (a preset or run
    directory only): None gives a full-size preset the released prompts the CLI uses
    (``official:mvtec``), a run its own and a tiny preset random ones.
    ``precision``: fp32, or bf16/fp16 autocast for the backbones (scoring stays fp32).
    ``workers``: DataLoader processes that decode and resize files (use most CPU cores on a
    GPU machine); started by the first call and kept for later ones until :meth:`close` (or
    the end of a ``with Detector(...) as det:`` block). ``fast_decode``: JPEGs decoded at a
    reduced DCT scale (still >= the model input) and images shrunk by torch's uint8 bicubic
    kernel (:func:`~crane.data.transforms.image_to_uint8` ``fast``) — much cheaper for large
    photos, pixels differ slightly from the reference. ``device_decode``: JPEG files are decoded
    on the model's device (nvJPEG on CUDA, the GPU's hardware JPEG engines where it has them)
    and resized there as PIL does (:func:`~crane.data.transforms.decode_jpegs`): the workers
    only read files, so a GPU is no longer held back by the CPUs' decoding; other files,
    CMYK and truncated JPEGs, and JPEGs the GPU decoder rejects are decoded on the CPU as
    usual (``fast_decode`` then applies to them). The resize is PIL's bit for bit; nvJPEG's
    inverse DCT and chroma upsampling may round differently from libjpeg-turbo's (within 2
    levels in the H100 measurements). On a CPU device it only moves decoding into the main process.
    ``device_resize``: the workers decode images as usual but leave RGB and greyscale images
    larger than the model input unresized; the main process copies them whole to the device
    and resizes them there, bitwise as PIL does
    (:func:`~crane.data.pil_resample.pil_resize_uint8`): the reference pixels exactly, with
    the workers' cost for a large photo reduced to its decode and a copy into one of their
    reused shared-memory buffers (:mod:`crane.data.handover`; on the 2-core dev box two
    workers supplied 104 img/s of 2048-px JPEGs this way against 51–52 decoded and resized)
    at the price of copying its full-size pixels (12.6 MB) to the device. Not with
    ``fast_decode``; with ``device_decode`` it applies to the files that are not decoded on
    the device (PNGs, for instance). On a CPU device it only moves resizing into the main
    process.
    ``compile``: ``torch.compile`` the model (first batch compiles; a string picks the mode,
    e.g. ``"reduce-overhead"`` for CUDA graphs at small batches). ``attention``: which fused
    attention kernel runs first (``auto``, ``cudnn``, ``flash``, ``efficient``, ``math``; see
    :func:`~crane.engine.runtime.attention_kernels`). ``map_size``: ``"input"``
    (maps at each image's own size) or ``"model"`` (S×S maps: 16× fewer bytes to copy back
    for 2048-px photos). ``cast_weights``: store the frozen matmul weights in the autocast
    dtype (same results, half the memory, and on the CPU no per-call weight casts: Crane+ bf16
    4.8 → 3.9–4.1 s an image on the 2-core dev box); default on for a Detector that loaded its
    own model, off for a model passed in (it is changed in place).
    """

    def __init__(
        self,
        model: str | os.PathLike | CraneModel = "crane+",
        *,
        prompts: str | os.PathLike | None = None,
        clip_weights: str | os.PathLike | None = None,
        dino_weights: str | os.PathLike | None = None,
        device: str | torch.device | None = None,
        precision: str = "fp32",
        threshold: float | None = None,
        batch_size: int = 8,
        workers: int = 0,
        compile: bool | str = False,
        attention: str = "auto",
        fast_decode: bool = False,
        device_decode: bool = False,
        device_resize: bool = False,
        cast_weights: bool | None = None,
        map_size: str = "input",
        **overrides: Any,
    ):
        self.device = pick_device(device)
        if device_decode:
            check_device_decode(self.device)
        self.device_decode = device_decode
        if device_resize and fast_decode:
            raise CraneError(
                "device_resize reproduces the reference pixels and fast_decode gives them up "
                "for speed: choose one (--device-resize or --fast-decode)"
            )
        self.device_resize = device_resize
        self.amp = autocast_dtype(precision, self.device)
        if map_size not in ("input", "model"):
            raise CraneError(f"map_size must be 'input' or 'model', got {map_size!r}")
        self.map_size = map_size
        owned = not isinstance(model, CraneModel)
        if owned and not isinstance(model, (str, os.PathLike)):
            raise CraneError(
                f"model must be a preset name, a run folder or a CraneModel, got "
                f"{type(model).__name__}"
            )
        if owned and prompts is None:
            prompts = _released_default(model)
        #: Where the model came from, as ``summary.json`` records it: the preset name or run
        #: directory given (None for a model passed in; the caller may name it).
        self.source: str | None = os.fspath(model) if owned else None
        #: The prompts given, for summary.json (None: the model's own; the CLI names them).
        self.prompts: str | None = (
            os.fspath(prompts) if isinstance(prompts, (str, os.PathLike)) else None
        )
        if cast_weights is None:
            cast_weights = owned and self.amp is not None
        if not all(isinstance(n, int) and not isinstance(n, bool) for n in (batch_size, workers)):
            raise CraneError(
                f"batch_size and workers must be integers, got {batch_size!r}, {workers!r}"
            )
        if not owned:
            given = {"prompts": prompts, "clip_weights": clip_weights, "dino_weights": dino_weights}
            ignored = [k for k, v in given.items() if v is not None] + sorted(overrides)
            if ignored:
                raise CraneError(
                    f"{', '.join(ignored)} apply to a model the Detector builds, not to the "
                    "model object given: build it with create_model(..., "
                    f"{ignored[0]}=...) (or load prompts into it), then pass it"
                )
        if batch_size < 1 or workers < 0:
            raise CraneError(
                f"batch_size must be >= 1 and workers >= 0, got {batch_size}, {workers}"
            )
        if isinstance(model, CraneModel):
            self.model = model
        else:  # (cast as it is built: its CLIP weights are converted as they are read)
            self.model = create_model(
                os.fspath(model),
                prompts=prompts,
                clip_weights=clip_weights,
                dino_weights=dino_weights,
                matmul_dtype=self.amp if cast_weights else None,
                **overrides,
            )
        self.model.to(self.device).eval()
        if cast_weights and self.amp is not None and self.model.matmul_dtype is None:
            # Same results as plain autocast, half the weight memory (see cast_frozen_matmuls).
            self.model.cast_frozen_matmuls(self.amp)
        # torch.compile fuses the post-processing and attention glue; first call compiles.
        self._forward = scoring_forward(self.model, self.device, compile, attention)
        # (a numpy scalar, a string from a config: a plain float)
        self.threshold = (
            finite_threshold(threshold, "threshold")
            if threshold is not None
            else self.model.image_threshold
        )
        dropped = getattr(self.model, "threshold_not_used", None)
        if self.threshold is None and dropped is not None:
            log.warning(
                "the run's calibrated image threshold (%s) was found for %s, and is not used: "
                "no decisions (give a threshold, or calibrate a run with this model)",
                *dropped,
            )
        self.batch_size, self.workers = batch_size, workers
        self.size = self.model.cfg.image_size
        # Large JPEGs: decode at a reduced DCT scale that stays >= the model input, then
        # resize as usual. Off by default: exact reference pixels for evaluation.
        self.draft = self.size if fast_decode else None
        self._copy_stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None
        self._loader: tuple[tuple, DataLoader, _Jobs] | None = None
        self._loader_busy = False
        self._close_pending = False
        self._loader_lock = threading.Lock()

    @torch.no_grad()
    def predict_tensor(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Preprocessed (B, 3, S, S) batch → (scores (B,), maps (B, S, S)) on the device.

        ``images`` are CLIP-normalised floats, or the uint8 pixels of
        :func:`crane.data.transforms.image_to_uint8` (normalised here, on the device). The
        call returns once ``images`` are read: the caller may refill its buffer, pinned or
        not (the results may still be computing, as usual on CUDA)."""
        if self.device.type == "cuda" and images.device.type == "cpu" and images.is_pinned():
            # (a non-blocking copy from a caller's pinned buffer could still be reading it)
            images = images.to(self.device)
        return self._predict(images)

    @torch.no_grad()
    def _predict(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """:meth:`predict_tensor` for the pipelines' own pinned buffers, which nothing
        rewrites: copied without waiting."""
        with autocast(self.device, self.amp):
            return self._forward(model_input(images, self.device))

    def _launch(self, batch: dict[str, Any]) -> _InFlight:
        """Queue a batch's device work (forward, resize to each image's size) and return."""
        job = _InFlight(batch["ok"], batch["failed"])
        images = self._pixels(job, batch["images"])
        if images is None:
            return job
        scores, maps = self._predict(images)
        groups: dict[tuple[int, int], list[int]] = {}
        for j, item in enumerate(job.ok):
            hw = tuple(item["hw"]) if self.map_size == "input" else (self.size, self.size)
            groups.setdefault(hw, []).append(j)
        job.groups = list(groups.values())
        try:
            job.maps = [
                resize_maps(maps if len(idx) == len(job.ok) else select_rows(maps, idx), *hw)
                for hw, idx in groups.items()
            ]
        except RuntimeError as exc:
            if not is_out_of_memory(exc):
                raise
            h, w = max(groups, key=lambda hw: hw[0] * hw[1])
            raise CraneError(
                f"out of {self.device} memory resizing a batch's {len(job.ok)} anomaly maps to "
                f"their images' sizes (up to {h}×{w} px, {4 * h * w / 2**20:.0f} MB each): use "
                f"--map-size model (maps at {self.size}×{self.size}) or a smaller --batch-size "
                f"({first_line(exc)})"
            ) from None
        job.scores = scores
        if self.device.type == "cuda":
            job.done = torch.cuda.Event()
            # (on this device's stream: a bare record() uses the current device's, which is
            # not this one for "cuda:1" unless the caller switched devices)
            job.done.record(torch.cuda.current_stream(self.device))
        return job

    def _pixels(self, job: _InFlight, rows: torch.Tensor | None) -> torch.Tensor | None:
        """The batch's uint8 pixels on the device (:func:`batch_pixels`); records of JPEGs no
        decoder reads move from ``job.ok`` to ``job.failed``."""
        pixels, job.ok, failed = batch_pixels(job.ok, rows, self.size, self.device, self.draft)
        job.failed += failed
        return pixels

    def _collect(self, job: _InFlight) -> Iterator[Prediction | Failure]:
        """Copy a launched batch's results to the host and yield them in input order."""
        if job.scores is None:  # (device decoding adds failures after the workers' ones)
            yield from (f for _, f in sorted(job.failed, key=lambda x: x[0]))
            return
        if job.done is not None:
            # Copy on a side stream that waits for this batch only, so the next batch (already
            # queued on the main stream) keeps the GPU busy meanwhile. Through pinned buffers:
            # pageable device-to-host copies can run at a few GB/s, 2048-px maps are 16 MB each.
            stream = self._copy_stream
            with torch.cuda.stream(stream):
                stream.wait_event(job.done)
                pinned = [
                    torch.empty(t.shape, dtype=t.dtype, pin_memory=True).copy_(t, non_blocking=True)
                    for t in (job.scores, *job.maps)
                ]
            stream.synchronize()
            scores, *host = pinned
        else:
            scores, host = job.scores.cpu(), [m.cpu() for m in job.maps]
        scores = scores.tolist()
        maps: list[np.ndarray | None] = [None] * len(job.ok)
        for idx, group in zip(job.groups, host, strict=True):
            for k, j in enumerate(idx):
                # Each map its own (pageable) copy: a kept prediction holds neither pinned RAM
                # nor the rest of its batch's maps.
                maps[j] = group[k].numpy().copy()
        results: list[tuple[int, Prediction | Failure]] = list(job.failed)
        for j, item in enumerate(job.ok):
            score = float(scores[j])
            if math.isnan(score):  # a NaN anywhere in an image's patch logits reaches its score
                why = nan_score_message(self.model.cfg, self.amp)
                path = item["path"] or f"<input {item['i']}>"
                results.append((item["i"], Failure(path, why, "nan")))
                continue
            results.append((item["i"], Prediction(item["path"], score, maps[j], self.threshold)))
        yield from (r for _, r in sorted(results, key=lambda x: x[0]))

    def predict_iter(
        self, inputs: Iterable[ImageInput], progress: bool = False
    ) -> Iterator[Prediction | Failure]:
        """Yield a :class:`Prediction` per readable input, a :class:`Failure` per unreadable one
        (or one whose score comes out NaN), in input order. Workers decode ahead; on CUDA batch
        k+1 runs while batch k is copied back and handed out. The decode workers are started by
        the first call and reused by later ones (:meth:`close` stops them). ``inputs``: one
        input (a 4-D array or tensor is a batch), or an iterable of them, read as the workers
        need them (a generator of camera frames is scored as it comes, a few batches ahead);
        folders are not expanded (:meth:`predict`, :func:`expand_inputs` do that)."""
        inputs = _one_or_many(inputs)
        # (tensors on the host: decode workers are forked processes, which cannot use CUDA;
        # read as the loader asks for them, so a stream is scored as it comes)
        keys = (
            (i, x.detach().cpu() if isinstance(x, torch.Tensor) else _loaded(x))
            for i, x in enumerate(inputs)
        )
        total = -(-len(inputs) // self.batch_size) if isinstance(inputs, Sized) else None
        loader, jobs, shared = self._decode_loader()
        jobs.keys, jobs.error = keys, None
        pending: _InFlight | None = None
        failed: Exception | None = None
        batches = _rebatch(loader, self.batch_size, pin=self.device.type == "cuda")
        try:
            for batch in tqdm(
                batches, desc="predict", unit="batch", total=total, disable=not progress
            ):
                job = self._launch(batch)
                if pending is not None:
                    yield from self._collect(pending)
                pending = job
            if pending is not None:
                yield from self._collect(pending)
            failed, jobs.error = jobs.error, None
        except GeneratorExit:  # the caller stopped early: the workers stay usable
            raise
        except BaseException:  # (Ctrl-C too: the terminal's SIGINT also stops the workers)
            if shared:  # e.g. a worker died: the next call starts fresh workers
                self._shutdown()
            raise
        finally:
            jobs.keys = []
            if shared:
                with self._loader_lock:
                    self._loader_busy = False
                    closing, self._close_pending = self._close_pending, False
                if closing:  # (close() was asked for while this call used the workers)
                    self._shutdown()
        if failed is not None:  # the inputs' iterable raised: every input before it is done
            raise failed

    def _decode_loader(self) -> tuple[DataLoader, _Jobs, bool]:
        """The DataLoader that decodes inputs, and whether it is the long-lived one.

        Workers decode small chunks that the main process joins into model batches: with
        whole batches per worker, the first batch would wait for one worker to decode all of
        it alone, and a job of a few hundred images would decode in one wave before the GPU
        saw anything. The workers persist across calls (starting them costs ~0.1 s per call
        on a small machine, more than decoding one image); a call made while another call's
        iterator is still open gets its own short-lived loader.
        """
        w = self.workers
        key = (w, self.batch_size, self.size, self.draft, self.device_decode, self.device_resize)
        with self._loader_lock:
            shared = w > 0 and not self._loader_busy
            self._loader_busy = self._loader_busy or shared
        if shared and self._loader is not None and self._loader[0] == key:
            return self._loader[1], self._loader[2], True
        try:
            loader, jobs = decode_loader(
                self.size,
                self.draft,
                self.batch_size,
                w,
                shared,
                device_jpeg=self.device_decode,
                device_resize=self.device_resize,
                # Full-size pixels: pinned by the loader's own thread, beside the main thread
                # that launches the model (12 MB per 2048-px photo).
                pin_memory=self.device_resize and self.device.type == "cuda",
            )
        except BaseException:
            self._loader_busy = self._loader_busy and not shared
            raise
        if shared:
            self._shutdown()
            self._loader = (key, loader, jobs)
        return loader, jobs, shared

    def close(self) -> None:
        """Stop the decode worker processes (otherwise they live as long as the Detector).
        While a ``predict_iter`` is still being consumed (another thread's, or a ``with``
        block left with an iterator open) they stop when that iteration ends instead: it
        keeps its workers and gives every result."""
        with self._loader_lock:
            if self._loader_busy:
                self._close_pending = True
                return
        self._shutdown()

    def _shutdown(self) -> None:
        if self._loader is not None:
            it = getattr(self._loader[1], "_iterator", None)
            self._loader = None
            if it is not None and hasattr(it, "_shutdown_workers"):
                it._shutdown_workers()

    def __enter__(self) -> Detector:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def predict(self, inputs: ImageInput | Iterable[ImageInput]) -> list[Prediction]:
        """Predictions for one input or a list; paths to folders expand to their images.
        Images in memory: PIL images, numpy arrays (H, W[, C]) and torch tensors ([C,] H, W)
        (uint8, or floats in [0, 1]; see :func:`~crane.data.imageio.image_from_array`); a 4-D
        array or tensor is a batch of them. Unreadable files and unusable arrays raise
        :class:`~crane.errors.ImageReadError`, a NaN score :class:`~crane.errors.CraneError`
        (:meth:`predict_iter` reports both and goes on)."""
        expanded: list[ImageInput] = []
        for item in _one_or_many(inputs):
            if isinstance(item, (str, os.PathLike)):
                expanded += expand_inputs([item])
            else:
                expanded.append(item)
        results = []
        for r in self.predict_iter(expanded):
            if isinstance(r, Failure):
                r.raise_()
            results.append(r)
        return results


def _files_under(folder: Path) -> list[Path]:
    """Every file (and broken link) under ``folder``, through links to folders as a glob
    pattern's ``**`` goes (``Path.rglob`` does not follow them before Python 3.13: a
    ``line3 -> /mnt/nas/line3`` link's images would be left out silently); each folder once,
    so a link loop ends."""
    seen: set[tuple[int, int]] = set()
    out: list[Path] = []
    unreadable: list[OSError] = []
    for root, dirs, files in os.walk(folder, followlinks=True, onerror=unreadable.append):
        st = os.stat(root)
        if (st.st_dev, st.st_ino) in seen:
            dirs[:] = []
            continue
        seen.add((st.st_dev, st.st_ino))
        out += [Path(root) / f for f in files]
    if unreadable:  # (os.walk passes over them without a word)
        log.warning(
            "%d folder(s) under %s could not be read, their images left out: %s",
            len(unreadable),
            folder,
            "; ".join(f"{e.filename}: {e.strerror}" for e in unreadable[:3])
            + ("; ..." if len(unreadable) > 3 else ""),
        )
    return out


def _file_or_unreadable(p: Path) -> bool:
    """``p.is_file()``, and True where it cannot be told (no permission to look): the input
    is then read, fails, and is reported among the failures rather than stopping the run."""
    try:
        return p.is_file()
    except OSError:
        return True


def _glob(spec: str) -> list[str]:
    """``glob.glob(spec, recursive=True)``, with ``**`` walked as a folder scan is (each folder
    once): glob follows links to folders without a loop check, so a link back up the tree
    spelled each file 40 ways, and two such links never ended."""
    parts = Path(spec).parts
    if "**" not in parts:
        return glob.glob(spec, recursive=True)
    fixed = next(i for i, s in enumerate(parts) if any(ch in s for ch in "*?["))
    base, pattern = Path(*parts[:fixed]) if fixed else Path("."), parts[fixed:]
    if not base.is_dir():
        return []

    def match(pat: tuple[str, ...], names: tuple[str, ...]) -> bool:
        if not pat:
            return not names
        if pat[0] == "**":
            return any(match(pat[1:], names[k:]) for k in range(len(names) + 1))
        return bool(names) and fnmatch.fnmatchcase(names[0], pat[0]) and match(pat[1:], names[1:])

    out = []
    for f in _files_under(base):
        names = f.relative_to(base).parts
        if not any(n.startswith(".") for n in names) and match(pattern, names):
            out.append(str(f))
    return out


def _holds_files(folder: Path) -> bool:
    return folder.is_dir() and any(f.is_file() for f in folder.rglob("*"))


def _one_or_many(inputs: ImageInput | Iterable[ImageInput]) -> Iterable[ImageInput]:
    """One input as a list of one; a 4-D array or tensor as its images ((B, H, W, C) arrays,
    (B, C, H, W) tensors); anything else as the iterable of inputs it is."""
    if isinstance(inputs, (np.ndarray, torch.Tensor)) and inputs.ndim == 4:
        return list(inputs)
    if isinstance(inputs, (str, bytes, os.PathLike, Image.Image, np.ndarray, torch.Tensor)):
        return [inputs]
    return inputs


def expand_inputs(
    specs: Iterable[str | os.PathLike], exclude: str | os.PathLike | None = None
) -> list[str]:
    """Files, folders (recursive, image files only) and glob patterns → sorted unique paths
    (a file named twice, by two spellings of its path, once: as first named).
    Files that a folder or a pattern finds under ``exclude`` (the run's own overlay folder,
    whose files are images too) are left out, as are those a folder scan finds under hidden
    folders or with hidden names (``.ipynb_checkpoints/``, macOS's ``._x.png``), which a
    glob pattern leaves out too; files named one by one are kept."""
    if isinstance(specs, (str, bytes, os.PathLike)):  # (one path, not its characters)
        specs = [specs]
    skip = os.path.realpath(exclude) if exclude is not None else None

    def keep(f: str) -> bool:
        return skip is None or not os.path.realpath(f).startswith(skip + os.sep)

    out: list[str] = []
    excluded = 0
    for spec in specs:
        spec = os.fspath(spec)
        p = Path(spec)
        if _file_or_unreadable(p):
            out.append(spec)
            continue
        if p.is_dir():
            under = _files_under(p)
            named = [f for f in under if is_image_file(f)]
            others = [
                f
                for f in under
                if not is_image_file(f)
                and not any(s.startswith(".") for s in f.relative_to(p).parts)
            ]
            if others:
                log.info(
                    "left out %d files under %s that are not images by their extension (%s); "
                    "name a file to read it whatever its extension",
                    len(others),
                    p,
                    ", ".join(sorted(f.name for f in others)[:3])
                    + (", ..." if len(others) > 3 else ""),
                )
            warn_broken_links(named)
            found = [f for f in named if _file_or_unreadable(f)]
            files = sorted(
                str(f) for f in found if not any(s.startswith(".") for s in f.relative_to(p).parts)
            )
            if len(files) < len(found):
                log.info("left out %d hidden image files under %s", len(found) - len(files), p)
        elif any(ch in spec for ch in "*?["):
            named = [f for f in _glob(spec) if is_image_file(f)]
            warn_broken_links([Path(f) for f in named])
            files = sorted(f for f in named if _file_or_unreadable(Path(f)))
        else:
            raise ImageReadError(f"input {spec} does not exist")
        kept = [f for f in files if keep(f)]
        excluded += len(files) - len(kept)
        out += kept
    seen: dict[str, str] = {}  # the file's place → the first spelling of it
    for f in out:
        seen.setdefault(_place(f), f)
    if len(seen) < len(out):
        log.info(
            "%d input file name(s) repeated: each file is predicted once", len(out) - len(seen)
        )
    if not seen:
        where = f" (outside the overlay folder {exclude})" if excluded else ""
        raise CraneError(f"no image files found in {', '.join(map(str, specs))}{where}")
    if excluded:
        log.info("left out %d image files inside the overlay folder %s", excluded, exclude)
    return list(seen.values())


def _place(path: str) -> str:
    """Where an input file is: its folder resolved (``a/../x.png`` through a linked ``a`` is
    another file than ``./x.png``), its own name not (links are files of their own: a dataset
    of links keeps a row per name). Inputs and a resumed run's records match by it."""
    return os.path.join(os.path.realpath(os.path.dirname(path) or "."), os.path.basename(path))


def _whereabouts(path: str) -> dict[str, Any]:
    """What a progress record holds to find its input again (:func:`_place`; the absolute
    path for an older crane's records and a folder link re-pointed since) and to tell it was
    not rewritten since (:func:`_stamp`)."""
    return {"abspath": os.path.abspath(path), "place": _place(path), **_stamp(path)}


def _stamp(path: str) -> dict[str, int]:
    """The file's size and modification time (nothing where it cannot be read)."""
    try:
        st = os.stat(path)
    except OSError:
        return {}
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns}


def _input_overlay(target: Path, path: str, amap: np.ndarray, stamp: dict) -> None:
    """:func:`~crane.viz.write_overlay` of the input file, read again for it: skipped, with a
    warning, when the file has gone or changed since it was scored (a hot folder's camera
    rewrote it): the overlay would show other pixels than the map, or stop the run. Without
    it the image counts as not done for a resume, and is predicted again there."""
    if _stamp(path) != {k: stamp[k] for k in ("size", "mtime_ns") if k in stamp}:
        log.warning("no overlay for %s: the file changed or went away after it was scored", path)
        return
    try:
        write_overlay(target, path, amap)
    except ImageReadError as exc:
        log.warning("no overlay for %s: it can no longer be read (%s)", path, exc)


def _output_names(paths: Sequence[str]) -> dict[str, str]:
    """Unique, readable output stems: the path relative to the inputs' common folder, with
    "__" for its separators, without its extension — with it where two files would otherwise
    share a stem (``x.png``/``x.jpg``), and "~2", "~3", … in the order of their absolute paths
    where that does not tell them apart (``a/b.png`` and ``a__b.png``, one file named twice):
    the names do not depend on the order the inputs were given in (a resumed run may list
    them otherwise). Compared without case, as case-insensitive file systems would. A name
    too long for a file system (deep folders flattened) is cut short and ended with a digest
    of the whole (:func:`~crane.files.fit_file_name`)."""
    absolute = [os.path.abspath(p) for p in paths]
    common = os.path.commonpath([os.path.dirname(p) for p in absolute]) if absolute else ""
    rels = {
        p: os.path.relpath(a, common).replace(os.sep, "__")
        for p, a in zip(paths, absolute, strict=True)
    }
    stems = {p: os.path.splitext(r)[0] for p, r in rels.items()}
    shared = Counter(s.casefold() for s in stems.values())
    shared_rel = Counter(r.casefold() for r in rels.values())
    names: dict[str, str] = {}
    used: set[str] = set()
    where = dict(zip(paths, absolute, strict=True))
    for p in sorted(stems, key=lambda p: (where[p], p)):  # (one file named twice: by spelling)
        stem = stems[p]
        helps = shared[stem.casefold()] > 1 and shared_rel[rels[p].casefold()] == 1
        # (240 bytes, a "~k" and the extension stay within 255; names that fitted before keep)
        name = fit_file_name(rels[p] if helps else stem, 240)
        unique, k = name, 2
        while unique.casefold() in used:
            unique, k = f"{name}~{k}", k + 1
        used.add(unique.casefold())
        names[p] = unique
    return {p: names[p] for p in paths}


def _outputs_exist(out: Path, name: str, outputs: dict[str, Any]) -> bool:
    overlay = (
        outputs["overlays"] is None
        or (out / "overlays" / f"{name}.{outputs['overlays']}").is_file()
    )
    return overlay and (not outputs["maps"] or (out / "maps" / f"{name}.npy").is_file())


def _write_map(path: Path, amap: np.ndarray) -> None:
    buf = io.BytesIO()
    np.save(buf, amap.astype(np.float32, copy=False))
    atomic_write_bytes(path, buf.getvalue())


_COLUMNS = ["path", "image_score", "decision", "max_pixel_score"]


def _run_settings(
    detector: Detector, paths: Sequence[str], outputs: dict[str, Any]
) -> dict[str, Any]:
    """What a resumed run must share with the interrupted one for its results to belong in
    the same files: the model (config and a digest of its prompt tensors), the inputs (the
    set of them decides the output names; their order does not), the settings that change
    pixels, scores or decisions, and which files are written."""
    return {
        **progress_file.model_settings(detector.model, detector.amp),
        "threshold": detector.threshold,
        "map_size": detector.map_size,
        "fast_decode": detector.draft is not None,
        "device_decode": detector.device_decode,
        "device_resize": detector.device_resize,
        "n_inputs": len(paths),
        "inputs_sha256": progress_file.digest_of(sorted(os.path.abspath(p) for p in paths)),
        **outputs,
    }


def run_predict(
    detector: Detector,
    inputs: Sequence[str | os.PathLike],
    out_dir: str | os.PathLike,
    *,
    overlays: bool = True,
    save_maps: bool = False,
    overwrite: bool = False,
    resume: bool = False,
    progress: bool = True,
    write_threads: int | None = None,
    overlay_format: str = "png",
) -> dict[str, Any]:
    """Predict files and write ``predictions.csv``, ``summary.json``, ``overlays/*.png`` (or
    ``.jpg``) and (on request) ``maps/*.npy``. Unreadable files, and any whose score comes out
    NaN, are reported (``summary.json``'s ``failed``) and skipped. Overlays and maps are written by
    ``write_threads`` threads beside the prediction loop (default: the CPU count, at most 8;
    0 = in the loop), see :class:`~crane.engine.writer.OutputWriter`. ``overlay_format``:
    ``"png"`` (lossless) or ``"jpg"`` (quality 90; an order of magnitude cheaper to encode).

    Each finished image is recorded in ``out_dir/progress.jsonl`` once its files are written
    (:class:`~crane.engine.progress.Recorder`), so a run
    that stops (Ctrl-C, a crash, a full disk) loses nothing: ``resume=True`` (``crane predict
    --resume``) predicts only the images it had not finished (or whose overlay or map file is
    missing) and writes the files of the whole run; it refuses when the model, inputs or
    options differ. Images that failed are tried again."""
    if overlay_format not in OVERLAY_FORMATS:
        raise CraneError(
            f"overlay format must be one of {', '.join(OVERLAY_FORMATS)}, got {overlay_format!r}"
        )
    out = Path(out_dir)
    progress_path = progress_file.check_resume_flags(
        out, resume, overwrite, "predictions.csv", "predict"
    )
    if not resume and not overwrite:  # (none of the files a run writes replaced unasked)
        held = [n for n in ("predictions.csv", "summary.json") if (out / n).exists()]
        held += [f"{d}/" for d in ("overlays", "maps") if _holds_files(out / d)]
        if held:
            raise CraneError(
                f"{out} already holds predictions ({', '.join(held)}); pass --overwrite or "
                "choose another --out"
            )
    paths = expand_inputs(inputs, exclude=out / "overlays")
    names = _output_names(paths)
    outputs = {"overlays": overlay_format if overlays else None, "maps": save_maps}
    settings = _run_settings(detector, paths, outputs)
    done: dict[str, dict[str, str]] = {}
    if resume:
        recorded = progress_file.read_progress(progress_path, "predict", settings, _COLUMNS)
        # By place: the same inputs may be spelled otherwise this time (another working
        # directory); the rows take this run's spelling. (Records of an older crane hold the
        # absolute path only.)
        at = {_place(p): p for p in paths}
        by_abspath: dict[str, list[str]] = {}
        for p in paths:
            by_abspath.setdefault(os.path.abspath(p), []).append(p)
        changed = 0
        for r in recorded:
            path = at.get(r["place"]) if "place" in r else None
            if path is None:  # (an older record, or the folder's link now points elsewhere)
                same = by_abspath.get(r.get("abspath", os.path.abspath(r["path"])), [])
                path = same[0] if len(same) == 1 else None
            if path is None:  # (the settings hash the same inputs: an edited file)
                raise CraneError(f"{progress_path} names {r['path']}, not among the inputs")
            if "size" in r and _stamp(path) != {"size": r["size"], "mtime_ns": r["mtime_ns"]}:
                changed += 1  # (rewritten since it was scored: its result is not its own)
            elif _outputs_exist(out, names[path], outputs):
                done[path] = {**{k: r[k] for k in _COLUMNS}, "path": path}
        if changed:
            log.warning("%d image(s) changed since they were scored: predicted again", changed)
        if len(done) < len(recorded) - changed:
            log.info(
                "%d image(s) lack an output file and are predicted again",
                len(recorded) - changed - len(done),
            )
        log.info("resuming: %d of %d images already done", len(done), len(paths))
    out.mkdir(parents=True, exist_ok=True)
    rows: dict[str, dict[str, str]] = {}
    failures = []
    todo = [p for p in paths if p not in done]
    kept = [{**row, **_whereabouts(p)} for p, row in done.items()]
    with progress_file.open_progress(progress_path, "predict", settings, kept) as file:
        if resume:  # (once the run's lock is held: a live run's files are not partial)
            progress_file.remove_partial_writes([out / "overlays", out / "maps"])
        else:  # (--overwrite: an earlier run's table must not pass for this run's meanwhile)
            for name in ("predictions.csv", "summary.json"):
                (out / name).unlink(missing_ok=True)
        record = progress_file.Recorder(file)
        try:
            with OutputWriter(write_threads) as writer:
                for r in detector.predict_iter(todo, progress=progress) if todo else ():
                    if isinstance(r, Failure):
                        what = "unreadable" if r.reason == "unreadable" else "no result for"
                        log.warning("skipped %s %s: %s", what, r.path, r.error)
                        failures.append({"path": r.path, "error": r.error, "reason": r.reason})
                        continue
                    decision = (
                        ""
                        if r.is_anomalous is None
                        else ("anomalous" if r.is_anomalous else "normal")
                    )
                    row = {
                        "path": r.path,
                        # (every digit: a score shown rounded could seem to sit on the
                        # threshold, or on its other side, while the decision says otherwise)
                        "image_score": repr(float(r.score)),
                        "decision": decision,
                        "max_pixel_score": repr(float(r.max_pixel_score)),
                    }
                    rows[r.path] = row
                    writes = []
                    where = _whereabouts(r.path)
                    if overlays:
                        name = f"{names[r.path]}.{overlay_format}"
                        target = out / "overlays" / name
                        writes.append(
                            writer.submit(_input_overlay, target, r.path, r.anomaly_map, where)
                        )
                    if save_maps:
                        target = out / "maps" / f"{names[r.path]}.npy"
                        writes.append(writer.submit(_write_map, target, r.anomaly_map))
                    # (appended once its files are written; by absolute path too, so that a
                    # resume from another working directory finds it)
                    record.add({**row, **where}, writes)
            record.flush()  # (every write has finished: the last images are recorded too)
        except BaseException:  # Ctrl-C, a crash, a full disk: what is recorded stays
            record.flush()  # (the writer has finished every job it took)
            log.warning(
                "stopped after %d of %d images; `crane predict ... --resume` (API: "
                "resume=True) continues from there",
                len(done) + record.appended,
                len(paths),
            )
            raise
    table = [done.get(p) or rows[p] for p in paths if p in done or p in rows]
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=_COLUMNS)
    writer.writeheader()
    writer.writerows(table)
    n_anom = sum(r["decision"] == "anomalous" for r in table)
    summary = {
        "model": detector.model.cfg.name,
        "model_source": detector.source,
        "prompts": detector.prompts,
        "threshold": detector.threshold,
        "n_images": len(table),
        "n_anomalous": n_anom if detector.threshold is not None else None,
        "n_failed": len(failures),
        "n_resumed": len(done),
        "failed": failures,
        "outputs": {
            "csv": "predictions.csv",
            "overlays": "overlays/" if overlays else None,
            "maps": "maps/" if save_maps else None,
        },
    }
    text = json.dumps(utf8_strings(strict_json(summary)), indent=2, allow_nan=False) + "\n"
    try:
        # (valid UTF-8: the bytes of a file name that is not UTF-8 as \xNN escapes)
        data = utf8_text(buf.getvalue()).encode("utf-8")
        atomic_write_bytes(out / "predictions.csv", data)
        atomic_write_bytes(out / "summary.json", text.encode())
    except BaseException:  # a full disk, say: every image is recorded, only the tables are not
        log.warning(
            "stopped while writing predictions.csv and summary.json, with all %d images done; "
            "`crane predict ... --resume` (API: resume=True) writes them",
            len(table),
        )
        raise
    progress_path.unlink(missing_ok=True)  # (the run is complete: nothing left to resume)
    if overwrite:  # files of an earlier run that this one did not replace
        ours = {names[r["path"]] for r in table}
        for sub, kept, ext in (("overlays", overlays, overlay_format), ("maps", save_maps, "npy")):
            folder = out / sub
            if not folder.is_dir():
                continue
            mine = {f"{name}.{ext}" for name in ours} if kept else set()
            stale = [f for f in folder.iterdir() if f.name not in mine]
            if stale:
                log.warning(
                    "%d file(s) in %s are not from this run (an earlier run's; left in place)",
                    len(stale),
                    folder,
                )
    return summary
