"""Megatron-Bridge LoRA adapters on Gated DeltaNet hybrids, written on CPU by megatron-core.

An adapter-only save like Megatron-Bridge's (``run_config.yaml`` names the base and the ``peft:`` settings) for
a GDN base from :func:`tools.megatron_fixtures.build_fixtures`, at the adapter's TP, sharded as Bridge's
(Parallel)LinearAdapter shards them. Per GDN layer ``i`` (``decoder.layers.{i}.self_attention.``):

- ``in_proj.adapter.linear_in.weight`` (A) ``[dim, H]``, TP axis 0;
- ``in_proj.adapter.linear_out.weight`` (B) ``[P, dim]``, TP axis 0, ``P = 2Kd + 2Vd + 2nv``;
- ``out_proj.adapter.linear_in.weight`` (A) ``[dim, Vd]``, TP axis 1; ``….linear_out.weight`` (B) ``[H, dim]``, TP
  axis 0.

On MoE bases every layer's routed experts too (``decoder.layers.{i}.mlp.experts.experts.linear_fc{1,2}.adapter.*``,
one adapter per expert: A ``[E, dim, in]``, B ``[E, out, dim]``; fc1's B through megatron-core's swiglu factory).

in_proj's B has no split factory: rank t's rows are its local ``[q_t; k_t; v_t; z_t; b_t; a_t]``, so the file
holds them rank-major and their meaning depends on the TP. The reference does not presuppose that layout: it
is Megatron's own forward *at the adapter's TP* with the adapters applied the way they act in training, each
rank adding ``(alpha/dim)·B @ A`` restricted to its own shard of every wrapped weight; logits gathered over TP.

Layout under ``cache_dir/<spec.name>/``: ``adapter/`` (the save root), ``reference.pt``, ``COMPLETE``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tools.megatron_fixtures import (
    GDN_FAMILIES,
    REFERENCE_BATCH,
    REFERENCE_FILE,
    REFERENCE_SEQ,
    FixtureSpec,
    build_fixtures,
    pending_builds,
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
        if self.base.family not in GDN_FAMILIES or self.base.pp != 1 or self.base.ep != 1:
            raise ValueError(f"GDN adapters are written for PP1 EP1 {GDN_FAMILIES} bases")

    @property
    def name(self) -> str:
        return f"gdnlora-r{self.dim}a{self.alpha}-tp{self.tp}-s{self.seed}--{self.base.name}"

    @property
    def scale(self) -> float:
        return self.alpha / self.dim


def build_gdn_adapters(specs: Iterable[GdnAdapterSpec], cache_dir: Path) -> dict[GdnAdapterSpec, Path]:
    """Each spec's adapter save root (``cache_dir/<name>/adapter``), built once; its base is built too."""
    return build_adapter_saves(specs, cache_dir, build_fixtures, "gdn_lora", _worker)


def build_adapter_saves(
    specs: Iterable[Any], cache_dir: Path, build_bases: Callable[..., dict], task: str, worker: Callable[..., None]
) -> dict[Any, Path]:
    """Each adapter spec's save root (``cache_dir/<name>/adapter``), built once by ``worker`` on ``spec.tp``
    ranks over its base, which ``build_bases`` builds first (also for tools/mamba_lora_fixtures.py)."""
    from tools.megatron_fixtures import _spawn

    cache_dir = Path(cache_dir).resolve()
    specs = list(dict.fromkeys(specs))
    bases = build_bases([s.base for s in specs], cache_dir)
    result = {s: cache_dir / s.name / ADAPTER_DIR for s in specs}
    with pending_builds(cache_dir, specs, f".{task}-build.lock") as todo:
        for spec in todo:
            job = {"spec": spec, "base_root": str(bases[spec.base]), "save": str(result[spec])}
            _spawn(spec.tp, task, [job], worker=worker)
    return result


def _worker(rank: int, world: int, port: int, task: str, jobs: list[dict[str, Any]]) -> None:
    """Entry point of every spawned rank (the gloo set-up of tools.megatron_fixtures)."""
    from tools.megatron_fixtures import cpu_rank

    with cpu_rank(rank, world, port):
        for job in jobs:
            _save_and_reference(**job)


