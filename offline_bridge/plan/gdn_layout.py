"""How a Gated DeltaNet in_proj / conv1d is read: fused in TP-local blocks, or in pieces regrouped to the
adapter's TP so base and LoRA delta add up before the rule regroups the sum."""

from __future__ import annotations

from dataclasses import replace

from ..errors import CheckpointError
from ..readers.base import CheckpointReader
from .rules import GatedDeltaPieces
from .schema import Delta, Source

__all__ = ["gated_delta_layout"]


def gated_delta_layout(
    reader: CheckpointReader, rule: GatedDeltaPieces, source: Source, delta: Delta | None
) -> tuple[Source, GatedDeltaPieces]:
    """A fused tensor (one part) holds rows in TP-local blocks at the training TP. A LoRA B has no split
    factory, so its rows are TP-local blocks at the adapter's TP: the base pieces are then read in that
    order too, base and delta add up, and the rule regroups the sum."""
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
