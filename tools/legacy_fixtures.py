"""Legacy `--ckpt-format torch` fixtures of issue 20, written by megatron-core 0.16 on CPU (gloo, one process per
rank) through the helpers of `tools.megatron_fixtures`:

- ``EXPERT_TP1_SPEC``: TP2 EP2 with expert TP 1 and its legacy twin, for which Megatron-LM writes one file
  per rank of expert-data-parallel rank 0: `mp_rank_00_000` and `mp_rank_01_001`, not the TP x EP grid.
- ``UNEVEN_SPECS``: three pipeline stages split unevenly, once by `decoder_first/last_pipeline_num_layers` and
  once by a `pipeline_model_parallel_layout` with two virtual stages; each saved as torch_dist plus its legacy
  twin (stage-local layer numbers) with Megatron's reference logits (`build_fixtures`). `even_twin` re-saves
  the torch_dist checkpoint at PP1 through Megatron's own loader: the same weights, split evenly.
- ``GROUPED_SPECS`` / `build_grouped`: the non-TE ``GroupedMLP`` (`moe_grouped_gemm` with the local spec; removed
  in core 0.17), whose rank files hold every local expert in ``mlp.experts.weight1`` ``[H, E_local·2I/etp]`` and
  ``weight2`` ``[E_local·I/etp, H]``. Its forward needs the `grouped_gemm` CUDA package, so the writer stubs the
  package to run the module on CPU (a per-expert loop stands in for ``gmm``). The GroupedMLP chunks get their
  weights through core's own `dist_checkpointing.load` from the SequentialMLP fixture of the same spec
  (GroupedMLP's sharded state dict is the SequentialMLP one, by design), and `state_dict_for_save_checkpoint`
  writes the legacy files. The reference forward is that fixture's SequentialMLP logits: GroupedMLP computes
  the same function of the same weights (per expert ``act(x @ w1[e]) @ w2[e]``; the grouped GEMM only batches
  the experts). The writer checks this on every rank before the fixture is marked complete: each layer's
  GroupedMLP and SequentialMLP, loaded from the same checkpoint and widened to fp32 (exact), give the same
  output for the same routed tokens (both are rank-local: the token dispatcher does the expert-parallel and
  expert-TP communication).
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

from tools import megatron_fixtures as mf
from tools.megatron_fixtures import FixtureSpec, pending_builds, reshard

__all__ = ["EXPERT_TP1_SPEC", "GROUPED_SPECS", "UNEVEN_SPECS", "build_grouped", "even_twin", "grouped_root"]

UNEVEN_SPECS = [
    FixtureSpec("llama", pp=3, num_layers=6, first_stage_layers=1, last_stage_layers=3, legacy_twin=True),
    # (vp, pp) chunks in layout order: 1, 2, 1 layers, then 1, 1, 1
    FixtureSpec("llama", pp=3, vpp=2, num_layers=7, pipeline_layout="Et|tt|t|t|t|tL", legacy_twin=True),
]
EXPERT_TP1_SPEC = FixtureSpec("qwen3_moe", tp=2, ep=2, etp=1, legacy_twin=True)
GROUPED_SPECS = [  # SequentialMLP fixtures of tests/conftest.py MOE_SPECS, re-saved with GroupedMLP
    FixtureSpec("qwen3_moe", tp=2, ep=2),  # expert TP 2: weight1 / weight2 cut by expert TP too
    FixtureSpec("qwen3_moe", tp=2, ep=2, etp=1),  # whole experts; Megatron writes mp_rank_00_000, mp_rank_01_001
    FixtureSpec("qwen3_moe", tp=2, ep=2, dtype="bf16"),  # the dtype GroupedMLP's forward requires
]


def even_twin(cache_dir: Path, spec: FixtureSpec, root: Path) -> Path:
    """``spec``'s torch_dist save (at ``root``) re-saved at TP1 PP1 by Megatron's loader, cached."""
    twin = SimpleNamespace(name=f"{spec.name}-reshard-pp1")
    with pending_builds(cache_dir, [twin], ".reshard.lock", lambda _: {}) as todo:
        if todo:
            reshard(root, spec, cache_dir / twin.name / "ckpt", tp=1, pp=1)
    return cache_dir / twin.name / "ckpt"


def grouped_root(cache_dir: Path, spec: FixtureSpec) -> Path:
    """Where the GroupedMLP legacy save of ``spec`` lies."""
    return Path(cache_dir) / f"{spec.name}-grouped" / "legacy"


def build_grouped(cache_dir: Path, spec: FixtureSpec, root: Path) -> Path:
    """The GroupedMLP legacy save of ``spec``'s weights (its SequentialMLP torch_dist save at ``root``), cached."""
    cache_dir = Path(cache_dir)
    entry = SimpleNamespace(name=f"{spec.name}-grouped")
    with pending_builds(cache_dir, [entry], ".grouped.lock", lambda _: {}) as todo:
        if todo:
            job = {"spec": spec, "load": str(root), "save": str(grouped_root(cache_dir, spec))}
            mf._spawn(spec.world_size, "grouped", [job], worker=_worker)
    return grouped_root(cache_dir, spec)


