"""Peer vectors written by the real Megatron-Bridge 0.6.2 package (tests/data/bridge/), on CPU.

Usage: ``/work/venv312/bin/python tools/bridge_fixtures.py OUT_DIR [CASE ...]`` (default: every case).

Our other fixtures imitate Megatron-Bridge's layout with megatron-core; these are what Bridge itself
writes and exports, so the converter can be judged against its peer. For each case it builds a tiny
model from a local transformers config (no hub access) through ``AutoBridge.from_hf_config`` and the
provider Bridge derives from it, on spawned gloo ranks (one process per rank), and saves:

- the base with ``AutoBridge.save_megatron_model``;
- for PEFT cases, the adapter with Bridge's training ``save_checkpoint`` and ``cfg.peft`` set (no
  optimizer state: ``save_optim=False``; ``train_state.step`` = 20); its ``run_config.yaml``'s
  ``checkpoint.pretrained_checkpoint`` is the base's path relative to OUT_DIR (``<model>/base``);
- Bridge's own exports of the live model: ``save_hf_pretrained`` (base, and merged base + adapter),
  ``save_hf_adapter``; and for MoE ``export_adapter_ckpt`` from the saved PEFT checkpoint (1 rank);
- Megatron's own fp32 forward of the live model (base, and base with adapters), logits gathered over
  TP, with the fixed input ids: ``logits.safetensors`` {``input_ids``, ``logits``}.

Adapters are not left at Bridge's init (B = 0): A, B and DoRA magnitudes are refilled with seeded
values, the same on every rank where a tensor is replicated and per rank where it is sharded (TP,
expert TP, and per EP rank for expert adapters).

Environment (Megatron-Bridge 0.6.2 needs Python >= 3.12):

- ``~/.pyenv/versions/3.12.1/bin/python -m venv /work/venv312``; ``pip install torch==2.13.0`` (only a
  cp311 CPU wheel is local, so pip takes the CUDA build; it runs on CPU);
- ``pip install --no-deps megatron-bridge==0.6.2 megatron-core==0.19.2`` (Bridge's full dependency set
  fails to install here: ``fast-hadamard-transform`` builds against torch at install time, and it
  pins flashinfer, wandb, ...); then by hand ``numpy packaging transformers==5.12.1 peft safetensors
  omegaconf hydra-core pyyaml regex einops rich six tqdm accelerate sentencepiece nvidia-modelopt requests
  datasets megatron-energon tensorboard``
  (imported by Bridge's training checkpointing and config modules).

Stubs and patches (all in the spawned ranks, before Bridge is imported):

- Transformer Engine: ``megatron.bridge.peft.lora_layers`` imports ``transformer_engine.pytorch`` at
  module level (only for its TE-fused LoRA path). A meta-path finder serves an empty stub package
  (attributes are dummy classes / sub-stubs) to that module alone, so megatron-core and the rest of
  Bridge still see no TE. megatron-core still defines its TE linear names (as None), so Bridge's
  ``safe_import_from`` finds them: ``megatron.bridge.peft.utils.HAVE_TE`` and
  ``megatron.bridge.peft.module_matcher.HAVE_TE`` / ``HAVE_TE_{COL,LN_COL,ROW}_LINEAR`` are set False.
- The layer spec is ``megatron.bridge.models.gpt_provider.local_layer_spec`` (no TE; the on-disk keys
  match the TE spec's); MoE experts are SequentialMLPs (``moe_grouped_gemm=False``) with the allgather
  dispatcher; fusions that need CUDA kernels are off. These land in ``run_config.yaml``.
- megatron-core on CPU torch (as in tools/megatron_fixtures.py): ``torch.cuda.synchronize`` and
  ``current_device`` neutralised, ``torch.cuda.get_rng_state`` the CPU generator's state (Bridge's
  ``get_rng_state`` records it in every save), ``Tensor.cuda`` the identity, the CUDA RNG tracker's ``fork`` a no-op,
  ``moe_utils.te_general_gemm = None``; forward with an explicit causal mask.
"""

from __future__ import annotations

