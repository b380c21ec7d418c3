"""The Detector as a library user calls it: one input or many, streams, closing while an
iteration runs, arguments that cannot apply to a model object, and the result records."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from PIL import Image

from crane.engine.predict import Detector, Failure, Prediction, run_predict
from crane.errors import CraneError, ImageReadError
from crane.models import create_model, save_model

SIZE = 56


@pytest.fixture(scope="module")
def model():
    return create_model("tiny", image_size=SIZE, seed=2).eval()


def _frame(i: int, h: int = 40, w: int = 48) -> np.ndarray:
    return np.random.default_rng(i).integers(0, 256, (h, w, 3), dtype=np.uint8)


def test_predict_iter_takes_one_input_or_a_batch_as_predict_does(model, tmp_path):
    """One array, tensor or path is one input (not its rows, channels or characters); a 4-D
    one is a batch of images."""
    path = tmp_path / "a.png"
    Image.fromarray(_frame(1)).save(path)
    det = Detector(model, device="cpu", batch_size=2)
    (want,) = det.predict(path)
    for one in (_frame(1), torch.from_numpy(_frame(1)).permute(2, 0, 1), str(path), path):
        got = list(det.predict_iter(one))
        assert len(got) == 1 and isinstance(got[0], Prediction)
        assert got[0].score == pytest.approx(want.score, abs=1e-6)
    batch = np.stack([_frame(k) for k in range(3)])
    got = list(det.predict_iter(batch))
    assert len(got) == 3 and all(r.anomaly_map.shape == (40, 48) for r in got)
    assert [r.score for r in got] == pytest.approx([r.score for r in det.predict(batch)], abs=1e-6)


@pytest.mark.parametrize("workers", [0, 2])
def test_predict_iter_scores_a_stream_as_it_comes(model, workers):
    """An endless generator (camera frames): results come a few batches behind the frames
    read, never after the whole input."""
    pulled = itertools.count()

    def frames():
        for i in itertools.count():
            if next(pulled) > 200:  # (the old behaviour: the whole stream read first)
                raise AssertionError("predict_iter reads the whole stream before scoring")
            yield _frame(i)

    det = Detector(model, device="cpu", batch_size=2, workers=workers)
    try:
        it = det.predict_iter(frames())
        got = list(itertools.islice(it, 5))
        it.close()
        assert all(isinstance(r, Prediction) for r in got)
        read = next(pulled)
        assert read <= 5 + 2 * 2 * max(workers, 1) * 2 + 4, read  # a few chunks ahead at most
        # The same frames as a list: the same scores, in order.
        ref = Detector(model, device="cpu", batch_size=2).predict([_frame(i) for i in range(5)])
        assert [r.score for r in got] == pytest.approx([r.score for r in ref], abs=1e-6)
    finally:
        det.close()


def test_closing_while_an_iteration_runs_waits_for_it(model):
    """close() (or leaving the with block) while a predict_iter is still consumed: the
    iteration keeps its workers and gives every result; they stop when it ends."""
    xs = [_frame(i, 40 + 4 * i) for i in range(12)]
    with Detector(model, device="cpu", batch_size=2, workers=2) as det:
        it = det.predict_iter(xs)
        first = next(it)
        det.close()  # deferred: the iteration is running
        assert det._loader is not None
    rest = list(it)
    assert len([first, *rest]) == 12 and all(isinstance(r, Prediction) for r in rest)
    assert [r.anomaly_map.shape[0] for r in [first, *rest]] == [40 + 4 * i for i in range(12)]
    assert det._loader is None  # stopped once the iteration ended
    det.close()  # (nothing left to stop)


def test_arguments_that_cannot_apply_to_a_model_object_are_refused(model, tmp_path):
    run = save_model(create_model("tiny", image_size=SIZE, seed=9), tmp_path / "run")
    for kwargs in ({"prompts": str(run)}, {"clip_weights": "x.pt"}, {"attn_type": "vv"}):
        with pytest.raises(CraneError, match=f"{next(iter(kwargs))} apply to a model the Detector"):
            Detector(model, device="cpu", **kwargs)
    for bad in ("8", 2.0, True):
        with pytest.raises(CraneError, match="batch_size and workers must be integers"):
            Detector(model, device="cpu", batch_size=bad)


def test_run_predict_takes_one_folder_as_a_string(model, tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    for k in range(2):
        Image.fromarray(_frame(k)).save(images / f"{k}.png")
    det = Detector(model, device="cpu")
    summary = run_predict(det, str(images), tmp_path / "out", progress=False)
    assert summary["n_images"] == 2
    summary = run_predict(det, images, tmp_path / "out2", progress=False)
    assert summary["n_images"] == 2


def test_missing_files_and_closed_images_are_read_errors(model, tmp_path):
    det = Detector(model, device="cpu", batch_size=2)
    with pytest.raises(ImageReadError, match="does not exist"):
        det.predict(tmp_path / "missing.png")
    path = tmp_path / "a.png"
    Image.fromarray(_frame(3)).save(path)
    closed = Image.open(path)
    closed.close()
    got = list(det.predict_iter([_frame(4), closed, _frame(5)]))
    assert [type(r) for r in got] == [Prediction, Failure, Prediction]
    assert got[1].path == "<input 1>" and got[1].reason == "unreadable"


def test_predictions_compare_without_an_error(model):
    det = Detector(model, device="cpu")
    a, b = det.predict([_frame(6), _frame(6)])
    assert a == a and a != b  # (by identity: the maps are not compared element-wise)
    assert a.score == b.score and np.array_equal(a.anomaly_map, b.anomaly_map)


@pytest.mark.parametrize("workers", [0, 2])
def test_a_stream_that_fails_gives_every_result_before_the_error(model, workers):
    """The inputs' iterable raising (a camera disconnecting): every input read before it
    gets its result, in order, then the error is raised; the Detector stays usable."""

    def frames():
        for i in range(10):
            yield _frame(i)
        raise ValueError("camera disconnected")

    det = Detector(model, device="cpu", batch_size=2, workers=workers)
    try:
        got = []
        with pytest.raises(ValueError, match="camera disconnected"):
            for r in det.predict_iter(frames()):
                got.append(r)
        assert len(got) == 10 and all(isinstance(r, Prediction) for r in got)
        ref = Detector(model, device="cpu", batch_size=2).predict([_frame(i) for i in range(10)])
        assert [r.score for r in got] == pytest.approx([r.score for r in ref], abs=1e-6)
        assert len(det.predict([_frame(0), _frame(1)])) == 2  # (still usable)
    finally:
        det.close()


def test_a_detector_built_from_a_full_size_preset_gets_the_released_prompts(
    monkeypatch, tmp_path, caplog
):
    """As the CLI does: without ``prompts``, a full-size preset gets the released prompts
    (random ones gave meaningless scores silently); given prompts, a run directory and the
    tiny presets are left as they are."""
    import logging

    from crane.engine import predict as predict_module

    built: list[tuple[str, object]] = []

    def spy(name, prompts=None, **kw):
        built.append((name, prompts))
        return create_model("tiny", image_size=56)

    monkeypatch.setattr(predict_module, "create_model", spy)
    with caplog.at_level(logging.INFO, logger="crane.engine.predict"):
        for name in ("crane+", "crane"):
            assert Detector(name, device="cpu").prompts == "official:mvtec"
    assert "prompts: official:mvtec" in caplog.text
    assert Detector("crane+", prompts="official:visa", device="cpu").prompts == "official:visa"
    Detector("tiny", device="cpu")
    run = tmp_path / "run"
    save_model(create_model("tiny", image_size=56), run)
    Detector(run, device="cpu")
    assert [p for _, p in built] == [
        "official:mvtec",
        "official:mvtec",
        "official:visa",
        None,
        None,
    ]


@pytest.mark.parametrize("workers", [0, 1])
def test_predict_and_evaluate_leave_the_global_rng_alone(model, tmp_path, workers):
    """A seeded program draws the same numbers whatever it predicted in between."""
    from crane.data import make_synthetic_dataset
    from crane.data.dataset import AnomalyDataset
    from crane.engine.evaluate import evaluate

    make_synthetic_dataset(tmp_path / "d", classes=("tile",), n_train=1, n_test_good=2,
                           n_test_bad=2, size=32)  # fmt: skip
    ds = AnomalyDataset(tmp_path / "d", "test", image_size=model.cfg.image_size)
    torch.manual_seed(0)
    want = torch.rand(3)
    with Detector(model, device="cpu", workers=workers) as det:
        torch.manual_seed(0)
        det.predict([_frame(0), _frame(1)])
        det.predict(_frame(2))
        evaluate(model, ds, device="cpu", workers=workers, progress=False)
        assert torch.equal(torch.rand(3), want)
