"""Megatron-Bridge LoRA (PEFT) checkpoints for tests, written on CPU by megatron-core.

A Megatron-Bridge LoRA run saves only its adapters: per wrapped linear, ``<module>.adapter.linear_in.weight``
(A, ``[dim, in]``) and ``<module>.adapter.linear_out.weight`` (B, ``[out, dim]``), stacked with a leading
layer axis like the base weights, TP-sharded as the adapters were trained, plus a ``run_config.yaml`` whose
``checkpoint.pretrained_checkpoint`` names the base save root and whose ``peft:`` section holds alpha and
dim. This module writes such saves with megatron-core's own ``dist_checkpointing.save`` (one spawned gloo
rank per TP rank), for a base written by :func:`tools.megatron_fixtures.build_fixtures`, and computes the
reference: Megatron's own forward of the base with every targeted weight replaced by
``W + (alpha/dim)·B@A`` (rounded to the base dtype, as a merged checkpoint stores it).

Adapter values are generated globally (seeded, per layer) and each rank saves its slice; the reference
pass reads the saved tensors back with plain ``torch.distributed.checkpoint`` and checks that they equal
the generated ones before merging them. Megatron is imported only inside the spawned workers.

Layout under ``cache_dir/<spec.name>/``::

    adapter/latest_checkpointed_iteration.txt      # or combined/ with AdapterSpec(combined=True)
    adapter/latest_train_state.pt
    adapter/iter_0000020/{.metadata, __*_*.distcp, common.pt, metadata.json,
                          run_config.yaml, train_state.pt}
    reference.pt     # {"input_ids": [b, s], "logits": [b, s, padded_vocab] fp32}; same ids as the base's
    COMPLETE         # written last; its presence means "done"

``reference_logits(<save root>)`` from :mod:`tools.megatron_fixtures` reads ``reference.pt``.

Sharding on disk (global shapes are TP-invariant; L = layers):

=============================  ===================  ======================  =====================
target (module path)           A global / TP axis   B global / TP axis      B rows
=============================  ===================  ======================  =====================
self_attention.linear_qkv      [L, dim, h] / 0      [L, qkv, dim] / 0       [q|k|v] per group
self_attention.linear_proj     [L, dim, nd] / 1     [L, h, dim] / 0
mlp.linear_fc1                 [L, dim, h] / 0      [L, 2f, dim] / 0        [gate; up] (swiglu)
mlp.linear_fc2                 [L, dim, f] / 1      [L, h, dim] / 0
=============================  ===================  ======================  =====================

(h hidden, nd heads·head_dim, f ffn, qkv = (heads + 2·groups)·head_dim.) With a base of
``per_layer_keys`` the keys are ``decoder.layers.{i}.<module>.adapter.*`` without the layer axis.
"""

from __future__ import annotations

import dataclasses
import fcntl
import json
import logging
import os
import shutil
import time
import zlib
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tools.megatron_fixtures import (
    DENSE_FAMILIES,
    MARKER,
    REFERENCE_BATCH,
    REFERENCE_FILE,
    REFERENCE_SEQ,
    FixtureSpec,
    build_fixtures,
)

if TYPE_CHECKING:
    import torch

__all__ = [
    "ADAPTER_DIR",
    "COMBINED_DIR",
    "KINDS",
    "TARGET_MODULES",
    "AdapterSpec",
    "adapter_keys",
    "build_adapters",
    "global_adapters",
    "run_config",
]