def _worker(rank: int, world: int, port: int, task: str, jobs: list[dict[str, Any]]) -> None:
    with mf.cpu_rank(rank, world, port):
        for job in jobs:
            _grouped_job(**job)


def _gmm(a: Any, b: Any, batch_sizes: Any, trans_b: bool = False) -> Any:
    """`grouped_gemm.ops.gmm` in plain torch: rows of group ``e`` times ``b[e]``."""
    import torch

    pieces = torch.split(a, [int(n) for n in batch_sizes])
    return torch.cat([p @ (w.t() if trans_b else w) for p, w in zip(pieces, b)])


def _loaded_chunks(spec: FixtureSpec, iter_dir: str, grouped: bool) -> list:
    """This rank's chunks, SequentialMLP or GroupedMLP experts, loaded by core from ``iter_dir``."""
    make_config = mf._transformer_config

    def grouped_config(*args: Any) -> Any:
        config = make_config(*args)
        config.moe_grouped_gemm = True  # the local spec then builds GroupedMLP experts
        config.bf16 = True  # GroupedMLP.forward asserts it (the params keep the spec's dtype)
        return config

    mf._transformer_config = grouped_config if grouped else make_config
    try:
        chunks = mf._build_chunks(spec, spec.tp, spec.pp, spec.vpp, spec.ep, spec.etp, randomize=False)
    finally:
        mf._transformer_config = make_config
    mf._load_into(chunks, iter_dir, spec)
    return chunks


def _check_forward(grouped: list, sequential: list) -> None:
    """Each layer's GroupedMLP gives its SequentialMLP's output for the same routed tokens."""
    import torch
    from megatron.core.transformer.moe.experts import GroupedMLP, SequentialMLP

    pairs = [
        (g, s)
        for chunk_g, chunk_s in zip(grouped, sequential)
        for g, s in zip(
            (m for m in chunk_g.modules() if isinstance(m, GroupedMLP)),
            (m for m in chunk_s.modules() if isinstance(m, SequentialMLP)),
        )
    ]
    if not pairs:
        raise RuntimeError("the local spec built no GroupedMLP")
    gen = torch.Generator().manual_seed(0)
    for g, s in pairs:
        counts = torch.arange(1, g.num_local_experts + 1) * 3
        dtype = g.weight1.dtype
        tokens = torch.randn(int(counts.sum()), g.config.hidden_size, generator=gen).to(dtype)
        probs = torch.rand(int(counts.sum()), generator=gen)
        with torch.no_grad():
            torch.testing.assert_close(g(tokens, counts, probs)[0], s(tokens, counts, probs)[0])


def _grouped_job(spec: FixtureSpec, load: str, save: str) -> None:
    import torch
    from megatron.core.transformer.moe import grouped_gemm_util

    grouped_gemm_util.grouped_gemm = SimpleNamespace(ops=SimpleNamespace(gmm=_gmm))
    grouped_gemm_util.ops = grouped_gemm_util.grouped_gemm.ops
    mf._init_parallel(spec.tp, spec.pp, spec.vpp, spec.ep, spec.etp)
    iteration = int((Path(load) / "latest_checkpointed_iteration.txt").read_text().strip())
    iter_dir = str(Path(load) / f"iter_{iteration:07d}")
    chunks = _loaded_chunks(spec, iter_dir, grouped=True)
    sequential = _loaded_chunks(spec, iter_dir, grouped=False)
    args = mf._make_args(spec, spec.tp, spec.pp, spec.vpp, save, spec.ep, spec.etp)
    args.moe_grouped_gemm = True
    args.ckpt_format, args.use_dist_ckpt = "torch", False
    mf._save_legacy(chunks, args, Path(save), iteration, spec.pp, spec.ep)
    _check_forward([c.float() for c in chunks], [c.float() for c in sequential])  # after the save: in place
    torch.distributed.barrier()
    if torch.distributed.get_rank() == 0:
        (Path(save) / "latest_checkpointed_iteration.txt").write_text(f"{iteration}\n")
