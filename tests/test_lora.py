"""LoRA merge of Megatron-Bridge adapter checkpoints: transformers on the merged output reproduces
Megatron's own forward of the base with `W + alpha/dim · B @ A` put in place, in Megatron layout."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp
import yaml
from click.testing import CliRunner
from conftest import (
    CANONICAL_SPECS,
    DORA_SPEC,
    LORA_SPECS,
    MISFIT_BASE,
    MLA_LORA_SPECS,
    MOE_LORA_SPECS,
    SHARED_OUTER_SPEC,
)
from judge import assert_matches_megatron, convert_fails
from safetensors.torch import load_file

from offline_bridge import convert
from offline_bridge.commands.cli import main
from offline_bridge.errors import OptionError
from offline_bridge.transform.lora_merge import resolve_device

SPEC = LORA_SPECS[0]


def test_adapter_only_finds_its_base(adapters: dict, tmp_path: Path) -> None:
    """`convert ADAPTER OUT`: the base comes from run_config.yaml's checkpoint.pretrained_checkpoint."""
    out = convert(adapters[SPEC], tmp_path / "merged", progress=False)
    assert_matches_megatron(out, SPEC.base, adapters[SPEC])


def test_checkpoint_holding_base_and_adapter(adapters: dict, tmp_path: Path) -> None:
    spec = LORA_SPECS[1]
    out = convert(adapters[spec], tmp_path / "merged", progress=False)
    assert_matches_megatron(out, spec.base, adapters[spec])


def test_adapter_option_gives_the_same_bytes(adapters: dict, checkpoints: dict, tmp_path: Path) -> None:
    a = convert(adapters[SPEC], tmp_path / "a", progress=False)
    b = convert(checkpoints[SPEC.base], tmp_path / "b", adapter=adapters[SPEC], progress=False)
    for path in sorted(a.iterdir()):
        assert path.read_bytes() == (b / path.name).read_bytes(), path.name


def _dcp(iteration_dir: Path, keys: list[str] | None = None) -> dict[str, torch.Tensor]:
    """Global tensors read by torch's own DCP reader (``keys`` None: every tensor)."""
    metadata = dcp.FileSystemReader(iteration_dir).read_metadata().state_dict_metadata
    keys = [k for k, v in metadata.items() if hasattr(v, "size")] if keys is None else keys
    tensors = {k: torch.empty(metadata[k].size, dtype=metadata[k].properties.dtype) for k in keys}
    dcp.load(tensors, checkpoint_id=iteration_dir, no_dist=True)
    return tensors


def test_every_target_is_w_plus_sba(adapters: dict, checkpoints: dict, tmp_path: Path) -> None:
    """Each merged HF tensor equals W + s·B@A computed here from torch's own reading of both checkpoints."""
    out = convert(adapters[SPEC], tmp_path / "merged", progress=False)
    hf = load_file(out / "model.safetensors")
    modules = {
        "self_attention.linear_qkv": 0,
        "self_attention.linear_proj": 0,
        "mlp.linear_fc1": 0,
        "mlp.linear_fc2": 0,
    }
    keys = [f"decoder.layers.{m}.weight" for m in modules]
    base = _dcp(checkpoints[SPEC.base] / "iter_0000010", keys)
    adapter_dir = next(adapters[SPEC].glob("iter_*"))
    lora = _dcp(adapter_dir, [k.replace(".weight", f".adapter.linear_{x}.weight") for k in keys for x in ("in", "out")])
    scale = SPEC.alpha / SPEC.dim
    groups, heads, head_dim = SPEC.base.num_query_groups, SPEC.base.num_attention_heads, SPEC.base.kv_channels
    for layer in range(SPEC.base.num_layers):
        merged = {}
        for key in keys:
            a = lora[key.replace(".weight", ".adapter.linear_in.weight")][layer].float()
            b = lora[key.replace(".weight", ".adapter.linear_out.weight")][layer].float()
            merged[key] = base[key][layer].float() + scale * b @ a
        h = f"model.layers.{layer}."
        qkv = merged["decoder.layers.self_attention.linear_qkv.weight"].view(
            groups, -1, head_dim, SPEC.base.hidden_size
        )
        per_group = heads // groups
        expected = {
            h + "self_attn.q_proj.weight": qkv[:, :per_group].reshape(-1, SPEC.base.hidden_size),
            h + "self_attn.k_proj.weight": qkv[:, per_group].reshape(-1, SPEC.base.hidden_size),
            h + "self_attn.v_proj.weight": qkv[:, per_group + 1].reshape(-1, SPEC.base.hidden_size),
            h + "self_attn.o_proj.weight": merged["decoder.layers.self_attention.linear_proj.weight"],
            h + "mlp.gate_proj.weight": merged["decoder.layers.mlp.linear_fc1.weight"].chunk(2)[0],
            h + "mlp.up_proj.weight": merged["decoder.layers.mlp.linear_fc1.weight"].chunk(2)[1],
            h + "mlp.down_proj.weight": merged["decoder.layers.mlp.linear_fc2.weight"],
        }
        for name, tensor in expected.items():
            assert torch.equal(hf[name], tensor.to(hf[name].dtype)), name


