"""Kimi-K2 and Moonlight: DeepSeek-V3 models (the same tensors, tables and forward) published under configs of
their own. Kimi-K2's Hub config has `model_type` "kimi_k2", which transformers does not know; Moonlight's keeps
"deepseek_v3" (with `q_lora_rank` null). Both point `auto_map` at their repositories' remote DeepSeek-V3 code,
which reads the 4.x field names (`rope_scaling`, `scoring_func`, `topk_method`), so the derived config carries
those beside the fields of transformers' own DeepseekV3Config.

Megatron args cannot tell either from DeepSeek-V3: only --model-type selects them (or, for Kimi-K2, an HF
config with its model_type).
"""

from __future__ import annotations

import argparse
from dataclasses import replace
from typing import Any

from . import deepseek_v3

__all__ = ["KIMI_K2", "MOONLIGHT"]

# The remote code both Hub repositories ship (configuration_deepseek.py, modeling_deepseek.py)
AUTO_MAP = {
    "AutoConfig": "configuration_deepseek.DeepseekV3Config",
    "AutoModel": "modeling_deepseek.DeepseekV3Model",
    "AutoModelForCausalLM": "modeling_deepseek.DeepseekV3ForCausalLM",
}


def _hub_fields(args: argparse.Namespace) -> dict[str, Any]:
    """DeepSeek-V3's derived fields plus the names the remote code reads."""
    fields = deepseek_v3.FAMILY.from_args(args)
    rope = fields.get("rope_parameters")
    yarn = {k: v for k, v in rope.items() if k != "rope_theta"} if rope else None
    return {
        **fields,
        "rope_scaling": {"type": "yarn", **yarn} if yarn else None,  # transformers 5 also reads it
        "scoring_func": "sigmoid",
        "topk_method": "noaux_tc",
        "moe_layer_freq": 1,
        "ep_size": 1,
        "pretraining_tp": 1,
    }


KIMI_K2 = replace(
    deepseek_v3.FAMILY,
    name="kimi_k2",
    model_type="kimi_k2",
    detect=None,
    config={**deepseek_v3.FAMILY.config, "auto_map": AUTO_MAP},
    from_args=_hub_fields,
)

MOONLIGHT = replace(
    KIMI_K2,
    name="moonlight",
    model_type="deepseek_v3",
    variant_of=deepseek_v3.FAMILY.name,
)
