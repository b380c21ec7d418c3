"""AUPRO (mvtec and legacy) against plain re-implementations of their definitions."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from data_fixtures import separable_blob_cases
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from scipy import ndimage
from skimage import measure
from sklearn.metrics import auc

from crane.metrics import aupro, label_regions, pixel_metrics

TOL = 1e-6


def ref_aupro_mvtec(maps: np.ndarray, masks: np.ndarray, max_fpr: float = 0.3) -> float:
    """Straightforward MVTec AUPRO: every distinct score a threshold (descending)."""
    regions, normal = [], []
    for amap, mask in zip(maps, masks, strict=True):
        labeled, n = ndimage.label(mask, structure=np.ones((3, 3)))
        normal.append(amap[labeled == 0])
        regions += [amap[labeled == k] for k in range(1, n + 1)]
    normal = np.concatenate(normal).astype(np.float64)
    fprs, pros = [0.0], [0.0]
    for t in np.unique(maps)[::-1]:
        fprs.append(float(np.mean(normal >= t)))
        pros.append(float(np.mean([np.mean(r >= t) for r in regions])))
    area = 0.0
    for i in range(len(fprs) - 1):
        x0, y0, x1, y1 = fprs[i], pros[i], fprs[i + 1], pros[i + 1]
        if x1 <= max_fpr:
            area += (x1 - x0) * (y0 + y1) / 2
        else:
            if x0 < max_fpr:  # interpolate the segment that crosses max_fpr
                y_cut = y0 + (y1 - y0) * (max_fpr - x0) / (x1 - x0)
                area += (max_fpr - x0) * (y0 + y_cut) / 2
            break
    return area / max_fpr


def ref_aupro_legacy(maps: np.ndarray, masks: np.ndarray, max_step: int = 200) -> float:
    """The naive legacy loop (cal_pro_score): relabel every mask at every threshold."""
    binary = np.zeros_like(maps, dtype=bool)
    # float64 thresholds (the count the reference's torch.arange(min.item(), ...) produces)
    lo, hi = float(maps.min()), float(maps.max())
    pros, fprs = [], []
    inverse = 1 - masks.astype(np.int64)
    for th in np.arange(lo, hi, (hi - lo) / max_step):
        binary[maps <= th], binary[maps > th] = 0, 1
        pro = []
        for b, mask in zip(binary, masks, strict=True):
            for region in measure.regionprops(measure.label(mask.astype(np.int64))):
                pro.append(b[region.coords[:, 0], region.coords[:, 1]].sum() / region.area)
        fprs.append(np.logical_and(inverse, binary).sum() / inverse.sum())
        pros.append(np.mean(pro))
    fprs, pros = np.array(fprs), np.array(pros)
    keep = fprs < 0.3
    x = fprs[keep]
    return float(auc((x - x.min()) / (x.max() - x.min()), pros[keep]))


def blob_case(seed: int, n: int = 6, size: int = 32, decimals: int | None = None):
    """Masks with a few (sometimes touching / diagonal) rectangles and ellipses."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    masks = np.zeros((n, size, size), bool)
    for i in range(n):
        for _ in range(rng.integers(0, 4)):
            cy, cx = rng.uniform(0, size, 2)
            ay, ax = rng.uniform(1, 7, 2)
            masks[i] |= ((yy - cy) / ay) ** 2 + ((xx - cx) / ax) ** 2 <= 1
        if i % 3 == 0:
            masks[i, 2, 2] = masks[i, 3, 3] = True  # diagonal neighbours: one region
    masks[0, 10:14, 10:14] = True  # at least one region overall
    signal = rng.uniform(0, 0.6)
    maps = ndimage.gaussian_filter(rng.random((n, size, size)), (0, 1, 1)) + signal * masks
    if decimals is not None:
        maps = np.round(maps, decimals)
    return maps, masks


def test_regions_are_8_connected_like_skimage() -> None:
    mask = np.zeros((1, 6, 6), bool)
    mask[0, 1, 1] = mask[0, 2, 2] = mask[0, 4, 4] = True
    flat, region, areas = label_regions(torch.from_numpy(mask))
    assert list(areas) == [2, 1] and list(flat) == [7, 14, 28] and list(region) == [0, 0, 1]
    assert measure.label(mask[0]).max() == 2  # skimage's default is full (8-) connectivity
    _, masks = blob_case(5)
    flat, region, areas = label_regions(masks)
    assert areas.size == sum(measure.label(m).max() for m in masks)
    assert np.array_equal(flat, np.flatnonzero(masks))
    expected = sorted(r.area for m in masks for r in measure.regionprops(measure.label(m)))
    assert sorted(areas) == expected


