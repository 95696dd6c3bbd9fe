"""The model families offline-bridge knows, registered explicitly: one module per HF architecture."""

from __future__ import annotations

import argparse
from collections.abc import Mapping
from typing import Any

from ..config.hf_fields import hf_value
from ..errors import OptionError
from . import deepseek_v3, llama, mistral, mixtral, qwen2, qwen3, qwen3_5, qwen3_moe, qwen3_next
from .base import Family

__all__ = ["FAMILIES", "Family", "family_by_name", "family_for_args", "family_for_config"]

FAMILIES: dict[str, Family] = {
    f.name: f
    for f in (
        llama.FAMILY,
        mistral.FAMILY,
        qwen2.FAMILY,
        qwen3.FAMILY,
        qwen3_moe.FAMILY,
        mixtral.FAMILY,
        deepseek_v3.FAMILY,
        qwen3_next.FAMILY,
        qwen3_5.FAMILY,
        qwen3_5.MOE_FAMILY,
        qwen3_5.VL_FAMILY,
        qwen3_5.VL_MOE_FAMILY,
    )
}


def family_by_name(name: str) -> Family:
    if name not in FAMILIES:
        raise OptionError(f"unknown model type {name!r}; known: {', '.join(sorted(FAMILIES))}")
    return FAMILIES[name]


def family_for_config(config: Mapping[str, Any]) -> Family:
    """The family of an HF config, by its `model_type`."""
    model_type = hf_value(config, "model_type", None)
    for family in FAMILIES.values():
        if family.model_type == model_type:
            return family
    raise OptionError(f"HF config model_type {model_type!r} is not supported; known: {', '.join(sorted(FAMILIES))}")


def family_for_args(args: argparse.Namespace) -> Family:
    """Infer the family from Megatron args (qk_layernorm → qwen3, add_qkv_bias → qwen2, else llama)."""
    matches = [f for f in FAMILIES.values() if f.detect(args)]
    if len(matches) != 1:
        raise OptionError("cannot infer the model family from the checkpoint's args; pass --model-type or --hf-config")
    return matches[0]
