"""The one dtype table: torch names, safetensors codes, numpy storage types.

bfloat16 and float8 have no numpy type of their own; their bytes move as ``uint16`` / ``uint8`` (a conversion
mostly only moves bytes), and where their values are needed (casts, `diff`, a norm's `1 + w`) `ml_dtypes`
supplies the numpy types, with torch's rounding.
"""

from __future__ import annotations

from dataclasses import dataclass

import ml_dtypes
import numpy as np

from .errors import OptionError

__all__ = ["BFLOAT16", "DTYPES", "FLOAT32", "DType", "by_option", "by_storage_class", "by_torch_name"]


@dataclass(frozen=True)
class DType:
    torch_name: str  # attribute of the torch module, e.g. "bfloat16"
    safetensors: str  # safetensors header code, e.g. "BF16"
    numpy: str  # numpy dtype that carries the bytes
    storage_class: str  # legacy typed-storage class in torch.save pickles
    short: str  # the CLI spelling

    @property
    def itemsize(self) -> int:
        return np.dtype(self.numpy).itemsize

    @property
    def np(self) -> np.dtype:
        return np.dtype(self.numpy)

    @property
    def values(self) -> np.dtype:
        """The numpy type of its values (``ml_dtypes.bfloat16`` for bf16), to view :attr:`np` bytes as."""
        return np.dtype(getattr(ml_dtypes, self.torch_name)) if self.torch_name in _ML_DTYPES else self.np

    def __repr__(self) -> str:
        return self.torch_name


DTYPES: tuple[DType, ...] = (
    DType("float32", "F32", "<f4", "FloatStorage", "fp32"),
    DType("bfloat16", "BF16", "<u2", "BFloat16Storage", "bf16"),
    DType("float16", "F16", "<f2", "HalfStorage", "fp16"),
    DType("float64", "F64", "<f8", "DoubleStorage", "fp64"),
    DType("int64", "I64", "<i8", "LongStorage", "int64"),
    DType("int32", "I32", "<i4", "IntStorage", "int32"),
    DType("int16", "I16", "<i2", "ShortStorage", "int16"),
    DType("int8", "I8", "i1", "CharStorage", "int8"),
    DType("uint8", "U8", "u1", "ByteStorage", "uint8"),
    DType("bool", "BOOL", "?", "BoolStorage", "bool"),
    DType("float8_e4m3fn", "F8_E4M3", "u1", "Float8_e4m3fnStorage", "fp8_e4m3"),
    DType("float8_e5m2", "F8_E5M2", "u1", "Float8_e5m2Storage", "fp8_e5m2"),
)

FLOAT32 = DTYPES[0]
BFLOAT16 = DTYPES[1]
_ML_DTYPES = {"bfloat16", "float8_e4m3fn", "float8_e5m2"}

_BY_TORCH = {d.torch_name: d for d in DTYPES}
_BY_STORAGE = {d.storage_class: d for d in DTYPES}
_BY_OPTION = {d.short: d for d in DTYPES}
# torch aliases that appear in pickles
_BY_TORCH.update(float=_BY_TORCH["float32"], half=_BY_TORCH["float16"], double=_BY_TORCH["float64"])


def by_torch_name(name: str) -> DType | None:
    return _BY_TORCH.get(name)


def by_storage_class(name: str) -> DType | None:
    return _BY_STORAGE.get(name)


def by_option(name: str) -> DType:
    """Resolve a ``--dtype`` value other than ``auto`` (fp32, bf16, fp16)."""
    if name not in ("fp32", "bf16", "fp16"):
        raise OptionError(f"--dtype {name!r} is not supported; use auto, bf16, fp16 or fp32")
    return _BY_OPTION[name]
