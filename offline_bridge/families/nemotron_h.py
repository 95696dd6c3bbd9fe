"""Nemotron-H / Nemotron 3 (`NemotronHForCausalLM`): megatron-core's hybrid `MambaModel`. Each layer is one block
of the pattern `hybrid_override_pattern` (M = Mamba-2 mixer, * = attention, - = MLP, E = MoE), HF
`layers_block_type` (`linear_attention`, `full_attention`, `mlp`, `moe`), written under `backbone.layers.{i}`
with one pre-norm (`norm`) and one `mixer`, as the Hub checkpoints are.

The attention has no rotary embedding; MLPs and experts are squared-ReLU `up_proj` / `down_proj` without a gate;
routers are sigmoid with a score bias (Nemotron 3). Megatron's pre-norm of each layer is fused into its first
linear (`mixer.in_proj`, `linear_qkv`, `linear_fc1`) except on MoE layers (`pre_mlp_layernorm`).
MTP (megatron-core 0.19 `HybridModel`, pattern `<main>/<mtp>/...`): depth k's inner layer j,
`mtp.layers.{k}.mtp_model_layer.layers.{j}`, is HF `mtp.layers.{k·L + j}` (L inner layers a depth), with the
depth's `eh_proj` / `enorm` / `hnorm` on its first and `final_layernorm` on its last (Megatron-Bridge's names).
"""

from __future__ import annotations

import argparse
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from ..config.hf_fields import hf_value
from ..errors import CheckpointError
from ..plan.rules import (
    QKV,
    Copy,
    VocabRows,
    full_attention_layer,
    linear_attention_layer,
    moe_layer,
    only,
    untied,
)
from .base import Family, flag
from .decoder import Decoder
from .mamba import (
    BLOCKS,
    MAMBA_CONV_PARTS,
    MAMBA_IN_PROJ_PARTS,
    MambaConv,
    MambaInProj,
    hybrid_mtp,
    latent_moe_layer,
    layer_types,
    mlp_layer,
    mtp_block_types,
    mtp_types,
)

__all__ = [
    "ATTENTION",
    "FAMILY",
    "LAYER",
    "MAMBA",
    "MLP",
    "MOE",
    "MTP",
    "NemotronHDecoder",
]

M = "decoder.layers.{i}."  # Megatron layer prefix
H = "backbone.layers.{i}."  # HF layer prefix
X = H + "mixer."


# One pre-norm per block, saved under the name of the linear it is fused into (or its own, unfused).
NORM = Copy.of(
    (
        M + "mixer.in_proj.layer_norm_weight",
        M + "self_attention.linear_qkv.layer_norm_weight",
        M + "mlp.linear_fc1.layer_norm_weight",
        M + "pre_mlp_layernorm.weight",
        M + "norm.weight",
        M + "input_layernorm.weight",
    ),
    H + "norm.weight",
)

MAMBA = only(
    linear_attention_layer,
    (
        MambaInProj.of(M + "mixer.in_proj.weight", X + "in_proj.weight", saved_apart=MAMBA_IN_PROJ_PARTS),
        MambaConv.of(M + "mixer.conv1d.weight", X + "conv1d.weight", saved_apart=MAMBA_CONV_PARTS),
        MambaConv.of(M + "mixer.conv1d.bias", X + "conv1d.bias", saved_apart=MAMBA_CONV_PARTS),
        Copy.of(M + "mixer.A_log", X + "A_log"),
        Copy.of(M + "mixer.D", X + "D"),
        Copy.of(M + "mixer.dt_bias", X + "dt_bias"),
        Copy.of(M + "mixer.norm.weight", X + "norm.weight"),
        Copy.of(M + "mixer.out_proj.weight", X + "out_proj.weight"),
    ),
)

ATTENTION = only(
    full_attention_layer,
    (
        QKV.of(M + "self_attention.linear_qkv.weight", X + "q_proj.weight", X + "k_proj.weight", X + "v_proj.weight"),
        Copy.of(M + "self_attention.linear_proj.weight", X + "o_proj.weight"),
    ),
)

MLP = only(
    mlp_layer,
    (
        Copy.of(M + "mlp.linear_fc1.weight", X + "up_proj.weight"),
        Copy.of(M + "mlp.linear_fc2.weight", X + "down_proj.weight"),
    ),
)


MOE = (
    *only(
        moe_layer,
        (
            Copy.of(
                M + "mlp.router.weight",
                X + "gate.weight",
                expect=lambda c: (hf_value(c, "n_routed_experts"), hf_value(c, "hidden_size")),
            ),
            Copy.of(M + "mlp.router.expert_bias", X + "gate.e_score_correction_bias"),
            Copy.of(M + "mlp.experts.{e}.linear_fc1.weight", X + "experts.{e}.up_proj.weight"),
            Copy.of(M + "mlp.experts.{e}.linear_fc2.weight", X + "experts.{e}.down_proj.weight"),
            Copy.of(M + "mlp.shared_experts.linear_fc1.weight", X + "shared_experts.up_proj.weight"),
            Copy.of(M + "mlp.shared_experts.linear_fc2.weight", X + "shared_experts.down_proj.weight"),
        ),
    ),
    *only(
        latent_moe_layer,
        (
            Copy.of(M + "mlp.fc1_latent_proj.weight", X + "fc1_latent_proj.weight"),
            Copy.of(M + "mlp.fc2_latent_proj.weight", X + "fc2_latent_proj.weight"),
        ),
    ),
)

LAYER = (NORM, *MAMBA, *ATTENTION, *MLP, *MOE)


MTP = hybrid_mtp(LAYER, M, H)


