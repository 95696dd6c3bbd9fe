"""ModelOpt quantizer state: amax in HF names by the fan-out rules, and the FP8 (compressed-tensors) export.

Peers: PyTorch DCP reads the Megatron-side amax; transformers loads the converted weights (the amax of a
max-calibrated weight quantizer is the max |w| of what it covers) and the FP8 model.
"""

from __future__ import annotations

import json
import re
from importlib.metadata import version
from pathlib import Path

import pytest
import torch
from conftest import BASE_SPEC
from judge import convert_fails, load_clean
from safetensors.torch import load_file

from offline_bridge import convert
from offline_bridge.transform.quant import AMAX_FILE, CONFIG_FILE
from tools.megatron_fixtures import FixtureSpec, legacy_root
from tools.quant_fixtures import CALIBRATION_BATCH, CALIBRATION_SEQ, QuantSpec, build_quant_fixtures

DENSE = QuantSpec(FixtureSpec("qwen3", tp=2, dtype="bf16", legacy_twin=True), weight_axis=0)  # real ModelOpt
MOE = QuantSpec(FixtureSpec("qwen3_moe", tp=2, ep=2), source="grouped")  # one quantizer per EP rank
# Megatron linear -> the HF modules of its weight (experts: under mlp.experts.{e}.)
HF_MODULES = {
    "self_attention.linear_qkv": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    "self_attention.linear_proj": ("self_attn.o_proj",),
    "mlp.linear_fc1": ("mlp.gate_proj", "mlp.up_proj"),
    "mlp.linear_fc2": ("mlp.down_proj",),
}
# FP8 tolerance (formats/quant.md): logits of FP8 weights and static FP8 inputs against the bf16 conversion,
# cosine similarity per token (median) and over the whole batch
FP8_TOKEN_COSINE, FP8_COSINE = 0.98, 0.95


@pytest.fixture(scope="module")
def quant_checkpoints(megatron_cache: Path) -> dict[QuantSpec, Path]:
    return build_quant_fixtures([DENSE, MOE], megatron_cache)


def megatron_amax(root: Path) -> dict[str, torch.Tensor]:
    """Every `*_quantizer._amax` of the save, read by PyTorch's own DCP loader (single process)."""
    import torch.distributed.checkpoint as dcp

    iter_dir = next(root.glob("iter_*"))
    reader = dcp.FileSystemReader(iter_dir)
    metadata = reader.read_metadata().state_dict_metadata
    state = {k: torch.empty(v.size, dtype=v.properties.dtype) for k, v in metadata.items() if "_quantizer._amax" in k}
    dcp.load(state, storage_reader=reader, no_dist=True)
    return state


def convert_with_amax(root: Path, tmp_path: Path) -> tuple[Path, dict[str, torch.Tensor]]:
    out = tmp_path / "hf"
    convert(root, out, progress=False)
    return out, load_file(out / AMAX_FILE)


def hf_weights(out: Path) -> dict[str, torch.Tensor]:
    return {k: v.float() for k, v in load_file(out / "model.safetensors").items()}


