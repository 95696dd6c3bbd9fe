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
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from ..dtypes import FLOAT32, DType, by_torch_name
from ..errors import CheckpointError, OptionError
from ..families import Family
from ..plan.planner import Plan, Source, Step, Target, expand, finder, layout
from ..plan.rules import Dims, GatedMLP, RankMajorGatedMLP, Repeat, Rule, Shape
from ..readers.base import CheckpointReader, is_quantizer_key, load_common_pt
from ..write.json_file import write_json
from ..write.writer import write_weights
from .casting import cast
from .compute import read_source

__all__ = ["AMAX_FILE", "CONFIG_FILE", "Quant", "find_quant", "fp8_plan", "write_quant"]

QUANTIZERS = ("weight_quantizer", "input_quantizer")
FP8_MAX = 448.0  # largest finite FP8-E4M3 value
AMAX_FILE = "quant_amax.safetensors"
CONFIG_FILE = "hf_quant_config.json"
STATE_DIR = "modelopt_state"  # Megatron-LM's save_sharded_modelopt_state, inside the iteration directory
FP8 = by_torch_name("float8_e4m3fn")


@dataclass(frozen=True)
class Fanout(Repeat):
    """One amax under every target name; a per-tensor one as the 0-d tensor ModelOpt's quantizers hold."""

    def target_shapes(self, shape: Shape, dims: Dims, key: str) -> list[Shape]:
        return [() if math.prod(shape) == 1 else shape] * len(self.targets)

    def apply(self, array: np.ndarray, dims: Dims) -> list[np.ndarray]:
        return super().apply(array.reshape(()) if array.size == 1 else array, dims)


@dataclass(frozen=True)
class Computed(Rule):
    """``inner``'s outputs computed on in fp32: FP8 weight values (w / scale, clipped to ±448) or scales
    (amax / 448, in the compressed-tensors shape)."""

    computes: ClassVar[DType | None] = FLOAT32

    inner: Rule | None = None
    stored: DType = FLOAT32  # the source's dtype (rules see raw bytes)
    scales: tuple[np.ndarray | float, ...] = ()  # one divisor per target
    clip: bool = False
    shapes: tuple[Shape, ...] | None = None  # output shapes, when not the inner rule's

    def target_shapes(self, shape: Shape, dims: Dims, key: str) -> list[Shape]:
        return list(self.shapes) if self.shapes else self.inner.target_shapes(shape, dims, key)

    def apply(self, array: np.ndarray, dims: Dims) -> list[np.ndarray]:
        values = cast(array, self.stored, FLOAT32).astype(np.float32)
        outs = [part / scale for part, scale in zip(self.inner.apply(values, dims), self.scales, strict=True)]
        outs = [np.clip(out, -FP8_MAX, FP8_MAX) if self.clip else out for out in outs]
        return [out.reshape(shape) for out, shape in zip(outs, self.shapes)] if self.shapes else outs


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
            parts = step.rule.apply(read_source(reader, step.source), dims)
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


def _grouped(reader: CheckpointReader, sources: tuple[str, ...], index: dict[str, int], dims: Dims, ep: int):
    """Expert ``index["e"]``'s block of a grouped-MoE amax, or None if the checkpoint has none."""
    grouped = tuple(s.replace(".experts.{e}.", ".experts.") for s in sources)
    source = finder(reader, {k: v for k, v in index.items() if k != "e"}, dims)(grouped)
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


def _amax_rule(rule: Rule, source: Source, quantizer: str, targets: tuple[str, ...], tp: int) -> Rule:
    """How one amax becomes its HF amax tensors: copied, or split like the weight (per-channel)."""
    sources = (source.key,)
    if math.prod(source.shape) == 1 or quantizer == "input_quantizer":
        return Fanout(sources, targets)
    if len(source.shape) != 2 or source.shape[1] != 1:
        raise CheckpointError(
            f"{source.key} has shape {list(source.shape)}: only per-tensor and per-output-channel [rows, 1] "
            "amax are exported (block quantization is not supported)"
        )
    if isinstance(rule, GatedMLP) and len(source.parts) == 1:  # rank-major rows, not swiglu halves _w / _v
        return RankMajorGatedMLP(sources, targets, tp=tp)
    return replace(rule, sources=sources, targets=targets, when=None, expect=None)


