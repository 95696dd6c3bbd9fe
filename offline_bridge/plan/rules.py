"""The transforms a mapping table can name: copy, vocab trim, QKV split, gated-MLP split, and the Gated
DeltaNet hybrids' gated QKV, GDN input projection, packed experts and zero-centred norm.

A rule reads one Megatron tensor (global, TP-invariant layout) and produces one or more HF tensors. Rules
work on numpy arrays of any dtype (bf16 moves as uint16): they slice and reshape, and compute nothing but
the +1 of a zero-centred norm. Patterns may hold ``{i}``, the global layer index, and ``{e}``, the global
expert index; a rule whose source holds ``{e}`` and whose targets do not stacks all experts (packed).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any, ClassVar

import numpy as np

from ..dtypes import DType
from ..errors import CheckpointError

__all__ = [
    "QKV",
    "Copy",
    "Dims",
    "GatedDeltaConv",
    "GatedDeltaInProj",
    "GatedDeltaPieces",
    "GatedMLP",
    "GatedQKV",
    "Packed",
    "PlusOne",
    "Repeat",
    "Rule",
    "VocabRows",
    "dense_layer",
    "full_attention_layer",
    "fused_part_rows",
    "linear_attention_layer",
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


def linear_attention_layer(dims: Dims, layer: int | None) -> bool:
    """A Gated DeltaNet layer (HF config `layer_types`)."""
    return layer is not None and dims.config["layer_types"][layer] == "linear_attention"


def full_attention_layer(dims: Dims, layer: int | None) -> bool:
    return layer is not None and dims.config["layer_types"][layer] == "full_attention"


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
    # Suffixes of the tensors Megatron saves the source apart as (rows joined in this order) when the
    # source key itself is absent; swiglu halves `_w` / `_v` are always tried.
    saved_apart: tuple[str, ...] = ()

    @classmethod
    def of(
        cls,
        source: str | tuple[str, ...],
        *targets: str,
        when: Condition | None = None,
        expect: Callable[[Mapping[str, Any]], Shape] | None = None,
        saved_apart: tuple[str, ...] = (),
    ) -> Rule:
        """Table shorthand: ``QKV.of(src, q, k, v)``; ``source`` may be a tuple of aliases."""
        return cls(source if isinstance(source, tuple) else (source,), targets, when, expect, saved_apart)

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


@dataclass(frozen=True)
class GatedQKV(QKV):
    """Fused QKV with an attention output gate (Qwen3-Next / Qwen3.5 full attention): per query group
    `[q heads; gate heads; k; v]` → HF q_proj with query and gate per head `[q_h; gate_h]`, k, v."""

    def _grouped(self, shape: Shape, dims: Dims, key: str) -> tuple[int, int, int]:
        groups, head_dim = dims.num_query_groups, dims.head_dim
        per_group = dims.num_heads // groups
        if shape[0] != groups * (2 * per_group + 2) * head_dim:
            raise CheckpointError(
                f"{key} has {shape[0]} rows; a gated QKV with num_attention_heads={dims.num_heads}, "
                f"num_key_value_heads={groups}, head_dim={head_dim} needs {groups * (2 * per_group + 2) * head_dim}"
                " — the config does not match the checkpoint"
            )
        return groups, per_group, head_dim

    def target_shapes(self, shape: Shape, dims: Dims, key: str) -> list[Shape]:
        groups, per_group, head_dim = self._grouped(shape, dims, key)
        rest = shape[1:]
        kv = (groups * head_dim, *rest)
        return [(2 * groups * per_group * head_dim, *rest), kv, kv]

    def apply(self, array: np.ndarray, dims: Dims) -> list[np.ndarray]:
        groups, per_group, head_dim = self._grouped(array.shape, dims, self.sources[0])
        rest = array.shape[1:]
        grouped = array.reshape(groups, 2 * per_group + 2, head_dim, *rest)
        query_gate = np.stack([grouped[:, :per_group], grouped[:, per_group : 2 * per_group]], axis=2)
        return [
            query_gate.reshape(-1, *rest),
            grouped[:, 2 * per_group].reshape(-1, *rest),
            grouped[:, 2 * per_group + 1].reshape(-1, *rest),
        ]


GDN_IN_PROJ_PARTS = (".query", ".key", ".value", ".z", ".beta", ".alpha")  # how Megatron saves in_proj apart
GDN_CONV_PARTS = (".query", ".key", ".value")


def _whole(key: str) -> str:
    """The name of a tensor Megatron saved apart, from one of its pieces' keys."""
    base, _, piece = key.rpartition(".")
    return base if f".{piece}" in GDN_IN_PROJ_PARTS else key


def _linear_heads(dims: Dims) -> tuple[int, int, int, int]:
    """(key heads, key head dim, value heads, value head dim) of the Gated DeltaNet layers."""
    c = dims.config
    try:
        return (
            int(c["linear_num_key_heads"]),
            int(c["linear_key_head_dim"]),
            int(c["linear_num_value_heads"]),
            int(c["linear_value_head_dim"]),
        )
    except KeyError as exc:
        raise CheckpointError(f"the HF config lacks {exc}, needed for the Gated DeltaNet layers") from exc


