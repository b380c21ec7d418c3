"""Cold start on CPU: building the full-size backbones from local weight files, and one image
through the whole CLI, with the loading path before the 19th session ("baseline": random
initialisation, then the file read whole) and the current one ("current": parameters left
uninitialised for the strict load, plain torch files memory-mapped) alternating in one run.
For OpenAI's TorchScript archive a third mode, "jit", is the current code with the archive
opened by ``torch.jit.load`` as before the 26th session (``crane.models.torchscript`` now reads
it as data, memory-mapped); ``speedup_vs_jit`` compares the two.

Weight files are random full-size state dicts in the formats users have (speed does not
depend on the values): CLIP ViT-L/14-336 as the OpenAI TorchScript archive (fp16, the official
``ViT-L-14-336px.pt``), as a torch state dict and as safetensors (fp32); DINOv2-B/14-reg4 as a
torch state dict and as timm's safetensors. Each measurement runs in a fresh interpreter
(what a user's command pays); the files are in the page cache after the first round, or with
``--cold`` (root on Linux) the page cache is dropped before every measurement, as after a
reboot (the Python packages are then read from disk too).

``load`` rows: ``build_clip`` / ``build_dino`` alone, seconds inside the process (imports
excluded), the process's peak RSS and its peak anonymous memory (:class:`AnonPeak`).
``cli`` rows: ``crane predict`` on one 518×518 JPEG with Crane+ and the released MVTec
prompts on the CPU, wall seconds from interpreter start to exit (imports, model build, text
features, the image, the CSV and overlay).

  python benchmarks/startup.py --json results/startup.json
  python benchmarks/startup.py --weights-dir /tmp/w --rounds 5 --only cli
  sudo python benchmarks/startup.py --weights-dir /tmp/w --cold
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

MODES = ("baseline", "current")
#: For the TorchScript archive also "jit": the current code, but the archive opened with
#: ``torch.jit.load`` as before the 26th session's data-only reader (``baseline`` does too).
ARCHIVE_MODES = ("baseline", "jit", "current")
ARCHIVE = "torchscript fp16"
CLIP_FILES = {
    "torchscript fp16": "openai/ViT-L-14-336px.pt",
    "state dict fp32": "ViT-L-14-336px.pt",
    "safetensors fp32": "open_clip_model.safetensors",
}
DINO_FILES = {
    "state dict fp32": "dinov2_vitb14_reg4_pretrain.pth",
    "safetensors fp32": "model.safetensors",
}


def use_mode(mode: str) -> None:
    """Put this process's loading path in ``mode``: "baseline" undoes the two changes of the
    19th session (initialise, then read the whole file) and reads TorchScript archives with
    ``torch.jit.load``, as then; "jit" only the latter; "current" leaves the code as is."""
    if mode == "current":
        return
    import torch

    from crane.models import torchscript
    from crane.models import weights as W

    def jit_state_dict(path):
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            return dict(torch.jit.load(str(path), map_location="cpu").state_dict())

    torchscript.read_state_dict = jit_state_dict
    if mode == "jit":
        return
    W.no_random_init = contextlib.nullcontext
    W._torch_load = lambda path: torch.load(str(path), map_location="cpu", weights_only=True)


def make_weights(folder: Path) -> None:
    """Random full-size weight files in every format of CLIP_FILES / DINO_FILES (skipped where
    present)."""
    import open_clip
    import timm
    import torch
    from safetensors.torch import save_file

    def write(name: str, save) -> None:  # atomically: an interrupted run leaves no part file
        part = folder / (name + ".part")
        save(str(part))
        os.replace(part, folder / name)

    if not all((folder / f).exists() for f in (*CLIP_FILES.values(), *DINO_FILES.values())):
        print(f"writing random full-size weight files to {folder} ...", file=sys.stderr)
    (folder / "openai").mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    if not all((folder / f).exists() for f in CLIP_FILES.values()):
        clip = open_clip.create_model("ViT-L-14-336-quickgelu", pretrained=None).eval()
        sd = {k: v.contiguous() for k, v in clip.state_dict().items()}
        write(CLIP_FILES["state dict fp32"], lambda path: torch.save(sd, path))
        write(CLIP_FILES["safetensors fp32"], lambda path: save_file(sd, path))
        image = torch.randn(1, 3, 336, 336)
        text = open_clip.get_tokenizer("ViT-L-14-336-quickgelu")(["a"])
        with torch.no_grad():
            traced = torch.jit.trace(clip, (image, text), strict=False, check_trace=False)
        write(CLIP_FILES["torchscript fp16"], traced.half().save)  # as OpenAI ships it
        del clip, sd, traced
    if not all((folder / f).exists() for f in DINO_FILES.values()):
        dino = timm.create_model(
            "vit_base_patch14_reg4_dinov2", pretrained=False, img_size=518, num_classes=0
        )
        sd = {k: v.contiguous() for k, v in dino.state_dict().items()}
        write(DINO_FILES["state dict fp32"], lambda path: torch.save(sd, path))
        write(DINO_FILES["safetensors fp32"], lambda path: save_file(sd, path))


def make_image(folder: Path) -> Path:
    import numpy as np
    from PIL import Image

    path = folder / "one.jpg"
    if not path.exists():
        rng = np.random.default_rng(0)
        pixels = rng.integers(0, 256, (518, 518, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / "one.part.jpg")
        os.replace(folder / "one.part.jpg", path)
    return path


#: --cold: empty the page cache before each measured child (Linux, root).
COLD = False


def drop_page_cache() -> None:
    """Write dirty pages back, then drop the clean page cache (as after a reboot)."""
    os.sync()
    try:
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
    except OSError as exc:
        raise SystemExit(f"--cold needs root on Linux (/proc/sys/vm/drop_caches: {exc})") from exc


def run_child(args: list[str]) -> tuple[float, dict]:
    """Run this script as a fresh interpreter; (wall s, the JSON line it printed last)."""
    if COLD and args[0] != "weights":
        drop_page_cache()
    start = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, __file__, "--child", *args],
        capture_output=True,
        text=True,
        env={**os.environ, "CRANE_OFFLINE": "1"},
    )
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise RuntimeError(f"child {args} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return wall, json.loads(proc.stdout.strip().splitlines()[-1])


def status_mb(field: str) -> float | None:
    """A memory figure of this process from /proc/self/status (Linux), in MB."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