KINDS = ("lora",)  # "canonical_lora", "dora" later
# Megatron-Bridge's target name -> the module path under decoder.layers.
TARGET_MODULES = {
    "linear_qkv": "self_attention.linear_qkv",
    "linear_proj": "self_attention.linear_proj",
    "linear_fc1": "mlp.linear_fc1",
    "linear_fc2": "mlp.linear_fc2",
}
ROW_PARALLEL = ("linear_proj", "linear_fc2")  # A split on its input axis; the rest on axis 0
ADAPTER_DIR = "adapter"
COMBINED_DIR = "combined"
RUN_CONFIG = "run_config.yaml"
A_STD, B_STD = 0.1, 0.05  # merge delta ≈ (alpha/dim)·sqrt(dim)·A_STD·B_STD ≈ 0.03 vs base weights' 0.08
MIN_LOGIT_CHANGE = 0.05  # the merge must move the reference logits at least this much (max abs)
_PROVIDERS = {
    "llama": "megatron.bridge.models.llama.llama_provider.LlamaModelProvider",
    "qwen2": "megatron.bridge.models.qwen.qwen_provider.Qwen2ModelProvider",
    "qwen3": "megatron.bridge.models.qwen.qwen_provider.Qwen3ModelProvider",
}
_TARGET_TAGS = {"linear_qkv": "qkv", "linear_proj": "proj", "linear_fc1": "fc1", "linear_fc2": "fc2"}

_log = logging.getLogger(__name__)


@dataclass(frozen=True)
class AdapterSpec:
    """One Megatron-Bridge PEFT save on top of a :class:`FixtureSpec` base.

    ``combined`` writes one save root holding the base model keys and the adapter keys together (at the
    adapter's TP, PP1; ``common.pt`` then carries Megatron-LM ``args`` too and ``run_config.yaml`` names no
    pretrained checkpoint) instead of an adapter-only save.
    """

    base: FixtureSpec
    kind: str = "lora"
    dim: int = 8
    alpha: int = 16
    targets: tuple[str, ...] = ("linear_qkv", "linear_proj", "linear_fc1", "linear_fc2")
    tp: int = 2  # training TP of the adapter save
    seed: int = 7
    iteration: int = 20
    combined: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.targets, list):
            object.__setattr__(self, "targets", tuple(self.targets))
        if self.kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {self.kind!r}")
        if self.base.family not in DENSE_FAMILIES:
            raise ValueError(f"adapters are written for dense bases only ({DENSE_FAMILIES}), not {self.base.family}")
        unknown = set(self.targets) - TARGET_MODULES.keys()
        if unknown or not self.targets or len(set(self.targets)) != len(self.targets):
            raise ValueError(f"targets must be distinct names from {tuple(TARGET_MODULES)}, got {self.targets}")
        if self.dim < 1 or self.tp < 1 or self.iteration < 1:
            raise ValueError("dim, tp and iteration must be >= 1")
        for target in self.targets:
            out, inp = _base_shape(self.base, target)
            split = (self.dim, out) if target not in ROW_PARALLEL else (inp, out)
            if any(n % self.tp for n in split):
                raise ValueError(f"{target}: A/B sizes {split} are not divisible by tp={self.tp}")
        if self.base.ffn_hidden_size % self.tp or self.base.num_query_groups % self.tp:
            raise ValueError(f"ffn_hidden_size and num_query_groups must be divisible by tp={self.tp}")

    @property
    def name(self) -> str:
        """Filesystem-safe, unique per spec; never equal to a base fixture's name."""
        parts = [self.kind, f"r{self.dim}a{self.alpha}", f"tp{self.tp}", f"s{self.seed}"]
        if self.targets != _DEFAULT_TARGETS:
            parts.append("t" + "_".join(_TARGET_TAGS[t] for t in self.targets))
        if self.iteration != 20:
            parts.append(f"it{self.iteration}")
        if self.combined:
            parts.append("combined")
        return "-".join(parts) + "--" + self.base.name

    @property
    def scale(self) -> float:
        return self.alpha / self.dim

    @property
    def save_dir(self) -> str:
        """The save root's directory name under ``cache_dir/<name>/``."""
        return COMBINED_DIR if self.combined else ADAPTER_DIR


_DEFAULT_TARGETS = next(f.default for f in dataclasses.fields(AdapterSpec) if f.name == "targets")


def _base_shape(base: FixtureSpec, target: str) -> tuple[int, int]:
    """(out, in) of the base weight a target wraps (global, Megatron layout)."""
    h, d = base.hidden_size, base.kv_channels
    heads, groups, f = base.num_attention_heads, base.num_query_groups, base.ffn_hidden_size
    return {
        "linear_qkv": ((heads + 2 * groups) * d, h),
        "linear_proj": (h, heads * d),
        "linear_fc1": (2 * f, h),
        "linear_fc2": (h, f),
    }[target]


