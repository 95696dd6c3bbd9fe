"""Megatron-Bridge LoRA adapters on hybrid Mamba (Nemotron-H) bases, written on CPU by megatron-core.

An adapter-only save like Megatron-Bridge's (``run_config.yaml`` names the base and the ``peft:`` settings) for a
base from :func:`tools.mamba_fixtures.build_mamba_fixtures`, at the base's TP, sharded as Bridge's
(Parallel)LinearAdapter shards them (the GDN adapter writer's :class:`_Adapters`, fc1 not gated). Targets:

- Mamba blocks ``decoder.layers.{i}.mixer.in_proj`` (column-parallel: B ``[P, dim]`` rows TP-sharded, rank t's
  rows its local ``[z_t; x_t; B_t; C_t; dt_t]``, no split factory) and ``mixer.out_proj`` (row-parallel);
- attention blocks ``self_attention.linear_qkv`` / ``linear_proj``; MLP blocks ``mlp.linear_fc1`` / ``linear_fc2``, and
  on MoE blocks the routed experts' (``mlp.experts.experts.linear_fc{1,2}.adapter.*``, A ``[E, dim, in]``, B
  ``[E, out, dim]``; in the latent size with latent projections), as Bridge's ``linear_fc1`` / ``linear_fc2`` reach.

The reference is Megatron's own forward at the adapter's TP with each rank adding ``(alpha/dim)·B @ A`` restricted
to its own shard of every wrapped weight; logits gathered over TP.

Layout under ``cache_dir/<spec.name>/``: ``adapter/`` (the save root), ``reference.pt``, ``COMPLETE``.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tools.gdn_lora_fixtures import _Adapters, build_adapter_saves
from tools.mamba_fixtures import MambaSpec, build_mamba_fixtures
from tools.megatron_fixtures import REFERENCE_BATCH, REFERENCE_FILE, REFERENCE_SEQ

__all__ = ["TARGETS", "MambaAdapterSpec", "build_mamba_adapters"]

TARGETS = ("in_proj", "out_proj", "linear_qkv", "linear_proj", "linear_fc1", "linear_fc2")


@dataclass(frozen=True)
class MambaAdapterSpec:
    """A LoRA on every Mamba, attention and MLP block's linears, saved at the base's TP."""

    base: MambaSpec
    dim: int = 4
    alpha: int = 8
    seed: int = 7
    iteration: int = 20
    targets: tuple[str, ...] = TARGETS  # Bridge's target_modules (leaf names)

    @property
    def tp(self) -> int:
        return self.base.tp

    @property
    def name(self) -> str:
        targets = "" if self.targets == TARGETS else "-" + "+".join(self.targets)
        return f"mambalora-r{self.dim}a{self.alpha}-s{self.seed}{targets}--{self.base.name}"

    @property
    def scale(self) -> float:
        return self.alpha / self.dim


class _PlainAdapters(_Adapters):
    gated_fc1 = False  # Nemotron-H's fc1 is a squared-ReLU up projection


def build_mamba_adapters(specs: Iterable[MambaAdapterSpec], cache_dir: Path) -> dict[MambaAdapterSpec, Path]:
    """Each spec's adapter save root (``cache_dir/<name>/adapter``), built once; its base is built too."""
    return build_adapter_saves(specs, cache_dir, build_mamba_fixtures, "mamba_lora", _worker)


def _worker(rank: int, world: int, port: int, task: str, jobs: list[dict[str, Any]]) -> None:
    from tools.mamba_fixtures import _patch_mamba_kernels
    from tools.megatron_fixtures import cpu_rank

    with cpu_rank(rank, world, port):
        _patch_mamba_kernels()
        for job in jobs:
            _save_and_reference(**job)


