"""Megatron-Bridge PEFT checkpoints (LoRA, CanonicalLoRA, DoRA) for tests, written on CPU by megatron-core.

A Megatron-Bridge PEFT run saves only its adapters: per wrapped linear, ``<module>.adapter.linear_in.weight``
(A, ``[dim, in]``) and ``<module>.adapter.linear_out.weight`` (B, ``[out, dim]``), stacked with a leading
layer axis like the base weights, sharded as the adapters were trained, plus a ``run_config.yaml`` whose
``checkpoint.pretrained_checkpoint`` names the base save root and whose ``peft:`` section holds alpha, dim
and the PEFT class. This module writes such saves with megatron-core's own ``dist_checkpointing.save``
(spawned gloo ranks at the adapter's TP / EP / expert-TP layout), for a base written by
:func:`tools.megatron_fixtures.build_fixtures`, and computes the reference: Megatron's own TP1 EP1 fp32
forward of the base with every targeted weight replaced, in Megatron layout, by the merged weight
(rounded to the base dtype, as a merged checkpoint stores it):

- ``lora``: ``W + (alpha/dim)·B@A``; on MoE bases expert ``e`` takes its slot ``B[e]@A[e]`` (or the shared
  2-D adapter), ``dim`` being the expert's effective rank (see ``AdapterSpec.normalize_moe_lora``);
- ``canonical_lora``: ``W + s·ΔW`` with the fused QKV delta interleaving ``ΔWq, ΔWk, ΔWv`` per query group
  and the fc1 delta ``[ΔW_gate; ΔW_up]`` (true row order);
- ``dora``: ``m / ||W + s·B@A||_row · (W + s·B@A)`` (row norm over the input axis, per output row).

Adapter values are generated globally (seeded) and each rank saves its slice through the same sharded
tensors (and swiglu factory) Megatron-Bridge builds; the reference pass reads the saved tensors back with
plain ``torch.distributed.checkpoint`` and checks that they equal :func:`global_adapters` bit for bit
before merging them. Megatron is imported only inside the spawned workers.

Layout under ``cache_dir/<spec.name>/``::

    adapter/latest_checkpointed_iteration.txt      # or combined/ with AdapterSpec(combined=True)
    adapter/latest_train_state.pt
    adapter/iter_0000020/{.metadata, __*_*.distcp, common.pt, metadata.json,
                          run_config.yaml, train_state.pt}
    reference.pt     # {"input_ids": [b, s], "logits": [b, s, padded_vocab] fp32}; same ids as the base's
    COMPLETE         # written last; its presence means "done"

``reference_logits(<save root>)`` from :mod:`tools.megatron_fixtures` reads ``reference.pt``.

Sharding on disk (global shapes are TP / EP invariant; L = layers; TP axis of the local shard):

=================================  ===================  ======================  ===========================
target (module path)               A global / TP axis   B global / TP axis      B rows
=================================  ===================  ======================  ===========================
self_attention.linear_qkv          [L, dim, h] / 0      [L, qkv, dim] / 0       [q|k|v] per group
self_attention.linear_proj         [L, dim, nd] / 1     [L, h, dim] / 0
mlp.linear_fc1                     [L, dim, h] / 0      [L, 2f, dim] / 0        [gate; up] (swiglu)
mlp.linear_fc2                     [L, dim, f] / 1      [L, h, dim] / 0
mlp.experts.experts.linear_fc1     [L, E, de, h] / 0    [L, E, 2mf, de] / 0     per expert [gate; up]
mlp.experts.experts.linear_fc2     [L, E, de, mf] / 1   [L, E, h, de] / 0
mlp.router                         [L, dim, h] / 0      [L, E, dim] / 0         (replicated base)
self_attention.linear_q*/kv*       [L, dim, in] / 0     [L, out, dim] / 0       MLA: as the base weight
mlp.shared_experts.linear_fc1      [L, dim, h] / 0      [L, 2sf, dim] / 0       [gate; up] (swiglu)
mlp.shared_experts.linear_fc2      [L, dim, sf] / 1     [L, h, dim] / 0
=================================  ===================  ======================  ===========================

(h hidden, nd heads·head_dim, f ffn, qkv = (heads + 2·groups)·head_dim, E experts, mf moe ffn, de the
expert rank.) Experts: the E axis is sharded over EP (each EP rank holds E/EP slots at their global
offsets), the TP axis over expert TP. ``expert_layout="shared"`` (Bridge >= v0.6 default) writes one adapter
per EP rank into every local slot; ``"per_expert"`` distinct adapters per slot (same keys and shapes);
``"legacy_2d"`` (Bridge <= v0.5) one adapter for all experts, without the E axis: A ``[L, de, in]``, B
``[L, out, de]``; ``"shared_outer"`` (``experts_shared_outer_loras``, expert TP 1) fc1 A ``[L, de, h]`` and
fc2 B ``[L, h, de]`` shared by all experts (replicated across EP), fc2 A and fc1 B per expert. The router and
shared experts (sf their ffn) wrap MoE layers only; a base with dense and MoE layers (DeepSeek-V3) has
per-layer keys. CanonicalLoRA replaces the qkv / fc1 adapters by ``adapter.adapter_{q,k,v}.linear_*``
(A ``[L, dim, h]``, B ``[L, heads·d | groups·d, dim]`` in HF head-major row order) and
``adapter.adapter_{up,gate}.linear_*`` (B ``[L, f, dim]`` in the swiglu factory's permuted row order, see
:func:`swiglu_saved_rows`). DoRA adds ``adapter.weight_magnitude`` ``[L, out]``: TP axis 0 for
column-parallel bases, replicated for row-parallel ones; fc1's in rank-major ``[gate_r; up_r]`` blocks (see
:func:`rank_major_rows`). With a base of ``per_layer_keys`` the keys are ``decoder.layers.{i}.<module>.adapter.*``
without the layer axis.
"""

from __future__ import annotations

import dataclasses
import shutil
import zlib
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tools.megatron_fixtures import (
    DENSE_FAMILIES,
    QKV_BIAS_FAMILIES,
    REFERENCE_BATCH,
    REFERENCE_FILE,
    REFERENCE_SEQ,
    FixtureSpec,
    build_fixtures,
    pending_builds,
    world_size,
)

if TYPE_CHECKING:
    import torch

__all__ = [
    "ADAPTER_DIR",
    "CANONICAL_TARGETS",
    "COMBINED_DIR",
    "EXPERT_LAYOUTS",
    "GLM_TARGETS",
    "KINDS",
    "MLA_BASE_FAMILIES",
    "MLA_TARGETS",
    "MOE_BASE_FAMILIES",
    "SIGMOID_BASE_FAMILIES",
    "TARGET_MODULES",
    "AdapterSpec",
    "adapter_keys",
    "build_adapters",
    "global_adapters",
    "rank_major_rows",
    "run_config",
    "swiglu_saved_rows",
]

