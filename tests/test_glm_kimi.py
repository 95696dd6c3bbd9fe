"""GLM-4.5 (`glm4_moe`), GLM-4.7-Flash (`glm4_moe_lite`), Kimi-K2 and Moonlight: checkpoints written by
megatron-core, judged by transformers' forward against Megatron's, and the configs each family derives."""

from __future__ import annotations

import json
import re
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp
from conftest import DEEPSEEK_BASE
from judge import assert_matches_megatron
from safetensors.torch import load_file
from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

from offline_bridge import convert
from offline_bridge.config.hf_config import derive_config
from offline_bridge.config.provider_args import provider_args
from offline_bridge.families import family_by_name, family_for_args, family_for_config
from offline_bridge.families.registry import Registry
from offline_bridge.families.tables import TableError
from tools.megatron_fixtures import FixtureSpec, Yarn, build_fixtures, reference_logits

GLM = FixtureSpec("glm4_moe", tp=2, ep=2)  # q/k/v biases, q/k norms, half-rotary heads, sigmoid router + bias
GLM_SPECS = [
    GLM,
    FixtureSpec("glm4_moe", pp=2, ep=2),  # the MTP layer on the last stage
    FixtureSpec("glm4_moe", tp=2, ep=2, moe_router_num_groups=2, moe_router_group_topk=1),  # group routing
    FixtureSpec("glm4_moe_lite", tp=2, ep=2),  # MLA on the same MoE body
    FixtureSpec("glm4_moe_lite", tp=2, ep=2, yarn=Yarn()),  # MLA's YaRN through GLM's rotary embedding
]


@pytest.fixture(scope="module")
def glm_checkpoints(megatron_cache: Path) -> dict[FixtureSpec, Path]:
    return build_fixtures(GLM_SPECS, megatron_cache)


def _mtp_layer(spec: FixtureSpec) -> str:
    """transformers' forward does not use the MTP layer (HF layer num_layers); test_glm_mtp_layer checks it."""
    return rf"model\.layers\.{spec.num_layers}\..*"


@pytest.mark.parametrize("spec", GLM_SPECS, ids=lambda s: s.name)
def test_glm_parity(spec: FixtureSpec, glm_checkpoints: dict, tmp_path: Path) -> None:
    # GLM-4.5 is inferred from the args (a sigmoid router without MLA); GLM-4.7-Flash has DeepSeek-V3's args
    model_type = "glm4_moe_lite" if spec.is_mla else None
    out = convert(glm_checkpoints[spec], tmp_path / "hf", model_type=model_type, progress=False)
    config = json.loads((out / "config.json").read_text())
    assert (config["model_type"], config["architectures"]) == (spec.family, [family_by_name(spec.family).architecture])
    assert_matches_megatron(out, spec, glm_checkpoints[spec], extra=_mtp_layer(spec))


def test_glm_config_fields(glm_checkpoints: dict, tmp_path: Path) -> None:
    """What the parity test depends on without showing which field it came from."""
    glm = json.loads((convert(glm_checkpoints[GLM], tmp_path / "a", progress=False) / "config.json").read_text())
    assert glm["partial_rotary_factor"] == glm["rope_parameters"]["partial_rotary_factor"] == 0.5
    assert (glm["attention_bias"], glm["use_qk_norm"]) == (True, True)
    assert (glm["first_k_dense_replace"], glm["num_nextn_predict_layers"], glm["n_shared_experts"]) == (1, 1, 1)
    assert (glm["n_group"], glm["routed_scaling_factor"]) == (1, GLM.moe_router_topk_scaling_factor)
    lite_spec = GLM_SPECS[3]
    out = convert(glm_checkpoints[lite_spec], tmp_path / "b", model_type="glm4_moe_lite", progress=False)
    lite = json.loads((out / "config.json").read_text())
    assert lite["mlp_layer_types"] == ["dense"] + ["sparse"] * (lite_spec.num_layers - 1)
    assert (lite["q_lora_rank"], lite["rope_interleave"]) == (lite_spec.q_lora_rank, True)


# Megatron MTP key (under mtp.layers.0.) -> HF name under model.layers.{num_layers}.
GLM_MTP_NAMES = {
    "enorm.weight": "enorm.weight",
    "hnorm.weight": "hnorm.weight",
    "eh_proj.weight": "eh_proj.weight",
    "final_layernorm.weight": "shared_head.norm.weight",
    "transformer_layer.self_attention.linear_qkv.layer_norm_weight": "input_layernorm.weight",
    "transformer_layer.self_attention.q_layernorm.weight": "self_attn.q_norm.weight",
    "transformer_layer.self_attention.k_layernorm.weight": "self_attn.k_norm.weight",
    "transformer_layer.self_attention.linear_proj.weight": "self_attn.o_proj.weight",
    "transformer_layer.pre_mlp_layernorm.weight": "post_attention_layernorm.weight",
    "transformer_layer.mlp.router.weight": "mlp.gate.weight",
    "transformer_layer.mlp.router.expert_bias": "mlp.gate.e_score_correction_bias",
    "transformer_layer.mlp.shared_experts.linear_fc2.weight": "mlp.shared_experts.down_proj.weight",
}


