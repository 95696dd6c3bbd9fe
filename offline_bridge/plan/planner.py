"""The conversion plan: every HF tensor's name, shape, dtype, file and byte position, and the Megatron
tensor (or part of it) it comes from — all decided from metadata before any tensor byte is read."""

from __future__ import annotations

from dataclasses import replace

from ..dtypes import DType
from ..errors import CheckpointError
from ..families import Family
from ..readers.base import CheckpointReader, is_model_key, is_quantizer_key
from .adapters import find_delta
from .layout import layout
from .rules import Dims, GatedDeltaPieces, Rule
from .rules.registry import rule_ref
from .schema import Delta, Lora, Plan, Source, Step, Target
from .sources import expand, finder, packs_experts, resolve

__all__ = ["build_plan"]


def _steps(family: Family, reader: CheckpointReader, dims: Dims, dtype: DType, lora: Lora | None) -> list[Step]:
    steps = []
    for rule, index in expand(family, dims):
        source = resolve(reader, rule, index, dims)
        if packs_experts(rule, index):
            delta = _stacked_delta(reader, rule, index, dims, lora)
        else:
            delta = find_delta(finder(reader, index, dims), source.pattern, lora, dims, source)
        if isinstance(rule, GatedDeltaPieces):
            source, rule = _gated_delta_layout(reader, rule, source, delta)
        rule.check(source.shape, dims, source.key)
        shapes = rule.target_shapes(source.shape, dims, source.key)
        rows = rule.rows(source.shape, dims)
        if rows != source.shape[0]:  # read only what is kept (vocab trim)
            (key, box), *more = source.parts
            axis = len(box) - len(source.shape)
            if more:
                raise CheckpointError(f"{key}: cannot trim rows of a tensor saved in parts")
            box = (*box[:axis], (0, rows), *box[axis + 1 :])
            source = replace(source, parts=((key, box),), shape=(rows, *source.shape[1:]))
        names = [t.format(**index) for t in rule.targets]
        steps.append(
            Step(rule_ref(rule), source, tuple(Target(n, tuple(s), dtype) for n, s in zip(names, shapes)), delta)
        )
    return steps


def _stacked_delta(
    reader: CheckpointReader, rule: Rule, index: dict[str, int], dims: Dims, lora: Lora | None
) -> Delta | None:
    """The expert adapters on a packed parameter: expert e's `B_e @ A_e` lands on its rows of the stack."""
    deltas = []
    for e in range(dims.num_experts):
        expert = {**index, "e": e}
        deltas.append(
            find_delta(finder(reader, expert, dims), rule.sources[0], lora, dims, resolve(reader, rule, expert, dims))
        )
    found = [d for d in deltas if d is not None]
    if not found:
        return None
    if len(found) != len(deltas) or any(d.layout != "plain" or d.magnitude is not None for d in found):
        raise CheckpointError(
            f"{found[0].sources()[0].key}: packed experts take plain LoRA adapters on every expert; "
            "use a per-expert family (e.g. --model-type qwen3_next) for this adapter"
        )
    return replace(found[0], pieces=tuple(d.pieces[0] for d in found), layout="stacked")


def _gated_delta_layout(
    reader: CheckpointReader, rule: GatedDeltaPieces, source: Source, delta: Delta | None
) -> tuple[Source, GatedDeltaPieces]:
    """How a GDN in_proj / conv1d is read: a fused tensor (one part) holds rows in TP-local blocks at the
    training TP. A LoRA B has no split factory, so its rows are TP-local blocks at the adapter's TP: the base
    pieces are then read in that order too, base and delta add up, and the rule regroups the sum."""
    if len(source.parts) == 1:
        tp = _training_tp(reader, source.key)
        if delta is not None and delta.tp != tp:
            raise CheckpointError(
                f"{source.key} is fused at training TP {tp} but its LoRA adapter was saved at TP {delta.tp}"
            )
        return source, replace(rule, tp=tp)
    if delta is None:
        return source, rule
    return _rank_major(source, delta.tp), replace(rule, tp=delta.tp)


def _rank_major(source: Source, tp: int) -> Source:
    """The pieces' rows read as TP rank t's slice of every piece in turn, for t = 0 … tp-1."""
    parts = []
    for rank in range(tp):
        for key, box in source.parts:
            axis = len(box) - len(source.shape)  # the row axis, after any stacked axes
            start, stop = box[axis]
            if (stop - start) % tp:
                raise CheckpointError(f"{key}: {stop - start} rows cannot be split over the adapter's TP {tp}")
            rows = (stop - start) // tp
            parts.append((key, (*box[:axis], (start + rank * rows, start + (rank + 1) * rows), *box[axis + 1 :])))
    return replace(source, parts=tuple(parts))


def _training_tp(reader: CheckpointReader, key: str) -> int:
    """The TP a TP-local layout was saved at, from the checkpoint's args."""
    tp = getattr(reader.args, "tensor_model_parallel_size", None)
    if not isinstance(tp, int) or tp < 1:
        raise CheckpointError(f"{key} is fused in its TP-local layout, but the checkpoint's args give no training TP")
    return tp


def _check_all_used(reader: CheckpointReader, steps: list[Step], family: Family) -> None:
    """Every model tensor in the checkpoint must land somewhere: nothing is dropped silently."""
    sources = [s for step in steps for s in (step.source, *(step.delta.sources() if step.delta else ()))]
    used = {key for source in sources for key, _ in source.parts}
    unused = sorted(k for k in reader.tensors if is_model_key(k) and not is_quantizer_key(k) and k not in used)
    if unused:
        shown = ", ".join(unused[:5]) + (f" and {len(unused) - 5} more" if len(unused) > 5 else "")
        raise CheckpointError(
            f"{reader.path}: checkpoint tensors the {family.name} mapping does not use: {shown}; "
            "pass the right --model-type or --hf-config"
        )


def build_plan(
    family: Family, reader: CheckpointReader, dims: Dims, dtype: DType, max_shard_size: int, lora: Lora | None = None
) -> Plan:
    steps = _steps(family, reader, dims, dtype, lora)
    if lora is not None and not any(step.delta for step in steps):
        raise CheckpointError(f"{reader.path}: LoRA settings were given but the checkpoint holds no adapter tensors")
    names = [t.name for s in steps for t in s.targets]
    if len(names) != len(set(names)):
        raise CheckpointError(f"mapping {family.name} produces duplicate HF names")
    _check_all_used(reader, steps, family)
    steps, files = layout(steps, max_shard_size)
    return Plan(tuple(steps), tuple(files), dtype, dims)