KINDS = ("lora", "canonical_lora", "dora")
EXPERT_LAYOUTS = ("shared", "per_expert", "legacy_2d", "shared_outer")
MOE_BASE_FAMILIES = ("qwen3_moe", "mixtral")  # homogeneous MoE blocks (every layer MoE, no shared expert)
MLA_BASE_FAMILIES = ("deepseek_v3", "glm4_moe_lite")  # MLA projections, router, shared and routed experts
# DeepSeek-V3's MoE body (dense first layer, shared experts, MTP): linear_fc1 / linear_fc2 wrap all three MLPs;
# GLM-4.5 has it under grouped-query attention (linear_qkv, linear_proj)
SIGMOID_BASE_FAMILIES = (*MLA_BASE_FAMILIES, "glm4_moe")
# Megatron-Bridge's target name -> the module path under decoder.layers.
TARGET_MODULES = {
    "linear_qkv": "self_attention.linear_qkv",
    "linear_proj": "self_attention.linear_proj",
    "linear_fc1": "mlp.linear_fc1",
    "linear_fc2": "mlp.linear_fc2",
}
ROUTER = {"router": "mlp.router"}  # TopKRouter: replicated across TP; on MoE layers only
# DeepSeek-V3 targets (Bridge matches `*.`-patterns against the full module name).
MLA_TARGETS = {
    "linear_q_proj": "self_attention.linear_q_proj",  # bases without q_lora_rank
    "linear_q_down_proj": "self_attention.linear_q_down_proj",
    "linear_q_up_proj": "self_attention.linear_q_up_proj",
    "linear_kv_down_proj": "self_attention.linear_kv_down_proj",
    "linear_kv_up_proj": "self_attention.linear_kv_up_proj",
    "linear_proj": "self_attention.linear_proj",
    **ROUTER,
    "*.shared_experts.linear_fc1": "mlp.shared_experts.linear_fc1",
    "*.shared_experts.linear_fc2": "mlp.shared_experts.linear_fc2",
}
MODULES = {**TARGET_MODULES, **MLA_TARGETS}
GLM_TARGETS = ("linear_qkv", "linear_proj", "router", "*.shared_experts.linear_fc1", "*.shared_experts.linear_fc2")
MOE_ONLY = ("router", "*.shared_experts.linear_fc1", "*.shared_experts.linear_fc2")  # on MoE layers only
# On MoE bases linear_fc1 / linear_fc2 name the experts: (module path on disk, module path in memory).
EXPERT_MODULES = {
    "linear_fc1": ("mlp.experts.experts.linear_fc1", "mlp.experts.linear_fc1"),
    "linear_fc2": ("mlp.experts.experts.linear_fc2", "mlp.experts.linear_fc2"),
}
# CanonicalLoRA's target name -> (the base target it wraps, its sub-adapter; None = a plain adapter).
CANONICAL_TARGETS = {
    "linear_q": ("linear_qkv", "adapter_q"),
    "linear_k": ("linear_qkv", "adapter_k"),
    "linear_v": ("linear_qkv", "adapter_v"),
    "linear_proj": ("linear_proj", None),
    "linear_fc1_up": ("linear_fc1", "adapter_up"),
    "linear_fc1_gate": ("linear_fc1", "adapter_gate"),
    "linear_fc2": ("linear_fc2", None),
}
ROW_PARALLEL = ("linear_proj", "linear_fc2", "*.shared_experts.linear_fc2")  # A split on its input axis
SWIGLU = ("linear_fc1", "*.shared_experts.linear_fc1")  # B through the swiglu factory (gated linear units)
ADAPTER_DIR = "adapter"
COMBINED_DIR = "combined"
RUN_CONFIG = "run_config.yaml"
A_STD, B_STD = 0.1, 0.05  # merge delta ≈ (alpha/dim)·sqrt(dim)·A_STD·B_STD ≈ 0.03 vs base weights' 0.08
MAGNITUDE_NOISE = 0.2  # DoRA magnitudes: row norms of W + s·B@A times (1 + MAGNITUDE_NOISE·randn)
MIN_LOGIT_CHANGE = 0.05  # the merge must move the reference logits at least this much (max abs)
_PROVIDERS = {
    "llama": "megatron.bridge.models.llama.llama_provider.LlamaModelProvider",
    "qwen2": "megatron.bridge.models.qwen.qwen_provider.Qwen2ModelProvider",
    "qwen3": "megatron.bridge.models.qwen.qwen_provider.Qwen3ModelProvider",
    "qwen3_moe": "megatron.bridge.models.qwen.qwen_provider.Qwen3MoEModelProvider",
    "mixtral": "megatron.bridge.models.mixtral.mixtral_provider.MixtralModelProvider",
    "deepseek_v3": "megatron.bridge.models.deepseek.deepseek_provider.DeepSeekV3ModelProvider",
    "glm4_moe": "megatron.bridge.models.glm.glm45_provider.GLMMoEModelProvider",
    "glm4_moe_lite": "megatron.bridge.models.mla_provider.MLAModelProvider",  # GLM47FlashBridge's
}
_PEFT_CLASSES = {
    "lora": "megatron.bridge.peft.lora.LoRA",
    "canonical_lora": "megatron.bridge.peft.canonical_lora.CanonicalLoRA",
    "dora": "megatron.bridge.peft.dora.DoRA",
}
_TARGET_TAGS = {
    "linear_qkv": "qkv",
    "linear_proj": "proj",
    "linear_fc1": "fc1",
    "linear_fc2": "fc2",
    "linear_q": "q",
    "linear_k": "k",
    "linear_v": "v",
    "linear_fc1_up": "up",
    "linear_fc1_gate": "gate",
    "router": "router",
    "linear_q_proj": "qp",
    "linear_q_down_proj": "qd",
    "linear_q_up_proj": "qu",
    "linear_kv_down_proj": "kvd",
    "linear_kv_up_proj": "kvu",
    "*.shared_experts.linear_fc1": "sfc1",
    "*.shared_experts.linear_fc2": "sfc2",
}
_LAYOUT_TAGS = {"per_expert": "perexpert", "legacy_2d": "legacy2d", "shared_outer": "sharedouter"}