@dataclass(frozen=True)
class NemotronHDecoder(Decoder):
    """No rotary embedding, squared-ReLU MLPs, and NemotronH's own config field names."""

    gated_silu: bool = False
    position: str = "none"

    def problems(self, args: argparse.Namespace, family: str) -> list[str]:
        problems = super().problems(args, family)
        if getattr(args, "swiglu", False) or not getattr(args, "squared_relu", True):
            problems.append("an MLP activation other than squared ReLU (need squared_relu=True, swiglu=False)")
        return problems

    def fields(self, args: argparse.Namespace) -> dict[str, Any]:
        eps = getattr(args, "norm_epsilon", None) or getattr(args, "layernorm_epsilon", None) or 1e-5
        return {"mlp_hidden_act": "relu2", "mamba_hidden_act": "silu", "layer_norm_epsilon": float(eps)}


def _moe_config(args: argparse.Namespace) -> dict[str, Any]:
    """Router and expert fields (NemotronH's sigmoid router with a score bias, one group)."""
    problems = [
        f"{name}={getattr(args, name, None)}"
        for name, ok in (
            ("moe_router_score_function", getattr(args, "moe_router_score_function", None) == "sigmoid"),
            ("moe_router_enable_expert_bias", flag(args, "moe_router_enable_expert_bias")),
            ("moe_router_num_groups", (getattr(args, "moe_router_num_groups", None) or 1) == 1),
            ("moe_shared_expert_gate", not flag(args, "moe_shared_expert_gate")),
            ("moe_shared_expert_intermediate_size", flag(args, "moe_shared_expert_intermediate_size")),  # HF has one
        )
        if not ok
    ]
    if problems:
        raise CheckpointError(f"NemotronH MoE blocks cannot express {', '.join(problems)}")
    return {
        "n_routed_experts": int(args.num_experts),
        "num_experts_per_tok": int(args.moe_router_topk),
        "moe_intermediate_size": int(getattr(args, "moe_ffn_hidden_size", None) or args.ffn_hidden_size),
        "moe_shared_expert_intermediate_size": int(args.moe_shared_expert_intermediate_size),
        "moe_latent_size": getattr(args, "moe_latent_size", None),
        "n_group": 1,
        "topk_group": 1,
        "norm_topk_prob": int(args.moe_router_topk) > 1,  # Megatron normalises sigmoid top-k scores when k > 1
        "routed_scaling_factor": float(getattr(args, "moe_router_topk_scaling_factor", None) or 1.0),
    }


def _from_args(args: argparse.Namespace) -> dict[str, Any]:
    types, (mtp_types, depths) = layer_types(args), mtp_block_types(args)
    head_dim = int(getattr(args, "mamba_head_dim", None) or 64)
    heads = int(getattr(args, "mamba_num_heads", None) or 2 * int(args.hidden_size) // head_dim)
    config = {
        "layers_block_type": types,
        "mamba_num_heads": heads,
        "mamba_head_dim": head_dim,
        "n_groups": int(getattr(args, "mamba_num_groups", None) or 8),
        "ssm_state_size": int(getattr(args, "mamba_state_dim", None) or 128),
        "conv_kernel": 4,  # MambaMixer's d_conv (no Megatron-LM argument sets it)
        "expand": 2,
        "use_conv_bias": True,
        "use_bias": False,
        "mlp_bias": False,
        "attention_bias": False,
        "residual_in_fp32": False,
        "num_nextn_predict_layers": depths,
        **({"mtp_layers_block_type": mtp_types} if depths else {}),
    }
    return {**config, **(_moe_config(args) if "moe" in types + mtp_types else {})}


def _text_config(config: Mapping[str, Any]) -> Mapping[str, Any]:
    """The config with `layer_types` and `num_hidden_layers` (transformers 5 derives both from
    `layers_block_type`; 4.x configs give `hybrid_override_pattern`)."""
    types = hf_value(config, "layers_block_type", None) or hf_value(config, "layer_types", None)
    pattern = hf_value(config, "hybrid_override_pattern", None)
    if types is None and isinstance(pattern, str) and not set(pattern) - set(BLOCKS):
        types = [BLOCKS[symbol] for symbol in pattern]
    if not isinstance(types, list):
        return config
    mtp = mtp_types(config) * int(hf_value(config, "num_nextn_predict_layers", None) or 0)
    return {**config, "layer_types": types + mtp, "num_hidden_layers": len(types)}  # MTP layers after the main


def _experts(config: Mapping[str, Any]) -> tuple[int, frozenset[int]]:
    types = hf_value(_text_config(config), "layer_types", None) or []
    layers = frozenset(i for i, kind in enumerate(types) if kind == "moe")
    return (int(hf_value(config, "num_experts", None) or 0) if layers else 0), layers


FAMILY = Family(
    name="nemotron_h",
    architecture="NemotronHForCausalLM",
    model_type="nemotron_h",
    head=(VocabRows.of("embedding.word_embeddings.weight", "backbone.embeddings.weight"),),
    layer=LAYER,
    tail=(
        Copy.of(("decoder.final_norm.weight", "decoder.final_layernorm.weight"), "backbone.norm_f.weight"),
        VocabRows.of("output_layer.weight", "lm_head.weight", when=untied),
    ),
    detect=lambda args: any(
        flag(args, n) for n in ("hybrid_layer_pattern", "hybrid_override_pattern", "is_hybrid_model")
    ),
    priority=50,  # a hybrid MambaModel is none of the GPT families
    from_args=_from_args,
    experts=_experts,
    mtp=MTP,
    mtp_layers=lambda config: len(mtp_types(config)) * int(hf_value(config, "num_nextn_predict_layers", None) or 0),
    mtp_block=lambda config: len(mtp_types(config)) or 1,
    decoder=NemotronHDecoder(),
    text_config=_text_config,
)
