"""Megatron-Bridge's `run_config.yaml` `model:` section (a model provider dataclass: TransformerConfig field
names) in Megatron-LM's args form, so that families infer and derive the HF config the same way whatever
the checkpoint saved.

The provider is data: `_target_` values stay strings and are never imported. Bridge writes a function or a
dtype as `{_target_: torch.nn.functional.silu, _call_: false}`; we read only its name. Field names as in
Megatron-LM's `core_transformer_config_from_args` and Bridge's `GPTModelProvider` / `MLAModelProvider`.
"""

from __future__ import annotations

import argparse
from collections.abc import Mapping
from typing import Any

from .args_schema import checked_value

__all__ = ["SAME_NAMES", "provider_args", "target_name"]

# TransformerConfig / provider fields whose Megatron-LM argument has the same name and meaning.
SAME_NAMES = (
    "num_layers",
    "hidden_size",
    "ffn_hidden_size",
    "num_attention_heads",
    "kv_channels",
    "vocab_size",
    "make_vocab_size_divisible_by",
    "seq_length",
    "normalization",
    "layernorm_zero_centered_gamma",
    "add_bias_linear",
    "add_qkv_bias",
    "qk_layernorm",
    "attention_output_gate",
    "init_method_std",
    "position_embedding_type",
    "rotary_base",
    "rotary_percent",
    "rope_type",
    "rotary_scaling_factor",
    "original_max_position_embeddings",
    "beta_fast",
    "beta_slow",
    "mscale",
    "mscale_all_dim",
    "moe_ffn_hidden_size",
    "moe_router_topk",
    "moe_layer_freq",
    "moe_shared_expert_intermediate_size",
    "moe_shared_expert_gate",
    "moe_router_score_function",
    "moe_router_pre_softmax",
    "moe_router_enable_expert_bias",
    "moe_router_num_groups",
    "moe_router_group_topk",
    "moe_router_topk_scaling_factor",
    "moe_aux_loss_coeff",
    "multi_latent_attention",
    "q_lora_rank",
    "kv_lora_rank",
    "qk_head_dim",
    "qk_pos_emb_head_dim",
    "v_head_dim",
    "experimental_attention_variant",
    "linear_attention_freq",
    "linear_conv_kernel_dim",
    "linear_key_head_dim",
    "linear_value_head_dim",
    "linear_num_key_heads",
    "linear_num_value_heads",
    "mtp_num_layers",
    "softmax_type",
    "window_size",
    "window_attn_skip_freq",
    "glu_linear_offset",
    "activation_func_clamp_value",
    "yarn_rotary_scaling_factor",
    "yarn_original_max_position_embeddings",
    "yarn_beta_fast",
    "yarn_beta_slow",
    "yarn_mscale",
    "yarn_mscale_all_dim",
    "yarn_correction_range_round_to_int",
    "tensor_model_parallel_size",
    "pipeline_model_parallel_size",
    "virtual_pipeline_model_parallel_size",
    "expert_model_parallel_size",
    "expert_tensor_parallel_size",
)

# provider field -> Megatron-LM argument, same meaning under another name
RENAMED = {
    "num_moe_experts": "num_experts",
    "layernorm_epsilon": "norm_epsilon",
    "rope_scaling": "use_rope_scaling",
    "rope_scaling_factor": "rope_scaling_factor",
    "seq_len_interpolation_factor": "rotary_seq_len_interpolation_factor",
}

# Fields of Bridge's Llama31ModelProvider (before 0.6), which always applies Llama 3.1 rope scaling.
LLAMA31_ROPE_SCALING = ("scale_factor", "old_context_len")


def target_name(value: Any) -> Any:
    """The dotted name a `{_target_: ...}` mapping refers to (never imported); other values unchanged."""
    if isinstance(value, Mapping) and "_target_" in value:
        return value["_target_"] if isinstance(value["_target_"], str) else repr(value["_target_"])
    return value


def provider_args(model: Mapping[str, Any], where: str) -> argparse.Namespace:
    """The args Megatron-LM would have saved for the model the provider describes, each value checked
    against the args schema under its provider name (`model.<field>` of ``where``)."""

    def value(field: str, arg: str) -> Any:
        return checked_value(arg, target_name(model[field]), where, f"model.{field}")

    args = {name: value(name, name) for name in SAME_NAMES if name in model}
    args |= {arg: value(field, arg) for field, arg in RENAMED.items() if field in model}
    if model.get("num_query_groups") is not None:
        args |= {"num_query_groups": value("num_query_groups", "num_query_groups"), "group_query_attention": True}
    if "share_embeddings_and_output_weights" in model:
        shared = value("share_embeddings_and_output_weights", "untie_embeddings_and_output_weights")
        args["untie_embeddings_and_output_weights"] = None if shared is None else not shared
    if all(model.get(name) is not None for name in LLAMA31_ROPE_SCALING):
        args["use_rope_scaling"] = True
    gated = value("gated_linear_unit", "swiglu") if "gated_linear_unit" in model else False
    activation = target_name(model.get("activation_func"))
    function = activation.rsplit(".", 1)[-1] if isinstance(activation, str) else None
    # Megatron-LM's --swiglu is a gated linear unit with SiLU, --quick-geglu one with quick_gelu (GPT-OSS)
    args["swiglu"] = bool(gated) and function == "silu"
    args["quick_geglu"] = bool(gated) and function == "quick_gelu"
    return argparse.Namespace(**args)