class AnonPeak:
    """The largest anonymous resident memory (RssAnon) seen by polling every few ms: the
    memory a process needs for itself. VmHWM (peak RSS; getrusage's ru_maxrss would carry
    the parent's over the exec) also counts the pages of memory-mapped weight files, which
    the kernel can drop under pressure without writing anything back."""

    def __init__(self, every_s: float = 0.005):
        self.peak = status_mb("RssAnon")
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, args=(every_s,), daemon=True)

    def _poll(self, every_s: float) -> None:
        while not self._stop.wait(every_s):
            now = status_mb("RssAnon")
            if now is not None and (self.peak is None or now > self.peak):
                self.peak = now

    def __enter__(self) -> AnonPeak:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def child(argv: list[str]) -> int:
    """In a fresh interpreter: ``weights FOLDER``, ``load MODE clip|dino FILE`` or
    ``cli MODE CRANE-ARGS...``."""
    kind, mode, *rest = argv
    if kind == "weights":
        make_weights(Path(mode))
        print("{}")
        return 0
    use_mode(mode)
    result: dict = {}
    # Polling every 5 ms took ≈ 10 % off the CLI's image on 2 cores; 50 ms still sees the
    # CLI's plateaus.
    with AnonPeak(0.005 if kind == "load" else 0.05) as anon:
        if kind == "load":
            from crane.config import get_config
            from crane.models.backbones import build_clip, build_dino

            what, path = rest
            cfg = get_config("crane+")
            start = time.perf_counter()
            if what == "clip":
                build_clip(cfg, path)
            else:
                build_dino(cfg, path)
            result["s"] = time.perf_counter() - start
        else:
            from crane.cli import main

            with contextlib.redirect_stdout(sys.stderr):
                code = main(rest)
            if code:
                return code
    result["peak_rss_mb"] = status_mb("VmHWM")
    result["peak_anon_mb"] = anon.peak
    print(json.dumps(result))
    return 0


