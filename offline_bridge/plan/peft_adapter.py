"""The plan of `export-adapter`: a Megatron-Bridge adapter's tensors as a Hugging Face PEFT adapter's, and its
adapter_config.json, from the adapter checkpoint's metadata alone.

The family tables say which HF modules a Megatron tensor becomes; the adapter follows them:
- the LoRA A of a fused weight is shared by its parts (written once per part);
- its B is split by the same rule as the weight (QKV per query group, fc1 halves), rank as feature dim;
- CanonicalLoRA pieces are already per part (gate/up B rows put back in true order);
- experts go to transformers-5's fused `gate_up_proj` / `down_proj` as PEFT ParamWrapper tensors, or per
  expert (`mlp.experts.{e}.*_proj`, PEFT's v4 layout) with `--expert-format per-expert`;
- the router goes to `mlp.gate.weight`, a plain 2-D parameter in transformers 5 (no nn.Linear), as a
  ParamWrapper target: its delta is `B @ A` like a Linear's; dense and shared-expert MLPs of MoE models
  likewise (see `_parameter_target`).
DoRA magnitudes become `lora_magnitude_vector`, split like the weight. Expert ranks that differ from `r`
(`normalize_moe_lora`) go to `rank_pattern` (ParamWrapper only). Anything PEFT cannot express (such ranks
in the per-expert layout, embeddings, DoRA on ParamWrapper targets) is refused.
"""

from __future__ import annotations

import re
from typing import Any

from ..dtypes import by_option
from ..errors import CheckpointError, OptionError
from ..families import Family
from ..readers.base import CheckpointReader, is_model_key
from .layout import layout
from .planner import Planner
from .rules import (
    Copy,
    Dims,
    ExpertMajorA,
    GatedMLP,
    InterleavedPacked,
    InterleavedRankMajorB,
    Packed,
    RankMajorB,
    Repeat,
    Rule,
    VocabRows,
)
from .schema import Delta, Lora, Plan, Source

__all__ = ["ADAPTER_FILE", "PREFIX", "adapter_config", "build_adapter_plan"]

ADAPTER_FILE = "adapter_model"
PREFIX = "base_model.model."


# Leaf names PEFT cannot wrap as modules: the routers (a bare `weight` in transformers 5), and on MoE models
# the v4 expert names, which PEFT's transformers-5 conversion re-aims at the fused experts wherever they appear
# in target_modules — so dense and shared-expert MLPs of a MoE model are targeted by parameter as well.
_ROUTER_LEAVES = ("gate", "router")  # GPT-OSS: `mlp.router.weight`, a bare parameter too
_V4_EXPERT_LEAVES = ("gate_proj", "up_proj", "down_proj", "w1", "w2", "w3")
_LAYER = re.compile(r"(?:^|\.)layers\.\d+\.")
# Modules PEFT refuses LoRA on, per HF model_type: Mamba mixers' out_proj and conv1d (their fused kernels read
# the weights directly; peft's `_check_lora_target_modules_mamba`).
_PEFT_REFUSES = {"nemotron_h": ("out_proj", "conv1d")}


def _parameter_target(module: str, dims: Dims) -> str | None:
    """The `target_parameters` entry (`mlp.gate.weight`) for an HF module PEFT must reach by parameter
    (through `lora.ParamWrapper`, whose delta on a 2-D weight is `B @ A` like a Linear's), else None."""
    leaf = module.rsplit(".", 1)[-1]
    if leaf in _ROUTER_LEAVES or (dims.num_experts and leaf in _V4_EXPERT_LEAVES and ".experts." not in module):
        return _LAYER.split(module)[-1] + ".weight"
    return None


def _modules(rule: Rule, index: dict[str, int]) -> list[str]:
    return [t.format(**index).removesuffix(".weight") for t in rule.targets]


