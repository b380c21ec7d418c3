"""A batch that runs out of device memory: ``scoring_forward`` runs it again in halves and keeps
the size that fit for later batches, so ``predict`` and ``evaluate`` give the results of a run
that never ran out; an image that does not fit alone, or maps too large to resize, stop the run
with an error that names the fixes. The out-of-memory errors are planted (no GPU here): torch
raises the same ``torch.cuda.OutOfMemoryError`` from its CUDA allocator."""

from __future__ import annotations

import logging
import math

import numpy as np
import pytest
import torch
from PIL import Image

import crane.engine.predict as predict_module
from crane.data import AnomalyDataset
from crane.engine.evaluate import evaluate
from crane.engine.predict import Detector
from crane.engine.runtime import scoring_forward
from crane.errors import CraneError
from crane.models import create_model

SIZE = 56
OOM = torch.cuda.OutOfMemoryError  # (torch.OutOfMemoryError since torch 2.5: the same class)


def plant_oom(model, most: int, error=None):
    """Make ``model`` raise an out-of-memory error (CUDA's, or ``error()``) for batches of more
    than ``most`` images (``most`` read at each call: a list of one), recording every batch
    size it is given."""
    real, sizes = model.forward, []

    def forward(x, *args, **kwargs):
        sizes.append(x.shape[0])
        if x.shape[0] > most[0]:
            raise (
                error or (lambda: OOM("CUDA out of memory. Tried to allocate 2.00 GiB (planted)"))
            )()
        return real(x, *args, **kwargs)

    model.forward = forward
    return sizes


def oom_warnings(caplog):
    return [r for r in caplog.records if "out of cpu memory for a batch" in r.getMessage()]


