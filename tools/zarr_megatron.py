"""Megatron-side jobs behind ``tools/make_zarr_fixture.py``; runs under megatron-core 0.15 and 0.16.

    python tools/zarr_megatron.py save-zarr WORK        # 0.15 venv: TP2 PP2 zarr save -> WORK/zarr_ckpt
    python tools/zarr_megatron.py dump WORK             # 0.15 venv: load_plain_tensors -> WORK/plain.pt,
                                                        #   TP1 reload of the zarr + forward -> WORK/reference.pt
    python tools/zarr_megatron.py save-torch-dist WORK  # 0.16: same weights, TP2 PP2 torch_dist -> WORK/torch_dist_ckpt
    python tools/zarr_megatron.py check WORK            # 0.16: TP1 reload of the twin + forward vs reference.pt

One model: qwen3-like (qk_layernorm, GQA, SwiGLU, RMSNorm, rope), 2 layers, hidden 64, vocab 256, bf16,
untied, local (non-Transformer-Engine) spec. One process per rank (gloo on CPU), as in
``tools/megatron_fixtures.py``; this file does not import it so that it runs in the 0.15 venv unchanged.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import socket
import sys
import zlib
from datetime import timedelta
from pathlib import Path
from typing import Any

TP, PP = 2, 2
NUM_LAYERS = 2
HIDDEN = 64
FFN = 96
HEADS = 8
GROUPS = 2
KV_CHANNELS = HIDDEN // HEADS
VOCAB = 256
PADDED_VOCAB = 256  # ceil(256 / (128·TP)) · 128·TP
MAKE_VOCAB_SIZE_DIVISIBLE_BY = 128
SEQ_LENGTH = 64
ROTARY_BASE = 1000000
INIT_METHOD_STD = 0.08
SEED = 1234
ITERATION = 20
REFERENCE_BATCH, REFERENCE_SEQ = 2, 12
SD_METADATA = {"singleton_local_shards": False, "chained_optim_avoid_prefix": True}


def make_args(ckpt_format: str, save: str) -> argparse.Namespace:
    """Megatron-LM's ``args`` for this model: the fields of ``megatron_fixtures._make_args`` (qwen3, bf16)."""
    import torch

    return argparse.Namespace(
        num_layers=NUM_LAYERS,
        encoder_num_layers=NUM_LAYERS,
        hidden_size=HIDDEN,
        ffn_hidden_size=FFN,
        num_attention_heads=HEADS,
        num_query_groups=GROUPS,
        group_query_attention=True,
        kv_channels=KV_CHANNELS,
        max_position_embeddings=SEQ_LENGTH,
        seq_length=SEQ_LENGTH,
        position_embedding_type="rope",
        use_rotary_position_embeddings=True,
        rotary_base=ROTARY_BASE,
        rotary_percent=1.0,
        rotary_interleaved=False,
        use_rope_scaling=False,
        normalization="RMSNorm",
        norm_epsilon=1e-6,  # megatron-core <= 0.15 argument names
        apply_layernorm_1p=False,
        swiglu=True,
        add_qkv_bias=False,
        add_bias_linear=False,
        qk_layernorm=True,
        multi_latent_attention=False,
        num_experts=None,
        untie_embeddings_and_output_weights=True,
        vocab_size=VOCAB,
        padded_vocab_size=PADDED_VOCAB,
        make_vocab_size_divisible_by=MAKE_VOCAB_SIZE_DIVISIBLE_BY,
        tensor_model_parallel_size=TP,
        pipeline_model_parallel_size=PP,
        virtual_pipeline_model_parallel_size=None,
        num_layers_per_virtual_pipeline_stage=None,
        num_virtual_stages_per_pipeline_rank=None,
        decoder_first_pipeline_num_layers=None,
        decoder_last_pipeline_num_layers=None,
        expert_model_parallel_size=1,
        context_parallel_size=1,
        data_parallel_size=1,
        world_size=TP * PP,
        sequence_parallel=False,
        transformer_impl="local",
        fp16=False,
        bf16=True,
        params_dtype=torch.bfloat16,
        init_method_std=INIT_METHOD_STD,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        seed=SEED,
        micro_batch_size=1,
        global_batch_size=8,
        lr=3e-4,
        train_iters=ITERATION,
        iteration=ITERATION,
        tokenizer_type="HuggingFaceTokenizer",
        tokenizer_model="Qwen/Qwen3-0.6B",
        ckpt_format=ckpt_format,
        use_dist_ckpt=True,
        save=save,
        load=save,
        save_interval=ITERATION,
    )


