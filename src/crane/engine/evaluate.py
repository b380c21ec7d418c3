"""Streaming evaluation: batches go from the model straight into the metric accumulator."""

from __future__ import annotations

import contextlib
import copy
import csv
import io
import json
import logging
import math
import os
import time
from collections import Counter
from dataclasses import dataclass, field
from decimal import ROUND_CEILING, Decimal
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from crane.data import AnomalyDataset
from crane.engine import progress as progress_log
from crane.engine.common import check_image_size
from crane.engine.predict import _output_names, check_device_decode, dataset_device_pixels
from crane.engine.runtime import (
    autocast,
    batch_loader,
    model_input,
    nan_score_message,
    pick_device,
    scoring_forward,
)
from crane.engine.writer import OutputWriter
from crane.errors import CraneError
from crane.files import fit_file_name, utf8_strings, utf8_text
from crane.metrics import DEFAULT_NUM_BINS, METRICS, MetricAccumulator, MetricsReport, make_report
from crane.models.checkpoint import atomic_write_bytes
from crane.models.crane import CraneModel
from crane.viz import write_overlay

log = logging.getLogger(__name__)

#: SPEC §7 per-dataset protocol of the published tables: (prompts trained on, crane+ map combine).
MEDICAL = ("headct", "brainmri", "br35h", "isic", "tn3k", "cvc-colondb", "cvc-clinicdb")


def paper_protocol(dataset: str, preset: str) -> dict[str, str]:
    """Which released prompts and map combination reproduce Table 1 for ``dataset`` (a
    layout name as ``--dataset`` takes it: any case, ``_`` for ``-``)."""
    from crane.data.layouts import get_layout

    try:
        dataset = get_layout(dataset).name
    except CraneError:  # (not a layout: a meta.json dataset's own name)
        dataset = dataset.strip().lower()
    plus = preset.rstrip("+") != preset
    if dataset == "mvtec":
        trained_on = "visa"
    elif plus and dataset in MEDICAL:
        trained_on = "mvtec-medical"
    else:
        trained_on = "mvtec"
    if not plus:
        combine = "soft_mean"
    else:
        combine = "soft_mean" if dataset in MEDICAL or dataset == "dagm" else "logit_mean"
    return {"prompts": f"official:{trained_on}", "map_combine": combine}


#: What :attr:`EvalResult.timings` splits the main thread's wall time into.
TIMINGS = {
    "loader": "starting the loader and waiting for its next batch",
    "launch": "moving a batch to the device and queueing its forward (on the CPU: the forward)",
    "wait": "waiting for a batch's outputs (on CUDA: model time not hidden behind the rest)",
    "metrics": "metric updates",
    "finalize": "computing the metrics of each finished class, and the report",
    "outputs": "overlays: maps copied to the host, jobs queued, and the writers' backlog",
}


_END = object()  # the loader's end


@dataclass
class EvalResult:
    report: MetricsReport
    n_images: int
    seconds: float
    #: Wall seconds of the main thread per activity (keys and meanings: :data:`TIMINGS`);
    #: they add up to ``seconds`` but for setup and progress-bar time.
    timings: dict[str, float] = field(default_factory=dict)
    #: Images of the classes taken from an interrupted run's progress file (``resume``).
    n_resumed: int = 0
    #: Classes none of whose images could be read (skipped): not in the report or its mean.
    unread_classes: list[str] = field(default_factory=list)


