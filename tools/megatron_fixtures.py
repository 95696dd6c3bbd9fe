"""Real Megatron-Core ``torch_dist`` checkpoints for tests, written on CPU.

The converter under test must never depend on megatron, but its fixtures must be
exactly what Megatron writes. So this module drives real megatron-core (CPU,
gloo, one spawned process per rank) to build tiny GPT models, save them the way
Megatron-LM's training loop does, and compute Megatron's own forward as the
reference. Megatron is imported only inside the spawned workers, so importing
this module stays cheap.

Families: dense ``llama``, ``qwen2``, ``qwen3``; mixture-of-experts ``qwen3_moe``,
``mixtral`` (softmax top-k routers) and ``deepseek_v3`` (multi-latent attention, sigmoid
router with expert bias, group-limited routing, scaling factor, shared expert, dense
first layer, one MTP layer; plain RoPE or, with ``FixtureSpec.yarn``, YaRN rotary scaling), and the GLM
MoE models on DeepSeek-V3's MoE body: ``glm4_moe`` (GLM-4.5: GQA with q/k/v biases, q/k norms, half-rotary
heads) and ``glm4_moe_lite`` (GLM-4.7-Flash: MLA).
MoE layouts add expert parallelism (``ep``, ``etp``); the world is then
``pp · lcm(tp, etp · ep)`` ranks, data parallelism filling the rest.
Experts are SequentialMLPs (local spec, allgather dispatcher); the on-disk key names are
those Transformer Engine runs write (see ``FixtureSpec.local_norm_keys``).

Layout under ``cache_dir/<spec.name>/``::

    ckpt/latest_checkpointed_iteration.txt
    ckpt/iter_0000010/...        # the torch_dist checkpoint
    reference.pt                 # {"input_ids": [b, s], "logits": [b, s, padded_vocab] fp32}
                                 # (+ "mtp_logits": [k, b, s, padded_vocab] with MTP layers)
    COMPLETE                     # written last; its presence means "done"
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import fcntl
import json
import logging
import math
import os
import shutil
import socket
import time
import zlib
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

DENSE_FAMILIES = ("llama", "qwen2", "qwen3")
MOE_FAMILIES = ("qwen3_moe", "mixtral", "deepseek_v3", "qwen3_next", "glm4_moe", "glm4_moe_lite")
# Gated DeltaNet hybrids: `qwen3_5` dense, `qwen3_next` with experts (shared expert and its gate); the same
# Megatron model converts to Qwen3-Next, Qwen3.5 or Qwen3.5-MoE, which differ only in their HF layouts.
GDN_FAMILIES = ("qwen3_5", "qwen3_next")
FAMILIES = (*DENSE_FAMILIES, "qwen3_5", *MOE_FAMILIES)
MLA_FAMILIES = ("deepseek_v3", "glm4_moe_lite")  # multi-latent attention
# DeepSeek-V3's MoE: sigmoid router with expert bias, shared expert, dense first layer, MTP (GLM-4.5: GQA attention
# with q/k/v biases, q/k norms and half-rotary heads; GLM-4.7-Flash: MLA)
SIGMOID_FAMILIES = ("deepseek_v3", "glm4_moe", "glm4_moe_lite")
QKV_BIAS_FAMILIES = ("qwen2", "glm4_moe")
GLM_ROTARY_PERCENT = 0.5  # GLM-4.5 rotates half of each head (partial_rotary_factor)
QK_NORM_FAMILIES = ("qwen3", "qwen3_moe", "glm4_moe", *GDN_FAMILIES)
MAKE_VOCAB_SIZE_DIVISIBLE_BY = 128
MARKER = "COMPLETE"
REFERENCE_FILE = "reference.pt"
LEGACY_DIR = "legacy"
DCP_DIR = "torch_dcp"
REFERENCE_BATCH, REFERENCE_SEQ = 2, 12
SEQ_LENGTH = 64
INIT_METHOD_STD = 0.08
ROUTER_STD = 0.1  # router weights: logits of order 1, so top-k picks differ between tokens
EXPERT_BIAS_STD = 0.1  # DeepSeek-V3 expert bias (a buffer; zero at init in Megatron)

# Gated DeltaNet layers (linear attention): two key heads and four value heads, so the per-key-head grouping
# of Qwen3-Next and the value-head repeat both matter; every LINEAR_ATTENTION_FREQ-th layer is full attention.
LINEAR_NUM_KEY_HEADS, LINEAR_NUM_VALUE_HEADS = 2, 4
LINEAR_KEY_HEAD_DIM, LINEAR_VALUE_HEAD_DIM = 8, 8
LINEAR_CONV_KERNEL_DIM = 4
LINEAR_ATTENTION_FREQ = 4
GDN_ROTARY_PERCENT = 0.25  # Qwen3-Next / Qwen3.5 rotate a quarter of each head (partial_rotary_factor)

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
    "first_stage_layers": "first",
    "last_stage_layers": "last",
    "pipeline_layout": "layout",
    "legacy_twin": "legacy",
    "dcp_twin": "dcp",
}
# Tags of the MoE / MLA fields: appended when the value differs from the family's default.
_MOE_NAME_TAGS = {
    "ep": "ep",
    "etp": "etp",
    "num_experts": "e",
    "moe_ffn_hidden_size": "mf",
    "moe_router_topk": "k",
    "moe_layer_freq": "freq",
    "moe_shared_expert_intermediate_size": "sh",
    "moe_router_num_groups": "ng",
    "moe_router_group_topk": "gk",
    "moe_router_topk_scaling_factor": "rsf",
    "mtp_num_layers": "mtp",
    "q_lora_rank": "ql",
    "kv_lora_rank": "kvl",
    "qk_head_dim": "qkd",
    "qk_pos_emb_head_dim": "qkr",
    "v_head_dim": "vd",
    "singleton_local_shards": "singleton",
    "local_norm_keys": "localnorm",
}


@dataclass(frozen=True)
class Yarn:
    """YaRN rotary scaling of multi-latent attention: MLATransformerConfig ``rope_type="yarn"`` and its fields.

    The defaults are a toy DeepSeek-V3: the reference sequence (``REFERENCE_SEQ``) runs past the original
    context, and both mscales differ from 1 so the cos / sin concentration and the softmax scale matter.
    """

    factor: float = 8.0  # rotary_scaling_factor; factor x original = SEQ_LENGTH, as HF configs have it
    original_max_position_embeddings: int = 8
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    mscale: float = 0.9
    mscale_all_dim: float = 0.7

    def __post_init__(self) -> None:
        if self.factor < 1 or self.original_max_position_embeddings < 1 or min(self.beta_fast, self.beta_slow) <= 0:
            raise ValueError(f"YaRN needs factor >= 1, original_max_position_embeddings >= 1, betas > 0: {self}")

    @property
    def tag(self) -> str:
        """Short, filesystem-safe and unique per setting (part of ``FixtureSpec.name``)."""
        values = (self.factor, self.original_max_position_embeddings, self.beta_fast, self.beta_slow)
        return "yarn" + "".join(
            f"{t}{v:g}" for t, v in zip(("f", "o", "bf", "bs", "m", "ma"), (*values, self.mscale, self.mscale_all_dim))
        )


@dataclass(frozen=True)
class FixtureSpec:
    """One tiny GPT checkpoint: model family, training layout and sizes.

    MoE / MLA fields left at None take the family's default (see :func:`family_defaults`)
    in ``__post_init__``, so e.g. ``FixtureSpec("qwen3_moe")`` and
    ``FixtureSpec("qwen3_moe", num_experts=4)`` are the same spec with the same name.
    Dense families keep them all None (and ``ep=1``).
    """

    family: str  # one of FAMILIES
    tp: int = 1
    pp: int = 1
    vpp: int = 1  # virtual pipeline stages per pp rank (1 = none)
    dtype: str = "fp32"  # "fp32" | "bf16": params dtype of the saved checkpoint
    tied: bool = False  # share_embeddings_and_output_weights
    vocab_size: int = 256  # the true vocab; padded as Megatron-LM does
    num_layers: int = 4
    hidden_size: int = 64
    ffn_hidden_size: int = 96  # dense MLP (MoE families: the dense layers of moe_layer_freq)
    num_attention_heads: int = 8
    num_query_groups: int = 2  # ignored by MLA (deepseek_v3)
    seed: int = 1234
    iteration: int = 10
    per_layer_keys: bool = False  # decoder.layers.<i>.<sub> keys instead of one stacked [L, ...] key
    common_in_dcp: bool = False  # core 0.19 layout: common state inside the DCP files, no common.pt
    # --- mixture of experts (MoE families only)
    ep: int = 1  # expert_model_parallel_size
    etp: int | None = None  # expert_tensor_parallel_size; None = tp
    num_experts: int | None = None  # qwen3_moe / mixtral 4, deepseek_v3 8
    moe_ffn_hidden_size: int | None = None  # 32
    moe_router_topk: int | None = None  # 2
    # int k: every k-th layer from layer 0 is MoE; tuple: 0/1 per layer (deepseek_v3: (0, 1, 1, ...))
    moe_layer_freq: int | tuple[int, ...] | None = None
    moe_shared_expert_intermediate_size: int | None = None  # deepseek_v3 32; 0 = no shared expert
    moe_router_num_groups: int | None = None  # deepseek_v3 2 (group-limited routing); 0 = off
    moe_router_group_topk: int | None = None  # deepseek_v3 1; 0 = off
    moe_router_topk_scaling_factor: float | None = None  # deepseek_v3 2.5; 0 = off (None in args)
    mtp_num_layers: int | None = None  # deepseek_v3 1; 0 = no multi-token prediction
    # --- multi-latent attention (deepseek_v3 only); q_lora_rank None = no q LoRA (linear_q_proj)
    q_lora_rank: int | None = 32
    kv_lora_rank: int | None = None  # 16
    qk_head_dim: int | None = None  # 16
    qk_pos_emb_head_dim: int | None = None  # 8
    v_head_dim: int | None = None  # 16
    yarn: Yarn | None = None  # MLA rotary scaling; None = plain RoPE (rope_type="rope")
    # --- on-disk key variants
    singleton_local_shards: bool = False  # per-expert keys experts.{e}.*, swiglu halves as <key>_w / <key>_v
    # The local spec's own norm key names instead of the Transformer-Engine ones real runs write
    # (MoE layers: pre_mlp_layernorm -> mlp.linear_fc1.layer_norm_*; MLA: q_layernorm / kv_layernorm).
    local_norm_keys: bool = False
    # Uneven pipeline: layers on the first stage (Megatron-LM --decoder-first-pipeline-num-layers).
    first_stage_layers: int | None = None
    last_stage_layers: int | None = None  # --decoder-last-pipeline-num-layers
    # --pipeline-model-parallel-layout (core 0.16's string form, e.g. "Et|tt|t|t|t|tL"); sets the VPP size
    pipeline_layout: str | None = None
    # Also save the same weights in the legacy --ckpt-format torch layout, under <fixture>/legacy.
    legacy_twin: bool = False
    # Also save the same weights as plain PyTorch DCP (torch_dcp) under <fixture>/torch_dcp (TP1 PP1 only).
    dcp_twin: bool = False

    def __post_init__(self) -> None:
        # Fail in the parent, not deep inside a spawned rank.
        if self.family not in FAMILIES:
            raise ValueError(f"family must be one of {FAMILIES}, got {self.family!r}")
        if self.dtype not in ("fp32", "bf16"):
            raise ValueError(f"dtype must be fp32 or bf16, got {self.dtype!r}")
        if isinstance(self.moe_layer_freq, list):
            object.__setattr__(self, "moe_layer_freq", tuple(self.moe_layer_freq))
        if self.yarn is not None and self.family not in MLA_FAMILIES:
            raise ValueError(f"yarn applies only to {MLA_FAMILIES}")
        defaults = family_defaults(self.family, self.num_layers)
        for field in _MOE_NAME_TAGS:
            if field in ("ep", "etp", "singleton_local_shards", "local_norm_keys"):
                continue
            value = getattr(self, field)
            if not _applies(field, self.family):
                if value != _DEFAULTS[field] and value is not None:
                    raise ValueError(
                        f"{field} applies only to {MLA_FAMILIES if field in _MLA_FIELDS else MOE_FAMILIES}"
                    )
                object.__setattr__(self, field, None)
            elif value is None and field != "q_lora_rank":
                object.__setattr__(self, field, defaults[field])
        if self.family in MOE_FAMILIES:
            if self.etp is None:
                object.__setattr__(self, "etp", self.tp)
        elif self.ep != 1 or self.etp not in (None, self.tp) or self.singleton_local_shards or self.local_norm_keys:
            raise ValueError("ep, etp, singleton_local_shards and local_norm_keys apply only to MoE families")
        else:
            object.__setattr__(self, "etp", None)
        _check_layout(self, self.tp, self.pp, self.vpp, self.ep, self.etp)

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
                parts.append(f"{tag}{value}".replace("|", "_"))
        defaults = {**family_defaults(self.family, self.num_layers), "etp": self.tp}
        for field, tag in _MOE_NAME_TAGS.items():
            value = getattr(self, field)
            if not _applies(field, self.family):
                continue
            if value != defaults.get(field, _DEFAULTS[field]):
                if isinstance(value, bool):
                    parts.append(tag)
                elif isinstance(value, tuple):
                    parts.append(tag + "".join(map(str, value)))
                else:
                    parts.append(f"{tag}{'none' if value is None else value}")
        if self.yarn is not None:
            parts.append(self.yarn.tag)
        return "-".join(parts)

    @property
    def padded_vocab_size(self) -> int:
        """Vocab as stored on disk: padded for the *training* TP, like Megatron-LM."""
        return pad_vocab_size(self.vocab_size, self.tp)

    @property
    def kv_channels(self) -> int:
        """Head dim (Megatron's default: hidden / heads; MLA uses qk_head_dim / v_head_dim)."""
        return self.hidden_size // self.num_attention_heads

    @property
    def rotary_base(self) -> int:
        """The rope theta typical of the family."""
        return {"llama": 500000, "deepseek_v3": 10000}.get(self.family, 1000000)

    @property
    def is_moe(self) -> bool:
        return self.family in MOE_FAMILIES

    @property
    def is_mla(self) -> bool:
        return self.family in MLA_FAMILIES

    @property
    def is_gdn(self) -> bool:
        """A Gated DeltaNet hybrid: zero-centred norms, gated full attention, partial rotary."""
        return self.family in GDN_FAMILIES

    @property
    def rotary_percent(self) -> float:
        return GDN_ROTARY_PERCENT if self.is_gdn else GLM_ROTARY_PERCENT if self.family == "glm4_moe" else 1.0

    @property
    def qk_layernorm(self) -> bool:
        """Megatron's qk_layernorm: Qwen3 q/k norms, or MLA's q / kv latent norms."""
        return self.family in QK_NORM_FAMILIES or self.is_mla

    @property
    def moe_layer_pattern(self) -> list[bool]:
        """Which layers are MoE (all False for dense families)."""
        freq = self.moe_layer_freq
        if not self.is_moe:
            return [False] * self.num_layers
        if isinstance(freq, tuple):
            return [bool(x) for x in freq]
        return [i % freq == 0 for i in range(self.num_layers)]

    @property
    def world_size(self) -> int:
        """Processes a save at the spec's own layout needs (see :func:`world_size`)."""
        return world_size(self.tp, self.pp, self.ep, self.etp or self.tp)


_DEFAULTS = {f.name: f.default for f in dataclasses.fields(FixtureSpec)}
_MLA_FIELDS = ("q_lora_rank", "kv_lora_rank", "qk_head_dim", "qk_pos_emb_head_dim", "v_head_dim")


def _applies(field: str, family: str) -> bool:
    """Whether a MoE / MLA field means something for the family (else it stays None)."""
    return family in (MLA_FAMILIES if field in _MLA_FIELDS else MOE_FAMILIES)


def family_defaults(family: str, num_layers: int) -> dict[str, Any]:
    """The MoE / MLA field values a family gets when a spec leaves them at None."""
    if family not in MOE_FAMILIES:
        return {}
    softmax_moe = {
        "num_experts": 4,
        "moe_ffn_hidden_size": 32,
        "moe_router_topk": 2,
        "moe_layer_freq": 1,
        "moe_shared_expert_intermediate_size": 0,
        "moe_router_num_groups": 0,
        "moe_router_group_topk": 0,
        "moe_router_topk_scaling_factor": 0,
        "mtp_num_layers": 0,
    }
    if family == "qwen3_next":
        return {**softmax_moe, "moe_shared_expert_intermediate_size": 32}
    if family not in SIGMOID_FAMILIES:
        return softmax_moe
    groups = family == "deepseek_v3"  # GLM routes without groups (n_group 1)
    return {
        **softmax_moe,
        "num_experts": 8,  # 2 groups of 4: group choice and top-2 within the group both matter
        "moe_layer_freq": (0,) + (1,) * (num_layers - 1),  # first_k_dense_replace = 1
        "moe_shared_expert_intermediate_size": 32,
        "moe_router_num_groups": 2 if groups else 0,
        "moe_router_group_topk": 1 if groups else 0,
        "moe_router_topk_scaling_factor": 2.5,
        "mtp_num_layers": 1,
        "q_lora_rank": 32,
        "kv_lora_rank": 16,
        "qk_head_dim": 16,
        "qk_pos_emb_head_dim": 8,
        "v_head_dim": 16,
    }


def pad_vocab_size(vocab_size: int, tp: int, divisible_by: int = MAKE_VOCAB_SIZE_DIVISIBLE_BY) -> int:
    """Megatron-LM's ``_vocab_size_with_padding``: round up to a multiple of divisible_by * tp."""
    multiple = divisible_by * tp
    return -(-vocab_size // multiple) * multiple


def world_size(tp: int, pp: int, ep: int = 1, etp: int | None = None) -> int:
    """Smallest world megatron's parallel_state accepts: a multiple of tp·pp and of etp·ep·pp.

    Data parallelism fills the rest (DP = world / (tp·pp)); expert groups are carved from TP×DP.
    """
    etp = tp if etp is None else etp
    return pp * math.lcm(tp, etp * ep)


def _check_layout(spec: FixtureSpec, tp: int, pp: int, vpp: int, ep: int = 1, etp: int | None = None) -> None:
    etp = tp if etp is None else etp
    if min(tp, pp, vpp, ep, etp) < 1:
        raise ValueError("tp, pp, vpp, ep and etp must be >= 1")
    if vpp > 1 and pp == 1:
        raise ValueError("virtual pipeline stages need pp > 1")
    if spec.dcp_twin and (tp, pp, vpp, ep) != (1, 1, 1, 1):
        raise ValueError("dcp_twin needs TP1 PP1 EP1: plain DCP has no tensor-parallel sharding information")
    first, last = (spec.first_stage_layers, spec.last_stage_layers) if pp > 1 else (None, None)
    if first is not None or last is not None:
        middle, stages = spec.num_layers - (first or 0) - (last or 0), pp - (first is not None) - (last is not None)
        if vpp > 1 or min(first or 1, last or 1, middle + 1) < 1 or (middle % stages if stages else middle):
            raise ValueError(
                f"first/last stage layers {first}/{last} cannot split {spec.num_layers} layers over pp={pp}"
            )
    elif spec.pipeline_layout is None and spec.num_layers % (pp * vpp):
        raise ValueError(f"num_layers={spec.num_layers} not divisible by pp*vpp={pp * vpp}")
    if spec.num_attention_heads % tp or (not spec.is_mla and spec.num_query_groups % tp):
        raise ValueError("attention heads and query groups must be divisible by tp")
    if spec.ffn_hidden_size % tp:
        raise ValueError("ffn_hidden_size must be divisible by tp")
    if spec.hidden_size % spec.num_attention_heads:
        raise ValueError("hidden_size must be divisible by num_attention_heads")
    if pad_vocab_size(spec.vocab_size, spec.tp) % tp:
        raise ValueError("padded vocab must be divisible by tp")
    if spec.is_gdn and (LINEAR_NUM_KEY_HEADS % tp or spec.kv_channels * GDN_ROTARY_PERCENT % 2):
        raise ValueError(f"Gated DeltaNet needs tp dividing {LINEAR_NUM_KEY_HEADS} key heads and an even rotary dim")
    if not spec.is_moe:
        if ep != 1 or etp != tp:
            raise ValueError(f"{spec.family} has no experts: ep must be 1 and etp unset")
        return
    _check_moe(spec, tp, pp, ep, etp)


def _check_moe(spec: FixtureSpec, tp: int, pp: int, ep: int, etp: int) -> None:
    e, k = spec.num_experts, spec.moe_router_topk
    if e % ep:
        raise ValueError(f"num_experts={e} not divisible by ep={ep}")
    if spec.moe_ffn_hidden_size % etp or spec.moe_shared_expert_intermediate_size % tp:
        raise ValueError("moe_ffn_hidden_size must be divisible by etp, the shared expert size by tp")
    if not 1 <= k <= e:
        raise ValueError(f"moe_router_topk={k} must be in 1..num_experts={e}")
    freq = spec.moe_layer_freq
    if isinstance(freq, tuple):
        if len(freq) != spec.num_layers or set(freq) - {0, 1}:
            raise ValueError(f"moe_layer_freq {freq} must hold num_layers={spec.num_layers} zeros and ones")
    elif freq < 1:
        raise ValueError("moe_layer_freq must be >= 1")
    if spec.family == "mixtral" and any(not m for m in spec.moe_layer_pattern):
        raise ValueError("Mixtral has no dense layers: keep moe_layer_freq=1")
    if spec.family not in SIGMOID_FAMILIES:
        return
    groups, group_topk = spec.moe_router_num_groups, spec.moe_router_group_topk
    if bool(groups) != bool(group_topk):
        raise ValueError("set both moe_router_num_groups and moe_router_group_topk, or neither")
    if groups and (e % groups or group_topk > groups or k > group_topk * (e // groups)):
        raise ValueError(f"group routing needs num_experts % groups == 0 and topk <= group_topk * {e}/groups")
    for field in _MLA_FIELDS:
        value = getattr(spec, field)
        if value is not None and value < 1:
            raise ValueError(f"{field} must be >= 1")
    if not spec.is_mla:
        return
    if spec.q_lora_rank is not None and spec.q_lora_rank % tp:
        raise ValueError("q_lora_rank must be divisible by tp (column-parallel down projection)")
    if (spec.kv_lora_rank + spec.qk_pos_emb_head_dim) % tp:
        raise ValueError("kv_lora_rank + qk_pos_emb_head_dim must be divisible by tp")


# --------------------------------------------------------------------------- public API


@contextlib.contextmanager
def pending_builds(
    cache_dir: Path, specs: Iterable[Any], lock: str, record: Callable[[Any], dict] = dataclasses.asdict
) -> Iterator[list[Any]]:
    """The cache's build protocol, shared by every fixture builder: hold the file lock ``cache_dir/lock``
    (concurrent callers, e.g. pytest-xdist workers, wait), yield the specs whose directory lacks its marker,
    each emptied, and once the block succeeds write each one's marker (``record(spec)`` as JSON) last."""
    with open(cache_dir / lock, "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        todo = [s for s in specs if not (cache_dir / s.name / MARKER).exists()]
        for spec in todo:
            shutil.rmtree(cache_dir / spec.name, ignore_errors=True)
            (cache_dir / spec.name).mkdir(parents=True)
        yield todo
        for spec in todo:
            (cache_dir / spec.name / MARKER).write_text(json.dumps(record(spec)) + "\n")


def build_fixtures(specs: Iterable[FixtureSpec], cache_dir: Path) -> dict[FixtureSpec, Path]:
    """Write every spec's checkpoint and reference logits under ``cache_dir/<spec.name>/``.

    Returns each spec's save root (``cache_dir/<name>/ckpt``). Specs whose directory is
    complete (marker file written last) are skipped; incomplete ones are rebuilt. One
    spawn per (tp, pp, vpp, ep, etp) layout writes all its specs, then a single 1-process spawn
    computes Megatron's reference logits for all of them (process start-up dominates).
    MoE layouts (ep > 1) run on :func:`world_size` ranks (data parallelism fills the rest).
    """
    cache_dir = Path(cache_dir).resolve()
    cache_dir.mkdir(parents=True, exist_ok=True)
    specs = list(dict.fromkeys(specs))
    result = {s: cache_dir / s.name / "ckpt" for s in specs}
    with pending_builds(cache_dir, specs, ".build.lock") as todo:
        if not todo:
            return result
        layouts: dict[tuple[int, int, int, int, int | None], list[FixtureSpec]] = {}
        for s in todo:
            layouts.setdefault((s.tp, s.pp, s.vpp, s.ep, s.etp), []).append(s)
        for (tp, pp, vpp, ep, etp), group in layouts.items():
            jobs = [_job(s, None, result[s], tp, pp, vpp, ep, etp) for s in group]
            _spawn(world_size(tp, pp, ep, etp), "save", jobs)
        _spawn(1, "reference", [{"spec": s, "root": str(result[s])} for s in todo])
        for s in todo:
            if s.common_in_dcp:
                _drop_common_pt(result[s] / f"iter_{s.iteration:07d}")
    return result


def write_checkpoint(spec: FixtureSpec, root: Path) -> Path:
    """Save one spec's checkpoint at ``root`` (save-root layout), without reference logits.

    For checked-in examples; tests should use :func:`build_fixtures` (cached). Returns root.
    """
    root = Path(root).resolve()
    root.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(root / f"iter_{spec.iteration:07d}", ignore_errors=True)
    job = _job(spec, None, root, spec.tp, spec.pp, spec.vpp, spec.ep, spec.etp)
    _spawn(spec.world_size, "save", [job])
    return root


def _job(spec: FixtureSpec, load: Path | None, save: Path, tp: int, pp: int, vpp: int, ep: int, etp: int | None):
    return {
        "spec": spec,
        "load": None if load is None else str(load),
        "save": str(save),
        "tp": tp,
        "pp": pp,
        "vpp": vpp,
        "ep": ep,
        "etp": tp if etp is None else etp,
    }


def _drop_common_pt(iter_dir: Path) -> None:
    """Finish the core-0.19 layout once the reference pass (megatron 0.16 needs common.pt) is done."""
    (iter_dir / "common.pt").unlink()
    (iter_dir / "metadata.json").write_text(json.dumps({"sharded_backend": "torch_dist", "sharded_backend_version": 1}))


def reshard(
    src_root: Path,
    spec: FixtureSpec,
    dst_root: Path,
    *,
    tp: int,
    pp: int,
    vpp: int = 1,
    ep: int = 1,
    etp: int | None = None,
) -> Path:
    """Re-save ``src_root`` (a save root written for ``spec``) at layout tp/pp/vpp/ep/etp.

    Megatron's own ``dist_checkpointing.load`` does the resharding, so two saves of the
    same weights at different layouts can be compared. The padded vocab is kept (it was
    fixed by the training TP); the saved args get the new parallel sizes. ``etp`` None means
    ``tp``; MoE layouts run on :func:`world_size` ranks. Returns dst_root.
    """
    _check_layout(spec, tp, pp, vpp, ep, etp)
    src_root, dst_root = Path(src_root).resolve(), Path(dst_root).resolve()
    iteration = int((src_root / "latest_checkpointed_iteration.txt").read_text().strip())
    dst_root.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(dst_root / f"iter_{iteration:07d}", ignore_errors=True)
    _spawn(world_size(tp, pp, ep, etp), "save", [_job(spec, src_root, dst_root, tp, pp, vpp, ep, etp)])
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


def _spawn(world: int, task: str, jobs: list[dict[str, Any]], timeout: float | None = None, worker: Any = None) -> None:
    """Run ``worker`` (default: this module's ``_worker``) on ``world`` ranks; re-raise worker errors, kill on
    timeout. Other fixture modules pass their own module-level worker."""
    import torch.multiprocessing as mp

    timeout = timeout if timeout is not None else 180 + 60 * len(jobs)
    ctx = mp.spawn(worker or _worker, args=(world, _free_port(), task, jobs), nprocs=world, join=False)
    start = time.monotonic()
    while not ctx.join(timeout=1.0):  # join raises ProcessRaisedException on worker errors
        if time.monotonic() - start > timeout:
            for p in ctx.processes:
                if p.is_alive():
                    p.kill()
            raise TimeoutError(f"megatron {task} workers (world={world}) exceeded {timeout:.0f}s")
    _log.info("megatron %s: world=%d, %d job(s), %.1fs", task, world, len(jobs), time.monotonic() - start)


# --------------------------------------------------------------------------- inside workers


@contextlib.contextmanager
def cpu_rank(rank: int, world: int, port: int, patch: Callable[[], None] | None = None) -> Iterator[None]:
    """One spawned rank's life: a gloo process group, megatron-core patched for CPU torch (``patch``, default
    `_patch_megatron_for_cpu`), then torn down. Every fixture writer's worker (here, lora_fixtures,
    quant_fixtures, gdn_lora_fixtures, bridge_cpu) runs inside it."""
    import warnings
    from datetime import timedelta

    warnings.filterwarnings("ignore")  # megatron/apex/TE fallbacks and DCP deprecations: noise here
    import torch

    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(seconds=300))
    try:
        (patch or _patch_megatron_for_cpu)()
        yield
    finally:
        from megatron.core import parallel_state

        parallel_state.destroy_model_parallel()
        torch.distributed.destroy_process_group()


def _worker(rank: int, world: int, port: int, task: str, jobs: list[dict[str, Any]]) -> None:
    """Entry point of every spawned rank."""
    with cpu_rank(rank, world, port):
        for job in jobs:
            {"save": _save_job, "reference": _reference_job}[task](**job)


def _patch_megatron_for_cpu() -> None:
    """megatron-core assumes CUDA in a few harmless places; neutralise them on CPU torch."""
    import torch
    from megatron.core.tensor_parallel import random as mrandom
    from megatron.core.transformer import multi_latent_attention
    from megatron.core.transformer.moe import moe_utils

    torch.cuda.synchronize = lambda *a, **k: None  # async filesystem writer
    torch.cuda.current_device = lambda: "cpu"  # save finalizer allocates a flag tensor there
    # Tied embeddings with PP > 1: LanguageModule moves the shared weight to .cuda() before
    # the first/last-stage all-reduce.
    torch.Tensor.cuda = lambda self, *a, **k: self

    @contextlib.contextmanager
    def _fork(self, name: str = "model-parallel-rng"):  # no CUDA RNG states on CPU
        yield

    mrandom.CudaRNGStatesTracker.fork = _fork
    # The router's gating GEMM checks this name; it is only meaningful with Transformer Engine.
    moe_utils.te_general_gemm = None
    # The TE extension shim imports without TE (leaving TELinear None); MLA then takes TE paths.
    multi_latent_attention.HAVE_TE = False
    _patch_gated_delta_net()


def _patch_gated_delta_net() -> None:
    """GatedDeltaNet refuses to build without flash-linear-attention, though with
    ``deterministic_mode`` it runs torch's delta rule and a plain conv1d; only fla's ``l2norm`` is
    called otherwise (its math below). Its gated norm is ``torch.compile``d: run it eagerly."""
    import torch
    from megatron.core.ssm import gated_delta_net

    def l2norm(x: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt((x * x).sum(dim=-1, keepdim=True) + 1e-6)

    gated_delta_net.HAVE_FLA = True
    gated_delta_net.l2norm = l2norm
    norm = gated_delta_net.GatedDeltaNet._apply_gated_norm
    gated_delta_net.GatedDeltaNet._apply_gated_norm = getattr(norm, "_torchdynamo_orig_callable", norm)


def _init_parallel(tp: int, pp: int, vpp: int, ep: int = 1, etp: int | None = None) -> None:
    from megatron.core import parallel_state

    etp = tp if etp is None else etp
    if parallel_state.model_parallel_is_initialized():
        if (
            parallel_state.get_tensor_model_parallel_world_size() == tp
            and parallel_state.get_pipeline_model_parallel_world_size() == pp
            and (parallel_state.get_virtual_pipeline_model_parallel_world_size() or 1) == vpp
            and parallel_state.get_expert_model_parallel_world_size() == ep
            and parallel_state.get_expert_tensor_parallel_world_size() == etp
        ):
            return
        parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=pp,
        virtual_pipeline_model_parallel_size=vpp if vpp > 1 else None,
        expert_model_parallel_size=ep,
        expert_tensor_parallel_size=etp,
    )


def _crc_seed(*parts: object) -> int:
    return zlib.crc32("|".join(map(str, parts)).encode())


def _torch_dtype(name: str) -> torch.dtype:
    import torch

    return {"fp32": torch.float32, "bf16": torch.bfloat16}[name]


def _or_none(value: Any) -> Any:
    """The spec's 0 = "off" as Megatron's None."""
    return value or None


def cpu_config() -> dict[str, Any]:
    """The TransformerConfig fields every fixture model shares: no dropout, fixed init, fp32, CPU
    initialization and every CUDA fusion off."""
    import torch

    return {
        "hidden_dropout": 0.0,
        "attention_dropout": 0.0,
        "init_method_std": INIT_METHOD_STD,
        "use_cpu_initialization": True,
        "params_dtype": torch.float32,
        "pipeline_dtype": torch.float32,
        "bias_activation_fusion": False,
        "bias_dropout_fusion": False,
        "masked_softmax_fusion": False,
        "apply_rope_fusion": False,
        "gradient_accumulation_fusion": False,
        "persist_layer_norm": False,
    }


def _transformer_config(spec: FixtureSpec, tp: int, pp: int, vpp: int, ep: int, etp: int):
    """The TransformerConfig Megatron-LM would derive from the spec's arguments (CPU-friendly)."""
    import torch.nn.functional as F
    from megatron.core.transformer import MLATransformerConfig, TransformerConfig

    common = dict(
        num_layers=spec.num_layers,
        hidden_size=spec.hidden_size,
        ffn_hidden_size=spec.ffn_hidden_size,
        num_attention_heads=spec.num_attention_heads,
        num_query_groups=spec.num_query_groups,
        kv_channels=spec.kv_channels,
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=pp,
        virtual_pipeline_model_parallel_size=vpp if vpp > 1 else None,
        num_layers_in_first_pipeline_stage=spec.first_stage_layers if pp > 1 else None,
        num_layers_in_last_pipeline_stage=spec.last_stage_layers if pp > 1 else None,
        pipeline_model_parallel_layout=spec.pipeline_layout if pp > 1 else None,
        normalization="RMSNorm",
        layernorm_epsilon=1e-6,
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        add_qkv_bias=spec.family in QKV_BIAS_FAMILIES,
        qk_layernorm=spec.qk_layernorm,
        **cpu_config(),
    )
    if spec.is_gdn:
        common.update(_gdn_config(spec))
    if not spec.is_moe:
        return TransformerConfig(**common)
    deepseek = spec.family in SIGMOID_FAMILIES
    moe = dict(
        expert_model_parallel_size=ep,
        expert_tensor_parallel_size=etp,
        num_moe_experts=spec.num_experts,
        moe_ffn_hidden_size=spec.moe_ffn_hidden_size,
        moe_router_topk=spec.moe_router_topk,
        moe_layer_freq=list(spec.moe_layer_freq) if isinstance(spec.moe_layer_freq, tuple) else spec.moe_layer_freq,
        moe_shared_expert_intermediate_size=_or_none(spec.moe_shared_expert_intermediate_size),
        moe_router_load_balancing_type="seq_aux_loss" if deepseek else "aux_loss",
        moe_aux_loss_coeff=0.0,
        moe_router_score_function="sigmoid" if deepseek else "softmax",
        moe_router_enable_expert_bias=deepseek,
        moe_router_pre_softmax=False,
        moe_router_num_groups=_or_none(spec.moe_router_num_groups),
        moe_router_group_topk=_or_none(spec.moe_router_group_topk),
        moe_router_topk_scaling_factor=_or_none(spec.moe_router_topk_scaling_factor),
        moe_router_dtype="fp32" if deepseek else None,
        moe_token_dispatcher_type="allgather",  # alltoall creates CUDA streams
        moe_grouped_gemm=False,  # SequentialMLP (local spec)
        mtp_num_layers=_or_none(spec.mtp_num_layers),
        # Megatron-LM trains TP x EP with sequence parallelism, but the torch norms of the local
        # spec refuse it; it does not change a single weight, so args say True and config False.
        sequence_parallel=False,
    )
    if not spec.is_mla:
        return TransformerConfig(**common, **moe)
    return MLATransformerConfig(
        **common,
        **moe,
        multi_latent_attention=True,
        q_lora_rank=spec.q_lora_rank,
        kv_lora_rank=spec.kv_lora_rank,
        qk_head_dim=spec.qk_head_dim,
        qk_pos_emb_head_dim=spec.qk_pos_emb_head_dim,
        v_head_dim=spec.v_head_dim,
        rotary_base=spec.rotary_base,  # MLA reads the base from the config, not from GPTModel
        **_mla_rope(spec),
    )


def _gdn_config(spec: FixtureSpec) -> dict[str, Any]:
    """Qwen3-Next / Qwen3.5 settings by their TransformerConfig names (Megatron-LM's args use the same ones,
    except `apply_layernorm_1p` for the zero-centred norms)."""
    return {
        "experimental_attention_variant": "gated_delta_net",
        "linear_attention_freq": LINEAR_ATTENTION_FREQ,
        "linear_conv_kernel_dim": LINEAR_CONV_KERNEL_DIM,
        "linear_key_head_dim": LINEAR_KEY_HEAD_DIM,
        "linear_value_head_dim": LINEAR_VALUE_HEAD_DIM,
        "linear_num_key_heads": LINEAR_NUM_KEY_HEADS,
        "linear_num_value_heads": LINEAR_NUM_VALUE_HEADS,
        "attention_output_gate": True,
        "layernorm_zero_centered_gamma": True,
        "deterministic_mode": True,  # torch's chunked delta rule and conv1d (no fla / causal-conv1d kernels)
        **({"moe_shared_expert_gate": True} if spec.is_moe else {}),
    }


def _zero_centred_rms_norm() -> type:
    """RMSNorm with a zero-centred gamma, ``x / rms(x) · (1 + w)`` in fp32 as Transformer Engine computes it;
    torch's norms behind the local spec refuse ``layernorm_zero_centered_gamma``."""
    import torch

    class ZeroCentredRMSNorm(torch.nn.Module):
        def __init__(self, config, hidden_size: int, eps: float = 1e-6, **kwargs):
            super().__init__()
            self.eps = eps
            self.weight = torch.nn.Parameter(torch.zeros(hidden_size))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + self.eps)
            return (y * (1 + self.weight.float())).type_as(x)

    return ZeroCentredRMSNorm


def _gdn_block_spec(spec: FixtureSpec, config, vp_stage: int | None, pp_rank: int):
    """This stage's layers of a Gated DeltaNet hybrid, built by hand (Megatron's own hybrid block spec needs
    Transformer Engine): GatedDeltaNet or gated full attention per ``linear_attention_freq``, dense or MoE
    MLP per ``moe_layer_freq``, zero-centred norms everywhere, norm keys named as TE-fused runs write them."""
    from megatron.core.models.gpt.experimental_attention_variant_module_specs import (
        get_linear_attention_pattern,
        get_moe_layer_pattern,
    )
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.ssm.gated_delta_net import GatedDeltaNet, GatedDeltaNetSubmodules
    from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
    from megatron.core.transformer.spec_utils import ModuleSpec
    from megatron.core.transformer.transformer_block import TransformerBlockSubmodules, get_num_layers_to_build
    from megatron.core.transformer.transformer_layer import get_transformer_layer_offset

    norm = _zero_centred_rms_norm()
    local_spec = get_gpt_layer_local_spec(qk_layernorm=True, normalization="RMSNorm")
    local = local_spec.submodules
    attention = local.self_attention
    attention = dataclasses.replace(
        attention, submodules=dataclasses.replace(attention.submodules, q_layernorm=norm, k_layernorm=norm)
    )
    gdn = ModuleSpec(
        module=GatedDeltaNet,
        submodules=GatedDeltaNetSubmodules(in_proj=ColumnParallelLinear, out_norm=norm, out_proj=RowParallelLinear),
    )
    moe_mlp = None
    if spec.is_moe:
        moe_mlp = get_gpt_layer_local_spec(num_experts=spec.num_experts, normalization="RMSNorm").submodules.mlp
    moe_pattern = get_moe_layer_pattern(config) if spec.is_moe else [0] * spec.num_layers
    layers = []
    for linear, moe in zip(get_linear_attention_pattern(config), moe_pattern):
        fused = "self_attention.in_proj." if linear else "self_attention.linear_qkv."
        keys = {"input_layernorm.": fused + "layer_norm_"}
        if not moe:
            keys["pre_mlp_layernorm."] = "mlp.linear_fc1.layer_norm_"
        sub = dataclasses.replace(
            local,
            input_layernorm=norm,
            self_attention=gdn if linear else attention,
            pre_mlp_layernorm=norm,
            mlp=moe_mlp if moe else local.mlp,
            sharded_state_dict_keys_map=keys,
        )
        layers.append(dataclasses.replace(local_spec, submodules=sub))
    offset = get_transformer_layer_offset(config, vp_stage=vp_stage, pp_rank=pp_rank)
    count = get_num_layers_to_build(config, vp_stage=vp_stage, pp_rank=pp_rank)
    return TransformerBlockSubmodules(layer_specs=layers[offset : offset + count], layer_norm=norm)


def _mla_rope(spec: FixtureSpec) -> dict[str, Any]:
    """MLA's rotary settings, by their MLATransformerConfig names (Megatron-LM's args use the same ones)."""
    yarn = spec.yarn
    if yarn is None:  # MLATransformerConfig defaults to YaRN
        return {"rope_type": "rope", "rotary_scaling_factor": 1.0, "mscale": 1.0, "mscale_all_dim": 0.0}
    return {
        "rope_type": "yarn",
        "rotary_scaling_factor": yarn.factor,
        "original_max_position_embeddings": yarn.original_max_position_embeddings,
        "beta_fast": yarn.beta_fast,
        "beta_slow": yarn.beta_slow,
        "mscale": yarn.mscale,
        "mscale_all_dim": yarn.mscale_all_dim,
    }


def _sdpa_core_attention() -> type:
    """A weight-free core attention for MLA: the local DotProductAttention rejects MLA's
    distinct q/k and v head dims. ``softmax(q kᵀ · softmax_scale) v`` with Megatron's mask."""
    import torch
    import torch.nn.functional as F

    class SdpaCoreAttention(torch.nn.Module):
        def __init__(self, config, layer_number, attn_mask_type, attention_type, softmax_scale=None, **kwargs):
            super().__init__()
            self.config = config
            self.softmax_scale = softmax_scale
            self.current_max_attn_logits = None

        def forward(self, query, key, value, attention_mask, attn_mask_type=None, packed_seq_params=None, **kw):
            # [s, b, n, d] -> [b, n, s, d]; Megatron's mask is True where attention is *not* allowed.
            q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))
            mask = None if attention_mask is None else ~attention_mask.to(torch.bool)
            out = F.scaled_dot_product_attention(
                q, k, v, attn_mask=mask, is_causal=mask is None, scale=self.softmax_scale
            )
            return out.permute(2, 0, 1, 3).reshape(query.shape[0], query.shape[1], -1)

    return SdpaCoreAttention


def _moe_layer_spec(layer_spec, spec: FixtureSpec):
    """Adapt a local-spec layer to what real (Transformer Engine) runs put on disk.

    The local spec renames ``pre_mlp_layernorm`` to the fused ``mlp.linear_fc1.layer_norm_``
    even on MoE layers; TE keeps MoE layers' ``pre_mlp_layernorm`` and fuses MLA's q / kv latent
    norms into ``linear_q_up_proj`` / ``linear_kv_up_proj``. MLA also gets a core attention that
    accepts its head dims.
    """
    from megatron.core.transformer.moe.moe_layer import MoELayer

    sub = layer_spec.submodules
    is_moe = sub.mlp.module is MoELayer
    keys = dict(sub.sharded_state_dict_keys_map or {})
    attention = sub.self_attention
    if spec.is_mla:
        attention = dataclasses.replace(
            attention, submodules=dataclasses.replace(attention.submodules, core_attention=_sdpa_core_attention())
        )
        if not spec.local_norm_keys:
            keys = {
                "self_attention.q_layernorm.": "self_attention.linear_q_up_proj.layer_norm_",
                "self_attention.kv_layernorm.": "self_attention.linear_kv_up_proj.layer_norm_",
            }
            if not is_moe:
                keys["pre_mlp_layernorm."] = "mlp.linear_fc1.layer_norm_"
    elif is_moe and not spec.local_norm_keys:
        keys.pop("pre_mlp_layernorm.", None)
    sub = dataclasses.replace(sub, self_attention=attention, sharded_state_dict_keys_map=keys)
    return dataclasses.replace(layer_spec, submodules=sub)


def _layer_specs(spec: FixtureSpec, config, vp_stage: int | None, pp_rank: int):
    """(decoder layer spec or block spec, MTP block spec or None) for this stage."""
    from megatron.core.models.gpt.gpt_layer_specs import (
        get_gpt_decoder_block_spec,
        get_gpt_layer_local_spec,
        get_gpt_mtp_block_spec,
    )

    if spec.is_gdn:
        block = _gdn_block_spec(spec, config, vp_stage, pp_rank)
        if not spec.mtp_num_layers:
            return block, None
        # The MTP layer's transformer layer is the block's last (full attention); its norms zero-centred too.
        mtp = get_gpt_mtp_block_spec(config, block, use_transformer_engine=False, vp_stage=vp_stage, pp_rank=pp_rank)
        if mtp is not None:
            norm = _zero_centred_rms_norm()
            mtp.layer_specs = [
                dataclasses.replace(
                    s, submodules=dataclasses.replace(s.submodules, enorm=norm, hnorm=norm, layer_norm=norm)
                )
                for s in mtp.layer_specs
            ]
        return block, mtp
    if not spec.is_moe:
        return get_gpt_layer_local_spec(qk_layernorm=spec.qk_layernorm, normalization="RMSNorm"), None
    block = get_gpt_decoder_block_spec(
        config, use_transformer_engine=False, normalization="RMSNorm", vp_stage=vp_stage, pp_rank=pp_rank
    )
    block.layer_specs = [_moe_layer_spec(s, spec) for s in block.layer_specs]
    mtp = None
    if spec.mtp_num_layers:
        # The MTP layer's transformer layer is the last decoder layer spec (adapted above).
        mtp = get_gpt_mtp_block_spec(config, block, use_transformer_engine=False, vp_stage=vp_stage, pp_rank=pp_rank)
    return block, mtp


def _build_chunks(
    spec: FixtureSpec, tp: int, pp: int, vpp: int, ep: int = 1, etp: int | None = None, *, randomize: bool
) -> list:
    """Build this rank's GPTModel chunk(s) at the given layout, in the checkpoint's dtype.

    Built in fp32 and cast afterwards, as Megatron-LM's Float16Module does (norms end up
    in the params dtype too; the router keeps its expert bias in fp32). With ``randomize``,
    norm weights become 1 + 0.3·randn and biases 0.2·randn so a wrong mapping cannot hide
    behind ones and zeros; MoE routers, expert biases and every expert get fresh values too.
    """
    import torch
    from megatron.core import parallel_state
    from megatron.core.models.gpt import GPTModel

    etp = tp if etp is None else etp
    config = _transformer_config(spec, tp, pp, vpp, ep, etp)
    pp_rank = parallel_state.get_pipeline_model_parallel_rank()
    tp_rank = parallel_state.get_tensor_model_parallel_rank()
    chunks = []
    for vp in range(vpp):
        vp_stage = vp if vpp > 1 else None
        layer_spec, mtp_spec = _layer_specs(spec, config, vp_stage, pp_rank)
        # Different stages/chunks must not share random values (a wrong layer offset would
        # then go unnoticed); TP ranks share the seed so the CPU master-weight init splits
        # one consistent full matrix.
        torch.manual_seed(_crc_seed(spec.seed, spec.family, "init", pp_rank, vp))
        extra = {"mtp_block_spec": mtp_spec} if mtp_spec is not None else {}
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
            rotary_percent=spec.rotary_percent,
            vp_stage=vp_stage,
            **extra,
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
                if spec.is_moe:
                    _randomize_moe(model, spec, pp_rank, vp)
                if spec.is_gdn:
                    _randomize_gdn(model, spec, pp_rank, vp, tp_rank)
        model = model.to(_torch_dtype(spec.dtype))
        if randomize and spec.is_moe:
            _randomize_expert_bias(model, spec, pp_rank, vp)
        chunks.append(model)
    return chunks


def _randomize_moe(model, spec: FixtureSpec, pp_rank: int, vp: int) -> None:
    """Fresh router weights and expert weights, distinct per global expert.

    Every rank builds its local experts from the same RNG stream, so without this EP ranks
    would hold identical experts. Seeds: global expert index and expert-TP rank (each rank
    draws its own shard); expert-DP replicas draw the same values.
    """
    import torch
    from megatron.core import parallel_state
    from megatron.core.transformer.moe.experts import SequentialMLP
    from megatron.core.transformer.moe.router import TopKRouter

    ep_rank = parallel_state.get_expert_model_parallel_rank()
    etp_rank = parallel_state.get_expert_tensor_parallel_rank()
    for name, module in model.named_modules():
        if isinstance(module, SequentialMLP):
            for j, expert in enumerate(module.local_experts):
                global_expert = ep_rank * module.num_local_experts + j
                for pname, p in expert.named_parameters():
                    gen = torch.Generator().manual_seed(
                        _crc_seed(spec.seed, spec.family, name, global_expert, pname, pp_rank, vp, etp_rank)
                    )
                    p.copy_(INIT_METHOD_STD * torch.randn(p.shape, generator=gen, dtype=torch.float32))
        elif isinstance(module, TopKRouter):
            gen = torch.Generator().manual_seed(_crc_seed(spec.seed, spec.family, name, "router", pp_rank, vp))
            module.weight.copy_(ROUTER_STD * torch.randn(module.weight.shape, generator=gen, dtype=torch.float32))


def _randomize_gdn(model, spec: FixtureSpec, pp_rank: int, vp: int, tp_rank: int) -> None:
    """Per-TP-rank values for GatedDeltaNet's TP-sharded conv1d, A_log and dt_bias: Megatron initialises
    them from the shared seed, so TP ranks would hold equal halves and hide a misplaced shard."""
    import torch
    from megatron.core.ssm.gated_delta_net import GatedDeltaNet

    for name, module in model.named_modules():
        if not isinstance(module, GatedDeltaNet):
            continue
        for pname, p in (("conv1d", module.conv1d.weight), ("A_log", module.A_log), ("dt_bias", module.dt_bias)):
            gen = torch.Generator().manual_seed(_crc_seed(spec.seed, spec.family, name, pname, pp_rank, vp, tp_rank))
            p.copy_((0.3 if pname == "conv1d" else 0.5) * torch.randn(p.shape, generator=gen, dtype=torch.float32))


def _randomize_expert_bias(model, spec: FixtureSpec, pp_rank: int, vp: int) -> None:
    """Non-zero expert bias (a buffer, fp32 like Megatron keeps it after the bf16 cast)."""
    import torch
    from megatron.core.transformer.moe.router import TopKRouter

    for name, module in model.named_modules():
        if isinstance(module, TopKRouter) and module.expert_bias is not None:
            gen = torch.Generator().manual_seed(_crc_seed(spec.seed, spec.family, name, "expert_bias", pp_rank, vp))
            module.expert_bias = EXPERT_BIAS_STD * torch.randn(
                module.expert_bias.shape, generator=gen, dtype=torch.float32
            )


def _make_args(
    spec: FixtureSpec, tp: int, pp: int, vpp: int, save: str, ep: int = 1, etp: int | None = None
) -> argparse.Namespace:
    """Build the Megatron-LM ``args`` a converter reads; deliberately no field naming the family."""
    params_dtype = _torch_dtype(spec.dtype)
    etp = tp if etp is None else etp
    world = world_size(tp, pp, ep, etp) if spec.is_moe else tp * pp
    args = argparse.Namespace(
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
        rotary_percent=spec.rotary_percent,
        rotary_interleaved=False,
        use_rope_scaling=False,
        normalization="RMSNorm",
        norm_epsilon=1e-6,
        apply_layernorm_1p=spec.is_gdn,  # Megatron-LM's flag for layernorm_zero_centered_gamma
        swiglu=True,
        add_qkv_bias=spec.family in QKV_BIAS_FAMILIES,
        add_bias_linear=False,
        qk_layernorm=spec.qk_layernorm,
        multi_latent_attention=False,
        num_experts=None,
        untie_embeddings_and_output_weights=not spec.tied,
        vocab_size=spec.vocab_size,
        padded_vocab_size=spec.padded_vocab_size,
        make_vocab_size_divisible_by=MAKE_VOCAB_SIZE_DIVISIBLE_BY,
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=pp,
        virtual_pipeline_model_parallel_size=vpp if vpp > 1 else None,
        num_layers_per_virtual_pipeline_stage=spec.num_layers // (pp * vpp)
        if vpp > 1 and not spec.pipeline_layout
        else None,
        num_virtual_stages_per_pipeline_rank=vpp if vpp > 1 else None,
        decoder_first_pipeline_num_layers=spec.first_stage_layers if pp > 1 else None,
        decoder_last_pipeline_num_layers=spec.last_stage_layers if pp > 1 else None,
        pipeline_model_parallel_layout=spec.pipeline_layout if pp > 1 else None,
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
        tokenizer_model=_TOKENIZERS.get(spec.family, "Qwen/Qwen3-0.6B"),
        ckpt_format="torch_dist",
        use_dist_ckpt=True,
        save=save,
        load=save,
        save_interval=spec.iteration,
    )
    if spec.is_moe:
        _add_moe_args(args, spec, tp, ep, etp, world)
    if spec.is_gdn:
        vars(args).update({k: v for k, v in _gdn_config(spec).items() if k != "layernorm_zero_centered_gamma"})
        args.deterministic_mode = False  # a training run uses the fla kernels
    return args


_TOKENIZERS = {
    "llama": "meta-llama/Llama-3.2-1B",
    "qwen3_moe": "Qwen/Qwen3-30B-A3B",
    "mixtral": "mistralai/Mixtral-8x7B-v0.1",
    "deepseek_v3": "deepseek-ai/DeepSeek-V3",
    "glm4_moe": "zai-org/GLM-4.5",
    "glm4_moe_lite": "zai-org/GLM-4.7-Flash",
}


def _add_moe_args(args: argparse.Namespace, spec: FixtureSpec, tp: int, ep: int, etp: int, world: int) -> None:
    """The MoE / MLA / MTP arguments as Megatron-LM stores them after ``validate_args``."""
    deepseek = spec.family in SIGMOID_FAMILIES
    freq = spec.moe_layer_freq
    vars(args).update(
        num_experts=spec.num_experts,
        moe_ffn_hidden_size=spec.moe_ffn_hidden_size,
        moe_router_topk=spec.moe_router_topk,
        moe_layer_freq=list(freq) if isinstance(freq, tuple) else freq,  # --moe-layer-freq "[0]+[1]*3" -> list
        moe_shared_expert_intermediate_size=_or_none(spec.moe_shared_expert_intermediate_size),
        moe_shared_expert_overlap=False,
        moe_router_score_function="sigmoid" if deepseek else "softmax",
        moe_router_pre_softmax=False,
        moe_router_topk_scaling_factor=_or_none(spec.moe_router_topk_scaling_factor),
        moe_router_num_groups=_or_none(spec.moe_router_num_groups),
        moe_router_group_topk=_or_none(spec.moe_router_group_topk),
        moe_router_enable_expert_bias=deepseek,
        moe_router_bias_update_rate=1e-3,
        moe_router_load_balancing_type="seq_aux_loss" if deepseek else "aux_loss",
        moe_router_dtype="fp32" if deepseek else None,
        moe_aux_loss_coeff=0.0,
        moe_z_loss_coeff=None,
        moe_input_jitter_eps=None,
        moe_expert_capacity_factor=None,
        moe_grouped_gemm=False,
        moe_use_legacy_grouped_gemm=False,
        moe_token_dispatcher_type="allgather",
        expert_model_parallel_size=ep,
        expert_tensor_parallel_size=etp,
        data_parallel_size=world // (tp * args.pipeline_model_parallel_size),
        world_size=world,
        sequence_parallel=tp > 1,  # Megatron-LM requires it for MoE with TP > 1
        mtp_num_layers=_or_none(spec.mtp_num_layers),
        mtp_loss_scaling_factor=0.1,
    )
    if spec.is_mla:
        vars(args).update(
            multi_latent_attention=True,
            q_lora_rank=spec.q_lora_rank,
            kv_lora_rank=spec.kv_lora_rank,
            qk_head_dim=spec.qk_head_dim,
            qk_pos_emb_head_dim=spec.qk_pos_emb_head_dim,
            v_head_dim=spec.v_head_dim,
        )
        # --rope-type, --rotary-scaling-factor, --mscale, --mscale-all-dim; YaRN's original length and betas
        # have no Megatron-LM flag: a YAML config sets them, and its fields land in args by those names.
        vars(args).update({"original_max_position_embeddings": SEQ_LENGTH, **_mla_rope(spec)})


def _plain_rng_state() -> dict[str, Any]:
    """The rng dict Megatron-LM saves (the legacy format keeps a list of these)."""
    import random

    import numpy as np
    import torch
    from megatron.core import tensor_parallel

    return {
        "random_rng_state": random.getstate(),
        "np_rng_state": np.random.get_state(),
        "torch_rng_state": torch.get_rng_state(),
        "rng_tracker_states": tensor_parallel.get_cuda_rng_tracker().get_states(),
    }


def _rng_state():
    """Megatron-LM's ``get_rng_state`` for torch_dist: a ShardedObject per (pp, tp) rank,
    per (pp, tp, dp) rank with expert parallelism.

    ``cuda_rng_state`` is omitted (no CUDA here).
    """

    from megatron.core import parallel_state
    from megatron.core.dist_checkpointing.mapping import ShardedObject

    state = _plain_rng_state()
    pp_size = parallel_state.get_pipeline_model_parallel_world_size()
    tp_size = parallel_state.get_tensor_model_parallel_world_size()
    pp_rank = parallel_state.get_pipeline_model_parallel_rank()
    tp_rank = parallel_state.get_tensor_model_parallel_rank()
    dp_rank = parallel_state.get_data_parallel_rank(with_context_parallel=True)
    if parallel_state.get_expert_model_parallel_world_size() > 1:
        dp_size = parallel_state.get_data_parallel_world_size(with_context_parallel=True)
        return ShardedObject(
            "rng_state", [state], (pp_size, tp_size, dp_size), (pp_rank, tp_rank, dp_rank), replica_id=0
        )
    return ShardedObject("rng_state", [state], (pp_size, tp_size), (pp_rank, tp_rank), replica_id=dp_rank)


def _sd_metadata(spec: FixtureSpec) -> dict[str, Any]:
    """Sharded-state-dict metadata; ``non_homogeneous_layers`` switches Megatron to per-layer keys."""
    return {
        "singleton_local_shards": spec.singleton_local_shards,
        "chained_optim_avoid_prefix": True,
        "non_homogeneous_layers": spec.per_layer_keys or spec.singleton_local_shards,
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


def _save_job(
    spec: FixtureSpec, load: str | None, save: str, tp: int, pp: int, vpp: int, ep: int = 1, etp: int | None = None
) -> None:
    """Build (or load from ``load``) and save like Megatron-LM's training loop."""
    import random

    import numpy as np
    import torch
    from megatron.core import dist_checkpointing, parallel_state

    _init_parallel(tp, pp, vpp, ep, etp)
    # As Megatron-LM's _set_random_seed, so the saved rng_state is reproducible.
    rng_seed = spec.seed + 100 * parallel_state.get_pipeline_model_parallel_rank()
    random.seed(rng_seed)
    np.random.seed(rng_seed)
    chunks = _build_chunks(spec, tp, pp, vpp, ep, etp, randomize=load is None)
    iteration = spec.iteration
    args = _make_args(spec, tp, pp, vpp, save, ep, etp)
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
    if spec.legacy_twin:
        _save_legacy(chunks, args, Path(save).parent / LEGACY_DIR, iteration, pp, ep)
    if spec.dcp_twin:
        _save_torch_dcp(chunks, args, Path(save).parent / DCP_DIR, iteration)
    torch.distributed.barrier()
    if torch.distributed.get_rank() == 0:
        (Path(save) / "latest_checkpointed_iteration.txt").write_text(f"{iteration}\n")
        for flag, twin in ((spec.legacy_twin, LEGACY_DIR), (spec.dcp_twin, DCP_DIR)):
            if flag:
                (Path(save).parent / twin / "latest_checkpointed_iteration.txt").write_text(f"{iteration}\n")
    torch.distributed.barrier()


def _save_legacy(chunks: list, args: Any, root: Path, iteration: int, pp: int, ep: int) -> None:
    """Megatron-LM's `--ckpt-format torch`: every (tp, pp, ep) rank of expert-data-parallel rank 0
    `torch.save`s its own TP-local state dict to `iter_N/mp_rank_{tp:02d}[_{pp:03d}][_{ep:03d}]`."""
    import torch
    from megatron.core import parallel_state as ps

    if ps.get_expert_data_parallel_rank() != 0:
        return
    name = f"mp_rank_{ps.get_tensor_model_parallel_rank():02d}"
    name += f"_{ps.get_pipeline_model_parallel_rank():03d}" if pp > 1 else ""
    name += f"_{ps.get_expert_model_parallel_rank():03d}" if ep > 1 else ""
    models = (
        {"model": chunks[0].state_dict_for_save_checkpoint()}
        if len(chunks) == 1
        else {f"model{i}": chunk.state_dict_for_save_checkpoint() for i, chunk in enumerate(chunks)}
    )
    state = {
        **models,
        "args": args,
        "checkpoint_version": 3.0,
        "iteration": iteration,
        "rng_state": [_plain_rng_state()],
    }
    directory = root / f"iter_{iteration:07d}" / name
    directory.mkdir(parents=True, exist_ok=True)
    torch.save(state, directory / "model_optim_rng.pt")


def _save_torch_dcp(chunks: list, args: Any, root: Path, iteration: int) -> None:
    """Megatron-LM's `--ckpt-format torch_dcp` without FSDP: plain DCP of the (TP1) model state dict."""
    import torch.distributed.checkpoint as dcp

    state = {"model": chunks[0].state_dict(), "args": args, "checkpoint_version": 3.0, "iteration": iteration}
    dcp.save(state, checkpoint_id=root / f"iter_{iteration:07d}")


def dcp_root(ckpt_root: Path) -> Path:
    """Where a ``dcp_twin`` spec's torch_dcp save root lies, beside its torch_dist root."""
    return Path(ckpt_root).parent / DCP_DIR


def legacy_root(ckpt_root: Path) -> Path:
    """Where a ``legacy_twin`` spec's `--ckpt-format torch` save root lies, beside its torch_dist root."""
    return Path(ckpt_root).parent / LEGACY_DIR


def _reference_job(spec: FixtureSpec, root: str) -> None:
    """Megatron's own TP1/PP1/EP1 fp32 forward of the saved checkpoint -> reference.pt.

    With MTP layers, the forward runs with labels (GPTModel needs them for MTP) and the
    output layer's calls are captured: the MTP heads' logits first, the main head's last.
    Only the main head's logits are the reference (``mtp_logits`` are stored alongside).
    """
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
    heads: list[torch.Tensor] = []  # cloned: the MTP loss works on the logits in place
    hook = model.output_layer.register_forward_hook(lambda m, i, out: heads.append(out[0].transpose(0, 1).clone()))
    with torch.no_grad():
        if spec.mtp_num_layers:
            model(ids, position_ids=pos, attention_mask=mask, labels=ids)
            logits = heads[-1]
        else:
            logits = model(ids, position_ids=pos, attention_mask=mask)
    hook.remove()
    expected = (REFERENCE_BATCH, REFERENCE_SEQ, spec.padded_vocab_size)
    if tuple(logits.shape) != expected or logits.dtype != torch.float32:
        raise RuntimeError(f"unexpected logits {tuple(logits.shape)} {logits.dtype}, want {expected}")
    if not torch.isfinite(logits).all() or logits.std() < 0.05:
        raise RuntimeError(f"degenerate reference logits for {spec.name}")
    out = Path(root).parent / REFERENCE_FILE
    data = {"input_ids": ids.clone(), "logits": logits.detach().clone().contiguous()}
    if spec.mtp_num_layers:
        data["mtp_logits"] = torch.stack(heads[:-1]).contiguous()
    torch.save(data, out)
