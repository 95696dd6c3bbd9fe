"""`export-adapter`: real PEFT loads the exported adapter onto the converted base and matches `convert --adapter`."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from click.testing import CliRunner
from conftest import CANONICAL_SPECS, DORA_SPEC, LORA_SPECS, MLA_LORA_SPECS, MOE_LORA_SPECS, SHARED_OUTER_SPEC
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from offline_bridge import convert
from offline_bridge.commands.cli import main
from tools.megatron_fixtures import reference_logits

SPEC = LORA_SPECS[0]


@pytest.fixture(scope="session")
def exported(adapters: dict, checkpoints: dict, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The converted base, the merged model, and the adapter exported with the base checkpoint out of reach."""
    adapter = adapters[SPEC]
    tmp = tmp_path_factory.mktemp("export")
    base = convert(checkpoints[SPEC.base], tmp / "base", progress=False)
    merged = convert(adapter, tmp / "merged", progress=False)
    lonely = Path(shutil.copytree(adapter, tmp / "adapter-only"))
    run_config = next(lonely.glob("iter_*/run_config.yaml"))
    data = yaml.safe_load(run_config.read_text())
    data["checkpoint"]["pretrained_checkpoint"] = str(tmp / "no-such-base")
    run_config.write_text(yaml.safe_dump(data))
    result = CliRunner().invoke(
        main,
        [
            "export-adapter",
            str(lonely),
            str(tmp / "peft"),
            "-q",
            "--hf-config",
            str(base / "config.json"),
            "--base-model-name-or-path",
            "base",
        ],
    )
    assert result.exit_code == 0, result.output
    return {"base": base, "merged": merged, "peft": tmp / "peft", "adapter": adapter}


def assert_same_weights(unloaded: torch.nn.Module, merged: torch.nn.Module) -> None:
    """PEFT's merge_and_unload gives the tensors `convert --adapter` wrote, within fp32 rounding."""
    ours = merged.state_dict()
    theirs = unloaded.state_dict()
    assert theirs.keys() == ours.keys()
    for name, tensor in ours.items():
        torch.testing.assert_close(theirs[name], tensor, rtol=1e-6, atol=1e-6, msg=name)


def test_adapter_files(exported: dict[str, Path]) -> None:
    config = json.loads((exported["peft"] / "adapter_config.json").read_text())
    assert (config["peft_type"], config["r"], config["lora_alpha"]) == ("LORA", SPEC.dim, SPEC.alpha)
    assert config["target_modules"] == ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"]
    assert config["base_model_name_or_path"] == "base"
    keys = load_file(exported["peft"] / "adapter_model.safetensors").keys()
    assert "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight" in keys
    assert len(keys) == 2 * 7 * SPEC.base.num_layers


def test_peft_logits_equal_the_merged_model(exported: dict[str, Path]) -> None:
    model = AutoModelForCausalLM.from_pretrained(exported["base"], dtype=torch.float32)
    peft_model = PeftModel.from_pretrained(model, exported["peft"]).eval()
    merged = AutoModelForCausalLM.from_pretrained(exported["merged"], dtype=torch.float32).eval()
    input_ids, _ = reference_logits(exported["adapter"])
    with torch.no_grad():
        diff = (peft_model(input_ids).logits - merged(input_ids).logits).abs().max().item()
    assert diff <= 1e-5

    unloaded = peft_model.merge_and_unload().state_dict()
    for name, tensor in load_file(exported["merged"] / "model.safetensors").items():
        torch.testing.assert_close(unloaded[name], tensor, rtol=1e-6, atol=1e-6, msg=name)


def export_round(
    spec, adapters: dict, checkpoints: dict, tmp_path: Path, *options: str
) -> tuple[Path, Path, Path, dict]:
    """Convert the base, merge the adapter with `convert`, export it with `export-adapter ... *options`.

    Returns (base, merged, adapter, adapter_config)."""
    adapter = adapters[spec]
    base = convert(checkpoints[spec.base], tmp_path / "base", progress=False)
    merged = convert(adapter, tmp_path / "merged", progress=False)
    result = CliRunner().invoke(main, ["export-adapter", str(adapter), str(tmp_path / "peft"), "-q", *options])
    assert result.exit_code == 0, result.output
    return base, merged, adapter, json.loads((tmp_path / "peft" / "adapter_config.json").read_text())


def assert_peft_reproduces(base: Path, peft_dir: Path, merged: Path, adapter: Path) -> None:
    """Real PEFT on the converted base gives the logits and, merged and unloaded, the tensors of `convert`."""
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    peft_model = PeftModel.from_pretrained(model, peft_dir).eval()
    reference = AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float32).eval()
    input_ids, _ = reference_logits(adapter)
    with torch.no_grad():
        diff = (peft_model(input_ids).logits - reference(input_ids).logits).abs().max().item()
    assert diff <= 1e-5
    assert_same_weights(peft_model.merge_and_unload(), reference)


