"""The tensors of a TorchScript archive, read as data: nothing in the archive runs.

OpenAI publishes its CLIP weights (``ViT-L-14-336px.pt``) as TorchScript archives. open_clip,
and crane before, opened them with ``torch.jit.load``, which compiles the archive's code and
runs its ``__setstate__`` methods: a file from an untrusted source could run code that way.
``torch.load(weights_only=True)`` refuses TorchScript archives, and no library reads their
tensors without TorchScript, so this module does, from the format's three parts:

* ``<archive>/data.pkl``, a pickle of the module tree. It is unpickled with an allowlist in
  the way of torch's ``weights_only`` unpickler: TorchScript module objects become plain records
  of their attributes, tensors are rebuilt from storages, and any other global is refused.
* ``<archive>/data/<key>``, the storages, stored uncompressed. They are memory-mapped
  (as ``torch.load(mmap=True)`` maps a plain torch file) rather than read whole, so building a
  model copies the weights straight from the page cache.
* ``<archive>/code/__torch__/...py``, the modules' TorchScript source, read as *text* only for
  each class's ``__parameters__ = [...]`` and ``__buffers__ = [...]`` lines: the attributes that
  ``torch.jit.load(f).state_dict()`` returns. (A traced module also keeps plain tensor
  attributes, such as OpenAI's per-block ``attn_mask``, that are not in its state dict.)

The result equals ``torch.jit.load(f, map_location="cpu").state_dict()`` key for key, value for
value and dtype for dtype (tested on traced and scripted archives written by torch).
"""

from __future__ import annotations

import ast
import io
import pickle
import pickletools
import re
import sys
import zipfile
from collections import OrderedDict
from pathlib import Path

import torch

from crane.errors import WeightsError

# The storage classes a pickle names, by dtype: torch's pickler writes the ScalarType's name
# followed by "Storage" (``torch.FloatStorage``, ``torch.Float8_e4m3fnStorage``).
_STORAGE_DTYPES = {
    f"{name}Storage": dtype
    for name, dtype in (
        ("Double", "float64"),
        ("Float", "float32"),
        ("Half", "float16"),
        ("BFloat16", "bfloat16"),
        ("ComplexHalf", "complex32"),
        ("ComplexFloat", "complex64"),
        ("ComplexDouble", "complex128"),
        ("Long", "int64"),
        ("Int", "int32"),
        ("Short", "int16"),
        ("Char", "int8"),
        ("Byte", "uint8"),
        ("Bool", "bool"),
        ("UInt16", "uint16"),
        ("UInt32", "uint32"),
        ("UInt64", "uint64"),
        ("Float8_e4m3fn", "float8_e4m3fn"),
        ("Float8_e5m2", "float8_e5m2"),
        ("Float8_e4m3fnuz", "float8_e4m3fnuz"),
        ("Float8_e5m2fnuz", "float8_e5m2fnuz"),
    )  # fmt: skip
    for dtype in [getattr(torch, dtype, None)]
    if dtype is not None
}
_CLASS = re.compile(r"^class (\w+)\(Module\):[^\n]*\n((?:[ \t][^\n]*\n|\n)*)", re.M)
_DECLARED = re.compile(r"^[ \t]+(?:__parameters__|__buffers__) = (\[.*\])[ \t]*$", re.M)
# Limits no real archive comes near, against crafted ones: the source read per code file,
# and the entries of the state dict (a shared submodule is listed once per path to it: a
# chain of them doubles the count at each level).
_MAX_CODE_BYTES = 64 << 20
_MAX_ENTRIES = 1 << 20


class _ScriptObject:
    """A TorchScript object of the archive, as data: its class name and pickled state."""

    qualname = ""

    def __setstate__(self, state: object) -> None:
        self.state = state


class _Storage:
    """What a persistent id resolves to: bytes of the archive viewed as one dtype."""

    def __init__(self, untyped: torch.UntypedStorage, dtype: torch.dtype) -> None:
        self.untyped, self.dtype = untyped, dtype


class _StorageType:
    def __init__(self, dtype: torch.dtype) -> None:
        self.dtype = dtype


def _ints(values, what: str) -> tuple[int, ...]:
    if not (isinstance(values, tuple) and all(type(v) is int and v >= 0 for v in values)):
        raise pickle.UnpicklingError(f"a tensor's {what} is not a tuple of counts")
    return values


def _rebuild_tensor(storage, offset, size, stride, requires_grad=False, hooks=None, meta=None):
    """A view of a storage of the archive, which it must lie within (checked here: torch
    would grow a resizable storage to fit a view instead)."""
    if not isinstance(storage, _Storage):
        raise pickle.UnpicklingError("a tensor without a storage of the archive")
    (offset,), size = _ints((offset,), "offset"), _ints(size, "size")
    stride = _ints(stride, "stride")
    if len(size) != len(stride):
        raise pickle.UnpicklingError("a tensor's size and stride differ in length")
    last = offset + sum((n - 1) * st for n, st in zip(size, stride, strict=True))
    if all(size) and last >= storage.untyped.nbytes() // storage.dtype.itemsize:
        raise pickle.UnpicklingError("a tensor reaches past the end of its storage")
    return torch.empty(0, dtype=storage.dtype).set_(storage.untyped, offset, size, stride)