def _amax_step(reader: CheckpointReader, rule: Rule, index: dict[str, int], dims: Dims, quantizer: str) -> Step | None:
    suffix = f".{quantizer}._amax"
    sources = tuple(s.removesuffix(".weight") + suffix for s in rule.sources)
    source = finder(reader, index, dims)(sources)
    tp, etp, ep = _parallel(reader.args)
    expert = "e" in index
    if source is None and expert:
        source = _grouped(reader, sources, index, dims, ep)
    if source is None:
        return None
    names = tuple(t.format(**index).removesuffix(".weight") + suffix for t in rule.targets)
    amax_rule = _amax_rule(rule, source, quantizer, names, etp if expert else tp)
    if source.shape and (rows := amax_rule.rows(source.shape, dims)) != source.shape[0]:  # vocab padding
        source = _narrow(source, 0, rows, drop=False)
    shapes = amax_rule.target_shapes(source.shape, dims, source.key)
    return Step(amax_rule, source, tuple(Target(n, tuple(s), FLOAT32) for n, s in zip(names, shapes)))


def find_quant(family: Family, reader: CheckpointReader, dims: Dims) -> Quant | None:
    """The checkpoint's amax tensors mapped to HF names, or None when it holds no quantizer state."""
    if not any(is_quantizer_key(key) for key in reader.tensors):
        return None
    steps = [
        step
        for rule, index in expand(family, dims)
        if all(name.endswith(".weight") for name in (*rule.sources, *rule.targets))
        for quantizer in QUANTIZERS
        if (step := _amax_step(reader, rule, index, dims, quantizer)) is not None
    ]
    used = {key for step in steps for key, _ in step.source.parts}
    unused = sorted(key for key in reader.tensors if is_quantizer_key(key) and key not in used)
    if unused:
        shown = ", ".join(unused[:5]) + (f" and {len(unused) - 5} more" if len(unused) > 5 else "")
        raise CheckpointError(
            f"{reader.path}: quantizer state the {family.name} mapping cannot place: {shown}; only weight and "
            "input amax of the mapped linear layers are exported"
        )
    return Quant(tuple(steps), load_common_pt(reader.path / STATE_DIR), reader.args)


def _module(name: str) -> str:
    return name.rsplit(".", 1)[0]


def _linears(plan: Plan, family: Family) -> list[str]:
    """HF modules holding a 2-D weight, embeddings aside: the linear layers a quantizer could sit on."""
    return [
        _module(t.name)
        for step in plan.steps
        if step.rule not in family.head
        for t in step.targets
        if t.name.endswith(".weight") and len(t.shape) == 2
    ]


