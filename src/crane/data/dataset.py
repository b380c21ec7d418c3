"""A torch Dataset over a meta.json index (SPEC §2 preprocessing, §8 format).

Error handling design: files are decoded lazily in ``__getitem__`` (a pre-scan would
decode every image twice). With ``on_error="raise"`` a bad sample raises
:class:`~crane.errors.ImageReadError` / :class:`~crane.errors.DatasetError` naming the
file(s). With ``on_error="skip"`` it is logged and ``__getitem__`` returns ``None``; use
:func:`collate_skip_none` as the DataLoader's ``collate_fn`` to drop those entries.
Files that do not exist at all are detected up front: an error in "raise" mode, dropped
with one warning in "skip" mode.
"""

from __future__ import annotations

import copy
import logging
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset, default_collate

from crane.constants import DEFAULT_IMAGE_SIZE, OPENAI_CLIP_MEAN, OPENAI_CLIP_STD
from crane.data.handover import HandoverPool
from crane.data.imageio import open_image, open_mask_of
from crane.data.meta import (
    SPLITS,
    Meta,
    Sample,
    format_problem_list,
    read_meta,
    sample_missing_files,
)
from crane.data.transforms import (
    empty_mask,
    image_to_tensor,
    image_to_uint8,
    mask_to_tensor,
    read_jpeg_tensor,
    unresized_pixels,
)
from crane.errors import CraneError, DatasetError

logger = logging.getLogger(__name__)

ON_ERROR = ("raise", "skip")
PIXELS = ("float", "uint8")