@pytest.mark.parametrize("decimals", [None, 2, 1])
@pytest.mark.parametrize("seed", range(4))
def test_mvtec_matches_reference(seed: int, decimals: int | None) -> None:
    # The reference is quadratic in the number of distinct scores: smaller maps if continuous.
    size = 32 if decimals else 20
    maps, masks = blob_case(seed, size=size, decimals=decimals)
    ref = ref_aupro_mvtec(maps, masks)
    assert abs(aupro(maps, masks, "mvtec") - ref) < TOL
    maps32 = maps.astype(np.float32)
    assert abs(aupro(maps32, masks) - ref_aupro_mvtec(maps32, masks)) < TOL


@pytest.mark.parametrize("max_fpr", [0.05, 0.3, 1.0])
def test_mvtec_integration_limit(max_fpr: float) -> None:
    maps, masks = blob_case(11, decimals=2)
    assert abs(aupro(maps, masks, max_fpr=max_fpr) - ref_aupro_mvtec(maps, masks, max_fpr)) < TOL


@pytest.mark.parametrize("decimals", [None, 2])
@pytest.mark.parametrize("seed", range(3))
def test_legacy_matches_naive_loop(seed: int, decimals: int | None) -> None:
    maps, masks = blob_case(seed, n=4, size=24, decimals=decimals)
    assert abs(aupro(maps, masks, "legacy") - ref_aupro_legacy(maps, masks)) < TOL


def test_legacy_matches_naive_loop_float32() -> None:
    # float32 maps: thresholds stay float64 as in NumPy; the comparison is still exact.
    maps, masks = blob_case(7, n=4, size=24)
    maps = maps.astype(np.float32)
    assert abs(aupro(torch.from_numpy(maps), masks, "legacy") - ref_aupro_legacy(maps, masks)) < TOL


@settings(max_examples=15, deadline=None)
@given(
    seed=st.integers(0, 10_000),
    transform=st.sampled_from(["cubic", "exp", "logit"]),
)
def test_mvtec_invariant_under_increasing_transforms(seed: int, transform: str) -> None:
    maps, masks = blob_case(seed, n=3, size=20, decimals=2)
    maps = np.clip(maps / maps.max(), 0, 1)
    f = {
        "cubic": lambda x: x**3 + x,
        "exp": np.exp,
        "logit": lambda x: np.log((x + 0.01) / (1.01 - x)),
    }[transform]
    assert abs(aupro(f(maps), masks) - aupro(maps, masks)) < 1e-12
    # pixel AUROC / F1 too
    a, b = pixel_metrics(f(maps), masks), pixel_metrics(maps, masks)
    assert a["pixel_auroc"] == b["pixel_auroc"] and a["pixel_f1_max"] == b["pixel_f1_max"]


@settings(max_examples=15, deadline=None)
@given(
    seed=st.integers(0, 10_000),
    scale=st.floats(0.01, 100.0),
    shift=st.floats(-10.0, 10.0),
)
def test_legacy_invariant_under_affine_transforms_only(
    seed: int, scale: float, shift: float
) -> None:
    # Legacy thresholds are equally spaced between min and max, so they follow an affine map
    # of the scores but not a nonlinear one: only positive affine transforms are invariant --
    # and only while np.arange's rounding yields the same count (200 or 201) of thresholds.
    maps, masks = blob_case(seed, n=3, size=20)  # continuous scores: no score sits on a threshold
    moved = scale * maps + shift
    assume(n_legacy_thresholds(moved) == n_legacy_thresholds(maps))
    assert abs(aupro(moved, masks, "legacy") - aupro(maps, masks, "legacy")) < 1e-9


def n_legacy_thresholds(maps: np.ndarray) -> int:
    lo, hi = float(maps.min()), float(maps.max())
    return len(np.arange(lo, hi, (hi - lo) / 200))


def test_legacy_keeps_the_references_201st_threshold() -> None:
    # Found by the property test above: for this scale np.arange makes 201 thresholds, the
    # extra one just below the maximum; the reference uses it too, so the value moves.
    maps, masks = blob_case(296, n=3, size=20)
    scaled = 20.484375 * maps
    assert (n_legacy_thresholds(maps), n_legacy_thresholds(scaled)) == (200, 201)
    assert abs(aupro(scaled, masks, "legacy") - ref_aupro_legacy(scaled, masks)) < TOL
    assert abs(aupro(scaled, masks, "legacy") - aupro(maps, masks, "legacy")) > 1e-4


