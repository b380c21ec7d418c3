"""Building meta.json from the datasets' original download layouts (SPEC §8).

Every supported dataset is a registered :class:`Layout`: a name, a description of the
folder tree it expects (shown by ``crane datasets list``) and a scanner that turns that
tree into a :data:`~crane.data.meta.Meta`. :func:`prepare` runs one.

Masks are always paired with their image by file name (stem), never by sorted position
(the reference generators zip two sorted listings, which silently misaligns a dataset as
soon as one mask is missing or named differently). Anomalous images without a mask are
handled by the ``missing_mask`` policy: ``"error"`` (default) raises listing them,
``"skip"`` leaves them out, ``"warn"`` keeps them as image-level samples (no mask:
evaluation counts them in the image metrics only, training leaves them out).
Listings are sorted, so the output does not depend on the file system's order.
"""

from __future__ import annotations

import csv
import logging
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from crane.data.imageio import is_image_file, open_mask, warn_broken_links
from crane.data.meta import (
    Meta,
    Sample,
    format_problem_list,
    iter_samples,
    new_meta,
    validate_meta,
)
from crane.errors import DatasetError

logger = logging.getLogger(__name__)

MISSING_MASK_POLICIES = ("error", "skip", "warn")

# Class lists and names exactly as the reference reports them (SPEC §8; the single-class
# names are the ones in the reference's result tables).
MVTEC_CLASSES = (
    "bottle", "cable", "capsule", "carpet", "grid", "hazelnut", "leather", "metal_nut",
    "pill", "screw", "tile", "toothbrush", "transistor", "wood", "zipper",
)  # fmt: skip
VISA_CLASSES = (
    "candle", "capsules", "cashew", "chewinggum", "fryum", "macaroni1", "macaroni2",
    "pcb1", "pcb2", "pcb3", "pcb4", "pipe_fryum",
)  # fmt: skip
MPDD_CLASSES = (
    "bracket_black", "bracket_brown", "bracket_white", "connector", "metal_plate", "tubes",
)  # fmt: skip
BTAD_CLASSES = ("01", "02", "03")
DAGM_CLASSES = tuple(f"Class{i}" for i in range(1, 11))
DTD_CLASSES = (
    "Woven_001", "Woven_127", "Woven_104", "Stratified_154", "Blotchy_099", "Woven_068",
    "Woven_125", "Marbled_078", "Perforated_037", "Mesh_114", "Fibrous_183", "Matted_069",
)  # fmt: skip
SDD_CLASS = "SDD"
HEADCT_CLASS = "brain"  # sic: the reference's HeadCT generator and tables use "brain"
BRAINMRI_CLASS = "brain"
BR35H_CLASS = "brain"
ISIC_CLASS = "skin"
TN3K_CLASS = "thyroid"
COLON_CLASS = "colon"

#: specie_name for VisA samples. The reference generators (AnomalyCLIP, AdaCLIP) write "".
VISA_SPECIE = {"normal": "", "anomaly": ""}


# --------------------------------------------------------------------------- registry


@dataclass(frozen=True)
class Layout:
    """A supported dataset: its name, what it looks like on disk, and how to scan it."""

    name: str
    title: str
    layout: str
    classes: tuple[str, ...]
    scan: Callable[[ScanContext], Meta] = field(repr=False)

    @property
    def description(self) -> str:
        return f"{self.title}\n{self.layout}"


_REGISTRY: dict[str, Layout] = {}


def register_layout(
    name: str, *, title: str, layout: str, classes: Iterable[str] = ()
) -> Callable[[Callable[[ScanContext], Meta]], Callable[[ScanContext], Meta]]:
    """Decorator registering a scanner ``fn(ctx) -> Meta`` under ``name``."""

    key = _layout_key(name)  # (as get_layout looks names up)

    def decorator(fn: Callable[[ScanContext], Meta]) -> Callable[[ScanContext], Meta]:
        if key in _REGISTRY:
            raise ValueError(f"dataset layout {name!r} is already registered (as {key!r})")
        text = "\n".join(line.rstrip() for line in layout.strip("\n").splitlines())
        _REGISTRY[key] = Layout(key, title, text, tuple(classes), fn)
        return fn

    return decorator


def list_layouts() -> list[Layout]:
    """Every registered layout, in registration order."""
    return list(_REGISTRY.values())


def _layout_key(name: str) -> str:
    return name.strip().lower().replace("_", "-")


def get_layout(name: str) -> Layout:
    """The layout called ``name`` (case-insensitive, ``_`` accepted for ``-``)."""
    key = _layout_key(name)
    if key not in _REGISTRY:
        known = ", ".join(_REGISTRY)
        raise DatasetError(f"unknown dataset {name!r}; known datasets: {known}")
    return _REGISTRY[key]