@dataclass(frozen=True)
class GatedDeltaPieces(Rule):
    """A GDN tensor Megatron saves apart, its pieces joined piece-major (each over all heads); or, fused
    (legacy `--ckpt-format torch`), rank-major: per TP rank its own slice of every piece in turn."""

    tp: int = 1  # > 1: the source is the fused tensor saved at this training TP

    def piece_rows(self, shape: Shape, dims: Dims, key: str) -> list[int]:
        raise NotImplementedError

    def joined(self, array: np.ndarray, dims: Dims) -> list[np.ndarray]:
        """The pieces in true order, whichever way they were saved."""
        rows = self.piece_rows(array.shape, dims, self.sources[0])
        if any(n % self.tp for n in rows):
            raise CheckpointError(f"{self.sources[0]}: pieces of {rows} rows cannot be split over TP {self.tp}")
        local = [n // self.tp for n in rows]
        ranks = [np.split(block, np.cumsum(local)[:-1]) for block in np.split(array, self.tp)]
        return [np.concatenate([pieces[j] for pieces in ranks]) for j in range(len(rows))]


@dataclass(frozen=True)
class GatedDeltaConv(GatedDeltaPieces):
    """GDN conv1d `[C, 1, K]` from its q, k, v channels (HF conv1d runs over `[q; k; v]` too)."""

    def piece_rows(self, shape: Shape, dims: Dims, key: str) -> list[int]:
        nk, dk, nv, dv = _linear_heads(dims)
        if shape[0] != 2 * nk * dk + nv * dv:
            raise CheckpointError(
                f"{_whole(key)} has {shape[0]} channels; the config's linear heads need {2 * nk * dk + nv * dv}"
            )
        return [nk * dk, nk * dk, nv * dv]

    def apply(self, array: np.ndarray, dims: Dims) -> list[np.ndarray]:
        return [np.concatenate(self.joined(array, dims))]


@dataclass(frozen=True)
class GatedDeltaInProj(GatedDeltaPieces):
    """GDN in_proj `[q; k; v; z; b; a]` → Qwen3.5 `in_proj_qkv`, `in_proj_z`, `in_proj_b`, `in_proj_a`, or with
    ``grouped`` Qwen3-Next `in_proj_qkvz` `[q; k; v; z]` and `in_proj_ba` `[b; a]`, both grouped per key head."""

    grouped: bool = False

    def piece_rows(self, shape: Shape, dims: Dims, key: str) -> list[int]:
        nk, dk, nv, dv = _linear_heads(dims)
        if shape[0] != 2 * nk * dk + 2 * nv * dv + 2 * nv or nv % nk:
            raise CheckpointError(
                f"{_whole(key)} has {shape[0]} rows; linear_num_key_heads={nk}, linear_key_head_dim={dk}, "
                f"linear_num_value_heads={nv}, linear_value_head_dim={dv} need {2 * nk * dk + 2 * nv * dv + 2 * nv}"
            )
        return [nk * dk, nk * dk, nv * dv, nv * dv, nv, nv]

    def target_shapes(self, shape: Shape, dims: Dims, key: str) -> list[Shape]:
        q, k, v, z, b, a = self.piece_rows(shape, dims, key)
        rest = shape[1:]
        if self.grouped:
            return [(q + k + v + z, *rest), (b + a, *rest)]
        return [(q + k + v, *rest), (z, *rest), (b, *rest), (a, *rest)]

    def apply(self, array: np.ndarray, dims: Dims) -> list[np.ndarray]:
        q, k, v, z, b, a = self.joined(array, dims)
        if not self.grouped:
            return [np.concatenate([q, k, v]), z, b, a]
        nk, rest = _linear_heads(dims)[0], array.shape[1:]
        per_key = [t.reshape(nk, -1, *rest) for t in (q, k, v, z, b, a)]  # value heads follow their key head
        qkvz = np.concatenate(per_key[:4], axis=1).reshape(-1, *rest)
        return [qkvz, np.concatenate(per_key[4:], axis=1).reshape(-1, *rest)]


@dataclass(frozen=True)
class Packed(Rule):
    """All experts of a layer, stacked (rows joined expert-major), as one HF parameter `[E, out, in]`
    (Qwen3.5-MoE `mlp.experts.gate_up_proj` `[E, 2I, H]` keeps fc1's `[gate; up]`, `down_proj` `[E, H, I]`)."""

    def target_shapes(self, shape: Shape, dims: Dims, key: str) -> list[Shape]:
        return [(dims.num_experts, shape[0] // dims.num_experts, *shape[1:])]

    def apply(self, array: np.ndarray, dims: Dims) -> list[np.ndarray]:
        return [array.reshape(dims.num_experts, -1, *array.shape[1:])]


@dataclass(frozen=True)
class PlusOne(Rule):
    """A zero-centred norm weight `w` (Megatron computes `1 + w`) → a plain one holding `1 + w`, rounded
    once in the stored dtype (bf16 as its uint16 bits, round-to-nearest-even like torch)."""

    def apply(self, array: np.ndarray, dims: Dims) -> list[np.ndarray]:
        if array.dtype == np.uint16:  # bfloat16
            bits = ((array.astype(np.uint32) << 16).view(np.float32) + np.float32(1)).view(np.uint32)
            return [((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype(np.uint16)]
        return [array + array.dtype.type(1)]