def bench_load(folder: Path, rounds: int) -> list[dict]:
    jobs = [("clip", fmt, folder / f) for fmt, f in CLIP_FILES.items()]
    jobs += [("dino", fmt, folder / f) for fmt, f in DINO_FILES.items()]
    rows = []
    for what, fmt, path in jobs:
        modes = ARCHIVE_MODES if fmt == ARCHIVE else MODES
        got: dict[str, list[dict]] = {m: [] for m in modes}
        for _ in range(rounds):
            for mode in modes:  # alternating: drift slows all alike
                got[mode].append(run_child(["load", mode, what, str(path)])[1])
        row = {"backbone": {"clip": "CLIP ViT-L/14-336", "dino": "DINOv2-B/14-reg4"}[what]}
        row["file"] = f"{fmt} ({path.stat().st_size / 2**20:.0f} MiB)"
        rows.append(summarise(row, got, "s"))
    return rows


def summarise(row: dict, got: dict[str, list[dict]], unit: str) -> dict:
    """Medians of each mode's seconds and memory into ``row``, and the speed-up; printed."""
    for mode in got:
        row[f"{mode}_{unit}"] = statistics.median(r["s"] for r in got[mode])
        for key in ("peak_rss_mb", "peak_anon_mb"):
            values = [r[key] for r in got[mode] if r.get(key) is not None]
            row[f"{mode}_{key}"] = statistics.median(values) if values else None
        row[f"{mode}_all_s"] = [round(r["s"], 3) for r in got[mode]]
    row["speedup"] = row[f"baseline_{unit}"] / row[f"current_{unit}"]
    if "jit" in got:
        row["speedup_vs_jit"] = row[f"jit_{unit}"] / row[f"current_{unit}"]
    print(json.dumps(row), flush=True)
    return row


def bench_cli(folder: Path, rounds: int) -> list[dict]:
    image = make_image(folder)
    rows = []
    for fmt in (ARCHIVE, "state dict fp32"):
        modes = ARCHIVE_MODES if fmt == ARCHIVE else MODES
        got: dict[str, list[dict]] = {m: [] for m in modes}
        for _ in range(rounds):
            for mode in modes:
                with tempfile.TemporaryDirectory() as out_dir:
                    argv = ["predict", str(image), "--device", "cpu", "--model", "crane+"]
                    argv += ["--prompts", "official:mvtec", "--out", out_dir, "--no-progress"]
                    argv += ["--clip-weights", str(folder / CLIP_FILES[fmt])]
                    argv += ["--dino-weights", str(folder / DINO_FILES["state dict fp32"])]
                    wall, r = run_child(["cli", mode, *argv])
                    got[mode].append({**r, "s": wall})
        rows.append(summarise({"CLIP file": fmt}, got, "wall_s"))
    return rows


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "--child":
        return child(argv[1:])
    from throughput import host, save, table  # same folder; not in the children, whose
    # imports are part of what the CLI rows time

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--weights-dir", default=None, help="reuse/keep the weight files here")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--only", choices=("load", "cli"), default=None)
    ap.add_argument(
        "--cold",
        action="store_true",
        help="drop the page cache before each measurement (Linux, root): weight files and "
        "Python packages read from disk, as in a first run after a reboot",
    )
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    global COLD
    COLD = args.cold
    with contextlib.ExitStack() as stack:
        if args.weights_dir:
            folder = Path(args.weights_dir)
        else:
            folder = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="crane-startup-")))
        run_child(["weights", str(folder)])  # its 3 GB of models leave with the child
        results: dict = {"host": host(), "rounds": args.rounds, "cold": args.cold}
        results |= {"load": [], "cli": []}
        if args.only in (None, "load"):
            results["load"] = bench_load(folder, args.rounds)
            save(results, args.json)
        if args.only in (None, "cli"):
            results["cli"] = bench_cli(folder, args.rounds)
            save(results, args.json)
    memory = [f"{m}_{k}" for k in ("peak_rss_mb", "peak_anon_mb") for m in ARCHIVE_MODES]
    load_cols = ["backbone", "file", "baseline_s", "jit_s", "current_s", "speedup"]
    load_cols.append("speedup_vs_jit")
    table(results["load"], [*load_cols, *memory])
    cli_cols = ["CLIP file", "baseline_wall_s", "jit_wall_s", "current_wall_s", "speedup"]
    cli_cols.append("speedup_vs_jit")
    table(results["cli"], [*cli_cols, *memory])
    return 0


if __name__ == "__main__":
    sys.exit(main())
