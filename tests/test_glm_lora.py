"""LoRA on GLM-4.5 (`glm4_moe`): a Megatron-Bridge adapter on q/k/v (with their biases in the base), the output
projection, the router and linear_fc1 / linear_fc2 (the dense layer, the shared experts and the routed experts),
merged against Megatron's forward with the adapter, and exported for real PEFT."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp
from judge import assert_matches_megatron
from safetensors.torch import load_file
from test_export_adapter import assert_peft_reproduces, export_round

from offline_bridge import convert
from tools.lora_fixtures import AdapterSpec, build_adapters
from tools.megatron_fixtures import FixtureSpec

SPEC = AdapterSpec(FixtureSpec("glm4_moe", tp=2, ep=2))  # Bridge's default targets on this base
MTP_LAYER = rf"model\.layers\.{SPEC.base.num_layers}\..*"  # not in transformers' forward; checked by value


@pytest.fixture(scope="module")
def glm_adapters(megatron_cache: Path) -> dict[AdapterSpec, Path]:
    return build_adapters([SPEC], megatron_cache)


@pytest.fixture(scope="module")
def glm_base(glm_adapters: dict, megatron_cache: Path) -> dict[FixtureSpec, Path]:
    return {SPEC.base: megatron_cache / SPEC.base.name / "ckpt"}


def test_glm_lora_merge(glm_adapters: dict, tmp_path: Path) -> None:
    out = convert(glm_adapters[SPEC], tmp_path / "merged", progress=False)
    assert_matches_megatron(out, SPEC.base, glm_adapters[SPEC], extra=MTP_LAYER)


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


@pytest.mark.parametrize("expert_format", ["paramwrapper", "per-expert"])
def test_glm_in_peft(expert_format: str, glm_adapters: dict, glm_base: dict, tmp_path: Path) -> None:
    """q/k/v and o_proj are nn.Linear (target_modules); the router and the dense and shared-expert MLPs are
    ParamWrapper parameters, as on DeepSeek-V3; routed experts in either expert format."""
    base, merged, adapter, config = export_round(
        SPEC, glm_adapters, glm_base, tmp_path, "--expert-format", expert_format
    )
    mlp = [f"mlp.{kind}{m}.weight" for kind in ("", "shared_experts.") for m in ("down_proj", "gate_proj", "up_proj")]
    attention = ["k_proj", "o_proj", "q_proj", "v_proj"]
    if expert_format == "paramwrapper":
        assert config["target_modules"] == attention
        assert config["target_parameters"] == sorted(
            ["mlp.gate.weight", *mlp, "mlp.experts.down_proj", "mlp.experts.gate_up_proj"]
        )
    else:
        assert config["target_modules"] == sorted([*attention, "down_proj", "gate_proj", "up_proj"])
        assert config["target_parameters"] == sorted(["mlp.gate.weight", *mlp])
    keys = load_file(tmp_path / "peft" / "adapter_model.safetensors").keys()
    assert "base_model.model.model.layers.1.self_attn.k_proj.lora_B.weight" in keys
    assert "base_model.model.model.layers.1.mlp.shared_experts.up_proj.lora_A.weight" in keys
    assert_peft_reproduces(base, tmp_path / "peft", merged, adapter)
