"""Qwen3-MoE (`Qwen3MoeForCausalLM`): Qwen3 attention, a softmax top-k router and per-expert SwiGLU MLPs.

Layers listed in `mlp_only_layers` (Megatron: 0 in `moe_layer_freq`) keep Qwen3's dense MLP.
"""

from __future__ import annotations

import argparse
from collections.abc import Mapping
from typing import Any

from ..config.hf_fields import hf_value
from ..plan.rules import Copy, GatedMLP, dense_layer, moe_layer, only
from . import llama, qwen3
from .base import Family, flag
from .moe import check_softmax_router, moe_layer_pattern

__all__ = ["EXPERTS", "FAMILY", "ROUTER", "experts"]

M, H = llama.M, llama.H

ROUTER = (
    Copy.of(
        M + "mlp.router.weight",
        H + "mlp.gate.weight",
        when=moe_layer,
        expect=lambda c: (hf_value(c, "num_experts"), hf_value(c, "hidden_size")),
    ),
)

EXPERTS = (
    GatedMLP.of(
        M + "mlp.experts.{e}.linear_fc1.weight",
        H + "mlp.experts.{e}.gate_proj.weight",
        H + "mlp.experts.{e}.up_proj.weight",
        when=moe_layer,
        expect=lambda c: (2 * hf_value(c, "moe_intermediate_size"), hf_value(c, "hidden_size")),
    ),
    Copy.of(M + "mlp.experts.{e}.linear_fc2.weight", H + "mlp.experts.{e}.down_proj.weight", when=moe_layer),
)


def _from_args(args: argparse.Namespace) -> dict[str, Any]:
    check_softmax_router(args, "Qwen3-MoE")
    pattern = moe_layer_pattern(args)
    return {
        "num_experts": int(args.num_experts),
        "num_experts_per_tok": int(args.moe_router_topk),
        "moe_intermediate_size": int(getattr(args, "moe_ffn_hidden_size", None) or args.ffn_hidden_size),
        "norm_topk_prob": not getattr(args, "moe_router_pre_softmax", False),
        "decoder_sparse_step": 1,
        "mlp_only_layers": [i for i, moe in enumerate(pattern) if not moe],
        "output_router_logits": False,
        "router_aux_loss_coef": float(getattr(args, "moe_aux_loss_coeff", 0.0) or 0.0),
    }


def experts(config: Mapping[str, Any]) -> tuple[int, frozenset[int]]:
    experts, step = (
        int(hf_value(config, "num_experts", None) or 0),
        int(hf_value(config, "decoder_sparse_step", None) or 1),
    )
    dense = set(hf_value(config, "mlp_only_layers", None) or [])
    layers = range(int(hf_value(config, "num_hidden_layers")))
    return experts, frozenset(i for i in layers if experts and i not in dense and (i + 1) % step == 0)


FAMILY = Family(
    name="qwen3_moe",
    architecture="Qwen3MoeForCausalLM",
    model_type="qwen3_moe",
    head=llama.EMBEDDING,
    layer=llama.ATTENTION + qwen3.QK_NORMS + ROUTER + EXPERTS + only(dense_layer, llama.GATED_MLP) + llama.NORMS,
    tail=llama.FINAL,
    detect=lambda args: flag(args, "num_experts") and flag(args, "qk_layernorm"),
    priority=20,  # refines Qwen3 (q/k norms) and Mixtral (experts)
    config={"attention_bias": False, "use_sliding_window": False},
    from_args=_from_args,
    experts=experts,
)