class AnomalyDataset(Dataset):
    """Samples of one split of a meta.json dataset, preprocessed for the model.

    Each item is a dict:
      ``image``  float32 (3, S, S), CLIP-normalised (``pixels="uint8"``: the uint8 RGB pixels,
                 to be normalised on the device with :func:`~crane.data.transforms.normalize_uint8`,
                 which gives the identical float tensor);
      ``mask``   float32 (1, S, S) of 0/1, all zeros when the sample has no mask (``"uint8"``:
                 bool);
      ``label``  int, 0 normal / 1 anomalous;
      ``cls_name``, ``specie_name`` str;
      ``path``   str, the image path joined to the root; ``mask_path`` str ("" if none).

    Args:
        root: dataset root holding meta.json.
        split: "train" or "test".
        classes: keep only these classes (default: all, in meta.json order).
        image_size: S, the square model input size.
        on_error: "raise" or "skip" (see the module docstring).
        mean, std: normalisation (CLIP by default; ``None`` for [0, 1] pixels).
        meta: an already loaded index to use instead of reading ``<root>/meta.json``.
        pixels: "float" (normalised float32 images, 0/1 float masks) or "uint8" (uint8 images
            and bool masks: a quarter / an eighth of the bytes between worker processes and to
            the GPU; the consumer normalises with the CLIP statistics, so ``mean``/``std``
            must stay the default).
    """

    def __init__(
        self,
        root: str | os.PathLike[str],
        split: str = "test",
        classes: Iterable[str] | None = None,
        image_size: int = DEFAULT_IMAGE_SIZE,
        on_error: str = "raise",
        mean: Sequence[float] | None = OPENAI_CLIP_MEAN,
        std: Sequence[float] | None = OPENAI_CLIP_STD,
        meta: Meta | None = None,
        pixels: str = "float",
    ) -> None:
        if pixels not in PIXELS:
            raise DatasetError(f"pixels must be one of {', '.join(PIXELS)}, got {pixels!r}")
        if split not in SPLITS:
            raise DatasetError(f"split must be one of {', '.join(SPLITS)}, got {split!r}")
        if on_error not in ON_ERROR:
            raise DatasetError(f"on_error must be one of {', '.join(ON_ERROR)}, got {on_error!r}")
        if int(image_size) <= 0:
            raise DatasetError(f"image_size must be positive, got {image_size}")
        self.root = Path(root)
        self.split = split
        self.image_size = int(image_size)
        self.on_error = on_error
        self.mean, self.std = mean, std
        self.pixels = pixels
        self.jpeg_on_device = False  # see device_jpeg_view
        self.resize_on_device = False  # see device_resize_view
        self.handover: HandoverPool | None = None  # device_resize_view's worker buffers
        if pixels == "uint8" and not self.clip_normalised:
            raise DatasetError(
                "pixels='uint8' hands over raw pixels that the model side normalises with the "
                f"CLIP statistics; mean={mean}, std={std} cannot apply to them (use "
                "pixels='float' for another normalisation)"
            )
        if meta is None:
            meta = read_meta(self.root, check_files=False)
        by_class = meta.get(split, {})
        if classes is None:
            wanted = list(by_class)
        else:
            wanted = list(dict.fromkeys(classes))
            unknown = [c for c in wanted if c not in by_class]
            if unknown:
                raise DatasetError(
                    f"class(es) {', '.join(map(repr, unknown))} not in the {split} split of "
                    f"{self.root}; available: {', '.join(by_class) or '(none)'}"
                )
        samples = [s for cls in wanted for s in by_class[cls]]
        self.samples: list[Sample] = self._drop_missing(samples)
        self.class_names: list[str] = wanted

    @property
    def clip_normalised(self) -> bool:
        """Whether the float images carry the CLIP normalisation the models expect."""
        if self.mean is None or self.std is None:
            return False
        return (tuple(self.mean), tuple(self.std)) == (OPENAI_CLIP_MEAN, OPENAI_CLIP_STD)

    def uint8_view(self) -> AnomalyDataset:
        """The same samples as uint8 images and bool masks (a shallow copy; ``self`` is not
        changed). The consumer normalises with :func:`~crane.data.transforms.normalize_uint8`,
        which yields exactly the float images of a CLIP-normalised dataset."""
        if self.pixels == "uint8":
            return self
        if not self.clip_normalised:
            raise DatasetError(
                f"this dataset normalises with mean={self.mean}, std={self.std}; its uint8 view "
                "would be normalised with the CLIP statistics instead"
            )
        view = copy.copy(self)
        view.pixels = "uint8"
        return view

    def without_classes(self, names: Iterable[str]) -> AnomalyDataset:
        """The same dataset without the samples of ``names`` (a shallow copy)."""
        drop = set(names)
        view = copy.copy(self)
        view.samples = [s for s in self.samples if s.cls_name not in drop]
        view.class_names = [c for c in self.class_names if c not in drop]
        return view

    def device_jpeg_view(self) -> AnomalyDataset:
        """:meth:`uint8_view` whose JPEG images (those :func:`~crane.data.imageio.read_jpeg`
        takes) are handed over undecoded, as ``"jpeg"`` (their bytes, a 1-D uint8 tensor) in
        place of ``"image"``, for decoding on the GPU (see
        :func:`~crane.engine.predict.batch_pixels`); masks are decoded and checked as usual."""
        view = copy.copy(self.uint8_view())
        view.jpeg_on_device = True
        return view

    def device_resize_view(self) -> AnomalyDataset:
        """:meth:`uint8_view` (or this :meth:`device_jpeg_view`) whose decoded RGB and greyscale
        images larger than the model input are handed over unresized, as ``"raw"`` ((H, W, C)
        uint8, :func:`~crane.data.transforms.unresized_pixels`) in place of ``"image"``, for
        resizing on the GPU bit for bit as PIL would (see
        :func:`~crane.engine.predict.batch_pixels`); masks are decoded and resized as usual.

        The ``"raw"`` tensors live in buffers the workers reuse once the tensor is garbage-
        collected (:mod:`crane.data.handover`): copy or resize them while holding the tensor,
        and keep no ``.numpy()``, ``.detach()`` or ``.data`` of one past it."""
        view = copy.copy(self.uint8_view())
        view.resize_on_device = True
        view.handover = HandoverPool()  # buffers the workers refill (made before they start)
        return view

    def _drop_missing(self, samples: list[Sample]) -> list[Sample]:
        kept, missing = [], []
        for s in samples:
            absent = sample_missing_files(s, self.root)
            if absent:
                missing += [f"{s.cls_name}: {p!r} not found" for p in absent]
            else:
                kept.append(s)
        if missing:
            header = f"{self.split} split of {self.root}: files missing"
            if self.on_error == "raise":
                raise DatasetError(format_problem_list(header, missing))
            logger.warning(
                format_problem_list(
                    f"{header}; {len(samples) - len(kept)} sample(s) skipped", missing
                )
            )
        return kept

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> dict[str, Any] | None:
        if self.on_error == "raise":
            return self.load(index)
        try:
            return self.load(index)
        except CraneError as exc:
            logger.warning("skipping sample %d: %s", index, exc)
            return None

    def load(self, index: int) -> dict[str, Any]:
        """Load item ``index``, raising on any problem whatever ``on_error`` says."""
        s = self.samples[index]
        img_file = self.root / s.img_path
        mask_dtype = torch.bool if self.pixels == "uint8" else torch.float32
        jpeg = read_jpeg_tensor(img_file) if self.jpeg_on_device else None
        if jpeg is None:
            image = open_image(img_file)
            width, height = image.size
        else:
            height, width = jpeg[1]
        if s.mask_path:
            fg = open_mask_of(self.root / s.mask_path, img_file, height, width)
            mask = mask_to_tensor(fg, self.image_size, dtype=mask_dtype)
        else:
            mask = empty_mask(self.image_size, dtype=mask_dtype)
        raw = None
        if jpeg is None and self.resize_on_device:
            raw = unresized_pixels(image, self.image_size, self.handover)
        if jpeg is not None:
            payload = {"jpeg": jpeg[0]}
        elif raw is not None:
            payload = {"raw": raw}
        elif self.pixels == "uint8":
            payload = {"image": image_to_uint8(image, self.image_size)}
        else:
            payload = {"image": image_to_tensor(image, self.image_size, self.mean, self.std)}
        return {
            **payload,
            "mask": mask,
            "label": int(s.anomaly),
            "cls_name": s.cls_name,
            "specie_name": s.specie_name,
            "path": str(img_file),
            "mask_path": str(self.root / s.mask_path) if s.mask_path else "",
        }

    @staticmethod
    def collate_fn(batch: list[dict[str, Any] | None]) -> dict[str, Any] | None:
        """Same as :func:`collate_skip_none`."""
        return collate_skip_none(batch)


