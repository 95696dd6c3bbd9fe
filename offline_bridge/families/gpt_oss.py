"""GPT-OSS (`GptOssForCausalLM`): attention with biases and learnable sinks (Megatron's `softmax_type=learnable`
`core_attention.softmax_offset`), sliding-window attention on alternate layers, a softmax top-k router with a
bias, and experts with biases and GPT-OSS's clamped GLU (`quick_geglu`, `glu_linear_offset=1`), written packed
as the Hub checkpoints are: `mlp.experts.gate_up_proj` `[E, H, 2I]` (gate / up interleaved by column),
`down_proj` `[E, I, H]` and their `*_bias`.

The Hub's MXFP4 `quantization_config` is not written: the experts go out in the stored (or --dtype) dtype.
"""

from __future__ import annotations

import argparse
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any

from ..config.hf_fields import hf_value
from ..errors import CheckpointError
from ..plan.rules import Copy, InterleavedPacked, TransposedPacked
from . import llama, qwen2
from .base import Family
from .decoder import Decoder
from .mla import yarn_mscale
from .moe import check_softmax_router, moe_layer_pattern

__all__ = ["ATTENTION", "EXPERTS", "FAMILY", "ROUTER", "layer_types", "yarn_rope"]

M, H = llama.M, llama.H
X = M + "mlp.experts.{e}."

ATTENTION = (
    *llama.ATTENTION,
    *qwen2.QKV_BIAS,
    Copy.of(M + "self_attention.linear_proj.bias", H + "self_attn.o_proj.bias"),
    Copy.of(
        M + "self_attention.core_attention.softmax_offset",
        H + "self_attn.sinks",
        expect=lambda c: (hf_value(c, "num_attention_heads"),),
    ),
)

ROUTER = (
    Copy.of(
        M + "mlp.router.weight",
        H + "mlp.router.weight",
        expect=lambda c: (hf_value(c, "num_experts"), hf_value(c, "hidden_size")),
    ),
    Copy.of(M + "mlp.router.bias", H + "mlp.router.bias"),
)

EXPERTS = (
    InterleavedPacked.of(X + "linear_fc1.weight", H + "mlp.experts.gate_up_proj"),
    InterleavedPacked.of(X + "linear_fc1.bias", H + "mlp.experts.gate_up_proj_bias"),
    TransposedPacked.of(X + "linear_fc2.weight", H + "mlp.experts.down_proj"),
    TransposedPacked.of(X + "linear_fc2.bias", H + "mlp.experts.down_proj_bias"),
)

QUICK_GELU_ALPHA = 1.702  # Megatron's quick_gelu `x·sigmoid(1.702·x)`; HF `swiglu_alpha`

# TransformerConfig's YaRN fields (GPTModel `position_embedding_type="yarn"`); Megatron-LM has no flags for them,
# so args carry them when a YAML config (or Bridge's provider) set them.
_YARN_DEFAULTS = {
    "yarn_rotary_scaling_factor": None,
    "yarn_original_max_position_embeddings": None,
    "yarn_beta_fast": 32.0,
    "yarn_beta_slow": 1.0,
    "yarn_mscale": None,
    "yarn_mscale_all_dim": None,
    "yarn_correction_range_round_to_int": True,
}


@dataclass(frozen=True)
class GptOssDecoder(Decoder):
    """RMSNorm, linear biases, RoPE or YaRN, and experts computing HF's clamped GLU:
    `(clamp(up, ±limit) + 1) · quick_gelu(min(gate, limit))`."""

    gated_silu: bool = False
    linear_bias: bool = True

    def problems(self, args: argparse.Namespace, family: str) -> list[str]:
        yarn = getattr(args, "position_embedding_type", "rope") == "yarn"
        problems = Decoder.problems(replace(self, position="yarn" if yarn else "rope"), args, family)
        if not getattr(args, "quick_geglu", False):
            problems.append("quick_geglu unset (GPT-OSS experts compute a gated quick-GELU)")
        if getattr(args, "glu_linear_offset", 0.0) != 1.0:
            problems.append(f"glu_linear_offset={getattr(args, 'glu_linear_offset', 0.0)} (need 1.0: up + 1)")
        if getattr(args, "activation_func_clamp_value", None) is None:
            problems.append("activation_func_clamp_value unset (HF clamps gate and up at swiglu_limit)")
        if getattr(args, "softmax_type", "vanilla") != "learnable":
            problems.append(f"softmax_type={getattr(args, 'softmax_type', 'vanilla')} (need learnable sinks)")
        return problems


