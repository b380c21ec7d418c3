"""Datasets: meta.json index, original-layout scanners, preprocessing, synthetic data.

The torch-dependent names (:class:`AnomalyDataset`, the tensor transforms) are imported
on first use, so ``crane datasets ...`` and other torch-free callers stay fast.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from crane.data.imageio import (
    IMAGE_EXTENSIONS,
    binarize_mask,
    load_image,
    normalize_mode,
    open_image,
    open_mask,
    reference_mode,
)
from crane.data.layouts import (
    MISSING_MASK_POLICIES,
    Layout,
    get_layout,
    list_layouts,
    prepare,
    register_layout,
)
from crane.data.meta import (
    META_FILENAME,
    SPLITS,
    ClassCounts,
    Meta,
    Sample,
    count_samples,
    dumps_meta,
    format_summary,
    iter_samples,
    meta_from_json,
    meta_to_json,
    new_meta,
    read_meta,
    validate_meta,
    write_meta,
)
from crane.data.synth import DEFECTS, TEXTURES, make_synthetic_dataset, synth_sample

if TYPE_CHECKING:
    from crane.data.dataset import AnomalyDataset, collate_skip_none
    from crane.data.transforms import (
        empty_mask,
        image_to_tensor,
        image_to_uint8,
        mask_to_tensor,
        normalize_uint8,
        read_image_tensor,
        renormalize,
    )

_LAZY = {
    "AnomalyDataset": "crane.data.dataset",
    "collate_skip_none": "crane.data.dataset",
    "empty_mask": "crane.data.transforms",
    "image_to_tensor": "crane.data.transforms",
    "image_to_uint8": "crane.data.transforms",
    "normalize_uint8": "crane.data.transforms",
    "mask_to_tensor": "crane.data.transforms",
    "read_image_tensor": "crane.data.transforms",
    "renormalize": "crane.data.transforms",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "DEFECTS",
    "IMAGE_EXTENSIONS",
    "META_FILENAME",
    "MISSING_MASK_POLICIES",
    "SPLITS",
    "TEXTURES",
    "AnomalyDataset",
    "ClassCounts",
    "Layout",
    "Meta",
    "Sample",
    "binarize_mask",
    "collate_skip_none",
    "count_samples",
    "dumps_meta",
    "empty_mask",
    "format_summary",
    "get_layout",
    "image_to_tensor",
    "image_to_uint8",
    "iter_samples",
    "list_layouts",
    "load_image",
    "make_synthetic_dataset",
    "mask_to_tensor",
    "meta_from_json",
    "meta_to_json",
    "new_meta",
    "normalize_mode",
    "reference_mode",
    "normalize_uint8",
    "open_image",
    "open_mask",
    "prepare",
    "read_image_tensor",
    "read_meta",
    "register_layout",
    "renormalize",
    "synth_sample",
    "validate_meta",
    "write_meta",
]