def _wrap_all(model, adapters: _Adapters, targets: tuple[str, ...]) -> None:
    """Adapters on every block's target linears (column-parallel first linears, row-parallel second ones)."""
    from megatron.core.ssm.mamba_layer import MambaLayer
    from megatron.core.ssm.mlp_layer import MLPLayer
    from megatron.core.transformer.transformer_layer import TransformerLayer

    for layer in model.decoder.layers:
        i = layer.layer_number - 1
        prefix = f"decoder.layers.{i}."
        if isinstance(layer, MambaLayer):
            pairs = ((layer.mixer.in_proj, "mixer.in_proj"), (layer.mixer.out_proj, "mixer.out_proj"))
        elif isinstance(layer, MLPLayer):
            pairs = ((layer.mlp.linear_fc1, "mlp.linear_fc1"), (layer.mlp.linear_fc2, "mlp.linear_fc2"))
        elif isinstance(layer, TransformerLayer) and hasattr(layer.self_attention, "linear_qkv"):
            attention = layer.self_attention
            pairs = (
                (attention.linear_qkv, "self_attention.linear_qkv"),
                (attention.linear_proj, "self_attention.linear_proj"),
            )
        else:  # an MoE block: linear_fc1 / linear_fc2 reach its routed experts (one adapter per expert)
            experts = layer.mlp.experts
            for e, expert in enumerate(experts.local_experts):
                where = (e, experts.num_local_experts)
                for column_parallel, name in ((True, "linear_fc1"), (False, "linear_fc2")):
                    if name in targets:
                        weight = getattr(expert, name).weight
                        adapters.wrap(weight, prefix + "mlp.experts.experts." + name, i, column_parallel, where)
            continue
        for column_parallel, (linear, name) in zip((True, False), pairs, strict=True):
            if name.rsplit(".", 1)[-1] in targets:
                adapters.wrap(linear.weight, prefix + name, i, column_parallel)


def _save_and_reference(spec: MambaAdapterSpec, base_root: str, save: str) -> None:
    import torch
    import yaml
    from megatron.core import dist_checkpointing
    from megatron.core import parallel_state as ps

    from tools.mamba_fixtures import _build, _load
    from tools.megatron_fixtures import _init_parallel, _rng_state, reference_logits

    _init_parallel(spec.tp, 1, 1)
    model = _build(spec.base, spec.tp, randomize=False)
    _load(model, spec.base, base_root)
    model = model.float().eval()
    adapters = _PlainAdapters(spec, ps.get_tensor_model_parallel_rank())
    _wrap_all(model, adapters, spec.targets)
    iter_dir = Path(save) / f"iter_{spec.iteration:07d}"
    if torch.distributed.get_rank() == 0:
        iter_dir.mkdir(parents=True, exist_ok=True)
    torch.distributed.barrier()
    common = {"checkpoint_version": 3.0, "iteration": spec.iteration}
    dist_checkpointing.save({"model": adapters.state, **common, "rng_state": _rng_state()}, str(iter_dir))
    ids, _ = reference_logits(Path(base_root))
    pos = torch.arange(REFERENCE_SEQ).unsqueeze(0).expand(REFERENCE_BATCH, -1)
    mask = torch.triu(torch.ones(REFERENCE_SEQ, REFERENCE_SEQ), diagonal=1).bool()[None, None]
    with torch.no_grad():
        logits = model(ids, position_ids=pos, attention_mask=mask)  # [b, s, vocab / tp]
    gathered = [torch.empty_like(logits) for _ in range(spec.tp)]
    torch.distributed.all_gather(gathered, logits.contiguous(), group=ps.get_tensor_model_parallel_group())
    torch.distributed.barrier()
    if torch.distributed.get_rank() == 0:
        (iter_dir / "run_config.yaml").write_text(yaml.safe_dump(_run_config(spec, base_root, save), sort_keys=True))
        (Path(save) / "latest_checkpointed_iteration.txt").write_text(f"{spec.iteration}\n")
        torch.save(
            {"input_ids": ids, "logits": torch.cat(gathered, dim=-1).contiguous()}, Path(save).parent / REFERENCE_FILE
        )
    torch.distributed.barrier()


def _run_config(spec: MambaAdapterSpec, base_root: str, save: str) -> dict[str, Any]:
    """The parts of Megatron-Bridge's run_config.yaml a converter reads."""
    return {
        "checkpoint": {"pretrained_checkpoint": base_root, "save": save, "ckpt_format": "torch_dist"},
        "model": {"tensor_model_parallel_size": spec.tp, "pipeline_model_parallel_size": 1},
        "peft": {
            "_target_": "megatron.bridge.peft.lora.LoRA",
            "alpha": spec.alpha,
            "dim": spec.dim,
            "dropout": 0.0,
            "target_modules": list(spec.targets),
        },
    }
