"""Qwen3.5 (`Qwen3_5ForCausalLM`, dense) and Qwen3.5-MoE (`Qwen3_5MoeForCausalLM`): the Qwen3-Next hybrid
with the GDN input projection split as `in_proj_qkv` (rows `[q | k | v]`), `in_proj_z`, `in_proj_b`,
`in_proj_a`; Qwen3.5-MoE writes its experts packed, `mlp.experts.gate_up_proj` `[E, 2I, H]` and
`mlp.experts.down_proj` `[E, H, I]` (no `.weight`), one layer's experts at a time.

The vision-language configs (`qwen3_5`, `qwen3_5_moe`: `Qwen3_5[Moe]ForConditionalGeneration`, the text
model under `text_config`) get the language model's names under `model.language_model.`.
"""

from __future__ import annotations

import argparse
from collections.abc import Mapping
from dataclasses import replace
from typing import Any

from ..config.hf_fields import hf_value
from ..errors import CheckpointError
from ..plan.rules import Packed, Rule, moe_layer, only
from . import llama, qwen3_next
from .base import Family
from .gated_deltanet import GDN_IN_PROJ_PARTS, GatedDeltaInProj
from .moe import moe_layer_pattern

__all__ = [
    "ATTENTION",
    "DENSE_MLP",
    "FAMILY",
    "IN_PROJ_SPLIT",
    "MOE_FAMILY",
    "MOE_MLP",
    "PACKED_EXPERTS",
    "VL_FAMILY",
    "VL_MOE_FAMILY",
]

M, H, A, G = qwen3_next.M, qwen3_next.H, qwen3_next.A, qwen3_next.G

IN_PROJ_SPLIT = GatedDeltaInProj(
    (A + "in_proj.weight",),
    (G + "in_proj_qkv.weight", G + "in_proj_z.weight", G + "in_proj_b.weight", G + "in_proj_a.weight"),
    saved_apart=GDN_IN_PROJ_PARTS,
)

ATTENTION = qwen3_next.linear_attention(IN_PROJ_SPLIT) + qwen3_next.GATED_ATTENTION

PACKED_EXPERTS = only(
    moe_layer,
    (
        Packed.of(M + "mlp.experts.{e}.linear_fc1.weight", H + "mlp.experts.gate_up_proj"),
        Packed.of(M + "mlp.experts.{e}.linear_fc2.weight", H + "mlp.experts.down_proj"),
    ),
)


def _from_args(args: argparse.Namespace) -> dict[str, Any]:
    if getattr(args, "num_experts", None):
        raise CheckpointError("the checkpoint has experts; Qwen3.5 is dense (use --model-type qwen3_5_moe)")
    return qwen3_next.hybrid_config(args)


def _moe_from_args(args: argparse.Namespace) -> dict[str, Any]:
    if not all(moe_layer_pattern(args)) or getattr(args, "moe_router_pre_softmax", False):
        raise CheckpointError(
            "Qwen3.5-MoE has experts in every layer and renormalizes its top-k weights; "
            "args.moe_layer_freq / moe_router_pre_softmax say otherwise (use --model-type qwen3_next?)"
        )
    return {**qwen3_next.hybrid_config(args), **qwen3_next.shared_expert_config(args, "Qwen3.5-MoE")}


def _all_experts(config: Mapping[str, Any]) -> tuple[int, frozenset[int]]:
    layers = frozenset(range(int(hf_value(config, "num_hidden_layers"))))
    return int(hf_value(config, "num_experts")), qwen3_next.with_mtp_experts(layers, config)


DENSE_MLP = (*llama.GATED_MLP, llama.PRE_MLP_NORM)
MOE_MLP = qwen3_next.ROUTER_AND_SHARED_EXPERT + PACKED_EXPERTS + (llama.PRE_MLP_NORM,)


FAMILY = Family(
    name="qwen3_5",
    architecture="Qwen3_5ForCausalLM",
    model_type="qwen3_5_text",
    head=llama.EMBEDDING,
    layer=ATTENTION + DENSE_MLP,
    tail=llama.FINAL,
    detect=qwen3_next.is_gdn,
    priority=30,  # a Gated DeltaNet hybrid replaces the attention the priority-10/20 families assume
    mtp=qwen3_next.mtp(DENSE_MLP),
    config={"attention_bias": False},
    from_args=_from_args,
    mtp_layers=qwen3_next.mtp_layers,
    decoder=qwen3_next.HYBRID,
)

MOE_FAMILY = replace(
    FAMILY,
    name="qwen3_5_moe",
    architecture="Qwen3_5MoeForCausalLM",
    model_type="qwen3_5_moe_text",
    layer=ATTENTION + MOE_MLP,
    mtp=qwen3_next.mtp(MOE_MLP),
    detect=None,  # the same args as Qwen3-Next: only --model-type / --hf-config choose it
    from_args=_moe_from_args,
    experts=_all_experts,
)


def _language_model(rules: tuple[Rule, ...]) -> tuple[Rule, ...]:
    """The rules with HF names under `model.language_model.` (the output layer keeps `lm_head`)."""
    prefixed = "model.language_model."
    return tuple(
        replace(
            rule, targets=tuple(t.replace("model.", prefixed, 1) if t.startswith("model.") else t for t in rule.targets)
        )
        for rule in rules
    )


def _vision_language(family: Family, name: str, architecture: str, model_type: str) -> Family:
    """The family behind a vision-language config: the text model's tables and config under `text_config`."""

    def from_args(args: argparse.Namespace) -> dict[str, Any]:
        raise CheckpointError(
            f"{name}: pass the vision-language model's --hf-config (its vision tower is not in the checkpoint)"
        )

    return replace(
        family,
        name=name,
        architecture=architecture,
        model_type=model_type,
        head=_language_model(family.head),
        layer=_language_model(family.layer),
        tail=_language_model(family.tail),
        detect=None,
        from_args=from_args,
        text_config=lambda config: {**config, **(hf_value(config, "text_config", None) or {})},
    )


VL_FAMILY = _vision_language(FAMILY, "qwen3_5_vl", "Qwen3_5ForConditionalGeneration", "qwen3_5")
VL_MOE_FAMILY = _vision_language(MOE_FAMILY, "qwen3_5_moe_vl", "Qwen3_5MoeForConditionalGeneration", "qwen3_5_moe")
