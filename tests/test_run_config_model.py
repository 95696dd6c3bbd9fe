"""Without args, the model comes from Megatron-Bridge's `run_config.yaml` `model:` section: the same family and
the same output as from the args it replaces, the padded vocab trimmed to the tokenizer's size, `_target_`
kept as data, and every value checked by the args schema."""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from click.testing import CliRunner
from conftest import MOE_SPECS, PARITY_SPECS
from judge import convert_fails

from offline_bridge.commands.cli import main
from offline_bridge.config.hf_config import derive_config
from offline_bridge.config.inputs import lora_settings
from offline_bridge.config.provider_args import provider_args
from offline_bridge.config.run_config import load_run_config
from offline_bridge.errors import CheckpointError
from offline_bridge.families import family_for_args

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "tiny-llama"
ITERATION = "iter_0000010"

# Clutter a real dump holds next to the model's fields (Bridge's safe representers: functions, enums,
# partials, HF objects), none of which may be imported or called.
CLUTTER = {
    "attention_backend": {"_args_": [5], "_call_": True, "_target_": "megatron.core.transformer.enums.AttnBackend"},
    "init_method": {"_args_": [], "_partial_": True, "_target_": "torch.nn.init.normal_", "mean": 0.0, "std": 0.02},
    "timers": {"_call_": True, "_target_": "megatron.core.timers.Timers"},
    "generation_config": {
        "_call_": True,
        "_target_": "transformers.generation.configuration_utils.GenerationConfig.from_dict",
        "config_dict": {"bos_token_id": 1},
    },
    "transformer_layer_spec": {"_call_": False, "_target_": "megatron.bridge.models.gpt_provider.default_layer_spec"},
    "recompute_modules": ["core_attn"],
    "mtp_num_layers": None,
    "num_moe_experts": None,
    "moe_layer_freq": 1,
    "should_pad_vocab": False,
}


def provider_dump(args: argparse.Namespace) -> dict[str, Any]:
    """The `model:` section Bridge would write for the model Megatron-LM ``args`` describe (TransformerConfig
    names, as in Bridge's GPTModelProvider)."""
    same = (
        "num_layers hidden_size ffn_hidden_size num_attention_heads kv_channels vocab_size seq_length rotary_base "
        "rotary_percent normalization position_embedding_type add_qkv_bias add_bias_linear qk_layernorm "
        "init_method_std make_vocab_size_divisible_by tensor_model_parallel_size pipeline_model_parallel_size"
    ).split()
    return {
        "_target_": "megatron.bridge.models.gpt_provider.GPTModelProvider",
        **{name: getattr(args, name) for name in same},
        "num_query_groups": args.num_query_groups if args.group_query_attention else None,
        "layernorm_epsilon": args.norm_epsilon,
        "gated_linear_unit": args.swiglu,
        "activation_func": {"_call_": False, "_target_": "torch.nn.functional.silu"},
        "share_embeddings_and_output_weights": not args.untie_embeddings_and_output_weights,
        "layernorm_zero_centered_gamma": False,
        "params_dtype": {"_call_": False, "_target_": "torch.bfloat16"},
        "hf_model_id": "meta-llama/Llama-3.2-1B",
        **CLUTTER,
    }


def example_args() -> argparse.Namespace:
    return torch.load(EXAMPLE / ITERATION / "common.pt", weights_only=False)["args"]


def bridge_save(tmp_path: Path, *, beside: bool = False, **changes: Any) -> Path:
    """The example without common.pt, its model in run_config.yaml (in the iteration dir, or its parent)."""
    root = Path(shutil.copytree(EXAMPLE, tmp_path / "bridge"))
    (root / ITERATION / "common.pt").unlink()
    model = {**provider_dump(example_args()), **changes}
    run_config = {"model": model, "peft": None, "tokenizer": {"tokenizer_type": "HuggingFaceTokenizer"}}
    where = root if beside else root / ITERATION
    (where / "run_config.yaml").write_text(yaml.safe_dump(run_config))
    return root


def convert(*args: str) -> None:
    result = CliRunner().invoke(main, ["convert", *args, "--quiet"])
    assert result.exit_code == 0, result.output


@pytest.mark.parametrize("beside", [False, True], ids=["in-iteration", "in-save-root"])
def test_same_output_as_from_args(tmp_path: Path, beside: bool) -> None:
    convert(str(EXAMPLE), str(tmp_path / "from-args"))
    convert(str(bridge_save(tmp_path, beside=beside)), str(tmp_path / "from-run-config"))
    for name in ("config.json", "model.safetensors"):
        assert (tmp_path / "from-args" / name).read_bytes() == (tmp_path / "from-run-config" / name).read_bytes()


def test_tokenizer_vocab_trims_the_padded_embedding(tmp_path: Path) -> None:
    """Bridge's vocab_size is the tokenizer's; the embedding keeps Megatron's padded rows."""
    root = bridge_save(tmp_path, vocab_size=250)
    result = CliRunner().invoke(main, ["convert", str(root), str(tmp_path / "out"), "--dry-run", "-q"])
    assert result.exit_code == 0, result.output
    assert (
        "model.embed_tokens.weight\tBF16[250, 64]" in result.output and "lm_head.weight\tBF16[250, 64]" in result.output
    )
    line = convert_fails(bridge_save(tmp_path / "big", vocab_size=300), tmp_path / "out2")
    assert "run_config.yaml" in line and "vocab_size=300" in line and "256 rows" in line


