"""Dataset opening shared by train / evaluate / calibrate."""

from __future__ import annotations

import logging
import os
from pathlib import Path

from crane.data import AnomalyDataset
from crane.data.layouts import get_layout, prepare
from crane.data.meta import meta_path, read_meta
from crane.errors import CraneError, DatasetError

log = logging.getLogger(__name__)


def open_dataset(
    root: str | os.PathLike,
    name: str | None = None,
    split: str = "test",
    image_size: int = 518,
    classes: list[str] | None = None,
    on_error: str = "raise",
    missing_mask: str = "error",
) -> AnomalyDataset:
    """``root/meta.json`` when present (validated), else the layout ``name`` scanned in memory
    (``missing_mask``: what the scan does with anomalous images without a mask, as
    :func:`~crane.data.layouts.prepare`; a meta.json holds the choice made when it was written)."""
    root = Path(root)
    layout = get_layout(name) if name else None  # (unknown: an error with a meta.json too)
    if meta_path(root).is_file():
        meta = read_meta(
            root, check_files=False
        )  # AnomalyDataset reports missing files per on_error
        if layout is not None:
            _check_layout_classes(meta, layout, root)
    elif name:
        log.info("no meta.json in %s: scanning it as the %s layout", root, name)
        meta = prepare(name, root, missing_mask=missing_mask)
    else:
        raise DatasetError(
            f"{root} has no meta.json; pass --dataset NAME to read its original layout "
            "(see `crane datasets list`) or run `crane datasets prepare NAME --root DIR`"
        )
    ds = AnomalyDataset(
        root, split=split, classes=classes, image_size=image_size, on_error=on_error, meta=meta
    )
    if len(ds) == 0:
        raise DatasetError(f"the {split} split of {root} is empty")
    return ds


def check_image_size(model: object, dataset: object) -> None:
    """Refuse a dataset that resizes its images to another size than the model takes (the
    model would raise on the first batch, after the loader started)."""
    want = model.cfg.image_size  # type: ignore[attr-defined]
    got = getattr(dataset, "image_size", None)
    if got is not None and got != want:
        raise CraneError(
            f"the dataset resizes images to {got} px but the model "
            f"({model.cfg.name}) takes {want} px: "  # type: ignore[attr-defined]
            f"open it with image_size=model.cfg.image_size ({want})"
        )


def _check_layout_classes(meta: dict, layout: object, root: Path) -> None:
    """A meta.json whose classes are none of ``layout``'s but all another known dataset's:
    that dataset, not the one ``--dataset`` names (which also picks the paper's prompts and
    settings for it: VisA evaluated as MVTec took the prompts trained on VisA, and the report
    said MVTec). Classes of no known dataset (a set of one's own, or the classes a layout
    keeps beside its list) pass."""
    from crane.data.layouts import list_layouts

    known = set(layout.classes)  # type: ignore[attr-defined]
    listed = {c for split in meta.values() for c in split}
    if not known or not listed or listed & known:
        return
    owners = [
        other.name
        for other in list_layouts()
        if other.name != layout.name and other.classes and listed <= set(other.classes)  # type: ignore[attr-defined]
    ]
    if owners:
        shown = ", ".join(sorted(listed)[:5]) + (", ..." if len(listed) > 5 else "")
        raise DatasetError(
            f"{meta_path(root)} indexes {' / '.join(owners)} classes ({shown}), none of the "
            f"{layout.name} dataset's: pass --dataset {owners[0]} (--dataset also picks the "
            "paper's prompts and settings for a dataset; see `crane datasets list`)"  # type: ignore[attr-defined]
        )