# --------------------------------------------------------------------------- parent side


def main(argv: list[str]) -> None:
    task, work = argv[0], Path(argv[1]).resolve()
    tasks = {"save-zarr": TP * PP, "dump": 1, "save-torch-dist": TP * PP, "check": 1}
    if task not in tasks:
        raise SystemExit(f"usage: zarr_megatron.py {{{','.join(tasks)}}} WORK")
    import torch.multiprocessing as mp

    mp.spawn(_worker, args=(tasks[task], _free_port(), task, str(work)), nprocs=tasks[task], join=True)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --------------------------------------------------------------------------- inside workers


def _worker(rank: int, world: int, port: int, task: str, work: str) -> None:
    import warnings

    warnings.filterwarnings("ignore")
    import torch

    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(seconds=300))
    try:
        _patch_megatron_for_cpu()
        jobs = {"save-zarr": _save_zarr, "dump": _dump, "save-torch-dist": _save_torch_dist, "check": _check}
        jobs[task](Path(work))
    finally:
        from megatron.core import parallel_state

        parallel_state.destroy_model_parallel()
        torch.distributed.destroy_process_group()


def _patch_megatron_for_cpu() -> None:
    """The CUDA assumptions of megatron-core that matter for a dense model on CPU."""
    import torch
    from megatron.core.tensor_parallel import random as mrandom

    torch.cuda.synchronize = lambda *a, **k: None
    torch.cuda.current_device = lambda: "cpu"

    @contextlib.contextmanager
    def _fork(self, name: str = "model-parallel-rng"):
        yield

    mrandom.CudaRNGStatesTracker.fork = _fork


def _init_parallel(tp: int, pp: int) -> None:
    from megatron.core import parallel_state

    parallel_state.initialize_model_parallel(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp)


def _crc_seed(*parts: object) -> int:
    return zlib.crc32("|".join(map(str, parts)).encode())


