"""Real Megatron-Core ``torch_dist`` checkpoints for tests, written on CPU.

The converter under test must never depend on megatron, but its fixtures must be
exactly what Megatron writes. So this module drives real megatron-core (CPU,
gloo, one spawned process per rank) to build tiny GPT models, save them the way
Megatron-LM's training loop does, and compute Megatron's own forward as the
reference. Megatron is imported only inside the spawned workers, so importing
this module stays cheap.

Layout under ``cache_dir/<spec.name>/``::

    ckpt/latest_checkpointed_iteration.txt
    ckpt/iter_0000010/...        # the torch_dist checkpoint
    reference.pt                 # {"input_ids": [b, s], "logits": [b, s, padded_vocab] fp32}
    COMPLETE                     # written last; its presence means "done"
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import fcntl
import json
import logging
import os
import shutil
import socket
import time
import zlib
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

FAMILIES = ("llama", "qwen2", "qwen3")
MAKE_VOCAB_SIZE_DIVISIBLE_BY = 128
MARKER = "COMPLETE"
REFERENCE_FILE = "reference.pt"
REFERENCE_BATCH, REFERENCE_SEQ = 2, 12
SEQ_LENGTH = 64
INIT_METHOD_STD = 0.08

_log = logging.getLogger(__name__)

# Short tags for non-default size fields, so that `FixtureSpec.name` stays unique.
_NAME_TAGS = {
    "num_layers": "L",
    "hidden_size": "h",
    "ffn_hidden_size": "f",
    "num_attention_heads": "a",
    "num_query_groups": "g",
    "seed": "s",
    "iteration": "it",
    "per_layer_keys": "perlayer",
    "common_in_dcp": "commondcp",
}


@dataclass(frozen=True)
class FixtureSpec:
    """One tiny GPT checkpoint: model family, training layout and sizes."""

    family: str  # "llama" | "qwen2" | "qwen3"
    tp: int = 1
    pp: int = 1
    vpp: int = 1  # virtual pipeline stages per pp rank (1 = none)
    dtype: str = "fp32"  # "fp32" | "bf16": params dtype of the saved checkpoint
    tied: bool = False  # share_embeddings_and_output_weights
    vocab_size: int = 256  # the true vocab; padded as Megatron-LM does
    num_layers: int = 4
    hidden_size: int = 64
    ffn_hidden_size: int = 96
    num_attention_heads: int = 8
    num_query_groups: int = 2
    seed: int = 1234
    iteration: int = 10
    per_layer_keys: bool = False  # decoder.layers.<i>.<sub> keys instead of one stacked [L, ...] key
    common_in_dcp: bool = False  # core 0.19 layout: common state inside the DCP files, no common.pt

    def __post_init__(self) -> None:
        # Fail in the parent, not deep inside a spawned rank.
        if self.family not in FAMILIES:
            raise ValueError(f"family must be one of {FAMILIES}, got {self.family!r}")
        if self.dtype not in ("fp32", "bf16"):
            raise ValueError(f"dtype must be fp32 or bf16, got {self.dtype!r}")
        _check_layout(self, self.tp, self.pp, self.vpp)

    @property
    def name(self) -> str:
        """Filesystem-safe name, unique per spec (non-default sizes are appended)."""
        parts = [
            self.family,
            f"tp{self.tp}pp{self.pp}vpp{self.vpp}",
            self.dtype,
            "tied" if self.tied else "untied",
            f"v{self.vocab_size}",
        ]
        for field, tag in _NAME_TAGS.items():
            value = getattr(self, field)
            if value != _DEFAULTS[field]:
                parts.append(f"{tag}{value}")
        return "-".join(parts)

    @property
    def padded_vocab_size(self) -> int:
        """Vocab as stored on disk: padded for the *training* TP, like Megatron-LM."""
        return pad_vocab_size(self.vocab_size, self.tp)

    @property
    def kv_channels(self) -> int:
        """Head dim (Megatron's default: hidden / heads)."""
        return self.hidden_size // self.num_attention_heads

    @property
    def rotary_base(self) -> int:
        """The rope theta typical of the family."""
        return 500000 if self.family == "llama" else 1000000


_DEFAULTS = {f.name: f.default for f in dataclasses.fields(FixtureSpec)}


def pad_vocab_size(vocab_size: int, tp: int, divisible_by: int = MAKE_VOCAB_SIZE_DIVISIBLE_BY) -> int:
    """Megatron-LM's ``_vocab_size_with_padding``: round up to a multiple of divisible_by * tp."""
    multiple = divisible_by * tp
    return -(-vocab_size // multiple) * multiple


def _check_layout(spec: FixtureSpec, tp: int, pp: int, vpp: int) -> None:
    if min(tp, pp, vpp) < 1:
        raise ValueError("tp, pp and vpp must be >= 1")
    if vpp > 1 and pp == 1:
        raise ValueError("virtual pipeline stages need pp > 1")
    if spec.num_layers % (pp * vpp):
        raise ValueError(f"num_layers={spec.num_layers} not divisible by pp*vpp={pp * vpp}")
    if spec.num_attention_heads % tp or spec.num_query_groups % tp:
        raise ValueError("attention heads and query groups must be divisible by tp")
    if spec.ffn_hidden_size % tp:
        raise ValueError("ffn_hidden_size must be divisible by tp")
    if spec.hidden_size % spec.num_attention_heads:
        raise ValueError("hidden_size must be divisible by num_attention_heads")
    if pad_vocab_size(spec.vocab_size, spec.tp) % tp:
        raise ValueError("padded vocab must be divisible by tp")


# --------------------------------------------------------------------------- public API


def build_fixtures(specs: Iterable[FixtureSpec], cache_dir: Path) -> dict[FixtureSpec, Path]:
    """Write every spec's checkpoint and reference logits under ``cache_dir/<spec.name>/``.

    Returns each spec's save root (``cache_dir/<name>/ckpt``). Specs whose directory is
    complete (marker file written last) are skipped; incomplete ones are rebuilt. One
    spawn per (tp, pp, vpp) layout writes all its specs, then a single 1-process spawn
    computes Megatron's reference logits for all of them (process start-up dominates).
    A file lock serialises concurrent callers (e.g. pytest-xdist workers).
    """
    cache_dir = Path(cache_dir).resolve()
    cache_dir.mkdir(parents=True, exist_ok=True)
    specs = list(dict.fromkeys(specs))
    result = {s: cache_dir / s.name / "ckpt" for s in specs}
    with open(cache_dir / ".build.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        todo = [s for s in specs if not (cache_dir / s.name / MARKER).exists()]
        if not todo:
            return result
        for s in todo:
            shutil.rmtree(cache_dir / s.name, ignore_errors=True)
            (cache_dir / s.name).mkdir(parents=True)
        layouts: dict[tuple[int, int, int], list[FixtureSpec]] = {}
        for s in todo:
            layouts.setdefault((s.tp, s.pp, s.vpp), []).append(s)
        for (tp, pp, vpp), group in layouts.items():
            jobs = [{"spec": s, "load": None, "save": str(result[s]), "tp": tp, "pp": pp, "vpp": vpp} for s in group]
            _spawn(tp * pp, "save", jobs)
        _spawn(1, "reference", [{"spec": s, "root": str(result[s])} for s in todo])
        for s in todo:
            if s.common_in_dcp:
                _drop_common_pt(result[s] / f"iter_{s.iteration:07d}")
        for s in todo:
            (cache_dir / s.name / MARKER).write_text(json.dumps(dataclasses.asdict(s)) + "\n")
    return result


def write_checkpoint(spec: FixtureSpec, root: Path) -> Path:
    """Save one spec's checkpoint at ``root`` (save-root layout), without reference logits.

    For checked-in examples; tests should use :func:`build_fixtures` (cached). Returns root.
    """
    root = Path(root).resolve()
    root.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(root / f"iter_{spec.iteration:07d}", ignore_errors=True)
    job = {"spec": spec, "load": None, "save": str(root), "tp": spec.tp, "pp": spec.pp, "vpp": spec.vpp}
    _spawn(spec.tp * spec.pp, "save", [job])
    return root


def _drop_common_pt(iter_dir: Path) -> None:
    """Finish the core-0.19 layout once the reference pass (megatron 0.16 needs common.pt) is done."""
    (iter_dir / "common.pt").unlink()
    (iter_dir / "metadata.json").write_text(json.dumps({"sharded_backend": "torch_dist", "sharded_backend_version": 1}))


def reshard(src_root: Path, spec: FixtureSpec, dst_root: Path, *, tp: int, pp: int, vpp: int = 1) -> Path:
    """Re-save ``src_root`` (a save root written for ``spec``) at layout tp/pp/vpp.

    Megatron's own ``dist_checkpointing.load`` does the resharding, so two saves of the
    same weights at different layouts can be compared. The padded vocab is kept (it was
    fixed by the training TP); the saved args get the new parallel sizes. Returns dst_root.
    """
    _check_layout(spec, tp, pp, vpp)
    src_root, dst_root = Path(src_root).resolve(), Path(dst_root).resolve()
    iteration = int((src_root / "latest_checkpointed_iteration.txt").read_text().strip())
    dst_root.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(dst_root / f"iter_{iteration:07d}", ignore_errors=True)
    job = {"spec": spec, "load": str(src_root), "save": str(dst_root), "tp": tp, "pp": pp, "vpp": vpp}
    _spawn(tp * pp, "save", [job])
    return dst_root


def reference_logits(fixture_dir: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """``(input_ids [b, s], logits [b, s, padded_vocab] fp32)`` of Megatron's forward.

    Accepts the fixture dir (``cache_dir/<name>``) or its ``ckpt`` save root.
    """
    import torch

    fixture_dir = Path(fixture_dir)
    path = fixture_dir / REFERENCE_FILE
    if not path.exists():
        path = fixture_dir.parent / REFERENCE_FILE
    data = torch.load(path, weights_only=True)
    return data["input_ids"], data["logits"]


# --------------------------------------------------------------------------- spawning


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _spawn(world: int, task: str, jobs: list[dict[str, Any]], timeout: float | None = None) -> None:
    """Run ``_worker`` on ``world`` ranks; re-raise worker errors, kill on timeout."""
    import torch.multiprocessing as mp

    timeout = timeout if timeout is not None else 180 + 60 * len(jobs)
    ctx = mp.spawn(_worker, args=(world, _free_port(), task, jobs), nprocs=world, join=False)
    start = time.monotonic()
    while not ctx.join(timeout=1.0):  # join raises ProcessRaisedException on worker errors
        if time.monotonic() - start > timeout:
            for p in ctx.processes:
                if p.is_alive():
                    p.kill()
            raise TimeoutError(f"megatron {task} workers (world={world}) exceeded {timeout:.0f}s")
    _log.info("megatron %s: world=%d, %d job(s), %.1fs", task, world, len(jobs), time.monotonic() - start)


# --------------------------------------------------------------------------- inside workers


def _worker(rank: int, world: int, port: int, task: str, jobs: list[dict[str, Any]]) -> None:
    """Entry point of every spawned rank."""
    import warnings
    from datetime import timedelta

    warnings.filterwarnings("ignore")  # megatron/apex/TE fallbacks and DCP deprecations: noise here
    import torch

    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(seconds=300))
    try:
        _patch_megatron_for_cpu()
        if task == "save":
            for job in jobs:
                _save_job(**job)
        elif task == "reference":
            for job in jobs:
                _reference_job(**job)
        else:
            raise ValueError(task)
    finally:
        from megatron.core import parallel_state

        parallel_state.destroy_model_parallel()
        torch.distributed.destroy_process_group()


def _patch_megatron_for_cpu() -> None:
    """megatron-core assumes CUDA in a few harmless places; neutralise them on CPU torch."""
    import torch
    from megatron.core.tensor_parallel import random as mrandom

    torch.cuda.synchronize = lambda *a, **k: None  # async filesystem writer
    torch.cuda.current_device = lambda: "cpu"  # save finalizer allocates a flag tensor there
    # Tied embeddings with PP > 1: LanguageModule moves the shared weight to .cuda() before
    # the first/last-stage all-reduce.
    torch.Tensor.cuda = lambda self, *a, **k: self

    @contextlib.contextmanager
    def _fork(self, name: str = "model-parallel-rng"):  # no CUDA RNG states on CPU
        yield

    mrandom.CudaRNGStatesTracker.fork = _fork


def _init_parallel(tp: int, pp: int, vpp: int) -> None:
    from megatron.core import parallel_state

    if parallel_state.model_parallel_is_initialized():
        if (
            parallel_state.get_tensor_model_parallel_world_size() == tp
            and parallel_state.get_pipeline_model_parallel_world_size() == pp
            and (parallel_state.get_virtual_pipeline_model_parallel_world_size() or 1) == vpp
        ):
            return
        parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=pp,
        virtual_pipeline_model_parallel_size=vpp if vpp > 1 else None,
    )


def _crc_seed(*parts: object) -> int:
    return zlib.crc32("|".join(map(str, parts)).encode())


def _torch_dtype(name: str) -> torch.dtype:
    import torch

    return {"fp32": torch.float32, "bf16": torch.bfloat16}[name]


def _build_chunks(spec: FixtureSpec, tp: int, pp: int, vpp: int, *, randomize: bool) -> list:
    """Build this rank's GPTModel chunk(s) at the given layout, in the checkpoint's dtype.

    Built in fp32 and cast afterwards, as Megatron-LM's Float16Module does (norms end up
    in the params dtype too). With ``randomize``, norm weights become 1 + 0.3·randn and
    biases 0.2·randn so a wrong mapping cannot hide behind ones and zeros.
    """
    import torch
    import torch.nn.functional as F
    from megatron.core import parallel_state
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer import TransformerConfig

    config = TransformerConfig(
        num_layers=spec.num_layers,
        hidden_size=spec.hidden_size,
        ffn_hidden_size=spec.ffn_hidden_size,
        num_attention_heads=spec.num_attention_heads,
        num_query_groups=spec.num_query_groups,
        kv_channels=spec.kv_channels,
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=pp,
        virtual_pipeline_model_parallel_size=vpp if vpp > 1 else None,
        normalization="RMSNorm",
        layernorm_epsilon=1e-6,
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        add_qkv_bias=spec.family == "qwen2",
        qk_layernorm=spec.family == "qwen3",
        hidden_dropout=0.0,
        attention_dropout=0.0,
        init_method_std=INIT_METHOD_STD,
        use_cpu_initialization=True,
        params_dtype=torch.float32,
        pipeline_dtype=torch.float32,
        bias_activation_fusion=False,
        bias_dropout_fusion=False,
        masked_softmax_fusion=False,
        apply_rope_fusion=False,
        gradient_accumulation_fusion=False,
        persist_layer_norm=False,
    )
    layer_spec = get_gpt_layer_local_spec(qk_layernorm=spec.family == "qwen3", normalization="RMSNorm")
    pp_rank = parallel_state.get_pipeline_model_parallel_rank()
    tp_rank = parallel_state.get_tensor_model_parallel_rank()
    chunks = []
    for vp in range(vpp):
        vp_stage = vp if vpp > 1 else None
        # Different stages/chunks must not share random values (a wrong layer offset would
        # then go unnoticed); TP ranks share the seed so the CPU master-weight init splits
        # one consistent full matrix.
        torch.manual_seed(_crc_seed(spec.seed, spec.family, "init", pp_rank, vp))
        model = GPTModel(
            config=config,
            transformer_layer_spec=layer_spec,
            vocab_size=spec.padded_vocab_size,
            max_sequence_length=SEQ_LENGTH,
            pre_process=parallel_state.is_pipeline_first_stage(ignore_virtual=False, vp_stage=vp_stage),
            post_process=parallel_state.is_pipeline_last_stage(ignore_virtual=False, vp_stage=vp_stage),
            share_embeddings_and_output_weights=spec.tied,
            position_embedding_type="rope",
            rotary_base=spec.rotary_base,
            vp_stage=vp_stage,
        )
        if randomize:
            with torch.no_grad():
                for pname, p in model.named_parameters():
                    is_norm = "norm" in pname and pname.endswith("weight")
                    is_bias = pname.endswith(".bias")
                    if not (is_norm or is_bias):
                        continue
                    sharded = getattr(p, "tensor_model_parallel", False)
                    gen = torch.Generator().manual_seed(
                        _crc_seed(spec.seed, spec.family, pname, pp_rank, vp, tp_rank if sharded else -1)
                    )
                    noise = torch.randn(p.shape, generator=gen, dtype=torch.float32)
                    p.copy_(1 + 0.3 * noise if is_norm else 0.2 * noise)
        chunks.append(model.to(_torch_dtype(spec.dtype)))
    return chunks


def _make_args(spec: FixtureSpec, tp: int, pp: int, vpp: int, save: str) -> argparse.Namespace:
    """Build the Megatron-LM ``args`` a converter reads; deliberately no field naming the family."""
    params_dtype = _torch_dtype(spec.dtype)
    return argparse.Namespace(
        num_layers=spec.num_layers,
        encoder_num_layers=spec.num_layers,
        hidden_size=spec.hidden_size,
        ffn_hidden_size=spec.ffn_hidden_size,
        num_attention_heads=spec.num_attention_heads,
        num_query_groups=spec.num_query_groups,
        group_query_attention=True,
        kv_channels=spec.kv_channels,
        max_position_embeddings=SEQ_LENGTH,
        seq_length=SEQ_LENGTH,
        position_embedding_type="rope",
        use_rotary_position_embeddings=True,
        rotary_base=spec.rotary_base,
        rotary_percent=1.0,
        rotary_interleaved=False,
        use_rope_scaling=False,
        normalization="RMSNorm",
        norm_epsilon=1e-6,
        apply_layernorm_1p=False,
        swiglu=True,
        add_qkv_bias=spec.family == "qwen2",
        add_bias_linear=False,
        qk_layernorm=spec.family == "qwen3",
        multi_latent_attention=False,
        num_experts=None,
        untie_embeddings_and_output_weights=not spec.tied,
        vocab_size=spec.vocab_size,
        padded_vocab_size=spec.padded_vocab_size,
        make_vocab_size_divisible_by=MAKE_VOCAB_SIZE_DIVISIBLE_BY,
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=pp,
        virtual_pipeline_model_parallel_size=vpp if vpp > 1 else None,
        num_layers_per_virtual_pipeline_stage=spec.num_layers // (pp * vpp) if vpp > 1 else None,
        num_virtual_stages_per_pipeline_rank=vpp if vpp > 1 else None,
        decoder_first_pipeline_num_layers=None,
        decoder_last_pipeline_num_layers=None,
        expert_model_parallel_size=1,
        context_parallel_size=1,
        data_parallel_size=1,
        world_size=tp * pp,
        sequence_parallel=False,
        transformer_impl="local",
        fp16=False,
        bf16=spec.dtype == "bf16",
        params_dtype=params_dtype,
        init_method_std=INIT_METHOD_STD,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        seed=spec.seed,
        micro_batch_size=1,
        global_batch_size=8,
        lr=3e-4,
        train_iters=spec.iteration,
        iteration=spec.iteration,
        tokenizer_type="HuggingFaceTokenizer",
        tokenizer_model="Qwen/Qwen3-0.6B" if spec.family != "llama" else "meta-llama/Llama-3.2-1B",
        ckpt_format="torch_dist",
        use_dist_ckpt=True,
        save=save,
        load=save,
        save_interval=spec.iteration,
    )


def _rng_state():
    """Megatron-LM's ``get_rng_state`` for torch_dist: a ShardedObject per (pp, tp) rank.

    ``cuda_rng_state`` is omitted (no CUDA here).
    """
    import random

    import numpy as np
    import torch
    from megatron.core import parallel_state, tensor_parallel
    from megatron.core.dist_checkpointing.mapping import ShardedObject

    state = {
        "random_rng_state": random.getstate(),
        "np_rng_state": np.random.get_state(),
        "torch_rng_state": torch.get_rng_state(),
        "rng_tracker_states": tensor_parallel.get_cuda_rng_tracker().get_states(),
    }
    return ShardedObject(
        "rng_state",
        [state],
        (
            parallel_state.get_pipeline_model_parallel_world_size(),
            parallel_state.get_tensor_model_parallel_world_size(),
        ),
        (parallel_state.get_pipeline_model_parallel_rank(), parallel_state.get_tensor_model_parallel_rank()),
        replica_id=parallel_state.get_data_parallel_rank(with_context_parallel=True),
    )


def _sd_metadata(spec: FixtureSpec) -> dict[str, Any]:
    """Sharded-state-dict metadata; ``non_homogeneous_layers`` switches Megatron to per-layer keys."""
    return {
        "singleton_local_shards": False,
        "chained_optim_avoid_prefix": True,
        "non_homogeneous_layers": spec.per_layer_keys,
    }


def _model_state(chunks: list, spec: FixtureSpec) -> dict[str, Any]:
    metadata = _sd_metadata(spec)
    if len(chunks) == 1:
        return {"model": chunks[0].sharded_state_dict(metadata=dict(metadata))}
    return {f"model{i}": c.sharded_state_dict(metadata=dict(metadata)) for i, c in enumerate(chunks)}


def _load_into(chunks: list, iter_dir: str, spec: FixtureSpec) -> dict[str, Any]:
    """Megatron-LM's load path: dist_checkpointing.load then load_state_dict per chunk."""
    from megatron.core import dist_checkpointing

    state = dist_checkpointing.load(_model_state(chunks, spec), iter_dir)
    for i, chunk in enumerate(chunks):
        loaded = state["model"] if len(chunks) == 1 else state[f"model{i}"]
        missing, unexpected = chunk.load_state_dict(loaded, strict=False)
        missing = [k for k in missing if not k.endswith("_extra_state")]
        if missing or unexpected:
            raise RuntimeError(f"load mismatch: missing={missing} unexpected={unexpected}")
    return state


def _save_job(spec: FixtureSpec, load: str | None, save: str, tp: int, pp: int, vpp: int) -> None:
    """Build (or load from ``load``) and save like Megatron-LM's training loop."""
    import random

    import numpy as np
    import torch
    from megatron.core import dist_checkpointing, parallel_state

    _init_parallel(tp, pp, vpp)
    # As Megatron-LM's _set_random_seed, so the saved rng_state is reproducible.
    rng_seed = spec.seed + 100 * parallel_state.get_pipeline_model_parallel_rank()
    random.seed(rng_seed)
    np.random.seed(rng_seed)
    chunks = _build_chunks(spec, tp, pp, vpp, randomize=load is None)
    iteration = spec.iteration
    args = _make_args(spec, tp, pp, vpp, save)
    if load is not None:
        iteration = int((Path(load) / "latest_checkpointed_iteration.txt").read_text().strip())
        _load_into(chunks, str(Path(load) / f"iter_{iteration:07d}"), spec)
        args.iteration = iteration
    iter_dir = Path(save) / f"iter_{iteration:07d}"
    if torch.distributed.get_rank() == 0:
        iter_dir.mkdir(parents=True, exist_ok=True)
    torch.distributed.barrier()
    common = {
        "args": args,
        "checkpoint_version": 3.0,
        "iteration": iteration,
        "num_floating_point_operations_so_far": 0,
    }
    if spec.common_in_dcp:  # core 0.19: the common dict is the ShardedObject common_state/shard_0_1
        from megatron.core.dist_checkpointing import ShardedObject

        rank = torch.distributed.get_rank()
        common = {"common_state": ShardedObject("common_state", common, (1,), (0,), replica_id=rank)}
    state = {**_model_state(chunks, spec), **common, "rng_state": _rng_state()}
    dist_checkpointing.save(state, str(iter_dir), content_metadata=_sd_metadata(spec))
    torch.distributed.barrier()
    if torch.distributed.get_rank() == 0:
        (Path(save) / "latest_checkpointed_iteration.txt").write_text(f"{iteration}\n")
    torch.distributed.barrier()


def _reference_job(spec: FixtureSpec, root: str) -> None:
    """Megatron's own TP1/PP1 fp32 forward of the saved checkpoint -> reference.pt."""
    import torch

    _init_parallel(1, 1, 1)
    iteration = int((Path(root) / "latest_checkpointed_iteration.txt").read_text().strip())
    # Load in the checkpoint's dtype (no cast inside the loader), then widen: bf16 -> fp32
    # is exact, so the fp32 model holds precisely the stored values.
    (model,) = _build_chunks(spec, 1, 1, 1, randomize=False)
    _load_into([model], str(Path(root) / f"iter_{iteration:07d}"), spec)
    model = model.float().eval()
    gen = torch.Generator().manual_seed(spec.seed)
    ids = torch.randint(0, spec.vocab_size, (REFERENCE_BATCH, REFERENCE_SEQ), generator=gen)
    pos = torch.arange(REFERENCE_SEQ).unsqueeze(0).expand(REFERENCE_BATCH, -1)
    mask = torch.triu(torch.ones(REFERENCE_SEQ, REFERENCE_SEQ), diagonal=1).bool()[None, None]
    with torch.no_grad():
        logits = model(ids, position_ids=pos, attention_mask=mask)
    expected = (REFERENCE_BATCH, REFERENCE_SEQ, spec.padded_vocab_size)
    if tuple(logits.shape) != expected or logits.dtype != torch.float32:
        raise RuntimeError(f"unexpected logits {tuple(logits.shape)} {logits.dtype}, want {expected}")
    out = Path(root).parent / REFERENCE_FILE
    torch.save({"input_ids": ids.clone(), "logits": logits.detach().clone().contiguous()}, out)