def evaluate(
    model: CraneModel,
    dataset: AnomalyDataset,
    *,
    device: torch.device | str | None = None,
    amp_dtype: torch.dtype | None = None,
    batch_size: int = 8,
    workers: int = 0,
    aupro: str = "mvtec",
    metric_mode: str = "exact",
    num_bins: int = DEFAULT_NUM_BINS,
    visualize_dir: str | os.PathLike | None = None,
    progress: bool = True,
    uint8_inputs: bool = True,
    compile: bool | str = False,
    write_threads: int | None = None,
    attention: str = "auto",
    device_decode: bool = False,
    device_resize: bool = False,
    progress_file: str | os.PathLike | None = None,
    resume: bool = False,
) -> EvalResult:
    """Run ``model`` over ``dataset`` and accumulate the six SPEC §9 metrics per class.

    ``device``: a torch device or its name (default: CUDA if present, else the CPU).

    ``num_bins``: histogram bins per class with ``metric_mode="binned"`` (a power of two; more
    bins, tighter bounds: 24 B of memory per bin and class).
    ``uint8_inputs``: workers hand over uint8 pixels and bool masks (a quarter / an eighth of
    the float bytes), normalised on the device: bitwise the same model inputs. It applies to
    a float dataset with the CLIP normalisation (the default); other datasets run as given.
    ``compile``: ``torch.compile`` the model (a string picks the mode). ``attention``: the
    fused attention kernel tried first (:func:`~crane.engine.runtime.attention_kernels`).
    ``visualize_dir``: overlays written there by ``write_threads`` threads beside the loop
    (default: the CPU count, at most 8; 0 = in the loop), see
    :class:`~crane.engine.writer.OutputWriter`. ``device_decode``: JPEG images are read by the
    workers and decoded on ``device`` (nvJPEG on CUDA), resized there as PIL does, as
    ``Detector(device_decode=True)`` does; masks and other images are decoded on the CPU.
    ``device_resize``: large RGB and greyscale images are decoded by the workers and resized
    on ``device`` bit for bit as PIL would (the reference inputs exactly), as
    ``Detector(device_resize=True)`` does.
    A JPEG no decoder reads is skipped or raises as the dataset's ``on_error`` says.

    On CUDA, batch k's metric update (which needs the host: region labelling, validation)
    runs on a side stream while batch k+1's forward is already queued on the main one.

    ``progress_file``: (a run without ``resume`` starts it anew) each class's metrics are
    recorded there as soon as the class is done
    and its overlays are written (``crane evaluate`` uses ``<out>/progress.jsonl`` and
    removes it once the metrics files are written). ``resume=True`` reads it back and
    evaluates only the classes it does not hold (nor those whose overlays are missing),
    refusing one written with another model, dataset or metric settings; the report then
    covers every class. A stopped run thus loses
    at most the class it was in.
    """
    device = pick_device(device)
    check_image_size(model, dataset)
    has_masks = any(s.mask_path for s in dataset.samples if s.anomaly)
    unmasked = sum(1 for s in dataset.samples if s.anomaly and not s.has_mask)
    if has_masks and unmasked:  # (kept by missing_mask="warn")
        log.warning(
            "%d anomalous images have no mask: they count in the image metrics only (an empty "
            "mask would mark their defects normal in the pixel metrics)",
            unmasked,
        )
    acc = MetricAccumulator(aupro=aupro, mode=metric_mode, num_bins=num_bins)
    if device_decode:
        check_device_decode(device)
    if resume and progress_file is None:
        raise CraneError("resume=True needs the progress_file of the run to continue")
    names = _overlay_names(dataset) if visualize_dir is not None else {}
    full, done, settings = dataset, {}, None
    if progress_file is not None:
        path = Path(progress_file)
        settings = {
            **progress_log.model_settings(model, amp_dtype),
            "aupro": aupro,
            "metric_mode": metric_mode,
            "num_bins": num_bins if metric_mode == "binned" else None,
            "device_decode": device_decode,
            "device_resize": device_resize,
            "visualize": None if visualize_dir is None else os.path.abspath(visualize_dir),
            # (the batches: a resume rebuilds the one it starts in, see _lead_in)
            "batch_size": batch_size,
            "attention": attention,
            "compile": compile,
            "samples_sha256": progress_log.digest_of(
                f"{s.cls_name}\t{s.anomaly}\t{os.path.abspath(dataset.root / s.img_path)}\t"
                f"{s.mask_path}"
                for s in dataset.samples
            ),
        }
        if resume and not path.is_file():
            raise CraneError(f"{path} does not exist: no interrupted evaluation to resume")
        if resume:
            keys = ("class", "n_images", "values", "bounds", "overlays")
            for r in progress_log.read_progress(path, "evaluate", settings, keys):
                folder = Path(visualize_dir or ".")
                if all((folder / f).is_file() for f in r["overlays"]):  # (none deleted since)
                    done[r["class"]] = r
            log.info(
                "resuming: %d of %d classes already evaluated (%s)",
                len(done),
                len({s.cls_name for s in dataset.samples}),
                ", ".join(done) or "none",
            )
            rest = dataset.without_classes(done)
            lead = (  # (every class done: only the report is rebuilt)
                _lead_in(dataset, done, batch_size, model.cfg.dattn_threshold_scope, device_decode)
                if rest.samples
                else []
            )
            dataset = copy.copy(rest)
            dataset.samples = lead + rest.samples
    loader = batch_loader(
        dataset,
        batch_size,
        workers,
        device,
        uint8=uint8_inputs,
        device_jpeg=device_decode,
        device_resize=device_resize,
    )
    size = model.cfg.image_size
    on_error = getattr(dataset, "on_error", "raise")
    model.to(device).eval()
    forward = scoring_forward(model, device, compile, attention)
    side = torch.cuda.Stream(device) if device.type == "cuda" else None
    # Finalise each class once all its images are in, so the exact accumulator only ever holds
    # one class's pixels (the dataset lists samples class by class: once a later class's
    # images arrive, an earlier one is complete, also when some of its images were unreadable
    # and skipped).
    remaining = Counter(s.cls_name for s in dataset.samples)
    class_order = list(remaining)
    if not _class_by_class(dataset):  # (a dataset that interleaves classes: no early finalising)
        class_order = []
    n = 0
    timings = dict.fromkeys(TIMINGS, 0.0)
    clock = time.perf_counter

    def timed(key: str, t0: float) -> float:
        """Adds the time since ``t0`` to ``key``; returns now."""
        now = clock()
        timings[key] += now - t0
        return now

    def launch(batch: dict[str, Any]) -> _Job | None:
        slots.update(batch["cls_name"])  # (before the device decode may drop some)
        images = batch["image"]
        if "jpeg" in batch:
            batch, images = dataset_device_pixels(batch, size, device, on_error)
            if images is None:
                return None
        with autocast(device, amp_dtype):
            job = _Job(batch, *forward(model_input(images, device)))
        if side is not None:
            job.done = torch.cuda.Event()
            job.done.record(torch.cuda.current_stream(device))  # this device's, not cuda:0's
        return job

    def consume(job: _Job) -> None:
        if done and job.batch["cls_name"][0] in done:  # a resume's lead-in: the first rows
            k = sum(c in done for c in job.batch["cls_name"])
            if k == len(job.batch["cls_name"]):
                return
            job = _without_first_rows(job, k)
        batch = job.batch
        t = clock()
        with torch.cuda.stream(side) if side is not None else contextlib.nullcontext():
            if side is not None:
                side.wait_event(job.done)
            nan = bool(torch.isnan(job.scores).any())  # syncs this stream only: batch done
            t = timed("wait", t)
            if nan:
                scores = job.scores.tolist()
                bad = [p for p, v in zip(batch["path"], scores, strict=True) if math.isnan(v)]
                raise CraneError(
                    f"{nan_score_message(model.cfg, amp_dtype)}; first image: {bad[0]}, "
                    f"{len(bad)} in this batch. Metrics over NaN scores would be meaningless."
                )
            if has_masks:
                # Masks stay on the host: region labelling needs them there.
                masks = batch["mask"][:, 0]
                known = [
                    bool(m) or not int(y)
                    for m, y in zip(batch["mask_path"], batch["label"], strict=True)
                ]
                if all(known):
                    acc.update(batch["cls_name"], job.scores, batch["label"], job.maps, masks)
                else:  # pixel metrics only where the pixels' ground truth is known
                    acc.update(batch["cls_name"], job.scores, batch["label"])
                    keep = [j for j, k in enumerate(known) if k]
                    if keep:
                        rows = torch.tensor(keep)
                        acc.update(
                            [batch["cls_name"][j] for j in keep],
                            None,
                            batch["label"][rows],
                            job.maps[rows.to(job.maps.device)],
                            masks[rows],
                        )
            else:
                acc.update(batch["cls_name"], job.scores, batch["label"])
            t = timed("metrics", t)
            if visualize_dir is not None:
                maps = job.maps.cpu().numpy()
                for cls, name, write in _visualize(writer, Path(visualize_dir), batch, maps, names):
                    overlays.setdefault(cls, []).append((name, write))
                t = timed("outputs", t)
            for cls in batch["cls_name"]:
                remaining[cls] -= 1
                seen[cls] += 1
                for earlier in class_order[: class_order.index(cls)] if class_order else ():
                    finish(earlier)  # (its unread images were skipped; maybe all of them)
                if remaining[cls] == 0:
                    finish(cls)
            t = timed("finalize", t)
        if side is not None:
            # Everything that read this batch's outputs is done before they are freed.
            side.synchronize()
            timed("metrics", t)

    def finish(cls: str) -> None:
        """Finalise ``cls`` (once) and record it once its overlays are written."""
        if cls in finished or cls in done:  # (done: a resume's lead-in class)
            return
        finished.add(cls)
        if not seen[cls]:  # none of its images could be read: no metrics, as in the report,
            if record is not None:  # but recorded, with its places in the batches (_lead_in)
                record.add({"class": cls, "n_images": 0, "slots": slots[cls], "values": None,
                            "bounds": None, "overlays": []}, [])  # fmt: skip
            return
        acc.finalize_class(cls)
        if record is not None:
            values, bounds = acc.class_result(cls)
            written = overlays.pop(cls, [])
            entry = {
                "class": cls,
                "n_images": seen[cls],
                "values": values,
                "bounds": bounds,
                "overlays": [name for name, _ in written],
                "slots": slots[cls],  # (its places in the batches: see _lead_in)
            }
            record.add(entry, [write for _, write in written])

    t0 = time.perf_counter()
    pending: _Job | None = None
    writer = OutputWriter(write_threads if visualize_dir is not None else 0)
    seen: Counter[str] = Counter()
    slots: Counter[str] = Counter()  # images per class the loader delivered
    finished: set[str] = set()
    overlays: dict[str, list] = {}  # per class: (file under visualize_dir, its write)
    file, record = None, None
    if settings is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        file = progress_log.open_progress(path, "evaluate", settings, done.values())
        if resume and visualize_dir is not None:  # (once the lock is held: not a live run's)
            progress_log.remove_partial_writes(Path(visualize_dir).glob("*/"))
        record = progress_log.Recorder(file)
    with torch.no_grad(), file if file is not None else contextlib.nullcontext():
        try:
            with writer:
                t = clock()  # starting the loader's workers counts as waiting for it
                batches = iter(tqdm(loader, desc="evaluate", unit="batch", disable=not progress))
                if not dataset.samples:  # (a resumed run whose every class was done)
                    batches = iter(())
                timed("loader", t)
                while True:
                    t = clock()
                    batch = next(batches, _END)
                    t = timed("loader", t)
                    if batch is _END:
                        break
                    if batch is None:  # every sample of the batch was unreadable and skipped
                        continue
                    job = launch(batch)
                    timed("launch", t)
                    if job is None:  # every image of the batch was skipped
                        continue
                    n += sum(c not in done for c in job.batch["cls_name"])
                    if pending is not None:
                        consume(pending)
                    pending = job
                if pending is not None:
                    consume(pending)
                for cls in remaining:  # (the last ones may have lost images to skipping)
                    finish(cls)
                t = clock()
        except BaseException:  # Ctrl-C, a crash: the classes recorded stay
            loader.close()  # (its forked workers would hold the progress file's lock)
            if record is not None:
                record.flush()  # (the writer has finished every overlay it took)
                log.warning(
                    "stopped; %d of %d classes are recorded in %s, and `crane evaluate ... "
                    "--resume` (API: resume=True) evaluates the others",
                    len(done) + record.appended,
                    len({s.cls_name for s in full.samples}),
                    progress_file,
                )
            raise
        t = timed("outputs", t)  # the writers' backlog, waited for on leaving the block
        if record is not None:
            record.flush()
        report = acc.compute()
        if done:
            report = _with_resumed(report, full, done)
        timed("finalize", t)
    resumed = sum(r["n_images"] for r in done.values())
    classes = dict.fromkeys(s.cls_name for s in full.samples)
    unread = [c for c in classes if c not in report.per_class]
    if unread:
        log.warning(
            "no image of %s could be read: left out of the report and its mean",
            ", ".join(unread),
        )
    return EvalResult(report, n, clock() - t0, timings, n_resumed=resumed, unread_classes=unread)