def _build_model(tp: int, pp: int, *, randomize: bool):
    """This rank's GPTModel in bf16; with ``randomize`` norms get 1 + 0.3·randn (no hiding behind ones)."""
    import torch
    import torch.nn.functional as F
    from megatron.core import parallel_state
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer import TransformerConfig

    config = TransformerConfig(
        num_layers=NUM_LAYERS,
        hidden_size=HIDDEN,
        ffn_hidden_size=FFN,
        num_attention_heads=HEADS,
        num_query_groups=GROUPS,
        kv_channels=KV_CHANNELS,
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=pp,
        normalization="RMSNorm",
        layernorm_epsilon=1e-6,
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        qk_layernorm=True,
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
    pp_rank = parallel_state.get_pipeline_model_parallel_rank()
    tp_rank = parallel_state.get_tensor_model_parallel_rank()
    torch.manual_seed(_crc_seed(SEED, "zarr", "init", pp_rank))
    model = GPTModel(
        config=config,
        transformer_layer_spec=get_gpt_layer_local_spec(qk_layernorm=True, normalization="RMSNorm"),
        vocab_size=PADDED_VOCAB,
        max_sequence_length=SEQ_LENGTH,
        pre_process=parallel_state.is_pipeline_first_stage(),
        post_process=parallel_state.is_pipeline_last_stage(),
        share_embeddings_and_output_weights=False,
        position_embedding_type="rope",
        rotary_base=ROTARY_BASE,
    )
    if randomize:
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "norm" in name and name.endswith("weight"):
                    sharded = getattr(p, "tensor_model_parallel", False)
                    gen = torch.Generator().manual_seed(_crc_seed(SEED, name, pp_rank, tp_rank if sharded else -1))
                    p.copy_(1 + 0.3 * torch.randn(p.shape, generator=gen, dtype=torch.float32))
    return model.to(torch.bfloat16)


def _rng_state():
    """Megatron-LM's per-(pp, tp) rng ShardedObject (no CUDA states on CPU)."""
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
    pp_size = parallel_state.get_pipeline_model_parallel_world_size()
    tp_size = parallel_state.get_tensor_model_parallel_world_size()
    pp_rank = parallel_state.get_pipeline_model_parallel_rank()
    tp_rank = parallel_state.get_tensor_model_parallel_rank()
    dp_rank = parallel_state.get_data_parallel_rank(with_context_parallel=True)
    return ShardedObject("rng_state", [state], (pp_size, tp_size), (pp_rank, tp_rank), replica_id=dp_rank)


def _save(model, root: Path, ckpt_format: str, **save_kwargs: Any) -> None:
    """Save like Megatron-LM's training loop: ``iter_0000020/`` plus the tracker file."""
    import random

    import numpy as np
    import torch
    from megatron.core import dist_checkpointing, parallel_state

    rng_seed = SEED + 100 * parallel_state.get_pipeline_model_parallel_rank()
    random.seed(rng_seed)
    np.random.seed(rng_seed)
    iter_dir = root / f"iter_{ITERATION:07d}"
    if torch.distributed.get_rank() == 0:
        iter_dir.mkdir(parents=True, exist_ok=True)
    torch.distributed.barrier()
    state = {
        "model": model.sharded_state_dict(metadata=dict(SD_METADATA)),
        "args": make_args(ckpt_format, root.name),
        "checkpoint_version": 3.0,
        "iteration": ITERATION,
        "num_floating_point_operations_so_far": 0,
        "rng_state": _rng_state(),
    }
    dist_checkpointing.save(state, str(iter_dir), content_metadata=dict(SD_METADATA), **save_kwargs)
    torch.distributed.barrier()
    if torch.distributed.get_rank() == 0:
        (root / "latest_checkpointed_iteration.txt").write_text(str(ITERATION))
    torch.distributed.barrier()


def _save_zarr(work: Path) -> None:
    _init_parallel(TP, PP)
    model = _build_model(TP, PP, randomize=True)
    _save(model, work / "zarr_ckpt", "zarr", sharded_strategy=("zarr", 1))


def _load_tp1(iter_dir: Path):
    """A TP1 PP1 model loaded through Megatron's own dist_checkpointing.load, widened to fp32."""
    from megatron.core import dist_checkpointing

    model = _build_model(1, 1, randomize=False)
    state = dist_checkpointing.load({"model": model.sharded_state_dict(metadata=dict(SD_METADATA))}, str(iter_dir))
    missing, unexpected = model.load_state_dict(state["model"], strict=False)
    missing = [k for k in missing if not k.endswith("_extra_state")]
    if missing or unexpected:
        raise RuntimeError(f"load mismatch: missing={missing} unexpected={unexpected}")
    return model.float().eval()  # bf16 -> fp32 is exact


def _forward(model):
    import torch

    gen = torch.Generator().manual_seed(SEED)
    ids = torch.randint(0, VOCAB, (REFERENCE_BATCH, REFERENCE_SEQ), generator=gen)
    pos = torch.arange(REFERENCE_SEQ).unsqueeze(0).expand(REFERENCE_BATCH, -1)
    mask = torch.triu(torch.ones(REFERENCE_SEQ, REFERENCE_SEQ), diagonal=1).bool()[None, None]
    with torch.no_grad():
        logits = model(ids, position_ids=pos, attention_mask=mask)
    if tuple(logits.shape) != (REFERENCE_BATCH, REFERENCE_SEQ, PADDED_VOCAB) or not torch.isfinite(logits).all():
        raise RuntimeError(f"unexpected logits {tuple(logits.shape)}")
    return ids, logits.detach().clone().contiguous()


def _dump(work: Path) -> None:
    """Megatron 0.15 reads its own zarr checkpoint: every tensor in full, and a TP1 forward."""
    import torch
    from megatron.core.dist_checkpointing import load_plain_tensors

    _init_parallel(1, 1)
    iter_dir = work / "zarr_ckpt" / f"iter_{ITERATION:07d}"
    loaded = load_plain_tensors(str(iter_dir))  # the tensors, plus the common state on 0.15
    plain = {k: v.clone() for k, v in sorted(loaded.items()) if isinstance(v, torch.Tensor)}
    print(f"dump: not tensors: {sorted(k for k in loaded if k not in plain)}")
    torch.save(plain, work / "plain.pt")
    ids, logits = _forward(_load_tp1(iter_dir))
    torch.save({"input_ids": ids, "logits": logits}, work / "reference.pt")
    print(f"dump: {len(plain)} tensors, logits std {logits.std():.3f}")


def _save_torch_dist(work: Path) -> None:
    """The zarr checkpoint's weights, placed shard by shard into a TP2 PP2 model, saved as torch_dist."""
    import torch
    from megatron.core.dist_checkpointing.dict_utils import nested_values
    from megatron.core.dist_checkpointing.mapping import ShardedTensor, apply_factories

    _init_parallel(TP, PP)
    plain = torch.load(work / "plain.pt", weights_only=True)
    model = _build_model(TP, PP, randomize=False)

    def shards():
        sd = model.sharded_state_dict(metadata=dict(SD_METADATA))
        apply_factories(sd)  # the gated fc1 is a factory of two ShardedTensors (views of the parameter)
        return [t for t in nested_values(sd) if isinstance(t, ShardedTensor)]

    with torch.no_grad():
        for sh in shards():
            full = plain[sh.key]
            if full.dtype != sh.data.dtype or tuple(full.shape) != tuple(sh.global_shape):
                raise RuntimeError(f"{sh.key}: {full.dtype} {tuple(full.shape)} vs {sh.dtype} {sh.global_shape}")
            sh.data.copy_(full[sh.global_slice()].reshape(sh.data.shape))
    keys = set()
    for sh in shards():
        if not torch.equal(sh.data, plain[sh.key][sh.global_slice()].reshape(sh.data.shape)):
            raise RuntimeError(f"{sh.key}: copy did not reach the parameter")
        keys.add(sh.key)
    every = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(every, keys)
    if set().union(*every) != set(plain):
        raise RuntimeError(f"keys differ from the zarr checkpoint: {set().union(*every) ^ set(plain)}")
    _save(model, work / "torch_dist_ckpt", "torch_dist")


def _check(work: Path) -> None:
    """Megatron 0.16's TP1 forward of the torch_dist twin against the 0.15 reference from the zarr."""
    import torch

    _init_parallel(1, 1)
    ids, logits = _forward(_load_tp1(work / "torch_dist_ckpt" / f"iter_{ITERATION:07d}"))
    ref = torch.load(work / "reference.pt", weights_only=True)
    if not torch.equal(ids, ref["input_ids"]):
        raise RuntimeError("input ids differ")
    diff = (logits - ref["logits"]).abs().max().item()
    (work / "check.txt").write_text(f"{diff:.3g}\n")
    print(f"check: max |logits(0.16, torch_dist) - logits(0.15, zarr)| = {diff:.3g}")
    if diff > 1e-5:
        raise RuntimeError("the twin does not reproduce the zarr checkpoint's logits")


if __name__ == "__main__":
    main(sys.argv[1:])
