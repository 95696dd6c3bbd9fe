"""Peer vectors: checkpoints and exports written by the real Megatron-Bridge 0.6.2 (tests/data/bridge/).

Written by tools/bridge_fixtures.py (see tests/data/bridge/README.md); no Bridge install is needed here.
Where Bridge is right our tensors equal its own HF exports bit for bit; everywhere our logits equal the
forward Megatron recorded on the live model. Where Bridge is wrong (formats/bridge_peft.md, "Known
Megatron-Bridge 0.6.2 differences") the test pins which tensors differ and that ours follow the checkpoint.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save
from transformers import AutoModelForCausalLM

from offline_bridge import convert, export_adapter

DATA = Path(__file__).resolve().parent / "data" / "bridge"
DENSE, MOE, MOE_ETP2 = DATA / "dense", DATA / "moe_ep2_etp1", DATA / "moe_ep2_etp2"
VOCAB = 250  # the HF vocab; Megatron padded it to 256
ATOL = 1e-5


def transformers4_config(model_dir: Path, tmp: Path) -> Path:
    """The same config as transformers 4.x wrote it (`num_experts`, `rope_theta`): what we read today."""
    config = json.loads((model_dir / "hf_config" / "config.json").read_text())
    if "num_local_experts" in config:
        config["num_experts"] = config.pop("num_local_experts")
    config["rope_theta"] = config.pop("rope_parameters")["rope_theta"]
    out = tmp / f"{model_dir.name}-config.json"
    out.write_text(json.dumps(config))
    return out


@pytest.fixture(scope="module")
def converted(tmp_path_factory: pytest.TempPathFactory):
    """convert(), once per (model, peft) vector, with a transformers-4.x style config."""
    tmp = tmp_path_factory.mktemp("bridge")
    done: dict[tuple[Path, str | None], Path] = {}

    def run(model_dir: Path, peft: str | None = None) -> Path:
        if (model_dir, peft) not in done:
            out = tmp / f"{model_dir.name}-{peft or 'base'}"
            source = model_dir / peft / "ckpt" if peft else model_dir / "base"
            base = model_dir / "base" if peft else None
            config = transformers4_config(model_dir, tmp)
            done[model_dir, peft] = convert(source, out, hf_config=config, base=base, progress=False)
        return done[model_dir, peft]

    return run


def tensors(directory: Path) -> dict[str, torch.Tensor]:
    return load_file(directory / "model.safetensors")


def bridge_export(directory: Path) -> dict[str, torch.Tensor]:
    """Bridge's save_hf_pretrained output; it keeps Megatron's 6 vocab padding rows (config says 250)."""
    data = tensors(directory)
    for name in ("model.embed_tokens.weight", "lm_head.weight"):
        assert data[name].shape[0] == 256, name
        data[name] = data[name][:VOCAB]
    return data


def differing(ours: dict[str, torch.Tensor], theirs: dict[str, torch.Tensor]) -> list[str]:
    assert ours.keys() == theirs.keys()
    return sorted(name for name in ours if not torch.equal(ours[name], theirs[name]))


def logits_gap(model_dir: Path, recorded: Path) -> float:
    """Largest |difference| between transformers' fp32 forward of our output and a recorded Megatron forward
    (its vocab padding columns aside)."""
    reference = load_file(recorded)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        logits = model(reference["input_ids"]).logits
    return (logits - reference["logits"][..., :VOCAB]).abs().max().item()


def assert_logits(model_dir: Path, recorded: Path) -> None:
    assert logits_gap(model_dir, recorded) <= ATOL


@pytest.mark.parametrize("model_dir", [DENSE, MOE, MOE_ETP2], ids=["dense", "moe_etp1", "moe_etp2"])
def test_base_equals_bridge_export(model_dir: Path, converted) -> None:
    out = converted(model_dir)
    assert differing(tensors(out), bridge_export(model_dir / "base_hf")) == []
    assert_logits(out, model_dir / "base_logits.safetensors")


@pytest.mark.parametrize("peft", ["lora", "canonical_lora"])
def test_dense_lora_merge_equals_bridge(peft: str, converted) -> None:
    out = converted(DENSE, peft)
    assert differing(tensors(out), bridge_export(DENSE / peft / "merged_hf")) == []
    assert differing(tensors(out), bridge_export(DENSE / "base_hf")) != []  # the adapter did change weights
    assert_logits(out, DENSE / peft / "logits.safetensors")


def test_dense_lora_export_equals_bridge_save_hf_adapter(tmp_path: Path) -> None:
    """export-adapter writes the tensors Bridge's save_hf_adapter wrote, under the same PEFT keys."""
    config = transformers4_config(DENSE, tmp_path)
    out = export_adapter(DENSE / "lora" / "ckpt", tmp_path / "peft", hf_config=config, progress=False)
    theirs = load_file(DENSE / "lora" / "hf_adapter" / "adapter_model.safetensors")
    assert differing(load_file(out / "adapter_model.safetensors"), theirs) == []
    ours_config = json.loads((out / "adapter_config.json").read_text())
    theirs_config = json.loads((DENSE / "lora" / "hf_adapter" / "adapter_config.json").read_text())
    for field in ("r", "lora_alpha", "peft_type", "use_dora"):
        assert ours_config[field] == theirs_config[field], field
    assert sorted(ours_config["target_modules"]) == sorted(theirs_config["target_modules"])


