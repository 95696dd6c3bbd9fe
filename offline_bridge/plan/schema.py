"""The plan's vocabulary, pure data: where a tensor comes from, where it goes, the LoRA pieces on it and the
rule that turns one into the other, named by data (`RuleRef`). A plan can be printed, compared (``==``) and
serialised (`offline_bridge.plan.serial`); nothing in it is a function or an array."""

from __future__ import annotations

import functools
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ..dtypes import DType
from ..readers.base import RowOrder  # defined with the readers, which report it (`TensorInfo.row_order`)

if TYPE_CHECKING:
    from ..readers.base import Box
    from .rules.dims import Dims

__all__ = ["Delta", "FilePlan", "Lora", "Plan", "RuleRef", "Source", "Step", "Target"]


@dataclass(frozen=True)
class RuleRef:
    """A rule by data: its registered class name and its fields (sources, targets, TP ...), values plain
    data or nested `RuleRef`s. `offline_bridge.plan.rules.registry.rule_of` turns it back into the rule."""

    name: str
    params: tuple[tuple[str, Any], ...] = ()

    def param(self, key: str) -> Any:
        return dict(self.params)[key]


@dataclass(frozen=True)
class Source:
    """A Megatron tensor, or one layer / expert of a stacked one: each part's ``box`` picks it and ``shape``
    drops the stacked axes. Several parts (swiglu halves saved apart as `<key>_w`, `<key>_v`) are joined
    along the first remaining axis."""

    parts: tuple[tuple[str, Box], ...]
    shape: tuple[int, ...]
    dtype: DType
    pattern: str = ""  # the table pattern it was found by
    row_order: RowOrder | None = None  # rows saved in a TP order (None: true order)

    @property
    def key(self) -> str:
        return self.parts[0][0]


@dataclass(frozen=True)
class Target:
    """An HF tensor and where its bytes go (``file``, absolute byte ``offset``), once laid out."""

    name: str
    shape: tuple[int, ...]
    dtype: DType
    file: str = ""
    offset: int = 0

    @functools.cached_property
    def nbytes(self) -> int:  # cached: a 100k-tensor plan asks often (layout, progress, scheduling)
        size = self.dtype.itemsize
        for n in self.shape:
            size *= n
        return size

    @property
    def numel(self) -> int:
        return self.nbytes // self.dtype.itemsize


@dataclass(frozen=True)
class Lora:
    """Adapter hyper-parameters from run_config.yaml's `peft:` section (or the command line)."""

    alpha: float
    dim: int
    normalize_moe: bool = False  # expert adapters have rank dim // topk and scale alpha / that rank
    tp: int = 1  # training TP of the adapter save: canonical gate/up B and DoRA fc1 magnitudes depend on it


@dataclass(frozen=True)
class Delta:
    """The adapter on one source tensor, merged in Megatron layout before the rule splits it:
    ``W + scale · fuse(B_i @ A_i)``, then for DoRA ``m / ||·||_row`` per output row."""

    pieces: tuple[tuple[Source, Source] | None, ...]  # (A [rank, in], B [out_i, rank]); None: an absent piece
    # how the pieces form the fused delta: "plain", "qkv" (per query group), "gated" ([gate; up]) or "stacked"
    # (packed experts: one piece per expert, rows stacked)
    layout: str
    scale: float
    magnitude: Source | None = None  # DoRA's weight_magnitude [out]
    tp: int = 1  # training TP (see Lora.tp)

    def sources(self) -> tuple[Source, ...]:
        pairs = [s for pair in self.pieces if pair is not None for s in pair]
        return (*pairs, *((self.magnitude,) if self.magnitude else ()))


@dataclass(frozen=True)
class Step:
    """One read (plus an optional LoRA delta) and one rule: ``source`` → ``targets``."""

    rule: RuleRef
    source: Source
    targets: tuple[Target, ...]
    delta: Delta | None = None


@dataclass(frozen=True)
class FilePlan:
    name: str
    header: bytes  # the 8-byte length plus the JSON header, padded to 8 bytes
    size: int  # total file size


@dataclass(frozen=True)
class Plan:
    steps: tuple[Step, ...]
    files: tuple[FilePlan, ...]
    dtype: DType
    dims: Dims

    def targets(self) -> Iterator[Target]:
        for step in self.steps:
            yield from step.targets

    @property
    def total_size(self) -> int:
        return sum(t.nbytes for t in self.targets())
