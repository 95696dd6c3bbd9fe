"""Real megatron-core ``MambaModel`` (Nemotron-H / Nemotron 3) ``torch_dist`` checkpoints for tests, written on CPU.

Like :mod:`tools.megatron_fixtures` (whose spawning, CPU patches, cache protocol and MoE randomisation this reuses),
each rank of a gloo world builds the hybrid model, saves it the way Megatron-LM's training loop does, and one
TP1 process computes Megatron's own forward of the saved checkpoint as the reference.

Substitutions, because the Mamba kernels are CUDA-only and not installed here:

- ``mamba_ssm``'s ``mamba_chunk_scan_combined`` → :func:`_ssd_scan`, the Mamba-2 recurrence step by step in fp32
  (the selective scan the chunked kernel computes, without chunking);
- ``mamba_ssm``'s gated ``RMSNorm`` → :func:`_gated_rms_norm` (``norm_before_gate=False``: ``rms(x · silu(z))``
  per group of ``d_inner / ngroups`` channels);
- ``causal_conv1d`` is absent: megatron-core then runs its own ``nn.Conv1d`` (``use_mamba_mem_eff_path=False``
  takes that prefill path; training uses the fused kernel on the same weights);
- ``einops.rearrange`` → :func:`_rearrange` (the few patterns the mixer uses), and the triton kernels of dynamic-batching
  inference it imports → empty names (unused);
- Transformer Engine: the stack is built from the local spec (torch RMSNorm, Column/RowParallelLinear, SequentialMLP
  experts), the norm keys renamed as TE-fused runs write them (``mixer.in_proj.layer_norm_weight``,
  ``self_attention.linear_qkv.layer_norm_weight``, ``mlp.linear_fc1.layer_norm_weight``; MoE blocks keep
  ``pre_mlp_layernorm``), and the MoE latent projections' ``TELinear`` (``parallel_mode="duplicated"``) is a plain
  replicated linear with the same parameter name.

Layout under ``cache_dir/<spec.name>/``: ``ckpt/`` (the save root), ``reference.pt``, ``COMPLETE``.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tools.megatron_fixtures import (
    INIT_METHOD_STD,
    MAKE_VOCAB_SIZE_DIVISIBLE_BY,
    REFERENCE_BATCH,
    REFERENCE_FILE,
    REFERENCE_SEQ,
    SEQ_LENGTH,
    _crc_seed,
    _init_parallel,
    _randomize_expert_bias,
    _randomize_moe,
    _rng_state,
    _save_legacy,
    _spawn,
    _torch_dtype,
    cpu_config,
    cpu_rank,
    legacy_root,
    pad_vocab_size,
    pending_builds,
)

__all__ = ["MambaSpec", "build_mamba_fixtures"]

FAMILY = "nemotron_h"
METADATA = {"singleton_local_shards": False, "chained_optim_avoid_prefix": True}  # sharded-state-dict metadata


@dataclass(frozen=True)
class MambaSpec:
    """One tiny hybrid checkpoint: its layer pattern, sizes and training TP."""

    pattern: str = "M*-ME"  # hybrid_override_pattern: M Mamba, * attention, - MLP, E MoE
    tp: int = 1
    vocab_size: int = 256
    hidden_size: int = 64
    ffn_hidden_size: int = 96
    num_attention_heads: int = 8
    num_query_groups: int = 2
    mamba_num_heads: int = 8
    mamba_head_dim: int = 16
    mamba_num_groups: int = 2
    mamba_state_dim: int = 16
    num_experts: int = 4
    moe_ffn_hidden_size: int = 32
    moe_router_topk: int = 2
    moe_shared_expert_intermediate_size: int = 48
    moe_latent_size: int | None = 32  # Nemotron 3 latent projections; None: none
    scaling_factor: float = 2.0  # moe_router_topk_scaling_factor
    seed: int = 1234
    # The weights drawn at this TP and saved there first, then loaded and re-saved by Megatron at ``tp``
    # (dist_checkpointing reshards them): two saves of one model at two TPs. None: drawn at ``tp``.
    weights_tp: int | None = None
    dtype: str = (
        "fp32"  # "fp32" | "bf16": params dtype of the saved checkpoint (built in fp32, cast like Float16Module)
    )
    legacy_twin: bool = False  # also save the same weights as --ckpt-format torch, under <fixture>/legacy
    iteration: int = 10

    family = FAMILY  # for the MoE randomisation of tools.megatron_fixtures

    @property
    def name(self) -> str:
        latent = f"-lat{self.moe_latent_size}" if self.moe_latent_size and "E" in self.pattern else ""
        symbols = self.pattern.replace("*", "A").replace("-", "D")
        resaved = (f"-from{self.weights_tp}" if self.weights_tp else "") + ("-legacy" if self.legacy_twin else "")
        resaved += "" if self.dtype == "fp32" else f"-{self.dtype}"
        return f"{FAMILY}-{symbols}-tp{self.tp}{resaved}-v{self.vocab_size}-s{self.seed}{latent}"

    @property
    def num_layers(self) -> int:
        return len(self.pattern)

    @property
    def padded_vocab_size(self) -> int:
        return pad_vocab_size(self.vocab_size, self.weights_tp or self.tp)  # fixed by the training TP

    @property
    def source(self) -> MambaSpec | None:
        """The spec whose save this one re-saves (``weights_tp``), or None."""
        return None if self.weights_tp is None else dataclasses.replace(self, tp=self.weights_tp, weights_tp=None)

    @property
    def has_moe(self) -> bool:
        return "E" in self.pattern


def build_mamba_fixtures(specs: Iterable[MambaSpec], cache_dir: Path) -> dict[MambaSpec, Path]:
    """Write every spec's checkpoint and reference logits (cached like :func:`build_fixtures`); returns each spec's
    save root ``cache_dir/<name>/ckpt``."""
    cache_dir = Path(cache_dir).resolve()
    cache_dir.mkdir(parents=True, exist_ok=True)
    specs = list(dict.fromkeys(specs))
    sources = (
        build_mamba_fixtures([s.source for s in specs if s.source], cache_dir) if any(s.source for s in specs) else {}
    )
    result = {s: cache_dir / s.name / "ckpt" for s in specs}
    with pending_builds(cache_dir, specs, ".build.lock") as todo:
        for spec in todo:
            load = str(sources[spec.source]) if spec.source else None
            _spawn(spec.tp, "save", [{"spec": spec, "save": str(result[spec]), "load": load}], worker=_worker)
        if todo:
            _spawn(1, "reference", [{"spec": s, "root": str(result[s])} for s in todo], worker=_worker)
    return result


# --------------------------------------------------------------------------- inside workers


def _worker(rank: int, world: int, port: int, task: str, jobs: list[dict[str, Any]]) -> None:
    with cpu_rank(rank, world, port):
        _patch_mamba_kernels()
        for job in jobs:
            {"save": _save_job, "reference": _reference_job}[task](**job)


def _rearrange(tensor, pattern: str, **sizes: int):
    """einops' ``rearrange`` for patterns of named axes with at most one group per side, e.g.
    ``"b l (h p) -> b l h p"`` (``p=...``), ``"l b d -> b l d"``, ``"d 1 w -> d w"``."""
    import re

    def axes(side: str) -> list[list[str]]:
        return [group.strip("()").split() for group in re.findall(r"\([^)]*\)|\S+", side)]

    lhs, rhs = (axes(side.strip()) for side in pattern.split("->"))
    flat_lhs = [a for group in lhs for a in group if a != "1"]
    known = dict(sizes)
    shape = []
    for group, size in zip(lhs, tensor.shape, strict=True):
        if len(group) > 1:
            missing = [a for a in group if a not in known]
            for a in missing:
                known[a] = size // math.prod(known[b] for b in group if b in known)
        elif group[0] != "1":
            known[group[0]] = size
        shape += [known[a] for a in group if a != "1"]
    tensor = tensor.reshape(shape).permute([flat_lhs.index(a) for group in rhs for a in group if a != "1"])
    return tensor.reshape([math.prod(known[a] for a in group) if group != ["1"] else 1 for group in rhs])


def _ssd_scan(x, dt, A, B, C, chunk_size, D=None, z=None, dt_bias=None, dt_softplus=False, **unused):
    """mamba_ssm's ``mamba_chunk_scan_combined`` as the recurrence it computes: per head h,
    ``s_t = exp(dt_t·A_h)·s_{t-1} + dt_t·x_t ⊗ B_t``, ``y_t = s_t·C_t + D_h·x_t`` (x ``[b, l, h, p]``,
    B, C ``[b, l, g, n]`` shared by the heads of a group)."""
    import torch
    import torch.nn.functional as F

    if (
        z is not None
        or unused.get("return_final_states")
        or any(unused.get(k) is not None for k in ("initial_states", "seq_idx", "cu_seqlens"))
    ):
        raise NotImplementedError("the reference scan has no gate, states or packed sequences (training prefill only)")
    dt = dt.float() + (0 if dt_bias is None else dt_bias.float())
    dt = F.softplus(dt) if dt_softplus else dt
    per_group = x.shape[2] // B.shape[2]
    B, C = (t.float().repeat_interleave(per_group, dim=2) for t in (B, C))
    state = x.new_zeros(x.shape[0], x.shape[2], x.shape[3], B.shape[-1], dtype=torch.float32)
    ys = []
    for t in range(x.shape[1]):
        decay = torch.exp(dt[:, t] * A.float())[..., None, None]
        state = state * decay + (dt[:, t, :, None] * x[:, t].float())[..., None] * B[:, t, :, None, :]
        ys.append(torch.einsum("bhpn,bhn->bhp", state, C[:, t]))
    y = torch.stack(ys, dim=1)
    if D is not None:
        y = y + x.float() * D.float()[:, None]
    return y.to(x.dtype)


def _gated_rms_norm() -> type:
    """mamba_ssm's gated RMSNorm (``norm_before_gate=False``), with megatron's TP-sharded state dict."""
    import torch
    import torch.nn.functional as F
    from megatron.core import parallel_state
    from megatron.core.transformer.utils import make_sharded_tensors_for_checkpoint

    class GatedRMSNorm(torch.nn.Module):
        def __init__(self, hidden_size, eps=1e-5, group_size=None, norm_before_gate=True, device=None, dtype=None):
            super().__init__()
            assert not norm_before_gate
            self.eps, self.group_size = eps, group_size or hidden_size
            self.weight = torch.nn.Parameter(torch.ones(hidden_size, device=device, dtype=dtype))

        def forward(self, x, z=None):
            y = x.float() * F.silu(z.float()) if z is not None else x.float()
            groups = y.reshape(*y.shape[:-1], -1, self.group_size)
            groups = groups * torch.rsqrt(groups.pow(2).mean(-1, keepdim=True) + self.eps)
            return (groups.reshape(y.shape) * self.weight.float()).to(x.dtype)

        def sharded_state_dict(self, prefix="", sharded_offsets=(), metadata=None):
            return make_sharded_tensors_for_checkpoint(
                self.state_dict(prefix="", keep_vars=True),
                prefix,
                {"weight": 0},
                sharded_offsets,
                tp_group=parallel_state.get_tensor_model_parallel_group(),
                dp_cp_group=metadata["dp_cp_group"],
            )

    return GatedRMSNorm


def _duplicated_linear() -> type:
    """Transformer Engine's ``TELinear(parallel_mode="duplicated")`` as the MoE latent projections use it: a
    linear every TP rank holds whole (saved replicated under ``<name>.weight``)."""
    import torch

    class DuplicatedLinear(torch.nn.Module):
        def __init__(self, input_size, output_size, *, config, init_method, bias, **kwargs):
            super().__init__()
            assert not bias
            self.weight = torch.nn.Parameter(torch.empty(output_size, input_size, dtype=config.params_dtype))
            init_method(self.weight)

        def forward(self, x):
            return torch.nn.functional.linear(x, self.weight), None

    return DuplicatedLinear


def _patch_mamba_kernels() -> None:
    import sys
    import types

    # the mixer imports triton kernels of dynamic-batching inference (unused here; triton is not installed)
    ops = types.ModuleType("tensor_ops")
    for name in ("tensor_get_slice_after", "tensor_masked_update", "tensor_merge"):
        setattr(ops, name, None)
    sys.modules.setdefault("megatron.core.inference.contexts.attention_context.triton.tensor_ops", ops)
    from megatron.core.ssm import mamba_block, mamba_context_parallel, mamba_mixer
    from megatron.core.transformer.moe import moe_layer
    from megatron.core.transformer.torch_norm import WrappedTorchNorm

    mamba_mixer.HAVE_MAMBA_SSM = mamba_mixer.HAVE_EINOPS = mamba_context_parallel.HAVE_EINOPS = True
    mamba_mixer.rearrange = _rearrange
    mamba_mixer.mamba_chunk_scan_combined = _ssd_scan
    mamba_mixer.ExtendedRMSNorm = _gated_rms_norm()
    mamba_block.TENorm = WrappedTorchNorm  # the final norm
    moe_layer.HAVE_TE = True
    moe_layer.TELinear = _duplicated_linear()


def _config(spec: MambaSpec, tp: int):
    from megatron.core.activations import squared_relu
    from megatron.core.transformer import TransformerConfig

    moe = dict(
        num_moe_experts=spec.num_experts,
        moe_ffn_hidden_size=spec.moe_ffn_hidden_size,
        moe_router_topk=spec.moe_router_topk,
        moe_shared_expert_intermediate_size=spec.moe_shared_expert_intermediate_size,
        moe_latent_size=spec.moe_latent_size,
        moe_router_score_function="sigmoid",
        moe_router_enable_expert_bias=True,
        moe_router_topk_scaling_factor=spec.scaling_factor,
        moe_router_dtype="fp32",
        moe_router_load_balancing_type="seq_aux_loss",
        moe_aux_loss_coeff=0.0,
        moe_token_dispatcher_type="allgather",
        moe_grouped_gemm=False,
    )
    return TransformerConfig(
        num_layers=spec.num_layers,
        hidden_size=spec.hidden_size,
        ffn_hidden_size=spec.ffn_hidden_size,
        num_attention_heads=spec.num_attention_heads,
        num_query_groups=spec.num_query_groups,
        tensor_model_parallel_size=tp,
        normalization="RMSNorm",
        layernorm_epsilon=1e-5,
        gated_linear_unit=False,
        activation_func=squared_relu,
        add_bias_linear=False,
        **cpu_config(),
        is_hybrid_model=True,
        mamba_state_dim=spec.mamba_state_dim,
        mamba_head_dim=spec.mamba_head_dim,
        mamba_num_groups=spec.mamba_num_groups,
        mamba_num_heads=spec.mamba_num_heads,
        use_mamba_mem_eff_path=False,  # megatron's prefill path: nn.Conv1d and the chunk scan (see module doc)
        **(moe if spec.has_moe else {}),
    )


def _stack_spec(spec: MambaSpec):
    """MambaStack of local modules, norm keys as TE-fused runs write them."""
    from megatron.core.fusions.fused_bias_dropout import get_bias_dropout_add
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.ssm.mamba_block import MambaStack, MambaStackSubmodules
    from megatron.core.ssm.mamba_layer import MambaLayer, MambaLayerSubmodules
    from megatron.core.ssm.mamba_mixer import MambaMixer, MambaMixerSubmodules
    from megatron.core.ssm.mlp_layer import MLPLayer
    from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
    from megatron.core.transformer.spec_utils import ModuleSpec
    from megatron.core.transformer.transformer_layer import (
        MoETransformerLayer,
        TransformerLayer,
        TransformerLayerSubmodules,
    )

    local = get_gpt_layer_local_spec(normalization="RMSNorm").submodules
    norm, bda = local.input_layernorm, get_bias_dropout_add
    moe_mlp = get_gpt_layer_local_spec(num_experts=spec.num_experts, normalization="RMSNorm").submodules.mlp
    mixer = ModuleSpec(
        module=MambaMixer,
        submodules=MambaMixerSubmodules(in_proj=ColumnParallelLinear, out_proj=RowParallelLinear),
    )
    return ModuleSpec(
        module=MambaStack,
        submodules=MambaStackSubmodules(
            mamba_layer=ModuleSpec(
                module=MambaLayer,
                submodules=MambaLayerSubmodules(
                    norm=norm,
                    mixer=mixer,
                    mamba_bda=bda,
                    sharded_state_dict_keys_map={"norm.": "mixer.in_proj.layer_norm_"},
                ),
            ),
            attention_layer=ModuleSpec(
                module=TransformerLayer,
                submodules=TransformerLayerSubmodules(
                    input_layernorm=norm,
                    self_attention=local.self_attention,
                    self_attn_bda=bda,
                    sharded_state_dict_keys_map={"input_layernorm.": "self_attention.linear_qkv.layer_norm_"},
                ),
            ),
            mlp_layer=ModuleSpec(
                module=MLPLayer,
                submodules=TransformerLayerSubmodules(
                    pre_mlp_layernorm=norm,
                    mlp=local.mlp,
                    mlp_bda=bda,
                    sharded_state_dict_keys_map={"pre_mlp_layernorm.": "mlp.linear_fc1.layer_norm_"},
                ),
            ),
            moe_layer=ModuleSpec(
                module=MoETransformerLayer,
                submodules=TransformerLayerSubmodules(pre_mlp_layernorm=norm, mlp=moe_mlp, mlp_bda=bda),
            ),
        ),
    )


def _randomize_mamba(model, spec: MambaSpec, tp_rank: int) -> None:
    """Per-TP-rank values for the mixers' TP-sharded conv1d, A_log, D, dt_bias and gated norm (Megatron draws them
    from one seed, so TP ranks would hold equal halves and hide a misplaced shard)."""
    import torch
    from megatron.core.ssm.mamba_mixer import MambaMixer

    for name, module in model.named_modules():
        if not isinstance(module, MambaMixer):
            continue
        for pname, p in module.named_parameters():
            if pname.startswith(("in_proj", "out_proj")):
                continue
            gen = torch.Generator().manual_seed(_crc_seed(spec.seed, FAMILY, name, pname, tp_rank))
            noise = torch.randn(p.shape, generator=gen, dtype=torch.float32)
            p.copy_(
                {"A_log": 0.5 * noise, "D": 1 + 0.3 * noise, "norm.weight": 1 + 0.3 * noise}.get(pname, 0.3 * noise)
            )


def _build(spec: MambaSpec, tp: int, *, randomize: bool):
    import torch
    from megatron.core import parallel_state
    from megatron.core.models.mamba import MambaModel

    torch.manual_seed(_crc_seed(spec.seed, FAMILY, "init"))
    model = MambaModel(
        config=_config(spec, tp),
        mamba_stack_spec=_stack_spec(spec),
        vocab_size=spec.padded_vocab_size,
        max_sequence_length=SEQ_LENGTH,
        hybrid_override_pattern=spec.pattern,
        share_embeddings_and_output_weights=False,
        position_embedding_type="none",
    )
    if randomize:
        tp_rank = parallel_state.get_tensor_model_parallel_rank()
        with torch.no_grad():
            for pname, p in model.named_parameters():
                if "norm" in pname and pname.endswith("weight") and ".mixer." not in pname:
                    sharded = getattr(p, "tensor_model_parallel", False)
                    gen = torch.Generator().manual_seed(_crc_seed(spec.seed, FAMILY, pname, tp_rank if sharded else -1))
                    p.copy_(1 + 0.3 * torch.randn(p.shape, generator=gen, dtype=torch.float32))
            _randomize_mamba(model, spec, tp_rank)
            if spec.has_moe:
                _randomize_moe(model, spec, 0, 0)
    model = model.to(_torch_dtype(spec.dtype))  # a load then reads the checkpoint's dtype, no cast in the loader
    if randomize and spec.has_moe:
        _randomize_expert_bias(model, spec, 0, 0)  # a buffer: fp32, as Megatron keeps it
    return model


def make_args(spec: MambaSpec, tp: int, save: str) -> argparse.Namespace:
    """The Megatron-LM args a hybrid run saves (`pretrain_mamba.py`); deliberately no field naming the family."""
    args = argparse.Namespace(
        num_layers=spec.num_layers,
        hidden_size=spec.hidden_size,
        ffn_hidden_size=spec.ffn_hidden_size,
        num_attention_heads=spec.num_attention_heads,
        num_query_groups=spec.num_query_groups,
        group_query_attention=True,
        kv_channels=spec.hidden_size // spec.num_attention_heads,
        is_hybrid_model=True,
        hybrid_override_pattern=spec.pattern,
        hybrid_attention_ratio=0.0,
        hybrid_mlp_ratio=0.0,
        mamba_state_dim=spec.mamba_state_dim,
        mamba_head_dim=spec.mamba_head_dim,
        mamba_num_groups=spec.mamba_num_groups,
        mamba_num_heads=spec.mamba_num_heads,
        max_position_embeddings=SEQ_LENGTH,
        seq_length=SEQ_LENGTH,
        position_embedding_type="none",
        normalization="RMSNorm",
        norm_epsilon=1e-5,
        swiglu=False,
        squared_relu=True,
        add_bias_linear=False,
        add_qkv_bias=False,
        untie_embeddings_and_output_weights=True,
        vocab_size=spec.vocab_size,
        padded_vocab_size=spec.padded_vocab_size,
        make_vocab_size_divisible_by=MAKE_VOCAB_SIZE_DIVISIBLE_BY,
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=1,
        expert_model_parallel_size=1,
        world_size=tp,
        sequence_parallel=tp > 1 and spec.has_moe,
        bf16=spec.dtype == "bf16",
        init_method_std=INIT_METHOD_STD,
        seed=spec.seed,
        iteration=spec.iteration,
        ckpt_format="torch_dist",
        save=save,
        load=save,
        num_experts=None,
    )
    if spec.has_moe:
        vars(args).update(
            num_experts=spec.num_experts,
            moe_ffn_hidden_size=spec.moe_ffn_hidden_size,
            moe_router_topk=spec.moe_router_topk,
            moe_shared_expert_intermediate_size=spec.moe_shared_expert_intermediate_size,
            moe_shared_expert_overlap=False,
            moe_latent_size=spec.moe_latent_size,
            moe_router_score_function="sigmoid",
            moe_router_enable_expert_bias=True,
            moe_router_topk_scaling_factor=spec.scaling_factor,
            moe_router_dtype="fp32",
            moe_grouped_gemm=True,  # what real runs use; the on-disk expert layout is the same
            moe_aux_loss_coeff=0.0,
            expert_tensor_parallel_size=tp,
        )
    return args


def _load(model, spec: MambaSpec, root: str) -> None:
    """Megatron-LM's load path: dist_checkpointing.load (resharding to this TP), then load_state_dict."""
    from megatron.core import dist_checkpointing

    loaded = dist_checkpointing.load(
        {"model": model.sharded_state_dict(metadata=dict(METADATA))}, str(Path(root) / f"iter_{spec.iteration:07d}")
    )
    missing, unexpected = model.load_state_dict(loaded["model"], strict=False)
    missing = [k for k in missing if not k.endswith("_extra_state")]
    if missing or unexpected:
        raise RuntimeError(f"load mismatch: missing={missing} unexpected={unexpected}")


