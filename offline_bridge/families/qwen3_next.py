"""Qwen3-Next (`Qwen3NextForCausalLM`): a Gated DeltaNet hybrid. Most layers are linear attention (GDN), every
`full_attention_interval`-th one gated full attention; the MLPs are softmax top-k experts plus a gated
shared expert, written per expert (`mlp.experts.{e}.*`) as the Hub checkpoints are.

Megatron saves the GDN input projection apart, TP-invariant: `in_proj.weight.{query,key,value,z,beta,alpha}`
(each over all heads) and `conv1d.weight.{query,key,value}`. Qwen3-Next regroups in_proj per key head
(`in_proj_qkvz`, `in_proj_ba`). All norms are zero-centred on both sides (copied) except GDN's gated output
norm, plain in HF (+1). The tables here are shared with Qwen3.5 (`qwen3_5.py`).
"""

from __future__ import annotations

import argparse
from collections.abc import Mapping
from dataclasses import replace
from typing import Any

from ..config.hf_fields import hf_value
from ..errors import CheckpointError
from ..plan.rules import (
    Copy,
    GatedMLP,
    PlusOne,
    Rule,
    dense_layer,
    full_attention_layer,
    linear_attention_layer,
    moe_layer,
    only,
)
from . import llama, qwen3, qwen3_moe
from .base import Family, flag
from .decoder import Decoder
from .gated_deltanet import GDN_CONV_PARTS, GDN_IN_PROJ_PARTS, GatedDeltaConv, GatedDeltaInProj, GatedQKV
from .moe import check_softmax_router, moe_layer_pattern

__all__ = [
    "FAMILY",
    "GATED_ATTENTION",
    "HYBRID",
    "IN_PROJ_GROUPED",
    "LAYER",
    "MLP",
    "ROUTER_AND_SHARED_EXPERT",
    "A",
    "G",
    "hybrid_config",
    "is_gdn",
    "linear_attention",
    "linear_attention_pattern",
    "mtp",
    "mtp_layers",
    "shared_expert_config",
    "with_mtp_experts",
]

M, H = llama.M, llama.H
# HF norms compute `x · (1 + w)` like Megatron's zero-centred gamma; the config has `partial_rotary_factor`
HYBRID = Decoder(zero_centred_norms=True, partial_rotary=True)
A = M + "self_attention."  # Megatron's attention module, GDN or full
G = H + "linear_attn."  # HF GDN module

GATED_ATTENTION = only(
    full_attention_layer,
    (
        llama.INPUT_NORM,
        GatedQKV.of(
            A + "linear_qkv.weight",
            H + "self_attn.q_proj.weight",
            H + "self_attn.k_proj.weight",
            H + "self_attn.v_proj.weight",
        ),
        Copy.of(A + "linear_proj.weight", H + "self_attn.o_proj.weight"),
        *qwen3.QK_NORMS,
    ),
)


def linear_attention(in_proj: GatedDeltaInProj) -> tuple[Rule, ...]:
    """A GDN layer's rules around the family's in_proj rule."""
    return only(
        linear_attention_layer,
        (
            Copy.of((A + "in_proj.layer_norm_weight", M + "input_layernorm.weight"), H + "input_layernorm.weight"),
            in_proj,
            GatedDeltaConv.of(A + "conv1d.weight", G + "conv1d.weight", saved_apart=GDN_CONV_PARTS),
            Copy.of(A + "A_log", G + "A_log"),
            Copy.of(A + "dt_bias", G + "dt_bias"),
            PlusOne.of(A + "out_norm.weight", G + "norm.weight"),
            Copy.of(A + "out_proj.weight", G + "out_proj.weight"),
        ),
    )


IN_PROJ_GROUPED = GatedDeltaInProj(
    (A + "in_proj.weight",),
    (G + "in_proj_qkvz.weight", G + "in_proj_ba.weight"),
    saved_apart=GDN_IN_PROJ_PARTS,
    grouped=True,
)

