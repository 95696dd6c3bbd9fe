"""`diff`: compare two models tensor by tensor, each an HF directory or a Megatron checkpoint.

A Megatron checkpoint is seen through its conversion plan, so both sides are compared by HF name, as the
bytes `convert` would write. Only one tensor per side is in memory at a time (for a Megatron side, the
outputs of one plan step), and values are compared in float64 blocks.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..config.inputs import open_checkpoint
from ..dtypes import DType
from ..errors import CheckpointError
from ..plan.schema import Plan
from ..readers import CheckpointReader
from ..readers.safetensors_file import SafetensorsFile
from ..transform.compute import step_outputs
from .options import check_options
from .planning import plan_conversion

__all__ = ["TensorDiff", "diff", "format_diff"]

_BLOCK = 1 << 20  # elements compared at once
_OK = ("equal", "close")


class _HFTensors:
    """The tensors of every `*.safetensors` file in an HF directory (or of one such file)."""

    def __init__(self, files: list[Path]) -> None:
        self.files: list[SafetensorsFile] = []
        self.where: dict[str, SafetensorsFile] = {}
        try:
            for file in files:
                st = SafetensorsFile(file)
                self.files.append(st)
                for name in st.tensors:
                    if name in self.where:
                        raise CheckpointError(f"{st.path}: tensor {name} is also in {self.where[name].path}")
                    self.where[name] = st
        except BaseException:
            self.close()
            raise

    def names(self) -> Iterator[tuple[str, tuple[int, ...], DType]]:
        for name, st in self.where.items():
            entry = st.tensors[name]
            yield name, entry.shape, entry.dtype

    def get(self, name: str) -> np.ndarray:
        return self.where[name].array(name)

    def close(self) -> None:
        for st in self.files:
            st.close()


class _MegatronTensors:
    """A Megatron checkpoint's HF tensors, computed one plan step at a time."""

    def __init__(self, path: Path) -> None:
        self.reader: CheckpointReader
        self.reader, lora = open_checkpoint(path)
        try:
            self.plan: Plan = plan_conversion(self.reader, lora).plan
        except BaseException:
            self.reader.close()
            raise
        self.step_of = {t.name: step for step in self.plan.steps for t in step.targets}
        self._cached: dict[str, np.ndarray] = {}

    def names(self) -> Iterator[tuple[str, tuple[int, ...], DType]]:
        for target in self.plan.targets():
            yield target.name, target.shape, target.dtype

    def get(self, name: str) -> np.ndarray:
        if name not in self._cached:  # keep only the current step's outputs
            self._cached = {t.name: a for t, a in step_outputs(self.plan, self.reader, self.step_of[name])}
        return self._cached[name]

    def close(self) -> None:
        self.reader.close()


def _open(path: str | Path) -> _HFTensors | _MegatronTensors:
    path = Path(path)
    if path.suffix == ".safetensors" and not path.is_dir():  # a FIFO or device too: refused when mapped
        return _HFTensors([path])
    files = sorted(path.glob("*.safetensors")) if path.is_dir() else []
    return _HFTensors(files) if files else _MegatronTensors(path)


@dataclass
class TensorDiff:
    name: str
    status: str  # equal (bit for bit), close (within tolerance), different, dtype, shape, missing, extra
    dtype: tuple[str | None, str | None] = (None, None)
    shape: tuple[list[int] | None, list[int] | None] = (None, None)
    max_abs: float | None = None
    max_rel: float | None = None


def _floats(block: np.ndarray, dtype: DType) -> np.ndarray:
    return block.view(dtype.values).astype(np.float64)


