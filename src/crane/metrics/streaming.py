"""Streaming per-class accumulation of image and pixel metrics.

Inference hands over batches of (class names, image scores, labels, anomaly maps, masks);
:class:`MetricAccumulator` keeps per class what the metrics need and :meth:`compute` returns a
:class:`~crane.metrics.report.MetricsReport` (per class + unweighted mean over defined classes).
Each class's results are computed for both AUPRO definitions at once and kept until the class
receives more data, so ``compute(aupro="legacy")`` after ``compute()`` is free.

Modes (image metrics are always exact: one score per image is cheap):

``exact``   Results identical to the batch functions of :mod:`crane.metrics.functional` (up to
            float64 summation order, < 1e-12). Holds every pixel score once, in the maps' own
            dtype (4 B/pixel for float32 maps, 2 B for float16), plus for each anomalous pixel
            its score again and an int32 region id (8 B), plus 8 B per region: for MVTec AD at
            518x518 (463 M pixels) about 1.9 GB. :meth:`finalize_class` computes one class and
            frees it, so inference that runs class by class holds one class at a time (about
            0.13 GB for MVTec). Computing a class needs on top one sorted copy of its scores
            (on CPU a buffer reused from class to class) and ~40 B per anomalous pixel of
            workspace.
``binned``  Bounded memory: per class three K-bin histograms (24 B x K; 1.5 MiB at the default
            K = 65536) and the exact min / max score. Pixel metrics are estimates with a
            certified bound on |exact - estimate| reported alongside (see
            :mod:`crane.metrics.binned`). Maps are expected in [0, 1] (probabilities); scores
            outside fall into the end bins, which keeps the bounds valid but loosens them.

State lives on the device of the incoming tensors unless ``device`` is given (e.g. "cpu" to
keep GPU memory free). On a GPU, exact mode keeps a class's pixels there up to
``max_device_bytes`` (default 1/16 of the device's memory: ranking a class needs about five
times its state) and moves the class to the host beyond that; a class whose ranking still
runs out of device memory is ranked on the host (same results, a warning says so). Region
labelling (scipy) runs on CPU; only masks travel there. NaN in the maps raises ValueError
(exact mode: when the class is computed, where it costs nothing).
"""

from __future__ import annotations

import functools
import logging
import math
from collections.abc import Sequence
from typing import Literal

import numpy as np
import torch

from crane.metrics._core import (
    ArrayLike,
    add_,
    as_tensor,
    binary_tensor,
    bincount,
    check_no_nan,
    compute_dtype,
    concat,
    copy,
    min_max,
    pixel_inputs,
    sorted_scores,
    to_score_dtype,
    use_numpy,
)
from crane.metrics.aupro import (
    AuproDefinition,
    check_aupro_args,
    check_definition,
    extract_positives,
    region_weights,
)
from crane.metrics.binned import (
    DEFAULT_NUM_BINS,
    bin_index,
    binned_pixel_metrics,
    check_num_bins,
)
from crane.metrics.functional import (
    AUPRO_KEYS,
    IMAGE_METRICS,
    image_metrics,
    pixel_metrics_from_pixels,
    select_aupro,
)
from crane.metrics.report import MetricsReport, make_report

Mode = Literal["exact", "binned"]
PIXEL_KEYS = ("pixel_auroc", "pixel_f1_max", *AUPRO_KEYS.values())
log = logging.getLogger(__name__)


def _on_accelerator(t: torch.Tensor) -> bool:
    return t.device.type != "cpu"