def adapter_keys(spec: AdapterSpec) -> dict[str, tuple[int, ...]]:
    """Every tensor key the adapter save holds, with its global shape on disk."""
    n = spec.base.num_layers
    keys: dict[str, tuple[int, ...]] = {}
    for target in spec.targets:
        out, inp = _base_shape(spec.base, target)
        for part, shape in (("linear_in", (spec.dim, inp)), ("linear_out", (out, spec.dim))):
            if spec.base.per_layer_keys:
                for layer in range(n):
                    keys[_key(spec, target, part, layer)] = shape
            else:
                keys[_key(spec, target, part, None)] = (n, *shape)
    return keys


def _key(spec: AdapterSpec, target: str, part: str, layer: int | None) -> str:
    where = "decoder.layers" if layer is None else f"decoder.layers.{layer}"
    return f"{where}.{TARGET_MODULES[target]}.adapter.{part}.weight"


def global_adapters(spec: AdapterSpec) -> dict[tuple[str, int], tuple[torch.Tensor, torch.Tensor]]:
    """``{(target, layer): (A [dim, in], B [out, dim])}``: the global adapter values, in the base dtype.

    Deterministic (seeded by spec seed, target and layer), so every rank and the reference pass agree.
    """
    import torch

    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[spec.base.dtype]
    result = {}
    for target in spec.targets:
        out, inp = _base_shape(spec.base, target)
        for layer in range(spec.base.num_layers):
            a = _randn((spec.dim, inp), A_STD, spec.seed, spec.kind, target, layer, "A")
            b = _randn((out, spec.dim), B_STD, spec.seed, spec.kind, target, layer, "B")
            result[target, layer] = (a.to(dtype), b.to(dtype))
    return result


def _randn(shape: tuple[int, ...], std: float, *seed: object):
    import torch

    gen = torch.Generator().manual_seed(zlib.crc32("|".join(map(str, seed)).encode()))
    return std * torch.randn(shape, generator=gen, dtype=torch.float32)


def run_config(spec: AdapterSpec, base_root: Path | None, save_root: Path) -> dict[str, Any]:
    """The ``run_config.yaml`` content Megatron-Bridge writes (the parts a converter may read).

    ``base_root`` None leaves ``checkpoint.pretrained_checkpoint`` null (combined saves).
    ``peft.params_to_save`` is a set, so the YAML carries a ``!!set`` as Bridge's files do.
    """
    base = spec.base
    params = {
        f"decoder.layers.{layer}.{TARGET_MODULES[t]}.adapter.{part}.weight"
        for t in spec.targets
        for layer in range(base.num_layers)
        for part in ("linear_in", "linear_out")
    }
    dtype = {"fp32": "torch.float32", "bf16": "torch.bfloat16"}[base.dtype]
    return {
        "_target_": "megatron.bridge.training.config.ConfigContainer",
        "checkpoint": {
            "_target_": "megatron.bridge.training.config.CheckpointConfig",
            "async_save": False,
            "ckpt_format": "torch_dist",
            "finetune": False,
            "fully_parallel_save": True,
            "load": str(save_root),
            "pretrained_checkpoint": None if base_root is None else str(base_root),
            "save": str(save_root),
            "save_interval": spec.iteration,
            "save_optim": False,
            "save_rng": True,
        },
        "model": {
            "_target_": _PROVIDERS[base.family],
            "add_qkv_bias": base.family == "qwen2",
            "bf16": base.dtype == "bf16",
            "ffn_hidden_size": base.ffn_hidden_size,
            "gated_linear_unit": True,
            "hidden_size": base.hidden_size,
            "kv_channels": base.kv_channels,
            "layernorm_epsilon": 1e-6,
            "normalization": "RMSNorm",
            "num_attention_heads": base.num_attention_heads,
            "num_layers": base.num_layers,
            "num_query_groups": base.num_query_groups,
            "params_dtype": {"_call_": False, "_target_": dtype},
            "pipeline_model_parallel_size": 1,
            "qk_layernorm": base.qk_layernorm,
            "rotary_base": base.rotary_base,
            "seq_length": 64,
            "share_embeddings_and_output_weights": base.tied,
            "tensor_model_parallel_size": spec.tp,
            "vocab_size": base.vocab_size,
        },
        "peft": {
            "_target_": "megatron.bridge.peft.lora.LoRA",
            "a2a_experimental": False,
            "alpha": spec.alpha,
            "canonical_mapping": {},
            "dim": spec.dim,
            "dropout": 0.0,
            "dropout_position": "pre",
            "exclude_modules": [],
            "experts_shared_outer_loras": False,
            "lora_A_init_method": "xavier",
            "lora_B_init_method": "zero",
            "lora_dtype": None,
            "normalize_moe_lora": False,
            "params_to_save": params,
            "share_expert_adapters": True,
            "target_modules": list(spec.targets),
        },
        "train": {
            "_target_": "megatron.bridge.training.config.TrainingConfig",
            "global_batch_size": 8,
            "micro_batch_size": 1,
            "train_iters": spec.iteration,
        },
    }


