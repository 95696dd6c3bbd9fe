"""Multi-latent attention (DeepSeek-V3's MLA), the pieces a family with it is written from: its tensors, which
keep their layout (per head `[nope; rope]` rows) and so are plain renames, and its rotary embedding (plain RoPE
or YaRN, with YaRN's softmax scale), which becomes `rope_parameters`.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Mapping
from typing import Any

from ..config.hf_fields import hf_value
from ..errors import CheckpointError
from ..plan.rules import Copy, Dims
from . import llama

__all__ = ["MLA", "mla_fields", "mla_rope", "yarn_mscale"]

M, H = llama.M, llama.H
A = M + "self_attention."


def _q_lora(dims: Dims, layer: int | None) -> bool:
    return hf_value(dims.config, "q_lora_rank", None) is not None


def _no_q_lora(dims: Dims, layer: int | None) -> bool:
    return not _q_lora(dims, layer)


def _q_rows(c: Mapping[str, Any]) -> int:
    return hf_value(c, "num_attention_heads") * (hf_value(c, "qk_nope_head_dim") + hf_value(c, "qk_rope_head_dim"))


MLA = (
    Copy.of(
        A + "linear_q_down_proj.weight",
        H + "self_attn.q_a_proj.weight",
        when=_q_lora,
        expect=lambda c: (hf_value(c, "q_lora_rank"), hf_value(c, "hidden_size")),
    ),
    Copy.of(
        (A + "linear_q_up_proj.layer_norm_weight", A + "q_layernorm.weight"),
        H + "self_attn.q_a_layernorm.weight",
        when=_q_lora,
    ),
    Copy.of(
        A + "linear_q_up_proj.weight",
        H + "self_attn.q_b_proj.weight",
        when=_q_lora,
        expect=lambda c: (_q_rows(c), hf_value(c, "q_lora_rank")),
    ),
    Copy.of(
        A + "linear_q_proj.weight",
        H + "self_attn.q_proj.weight",
        when=_no_q_lora,
        expect=lambda c: (_q_rows(c), hf_value(c, "hidden_size")),
    ),
    Copy.of(
        A + "linear_kv_down_proj.weight",
        H + "self_attn.kv_a_proj_with_mqa.weight",
        expect=lambda c: (hf_value(c, "kv_lora_rank") + hf_value(c, "qk_rope_head_dim"), hf_value(c, "hidden_size")),
    ),
    Copy.of(
        (A + "linear_kv_up_proj.layer_norm_weight", A + "kv_layernorm.weight"), H + "self_attn.kv_a_layernorm.weight"
    ),
    Copy.of(
        A + "linear_kv_up_proj.weight",
        H + "self_attn.kv_b_proj.weight",
        expect=lambda c: (
            hf_value(c, "num_attention_heads") * (hf_value(c, "qk_nope_head_dim") + hf_value(c, "v_head_dim")),
            hf_value(c, "kv_lora_rank"),
        ),
    ),
    Copy.of(
        A + "linear_proj.weight",
        H + "self_attn.o_proj.weight",
        expect=lambda c: (hf_value(c, "hidden_size"), hf_value(c, "num_attention_heads") * hf_value(c, "v_head_dim")),
    ),
)


# MLATransformerConfig's values (core 0.14+) for the fields Megatron-LM's command line has no argument for
# (`original_max_position_embeddings`, `beta_fast`, `beta_slow`): args carry them only when a YAML config set them.
_MLA_ROPE_DEFAULTS = {
    "rotary_scaling_factor": 40.0,
    "original_max_position_embeddings": 4096,
    "beta_fast": 32.0,
    "beta_slow": 1.0,
    "mscale": 1.0,
    "mscale_all_dim": 0.0,
}


def _mla_arg(args: argparse.Namespace, name: str) -> Any:
    """An MLA rotary setting as MLATransformerConfig got it: the arg if args have it, else the config default."""
    return getattr(args, name) if hasattr(args, name) else _MLA_ROPE_DEFAULTS[name]


def yarn_mscale(scale: float, mscale: float) -> float:
    """YaRN's `0.1·mscale·ln(scale) + 1` (1 without scaling): the same formula in Megatron and transformers."""
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def mla_rope(args: argparse.Namespace) -> dict[str, Any]:
    """`rope_parameters` (and `max_position_embeddings`) for MLA's rotary embedding: {} keeps plain RoPE.

    Megatron-LM leaves `rope_type` None to MLATransformerConfig, whose default is YaRN; YaRN with factor 1 is
    plain RoPE. Megatron scales the softmax by `mscale(factor, mscale_all_dim)²` and cos / sin by
    `mscale(factor, mscale) / mscale(factor, mscale_all_dim)`; transformers' DeepSeek-V3 does the same from
    `rope_parameters` except that it infers the latter differently unless both mscales are non-zero, so
    `attention_factor` is written whenever its inference would differ.
    """
    factor = float(_mla_arg(args, "rotary_scaling_factor"))
    mscale, mscale_all_dim = _mla_arg(args, "mscale"), _mla_arg(args, "mscale_all_dim")
    if not hasattr(args, "rope_type"):  # Megatron-LM before core 0.14: always YaRN, with other semantics
        if factor != 1:
            raise CheckpointError(
                f"rotary_scaling_factor={factor} in args without rope_type (Megatron-LM before core 0.14, whose "
                "YaRN took its original length from max_position_embeddings) is not mapped; pass --hf-config"
            )
        return {}
    rope_type = args.rope_type or "yarn"
    if rope_type not in ("rope", "yarn"):
        raise CheckpointError(f"rope_type={rope_type} is not an MLA rotary embedding (need rope or yarn)")
    if rope_type == "rope" or factor == 1:
        if yarn_mscale(factor, mscale_all_dim) != 1:  # Megatron scales the softmax even without YaRN
            raise CheckpointError(
                f"mscale_all_dim={mscale_all_dim} with rotary_scaling_factor={factor} scales MLA's softmax "
                f"without YaRN (rope_type={rope_type}), which DeepSeek-V3 in transformers cannot express"
            )
        return {}
    if factor < 1:
        raise CheckpointError(f"rotary_scaling_factor={factor} < 1: transformers' YaRN needs a factor >= 1")
    original = int(_mla_arg(args, "original_max_position_embeddings"))
    beta_fast, beta_slow = float(_mla_arg(args, "beta_fast")), float(_mla_arg(args, "beta_slow"))
    if beta_fast <= 0 or beta_slow <= 0:  # transformers would read 0 as its default
        raise CheckpointError(f"beta_fast={beta_fast}, beta_slow={beta_slow}: YaRN needs positive betas")
    rope: dict[str, Any] = {
        "rope_type": "yarn",
        "rope_theta": float(getattr(args, "rotary_base", 10000)),
        "factor": factor,
        "original_max_position_embeddings": original,
        "beta_fast": beta_fast,
        "beta_slow": beta_slow,
    }
    if mscale is not None:
        rope["mscale"] = float(mscale)
    rope["mscale_all_dim"] = float(mscale_all_dim)
    if mscale is None:  # Megatron's concentration factor (YarnRotaryEmbedding) ...
        concentration = yarn_mscale(factor, 1)
    else:
        concentration = yarn_mscale(factor, mscale) / yarn_mscale(factor, mscale_all_dim)
    if mscale and mscale_all_dim:  # ... and transformers' inference of it (_compute_yarn_parameters)
        inferred = yarn_mscale(factor, mscale) / yarn_mscale(factor, mscale_all_dim)
    else:
        inferred = yarn_mscale(factor, 1)
    if inferred != concentration:
        rope["attention_factor"] = float(concentration)
    # transformers reads max_position_embeddings as YaRN's extended length, factor × original
    trained = getattr(args, "max_position_embeddings", None) or int(args.seq_length)
    extended = factor * original
    longest = max(trained, int(extended)) if extended.is_integer() else trained
    return {"rope_parameters": rope, "max_position_embeddings": longest}


def mla_fields(args: argparse.Namespace) -> dict[str, Any]:
    """The HF config fields of MLA (DeepSeek-V3's names): ranks, head dims and its rotary embedding."""
    return {
        **mla_rope(args),
        "q_lora_rank": getattr(args, "q_lora_rank", None),
        "kv_lora_rank": int(args.kv_lora_rank),
        "qk_nope_head_dim": int(args.qk_head_dim),
        "qk_rope_head_dim": int(args.qk_pos_emb_head_dim),
        "v_head_dim": int(args.v_head_dim),
        "head_dim": int(args.qk_pos_emb_head_dim),
        "num_key_value_heads": int(args.num_attention_heads),
        "rope_interleave": True,
    }
