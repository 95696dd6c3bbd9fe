"""Find the Megatron-Bridge adapter on a base tensor, from its key alone.

The adapter of `<module>.weight` sits at `<module>.adapter.*`, with the same layer / expert axes as the
base (so stacked, per-layer and per-expert layouts resolve like the base does):

| variant | keys under `<module>.adapter.` | fused delta in Megatron layout |
|---|---|---|
| LoRA | `linear_in.weight` (A), `linear_out.weight` (B) | `B @ A` |
| CanonicalLoRA on `linear_qkv` | `adapter_{q,k,v}.linear_{in,out}.weight` | q, k, v products interleaved per query group |
| CanonicalLoRA on `linear_fc1` | `adapter_{gate,up}.linear_{in,out}.weight` | `[gate; up]` |
| DoRA | LoRA keys + `weight_magnitude` | LoRA, then rows rescaled to the magnitude |
| legacy shared experts | `experts.experts.<fc>.adapter.*` without an expert axis | one adapter for every expert |
| `experts_shared_outer_loras` | fc1 A / fc2 B without, the other side with an expert axis | `B[e] @ A` / `B @ A[e]` |
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace

from ..errors import CheckpointError
from ..readers.base import RowOrder
from .rules import Dims, fused_part_rows
from .schema import Delta, Lora, Source

__all__ = ["ADAPTER", "Find", "find_delta"]

Find = Callable[[tuple[str, ...]], Source | None]
ADAPTER = ".adapter."  # every adapter tensor's key holds it

_CANONICAL = {
    "linear_qkv": (("adapter_q.", "adapter_k.", "adapter_v."), "qkv"),
    "linear_fc1": (("adapter_gate.", "adapter_up."), "gated"),
}


def _find_shared(find: Find, pattern: str, ndim: int = 1) -> Source | None:
    """An adapter key, or its form shared by all experts (no expert axis: the legacy 2-D layout, or one side
    of `experts_shared_outer_loras`). A tensor of ``ndim`` dims per expert that reads as fewer once an
    expert axis is taken off has none (rank == number of experts would otherwise look like one)."""
    found = find((pattern,))
    if ".experts.{e}." in pattern and (found is None or len(found.shape) < ndim):
        found = find((pattern.replace(".experts.{e}.", ".experts.experts."),)) or found
    return found


def _pair(find: Find, prefix: str) -> tuple[Source, Source] | None:
    a, b = (_find_shared(find, prefix + f"linear_{side}.weight", ndim=2) for side in ("in", "out"))
    if (a is None) != (b is None):
        raise CheckpointError(f"{(a or b).key}: LoRA adapter has only one of linear_in / linear_out")
    return None if a is None else (a, b)


def find_delta(find: Find, pattern: str, lora: Lora | None, dims: Dims, base: Source | None = None) -> Delta | None:
    """The adapter on the tensor of table ``pattern``, if the checkpoint holds one; shapes checked against
    ``base`` when it is known (adapter export reads no base). CanonicalLoRA pieces may be absent (zero)."""
    if not pattern.endswith(".weight"):
        return None
    module = pattern[: -len(".weight")] + ADAPTER
    pieces: list[tuple[Source, Source] | None] = []
    layout = "plain"
    plain = _pair(find, module)
    if plain is not None:
        pieces = [plain]
    else:
        names, fused = next((v for k, v in _CANONICAL.items() if pattern.endswith(f"{k}.weight")), ((), ""))
        found = [_pair(find, module + name) for name in names]
        if any(found):
            pieces, layout = found, fused
    magnitude = _find_shared(find, module + "weight_magnitude")
    present = [p for p in pieces if p is not None]
    if not present:
        if magnitude is not None:
            raise CheckpointError(f"{magnitude.key}: DoRA magnitude without linear_in / linear_out")
        return None
    a0 = present[0][0]
    if lora is None:
        raise CheckpointError(
            f"{a0.key}: the checkpoint holds LoRA adapters but no alpha / dim; pass --lora-alpha and --lora-dim "
            "or use a run_config.yaml with a peft: section"
        )
    rank = a0.shape[0]
    base_rows = base.shape[0] if base is not None else None
    expected = fused_part_rows(layout, dims, base_rows, len(pieces)) if base_rows else [None] * len(pieces)
    if layout == "qkv":  # the config knows q, k and v rows even without the base
        expected = fused_part_rows(layout, dims, 0, 3)
    fits = all(
        len(p[0].shape) == 2
        and len(p[1].shape) == 2
        and p[0].shape == a0.shape
        and p[1].shape[1] == rank
        and rows in (None, p[1].shape[0])
        for p, rows in zip(pieces, expected)
        if p is not None
    )
    if not fits or (base is not None and (sum(r for r in expected if r) != base_rows or a0.shape[1] != base.shape[1])):
        described = "; ".join(f"{a.key} {list(a.shape)}, {b.key} {list(b.shape)}" for a, b in present)
        fit = f"base {base.key} {list(base.shape)}" if base is not None else "the model"
        raise CheckpointError(f"LoRA adapter ({described}) does not fit {fit}")
    expert = "{e}" in pattern
    if rank != lora.dim and not (expert and lora.normalize_moe):
        raise CheckpointError(f"{a0.key}: adapter rank {rank} differs from the peft dim {lora.dim}")
    rows = sum(p[1].shape[0] for p in present)
    if magnitude is not None and tuple(magnitude.shape) != (rows,):
        raise CheckpointError(f"{magnitude.key}: DoRA magnitude {list(magnitude.shape)} does not fit {a0.key}")
    if lora.tp > 1 and layout == "gated":  # canonical gate/up B went through the swiglu factory
        pieces = [None if p is None else (p[0], replace(p[1], row_order=RowOrder("swiglu", lora.tp))) for p in pieces]
    if lora.tp > 1 and magnitude is not None and pattern.endswith("linear_fc1.weight"):  # rank-major [gate_t; up_t]
        magnitude = replace(magnitude, row_order=RowOrder("rank_major_gated", lora.tp))
    return Delta(tuple(pieces), layout, lora.alpha / rank, magnitude, lora.tp)
