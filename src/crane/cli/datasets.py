"""``crane datasets``: list supported layouts, prepare/check meta.json, make synthetic data."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from crane.cli.common import check_writable, missing_mask_arg
from crane.errors import CraneError, DatasetError

logger = logging.getLogger(__name__)


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``datasets`` command and its actions to the root parser."""
    parser = subparsers.add_parser(
        "datasets",
        help="prepare, check and generate datasets (meta.json)",
        description="Prepare, check and generate datasets indexed by meta.json.",
    )
    actions = parser.add_subparsers(dest="datasets_command", metavar="ACTION")
    actions.required = True

    p = actions.add_parser("list", help="show the supported datasets and their expected layout")
    p.set_defaults(func=cmd_list)

    p = actions.add_parser(
        "prepare",
        help="write meta.json for a dataset in its original download layout",
        description="Scan a dataset in its original layout and write <root>/meta.json.",
    )
    p.add_argument("name", help="dataset name (see `crane datasets list`)")
    p.add_argument("--root", required=True, help="dataset root folder")
    p.add_argument("--overwrite", action="store_true", help="replace an existing meta.json")
    missing_mask_arg(p)
    p.set_defaults(func=cmd_prepare)

    p = actions.add_parser("check", help="validate an existing meta.json and print counts")
    p.add_argument("--root", required=True, help="dataset root folder holding meta.json")
    p.add_argument(
        "--deep",
        action="store_true",
        help="also decode every image and mask (slow): corrupt or truncated files and masks "
        "of another size than their image are found now, not midway through a run",
    )
    p.add_argument(
        "--threads", type=int, default=4, help="files decoded at once with --deep (default 4)"
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_check)

    p = actions.add_parser(
        "synth",
        help="write a small synthetic dataset (MVTec layout + meta.json)",
        description="Write a deterministic synthetic anomaly dataset for demos and tests.",
    )
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--classes",
        default="tile,fabric,plate",
        help="comma-separated texture classes (tile, fabric, plate, wood, mesh)",
    )
    p.add_argument("--n-train", type=int, default=10, help="normal training images per class")
    p.add_argument("--n-test-good", type=int, default=8, help="normal test images per class")
    p.add_argument("--n-test-bad", type=int, default=12, help="anomalous test images per class")
    p.add_argument("--size", type=int, default=256, help="image side in pixels")
    p.add_argument("--overwrite", action="store_true", help="replace existing output")
    p.add_argument(
        "--workers", type=int, default=0, help="processes writing files (same files either way)"
    )
    p.set_defaults(func=cmd_synth)


def cmd_list(args: argparse.Namespace) -> int:
    from crane.data.layouts import list_layouts

    for layout in list_layouts():
        print(f"{layout.name}: {layout.title}")
        if layout.classes:
            print(f"  classes: {', '.join(layout.classes)}")
        print(layout.layout)
        print()
    return 0


def cmd_prepare(args: argparse.Namespace) -> int:
    from crane.data.layouts import get_layout, prepare
    from crane.data.meta import format_summary, meta_path, write_meta

    get_layout(args.name)  # an unknown name is the first thing to say
    if meta_path(args.root).exists() and not args.overwrite:
        # Fail before a possibly long scan.
        raise DatasetError(f"{meta_path(args.root)} already exists; pass --overwrite to replace it")
    meta = prepare(args.name, args.root, missing_mask=args.missing_mask)
    path = write_meta(args.root, meta, overwrite=args.overwrite)
    print(format_summary(meta))
    print(f"wrote {path}")
    return 0


def cmd_check(args: argparse.Namespace) -> int:
    from crane.data.meta import (
        format_problem_list,
        format_summary,
        meta_path,
        read_meta,
        unreadable_files,
    )

    if args.threads < 1:
        raise CraneError(f"--threads must be >= 1, got {args.threads}")
    meta = read_meta(args.root)
    print(format_summary(meta))
    if not any(samples for split in meta.values() for samples in split.values()):
        print(f"{meta_path(args.root)}: indexes no image (evaluate and train refuse it)",
              file=sys.stderr)  # fmt: skip
        return 1
    if args.deep:
        bad = unreadable_files(meta, args.root, threads=args.threads, progress=not args.no_progress)
        if bad:
            header = f"{meta_path(args.root)}: files that cannot be used"
            print(format_problem_list(header, bad, limit=50), file=sys.stderr)
            return 1
    print(f"{meta_path(args.root)}: OK" + (" (every file decoded)" if args.deep else ""))
    return 0


def cmd_synth(args: argparse.Namespace) -> int:
    from crane.data.meta import format_summary, meta_path
    from crane.data.synth import make_synthetic_dataset

    classes = [c.strip() for c in args.classes.split(",") if c.strip()]
    check_writable(Path(args.out))
    meta = make_synthetic_dataset(
        args.out,
        seed=args.seed,
        classes=classes,
        n_train=args.n_train,
        n_test_good=args.n_test_good,
        n_test_bad=args.n_test_bad,
        size=args.size,
        overwrite=args.overwrite,
        workers=args.workers,
    )
    print(format_summary(meta))
    print(f"wrote {meta_path(args.out)}")
    return 0