def test_dense_amax_fans_out_and_splits_per_channel(quant_checkpoints, tmp_path):
    root = quant_checkpoints[DENSE]
    megatron = megatron_amax(root)
    out, amax = convert_with_amax(root, tmp_path)
    weights = hf_weights(out)
    expected_names = set()
    for key, value in megatron.items():
        layer, linear, quantizer = re.fullmatch(r"decoder\.layers\.(\d+)\.(.+)\.(\w+_quantizer)\._amax", key).groups()
        modules = [f"model.layers.{layer}.{m}" for m in HF_MODULES[linear]]
        for module in modules:
            name = f"{module}.{quantizer}._amax"
            expected_names.add(name)
            if quantizer == "input_quantizer":  # per-tensor: the same value under every fused part, 0-d
                assert amax[name].shape == () and amax[name] == value.reshape(()), name
            else:  # per output channel, split like the weight: max |w| of each HF row
                rows = weights[f"{module}.weight"].abs().amax(dim=1, keepdim=True)
                torch.testing.assert_close(amax[name], rows, rtol=0, atol=0, msg=name)
        if quantizer == "weight_quantizer":  # nothing lost or invented by the split
            joined = torch.cat([amax[f"{m}.weight_quantizer._amax"] for m in modules])
            assert sorted(joined.flatten().tolist()) == sorted(value.flatten().tolist()), key
    assert set(amax) == expected_names
    config = json.loads((out / CONFIG_FILE).read_text())
    assert config["producer"] == {"name": "modelopt", "version": version("nvidia-modelopt")}
    assert config["calibration"]["quant_algo"] == "FP8" and config["calibration"]["exclude_modules"] == ["lm_head"]
    assert config["quantization"]["quant_algo"] is None  # the weights written here are not quantized
    assert config["modelopt_state"]["quantize"]["quant_cfg"]  # ModelOpt's own config, as saved