@pytest.fixture
def adapter_copy(adapters: dict, tmp_path: Path) -> Path:
    return Path(shutil.copytree(adapters[SPEC], tmp_path / "adapter"))


def _edit_run_config(root: Path, edit) -> None:
    file = next(root.glob("iter_*/run_config.yaml"))
    file.write_text(edit(file.read_text()))


def test_missing_base(adapter_copy: Path, tmp_path: Path) -> None:
    def elsewhere(text: str) -> str:
        data = yaml.safe_load(text)
        data["checkpoint"]["pretrained_checkpoint"] = str(tmp_path / "gone")
        return yaml.safe_dump(data)

    _edit_run_config(adapter_copy, elsewhere)
    line = convert_fails(adapter_copy, tmp_path / "out")
    assert "gone" in line and "does not exist" in line
    assert not (tmp_path / "out").exists()


def test_missing_peft_section(adapter_copy: Path, tmp_path: Path) -> None:
    def no_peft(text: str) -> str:
        data = yaml.safe_load(text)
        del data["peft"]
        return yaml.safe_dump(data)

    _edit_run_config(adapter_copy, no_peft)
    line = convert_fails(adapter_copy, tmp_path / "out")
    assert "no peft: alpha / dim" in line and "--lora-alpha" in line
    assert not (tmp_path / "out").exists()
    result = CliRunner().invoke(
        main,
        [
            "convert",
            str(adapter_copy),
            str(tmp_path / "out"),
            "-q",
            "--lora-alpha",
            str(SPEC.alpha),
            "--lora-dim",
            str(SPEC.dim),
        ],
    )
    assert result.exit_code == 0, result.output


