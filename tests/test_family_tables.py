"""Every family's table against transformers, without megatron-core: a metadata-only checkpoint listing the
Megatron keys and shapes formats/torch_dist.md documents (written here by hand, not from the tables) is
planned, and the HF names and shapes must be exactly those of the transformers model built from the same
tiny config on the meta device."""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import transformers
from transformers.conversion_mapping import WeightConverter, get_checkpoint_conversion_mapping

from offline_bridge.dtypes import by_option
from offline_bridge.families import FAMILIES, Family
from offline_bridge.hf_config import dims_of
from offline_bridge.plan import build_plan
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
}
CASES["qwen3_5_vl"] = ({"text_config": CASES["qwen3_5"][0], "tie_word_embeddings": False}, CASES["qwen3_5"][1])
CASES["qwen3_5_moe_vl"] = (
    {"text_config": CASES["qwen3_5_moe"][0], "tie_word_embeddings": False},
    CASES["qwen3_5_moe"][1],
)


def hf_state(family: Family, fields: dict[str, Any]) -> tuple[dict[str, tuple[int, ...]], list[re.Pattern[str]]]:
    """transformers' parameter names and shapes for the config, and the names it skips when loading."""
    config = transformers.AutoConfig.for_model(family.model_type, **fields)
    model_class: Callable[..., torch.nn.Module] = getattr(transformers, family.architecture)
    with torch.device("meta"):
        model = model_class(config)
    state = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    if family.text_config(config.to_dict()).get("tie_word_embeddings"):
        state.pop("lm_head.weight")  # the same tensor as the embedding; safetensors stores it once
    layers = family.text_config(config.to_dict())["num_hidden_layers"]
    # DeepSeek-V3's pattern names its MTP layer by the real model's index (61 = num_hidden_layers)
    ignored = [re.compile(p.replace("61", str(layers))) for p in model._keys_to_ignore_on_load_unexpected or ()]
    return state, ignored


def as_loaded(names: Keys, model_type: str) -> Keys:
    """Our names as transformers loads them: its checkpoint conversion renames them and packs per-expert
    tensors (`experts.{e}.gate_proj` + `up_proj` → `experts.gate_up_proj` `[E, 2I, H]`)."""
    renames, merges = [], []
    for transform in get_checkpoint_conversion_mapping(model_type) or ():
        assert type(transform).__name__ in ("WeightRenaming", "PrefixChange", "WeightConverter"), transform
        patterns = [
            (re.compile(s.replace("*", r"(\d+)")), t)
            for s in transform.source_patterns
            for t in transform.target_patterns
        ]
        (merges if isinstance(transform, WeightConverter) else renames).append(patterns)
    loaded: Keys = {}
    pieces: dict[str, dict[int, dict[int, tuple[int, ...]]]] = {}  # packed name → source pattern → expert → shape
    for name, shape in names.items():
        for patterns in renames:
            name = next((p.sub(t, name) for p, t in patterns if p.search(name)), name)
        found = [(j, p.search(name), t) for patterns in merges for j, (p, t) in enumerate(patterns) if p.search(name)]
        if not found:
            loaded[name] = shape
            continue
        ((j, match, target),) = found
        packed = name[: match.start()] + target + name[match.end() :]
        pieces.setdefault(packed, {}).setdefault(j, {})[int(match.group(1))] = shape
    for packed, parts in pieces.items():
        experts = [parts[j] for j in sorted(parts)]
        rest = experts[0][0][1:]
        loaded[packed] = (len(experts[0]), sum(part[0][0] for part in experts), *rest)
    return loaded


@pytest.mark.parametrize("name", sorted(CASES))
def test_table_gives_the_transformers_state_dict(name: str) -> None:
    family = FAMILIES[name]
    fields, keys = CASES[name]
    config = {"model_type": family.model_type, **fields}
    plan = build_plan(family, MetadataReader(keys), dims_of(config, family), BF16, 10**12)
    ours = as_loaded({t.name: t.shape for t in plan.targets()}, family.model_type)
    theirs, ignored = hf_state(family, fields)
    missing = sorted(set(theirs) - set(ours) - {n for n in theirs if n.startswith("model.visual.")})
    extra = sorted(n for n in set(ours) - set(theirs) if not any(p.search(n) for p in ignored))
    assert not missing and not extra, (missing, extra)
    wrong = {n: (ours[n], theirs[n]) for n in set(ours) & set(theirs) if ours[n] != theirs[n]}
    assert not wrong, wrong
    if family.mtp_layers(dims_of(config, family).config):
        assert set(ours) - set(theirs), "the MTP layer is written, and transformers skips it on load"


def test_every_registered_family_is_checked() -> None:
    assert set(CASES) == set(FAMILIES)