ROUTER_AND_SHARED_EXPERT = only(
    moe_layer,
    (
        Copy.of(
            M + "mlp.router.weight",
            H + "mlp.gate.weight",
            expect=lambda c: (hf_value(c, "num_experts"), hf_value(c, "hidden_size")),
        ),
        GatedMLP.of(
            M + "mlp.shared_experts.linear_fc1.weight",
            H + "mlp.shared_expert.gate_proj.weight",
            H + "mlp.shared_expert.up_proj.weight",
            expect=lambda c: (2 * hf_value(c, "shared_expert_intermediate_size"), hf_value(c, "hidden_size")),
        ),
        Copy.of(M + "mlp.shared_experts.linear_fc2.weight", H + "mlp.shared_expert.down_proj.weight"),
        Copy.of(M + "mlp.shared_experts.gate_weight", H + "mlp.shared_expert_gate.weight"),
    ),
)

MLP = ROUTER_AND_SHARED_EXPERT + qwen3_moe.EXPERTS + only(dense_layer, llama.GATED_MLP) + (llama.PRE_MLP_NORM,)

LAYER = linear_attention(IN_PROJ_GROUPED) + GATED_ATTENTION + MLP


def mtp(mlp: tuple[Rule, ...]) -> tuple[Rule, ...]:
    """MTP depth k → HF `mtp.*` (which transformers skips on load): `enorm` / `hnorm` → `pre_fc_norm_embedding`
    / `pre_fc_norm_hidden`, `eh_proj` → `fc`, `final_layernorm` → `norm`, and the transformer layer (Megatron
    `transformer_layer`, newer `mtp_model_layer`: a full-attention layer) → `mtp.layers.{k}.*`."""
    rules = tuple(replace(rule, when=None) for rule in GATED_ATTENTION) + mlp
    layer = tuple(
        replace(
            rule,
            sources=tuple(
                s.replace(M, f"mtp.layers.{{k}}.{name}.")
                for s in rule.sources
                for name in ("transformer_layer", "mtp_model_layer")
            ),
            targets=tuple(t.replace(H, "mtp.layers.{k}.") for t in rule.targets),
        )
        for rule in rules
    )
    return (
        Copy.of("mtp.layers.{k}.enorm.weight", "mtp.pre_fc_norm_embedding.weight"),
        Copy.of("mtp.layers.{k}.hnorm.weight", "mtp.pre_fc_norm_hidden.weight"),
        Copy.of(
            "mtp.layers.{k}.eh_proj.weight",
            "mtp.fc.weight",
            expect=lambda c: (hf_value(c, "hidden_size"), 2 * hf_value(c, "hidden_size")),
        ),
        *layer,
        Copy.of("mtp.layers.{k}.final_layernorm.weight", "mtp.norm.weight"),
    )


def mtp_layers(config: Mapping[str, Any]) -> int:
    return int(hf_value(config, "mtp_num_hidden_layers", None) or 0)


def with_mtp_experts(layers: frozenset[int], config: Mapping[str, Any]) -> frozenset[int]:
    """MoE layers plus the MTP layers (HF index num_layers + k) when the last decoder layer, whose spec
    Megatron's MTP layer takes, is MoE."""
    last = int(hf_value(config, "num_hidden_layers")) - 1
    return layers | frozenset(range(last + 1, last + 1 + mtp_layers(config))) if last in layers else layers


def _experts(config: Mapping[str, Any]) -> tuple[int, frozenset[int]]:
    experts, layers = qwen3_moe.experts(config)
    return experts, with_mtp_experts(layers, config)


def is_gdn(args: argparse.Namespace) -> bool:
    return getattr(args, "experimental_attention_variant", None) == "gated_delta_net"


