"""The reader contract: lazy global tensors by key, whatever the on-disk format.

Call order:
1. construct with an iteration directory (reads metadata only, never tensor bytes);
2. `args` and `tensors` describe the checkpoint;
3. `read(key, box)` assembles one global tensor, or a box of it, when the plan needs it; `extents(key)` says
   where its chunks lie on disk, so that bytes can go file to file without passing through memory;
4. `close()` (or use the reader as a context manager).

`read` and `extents` may be called from several threads at once.
"""

from __future__ import annotations

import argparse
from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

import numpy as np

from ..dtypes import DType

__all__ = [
    "Box",
    "CheckpointReader",
    "Extent",
    "RowOrder",
    "TensorInfo",
    "full_box",
    "is_model_key",
    "is_quantizer_key",
]

Box = tuple[tuple[int, int], ...]  # [start, stop) per axis

_NON_MODEL_PREFIXES = ("optimizer.", "rng_state", "common_state", "rerun_state_machine")


def is_model_key(key: str) -> bool:
    """Model weights, as opposed to optimizer state, rng state and `_extra_state` bytes (never read)."""
    return not key.startswith(_NON_MODEL_PREFIXES) and "_extra_state" not in key and not key.startswith("chained_")


def is_quantizer_key(key: str) -> bool:
    """ModelOpt quantizer state (`<linear>.weight_quantizer._amax`, ...): exported by `quant`, not the mapping."""
    return "_quantizer." in key


def load_common_pt(directory: Path) -> dict[str, Any] | None:
    """`common.pt` (Megatron's non-sharded state) through the allow-list unpickler; None if absent."""
    from ..errors import CheckpointError
    from .pickles.torch_save import load_torch_file

    file = directory / "common.pt"
    if not file.exists():
        return None  # anything else that exists (a FIFO, a directory) is refused by load_torch_file
    state = load_torch_file(str(file))
    if not isinstance(state, dict):
        raise CheckpointError(f"{file}: common state is a {type(state).__name__}, expected a dict")
    return state


def full_box(shape: tuple[int, ...]) -> Box:
    return tuple((0, n) for n in shape)


@dataclass(frozen=True)
class RowOrder:
    """How a tensor's rows lie on disk when Megatron saved them in tensor-parallel order, not in their true
    one; `offline_bridge.plan.row_order` turns it into the row permutation every reader of the source applies.
    A reader reports it where it finds the layout (`TensorInfo.row_order`), the planner where a rule's layout
    implies it (`Source.row_order`).

    - ``swiglu``: the swiglu sharded-state-dict factory's order at TP ``tp`` (rank t's gate and up halves at
      blocks t and tp + t of 2·tp), e.g. CanonicalLoRA gate/up B;
    - ``rank_major_gated``: per TP rank its `[gate_t; up_t]` rows in turn (legacy rank files' fc1, DoRA fc1
      magnitudes, ModelOpt fc1 per-channel amax);
    - ``tp_blocks``: per TP rank its slice of every piece in turn, the pieces' global rows in ``parts``
      (fused Gated DeltaNet in_proj / conv1d, and their LoRA B).

    For ``swiglu`` and ``rank_major_gated``, ``parts`` (if given) are consecutive row blocks each in that order
    on its own: every expert of a packed fc1.
    """

    kind: str
    tp: int
    parts: tuple[int, ...] = ()


@dataclass(frozen=True)
class TensorInfo:
    key: str
    shape: tuple[int, ...]
    dtype: DType
    row_order: RowOrder | None = None  # rows stored in a TP order: `read` and `extents` give them as stored


@dataclass(frozen=True)
class Extent:
    """One chunk of a tensor as it lies on disk: a C-contiguous array of ``shape`` starting at byte ``offset``
    of ``path``, holding the part ``box`` (global coordinates) of the tensor."""

    path: str
    offset: int
    shape: tuple[int, ...]
    box: Box


class CheckpointReader(ABC):
    """Base class of the format readers; subclasses override `tensors`, `args` and `read`."""

    path: Path
    format: str  # the on-disk format's name, as formats/ and `inspect` call it

    @property
    @abstractmethod
    def tensors(self) -> Mapping[str, TensorInfo]:
        """Every tensor the checkpoint holds, by key, with its global shape and stored dtype."""

    @property
    def common_state(self) -> Mapping[str, Any]:
        """Megatron's non-sharded state (`common.pt` and its successors); empty if the format has none."""
        return {}

    @property
    def args(self) -> argparse.Namespace | None:
        """Megatron-LM's training arguments, if the checkpoint saved them."""
        args = self.common_state.get("args")
        return args if isinstance(args, argparse.Namespace) else None

    @abstractmethod
    def read(self, key: str, box: Box | None = None) -> np.ndarray:
        """The global tensor ``key`` (or the part inside ``box``), assembled from its chunks."""

    def chunk_boxes(self, key: str) -> list[tuple[tuple[int, ...], tuple[int, ...]]]:
        """(offsets, sizes) of the pieces ``key`` is stored in; one piece unless the format says otherwise."""
        shape = self.tensors[key].shape
        return [((0,) * len(shape), shape)]

    def extents(self, key: str) -> list[Extent] | None:
        """Where the chunks of ``key`` lie, tiling it; None when the format stores them otherwise (the caller
        then uses `read`)."""
        return None

    def validate(self) -> list[str]:
        """What `read` would refuse, checked for every tensor without reading tensor bytes (for `inspect`):
        one line per tensor that cannot be read. Readers that check everything when opened return []."""
        return []

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release open files."""

    def __enter__(self) -> CheckpointReader:
        return self

    def __exit__(self, *exc: type[BaseException] | BaseException | TracebackType | None) -> None:
        self.close()
