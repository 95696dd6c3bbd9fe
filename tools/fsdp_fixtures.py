"""Megatron-FSDP `--ckpt-format fsdp_dtensor` saves of a cached torch_dist fixture's weights, for tests.

Which path writes them, and why: megatron-core 0.16.1's own Megatron-FSDP cannot run here. `MegatronFSDP`
puts its buffers on `torch.cuda.current_device()` and creates `torch.cuda.Stream()`s when it is built
(`distributed/fsdp/src/megatron_fsdp/megatron_fsdp.py`), which CPU torch refuses. So the save is rebuilt
from the pieces that do run on CPU, under the conventions of core's `transformer/fsdp_dtensor_checkpoint.py`
and Megatron-LM's `tools/checkpoint/checkpoint_inspector.py` (formats/fsdp_dtensor.md):

- each of ``world`` gloo ranks builds the fixture's megatron-core GPTModel at TP ``tp`` PP1 EP ``ep`` (data
  parallel ``world // tp``; experts over ``world // ep`` expert-data-parallel ranks, in a buffer of their own) and loads the torch_dist fixture into it with megatron-core's own loader (which reshards);
- the model's own `state_dict()` is the model state, under `model.module.` (layers numbered globally, never
  stacked); experts get their global ids through core's `handle_experts_in_state_dict`; `_extra_state` is
  dropped as core's `handle_fp8_extra_state_case` drops it; the SwiGLU fc1 is split into `<key>_w` (gate) and
  `<key>_v` (up) as core's `handle_swiglu_in_state_dict` splits it (which needs a live Megatron-FSDP
  parameter, hence done here): each TP rank's `[gate_t; up_t]` rows in halves, each half cut over TP;
- every tensor becomes a real DTensor on a (dp, tp) CPU device mesh, its TP-local rows sharded over DP the way
  Megatron-FSDP shards its flat buffer: all TP-local parameters laid end to end, the buffer cut into DP-size
  equal element ranges and each row given to the rank whose range holds the row's first element, so chunks
  are UNEVEN (most tensors sit on one rank, some are cut unevenly, ranks with no rows write nothing); core's
  own `update_uneven_dtensor_chunk_metadata` gives each its chunk offsets (TP's added in), as
  `make_fsdp_dtensor` does;
- Adam state under `optimizer.state.module.module.module.<key>.exp_avg`, same chunks; args with
  `use_megatron_fsdp=True` and `ckpt_format="fsdp_dtensor"`, `iteration`, `checkpoint_version` as DCP objects,
  and one explicit `io.BytesIO` record (as the inspector writes non-tensor values); then `dcp.save`.

With ``grouped_experts`` the experts (megatron-core's SequentialMLP on CPU, `local_experts.{e}.`) are
renamed as Transformer Engine's TEGroupedMLP, which real runs use, names them: `linear_fc1.weight{e}_w`.
With ``mtp_model_layer`` the MTP block's layer is saved as `mtp_model_layer`, as Megatron-LM main named it
before core mapped it back to `transformer_layer` on disk (`handle_mtp_in_state_dict`); core 0.16.1 itself
calls it `transformer_layer`. The same weights' Megatron forward is the torch_dist fixture's reference.
"""

from __future__ import annotations

import dataclasses
import io
import math
import re
from pathlib import Path
from typing import Any

from tools.megatron_fixtures import (
    FixtureSpec,
    _build_chunks,
    _init_parallel,
    _load_into,
    _make_args,
    _spawn,
    cpu_rank,
    pending_builds,
)

__all__ = ["FsdpSpec", "build_fsdp_fixtures", "flat_row_owners"]

_SWIGLU = re.compile(r"\.mlp\.(?:shared_experts\.|experts\.(?:local_experts\.\d+\.)?)?linear_fc1\.(?:weight|bias)\d*$")
_GROUPED_NAME = re.compile(r"local_experts\.(\d+)\.linear_fc([12])\.(weight|bias)(_w|_v)?$")
OPTIMIZER_PREFIX = "optimizer.state.module.module.module."


