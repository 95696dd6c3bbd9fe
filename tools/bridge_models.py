"""Tiny Qwen3 / Qwen3-MoE models built by Megatron-Bridge from a local transformers config, with seeded
adapters and Megatron's own forward (for tools/bridge_fixtures.py; runs inside its spawned ranks)."""

from __future__ import annotations

import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tools.bridge_cpu import for_cpu, padded

SEED = 1234
BATCH, SEQ = 2, 12
LORA_DIM, LORA_ALPHA = 8, 16
DENSE_TARGETS = ["linear_qkv", "linear_proj", "linear_fc1", "linear_fc2"]
STEP = 20


@dataclass(frozen=True)
class Case:
    """One model layout and, optionally, one PEFT method saved on top of its base."""

    model: str  # "dense" | "moe"
    tp: int
    ep: int = 1
    etp: int = 1
    peft: str | None = None  # None | "lora" | "canonical_lora" | "dora"

    @property
    def model_dir(self) -> str:
        return self.model if self.ep == 1 else f"{self.model}_ep{self.ep}_etp{self.etp}"

    @property
    def world(self) -> int:
        return max(self.tp, self.ep * self.etp)


CASES = {
    "dense": Case("dense", tp=2),
    "dense_lora": Case("dense", tp=2, peft="lora"),
    "dense_canonical_lora": Case("dense", tp=2, peft="canonical_lora"),
    "dense_dora": Case("dense", tp=2, peft="dora"),
    "moe": Case("moe", tp=2, ep=2, etp=1),
    "moe_lora": Case("moe", tp=2, ep=2, etp=1, peft="lora"),
    "moe_etp2": Case("moe", tp=2, ep=2, etp=2),
    "moe_etp2_lora": Case("moe", tp=2, ep=2, etp=2, peft="lora"),
}


def hf_config(model: str) -> Any:
    """The tiny transformers config every case starts from (vocab 250: Megatron pads it to 256)."""
    common = dict(
        vocab_size=250,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=8,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=128,
        tie_word_embeddings=False,
        rms_norm_eps=1e-6,
    )
    if model == "dense":
        from transformers import Qwen3Config

        return Qwen3Config(intermediate_size=128, architectures=["Qwen3ForCausalLM"], **common)
    from transformers import Qwen3MoeConfig

    return Qwen3MoeConfig(
        intermediate_size=128,
        moe_intermediate_size=32,
        num_experts=4,
        num_experts_per_tok=2,
        decoder_sparse_step=1,
        mlp_only_layers=[],
        norm_topk_prob=True,
        architectures=["Qwen3MoeForCausalLM"],
        **common,
    )


def provider_for(case: Case) -> Any:
    from megatron.bridge import AutoBridge

    bridge = AutoBridge.from_hf_config(hf_config(case.model))
    provider = bridge.to_megatron_provider(load_weights=False)
    provider.tensor_model_parallel_size = case.tp
    provider.pipeline_model_parallel_size = 1
    provider.expert_model_parallel_size = case.ep
    provider.expert_tensor_parallel_size = case.etp
    provider.init_method_std = 0.08
    padded(for_cpu(provider))
    provider.finalize()
    return bridge, provider


def build(case: Case) -> tuple[Any, Any, list]:
    import torch
    from megatron.core import parallel_state

    bridge, provider = provider_for(case)
    if not parallel_state.model_parallel_is_initialized():
        parallel_state.initialize_model_parallel(
            tensor_model_parallel_size=case.tp,
            expert_model_parallel_size=case.ep,
            expert_tensor_parallel_size=case.etp,
        )
    torch.manual_seed(SEED)
    model = provider.provide_distributed_model(
        wrap_with_ddp=False, use_cpu_initialization=True, mixed_precision_wrapper=None
    )
    _randomize_router(model)
    return bridge, provider, model


def _randomize_router(model: list) -> None:
    """Router weights of order 1 so that top-k picks differ between tokens (replicated: same seed everywhere)."""
    import torch

    for name, p in model[0].named_parameters():
        if name.endswith("router.weight"):
            g = torch.Generator().manual_seed(_seed(name))
            p.data.copy_(torch.randn(p.shape, generator=g) * 0.5)