import contextlib
import importlib.abc
import importlib.machinery
import json
import os
import sys
import types
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tools.megatron_fixtures import _spawn

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


# --------------------------------------------------------------------------- stubs and patches


class _TEStub(types.ModuleType):
    """``transformer_engine`` as seen by Bridge's LoRA layers: names resolve to dummy classes."""

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__"):
            raise AttributeError(name)
        value = type(name, (), {}) if name[0].isupper() else _TEStub(f"{self.__name__}.{name}")
        setattr(self, name, value)
        return value


class _TEFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Serves the stub only to ``megatron.bridge.peft.lora_layers``; every other importer gets no TE."""

    IMPORTER = "megatron.bridge.peft.lora_layers"

    def find_spec(self, fullname: str, path: Any, target: Any = None) -> importlib.machinery.ModuleSpec | None:
        if fullname.split(".")[0] != "transformer_engine":
            return None
        frame = sys._getframe(1)
        while frame and frame.f_globals.get("__name__", "").startswith(("importlib", "_frozen_importlib")):
            frame = frame.f_back
        if frame is None or frame.f_globals.get("__name__") != self.IMPORTER:
            return None
        return importlib.machinery.ModuleSpec(fullname, self, is_package=True)

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> types.ModuleType:
        return _TEStub(spec.name)

    def exec_module(self, module: types.ModuleType) -> None:
        module.__path__ = []


def _patch_for_cpu() -> None:
    import torch
    from megatron.core.tensor_parallel import random as mrandom
    from megatron.core.transformer.moe import moe_utils

    torch.cuda.synchronize = lambda *a, **k: None
    torch.cuda.current_device = lambda: "cpu"
    torch.cuda.get_rng_state = lambda *a, **k: torch.get_rng_state()  # rng state of every save
    torch.Tensor.cuda = lambda self, *a, **k: self

    @contextlib.contextmanager
    def _fork(self: Any, name: str = "model-parallel-rng") -> Iterator[None]:
        yield

    mrandom.CudaRNGStatesTracker.fork = _fork
    moe_utils.te_general_gemm = None
    # megatron-core defines its TE linear names (as None) without TE, so Bridge's safe imports succeed.
    from megatron.bridge.peft import module_matcher, utils

    utils.HAVE_TE = False
    module_matcher.HAVE_TE = False
    module_matcher.HAVE_TE_COL_LINEAR = module_matcher.HAVE_TE_LN_COL_LINEAR = module_matcher.HAVE_TE_ROW_LINEAR = False


@contextlib.contextmanager
def _rank(rank: int, world: int, port: int) -> Iterator[None]:
    import warnings
    from datetime import timedelta

    warnings.filterwarnings("ignore")
    sys.meta_path.insert(0, _TEFinder())
    import torch

    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world))
    os.environ.setdefault("LOCAL_RANK", str(rank))
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(seconds=300))
    try:
        _patch_for_cpu()
        yield
    finally:
        from megatron.core import parallel_state

        parallel_state.destroy_model_parallel()
        torch.distributed.destroy_process_group()


def _worker(rank: int, world: int, port: int, task: str, jobs: list[dict[str, Any]]) -> None:
    with _rank(rank, world, port):
        for job in jobs:
            {"case": _case_job, "export_adapter": _export_adapter_job, "reload": _reload_job}[task](**job)


# --------------------------------------------------------------------------- inside the ranks


def _provider(case: Case) -> Any:
    from megatron.bridge import AutoBridge

    bridge = AutoBridge.from_hf_config(hf_config(case.model))
    provider = bridge.to_megatron_provider(load_weights=False)
    provider.tensor_model_parallel_size = case.tp
    provider.pipeline_model_parallel_size = 1
    provider.expert_model_parallel_size = case.ep
    provider.expert_tensor_parallel_size = case.etp
    provider.init_method_std = 0.08
    _padded(_for_cpu(provider))
    provider.finalize()
    return bridge, provider


def _padded(provider: Any) -> Any:
    """Bridge's providers keep the HF vocab (250); training with Megatron's padding (to 256) is the harder
    case. Bridge's HF exports keep the 6 padding rows, so reloading them needs the same padding."""
    provider.should_pad_vocab = True
    provider.make_vocab_size_divisible_by = 128
    return provider


