"""The transforms a mapping table can name: copy, vocab trim, QKV split, gated-MLP split.

A rule reads one Megatron tensor (global, TP-invariant layout) and produces one or more HF tensors. Rules
work on numpy arrays of any dtype (bf16 moves as uint16): they only slice and reshape, never compute.
Patterns may hold ``{i}``, the global layer index, and ``{e}``, the global expert index.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any, ClassVar

import numpy as np

from .dtypes import DType
from .errors import CheckpointError

__all__ = [
    "QKV",
    "Copy",
    "Dims",
    "GatedMLP",
    "Repeat",
    "Rule",
    "VocabRows",
    "dense_layer",
    "fused_part_rows",
    "moe_layer",
    "only",
    "untied",
]

Shape = tuple[int, ...]


@dataclass(frozen=True)
class Dims:
    """Model dimensions the rules need, taken from the HF config (derived or given)."""

    num_layers: int
    hidden_size: int
    num_heads: int
    num_query_groups: int
    head_dim: int
    vocab_size: int
    tied: bool
    num_experts: int = 0
    moe_layers: frozenset[int] = frozenset()  # layers whose MLP is a mixture of experts (MTP layers included)
    num_mtp_layers: int = 0
    config: Mapping[str, Any] = field(default_factory=dict, compare=False)  # the whole HF config


Condition = Callable[[Dims, "int | None"], bool]  # (dims, layer) → does the rule apply?


def untied(dims: Dims, layer: int | None) -> bool:
    return not dims.tied


def moe_layer(dims: Dims, layer: int | None) -> bool:
    return layer in dims.moe_layers


def dense_layer(dims: Dims, layer: int | None) -> bool:
    return layer not in dims.moe_layers


@dataclass(frozen=True)
class Rule:
    """Base rule: ``sources`` (alternative Megatron names of one tensor) → ``targets`` (HF names)."""

    # `apply` only picks, reorders or repeats rows (the first axis): the writer may then copy the rows
    # file to file instead of calling it. Subclasses that do anything else must leave this False.
    rows_only: ClassVar[bool] = False
    # The dtype `apply` returns new values in, for a rule that computes them (FP8 export); None for rules that
    # only move the source's bytes (the writer may then cast before applying them).
    computes: ClassVar[DType | None] = None

    sources: tuple[str, ...]
    targets: tuple[str, ...]
    when: Condition | None = None  # the rule applies only where this holds
    expect: Callable[[Mapping[str, Any]], Shape] | None = None  # source shape the HF config implies

    @classmethod
    def of(
        cls,
        source: str | tuple[str, ...],
        *targets: str,
        when: Condition | None = None,
        expect: Callable[[Mapping[str, Any]], Shape] | None = None,
    ) -> Rule:
        """Table shorthand: ``QKV.of(src, q, k, v)``; ``source`` may be a tuple of aliases."""
        return cls(source if isinstance(source, tuple) else (source,), targets, when, expect)

    def check(self, shape: Shape, dims: Dims, key: str) -> None:
        """Raise, naming both values, if the checkpoint and the HF config disagree on this tensor's shape."""
        if self.expect is None:
            return
        try:
            expected = tuple(self.expect(dims.config))
        except (KeyError, TypeError) as exc:
            raise CheckpointError(f"the HF config lacks {exc} needed to check {key}") from exc
        if tuple(shape) != expected:
            raise CheckpointError(
                f"{key} has shape {tuple(shape)} in the checkpoint but the HF config implies {expected}"
            )

    def rows(self, shape: Shape, dims: Dims) -> int:
        """How many leading rows of the source to read (all, unless the rule trims)."""
        return shape[0]

    def target_shapes(self, shape: Shape, dims: Dims, key: str) -> list[Shape]:
        """Output shapes for a source of ``shape``; raises if the shape contradicts ``dims``."""
        return [shape]

    def apply(self, array: np.ndarray, dims: Dims) -> list[np.ndarray]:
        return [array]


@dataclass(frozen=True)
class Copy(Rule):
    """One tensor, renamed."""

    rows_only: ClassVar[bool] = True


@dataclass(frozen=True)
class VocabRows(Rule):
    """Embedding / output layer: drop the rows Megatron padded the vocab with."""

    rows_only: ClassVar[bool] = True

    def rows(self, shape: Shape, dims: Dims) -> int:
        return dims.vocab_size

    def target_shapes(self, shape: Shape, dims: Dims, key: str) -> list[Shape]:
        if shape[0] < dims.vocab_size:
            raise CheckpointError(
                f"{key} has {shape[0]} rows, fewer than vocab_size={dims.vocab_size}; check --vocab-size / --hf-config"
            )
        return [(dims.vocab_size, *shape[1:])]


@dataclass(frozen=True)
class QKV(Rule):
    """Fused QKV (weight or bias) → q, k, v. Megatron groups rows per query group: [q heads; k; v]."""

    rows_only: ClassVar[bool] = True

    def _grouped(self, shape: Shape, dims: Dims, key: str) -> tuple[int, int, int]:
        groups, head_dim = dims.num_query_groups, dims.head_dim
        per_group = dims.num_heads // groups
        if shape[0] != groups * (per_group + 2) * head_dim:
            raise CheckpointError(
                f"{key} has {shape[0]} rows; num_attention_heads={dims.num_heads}, num_key_value_heads={groups}, "
                f"head_dim={head_dim} need {groups * (per_group + 2) * head_dim} — the config does not match the checkpoint"
            )
        return groups, per_group, head_dim

    def target_shapes(self, shape: Shape, dims: Dims, key: str) -> list[Shape]:
        groups, per_group, head_dim = self._grouped(shape, dims, key)
        rest = shape[1:]
        return [(groups * per_group * head_dim, *rest), (groups * head_dim, *rest), (groups * head_dim, *rest)]

    def apply(self, array: np.ndarray, dims: Dims) -> list[np.ndarray]:
        groups, per_group, head_dim = self._grouped(array.shape, dims, self.sources[0])
        rest = array.shape[1:]
        grouped = array.reshape(groups, per_group + 2, head_dim, *rest)
        q = grouped[:, :per_group].reshape(-1, *rest)
        k = grouped[:, per_group].reshape(-1, *rest)
        v = grouped[:, per_group + 1].reshape(-1, *rest)
        return [q, k, v]


