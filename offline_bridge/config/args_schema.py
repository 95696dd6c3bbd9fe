"""The Megatron args we read, each with its type and range: one table, checked before any value is used.

Args come from a pickle (`common.pt`, `.metadata`, `model_optim_rng.pt`) or from YAML (`run_config.yaml`);
either may hold anything. A value of the wrong kind (`'4'` or `64.0` for a size, `'true'` for a flag, a
list for an epsilon, bytes, a negative size) is a `CheckpointError` naming the file and the field, never
an internal error and never a string or float in an HF config where an int belongs.

No coercion: an integral float (`64.0`) is refused even from YAML, whose writers (Bridge's `safe_dump`)
write ints as ints; only the representation of a valid number changes (numpy ints and floats become
Python ones). Fields absent or None are left to the code that reads them (it knows their defaults).
"""

from __future__ import annotations

import argparse
import math
import numbers
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..errors import CheckpointError

__all__ = ["ARGS_SCHEMA", "Kind", "checked_args", "checked_value"]


@dataclass(frozen=True)
class Kind:
    """What a field may hold: ``convert`` returns the value in Python form or None if it does not fit."""

    what: str  # said in the error: "a positive int", ...
    convert: Callable[[Any], Any]


_BOOLS = (bool, np.bool_)


def _int(value: Any) -> int | None:
    return int(value) if isinstance(value, numbers.Integral) and not isinstance(value, _BOOLS) else None


def _float(value: Any) -> float | None:
    if isinstance(value, numbers.Real) and not isinstance(value, _BOOLS):
        number = float(value)
        return number if math.isfinite(number) else None
    return None


def _bool(value: Any) -> bool | None:
    return bool(value) if isinstance(value, _BOOLS) else None


def _where(test: Callable[[Any], bool], base: Callable[[Any], Any]) -> Callable[[Any], Any]:
    def convert(value: Any) -> Any:
        converted = base(value)
        return converted if converted is not None and test(converted) else None

    return convert


def _one_of(*names: str) -> Callable[[Any], Any]:
    return lambda value: value if isinstance(value, str) and value in names else None


def _string(value: Any) -> str | None:
    return value if isinstance(value, str) and len(value) <= 256 else None


def _layer_pattern(value: Any) -> Any:
    """An int k >= 1, or a list of 0/1 per layer (Megatron's `moe_layer_freq`, `linear_attention_freq`).

    A string is passed through: the family says what an unevaluated expression means for it."""
    if isinstance(value, str):
        return _string(value)
    if isinstance(value, (list, tuple)):
        items = [_int(v) if _bool(v) is None else int(v) for v in value]
        return items if all(v in (0, 1) for v in items) and len(items) <= 1 << 16 else None
    return _where(lambda n: n >= 1, _int)(value)


def _window(value: Any) -> tuple[int, int] | None:
    """Megatron's sliding `window_size` `(left, right)`; -1 is TE's "unbounded"."""
    if isinstance(value, (list, tuple)) and len(value) == 2:
        left, right = (_int(v) for v in value)
        if left is not None and right is not None and min(left, right) >= -1:
            return left, right
    return None


POSITIVE_INT = Kind("a positive int", _where(lambda n: n >= 1, _int))
COUNT = Kind("an int >= 0", _where(lambda n: n >= 0, _int))
FLAG = Kind("a bool", _bool)
NUMBER = Kind("a finite number", _float)
POSITIVE = Kind("a positive number", _where(lambda x: x > 0, _float))
NON_NEGATIVE = Kind("a number >= 0", _where(lambda x: x >= 0, _float))
EPSILON = Kind("a number in (0, 1)", _where(lambda x: 0 < x < 1, _float))
FRACTION = Kind("a number in (0, 1]", _where(lambda x: 0 < x <= 1, _float))
NAME = Kind("a string", _string)
LAYER_PATTERN = Kind("a positive int or a list of 0/1 per layer", _layer_pattern)