def _pieces(rule: Rule, delta: Delta, modules: list[str]) -> list[tuple[Rule, Any, list[str]]]:
    """(rule, source, HF tensor names) for the A and B of one Megatron adapter."""
    if delta.layout == "plain":
        a, b = delta.pieces[0]
        return [
            (Repeat((a.pattern,), tuple(modules)), a, [f"{PREFIX}{m}.lora_A.weight" for m in modules]),
            (rule, b, [f"{PREFIX}{m}.lora_B.weight" for m in modules]),
        ]
    out = []
    for piece, module in zip(delta.pieces, modules, strict=True):
        if piece is None:  # a CanonicalLoRA part that was not targeted
            continue
        a, b = piece
        out.append((Copy((a.pattern,), (module,)), a, [f"{PREFIX}{module}.lora_A.weight"]))
        out.append((Copy((b.pattern,), (module,)), b, [f"{PREFIX}{module}.lora_B.weight"]))
    return out


def _fused_experts(rule: Rule, index: dict[str, int]) -> str:
    """The parameter transformers 5 fuses a layer's per-expert tensors into: a gated fc1 → `gate_up_proj`, a plain
    (squared-ReLU) fc1 → `up_proj` (NemotronH), fc2 → `down_proj`."""
    if isinstance(rule, GatedMLP):
        return "gate_up_proj"
    return "up_proj" if rule.targets[0].format(**{**index, "e": 0}).endswith(".up_proj.weight") else "down_proj"


def _layer_adapter(planner: Planner, rule: Rule, index: dict[str, int]) -> tuple[Source, Source] | None:
    """A layer's expert adapter with its expert axis (or shared by all experts), for ParamWrapper."""
    module = rule.sources[0].removesuffix(".weight").replace(".experts.{e}.", ".experts.experts.") + ".adapter."
    find = planner.find({k: v for k, v in index.items() if k != "e"})
    a, b = find((module + "linear_in.weight",)), find((module + "linear_out.weight",))
    return None if a is None or b is None else (a, b)


def _paramwrapper(planner: Planner, rules: list[tuple[Rule, dict[str, int]]]) -> list[tuple[Rule, Source, list[str]]]:
    """ParamWrapper pieces for one layer's expert rules: A expert-major, B rank-major; with both parameters
    targeted, gate_up_proj (registered first) is the inner `base_layer`."""
    dims = planner.dims
    found = [(rule, index, _layer_adapter(planner, rule, index)) for rule, index in rules]
    found = [(rule, index, pair) for rule, index, pair in found if pair is not None]
    out = []
    for rule, index, (a, b) in found:
        if isinstance(rule, Packed):  # the HF parameter itself: `<owner>.gate_up_proj` / `down_proj`
            owner, parameter = rule.targets[0].format(**index).rsplit(".", 1)
        else:
            parameter = _fused_experts(rule, index)
            owner = rule.targets[0].format(**{**index, "e": 0}).split(".experts.0.")[0] + ".experts"
        inner = ".base_layer" if parameter != "down_proj" and len(found) == 2 else ""  # the first registered
        name = f"{PREFIX}{owner}{inner}"
        # `mlp.experts` (transformers 5 renames Mixtral's v4 `block_sparse_moe`), NemotronH's `mixer.experts`
        target = (_LAYER.split(owner)[-1].replace("block_sparse_moe.", "mlp.") + f".{parameter}",)
        out.append((ExpertMajorA((a.pattern,), target, experts=dims.num_experts), a, [f"{name}.lora_A.weight"]))
        b_rule = InterleavedRankMajorB if isinstance(rule, InterleavedPacked) else RankMajorB  # GPT-OSS gate / up
        out.append((b_rule((b.pattern,), target, experts=dims.num_experts), b, [f"{name}.lora_B.weight"]))
    return out


