"""LoRA on GLM-4.5 (`glm4_moe`) and GLM-4.7-Flash (`glm4_moe_lite`): Megatron-Bridge adapters with its default
targets (GLM-4.5: q/k/v, with their biases in the base, and the output projection; GLM-4.7-Flash: every MLA
projection; both: the router and linear_fc1 / linear_fc2 on the dense layer, the shared experts and the routed
experts), merged against Megatron's forward with the adapter, and exported for real PEFT."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp
from click.testing import CliRunner
from judge import assert_matches_megatron
from safetensors.torch import load_file
from test_export_adapter import assert_peft_reproduces

from offline_bridge import convert
from offline_bridge.commands.cli import main
from tools.lora_fixtures import AdapterSpec, build_adapters
from tools.megatron_fixtures import FixtureSpec

SPEC = AdapterSpec(FixtureSpec("glm4_moe", tp=2, ep=2))  # Bridge's default targets on this base
LITE = AdapterSpec(FixtureSpec("glm4_moe_lite", tp=2, ep=2))  # its args are DeepSeek-V3's: --model-type
MTP_LAYER = rf"model\.layers\.{SPEC.base.num_layers}\..*"  # not in transformers' forward; checked by value


@pytest.fixture(scope="module")
def glm_adapters(megatron_cache: Path) -> dict[AdapterSpec, Path]:
    return build_adapters([SPEC, LITE], megatron_cache)


@pytest.fixture(scope="module")
def glm_base(glm_adapters: dict, megatron_cache: Path) -> dict[FixtureSpec, Path]:
    return {spec.base: megatron_cache / spec.base.name / "ckpt" for spec in (SPEC, LITE)}


@pytest.mark.parametrize("spec", [SPEC, LITE], ids=lambda s: s.base.family)
def test_glm_lora_merge(spec: AdapterSpec, glm_adapters: dict, tmp_path: Path) -> None:
    model_type = "glm4_moe_lite" if spec is LITE else None  # GLM-4.5 is inferred from the base's args
    out = convert(glm_adapters[spec], tmp_path / "merged", model_type=model_type, progress=False)
    assert_matches_megatron(out, spec.base, glm_adapters[spec], extra=MTP_LAYER)


def _dcp(iteration_dir: Path) -> dict[str, torch.Tensor]:
    metadata = dcp.FileSystemReader(iteration_dir).read_metadata().state_dict_metadata
    tensors = {k: torch.empty(m.size, dtype=m.properties.dtype) for k, m in metadata.items() if hasattr(m, "size")}
    dcp.load(tensors, checkpoint_id=iteration_dir, no_dist=True)
    return tensors


# Megatron module of the MTP layer -> its HF tensors under model.layers.{num_layers}. (fc1: gate, up halves)
MTP_MODULES = {
    "self_attention.linear_proj": ("self_attn.o_proj.weight",),
    "mlp.router": ("mlp.gate.weight",),
    "mlp.shared_experts.linear_fc1": ("mlp.shared_experts.gate_proj.weight", "mlp.shared_experts.up_proj.weight"),
    "mlp.shared_experts.linear_fc2": ("mlp.shared_experts.down_proj.weight",),
}


def test_glm_mtp_layer_is_w_plus_sba(glm_adapters: dict, glm_base: dict, tmp_path: Path) -> None:
    """The MTP layer's merged tensors equal W + s·B@A from torch's own reading of both checkpoints."""
    out = convert(glm_adapters[SPEC], tmp_path / "merged", progress=False)
    hf = load_file(out / "model.safetensors")
    lora = _dcp(next(glm_adapters[SPEC].glob("iter_*")))
    base = _dcp(glm_base[SPEC.base] / "iter_0000010")
    prefix = "mtp.layers.0.transformer_layer."
    for module, names in MTP_MODULES.items():
        a, b = (lora[f"{prefix}{module}.adapter.linear_{side}.weight"] for side in ("in", "out"))
        merged = base[f"{prefix}{module}.weight"] + SPEC.scale * (b @ a)
        for name, part in zip(names, merged.chunk(len(names))):
            assert torch.equal(hf[f"model.layers.{SPEC.base.num_layers}.{name}"], part), name


def _export_round(spec: AdapterSpec, adapters: dict, bases: dict, tmp_path: Path, *options: str) -> dict:
    """Convert the base, merge the adapter, export it (`export-adapter ... *options`); PEFT must reproduce the
    merge. Returns the adapter_config.json."""
    model_type = spec.base.family
    base = convert(bases[spec.base], tmp_path / "base", model_type=model_type, progress=False)
    merged = convert(adapters[spec], tmp_path / "merged", model_type=model_type, progress=False)
    command = ["export-adapter", str(adapters[spec]), str(tmp_path / "peft"), "-q", "--model-type", model_type]
    result = CliRunner().invoke(main, [*command, *options])
    assert result.exit_code == 0, result.output
    assert_peft_reproduces(base, tmp_path / "peft", merged, adapters[spec])
    return json.loads((tmp_path / "peft" / "adapter_config.json").read_text())


# HF modules PEFT wraps as nn.Linear (target_modules), per base
ATTENTION = {
    "glm4_moe": ["k_proj", "o_proj", "q_proj", "v_proj"],
    "glm4_moe_lite": ["kv_a_proj_with_mqa", "kv_b_proj", "o_proj", "q_a_proj", "q_b_proj"],
}


@pytest.mark.parametrize("expert_format", ["paramwrapper", "per-expert"])
@pytest.mark.parametrize("spec", [SPEC, LITE], ids=lambda s: s.base.family)
def test_glm_in_peft(spec: AdapterSpec, expert_format: str, glm_adapters: dict, glm_base: dict, tmp_path: Path):
    """The attention projections are nn.Linear (target_modules); the router and the dense and shared-expert
    MLPs are ParamWrapper parameters, as on DeepSeek-V3; routed experts in either expert format."""
    config = _export_round(spec, glm_adapters, glm_base, tmp_path, "--expert-format", expert_format)
    mlp = [f"mlp.{kind}{m}.weight" for kind in ("", "shared_experts.") for m in ("down_proj", "gate_proj", "up_proj")]
    attention = ATTENTION[spec.base.family]
    if expert_format == "paramwrapper":
        assert config["target_modules"] == attention
        assert config["target_parameters"] == sorted(
            ["mlp.gate.weight", *mlp, "mlp.experts.down_proj", "mlp.experts.gate_up_proj"]
        )
    else:
        assert config["target_modules"] == sorted([*attention, "down_proj", "gate_proj", "up_proj"])
        assert config["target_parameters"] == sorted(["mlp.gate.weight", *mlp])
    keys = load_file(tmp_path / "peft" / "adapter_model.safetensors").keys()
    assert f"base_model.model.model.layers.1.self_attn.{attention[0]}.lora_B.weight" in keys
    assert "base_model.model.model.layers.1.mlp.shared_experts.up_proj.lora_A.weight" in keys