def _for_cpu(provider: Any) -> Any:
    """fp32, the local (no-TE) layer spec, no fused CUDA kernels; SequentialMLP experts, allgather dispatch."""
    import torch
    from megatron.bridge.models.gpt_provider import local_layer_spec

    provider.transformer_layer_spec = local_layer_spec
    provider.params_dtype = provider.pipeline_dtype = provider.autocast_dtype = torch.float32
    provider.bf16 = provider.fp16 = False
    provider.attention_dropout = provider.hidden_dropout = 0.0
    for fusion in (
        "gradient_accumulation_fusion",
        "masked_softmax_fusion",
        "bias_activation_fusion",
        "bias_dropout_fusion",
        "apply_rope_fusion",
        "persist_layer_norm",
        "cross_entropy_loss_fusion",
        "moe_permute_fusion",
        "moe_router_fusion",
        "moe_grouped_gemm",
    ):
        setattr(provider, fusion, False)
    if provider.num_moe_experts:
        provider.moe_token_dispatcher_type = "allgather"
        provider.moe_aux_loss_coeff = 0.0
    return provider


def _build(case: Case) -> tuple[Any, Any, list]:
    import torch
    from megatron.core import parallel_state

    bridge, provider = _provider(case)
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


def _peft(kind: str, case: Case) -> Any:
    from megatron.bridge.peft.canonical_lora import CanonicalLoRA
    from megatron.bridge.peft.dora import DoRA
    from megatron.bridge.peft.lora import LoRA

    if kind == "canonical_lora":
        targets = ["linear_q", "linear_k", "linear_v", "linear_proj", "linear_fc1_up", "linear_fc1_gate", "linear_fc2"]
        return CanonicalLoRA(target_modules=targets, dim=LORA_DIM, alpha=LORA_ALPHA)
    cls = {"lora": LoRA, "dora": DoRA}[kind]
    return cls(target_modules=list(DENSE_TARGETS), dim=LORA_DIM, alpha=LORA_ALPHA)


def _randomize_adapters(model: list) -> None:
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


def _save_logits(model: list, path: Path) -> None:
    import torch
    from safetensors.torch import save_file

    ids, logits = _forward(model)
    if torch.distributed.get_rank() == 0:
        path.parent.mkdir(parents=True, exist_ok=True)
        save_file({"input_ids": ids.contiguous(), "logits": logits.contiguous()}, str(path))


def _case_job(case: Case, out: str) -> None:
    root = Path(out) / case.model_dir
    os.chdir(out)  # run_config.yaml's pretrained_checkpoint is relative to OUT_DIR
    bridge, provider, model = _build(case)
    if case.peft is None:
        _save_base(bridge, model, root)
    else:
        _save_peft(bridge, provider, model, case, root / case.peft)


def _save_base(bridge: Any, model: list, root: Path) -> None:
    import torch

    bridge.save_megatron_model(model, str(root / "base"))
    bridge.save_hf_pretrained(model, str(root / "base_hf"), show_progress=False)
    _save_logits(model, root / "base_logits.safetensors")
    if torch.distributed.get_rank() == 0:
        hf_config_dir = root / "hf_config"
        hf_config_dir.mkdir(parents=True, exist_ok=True)
        hf_config(root.name.split("_")[0]).to_json_file(str(hf_config_dir / "config.json"))