def build_adapter_plan(
    family: Family,
    reader: CheckpointReader,
    dims: Dims,
    lora: Lora,
    dtype_name: str,
    expert_format: str = "paramwrapper",
) -> Plan:
    """The PEFT adapter's tensors, from the adapter checkpoint's metadata alone."""
    planner = Planner(family, reader, dims)

    def add(piece_rule: Rule, source: Source, names: list[str]) -> None:
        planner.add(piece_rule, source, names, source.dtype if dtype_name == "auto" else by_option(dtype_name))

    work = planner.rules()
    if expert_format == "paramwrapper":
        experts = [(rule, index) for rule, index in work if index.get("e") == 0 or isinstance(rule, Packed)]
        work = [(rule, index) for rule, index in work if "e" not in index and not isinstance(rule, Packed)]
        for layer in sorted({index["i"] for _, index in experts}):
            for piece in _paramwrapper(planner, [(r, i) for r, i in experts if i["i"] == layer]):
                add(*piece)
    elif expert_format != "per-expert":
        raise OptionError(f"--expert-format {expert_format!r}: use paramwrapper or per-expert")
    elif any(isinstance(rule, Packed) for rule, _ in work):
        raise OptionError(f"--expert-format per-expert: {family.name} packs its experts; use paramwrapper")
    for rule, index in work:
        delta = planner.attach(rule, index, None, lora)
        if delta is None:
            continue
        where = delta.sources()[0].key
        modules = _modules(rule, index)
        if delta.magnitude is not None and any(_parameter_target(m, dims) for m in modules):
            raise CheckpointError(
                f"{where}: DoRA on {', '.join(modules)}, which PEFT reaches only as a ParamWrapper parameter "
                "(no DoRA there); merge with `convert`"
            )
        if isinstance(rule, VocabRows):
            raise CheckpointError(f"{where}: PEFT cannot hold a LoRA on a vocab-padded embedding; merge with `convert`")
        refused = [m for m in modules if m.rsplit(".", 1)[-1] in _PEFT_REFUSES.get(family.model_type, ())]
        if refused:
            raise CheckpointError(
                f"{where}: PEFT refuses LoRA on {refused[0]} of {family.model_type}; merge with `convert`"
            )
        if delta.sources()[0].shape[0] != lora.dim:  # PEFT's v4 conversion fuses gate/up experts at rank 2·r
            raise CheckpointError(
                f"{where}: rank {delta.sources()[0].shape[0]} differs from r={lora.dim}, which PEFT's per-expert "
                "(v4) layout cannot carry; use --expert-format paramwrapper (rank_pattern) or merge with `convert`"
            )
        _, delta = rule.row_orders(None, delta, dims, None)  # e.g. GDN in_proj B rows: TP-local blocks
        for piece in _pieces(rule, delta, modules):
            add(*piece)
        if delta.magnitude is not None:  # DoRA: split like the weight
            add(rule, delta.magnitude, [f"{PREFIX}{module}.lora_magnitude_vector" for module in modules])
    steps = planner.checked(is_model_key, "adapter tensors")
    if not steps:
        raise CheckpointError(f"{reader.path}: no LoRA adapter tensors found")
    steps, files = layout(steps, 2**62, stem=ADAPTER_FILE)
    return Plan(tuple(steps), tuple(files), steps[0].targets[0].dtype, dims)


def adapter_config(plan: Plan, lora: Lora, base_model: str | None) -> dict[str, Any]:
    """PEFT's adapter_config.json for the written keys (ParamWrapper parameters under target_parameters)."""
    modules, parameters, dora, ranks = set(), set(), False, {}
    for step in plan.steps:
        if step.rule.name in (ExpertMajorA.__name__, RankMajorB.__name__, InterleavedRankMajorB.__name__):
            parameters.add(step.rule.param("targets")[0])
            if step.rule.name == ExpertMajorA.__name__:  # normalize_moe_lora: expert rank dim // topk, scale alpha / it
                rank = step.targets[0].shape[0] // plan.dims.num_experts
                if rank != lora.dim:
                    ranks[re.escape(step.rule.param("targets")[0])] = rank
        elif step.targets[0].name.endswith(".lora_magnitude_vector"):
            dora = True
        else:
            for module in (t.name.removeprefix(PREFIX).rsplit(".", 2)[0] for t in step.targets):
                parameter = _parameter_target(module, plan.dims)
                if parameter:
                    parameters.add(parameter)
                else:
                    modules.add(module.rsplit(".", 1)[-1])
    return {
        "target_parameters": sorted(parameters) or None,
        "alpha_pattern": {},
        "base_model_name_or_path": base_model,
        "bias": "none",
        "fan_in_fan_out": False,
        "inference_mode": True,
        "lora_alpha": lora.alpha,
        "lora_dropout": 0.0,
        "peft_type": "LORA",
        "r": lora.dim,
        "rank_pattern": ranks,
        "target_modules": sorted(modules) or None,
        "task_type": "CAUSAL_LM",
        "use_dora": dora,
        "use_rslora": False,
    }