def _draw(spec: GdnAdapterSpec, layer: int, what: str, shape: tuple[int, ...]):
    """One global adapter tensor, equal on every rank."""
    import torch

    from tools.megatron_fixtures import _crc_seed

    gen = torch.Generator().manual_seed(_crc_seed(spec.seed, layer, what))
    return ADAPTER_STD * torch.randn(shape, generator=gen, dtype=torch.float32)


def _local(tensor, axis: int | None, rank: int, tp: int, gated: bool = False):
    """A rank's shard of a global tensor (``gated``: fc1 rows, the rank's gate rows then its up rows)."""
    import torch

    if axis is None:
        return tensor
    if gated:
        gate, up = tensor.chunk(2)
        return torch.cat([gate.chunk(tp)[rank], up.chunk(tp)[rank]])
    return tensor.chunk(tp, dim=axis)[rank]


class _Adapters:
    """This rank's adapter ShardedTensors, and the adapters applied to its own weight shards."""

    gated_fc1 = True  # linear_fc1 is swiglu's [gate; up] (False: a plain fc1, e.g. Nemotron-H's squared ReLU)

    def __init__(self, spec: GdnAdapterSpec, rank: int) -> None:
        self.spec, self.rank, self.state = spec, rank, {}

    def wrap(self, weight, key: str, layer: int, column_parallel: bool, expert: tuple[int, int] | None = None) -> None:
        """Draw A and B for the global shape of ``weight`` (this rank's shard of a column- or row-parallel
        linear), save their shards as Bridge does, and add this rank's part of ``s·B@A`` to the shard.

        Column-parallel bases: A split on its rank axis (gathered in the forward), B on its rows (fc1: the
        rank's gate rows then its up rows, saved through the swiglu factory); row-parallel: A on its input axis,
        B on its rows (gathered in the forward). ``expert``: (index, count) of the leading expert axis.
        """
        import torch

        spec, rank, tp = self.spec, self.rank, self.spec.tp
        rows, columns = weight.shape
        rows, columns = (rows * tp, columns) if column_parallel else (rows, columns * tp)
        a = _draw(spec, layer, f"{key}#{expert}.A", (spec.dim, columns))
        b = _draw(spec, layer, f"{key}#{expert}.B", (rows, spec.dim))
        gated = key.endswith("linear_fc1") and self.gated_fc1
        a_axis = 0 if column_parallel else 1
        a_local, b_local = _local(a, a_axis, rank, tp), _local(b, 0, rank, tp, gated)
        self._save(f"{key}.adapter.linear_in.weight", a_local, a_axis, expert, gated=False)
        self._save(f"{key}.adapter.linear_out.weight", b_local, 0, expert, gated=gated)
        with torch.no_grad():
            weight += spec.scale * (b_local @ a if column_parallel else b @ a_local)

    def _save(self, key: str, local, axis: int, expert: tuple[int, int] | None, *, gated: bool) -> None:
        from megatron.core.dist_checkpointing import ShardedTensor
        from megatron.core.transformer.mlp import apply_swiglu_sharded_factory

        prepend = () if expert is None else ((0, *expert),)
        sharded = ShardedTensor.from_rank_offsets(
            key,
            local.contiguous(),
            *prepend,
            (len(prepend) + axis, self.rank, self.spec.tp),
            replica_id=0,
            prepend_axis_num=len(prepend),
        )
        if gated:
            sharded = apply_swiglu_sharded_factory(sharded, prepend)
        self.state[key if expert is None else f"{key}#{expert[0]}"] = sharded


