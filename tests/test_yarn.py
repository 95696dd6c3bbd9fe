"""YaRN rotary scaling of multi-latent attention (DeepSeek-V3): real megatron-core checkpoints whose conversion
reproduces Megatron's logits in transformers, Megatron-LM's own args mapped, and what HF cannot express refused."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from judge import assert_matches_megatron

from offline_bridge import convert
from offline_bridge.commands.cli import main
from offline_bridge.config.hf_config import derive_config
from offline_bridge.families.deepseek_v3 import FAMILY
from tools.megatron_fixtures import FixtureSpec, Yarn, build_fixtures

# Factor 8 over an original context of 8 positions, which the reference forward (12 tokens) runs past;
# mscale 0.9 and mscale_all_dim 0.7 scale both cos / sin and the softmax.
YARN = FixtureSpec("deepseek_v3", tp=2, ep=2, yarn=Yarn())
# mscale_all_dim 0: transformers would infer another cos / sin factor than Megatron's (attention_factor is
# written); small betas move YaRN's ramp inside the 4 rotary frequencies.
YARN_EDGE = FixtureSpec(
    "deepseek_v3",
    tp=2,
    ep=2,
    yarn=Yarn(
        factor=4, original_max_position_embeddings=16, beta_fast=0.1, beta_slow=0.005, mscale=0.8, mscale_all_dim=0
    ),
)
YARN_SPECS = [YARN, YARN_EDGE]
ABSENT = object()  # an arg the saved args do not have


def _mscale(scale: float, mscale: float) -> float:
    return 0.1 * mscale * math.log(scale) + 1.0


@pytest.fixture(scope="module")
def yarn_checkpoints(megatron_cache: Path) -> dict[FixtureSpec, Path]:
    return build_fixtures(YARN_SPECS, megatron_cache)


@pytest.mark.parametrize("spec", YARN_SPECS, ids=lambda s: s.name)
def test_yarn_parity(spec: FixtureSpec, yarn_checkpoints: dict, tmp_path: Path) -> None:
    out = convert(yarn_checkpoints[spec], tmp_path / "hf", progress=False)
    config = json.loads((out / "config.json").read_text())
    yarn = spec.yarn
    expected = {
        "rope_type": "yarn",
        "rope_theta": float(spec.rotary_base),
        "factor": float(yarn.factor),
        "original_max_position_embeddings": yarn.original_max_position_embeddings,
        "beta_fast": float(yarn.beta_fast),
        "beta_slow": float(yarn.beta_slow),
        "mscale": float(yarn.mscale),
        "mscale_all_dim": float(yarn.mscale_all_dim),
    }
    if not yarn.mscale_all_dim:
        expected["attention_factor"] = _mscale(yarn.factor, yarn.mscale)
    assert config["rope_parameters"] == expected
    assert config["max_position_embeddings"] == 64  # factor × original, as long as Megatron's own
    assert_matches_megatron(out, spec, yarn_checkpoints[spec], extra=rf"model\.layers\.{spec.num_layers}\..*")


def _args(yarn_checkpoints: dict, **changes: object):
    """The YaRN fixture's saved Megatron-LM args, changed (ABSENT deletes an arg)."""
    common = yarn_checkpoints[YARN] / "iter_0000010" / "common.pt"
    args = torch.load(common, weights_only=False)["args"]  # our own fixture: trusted
    for name, value in changes.items():
        if value is ABSENT:
            delattr(args, name)
        else:
            setattr(args, name, value)
    return args


def test_deepseek_v3_command_line_args(yarn_checkpoints: dict) -> None:
    """DeepSeek-V3's Megatron-LM flags (no --rope-type: MLA defaults to YaRN; original length and betas are
    MLATransformerConfig's defaults) give DeepSeek-V3's own HF rope settings."""
    args = _args(
        yarn_checkpoints,
        rope_type=None,
        rotary_scaling_factor=40.0,
        mscale=1.0,
        mscale_all_dim=1.0,
        original_max_position_embeddings=ABSENT,
        beta_fast=ABSENT,
        beta_slow=ABSENT,
    )
    args.max_position_embeddings = args.seq_length = 4096
    config = derive_config(args, FAMILY, vocab_size=None)
    assert config["rope_parameters"] == {
        "rope_type": "yarn",
        "rope_theta": 10000.0,
        "factor": 40.0,
        "original_max_position_embeddings": 4096,
        "beta_fast": 32.0,
        "beta_slow": 1.0,
        "mscale": 1.0,
        "mscale_all_dim": 1.0,
    }
    assert config["max_position_embeddings"] == 163840


def test_yarn_without_scaling_is_plain_rope(yarn_checkpoints: dict) -> None:
    for rope_type in ("yarn", None):  # None: Megatron-LM leaves it to MLATransformerConfig, whose default is yarn
        args = _args(yarn_checkpoints, rope_type=rope_type, rotary_scaling_factor=1.0)
        config = derive_config(args, FAMILY, vocab_size=None)
        assert config["rope_parameters"] == {"rope_type": "default", "rope_theta": 10000.0}
        assert config["max_position_embeddings"] == 64


@pytest.mark.parametrize(
    ("changes", "named"),
    [
        # Megatron scales MLA's softmax by mscale(factor, mscale_all_dim)² even with plain RoPE
        ({"rope_type": "rope", "rotary_scaling_factor": 4.0, "mscale_all_dim": 1.0}, "mscale_all_dim=1.0"),
        # before core 0.14 (no --rope-type) YaRN's original length was max_position_embeddings
        ({"rope_type": ABSENT}, "rotary_scaling_factor=8.0"),
        ({"rotary_scaling_factor": 0.5}, "rotary_scaling_factor=0.5"),
    ],
)
def test_inexpressible_rope_is_refused(changes: dict, named: str, yarn_checkpoints: dict, tmp_path: Path) -> None:
    ckpt = Path(shutil.copytree(yarn_checkpoints[YARN], tmp_path / "ckpt"))
    common = ckpt / "iter_0000010" / "common.pt"
    state = torch.load(common, weights_only=False)
    state["args"] = _args(yarn_checkpoints, **changes)
    torch.save(state, common)
    result = CliRunner().invoke(main, ["convert", str(ckpt), str(tmp_path / "out"), "--quiet"])
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and named in lines[0], result.stderr
    assert not (tmp_path / "out").exists()
