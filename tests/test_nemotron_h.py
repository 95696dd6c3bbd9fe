"""Nemotron-H / Nemotron 3 (megatron-core's hybrid MambaModel): megatron-core builds and runs it on CPU (reference
Mamba kernels, tools/mamba_fixtures.py), transformers' NemotronHForCausalLM judges the converted output against
Megatron's forward."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest
import torch
from judge import assert_matches_megatron, assert_same_output, convert_fails, load_clean
from peft import PeftModel

from offline_bridge import convert
from offline_bridge.commands.export_adapter import export_adapter
from offline_bridge.config.hf_config import derive_config, dims_of
from offline_bridge.errors import CheckpointError
from offline_bridge.families import family_by_name, family_for_args
from tools.mamba_fixtures import MambaSpec, build_mamba_fixtures, make_args
from tools.mamba_lora_fixtures import TARGETS, MambaAdapterSpec, build_mamba_adapters
from tools.megatron_fixtures import legacy_root, reference_logits

TP1 = MambaSpec(legacy_twin=True)  # M * - M E: Mamba, attention, MLP, Mamba, MoE with latent projections
TP2 = MambaSpec(tp=2)
TP2_AT_TP1 = MambaSpec(weights_tp=2)  # TP2's weights, re-saved by Megatron at TP1
DENSE = MambaSpec(pattern="M-M*-", tp=2)  # Nemotron-H: no MoE block
BF16 = MambaSpec(tp=2, dtype="bf16")
LEGACY_TP2 = MambaSpec(tp=2, legacy_twin=True)  # TP2's weights, also as --ckpt-format torch
SPECS = [TP1, TP2, TP2_AT_TP1, DENSE, BF16, LEGACY_TP2]
LORA = MambaAdapterSpec(TP2)  # Mamba in_proj / out_proj, attention, MLP: saved at TP2
PEFT_LORA = MambaAdapterSpec(TP2, targets=tuple(t for t in TARGETS if t != "out_proj"))  # what PEFT accepts
ATOL = 1e-4  # measured ~1e-6: the scan's recurrence (Megatron) against its chunked form (transformers)


@pytest.fixture(scope="module")
def mamba_checkpoints(megatron_cache: Path) -> dict[MambaSpec, Path]:
    return build_mamba_fixtures(SPECS, megatron_cache)


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.name)
def test_nemotron_h_parity(spec: MambaSpec, mamba_checkpoints: dict, tmp_path: Path):
    out = convert(mamba_checkpoints[spec], tmp_path / "hf", progress=False)  # family inferred from the args
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["NemotronHForCausalLM"]
    blocks = {"M": "linear_attention", "*": "full_attention", "-": "mlp", "E": "moe"}
    assert config["layers_block_type"] == [blocks[symbol] for symbol in spec.pattern]
    assert (config["mamba_num_heads"], config["n_groups"], config.get("moe_latent_size")) == (
        8,
        2,
        32 if spec.has_moe else None,
    )
    assert_matches_megatron(out, spec, mamba_checkpoints[spec], atol=ATOL)


def test_tp1_and_tp2_give_the_same_files(mamba_checkpoints: dict, tmp_path: Path):
    """in_proj / conv1d pieces are saved over all head groups: any TP gives the same HF tensors, byte for byte."""
    one = convert(mamba_checkpoints[TP2_AT_TP1], tmp_path / "tp1", progress=False)
    two = convert(mamba_checkpoints[TP2], tmp_path / "tp2", progress=False)
    assert_same_output(one, two)


def test_config_disagreeing_with_mamba_layers_names_the_tensor(mamba_checkpoints: dict, tmp_path: Path):
    config = json.loads((convert(mamba_checkpoints[TP1], tmp_path / "hf", progress=False) / "config.json").read_text())
    config["ssm_state_size"] = 8
    (tmp_path / "config.json").write_text(json.dumps(config))
    error = convert_fails(mamba_checkpoints[TP1], tmp_path / "out", "--hf-config", tmp_path / "config.json")
    assert "decoder.layers.0.mixer.in_proj.weight has 328 rows" in error and "ssm_state_size need 296" in error


@pytest.mark.parametrize("spec", [TP1, LEGACY_TP2], ids=lambda s: s.name)
def test_legacy_save(spec: MambaSpec, mamba_checkpoints: dict, tmp_path: Path):
    """`--ckpt-format torch` keeps in_proj and conv1d fused (at TP2 in TP-local blocks, regrouped by the args' TP)
    and the local norm names (`norm`, `input_layernorm`, `pre_mlp_layernorm`): the same model."""
    out = convert(legacy_root(mamba_checkpoints[spec]), tmp_path / "hf", progress=False)
    assert_matches_megatron(out, spec, mamba_checkpoints[spec], atol=ATOL)
    if spec is LEGACY_TP2:  # the torch_dist save of the same weights gives the same bytes
        assert_same_output(out, convert(mamba_checkpoints[TP2], tmp_path / "dist", progress=False))


def _args(**changes: object) -> argparse.Namespace:
    args = make_args(TP1, 1, "/nowhere")
    vars(args).update(changes)
    return args


def test_args_are_detected_and_derive_the_config():
    assert family_for_args(_args()).name == "nemotron_h"
    config = derive_config(_args(), family_by_name("nemotron_h"), vocab_size=None)
    assert config["mlp_hidden_act"] == "relu2" and config["routed_scaling_factor"] == 2.0
    assert (config["ssm_state_size"], config["mamba_head_dim"], config["n_routed_experts"]) == (16, 16, 4)


@pytest.mark.parametrize(
    ("changes", "said"),
    [
        ({"mtp_num_layers": 1}, "mtp_num_layers=1"),
        ({"hybrid_override_pattern": "M*-M"}, "hybrid_override_pattern='M*-M'"),
        ({"swiglu": True}, "squared ReLU"),
        ({"position_embedding_type": "rope"}, "position_embedding_type=rope"),
        ({"moe_router_score_function": "softmax"}, "moe_router_score_function=softmax"),
        ({"moe_shared_expert_intermediate_size": None}, "moe_shared_expert_intermediate_size=None"),
    ],
)
def test_args_the_family_cannot_express_are_refused(changes: dict, said: str):
    with pytest.raises(CheckpointError, match=said.replace("*", r"\*")):
        derive_config(_args(**changes), family_by_name("nemotron_h"), vocab_size=None)


@pytest.fixture(scope="module")
def mamba_adapters(mamba_checkpoints: dict, megatron_cache: Path) -> dict[MambaAdapterSpec, Path]:
    return build_mamba_adapters([LORA, PEFT_LORA], megatron_cache)


def test_lora_merge_matches_megatron_at_tp2(mamba_adapters: dict, tmp_path: Path):
    """in_proj's B (TP-local `[z; x; B; C; dt]` blocks, no split factory) and the other targets merged: the HF
    model equals Megatron's TP2 forward with each rank's adapters on its own shards."""
    out = convert(mamba_adapters[LORA], tmp_path / "hf", progress=False)  # base from run_config.yaml
    assert_matches_megatron(out, TP2, mamba_adapters[LORA], atol=ATOL)


def test_lora_export_loads_in_peft(mamba_adapters: dict, mamba_checkpoints: dict, tmp_path: Path):
    """The exported adapter on the converted base (experts as ParamWrapper tensors of `mixer.experts.up_proj` /
    `down_proj`): PEFT's merge equals ours, and so do its unmerged logits."""
    base = convert(mamba_checkpoints[TP2], tmp_path / "base", progress=False)
    merged = load_clean(convert(mamba_adapters[PEFT_LORA], tmp_path / "merged", progress=False))
    peft_dir = export_adapter(
        mamba_adapters[PEFT_LORA], tmp_path / "peft", hf_config=base / "config.json", progress=False
    )
    config = json.loads((peft_dir / "adapter_config.json").read_text())
    assert config["target_modules"] == ["in_proj", "k_proj", "o_proj", "q_proj", "v_proj"]
    # the MLP of a MoE model by parameter, the experts as ParamWrapper tensors of the fused parameters
    assert config["target_parameters"] == [
        "mixer.down_proj.weight",
        "mixer.experts.down_proj",
        "mixer.experts.up_proj",
        "mixer.up_proj.weight",
    ]
    model = PeftModel.from_pretrained(load_clean(base), peft_dir).eval()
    input_ids, _ = reference_logits(mamba_adapters[PEFT_LORA])
    with torch.no_grad():
        assert (model(input_ids).logits - merged(input_ids).logits).abs().max() <= ATOL
    unloaded, ours = model.merge_and_unload().state_dict(), merged.state_dict()
    assert unloaded.keys() == ours.keys()
    for name, tensor in ours.items():
        assert torch.allclose(unloaded[name], tensor, rtol=0, atol=1e-6), name


def test_lora_export_refuses_mamba_out_proj(mamba_adapters: dict, tmp_path: Path):
    """PEFT refuses LoRA on a Mamba mixer's out_proj: export says so and points to `convert`."""
    with pytest.raises(CheckpointError, match=r"mixer\.out_proj.*PEFT refuses LoRA on .*out_proj of nemotron_h"):
        export_adapter(mamba_adapters[LORA], tmp_path / "peft", progress=False)


def test_older_configs_give_the_same_dimensions():
    """transformers 4.x NemotronH configs name the pattern `hybrid_override_pattern` (and some Mamba fields
    `mamba_n_groups`, `mamba_d_conv`); 5.x writes `layers_block_type`: both plan the same layers."""
    family = family_by_name("nemotron_h")
    new = derive_config(_args(), family, vocab_size=None)
    old = {k: v for k, v in new.items() if k not in ("layers_block_type", "num_hidden_layers", "n_groups")}
    old.update(hybrid_override_pattern=TP1.pattern, mamba_n_groups=new["n_groups"])
    assert dims_of(old, family) == dims_of(new, family)
    assert dims_of(old, family).moe_layers == frozenset({4})
    assert dims_of(old, family).config["n_groups"] == 2
