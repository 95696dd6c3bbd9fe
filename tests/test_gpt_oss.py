"""GPT-OSS: checkpoints written by megatron-core's GPTModel (sinks, biases, alternating sliding window, clamped
gated quick-GELU experts, YaRN) convert to what transformers' GptOssForCausalLM computes as Megatron does; the
args HF cannot express are refused."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp
from judge import assert_matches_megatron, assert_same_output
from safetensors.torch import load_file

from offline_bridge import convert
from offline_bridge.config.hf_config import derive_config
from offline_bridge.config.provider_args import provider_args
from offline_bridge.errors import CheckpointError
from offline_bridge.families import family_for_args
from offline_bridge.families.gpt_oss import FAMILY, layer_types
from tools.gpt_oss_fixtures import GptOssSpec, build_gpt_oss, reshard_gpt_oss

SPEC = GptOssSpec(tp=2, ep=2)
BF16 = GptOssSpec(tp=2, ep=2, dtype="bf16")  # as GPT-OSS trains; written in bf16 without MXFP4


@pytest.fixture(scope="module")
def saves(megatron_cache: Path) -> dict[str, tuple[GptOssSpec, Path]]:
    """The TP2 EP2 save, the same weights re-saved by Megatron at TP1 EP1 and at PP2, and a bf16 save."""
    roots = build_gpt_oss([SPEC, BF16], megatron_cache)
    return {
        "tp2ep2": (SPEC, roots[SPEC]),
        "tp1": reshard_gpt_oss(SPEC, roots[SPEC], megatron_cache, tp=1, ep=1),
        "pp2": reshard_gpt_oss(SPEC, roots[SPEC], megatron_cache, tp=1, ep=1, pp=2),
        "bf16": (BF16, roots[BF16]),
    }


@pytest.mark.parametrize("layout", ["tp2ep2", "tp1", "pp2", "bf16"])
def test_matches_megatron(layout: str, saves: dict, tmp_path: Path) -> None:
    spec, root = saves[layout]
    out = convert(root, tmp_path / "hf", progress=False)
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "gpt_oss" and "quantization_config" not in config
    assert config["layer_types"] == ["sliding_attention", "full_attention"] * 2
    assert config["sliding_window"] == spec.sliding_window
    assert (config["swiglu_limit"], config["swiglu_alpha"]) == (spec.clamp, 1.702)
    assert config["rope_parameters"]["rope_type"] == "yarn"
    assert config["rope_parameters"]["truncate"] is spec.yarn_round_to_int
    assert config["dtype"] == {"fp32": "float32", "bf16": "bfloat16"}[spec.dtype]
    assert_matches_megatron(out, spec.base, root)


@pytest.mark.parametrize("layout", ["tp1", "pp2"])
def test_layouts_give_the_same_bytes(layout: str, saves: dict, tmp_path: Path) -> None:
    outs = [convert(saves[k][1], tmp_path / k, progress=False) for k in ("tp2ep2", layout)]
    assert_same_output(*outs)


def test_experts_and_sinks_by_value(saves: dict, tmp_path: Path) -> None:
    """gate_up_proj `[E, H, 2I]`: gate in even columns, up in odd ones, each Megatron's fc1 half transposed;
    down_proj `[E, I, H]` is fc2 transposed; sinks are the softmax offsets (read by torch's own DCP loader)."""
    spec, root = saves["tp1"]
    out = convert(root, tmp_path / "hf", progress=False)
    iteration_dir = root / "iter_0000010"
    names = {
        "fc1": "decoder.layers.mlp.experts.experts.linear_fc1.weight",
        "fc1_bias": "decoder.layers.mlp.experts.experts.linear_fc1.bias",
        "fc2": "decoder.layers.mlp.experts.experts.linear_fc2.weight",
        "sinks": "decoder.layers.self_attention.core_attention.softmax_offset",
    }
    metadata = dcp.FileSystemReader(iteration_dir).read_metadata().state_dict_metadata
    megatron = {k: torch.empty(metadata[k].size, dtype=metadata[k].properties.dtype) for k in names.values()}
    dcp.load(megatron, checkpoint_id=iteration_dir, no_dist=True)
    hf = load_file(out / "model.safetensors")
    for layer in range(spec.base.num_layers):
        prefix = f"model.layers.{layer}."
        fc1, fc1_bias = megatron[names["fc1"]][layer], megatron[names["fc1_bias"]][layer]
        gate, up = fc1.chunk(2, dim=1)
        gate_up = hf[prefix + "mlp.experts.gate_up_proj"]
        assert torch.equal(gate_up[..., ::2], gate.transpose(1, 2))
        assert torch.equal(gate_up[..., 1::2], up.transpose(1, 2))
        bias = hf[prefix + "mlp.experts.gate_up_proj_bias"]
        assert torch.equal(torch.stack([bias[:, ::2], bias[:, 1::2]], dim=1), fc1_bias.unflatten(1, (2, -1)))
        assert torch.equal(hf[prefix + "mlp.experts.down_proj"], megatron[names["fc2"]][layer].transpose(1, 2))
        assert torch.equal(hf[prefix + "self_attn.sinks"], megatron[names["sinks"]][layer])


# --------------------------------------------------------------------------- args (fast)

GPT_OSS_ARGS = {
    "num_layers": 4,
    "hidden_size": 64,
    "ffn_hidden_size": 96,
    "num_attention_heads": 8,
    "num_query_groups": 2,
    "group_query_attention": True,
    "kv_channels": 8,
    "seq_length": 64,
    "max_position_embeddings": 64,
    "vocab_size": 256,
    "normalization": "RMSNorm",
    "swiglu": False,
    "quick_geglu": True,
    "glu_linear_offset": 1.0,
    "activation_func_clamp_value": 7.0,
    "add_bias_linear": True,
    "softmax_type": "learnable",
    "window_size": (127, 0),
    "window_attn_skip_freq": 2,
    "num_experts": 4,
    "moe_ffn_hidden_size": 32,
    "moe_router_topk": 2,
    "position_embedding_type": "yarn",
    "rotary_base": 150000,
    "yarn_rotary_scaling_factor": 32.0,
    "yarn_original_max_position_embeddings": 4096,
    "yarn_correction_range_round_to_int": False,
    "untie_embeddings_and_output_weights": True,
}


def _args(**changes: object) -> argparse.Namespace:
    return argparse.Namespace(**{**GPT_OSS_ARGS, **changes})


def test_args_give_the_hub_config() -> None:
    """Megatron-LM's GPT-OSS flags (as Bridge's GPTOSSProvider sets them) give the Hub config's fields."""
    assert family_for_args(_args()) is FAMILY
    config = derive_config(_args(), FAMILY, vocab_size=None)
    assert config["sliding_window"] == 128  # Megatron's (127, 0) sees 127 earlier tokens and itself
    assert config["layer_types"] == ["sliding_attention", "full_attention"] * 2
    assert config["max_position_embeddings"] == 131072
    rope = config["rope_parameters"]
    assert (rope["factor"], rope["original_max_position_embeddings"], rope["truncate"]) == (32.0, 4096, False)
    assert rope["attention_factor"] == pytest.approx(0.1 * torch.log(torch.tensor(32.0)).item() + 1)
    assert (config["num_local_experts"], config["intermediate_size"], config["swiglu_limit"]) == (4, 32, 7.0)


@pytest.mark.parametrize(
    ("skip", "windowed"),
    [(None, [1, 1, 1, 1]), (2, [1, 0, 1, 0]), (3, [1, 1, 0, 1]), ([0, 1, 1, 0], [0, 1, 1, 0])],
)
def test_layer_types(skip: object, windowed: list[int]) -> None:
    types, window = layer_types(_args(window_attn_skip_freq=skip))
    assert types == ["sliding_attention" if w else "full_attention" for w in windowed] and window == 128


@pytest.mark.parametrize(
    ("changes", "named"),
    [
        ({"softmax_type": "vanilla"}, "softmax_type"),
        ({"quick_geglu": False, "swiglu": True}, "quick_geglu"),
        ({"glu_linear_offset": 0.0}, "glu_linear_offset"),
        ({"activation_func_clamp_value": None}, "activation_func_clamp_value"),
        ({"add_bias_linear": False}, "add_bias_linear"),
        ({"window_size": (4, 4)}, "window_size"),
        ({"window_size": (-1, 0)}, "window_size"),
        ({"window_attn_skip_freq": [1, 0]}, "window_attn_skip_freq"),
        ({"moe_layer_freq": [0, 1, 1, 1]}, "moe_layer_freq"),
        ({"moe_router_score_function": "sigmoid"}, "moe_router_score_function"),
        ({"moe_shared_expert_intermediate_size": 32}, "shared expert"),
        ({"yarn_rotary_scaling_factor": None}, "yarn_rotary_scaling_factor"),
        ({"position_embedding_type": "learned_absolute"}, "position_embedding_type"),
    ],
)
def test_refuses_what_hf_cannot_express(changes: dict, named: str) -> None:
    with pytest.raises(CheckpointError, match=named):
        derive_config(_args(**changes), FAMILY, vocab_size=None)


def test_bridge_provider_gives_the_same_config() -> None:
    """A Megatron-Bridge save's `run_config.yaml` `model:` section (GPTOSSProvider's fields, functions as
    `_target_` names) derives the config Megatron-LM's args do."""
    provider = {
        **{k: v for k, v in GPT_OSS_ARGS.items() if k not in ("swiglu", "quick_geglu", "group_query_attention")},
        "window_size": list(GPT_OSS_ARGS["window_size"]),  # YAML has no tuples
        "num_moe_experts": GPT_OSS_ARGS["num_experts"],
        "gated_linear_unit": True,
        "activation_func": {"_target_": "megatron.core.fusions.fused_bias_geglu.quick_gelu", "_call_": False},
        "share_embeddings_and_output_weights": False,
    }
    del provider["num_experts"], provider["untie_embeddings_and_output_weights"]
    args = provider_args(provider, "run_config.yaml")
    assert family_for_args(args) is FAMILY
    assert derive_config(args, FAMILY, vocab_size=None) == derive_config(_args(), FAMILY, vocab_size=None)


# Megatron-Bridge's GPTOSSBridge.mapping_registry (src/megatron/bridge/models/gpt_oss/gpt_oss_bridge.py at
# 0e4d6ed), HF name -> Megatron name as Bridge spells them ('*' for the layer, then the expert; SequentialMLP's
# in-memory `local_experts.` where the checkpoint says `experts.`), transcribed by hand.
BRIDGE = {
    "model.embed_tokens.weight": "embedding.word_embeddings.weight",
    "model.norm.weight": "decoder.final_layernorm.weight",
    "lm_head.weight": "output_layer.weight",
    "model.layers.*.input_layernorm.weight": "decoder.layers.*.self_attention.linear_qkv.layer_norm_weight",
    "model.layers.*.self_attn.o_proj.bias": "decoder.layers.*.self_attention.linear_proj.bias",
    "model.layers.*.self_attn.o_proj.weight": "decoder.layers.*.self_attention.linear_proj.weight",
    "model.layers.*.self_attn.sinks": "decoder.layers.*.self_attention.core_attention.softmax_offset",
    "model.layers.*.post_attention_layernorm.weight": "decoder.layers.*.pre_mlp_layernorm.weight",
    "model.layers.*.mlp.router.bias": "decoder.layers.*.mlp.router.bias",
    "model.layers.*.mlp.router.weight": "decoder.layers.*.mlp.router.weight",
    **{f"model.layers.*.self_attn.{p}_proj.weight": "decoder.layers.*.self_attention.linear_qkv.weight" for p in "qkv"},
    **{f"model.layers.*.self_attn.{p}_proj.bias": "decoder.layers.*.self_attention.linear_qkv.bias" for p in "qkv"},
    "model.layers.*.mlp.experts.down_proj": "decoder.layers.*.mlp.experts.local_experts.*.linear_fc2.weight",
    "model.layers.*.mlp.experts.down_proj_bias": "decoder.layers.*.mlp.experts.local_experts.*.linear_fc2.bias",
    "model.layers.*.mlp.experts.gate_up_proj": "decoder.layers.*.mlp.experts.local_experts.*.linear_fc1.weight",
    "model.layers.*.mlp.experts.gate_up_proj_bias": "decoder.layers.*.mlp.experts.local_experts.*.linear_fc1.bias",
}


def test_bridge_mapping_names_agree() -> None:
    """Every HF name Bridge writes we write, from the tensor Bridge reads it from, and nothing else."""
    ours: dict[str, tuple[str, ...]] = {}
    for row in FAMILY.describe():
        for target in row.hf:
            ours[target.replace("{i}", "*")] = tuple(
                s.replace("{i}", "*").replace(".experts.{e}.", ".experts.local_experts.*.") for s in row.megatron
            )
    assert set(ours) == set(BRIDGE)
    assert {name: megatron for name, megatron in BRIDGE.items() if megatron not in ours[name]} == {}
