"""The rules every family uses: the `Rule` base, copy, vocab trim, QKV and gated-MLP splits, repeats, packed
experts and the +1 of a zero-centred norm."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np

from ...dtypes import BFLOAT16, DType
from ...errors import CheckpointError
from .dims import Condition, Dims, Shape

if TYPE_CHECKING:
    from ..schema import Delta, Source

__all__ = ["QKV", "RULES", "Copy", "GatedMLP", "Packed", "PlusOne", "Repeat", "Rule", "VocabRows", "only"]

RULES: dict[str, type[Rule]] = {}  # every rule class by name, for plans that name their rules by data


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

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        RULES[cls.__name__] = cls

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

    def row_orders(
        self, source: Source | None, delta: Delta | None, dims: Dims, saved_tp: object
    ) -> tuple[Source | None, Delta | None]:
        """``source`` and ``delta`` with the TP row orders their layout implies (`RowOrder`), for a rule whose
        tensors Megatron saves in TP order (``saved_tp``: the args' training TP); most save none."""
        return source, delta

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
        values = array.view(BFLOAT16.values) if array.dtype == np.uint16 else array  # uint16: bf16's bits
        return [(values + values.dtype.type(1)).view(array.dtype)]
