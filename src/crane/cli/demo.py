"""``crane demo``: the offline end-to-end tour on synthetic data."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "demo", help="offline end-to-end run on synthetic data (tiny model, CPU-friendly)"
    )
    p.add_argument("--out", default="crane-demo", help="default ./crane-demo")
    p.add_argument("--epochs", type=int, default=15, help="default 15")
    p.add_argument("--preset", default="tiny", choices=["tiny", "tiny+"], help="default tiny")
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--device", default="cpu", help="default cpu")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=cmd_demo)


def cmd_demo(args: argparse.Namespace) -> int:
    from pathlib import Path

    from crane.cli.common import check_writable
    from crane.engine.demo import run_demo
    from crane.engine.runtime import pick_device

    check_writable(Path(args.out))
    res = run_demo(
        args.out,
        preset=args.preset,
        epochs=args.epochs,
        device=pick_device(args.device),
        overwrite=args.overwrite,
        progress=not args.no_progress,
    )
    before, after = res["before_training"], res["after_training"]
    print(
        f"pixel AUROC {before['pixel_auroc']:.3f} -> {after['pixel_auroc']:.3f}, "
        f"image AUROC {before['image_auroc']:.3f} -> {after['image_auroc']:.3f} "
        f"(untrained -> trained prompts) in {res['seconds']:.0f}s"
    )
    print(f"report: {args.out}/report.html")
    return 0