@dataclasses.dataclass(frozen=True)
class FsdpSpec:
    """An fsdp_dtensor save of ``base``'s weights by ``world`` ranks: TP ``tp`` times DP ``world // tp``."""

    base: FixtureSpec
    world: int = 3
    tp: int = 1
    ep: int = 1  # with TP1 only
    mtp_model_layer: bool = False
    grouped_experts: bool = False  # experts named as TEGroupedMLP names them (`linear_fc1.weight{e}`)

    def __post_init__(self) -> None:
        if self.ep > 1 and self.tp > 1:
            raise ValueError("expert parallelism is written at TP1 only")

    @property
    def name(self) -> str:
        tags = (
            f"-tp{self.tp}" * (self.tp > 1)
            + f"-ep{self.ep}" * (self.ep > 1)
            + "-mtpml" * self.mtp_model_layer
            + "-grouped" * self.grouped_experts
        )
        return f"fsdp-w{self.world}{tags}--{self.base.name}"


def build_fsdp_fixtures(specs: list[FsdpSpec], cache_dir: Path, checkpoints: dict) -> dict[FsdpSpec, Path]:
    """Each spec's save root (``cache_dir/<name>/ckpt``), written once (cached like the other fixtures)."""
    cache_dir = Path(cache_dir).resolve()
    result = {s: cache_dir / s.name / "ckpt" for s in specs}
    with pending_builds(cache_dir, specs, ".fsdp.lock", _record) as todo:
        for spec in todo:
            job = {"spec": spec, "load": str(checkpoints[spec.base]), "save": str(result[spec])}
            _spawn(spec.world, "fsdp", [job], worker=_worker)
    return result


def _record(spec: FsdpSpec) -> dict[str, Any]:
    return {**dataclasses.asdict(spec), "base": spec.base.name}