# --------------------------------------------------------------------------- public API


def build_adapters(specs: Iterable[AdapterSpec], cache_dir: Path) -> dict[AdapterSpec, Path]:
    """Write every spec's PEFT save and merged-model reference logits under ``cache_dir/<spec.name>/``.

    1. The bases are built (or found) with :func:`build_fixtures` in the same ``cache_dir``.
    2. One spawn per adapter TP saves every pending spec of that TP (``dist_checkpointing.save`` at TP
       ranks), then rank 0 writes ``run_config.yaml``, ``train_state.pt`` and the tracker files.
    3. One single-rank spawn reads each save back, checks its tensors against :func:`global_adapters`,
       merges them into the base in Megatron's layout and runs Megatron's forward -> ``reference.pt``.

    Returns each spec's save root (``cache_dir/<name>/adapter``, or ``.../combined``). Complete specs
    (marker written last) are skipped; a file lock serialises concurrent callers.
    """
    cache_dir = Path(cache_dir).resolve()
    cache_dir.mkdir(parents=True, exist_ok=True)
    specs = list(dict.fromkeys(specs))
    base_roots = build_fixtures(list(dict.fromkeys(s.base for s in specs)), cache_dir)
    result = {s: cache_dir / s.name / s.save_dir for s in specs}
    with open(cache_dir / ".lora-build.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        todo = [s for s in specs if not (cache_dir / s.name / MARKER).exists()]
        if not todo:
            return result
        for s in todo:
            shutil.rmtree(cache_dir / s.name, ignore_errors=True)
            (cache_dir / s.name).mkdir(parents=True)
        jobs = {s: {"spec": s, "base_root": str(base_roots[s.base]), "save": str(result[s])} for s in todo}
        for tp in sorted({s.tp for s in todo}):
            _spawn(tp, "save", [jobs[s] for s in todo if s.tp == tp])
        _spawn(1, "reference", [jobs[s] for s in todo])
        for s in todo:
            record = {**dataclasses.asdict(s), "base": dataclasses.asdict(s.base), "base_root": str(base_roots[s.base])}
            (cache_dir / s.name / MARKER).write_text(json.dumps(record) + "\n")
    return result


# --------------------------------------------------------------------------- spawning


def _spawn(world: int, task: str, jobs: list[dict[str, Any]], timeout: float | None = None) -> None:
    """Run ``_worker`` on ``world`` ranks; re-raise worker errors, kill on timeout."""
    import torch.multiprocessing as mp

    from tools.megatron_fixtures import _free_port

    timeout = timeout if timeout is not None else 180 + 60 * len(jobs)
    ctx = mp.spawn(_worker, args=(world, _free_port(), task, jobs), nprocs=world, join=False)
    start = time.monotonic()
    while not ctx.join(timeout=1.0):
        if time.monotonic() - start > timeout:
            for p in ctx.processes:
                if p.is_alive():
                    p.kill()
            raise TimeoutError(f"megatron LoRA {task} workers (world={world}) exceeded {timeout:.0f}s")
    _log.info("megatron LoRA %s: world=%d, %d job(s), %.1fs", task, world, len(jobs), time.monotonic() - start)


# --------------------------------------------------------------------------- inside workers


def _worker(rank: int, world: int, port: int, task: str, jobs: list[dict[str, Any]]) -> None:
    """Entry point of every spawned rank."""
    import warnings
    from datetime import timedelta

    warnings.filterwarnings("ignore")
    import torch

    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(seconds=300))
    try:
        from tools.megatron_fixtures import _patch_megatron_for_cpu

        _patch_megatron_for_cpu()
        for job in jobs:
            (_save_job if task == "save" else _reference_job)(**job)
    finally:
        from megatron.core import parallel_state

        parallel_state.destroy_model_parallel()
        torch.distributed.destroy_process_group()