def linear_attention_pattern(args: argparse.Namespace) -> list[bool]:
    """Megatron's `linear_attention_freq`: an int N (every N-th layer full attention) or a 1/0 list (1 = GDN)."""
    num_layers = int(args.num_layers)
    freq = getattr(args, "linear_attention_freq", None)
    if isinstance(freq, int) and freq > 0:
        return [(i + 1) % freq != 0 for i in range(num_layers)]
    if isinstance(freq, (list, tuple)) and len(freq) == num_layers:
        return [bool(x) for x in freq]
    raise CheckpointError(f"args.linear_attention_freq={freq!r} does not give a pattern for {num_layers} layers")


def hybrid_config(args: argparse.Namespace) -> dict[str, Any]:
    """The config fields of the GDN layers and the gated attention (`rope_parameters` with the partial rotary
    factor come from the `HYBRID` decoder)."""
    problems = [
        f"{name}={getattr(args, name, None)}"
        for name in ("attention_output_gate", "qk_layernorm")
        if not getattr(args, name, False)
    ]
    if not is_gdn(args):
        problems.append(f"experimental_attention_variant={getattr(args, 'experimental_attention_variant', None)}")
    if problems:
        raise CheckpointError(f"not a Qwen3-Next / Qwen3.5 hybrid ({', '.join(problems)} where it needs them set)")
    depth = int(getattr(args, "mtp_num_layers", None) or 0)
    if depth > 1:
        raise CheckpointError(f"mtp_num_layers={depth}: the HF checkpoint names one MTP layer (mtp.fc, mtp.norm)")
    partial = float(getattr(args, "rotary_percent", 1.0))
    return {
        "layer_types": [
            "linear_attention" if linear else "full_attention" for linear in linear_attention_pattern(args)
        ],
        "linear_conv_kernel_dim": int(args.linear_conv_kernel_dim),
        "linear_key_head_dim": int(args.linear_key_head_dim),
        "linear_value_head_dim": int(args.linear_value_head_dim),
        "linear_num_key_heads": int(args.linear_num_key_heads),
        "linear_num_value_heads": int(args.linear_num_value_heads),
        "partial_rotary_factor": partial,
        "mtp_num_hidden_layers": depth,
    }


def shared_expert_config(args: argparse.Namespace, family: str) -> dict[str, Any]:
    """Router and gated shared expert fields both MoE hybrids have."""
    check_softmax_router(args, family)
    shared = int(getattr(args, "moe_shared_expert_intermediate_size", None) or 0)
    if not shared or not getattr(args, "moe_shared_expert_gate", False):
        raise CheckpointError(
            f"{family} has a gated shared expert; args set no moe_shared_expert_intermediate_size / gate"
        )
    return {
        "num_experts": int(args.num_experts),
        "num_experts_per_tok": int(args.moe_router_topk),
        "moe_intermediate_size": int(getattr(args, "moe_ffn_hidden_size", None) or args.ffn_hidden_size),
        "shared_expert_intermediate_size": shared,
        "output_router_logits": False,
        "router_aux_loss_coef": float(getattr(args, "moe_aux_loss_coeff", 0.0) or 0.0),
    }


def _from_args(args: argparse.Namespace) -> dict[str, Any]:
    return {
        **hybrid_config(args),
        **shared_expert_config(args, "Qwen3-Next"),
        "norm_topk_prob": not getattr(args, "moe_router_pre_softmax", False),
        "decoder_sparse_step": 1,
        "mlp_only_layers": [i for i, moe in enumerate(moe_layer_pattern(args)) if not moe],
    }


FAMILY = Family(
    name="qwen3_next",
    architecture="Qwen3NextForCausalLM",
    model_type="qwen3_next",
    head=llama.EMBEDDING,
    layer=LAYER,
    tail=llama.FINAL,
    detect=lambda args: is_gdn(args) and flag(args, "num_experts"),
    priority=40,  # refines the dense hybrid (Qwen3.5, 30) with experts
    mtp=mtp(MLP),
    config={"attention_bias": False},
    from_args=_from_args,
    experts=_experts,
    mtp_layers=mtp_layers,
    decoder=HYBRID,
)