def _lead_in(
    dataset, done: dict[str, dict], batch_size: int, scope: str, device_decode: bool = False
) -> list:
    """The samples of finished classes that shared the resumed run's first batch in the run
    that stopped, to be run again (and their results dropped) so that every batch holds
    the images it held then: D-Attn's batch-wide threshold (``scope="batch"``) depends on
    them, and the default per-image results on a CPU in their last bits.

    Batches are full runs of ``batch_size`` readable images in dataset order, so the first
    batch after the finished classes began with their last ``(sum of their images) mod
    batch_size`` images, when those classes come first and were all readable. Otherwise the
    batching cannot be rebuilt: an error under ``scope="batch"``, else no lead-in."""
    order = list(dict.fromkeys(s.cls_name for s in dataset.samples))
    count = Counter(s.cls_name for s in dataset.samples)
    prefix = order[: len(done)]
    # Places in the batches: images the loader delivered, a JPEG the device decode could not
    # read included (it is dropped after batching); older records: the images evaluated.
    places = {c: done[c].get("slots", done[c]["n_images"]) for c in done}
    r = sum(places.values()) % batch_size
    taken, need = [], r
    for c in reversed(prefix):
        if not need:
            break
        taken.append(c)
        need -= min(need, count[c])
    exact = (
        # (records written before "slots": with the device decode their images may have
        # dropped JPEGs that held places, which only "slots" counts)
        not (device_decode and any("slots" not in done[c] for c in done))
        and _class_by_class(dataset)
        and set(prefix) == set(done)
        and all(places[c] == count[c] for c in taken)
    )
    if not exact:
        if scope == "batch":
            raise CraneError(
                "this evaluation cannot be resumed exactly: with dattn_threshold_scope='batch' "
                "every image's map depends on the images batched with it, and the stopped "
                "run's batches cannot be rebuilt (its finished classes are not the first ones, "
                "or some of their images were unreadable); evaluate again without --resume"
            )
        return []
    done_samples = [s for s in dataset.samples if s.cls_name in done]
    return done_samples[len(done_samples) - r :] if r else []