def collate_skip_none(batch: list[dict[str, Any] | None]) -> dict[str, Any] | None:
    """``default_collate`` after dropping ``None`` items; ``None`` if nothing is left.

    ``label`` becomes an int64 tensor, ``image``/``mask`` stacked tensors, strings lists.
    Items of a :meth:`AnomalyDataset.device_jpeg_view` may carry ``"jpeg"`` bytes, and those of
    a :meth:`AnomalyDataset.device_resize_view` ``"raw"`` unresized pixels, instead of an
    ``"image"``: then ``jpeg`` is a list of what the device finishes — JPEG bytes (1-D
    tensors), unresized pixels ((H, W, C) tensors), None for the images resized on the host —
    and ``image`` stacks those only, in order (None if there are none).
    """
    kept = [item for item in batch if item is not None]
    if not kept:
        return None
    if not any("jpeg" in item or "raw" in item for item in kept):
        return default_collate(kept)
    jpegs = [item.get("jpeg", item.get("raw")) for item in kept]
    rows = [item["image"] for item in kept if "image" in item]
    payloads = ("jpeg", "raw", "image")
    rest = [{k: v for k, v in item.items() if k not in payloads} for item in kept]
    out = default_collate(rest)
    out["image"] = torch.stack(rows) if rows else None
    out["jpeg"] = jpegs
    return out


def class_counts(dataset: AnomalyDataset) -> dict[str, tuple[int, int]]:
    """``{class: (normal, anomalous)}`` of a dataset's samples."""
    out: dict[str, list[int]] = {}
    for s in dataset.samples:
        out.setdefault(s.cls_name, [0, 0])[s.anomaly] += 1
    return {k: (v[0], v[1]) for k, v in out.items()}


__all__ = ["AnomalyDataset", "class_counts", "collate_skip_none"]
