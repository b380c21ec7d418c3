"""Helpers the command modules share."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from crane.errors import CraneError


def check_writable(folder: Path) -> None:
    """A CraneError now if ``folder`` cannot be created or written (not after the work). A
    folder that does not exist yet is not made here (a run that fails before writing leaves
    none behind): its nearest existing parent must be a writable folder."""
    import tempfile

    try:
        if folder.exists():
            with tempfile.TemporaryFile(dir=folder):
                pass
            return
        parent = folder.absolute().parent
        while not parent.exists():
            parent = parent.parent
        if not parent.is_dir():
            raise CraneError(f"cannot write to {folder}: {parent} is not a folder")
        if not os.access(parent, os.W_OK | os.X_OK):
            raise CraneError(f"cannot write to {folder}: no permission to create it in {parent}")
    except OSError as exc:
        raise CraneError(f"cannot write to {folder}: {exc}") from exc


def missing_mask_arg(
    p: argparse.ArgumentParser, default: str | None = "error", note: str = ""
) -> None:
    """``--missing-mask`` (what a layout scan does with anomalous images that have no mask)."""
    p.add_argument(
        "--missing-mask",
        choices=("error", "skip", "warn"),
        default=default,
        help="anomalous images without a mask: fail (default), leave out, or keep without mask "
        "(evaluation then counts them in the image metrics only; training leaves them out)" + note,
    )
