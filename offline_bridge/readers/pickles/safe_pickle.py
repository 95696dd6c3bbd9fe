"""Allow-list unpickling for the pickles inside a checkpoint (`.metadata`, `common.pt`, chunk records): the
standard library's unpickler with our own `find_class` (pickle's documented way to restrict it), not
`torch.load(weights_only=True)`, which needs torch and would build torch and numpy objects on the pickle's say.

Nothing a pickle names is imported or called unless it is on the allow-list below. torch and DCP classes
are replaced by inert records (so reading metadata needs no torch import); Megatron classes are stubbed
as records that only store what the pickle hands them; numpy's names get stand-ins that build plain
numbers only (`safe_numpy`); anything else raises `UnsafePickleError`. Before the C unpickler runs, its
opcodes are walked once (`pickle_bounds`): what it would allocate, nest or copy on the pickle's say-so is
bounded by the pickle's size.
"""

from __future__ import annotations

import argparse
import collections
import io
import operator
import pathlib
import pickle
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ...dtypes import DType, by_storage_class, by_torch_name
from ...errors import CheckpointError, UnsafePickleError
from .pickle_bounds import HashDepth, check_nesting, check_opcodes

__all__ = ["Record", "StorageRef", "TensorRef", "TorchSize", "safe_loads"]

NUMPY_MODULES = ("numpy", "numpy.core.multiarray", "numpy._core.multiarray")


class Record:
    """An inert stand-in for a pickled class: keeps constructor args and state, runs nothing."""

    _qualname = "Record"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.args = args
        self.__dict__.update(kwargs)

    def __setstate__(self, state: Any) -> None:
        if isinstance(state, tuple) and len(state) == 2 and (state[0] is None or isinstance(state[0], dict)):
            state = {**(state[0] or {}), **(state[1] or {})}
        if isinstance(state, dict):
            self.__dict__.update(state)
        else:
            self.state = state

    def __repr__(self) -> str:
        fields = ", ".join(f"{k}={v!r}" for k, v in self.__dict__.items() if k != "args")
        return f"{self._qualname}({fields})"


class TensorProperties(Record):
    """DCP's TensorProperties pickles its fields as a tuple."""

    _qualname = "TensorProperties"

    def __setstate__(self, state: Any) -> None:
        if isinstance(state, tuple):
            self.dtype = state[0]
        else:
            super().__setstate__(state)


class TorchSize(tuple):
    """Stand-in for ``torch.Size``."""


@dataclass(frozen=True)
class StorageRef:
    """A storage named by a torch.save pickle; its bytes live in the archive member ``data/<key>``."""

    dtype: DType
    key: str
    numel: int


@dataclass(frozen=True)
class TensorRef:
    """What ``torch._utils._rebuild_tensor_v2`` would have built, as plain numbers."""

    storage: StorageRef
    storage_offset: int
    shape: tuple[int, ...]
    stride: tuple[int, ...]


def _rebuild_tensor(storage: StorageRef, storage_offset: int, size: Any, stride: Any, *_: Any) -> TensorRef:
    if not isinstance(storage, StorageRef):
        raise UnsafePickleError(f"a tensor is rebuilt from {type(storage).__name__}, not a storage")
    return TensorRef(
        storage, operator.index(storage_offset), tuple(map(operator.index, size)), tuple(map(operator.index, stride))
    )


def _layout(name: str) -> str:
    return name


def _latin1_bytes(text: str, encoding: str = "utf-8") -> bytes:
    """Protocol-2 pickles spell `bytes` (numpy rng state, say) as `_codecs.encode(text, "latin1")`."""
    if encoding not in ("latin1", "latin-1"):
        raise UnsafePickleError(f"_codecs.encode with {encoding!r} is not how pickle spells bytes")
    return text.encode("latin1")


def _bytearray(data: Any = b"", *rest: Any) -> bytearray:
    """`bytearray` of given bytes only: `bytearray(n)` would allocate n bytes on the pickle's say-so."""
    if isinstance(data, int):
        raise UnsafePickleError(f"bytearray({data}) would allocate memory instead of restoring bytes")
    return bytearray(data, *rest)


def _record_class(module: str, name: str) -> type[Record]:
    base = TensorProperties if name == "TensorProperties" else Record
    return type(name, (base,), {"_qualname": f"{module}.{name}"})