def _class_by_class(dataset) -> bool:
    """Whether ``dataset`` lists its samples class after class (no class comes back)."""
    names = [s.cls_name for s in dataset.samples]
    runs = sum(a != b for a, b in zip(names, names[1:], strict=False)) + 1
    return runs == len(set(names)) or not names


def _without_first_rows(job: _Job, k: int) -> _Job:
    """``job`` without its first ``k`` rows (views: nothing is queued on a device, so the
    batch's event still covers every tensor, and the host does not wait)."""
    batch = {key: v[k:] if isinstance(v, (list, torch.Tensor)) else v
             for key, v in job.batch.items()}  # fmt: skip
    return _Job(batch, job.scores[k:], job.maps[k:], job.done)


def _with_resumed(report: MetricsReport, dataset, done: dict[str, dict]) -> MetricsReport:
    """The report of every class of ``dataset``, in its order: recorded ones from ``done``."""
    # (A class none of whose images could be read is in neither, as in a run that never
    # stopped: its record has no metrics.)
    order = [c for c in dict.fromkeys(s.cls_name for s in dataset.samples)
             if (c in done and done[c]["n_images"]) or c in report.per_class]  # fmt: skip
    values = {c: done[c]["values"] if c in done else report.per_class[c] for c in order}
    bounds = None
    if report.bounds is not None:
        bounds = {c: done[c]["bounds"] if c in done else report.bounds[c] for c in order}
    return make_report(values, aupro=report.aupro, mode=report.mode, bounds=bounds)