def _megatron_tensors(iteration_dir: Path, keys: list[str]) -> dict[str, torch.Tensor]:
    """Tensors as torch's own DCP loader reads them (no offline-bridge code)."""
    metadata = dcp.FileSystemReader(iteration_dir).read_metadata().state_dict_metadata
    tensors = {k: torch.empty(metadata[k].size, dtype=metadata[k].properties.dtype) for k in keys}
    dcp.load(tensors, checkpoint_id=iteration_dir, no_dist=True)
    return tensors


@pytest.mark.parametrize("spec", GLM_SPECS[:2], ids=lambda s: s.name)
def test_glm_mtp_layer(spec: FixtureSpec, glm_checkpoints: dict, tmp_path: Path) -> None:
    """GLM-4.5's MTP layer lands in HF layer num_layers (names and values), its q/k/v with their biases."""
    out = convert(glm_checkpoints[spec], tmp_path / "hf", progress=False)
    prefix, layer = "mtp.layers.0.", f"model.layers.{spec.num_layers}."
    qkv = [f"{prefix}transformer_layer.self_attention.linear_qkv.{p}" for p in ("weight", "bias")]
    megatron = _megatron_tensors(
        glm_checkpoints[spec] / f"iter_{spec.iteration:07d}", [prefix + k for k in GLM_MTP_NAMES] + qkv
    )
    hf = load_file(out / "model.safetensors")
    for key, name in GLM_MTP_NAMES.items():
        assert torch.equal(hf[layer + name], megatron[prefix + key]), name
    groups, per_group = spec.num_query_groups, spec.num_attention_heads // spec.num_query_groups
    for part, fused in zip(("weight", "bias"), qkv):  # Megatron's rows per group: its q heads, then k, then v
        q, k, v = (hf[f"{layer}self_attn.{n}_proj.{part}"] for n in "qkv")
        split = [t.reshape(groups, -1, *t.shape[1:]) for t in (q, k, v)]
        assert torch.equal(torch.cat(split, dim=1).reshape(megatron[fused].shape), megatron[fused]), fused
        assert q.shape[0] == groups * per_group * spec.kv_channels


# Kimi-K2's Hub model has q LoRA and YaRN; Moonlight's has neither
KIMI_CASES = [
    ("kimi_k2", DEEPSEEK_BASE),
    ("kimi_k2", FixtureSpec("deepseek_v3", tp=2, ep=2, yarn=Yarn())),  # also in test_yarn.py
    ("moonlight", FixtureSpec("deepseek_v3", tp=2, ep=2, q_lora_rank=None)),  # also in conftest.MOE_SPECS
]


@pytest.mark.parametrize(("model_type", "spec"), KIMI_CASES, ids=lambda x: x if isinstance(x, str) else x.name)
def test_kimi_and_moonlight_are_deepseek_v3(model_type: str, spec: FixtureSpec, megatron_cache: Path, tmp_path: Path):
    """A DeepSeek-V3 checkpoint under Kimi-K2's / Moonlight's config: the Hub fields, and the same logits as
    Megatron from transformers' stock DeepseekV3ForCausalLM (Kimi-K2's model_type is not transformers')."""
    checkpoint = build_fixtures([spec], megatron_cache)[spec]
    out = convert(checkpoint, tmp_path / "hf", model_type=model_type, progress=False)
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == {"kimi_k2": "kimi_k2", "moonlight": "deepseek_v3"}[model_type]
    assert config["architectures"] == ["DeepseekV3ForCausalLM"] and config["q_lora_rank"] == spec.q_lora_rank
    assert config["auto_map"]["AutoModelForCausalLM"] == "modeling_deepseek.DeepseekV3ForCausalLM"
    assert (config["scoring_func"], config["topk_method"]) == ("sigmoid", "noaux_tc")
    if spec.yarn:  # transformers 5 reads rope_scaling over rope_parameters: it must say the same
        rope = config["rope_parameters"]
        assert config["rope_scaling"] == {"type": "yarn", **{k: v for k, v in rope.items() if k != "rope_theta"}}
    else:
        assert config["rope_scaling"] is None
    # stock transformers packs the per-expert tensors by the config's model_type: Kimi-K2 loads as DeepSeek-V3
    # (the Hub model card's advice for frameworks without Kimi-K2), or with its remote code
    as_deepseek = DeepseekV3Config.from_dict({**config, "model_type": "deepseek_v3"})
    model, info = DeepseekV3ForCausalLM.from_pretrained(
        out, config=as_deepseek, dtype=torch.float32, output_loading_info=True
    )
    unexpected = {k for k in info["unexpected_keys"] if not re.fullmatch(_mtp_layer(spec), k)}
    assert not (info["missing_keys"] or unexpected or info["mismatched_keys"]), info
    input_ids, expected = reference_logits(checkpoint)
    with torch.no_grad():
        logits = model.eval()(input_ids).logits
    assert (logits - expected[..., : spec.vocab_size]).abs().max().item() <= 1e-5
    if model_type == "moonlight":  # stock transformers loads it by its model_type too
        assert_matches_megatron(out, spec, checkpoint, extra=_mtp_layer(spec))