_DCP_MODULES = (
    "torch.distributed.checkpoint.metadata",
    "torch.distributed.checkpoint.filesystem",
    "torch.distributed.checkpoint.planner",
    "torch.distributed._shard.sharded_tensor.metadata",
    "torch.distributed._shard.metadata",
)
_REAL = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("argparse", "Namespace"): argparse.Namespace,
    ("pathlib", "PosixPath"): pathlib.PosixPath,
    ("pathlib._local", "PosixPath"): pathlib.PosixPath,  # pickled by Python >= 3.13
    ("pathlib", "WindowsPath"): pathlib.PureWindowsPath,
    ("pathlib", "Path"): pathlib.Path,
    ("builtins", "set"): set,
    ("builtins", "frozenset"): frozenset,
    ("builtins", "slice"): slice,
    ("builtins", "complex"): complex,
    ("builtins", "bytearray"): _bytearray,
    ("_io", "BytesIO"): io.BytesIO,  # Transformer Engine's _extra_state in legacy checkpoints
    ("torch", "Size"): TorchSize,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
    ("torch.serialization", "_get_layout"): _layout,
    ("_codecs", "encode"): _latin1_bytes,
}
_HASHING = (set, frozenset, collections.OrderedDict, TorchSize)
_STUB_PREFIXES = ("megatron.", "nemo.", "transformer_engine.", "modelopt.")


class _Unpickler(pickle.Unpickler):
    def __init__(self, file: io.BufferedIOBase, source: str) -> None:
        super().__init__(file)
        self._source = source
        self._classes: dict[tuple[str, str], type] = {}
        self._depths = HashDepth()

    def _hashing(self, factory: Callable[..., Any]) -> Callable[..., Any]:
        """``factory`` (a set, a mapping, a tuple), its arguments checked first not to nest too deep: it
        hashes its members (or its result will be hashed), and hashing a deep tuple crashes the interpreter."""

        def build(*args: Any) -> Any:
            self._depths.check_items(*args)
            return factory(*args)

        return build

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _REAL:
            found = _REAL[(module, name)]
            return self._hashing(found) if found in _HASHING else found
        if module == "torch":
            dtype = by_torch_name(name) or by_storage_class(name)
            if dtype is not None:
                return dtype
        if module in NUMPY_MODULES:
            from .safe_numpy import numpy_global  # numpy is imported only for pickles that name it

            found = numpy_global(name)
            if found is not None:
                return found
        if module in _DCP_MODULES or module.startswith(_STUB_PREFIXES):
            return self._classes.setdefault((module, name), _record_class(module, name))
        raise UnsafePickleError(
            f"{self._source}: refusing to unpickle {module}.{name} (not on the allow-list); "
            "the checkpoint may be corrupt or malicious and nothing in it was executed"
        )

    def persistent_load(self, pid: Any) -> StorageRef:
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"):
            raise UnsafePickleError(f"{self._source}: unexpected persistent id {pid!r}")
        _, storage_type, key, _location, numel = pid
        if not isinstance(storage_type, DType):
            raise UnsafePickleError(f"{self._source}: unknown storage type {storage_type!r}")
        return StorageRef(storage_type, str(key), operator.index(numel))


_SMALL = 4096  # bytes: a chunk record's pickle is a few hundred, the same for every chunk of one shape
_PASSED_MAX = 1024  # small pickles remembered as having passed the bounds checks
_passed: dict[bytes, None] = {}


def safe_loads(data: bytes | memoryview, source: str) -> Any:
    """Unpickle ``data`` through the allow-list; ``source`` names the file in errors. The bounds checks depend
    on the bytes only, so a small pickle seen before skips them (the 46k chunk records of the DeepSeek-V3-shaped
    bench are 17 distinct pickles)."""
    key = bytes(data) if len(data) <= _SMALL else None
    try:
        known = key is not None and key in _passed
        if not known:
            check_opcodes(data)
        value = _Unpickler(io.BytesIO(data), source).load()
        if not known:
            check_nesting(value)
            if key is not None and len(_passed) < _PASSED_MAX:
                _passed[key] = None
        return value
    except UnsafePickleError as exc:
        raise UnsafePickleError(str(exc) if source in str(exc) else f"{source}: {exc}") from exc
    except Exception as exc:  # a truncated or garbled pickle
        raise CheckpointError(f"{source}: cannot unpickle ({type(exc).__name__}: {exc})") from exc