def test_moe_grouped_amax_fans_out_per_ep_block(quant_checkpoints, tmp_path):
    root = quant_checkpoints[MOE]
    base = MOE.base
    megatron = megatron_amax(root)
    out, amax = convert_with_amax(root, tmp_path)
    weights = hf_weights(out)
    per_rank = base.num_experts // base.ep
    expected_names = set()
    for key, value in megatron.items():
        layer, linear, quantizer = re.fullmatch(r"decoder\.layers\.(\d+)\.(.+)\.(\w+_quantizer)\._amax", key).groups()
        expert_linear = linear.removeprefix("mlp.experts.")
        if expert_linear == linear:  # attention: one scalar, copied to q, k, v
            targets = [(f"model.layers.{layer}.{m}", value.reshape(())) for m in HF_MODULES[linear]]
        else:  # grouped: EP rank r's quantizer covers experts r·E/EP ... (r+1)·E/EP - 1
            assert value.shape == (base.ep,), key
            targets = [
                (f"model.layers.{layer}.mlp.experts.{e}.{m.removeprefix('mlp.')}", value[e // per_rank])
                for e in range(base.num_experts)
                for m in HF_MODULES[f"mlp.{expert_linear}"]
            ]
        for module, expected in targets:
            name = f"{module}.{quantizer}._amax"
            expected_names.add(name)
            assert amax[name].shape == () and amax[name] == expected, name
    assert set(amax) == expected_names
    for layer in range(base.num_layers):  # the weight amax of a block is the max |w| of its experts
        for e in range(base.num_experts):
            block = range(e // per_rank * per_rank, (e // per_rank + 1) * per_rank)
            prefix = f"model.layers.{layer}.mlp.experts"
            for parts in (("gate_proj", "up_proj"), ("down_proj",)):  # fc1 covers gate and up
                top = max(weights[f"{prefix}.{j}.{m}.weight"].abs().max() for j in block for m in parts)
                assert all(amax[f"{prefix}.{e}.{m}.weight_quantizer._amax"] == top for m in parts)


def test_legacy_format_gives_the_same_amax(quant_checkpoints, tmp_path):
    """The `--ckpt-format torch` save of the same quantized model: per-rank buffers, per-channel rows joined."""
    root = quant_checkpoints[DENSE]
    _, from_dist = convert_with_amax(root, tmp_path / "dist")
    _, from_legacy = convert_with_amax(legacy_root(root), tmp_path / "legacy")
    assert from_legacy.keys() == from_dist.keys()
    for name, value in from_dist.items():
        assert torch.equal(from_legacy[name], value), name


@pytest.mark.parametrize("spec", [DENSE, MOE], ids=["dense-per-channel", "moe-per-tensor"])
def test_fp8_export_loads_and_matches_bf16(quant_checkpoints, tmp_path, spec):
    root = quant_checkpoints[spec]
    bf16, fp8 = tmp_path / "bf16", tmp_path / "fp8"
    convert(root, bf16, dtype="bf16", progress=False)
    convert(root, fp8, dtype="bf16", export_fp8=True, progress=False)
    stored = load_file(fp8 / "model.safetensors")
    amax = load_file(fp8 / AMAX_FILE)
    reference = load_file(bf16 / "model.safetensors")
    quantized = sorted(k.removesuffix(".weight_scale") for k in stored if k.endswith(".weight_scale"))
    fp8_weights = sorted(k.removesuffix(".weight") for k, v in stored.items() if v.dtype == torch.float8_e4m3fn)
    linears = 4 if spec.base.is_moe else 7  # experts stay unquantized (transformers fuses them)
    assert quantized == fp8_weights and len(quantized) == linears * spec.base.num_layers
    for module in quantized:
        weight, scale = stored[f"{module}.weight"], stored[f"{module}.weight_scale"]
        weight_amax = amax[f"{module}.weight_quantizer._amax"]
        assert scale.shape == ((1,) if weight_amax.dim() == 0 else (weight.shape[0], 1))
        torch.testing.assert_close(scale, (weight_amax / 448).reshape(scale.shape), rtol=0, atol=0)
        assert stored[f"{module}.input_scale"] == amax[f"{module}.input_quantizer._amax"] / 448
        # the FP8 value is the bf16 weight / scale rounded to E4M3 (3 mantissa bits: within 2^-4 relative)
        exact = reference[f"{module}.weight"].float() / scale
        assert ((weight.float() - exact).abs() <= exact.abs() * 2**-4 + 2**-9).all(), module
    stored_algo = json.loads((fp8 / CONFIG_FILE).read_text())["quantization"]["quant_algo"]
    assert stored_algo == ("FP8" if spec.weight_axis is None else None)  # ModelOpt's name for per-tensor FP8
    config = json.loads((fp8 / "config.json").read_text())["quantization_config"]
    assert config["quant_method"] == "compressed-tensors"
    assert sorted(config["config_groups"]["group_0"]["targets"]) == quantized

    model = load_clean(fp8)
    plain = load_clean(bf16)
    strategy = "tensor" if spec.weight_axis is None else "channel"
    assert model.model.layers[0].self_attn.q_proj.quantization_scheme.weights.strategy == strategy
    gen = torch.Generator().manual_seed(spec.base.seed)  # the calibration batch
    ids = torch.randint(0, spec.base.vocab_size, (CALIBRATION_BATCH, CALIBRATION_SEQ), generator=gen)
    with torch.no_grad():
        got, want = model(ids).logits.float(), plain(ids).logits
    per_token = torch.nn.functional.cosine_similarity(got, want, dim=-1)
    overall = torch.nn.functional.cosine_similarity(got.flatten(), want.flatten(), dim=0)
    assert per_token.median() >= FP8_TOKEN_COSINE and overall >= FP8_COSINE, (per_token.median(), overall)
    assert not torch.equal(got, want)  # the FP8 path really ran


def test_export_fp8_needs_amax(checkpoints, tmp_path):
    line = convert_fails(checkpoints[BASE_SPEC], tmp_path / "out", "--export-fp8")
    assert "--export-fp8 needs ModelOpt amax" in line


def test_parts_write_the_quant_side_files(quant_checkpoints, tmp_path):
    """`--part` (issue 21): part 0 writes the amax file and hf_quant_config.json; finalize gives a plain run."""
    from offline_bridge.commands.parts import finalize

    root = quant_checkpoints[MOE]
    plain = convert(root, tmp_path / "plain", max_shard_size="100KB", progress=False)
    for index in range(3):
        convert(root, tmp_path / "out", max_shard_size="100KB", progress=False, part=f"{index}/3")
    out = finalize(tmp_path / "out")
    assert {p.name: p.read_bytes() for p in plain.iterdir()} == {p.name: p.read_bytes() for p in out.iterdir()}
    assert (out / "quant_amax.safetensors").exists()