def _rebuild_parameter(data, requires_grad=False, hooks=None):
    return data


def _restore_type_tag(value, type_str=None):
    return value


def _build_list(data):
    if type(data) is not list:  # (a tensor would become one Python object per element)
        raise pickle.UnpicklingError("a typed list built from something else than a list")
    return data


def _ordered_dict(*args):
    if args:  # (the pickler writes OrderedDict() and fills it with SETITEMS)
        raise pickle.UnpicklingError("an OrderedDict built from arguments")
    return OrderedDict()


def _device(kind, index=None):
    if not isinstance(kind, str) or not (index is None or type(index) is int):
        raise pickle.UnpicklingError("a device that is not a name and an index")
    return kind if index is None else f"{kind}:{index}"


def _complex(real=0.0, imag=0.0):
    if not all(type(v) in (int, float) for v in (real, imag)):
        raise pickle.UnpicklingError("a complex number of something else than numbers")
    return complex(real, imag)


#: Every other global a pickle may name: ``(module, name) -> what it stands for``
#: (``torch.jit._pickle``'s helpers: what older archives call for typed lists).
_ALLOWED = {
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("collections", "OrderedDict"): _ordered_dict,
    ("torch", "device"): _device,
    ("builtins", "complex"): _complex,
    ("torch.jit._pickle", "restore_type_tag"): _restore_type_tag,
    **{
        ("torch.jit._pickle", f"build_{kind}list"): _build_list
        for kind in ("int", "double", "bool", "tensor")
    },
}


class _Unpickler(pickle.Unpickler):
    def __init__(self, data: bytes, storage) -> None:
        super().__init__(io.BytesIO(data))
        self._storage = storage
        self._classes: dict[str, type] = {}

    def find_class(self, module: str, name: str):
        if module == "__torch__" or module.startswith("__torch__."):
            qual = f"{module}.{name}"
            if qual not in self._classes:
                self._classes[qual] = type(name, (_ScriptObject,), {"qualname": qual})
            return self._classes[qual]
        if module == "torch" and name in _STORAGE_DTYPES:
            return _StorageType(_STORAGE_DTYPES[name])
        if (module, name) in _ALLOWED:
            return _ALLOWED[module, name]
        raise _Refused(f"{module}.{name}")

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"):
            raise pickle.UnpicklingError(f"unknown persistent id {pid!r}")
        _, kind, key, _location, numel = pid
        if not isinstance(kind, _StorageType) or not isinstance(key, str):
            raise pickle.UnpicklingError(f"unknown storage {pid!r}")
        return self._storage(key, kind.dtype, int(numel))


class _Refused(pickle.UnpicklingError):
    pass


def _declarations(zf: zipfile.ZipFile, prefix: str) -> dict[str, tuple[str, ...]]:
    """``{qualified class name: its parameter and buffer names}`` from the archive's code,
    read as text."""
    code = f"{prefix}code/"
    out: dict[str, tuple[str, ...]] = {}
    for info in zf.infolist():
        name = info.filename
        if not (name.startswith(code) and name.endswith(".py")):
            continue
        if info.file_size > _MAX_CODE_BYTES:
            raise pickle.UnpicklingError(f"{name} is {info.file_size} bytes of source")
        module = name[len(code) : -3].replace("/", ".")
        text = zf.read(info).decode("utf-8", errors="replace")
        for cls in _CLASS.finditer(text):
            names: list[str] = []
            for items in _DECLARED.findall(cls.group(2)):
                try:  # (a literal list of strings: read, never run)
                    listed = ast.literal_eval(items)
                except (ValueError, SyntaxError) as exc:
                    raise pickle.UnpicklingError(f"unreadable declaration in {name}") from exc
                if not (isinstance(listed, list) and all(isinstance(n, str) for n in listed)):
                    raise pickle.UnpicklingError(f"unreadable declaration in {name}")
                names += listed
            out[f"{module}.{cls.group(1)}"] = tuple(names)
    return out


def _check_memo(data: bytes) -> None:
    """Refuse memo indices beyond what the pickle could fill (the C unpickler allocates its
    memo up to the largest index it is given: 9 bytes could ask for gigabytes)."""
    for op, arg, _pos in pickletools.genops(data):
        if op.name in ("PUT", "BINPUT", "LONG_BINPUT") and int(arg) > len(data):
            raise pickle.UnpicklingError(f"memo index {arg} in a {len(data)}-byte pickle")


