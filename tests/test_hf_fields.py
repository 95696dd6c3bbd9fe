"""HF config fields are read through one alias table: a config.json written by transformers 4.x and one written
by 5.x for the same model give the same plan."""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from pathlib import Path

import pytest
import transformers

from offline_bridge.commands.planning import describe, plan_conversion
from offline_bridge.config.hf_fields import hf_value, normalized
from offline_bridge.dtypes import by_option
from offline_bridge.errors import OptionError
from offline_bridge.readers.base import CheckpointReader, TensorInfo

ROOT = Path(__file__).resolve().parents[1]
SIZES = {"layers": 2, "hidden": 64, "heads": 8, "groups": 2, "head_dim": 8, "experts": 4, "ffn": 32, "vocab": 256}


class MetadataOnly(CheckpointReader):
    """A checkpoint's tensor list without data: planning must not read a byte."""

    format = "metadata-only"

    def __init__(self, shapes: Mapping[str, tuple[int, ...]]) -> None:
        self.path = Path("metadata-only")
        self._tensors = {k: TensorInfo(k, s, by_option("bf16")) for k, s in shapes.items()}

    @property
    def tensors(self) -> Mapping[str, TensorInfo]:
        return self._tensors

    def read(self, key: str, box: object = None) -> object:
        raise AssertionError(f"planning read {key}")


def moe_checkpoint(qk_norms: bool) -> MetadataOnly:
    """Megatron keys of a small MoE model, every layer MoE."""
    h, d, e, f = SIZES["hidden"], SIZES["head_dim"], SIZES["experts"], SIZES["ffn"]
    shapes = {"embedding.word_embeddings.weight": (SIZES["vocab"], h)}
    for i in range(SIZES["layers"]):
        layer = f"decoder.layers.{i}."
        shapes |= {
            layer + "self_attention.linear_qkv.weight": ((SIZES["heads"] + 2 * SIZES["groups"]) * d, h),
            layer + "self_attention.linear_qkv.layer_norm_weight": (h,),
            layer + "self_attention.linear_proj.weight": (h, SIZES["heads"] * d),
            layer + "mlp.router.weight": (e, h),
            layer + "pre_mlp_layernorm.weight": (h,),
        }
        if qk_norms:
            shapes |= {
                layer + "self_attention.q_layernorm.weight": (d,),
                layer + "self_attention.k_layernorm.weight": (d,),
            }
        for expert in range(e):
            shapes |= {
                layer + f"mlp.experts.{expert}.linear_fc1.weight": (2 * f, h),
                layer + f"mlp.experts.{expert}.linear_fc2.weight": (h, f),
            }
    return MetadataOnly(shapes | {"decoder.final_layernorm.weight": (h,), "output_layer.weight": (SIZES["vocab"], h)})


COMMON = {
    "hidden_size": SIZES["hidden"],
    "num_hidden_layers": SIZES["layers"],
    "num_attention_heads": SIZES["heads"],
    "num_key_value_heads": SIZES["groups"],
    "head_dim": SIZES["head_dim"],
    "vocab_size": SIZES["vocab"],
    "num_experts_per_tok": 2,
    "max_position_embeddings": 64,
    "tie_word_embeddings": False,
}

# As transformers 4.x wrote them: rope_theta and rope_scaling at the top, torch_dtype, Qwen3-MoE's num_experts.
V4 = {
    "qwen3_moe": {
        **COMMON,
        "architectures": ["Qwen3MoeForCausalLM"],
        "model_type": "qwen3_moe",
        "num_experts": SIZES["experts"],
        "moe_intermediate_size": SIZES["ffn"],
        "intermediate_size": 96,
        "decoder_sparse_step": 1,
        "mlp_only_layers": [],
        "rope_theta": 10000.0,
        "rope_scaling": None,
        "torch_dtype": "bfloat16",
        "transformers_version": "4.51.3",
    },
    "mixtral": {
        **COMMON,
        "architectures": ["MixtralForCausalLM"],
        "model_type": "mixtral",
        "num_local_experts": SIZES["experts"],
        "intermediate_size": SIZES["ffn"],
        "rope_theta": 10000.0,
        "torch_dtype": "bfloat16",
        "transformers_version": "4.46.0",
    },
}


