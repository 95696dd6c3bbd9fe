"""Megatron-Core checkpoints carrying ModelOpt quantizer state (`*_quantizer._amax`), written on CPU.

Two ways, both through megatron-core's own `dist_checkpointing.save` on spawned gloo ranks:

- ``source="modelopt"`` (dense families): real NVIDIA ModelOpt. `mtq.quantize` with FP8 (E4M3) static
  quantizers, calibrated by a forward pass, then saved as Megatron-LM does (model state, then
  `save_sharded_modelopt_state` into `iter_N/modelopt_state/`). ``weight_axis=0`` gives per-channel
  weight amax (ModelOpt's `FP8_DEFAULT_CFG` with the weight quantizer's axis set to 0).
- ``source="grouped"`` (MoE families): ModelOpt cannot quantize this layout on CPU (its SequentialMLP
  refuses TP together with EP, and grouped experts need Transformer Engine), so the amax tensors are
  written with the key names and sharding ModelOpt's megatron plugin uses: per-layer keys, a scalar
  `[1]` per linear replicated over TP, and for the experts one quantizer per EP rank's block of local
  experts (`mlp.experts.linear_fc1.weight_quantizer._amax`, global shape `[ep]`, EP rank r at offset r),
  as Megatron-Bridge's `MoeAmaxFanoutMapping` expects. Amax are max-calibrated like ModelOpt's: weight
  amax the max |w| of what the quantizer covers, input amax the max |input| over a calibration forward
  (Megatron's own, at the save layout), all-reduced over (expert) TP.

Layout: ``cache_dir/<spec.name>/ckpt`` (a save root; with ``base.legacy_twin`` also ``legacy/``, the
`--ckpt-format torch` save of the same quantized model) and a ``COMPLETE`` marker.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tools.megatron_fixtures import (
    LEGACY_DIR,
    FixtureSpec,
    _build_chunks,
    _init_parallel,
    _make_args,
    _model_state,
    _rng_state,
    _save_legacy,
    _sd_metadata,
    pending_builds,
)

CALIBRATION_BATCH, CALIBRATION_SEQ = 2, 16


@dataclass(frozen=True)
class QuantSpec:
    """A base fixture spec saved with quantizer state (see the module docstring for ``source``)."""

    base: FixtureSpec
    source: str = "modelopt"  # "modelopt" | "grouped"
    weight_axis: int | None = None  # None: per-tensor weight amax; 0: per output channel

    def __post_init__(self) -> None:
        if self.source not in ("modelopt", "grouped"):
            raise ValueError(f"source must be modelopt or grouped, got {self.source!r}")
        if (self.source == "grouped") != self.base.is_moe:
            raise ValueError("grouped amax is for MoE bases, ModelOpt quantization for dense ones")
        if self.source == "grouped" and self.weight_axis is not None:
            raise ValueError("grouped fixtures write per-tensor amax only")

    @property
    def name(self) -> str:
        axis = "" if self.weight_axis is None else f"-axis{self.weight_axis}"
        return f"quant-{self.source}{axis}--{self.base.name}"


def build_quant_fixtures(specs: Iterable[QuantSpec], cache_dir: Path) -> dict[QuantSpec, Path]:
    """Write every spec's save root ``cache_dir/<name>/ckpt`` (skipped when its marker exists); one spawn
    per spec (each is its own layout)."""
    from tools.megatron_fixtures import _spawn

    cache_dir = Path(cache_dir).resolve()
    cache_dir.mkdir(parents=True, exist_ok=True)
    specs = list(dict.fromkeys(specs))
    result = {s: cache_dir / s.name / "ckpt" for s in specs}
    with pending_builds(cache_dir, specs, ".quant-build.lock") as todo:
        for s in todo:
            _spawn(s.base.world_size, "save", [{"spec": s, "save": str(result[s])}], worker=_worker)
    return result


# --------------------------------------------------------------------------- inside workers


def _worker(rank: int, world: int, port: int, task: str, jobs: list[dict[str, Any]]) -> None:
    """Entry point of every spawned rank."""
    from tools.megatron_fixtures import cpu_rank

    with cpu_rank(rank, world, port):
        for job in jobs:
            _save_job(**job)


def _calibration_forward(model, spec: QuantSpec) -> None:
    """Megatron's forward of the calibration batch (eval mode: MoE with TP wants sequence parallel in training)."""
    import torch

    gen = torch.Generator().manual_seed(spec.base.seed)
    ids = torch.randint(0, spec.base.vocab_size, (CALIBRATION_BATCH, CALIBRATION_SEQ), generator=gen)
    pos = torch.arange(CALIBRATION_SEQ).unsqueeze(0).expand(CALIBRATION_BATCH, -1)
    mask = torch.triu(torch.ones(CALIBRATION_SEQ, CALIBRATION_SEQ), diagonal=1).bool()[None, None]
    model.eval()
    with torch.no_grad():
        model(ids, position_ids=pos, attention_mask=mask)


def _modelopt_quantize(model, spec: QuantSpec):
    """Real ModelOpt: FP8 static quantizers (per-tensor, or per-channel weights), max-calibrated."""
    import copy

    import modelopt.torch.quantization as mtq

    config = copy.deepcopy(mtq.FP8_DEFAULT_CFG)
    for entry in config["quant_cfg"]:
        if entry["quantizer_name"] == "*weight_quantizer":
            entry["cfg"]["axis"] = spec.weight_axis
    return mtq.quantize(model, config, lambda m: _calibration_forward(m, spec))