def _save_peft(bridge: Any, provider: Any, model: list, case: Case, out: Path) -> None:
    from megatron.bridge.training.checkpointing import save_checkpoint
    from megatron.bridge.training.config import CheckpointConfig, ConfigContainer, LoggerConfig
    from megatron.bridge.training.state import GlobalState
    from megatron.core.optimizer import OptimizerConfig

    peft = _peft(case.peft, case)
    model = peft(model, training=True)
    _randomize_adapters(model)
    state = GlobalState()
    state.cfg = ConfigContainer(
        model=provider,
        train=None,
        optimizer=OptimizerConfig(use_distributed_optimizer=False),
        ddp=None,
        scheduler=None,
        dataset=None,
        logger=LoggerConfig(),
        tokenizer=None,
        checkpoint=CheckpointConfig(
            async_save=False,
            save=str(out / "ckpt"),
            save_optim=False,
            save_rng=False,
            ckpt_format="torch_dist",
            pretrained_checkpoint=f"{case.model_dir}/base",
        ),
        dist=None,
        peft=peft,
    )
    state.train_state.step = STEP
    save_checkpoint(state, model, None, None, 0)
    _save_logits(model, out / "logits.safetensors")
    bridge.save_hf_pretrained(model, str(out / "merged_hf"), show_progress=False)
    bridge.save_hf_adapter(model, str(out / "hf_adapter"), peft_config=peft, show_progress=False)


def _export_adapter_job(case: Case, out: str) -> None:
    """Bridge's ``export_adapter_ckpt`` of the saved PEFT checkpoint, from its own HF export of the base."""
    from megatron.bridge import AutoBridge

    root = Path(out) / case.model_dir
    os.chdir(out)
    bridge = AutoBridge.from_hf_pretrained(str(root / "base_hf"))
    to_provider = bridge.to_megatron_provider
    bridge.to_megatron_provider = lambda *a, **k: _padded(_for_cpu(to_provider(*a, **k)))
    iter_dir = root / case.peft / "ckpt" / f"iter_{STEP:07d}"  # the save root is refused (no .metadata there)
    bridge.export_adapter_ckpt(str(iter_dir), str(root / case.peft / "export_adapter_ckpt"))


def _reload_job(case: Case, out: str) -> None:
    """Bridge's own TP1 reload of the PEFT checkpoint (base from its HF export, adapters loaded the way
    ``export_adapter_ckpt`` loads them), and its forward: what the checkpoint holds, on one rank."""
    from megatron.bridge import AutoBridge
    from megatron.bridge.training.checkpointing import (
        _generate_model_state_dict,
        apply_peft_adapter_filter_to_state_dict,
    )
    from megatron.core import dist_checkpointing

    root = Path(out) / case.model_dir
    os.chdir(out)
    peft = _peft(case.peft, case)
    provider = AutoBridge.from_hf_pretrained(str(root / "base_hf")).to_megatron_provider(load_weights=True)
    _padded(_for_cpu(provider))
    provider.finalize()
    provider.register_pre_wrap_hook(lambda chunks: peft(chunks, training=False))
    model = provider.provide_distributed_model(
        wrap_with_ddp=False,
        use_cpu_initialization=True,
        init_model_with_meta_device=False,
        mixed_precision_wrapper=None,
    )
    state = apply_peft_adapter_filter_to_state_dict(_generate_model_state_dict(model, {}), peft)
    loaded = dist_checkpointing.load(state, str(root / case.peft / "ckpt" / f"iter_{STEP:07d}"))
    model[0].load_state_dict(loaded["model"], strict=False)
    _save_logits(model, root / case.peft / "tp1_reload_logits.safetensors")


def main(argv: list[str]) -> None:
    import logging

    logging.basicConfig(level=logging.INFO)
    out = Path(argv[0]).resolve()
    names = argv[1:] or list(CASES)
    out.mkdir(parents=True, exist_ok=True)
    for name in names:
        case = CASES[name]
        _spawn(case.world, "case", [{"case": case, "out": str(out)}], timeout=900, worker=_worker)
        if case.model == "moe" and case.peft:
            _spawn(1, "export_adapter", [{"case": case, "out": str(out)}], timeout=900, worker=_worker)
        if case.peft:
            _spawn(1, "reload", [{"case": case, "out": str(out)}], timeout=900, worker=_worker)
    (out / "MANIFEST.json").write_text(json.dumps({n: str(CASES[n]) for n in names}, indent=1) + "\n")


if __name__ == "__main__":
    main(sys.argv[1:])
