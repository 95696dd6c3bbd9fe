"""Gated DeltaNet hybrids (Qwen3.5, Qwen3.5-MoE, Qwen3-Next): megatron-core builds and runs them on CPU (torch
delta rule), transformers judges the converted output against Megatron's forward."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed.checkpoint as dcp
from judge import assert_matches_megatron, convert_fails, load_clean
from peft import PeftModel
from safetensors import safe_open
from safetensors.torch import load_file

from offline_bridge import convert
from offline_bridge.commands.export_adapter import export_adapter
from offline_bridge.plan.rules import PlusOne
from tools.gdn_lora_fixtures import GdnAdapterSpec, build_gdn_adapters
from tools.megatron_fixtures import FixtureSpec, build_fixtures, legacy_root, reference_logits

DENSE = FixtureSpec("qwen3_5", tp=2, num_attention_heads=4, legacy_twin=True)
DENSE_PP2 = FixtureSpec("qwen3_5", tp=2, pp=2, num_attention_heads=4)
# expert TP 2, shared expert with its gate, one MTP layer
MOE = FixtureSpec("qwen3_next", tp=2, num_attention_heads=4, mtp_num_layers=1)
GDN_SPECS = [DENSE, DENSE_PP2, MOE]
ATOL = 1e-4  # the delta rule's chunked recurrence and the gates amplify fp32 rounding (measured ~4e-5)

# (fixture, --model-type or None to infer, HF model_type written)
CASES = [
    (DENSE, None, "qwen3_5_text"),
    (DENSE_PP2, None, "qwen3_5_text"),
    (MOE, None, "qwen3_next"),
    (MOE, "qwen3_5_moe", "qwen3_5_moe_text"),
]


@pytest.fixture(scope="module")
def gdn_checkpoints(megatron_cache: Path) -> dict[FixtureSpec, Path]:
    return build_fixtures(GDN_SPECS, megatron_cache)


@pytest.mark.parametrize(("spec", "model_type", "hf_type"), CASES, ids=lambda c: getattr(c, "name", c))
def test_gdn_parity(spec: FixtureSpec, model_type: str | None, hf_type: str, gdn_checkpoints: dict, tmp_path: Path):
    out = convert(gdn_checkpoints[spec], tmp_path / "hf", model_type=model_type, progress=False)
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == hf_type
    assert config["layer_types"] == ["linear_attention"] * 3 + ["full_attention"]  # linear_attention_freq=4
    assert config["rope_parameters"]["partial_rotary_factor"] == 0.25
    assert_matches_megatron(out, spec, gdn_checkpoints[spec], atol=ATOL)


def test_fused_tp_local_gdn_in_proj(gdn_checkpoints: dict, tmp_path: Path):
    """`--ckpt-format torch` keeps in_proj and conv1d fused, rows in TP-local blocks: regrouped by the args' TP
    (Qwen3-Next's per-key-head grouping then works on the same joined pieces as with torch_dist)."""
    out = convert(legacy_root(gdn_checkpoints[DENSE]), tmp_path / "hf", progress=False)
    assert_matches_megatron(out, DENSE, gdn_checkpoints[DENSE], atol=ATOL)


def test_qwen3_5_moe_experts_are_packed_qwen3_next_per_expert(gdn_checkpoints: dict, tmp_path: Path):
    """The same experts: Qwen3.5-MoE `gate_up_proj` [E, 2I, H] / `down_proj` [E, H, I], Qwen3-Next per expert."""
    packed = load_file(
        convert(gdn_checkpoints[MOE], tmp_path / "a", model_type="qwen3_5_moe", progress=False) / "model.safetensors"
    )
    split = load_file(convert(gdn_checkpoints[MOE], tmp_path / "b", progress=False) / "model.safetensors")
    for layer in range(MOE.num_layers):
        prefix = f"model.layers.{layer}.mlp.experts."
        gate_up, down = packed[prefix + "gate_up_proj"], packed[prefix + "down_proj"]
        assert gate_up.shape == (MOE.num_experts, 2 * MOE.moe_ffn_hidden_size, MOE.hidden_size)
        assert down.shape == (MOE.num_experts, MOE.hidden_size, MOE.moe_ffn_hidden_size)
        for e in range(MOE.num_experts):
            gate, up = split[f"{prefix}{e}.gate_proj.weight"], split[f"{prefix}{e}.up_proj.weight"]
            assert torch.equal(gate_up[e], torch.cat([gate, up])), (layer, e)
            assert torch.equal(down[e], split[f"{prefix}{e}.down_proj.weight"]), (layer, e)


MTP_NAMES = {
    "enorm.weight": "mtp.pre_fc_norm_embedding.weight",
    "hnorm.weight": "mtp.pre_fc_norm_hidden.weight",
    "eh_proj.weight": "mtp.fc.weight",
    "final_layernorm.weight": "mtp.norm.weight",
    "transformer_layer.self_attention.linear_proj.weight": "mtp.layers.0.self_attn.o_proj.weight",
    "transformer_layer.self_attention.k_layernorm.weight": "mtp.layers.0.self_attn.k_norm.weight",
    "transformer_layer.pre_mlp_layernorm.weight": "mtp.layers.0.post_attention_layernorm.weight",
    "transformer_layer.mlp.router.weight": "mtp.layers.0.mlp.gate.weight",
    "transformer_layer.mlp.shared_experts.gate_weight": "mtp.layers.0.mlp.shared_expert_gate.weight",
    "transformer_layer.mlp.experts.experts.linear_fc1.weight": "mtp.layers.0.mlp.experts.gate_up_proj",
    "transformer_layer.mlp.experts.experts.linear_fc2.weight": "mtp.layers.0.mlp.experts.down_proj",
}


def test_mtp_layer(gdn_checkpoints: dict, tmp_path: Path):
    """The MTP layer lands in HF `mtp.*` (transformers skips it): names and values as torch's DCP loader reads
    them (its attention and MoE rules are the decoder layers', judged by the parity tests)."""
    out = convert(gdn_checkpoints[MOE], tmp_path / "hf", model_type="qwen3_5_moe", progress=False)
    assert json.loads((out / "config.json").read_text())["mtp_num_hidden_layers"] == 1
    iteration_dir = gdn_checkpoints[MOE] / "iter_0000010"
    metadata = dcp.FileSystemReader(iteration_dir).read_metadata().state_dict_metadata
    megatron = {f"mtp.layers.0.{k}": torch.empty(metadata[f"mtp.layers.0.{k}"].size) for k in MTP_NAMES}
    dcp.load(megatron, checkpoint_id=iteration_dir, no_dist=True)
    hf = load_file(out / "model.safetensors")
    for key, name in MTP_NAMES.items():
        assert torch.equal(hf[name], megatron[f"mtp.layers.0.{key}"]), name
    assert len([n for n in hf if n.startswith("mtp.")]) == 19  # the layer's 15 tensors, fc and 3 norms


def test_vision_language_config_prefixes_the_language_model(gdn_checkpoints: dict, tmp_path: Path):
    """A `Qwen3_5ForConditionalGeneration` config: names under `model.language_model.`, which transformers'
    text model loads (its own prefix change) and runs as Megatron does."""
    text = json.loads((convert(gdn_checkpoints[DENSE], tmp_path / "text", progress=False) / "config.json").read_text())
    vl = {"architectures": ["Qwen3_5ForConditionalGeneration"], "model_type": "qwen3_5", "text_config": text}
    (tmp_path / "config.json").write_text(json.dumps(vl))
    out = convert(gdn_checkpoints[DENSE], tmp_path / "vl", hf_config=tmp_path / "config.json", progress=False)
    with safe_open(out / "model.safetensors", "np") as f:
        names = set(f.keys())
    assert "model.language_model.layers.0.linear_attn.in_proj_qkv.weight" in names
    assert all(n.startswith("model.language_model.") for n in names - {"lm_head.weight"})
    assert_matches_megatron(out, DENSE, gdn_checkpoints[DENSE], atol=ATOL)


def test_config_disagreeing_with_gdn_layers_names_the_tensor(gdn_checkpoints: dict, tmp_path: Path):
    config = json.loads((convert(gdn_checkpoints[DENSE], tmp_path / "hf", progress=False) / "config.json").read_text())
    config["linear_num_value_heads"] = 8
    (tmp_path / "config.json").write_text(json.dumps(config))
    error = convert_fails(gdn_checkpoints[DENSE], tmp_path / "out", "--hf-config", tmp_path / "config.json")
    assert "decoder.layers.0.self_attention.in_proj.weight has 104 rows" in error
    assert "linear_num_value_heads=8" in error


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_zero_centred_norm_plus_one_rounds_like_torch(dtype: torch.dtype):
    """`1 + w` in the stored dtype, as torch rounds `(w.float() + 1).to(dtype)` (bf16 via its uint16 bits)."""
    w = (torch.randn(4096, generator=torch.Generator().manual_seed(0)) * 3).to(dtype)
    carrier = {torch.bfloat16: torch.int16, torch.float16: torch.float16, torch.float32: torch.float32}[dtype]
    array = w.view(carrier).numpy()
    if dtype == torch.bfloat16:
        array = array.view(np.uint16)
    (out,) = PlusOne.of("w", "w").apply(array, None)
    expected = (w.float() + 1).to(dtype).view(carrier).numpy()
    assert out.dtype == array.dtype
    assert np.array_equal(out.view(expected.dtype), expected)


LORA = GdnAdapterSpec(MOE)  # GDN in_proj / out_proj and every routed expert's fc1 / fc2, saved at TP2
IN_PROJ_MODULES = {
    None: ["in_proj_ba", "in_proj_qkvz"],
    "qwen3_5_moe": ["in_proj_a", "in_proj_b", "in_proj_qkv", "in_proj_z"],
}


@pytest.fixture(scope="module")
def gdn_adapter(gdn_checkpoints: dict, megatron_cache: Path) -> Path:
    return build_gdn_adapters([LORA], megatron_cache)[LORA]


@pytest.mark.parametrize("model_type", [None, "qwen3_5_moe"])
def test_gdn_lora_merge_matches_megatron_at_tp2(model_type: str | None, gdn_adapter: Path, tmp_path: Path):
    """in_proj's B (TP-local rows, no split factory) merged into the split pieces, experts per expert or into
    the packed stack: the HF model equals Megatron's TP2 forward with each rank's adapters on its own shards."""
    out = convert(gdn_adapter, tmp_path / "hf", model_type=model_type, progress=False)  # base from run_config
    assert_matches_megatron(out, MOE, gdn_adapter, atol=ATOL)


@pytest.mark.parametrize("model_type", [None, "qwen3_5_moe"])
def test_gdn_lora_export_loads_in_peft(
    model_type: str | None, gdn_adapter: Path, gdn_checkpoints: dict, tmp_path: Path
):
    """The exported adapter (in_proj: A repeated, B split like the weight; experts as ParamWrapper tensors) on
    the converted base: PEFT's merge equals ours, and so do its unmerged logits."""
    base = convert(gdn_checkpoints[MOE], tmp_path / "base", model_type=model_type, progress=False)
    merged = load_clean(convert(gdn_adapter, tmp_path / "merged", model_type=model_type, progress=False))
    peft_dir = export_adapter(gdn_adapter, tmp_path / "peft", hf_config=base / "config.json", progress=False)
    config = json.loads((peft_dir / "adapter_config.json").read_text())
    assert config["target_modules"] == [*IN_PROJ_MODULES[model_type], "out_proj"]
    assert config["target_parameters"] == ["mlp.experts.down_proj", "mlp.experts.gate_up_proj"]
    model = PeftModel.from_pretrained(load_clean(base), peft_dir).eval()
    input_ids, _ = reference_logits(gdn_adapter)
    with torch.no_grad():  # unmerged LoRA rounds differently; the delta rule amplifies it
        assert (model(input_ids).logits - merged(input_ids).logits).abs().max() <= 2 * ATOL
    unloaded, ours = model.merge_and_unload().state_dict(), merged.state_dict()
    assert unloaded.keys() == ours.keys()
    for name, tensor in ours.items():
        assert torch.allclose(unloaded[name], tensor, rtol=0, atol=1e-6), name
