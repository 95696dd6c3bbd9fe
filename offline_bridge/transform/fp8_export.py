"""FP8 export (`--export-fp8`): a plan rewritten so every calibrated linear is written as FP8-E4M3 with its
scales, and the compressed-tensors `quantization_config` that describes them. See formats/quant.md."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace
from typing import Any

import numpy as np

from ..dtypes import FLOAT32
from ..errors import OptionError
from ..plan.layout import layout
from ..plan.rules.registry import rule_of, rule_ref
from ..plan.schema import Plan, Step, Target
from ..readers.base import CheckpointReader
from .quant import Quant
from .quant_rules import FP8, FP8_MAX, Computed, divisor
from .quant_rules import module_of as _module

__all__ = ["compressed_tensors_config", "fp8_plan"]


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
        if "{e}" in step.rule.param("targets")[0] or any(a is None for a in amax):
            steps.append(step)
            continue
        tiny = np.finfo(np.float32).tiny  # amax 0: all-zero rows
        scales = tuple(divisor(np.maximum(a, tiny) / FP8_MAX) for a in amax)
        weight = rule_of(step.rule)
        rule = Computed(weight.sources, weight.targets, inner=weight, stored=step.source.dtype, scales=scales)
        steps.append(replace(step, rule=rule_ref(rule), targets=tuple(replace(t, dtype=FP8) for t in step.targets)))
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
        amax.rule.param("sources"),
        names,
        inner=rule_of(amax.rule),
        stored=amax.source.dtype,
        scales=(FP8_MAX,) * len(names),
        shapes=shapes,
    )
    return Step(rule_ref(rule), amax.source, tuple(Target(n, s, FLOAT32) for n, s in zip(names, shapes)))


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
