"""TorchScript archives read as data (crane.models.torchscript) against torch.jit.load."""

from __future__ import annotations

import pickle
import shutil
import struct
import sys
import warnings
import zipfile
from collections import OrderedDict
from pathlib import Path

import pytest
import torch
from torch import nn

from crane.errors import WeightsError
from crane.models import torchscript
from crane.models import weights as W

pytestmark = pytest.mark.filterwarnings("ignore:.*jit:FutureWarning")


class Block(nn.Module):
    def __init__(self, shared: nn.Linear) -> None:
        super().__init__()
        self.shared = shared  # the same module under two owners
        self.proj = nn.Linear(8, 8, bias=False)
        self.norm = nn.LayerNorm(8)
        self.register_buffer("steps", torch.arange(3))  # int64 buffer
        self.register_buffer("flag", torch.tensor([True, False]))
        self.scale = 2  # an int attribute: not in the state dict
        self.mask = torch.full((8,), 0.5)  # a plain tensor attribute: not in the state dict

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.proj(self.shared(x)) * self.mask) * self.scale


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        shared = nn.Linear(8, 8)
        self.blocks = nn.ModuleList([Block(shared), Block(shared)])
        self.head = nn.Sequential(nn.Linear(8, 4), nn.GELU())
        # a non-contiguous parameter, and one in bf16
        self.embed = nn.Parameter(torch.randn(8, 5).t())
        self.half_weight = nn.Parameter(torch.randn(4).to(torch.bfloat16))
        self.register_buffer("empty", torch.zeros(0))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return self.head(x) + self.embed.sum() + self.half_weight.float().sum()


def _saved(tmp_path: Path, how: str, dtype: torch.dtype | None = None) -> Path:
    torch.manual_seed(0)
    net = Net().eval()
    with torch.no_grad():
        for p in net.parameters():  # distinct values everywhere, LayerNorm's included
            if p.dtype.is_floating_point:
                p.copy_(torch.randn(p.shape))
    if how == "trace":
        module = torch.jit.trace(net, torch.randn(2, 8), check_trace=False)
    else:
        module = torch.jit.script(net)
    if dtype is not None:
        module = module.to(dtype)
    path = tmp_path / f"{how}.pt"
    module.save(str(path))
    return path


