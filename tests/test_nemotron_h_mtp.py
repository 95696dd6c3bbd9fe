"""MTP of hybrid models: the committed megatron-core 0.19 `HybridModel` vector (tests/data/hybrid_mtp, pattern
`M*-E/*E`) converts without --hf-config; transformers' NemotronHForCausalLM loads it cleanly (it drops `mtp.*`
by design) and its logits equal Megatron's recorded forward; the MTP tensors land under Megatron-Bridge's flat
names `mtp.layers.{depth · L + inner}` with the checkpoint's values."""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

import pytest
import torch
from judge import load_clean
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from offline_bridge import convert
from offline_bridge.config.hf_config import dims_of
from offline_bridge.errors import CheckpointError
from offline_bridge.families import family_by_name
from offline_bridge.readers import open_reader

DATA = Path(__file__).parent / "data" / "hybrid_mtp"
CKPT = DATA / "ckpt"
ATOL = 1e-4  # the scan's recurrence (Megatron's substitute kernel) against transformers' chunked form
NEMOTRON_H = family_by_name("nemotron_h")
EXPERTS = 4


@pytest.fixture(scope="module")
def converted(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return convert(CKPT, tmp_path_factory.mktemp("mtp") / "hf", progress=False)


def _hf_tensors(out: Path) -> dict[str, torch.Tensor]:
    tensors = {}
    for path in out.glob("*.safetensors"):
        with safe_open(path, "pt") as f:
            tensors.update({k: f.get_tensor(k) for k in f.keys()})
    return tensors


def test_config_and_logits_match_megatron(converted: Path):
    config = json.loads((converted / "config.json").read_text())
    assert config["layers_block_type"] == ["linear_attention", "full_attention", "mlp", "moe"]
    assert (config["num_nextn_predict_layers"], config["mtp_layers_block_type"]) == (1, ["full_attention", "moe"])
    model = load_clean(converted)  # NemotronH ignores `mtp.*` on load: no module for them, nothing reported
    reference = load_file(DATA / "megatron_logits.safetensors")
    with torch.no_grad():
        logits = model(reference["input_ids"]).logits
    assert logits.shape == reference["logits"].shape
    err = (logits - reference["logits"]).abs().max().item()
    assert err <= ATOL, f"max |logits - megatron| = {err:.3g}"


def _bridge_name(key: str, inner_layers: int) -> list[str]:
    """Megatron-Bridge 0.6's nemotron_h names for one Megatron MTP key (written out here, apart from our table)."""
    nested = re.fullmatch(r"mtp\.layers\.(\d+)\.mtp_model_layer\.layers\.(\d+)\.(.+)", key)
    if nested is None:
        depth, name = re.fullmatch(r"mtp\.layers\.(\d+)\.(.+)", key).groups()
        inner = inner_layers - 1 if name == "final_layernorm.weight" else 0
        return [f"mtp.layers.{int(depth) * inner_layers + inner}.{name}"]
    depth, inner, name = nested.groups()
    prefix = f"mtp.layers.{int(depth) * inner_layers + int(inner)}."
    renames = {
        "self_attention.linear_qkv.layer_norm_weight": ["norm.weight"],
        "pre_mlp_layernorm.weight": ["norm.weight"],
        "self_attention.linear_qkv.weight": [f"mixer.{p}_proj.weight" for p in "qkv"],
        "self_attention.linear_proj.weight": ["mixer.o_proj.weight"],
        "mlp.router.weight": ["mixer.gate.weight"],
        "mlp.router.expert_bias": ["mixer.gate.e_score_correction_bias"],
        "mlp.experts.experts.linear_fc1.weight": [f"mixer.experts.{e}.up_proj.weight" for e in range(EXPERTS)],
        "mlp.experts.experts.linear_fc2.weight": [f"mixer.experts.{e}.down_proj.weight" for e in range(EXPERTS)],
    }
    plain = re.sub(r"^mlp\.(shared_experts\.)linear_fc1", r"mixer.\1up_proj", name)
    plain = re.sub(r"^mlp\.(shared_experts\.)linear_fc2", r"mixer.\1down_proj", plain)
    plain = re.sub(r"^mlp\.(fc[12]_latent_proj)", r"mixer.\1", plain)
    return [prefix + n for n in renames.get(name, [plain])]


def test_mtp_tensors_are_bridges_names_with_the_checkpoints_values(converted: Path):
    hf = _hf_tensors(converted)
    config = json.loads((converted / "config.json").read_text())
    heads, groups = config["num_attention_heads"], config["num_key_value_heads"]
    with open_reader(CKPT / "iter_0000010") as reader:
        megatron = {k: torch.from_numpy(reader.read(k).copy()) for k in reader.tensors if k.startswith("mtp.")}
    expected = {name: key for key in megatron for name in _bridge_name(key, inner_layers=2)}
    assert sorted(k for k in hf if k.startswith("mtp.")) == sorted(expected)
    for name, key in expected.items():
        source = megatron[key]
        if "experts.experts" in key:
            source = source[int(name.split(".experts.")[1].split(".")[0])]
        if "linear_qkv.weight" in key:  # per query group [its q heads; k; v]
            part, per_group = "qkv".index(name.split(".mixer.")[1][0]), heads // groups
            source = source.view(groups, per_group + 2, -1, source.shape[1]).split([per_group, 1, 1], dim=1)[part]
        assert torch.equal(hf[name], source.reshape(hf[name].shape)), name


def _args(**changes) -> argparse.Namespace:
    """The vector's pattern args (Megatron-LM 0.19), changed."""
    base = dict(
        num_layers=4,
        hidden_size=32,
        num_attention_heads=4,
        hybrid_layer_pattern="M*-E/*E",
        hybrid_override_pattern=None,
        mtp_num_layers=1,
    )
    return argparse.Namespace(**{**base, **changes})


def test_legacy_mtp_pattern_arg_gives_the_same_config():
    """Megatron-LM before 0.19: main pattern in `hybrid_override_pattern`, one depth's in `mtp_hybrid_override_pattern`."""
    from offline_bridge.families.mamba import mtp_block_types

    legacy = _args(
        hybrid_layer_pattern=None, hybrid_override_pattern="M*-E", mtp_hybrid_override_pattern="*E", mtp_num_layers=2
    )
    assert mtp_block_types(legacy) == (["full_attention", "moe"], 2)
    assert mtp_block_types(_args(hybrid_layer_pattern="M*|-E/*E/*E", mtp_num_layers=2)) == (
        ["full_attention", "moe"],
        2,
    )


@pytest.mark.parametrize(
    "changes",
    [
        {"hybrid_layer_pattern": "M*-E/*E/*-", "mtp_num_layers": 2},  # depths differ
        {"hybrid_layer_pattern": "M*-E/*E", "mtp_num_layers": 2},  # too few depths
        {"hybrid_layer_pattern": "M*-E", "mtp_num_layers": 1},  # no MTP pattern
        {"hybrid_layer_pattern": "M*-E/*G", "mtp_num_layers": 1},  # a block NemotronH has not
    ],
)
def test_bad_mtp_patterns_are_refused(changes: dict):
    from offline_bridge.families.mamba import mtp_block_types

    with pytest.raises(CheckpointError, match="hybrid_layer_pattern"):
        mtp_block_types(_args(**changes))


def test_flat_mtp_layers_from_an_hf_config(converted: Path):
    """An HF config alone (--hf-config) gives the MTP layers: two depths of `*E` are flat layers 4..7."""
    config = {**json.loads((converted / "config.json").read_text()), "num_nextn_predict_layers": 2}
    dims = dims_of(config, NEMOTRON_H)
    assert (dims.num_layers, dims.num_mtp_layers) == (4, 4)
    assert dims.moe_layers == {3, 5, 7}
    legacy = {k: v for k, v in config.items() if k != "mtp_layers_block_type"} | {"mtp_hybrid_override_pattern": "*-"}
    assert dims_of(legacy, NEMOTRON_H).moe_layers == {3}


def _rms(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight


def test_mtp_layers_replayed_from_the_output_give_megatrons_mtp_logits(converted: Path, tmp_path: Path):
    """Megatron's MTP depth, rebuilt from our `mtp.layers.*`: the inner layers as a NemotronH model of their own
    (`final_layernorm` its final norm, the shared `lm_head`), fed `eh_proj([enorm(emb(next ids)); hnorm(h)])`."""
    config = json.loads((converted / "config.json").read_text())
    hf = _hf_tensors(converted)
    inner = {"backbone.embeddings.weight": hf["backbone.embeddings.weight"], "lm_head.weight": hf["lm_head.weight"]}
    inner["backbone.norm_f.weight"] = hf["mtp.layers.1.final_layernorm.weight"]
    own = ("eh_proj.weight", "enorm.weight", "hnorm.weight", "final_layernorm.weight")
    inner |= {
        k.replace("mtp.", "backbone.", 1): v for k, v in hf.items() if k.startswith("mtp.") and not k.endswith(own)
    }
    (tmp_path / "inner").mkdir()
    save_file(inner, tmp_path / "inner" / "model.safetensors")
    mtp_config = {**config, "layers_block_type": config["mtp_layers_block_type"], "num_nextn_predict_layers": 0}
    (tmp_path / "inner" / "config.json").write_text(json.dumps(mtp_config))
    main, depth = load_clean(converted), load_clean(tmp_path / "inner")

    reference = load_file(DATA / "megatron_logits.safetensors")
    ids, eps = reference["input_ids"], config["layer_norm_epsilon"]
    next_ids = torch.roll(ids, -1, dims=-1)
    next_ids[:, -1] = 0  # Megatron's roll_tensor pads with zeros
    with torch.no_grad():
        hidden = main.model(ids).last_hidden_state  # after the final norm, as HybridStack hands it to MTP
        joined = torch.cat(
            (
                _rms(main.model.embeddings(next_ids), hf["mtp.layers.0.enorm.weight"], eps),
                _rms(hidden, hf["mtp.layers.0.hnorm.weight"], eps),
            ),
            dim=-1,
        )
        logits = depth(inputs_embeds=joined @ hf["mtp.layers.0.eh_proj.weight"].T).logits
    err = (logits - reference["mtp_logits"]).abs().max().item()
    assert err <= ATOL, f"max |MTP logits - megatron| = {err:.3g}"