def _save_job(spec: MambaSpec, save: str, load: str | None) -> None:
    import torch
    from megatron.core import dist_checkpointing

    _init_parallel(spec.tp, 1, 1)
    model = _build(spec, spec.tp, randomize=load is None)
    if load is not None:
        _load(model, spec, load)
    iter_dir = Path(save) / f"iter_{spec.iteration:07d}"
    if torch.distributed.get_rank() == 0:
        iter_dir.mkdir(parents=True, exist_ok=True)
    torch.distributed.barrier()
    common = {"args": make_args(spec, spec.tp, save), "checkpoint_version": 3.0, "iteration": spec.iteration}
    state = {"model": model.sharded_state_dict(metadata=dict(METADATA)), **common, "rng_state": _rng_state()}
    dist_checkpointing.save(state, str(iter_dir), content_metadata=dict(METADATA))
    legacy = legacy_root(Path(save))
    if spec.legacy_twin:
        _save_legacy(
            [model],
            argparse.Namespace(**{**vars(common["args"]), "ckpt_format": "torch"}),
            legacy,
            spec.iteration,
            1,
            1,
        )
    torch.distributed.barrier()
    if torch.distributed.get_rank() == 0:
        for root in (Path(save), legacy) if spec.legacy_twin else (Path(save),):
            (root / "latest_checkpointed_iteration.txt").write_text(f"{spec.iteration}\n")


def _reference_job(spec: MambaSpec, root: str) -> None:
    """Megatron's TP1 fp32 forward of the saved checkpoint → reference.pt."""
    import torch

    _init_parallel(1, 1, 1)
    model = _build(spec, 1, randomize=False)  # the padded vocab stays the training TP's
    _load(model, spec, root)
    model = model.float().eval()
    gen = torch.Generator().manual_seed(spec.seed)
    ids = torch.randint(0, spec.vocab_size, (REFERENCE_BATCH, REFERENCE_SEQ), generator=gen)
    pos = torch.arange(REFERENCE_SEQ).unsqueeze(0).expand(REFERENCE_BATCH, -1)
    mask = torch.triu(torch.ones(REFERENCE_SEQ, REFERENCE_SEQ), diagonal=1).bool()[None, None]
    with torch.no_grad():
        logits = model(ids, position_ids=pos, attention_mask=mask)
    if not torch.isfinite(logits).all() or logits.std() < 0.05:
        raise RuntimeError(f"degenerate reference logits for {spec.name}")
    data = {"input_ids": ids.clone(), "logits": logits.float().detach().clone().contiguous()}
    torch.save(data, Path(root).parent / REFERENCE_FILE)