def _adapter_state(spec: AdapterSpec, tp: int, tp_rank: int) -> dict[str, Any]:
    """This TP rank's adapter ShardedTensors, as Megatron-Bridge's ParallelLinearAdapter shards them.

    fc1's B holds two chunks per rank (gate rows ``r`` and up rows ``r`` of ``2·tp``), as Megatron's
    swiglu sharded factory writes them.
    """
    state: dict[str, Any] = {}
    for (target, layer), (a, b) in global_adapters(spec).items():
        a_axis = 1 if target in ROW_PARALLEL else 0
        prefix = f"decoder.layers.{layer}.{TARGET_MODULES[target]}.adapter"
        a_local = a.chunk(tp, dim=a_axis)[tp_rank]
        state[f"{prefix}.linear_in.weight"] = _sharded(spec, target, "linear_in", layer, a_local, (a_axis, tp_rank, tp))
        if target == "linear_fc1":
            gate, up = (half.chunk(tp, dim=0)[tp_rank] for half in b.chunk(2, dim=0))
            state[f"{prefix}.linear_out.weight"] = [
                _sharded(spec, target, "linear_out", layer, gate, (0, tp_rank, 2 * tp)),
                _sharded(spec, target, "linear_out", layer, up, (0, tp_rank + tp, 2 * tp)),
            ]
        else:
            b_local = b.chunk(tp, dim=0)[tp_rank]
            state[f"{prefix}.linear_out.weight"] = _sharded(
                spec, target, "linear_out", layer, b_local, (0, tp_rank, tp)
            )
    return state


def _sharded(spec: AdapterSpec, target: str, part: str, layer: int, local, tp_offset: tuple[int, int, int]):
    """One layer's local chunk as a ShardedTensor; ``tp_offset`` = (axis of the 2-D tensor, index, count)."""
    from megatron.core.dist_checkpointing import ShardedTensor

    axis, index, count = tp_offset
    if spec.base.per_layer_keys:
        offsets, prepend = [(axis, index, count)], 0
    else:  # the stacked key: a leading layer axis, indexed by the global layer
        offsets, prepend = [(0, layer, spec.base.num_layers), (1 + axis, index, count)], 1
    return ShardedTensor.from_rank_offsets(
        _key(spec, target, part, None if prepend else layer),
        local.contiguous(),
        *offsets,
        replica_id=(0, 0, 0),
        prepend_axis_num=prepend,
    )


def _train_state(spec: AdapterSpec) -> dict[str, Any]:
    """Megatron-Bridge's ``TrainState.state_dict()`` (tensors only)."""
    import torch

    return {
        "step": torch.tensor(spec.iteration, dtype=torch.int32),
        "consumed_train_samples": torch.tensor(8 * spec.iteration, dtype=torch.int32),
        "skipped_train_samples": torch.tensor(0, dtype=torch.int32),
        "consumed_valid_samples": torch.tensor(0, dtype=torch.int32),
        "floating_point_operations_so_far": torch.tensor(0.0, dtype=torch.float32),
        "do_train": torch.tensor(True),
        "do_valid": torch.tensor(False),
        "do_test": torch.tensor(False),
    }