def _assert_same(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert list(got) == list(want)
    for key, value in want.items():
        assert got[key].dtype == value.dtype, key
        assert got[key].shape == value.shape and got[key].stride() == value.stride(), key
        assert torch.equal(got[key], value), key


@pytest.mark.parametrize("how", ["trace", "script"])
@pytest.mark.parametrize("dtype", [None, torch.float16])
def test_equals_torch_jit_load(tmp_path, how, dtype):
    path = _saved(tmp_path, how, dtype)
    want = dict(torch.jit.load(str(path), map_location="cpu").state_dict())
    got = torchscript.read_state_dict(path)
    _assert_same(got, want)
    # the plain attributes are not state; the tied module is listed under both owners
    assert not any(k.endswith(".mask") or k.endswith(".scale") for k in got)
    assert "blocks.0.shared.weight" in got and "blocks.1.shared.weight" in got
    assert not got["embed"].is_contiguous()


def test_tensors_are_copy_on_write_views_of_the_file(tmp_path):
    path = _saved(tmp_path, "trace")
    before = path.read_bytes()
    got = torchscript.read_state_dict(path)
    got["head.0.weight"].add_(1.0)
    del got
    assert path.read_bytes() == before


def test_recompressed_archive_reads_the_same(tmp_path):
    path = _saved(tmp_path, "script")
    deflated = tmp_path / "deflated.pt"
    with zipfile.ZipFile(path) as src, zipfile.ZipFile(deflated, "w", zipfile.ZIP_DEFLATED) as dst:
        for info in src.infolist():
            dst.writestr(info.filename, src.read(info))
    _assert_same(torchscript.read_state_dict(deflated), torchscript.read_state_dict(path))


def _replace_member(path: Path, out: Path, name_end: str, data: bytes | None) -> None:
    with zipfile.ZipFile(path) as src, zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as dst:
        for info in src.infolist():
            if info.filename.endswith(name_end):
                if data is not None:
                    dst.writestr(info.filename, data)
            else:
                dst.writestr(info.filename, src.read(info))


class _Payload:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_code_in_the_pickle_is_refused_and_never_runs(tmp_path):
    """A data.pkl that calls a function (here: creating a file) is refused before the call;
    torch.jit.load would make it."""
    marker = tmp_path / "ran"
    evil = tmp_path / "ViT-L-14-336px.pt"
    _replace_member(_saved(tmp_path, "trace"), evil, "/data.pkl", pickle.dumps(_Payload(marker)))
    with pytest.raises(WeightsError, match=r"pathlib.*touch.*does not run their code"):
        W.load_state_dict_file(evil)
    assert not marker.exists()
    # the same pickle, unpickled by Python's own unpickler, would have run it
    with zipfile.ZipFile(evil) as zf:
        pickle.loads(zf.read(next(n for n in zf.namelist() if n.endswith("/data.pkl"))))
    assert marker.exists()


def test_custom_state_is_refused(tmp_path):
    class Stateful(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.weight = nn.Parameter(torch.ones(2))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x * self.weight

        @torch.jit.export
        def __getstate__(self) -> tuple[torch.Tensor, bool]:
            return (self.weight, self.training)

        @torch.jit.export
        def __setstate__(self, state: tuple[torch.Tensor, bool]) -> None:
            self.weight = state[0]
            self.training = state[1]

    path = tmp_path / "stateful.pt"
    torch.jit.script(Stateful()).save(str(path))
    with pytest.raises(WeightsError, match="custom __getstate__") as err:
        W.load_state_dict_file(path)
    # The file and the one-line conversion, as for an archive naming a global.
    assert str(path) in str(err.value) and "torch.jit.load('IN.pt').state_dict()" in str(err.value)


def test_damaged_archives_give_clear_errors(tmp_path):
    path = _saved(tmp_path, "trace")
    missing = tmp_path / "missing.pt"
    _replace_member(path, missing, "/data/3", None)  # a storage record gone
    with pytest.raises(WeightsError, match="cannot read weight file"):
        W.load_state_dict_file(missing)
    short = tmp_path / "short.pt"
    _replace_member(path, short, "/data/3", b"\0\0")
    with pytest.raises(WeightsError, match="cannot read weight file"):
        W.load_state_dict_file(short)
    big_endian = tmp_path / "big.pt"
    _replace_member(path, big_endian, "/byteorder", b"big")
    with pytest.raises(WeightsError, match="big-endian"):
        W.load_state_dict_file(big_endian)
    cut = tmp_path / "cut.pt"
    shutil.copy(path, cut)
    with open(cut, "r+b") as f:
        f.truncate(path.stat().st_size // 2)
    with pytest.raises(WeightsError, match="cannot read weight file"):
        W.load_state_dict_file(cut)


def test_no_jit_load_and_no_warning(tmp_path, monkeypatch):
    path = _saved(tmp_path, "trace")

    def refuse(*args, **kwargs):
        raise AssertionError("torch.jit.load was called")

    monkeypatch.setattr(torch.jit, "load", refuse)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        sd = W.load_state_dict_file(path)
    assert "blocks.0.proj.weight" in sd


# Crafted archives: what a hostile file could try (found by a review). Each must end in a
# WeightsError without building what it claims.


class _Obj:  # pickled as __torch__.M, a module record of the archive
    __module__ = "__torch__"
    __qualname__ = "M"

    def __init__(self, state):
        self.state = state

    def __reduce__(self):
        return (_Obj, (), self.state)


class _Stored:
    def __init__(self, key: str, numel: int):
        self.key, self.numel = key, numel


class _Tensor:
    def __init__(self, stored, offset, size, stride):
        self.args = (stored, offset, size, stride, False, OrderedDict())

    def __reduce__(self):
        return (torch._utils._rebuild_tensor_v2, self.args)


class _Call:
    def __init__(self, fn, args):
        self.fn, self.args = fn, args

    def __reduce__(self):
        return (self.fn, self.args)


class _Pickler(pickle.Pickler):
    def persistent_id(self, obj):
        return (
            ("storage", torch.FloatStorage, obj.key, "cpu", obj.numel)
            if isinstance(obj, _Stored)
            else None
        )


def _crafted(tmp_path, monkeypatch, root, storages, *, compress=zipfile.ZIP_STORED, code=None):
    import io
    import types

    module = types.ModuleType("__torch__")
    module.M = _Obj
    monkeypatch.setitem(sys.modules, "__torch__", module)  # (for pickle to name _Obj)
    buf = io.BytesIO()
    _Pickler(buf, protocol=2).dump(root)
    path = tmp_path / "crafted.pt"
    if code is None:
        code = 'class M(Module):\n  __parameters__ = ["p", ]\n  __buffers__ = []\n'
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("a/data.pkl", buf.getvalue())
        z.writestr("a/code/__torch__.py", code, compress_type=compress)
        for key, data in storages.items():
            z.writestr(f"a/data/{key}", data, compress_type=compress)
        z.writestr("a/constants.pkl", pickle.dumps(()))
    return path


def _one(n=1):
    return {"0": struct.pack(f"{n}f", *range(1, n + 1))}


def test_a_view_past_its_storage_is_refused_also_when_deflated(tmp_path, monkeypatch):
    """torch grows a resizable (inflated) storage to fit a view instead of refusing it: the
    file would claim gigabytes and bring uninitialised memory into the weights."""
    for compress in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED):
        root = _Obj({"p": _Tensor(_Stored("0", 4), 0, (1 << 30,), (1,))})
        path = _crafted(tmp_path, monkeypatch, root, _one(4), compress=compress)
        with pytest.raises(WeightsError) as info:
            W.load_state_dict_file(path)
        assert "past the end of its storage" in str(info.value.__cause__)
    fits = _crafted(tmp_path, monkeypatch, _Obj({"p": _Tensor(_Stored("0", 4), 1, (3,), (1,))}),
                    _one(4), compress=zipfile.ZIP_DEFLATED)  # fmt: skip
    assert torchscript.read_state_dict(fits)["p"].tolist() == [2.0, 3.0, 4.0]


@pytest.mark.parametrize("how", ["list", "ordered dict"])
def test_containers_built_from_tensors_are_refused(tmp_path, monkeypatch, how):
    """A one-value storage viewed with stride 0 as 2**40 values, handed to a list builder or
    OrderedDict: one Python object per value if it were let through."""
    import torch.jit._pickle as jit_pickle

    huge = _Tensor(_Stored("0", 1), 0, (1 << 40,), (0,))
    build = jit_pickle.build_intlist if how == "list" else OrderedDict
    call = _Call(build, (huge,))
    root = _Obj({"p": _Tensor(_Stored("0", 1), 0, (1,), (1,)), "x": call})
    with pytest.raises(WeightsError, match="damaged or holds what crane does not read"):
        W.load_state_dict_file(_crafted(tmp_path, monkeypatch, root, _one()))


def test_shared_modules_cannot_multiply_the_entries(tmp_path, monkeypatch):
    """Each level holding the level below twice: 2**60 paths in a pickle of 60 levels."""
    node = _Obj({"p": _Tensor(_Stored("0", 1), 0, (1,), (1,))})
    for _ in range(60):
        node = _Obj({"a": node, "b": node})
    with pytest.raises(WeightsError, match="over 1048576 entries"):
        W.load_state_dict_file(_crafted(tmp_path, monkeypatch, node, _one()))


def test_a_huge_memo_index_and_a_huge_code_file_are_refused(tmp_path, monkeypatch):
    path = tmp_path / "memo.pt"
    with zipfile.ZipFile(path, "w") as z:  # (NONE, LONG_BINPUT 2**31 - 1, STOP)
        z.writestr("a/data.pkl", b"N" + b"r" + struct.pack("<I", 2**31 - 1) + b".")
        z.writestr("a/constants.pkl", pickle.dumps(()))
    with pytest.raises(WeightsError) as info:
        W.load_state_dict_file(path)
    assert "memo index" in str(info.value.__cause__)
    bomb = "#" * (65 << 20)  # 65 MB of source, deflated to 64 KB
    root = _Obj({"p": _Tensor(_Stored("0", 1), 0, (1,), (1,))})
    path = _crafted(tmp_path, monkeypatch, root, _one(), compress=zipfile.ZIP_DEFLATED, code=bomb)
    with pytest.raises(WeightsError) as info:
        W.load_state_dict_file(path)
    assert "bytes of source" in str(info.value.__cause__)


class _Holder:  # a TorchScript class (below): its tensors are not in a state dict
    def __init__(self, t: torch.Tensor) -> None:
        self.t = t


with warnings.catch_warnings():
    warnings.simplefilter("ignore", FutureWarning)  # (torch.jit.script's deprecation)
    _Holder = torch.jit.script(_Holder)


class WithAttributes(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.randn(4))
        self.holder = _Holder(torch.ones(2))
        self.where = torch.device("cpu")
        self.z = complex(1, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.w + self.holder.t.sum()


class OddNamesAndDtypes(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.register_parameter("w]x", nn.Parameter(torch.randn(4)))
        self.register_buffer("sp ace", torch.randn(4))
        self.register_buffer("c", torch.randn(2, dtype=torch.complex64))
        self.register_buffer("u", torch.arange(4).to(torch.uint16))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + getattr(self, "w]x") + getattr(self, "sp ace")


def test_odd_modules_equal_torch_jit_load(tmp_path):
    scripted, traced = tmp_path / "scripted.pt", tmp_path / "traced.pt"
    torch.jit.script(WithAttributes()).save(str(scripted))
    torch.jit.trace(OddNamesAndDtypes(), torch.randn(4)).save(str(traced))
    for path, keys in ((scripted, ["w"]), (traced, ["w]x", "sp ace", "c", "u"])):
        want = dict(torch.jit.load(str(path), map_location="cpu").state_dict())
        assert list(want) == keys
        _assert_same(torchscript.read_state_dict(path), want)