@dataclass
class _Job:
    batch: dict[str, Any]
    scores: torch.Tensor
    maps: torch.Tensor
    done: Any = None


def _overlay_names(dataset) -> dict[str, str]:
    """Overlay file stems by image path: ``<specie>_<stem>`` in the class's folder; where two
    images of a class would share one (VisA's ``Normal/023.JPG`` and ``Anomaly/023.JPG``, whose
    specie is ""; ``Y92.jpg`` beside ``Y92.png``), their paths under the class's images, as
    ``crane predict`` names its outputs."""
    by_cls: dict[str, list] = {}
    for s in dataset.samples:
        by_cls.setdefault(s.cls_name, []).append(s)
    names: dict[str, str] = {}
    for samples in by_cls.values():
        paths = [str(dataset.root / s.img_path) for s in samples]
        # (fitted to the file system's 255 bytes, as predict's names: a 254-byte image name
        # gave a longer overlay name, whose write stopped the evaluation and its resumes)
        plain = [fit_file_name(f"{s.specie_name}_{Path(s.img_path).stem}", 240) for s in samples]
        shared = Counter(n.casefold() for n in plain)
        unique = _output_names(paths)
        for path, name in zip(paths, plain, strict=True):
            names[path] = name if shared[name.casefold()] == 1 else unique[path]
    return names


