"""DeepSeek-V3 (`DeepseekV3ForCausalLM`): multi-latent attention (`families.mla`: its tensors and its rotary
embedding), sigmoid-routed experts with a score bias and shared experts, dense first layers, and MTP layers
written as `model.layers.{num_layers + k}`.
"""

from __future__ import annotations

import argparse
from typing import Any

from ..config.hf_fields import hf_value
from ..plan.rules import Copy, GatedMLP, Rule, dense_layer, moe_layer, only
from . import llama, qwen3_moe
from .base import Family, as_mtp, flag
from .mla import MLA, mla_fields
from .moe import dense_first_experts, mtp_depth, sigmoid_moe_fields

__all__ = ["FAMILY", "LAYER", "MOE", "MOE_BODY", "MTP", "mtp_block"]

M, H = llama.M, llama.H

MOE = (
    Copy.of(
        M + "mlp.router.weight",
        H + "mlp.gate.weight",
        when=moe_layer,
        expect=lambda c: (hf_value(c, "n_routed_experts"), hf_value(c, "hidden_size")),
    ),
    Copy.of(M + "mlp.router.expert_bias", H + "mlp.gate.e_score_correction_bias", when=moe_layer),
    *qwen3_moe.EXPERTS,  # same names, same rules
    GatedMLP.of(
        M + "mlp.shared_experts.linear_fc1.weight",
        H + "mlp.shared_experts.gate_proj.weight",
        H + "mlp.shared_experts.up_proj.weight",
        when=moe_layer,
        expect=lambda c: (
            2 * hf_value(c, "moe_intermediate_size") * hf_value(c, "n_shared_experts"),
            hf_value(c, "hidden_size"),
        ),
    ),
    Copy.of(M + "mlp.shared_experts.linear_fc2.weight", H + "mlp.shared_experts.down_proj.weight", when=moe_layer),
)

# What follows the attention in every layer (GLM-4.5 shares it): experts, a dense MLP first, the norms.
MOE_BODY = MOE + only(dense_layer, llama.GATED_MLP) + llama.NORMS

LAYER = MLA + MOE_BODY


def mtp_block(layer: tuple[Rule, ...]) -> tuple[Rule, ...]:
    """An MTP layer as DeepSeek-V3 writes it (HF layer `num_layers + k`): its norms, `eh_proj`, the decoder
    layer ``layer`` and `shared_head.norm`."""
    return (
        Copy.of("mtp.layers.{k}.enorm.weight", H + "enorm.weight"),
        Copy.of("mtp.layers.{k}.hnorm.weight", H + "hnorm.weight"),
        Copy.of(
            "mtp.layers.{k}.eh_proj.weight",
            H + "eh_proj.weight",
            expect=lambda c: (hf_value(c, "hidden_size"), 2 * hf_value(c, "hidden_size")),
        ),
        *as_mtp(layer),
        Copy.of("mtp.layers.{k}.final_layernorm.weight", H + "shared_head.norm.weight"),
    )


MTP = mtp_block(LAYER)


def _from_args(args: argparse.Namespace) -> dict[str, Any]:
    return {**mla_fields(args), **sigmoid_moe_fields(args, "DeepSeek-V3")}


FAMILY = Family(
    name="deepseek_v3",
    architecture="DeepseekV3ForCausalLM",
    model_type="deepseek_v3",
    head=llama.EMBEDDING,
    layer=LAYER,
    tail=llama.FINAL,
    detect=lambda args: flag(args, "multi_latent_attention") and flag(args, "num_experts"),
    priority=30,  # MLA replaces the attention the priority-10/20 families assume
    mtp=MTP,
    config={"attention_bias": False},
    from_args=_from_args,
    experts=dense_first_experts,
    mtp_layers=mtp_depth,
)
