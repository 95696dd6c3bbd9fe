"""The family registry: adding a family is its definition plus one `register` call; detection picks the most
specific match and refuses ties; tables are checked when registered; the generated table is current."""

from __future__ import annotations

import argparse
from dataclasses import dataclass, replace
from typing import Any

import pytest
from megatron_keys import BF16, VP, H, MetadataReader, V

from offline_bridge.config.hf_config import derive_config, dims_of
from offline_bridge.errors import CheckpointError, OptionError
from offline_bridge.families import FAMILIES, Family
from offline_bridge.families.decoder import Decoder
from offline_bridge.families.registry import Registry
from offline_bridge.families.tables import TableError
from offline_bridge.plan.planner import build_plan
from offline_bridge.plan.rules import Copy, GatedMLP, VocabRows, moe_layer
from tools.family_table import TARGET, render


@dataclass(frozen=True)
class LayerNormDecoder(Decoder):
    """A decoder whose HF class runs LayerNorm: its check and its config fields differ from RMSNorm's."""

    norm: str = "LayerNorm"

    def fields(self, args: argparse.Namespace) -> dict[str, Any]:
        return {"hidden_act": "gelu", "layer_norm_epsilon": float(args.norm_epsilon)}


# A throw-away architecture, defined only here: an embedding, one MLP per layer, a final norm.
TOY = Family(
    name="toy",
    architecture="ToyForCausalLM",
    model_type="toy",
    head=(VocabRows.of("embedding.word_embeddings.weight", "model.embed_tokens.weight"),),
    layer=(
        GatedMLP.of(
            "decoder.layers.{i}.mlp.linear_fc1.weight", "model.layers.{i}.gate.weight", "model.layers.{i}.up.weight"
        ),
        Copy.of("decoder.layers.{i}.mlp.linear_fc2.weight", "model.layers.{i}.down.weight"),
    ),
    tail=(Copy.of("decoder.final_layernorm.weight", "model.norm.weight"),),
    detect=lambda args: bool(getattr(args, "toy_feature", False)),
    priority=100,
    decoder=LayerNormDecoder(),
)


def registry_with(*extra: Family) -> Registry:
    registry = Registry()
    for family in (*FAMILIES.values(), *extra):
        registry.register(family)
    return registry


def test_a_family_defined_elsewhere_registers_detects_and_plans() -> None:
    registry = registry_with(TOY)
    args = argparse.Namespace(toy_feature=True, qk_layernorm=True, normalization="LayerNorm", norm_epsilon=1e-6)
    assert registry.for_args(args) is TOY and registry.for_config({"model_type": "toy"}) is TOY
    config = {"model_type": "toy", "hidden_size": H, "num_attention_heads": 2, "num_hidden_layers": 2, "vocab_size": V}
    keys = {
        "embedding.word_embeddings.weight": (VP, H),
        "decoder.layers.mlp.linear_fc1.weight": (2, 12, H),
        "decoder.layers.mlp.linear_fc2.weight": (2, H, 6),
        "decoder.final_layernorm.weight": (H,),
    }
    plan = build_plan(TOY, MetadataReader(keys), dims_of(config, TOY), BF16, 10**12)
    names = {t.name: t.shape for t in plan.targets()}
    assert names["model.embed_tokens.weight"] == (V, H) and names["model.layers.1.up.weight"] == (6, H)
    assert len(names) == 2 + 2 * 3


def test_config_hooks_are_the_familys() -> None:
    args = argparse.Namespace(
        normalization="LayerNorm", norm_epsilon=1e-6, num_attention_heads=2, hidden_size=H, ffn_hidden_size=6,
        num_layers=2, seq_length=32, vocab_size=V,
    )  # fmt: skip
    config = derive_config(args, TOY, vocab_size=None)
    assert config["hidden_act"] == "gelu" and config["layer_norm_epsilon"] == 1e-6 and "rms_norm_eps" not in config
    with pytest.raises(CheckpointError, match=r"normalization=LayerNorm \(need RMSNorm\)"):
        derive_config(args, FAMILIES["llama"], vocab_size=None)
    with pytest.raises(CheckpointError, match=r"normalization=RMSNorm \(need LayerNorm\)"):
        derive_config(argparse.Namespace(**{**vars(args), "normalization": "RMSNorm"}), TOY, vocab_size=None)


INFERRED = {
    "llama": {},
    "qwen2": {"add_qkv_bias": True},
    "qwen3": {"qk_layernorm": True},
    "mixtral": {"num_experts": 4},
    "qwen3_moe": {"num_experts": 4, "qk_layernorm": True},
    "deepseek_v3": {"num_experts": 4, "qk_layernorm": True, "multi_latent_attention": True},
    "qwen3_5": {"experimental_attention_variant": "gated_delta_net", "qk_layernorm": True},
    "qwen3_next": {"experimental_attention_variant": "gated_delta_net", "qk_layernorm": True, "num_experts": 4},
}


@pytest.mark.parametrize("name", sorted(INFERRED))
def test_the_most_specific_family_wins(name: str) -> None:
    assert registry_with().for_args(argparse.Namespace(**INFERRED[name])).name == name


def test_equally_specific_matches_are_refused() -> None:
    with pytest.raises(OptionError, match="matches qwen2 and qwen3 equally"):
        registry_with().for_args(argparse.Namespace(add_qkv_bias=True, qk_layernorm=True))


LLAMA = FAMILIES["llama"]
ROUTER = Copy.of("decoder.layers.{i}.mlp.router.weight", "model.layers.{i}.mlp.gate.weight")


@pytest.mark.parametrize(
    ("family", "problem"),
    [
        (replace(TOY, layer=(Copy.of("decoder.layers.0.x", "model.layers.0.x"),)), r"layer rule without \['i'\]"),
        (replace(TOY, head=(Copy.of("embedding.{i}.w", "model.embed.{i}.w"),)), r"placeholders \['i'\] in a head rule"),
        (replace(TOY, mtp=(Copy.of("mtp.layers.0.w", "model.layers.{i}.w"),)), "mtp rule whose Megatron names lack"),
        (replace(TOY, layer=(Copy.of("decoder.layers.{i}.w", "model.layers.{i}.{e}.w"),)), "{e} in HF names but not"),
        (replace(TOY, layer=(*TOY.layer, replace(ROUTER, sources=("decoder.layers.{i}.x",)), ROUTER)), "written by 2"),
        (replace(TOY, layer=(ROUTER, replace(ROUTER, when=moe_layer))), "written by 2 rules"),
        (replace(TOY, name="toy2"), "already registered by toy"),
        (replace(LLAMA, name="llama2"), "already registered by llama"),
    ],
)
def test_inconsistent_tables_are_refused_at_registration(family: Family, problem: str) -> None:
    with pytest.raises(TableError, match=problem):
        registry_with(TOY, family)


def test_generated_family_table_is_current() -> None:
    assert TARGET.read_text() == render(), "run python tools/family_table.py"