def _visualize(
    writer: OutputWriter, out: Path, batch: dict[str, Any], maps, names: dict[str, str]
) -> list[tuple[str, str, Any]]:
    """Queue the batch's overlays; ``(class, file under out, its write)`` for each."""
    queued = []
    for i, path in enumerate(batch["path"]):
        mask = batch["mask"][i, 0].numpy() if batch["label"][i] else None
        stem = names.get(path) or fit_file_name(f"{batch['specie_name'][i]}_{Path(path).stem}", 240)
        cls = batch["cls_name"][i]
        name = f"{cls}/{stem}.png"
        queued.append((cls, name, writer.submit(write_overlay, out / name, path, maps[i], mask)))
    return queued


def _cell(v: float, scale: float = 100.0, bound: float = 0.0) -> str:
    """A metric in percent; in binned mode with its error bound, when it has one (image
    metrics are exact: bound 0; NaN: undefined for the exact value too). A bounded value gets
    the decimals its bound makes meaningful (1 to 4), and the printed bound covers the
    printed value's rounding too, rounded up: the printed range holds the exact value."""
    if v is None or (isinstance(v, float) and math.isnan(v)):
        text = "n/a"
    elif 0 < bound < math.inf:
        decimals = min(4, max(1, math.ceil(-math.log10(bound * scale))))
        text = f"{v * scale:.{decimals}f}"
        return f"{text} ±{_round_up(bound * scale + abs(v * scale - float(text)), 2)}"
    else:
        text = f"{v * scale:.1f}"
    return f"{text} ±inf" if bound == math.inf else text


