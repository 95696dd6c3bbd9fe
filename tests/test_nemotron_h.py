"""Nemotron-H / Nemotron 3 (megatron-core's hybrid MambaModel): megatron-core builds and runs it on CPU (reference
Mamba kernels, tools/mamba_fixtures.py), transformers' NemotronHForCausalLM judges the converted output against
Megatron's forward."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest
from judge import assert_matches_megatron, assert_same_output, convert_fails

from offline_bridge import convert
from offline_bridge.config.hf_config import derive_config
from offline_bridge.errors import CheckpointError
from offline_bridge.families import family_by_name, family_for_args
from tools.mamba_fixtures import MambaSpec, build_mamba_fixtures, make_args

TP1, TP2 = MambaSpec(), MambaSpec(tp=2)  # M * - M E: Mamba, attention, MLP, Mamba, MoE with latent projections
TP2_AT_TP1 = MambaSpec(weights_tp=2)  # TP2's weights, re-saved by Megatron at TP1
SPECS = [TP1, TP2, TP2_AT_TP1]
ATOL = 1e-4  # measured ~1e-6: the scan's recurrence (Megatron) against its chunked form (transformers)


@pytest.fixture(scope="module")
def mamba_checkpoints(megatron_cache: Path) -> dict[MambaSpec, Path]:
    return build_mamba_fixtures(SPECS, megatron_cache)


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.name)
def test_nemotron_h_parity(spec: MambaSpec, mamba_checkpoints: dict, tmp_path: Path):
    out = convert(mamba_checkpoints[spec], tmp_path / "hf", progress=False)  # family inferred from the args
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["NemotronHForCausalLM"]
    assert config["layers_block_type"] == ["linear_attention", "full_attention", "mlp", "linear_attention", "moe"]
    assert (config["mamba_num_heads"], config["n_groups"], config["moe_latent_size"]) == (8, 2, 32)
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
    ],
)
def test_args_the_family_cannot_express_are_refused(changes: dict, said: str):
    with pytest.raises(CheckpointError, match=said.replace("*", r"\*")):
        derive_config(_args(**changes), family_by_name("nemotron_h"), vocab_size=None)
