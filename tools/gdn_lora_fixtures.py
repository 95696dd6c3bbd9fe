"""Megatron-Bridge LoRA adapters on Gated DeltaNet layers (`in_proj`, `out_proj`), written on CPU by megatron-core.

An adapter-only save like Megatron-Bridge's (``run_config.yaml`` names the base and the ``peft:`` settings) for
a GDN base from :func:`tools.megatron_fixtures.build_fixtures`, at the adapter's TP. Per GDN layer ``i``:

- ``decoder.layers.{i}.self_attention.in_proj.adapter.linear_in.weight`` (A) ``[dim, H]``, replicated;
- ``….in_proj.adapter.linear_out.weight`` (B) ``[P, dim]``, TP axis 0;
- ``….out_proj.adapter.linear_in.weight`` (A) ``[dim, Vd]``, TP axis 1;
- ``….out_proj.adapter.linear_out.weight`` (B) ``[H, dim]``, replicated.

(``P`` the in_proj rows ``2Kd + 2Vd + 2nv``.) in_proj's B has no split factory: rank t's rows are its local
``[q_t; k_t; v_t; z_t; b_t; a_t]``, so the file holds them rank-major and their meaning depends on the TP.
The reference does not presuppose that layout: it is Megatron's own forward *at the adapter's TP* with the
adapters applied the way they act in training, each rank adding ``(alpha/dim)·B_t @ A`` to its local in_proj
and ``(alpha/dim)·B @ A_t`` to its local out_proj columns; logits gathered over TP ranks.

Layout under ``cache_dir/<spec.name>/``: ``adapter/`` (the save root), ``reference.pt``, ``COMPLETE``.
"""

from __future__ import annotations

import fcntl
import json
import shutil
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from tools.megatron_fixtures import (
    GDN_FAMILIES,
    MARKER,
    REFERENCE_BATCH,
    REFERENCE_FILE,
    REFERENCE_SEQ,
    FixtureSpec,
    build_fixtures,
)

__all__ = ["GdnAdapterSpec", "build_gdn_adapters"]

ADAPTER_DIR = "adapter"
ADAPTER_STD = 0.1


@dataclass(frozen=True)
class GdnAdapterSpec:
    """A LoRA on every GDN layer's in_proj and out_proj, saved at ``tp``."""

    base: FixtureSpec
    dim: int = 4
    alpha: int = 8
    tp: int = 2
    seed: int = 7
    iteration: int = 20

    def __post_init__(self) -> None:
        if self.base.family not in GDN_FAMILIES or self.base.pp != 1 or self.base.is_moe:
            raise ValueError(f"GDN adapters are written for dense PP1 {GDN_FAMILIES} bases")

    @property
    def name(self) -> str:
        return f"gdnlora-r{self.dim}a{self.alpha}-tp{self.tp}-s{self.seed}--{self.base.name}"

    @property
    def scale(self) -> float:
        return self.alpha / self.dim


def build_gdn_adapters(specs: Iterable[GdnAdapterSpec], cache_dir: Path) -> dict[GdnAdapterSpec, Path]:
    """Each spec's adapter save root (``cache_dir/<name>/adapter``), built once; its base is built too."""
    from tools.megatron_fixtures import _spawn

    cache_dir = Path(cache_dir).resolve()
    specs = list(dict.fromkeys(specs))
    bases = build_fixtures([s.base for s in specs], cache_dir)
    result = {s: cache_dir / s.name / ADAPTER_DIR for s in specs}
    with open(cache_dir / ".build.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        for spec in (s for s in specs if not (cache_dir / s.name / MARKER).exists()):
            shutil.rmtree(cache_dir / spec.name, ignore_errors=True)
            (cache_dir / spec.name).mkdir(parents=True)
            job = {"spec": spec, "base_root": str(bases[spec.base]), "save": str(result[spec])}
            _spawn(spec.tp, "gdn_lora", [job], worker=_worker)
            (cache_dir / spec.name / MARKER).write_text(json.dumps(asdict(spec)) + "\n")
    return result


def _worker(rank: int, world: int, port: int, task: str, jobs: list[dict[str, Any]]) -> None:
    """Entry point of every spawned rank (the gloo set-up of tools.megatron_fixtures)."""
    import os
    import warnings
    from datetime import timedelta

    warnings.filterwarnings("ignore")
    import torch

    from tools.megatron_fixtures import _patch_megatron_for_cpu

    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(seconds=300))
    try:
        _patch_megatron_for_cpu()
        for job in jobs:
            _save_and_reference(**job)
    finally:
        from megatron.core import parallel_state

        parallel_state.destroy_model_parallel()
        torch.distributed.destroy_process_group()


