"""Rules of the Mamba-2 mixer (Nemotron-H), and the hybrid layer pattern's block conditions: the input projection and convolution Megatron saves apart, TP-sharded
by head groups (`MambaMixer.sharded_state_dict`), with the TP row order of their fused and LoRA forms.

On disk (torch_dist) `in_proj.weight.{z,x,B,C,dt}` and `conv1d.{weight,bias}.{x,B,C}` each hold one piece over
all heads or groups; joined piece-major they are HF's `in_proj` `[z; x; B; C; dt]` and `conv1d` `[x; B; C]`. A
fused in_proj (legacy `--ckpt-format torch`, a LoRA B) holds per TP rank its own slice of every piece in turn:
the `GatedDeltaPieces` row orders undo that, with these pieces' sizes (see formats/mamba.md).
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from typing import ClassVar

from ..config.hf_fields import hf_value
from ..errors import CheckpointError
from ..plan.rules import Dims, Shape, moe_layer
from .gated_deltanet import GatedDeltaPieces

__all__ = [
    "BLOCKS",
    "MAMBA_CONV_PARTS",
    "MAMBA_IN_PROJ_PARTS",
    "MambaConv",
    "MambaInProj",
    "latent_moe_layer",
    "layer_types",
    "mamba_sizes",
    "mlp_layer",
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
def layer_types(args: argparse.Namespace) -> list[str]:
    """The HF block types of Megatron's `hybrid_override_pattern` (one symbol per layer)."""
    pattern, num_layers = getattr(args, "hybrid_override_pattern", None), int(args.num_layers)
    if not isinstance(pattern, str) or len(pattern) != num_layers or set(pattern) - set(BLOCKS):
        raise CheckpointError(
            f"args.hybrid_override_pattern={pattern!r} does not give one of M, *, -, E for each of {num_layers} "
            "layers; pass --hf-config"
        )
    return [BLOCKS[symbol] for symbol in pattern]


def mlp_layer(dims: Dims, layer: int | None) -> bool:
    """A dense MLP block (`-`)."""
    return layer is not None and hf_value(dims.config, "layer_types")[layer] == "mlp"


def latent_moe_layer(dims: Dims, layer: int | None) -> bool:
    """An MoE block with latent projections (Nemotron 3 `moe_latent_size`)."""
    return moe_layer(dims, layer) and bool(hf_value(dims.config, "moe_latent_size", None))