def _input_maxima(model, spec: QuantSpec) -> dict[str, Any]:
    """max |input| of every linear over the calibration batch (this rank's shard), by module name."""
    import torch

    seen: dict[str, torch.Tensor] = {}

    def record(name: str, module, args) -> None:
        if args[0].numel():  # an expert may get no tokens
            seen[name] = torch.maximum(seen.get(name, torch.zeros(())), args[0].detach().abs().max().float())

    hooks = [
        module.register_forward_pre_hook(lambda m, a, name=name: record(name, m, a))
        for name, module in model.named_modules()
        if name.endswith(("linear_qkv", "linear_proj", "linear_fc1", "linear_fc2"))
    ]
    _calibration_forward(model, spec)
    for hook in hooks:
        hook.remove()
    return seen


def _grouped_amax(model, spec: QuantSpec) -> dict[str, Any]:
    """ShardedTensors of per-tensor amax in ModelOpt's key names; experts: one quantizer per EP rank.

    Weight amax: max |w|; input amax: max |input| over the calibration batch; both all-reduced (MAX) over
    the (expert) TP group, as ModelOpt's max calibration syncs them.
    """
    import torch
    from megatron.core import parallel_state as ps
    from megatron.core.dist_checkpointing import ShardedTensor

    tp_rank, dp_rank = ps.get_tensor_model_parallel_rank(), ps.get_data_parallel_rank(with_context_parallel=True)
    ep, ep_rank = ps.get_expert_model_parallel_world_size(), ps.get_expert_model_parallel_rank()
    etp_rank, edp_rank = ps.get_expert_tensor_parallel_rank(), ps.get_expert_data_parallel_rank()
    inputs = _input_maxima(model, spec)
    out: dict[str, Any] = {}

    def synced(values: list, group) -> torch.Tensor:
        value = torch.stack([v.detach().float().abs().max() for v in values]).max().reshape(1)
        torch.distributed.all_reduce(value, op=torch.distributed.ReduceOp.MAX, group=group)
        return value

    for layer in model.decoder.layers:
        prefix = f"decoder.layers.{layer.layer_number - 1}."
        for name in ("self_attention.linear_qkv", "self_attention.linear_proj"):
            group = ps.get_tensor_model_parallel_group()
            amax = {"weight": [layer.get_submodule(name).weight], "input": [inputs[prefix + name]]}
            for kind, values in amax.items():
                key = f"{prefix}{name}.{kind}_quantizer._amax"
                out[key] = ShardedTensor.from_rank_offsets(key, synced(values, group), replica_id=(0, tp_rank, dp_rank))
        experts = layer.mlp.experts.local_experts
        for name in ("linear_fc1", "linear_fc2"):
            group = ps.get_expert_tensor_parallel_group()
            local = [f"{prefix}mlp.experts.local_experts.{j}.{name}" for j in range(len(experts))]
            amax = {
                "weight": [expert.get_submodule(name).weight for expert in experts],
                "input": [inputs.get(n, torch.zeros(())) for n in local],
            }
            for kind, values in amax.items():
                key = f"{prefix}mlp.experts.{name}.{kind}_quantizer._amax"
                out[key] = ShardedTensor.from_rank_offsets(
                    key, synced(values, group), (0, ep_rank, ep), replica_id=(0, etp_rank, edp_rank)
                )
    return out


def _save_job(spec: QuantSpec, save: str) -> None:
    """Build the base model, quantize (or attach grouped amax), and save like Megatron-LM's training loop."""
    import torch
    from megatron.core import dist_checkpointing

    base = spec.base
    _init_parallel(base.tp, base.pp, base.vpp, base.ep, base.etp)
    (model,) = _build_chunks(base, base.tp, base.pp, base.vpp, base.ep, base.etp, randomize=True)
    state = {}
    if spec.source == "modelopt":
        model = _modelopt_quantize(model, spec)
    else:
        state = {"model": _grouped_amax(model, spec)}
    args = _make_args(base, base.tp, base.pp, base.vpp, save, base.ep, base.etp)
    iter_dir = Path(save) / f"iter_{base.iteration:07d}"
    if torch.distributed.get_rank() == 0:
        iter_dir.mkdir(parents=True, exist_ok=True)
    torch.distributed.barrier()
    model_state = _model_state([model], base)
    model_state["model"].update(state.get("model", {}))
    common = {"args": args, "checkpoint_version": 3.0, "iteration": base.iteration}
    dist_checkpointing.save(
        {**model_state, **common, "rng_state": _rng_state()}, str(iter_dir), content_metadata=_sd_metadata(base)
    )
    if spec.source == "modelopt":
        from modelopt.torch.opt.plugins.mcore_dist_checkpointing import save_sharded_modelopt_state

        save_sharded_modelopt_state([model], str(iter_dir))
    roots = [Path(save)]
    if base.legacy_twin:  # quantizer buffers in the per-rank state dicts
        roots.append(Path(save).parent / LEGACY_DIR)
        _save_legacy([model], args, roots[-1], base.iteration, base.pp, base.ep)
    torch.distributed.barrier()
    if torch.distributed.get_rank() == 0:
        for root in roots:
            (root / "latest_checkpointed_iteration.txt").write_text(f"{base.iteration}\n")
    torch.distributed.barrier()