def test_yaml_tag_that_builds_an_object(adapter_copy: Path, tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    _edit_run_config(adapter_copy, lambda text: text + f"evil: !!python/object/apply:os.system ['touch {marker}']\n")
    line = convert_fails(adapter_copy, tmp_path / "out")
    assert "run_config.yaml" in line and "not a plain YAML document" in line
    assert not marker.exists() and not (tmp_path / "out").exists()


def test_adapter_that_does_not_fit_the_base(adapters: dict, checkpoints: dict, tmp_path: Path) -> None:
    line = convert_fails(checkpoints[MISFIT_BASE], tmp_path / "out", "--adapter", adapters[SPEC])
    assert "does not fit base" in line and "linear_fc1" in line
    assert not (tmp_path / "out").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_cuda_device_without_a_gpu(adapters: dict, tmp_path: Path) -> None:
    line = convert_fails(adapters[SPEC], tmp_path / "out", "--device", "cuda")
    assert "torch sees no CUDA device" in line and "--device cpu" in line
    assert not (tmp_path / "out").exists()


def test_device_selection(monkeypatch: pytest.MonkeyPatch) -> None:
    """`auto` takes the GPU when torch sees one (simulated here: no GPU on CI), `cuda:N` keeps its index, and
    anything but cpu / cuda is refused."""
    resolve_device.cache_clear()
    assert resolve_device("auto") == torch.device("cuda" if torch.cuda.is_available() else "cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    resolve_device.cache_clear()
    try:
        assert resolve_device("auto") == torch.device("cuda")
        assert resolve_device("cuda:1") == torch.device("cuda", 1)
        for bad in ("meta", "tpu", "cuda:x"):
            with pytest.raises(OptionError, match="--device"):
                resolve_device(bad)
    finally:
        resolve_device.cache_clear()


def test_cpu_device_gives_the_auto_bytes(adapters: dict, tmp_path: Path) -> None:
    auto = convert(adapters[SPEC], tmp_path / "auto", progress=False)
    cpu = convert(adapters[SPEC], tmp_path / "cpu", device="cpu", progress=False)
    assert (auto / "model.safetensors").read_bytes() == (cpu / "model.safetensors").read_bytes()


@pytest.mark.parametrize("spec", MOE_LORA_SPECS, ids=lambda s: s.name)
def test_expert_adapters(spec, adapters: dict, tmp_path: Path) -> None:
    """Qwen3-MoE experts: shared slots, per-expert, legacy 2-D and normalized ranks all merge exactly."""
    out = convert(adapters[spec], tmp_path / "merged", progress=False)
    assert_matches_megatron(out, spec.base, adapters[spec])


@pytest.mark.parametrize("spec", CANONICAL_SPECS, ids=lambda s: s.name)
def test_canonical_lora(spec, adapters: dict, tmp_path: Path) -> None:
    """CanonicalLoRA (all parts, and q / v / up only) merges into the fused weights exactly."""
    out = convert(adapters[spec], tmp_path / "merged", progress=False)
    assert_matches_megatron(out, spec.base, adapters[spec])


def test_dora(adapters: dict, tmp_path: Path) -> None:
    """DoRA: rows rescaled to the learned magnitudes (fc1's rank-major order undone) match Megatron."""
    out = convert(adapters[DORA_SPEC], tmp_path / "merged", progress=False)
    assert_matches_megatron(out, DORA_SPEC.base, adapters[DORA_SPEC])


@pytest.mark.parametrize("spec", MLA_LORA_SPECS, ids=lambda s: s.name)
def test_mla_router_and_shared_expert_adapters(spec, adapters: dict, tmp_path: Path) -> None:
    """DeepSeek-V3 with Bridge's default targets: every MLA projection (with and without q LoRA), the router, and
    linear_fc1 / linear_fc2 on the dense layer, the shared experts and the routed experts."""
    out = convert(adapters[spec], tmp_path / "merged", progress=False)
    # transformers' forward does not use the MTP layer (HF layer num_layers): test_new_targets_are_w_plus_sba
    # checks its merged tensors
    assert_matches_megatron(out, spec.base, adapters[spec], extra=rf"model\.layers\.{spec.base.num_layers}\..*")


def test_shared_outer_expert_adapters(adapters: dict, tmp_path: Path) -> None:
    """experts_shared_outer_loras: fc1 A and fc2 B shared by all experts, the other side per expert; plus the
    router of a Qwen3-MoE base."""
    out = convert(adapters[SHARED_OUTER_SPEC], tmp_path / "merged", progress=False)
    assert_matches_megatron(out, SHARED_OUTER_SPEC.base, adapters[SHARED_OUTER_SPEC])


# Megatron module under decoder.layers[.i]. -> its HF tensors under model.layers.{i}. (fc1: gate, up halves)
HF_NAMES = {
    "self_attention.linear_q_proj": ("self_attn.q_proj.weight",),
    "self_attention.linear_q_down_proj": ("self_attn.q_a_proj.weight",),
    "self_attention.linear_q_up_proj": ("self_attn.q_b_proj.weight",),
    "self_attention.linear_kv_down_proj": ("self_attn.kv_a_proj_with_mqa.weight",),
    "self_attention.linear_kv_up_proj": ("self_attn.kv_b_proj.weight",),
    "self_attention.linear_proj": ("self_attn.o_proj.weight",),
    "mlp.router": ("mlp.gate.weight",),
    "mlp.linear_fc1": ("mlp.gate_proj.weight", "mlp.up_proj.weight"),
    "mlp.linear_fc2": ("mlp.down_proj.weight",),
    "mlp.shared_experts.linear_fc1": ("mlp.shared_experts.gate_proj.weight", "mlp.shared_experts.up_proj.weight"),
    "mlp.shared_experts.linear_fc2": ("mlp.shared_experts.down_proj.weight",),
    "mlp.experts.experts.linear_fc1": ("mlp.experts.{e}.gate_proj.weight", "mlp.experts.{e}.up_proj.weight"),
    "mlp.experts.experts.linear_fc2": ("mlp.experts.{e}.down_proj.weight",),
}


@pytest.mark.parametrize("spec", [*MLA_LORA_SPECS, SHARED_OUTER_SPEC], ids=lambda s: s.name)
def test_new_targets_are_w_plus_sba(spec, adapters: dict, checkpoints: dict, tmp_path: Path) -> None:
    """MLA projections, router, dense / shared / routed experts of DeepSeek-V3 and shared-outer experts: each
    merged HF tensor equals
    W + s·B@A computed here from torch's own reading of both checkpoints (layer by layer, expert by expert)."""
    out = convert(adapters[spec], tmp_path / "merged", progress=False)
    hf = load_file(out / "model.safetensors")
    lora = _dcp(next(adapters[spec].glob("iter_*")))
    base = _dcp(checkpoints[spec.base] / "iter_0000010")
    scale = spec.alpha / spec.dim
    checked: set[str] = set()
    for a_key in (k for k in lora if k.endswith(".adapter.linear_in.weight")):
        module = a_key.removesuffix(".adapter.linear_in.weight")
        a, b, w = lora[a_key], lora[module + ".adapter.linear_out.weight"], base[module + ".weight"]
        parts = module.split(".")
        per_layer = parts[2].isdigit()
        if parts[0] == "mtp":  # mtp.layers.{k}.transformer_layer.<path> is HF layer num_layers + k
            layers, path = [spec.base.num_layers + int(parts[2])], ".".join(parts[4:])
        else:
            layers = [int(parts[2])] if per_layer else range(spec.base.num_layers)
            path = ".".join(parts[3:] if per_layer else parts[2:])
        for layer in layers:
            a_l, b_l, w_l = (t if per_layer else t[layer] for t in (a, b, w))
            experts = range(w_l.shape[0]) if "experts.experts" in path else [None]
            for e in experts:  # an expert takes its slot of a side that has one, the shared side as it is
                a_e, b_e, w_e = (t if e is None or t.dim() == 2 else t[e] for t in (a_l, b_l, w_l))
                merged = w_e.float() + scale * (b_e.float() @ a_e.float())
                names = [f"model.layers.{layer}.{n.format(e=e)}" for n in HF_NAMES[path]]
                for name, part in zip(names, merged.chunk(len(names))):
                    assert torch.equal(hf[name], part.to(hf[name].dtype)), name
        checked.add(path)
    experts = {"mlp.experts.experts.linear_fc1", "mlp.experts.experts.linear_fc2", "mlp.router"}
    if spec.base.family == "deepseek_v3":  # linear_fc1 / linear_fc2 wrap dense, shared and routed experts alike
        q = ["linear_q_down_proj", "linear_q_up_proj"] if spec.base.q_lora_rank else ["linear_q_proj"]
        attention = {f"self_attention.{m}" for m in [*q, "linear_kv_down_proj", "linear_kv_up_proj", "linear_proj"]}
        dense = {
            f"mlp.{m}" for m in ("linear_fc1", "linear_fc2", "shared_experts.linear_fc1", "shared_experts.linear_fc2")
        }
        experts |= attention | dense
    assert checked == experts