def _save_job(spec: AdapterSpec, base_root: str, save: str) -> None:
    """Save like Megatron-Bridge's ``save_checkpoint`` with PEFT (adapter filter applied)."""
    import torch
    import yaml
    from megatron.core import dist_checkpointing, parallel_state

    from tools.megatron_fixtures import _build_chunks, _init_parallel, _load_into, _make_args, _rng_state, _sd_metadata

    base = spec.base
    _init_parallel(spec.tp, 1, 1)
    tp_rank = parallel_state.get_tensor_model_parallel_rank()
    model: dict[str, Any] = {}
    common: dict[str, Any] = {"checkpoint_version": 3.0, "iteration": spec.iteration}
    if spec.combined:  # the base model re-saved at the adapter's layout, adapters beside its keys
        base_iteration = int((Path(base_root) / "latest_checkpointed_iteration.txt").read_text().strip())
        (chunk,) = _build_chunks(base, spec.tp, 1, 1, randomize=False)
        _load_into([chunk], str(Path(base_root) / f"iter_{base_iteration:07d}"), base)
        model.update(chunk.sharded_state_dict(metadata=dict(_sd_metadata(base))))
        args = _make_args(base, spec.tp, 1, 1, save)
        args.iteration = args.train_iters = spec.iteration
        common["args"] = args
    adapters = _adapter_state(spec, spec.tp, tp_rank)
    if model.keys() & adapters.keys():
        raise RuntimeError(f"adapter keys collide with model keys: {sorted(model.keys() & adapters.keys())[:3]}")
    model.update(adapters)
    iter_dir = Path(save) / f"iter_{spec.iteration:07d}"
    if torch.distributed.get_rank() == 0:
        iter_dir.mkdir(parents=True, exist_ok=True)
    torch.distributed.barrier()
    state = {"model": model, **common, "rerun_state_machine": None, "rng_state": _rng_state()}
    content_metadata = {
        "singleton_local_shards": False,
        "chained_optim_avoid_prefix": True,
        "distrib_optim_sharding_type": "fully_reshardable",
        "non_homogeneous_layers": base.per_layer_keys,
    }
    dist_checkpointing.save(state, str(iter_dir), content_metadata=content_metadata)
    torch.distributed.barrier()
    if torch.distributed.get_rank() == 0:
        config = run_config(spec, None if spec.combined else Path(base_root), Path(save))
        (iter_dir / RUN_CONFIG).write_text(yaml.safe_dump(config, sort_keys=True))
        torch.save(_train_state(spec), iter_dir / "train_state.pt")
        shutil.copy(iter_dir / "train_state.pt", Path(save) / "latest_train_state.pt")
        (Path(save) / "latest_checkpointed_iteration.txt").write_text(f"{spec.iteration}\n")
    torch.distributed.barrier()


def _read_global(iter_dir: Path, keys: Iterable[str]) -> dict[str, torch.Tensor]:
    """Global tensors of a torch_dist save, read with plain torch.distributed.checkpoint (no Megatron)."""
    import torch
    import torch.distributed.checkpoint as dcp

    reader = dcp.FileSystemReader(str(iter_dir))
    metadata = reader.read_metadata().state_dict_metadata
    state = {k: torch.empty(tuple(metadata[k].size), dtype=metadata[k].properties.dtype) for k in keys}
    dcp.load(state, storage_reader=reader, no_dist=True)
    return state