def v5(name: str) -> dict:
    """The same model's config as the installed transformers 5.x saves it."""
    v4 = {
        k: v
        for k, v in V4[name].items()
        if k not in ("rope_theta", "rope_scaling", "torch_dtype", "transformers_version")
    }
    if name == "qwen3_moe":
        v4["num_experts"] = v4.pop("num_experts")  # the 5.x class takes it under its old name (attribute_map)
    config = transformers.CONFIG_MAPPING[name](**v4, dtype="bfloat16").to_dict()
    assert transformers.__version__.startswith("5.")
    return config


@pytest.mark.parametrize("name", ["qwen3_moe", "mixtral"])
def test_configs_of_transformers_4_and_5_give_the_same_plan(name: str, tmp_path: Path) -> None:
    reader = moe_checkpoint(qk_norms=name == "qwen3_moe")
    new = v5(name)
    if name == "qwen3_moe":  # the renames this test is about
        assert "num_local_experts" in new and "num_experts" not in new
    assert "rope_parameters" in new and "rope_theta" not in new and "torch_dtype" not in new
    plans, families = [], []
    for style, config in (("4", V4[name]), ("5", new)):
        (tmp_path / f"{style}.json").write_text(json.dumps(config))
        conversion = plan_conversion(reader, None, hf_config=tmp_path / f"{style}.json")
        plans.append(conversion.plan)
        families.append(conversion.family)
    assert families[0] == families[1]
    assert describe(plans[0], families[0]) == describe(plans[1], families[1])
    assert plans[0].dims == plans[1].dims and plans[0].dims.num_experts == SIZES["experts"]
    assert plans[0].dims.moe_layers == frozenset(range(SIZES["layers"]))


def test_aliases() -> None:
    assert hf_value({"num_local_experts": 8}, "num_experts") == 8
    assert hf_value({"n_routed_experts": 8}, "num_local_experts") == 8  # any name of the field
    assert hf_value({"rope_parameters": {"rope_theta": 1e6, "rope_type": "default"}}, "rope_theta") == 1e6
    assert hf_value({"rope_theta": 1e6, "rope_parameters": {"rope_theta": 1000000}}, "rope_theta") == 1e6
    assert hf_value({"torch_dtype": "bfloat16"}, "dtype") == "bfloat16"
    assert hf_value({"mtp_num_hidden_layers": 1}, "num_nextn_predict_layers") == 1
    assert hf_value({"num_experts": None}, "num_experts", 0) == 0
    assert hf_value({"layer_types": ["attention", "linear_attention"]}, "layer_types") == [
        "full_attention",
        "linear_attention",
    ]
    with pytest.raises(KeyError):
        hf_value({}, "hidden_size")
    with pytest.raises(OptionError, match="num_experts=8, num_local_experts=4"):
        hf_value({"num_experts": 8, "num_local_experts": 4}, "num_experts")


def test_normalized_view_fills_every_plain_name() -> None:
    view = normalized({"num_local_experts": 4, "rope_scaling": {"type": "yarn"}, "hidden_size": 8})
    assert view["num_experts"] == view["n_routed_experts"] == view["num_local_experts"] == 4
    assert view["rope_parameters"] == {"type": "yarn"} and view["hidden_size"] == 8


def test_no_config_field_read_by_its_raw_name() -> None:
    """Every read of an HF config field goes through hf_value (writes are left alone)."""
    read = re.compile(r"""\b(?:c|config|dims\.config)(?:\[["'][A-Za-z_]+["']\](?!\s*=[^=])|\.get\()""")
    sources = [
        *sorted((ROOT / "offline_bridge" / "families").glob("*.py")),
        ROOT / "offline_bridge" / "config" / "hf_config.py",
    ]
    found = [f"{p.name}: {line.strip()}" for p in sources for line in p.read_text().splitlines() if read.search(line)]
    assert not found, found
