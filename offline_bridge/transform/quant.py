"""ModelOpt quantizer state (`<linear>.weight_quantizer._amax`, `.input_quantizer._amax`) in HF names.

Each amax follows its weight's mapping rule (as Megatron-Bridge's `quant_mapping` does):
- a per-tensor amax, and any input amax, goes to every HF target of the weight, copied (`AmaxFanoutMapping`);
- a per-channel weight amax `[rows, 1]` is split by the weight's own rule, like the weight's rows. ModelOpt
  saves linear_fc1's `[gate_t; up_t]` rows per TP rank in rank order (not through Megatron's swiglu
  factory), so they are put back in `[gate; up]` order first;
- a grouped-MoE amax (`mlp.experts.<linear>.*_quantizer._amax`, no expert index) holds G quantizers on a
  leading axis — one per EP rank (G = expert_model_parallel_size), one per expert, or one for all — and
  expert e gets block e // (E / G) (`MoeAmaxFanoutMapping`).

Outputs: `quant_amax.safetensors` (fp32 amax under HF names; per-tensor ones 0-d, as ModelOpt's quantizers
hold them) and `hf_quant_config.json`. With FP8 export (`fp8_plan`), quantized linears are written as
FP8-E4M3 with `weight_scale` = amax / 448 and `input_scale`, described by a compressed-tensors
`quantization_config`. See formats/quant.md.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from ..dtypes import FLOAT32
from ..errors import CheckpointError
from ..families import Family
from ..plan.planner import Planner
from ..plan.rules import Dims, GatedMLP, Rule
from ..plan.rules.registry import rule_of
from ..plan.schema import Source, Step
from ..readers.base import CheckpointReader, RowOrder, is_quantizer_key, load_common_pt
from .casting import cast
from .compute import read_source
from .quant_rules import Fanout

__all__ = ["AMAX_FILE", "CONFIG_FILE", "Quant", "find_quant"]

QUANTIZERS = ("weight_quantizer", "input_quantizer")
AMAX_FILE = "quant_amax.safetensors"
CONFIG_FILE = "hf_quant_config.json"
STATE_DIR = "modelopt_state"  # Megatron-LM's save_sharded_modelopt_state, inside the iteration directory


@dataclass(frozen=True)
class Quant:
    """A checkpoint's quantizer state, planned: each amax read and the HF amax names it becomes."""

    steps: tuple[Step, ...]
    state: Mapping[str, Any] | None  # ModelOpt's saved state (quantize config, version), if present
    args: argparse.Namespace | None

    def values(self, reader: CheckpointReader, dims: Dims) -> dict[str, np.ndarray]:
        """Every HF amax in fp32 (tiny: one scalar or one row vector per linear)."""
        out = {}
        for step in self.steps:
            parts = rule_of(step.rule).apply(read_source(reader, step.source), dims)
            for target, part in zip(step.targets, parts, strict=True):
                out[target.name] = cast(np.ascontiguousarray(part), step.source.dtype, FLOAT32).astype(np.float32)
        return out


def _parallel(args: argparse.Namespace | None) -> tuple[int, int, int]:
    """(TP, expert TP, EP) of the save; 1 when the args do not say."""
    tp = int(getattr(args, "tensor_model_parallel_size", None) or 1)
    return (
        tp,
        int(getattr(args, "expert_tensor_parallel_size", None) or tp),
        int(getattr(args, "expert_model_parallel_size", None) or 1),
    )


def _narrow(source: Source, start: int, stop: int, *, drop: bool) -> Source:
    """Rows [start, stop) of the source's first kept axis; ``drop`` removes that axis (one group)."""
    ((key, box),) = source.parts
    axis = len(box) - len(source.shape)
    offset = box[axis][0]
    box = (*box[:axis], (offset + start, offset + stop), *box[axis + 1 :])
    shape = source.shape[1:] if drop else (stop - start, *source.shape[1:])
    return replace(source, parts=((key, box),), shape=shape)


def _grouped(planner: Planner, sources: tuple[str, ...], index: dict[str, int], ep: int) -> Source | None:
    """Expert ``index["e"]``'s block of a grouped-MoE amax, or None if the checkpoint has none."""
    grouped = tuple(s.replace(".experts.{e}.", ".experts.") for s in sources)
    source = planner.find({k: v for k, v in index.items() if k != "e"})(grouped)
    dims = planner.dims
    if source is None or len(source.shape) % 2 == 0:  # [] or [rows, 1]: one quantizer for every expert
        return source
    groups, experts = source.shape[0], dims.num_experts
    if groups != 1 and (groups not in (ep, experts) or experts % groups):
        raise CheckpointError(
            f"{source.key} holds {groups} grouped quantizers, but {experts} experts over "
            f"expert_model_parallel_size={ep} need one per EP rank ({ep}) or one per expert ({experts})"
        )
    block = index["e"] // (experts // groups)
    return _narrow(source, block, block + 1, drop=True)


def _amax_rule(rule: Rule, source: Source, quantizer: str, targets: tuple[str, ...]) -> Rule:
    """How one amax becomes its HF amax tensors: copied, or split like the weight (per-channel)."""
    sources = (source.key,)
    if math.prod(source.shape) == 1 or quantizer == "input_quantizer":
        return Fanout(sources, targets)
    if len(source.shape) != 2 or source.shape[1] != 1:
        raise CheckpointError(
            f"{source.key} has shape {list(source.shape)}: only per-tensor and per-output-channel [rows, 1] "
            "amax are exported (block quantization is not supported)"
        )
    return replace(rule, sources=sources, targets=targets, when=None, expect=None)


def _add_amax_step(planner: Planner, rule: Rule, index: dict[str, int], quantizer: str) -> None:
    suffix = f".{quantizer}._amax"
    sources = tuple(s.removesuffix(".weight") + suffix for s in rule.sources)
    source = planner.find(index)(sources)
    tp, etp, ep = _parallel(planner.reader.args)
    expert = "e" in index
    if source is None and expert:
        source = _grouped(planner, sources, index, ep)
    if source is None:
        return
    dims = planner.dims
    names = tuple(t.format(**index).removesuffix(".weight") + suffix for t in rule.targets)
    amax_rule = _amax_rule(rule, source, quantizer, names)
    saved_tp = etp if expert else tp
    if saved_tp > 1 and isinstance(amax_rule, GatedMLP) and len(source.parts) == 1:  # not swiglu halves _w / _v
        source = replace(source, row_order=RowOrder("rank_major_gated", saved_tp))
    if source.shape and (rows := amax_rule.rows(source.shape, dims)) != source.shape[0]:  # vocab padding
        source = _narrow(source, 0, rows, drop=False)
    planner.add(amax_rule, source, names, FLOAT32)


def find_quant(family: Family, reader: CheckpointReader, dims: Dims) -> Quant | None:
    """The checkpoint's amax tensors mapped to HF names, or None when it holds no quantizer state."""
    if not any(is_quantizer_key(key) for key in reader.tensors):
        return None
    planner = Planner(family, reader, dims)
    for rule, index in planner.rules():
        if all(name.endswith(".weight") for name in (*rule.sources, *rule.targets)):
            for quantizer in QUANTIZERS:
                _add_amax_step(planner, rule, index, quantizer)
    hint = "only weight and input amax of the mapped linear layers are exported"
    steps = planner.checked(is_quantizer_key, "quantizer state", hint)
    return Quant(tuple(steps), load_common_pt(reader.path / STATE_DIR), reader.args)