def default_device_budget(device: torch.device) -> int | None:
    """Bytes of one class's exact pixel state kept on ``device`` (1/16 of a GPU's memory)."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory // 16
    return None


class _ExactPixels:
    """Every pixel score of one class plus the anomalous pixels' scores and region ids."""

    def __init__(self) -> None:
        self.maps: list[torch.Tensor] = []
        self.pos: list[torch.Tensor] = []
        self.region: list[torch.Tensor] = []
        self.areas: list[torch.Tensor] = []
        self.n_regions = 0
        self.on_host = False
        self._device_bytes = 0  # (kept as the parts come: summing them per update is O(n²))

    def device_nbytes(self) -> int:
        """Bytes held on an accelerator (not the host)."""
        return self._device_bytes if self.maps else 0

    def to_host(self) -> None:
        """Move the state to the host (and what the class receives later)."""
        self.maps, self.pos, self.region, self.areas = (
            [t.cpu() for t in parts] for parts in (self.maps, self.pos, self.region, self.areas)
        )
        self.on_host = True
        self._device_bytes = 0

    def add(self, maps: torch.Tensor, masks: torch.Tensor) -> None:
        if self.on_host:  # (moved there past the device budget: the rest of it follows)
            maps = maps.cpu()
        pos, region, areas = extract_positives(maps, masks)
        # Copy: the caller may reuse its buffer for the next batch.
        self.maps.append(copy(maps.reshape(-1)))
        self.pos.append(pos)
        self.region.append((region + self.n_regions).to(torch.int32))
        self.areas.append(areas)
        self.n_regions += areas.numel()
        self._device_bytes += sum(
            t.numel() * t.element_size()
            for t in (self.maps[-1], self.pos[-1], self.region[-1], self.areas[-1])
            if _on_accelerator(t)
        )

    def nbytes(self) -> int:
        parts = (*self.maps, *self.pos, *self.region, *self.areas)
        return sum(t.numel() * t.element_size() for t in parts)

    def compute(
        self, max_fpr: float, num_thresholds: int, release: bool, scratch: dict
    ) -> tuple[dict[str, float], dict[str, float]]:
        if not self.device_nbytes():
            return self._compute(max_fpr, num_thresholds, release, scratch)
        out = None
        try:  # (on a device the state is kept until the results are in: a retry needs it)
            out = self._compute(max_fpr, num_thresholds, False, scratch)
        except torch.OutOfMemoryError:
            pass
        if out is None:  # (retried here, not in the handler: its traceback holds the
            # failed call's device tensors, which the cache could not give back)
            log.warning(
                "not enough device memory to rank a class's %d pixel scores there: ranking "
                "them on the host (same results, slower)",
                sum(t.numel() for t in self.maps),
            )
            self.to_host()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            return self._compute(max_fpr, num_thresholds, release, scratch)
        if release:
            self.maps, self.pos, self.region, self.areas = [], [], [], []
        return out

    def _compute(
        self, max_fpr: float, num_thresholds: int, release: bool, scratch: dict
    ) -> tuple[dict[str, float], dict[str, float]]:
        all_sorted = sorted_scores(self._merged(scratch), owned=True, name="anomaly maps")
        pos, region, areas = concat(self.pos), concat(self.region), concat(self.areas)
        if release:
            self.maps, self.pos, self.region, self.areas = [], [], [], []
        values = pixel_metrics_from_pixels(
            all_sorted,
            pos.to(all_sorted.dtype),
            region.long(),
            areas,
            max_fpr=max_fpr,
            num_thresholds=num_thresholds,
        )
        return values, {k: math.nan if math.isnan(v) else 0.0 for k, v in values.items()}

    def _merged(self, scratch: dict) -> torch.Tensor:
        """All scores in one tensor we may sort in place; the chunks stay untouched.

        On CPU the copy goes into a buffer reused across the classes of one compute():
        writing into fresh memory costs page faults comparable to the copy itself. (Keeping
        the chunks rather than the sorted copy as state also lets freed memory go back to the
        OS: the chunks sit in the malloc heap, the big copy is its own mapping.)
        """
        dtype = compute_dtype(functools.reduce(torch.promote_types, [c.dtype for c in self.maps]))
        if not all(use_numpy(c) and c.dtype == dtype for c in self.maps):
            return torch.cat(self.maps).to(dtype)
        n = sum(c.numel() for c in self.maps)
        buf = scratch.get(dtype)
        if buf is None or buf.numel() < n:
            buf = scratch[dtype] = torch.empty(n, dtype=dtype)
        np.concatenate([c.numpy() for c in self.maps], out=buf[:n].numpy())
        return buf[:n]