def test_legacy_not_invariant_under_nonlinear_transform() -> None:
    maps, masks = blob_case(3, n=4, size=24)
    a = aupro(maps, masks, "legacy")
    assert abs(aupro(np.exp(8 * maps), masks, "legacy") - a) > 1e-4


def test_perfect_maps() -> None:
    _, masks = blob_case(2)
    binary = masks.astype(np.float64)
    assert aupro(binary, masks, "mvtec") == pytest.approx(1.0, abs=1e-12)
    separated = np.where(masks, 0.7, 0.1) + 0.2 * np.random.default_rng(0).random(masks.shape)
    for definition in ("mvtec", "legacy"):
        assert aupro(separated, masks, definition) == pytest.approx(1.0, abs=1e-12)
    # Binary maps give legacy a single FPR value (0) below 0.3: the reference's min-max
    # rescaling divides by zero, so it is undefined there, not 1.
    assert math.isnan(aupro(binary, masks, "legacy"))


def test_inverted_maps() -> None:
    _, masks = blob_case(2)
    inverted = np.where(masks, 0.1, 0.7) + 0.2 * np.random.default_rng(0).random(masks.shape)
    for definition in ("mvtec", "legacy"):
        assert aupro(inverted, masks, definition) == pytest.approx(0.0, abs=1e-12)
    assert pixel_metrics(inverted, masks)["pixel_auroc"] == 0.0


def test_uninformative_maps_give_half_the_limit() -> None:
    # Scores independent of the masks: PRO(t) ~ FPR(t), area ~ 0.3^2 / 2 / 0.3 = 0.15.
    rng = np.random.default_rng(0)
    masks = np.zeros((20, 64, 64), bool)
    masks[:, 16:48, 16:48] = True
    value = aupro(rng.random(masks.shape), masks)
    assert abs(value - 0.15) < 0.01


def test_undefined_cases() -> None:
    maps, masks = blob_case(1)
    for definition in ("mvtec", "legacy"):
        assert math.isnan(aupro(maps, np.zeros_like(masks), definition))  # no region
        assert math.isnan(aupro(maps, np.ones_like(masks), definition))  # no normal pixel
    assert math.isnan(aupro(np.full(masks.shape, 0.5), masks, "legacy"))  # constant maps
    # One tie group: the MVTec curve is the diagonal (0,0)-(1,1), area 0.3^2/2 / 0.3.
    assert aupro(np.full(masks.shape, 0.5), masks, "mvtec") == pytest.approx(0.15)


def test_empty_masks_of_normal_images_count_for_fpr_only() -> None:
    maps, masks = blob_case(4, decimals=3)
    extra_maps = np.round(np.random.default_rng(1).random((3, *maps.shape[1:])), 3)
    all_maps = np.concatenate([maps, extra_maps])
    all_masks = np.concatenate([masks, np.zeros_like(masks[:3])])
    for definition, ref in (("mvtec", ref_aupro_mvtec), ("legacy", None)):
        got = aupro(all_maps, all_masks, definition)
        if ref is not None:
            assert abs(got - ref(all_maps, all_masks)) < TOL
        assert got != aupro(maps, masks, definition)


def test_torch_input_on_available_device() -> None:
    maps, masks = blob_case(8, decimals=2)
    ref = ref_aupro_mvtec(maps, masks)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    t_maps = torch.from_numpy(maps).to(device)
    t_masks = torch.from_numpy(masks).to(device)
    assert abs(aupro(t_maps, t_masks) - ref) < TOL
    assert abs(aupro(t_maps, t_masks, "legacy") - aupro(maps, masks, "legacy")) < 1e-12


@pytest.mark.parametrize("kwargs", [{"max_fpr": 30}, {"max_fpr": -0.3}, {"max_fpr": 0},
                                    {"num_thresholds": 0}])  # fmt: skip
def test_out_of_range_fpr_limit_or_thresholds_refused(kwargs) -> None:
    maps, masks = blob_case(2)
    for definition in ("mvtec", "legacy"):
        with pytest.raises(ValueError, match="max_fpr|num_thresholds"):
            aupro(maps, masks, definition, **kwargs)
    with pytest.raises(ValueError, match="max_fpr|num_thresholds"):
        pixel_metrics(maps, masks, **kwargs)


def test_perfect_maps_give_at_most_one() -> None:
    # Many regions of different areas: the 1/area weights summed over a perfect map round
    # to 1 + a few ulps for some seeds (seen 1.0000000000000002 before the clip).
    for maps, masks in separable_blob_cases(60):
        for definition in ("mvtec", "legacy"):
            assert aupro(maps, masks, definition) <= 1.0