def _save_and_reference(spec: GdnAdapterSpec, base_root: str, save: str) -> None:
    import torch
    import yaml
    from megatron.core import dist_checkpointing
    from megatron.core import parallel_state as ps
    from megatron.core.ssm.gated_delta_net import GatedDeltaNet
    from megatron.core.transformer.moe.experts import SequentialMLP

    from tools.megatron_fixtures import _build_chunks, _init_parallel, _load_into, _rng_state, reference_logits

    tp, base = spec.tp, spec.base
    etp = tp if base.is_moe else None
    _init_parallel(tp, 1, 1, 1, etp)
    iteration = int((Path(base_root) / "latest_checkpointed_iteration.txt").read_text().strip())
    (model,) = _build_chunks(base, tp, 1, 1, 1, etp, randomize=False)
    _load_into([model], str(Path(base_root) / f"iter_{iteration:07d}"), base)
    model = model.float().eval()
    adapters = _Adapters(spec, ps.get_tensor_model_parallel_rank())
    for name, module in model.named_modules():
        if name.startswith("mtp."):
            continue
        if isinstance(module, GatedDeltaNet):
            prefix = f"decoder.layers.{module.layer_number - 1}.self_attention."
            adapters.wrap(module.in_proj.weight, prefix + "in_proj", module.layer_number - 1, True)
            adapters.wrap(module.out_proj.weight, prefix + "out_proj", module.layer_number - 1, False)
        elif isinstance(module, SequentialMLP):
            layer = int(name.split(".")[2])
            prefix = f"decoder.layers.{layer}.mlp.experts.experts."
            for e, expert in enumerate(module.local_experts):
                where = (e, module.num_local_experts)
                adapters.wrap(expert.linear_fc1.weight, prefix + "linear_fc1", layer, True, where)
                adapters.wrap(expert.linear_fc2.weight, prefix + "linear_fc2", layer, False, where)
    iter_dir = Path(save) / f"iter_{spec.iteration:07d}"
    if torch.distributed.get_rank() == 0:
        iter_dir.mkdir(parents=True, exist_ok=True)
    torch.distributed.barrier()
    common = {"checkpoint_version": 3.0, "iteration": spec.iteration}
    dist_checkpointing.save({"model": adapters.state, **common, "rng_state": _rng_state()}, str(iter_dir))
    ids, _ = reference_logits(Path(base_root))
    pos = torch.arange(REFERENCE_SEQ).unsqueeze(0).expand(REFERENCE_BATCH, -1)
    mask = torch.triu(torch.ones(REFERENCE_SEQ, REFERENCE_SEQ), diagonal=1).bool()[None, None]
    heads: list[torch.Tensor] = []  # the output layer's calls: MTP heads first, the main head last
    hook = model.output_layer.register_forward_hook(lambda m, i, out: heads.append(out[0].transpose(0, 1).clone()))
    with torch.no_grad():
        model(ids, position_ids=pos, attention_mask=mask, **({"labels": ids} if base.mtp_num_layers else {}))
    hook.remove()
    gathered = [torch.empty_like(heads[-1]) for _ in range(tp)]  # vocab-parallel logits
    torch.distributed.all_gather(gathered, heads[-1].contiguous(), group=ps.get_tensor_model_parallel_group())
    torch.distributed.barrier()
    if torch.distributed.get_rank() == 0:
        (iter_dir / "run_config.yaml").write_text(yaml.safe_dump(_run_config(spec, base_root, save), sort_keys=True))
        (Path(save) / "latest_checkpointed_iteration.txt").write_text(f"{spec.iteration}\n")
        logits = torch.cat(gathered, dim=-1).contiguous()
        torch.save({"input_ids": ids, "logits": logits}, Path(save).parent / REFERENCE_FILE)
    torch.distributed.barrier()


def _run_config(spec: GdnAdapterSpec, base_root: str, save: str) -> dict[str, Any]:
    """The parts of Megatron-Bridge's run_config.yaml a converter reads."""
    targets = ["in_proj", "out_proj"] + (["linear_fc1", "linear_fc2"] if spec.base.is_moe else [])
    return {
        "checkpoint": {"pretrained_checkpoint": base_root, "save": save, "ckpt_format": "torch_dist"},
        "model": {"tensor_model_parallel_size": spec.tp, "pipeline_model_parallel_size": 1},
        "peft": {
            "_target_": "megatron.bridge.peft.lora.LoRA",
            "alpha": spec.alpha,
            "dim": spec.dim,
            "dropout": 0.0,
            "target_modules": targets,
        },
    }