def prepare(name: str, root: str | os.PathLike[str], *, missing_mask: str = "error") -> Meta:
    """Scan the dataset ``name`` at ``root`` (its original layout) into a Meta.

    Nothing is written; pass the result to :func:`crane.data.meta.write_meta`. Raises
    DatasetError for an unknown name, a missing/empty root, a tree that does not match
    the layout, or (policy ``"error"``) anomalous images without their mask.
    """
    layout = get_layout(name)
    if missing_mask not in MISSING_MASK_POLICIES:
        raise DatasetError(
            f"missing_mask must be one of {', '.join(MISSING_MASK_POLICIES)}, got {missing_mask!r}"
        )
    root = Path(root)
    if not root.exists():
        raise DatasetError(f"dataset root {root} does not exist")
    if not root.is_dir():
        raise DatasetError(f"dataset root {root} is not a directory")
    ctx = ScanContext(root=root, layout=layout, missing_mask=missing_mask)
    try:
        meta = layout.scan(ctx)
    except DatasetError as exc:
        inner = list_dirs(root)
        if len(inner) == 1 and _scans(layout, inner[0]):  # (an archive's top folder, typically)
            raise DatasetError(f"{exc}\n(did you mean --root {inner[0]}?)") from None
        raise
    ctx.finish()
    if next(iter_samples(meta), None) is None:
        if ctx.masks_missing and missing_mask == "skip":
            raise DatasetError(
                f"{layout.name} in {root}: all {len(ctx.masks_missing)} images found lack their "
                "mask and were skipped (--missing-mask skip); nothing is left to index"
            )
        raise DatasetError(
            f"found no images for {layout.name} in {root}; expected:\n{layout.layout}"
        )
    validate_meta(meta, root)
    train = {s.img_path for _, s in iter_samples(meta, "train")}
    both = sorted(train & {s.img_path for _, s in iter_samples(meta, "test")})
    if both:
        logger.warning(format_problem_list(f"{layout.name}: images in both train and test", both))
    for cls, samples in meta["test"].items():
        labels = {s.anomaly for s in samples}
        if layout.name in PIXEL_ONLY:
            continue  # all anomalous by design: pixel metrics only
        if len(labels) == 1:
            logger.warning(
                "%s: %s's test images are all %s: its image-level AUROC, AP and F1 are "
                "undefined (check the folder names against `crane datasets list`)",
                layout.name,
                cls,
                "anomalous" if labels == {1} else "normal",
            )
    return meta


def _scans(layout: Layout, root: Path) -> bool:
    """Whether ``root`` reads as ``layout`` (quietly: only to suggest it)."""
    level = logger.level
    logger.setLevel(logging.CRITICAL)
    try:
        meta = layout.scan(ScanContext(root=root, layout=layout, missing_mask="warn"))
        return next(iter_samples(meta), None) is not None
    except DatasetError:
        return False
    finally:
        logger.setLevel(level)


# --------------------------------------------------------------------------- scanning helpers


@dataclass
class ScanContext:
    """State shared by a scan: the root, the missing-mask policy and what went wrong."""

    root: Path
    layout: Layout
    missing_mask: str = "error"
    masks_missing: list[str] = field(default_factory=list)
    masks_unused: list[str] = field(default_factory=list)

    def rel(self, path: Path) -> str:
        """``path`` relative to the root, with forward slashes; a DatasetError for a path
        outside it (a split file may name absolute paths)."""
        try:
            return path.relative_to(self.root).as_posix()
        except ValueError:
            pass
        try:
            return path.resolve().relative_to(self.root.resolve()).as_posix()
        except ValueError:
            raise self.fail(f"{path} is outside the dataset root {self.root}") from None

    def fail(self, message: str) -> DatasetError:
        """A DatasetError that also shows the expected layout."""
        return DatasetError(
            f"{message}\nexpected layout for {self.layout.name}:\n{self.layout.layout}"
        )

    def sample(
        self, image: Path, cls: str, specie: str, anomaly: int, mask: Path | None = None
    ) -> Sample:
        return Sample(
            img_path=self.rel(image),
            mask_path=self.rel(mask) if mask is not None else "",
            cls_name=cls,
            specie_name=specie,
            anomaly=anomaly,
        )

    def anomalous(self, image: Path, cls: str, specie: str, mask: Path | None) -> Sample | None:
        """An anomalous sample whose mask is required; applies the policy if it is absent."""
        if mask is not None:
            return self.sample(image, cls, specie, 1, mask)
        self.masks_missing.append(self.rel(image))
        if self.missing_mask == "warn":
            return self.sample(image, cls, specie, 1)
        return None  # "skip", or "error" (raised in finish() with the complete list)

    def finish(self) -> None:
        if self.masks_unused:
            logger.warning(
                format_problem_list(
                    f"{self.layout.name}: mask files without a matching image (ignored)",
                    self.masks_unused,
                )
            )
        if not self.masks_missing:
            return
        header = f"{self.layout.name}: anomalous images without a mask in {self.root}"
        if self.missing_mask == "error":
            raise DatasetError(
                format_problem_list(header, self.masks_missing)
                + "\n(use missing_mask='skip' or 'warn', CLI --missing-mask, to proceed)"
            )
        action = "skipped" if self.missing_mask == "skip" else "kept without mask"
        logger.warning(format_problem_list(f"{header} ({action})", self.masks_missing))