def _compare(
    a: np.ndarray, da: DType, b: np.ndarray, db: DType, atol: float, rtol: float
) -> tuple[bool, float, float, bool]:
    """(bit-identical, max |a-b|, max |a-b|/|b|, all |a-b| <= atol + rtol·|b|), block by block."""
    a, b = a.reshape(-1), b.reshape(-1)
    same_bits, max_abs, max_rel, within = da == db, 0.0, 0.0, True
    float8 = da.torch_name.startswith("float8") or db.torch_name.startswith("float8")
    for start in range(0, a.size, _BLOCK):
        x, y = a[start : start + _BLOCK], b[start : start + _BLOCK]
        if same_bits:
            same_bits = bool(np.array_equal(x.view(f"u{da.itemsize}"), y.view(f"u{db.itemsize}")))
        if float8:  # no numpy type for fp8: only bit equality is defined
            max_abs = max_rel = 0.0 if same_bits else float("inf")
            within = same_bits
            continue
        x, y = _floats(x, da), _floats(y, db)
        with np.errstate(invalid="ignore", divide="ignore"):
            error = np.where((x == y) | (np.isnan(x) & np.isnan(y)), 0.0, np.abs(x - y))
            error = np.nan_to_num(error, nan=np.inf)
            scale = np.abs(y)
            rel = np.where(error == 0, 0.0, error / scale)
        if error.size:
            max_abs = max(max_abs, float(error.max()))
            max_rel = max(max_rel, float(np.nan_to_num(rel, nan=np.inf).max()))
            within = within and bool((error <= atol + rtol * scale).all())
    return same_bits, max_abs, max_rel, within


def diff(a: str | Path, b: str | Path, *, atol: float = 0.0, rtol: float = 0.0) -> list[TensorDiff]:
    """Per-tensor comparison of ``a`` and ``b``, in ``a``'s order, then the tensors only ``b`` has."""
    check_options(atol=atol, rtol=rtol)  # before either side is opened
    left = _open(a)
    try:
        right = _open(b)
    except BaseException:
        left.close()
        raise
    try:
        theirs = {name: (shape, dtype) for name, shape, dtype in right.names()}
        results, seen = [], set()
        for name, shape, dtype in left.names():
            seen.add(name)
            if name not in theirs:
                results.append(TensorDiff(name, "missing", (dtype.safetensors, None), (list(shape), None)))
                continue
            other_shape, other_dtype = theirs[name]
            found = TensorDiff(name, "", (dtype.safetensors, other_dtype.safetensors), (list(shape), list(other_shape)))
            if shape != other_shape:
                found.status = "shape"
            else:
                same, found.max_abs, found.max_rel, within = _compare(
                    left.get(name), dtype, right.get(name), other_dtype, atol, rtol
                )
                found.status = (
                    "equal" if same else "dtype" if dtype != other_dtype else "close" if within else "different"
                )
            results.append(found)
        for name, (shape, dtype) in theirs.items():
            if name not in seen:
                results.append(TensorDiff(name, "extra", (None, dtype.safetensors), (None, list(shape))))
        return results
    finally:
        left.close()
        right.close()


def identical(results: list[TensorDiff]) -> bool:
    """Equal within tolerance: every tensor on both sides, same shape and dtype, values close."""
    return all(r.status in _OK for r in results)


def as_json(a: str | Path, b: str | Path, atol: float, rtol: float, results: list[TensorDiff]) -> dict[str, Any]:
    counts: dict[str, int] = {}
    for r in results:
        counts[r.status] = counts.get(r.status, 0) + 1
    return {
        "a": str(a),
        "b": str(b),
        "atol": atol,
        "rtol": rtol,
        "equal": identical(results),
        "counts": counts,
        "tensors": [asdict(r) for r in results],
    }


def format_diff(results: list[TensorDiff]) -> str:
    """One line per tensor that is not bit-identical, then the counts."""
    lines = []
    for r in results:
        if r.status == "equal":
            continue
        detail = ""
        if r.status in ("close", "different", "dtype"):
            detail = f" max_abs={r.max_abs:.6g} max_rel={r.max_rel:.6g}"
        if r.status in ("dtype", "shape", "missing", "extra"):
            detail += f" A={r.dtype[0]}{r.shape[0] or ''} B={r.dtype[1]}{r.shape[1] or ''}"
        lines.append(f"{r.status:9s} {r.name}{detail}")
    counts: dict[str, int] = {}
    for r in results:
        counts[r.status] = counts.get(r.status, 0) + 1
    verdict = "equal" if identical(results) else "DIFFERENT"
    lines.append(
        f"{verdict}: {len(results)} tensors (" + ", ".join(f"{n} {s}" for s, n in sorted(counts.items())) + ")"
    )
    return "\n".join(lines)