@dataclass(frozen=True)
class AdapterSpec:
    """One Megatron-Bridge PEFT save on top of a :class:`FixtureSpec` base.

    ``kind``: ``"lora"`` (dense or MoE bases), ``"canonical_lora"`` or ``"dora"`` (dense bases). ``targets``
    are Bridge's target names; CanonicalLoRA's are those of :data:`CANONICAL_TARGETS` (the LoRA default
    becomes all seven). On MoE bases (:data:`MOE_BASE_FAMILIES`) ``linear_fc1`` / ``linear_fc2`` target the
    experts, ``linear_qkv`` / ``linear_proj`` the attention, ``router`` the router. On DeepSeek-V3 and GLM-4.7-Flash bases
    (:data:`MLA_BASE_FAMILIES`) the targets are those of :data:`MLA_TARGETS` plus ``linear_fc1`` /
    ``linear_fc2``, which (as Bridge's name match does) wrap the dense layers' MLP, the shared experts and the
    routed experts; the default is every one the base has but the ``*.shared_experts.*`` patterns. GLM-4.5 bases
    (the rest of :data:`SIGMOID_BASE_FAMILIES`) are the same with :data:`GLM_TARGETS` for the MLA ones. The MTP
    layer carries the adapters of a MoE layer (keys ``mtp.layers.{k}.transformer_layer.<module>.adapter.*``).

    ``combined`` writes one save root holding the base model keys and the adapter keys together (at the
    adapter's layout, PP1; ``common.pt`` then carries Megatron-LM ``args`` too and ``run_config.yaml`` names
    no pretrained checkpoint) instead of an adapter-only save.

    MoE fields: ``ep`` (None = the base's EP) and ``etp`` (None = ``tp``) are the adapter's training layout;
    ``expert_layout`` one of :data:`EXPERT_LAYOUTS` (``"shared_outer"``: Bridge's
    ``experts_shared_outer_loras``, fc1 A and fc2 B shared by all experts, the other side per expert; expert
    TP 1); ``normalize_moe_lora`` gives expert adapters rank ``dim // moe_router_topk``, rounded up to a multiple of ``etp`` for column-parallel fc1 only (as Bridge's
    ``align_expert_dim_for_tp``), and scale ``alpha / that rank`` (see :meth:`effective_dim`).
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
    ep: int | None = None  # expert_model_parallel_size of the adapter save; None = the base's ep
    etp: int | None = None  # expert_tensor_parallel_size; None = tp (MoE bases only)
    expert_layout: str = "shared"  # "shared" | "per_expert" | "legacy_2d" | "shared_outer" (MoE bases only)
    normalize_moe_lora: bool = False  # MoE bases only

    def __post_init__(self) -> None:
        if isinstance(self.targets, list):
            object.__setattr__(self, "targets", tuple(self.targets))
        if self.kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {self.kind!r}")
        base = self.base
        if self.targets == _DEFAULT_TARGETS:
            object.__setattr__(self, "targets", _default_targets(self.kind, base))
        if base.family in MOE_BASE_FAMILIES + SIGMOID_BASE_FAMILIES:
            if self.kind != "lora":
                raise ValueError(f"{self.kind} adapters are written for dense bases only ({DENSE_FAMILIES})")
            if base.family in MOE_BASE_FAMILIES and (
                not all(base.moe_layer_pattern) or base.moe_shared_expert_intermediate_size or base.mtp_num_layers
            ):
                raise ValueError("MoE adapters need a homogeneous base: every layer MoE, no shared expert, no MTP")
            if base.singleton_local_shards:
                raise ValueError("MoE adapters are not written for singleton_local_shards bases")
            object.__setattr__(self, "ep", base.ep if self.ep is None else self.ep)
            object.__setattr__(self, "etp", self.tp if self.etp is None else self.etp)
            if self.expert_layout == "shared_outer" and self.etp != 1:
                raise ValueError("shared_outer expert adapters are written at expert TP 1 (Bridge's packed side)")
        elif base.family in DENSE_FAMILIES:
            if self.ep not in (None, 1) or self.etp is not None:
                raise ValueError("ep and etp apply only to MoE bases")
            if self.expert_layout != "shared" or self.normalize_moe_lora:
                raise ValueError("expert_layout and normalize_moe_lora apply only to MoE bases")
            object.__setattr__(self, "ep", 1)
        else:
            raise ValueError(
                f"adapters are written for {DENSE_FAMILIES + MOE_BASE_FAMILIES + SIGMOID_BASE_FAMILIES} bases, "
                f"not {base.family}"
            )
        names = _target_names(self.kind, base)
        unknown = set(self.targets) - set(names)
        if unknown or not self.targets or len(set(self.targets)) != len(self.targets):
            raise ValueError(f"{self.kind} targets must be distinct names from {names}, got {self.targets}")
        if self.expert_layout not in EXPERT_LAYOUTS:
            raise ValueError(f"expert_layout must be one of {EXPERT_LAYOUTS}, got {self.expert_layout!r}")
        if self.dim < 1 or self.tp < 1 or self.iteration < 1 or self.ep < 1 or (self.etp or 1) < 1:
            raise ValueError("dim, tp, ep, etp and iteration must be >= 1")
        if base.is_moe:
            if base.num_experts % self.ep:
                raise ValueError(f"num_experts={base.num_experts} is not divisible by ep={self.ep}")
            if self.normalize_moe_lora and self.dim % base.moe_router_topk:
                raise ValueError(f"normalize_moe_lora needs dim={self.dim} divisible by topk={base.moe_router_topk}")
        units = _units(self).values()
        wrapped = [(unit.module, unit.sub, layer) for unit in units for layer in unit.layers]
        if len(wrapped) != len(set(wrapped)):
            raise ValueError(f"targets {self.targets} wrap a module twice (linear_fc1 takes the shared experts too)")
        for unit in units:
            size = self.etp if unit.expert else self.tp
            # row-parallel: A's input and B's output axes; column-parallel: the rank and B's output (swiglu
            # halves: every rank's rows are cut in two)
            split = (unit.inp, unit.out) if unit.row_parallel else (unit.dim, unit.out // (2 if unit.swiglu else 1))
            if any(n % size for n in split) or unit.out % (2 if unit.swiglu else 1):
                what = "expert tp" if unit.expert else "tp"
                raise ValueError(f"{unit.target}: A/B sizes {split} are not divisible by {what}={size}")
        if base.num_query_groups % self.tp or (not base.is_moe and base.ffn_hidden_size % self.tp):
            raise ValueError(f"ffn_hidden_size and num_query_groups must be divisible by tp={self.tp}")

    @property
    def name(self) -> str:
        """Filesystem-safe, unique per spec; never equal to a base fixture's name."""
        parts = [self.kind, f"r{self.dim}a{self.alpha}", f"tp{self.tp}", f"s{self.seed}"]
        if self.targets != _default_targets(self.kind, self.base):
            parts.append("t" + "_".join(_TARGET_TAGS[t] for t in self.targets))
        if self.iteration != 20:
            parts.append(f"it{self.iteration}")
        if self.base.is_moe:
            parts.append(f"ep{self.ep}")
            if self.etp != self.tp:
                parts.append(f"etp{self.etp}")
            if self.expert_layout != "shared":
                parts.append(_LAYOUT_TAGS[self.expert_layout])
            if self.normalize_moe_lora:
                parts.append("normmoe")
        if self.combined:
            parts.append("combined")
        return "-".join(parts) + "--" + self.base.name

    @property
    def scale(self) -> float:
        """alpha / dim: the scale of every non-expert adapter (experts: alpha / :meth:`effective_dim`)."""
        return self.alpha / self.dim

    @property
    def save_dir(self) -> str:
        """The save root's directory name under ``cache_dir/<name>/``."""
        return COMBINED_DIR if self.combined else ADAPTER_DIR

    @property
    def world_size(self) -> int:
        """Ranks of the save: TP for dense bases; ``lcm(tp, etp·ep)`` for MoE ones (DP fills the rest)."""
        return world_size(self.tp, 1, self.ep, self.etp) if self.base.is_moe else self.tp

    def effective_dim(self, target: str) -> int:
        """The rank of a target's adapter on routed experts: ``dim``, or under ``normalize_moe_lora``
        ``dim // topk``, rounded up to a multiple of ``etp`` when the base is column-parallel (fc1)."""
        if not (self.normalize_moe_lora and self.base.is_moe and target in EXPERT_MODULES):
            return self.dim
        dim = self.dim // self.base.moe_router_topk
        if target in ROW_PARALLEL:
            return dim
        return -(-dim // self.etp) * self.etp


_DEFAULT_TARGETS = next(f.default for f in dataclasses.fields(AdapterSpec) if f.name == "targets")


def _target_names(kind: str, base: FixtureSpec) -> tuple[str, ...]:
    """Every target an adapter of ``kind`` may name on ``base``."""
    if kind == "canonical_lora":
        return tuple(CANONICAL_TARGETS)
    if base.family in MLA_BASE_FAMILIES:
        unused = ("linear_q_down_proj", "linear_q_up_proj") if base.q_lora_rank is None else ("linear_q_proj",)
        return tuple(t for t in MLA_TARGETS if t not in unused) + tuple(EXPERT_MODULES)
    if base.family in SIGMOID_BASE_FAMILIES:
        return GLM_TARGETS + tuple(EXPERT_MODULES)
    return tuple(TARGET_MODULES) + (tuple(ROUTER) if base.is_moe else ())


def _default_targets(kind: str, base: FixtureSpec) -> tuple[str, ...]:
    """Bridge's defaults; on DeepSeek-V3 every MLA projection, the router and linear_fc1 / linear_fc2 (which
    wrap the dense, shared-expert and routed-expert MLPs alike)."""
    if kind == "lora" and base.family not in SIGMOID_BASE_FAMILIES:
        return _DEFAULT_TARGETS
    return tuple(t for t in _target_names(kind, base) if not t.startswith("*."))


def _per_layer(base: FixtureSpec) -> bool:
    """Keys ``decoder.layers.{i}.*`` without the layer axis: asked for, or layers of different kinds."""
    return base.per_layer_keys or len(set(base.moe_layer_pattern)) > 1


def _stacked(base: FixtureSpec, layer: int) -> bool:
    """Whether a layer's adapter lives in a stacked ``[L, ...]`` key (MTP layers never do)."""
    return layer < base.num_layers and not _per_layer(base)


def _prefix(base: FixtureSpec, layer: int) -> str:
    """Where layer ``layer`` lives; ``num_layers + k`` is MTP depth k's transformer layer."""
    if layer < base.num_layers:
        return f"decoder.layers.{layer}"
    return f"mtp.layers.{layer - base.num_layers}.transformer_layer"


@dataclass(frozen=True)
class _Unit:
    """One adapter (A, B and, for DoRA, its magnitude) per layer, as Bridge builds it for a target."""

    name: str  # the key in _units (the target name, or <target>@<module kind>)
    target: str  # Bridge's target name
    base: str  # the wrapped base: a key of MODULES (linear_qkv, ..., router, *.shared_experts.linear_fc1)
    module: str  # its module path under decoder.layers[.i] on disk
    param_module: str  # ... and in memory (run_config's params_to_save)
    sub: str  # "" or the canonical sub-adapter with its dot ("adapter_q.")
    out: int
    inp: int
    dim: int
    expert: bool
    layers: tuple[int, ...]  # the decoder layers holding the wrapped base

    @property
    def row_parallel(self) -> bool:
        return self.base in ROW_PARALLEL

    @property
    def swiglu(self) -> bool:
        """B goes through Megatron's swiglu sharded factory (every adapter on fc1; gated linear units here)."""
        return self.base in SWIGLU


def _units(spec: AdapterSpec) -> dict[str, _Unit]:
    """Every adapter the spec's targets create, by name: the target's, or ``<target>@shared_experts`` /
    ``<target>@experts`` where Bridge's name match wraps several kinds of module (``linear_fc1`` on
    DeepSeek-V3: the dense layers' MLP, the shared experts and the routed experts)."""
    base = spec.base
    h, d = base.hidden_size, base.kv_channels
    heads, groups, f = base.num_attention_heads, base.num_query_groups, base.ffn_hidden_size
    mtp_layers = tuple(range(base.num_layers, base.num_layers + (base.mtp_num_layers or 0)))  # MoE layers too
    moe_layers = tuple(i for i, moe in enumerate(base.moe_layer_pattern) if moe) + mtp_layers
    dense_layers = tuple(i for i, moe in enumerate(base.moe_layer_pattern) if not moe)
    units = {}
    for target in spec.targets:
        base_target, sub = CANONICAL_TARGETS[target] if spec.kind == "canonical_lora" else (target, None)
        if base.is_moe and base_target in EXPERT_MODULES:
            kinds = [(target, base_target, moe_layers, True)]
            if base.family in SIGMOID_BASE_FAMILIES:
                shared_layers = moe_layers if base.moe_shared_expert_intermediate_size else ()
                kinds = [
                    (target, base_target, dense_layers, False),
                    (f"{target}@shared_experts", f"*.shared_experts.{base_target}", shared_layers, False),
                    (f"{target}@experts", base_target, moe_layers, True),
                ]
        else:
            all_layers = tuple(range(base.num_layers)) + mtp_layers
            kinds = [(target, base_target, moe_layers if base_target in MOE_ONLY else all_layers, False)]
        for name, wrapped, layers, expert in kinds:
            if not layers:
                continue
            if expert:
                mf = base.moe_ffn_hidden_size
                out, inp = {"linear_fc1": (2 * mf, h), "linear_fc2": (h, mf)}[wrapped]
                module, param_module = EXPERT_MODULES[wrapped]
            else:
                out, inp = _base_shape(base, wrapped)
                module = param_module = MODULES[wrapped]
            if sub is not None:
                out = {"adapter_q": heads * d, "adapter_k": groups * d, "adapter_v": groups * d}.get(sub, f)
            units[name] = _Unit(
                name=name,
                target=target,
                base=wrapped,
                module=module,
                param_module=param_module,
                sub="" if sub is None else sub + ".",
                out=out,
                inp=inp,
                dim=spec.effective_dim(target) if expert else spec.dim,
                expert=expert,
                layers=layers,
            )
    return units


def _base_shape(base: FixtureSpec, target: str) -> tuple[int, int]:
    """(out, in) of the non-expert base weight a target wraps (global, Megatron layout)."""
    h, d = base.hidden_size, base.kv_channels
    heads, groups, f = base.num_attention_heads, base.num_query_groups, base.ffn_hidden_size
    if base.family in MLA_BASE_FAMILIES:
        q_head, latent, rope = base.qk_head_dim + base.qk_pos_emb_head_dim, base.kv_lora_rank, base.qk_pos_emb_head_dim
        shared = base.moe_shared_expert_intermediate_size
        return {
            "linear_fc1": (2 * f, h),
            "linear_fc2": (h, f),
            "linear_q_proj": (heads * q_head, h),
            "linear_q_down_proj": (base.q_lora_rank, h),
            "linear_q_up_proj": (heads * q_head, base.q_lora_rank),
            "linear_kv_down_proj": (latent + rope, h),
            "linear_kv_up_proj": (heads * (base.qk_head_dim + base.v_head_dim), latent),
            "linear_proj": (h, heads * base.v_head_dim),
            "router": (base.num_experts, h),
            "*.shared_experts.linear_fc1": (2 * shared, h),
            "*.shared_experts.linear_fc2": (h, shared),
        }[target]
    return {
        "linear_qkv": ((heads + 2 * groups) * d, h),
        "linear_proj": (h, heads * d),
        "linear_fc1": (2 * f, h),
        "linear_fc2": (h, f),
        "router": (base.num_experts, h),
        "*.shared_experts.linear_fc1": (2 * (base.moe_shared_expert_intermediate_size or 0), h),
        "*.shared_experts.linear_fc2": (h, base.moe_shared_expert_intermediate_size or 0),
    }[target]


def _slots(spec: AdapterSpec, unit: _Unit, side: str) -> int | None:
    """The size of the global expert axis of a unit's A (``side="in"``) or B (``"out"``); None: no expert
    axis (non-experts, the legacy 2-D layout, the shared side of ``shared_outer``: fc1's A, fc2's B)."""
    if not unit.expert or spec.expert_layout == "legacy_2d":
        return None
    if spec.expert_layout == "shared_outer" and (side == "in") == (unit.base == "linear_fc1"):
        return None
    return spec.base.num_experts


def _layer_shapes(spec: AdapterSpec, unit: _Unit) -> dict[str, tuple[int, ...]]:
    """Per-layer global shape of each tensor a unit saves, by its name after ``adapter.``."""
    lead_in, lead_out = ((e,) if (e := _slots(spec, unit, side)) else () for side in ("in", "out"))
    shapes = {
        f"{unit.sub}linear_in.weight": (*lead_in, unit.dim, unit.inp),
        f"{unit.sub}linear_out.weight": (*lead_out, unit.out, unit.dim),
    }
    if spec.kind == "dora":
        shapes["weight_magnitude"] = (unit.out,)
    return shapes


def adapter_keys(spec: AdapterSpec) -> dict[str, tuple[int, ...]]:
    """Every tensor key the adapter save holds, with its global shape on disk."""
    base = spec.base
    keys: dict[str, tuple[int, ...]] = {}
    for unit in _units(spec).values():
        for part, shape in _layer_shapes(spec, unit).items():
            for layer in unit.layers:
                if _stacked(base, layer):
                    keys[_key(base, unit, part, None)] = (base.num_layers, *shape)
                else:
                    keys[_key(base, unit, part, layer)] = shape
    return keys


def _key(base: FixtureSpec, unit: _Unit, part: str, layer: int | None) -> str:
    """The on-disk key of a unit's tensor at ``layer`` (None: the stacked key of the decoder layers)."""
    where = "decoder.layers" if layer is None else _prefix(base, layer)
    return f"{where}.{unit.module}.adapter.{part}"


def swiglu_saved_rows(rows: torch.Tensor, tp: int) -> torch.Tensor:
    """Global rows as Megatron's swiglu sharded factory saves a column-parallel B whose local rows are
    plain (CanonicalLoRA's up / gate B): cut the true rows into ``2·tp`` blocks ``c_0 … c_{2tp-1}``;
    TP rank r holds ``c_{2r}, c_{2r+1}`` and the factory stores its first half at block r, its second at
    block ``tp + r``, so the file holds ``[c_0, c_2, …, c_{2tp-2}, c_1, c_3, …, c_{2tp-1}]``."""
    import torch

    blocks = rows.chunk(2 * tp)
    return torch.cat(blocks[0::2] + blocks[1::2])


def rank_major_rows(rows: torch.Tensor, tp: int) -> torch.Tensor:
    """Fused fc1 rows ``[gate; up]`` as concatenated TP-local blocks ``[gate_0, up_0, gate_1, up_1, …]``
    (each ``f/tp`` rows): how a plain TP-sharded per-row tensor of fc1 (DoRA's magnitude) lands on disk."""
    import torch

    gate, up = (half.chunk(tp) for half in rows.chunk(2))
    return torch.cat([block for r in range(tp) for block in (gate[r], up[r])])


def _dtype(spec: AdapterSpec):
    import torch

    return {"fp32": torch.float32, "bf16": torch.bfloat16}[spec.base.dtype]


def _generated(spec: AdapterSpec, base_root: Path | None) -> dict[tuple[str, int], tuple[torch.Tensor, ...]]:
    """``{(target, layer): (A, B[, magnitude])}`` in the true (model) order, in the base dtype.

    Expert units hold every global slot: A ``[E, dim, in]``, B ``[E, out, dim]`` (2-D for ``legacy_2d``, and
    for the shared side of ``shared_outer``). DoRA magnitudes need the base weights (read from ``base_root``).
    """
    import torch

    dtype = _dtype(spec)
    units = _units(spec)
    result = {}
    for target, unit in units.items():
        for layer in unit.layers:
            a, b = _draw(spec, unit, layer)
            result[target, layer] = (a.to(dtype), b.to(dtype))
    if spec.kind != "dora":
        return result
    if base_root is None:
        raise ValueError("DoRA magnitudes are row norms of the base weights: pass base_root")
    weights = _base_weights(spec, Path(base_root))
    for (target, layer), (a, b) in list(result.items()):
        unit = units[target]
        merged = weights[unit.base, layer].float() + spec.alpha / unit.dim * (b.float() @ a.float())
        noise = _randn((unit.out,), MAGNITUDE_NOISE, spec.seed, spec.kind, target, layer, "magnitude")
        result[target, layer] = (a, b, (merged.norm(dim=1) * (1 + noise)).to(dtype))
    if any(not torch.isfinite(v).all() for values in result.values() for v in values):
        raise RuntimeError(f"{spec.name}: non-finite adapter values")
    return result


def _draw(spec: AdapterSpec, unit: _Unit, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Seeded fp32 A and B of one unit and layer; experts: one draw per EP rank, per slot or one in all."""
    import torch

    seed = (spec.seed, spec.kind, unit.name, layer)
    drawn = []
    for side, shape, std, tag in (("in", (unit.dim, unit.inp), A_STD, "A"), ("out", (unit.out, unit.dim), B_STD, "B")):
        slots = _slots(spec, unit, side)
        if slots is None:
            drawn.append(_randn(shape, std, *seed, tag))
            continue
        if spec.expert_layout == "shared":  # slot e holds the adapter of the EP rank that owns it
            owners = [("ep", e // (slots // spec.ep)) for e in range(slots)]
        else:
            owners = [("expert", e) for e in range(slots)]
        drawn.append(torch.stack([_randn(shape, std, *seed, *owner, tag) for owner in owners]))
    return drawn[0], drawn[1]


def _randn(shape: tuple[int, ...], std: float, *seed: object):
    import torch

    gen = torch.Generator().manual_seed(zlib.crc32("|".join(map(str, seed)).encode()))
    return std * torch.randn(shape, generator=gen, dtype=torch.float32)


def _base_weights(spec: AdapterSpec, base_root: Path) -> dict[tuple[str, int], torch.Tensor]:
    """The targeted dense base weights, ``{(base target, layer): W}`` (global Megatron layout), read from
    the base save with plain DCP."""
    base = spec.base
    iteration = int((base_root / "latest_checkpointed_iteration.txt").read_text().strip())
    iter_dir = base_root / f"iter_{iteration:07d}"
    bases = sorted({u.base for u in _units(spec).values()})
    if base.per_layer_keys:
        keys = {
            (t, layer): f"decoder.layers.{layer}.{TARGET_MODULES[t]}.weight"
            for t in bases
            for layer in range(base.num_layers)
        }
        tensors = _read_global(iter_dir, keys.values())
        return {k: tensors[v] for k, v in keys.items()}
    tensors = _read_global(iter_dir, [f"decoder.layers.{TARGET_MODULES[t]}.weight" for t in bases])
    return {
        (t, layer): tensors[f"decoder.layers.{TARGET_MODULES[t]}.weight"][layer]
        for t in bases
        for layer in range(base.num_layers)
    }


def _stored(spec: AdapterSpec, generated: dict) -> dict[tuple[str, int], tuple[torch.Tensor, ...]]:
    """The generated values in the row order the save holds them."""
    units = _units(spec)
    result = {}
    for (target, layer), (a, b, *magnitude) in generated.items():
        unit = units[target]
        if unit.swiglu and unit.sub:  # canonical up / gate: the swiglu factory on plain local rows
            b = swiglu_saved_rows(b, spec.tp)
        if magnitude and unit.swiglu:  # DoRA fc1: TP-local [gate_r; up_r] blocks, no swiglu factory
            magnitude = [rank_major_rows(magnitude[0], spec.tp)]
        result[target, layer] = (a, b, *magnitude)
    return result


def global_adapters(
    spec: AdapterSpec, base_root: Path | None = None
) -> dict[tuple[str, int], tuple[torch.Tensor, ...]]:
    """``{(target, layer): (A, B)}`` (DoRA: ``(A, B, magnitude)``): the global per-layer adapter values exactly
    as the save stores them, in the base dtype.

    Keys are the spec's target names (CanonicalLoRA: ``linear_q`` … ``linear_fc1_gate``). Expert targets of
    MoE bases hold the global expert axis: A ``[E, dim, in]``, B ``[E, out, dim]`` (``legacy_2d``: 2-D).
    Row orders are those on disk: fused QKV B interleaved per group, fused fc1 B ``[gate; up]``, canonical
    q / k / v B head-major, canonical up / gate B as :func:`swiglu_saved_rows` permutes them, DoRA fc1
    magnitudes as :func:`rank_major_rows`. Deterministic (seeded by spec seed, kind, target, layer and the
    expert owner), so every rank and the reference pass agree. ``base_root`` (the base save root) is
    needed for DoRA only: its magnitudes derive from the base weights.
    """
    return _stored(spec, _generated(spec, base_root))


def run_config(spec: AdapterSpec, base_root: Path | None, save_root: Path) -> dict[str, Any]:
    """The ``run_config.yaml`` content Megatron-Bridge writes (the parts a converter may read).

    ``base_root`` None leaves ``checkpoint.pretrained_checkpoint`` null (combined saves).
    ``peft.params_to_save`` is a set, so the YAML carries a ``!!set`` as Bridge's files do.
    """
    base = spec.base
    units = _units(spec).values()
    params = {
        f"{_prefix(base, layer)}.{u.param_module}.adapter.{part}"
        for u in units
        for layer in u.layers
        for part in _layer_shapes(spec, u)
    }
    dtype = {"fp32": "torch.float32", "bf16": "torch.bfloat16"}[base.dtype]
    model = {
        "_target_": _PROVIDERS[base.family],
        "add_qkv_bias": base.family in QKV_BIAS_FAMILIES,
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
    }
    if base.is_moe:
        model.update(
            expert_model_parallel_size=spec.ep,
            expert_tensor_parallel_size=spec.etp,
            moe_ffn_hidden_size=base.moe_ffn_hidden_size,
            moe_grouped_gemm=True,
            moe_router_pre_softmax=False,
            moe_router_score_function="softmax",
            moe_router_topk=base.moe_router_topk,
            moe_token_dispatcher_type="alltoall",
            num_moe_experts=base.num_experts,
            sequence_parallel=spec.tp > 1,
        )
    common = {
        "_target_": _PEFT_CLASSES[spec.kind],
        "alpha": spec.alpha,
        "dim": spec.dim,
        "dropout": 0.0,
        "dropout_position": "pre",
        "exclude_modules": [],
        "lora_A_init_method": "xavier",
        "lora_B_init_method": "zero",
        "params_to_save": params,
        "target_modules": list(spec.targets),
    }
    if spec.kind == "dora":
        peft = {**common, "canonical_mapping": {}}
    elif spec.kind == "canonical_lora":
        mapping: dict[str, set[str]] = {}
        for target in spec.targets:
            base_target, sub = CANONICAL_TARGETS[target]
            mapping.setdefault(base_target, set()).add(target if sub else base_target)
        peft = {**common, "canonical_mapping": mapping, "normalize_moe_lora": False, "share_expert_adapters": True}
    else:
        peft = {
            **common,
            "a2a_experimental": False,
            "canonical_mapping": {},
            "experts_shared_outer_loras": spec.expert_layout == "shared_outer",
            "lora_dtype": None,
            "normalize_moe_lora": spec.normalize_moe_lora,
            "share_expert_adapters": spec.expert_layout in ("shared", "legacy_2d"),
        }
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
        "model": model,
        "peft": peft,
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
    2. One spawn per adapter layout (TP, EP, expert TP; ``AdapterSpec.world_size`` ranks) saves every
       pending spec of that layout (``dist_checkpointing.save``), then rank 0 writes ``run_config.yaml``,
       ``train_state.pt`` and the tracker files.
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

    def record(s: AdapterSpec) -> dict:
        return {**dataclasses.asdict(s), "base": dataclasses.asdict(s.base), "base_root": str(base_roots[s.base])}

    with pending_builds(cache_dir, specs, ".lora-build.lock", record) as todo:
        if not todo:
            return result
        jobs = {s: {"spec": s, "base_root": str(base_roots[s.base]), "save": str(result[s])} for s in todo}
        layouts: dict[tuple[int, int, int], list[AdapterSpec]] = {}
        for s in todo:
            layouts.setdefault((s.tp, s.ep, s.etp or s.tp), []).append(s)
        for group in layouts.values():
            _spawn(group[0].world_size, "save", [jobs[s] for s in group])
        _spawn(1, "reference", [jobs[s] for s in todo])
    return result


# --------------------------------------------------------------------------- spawning


def _spawn(world: int, task: str, jobs: list[dict[str, Any]], timeout: float | None = None) -> None:
    """megatron_fixtures' spawner, running this module's workers."""
    from tools.megatron_fixtures import _spawn as spawn

    spawn(world, task, jobs, timeout, worker=_worker)


# --------------------------------------------------------------------------- inside workers


def _worker(rank: int, world: int, port: int, task: str, jobs: list[dict[str, Any]]) -> None:
    """Entry point of every spawned rank."""
    from tools.megatron_fixtures import cpu_rank

    with cpu_rank(rank, world, port):
        for job in jobs:
            (_save_job if task == "save" else _reference_job)(**job)


def _local_rows(unit: _Unit, rows, rank: int, size: int):
    """A rank's rows of a column-parallel output axis: fused fc1 holds ``[gate_r; up_r]``, others a chunk."""
    import torch

    if unit.swiglu and not unit.sub:
        gate, up = rows.chunk(2)
        return torch.cat([gate.chunk(size)[rank], up.chunk(size)[rank]])
    return rows.chunk(size)[rank]


def _sharded(key: str, local, prepend: list[tuple[int, int, int]], tp_offset, replica_id):
    """A ShardedTensor of ``local`` (2-D or 1-D) under the prepended (layer, expert) offsets; ``tp_offset``
    is (axis of the local tensor, index, count) or None (replicated)."""
    from megatron.core.dist_checkpointing import ShardedTensor

    offsets = list(prepend)
    if tp_offset is not None:
        axis, index, count = tp_offset
        offsets.append((len(prepend) + axis, index, count))
    return ShardedTensor.from_rank_offsets(
        key, local.contiguous(), *offsets, replica_id=replica_id, prepend_axis_num=len(prepend)
    )


def _adapter_state(spec: AdapterSpec, generated: dict) -> dict[str, Any]:
    """This rank's adapter ShardedTensors, as Megatron-Bridge's (Parallel)LinearAdapter shards them.

    Column-parallel and replicated bases (router, MLA down-projections): A and B split on axis 0;
    row-parallel: A on axis 1, B on axis 0 (TP, or expert TP for experts). Every B of an fc1 adapter (fused
    or canonical up / gate, shared experts too) goes through megatron-core's ``apply_swiglu_sharded_factory``,
    which stores the local rows' two halves at blocks r and TP + r of 2·TP. Experts: each local slot under
    its global expert offset; replicas across expert-DP (and, for a side shared by all experts — legacy 2-D,
    the shared side of ``shared_outer`` — across EP) are marked by ``replica_id``. DoRA magnitudes:
    TP-sharded on column-parallel bases, replicated across TP on row-parallel ones, no swiglu factory.
    """
    from megatron.core import parallel_state as ps

    base = spec.base
    units = _units(spec)
    tp_rank, dp_rank = ps.get_tensor_model_parallel_rank(), ps.get_data_parallel_rank()
    state: dict[str, Any] = {}
    for (target, layer), (a, b, *magnitude) in generated.items():
        unit = units[target]
        stacked = _stacked(base, layer)
        prepend = [(0, layer, base.num_layers)] if stacked else []
        where = None if stacked else layer
        name = f"{_prefix(base, layer)}.{unit.param_module}.adapter.{unit.sub}"
        for part, tensor in (("linear_in.weight", a), ("linear_out.weight", b)):
            key = _key(base, unit, unit.sub + part, where)
            for suffix, sharded in _shards(spec, unit, key, part, tensor, prepend):
                state[name + part + suffix] = sharded
        if magnitude:
            key_m = _key(base, unit, "weight_magnitude", where)
            if unit.row_parallel:
                m_sharded = _sharded(key_m, magnitude[0], prepend, None, (0, tp_rank, dp_rank))
            else:
                m_local = _local_rows(unit, magnitude[0], tp_rank, spec.tp)
                m_sharded = _sharded(key_m, m_local, prepend, (0, tp_rank, spec.tp), (0, 0, dp_rank))
            state[f"{_prefix(base, layer)}.{unit.param_module}.adapter.weight_magnitude"] = m_sharded
    return state


def _shards(spec: AdapterSpec, unit: _Unit, key: str, part: str, tensor, prepend: list) -> list[tuple[str, Any]]:
    """(state-dict suffix, ShardedTensor) of this rank for one global A or B of a layer."""
    from megatron.core import parallel_state as ps
    from megatron.core.transformer.mlp import apply_swiglu_sharded_factory

    if not unit.expert:
        rank, size = ps.get_tensor_model_parallel_rank(), spec.tp
        replica, pieces = (0, 0, ps.get_data_parallel_rank()), [(None, tensor)]
    else:
        rank, size = ps.get_expert_tensor_parallel_rank(), spec.etp
        ep_rank, edp_rank = ps.get_expert_model_parallel_rank(), ps.get_expert_data_parallel_rank()
        if tensor.dim() == 2:  # one tensor for all experts, the same on every EP rank; one main replica
            replica = (0, 0, ep_rank * ps.get_expert_data_parallel_world_size() + edp_rank)
            pieces = [(None, tensor)]
        else:
            local = tensor.shape[0] // spec.ep
            replica = (0, 0, edp_rank)
            pieces = [(e, tensor[e]) for e in range(ep_rank * local, (ep_rank + 1) * local)]
    result = []
    for expert, value in pieces:
        offsets = prepend if expert is None else [*prepend, (len(prepend), expert, tensor.shape[0])]
        if part == "linear_out.weight":
            sharded = _sharded(key, _local_rows(unit, value, rank, size), offsets, (0, rank, size), replica)
            if unit.swiglu:
                sharded = apply_swiglu_sharded_factory(sharded, tuple(offsets))
        else:
            axis = 1 if unit.row_parallel else 0
            sharded = _sharded(key, value.chunk(size, dim=axis)[rank], offsets, (axis, rank, size), replica)
        result.append(("" if expert is None else f"#{expert}", sharded))
    return result


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
    from megatron.core import dist_checkpointing

    from tools.megatron_fixtures import _build_chunks, _init_parallel, _load_into, _make_args, _rng_state, _sd_metadata

    base = spec.base
    _init_parallel(spec.tp, 1, 1, spec.ep, spec.etp)
    model: dict[str, Any] = {}
    common: dict[str, Any] = {"checkpoint_version": 3.0, "iteration": spec.iteration}
    if spec.combined:  # the base model re-saved at the adapter's layout, adapters beside its keys
        base_iteration = int((Path(base_root) / "latest_checkpointed_iteration.txt").read_text().strip())
        (chunk,) = _build_chunks(base, spec.tp, 1, 1, spec.ep, spec.etp, randomize=False)
        _load_into([chunk], str(Path(base_root) / f"iter_{base_iteration:07d}"), base)
        model.update(chunk.sharded_state_dict(metadata=dict(_sd_metadata(base))))
        args = _make_args(base, spec.tp, 1, 1, save, spec.ep, spec.etp)
        args.iteration = args.train_iters = spec.iteration
        common["args"] = args
    adapters = _adapter_state(spec, _generated(spec, Path(base_root)))
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


def _check_saved(spec: AdapterSpec, iter_dir: Path, base_root: Path) -> dict[tuple[str, int], tuple]:
    """Read the adapter tensors back and require them to equal :func:`global_adapters` bit for bit.

    Returns the generated values in true (model) order, for the merge.
    """
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
    generated = _generated(spec, base_root)
    units = _units(spec)
    for (target, layer), values in _stored(spec, generated).items():
        unit = units[target]
        for part, want in zip(_layer_shapes(spec, unit), values):
            if _stacked(spec.base, layer):
                got = tensors[_key(spec.base, unit, part, None)][layer]
            else:
                got = tensors[_key(spec.base, unit, part, layer)]
            if got.dtype != want.dtype or not torch.equal(got, want):
                problems.append(f"{target} layer {layer} {part}: stored values differ from the generated ones")
    if problems:
        raise RuntimeError(f"{spec.name}: saved adapter check failed: " + "; ".join(problems[:5]))
    return generated


def _delta(spec: AdapterSpec, unit: _Unit, a, b, expert: int | None):
    """``(alpha/rank)·B@A`` in fp32 for one unit (an expert's slots, or the 2-D side shared by all experts)."""
    if expert is not None:
        a, b = (t[expert] if t.dim() == 3 else t for t in (a, b))
    return spec.alpha / unit.dim * (b.float() @ a.float())


def _merged(spec: AdapterSpec, w, parts: dict[_Unit, tuple], expert: int | None):
    """One base weight merged with every unit on it, fp32 (Megatron layout, true row order)."""
    import torch

    base = spec.base
    merged = w.float()
    deltas = {unit.sub: _delta(spec, unit, a, b, expert) for unit, (a, b, *_) in parts.items()}
    if "" in deltas:
        merged = merged + deltas[""]
    elif next(iter(parts)).base == "linear_qkv":  # canonical q / k / v: interleave per query group
        groups, columns = base.num_query_groups, w.shape[1]
        q, k, v = _qkv_deltas(base, deltas, columns)
        merged = merged + torch.cat(
            [q.view(groups, -1, columns), k.view(groups, -1, columns), v.view(groups, -1, columns)], dim=1
        ).view(-1, columns)
    else:  # canonical fc1: [gate; up]
        f, columns = w.shape[0] // 2, w.shape[1]
        gate = deltas.get("adapter_gate.", torch.zeros(f, columns))
        up = deltas.get("adapter_up.", torch.zeros(f, columns))
        merged = merged + torch.cat([gate, up])
    magnitudes = [values[2] for values in parts.values() if len(values) > 2]
    if magnitudes:  # DoRA: every output row rescaled to its magnitude
        merged = magnitudes[0].float().unsqueeze(1) * merged / merged.norm(dim=1, keepdim=True)
    return merged


def _qkv_deltas(base: FixtureSpec, deltas: dict, columns: int):
    import torch

    d, groups = base.kv_channels, base.num_query_groups
    rows = {"adapter_q.": base.num_attention_heads * d, "adapter_k.": groups * d, "adapter_v.": groups * d}
    return [deltas.get(sub, torch.zeros(n, columns)) for sub, n in rows.items()]


def _reference_job(spec: AdapterSpec, base_root: str, save: str) -> None:
    """Megatron's own TP1/PP1/EP1 fp32 forward of the merged model -> ``cache_dir/<name>/reference.pt``.

    The base weights come from the base save (or, combined, from the combined save itself); every
    targeted weight becomes ``_merged(...).to(W.dtype)`` in Megatron's layout (fused QKV rows interleaved per
    group, fc1 ``[gate; up]``; experts slot by slot).
    """
    import torch

    from tools.megatron_fixtures import _build_chunks, _init_parallel, _load_into

    base = spec.base
    _init_parallel(1, 1, 1)
    iter_dir = Path(save) / f"iter_{spec.iteration:07d}"
    generated = _check_saved(spec, iter_dir, Path(base_root))
    weights_root = Path(save) if spec.combined else Path(base_root)
    weights_iteration = int((weights_root / "latest_checkpointed_iteration.txt").read_text().strip())
    (model,) = _build_chunks(base, 1, 1, 1, randomize=False)
    _load_into([model], str(weights_root / f"iter_{weights_iteration:07d}"), base)
    units = _units(spec)
    by_weight: dict[tuple[str, int], dict[_Unit, tuple]] = {}
    for (target, layer), values in generated.items():
        by_weight.setdefault((units[target].module, layer), {})[units[target]] = values
    with torch.no_grad():
        for (module_path, layer), parts in by_weight.items():
            unit = next(iter(parts))
            owner = model.get_submodule(_prefix(base, layer))
            if unit.expert:
                experts = owner.mlp.experts.local_experts
                modules = [(e, experts[e].get_submodule(unit.base)) for e in range(base.num_experts)]
            else:
                modules = [(None, owner.get_submodule(unit.param_module))]
            for expert, module in modules:
                w = module.weight
                merged = _merged(spec, w, parts, expert)
                if merged.shape != w.shape:
                    raise RuntimeError(f"{module_path} layer {layer}: base {tuple(w.shape)} vs merged {merged.shape}")
                w.copy_(merged.to(w.dtype))
    model = model.float().eval()
    gen = torch.Generator().manual_seed(base.seed)  # the base reference's input ids
    ids = torch.randint(0, base.vocab_size, (REFERENCE_BATCH, REFERENCE_SEQ), generator=gen)
    pos = torch.arange(REFERENCE_SEQ).unsqueeze(0).expand(REFERENCE_BATCH, -1)
    mask = torch.triu(torch.ones(REFERENCE_SEQ, REFERENCE_SEQ), diagonal=1).bool()[None, None]
    heads: list[torch.Tensor] = []  # with MTP layers the output layer runs once per head, the main one last
    hook = model.output_layer.register_forward_hook(lambda m, i, out: heads.append(out[0].transpose(0, 1).clone()))
    with torch.no_grad():  # GPTModel needs labels to run its MTP layers
        model(ids, position_ids=pos, attention_mask=mask, **({"labels": ids} if base.mtp_num_layers else {}))
    hook.remove()
    logits = heads[-1]
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