def read_csv(ctx: ScanContext, path: Path, required: Iterable[str]) -> list[dict[str, str]]:
    """The rows of a dataset's CSV file, keyed by lower-case column names, every value
    stripped ("" for a missing one); a clear error for missing columns or text that is not
    UTF-8 (e.g. a file an editor saved as UTF-16 or Latin-1)."""
    required = tuple(required)
    try:
        with path.open(newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f)
            fields = [c.strip().lower() for c in reader.fieldnames or []]
            if any(c not in fields for c in required):
                raise ctx.fail(f"{path} must have columns {', '.join(required)}, got {fields}")
            return [
                {k.strip().lower(): (v or "").strip() for k, v in row.items() if k}
                for row in reader
            ]
    except UnicodeDecodeError as exc:
        raise ctx.fail(f"{path} is not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    except csv.Error as exc:
        raise ctx.fail(f"{path} is not a readable CSV file: {exc}") from None


def list_images(folder: Path) -> list[Path]:
    """Image files directly in ``folder`` (sorted by name; hidden/non-image files ignored;
    links to files that do not exist are left out with a warning: a dataset of links into an
    unmounted disk, say)."""
    if not folder.is_dir():
        return []
    named = [p for p in folder.iterdir() if is_image_file(p.name)]
    warn_broken_links(named, f"{folder}: ", name=lambda p: p.name)
    return sorted((p for p in named if p.is_file()), key=lambda p: p.name)


def _is_dir(path: Path) -> bool:
    """``path.is_dir()``, False where it cannot be told (a folder without search permission,
    as a dataset volume's ``lost+found``: is_dir raised PermissionError through the scan)."""
    try:
        return path.is_dir()
    except OSError:
        return False


def list_dirs(folder: Path) -> list[Path]:
    """Non-hidden sub-directories of ``folder``, sorted by name."""
    if not _is_dir(folder):
        return []
    try:
        children = list(folder.iterdir())
    except OSError:  # (a folder without read permission, as lost+found: nothing to list)
        return []
    return sorted(
        (p for p in children if _is_dir(p) and not p.name.startswith(".")),
        key=lambda p: p.name,
    )


def find_dir(parent: Path, *names: str) -> Path | None:
    """The first child directory matching one of ``names`` exactly, then case-insensitively."""
    for name in names:
        if _is_dir(parent / name):
            return parent / name
    lowered = {n.lower() for n in names}
    for child in list_dirs(parent):
        if child.name.lower() in lowered:
            return child
    return None


class MaskIndex:
    """Mask files of one folder, looked up by image stem.

    A mask matches image ``<stem>.<ext>`` if its own stem is ``<stem><suffix>`` for one of
    ``suffixes`` (compared case-insensitively; any image extension). Two mask files that
    would match the same image are an error, never a silent pick; so is one mask that two
    images would share (``A.png`` and ``a.png``, ``7.jpg`` and ``7.png``).
    """

    def __init__(self, ctx: ScanContext, folder: Path | None, suffixes: Iterable[str]) -> None:
        self.ctx = ctx
        self.suffixes = tuple(s.lower() for s in suffixes)
        self.by_stem: dict[str, Path] = {}
        self.used: dict[Path, Path] = {}  # mask -> the image it was given to
        for path in list_images(folder) if folder is not None else []:
            key = path.stem.lower()
            if key in self.by_stem:
                raise ctx.fail(
                    f"ambiguous masks {ctx.rel(self.by_stem[key])!r} and {ctx.rel(path)!r} "
                    "(same name, different extensions)"
                )
            self.by_stem[key] = path

    def find(self, image: Path) -> Path | None:
        stem = image.stem.lower()
        hits = [self.by_stem[stem + s] for s in self.suffixes if stem + s in self.by_stem]
        if len(hits) > 1:
            raise self.ctx.fail(
                f"image {self.ctx.rel(image)!r} matches several masks: "
                + ", ".join(repr(self.ctx.rel(h)) for h in hits)
            )
        if hits:
            mask, other = hits[0], self.used.get(hits[0])
            if other is not None and other != image:
                raise self.ctx.fail(
                    f"mask {self.ctx.rel(mask)!r} matches images {self.ctx.rel(other)!r} and "
                    f"{self.ctx.rel(image)!r} (names that differ only in case or extension): "
                    "rename one, or give each its own mask"
                )
            self.used[mask] = image
            return mask
        return None

    def report_unused(self) -> None:
        self.ctx.masks_unused += [
            self.ctx.rel(p) for p in self.by_stem.values() if p not in self.used
        ]


def scan_mvtec_class(
    ctx: ScanContext,
    cls_dir: Path,
    cls_name: str,
    *,
    normal: str | tuple[str, ...] = "good",
    mask_suffixes: Iterable[str] = ("_mask",),
    require_masks: bool = True,
) -> dict[str, list[Sample]]:
    """``<cls_dir>/{train,test}/<specie>/*`` with masks in ``<cls_dir>/ground_truth/<specie>/``.

    Images under the ``normal`` specie (or any of several names; folders are matched
    ignoring case, as the split folders are) are normal; every other specie is anomalous
    and, with ``require_masks``, must have a mask (else the missing-mask policy applies).
    Without ``require_masks`` anomalous images carry no mask (image-level labels only). A
    class without test images is left out (an empty dict).
    """
    normals = {n.casefold() for n in ((normal,) if isinstance(normal, str) else normal)}
    test_dir = find_dir(cls_dir, "test")
    if test_dir is None:
        raise ctx.fail(f"{cls_dir} has no test/ folder")
    out: dict[str, list[Sample]] = {}
    # (one index per ground-truth folder for both splits: a defect folder in train/ and in
    # test/ shares ground_truth/<specie>/, so neither split's masks are "unused", and one
    # mask is never given to an image of each split)
    mask_indexes: dict[Path | None, MaskIndex] = {}
    for split in ("train", "test"):
        split_dir = find_dir(cls_dir, split)
        if split_dir is None:
            continue
        samples: list[Sample] = []
        stray = list_images(split_dir)
        if stray:
            logger.warning(
                "ignoring %d image(s) directly in %s (expected <specie>/ folders)",
                len(stray),
                split_dir,
            )
        for specie_dir in list_dirs(split_dir):
            specie = specie_dir.name
            images = list_images(specie_dir)
            if specie.casefold() in normals:
                samples += [ctx.sample(p, cls_name, specie, 0) for p in images]
                continue
            if split == "train" and images:
                logger.warning(
                    "%s: %s is not a normal folder (%s): its %d image(s) are labelled anomalous",
                    cls_name,
                    specie_dir,
                    "/".join(sorted(normals)),
                    len(images),
                )
            if not require_masks:
                samples += [ctx.sample(p, cls_name, specie, 1) for p in images]
                continue
            gt = find_dir(cls_dir, "ground_truth")
            gt_specie = find_dir(gt, specie) if gt else None
            if gt_specie not in mask_indexes:
                mask_indexes[gt_specie] = MaskIndex(ctx, gt_specie, mask_suffixes)
            masks = mask_indexes[gt_specie]
            for image in images:
                sample = ctx.anomalous(image, cls_name, specie, masks.find(image))
                if sample is not None:
                    samples.append(sample)
        if split == "test":
            for masks in mask_indexes.values():
                masks.report_unused()
        if split == "test" and not samples:
            logger.warning("%s: no test images in %s; the class is left out", cls_name, split_dir)
            return {}
        if samples:
            out[split] = samples
    return out


def scan_known_classes(ctx: ScanContext, classes: Iterable[str], **kwargs: Any) -> Meta:
    """MVTec-style classes ``<root>/<cls>/``; missing classes are skipped with a warning."""
    classes = tuple(classes)
    present = [c for c in classes if (ctx.root / c).is_dir()]
    if not present:
        raise ctx.fail(f"none of the {len(classes)} class folders found in {ctx.root}")
    absent = [c for c in classes if c not in present]
    if absent:
        logger.warning(
            "%s: class folder(s) not found, skipped: %s", ctx.layout.name, ", ".join(absent)
        )
    others = sorted(
        p.name
        for p in ctx.root.iterdir()
        if p.name not in classes and _is_dir(p) and _is_dir(p / "test")
    )
    if others:  # (left out without a word, a run then reported fewer images than the folder)
        logger.warning(
            "%s: folder(s) %s look like classes but are not %s classes: not read (--dataset "
            "generic reads every class folder)",
            ctx.layout.name,
            ", ".join(others),
            ctx.layout.name,
        )
    meta = new_meta()
    for cls in present:
        for split, samples in scan_mvtec_class(ctx, ctx.root / cls, cls, **kwargs).items():
            meta[split][cls] = samples
    return meta


def scan_image_folders(
    ctx: ScanContext, base: Path, cls: str, normal: str = "no", anomalous: str = "yes"
) -> Meta:
    """Image-level sets: ``<base>/<normal>/`` and ``<base>/<anomalous>/``, test split only."""
    normal_dir, anomalous_dir = find_dir(base, normal), find_dir(base, anomalous)
    if normal_dir is None or anomalous_dir is None:
        raise ctx.fail(f"{base} must contain both {normal}/ and {anomalous}/")
    meta = new_meta()
    meta["test"][cls] = [ctx.sample(p, cls, normal, 0) for p in list_images(normal_dir)] + [
        ctx.sample(p, cls, anomalous, 1) for p in list_images(anomalous_dir)
    ]
    return meta


#: Layouts whose images are all anomalous by design (pixel-level metrics only).
PIXEL_ONLY = frozenset({"isic", "tn3k", "cvc-colondb", "cvc-clinicdb"})


def scan_pixel_only(
    ctx: ScanContext,
    dirs: Iterable[tuple[str, str]],
    cls: str,
    mask_suffixes: Iterable[str] = ("",),
) -> Meta:
    """All-anomalous sets: images and same-stem masks in two folders, test split only.

    ``dirs`` lists accepted ``(image folder, mask folder)`` name pairs, first match wins.
    """
    dirs = tuple(dirs)
    for img_name, mask_name in dirs:
        img_dir, mask_dir = find_dir(ctx.root, img_name), find_dir(ctx.root, mask_name)
        if img_dir is not None and mask_dir is not None:
            break
    else:
        wanted = " or ".join(f"{i}/ + {m}/" for i, m in dirs)
        raise ctx.fail(f"{ctx.root} must contain {wanted}")
    masks = MaskIndex(ctx, mask_dir, mask_suffixes)
    samples = []
    for image in list_images(img_dir):
        sample = ctx.anomalous(image, cls, "", masks.find(image))
        if sample is not None:
            samples.append(sample)
    masks.report_unused()
    meta = new_meta()
    meta["test"][cls] = samples
    return meta


def _same_file(a: Path, b: Path) -> bool:
    try:
        return a.samefile(b)
    except OSError:
        return False


# --------------------------------------------------------------------------- datasets

MVTEC_LAYOUT = """
  <cls>/train/good/*.png
  <cls>/test/<good|defect>/*.png
  <cls>/ground_truth/<defect>/<stem>_mask.png"""


@register_layout(
    "mvtec",
    title="MVTec AD (15 classes)",
    classes=MVTEC_CLASSES,
    layout=MVTEC_LAYOUT,
)
def _mvtec(ctx: ScanContext) -> Meta:
    return scan_known_classes(ctx, MVTEC_CLASSES)


@register_layout(
    "visa",
    title="VisA (12 classes), raw download with the 1-class split",
    classes=VISA_CLASSES,
    layout="""
  <cls>/Data/Images/{Normal,Anomaly}/*.JPG
  <cls>/Data/Masks/Anomaly/*.png
  split_csv/1cls.csv  (columns object,split,label,image,mask; paths relative to the root)""",
)
def _visa(ctx: ScanContext) -> Meta:
    csv_path = ctx.root / "split_csv" / "1cls.csv"
    if not csv_path.is_file():
        raise ctx.fail(f"split file {csv_path} not found")
    rows = read_csv(ctx, csv_path, ("object", "split", "label", "image", "mask"))
    named = list(dict.fromkeys(row["object"] for row in rows if row["object"]))
    absent = [c for c in named if not (ctx.root / c).is_dir()]
    if absent and len(absent) == len(named):
        raise ctx.fail(f"none of the class folders {csv_path.name} names is in {ctx.root}")
    if absent:  # (a partial download: as the other layouts, read the classes that are there)
        logger.warning("visa: class folder(s) not found, skipped: %s", ", ".join(absent))
    problems: list[str] = []
    grouped: dict[str, dict[str, list[Sample]]] = {}
    for line, row in enumerate(rows, start=2):
        cls, split, label = row["object"], row["split"].lower(), row["label"].lower()
        if cls in absent:
            continue
        where = f"{csv_path.name} line {line}"
        if split not in ("train", "test") or label not in ("normal", "anomaly"):
            problems.append(
                f"{where}: split {row['split']!r} / label {row['label']!r} not "
                "in train|test / normal|anomaly"
            )
            continue
        if not cls or not row["image"]:
            problems.append(f"{where}: empty object or image field")
            continue
        image = ctx.root / row["image"]
        if label == "normal":
            sample = ctx.sample(image, cls, VISA_SPECIE["normal"], 0)
        else:
            mask = ctx.root / row["mask"] if row["mask"] else None
            if mask is not None and not mask.is_file():
                mask = None
            if mask is not None and mask.stem.lower() != image.stem.lower():
                problems.append(
                    f"{where}: mask {row['mask']!r} does not match image {row['image']!r} by name"
                )
                continue
            if mask is not None and (ctx.rel(mask).split("/")[0] != cls or _same_file(mask, image)):
                problems.append(
                    f"{where}: mask {row['mask']!r} is not a mask of {cls} (the image itself, or "
                    f"outside {cls}/)"
                )
                continue
            sample = ctx.anomalous(image, cls, VISA_SPECIE["anomaly"], mask)
        if sample is not None:
            grouped.setdefault(cls, {"train": [], "test": []})[split].append(sample)
    if problems:
        raise DatasetError(format_problem_list(f"{csv_path} is inconsistent", problems))
    unknown = [c for c in grouped if c not in VISA_CLASSES]
    if unknown:
        logger.warning("visa: classes not in the VisA list kept as-is: %s", ", ".join(unknown))
    meta = new_meta()
    order = [c for c in VISA_CLASSES if c in grouped] + unknown
    for cls in order:
        for split in ("train", "test"):
            meta[split][cls] = grouped[cls][split]
    return meta


@register_layout(
    "mpdd",
    title="MPDD (6 classes), MVTec layout",
    classes=MPDD_CLASSES,
    layout=MVTEC_LAYOUT,
)
def _mpdd(ctx: ScanContext) -> Meta:
    return scan_known_classes(ctx, MPDD_CLASSES)


@register_layout(
    "btad",
    title="BTAD / BeanTech (classes 01, 02, 03)",
    classes=BTAD_CLASSES,
    layout="""
  <cls>/train/ok/*.{bmp,png}
  <cls>/test/{ok,ko}/*.{bmp,png}
  <cls>/ground_truth/ko/<stem>.{png,bmp}  (same name as the image)""",
)
def _btad(ctx: ScanContext) -> Meta:
    return scan_known_classes(ctx, BTAD_CLASSES, normal="ok", mask_suffixes=("", "_mask"))


@register_layout(
    "sdd",
    title="KolektorSDD (class 'SDD'): original download or the AdaCLIP-converted tree",
    classes=(SDD_CLASS,),
    layout="""
  original:  kos*/Part*.jpg with kos*/Part*_label.bmp  (test split only; an image is
             anomalous if its label has any non-zero pixel)
  converted: SDD/train/good/, SDD/test/{good,defect}/, SDD/ground_truth/defect/<stem>_mask.png
  The two give different test sets (the converted tree is made of image crops with its
  own split): compare numbers only with results made from the same form.""",
)
def _sdd(ctx: ScanContext) -> Meta:
    for folder in ("SDD", "electrical commutators"):
        if (ctx.root / folder / "test").is_dir():
            meta = new_meta()
            for split, samples in scan_mvtec_class(ctx, ctx.root / folder, SDD_CLASS).items():
                meta[split][SDD_CLASS] = samples
            return meta
    part_dirs = [d for d in list_dirs(ctx.root) if d.name.lower().startswith("kos")]
    if not part_dirs:
        raise ctx.fail(f"no kos*/ folders (nor a converted SDD/ tree) in {ctx.root}")
    samples, unlabelled = [], []
    for part_dir in part_dirs:
        files = list_images(part_dir)
        labels = {
            p.stem.lower()[: -len("_label")]: p for p in files if p.stem.lower().endswith("_label")
        }
        for image in files:
            if image.stem.lower().endswith("_label"):
                continue
            label = labels.get(image.stem.lower())
            if label is None:
                unlabelled.append(ctx.rel(image))
            # KolektorSDD ships a label for every image; an all-zero label means defect-free.
            elif open_mask(label).any():
                samples.append(ctx.sample(image, SDD_CLASS, "defect", 1, label))
            else:
                samples.append(ctx.sample(image, SDD_CLASS, "good", 0))
    if unlabelled:
        raise ctx.fail(format_problem_list("images without a <stem>_label.bmp file", unlabelled))
    meta = new_meta()
    meta["test"][SDD_CLASS] = samples
    return meta


@register_layout(
    "dagm",
    title="DAGM 2007 (Class1..Class10)",
    classes=DAGM_CLASSES,
    layout="""
  ClassN/{Train,Test}/*.PNG
  ClassN/{Train,Test}/Label/<stem>_label.PNG  (an image with a label file is anomalous)
  The original Test/ folders; converted copies in MVTec form (ClassN/test/{good,defect}/
  with ground_truth/defect/<stem>_label.PNG, e.g. AdaCLIP's, which picks its own normal
  test images) are read by `generic`: their numbers are not comparable with these.""",
)
def _dagm(ctx: ScanContext) -> Meta:
    present = [c for c in DAGM_CLASSES if (ctx.root / c).is_dir()]
    if not present:
        raise ctx.fail(f"no Class1..Class10 folders in {ctx.root}")
    absent = [c for c in DAGM_CLASSES if c not in present]
    if absent:
        logger.warning("dagm: class folder(s) not found, skipped: %s", ", ".join(absent))
    meta = new_meta()
    for cls in present:
        for split, folder in (("train", "Train"), ("test", "Test")):
            split_dir = find_dir(ctx.root / cls, folder)
            if split_dir is None:
                if split == "test":
                    raise ctx.fail(f"{ctx.root / cls} has no Test/ folder")
                continue
            labels = MaskIndex(ctx, find_dir(split_dir, "Label"), ("_label",))
            samples = []
            for image in list_images(split_dir):
                label = labels.find(image)
                if label is None:
                    samples.append(ctx.sample(image, cls, "good", 0))
                else:
                    samples.append(ctx.sample(image, cls, "defect", 1, label))
            labels.report_unused()
            if split == "test" and not samples:
                logger.warning("%s: no test images in %s; the class is left out", cls, split_dir)
                meta["train"].pop(cls, None)
                break
            meta[split][cls] = samples
    return meta


@register_layout(
    "dtd",
    title="DTD-Synthetic (12 texture classes), MVTec layout",
    classes=DTD_CLASSES,
    layout="""
  <cls>/train/good/*.png
  <cls>/test/<good|bad>/*.png
  <cls>/ground_truth/<bad>/<stem>_mask.png""",
)
def _dtd(ctx: ScanContext) -> Meta:
    return scan_known_classes(ctx, DTD_CLASSES)


@register_layout(
    "headct",
    title=f"Head CT hemorrhage (class {HEADCT_CLASS!r}, image-level labels only)",
    classes=(HEADCT_CLASS,),
    layout="""
  head_ct/*.png  (or head_ct/head_ct/*.png), named by zero-padded id: 000.png, 001.png, ...
  labels.csv     (columns id, hemorrhage; 1 = anomalous)""",
)
def _headct(ctx: ScanContext) -> Meta:
    csv_path = ctx.root / "labels.csv"
    img_dir = next(
        (
            d
            for d in (ctx.root / "head_ct" / "head_ct", ctx.root / "head_ct")
            if d.is_dir() and list_images(d)
        ),
        None,
    )
    if img_dir is None or not csv_path.is_file():
        raise ctx.fail(f"need labels.csv and a head_ct/ image folder in {ctx.root}")
    by_stem = {p.stem: p for p in list_images(img_dir)}
    # (the Kaggle file's header is "id, hemorrhage", with a space: names are stripped)
    rows = read_csv(ctx, csv_path, ("id", "hemorrhage"))
    problems, samples = [], []
    for line, row in enumerate(rows, start=2):
        raw_id, raw_label = row["id"], row["hemorrhage"]
        if not raw_id.isdigit() or raw_label not in ("0", "1"):
            problems.append(f"line {line}: id {raw_id!r} / hemorrhage {raw_label!r} invalid")
            continue
        num = int(raw_id)
        image = by_stem.get(f"{num:03d}") or by_stem.get(str(num)) or by_stem.get(raw_id)
        if image is None:
            problems.append(f"line {line}: no image for id {raw_id} in {ctx.rel(img_dir)}/")
            continue
        label = int(raw_label)
        samples.append(ctx.sample(image, HEADCT_CLASS, "hemorrhage" if label else "good", label))
    if problems:
        raise DatasetError(format_problem_list(f"{csv_path} does not match the images", problems))
    unlisted = len(by_stem) - len({s.img_path for s in samples})
    if unlisted:
        logger.warning(
            "headct: %d of the %d images in %s are not in %s: left out",
            unlisted,
            len(by_stem),
            ctx.rel(img_dir),
            csv_path.name,
        )
    meta = new_meta()
    meta["test"][HEADCT_CLASS] = samples
    return meta


@register_layout(
    "brainmri",
    title=f"Brain MRI tumour (class {BRAINMRI_CLASS!r}, image-level labels only)",
    classes=(BRAINMRI_CLASS,),
    layout="""
  brain_tumor_dataset/no/*   (normal)
  brain_tumor_dataset/yes/*  (tumour)""",
)
def _brainmri(ctx: ScanContext) -> Meta:
    base = find_dir(ctx.root, "brain_tumor_dataset") or ctx.root
    return scan_image_folders(ctx, base, BRAINMRI_CLASS)


@register_layout(
    "br35h",
    title=f"Br35H brain tumour (class {BR35H_CLASS!r}, image-level labels only)",
    classes=(BR35H_CLASS,),
    layout="""
  no/*   (normal)
  yes/*  (tumour; the unlabelled pred/ folder is ignored)""",
)
def _br35h(ctx: ScanContext) -> Meta:
    return scan_image_folders(ctx, ctx.root, BR35H_CLASS)


@register_layout(
    "isic",
    title=f"ISIC 2016 skin lesions, test part (class {ISIC_CLASS!r}, all anomalous, masks)",
    classes=(ISIC_CLASS,),
    layout="""
  ISBI2016_ISIC_Part1_Test_Data/<id>.jpg
  ISBI2016_ISIC_Part1_Test_GroundTruth/<id>_Segmentation.png""",
)
def _isic(ctx: ScanContext) -> Meta:
    return scan_pixel_only(
        ctx,
        [("ISBI2016_ISIC_Part1_Test_Data", "ISBI2016_ISIC_Part1_Test_GroundTruth")],
        ISIC_CLASS,
        mask_suffixes=("_segmentation",),
    )


@register_layout(
    "tn3k",
    title=f"TN3K thyroid nodules, test part (class {TN3K_CLASS!r}, all anomalous, masks)",
    classes=(TN3K_CLASS,),
    layout="""
  test-image/<stem>.jpg
  test-mask/<stem>.jpg""",
)
def _tn3k(ctx: ScanContext) -> Meta:
    return scan_pixel_only(ctx, [("test-image", "test-mask")], TN3K_CLASS)


_CVC_LAYOUT = """
  images/<stem>.<ext>  with  masks/<stem>.<ext>   (extensions may differ, e.g. .tif/.png)
  or the original Original/ with "Ground Truth"/"""
_CVC_DIRS = (("images", "masks"), ("Original", "Ground Truth"))


@register_layout(
    "cvc-colondb",
    title=f"CVC-ColonDB polyps (class {COLON_CLASS!r}, all anomalous, masks)",
    classes=(COLON_CLASS,),
    layout=_CVC_LAYOUT,
)
def _cvc_colondb(ctx: ScanContext) -> Meta:
    return scan_pixel_only(ctx, _CVC_DIRS, COLON_CLASS)


@register_layout(
    "cvc-clinicdb",
    title=f"CVC-ClinicDB polyps (class {COLON_CLASS!r}, all anomalous, masks)",
    classes=(COLON_CLASS,),
    layout=_CVC_LAYOUT,
)
def _cvc_clinicdb(ctx: ScanContext) -> Meta:
    return scan_pixel_only(ctx, _CVC_DIRS, COLON_CLASS)


#: Folder names ``generic`` reads as normal (compared ignoring case).
GENERIC_NORMAL = ("good", "ok", "normal")


@register_layout(
    "generic",
    title="Any dataset in MVTec form (masks optional)",
    layout="""
  <cls>/train/good/*                       (normal folders: good, ok or normal)
  <cls>/test/<good|defect>/*
  <cls>/ground_truth/<defect>/<stem>.*      (or <stem>_mask.*, <stem>_label.*; optional:
                                           without ground_truth/, image-level labels only)
  or one class without the class level: train/, test/, ground_truth/ at the root
  (class name = the root folder's name)""",
)
def _generic(ctx: ScanContext) -> Meta:
    def one(cls_dir: Path, cls: str) -> dict[str, list[Sample]]:
        has_gt = find_dir(cls_dir, "ground_truth") is not None
        if not has_gt:
            logger.info("generic: %s has no ground_truth/; image-level labels only", cls_dir)
        return scan_mvtec_class(
            ctx,
            cls_dir,
            cls,
            normal=GENERIC_NORMAL,
            mask_suffixes=("_mask", "_label", ""),
            require_masks=has_gt,
        )

    meta = new_meta()
    if find_dir(ctx.root, "test") is not None:
        cls = Path(os.path.abspath(ctx.root)).name  # (a link's name, not its target's)
        for split, samples in one(ctx.root, cls).items():
            meta[split][cls] = samples
        return meta
    class_dirs = [d for d in list_dirs(ctx.root) if find_dir(d, "test") is not None]
    if not class_dirs:
        raise ctx.fail(f"no test/ folder and no <cls>/test/ folders in {ctx.root}")
    left_out = [d.name for d in list_dirs(ctx.root) if d not in class_dirs]
    if left_out:
        logger.warning(
            "generic: folder(s) without a test/ folder left out (a class is <cls>/test/...): %s",
            ", ".join(sorted(left_out)),
        )
    for cls_dir in class_dirs:
        for split, samples in one(cls_dir, cls_dir.name).items():
            meta[split][cls_dir.name] = samples
    return meta