class _BinnedPixels:
    """K-bin histograms of all / anomalous pixels and of the anomalous pixels' region weights."""

    def __init__(self, num_bins: int) -> None:
        self.num_bins = num_bins
        self.hist_all: torch.Tensor | None = None
        self.hist_pos: torch.Tensor | None = None
        self.weight_pos: torch.Tensor | None = None
        self.n_regions = 0
        self.lo, self.hi = math.inf, -math.inf

    def add(self, maps: torch.Tensor, masks: torch.Tensor) -> None:
        k = self.num_bins
        pos, region, areas = extract_positives(maps, masks)
        flat = maps.reshape(-1)
        if self.hist_all is None:
            zeros = torch.zeros(k, dtype=torch.int64, device=maps.device)
            self.hist_all, self.hist_pos, self.weight_pos = zeros, zeros.clone(), zeros.double()
        assert self.hist_pos is not None and self.weight_pos is not None
        lo, hi = min_max(flat)  # (NaN maps: refused by MetricAccumulator.update before)
        self.lo, self.hi = min(self.lo, lo), max(self.hi, hi)
        add_(self.hist_all, bincount(bin_index(flat, k), k))
        bins = bin_index(pos, k)
        add_(self.hist_pos, bincount(bins, k))
        add_(self.weight_pos, bincount(bins, k, weights=region_weights(region, areas)))
        self.n_regions += areas.numel()

    def nbytes(self) -> int:
        return 0 if self.hist_all is None else 3 * 8 * self.num_bins

    def compute(
        self, max_fpr: float, num_thresholds: int, release: bool, scratch: dict
    ) -> tuple[dict[str, float], dict[str, float]]:
        assert self.hist_all is not None and self.hist_pos is not None
        assert self.weight_pos is not None
        return binned_pixel_metrics(
            self.hist_all,
            self.hist_pos,
            self.weight_pos,
            self.n_regions,
            (self.lo, self.hi),
            max_fpr=max_fpr,
            num_thresholds=num_thresholds,
        )


class _ClassState:
    """One class: image scores / labels, pixel state, and the last results (both AUPROs)."""

    def __init__(self, pixels: _ExactPixels | _BinnedPixels, name: str) -> None:
        self.name = name
        self.scores: list[torch.Tensor] = []
        self.labels: list[torch.Tensor] = []
        self.pixels = pixels
        self.has_pixels = False
        self.finalized = False
        # (values, bounds) with keys METRICS minus pixel_aupro, plus pixel_aupro_<definition>;
        # valid until the next update.
        self.result: tuple[dict[str, float], dict[str, float]] | None = None

    def nbytes(self) -> int:
        image = sum(t.numel() * t.element_size() for t in (*self.scores, *self.labels))
        return image + self.pixels.nbytes()


