"""GPT-OSS with a Megatron-Bridge LoRA on attention and experts: `convert --adapter` reproduces Megatron's forward
of the merged model, and `export-adapter` writes experts as PEFT ParamWrapper tensors on the transposed,
gate / up interleaved `gate_up_proj` / `down_proj` that real PEFT reproduces."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from judge import assert_matches_megatron
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from offline_bridge import convert
from offline_bridge.commands.cli import main
from tools.gpt_oss_fixtures import GptOssSpec, build_gpt_oss
from tools.gpt_oss_lora_fixtures import build_gpt_oss_adapters
from tools.lora_fixtures import AdapterSpec
from tools.megatron_fixtures import reference_logits

BASE = GptOssSpec(tp=2, ep=2)
# per-expert adapters (distinct per expert) and one on the router, at the base's layout; experts are never
# tensor-parallel here
TARGETS = ("linear_qkv", "linear_proj", "linear_fc1", "linear_fc2", "router")
ADAPTER = AdapterSpec(BASE.base, tp=2, ep=2, etp=1, expert_layout="per_expert", targets=TARGETS)
# Bridge >= 0.6's default: one expert adapter per EP rank, copied into its local slots; saved at TP1 EP1
SHARED = AdapterSpec(BASE.base, tp=1, ep=1, etp=1, seed=11)


@pytest.fixture(scope="module")
def saves(megatron_cache: Path) -> dict[AdapterSpec, tuple[Path, Path]]:
    base_root = build_gpt_oss([BASE], megatron_cache)[BASE]
    roots = build_gpt_oss_adapters([ADAPTER, SHARED], BASE, base_root, megatron_cache)
    return {spec: (base_root, root) for spec, root in roots.items()}


@pytest.fixture(scope="module")
def merged(saves: dict, tmp_path_factory: pytest.TempPathFactory) -> Path:
    base_root, adapter_root = saves[ADAPTER]
    return convert(base_root, tmp_path_factory.mktemp("merged") / "hf", adapter=adapter_root, progress=False)


def test_merge_matches_megatron(saves: dict, merged: Path, tmp_path: Path) -> None:
    assert_matches_megatron(merged, BASE.base, saves[ADAPTER][1])
    base_root, shared_root = saves[SHARED]
    assert_matches_megatron(
        convert(base_root, tmp_path / "shared", adapter=shared_root, progress=False), BASE.base, shared_root
    )


def test_exported_adapter_in_peft(saves: dict, merged: Path, tmp_path: Path) -> None:
    base_root, adapter_root = saves[ADAPTER]
    base = convert(base_root, tmp_path / "base", progress=False)
    args = ["export-adapter", str(adapter_root), str(tmp_path / "peft"), "-q", "--hf-config", str(base)]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    config = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    # the router's weight is a bare parameter (no nn.Linear): a ParamWrapper target as well
    assert config["target_parameters"] == ["mlp.experts.down_proj", "mlp.experts.gate_up_proj", "mlp.router.weight"]
    assert set(config["target_modules"]) == {"q_proj", "k_proj", "v_proj", "o_proj"}
    keys = load_file(tmp_path / "peft" / "adapter_model.safetensors")
    experts, rank, hidden = BASE.base.num_experts, ADAPTER.dim, BASE.base.hidden_size
    inner = "base_model.model.model.layers.0.mlp.experts.base_layer."  # gate_up_proj: in H, out 2I
    assert keys[inner + "lora_A.weight"].shape == (experts * rank, hidden)
    assert keys[inner + "lora_B.weight"].shape == (2 * BASE.base.moe_ffn_hidden_size, rank * experts)

    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    peft_model = PeftModel.from_pretrained(model, tmp_path / "peft").eval()
    reference = AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float32).eval()
    input_ids, _ = reference_logits(adapter_root)
    with torch.no_grad():
        diff = (peft_model(input_ids).logits - reference(input_ids).logits).abs().max().item()
    assert diff <= 1e-5
    unloaded = peft_model.merge_and_unload().state_dict()
    for name, tensor in reference.state_dict().items():
        torch.testing.assert_close(unloaded[name], tensor, rtol=1e-6, atol=1e-6, msg=name)
