"""Rules of the Mamba-2 mixer (Nemotron-H), the hybrid layer pattern's block conditions and its MTP table: the input projection and convolution Megatron saves apart, TP-sharded
by head groups (`MambaMixer.sharded_state_dict`), with the TP row order of their fused and LoRA forms.

On disk (torch_dist) `in_proj.weight.{z,x,B,C,dt}` and `conv1d.{weight,bias}.{x,B,C}` each hold one piece over
all heads or groups; joined piece-major they are HF's `in_proj` `[z; x; B; C; dt]` and `conv1d` `[x; B; C]`. A
fused in_proj (legacy `--ckpt-format torch`, a LoRA B) holds per TP rank its own slice of every piece in turn:
the `GatedDeltaPieces` row orders undo that, with these pieces' sizes (see formats/mamba.md).
"""

from __future__ import annotations

import argparse
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any, ClassVar

from ..config.hf_fields import hf_value
from ..errors import CheckpointError
from ..plan.rules import Copy, Dims, Rule, Shape, moe_layer, only
from .gated_deltanet import GatedDeltaPieces

__all__ = [
    "BLOCKS",
    "MAMBA_CONV_PARTS",
    "MAMBA_IN_PROJ_PARTS",
    "MambaConv",
    "MambaInProj",
    "first_mtp_inner",
    "hybrid_mtp",
    "last_mtp_inner",
    "latent_moe_layer",
    "layer_types",
    "mamba_sizes",
    "mlp_layer",
    "mtp_block_types",
    "mtp_types",
]

BLOCKS = {"M": "linear_attention", "*": "full_attention", "-": "mlp", "E": "moe"}  # pattern symbol → HF type

MAMBA_IN_PROJ_PARTS = (".z", ".x", ".B", ".C", ".dt")  # how Megatron saves in_proj apart
MAMBA_CONV_PARTS = (".x", ".B", ".C")


def mamba_sizes(dims: Dims) -> tuple[int, int, int]:
    """(d_inner = heads · head dim, groups · state size, heads) of the Mamba mixers, from the HF config."""
    names = ("mamba_num_heads", "mamba_head_dim", "n_groups", "ssm_state_size")
    try:
        heads, head_dim, groups, state = (int(hf_value(dims.config, name)) for name in names)
    except KeyError as exc:
        raise CheckpointError(f"the HF config lacks {exc}, needed for the Mamba layers") from exc
    return heads * head_dim, groups * state, heads


def _checked(rows: list[int], shape: Shape, key: str, what: str) -> list[int]:
    if shape[0] != sum(rows):
        raise CheckpointError(
            f"{key.rsplit('.', 1)[0] if key.endswith(MAMBA_IN_PROJ_PARTS) else key} has {shape[0]} {what}; the "
            f"config's mamba_num_heads, mamba_head_dim, n_groups and ssm_state_size need {sum(rows)}"
        )
    return rows


@dataclass(frozen=True)
class _MambaPieces(GatedDeltaPieces):
    """HF keeps Megatron's piece order, so once read (pieces joined, TP blocks undone) the rows are final."""

    rows_only: ClassVar[bool] = True

    def target_shapes(self, shape: Shape, dims: Dims, key: str) -> list[Shape]:
        self.piece_rows(shape, dims, key)  # raises if the config's sizes contradict the checkpoint
        return [shape]


@dataclass(frozen=True)
class MambaInProj(_MambaPieces):
    """Mamba in_proj `[z; x; B; C; dt]`."""

    def piece_rows(self, shape: Shape, dims: Dims, key: str) -> list[int]:
        inner, state, heads = mamba_sizes(dims)
        return _checked([inner, inner, state, state, heads], shape, key, "rows")


@dataclass(frozen=True)
class MambaConv(_MambaPieces):
    """Mamba conv1d weight `[C, 1, K]` or bias `[C]` over the channels `[x; B; C]`, as HF's conv1d."""

    def piece_rows(self, shape: Shape, dims: Dims, key: str) -> list[int]:
        inner, state, _ = mamba_sizes(dims)
        return _checked([inner, state, state], shape, key, "channels")


# The hybrid layer pattern: which block each layer is.
def _pattern(args: argparse.Namespace) -> str | None:
    """The unified pattern `<main>/<mtp>/<mtp>...` (Megatron-LM 0.19 `hybrid_layer_pattern`; before it
    `hybrid_override_pattern`, with one depth's MTP pattern apart in `mtp_hybrid_override_pattern`)."""
    pattern = getattr(args, "hybrid_layer_pattern", None) or getattr(args, "hybrid_override_pattern", None)
    legacy_mtp = getattr(args, "mtp_hybrid_override_pattern", None)
    if isinstance(pattern, str) and isinstance(legacy_mtp, str) and "/" not in pattern:
        pattern += f"/{legacy_mtp}" * int(getattr(args, "mtp_num_layers", None) or 0)
    return pattern