@pytest.mark.parametrize("expert_format", ["paramwrapper", "per-expert"])
@pytest.mark.parametrize(
    "spec", [*MOE_LORA_SPECS[:2], SHARED_OUTER_SPEC], ids=["shared", "per_expert", "shared_outer_and_router"]
)
def test_expert_adapters_in_peft(spec, expert_format: str, adapters: dict, checkpoints: dict, tmp_path: Path) -> None:
    """Qwen3-MoE expert adapters (and a router LoRA onto `mlp.gate.weight`, a ParamWrapper target): PEFT on
    the converted base reproduces `convert --adapter` in both expert formats."""
    base, merged, adapter, config = export_round(
        spec, adapters, checkpoints, tmp_path, "--expert-format", expert_format
    )
    keys = load_file(tmp_path / "peft" / "adapter_model.safetensors").keys()
    router = ["mlp.gate.weight"] if "router" in spec.targets else []
    if expert_format == "paramwrapper":
        assert config["target_parameters"] == ["mlp.experts.down_proj", "mlp.experts.gate_up_proj", *router]
        assert "base_model.model.model.layers.0.mlp.experts.base_layer.lora_A.weight" in keys
    else:
        assert config["target_parameters"] == (router or None)
        assert "base_model.model.model.layers.0.mlp.experts.3.up_proj.lora_B.weight" in keys
    assert_peft_reproduces(base, tmp_path / "peft", merged, adapter)


@pytest.mark.parametrize(
    ("spec", "expert_format"),
    [(MLA_LORA_SPECS[0], "paramwrapper"), (MLA_LORA_SPECS[0], "per-expert"), (MLA_LORA_SPECS[1], "paramwrapper")],
    ids=["q_lora", "q_lora_per_expert", "no_q_lora"],
)
def test_deepseek_v3_in_peft(spec, expert_format: str, adapters: dict, checkpoints: dict, tmp_path: Path) -> None:
    """DeepSeek-V3 with Bridge's default targets: MLA projections are nn.Linear (target_modules); the router (no
    nn.Linear) and the dense and shared-expert MLPs (whose names PEFT would re-aim at the fused experts) are
    ParamWrapper parameters; routed experts in either expert format."""
    base, merged, adapter, config = export_round(
        spec, adapters, checkpoints, tmp_path, "--expert-format", expert_format
    )
    q = ["q_a_proj", "q_b_proj"] if spec.base.q_lora_rank else ["q_proj"]
    mlp = [f"mlp.{kind}{m}.weight" for kind in ("", "shared_experts.") for m in ("down_proj", "gate_proj", "up_proj")]
    attention = [*q, "kv_a_proj_with_mqa", "kv_b_proj", "o_proj"]
    if expert_format == "paramwrapper":
        assert config["target_modules"] == sorted(attention)
        assert config["target_parameters"] == sorted(
            ["mlp.gate.weight", *mlp, "mlp.experts.down_proj", "mlp.experts.gate_up_proj"]
        )
    else:  # per-expert gate_proj / up_proj / down_proj: PEFT's own conversion takes them to the fused experts
        assert config["target_modules"] == sorted([*attention, "down_proj", "gate_proj", "up_proj"])
        assert config["target_parameters"] == sorted(["mlp.gate.weight", *mlp])
    keys = load_file(tmp_path / "peft" / "adapter_model.safetensors").keys()
    assert "base_model.model.model.layers.1.mlp.gate.lora_B.weight" in keys
    assert "base_model.model.model.layers.1.mlp.shared_experts.up_proj.lora_A.weight" in keys
    assert "base_model.model.model.layers.0.mlp.down_proj.lora_B.weight" in keys
    assert_peft_reproduces(base, tmp_path / "peft", merged, adapter)


@pytest.mark.parametrize("spec", [*CANONICAL_SPECS, DORA_SPEC], ids=lambda s: s.name)
def test_canonical_lora_and_dora_in_peft(spec, adapters: dict, checkpoints: dict, tmp_path: Path) -> None:
    base, merged, adapter, _ = export_round(spec, adapters, checkpoints, tmp_path)
    assert_peft_reproduces(base, tmp_path / "peft", merged, adapter)


def test_normalized_expert_ranks(adapters: dict, checkpoints: dict, tmp_path: Path) -> None:
    """normalize_moe_lora: expert ranks dim // topk (fc1 rounded up to expert TP) go to rank_pattern and PEFT
    scales them by alpha / that rank, as Bridge does; the per-expert (v4) layout cannot carry them."""
    spec = MOE_LORA_SPECS[3]
    base, merged, adapter, config = export_round(spec, adapters, checkpoints, tmp_path)
    assert config["r"] == spec.dim
    assert config["rank_pattern"] == {
        r"mlp\.experts\.gate_up_proj": spec.effective_dim("linear_fc1"),
        r"mlp\.experts\.down_proj": spec.effective_dim("linear_fc2"),
    }
    assert_peft_reproduces(base, tmp_path / "peft", merged, adapter)

    result = CliRunner().invoke(
        main, ["export-adapter", str(adapter), str(tmp_path / "v4"), "-q", "--expert-format", "per-expert"]
    )
    assert result.exit_code == 2 and "rank_pattern" in result.stderr, result.output
    assert not (tmp_path / "v4").exists()
