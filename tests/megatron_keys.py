"""Megatron keys and shapes per family, written by hand from formats/torch_dist.md (§6, §7, §7a, §7b) and not
from our tables, with the tiny HF config each describes; and a reader that holds only this metadata."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from offline_bridge.dtypes import by_option
from offline_bridge.readers.base import Box, CheckpointReader, TensorInfo

H, HEADS, GROUPS, HD, F, V, VP, E, FM = 16, 4, 2, 8, 32, 60, 64, 4, 8
QKV_ROWS = GROUPS * (HEADS // GROUPS + 2) * HD
BF16 = by_option("bf16")
Keys = dict[str, tuple[int, ...]]


class MetadataReader(CheckpointReader):
    """A checkpoint of names, shapes and dtypes only: planning reads nothing else."""

    format = "metadata"

    def __init__(self, shapes: Keys) -> None:
        self.path = Path("metadata-only")
        self._tensors = {k: TensorInfo(k, s, BF16) for k, s in shapes.items()}

    @property
    def tensors(self) -> Mapping[str, TensorInfo]:
        return self._tensors

    def read(self, key: str, box: Box | None = None) -> np.ndarray:
        raise AssertionError("planning must not read tensor bytes")


# Megatron's per-layer modules (torch_dist.md §6, §7, §7a, §7b), as key suffix → per-layer shape.
def attention(qkv_rows: int = QKV_ROWS) -> Keys:
    return {
        "self_attention.linear_qkv.layer_norm_weight": (H,),
        "self_attention.linear_qkv.weight": (qkv_rows, H),
        "self_attention.linear_proj.weight": (H, HEADS * HD),
    }


QK_NORMS = {"self_attention.q_layernorm.weight": (HD,), "self_attention.k_layernorm.weight": (HD,)}
DENSE_MLP = {
    "mlp.linear_fc1.layer_norm_weight": (H,),
    "mlp.linear_fc1.weight": (2 * F, H),
    "mlp.linear_fc2.weight": (H, F),
}
ROUTED = {
    "pre_mlp_layernorm.weight": (H,),
    "mlp.router.weight": (E, H),
    "mlp.experts.experts.linear_fc1.weight": (E, 2 * FM, H),
    "mlp.experts.experts.linear_fc2.weight": (E, H, FM),
}
SHARED = {"mlp.shared_experts.linear_fc1.weight": (2 * FM, H), "mlp.shared_experts.linear_fc2.weight": (H, FM)}
NK, DK, NV, DV, KERNEL = 2, 4, 4, 4, 4
GDN = {
    "self_attention.in_proj.layer_norm_weight": (H,),
    **{f"self_attention.in_proj.weight.{p}": (NK * DK, H) for p in ("query", "key")},
    **{f"self_attention.in_proj.weight.{p}": (NV * DV, H) for p in ("value", "z")},
    **{f"self_attention.in_proj.weight.{p}": (NV, H) for p in ("beta", "alpha")},
    **{f"self_attention.conv1d.weight.{p}": (NK * DK, 1, KERNEL) for p in ("query", "key")},
    "self_attention.conv1d.weight.value": (NV * DV, 1, KERNEL),
    "self_attention.A_log": (NV,),
    "self_attention.dt_bias": (NV,),
    "self_attention.out_norm.weight": (DV,),
    "self_attention.out_proj.weight": (H, NV * DV),
}
GATED_ATTENTION = {**attention(GROUPS * (2 * HEADS // GROUPS + 2) * HD), **QK_NORMS}
SHARED_GATE = {**SHARED, "mlp.shared_experts.gate_weight": (1, H)}
Q_LORA, KV_LORA, NOPE, ROPE, VD = 8, 8, 8, 4, 8
MLA = {
    "input_layernorm.weight": (H,),
    "self_attention.linear_q_down_proj.weight": (Q_LORA, H),
    "self_attention.linear_q_up_proj.layer_norm_weight": (Q_LORA,),
    "self_attention.linear_q_up_proj.weight": (HEADS * (NOPE + ROPE), Q_LORA),
    "self_attention.linear_kv_down_proj.weight": (KV_LORA + ROPE, H),
    "self_attention.linear_kv_up_proj.layer_norm_weight": (KV_LORA,),
    "self_attention.linear_kv_up_proj.weight": (HEADS * (NOPE + VD), KV_LORA),
    "self_attention.linear_proj.weight": (H, HEADS * VD),
}
EXPERT_BIAS = {"mlp.router.expert_bias": (E,)}


def stacked(layers: int, modules: Keys) -> Keys:
    """A homogeneous block: one `decoder.layers.<sub>` key per module, layers on axis 0."""
    return {f"decoder.layers.{sub}": (layers, *shape) for sub, shape in modules.items()}


def per_layer(prefix: str, modules: Keys) -> Keys:
    return {f"{prefix}.{sub}": shape for sub, shape in modules.items()}


def ends(tied: bool = False) -> Keys:
    return {
        "embedding.word_embeddings.weight": (VP, H),
        "decoder.final_layernorm.weight": (H,),
        **({} if tied else {"output_layer.weight": (VP, H)}),
    }


def mtp(layer: Keys) -> Keys:
    """MTP depth 0 (§7a): its norms, `eh_proj` and a transformer layer."""
    extra = {"enorm.weight": (H,), "hnorm.weight": (H,), "eh_proj.weight": (H, 2 * H), "final_layernorm.weight": (H,)}
    return {**per_layer("mtp.layers.0", extra), **per_layer("mtp.layers.0.transformer_layer", layer)}


COMMON = {
    "hidden_size": H,
    "num_attention_heads": HEADS,
    "num_key_value_heads": GROUPS,
    "head_dim": HD,
    "intermediate_size": F,
    "vocab_size": V,
    "num_hidden_layers": 2,
    "tie_word_embeddings": False,
}
MOE = {"num_experts": E, "moe_intermediate_size": FM, "num_experts_per_tok": 2}
HYBRID = {
    "layer_types": ["linear_attention", "full_attention"],
    "linear_conv_kernel_dim": KERNEL,
    "linear_key_head_dim": DK,
    "linear_value_head_dim": DV,
    "linear_num_key_heads": NK,
    "linear_num_value_heads": NV,
    "partial_rotary_factor": 0.25,
    "mtp_num_hidden_layers": 1,
}
NEXT_MOE = {**MOE, "shared_expert_intermediate_size": FM, "mlp_only_layers": [], "decoder_sparse_step": 1}
HYBRID_MOE_LAYERS = {
    **per_layer("decoder.layers.0", {**GDN, **ROUTED, **SHARED_GATE}),
    **per_layer("decoder.layers.1", {**GATED_ATTENTION, **ROUTED, **SHARED_GATE}),
    **mtp({**GATED_ATTENTION, **ROUTED, **SHARED_GATE}),
}
HYBRID_DENSE_LAYERS = {
    **per_layer("decoder.layers.0", {**GDN, **DENSE_MLP}),
    **per_layer("decoder.layers.1", {**GATED_ATTENTION, **DENSE_MLP}),
    **mtp({**GATED_ATTENTION, **DENSE_MLP}),
}
DEEPSEEK = {
    **COMMON,
    "n_routed_experts": E,
    "moe_intermediate_size": FM,
    "n_shared_experts": 1,
    "num_experts_per_tok": 2,
    "first_k_dense_replace": 1,
    "q_lora_rank": Q_LORA,
    "kv_lora_rank": KV_LORA,
    "qk_nope_head_dim": NOPE,
    "qk_rope_head_dim": ROPE,
    "v_head_dim": VD,
    "head_dim": ROPE,
    "num_key_value_heads": HEADS,
    "n_group": 1,
    "topk_group": 1,
    "num_nextn_predict_layers": 1,
}
MOE_LAYER = {**MLA, **ROUTED, **EXPERT_BIAS, **SHARED}
# Nemotron-H / Nemotron 3 (formats/mamba.md): Mamba-2 mixer pieces, plain attention, squared-ReLU MLP and experts
MH, MHD, MG, MN, LATENT = 4, 8, 2, 4, 8
MAMBA = {
    "mixer.in_proj.layer_norm_weight": (H,),
    **{f"mixer.in_proj.weight.{p}": (MH * MHD, H) for p in ("z", "x")},
    **{f"mixer.in_proj.weight.{p}": (MG * MN, H) for p in ("B", "C")},
    "mixer.in_proj.weight.dt": (MH, H),
    "mixer.conv1d.weight.x": (MH * MHD, 1, KERNEL),
    **{f"mixer.conv1d.weight.{p}": (MG * MN, 1, KERNEL) for p in ("B", "C")},
    "mixer.conv1d.bias.x": (MH * MHD,),
    **{f"mixer.conv1d.bias.{p}": (MG * MN,) for p in ("B", "C")},
    **{f"mixer.{p}": (MH,) for p in ("A_log", "D", "dt_bias")},
    "mixer.norm.weight": (MH * MHD,),
    "mixer.out_proj.weight": (H, MH * MHD),
}
RELU2_MLP = {"mlp.linear_fc1.layer_norm_weight": (H,), "mlp.linear_fc1.weight": (F, H), "mlp.linear_fc2.weight": (H, F)}
LATENT_MOE = {
    "pre_mlp_layernorm.weight": (H,),
    "mlp.router.weight": (E, H),
    **EXPERT_BIAS,
    "mlp.experts.experts.linear_fc1.weight": (E, FM, LATENT),
    "mlp.experts.experts.linear_fc2.weight": (E, LATENT, FM),
    "mlp.shared_experts.linear_fc1.weight": (FM, H),
    "mlp.shared_experts.linear_fc2.weight": (H, FM),
    "mlp.fc1_latent_proj.weight": (LATENT, H),
    "mlp.fc2_latent_proj.weight": (H, LATENT),
}
NEMOTRON_H = {
    **{k: v for k, v in COMMON.items() if k != "num_hidden_layers"},
    "layers_block_type": ["linear_attention", "full_attention", "mlp", "moe"],
    "mamba_num_heads": MH,
    "mamba_head_dim": MHD,
    "n_groups": MG,
    "ssm_state_size": MN,
    "conv_kernel": KERNEL,
    "n_routed_experts": E,
    "num_experts_per_tok": 2,
    "moe_intermediate_size": FM,
    "moe_shared_expert_intermediate_size": FM,
    "moe_latent_size": LATENT,
}
NEMOTRON_H_KEYS = {
    "embedding.word_embeddings.weight": (VP, H),
    "decoder.final_norm.weight": (H,),
    "output_layer.weight": (VP, H),
    **per_layer("decoder.layers.0", MAMBA),
    **per_layer("decoder.layers.1", attention()),
    **per_layer("decoder.layers.2", RELU2_MLP),
    **per_layer("decoder.layers.3", LATENT_MOE),
}

# family → (HF config fields, Megatron keys → shapes)
CASES: dict[str, tuple[dict[str, Any], Keys]] = {
    "llama": (COMMON, {**ends(), **stacked(2, {**attention(), **DENSE_MLP})}),
    "mistral": (COMMON, {**ends(), **stacked(2, {**attention(), **DENSE_MLP})}),
    "qwen2": (
        COMMON,
        {**ends(), **stacked(2, {**attention(), "self_attention.linear_qkv.bias": (QKV_ROWS,), **DENSE_MLP})},
    ),
    "qwen3": (
        {**COMMON, "tie_word_embeddings": True},
        {**ends(tied=True), **stacked(2, {**attention(), **QK_NORMS, **DENSE_MLP})},
    ),
    "qwen3_moe": (
        {**COMMON, **MOE, "num_hidden_layers": 3, "mlp_only_layers": [0]},
        {
            **ends(),
            **per_layer("decoder.layers.0", {**attention(), **QK_NORMS, **DENSE_MLP}),
            **{
                k: s
                for i in (1, 2)
                for k, s in per_layer(f"decoder.layers.{i}", {**attention(), **QK_NORMS, **ROUTED}).items()
            },
        },
    ),
    "mixtral": (
        {**COMMON, "num_local_experts": E, "num_experts_per_tok": 2, "intermediate_size": FM},
        {**ends(), **stacked(2, {**attention(), **ROUTED})},
    ),
    "deepseek_v3": (
        DEEPSEEK,
        {
            **ends(),
            **per_layer("decoder.layers.0", {**MLA, **DENSE_MLP}),
            **per_layer("decoder.layers.1", MOE_LAYER),
            **mtp(MOE_LAYER),
        },
    ),
    "qwen3_next": ({**COMMON, **HYBRID, **NEXT_MOE}, {**ends(), **HYBRID_MOE_LAYERS}),
    "qwen3_5": ({**COMMON, **HYBRID}, {**ends(), **HYBRID_DENSE_LAYERS}),
    "qwen3_5_moe": ({**COMMON, **HYBRID, **NEXT_MOE}, {**ends(), **HYBRID_MOE_LAYERS}),
    "nemotron_h": (NEMOTRON_H, NEMOTRON_H_KEYS),
}
GLM_ATTENTION = {**attention(), "self_attention.linear_qkv.bias": (QKV_ROWS,), **QK_NORMS}
GLM_MOE_LAYER = {**GLM_ATTENTION, **ROUTED, **EXPERT_BIAS, **SHARED}
GLM = {
    **COMMON,
    **{k: DEEPSEEK[k] for k in ("n_routed_experts", "moe_intermediate_size", "n_shared_experts", "n_group")},
    **{k: DEEPSEEK[k] for k in ("num_experts_per_tok", "first_k_dense_replace", "num_nextn_predict_layers")},
    "attention_bias": True,
    "use_qk_norm": True,
    "partial_rotary_factor": 0.5,
}
CASES["glm4_moe"] = (
    GLM,
    {
        **ends(),
        **per_layer("decoder.layers.0", {**GLM_ATTENTION, **DENSE_MLP}),
        **per_layer("decoder.layers.1", GLM_MOE_LAYER),
        **mtp(GLM_MOE_LAYER),
    },
)
CASES["glm4_moe_lite"] = ({**DEEPSEEK, "mlp_layer_types": ["dense", "sparse"]}, CASES["deepseek_v3"][1])
CASES["kimi_k2"] = CASES["moonlight"] = CASES["deepseek_v3"]  # their transformers class is DeepseekV3ForCausalLM
CASES["qwen3_5_vl"] = ({"text_config": CASES["qwen3_5"][0], "tie_word_embeddings": False}, CASES["qwen3_5"][1])
CASES["qwen3_5_moe_vl"] = (
    {"text_config": CASES["qwen3_5_moe"][0], "tie_word_embeddings": False},
    CASES["qwen3_5_moe"][1],
)
# GPT-OSS: biases on every linear (Megatron add_bias_linear), learnable softmax offsets, experts with biases.
GPT_OSS_LAYER = {
    **attention(),
    "self_attention.linear_qkv.bias": (QKV_ROWS,),
    "self_attention.linear_proj.bias": (H,),
    "self_attention.core_attention.softmax_offset": (HEADS,),
    **ROUTED,
    "mlp.router.bias": (E,),
    "mlp.experts.experts.linear_fc1.bias": (E, 2 * FM),
    "mlp.experts.experts.linear_fc2.bias": (E, H),
}
CASES["gpt_oss"] = (
    {
        **COMMON,
        "num_local_experts": E,
        "num_experts_per_tok": 2,
        "intermediate_size": FM,
        "layer_types": ["sliding_attention", "full_attention"],
    },
    {**ends(), **stacked(2, GPT_OSS_LAYER)},
)