def _types(pattern: str, what: str) -> list[str]:
    if set(pattern) - set(BLOCKS):
        raise CheckpointError(f"args.{what}={pattern!r} holds a block other than M, *, -, E; pass --hf-config")
    return [BLOCKS[symbol] for symbol in pattern]


def layer_types(args: argparse.Namespace) -> list[str]:
    """The HF block types of the main layers (one pattern symbol per layer; `|` marks pipeline stages)."""
    pattern, num_layers = _pattern(args), int(args.num_layers)
    main = pattern.split("/")[0].replace("|", "") if isinstance(pattern, str) else None
    if main is None or len(main) != num_layers or set(main) - set(BLOCKS):
        raise CheckpointError(
            f"args.hybrid_layer_pattern / hybrid_override_pattern={pattern!r} does not give one of M, *, -, E for "
            f"each of {num_layers} layers; pass --hf-config"
        )
    return [BLOCKS[symbol] for symbol in main]


def mtp_block_types(args: argparse.Namespace) -> tuple[list[str], int]:
    """(HF block types of one MTP depth's inner layers, number of depths): every depth has the same pattern."""
    depths = (_pattern(args) or "").split("/")[1:]
    mtp_num_layers = int(getattr(args, "mtp_num_layers", None) or 0)
    if len(set(depths)) > 1 or "" in depths or len(depths) != mtp_num_layers:
        raise CheckpointError(
            f"args.hybrid_layer_pattern={_pattern(args)!r} does not give one MTP pattern for each of "
            f"args.mtp_num_layers={mtp_num_layers} depths"
        )
    return (_types(depths[0], "hybrid_layer_pattern") if depths else []), len(depths)


def mlp_layer(dims: Dims, layer: int | None) -> bool:
    """A dense MLP block (`-`)."""
    return layer is not None and hf_value(dims.config, "layer_types")[layer] == "mlp"


def latent_moe_layer(dims: Dims, layer: int | None) -> bool:
    """An MoE block with latent projections (Nemotron 3 `moe_latent_size`)."""
    return moe_layer(dims, layer) and bool(hf_value(dims.config, "moe_latent_size", None))


def mtp_types(config: Mapping[str, Any]) -> list[str]:
    """One MTP depth's inner block types (`mtp_layers_block_type`, or 4.x `mtp_hybrid_override_pattern`)."""
    if not int(hf_value(config, "num_nextn_predict_layers", None) or 0):
        return []
    types = hf_value(config, "mtp_layers_block_type", None)
    pattern = hf_value(config, "mtp_hybrid_override_pattern", None)
    if not isinstance(types, list) and isinstance(pattern, str) and not set(pattern) - set(BLOCKS):
        types = [BLOCKS[symbol] for symbol in pattern]
    return types if isinstance(types, list) else ["full_attention", "moe"]  # transformers' default


def first_mtp_inner(dims: Dims, layer: int | None) -> bool:
    return layer is not None and (layer - dims.num_layers) % len(mtp_types(dims.config)) == 0


def last_mtp_inner(dims: Dims, layer: int | None) -> bool:
    block = len(mtp_types(dims.config))
    return layer is not None and (layer - dims.num_layers) % block == block - 1


def hybrid_mtp(layer: tuple[Rule, ...], megatron: str, hf: str) -> tuple[Rule, ...]:
    """The MTP table: the layer rules (names under `megatron` / `hf`) re-aimed at inner layer j of depth k,
    HF flat MTP layer m, plus each depth's `eh_proj` / `enorm` / `hnorm` (first inner) and final norm (last)."""
    inner = tuple(
        replace(
            rule,
            sources=tuple(s.replace(megatron, "mtp.layers.{k}.mtp_model_layer.layers.{j}.") for s in rule.sources),
            targets=tuple(t.replace(hf, "mtp.layers.{m}.") for t in rule.targets),
        )
        for rule in layer
    )
    first = ("eh_proj.weight", "enorm.weight", "hnorm.weight")
    return (
        *only(first_mtp_inner, tuple(Copy.of(f"mtp.layers.{{k}}.{n}", f"mtp.layers.{{m}}.{n}") for n in first)),
        *inner,
        *only(
            last_mtp_inner, (Copy.of("mtp.layers.{k}.final_layernorm.weight", "mtp.layers.{m}.final_layernorm.weight"),)
        ),
    )