def test_inspect_names_the_source(tmp_path: Path) -> None:
    root = bridge_save(tmp_path)
    text = CliRunner().invoke(main, ["inspect", str(root)])
    assert text.exit_code == 0, text.output
    assert "family      llama" in text.output
    assert "config      run_config.yaml model: (" in text.output and "meta-llama/Llama-3.2-1B" in text.output
    report = json.loads(CliRunner().invoke(main, ["inspect", str(root), "--json"]).output)
    assert report["config_source"].startswith("run_config.yaml model: ")
    from_args = json.loads(CliRunner().invoke(main, ["inspect", str(EXAMPLE), "--json"]).output)
    assert from_args["config_source"].startswith("common.pt args ")


@pytest.mark.parametrize(
    ("changes", "named"),
    [
        ({"hidden_size": "64"}, "model.hidden_size must be a positive int"),
        ({"num_layers": 4.0}, "model.num_layers must be a positive int"),
        ({"share_embeddings_and_output_weights": "false"}, "model.share_embeddings_and_output_weights must be a bool"),
        ({"layernorm_epsilon": [1e-6]}, "model.layernorm_epsilon must be a number in (0, 1)"),
        ({"num_moe_experts": -4}, "model.num_moe_experts must be a positive int"),
        ({"tensor_model_parallel_size": {"_target_": "builtins.int"}}, "tensor_model_parallel_size must be"),
        ({"ffn_hidden_size": 128}, "ffn_hidden_size=128, but decoder.layers.mlp.linear_fc2.weight"),
        # a function named by _target_ is data: never imported, and not SiLU, so not a Llama MLP
        ({"activation_func": {"_call_": False, "_target_": "os.system"}}, "swiglu=False"),
        ({"seq_len_interpolation_factor": 4.0}, "rotary_seq_len_interpolation_factor=4.0"),
        ({"scale_factor": 32.0, "old_context_len": 8192}, "use_rope_scaling=True"),  # Llama31ModelProvider
    ],
)
def test_bad_model_section(tmp_path: Path, changes: dict, named: str) -> None:
    line = convert_fails(bridge_save(tmp_path, **changes), tmp_path / "out")
    assert "run_config.yaml" in line or "not supported" in line
    assert named in line, line


def test_yaml_that_would_build_objects_is_refused(tmp_path: Path) -> None:
    root = bridge_save(tmp_path)
    marker = tmp_path / "pwned"
    file = root / ITERATION / "run_config.yaml"
    file.write_text(f"model: !!python/object/apply:os.system ['touch {marker}']\n")
    assert "not a plain YAML document" in convert_fails(root, tmp_path / "out")
    file.write_text("model: " + "[" * 100_000 + "]" * 100_000 + "\n")
    assert "run_config.yaml" in convert_fails(root, tmp_path / "out")
    assert not marker.exists()


@pytest.mark.parametrize("model", [None, {"tensor_model_parallel_size": 2, "pipeline_model_parallel_size": 1}])
def test_no_config_anywhere(tmp_path: Path, model: dict | None) -> None:
    """No args, and no model: section (or one with only the parallel sizes, not a provider dump)."""
    root = bridge_save(tmp_path)
    (root / ITERATION / "run_config.yaml").write_text(yaml.safe_dump({"peft": None, "model": model}))
    line = convert_fails(root, tmp_path / "out")
    assert "no run_config.yaml with a model: section" in line and "--hf-config" in line


def _moe_args(**extra: Any) -> argparse.Namespace:
    """Megatron-LM args of a small MoE model (as tools/megatron_fixtures writes them)."""
    args = dict(
        num_layers=2,
        hidden_size=64,
        ffn_hidden_size=96,
        num_attention_heads=8,
        num_query_groups=2,
        group_query_attention=True,
        kv_channels=8,
        seq_length=64,
        max_position_embeddings=64,
        vocab_size=256,
        normalization="RMSNorm",
        norm_epsilon=1e-6,
        swiglu=True,
        add_qkv_bias=False,
        add_bias_linear=False,
        untie_embeddings_and_output_weights=True,
        position_embedding_type="rope",
        rotary_base=10000,
        rotary_percent=1.0,
        init_method_std=0.02,
        num_experts=4,
        moe_ffn_hidden_size=32,
        moe_router_topk=2,
        moe_layer_freq=[0, 1],
        moe_router_score_function="softmax",
        moe_router_pre_softmax=False,
        moe_aux_loss_coeff=0.0,
    )
    return argparse.Namespace(**{**args, **extra})


def _plain(value: Any) -> bool:
    """A value YAML's safe dumper writes as is (Bridge writes other objects as `_target_` mappings)."""
    if isinstance(value, (list, tuple)):
        return all(_plain(v) for v in value)
    return value is None or isinstance(value, (bool, int, float, str))