def _record_offset(f, info: zipfile.ZipInfo) -> int:
    """Where a stored (uncompressed) member's bytes start in the file: after its local header,
    whose name and extra fields may differ in length from the central directory's."""
    f.seek(info.header_offset)
    head = f.read(30)
    if len(head) != 30 or head[:4] != b"PK\x03\x04":
        raise pickle.UnpicklingError(f"bad zip header for {info.filename}")
    return (
        info.header_offset
        + 30
        + int.from_bytes(head[26:28], "little")
        + int.from_bytes(head[28:30], "little")
    )


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """The parameters and buffers of the TorchScript archive at ``path``, as
    ``torch.jit.load(path, map_location="cpu").state_dict()`` gives them, without running the
    archive's code. Tensors are views of the memory-mapped file (copy-on-write: writing to
    them does not change the file). Raises :class:`~crane.errors.WeightsError` for an archive
    that holds anything besides modules and tensors, or is damaged."""
    path = Path(path)
    size = path.stat().st_size
    with zipfile.ZipFile(path) as zf, open(path, "rb") as raw_file:
        infos = {i.filename: i for i in zf.infolist()}
        roots = [n for n in infos if n.endswith("data.pkl") and n.count("/") <= 1]
        if len(roots) != 1:
            raise WeightsError(f"{path} is not a TorchScript archive (no single data.pkl)")
        prefix = roots[0][: -len("data.pkl")]
        order = zf.read(f"{prefix}byteorder").strip() if f"{prefix}byteorder" in infos else None
        if order not in (None, sys.byteorder.encode()):
            raise WeightsError(f"{path} was written on a {order.decode()}-endian machine")
        declared = _declarations(zf, prefix)
        data = zf.read(roots[0])
        _check_memo(data)
        mapped: list[torch.UntypedStorage] = []
        storages: dict[str, _Storage] = {}

        def storage(key: str, dtype: torch.dtype, numel: int) -> _Storage:
            if key in storages:
                return _Storage(storages[key].untyped, dtype)
            info = infos.get(f"{prefix}data/{key}")
            nbytes = numel * dtype.itemsize
            if info is None or numel < 0 or info.file_size < nbytes:
                raise pickle.UnpicklingError(f"storage {key!r} is missing or short in the archive")
            if info.compress_type == zipfile.ZIP_STORED:
                if not mapped:  # (copy-on-write: nothing written reaches the file)
                    mapped.append(torch.UntypedStorage.from_file(str(path), False, size))
                start = _record_offset(raw_file, info)
                if start + nbytes > size:
                    raise pickle.UnpicklingError(f"storage {key!r} runs past the end of the file")
                untyped = mapped[0][start : start + nbytes]
            else:  # (a re-zipped archive: inflated, as far as the storage reaches)
                with zf.open(info) as member:
                    raw = bytearray(member.read(nbytes))
                if len(raw) != nbytes:
                    raise pickle.UnpicklingError(f"storage {key!r} is short in the archive")
                untyped = torch.frombuffer(raw, dtype=torch.uint8) if raw else torch.empty(0)
                untyped = untyped.untyped_storage()
            storages[key] = _Storage(untyped, dtype)
            return storages[key]

        try:
            root = _Unpickler(data, storage).load()
        except _Refused as exc:
            raise _more_than_data(path, f"it names {exc}") from None
    if not isinstance(root, _ScriptObject):
        raise WeightsError(f"{path}: the archive's data.pkl does not hold a module")
    out: dict[str, torch.Tensor] = {}
    try:
        _collect(root, "", declared, out, set(), [_MAX_ENTRIES])
    except _CustomState as exc:
        raise _more_than_data(path, str(exc)) from None
    return out


class _CustomState(Exception):
    """A module whose state only its own code can read (see :func:`_collect`)."""


def _more_than_data(path, what: str) -> WeightsError:
    return WeightsError(
        f"{path} is a TorchScript archive that holds more than modules and tensors ({what}); "
        "crane reads such archives as data and does not run their code. Where you trust the "
        'file, convert it once to a state dict: python -c "import torch; '
        "torch.save(torch.jit.load('IN.pt').state_dict(), 'OUT.pt')\""
    )


def _collect(
    obj: _ScriptObject, prefix: str, declared, out: dict, above: set[int], budget: list[int]
) -> None:
    """A module's parameters and buffers, then its submodules', in ``state_dict`` order (a
    module held twice is listed under both names, as torch lists it). Objects of classes the
    code does not declare as modules (TorchScript classes) hold no state-dict entries; an
    archive without code gives every tensor attribute."""
    if id(obj) in above:
        raise WeightsError(f"the archive's module tree loops back at {prefix or 'the root'}")
    budget[0] -= 1
    if budget[0] < 0:
        raise WeightsError(f"the archive's module tree has over {_MAX_ENTRIES} entries")
    state = getattr(obj, "state", None)
    if not isinstance(state, dict):
        raise _CustomState(
            f"its {obj.qualname} keeps its state in a form only its own code reads, a custom "
            "__getstate__"
        )
    names = declared.get(obj.qualname)
    if names is None:  # (no source for the class: every tensor attribute)
        names = tuple(k for k, v in state.items() if isinstance(v, torch.Tensor))
    for name in names:
        value = state.get(name)
        if isinstance(value, torch.Tensor):
            out[prefix + name] = value
    for name, value in state.items():
        if isinstance(value, _ScriptObject) and (not declared or value.qualname in declared):
            _collect(value, f"{prefix}{name}.", declared, out, above | {id(obj)}, budget)
