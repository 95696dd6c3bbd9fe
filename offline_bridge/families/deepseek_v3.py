"""DeepSeek-V3 (`DeepseekV3ForCausalLM`): multi-latent attention (`families.mla`: its tensors and its rotary
embedding), sigmoid-routed experts with a score bias and shared experts, dense first layers, and MTP layers
written as `model.layers.{num_layers + k}`.
"""

from __future__ import annotations

import argparse
from collections.abc import Mapping
from typing import Any

from ..config.hf_fields import hf_value
from ..errors import CheckpointError
from ..plan.rules import Copy, GatedMLP, dense_layer, moe_layer, only
from . import llama, qwen3_moe
from .base import Family, as_mtp, flag
from .mla import MLA, mla_rope
from .moe import moe_layer_pattern

__all__ = ["FAMILY", "LAYER", "MOE", "MTP"]

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

LAYER = MLA + MOE + only(dense_layer, llama.GATED_MLP) + llama.NORMS

MTP = (
    Copy.of("mtp.layers.{k}.enorm.weight", H + "enorm.weight"),
    Copy.of("mtp.layers.{k}.hnorm.weight", H + "hnorm.weight"),
    Copy.of(
        "mtp.layers.{k}.eh_proj.weight",
        H + "eh_proj.weight",
        expect=lambda c: (hf_value(c, "hidden_size"), 2 * hf_value(c, "hidden_size")),
    ),
    *as_mtp(LAYER),
    Copy.of("mtp.layers.{k}.final_layernorm.weight", H + "shared_head.norm.weight"),
)


def _first_k_dense(args: argparse.Namespace) -> int:
    pattern = moe_layer_pattern(args)
    k = pattern.index(True) if True in pattern else len(pattern)
    if not all(pattern[k:]):
        raise CheckpointError(f"DeepSeek-V3 has dense layers only first; args.moe_layer_freq gives {pattern}")
    return k


def _from_args(args: argparse.Namespace) -> dict[str, Any]:
    problems = []
    if getattr(args, "moe_router_score_function", None) != "sigmoid":
        problems.append(f"moe_router_score_function={getattr(args, 'moe_router_score_function', None)} (need sigmoid)")
    groups, group_topk = getattr(args, "moe_router_num_groups", None), getattr(args, "moe_router_group_topk", None)
    if groups and groups > 1 and int(args.moe_router_topk) // int(group_topk or 1) != 2:
        problems.append(  # Megatron scores a group by its top topk // group_topk experts, HF by its top 2
            f"group routing with moe_router_topk={args.moe_router_topk} // moe_router_group_topk={group_topk} != 2"
        )
    if problems:
        raise CheckpointError("DeepSeek-V3 cannot express " + "; ".join(problems))
    moe_ffn = int(args.moe_ffn_hidden_size)
    shared = int(getattr(args, "moe_shared_expert_intermediate_size", None) or 0)
    if shared % moe_ffn:
        raise CheckpointError(
            f"moe_shared_expert_intermediate_size={shared} is not a multiple of moe_ffn_hidden_size={moe_ffn}"
        )
    heads = int(args.num_attention_heads)
    return {
        **mla_rope(args),
        "q_lora_rank": getattr(args, "q_lora_rank", None),
        "kv_lora_rank": int(args.kv_lora_rank),
        "qk_nope_head_dim": int(args.qk_head_dim),
        "qk_rope_head_dim": int(args.qk_pos_emb_head_dim),
        "v_head_dim": int(args.v_head_dim),
        "head_dim": int(args.qk_pos_emb_head_dim),
        "num_key_value_heads": heads,
        "rope_interleave": True,
        "n_routed_experts": int(args.num_experts),
        "num_experts_per_tok": int(args.moe_router_topk),
        "moe_intermediate_size": moe_ffn,
        "n_shared_experts": shared // moe_ffn,
        "routed_scaling_factor": float(getattr(args, "moe_router_topk_scaling_factor", None) or 1.0),
        "n_group": int(getattr(args, "moe_router_num_groups", None) or 1),
        "topk_group": int(getattr(args, "moe_router_group_topk", None) or 1),
        "norm_topk_prob": True,  # Megatron renormalizes sigmoid top-k scores
        "first_k_dense_replace": _first_k_dense(args),
        "num_nextn_predict_layers": int(getattr(args, "mtp_num_layers", None) or 0),
    }


def _mtp_layers(config: Mapping[str, Any]) -> int:
    return int(hf_value(config, "num_nextn_predict_layers", 0) or 0)


def _experts(config: Mapping[str, Any]) -> tuple[int, frozenset[int]]:
    first = int(hf_value(config, "first_k_dense_replace", None) or 0)
    return int(hf_value(config, "n_routed_experts")), frozenset(
        range(first, int(hf_value(config, "num_hidden_layers")) + _mtp_layers(config))
    )


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
    experts=_experts,
    mtp_layers=_mtp_layers,
)
