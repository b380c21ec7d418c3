"""The top-level ``crane`` API: every exported name resolves, and ``import crane`` stays light
(torch and the models load on first use)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"


def test_import_is_light_and_every_export_resolves():
    code = (
        "import sys, crane\n"
        "assert 'torch' not in sys.modules, 'import crane loaded torch'\n"
        "missing = [n for n in crane.__all__ if getattr(crane, n, None) is None]\n"
        "assert not missing, missing\n"
        "assert set(crane.__all__) <= set(dir(crane))\n"
        "assert crane.evaluate.__module__ == 'crane.engine.evaluate'\n"
        "assert crane.AnomalyDataset.__name__ == 'AnomalyDataset'\n"
        "print('ok')\n"
    )
    env = {**os.environ, "PYTHONPATH": str(SRC)}
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                       timeout=300, check=False)  # fmt: skip
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr


def test_package_is_marked_typed():
    assert (SRC / "crane" / "py.typed").is_file()  # PEP 561: type checkers read our hints