def _draw(spec: GdnAdapterSpec, layer: int, what: str, shape: tuple[int, ...]):
    """One global adapter tensor, equal on every rank."""
    import torch

    from tools.megatron_fixtures import _crc_seed

    gen = torch.Generator().manual_seed(_crc_seed(spec.seed, layer, what))
    return ADAPTER_STD * torch.randn(shape, generator=gen, dtype=torch.float32)


def _save_and_reference(spec: GdnAdapterSpec, base_root: str, save: str) -> None:
    import torch
    import yaml
    from megatron.core import dist_checkpointing
    from megatron.core import parallel_state as ps
    from megatron.core.dist_checkpointing.mapping import ShardedTensor
    from megatron.core.ssm.gated_delta_net import GatedDeltaNet

    from tools.megatron_fixtures import _build_chunks, _init_parallel, _load_into, _rng_state, reference_logits

    tp = spec.tp
    _init_parallel(tp, 1, 1)
    rank = ps.get_tensor_model_parallel_rank()
    iteration = int((Path(base_root) / "latest_checkpointed_iteration.txt").read_text().strip())
    (model,) = _build_chunks(spec.base, tp, 1, 1, randomize=False)
    _load_into([model], str(Path(base_root) / f"iter_{iteration:07d}"), spec.base)
    model = model.float().eval()
    state: dict[str, Any] = {}
    for module in model.modules():
        if not isinstance(module, GatedDeltaNet):
            continue
        layer, prefix = module.layer_number - 1, f"decoder.layers.{module.layer_number - 1}.self_attention."
        a_in = _draw(spec, layer, "in_proj.A", (spec.dim, module.hidden_size))
        b_in = _draw(spec, layer, "in_proj.B", (module.in_proj_dim, spec.dim)).chunk(tp)[rank]
        a_out = _draw(spec, layer, "out_proj.A", (spec.dim, module.v_dim)).chunk(tp, dim=1)[rank]
        b_out = _draw(spec, layer, "out_proj.B", (module.hidden_size, spec.dim))
        for key, tensor, axis in (
            ("in_proj.adapter.linear_in.weight", a_in, None),
            ("in_proj.adapter.linear_out.weight", b_in, 0),
            ("out_proj.adapter.linear_in.weight", a_out, 1),
            ("out_proj.adapter.linear_out.weight", b_out, None),
        ):
            sharding = () if axis is None else ((axis, rank, tp),)
            state[prefix + key] = ShardedTensor.from_rank_offsets(
                prefix + key, tensor.contiguous(), *sharding, replica_id=rank if axis is None else 0
            )
        with torch.no_grad():  # the adapters as they act in training, on this rank's shards
            module.in_proj.weight += spec.scale * b_in @ a_in
            module.out_proj.weight += spec.scale * b_out @ a_out
    iter_dir = Path(save) / f"iter_{spec.iteration:07d}"
    if torch.distributed.get_rank() == 0:
        iter_dir.mkdir(parents=True, exist_ok=True)
    torch.distributed.barrier()
    common = {"checkpoint_version": 3.0, "iteration": spec.iteration}
    dist_checkpointing.save({"model": state, **common, "rng_state": _rng_state()}, str(iter_dir))
    ids, _ = reference_logits(Path(base_root))
    pos = torch.arange(REFERENCE_SEQ).unsqueeze(0).expand(REFERENCE_BATCH, -1)
    mask = torch.triu(torch.ones(REFERENCE_SEQ, REFERENCE_SEQ), diagonal=1).bool()[None, None]
    with torch.no_grad():
        local = model(ids, position_ids=pos, attention_mask=mask)  # vocab-parallel logits
    gathered = [torch.empty_like(local) for _ in range(tp)]
    torch.distributed.all_gather(gathered, local.contiguous(), group=ps.get_tensor_model_parallel_group())
    torch.distributed.barrier()
    if torch.distributed.get_rank() == 0:
        (iter_dir / "run_config.yaml").write_text(yaml.safe_dump(_run_config(spec, base_root, save), sort_keys=True))
        (Path(save) / "latest_checkpointed_iteration.txt").write_text(f"{spec.iteration}\n")
        logits = torch.cat(gathered, dim=-1).contiguous()
        torch.save({"input_ids": ids, "logits": logits}, Path(save).parent / REFERENCE_FILE)
    torch.distributed.barrier()


def _run_config(spec: GdnAdapterSpec, base_root: str, save: str) -> dict[str, Any]:
    """The parts of Megatron-Bridge's run_config.yaml a converter reads."""
    return {
        "checkpoint": {"pretrained_checkpoint": base_root, "save": save, "ckpt_format": "torch_dist"},
        "model": {"tensor_model_parallel_size": spec.tp, "pipeline_model_parallel_size": 1},
        "peft": {
            "_target_": "megatron.bridge.peft.lora.LoRA",
            "alpha": spec.alpha,
            "dim": spec.dim,
            "dropout": 0.0,
            "target_modules": ["in_proj", "out_proj"],
        },
    }
