"""Megatron-Bridge 0.6.2 and megatron-core 0.19 on CPU torch without Transformer Engine (for
tools/bridge_fixtures.py; runs inside its spawned gloo ranks, before Bridge is imported).

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
import os
import sys
import types
from collections.abc import Iterator
from typing import Any

from tools import megatron_fixtures


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


def patch_for_cpu() -> None:
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
def cpu_rank(rank: int, world: int, port: int) -> Iterator[None]:
    """megatron_fixtures' rank with Transformer Engine stubbed and Bridge patched; Bridge reads the torchrun
    environment variables too."""
    sys.meta_path.insert(0, _TEFinder())
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world))
    os.environ.setdefault("LOCAL_RANK", str(rank))
    with megatron_fixtures.cpu_rank(rank, world, port, patch_for_cpu):
        yield


def padded(provider: Any) -> Any:
    """Bridge's providers keep the HF vocab (250); training with Megatron's padding (to 256) is the harder
    case. Bridge's HF exports keep the 6 padding rows, so reloading them needs the same padding."""
    provider.should_pad_vocab = True
    provider.make_vocab_size_divisible_by = 128
    return provider


def for_cpu(provider: Any) -> Any:
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