def test_hf_configs_select_families_unambiguously() -> None:
    """Moonlight shares DeepSeek-V3's model_type: an HF config selects DeepSeek-V3 (the same tables), only
    --model-type selects Moonlight; Kimi-K2 and GLM have model types of their own."""
    for model_type, family in [
        ("deepseek_v3", "deepseek_v3"),
        ("kimi_k2", "kimi_k2"),
        ("glm4_moe", "glm4_moe"),
        ("glm4_moe_lite", "glm4_moe_lite"),
    ]:
        assert family_for_config({"model_type": model_type}).name == family
    assert family_by_name("moonlight").model_type == "deepseek_v3"
    assert family_by_name("moonlight").layer == family_by_name("deepseek_v3").layer


# A tiny GLM-4.5 as Megatron-Bridge's GLM45Bridge.provider_bridge sets it up (TransformerConfig names), as the
# `model:` section of run_config.yaml carries it
GLM45_PROVIDER = {
    "_target_": "megatron.bridge.models.gpt_provider.GPTModelProvider",
    **{"num_layers": 4, "hidden_size": 64, "ffn_hidden_size": 96, "num_attention_heads": 8, "kv_channels": 8},
    **{"num_query_groups": 2, "vocab_size": 256, "seq_length": 64, "rotary_base": 1000000, "rotary_percent": 0.5},
    **{"normalization": "RMSNorm", "layernorm_epsilon": 1e-5, "gated_linear_unit": True, "add_bias_linear": False},
    "activation_func": {"_call_": False, "_target_": "torch.nn.functional.silu"},
    **{"add_qkv_bias": True, "qk_layernorm": True, "share_embeddings_and_output_weights": False},
    **{"num_moe_experts": 8, "moe_ffn_hidden_size": 32, "moe_router_topk": 2, "moe_layer_freq": [0, 1, 1, 1]},
    **{"moe_shared_expert_intermediate_size": 32, "moe_router_score_function": "sigmoid", "mtp_num_layers": 1},
    **{"moe_router_enable_expert_bias": True, "moe_router_pre_softmax": False, "moe_router_topk_scaling_factor": 2.5},
}


def test_bridge_glm45_provider_derives_the_glm_config() -> None:
    args = provider_args(GLM45_PROVIDER, "run_config.yaml")
    family = family_for_args(args)
    assert family.name == "glm4_moe"
    config = derive_config(args, family, vocab_size=None)
    assert (config["num_key_value_heads"], config["head_dim"], config["partial_rotary_factor"]) == (2, 8, 0.5)
    assert (config["attention_bias"], config["use_qk_norm"], config["first_k_dense_replace"]) == (True, True, 1)
    assert (config["n_routed_experts"], config["n_shared_experts"], config["num_nextn_predict_layers"]) == (8, 1, 1)
    # the same provider with MLA is DeepSeek-V3 to detection: GLM-4.7-Flash, Kimi-K2 and Moonlight need --model-type
    mla = {
        "multi_latent_attention": True,
        "q_lora_rank": None,
        "kv_lora_rank": 16,
        "rotary_percent": 1.0,
        "rope_type": "rope",
    }
    mla_args = provider_args(
        {**GLM45_PROVIDER, **mla, "qk_head_dim": 16, "qk_pos_emb_head_dim": 8, "v_head_dim": 16}, "run_config.yaml"
    )
    assert family_for_args(mla_args).name == "deepseek_v3"
    lite = derive_config(mla_args, family_by_name("glm4_moe_lite"), vocab_size=None)
    assert lite["mlp_layer_types"] == ["dense", "sparse", "sparse", "sparse"] and lite["q_lora_rank"] is None


def test_a_variant_shares_a_model_type_only_when_it_says_so() -> None:
    deepseek = family_by_name("deepseek_v3")
    registry = Registry()
    registry.register(deepseek)
    with pytest.raises(TableError, match="already registered by deepseek_v3"):
        registry.register(replace(family_by_name("moonlight"), variant_of=None))
    registry.register(family_by_name("moonlight"))
    assert registry.for_config({"model_type": "deepseek_v3"}) is deepseek
    assert registry.by_name("moonlight").config["auto_map"]["AutoConfig"] == "configuration_deepseek.DeepseekV3Config"
