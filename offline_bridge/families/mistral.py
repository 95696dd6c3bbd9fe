"""Mistral (`MistralForCausalLM`): Llama's tensors under another architecture name.

Never inferred from Megatron args (they look like Llama's); choose it with --model-type or --hf-config.
"""

from __future__ import annotations

from . import llama
from .base import Family

__all__ = ["FAMILY"]

FAMILY = Family(
    name="mistral",
    architecture="MistralForCausalLM",
    model_type="mistral",
    head=llama.EMBEDDING,
    layer=llama.FAMILY.layer,
    tail=llama.FINAL,
    detect=None,
    config={"sliding_window": None},
)