ARGS_SCHEMA: dict[str, Kind] = {
    # dimensions
    "num_layers": POSITIVE_INT,
    "hidden_size": POSITIVE_INT,
    "ffn_hidden_size": POSITIVE_INT,
    "num_attention_heads": POSITIVE_INT,
    "num_query_groups": POSITIVE_INT,
    "kv_channels": POSITIVE_INT,
    "group_query_attention": FLAG,
    "vocab_size": POSITIVE_INT,
    "padded_vocab_size": POSITIVE_INT,
    "make_vocab_size_divisible_by": POSITIVE_INT,
    "seq_length": POSITIVE_INT,
    "max_position_embeddings": POSITIVE_INT,
    # layer kinds
    "normalization": NAME,
    "norm_epsilon": EPSILON,
    "layernorm_epsilon": EPSILON,
    "apply_layernorm_1p": FLAG,
    "layernorm_zero_centered_gamma": FLAG,
    "swiglu": FLAG,
    "add_bias_linear": FLAG,
    "add_qkv_bias": FLAG,
    "qk_layernorm": FLAG,
    "attention_output_gate": FLAG,
    "untie_embeddings_and_output_weights": FLAG,
    "init_method_std": NON_NEGATIVE,
    # rotary embedding
    "position_embedding_type": NAME,
    "rotary_base": POSITIVE,
    "rotary_percent": FRACTION,
    "use_rope_scaling": FLAG,
    "rope_scaling_factor": POSITIVE,
    "rotary_seq_len_interpolation_factor": POSITIVE,
    "rope_type": Kind("'rope' or 'yarn'", _one_of("rope", "yarn")),
    "rotary_scaling_factor": POSITIVE,
    "original_max_position_embeddings": POSITIVE_INT,
    "beta_fast": NUMBER,
    "beta_slow": NUMBER,
    "mscale": NUMBER,
    "mscale_all_dim": NUMBER,
    # GPT-OSS: attention sinks, sliding window, clamped gated quick-GELU, GPTModel's YaRN
    "softmax_type": Kind("'vanilla', 'off-by-one' or 'learnable'", _one_of("vanilla", "off-by-one", "learnable")),
    "window_size": Kind("a pair of ints >= -1", _window),
    "window_attn_skip_freq": LAYER_PATTERN,
    "quick_geglu": FLAG,
    "glu_linear_offset": NUMBER,
    "activation_func_clamp_value": POSITIVE,
    "yarn_rotary_scaling_factor": POSITIVE,
    "yarn_original_max_position_embeddings": POSITIVE_INT,
    "yarn_beta_fast": POSITIVE,
    "yarn_beta_slow": POSITIVE,
    "yarn_mscale": NUMBER,
    "yarn_mscale_all_dim": NUMBER,
    "yarn_correction_range_round_to_int": FLAG,
    # mixture of experts
    "num_experts": POSITIVE_INT,
    "moe_ffn_hidden_size": POSITIVE_INT,
    "moe_router_topk": POSITIVE_INT,
    "moe_layer_freq": LAYER_PATTERN,
    "moe_shared_expert_intermediate_size": POSITIVE_INT,
    "moe_shared_expert_gate": FLAG,
    "moe_router_score_function": Kind("'softmax' or 'sigmoid'", _one_of("softmax", "sigmoid")),
    "moe_router_pre_softmax": FLAG,
    "moe_router_enable_expert_bias": FLAG,
    "moe_router_num_groups": POSITIVE_INT,
    "moe_router_group_topk": POSITIVE_INT,
    "moe_router_topk_scaling_factor": POSITIVE,
    "moe_aux_loss_coeff": NON_NEGATIVE,
    # multi-latent attention
    "multi_latent_attention": FLAG,
    "q_lora_rank": POSITIVE_INT,
    "kv_lora_rank": POSITIVE_INT,
    "qk_head_dim": POSITIVE_INT,
    "qk_pos_emb_head_dim": POSITIVE_INT,
    "v_head_dim": POSITIVE_INT,
    # Gated DeltaNet hybrids, multi-token prediction
    "experimental_attention_variant": NAME,
    "linear_attention_freq": LAYER_PATTERN,
    "linear_conv_kernel_dim": POSITIVE_INT,
    "linear_key_head_dim": POSITIVE_INT,
    "linear_value_head_dim": POSITIVE_INT,
    "linear_num_key_heads": POSITIVE_INT,
    "linear_num_value_heads": POSITIVE_INT,
    "mtp_num_layers": COUNT,
    # hybrid Mamba models (MambaModel: Nemotron-H, Nemotron 3)
    "hybrid_override_pattern": NAME,
    "hybrid_layer_pattern": NAME,  # Megatron-LM 0.19: `<main>/<mtp>/...`, MTP depths after `/`
    "mtp_hybrid_override_pattern": NAME,
    "is_hybrid_model": FLAG,
    "squared_relu": FLAG,
    "mamba_state_dim": POSITIVE_INT,
    "mamba_head_dim": POSITIVE_INT,
    "mamba_num_groups": POSITIVE_INT,
    "mamba_num_heads": POSITIVE_INT,
    "moe_latent_size": POSITIVE_INT,
    # parallel layout of the save
    "tensor_model_parallel_size": POSITIVE_INT,
    "pipeline_model_parallel_size": POSITIVE_INT,
    "virtual_pipeline_model_parallel_size": POSITIVE_INT,
    "expert_model_parallel_size": POSITIVE_INT,
    "expert_tensor_parallel_size": POSITIVE_INT,
    # Megatron-Bridge's peft: section
    "lora_alpha": NUMBER,
    "lora_dim": POSITIVE_INT,
}


def checked_value(name: str, value: Any, where: str, label: str | None = None) -> Any:
    """``value`` of field ``name`` in Python form; a `CheckpointError` naming ``where`` and the field (as
    ``label`` when the file calls it otherwise) if it does not fit."""
    if value is None or name not in ARGS_SCHEMA:
        return value
    kind = ARGS_SCHEMA[name]
    converted = kind.convert(value)
    if converted is None:
        shown = repr(value) if len(repr(value)) <= 60 else repr(value)[:57] + "..."
        raise CheckpointError(f"{where}: {label or name} must be {kind.what}, got {type(value).__name__} {shown}")
    return converted


def checked_args(args: argparse.Namespace, where: str) -> argparse.Namespace:
    """A copy of ``args`` with every field of the schema checked (and in Python form)."""
    checked = argparse.Namespace()
    vars(checked).update(vars(args))  # keys as the pickle made them (not necessarily identifiers)
    for name in ARGS_SCHEMA.keys() & vars(checked).keys():
        setattr(checked, name, checked_value(name, getattr(checked, name), where))
    return checked
