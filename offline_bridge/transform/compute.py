"""The compute of one plan step in memory: read its source, cast it, merge its adapter (on the GPU if asked)
and apply its rule, giving the bytes of its HF tensors. The writer writes them; `diff` compares them."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from .. import families  # noqa: F401  (registers the families' own rules: a plan read back names them)
from ..errors import InternalError
from ..plan.row_order import stored_rows
from ..plan.rules import Dims
from ..plan.rules.registry import rule_of
from ..plan.schema import Plan, Source, Step, Target
from ..plan.transfer import selected_rows
from ..readers.base import CheckpointReader
from . import quant_rules  # noqa: F401  (registers the quantizer rules, likewise)
from .casting import as_numpy, cast
from .lora_merge import merge_tensor

__all__ = ["computed", "read_source", "step_outputs"]


def step_outputs(
    plan: Plan, reader: CheckpointReader, step: Step, device: str = "auto"
) -> list[tuple[Target, np.ndarray]]:
    """A step's HF tensors as arrays of the bytes `write_weights` writes for them (for `diff`)."""
    outputs = []
    for target, blocks in zip(step.targets, computed(reader, step, device, plan.dims), strict=True):
        data = b"".join(blocks) if len(blocks) != 1 else blocks[0]
        outputs.append((target, np.frombuffer(data, dtype=target.dtype.np).reshape(target.shape)))
    return outputs


def computed(
    reader: CheckpointReader, step: Step, device: str, dims: Dims, before_merge: Callable[[], None] | None = None
) -> list[list[memoryview]]:
    """The bytes of the step's HF tensors. The source is cast (or merged and rounded once, on the merge
    device) as a whole; a rule that only picks rows then takes them as views, any other rule is applied.
    On a GPU the merged weight is split there too (`offline_bridge.transform.gpu`). ``before_merge`` is called once the
    merge's inputs are read (torch may still be loading meanwhile)."""
    array = read_source(reader, step.source)
    (dtype,) = {t.dtype for t in step.targets}
    delta = step.delta
    computes = rule_of(step.rule).computes
    if computes is not None:  # new values (FP8 export): apply the rule, then cast its outputs
        return [[_bytes(cast(out, computes, dtype))] for out in _applied(step, array, dims)]
    if delta is None:
        whole = cast(array, step.source.dtype, dtype)
    else:
        pieces = [None if p is None else (read_source(reader, p[0]), read_source(reader, p[1])) for p in delta.pieces]
        if before_merge is not None:
            before_merge()
        merged = merge_tensor(
            array,
            step.source.dtype,
            pieces,
            delta.sources()[0].dtype,
            layout=delta.layout,
            scale=delta.scale,
            dims=dims,
            magnitude=None if delta.magnitude is None else read_source(reader, delta.magnitude),
            device=device,
            out_dtype=dtype,
        )
        if merged.device.type == "cuda":
            from ..transform.gpu import split_rows

            split = split_rows(merged, step, dims, dtype)
            if split is not None:
                return [[_bytes(out)] for out in split]
        whole = as_numpy(merged.cpu(), dtype)
    rows = selected_rows(step, dims)
    if rows is None:
        return [[_bytes(out)] for out in _applied(step, whole, dims)]
    return [[_bytes(whole[start:stop]) for start, stop in ranges] for ranges in rows]


def _applied(step: Step, array: np.ndarray, dims: Dims) -> list[np.ndarray]:
    """The step's rule applied to ``array``, each output checked against its planned shape."""
    outs = rule_of(step.rule).apply(array, dims)
    for target, out in zip(step.targets, outs, strict=True):
        if out.shape != target.shape:
            raise InternalError(f"internal error: {target.name} came out {out.shape}, planned {target.shape}")
    return outs


def _bytes(array: np.ndarray) -> memoryview:
    return memoryview(np.ascontiguousarray(array)).cast("B")


def read_source(reader: CheckpointReader, source: Source) -> np.ndarray:
    """A source's tensor, its parts joined along the first kept axis, its rows in true order."""
    tail = source.shape[1:]
    arrays = [
        reader.read(key, box).reshape(-1, *tail) if source.shape else reader.read(key, box) for key, box in source.parts
    ]
    array = (arrays[0] if len(arrays) == 1 else np.concatenate(arrays)).reshape(source.shape)
    rows = stored_rows(source)
    return array if rows is None else array[rows]