def _check_saved(spec: AdapterSpec, iter_dir: Path) -> dict[tuple[str, int], tuple[torch.Tensor, torch.Tensor]]:
    """Read the adapter tensors back and require them to equal :func:`global_adapters` bit for bit."""
    import torch
    import torch.distributed.checkpoint as dcp

    expected = adapter_keys(spec)
    stored = dcp.FileSystemReader(str(iter_dir)).read_metadata().state_dict_metadata
    found = {k for k in stored if ".adapter." in k}
    if found != set(expected):
        raise RuntimeError(
            f"adapter keys on disk differ: extra {found - set(expected)}, missing {set(expected) - found}"
        )
    tensors = _read_global(iter_dir, expected)
    problems = [f"{k}: {tuple(t.shape)} != {expected[k]}" for k, t in tensors.items() if tuple(t.shape) != expected[k]]
    adapters = global_adapters(spec)
    for (target, layer), pair in adapters.items():
        for part, want in zip(("linear_in", "linear_out"), pair):
            if spec.base.per_layer_keys:
                got = tensors[_key(spec, target, part, layer)]
            else:
                got = tensors[_key(spec, target, part, None)][layer]
            if got.dtype != want.dtype or not torch.equal(got, want):
                problems.append(f"{target} layer {layer} {part}: stored values differ from the generated ones")
    if problems:
        raise RuntimeError(f"{spec.name}: saved adapter check failed: " + "; ".join(problems[:5]))
    return adapters


def _reference_job(spec: AdapterSpec, base_root: str, save: str) -> None:
    """Megatron's own TP1/PP1 fp32 forward of the merged model -> ``cache_dir/<name>/reference.pt``.

    The base weights come from the base save (or, combined, from the combined save itself); every
    targeted weight becomes ``(W.float() + (alpha/dim)·B.float()@A.float()).to(W.dtype)`` in Megatron's
    layout (fused QKV rows interleaved per group, fc1 ``[gate; up]``: both exactly the global B rows).
    """
    import torch

    from tools.megatron_fixtures import _build_chunks, _init_parallel, _load_into

    base = spec.base
    _init_parallel(1, 1, 1)
    iter_dir = Path(save) / f"iter_{spec.iteration:07d}"
    adapters = _check_saved(spec, iter_dir)
    weights_root = Path(save) if spec.combined else Path(base_root)
    weights_iteration = int((weights_root / "latest_checkpointed_iteration.txt").read_text().strip())
    (model,) = _build_chunks(base, 1, 1, 1, randomize=False)
    _load_into([model], str(weights_root / f"iter_{weights_iteration:07d}"), base)
    with torch.no_grad():
        for (target, layer), (a, b) in adapters.items():
            module = model.decoder.layers[layer].get_submodule(TARGET_MODULES[target])
            w = module.weight
            if tuple(w.shape) != (b.shape[0], a.shape[1]):
                raise RuntimeError(
                    f"{target} layer {layer}: base {tuple(w.shape)} vs B {tuple(b.shape)} A {tuple(a.shape)}"
                )
            w.copy_((w.float() + spec.scale * (b.float() @ a.float())).to(w.dtype))
    model = model.float().eval()
    gen = torch.Generator().manual_seed(base.seed)  # the base reference's input ids
    ids = torch.randint(0, base.vocab_size, (REFERENCE_BATCH, REFERENCE_SEQ), generator=gen)
    pos = torch.arange(REFERENCE_SEQ).unsqueeze(0).expand(REFERENCE_BATCH, -1)
    mask = torch.triu(torch.ones(REFERENCE_SEQ, REFERENCE_SEQ), diagonal=1).bool()[None, None]
    with torch.no_grad():
        logits = model(ids, position_ids=pos, attention_mask=mask)
    expected = (REFERENCE_BATCH, REFERENCE_SEQ, base.padded_vocab_size)
    if tuple(logits.shape) != expected or logits.dtype != torch.float32 or not torch.isfinite(logits).all():
        raise RuntimeError(f"unexpected logits {tuple(logits.shape)} {logits.dtype}, want finite {expected}")
    base_ref = torch.load(Path(base_root).parent / REFERENCE_FILE, weights_only=True)
    if not torch.equal(base_ref["input_ids"], ids):
        raise RuntimeError("input ids differ from the base reference's")
    change = (logits - base_ref["logits"]).abs().max().item()
    if change < MIN_LOGIT_CHANGE:
        raise RuntimeError(f"{spec.name}: merging moved the logits by only {change:.3g}")
    data = {"input_ids": ids.clone(), "logits": logits.detach().clone().contiguous()}
    torch.save(data, Path(save).parent / REFERENCE_FILE)