def flat_row_owners(shapes: list[tuple[int, ...]], world: int) -> list[list[int]]:
    """For each tensor (in buffer order), the rank owning each of its rows: the buffer of all tensors end to
    end is cut into ``world`` equal element ranges, and a row belongs to the range of its first element."""
    total = sum(math.prod(s) for s in shapes)
    per_rank = -(-total // world)
    owners, start = [], 0
    for shape in shapes:
        rows = shape[0] if shape else 1
        row_size = math.prod(shape) // rows if rows else 0
        owners.append([min((start + r * row_size) // per_rank, world - 1) for r in range(rows)])
        start += math.prod(shape)
    return owners


def _worker(rank: int, world: int, port: int, task: str, jobs: list[dict[str, Any]]) -> None:
    with cpu_rank(rank, world, port):
        for job in jobs:
            _save_fsdp(**job)


def _model_state(spec: FsdpSpec, load: str) -> tuple[dict[str, tuple[Any, int | None]], Any]:
    """This TP rank's model state with core's fsdp_dtensor renames, each tensor with the axis TP cuts it along
    (None: replicated), and the save's args."""
    from megatron.core.transformer.fsdp_dtensor_checkpoint import handle_experts_in_state_dict

    base, tp, ep = spec.base, spec.tp, spec.ep
    _init_parallel(tp, 1, 1, ep, tp)
    (model,) = _build_chunks(base, tp, 1, 1, ep, tp, randomize=False)
    iteration = int((Path(load) / "latest_checkpointed_iteration.txt").read_text().strip())
    _load_into([model], str(Path(load) / f"iter_{iteration:07d}"), base)
    params = dict(model.named_parameters())
    state = {k: v for k, v in model.state_dict().items() if not k.endswith("_extra_state")}
    axes = {
        k: params[k].partition_dim if getattr(params.get(k), "tensor_model_parallel", False) else None for k in state
    }
    split = {}
    for key, value in state.items():
        if _SWIGLU.search(key):  # this TP rank's [gate_t; up_t]: gate_t to `_w`, up_t to `_v`, both cut along rows
            gate, up = value.chunk(2, dim=0)
            split[f"{key}_w"], split[f"{key}_v"] = (gate, axes[key]), (up, axes[key])
        else:
            split[key] = (value, axes[key])
    split = handle_experts_in_state_dict(split, base.num_experts)  # local expert ids -> global ones
    if spec.grouped_experts:  # TEGroupedMLP's own names: the expert id after `weight` / `bias`, before `_w` / `_v`
        split = {_GROUPED_NAME.sub(r"linear_fc\2.\3\1\4", k): v for k, v in split.items()}
    if spec.mtp_model_layer:
        split = {
            re.sub(r"^(mtp\.layers\.\d+\.)transformer_layer\.", r"\1mtp_model_layer.", k): v for k, v in split.items()
        }
    args = _make_args(base, tp, 1, 1, str(Path(load)), ep, tp)
    args.use_megatron_fsdp, args.ckpt_format = True, "fsdp_dtensor"
    args.data_parallel_size, args.world_size = spec.world // tp, spec.world
    return split, args


def _save_fsdp(spec: FsdpSpec, load: str, save: str) -> None:
    import torch
    import torch.distributed.checkpoint as dcp
    from megatron.core import parallel_state
    from megatron.core.distributed.fsdp.src.megatron_fsdp.uneven_dtensor import update_uneven_dtensor_chunk_metadata
    from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
    from torch.distributed.tensor import DTensor, Replicate, Shard

    model, args = _model_state(spec, load)
    # TP ranks adjacent, as megatron-core's parallel_state numbers them: mesh rows are TP groups
    meshes = {False: init_device_mesh("cpu", (spec.world // spec.tp, spec.tp), mesh_dim_names=("dp", "tp"))}
    if spec.ep > 1:  # experts: a buffer of their own, sharded over the expert-data-parallel group
        group = parallel_state.get_expert_data_parallel_group()
        meshes[True] = DeviceMesh.from_group(group, "cpu", mesh_dim_names=("edp",))
    is_expert = {key: spec.ep > 1 and ".mlp.experts." in key for key in model}
    owners: dict[str, list[int]] = {}
    for expert, mesh in meshes.items():
        keys = [key for key in model if is_expert[key] == expert]
        owners.update(zip(keys, flat_row_owners([tuple(model[k][0].shape) for k in keys], mesh.size(0))))

    def shard(value: torch.Tensor, axis: int | None, rows: list[int], mesh: DeviceMesh) -> DTensor:
        """The DTensor Megatron-FSDP saves: this DP rank's rows of the TP-local tensor, on the (dp, tp) mesh."""
        mine = [r for r, owner in enumerate(rows) if owner == mesh.get_local_rank(0)]
        local = value.reshape(-1, *value.shape[1:])[mine[0] : mine[-1] + 1] if mine else value[:0]
        shape = list(value.shape)
        if axis is not None:
            shape[axis] *= spec.tp
        placements = [Shard(0), Replicate() if axis is None else Shard(axis)][: mesh.ndim]
        stride = torch.empty(shape, device="meta").stride()
        tensor = DTensor.from_local(
            local.contiguous(), mesh, placements, run_check=False, shape=tuple(shape), stride=stride
        )
        update_uneven_dtensor_chunk_metadata(tensor)
        return tensor

    state: dict[str, Any] = {}
    for key, (value, axis) in model.items():
        mesh, rows = meshes[is_expert[key]], owners[key]
        state[f"model.module.{key}"] = shard(value.detach(), axis, rows, mesh)
        state[f"{OPTIMIZER_PREFIX}{key}.exp_avg"] = shard(
            torch.zeros_like(value, dtype=torch.float32), axis, rows, mesh
        )
    buffer = io.BytesIO()
    torch.save({"num_floating_point_operations_so_far": 0}, buffer)
    state.update(args=args, checkpoint_version=3.0, iteration=args.iteration, opt_param_scheduler=buffer)
    iter_dir = Path(save) / f"iter_{args.iteration:07d}"
    dcp.save(state, checkpoint_id=iter_dir)
    torch.distributed.barrier()
    if torch.distributed.get_rank() == 0:
        (Path(save) / "latest_checkpointed_iteration.txt").write_text(f"{args.iteration}\n")