def _as_provider(args: argparse.Namespace) -> dict[str, Any]:
    """The provider fields of a model Megatron-LM ``args`` describe, each under its TransformerConfig name."""
    renamed = {
        "num_experts": "num_moe_experts",
        "norm_epsilon": "layernorm_epsilon",
        "swiglu": "gated_linear_unit",
        "untie_embeddings_and_output_weights": "share_embeddings_and_output_weights",
    }
    dropped = ("group_query_attention", "max_position_embeddings", "apply_layernorm_1p", "padded_vocab_size")
    model = {renamed.get(k, k): v for k, v in vars(args).items() if k not in dropped and _plain(v)}
    model["share_embeddings_and_output_weights"] = not args.untie_embeddings_and_output_weights
    model["layernorm_zero_centered_gamma"] = bool(getattr(args, "apply_layernorm_1p", False))
    model["activation_func"] = {"_call_": False, "_target_": "torch.nn.functional.silu"}
    return model


FIXTURES = [
    next(s for s in PARITY_SPECS if s.tied),
    next(s for s in MOE_SPECS if s.family == "qwen3_moe" and s.moe_layer_freq != 1),  # a dense layer
    next(s for s in MOE_SPECS if s.family == "mixtral"),
    next(s for s in MOE_SPECS if s.family == "deepseek_v3"),  # MLA, shared experts, MTP
]


@pytest.mark.parametrize("spec", FIXTURES, ids=lambda s: s.name)
def test_megatron_fixture_with_run_config_instead_of_args(spec: Any, checkpoints: dict, tmp_path: Path) -> None:
    """A megatron-core save whose args are replaced by the provider fields Bridge would write converts to
    the same files."""
    root = Path(shutil.copytree(checkpoints[spec], tmp_path / "bridge"))
    iteration = next(root.glob("iter_*"))
    args = torch.load(iteration / "common.pt", weights_only=False)["args"]  # our own fixture
    (iteration / "common.pt").unlink()
    (iteration / "run_config.yaml").write_text(yaml.safe_dump({"model": _as_provider(args)}))
    convert(str(checkpoints[spec]), str(tmp_path / "from-args"))
    convert(str(root), str(tmp_path / "from-run-config"))
    for name in ("config.json", "model.safetensors"):
        assert (tmp_path / "from-args" / name).read_bytes() == (tmp_path / "from-run-config" / name).read_bytes()


@pytest.mark.parametrize(
    ("family", "extra"),
    [
        ("qwen3_moe", {"qk_layernorm": True}),
        ("mixtral", {"moe_layer_freq": 1}),
        (
            "deepseek_v3",
            {
                "multi_latent_attention": True,
                "q_lora_rank": 16,
                "kv_lora_rank": 16,
                "qk_head_dim": 8,
                "qk_pos_emb_head_dim": 4,
                "v_head_dim": 8,
                "moe_router_score_function": "sigmoid",
                "moe_router_enable_expert_bias": True,
                "moe_shared_expert_intermediate_size": 32,
                "rope_type": "rope",
                "rotary_scaling_factor": 1.0,
                "mscale": 1.0,
                "mscale_all_dim": 1.0,
                "mtp_num_layers": 1,
            },
        ),
        (
            "qwen3_next",
            {
                "qk_layernorm": True,
                "attention_output_gate": True,
                "experimental_attention_variant": "gated_delta_net",
                "linear_attention_freq": 2,
                "linear_conv_kernel_dim": 4,
                "linear_key_head_dim": 8,
                "linear_value_head_dim": 8,
                "linear_num_key_heads": 2,
                "linear_num_value_heads": 4,
                "moe_shared_expert_intermediate_size": 32,
                "moe_shared_expert_gate": True,
                "layernorm_zero_centered_gamma": True,
                "rotary_percent": 0.25,
            },
        ),
    ],
)
def test_provider_gives_the_family_and_config_args_give(family: str, extra: dict) -> None:
    args = _moe_args(**extra)
    if family == "qwen3_next":
        args.apply_layernorm_1p = True  # Megatron-LM's flag for layernorm_zero_centered_gamma
    from_provider = provider_args(_as_provider(args), "run_config.yaml")
    assert family_for_args(args).name == family_for_args(from_provider).name == family
    found = family_for_args(from_provider)
    assert derive_config(from_provider, found, vocab_size=None) == derive_config(args, found, vocab_size=None)


@pytest.mark.parametrize(
    ("peft", "named"), [({"alpha": "16", "dim": 8}, "peft.alpha"), ({"alpha": 16, "dim": 0}, "peft.dim")]
)
def test_peft_values_are_checked(tmp_path: Path, peft: dict, named: str) -> None:
    (tmp_path / "run_config.yaml").write_text(yaml.safe_dump({"peft": peft}))
    with pytest.raises(CheckpointError, match=rf"run_config.yaml: {named} must be"):
        lora_settings(load_run_config(tmp_path), None, None, tmp_path)
    assert lora_settings(load_run_config(tmp_path), 2.0, 4, tmp_path).dim == 4  # the command line wins