class MetricAccumulator:
    """Accumulates per-class image and pixel metrics batch by batch.

    Args:
        aupro: AUPRO definition, ``"mvtec"`` or ``"legacy"`` (see :mod:`crane.metrics.aupro`).
        mode: ``"exact"`` (identical to the batch functions) or ``"binned"`` (bounded memory,
            estimates with certified error bounds); see the module docstring for memory.
        num_bins: K for ``binned`` mode, a power of two.
        max_fpr: AUPRO integration limit (0.3 in every published table).
        num_thresholds: thresholds of the ``legacy`` AUPRO (200 in the reference).
        device: where to keep the state; default: the device of the incoming tensors.
        max_device_bytes: exact mode: bytes of one class's pixel state kept on an
            accelerator before the class moves to the host; ``"auto"``: 1/16 of the device's
            memory (ranking a class there needs about five times its state); None: no limit.

    Example::

        acc = MetricAccumulator(aupro="legacy")
        for batch in loader:
            acc.update(batch.cls_names, scores, batch.labels, maps, batch.masks)
        report = acc.compute()          # report.per_class["bottle"]["pixel_aupro"], report.mean
    """

    def __init__(
        self,
        aupro: AuproDefinition = "mvtec",
        mode: Mode = "exact",
        *,
        num_bins: int = DEFAULT_NUM_BINS,
        max_fpr: float = 0.3,
        num_thresholds: int = 200,
        device: torch.device | str | None = None,
        max_device_bytes: int | Literal["auto"] | None = "auto",
    ) -> None:
        check_definition(aupro)
        if mode not in ("exact", "binned"):
            raise ValueError(f"unknown mode {mode!r}; use 'exact' or 'binned'")
        if mode == "binned":
            check_num_bins(num_bins)
        check_aupro_args(max_fpr, num_thresholds)
        self.aupro: str = aupro
        self.mode: str = mode
        self.num_bins = num_bins
        self.max_fpr = float(max_fpr)
        self.num_thresholds = int(num_thresholds)
        self.device = None if device is None else torch.device(device)
        if not (max_device_bytes in ("auto", None) or (
            isinstance(max_device_bytes, int) and max_device_bytes >= 0
        )):  # fmt: skip
            raise ValueError(
                f"max_device_bytes must be 'auto', None or a byte count, got {max_device_bytes!r}"
            )
        self.max_device_bytes = max_device_bytes
        self._states: dict[str, _ClassState] = {}
        # CPU buffer for a class's sorted copy, reused across finalize_class calls (fresh
        # memory costs page faults about as much as the copy); dropped by compute() / reset().
        self._scratch: dict = {}

    @property
    def classes(self) -> list[str]:
        """Class names in order of first appearance."""
        return list(self._states)

    def reset(self) -> None:
        """Forget everything accumulated so far."""
        self._states.clear()
        self._scratch = {}

    def nbytes(self) -> int:
        """Bytes of tensor state currently held (all classes not yet finalized)."""
        return sum(s.nbytes() for s in self._states.values())

    def update(
        self,
        cls_names: str | Sequence[str],
        image_scores: ArrayLike | None,
        labels: ArrayLike,
        maps: ArrayLike | None = None,
        masks: ArrayLike | None = None,
    ) -> None:
        """Add a batch of B images.

        Args:
            cls_names: the class of each image (or one name for the whole batch).
            image_scores: (B,) image anomaly scores, or None to skip image metrics.
            labels: (B,) image labels (1 / True = anomalous).
            maps: (B, H, W) or (B, 1, H, W) anomaly maps, or None (image-level datasets).
            masks: ground-truth masks shaped like ``maps`` (> 0.5 = anomalous); required with
                ``maps``. Normal images need all-zero masks.
        """
        y = binary_tensor(labels).reshape(-1)
        n = y.numel()
        names = [cls_names] * n if isinstance(cls_names, str) else list(cls_names)
        if len(names) != n:
            raise ValueError(f"{len(names)} class names for {n} labels")
        scores = None
        if image_scores is not None:
            scores = as_tensor(image_scores).reshape(-1)
            scores = to_score_dtype(scores)
            check_no_nan(scores, "image scores")
            if scores.numel() != n:
                raise ValueError(f"{scores.numel()} image scores for {n} labels")
        if (maps is None) != (masks is None):
            raise ValueError("maps and masks must be given together")
        pix = None
        if maps is not None and masks is not None:
            # Masks are only labelled (on the CPU): host masks never make a device round trip.
            pix = pixel_inputs(maps, masks, widen=self.mode == "binned", masks_on_device=False)
            if pix[0].shape[0] != n:
                raise ValueError(f"{pix[0].shape[0]} maps for {n} labels")
            if self.mode == "binned":  # (binning finds NaN class by class: before any state
                # changes; exact mode ranks the pixels, and finds it, when computing)
                bad = torch.isnan(pix[0]).flatten(1).any(1)
                if bool(bad.any()):
                    first = int(bad.nonzero()[0, 0])
                    raise ValueError(
                        f"class {names[first]!r}: anomaly maps contain NaN (image {first} of "
                        "the batch)"
                    )
        for name in dict.fromkeys(names):
            if name in self._states and self._states[name].finalized:
                raise ValueError(f"class {name!r} was finalized; it cannot take more samples")
        groups: dict[str, list[int]] = {}
        for i, name in enumerate(names):
            groups.setdefault(name, []).append(i)
        for name, rows in groups.items():
            state = self._states.get(name)
            if state is None:
                pixels: _ExactPixels | _BinnedPixels = (
                    _ExactPixels() if self.mode == "exact" else _BinnedPixels(self.num_bins)
                )
                state = self._states[name] = _ClassState(pixels, name)
            state.result = None
            sel = None if len(rows) == n else torch.tensor(rows)
            if scores is not None:  # labels only serve the image metrics
                state.scores.append(self._rows(scores, sel).clone())
                state.labels.append(self._rows(y, sel).clone())
            if pix is not None:
                state.pixels.add(self._rows(pix[0], sel), self._rows(pix[1], sel, move=False))
                state.has_pixels = True
                self._check_budget(state)

    def _check_budget(self, state: _ClassState) -> None:
        """Move an exact class past the device budget to the host."""
        pixels = state.pixels
        if not isinstance(pixels, _ExactPixels) or pixels.on_host or self.max_device_bytes is None:
            return
        held = pixels.device_nbytes()
        if not held:
            return
        budget = self.max_device_bytes
        if budget == "auto":
            budget = default_device_budget(pixels.maps[0].device)
        if budget is not None and held > budget:
            log.info(
                "class %r: %.2f GB of pixel scores, over the device budget (%.2f GB): kept on "
                "the host from now on",
                state.name,
                held / 1e9,
                budget / 1e9,
            )
            pixels.to_host()

    def _rows(self, t: torch.Tensor, rows: torch.Tensor | None, move: bool = True) -> torch.Tensor:
        if rows is not None:
            t = t[rows.to(t.device)]
        return t if self.device is None or not move else t.to(self.device)

    def finalize_class(self, cls_name: str) -> dict[str, float]:
        """Compute one class now and free its state; later updates to it raise ValueError.

        Returns that class's metrics. Lets class-by-class inference hold one class at a time.
        """
        state = self._states.get(cls_name)
        if state is None:
            raise KeyError(f"unknown class {cls_name!r}")
        if not state.finalized:
            self._class_result(state, release=True, scratch=self._scratch)
            state.pixels = _ExactPixels() if self.mode == "exact" else _BinnedPixels(self.num_bins)
            state.scores, state.labels = [], []
            state.finalized = True
        return self._result_for(state, self.aupro, self._scratch)[0]

    def class_result(
        self, cls_name: str, aupro: AuproDefinition | None = None
    ) -> tuple[dict[str, float], dict[str, float]]:
        """One class's ``(metrics, bounds)`` as :meth:`compute` reports them (bounds: binned
        mode's certified |exact - estimate|; 0 for exact values, NaN where undefined)."""
        definition = self.aupro if aupro is None else aupro
        check_definition(definition)
        state = self._states.get(cls_name)
        if state is None:
            raise KeyError(f"unknown class {cls_name!r}")
        return self._result_for(state, definition, self._scratch)

    def compute(self, aupro: AuproDefinition | None = None) -> MetricsReport:
        """Per-class metrics and their unweighted mean over the classes where each is defined.

        ``aupro`` overrides the definition for this call. Both definitions are computed from the
        same ranking and kept until the class's next update, so asking for the other one
        afterwards costs nothing. Undefined metrics are NaN.
        """
        definition = self.aupro if aupro is None else aupro
        check_definition(definition)
        per_class: dict[str, dict[str, float]] = {}
        bounds: dict[str, dict[str, float]] = {}
        scratch, self._scratch = self._scratch, {}  # one buffer for every class's sorted copy
        for name, state in self._states.items():
            per_class[name], bounds[name] = self._result_for(state, definition, scratch)
        del scratch
        return make_report(
            per_class,
            aupro=definition,
            mode=self.mode,
            bounds=bounds if self.mode == "binned" else None,
        )

    def _result_for(
        self, state: _ClassState, definition: str, scratch: dict
    ) -> tuple[dict[str, float], dict[str, float]]:
        values, bounds = self._class_result(state, release=False, scratch=scratch)
        return select_aupro(values, definition), select_aupro(bounds, definition)

    def _class_result(
        self, state: _ClassState, release: bool, scratch: dict
    ) -> tuple[dict[str, float], dict[str, float]]:
        if state.result is not None:
            return state.result
        values = dict.fromkeys((*IMAGE_METRICS, *PIXEL_KEYS), math.nan)
        bounds = dict(values)
        if state.scores:
            image = image_metrics(torch.cat(state.scores), torch.cat(state.labels))
            values.update(image)
            bounds.update({k: 0.0 for k, v in image.items() if not math.isnan(v)})
        if state.has_pixels:
            try:
                pv, pb = state.pixels.compute(self.max_fpr, self.num_thresholds, release, scratch)
            except ValueError as exc:  # (NaN maps, found as they are ranked: name the class)
                raise ValueError(f"class {state.name!r}: {exc}") from exc
            values.update(pv)
            bounds.update(pb)
        state.result = values, bounds
        return state.result
