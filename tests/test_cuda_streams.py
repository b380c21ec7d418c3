"""Stream use in the CUDA-only code, checked on the source (no GPU is needed to see these
mistakes, and the CPU test suite never runs that code).

An event recorded or a stream taken without naming the device uses the *current* device's
stream: cuda:0's for a model on "cuda:1" unless the caller switched devices, so the side
stream that waits on such an event would copy results before the GPU has computed them."""

from __future__ import annotations

import ast
from pathlib import Path

import crane

SRC = Path(crane.__file__).parent


def _calls(attr: str):
    for path in sorted(SRC.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Attribute)
                and node.func.attr == attr
            ):
                yield f"{path.relative_to(SRC)}:{node.lineno}", node


def test_cuda_events_are_recorded_on_a_named_stream():
    found = list(_calls("record"))
    assert found, "the predict and evaluate loops record events"
    bare = [where for where, node in found if not node.args and not node.keywords]
    assert not bare, f"Event.record() without a stream: {bare}"


def test_current_stream_names_its_device():
    found = list(_calls("current_stream"))
    assert found
    bare = [where for where, node in found if not node.args and not node.keywords]
    assert not bare, f"current_stream() without a device: {bare}"
