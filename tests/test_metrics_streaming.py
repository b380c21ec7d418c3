"""Streaming accumulators: exact mode equals the batch functions, binned mode within its bounds."""

from __future__ import annotations

import logging
import math

import numpy as np
import pytest
import torch
from data_fixtures import separable_blob_cases
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import ndimage

from crane.metrics import (
    METRICS,
    MetricAccumulator,
    aupro,
    image_metrics,
    pixel_metrics,
)

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def dataset(seed: int, n: int = 12, size: int = 24, classes=("a", "b", "c"), decimals=None):
    """Images of several classes, interleaved; about half anomalous with blob masks."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    masks = np.zeros((n, size, size), bool)
    labels = rng.random(n) < 0.6
    for i in np.flatnonzero(labels):
        for _ in range(rng.integers(1, 4)):
            cy, cx = rng.uniform(0, size, 2)
            ay, ax = rng.uniform(1.5, 6, 2)
            masks[i] |= ((yy - cy) / ay) ** 2 + ((xx - cx) / ax) ** 2 <= 1
    labels = masks.reshape(n, -1).any(1)
    maps = ndimage.gaussian_filter(rng.random((n, size, size)), (0, 1, 1)) + 0.25 * masks
    maps = np.clip(maps, 0.0, 1.0)
    if decimals is not None:
        maps = np.round(maps, decimals)
    scores = np.clip(rng.random(n) * 0.7 + 0.3 * labels, 0, 1)
    names = [classes[i] for i in rng.integers(0, len(classes), n)]
    return names, scores, labels, maps.astype(np.float32), masks


def batch_reference(names, scores, labels, maps, masks, aupro_def):
    out = {}
    for name in dict.fromkeys(names):
        idx = [i for i, c in enumerate(names) if c == name]
        out[name] = {
            **image_metrics(scores[idx], labels[idx]),
            **pixel_metrics(maps[idx], masks[idx], aupro=aupro_def),
        }
    return out


def feed(acc: MetricAccumulator, data, cuts, device="cpu") -> None:
    names, scores, labels, maps, masks = data
    bounds = [0, *sorted(cuts), len(names)]
    for lo, hi in zip(bounds, bounds[1:], strict=False):
        if hi > lo:
            acc.update(
                names[lo:hi],
                torch.from_numpy(scores[lo:hi]).to(device),
                labels[lo:hi],
                torch.from_numpy(maps[lo:hi]).to(device)[:, None],  # (B, 1, H, W) as models emit
                torch.from_numpy(masks[lo:hi]).to(device),
            )


def assert_close(a: dict, b: dict, tol: float) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert set(a[k]) >= set(b[k])
        for m, v in b[k].items():
            if math.isnan(v):
                assert math.isnan(a[k][m]), (k, m)
            else:
                assert abs(a[k][m] - v) <= tol, (k, m, a[k][m], v)


@settings(max_examples=20, deadline=None)
@given(
    seed=st.integers(0, 1000),
    cuts=st.lists(st.integers(0, 12), max_size=6),
    aupro_def=st.sampled_from(["mvtec", "legacy"]),
    decimals=st.sampled_from([None, 2]),
)
def test_exact_mode_equals_batch_functions_for_any_split(seed, cuts, aupro_def, decimals) -> None:
    data = dataset(seed, decimals=decimals)
    acc = MetricAccumulator(aupro=aupro_def)
    feed(acc, data, cuts)
    report = acc.compute()
    assert report.mode == "exact" and report.bounds is None
    assert_close(report.per_class, batch_reference(*data, aupro_def), 1e-12)


@pytest.mark.parametrize("device", DEVICES)
def test_exact_mode_on_device_and_definition_override(device: str) -> None:
    data = dataset(3, n=16)
    acc = MetricAccumulator(aupro="mvtec")
    feed(acc, data, [5, 6, 11], device=device)
    assert_close(acc.compute().per_class, batch_reference(*data, "mvtec"), 1e-12)
    legacy = acc.compute(aupro="legacy")
    assert legacy.aupro == "legacy"
    assert_close(legacy.per_class, batch_reference(*data, "legacy"), 1e-12)


def test_finalize_class_frees_state_and_keeps_results() -> None:
    data = dataset(5, n=16)
    names = data[0]
    acc = MetricAccumulator(aupro="legacy")
    feed(acc, data, [4, 9])
    before = acc.nbytes()
    first = names[0]
    values = acc.finalize_class(first)
    assert acc.nbytes() < before
    assert acc.finalize_class(first) == values
    ref = batch_reference(*data, "legacy")
    assert_close(acc.compute().per_class, ref, 1e-12)
    with pytest.raises(ValueError, match="finalized"):
        acc.update(first, [0.5], [0])
    # both AUPRO definitions were kept for the finalized class
    assert_close(acc.compute(aupro="mvtec").per_class, batch_reference(*data, "mvtec"), 1e-12)
    with pytest.raises(KeyError):
        acc.finalize_class("unknown")


def test_exact_memory_is_one_copy_of_the_maps_plus_anomalous_pixels() -> None:
    names, scores, labels, maps, masks = dataset(2, n=10, classes=("a",))
    acc = MetricAccumulator()
    acc.update(names, scores, labels, maps, masks)
    n_pos = int(masks.sum())
    expected = maps.nbytes + 8 * n_pos + 10 * (8 + 1)  # maps, pos score+region, image data
    assert expected <= acc.nbytes() <= expected + 8 * n_pos  # + 8 B per region
    half = MetricAccumulator()
    half.update(names, scores.astype(np.float32), labels, torch.from_numpy(maps).half(), masks)
    assert half.nbytes() < acc.nbytes() - maps.nbytes // 3  # float16 maps are kept as float16
    ref = pixel_metrics(torch.from_numpy(maps).half(), masks)
    assert_close(half.compute().per_class, {"a": ref}, 1e-12)


def test_undefined_classes_and_mean() -> None:
    rng = np.random.default_rng(0)
    maps = rng.random((6, 16, 16)).astype(np.float32)
    masks = np.zeros((6, 16, 16), bool)
    masks[0, 4:9, 4:9] = True
    acc = MetricAccumulator()
    # "good": both labels; "normal": only normal images; "pixel_only": all anomalous.
    acc.update(["good"] * 2, [0.9, 0.1], [1, 0], maps[:2], masks[:2])
    acc.update("normal", [0.3, 0.4], [0, 0], maps[2:4], masks[2:4])
    pix_masks = np.zeros((2, 16, 16), bool)
    pix_masks[:, :5] = True
    acc.update("pixel_only", [0.7, 0.8], [1, 1], maps[4:], pix_masks)
    acc.update("image_only", [0.2, 0.8], [0, 1])  # no maps
    acc.update("good", None, [1], maps[:1], masks[:1])  # maps without image scores
    report = acc.compute()
    assert all(math.isnan(report.per_class["normal"][m]) for m in METRICS)
    assert math.isnan(report.per_class["pixel_only"]["image_auroc"])
    assert not math.isnan(report.per_class["pixel_only"]["pixel_aupro"])
    assert math.isnan(report.per_class["image_only"]["pixel_auroc"])
    defined = [c for c in report.per_class if not math.isnan(report.per_class[c]["pixel_aupro"])]
    assert defined == ["good", "pixel_only"]
    expected = np.mean([report.per_class[c]["pixel_aupro"] for c in defined])
    assert report.mean["pixel_aupro"] == pytest.approx(expected)
    assert report.mean["image_auroc"] == pytest.approx(1.0)  # good and image_only: both 1.0
    assert acc.classes == ["good", "normal", "pixel_only", "image_only"]


def test_update_validation() -> None:
    acc = MetricAccumulator()
    maps = np.zeros((2, 4, 4), np.float32)
    with pytest.raises(ValueError, match="class names"):
        acc.update(["a"], [0.1, 0.2], [0, 1])
    with pytest.raises(ValueError, match="image scores"):
        acc.update("a", [0.1], [0, 1])
    with pytest.raises(ValueError, match="together"):
        acc.update("a", [0.1, 0.2], [0, 1], maps)
    with pytest.raises(ValueError, match="maps for"):
        acc.update("a", [0.1, 0.2], [0, 1], maps[:1], maps[:1])
    with pytest.raises(ValueError, match="NaN"):
        acc.update("a", [0.1, math.nan], [0, 1])
    assert acc.classes == []
    bad, masks = np.zeros((2, 4, 4), np.float32), np.zeros((2, 4, 4), bool)
    bad[1, 2, 3], masks[1, 0, 0] = math.nan, True
    acc.update("a", [0.1, 0.2], [0, 1], bad, masks)
    with pytest.raises(ValueError, match="NaN"):
        acc.compute()  # exact mode finds NaN when sorting (last place), at no extra pass
    with pytest.raises(ValueError, match="NaN"):
        MetricAccumulator(mode="binned").update("a", [0.1, 0.2], [0, 1], bad, masks)
    with pytest.raises(ValueError):
        MetricAccumulator(mode="fast")  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        MetricAccumulator(mode="binned", num_bins=1000)
    with pytest.raises(ValueError):
        MetricAccumulator(aupro="pro")  # type: ignore[arg-type]


def check_binned(data, aupro_def: str, num_bins: int) -> None:
    acc = MetricAccumulator(aupro=aupro_def, mode="binned", num_bins=num_bins)
    feed(acc, data, [3, 7])
    report = acc.compute()
    exact = batch_reference(*data, aupro_def)
    assert report.bounds is not None
    for name, ref in exact.items():
        got, bound = report.per_class[name], report.bounds[name]
        for metric, value in ref.items():
            if bound[metric] == math.inf:
                continue  # no certificate (too few bins to tell); the estimate may be NaN
            if math.isnan(value):
                assert math.isnan(got[metric])
                continue
            assert abs(got[metric] - value) <= bound[metric] + 1e-12, (name, metric, num_bins)
        if not math.isnan(ref["pixel_f1_max"]):
            assert got["pixel_f1_max"] <= ref["pixel_f1_max"] + 1e-12  # always a lower bound
    for metric, value in report.mean.items():
        if report.mean_bounds[metric] == math.inf:
            # Only when a class in the mean, or one the estimate may have wrongly left out,
            # has no finite bound.
            assert any(report.bounds[c][metric] == math.inf for c in exact), metric
            continue
        defined = [v[metric] for v in exact.values() if not math.isnan(v[metric])]
        if not defined:
            assert math.isnan(value)
            continue
        assert abs(value - np.mean(defined)) <= report.mean_bounds[metric] + 1e-12


@pytest.mark.parametrize("num_bins", [4, 64, 1024, 1 << 16])
@pytest.mark.parametrize("aupro_def", ["mvtec", "legacy"])
@pytest.mark.parametrize("seed", range(3))
def test_binned_mode_within_stated_bounds(seed: int, aupro_def: str, num_bins: int) -> None:
    check_binned(dataset(seed, n=16, size=32), aupro_def, num_bins)


@settings(max_examples=20, deadline=None)
@given(
    seed=st.integers(0, 1000),
    log_bins=st.integers(1, 14),
    aupro_def=st.sampled_from(["mvtec", "legacy"]),
    decimals=st.sampled_from([None, 1, 3]),
)
def test_binned_bounds_hold_property(seed, log_bins, aupro_def, decimals) -> None:
    check_binned(dataset(seed, decimals=decimals), aupro_def, 1 << log_bins)


def test_binned_undefined_estimate_of_a_defined_class_leaves_the_mean_unbounded() -> None:
    """Found by the property test: with 2 bins class c's legacy AUPRO cannot be estimated (the
    binned curve keeps one point), though the exact one is defined. The estimate is NaN with
    no finite bound, so the mean -- over the classes whose estimate is defined -- may average
    other classes than the exact mean: its bound is inf too (it was the mean of the other
    classes' bounds), and the JSON says so in a form strict parsers read."""
    import json

    data = dataset(402, decimals=1)
    acc = MetricAccumulator(aupro="legacy", mode="binned", num_bins=2)
    feed(acc, data, [3, 7])
    report = acc.compute()
    exact = batch_reference(*data, "legacy")
    assert not math.isnan(exact["c"]["pixel_aupro"])
    assert math.isnan(report.per_class["c"]["pixel_aupro"])
    assert report.bounds["c"]["pixel_aupro"] == math.inf
    assert report.mean_bounds["pixel_aupro"] == math.inf
    assert math.isfinite(report.mean_bounds["pixel_auroc"])
    out = json.loads(json.dumps(report.to_dict(), allow_nan=False))
    assert out["mean_bounds"]["pixel_aupro"] == "inf"
    assert out["per_class"]["c"]["pixel_aupro"] is None
    check_binned(data, "legacy", 2)


@pytest.mark.parametrize(
    ("x_bound", "mean_bound"), [(math.nan, 0.02), (0.0, 0.02), (math.inf, math.inf)]
)
def test_mean_bound_over_a_class_left_out(x_bound: float, mean_bound: float) -> None:
    """Class x's estimate is undefined: surely so for the exact value too (bound NaN or 0,
    the mean averages y and z either way) or perhaps not (bound inf: no bound on the mean)."""
    from crane.metrics.report import make_report

    values = {"x": {"pixel_auroc": math.nan}, "y": {"pixel_auroc": 0.8}, "z": {"pixel_auroc": 0.6}}
    bounds = {"x": {"pixel_auroc": x_bound}, "y": {"pixel_auroc": 0.01}, "z": {"pixel_auroc": 0.03}}
    report = make_report(values, aupro="mvtec", mode="binned", bounds=bounds)
    assert report.mean["pixel_auroc"] == pytest.approx(0.7)
    assert report.mean_bounds["pixel_auroc"] == pytest.approx(mean_bound)


def test_binned_bounds_shrink_with_bins() -> None:
    data = dataset(1, n=24, size=48)
    widths = []
    for k in (16, 256, 4096, 1 << 16):
        acc = MetricAccumulator(mode="binned", num_bins=k)
        feed(acc, data, [])
        bounds = acc.compute().mean_bounds
        assert bounds is not None
        widths.append(max(bounds[m] for m in ("pixel_auroc", "pixel_aupro")))
    assert widths == sorted(widths, reverse=True)
    assert widths[-1] < 1e-3


def test_binned_memory_is_bounded() -> None:
    acc = MetricAccumulator(mode="binned", num_bins=1024)
    data = dataset(0, n=12, classes=("a",))
    feed(acc, data, [6])
    held = acc.nbytes()
    feed(acc, data, [2])
    assert acc.nbytes() - held == 12 * (8 + 1)  # only the per-image scores and labels grow
    assert held < 3 * 8 * 1024 + 1000


def test_batch_aupro_of_concatenation_equals_streamed() -> None:
    names, scores, labels, maps, masks = dataset(9, classes=("x",))
    acc = MetricAccumulator(aupro="mvtec")
    for i in range(len(names)):  # one image at a time
        one = slice(i, i + 1)
        acc.update(names[i], scores[one], labels[one], maps[one], masks[one])
    assert abs(acc.compute().per_class["x"]["pixel_aupro"] - aupro(maps, masks)) < 1e-12


@pytest.mark.parametrize("mode", ["exact", "binned"])
def test_device_code_path_matches_cpu_path(monkeypatch: pytest.MonkeyPatch, mode: str) -> None:
    # CPU tensors take NumPy kernels; CUDA tensors the torch ones. Run the torch path on CPU
    # so it is covered without a GPU.
    from crane.metrics import _core

    data = dataset(4, n=16, decimals=2)
    results = []
    for torch_only in (False, True):
        monkeypatch.setattr(_core, "_TORCH_ONLY", torch_only)
        for aupro_def in ("mvtec", "legacy"):
            acc = MetricAccumulator(aupro=aupro_def, mode=mode)
            feed(acc, data, [5])
            report = acc.compute()
            results.append((report.per_class, report.bounds))
            if mode == "exact":
                assert_close(report.per_class, batch_reference(*data, aupro_def), 1e-12)
    for (a, a_bounds), (b, b_bounds) in zip(results[:2], results[2:], strict=True):
        assert_close(a, b, 1e-12)
        if a_bounds is not None:
            assert_close(a_bounds, b_bounds, 1e-12)


def test_flipped_numpy_inputs_and_empty_batches():
    """Negative-stride arrays (a flipped test-time augmentation) and zero images."""
    rng = np.random.default_rng(0)
    maps = rng.random((3, 8, 8)).astype(np.float32)
    masks = np.zeros((3, 8, 8), bool)
    masks[0, 2:4, 2:4] = True
    flipped = np.flip(maps, 2)
    assert pixel_metrics(flipped, np.flip(masks, 2)) == pixel_metrics(
        flipped.copy(), masks[..., ::-1].copy()
    )
    scores, labels = np.arange(3.0)[::-1], np.array([1, 0, 1])
    assert image_metrics(scores, labels) == image_metrics(scores.copy(), labels)
    for mode in ("exact", "binned"):
        acc = MetricAccumulator(mode=mode)
        acc.update("a", scores, labels, flipped, masks)
        ref = MetricAccumulator(mode=mode)
        ref.update("a", scores.copy(), labels, flipped.copy(), masks)
        assert acc.compute().per_class == ref.compute().per_class
    empty = pixel_metrics(np.zeros((0, 8, 8), np.float32), np.zeros((0, 8, 8), bool))
    assert all(math.isnan(v) for v in empty.values())


@pytest.mark.parametrize("mode", ["exact", "binned"])
def test_nan_maps_name_their_class_and_leave_the_other_classes_as_they_were(mode):
    rng = np.random.default_rng(1)
    maps = rng.random((4, 8, 8)).astype(np.float32)
    masks = np.zeros((4, 8, 8), bool)
    masks[:, 2:5, 2:5] = True
    labels = np.array([1, 0, 1, 0])
    acc = MetricAccumulator(mode=mode)
    acc.update(["a", "a", "b", "b"], rng.random(4), labels, maps, masks)
    before = acc.compute().per_class
    bad = maps.copy()
    bad[3, 0, 0] = np.nan  # an image of class "b"
    try:
        acc.update(["a", "a", "b", "b"], rng.random(4), labels, bad, masks)
    except ValueError as exc:  # binned: refused before any class takes the batch
        assert mode == "binned" and "class 'b': anomaly maps contain NaN (image 3" in str(exc)
        assert acc.compute().per_class == before
    else:  # exact: found when the pixels are ranked, naming the class
        assert mode == "exact"
        with pytest.raises(ValueError, match="class 'b': anomaly maps contain NaN"):
            acc.compute()


def test_num_bins_above_2_to_the_24_are_refused():
    MetricAccumulator(mode="binned", num_bins=1 << 24)
    with pytest.raises(ValueError, match="at most 2\\*\\*24"):
        MetricAccumulator(mode="binned", num_bins=1 << 25)


def test_binned_auroc_bound_does_not_wrap_on_huge_bins() -> None:
    # One bin with 3e9 normal and 4e9 anomalous pixels: the tied pairs (1.2e19) pass int64.
    from crane.metrics.binned import binned_pixel_metrics

    k = 4
    hist_all = torch.tensor([0, 7_000_000_000, 0, 0], dtype=torch.int64)
    hist_pos = torch.tensor([0, 4_000_000_000, 0, 0], dtype=torch.int64)
    weight = torch.zeros(k, dtype=torch.float64)
    values, bounds = binned_pixel_metrics(hist_all, hist_pos, weight, 0, (0.3, 0.3))
    assert values["pixel_auroc"] == pytest.approx(0.5)
    assert bounds["pixel_auroc"] == pytest.approx(0.5)  # all pairs tied: |exact - 0.5| <= 0.5


def test_binned_bounds_hold_when_no_bin_mixes_classes() -> None:
    # Anomalous pixels all at 0.9, normal ones below 0.5: the binned curve is exact (bound 0)
    # up to float rounding, which the stated bound must still cover.
    for maps, masks in separable_blob_cases(60):
        exact = aupro(maps, masks)
        acc = MetricAccumulator(mode="binned", num_bins=256)
        acc.update("c", None, masks.reshape(4, -1).any(1), maps, masks)
        report = acc.compute()
        got, bound = report.per_class["c"]["pixel_aupro"], report.bounds["c"]["pixel_aupro"]
        assert abs(got - exact) <= bound


@pytest.mark.parametrize("dtype", [np.int64, np.uint64])
def test_integer_scores_ranked_exactly_or_refused(dtype) -> None:
    base = 2**40  # exact in float64: ranked as given
    ok = np.array([base, base + 1, base + 2, base + 3], dtype=dtype)
    assert image_metrics(ok, [0, 1, 0, 1])["image_auroc"] == pytest.approx(0.75)
    big = np.array([2**62, 2**62 + 1, 2**62 + 2, 2**62 + 3], dtype=dtype)  # float64 ties them
    with pytest.raises(ValueError, match="2\\*\\*53"):
        image_metrics(big, [0, 1, 0, 1])
    with pytest.raises(ValueError, match="2\\*\\*53"):
        MetricAccumulator().update("c", big, [0, 1, 0, 1])


def _assert_reports_equal(got, want) -> None:
    for name, values in want.per_class.items():
        for key, value in values.items():
            assert got.per_class[name][key] == pytest.approx(value, abs=1e-12, nan_ok=True)


def test_classes_past_the_device_budget_move_to_the_host(monkeypatch, caplog):
    """(Simulated on the CPU: every tensor counts as device memory.) A class whose pixel state
    passes max_device_bytes is moved to the host, with what it receives later; same results."""
    import crane.metrics.streaming as S

    data = dataset(3, n=12)
    ref = MetricAccumulator()
    feed(ref, data, [4, 8])
    held = sorted(s.pixels.nbytes() for s in ref._states.values())
    budget = held[len(held) // 2] - 1  # (some classes pass it, some do not)
    monkeypatch.setattr(S, "_on_accelerator", lambda t: True)
    acc = MetricAccumulator(max_device_bytes=budget)
    with caplog.at_level(logging.INFO, logger="crane.metrics.streaming"):
        feed(acc, data, [4, 8])
    spilled = {n for n, s in acc._states.items() if s.pixels.on_host}
    big = {n for n, s in ref._states.items() if s.pixels.nbytes() > budget}
    assert spilled == big and 0 < len(spilled) < len(held)
    assert "over the device budget" in caplog.text
    _assert_reports_equal(acc.compute(), ref.compute())
    none = MetricAccumulator(max_device_bytes=None)
    feed(none, data, [4, 8])
    assert not any(s.pixels.on_host for s in none._states.values())
    with pytest.raises(ValueError, match="max_device_bytes"):
        MetricAccumulator(max_device_bytes=-1)


def test_a_class_that_does_not_fit_the_device_to_rank_is_ranked_on_the_host(monkeypatch, caplog):
    """(Simulated on the CPU.) Out of device memory while ranking a class: its state moves to
    the host and the ranking is done there, same results; finalize_class still frees it."""
    import crane.metrics.streaming as S

    data = dataset(4, n=12)
    ref = MetricAccumulator()
    feed(ref, data, [6])
    monkeypatch.setattr(S, "_on_accelerator", lambda t: True)
    real, calls = S.sorted_scores, []

    def sorted_scores(*args, **kw):
        calls.append(1)
        if len(calls) == 1:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return real(*args, **kw)

    monkeypatch.setattr(S, "sorted_scores", sorted_scores)
    acc = MetricAccumulator(max_device_bytes=None)
    feed(acc, data, [6])
    first = data[0][0]
    with caplog.at_level(logging.WARNING, logger="crane.metrics.streaming"):
        got = acc.finalize_class(first)
    assert "ranking them on the host" in caplog.text
    assert acc._states[first].pixels.nbytes() == 0
    for key, value in ref.class_result(first)[0].items():
        assert got[key] == pytest.approx(value, abs=1e-12, nan_ok=True)
    _assert_reports_equal(acc.compute(), ref.compute())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_classes_past_the_device_budget_move_to_the_host() -> None:
    data = dataset(5, n=12)
    ref = MetricAccumulator()
    feed(ref, data, [4, 8])
    acc = MetricAccumulator(max_device_bytes=3000)
    feed(acc, data, [4, 8], device="cuda")
    states = acc._states.values()
    assert any(s.pixels.on_host for s in states)
    assert all(t.device.type == "cpu" for s in states if s.pixels.on_host for t in s.pixels.maps)
    _assert_reports_equal(acc.compute(), ref.compute())
