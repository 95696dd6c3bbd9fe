"""Converted checkpoints load cleanly in transformers and reproduce Megatron's own logits."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner
from conftest import PARITY_SPECS
from hf_reference import write_hf_model_dir
from judge import assert_matches_megatron
from safetensors import safe_open
from transformers import GenerationConfig, PreTrainedTokenizerFast

from offline_bridge.commands.cli import main
from tools.megatron_fixtures import FixtureSpec


def run_convert(*args: str) -> None:
    result = CliRunner().invoke(main, ["convert", *args, "--quiet"])
    assert result.exit_code == 0, result.output


@pytest.mark.parametrize("spec", PARITY_SPECS, ids=lambda s: s.name)
def test_derived_config(spec: FixtureSpec, checkpoints: dict, tmp_path: Path) -> None:
    """Without --hf-config the config comes from Megatron's args; the family is inferred."""
    out = tmp_path / "hf"
    run_convert(str(checkpoints[spec]), str(out))
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == spec.family
    assert config["torch_dtype"] == {"fp32": "float32", "bf16": "bfloat16"}[spec.dtype]
    assert ("lm_head.weight" in (out / "model.safetensors").read_bytes()[:20000].decode("latin1")) != spec.tied
    assert_matches_megatron(out, spec, checkpoints[spec])


@pytest.mark.parametrize("spec", PARITY_SPECS, ids=lambda s: s.name)
def test_given_hf_config(spec: FixtureSpec, checkpoints: dict, tmp_path: Path) -> None:
    """With --hf-config DIR the given config is used and the tokenizer and generation config travel along."""
    model_dir = write_hf_model_dir(spec, tmp_path / "reference")
    out = tmp_path / "hf"
    run_convert(str(checkpoints[spec]), str(out), "--hf-config", str(model_dir))
    for side_file in model_dir.iterdir():
        if side_file.name != "config.json":
            assert (out / side_file.name).read_bytes() == side_file.read_bytes(), side_file.name
    assert PreTrainedTokenizerFast.from_pretrained(out)("tok5 tok7")["input_ids"] == [5, 7]
    assert GenerationConfig.from_pretrained(out).max_new_tokens == 7
    assert_matches_megatron(out, spec, checkpoints[spec])


def test_hf_config_file_and_dtype_cast(checkpoints: dict, tmp_path: Path) -> None:
    """A bare config.json works too; --dtype bf16 casts an fp32 checkpoint and says so in the config."""
    spec = PARITY_SPECS[0]
    model_dir = write_hf_model_dir(spec, tmp_path / "reference")
    out = tmp_path / "hf"
    run_convert(str(checkpoints[spec]), str(out), "--hf-config", str(model_dir / "config.json"), "--dtype", "bf16")
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "bfloat16"
    assert not (out / "tokenizer.json").exists()
    assert_matches_megatron(out, spec, checkpoints[spec], atol=0.1)  # bf16 rounding of fp32 weights


@pytest.mark.parametrize("per_layer", [False, True])
def test_both_key_layouts_are_exercised(per_layer: bool, checkpoints: dict) -> None:
    """Megatron wrote stacked `decoder.layers.<sub>` keys for one fixture and per-layer keys for another."""
    from megatron.core.dist_checkpointing import load_tensors_metadata

    spec = next(s for s in PARITY_SPECS if s.per_layer_keys == per_layer)
    keys = load_tensors_metadata(str(checkpoints[spec] / "iter_0000010")).keys()
    assert ("decoder.layers.3.self_attention.linear_qkv.weight" in keys) == per_layer
    assert ("decoder.layers.self_attention.linear_qkv.weight" in keys) != per_layer


def test_mistral_is_llama_under_another_name(checkpoints: dict, tmp_path: Path) -> None:
    """--model-type mistral writes MistralForCausalLM, which reproduces the same Megatron logits."""
    spec = PARITY_SPECS[1]  # llama, TP2 PP2
    out = tmp_path / "hf"
    run_convert(str(checkpoints[spec]), str(out), "--model-type", "mistral")
    assert json.loads((out / "config.json").read_text())["architectures"] == ["MistralForCausalLM"]
    assert_matches_megatron(out, spec, checkpoints[spec])


def test_vocab_size_option_trims_further(checkpoints: dict, tmp_path: Path) -> None:
    spec = next(s for s in PARITY_SPECS if s.vocab_size == 250)
    out = tmp_path / "hf"
    run_convert(str(checkpoints[spec]), str(out), "--vocab-size", "200")
    assert json.loads((out / "config.json").read_text())["vocab_size"] == 200
    with safe_open(out / "model.safetensors", "np") as f:
        assert f.get_slice("model.embed_tokens.weight").get_shape() == [200, spec.hidden_size]
        assert f.get_slice("lm_head.weight").get_shape() == [200, spec.hidden_size]


def test_core_019_common_state_inside_dcp(checkpoints: dict) -> None:
    """Megatron-core 0.19 keeps the args in the `common_state` object, with no common.pt."""
    spec = next(s for s in PARITY_SPECS if s.common_in_dcp)
    iteration_dir = checkpoints[spec] / "iter_0000010"
    assert not (iteration_dir / "common.pt").exists()
    assert "common_state/shard_0_1" in (iteration_dir / ".metadata").read_bytes().decode("latin1")
