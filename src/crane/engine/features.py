"""Frozen-encoder feature cache: the vision tower runs once per image for a whole training run.

Later epochs read ``(global_feat, patch_sets)`` from here, so they cost only the text tower and
the losses. The cache lives on the GPU when it fits comfortably, else in RAM, else in a
memory-mapped file (chosen by size; see :func:`choose_location`).
"""

from __future__ import annotations

import contextlib
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset
from tqdm.auto import tqdm

from crane.engine.predict import check_device_decode, dataset_device_pixels
from crane.engine.runtime import (
    attention_kernels,
    batch_loader,
    check_attention,
    model_input,
    nan_cause,
)
from crane.errors import CraneError
from crane.models.crane import CraneModel
from crane.models.vision import VisionOutput, strict_fp32

log = logging.getLogger(__name__)


def available_ram() -> int:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES"))


def choose_location(nbytes: int, device: torch.device) -> str:
    """``cuda`` if under 40% of free GPU memory, ``ram`` if under 40% of free RAM, else ``mmap``."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        if nbytes < 0.4 * free:
            return "cuda"
    if nbytes < 0.4 * available_ram():
        return "ram"
    return "mmap"


@dataclass
class FeatureCache:
    global_feat: torch.Tensor  # (n, E)
    patch_sets: torch.Tensor  # (n, S, N, E)
    masks: torch.Tensor  # (n, H, W) bool
    labels: torch.Tensor  # (n,) int64
    paths: list[str]
    location: str

    def __len__(self) -> int:
        return self.labels.shape[0]

    def batch(
        self, idx: torch.Tensor, device: torch.device
    ) -> tuple[VisionOutput, torch.Tensor, torch.Tensor]:
        idx_cpu = idx.cpu()
        if self.location == "cuda":
            g, p = (
                self.global_feat[idx.to(self.global_feat.device)],
                self.patch_sets[idx.to(self.patch_sets.device)],
            )
        elif self.location == "ram":
            g, p = self.global_feat[idx_cpu], self.patch_sets[idx_cpu]
        else:  # memmap: gather sorted rows, then restore the requested order
            order = torch.argsort(idx_cpu)
            rows = idx_cpu[order].numpy()
            p_sorted = torch.from_numpy(np.ascontiguousarray(self.patch_sets.numpy()[rows]))
            p = torch.empty_like(p_sorted)
            p[order] = p_sorted
            g = self.global_feat[idx_cpu]
        nb = device.type == "cuda"
        vis = VisionOutput(
            global_feat=g.to(device, non_blocking=nb),
            patch_sets=p.to(device, non_blocking=nb).transpose(0, 1),
        )
        masks = self.masks[idx_cpu].to(device, non_blocking=nb)
        return vis, masks, self.labels[idx_cpu].to(device)

    @classmethod
    def build(
        cls,
        model: CraneModel,
        dataset: Dataset,
        device: torch.device,
        batch_size: int = 8,
        workers: int = 0,
        location: str = "auto",
        mmap_path: str | os.PathLike | None = None,
        progress: bool = True,
        autocast_dtype: torch.dtype | None = None,
        attention: str = "auto",
        device_decode: bool = False,
        device_resize: bool = False,
    ) -> FeatureCache:
        """Encode every readable sample of ``dataset`` once. ``device_decode``: JPEG images
        are read by the workers and decoded on ``device`` (nvJPEG on CUDA), as
        ``evaluate(device_decode=True)`` does; a JPEG no decoder reads is skipped or raises
        as the dataset's ``on_error`` says; ``device_resize``: large images are resized on
        ``device`` (bit for bit as PIL would), as ``evaluate(device_resize=True)`` does. The
        model is moved to ``device`` first, as :func:`~crane.engine.evaluate.evaluate` and
        :func:`~crane.engine.train.train` do."""
        check_attention(attention)
        if device_decode:
            check_device_decode(device)
        model.to(device)
        loader = batch_loader(
            dataset,
            batch_size,
            workers,
            device,
            device_jpeg=device_decode,
            device_resize=device_resize,
        )
        on_error = getattr(dataset, "on_error", "raise")
        n = len(dataset)
        g_all = p_all = masks = labels = finite = None
        paths: list[str] = []
        filled = 0
        for batch in tqdm(
            loader, desc="encoding images (once)", disable=not progress, unit="batch"
        ):
            if batch is None:
                continue
            images = batch["image"]
            if "jpeg" in batch:
                batch, images = dataset_device_pixels(batch, dataset.image_size, device, on_error)
                if images is None:  # every image of the batch was skipped
                    continue
            images = model_input(images, device)
            with (
                torch.autocast(
                    device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None
                ),
                strict_fp32(device),  # (first: its lock also keeps the kernel order ours)
                attention_kernels(attention),
            ):
                vis = model.encode_images(images)
            g, p = vis.global_feat.float(), vis.patch_sets.float().transpose(0, 1)
            if p_all is None:
                shape = (n, *p.shape[1:])
                nbytes = int(np.prod(shape)) * 4
                loc = choose_location(nbytes, device) if location == "auto" else location
                log.info("feature cache: %.2f GB in %s", nbytes / 1e9, loc)
                if loc == "mmap":
                    if mmap_path is None:
                        raise ValueError("a memory-mapped cache needs mmap_path")
                    arr = np.lib.format.open_memmap(
                        str(mmap_path), mode="w+", dtype=np.float32, shape=shape
                    )
                    # Gone from the folder at once (the mapping keeps the data; the system
                    # frees it when the process ends): a killed run leaves no gigabytes behind.
                    with contextlib.suppress(OSError):  # (Windows: removed at the end instead)
                        os.unlink(mmap_path)
                    p_all = torch.from_numpy(arr)
                else:
                    p_all = torch.empty(
                        shape, dtype=torch.float32, device=device if loc == "cuda" else "cpu"
                    )
                g_all = torch.empty((n, g.shape[1]), dtype=torch.float32, device=p_all.device)
                size = batch["mask"].shape[-1]
                masks = torch.empty((n, size, size), dtype=torch.bool)
                labels = torch.empty(n, dtype=torch.long)
                location = loc
            k = g.shape[0]
            if finite is None:  # per image, on the device: checked once at the end (no sync)
                finite = torch.empty(n, dtype=torch.bool, device=g.device)
            finite[filled : filled + k] = torch.isfinite(g).all(1) & torch.isfinite(p).flatten(
                1
            ).all(1)
            p_all[filled : filled + k] = p.to(p_all.device)
            g_all[filled : filled + k] = g.to(g_all.device)
            masks[filled : filled + k] = batch["mask"][:, 0] > 0.5
            labels[filled : filled + k] = batch["label"]
            paths += list(batch["path"])
            filled += k
        if p_all is None or filled == 0:
            raise ValueError("no readable training images")
        assert finite is not None
        bad = (~finite[:filled]).nonzero().flatten().tolist()
        if bad:  # (before any step: the loss would be NaN and the learning rate blamed)
            shown = ", ".join(paths[i] for i in bad[:3]) + (", ..." if len(bad) > 3 else "")
            raise CraneError(
                f"the frozen features of {len(bad)} training image(s) are not finite ({shown}): "
                + nan_cause(model.cfg, autocast_dtype)
            )
        if filled < n:  # skipped (unreadable) samples: keep only what was filled
            p_all, g_all, masks, labels = (
                p_all[:filled],
                g_all[:filled],
                masks[:filled],
                labels[:filled],
            )
        return cls(g_all, p_all, masks, labels, paths, location)


def release_memmap(path: str | os.PathLike | None) -> None:
    if path is not None:
        Path(path).unlink(missing_ok=True)