def checkpoint_tensors(iteration_dir: Path, tmp: Path) -> dict[str, torch.Tensor]:
    """A torch_dist save's global tensors, read by torch itself (not by the code under test)."""
    dcp_to_torch_save(iteration_dir, tmp / "checkpoint.pt")
    state = torch.load(tmp / "checkpoint.pt", weights_only=False)
    return {name: value for name, value in state.get("model", state).items() if torch.is_tensor(value)}


def fc1_magnitudes(tmp: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """The DoRA checkpoint's fc1 magnitudes [L, 2F] on disk, and the same rows in true [gate; up] order:
    Bridge saves them without the swiglu factory, TP rank-major ([gate_0; up_0; gate_1; up_1] at TP2)."""
    disk = checkpoint_tensors(DENSE / "dora" / "ckpt" / "iter_0000020", tmp)
    stored = disk["decoder.layers.mlp.linear_fc1.adapter.weight_magnitude"]
    gate_0, up_0, gate_1, up_1 = stored.chunk(4, dim=1)
    return stored, torch.cat([gate_0, gate_1, up_0, up_1], dim=1)


def test_dense_dora(converted, tmp_path: Path) -> None:
    """Ours is standard DoRA, m·V/||V||_row with V = W + s·BA, every magnitude row in its true order.

    Bridge's live TP2 forward normalises row-parallel layers by TP-local row norms, so it differs. Its TP1
    reload of the checkpoint is standard DoRA except that it reads fc1's rank-major magnitudes as
    [gate; up]: our model with those rows swapped in is Bridge's TP1 forward."""
    out = converted(DENSE, "dora")
    assert logits_gap(out, DENSE / "dora" / "logits.safetensors") > 100 * ATOL
    assert logits_gap(out, DENSE / "dora" / "tp1_reload_logits.safetensors") > 100 * ATOL
    stored, true_order = fc1_magnitudes(tmp_path)
    data = tensors(out)
    gate_up = {"gate_proj": slice(None, stored.shape[1] // 2), "up_proj": slice(stored.shape[1] // 2, None)}
    for layer in range(stored.shape[0]):
        for name, rows in gate_up.items():
            key = f"model.layers.{layer}.mlp.{name}.weight"
            data[key] = data[key] * (stored[layer, rows] / true_order[layer, rows])[:, None]
    save_file(data, tmp_path / "model.safetensors")
    shutil.copy(out / "config.json", tmp_path / "config.json")
    assert_logits(tmp_path, DENSE / "dora" / "tp1_reload_logits.safetensors")


def test_dense_dora_magnitude_order(tmp_path: Path) -> None:
    """The fixture set m = ||V||_row · (1 + 0.2·|n|): m / ||V|| is in [1, 2) only in the true row order,
    so fc1's magnitudes are rank-major on disk. Bridge's merged export drops m (V only)."""
    stored, true_order = fc1_magnitudes(tmp_path)
    merged = bridge_export(DENSE / "dora" / "merged_hf")
    layers = range(stored.shape[0])
    rows = torch.stack(
        [torch.cat([merged[f"model.layers.{i}.mlp.{p}.weight"] for p in ("gate_proj", "up_proj")]) for i in layers]
    )
    ratio = true_order / rows.norm(dim=-1)
    assert ratio.min() >= 1 - 1e-6 and ratio.max() < 2
    assert (stored / rows.norm(dim=-1)).min() < 1 - 1e-3


def expert_ep_rank(name: str) -> int | None:
    """EP rank (of 2) owning a routed expert's HF tensor, None for other tensors."""
    if ".mlp.experts." not in name:
        return None
    return int(name.split(".mlp.experts.")[1].split(".")[0]) // 2


def test_moe_lora_follows_the_checkpoint_not_bridge_exports(converted) -> None:
    """Expert TP 1: our merge reproduces the live model; Bridge's merged export gives EP rank 1's experts
    EP rank 0's adapters, so exactly those tensors differ."""
    out = converted(MOE, "lora")
    assert_logits(out, MOE / "lora" / "logits.safetensors")
    assert_logits(out, MOE / "lora" / "tp1_reload_logits.safetensors")
    changed = differing(tensors(out), bridge_export(MOE / "lora" / "merged_hf"))
    assert changed and {expert_ep_rank(name) for name in changed} == {1}


def test_moe_lora_expert_tp2(converted) -> None:
    """Expert TP 2: Bridge's live forward of expert fc2 adapters is wrong, so the recorded logits are not the
    checkpoint's model; ours is the checkpoint's (its TP1 reload). Its merged export also differs on
    EP rank 0's gate/up (fc1 split ignoring expert TP)."""
    out = converted(MOE_ETP2, "lora")
    assert_logits(out, MOE_ETP2 / "lora" / "tp1_reload_logits.safetensors")
    assert logits_gap(out, MOE_ETP2 / "lora" / "logits.safetensors") > 100 * ATOL
    changed = differing(tensors(out), bridge_export(MOE_ETP2 / "lora" / "merged_hf"))
    rank0 = {name.rsplit(".", 2)[-2] for name in changed if expert_ep_rank(name) == 0}
    assert rank0 == {"gate_proj", "up_proj"}
    assert {expert_ep_rank(name) for name in changed} == {0, 1}


@pytest.mark.parametrize("model_dir", [MOE, MOE_ETP2], ids=["moe_etp1", "moe_etp2"])
def test_moe_export_adapter(model_dir: Path, tmp_path: Path) -> None:
    """Bridge's export_adapter_ckpt (a TP1 reload of the checkpoint) is right: the same tensors as ours.
    Its save_hf_adapter of the live EP2 model writes EP rank 0's local experts (0, 1) only."""
    config = transformers4_config(model_dir, tmp_path)
    out = export_adapter(
        model_dir / "lora" / "ckpt", tmp_path / "peft", hf_config=config, expert_format="per-expert", progress=False
    )
    ours = load_file(out / "adapter_model.safetensors")
    assert differing(ours, load_file(model_dir / "lora" / "export_adapter_ckpt" / "adapter_model.safetensors")) == []
    live = load_file(model_dir / "lora" / "hf_adapter" / "adapter_model.safetensors")
    assert {expert_ep_rank(name) for name in ours} == {None, 0, 1}
    assert {expert_ep_rank(name) for name in live} == {None, 0}
    if model_dir == MOE:  # expert TP 1: what it does write is right
        assert differing({name: ours[name] for name in live}, live) == []


@pytest.mark.parametrize("model_dir", [DENSE, MOE])
def test_config_as_transformers_5_wrote_it(model_dir: Path, converted, tmp_path: Path) -> None:
    """The config as transformers 5.12 wrote it gives the same tensors as its 4.x spelling."""
    out = convert(model_dir / "base", tmp_path / "out", hf_config=model_dir / "hf_config", progress=False)
    assert differing(tensors(out), tensors(converted(model_dir))) == []


@pytest.mark.parametrize(
    "model_dir, peft",
    [
        *((DENSE, peft) for peft in (None, "lora", "canonical_lora", "dora")),
        *((moe, peft) for moe in (MOE, MOE_ETP2) for peft in (None, "lora")),
    ],
)
def test_without_hf_config(model_dir: Path, peft: str | None, converted, tmp_path: Path) -> None:
    """Bridge users have no HF config at hand: run_config.yaml alone gives the same tensors."""
    source = model_dir / peft / "ckpt" if peft else model_dir / "base"
    base = model_dir / "base" if peft else None
    out = convert(source, tmp_path / "out", base=base, progress=False)
    assert differing(tensors(out), tensors(converted(model_dir, peft))) == []


def test_base_found_through_run_config(converted, tmp_path: Path) -> None:
    """The command a Bridge user runs: the adapter save alone, its base from run_config.yaml's
    `pretrained_checkpoint` (relative, as Bridge recorded it, to the directory the run started in)."""
    out = tmp_path / "out"
    done = subprocess.run(
        [sys.executable, "-m", "offline_bridge", "convert", str(MOE / "lora" / "ckpt"), str(out), "--quiet"],
        cwd=DATA,
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr
    assert differing(tensors(out), tensors(converted(MOE, "lora"))) == []
