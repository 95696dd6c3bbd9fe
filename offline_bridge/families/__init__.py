"""The model families offline-bridge knows: one module per HF architecture, registered here and only here."""

from __future__ import annotations

import argparse
from collections.abc import Mapping
from typing import Any

from . import (
    deepseek_v3,
    glm4_moe,
    glm4_moe_lite,
    gpt_oss,
    kimi,
    llama,
    mistral,
    mixtral,
    nemotron_h,
    qwen2,
    qwen3,
    qwen3_5,
    qwen3_moe,
    qwen3_next,
)
from .base import Family
from .registry import Registry

__all__ = ["FAMILIES", "REGISTRY", "Family", "family_by_name", "family_for_args", "family_for_config"]

REGISTRY = Registry()
for _family in (
    llama.FAMILY,
    mistral.FAMILY,
    qwen2.FAMILY,
    qwen3.FAMILY,
    qwen3_moe.FAMILY,
    mixtral.FAMILY,
    deepseek_v3.FAMILY,
    glm4_moe.FAMILY,
    glm4_moe_lite.FAMILY,
    kimi.KIMI_K2,
    kimi.MOONLIGHT,
    qwen3_next.FAMILY,
    qwen3_5.FAMILY,
    qwen3_5.MOE_FAMILY,
    qwen3_5.VL_FAMILY,
    qwen3_5.VL_MOE_FAMILY,
    gpt_oss.FAMILY,
    nemotron_h.FAMILY,
):
    REGISTRY.register(_family)

FAMILIES: Mapping[str, Family] = REGISTRY.families


def family_by_name(name: str) -> Family:
    return REGISTRY.by_name(name)


def family_for_config(config: Mapping[str, Any]) -> Family:
    """The family of an HF config, by its `model_type`."""
    return REGISTRY.for_config(config)


def family_for_args(args: argparse.Namespace) -> Family:
    """The most specific family Megatron args describe (see `Family.priority`)."""
    return REGISTRY.for_args(args)
