"""Dataset opening shared by train / evaluate / calibrate."""

from __future__ import annotations

import logging
import os
from pathlib import Path

from crane.data import AnomalyDataset
from crane.data.layouts import prepare
from crane.data.meta import meta_path, read_meta
from crane.errors import DatasetError

log = logging.getLogger(__name__)


def open_dataset(
    root: str | os.PathLike,
    name: str | None = None,
    split: str = "test",
    image_size: int = 518,
    classes: list[str] | None = None,
    on_error: str = "raise",
) -> AnomalyDataset:
    """``root/meta.json`` when present (validated), else the layout ``name`` scanned in memory."""
    root = Path(root)
    if meta_path(root).is_file():
        meta = read_meta(
            root, check_files=False
        )  # AnomalyDataset reports missing files per on_error
    elif name:
        log.info("no meta.json in %s: scanning it as the %s layout", root, name)
        meta = prepare(name, root)
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
