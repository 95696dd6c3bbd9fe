"""The numpy names a checkpoint pickle may use (rng states in `common.pt`), limited to plain numbers: our own
stand-ins, because numpy offers no restricted loader.

numpy's own pickle entry points (`dtype`, `_reconstruct`, `scalar`) would build whatever a pickle describes:
object dtypes (arbitrary objects inside an array), structured dtypes whose field offsets point anywhere
(both crash the interpreter) and void scalars of any size. Here a pickle gets stand-ins that only build
arrays and scalars of fixed-size numbers, from exactly as many bytes as their shape needs; the bytes are
then numpy's (a copy).
"""

from __future__ import annotations

import math
import operator
from typing import Any

import numpy as np

from ...errors import UnsafePickleError

__all__ = ["DTypeSpec", "PickledArray", "numpy_global"]

MAX_DIMS = 64  # numpy's own limit
_NUMBERS = {"b1", "i1", "i2", "i4", "i8", "u1", "u2", "u4", "u8", "f2", "f4", "f8", "c8", "c16"}


class DTypeSpec:
    """What `numpy.dtype(name, align, copy)` gives a pickle: a number type and, after BUILD, its byte order."""

    def __init__(self, name: Any, align: Any = False, copy: Any = True) -> None:
        if not isinstance(name, str) or name not in _NUMBERS:
            raise UnsafePickleError(f"numpy dtype {name!r} is not a plain number type")
        self.name, self.byteorder = name, "="

    def __setstate__(self, state: Any) -> None:
        """numpy's state is (version, byteorder, subarray, names, fields, elsize, alignment, flags)."""
        if not (isinstance(state, tuple) and len(state) in (8, 9) and state[1] in ("<", ">", "|", "=")):
            raise UnsafePickleError(f"numpy dtype state {state!r:.80} is not numpy's")
        if state[2:5] != (None, None, None):
            raise UnsafePickleError(f"numpy dtype {self.name} with sub-arrays or fields is refused")
        self.byteorder = state[1]

    @property
    def dtype(self) -> np.dtype:
        base = np.dtype(self.name)
        return base.newbyteorder(self.byteorder) if self.byteorder in ("<", ">") else base

    def __repr__(self) -> str:
        return f"dtype({self.dtype.str!r})"


class PickledArray(np.ndarray):
    """The array `_reconstruct` hands a pickle; its BUILD state is checked before numpy sees it."""

    def __setstate__(self, state: Any) -> None:
        if not (isinstance(state, tuple) and len(state) == 5):
            raise UnsafePickleError(f"numpy array state {state!r:.80} is not numpy's")
        version, shape, spec, fortran, data = state
        if not isinstance(spec, DTypeSpec):
            raise UnsafePickleError(f"numpy array of {spec!r:.80}: not a plain number dtype")
        if not isinstance(shape, tuple) or len(shape) > MAX_DIMS:
            raise UnsafePickleError(f"numpy array shape {shape!r:.80} is not a shape")
        shape = tuple(operator.index(n) for n in shape)
        if any(n < 0 for n in shape) or not isinstance(data, bytes | bytearray) or not isinstance(fortran, bool):
            raise UnsafePickleError(f"numpy array state for shape {shape} is not numpy's")
        dtype = spec.dtype
        if len(data) != math.prod(shape) * dtype.itemsize:
            raise UnsafePickleError(f"numpy array {shape} of {dtype} comes with {len(data)} bytes")
        super().__setstate__((version, shape, dtype, fortran, bytes(data)))


class _NdarrayName:
    """What a pickle gets for `numpy.ndarray`: an argument `_reconstruct` accepts; calling it builds nothing."""


_NDARRAY = _NdarrayName()


def _reconstruct(subtype: Any, shape: Any, typecode: Any) -> PickledArray:
    """numpy pickles an array as `_reconstruct(ndarray, (0,), b"b")` then BUILD: nothing else is accepted."""
    if subtype is not _NDARRAY or shape != (0,) or typecode not in (b"b", "b"):
        raise UnsafePickleError(f"numpy _reconstruct{(subtype, shape, typecode)!r:.80} is not how numpy pickles")
    return np.ndarray.__new__(PickledArray, (0,), np.uint8)


def _scalar(spec: Any, data: Any = b"") -> np.generic:
    """numpy pickles a scalar as `scalar(dtype, its bytes)`."""
    if not isinstance(spec, DTypeSpec):
        raise UnsafePickleError(f"numpy scalar of {spec!r:.80}: not a plain number dtype")
    dtype = spec.dtype
    if not isinstance(data, bytes) or len(data) != dtype.itemsize:
        raise UnsafePickleError(f"numpy scalar of {dtype} needs {dtype.itemsize} bytes")
    return np.frombuffer(data, dtype)[0]


def numpy_global(name: str) -> Any:
    """The stand-in for numpy global ``name``, or None when it is not allowed."""
    return {"dtype": DTypeSpec, "_reconstruct": _reconstruct, "scalar": _scalar, "ndarray": _NDARRAY}.get(name)
