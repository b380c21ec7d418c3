"""Fixtures shared by several test modules."""

from __future__ import annotations

import pytest

from crane.data import make_synthetic_dataset


@pytest.fixture(autouse=True)
def _own_cache_dir(tmp_path_factory, monkeypatch):
    """Each test's crane cache folder is a temporary one (loading a weight file records it
    there as verified), unless the test sets its own."""
    import os

    if "CRANE_CACHE_DIR" not in os.environ:
        monkeypatch.setenv("CRANE_CACHE_DIR", str(tmp_path_factory.mktemp("crane-cache")))


@pytest.fixture(scope="session")
def synth(tmp_path_factory):
    """A small synthetic MVTec-layout dataset (2 classes, 3 good + 5 anomalous test images
    each, with masks), shared read-only by the tests."""
    root = tmp_path_factory.mktemp("synth")
    make_synthetic_dataset(
        root, seed=0, classes=("tile", "plate"), n_train=2, n_test_good=3, n_test_bad=5, size=128
    )
    return root