def _round_up(x: float, digits: int) -> str:
    """``x`` > 0 rounded up to ``digits`` significant digits, in fixed point ("0.00048").
    Within 1e-10 of a step it is rounded to that step: the float of 0.001 × 100 is a hair
    above 0.1 (the bounds of binned metrics carry 1e-9 of slack for such rounding)."""
    exact = Decimal(x)
    step = Decimal(1).scaleb(exact.adjusted() - digits + 1)
    return format((exact * (1 - Decimal("1e-10"))).quantize(step, rounding=ROUND_CEILING), "f")


def report_markdown(report: MetricsReport) -> str:
    """The report as a Markdown table (percent). In binned mode each estimate carries its
    certified bound on |exact − estimate| (±inf: too few bins to tell)."""
    head = "| class | " + " | ".join(METRICS) + " |"
    rows = [head, "|" + "---|" * (len(METRICS) + 1)]
    table = report.rows()
    for i, (name, vals, bounds) in enumerate(table):
        cells = (_cell(vals.get(k, math.nan), bound=bounds.get(k, 0.0)) for k in METRICS)
        name = name.replace("|", "\\|")  # (a class name's "|" would end the cell)
        label = f"**{name}**" if i == len(table) - 1 else name  # (the mean row, last)
        rows.append(f"| {label} | " + " | ".join(cells) + " |")
    if report.bounds is not None:
        rows.append(
            "\nBinned metrics: ± is the certified bound on |exact − estimate| "
            "(±inf: too few bins to tell; more bins tighten it)."
        )
    return "\n".join(rows)


def _csv_value(v: float, fmt: str = "{:.6f}") -> str:
    return "" if math.isnan(v) else "inf" if v == math.inf else fmt.format(v)


def _csv_bound(v: float, bound: float) -> str:
    """A CSV ``*_bound`` cell: a positive bound plus the rounding of the value's 6 decimals,
    rounded up to 3 significant digits, so the printed range holds the exact value; "0"
    for an exact value (the image metrics), which is rounded as every other number."""
    if math.isnan(bound) or bound == math.inf or math.isnan(v):
        return _csv_value(bound)
    if bound == 0:
        return "0"
    return _round_up(bound + abs(v - float(_csv_value(v))), 3)


def write_report(
    report: MetricsReport, out_dir: str | os.PathLike, extra: dict[str, Any]
) -> dict[str, Path]:
    """metrics.md, metrics.csv and metrics.json (atomically) in ``out_dir``. In binned mode the
    CSV has a ``<metric>_bound`` column per metric and the JSON a ``bounds`` table."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    md = report_markdown(report) + "\n"
    buf = io.StringIO()
    w = csv.writer(buf)
    binned = report.bounds is not None
    w.writerow(["class", *METRICS, *(f"{k}_bound" for k in METRICS if binned)])
    for name, vals, bounds in report.rows():
        row = [name, *(_csv_value(vals.get(k, math.nan)) for k in METRICS)]
        if binned:
            row += [_csv_bound(vals.get(k, math.nan), bounds.get(k, math.nan)) for k in METRICS]
        w.writerow(row)
    data = {**report.to_dict(), **extra}
    files = {"md": out / "metrics.md", "csv": out / "metrics.csv", "json": out / "metrics.json"}
    # (valid UTF-8: a class or root name that is not UTF-8 has its bytes as \xNN escapes;
    # a strict encode stopped the run at its end, with no metrics written)
    atomic_write_bytes(files["md"], utf8_text(md).encode())
    atomic_write_bytes(files["csv"], utf8_text(buf.getvalue()).encode())
    atomic_write_bytes(files["json"], (json.dumps(utf8_strings(data), indent=2) + "\n").encode())
    return files