def layer_types(args: argparse.Namespace) -> tuple[list[str], int | None]:
    """HF `layer_types` and `sliding_window` from Megatron's `window_size` `(left, right)` and
    `window_attn_skip_freq` (1-based layer number n is windowed unless `n % k == 0`; a list: 1 = windowed).

    Megatron's window `(left, 0)` lets a token see itself and `left` earlier ones; HF's `sliding_window` counts
    the token itself: `left + 1`."""
    num_layers = int(args.num_layers)
    window = getattr(args, "window_size", None)
    if not window:
        return ["full_attention"] * num_layers, None
    left, right = (int(x) for x in window)
    if right != 0 or left < 0:
        raise CheckpointError(f"window_size={tuple(window)}: HF's sliding window is causal and bounded (need (W, 0))")
    skip = getattr(args, "window_attn_skip_freq", None)
    if skip is None:
        windowed = [True] * num_layers
    elif isinstance(skip, int):
        windowed = [(n + 1) % skip != 0 for n in range(num_layers)]
    else:
        windowed = [bool(x) for x in skip]
    if len(windowed) != num_layers:
        raise CheckpointError(f"window_attn_skip_freq has {len(windowed)} entries but num_layers={num_layers}")
    return ["sliding_attention" if w else "full_attention" for w in windowed], left + 1


def _yarn_arg(args: argparse.Namespace, name: str) -> Any:
    value = getattr(args, name, None)
    return _YARN_DEFAULTS[name] if value is None else value


def yarn_rope(args: argparse.Namespace) -> dict[str, Any]:
    """`rope_parameters` for GPTModel's YaRN. Megatron scales cos / sin by its concentration factor
    (`mscale(factor)` unless both mscales are set); it is written as `attention_factor`, so transformers does
    not infer its own."""
    if getattr(args, "position_embedding_type", "rope") != "yarn":
        return {}
    factor = _yarn_arg(args, "yarn_rotary_scaling_factor")
    original = _yarn_arg(args, "yarn_original_max_position_embeddings")
    if factor is None or original is None:
        raise CheckpointError(
            "position_embedding_type=yarn but args lack yarn_rotary_scaling_factor / "
            "yarn_original_max_position_embeddings; pass --hf-config"
        )
    mscale, mscale_all_dim = _yarn_arg(args, "yarn_mscale"), _yarn_arg(args, "yarn_mscale_all_dim")
    if mscale is None or mscale_all_dim is None:
        concentration = yarn_mscale(float(factor), 1.0)
    else:
        concentration = yarn_mscale(float(factor), mscale) / yarn_mscale(float(factor), mscale_all_dim)
    return {
        "rope_type": "yarn",
        "rope_theta": float(getattr(args, "rotary_base", 10000)),
        "factor": float(factor),
        "original_max_position_embeddings": int(original),
        "beta_fast": float(_yarn_arg(args, "yarn_beta_fast")),
        "beta_slow": float(_yarn_arg(args, "yarn_beta_slow")),
        "truncate": bool(_yarn_arg(args, "yarn_correction_range_round_to_int")),
        "attention_factor": float(concentration),
    }


def _from_args(args: argparse.Namespace) -> dict[str, Any]:
    check_softmax_router(args, "GPT-OSS")
    if getattr(args, "moe_router_pre_softmax", False) or not all(moe_layer_pattern(args)):
        raise CheckpointError(
            "GPT-OSS has experts in every layer and softmaxes its top-k logits; "
            "args.moe_layer_freq / moe_router_pre_softmax say otherwise"
        )
    if getattr(args, "moe_shared_expert_intermediate_size", None):
        raise CheckpointError("GPT-OSS has no shared expert; args.moe_shared_expert_intermediate_size is set")
    types, window = layer_types(args)
    rope = yarn_rope(args)
    return {
        "num_local_experts": int(args.num_experts),
        "num_experts_per_tok": int(args.moe_router_topk),
        "intermediate_size": int(getattr(args, "moe_ffn_hidden_size", None) or args.ffn_hidden_size),
        "swiglu_alpha": QUICK_GELU_ALPHA,
        "swiglu_limit": float(args.activation_func_clamp_value),
        "layer_types": types,
        "sliding_window": window,
        "output_router_logits": False,
        "router_aux_loss_coef": float(getattr(args, "moe_aux_loss_coeff", 0.0) or 0.0),
        **({"rope_parameters": rope, "max_position_embeddings": _extended_length(args, rope)} if rope else {}),
    }


def _extended_length(args: argparse.Namespace, rope: dict[str, Any]) -> int:
    """transformers reads `max_position_embeddings` as YaRN's extended length, factor × original."""
    trained = getattr(args, "max_position_embeddings", None) or int(args.seq_length)
    extended = rope["factor"] * rope["original_max_position_embeddings"]
    return max(trained, int(extended)) if extended.is_integer() else trained


def _experts(config: Mapping[str, Any]) -> tuple[int, frozenset[int]]:
    return int(hf_value(config, "num_experts")), frozenset(range(int(hf_value(config, "num_hidden_layers"))))


FAMILY = Family(
    name="gpt_oss",
    architecture="GptOssForCausalLM",
    model_type="gpt_oss",
    head=llama.EMBEDDING,
    layer=ATTENTION + ROUTER + EXPERTS + llama.NORMS,
    tail=llama.FINAL,
    detect=lambda args: getattr(args, "softmax_type", None) == "learnable",
    priority=25,  # attention sinks: GPT-OSS, whatever else (experts) the args share with Mixtral
    config={"attention_bias": True},
    from_args=_from_args,
    experts=_experts,
    decoder=GptOssDecoder(),
)