@dataclass(frozen=True)
class GatedMLP(Rule):
    """Gated fc1 `[gate; up]` → gate_proj, up_proj."""

    rows_only: ClassVar[bool] = True

    def target_shapes(self, shape: Shape, dims: Dims, key: str) -> list[Shape]:
        if shape[0] % 2:
            raise CheckpointError(f"{key} has an odd number of rows ({shape[0]}); it is not a gated (swiglu) fc1")
        half = (shape[0] // 2, *shape[1:])
        return [half, half]

    def apply(self, array: np.ndarray, dims: Dims) -> list[np.ndarray]:
        half = array.shape[0] // 2
        return [array[:half], array[half:]]


def only(when: Condition, rules: tuple[Rule, ...]) -> tuple[Rule, ...]:
    """The same rules, applied only where ``when`` holds (e.g. dense MLP rules on dense layers)."""
    return tuple(replace(rule, when=when) for rule in rules)


@dataclass(frozen=True)
class Repeat(Rule):
    """One tensor written under every target name (a LoRA A shared by the parts of a fused weight)."""

    rows_only: ClassVar[bool] = True

    def target_shapes(self, shape: Shape, dims: Dims, key: str) -> list[Shape]:
        return [shape] * len(self.targets)

    def apply(self, array: np.ndarray, dims: Dims) -> list[np.ndarray]:
        return [array] * len(self.targets)


def swiglu_rows(array: np.ndarray, tp: int) -> np.ndarray:
    """Rows saved by Megatron's swiglu sharded-state-dict factory at training TP ``tp`` back in true order:
    rank t's local rows were split in halves stored at blocks t and tp + t of 2·tp."""
    blocks = np.split(array, 2 * tp)
    return np.concatenate([blocks[i] for r in range(tp) for i in (r, tp + r)])


def rank_major_gated(array: np.ndarray, tp: int) -> np.ndarray:
    """Rank-major local fc1 rows `[gate_0, up_0, gate_1, up_1, ...]` (DoRA magnitudes) → `[gate; up]`."""
    blocks = np.split(array, 2 * tp)
    return np.concatenate(blocks[0::2] + blocks[1::2])


@dataclass(frozen=True)
class SwigluRows(Rule):
    """One tensor whose rows are in the swiglu factory's order (CanonicalLoRA gate/up B), put in true order."""

    rows_only: ClassVar[bool] = True

    tp: int = 1

    def apply(self, array: np.ndarray, dims: Dims) -> list[np.ndarray]:
        return [swiglu_rows(array, self.tp)]


@dataclass(frozen=True)
class ExpertMajorA(Rule):
    """A layer's expert LoRA A `[E, r, in]` (or one shared `[r, in]`) as PEFT ParamWrapper's `[E·r, in]`."""

    experts: int = 0

    def target_shapes(self, shape: Shape, dims: Dims, key: str) -> list[Shape]:
        return [(self.experts * shape[-2], shape[-1])]

    def apply(self, array: np.ndarray, dims: Dims) -> list[np.ndarray]:
        stacked = array if array.ndim == 3 else np.broadcast_to(array, (self.experts, *array.shape))
        return [np.ascontiguousarray(stacked).reshape(-1, array.shape[-1])]


@dataclass(frozen=True)
class RankMajorB(Rule):
    """A layer's expert LoRA B `[E, out, r]` (or one shared `[out, r]`) as ParamWrapper's `[out, r·E]`:
    column `j·E + e` is expert e's rank-j column."""

    experts: int = 0

    def target_shapes(self, shape: Shape, dims: Dims, key: str) -> list[Shape]:
        return [(shape[-2], shape[-1] * self.experts)]

    def apply(self, array: np.ndarray, dims: Dims) -> list[np.ndarray]:
        stacked = array if array.ndim == 3 else np.broadcast_to(array, (self.experts, *array.shape))
        return [np.ascontiguousarray(stacked.transpose(1, 2, 0)).reshape(array.shape[-2], -1)]


def fused_part_rows(layout: str, dims: Dims, rows: int, parts: int) -> list[int]:
    """Rows each part adds to a fused weight of ``rows`` rows: q, k, v per the config ("qkv"), else equal parts."""
    if layout == "qkv":
        return [dims.num_heads * dims.head_dim] + [dims.num_query_groups * dims.head_dim] * 2
    return [rows // parts] * parts


@dataclass(frozen=True)
class RankMajorGatedMLP(GatedMLP):
    """Gated fc1 rows stored rank-major, `[gate_t; up_t]` per TP rank (DoRA magnitudes) → gate, up."""

    tp: int = 1

    def apply(self, array: np.ndarray, dims: Dims) -> list[np.ndarray]:
        return super().apply(rank_major_gated(array, self.tp), dims)