def test_batches_that_run_out_of_memory_run_in_parts_with_the_same_results(caplog):
    model = create_model("tiny+", image_size=SIZE, seed=0).eval()
    x = torch.randn(5, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref_scores, ref_maps = scoring_forward(model, torch.device("cpu"))(x)
        most = [2]
        sizes = plant_oom(model, most)
        forward = scoring_forward(model, torch.device("cpu"))
        with caplog.at_level(logging.WARNING):
            scores, maps = forward(x)
        assert sizes == [5, 2, 2, 1]  # the batch, then halves of it (the last part smaller)
        torch.testing.assert_close(scores, ref_scores, rtol=0, atol=1e-5)
        torch.testing.assert_close(maps, ref_maps, rtol=0, atol=1e-5)
        assert scores.shape == (5,) and maps.shape == (5, SIZE, SIZE)
        (warning,) = oom_warnings(caplog)
        assert "batch of 5 images: running 2 at a time" in warning.getMessage()
        assert "--batch-size" in warning.getMessage()
        # Later batches start at the size that fit: no failed try, no new warning.
        sizes.clear()
        with caplog.at_level(logging.WARNING):
            scores, _ = forward(x[:3])
        assert sizes == [2, 1] and len(oom_warnings(caplog)) == 1
        torch.testing.assert_close(scores, ref_scores[:3], rtol=0, atol=1e-5)
        # Less memory again: halved further, one more warning.
        most[0] = 1
        sizes.clear()
        with caplog.at_level(logging.WARNING):
            scores, _ = forward(x)
        assert sizes == [2, 1, 1, 1, 1, 1]  # one failed try of 2; the next part starts at 1
        assert len(oom_warnings(caplog)) == 2
        assert "batch of 2 images: running 1 at a time" in oom_warnings(caplog)[1].getMessage()
        torch.testing.assert_close(scores, ref_scores, rtol=0, atol=1e-5)


def test_an_image_that_does_not_fit_alone_is_a_clear_error():
    model = create_model("tiny", image_size=SIZE, seed=0).eval()
    plant_oom(model, [0])
    forward = scoring_forward(model, torch.device("cpu"))
    with torch.no_grad(), pytest.raises(CraneError) as err:
        forward(torch.randn(3, 3, SIZE, SIZE))
    msg = str(err.value)
    assert f"out of cpu memory for a single {SIZE}×{SIZE} image" in msg
    assert "Tried to allocate 2.00 GiB (planted)" in msg
    assert "--precision bf16" in msg and "--device" in msg
    assert "\n" not in msg


def test_the_cpu_allocators_error_is_out_of_memory_too_and_other_errors_pass(caplog):
    """torch's CPU allocator raises a plain RuntimeError, not OutOfMemoryError: it is split
    the same way; any other RuntimeError reaches the caller unchanged, without a retry."""
    model = create_model("tiny", image_size=SIZE, seed=0).eval()
    x = torch.randn(4, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref_scores, ref_maps = scoring_forward(model, torch.device("cpu"))(x)
        cpu_oom = (
            "[enforce fail at alloc_cpu.cpp:127] err == 0. DefaultCPUAllocator: can't allocate "
            "memory: you tried to allocate 8589934592 bytes. Error code 12 (Cannot allocate memory)"
        )
        sizes = plant_oom(model, [2], lambda: RuntimeError(cpu_oom))
        with caplog.at_level(logging.WARNING):
            scores, maps = scoring_forward(model, torch.device("cpu"))(x)
        assert sizes == [4, 2, 2]
        torch.testing.assert_close(scores, ref_scores, rtol=0, atol=1e-5)
        torch.testing.assert_close(maps, ref_maps, rtol=0, atol=1e-5)
        assert len(oom_warnings(caplog)) == 1

        model = create_model("tiny", image_size=SIZE, seed=0).eval()
        sizes = plant_oom(model, [2], lambda: RuntimeError("shape mismatch (planted)"))
        with pytest.raises(RuntimeError, match=r"^shape mismatch \(planted\)$"):
            scoring_forward(model, torch.device("cpu"))(x)
        assert sizes == [4]


def test_a_batch_wide_threshold_is_not_split():
    """With the reference's batch-wide D-Attn threshold an image's results depend on its
    batch: a batch that runs out of memory stops the run with a clear error rather than
    being split into parts that would score differently."""
    model = create_model("tiny+", image_size=SIZE, seed=0, dattn_threshold_scope="batch").eval()
    sizes = plant_oom(model, [2])
    with torch.no_grad(), pytest.raises(CraneError) as err:
        scoring_forward(model, torch.device("cpu"))(torch.randn(4, 3, SIZE, SIZE))
    assert sizes == [4]
    msg = str(err.value)
    assert "batch of 4 images" in msg and "--batch-size" in msg
    assert "dattn_threshold_scope='batch'" in msg and "\n" not in msg


def _images(tmp_path, n=5):
    rng = np.random.default_rng(1)
    paths = []
    for i in range(n):
        p = tmp_path / f"{i}.png"
        Image.fromarray(rng.integers(0, 256, (60 + 8 * i, 64, 3), dtype=np.uint8)).save(p)
        paths.append(p)
    return paths


def test_predict_goes_on_through_out_of_memory_batches(tmp_path, caplog):
    paths = _images(tmp_path)
    ref = Detector(create_model("tiny+", image_size=SIZE, seed=0), device="cpu", batch_size=4)
    expected = ref.predict(paths)
    model = create_model("tiny+", image_size=SIZE, seed=0)
    sizes = plant_oom(model, [1])
    det = Detector(model, device="cpu", batch_size=4)
    with caplog.at_level(logging.WARNING):
        got = det.predict(paths)
    assert max(sizes) == 4 and set(sizes[1:]) <= {1, 2}  # one failed try of 4, then parts
    assert len(oom_warnings(caplog)) == 2  # 4 → 2, then 2 → 1
    assert [p.path for p in got] == [p.path for p in expected]
    for a, b in zip(got, expected, strict=True):
        assert math.isclose(a.score, b.score, abs_tol=1e-5)
        assert a.anomaly_map.shape == b.anomaly_map.shape
        np.testing.assert_allclose(a.anomaly_map, b.anomaly_map, rtol=0, atol=1e-5)


def test_maps_too_large_to_resize_name_the_fixes(tmp_path, monkeypatch):
    paths = _images(tmp_path, 2)

    def resize_maps(maps, height, width):
        raise OOM("CUDA out of memory. Tried to allocate 12.00 GiB (planted)")

    monkeypatch.setattr(predict_module, "resize_maps", resize_maps)
    det = Detector(create_model("tiny", image_size=SIZE, seed=0), device="cpu", batch_size=2)
    with pytest.raises(CraneError) as err:
        det.predict(paths)
    msg = str(err.value)
    assert "resizing a batch's 2 anomaly maps" in msg and "up to 68×64 px" in msg
    assert "--map-size model" in msg and "--batch-size" in msg and "12.00 GiB" in msg


def test_evaluate_goes_on_through_out_of_memory_batches(synth):
    ds = AnomalyDataset(synth, "test", image_size=SIZE)
    kw = dict(device="cpu", batch_size=4, progress=False)
    ref = evaluate(create_model("tiny+", image_size=SIZE, seed=0), ds, **kw).report
    model = create_model("tiny+", image_size=SIZE, seed=0)
    sizes = plant_oom(model, [2])
    got = evaluate(model, ds, **kw).report
    assert 4 in sizes and max(sizes) == 4 and sizes.count(4) == 1
    assert got.per_class.keys() == ref.per_class.keys()
    for cls, metrics in ref.per_class.items():
        for name, value in metrics.items():
            assert math.isclose(got.per_class[cls][name], value, abs_tol=1e-6), (cls, name)