def _jsonable(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value if value is None or isinstance(value, (bool, int, float, str)) else repr(value)


def _modes(state: Mapping[str, Any] | None) -> dict[str, Any]:
    """ModelOpt's modes (`quantize`, `max_calibrate`, ...) with their configs."""
    entries = (state or {}).get("modelopt_state_dict") or []
    return {mode: _jsonable(body.get("config")) for mode, body in entries if isinstance(body, Mapping)}


def _weight_bits(modes: Mapping[str, Any]) -> Any:
    """`num_bits` of the `*weight_quantizer` entry of the quantize config (list or dict form)."""
    cfg = (modes.get("quantize") or {}).get("quant_cfg") or []
    entries = cfg if isinstance(cfg, list) else [{"quantizer_name": k, "cfg": v} for k, v in cfg.items()]
    for entry in entries:
        if isinstance(entry, Mapping) and entry.get("quantizer_name") == "*weight_quantizer":
            return (entry.get("cfg") or {}).get("num_bits")
    return None


def _stored_algo(plan: Plan) -> str | None:
    """ "FP8" when this directory's weights are ModelOpt's FP8 layout (per-tensor `weight_scale`, an
    `input_scale` each), else None: consumers that read `hf_quant_config.json` must not take the
    unquantized (or per-channel) weights of this directory for ModelOpt FP8."""
    names = {t.name: t for t in plan.targets()}
    scales = [t for n, t in names.items() if n.endswith(".weight_scale")]
    plain = all(t.shape == (1,) and _module(t.name) + ".input_scale" in names for t in scales)
    return "FP8" if scales and plain else None


def write_quant(
    quant: Quant, plan: Plan, family: Family, reader: CheckpointReader, out_dir: Path
) -> dict[tuple[str, str], str]:
    """`quant_amax.safetensors` (HF amax names) and `hf_quant_config.json`: how this directory's weights are
    stored (`quantization`, ModelOpt's schema) and the calibration found in the checkpoint (`calibration`).
    Returns the amax tensors' sha256 (as `write_weights`)."""
    steps, files = layout(list(quant.steps), 2**62, stem=Path(AMAX_FILE).stem)
    digests = write_weights(Plan(tuple(steps), tuple(files), FLOAT32, plan.dims), reader, out_dir, progress=False)
    names = [t.name for step in quant.steps for t in step.targets]
    calibrated = {_module(_module(n)) for n in names if n.endswith(".weight_quantizer._amax")}
    stored = {_module(t.name) for t in plan.targets() if t.dtype == FP8}
    linears = _linears(plan, family)
    modes = _modes(quant.state)
    args = vars(quant.args) if quant.args is not None else {}
    write_json(
        out_dir / CONFIG_FILE,
        {
            "producer": {"name": "modelopt", "version": (quant.state or {}).get("modelopt_version")},
            "quantization": {
                "quant_algo": _stored_algo(plan),
                "kv_cache_quant_algo": None,
                "exclude_modules": sorted(m for m in linears if m not in stored),
            },
            "calibration": {
                "quant_algo": "FP8" if _weight_bits(modes) == [4, 3] else None,
                "exclude_modules": sorted(m for m in linears if m not in calibrated),
                "amax_file": AMAX_FILE,
                "amax_tensors": len(names),
            },
            "modelopt_state": modes,
            "megatron_args": {k: _jsonable(v) for k, v in sorted(args.items()) if "quant" in k or k.startswith("fp8")},
        },
    )
    return digests


def fp8_plan(plan: Plan, quant: Quant | None, reader: CheckpointReader, max_shard_size: int) -> tuple[Plan, dict]:
    """``plan`` with every linear that has a weight amax in FP8-E4M3 plus its `weight_scale` (and `input_scale`
    when it has an input amax), and the compressed-tensors `quantization_config` describing them.

    Experts (`{e}` targets) stay unquantized: transformers fuses them into one parameter per layer, which
    compressed-tensors does not quantize. The amax are read here, before any weight (they are tiny).
    """
    if quant is None:
        raise OptionError(f"{reader.path}: --export-fp8 needs ModelOpt amax tensors; the checkpoint has none")
    if any(step.delta for step in plan.steps):
        raise OptionError("--export-fp8 cannot be combined with a LoRA adapter; merge first, then quantize")
    values = quant.values(reader, plan.dims)
    by_module = {}
    for step in quant.steps:
        by_module.setdefault(_module(_module(step.targets[0].name)), []).append(step)
    steps, schemes = [], {}
    for step in plan.steps:
        modules = [_module(t.name) for t in step.targets]
        amax = [values.get(m + ".weight_quantizer._amax") for m in modules]
        if "{e}" in step.rule.targets[0] or any(a is None for a in amax):
            steps.append(step)
            continue
        scales = tuple(np.maximum(a, np.finfo(np.float32).tiny) / FP8_MAX for a in amax)  # amax 0: all-zero rows
        rule = Computed(step.rule.sources, step.rule.targets, inner=step.rule, stored=step.source.dtype, scales=scales)
        steps.append(replace(step, rule=rule, targets=tuple(replace(t, dtype=FP8) for t in step.targets)))
        for amax_step in by_module.get(modules[0], []):
            steps.append(_scale_step(amax_step))
        has_input = all(m + ".input_quantizer._amax" in values for m in modules)
        for m, a in zip(modules, amax):
            schemes[m] = ("tensor" if a.size == 1 else "channel", has_input)
    if not schemes:
        raise OptionError(f"{reader.path}: --export-fp8 found no linear layer with a weight amax to quantize")
    steps, files = layout(steps, max_shard_size)
    return Plan(tuple(steps), tuple(files), plan.dtype, plan.dims), compressed_tensors_config(schemes)


def _scale_step(amax: Step) -> Step:
    """`weight_scale` / `input_scale` = amax / 448 from the same read as the amax (shape [1] when per-tensor)."""
    names = tuple(
        t.name.replace(".weight_quantizer._amax", ".weight_scale").replace(".input_quantizer._amax", ".input_scale")
        for t in amax.targets
    )
    shapes = tuple((1,) if t.shape == () else t.shape for t in amax.targets)
    rule = Computed(
        amax.rule.sources,
        names,
        inner=amax.rule,
        stored=amax.source.dtype,
        scales=(FP8_MAX,) * len(names),
        shapes=shapes,
    )
    return Step(rule, amax.source, tuple(Target(n, s, FLOAT32) for n, s in zip(names, shapes)))


def compressed_tensors_config(schemes: Mapping[str, tuple[str, bool]]) -> dict[str, Any]:
    """compressed-tensors `float-quantized`: one config group per (weight strategy, static input scale),
    targeting its modules by name."""
    groups: dict[tuple[str, bool], list[str]] = {}
    for module, scheme in schemes.items():
        groups.setdefault(scheme, []).append(module)

    def fp8(strategy: str) -> dict[str, Any]:
        return {"num_bits": 8, "type": "float", "strategy": strategy, "symmetric": True, "dynamic": False}

    return {
        "quant_method": "compressed-tensors",
        "format": "float-quantized",
        "quantization_status": "compressed",
        "config_groups": {
            f"group_{i}": {
                "targets": modules,
                "weights": fp8(strategy),
                "input_activations": fp8("tensor") if static_input else None,
                "output_activations": None,
            }
            for i, ((strategy, static_input), modules) in enumerate(sorted(groups.items()))
        },
        "ignore": [],
    }