def _seed(*parts: object) -> int:
    return zlib.crc32("|".join(map(str, parts)).encode())


def peft_for(kind: str, case: Case) -> Any:
    from megatron.bridge.peft.canonical_lora import CanonicalLoRA
    from megatron.bridge.peft.dora import DoRA
    from megatron.bridge.peft.lora import LoRA

    if kind == "canonical_lora":
        targets = ["linear_q", "linear_k", "linear_v", "linear_proj", "linear_fc1_up", "linear_fc1_gate", "linear_fc2"]
        return CanonicalLoRA(target_modules=targets, dim=LORA_DIM, alpha=LORA_ALPHA)
    cls = {"lora": LoRA, "dora": DoRA}[kind]
    return cls(target_modules=list(DENSE_TARGETS), dim=LORA_DIM, alpha=LORA_ALPHA)


def randomize_adapters(model: list) -> None:
    """Seeded A and B: per TP rank where sharded, per EP rank for experts; then DoRA magnitudes."""
    import torch
    from megatron.core import parallel_state as ps

    for name, p in model[0].named_parameters():
        if ".adapter." not in name or name.endswith("weight_magnitude"):
            continue
        expert = ".experts." in name
        tp_rank = ps.get_expert_tensor_parallel_rank() if expert else ps.get_tensor_model_parallel_rank()
        sharded = bool(getattr(p, "tensor_model_parallel", False))
        parts = [name, tp_rank if sharded else "-", ps.get_expert_model_parallel_rank() if expert else "-"]
        p.data.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(_seed(*parts))) * 0.1)
    _randomize_magnitudes(model)


def _randomize_magnitudes(model: list) -> None:
    """DoRA magnitudes m = ||W + s·BA||_row · (1 + 0.2·|n|), full-row norms, n seeded per row.

    Bridge initialises m from TP-local row norms (for row-parallel layers each rank holds its own input
    columns, so its "replicated" m differs per rank and the checkpoint keeps rank 0's); full-row norms
    summed over TP make the replicated ones equal on every rank, as a checkpoint needs."""
    import torch
    from megatron.bridge.peft.dora_layers import DoRALinear
    from megatron.core import parallel_state as ps

    for name, module in model[0].named_modules():
        if not isinstance(module, DoRALinear):
            continue
        norm = module._get_weight_norm()
        if module.adapter.input_is_parallel:  # TP-local norms of the input columns: sum the squares
            squares = norm.square()
            torch.distributed.all_reduce(squares, group=ps.get_tensor_model_parallel_group())
            norm = squares.sqrt()
        rank = "-" if module.adapter.input_is_parallel else ps.get_tensor_model_parallel_rank()
        noise = torch.randn(norm.shape, generator=torch.Generator().manual_seed(_seed(name, "m", rank)))
        module.adapter.weight_magnitude.data.copy_(norm * (1 + 0.2 * noise.abs()))


def _input_ids() -> Any:
    import torch

    g = torch.Generator().manual_seed(SEED)
    return torch.randint(0, 250, (BATCH, SEQ), generator=g)


def _forward(model: list) -> Any:
    """Megatron's fp32 logits, gathered over TP (the output layer is vocab-parallel)."""
    import torch
    from megatron.core import parallel_state as ps

    ids = _input_ids()
    pos = torch.arange(SEQ)[None].expand(BATCH, SEQ)
    mask = torch.triu(torch.ones(SEQ, SEQ), 1).bool()[None, None]
    model[0].eval()
    with torch.no_grad():
        local = model[0](ids, position_ids=pos, attention_mask=mask)
    group = ps.get_tensor_model_parallel_group()
    parts = [torch.empty_like(local) for _ in range(ps.get_tensor_model_parallel_world_size())]
    torch.distributed.all_gather(parts, local.contiguous(), group=group)
    return ids, torch.cat(parts, dim=-1).float()


def save_logits(model: list, path: Path) -> None:
    import torch
    from safetensors.torch import save_file

    ids, logits = _forward(model)
    if torch.distributed.get_rank() == 0:
        path.parent.mkdir(parents=True, exist_ok=True)
        save_file({"input_ids": ids.contiguous(), "logits": logits.contiguous()}, str(path))
