"""Rules of the Gated DeltaNet hybrids (Qwen3-Next, Qwen3.5; `qwen3_next.py` holds their tables and is at its
size cap): gated QKV, and the GDN input projection and convolution Megatron may save in pieces, with the TP
row order of their fused and LoRA forms (`GatedDeltaPieces.row_orders`)."""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

from ..config.hf_fields import hf_value
from ..errors import CheckpointError
from ..plan.rules import QKV, Dims, Rule, Shape
from ..plan.schema import Delta, Source
from ..readers.base import RowOrder

__all__ = ["GDN_CONV_PARTS", "GDN_IN_PROJ_PARTS", "GatedDeltaConv", "GatedDeltaInProj", "GatedDeltaPieces", "GatedQKV"]


@dataclass(frozen=True)
class GatedQKV(QKV):
    """Fused QKV with an attention output gate (Qwen3-Next / Qwen3.5 full attention): per query group
    `[q heads; gate heads; k; v]` → HF q_proj with query and gate per head `[q_h; gate_h]`, k, v."""

    def _grouped(self, shape: Shape, dims: Dims, key: str) -> tuple[int, int, int]:
        groups, head_dim = dims.num_query_groups, dims.head_dim
        per_group = dims.num_heads // groups
        if shape[0] != groups * (2 * per_group + 2) * head_dim:
            raise CheckpointError(
                f"{key} has {shape[0]} rows; a gated QKV with num_attention_heads={dims.num_heads}, "
                f"num_key_value_heads={groups}, head_dim={head_dim} needs {groups * (2 * per_group + 2) * head_dim}"
                " — the config does not match the checkpoint"
            )
        return groups, per_group, head_dim

    def target_shapes(self, shape: Shape, dims: Dims, key: str) -> list[Shape]:
        groups, per_group, head_dim = self._grouped(shape, dims, key)
        rest = shape[1:]
        kv = (groups * head_dim, *rest)
        return [(2 * groups * per_group * head_dim, *rest), kv, kv]

    def apply(self, array: np.ndarray, dims: Dims) -> list[np.ndarray]:
        groups, per_group, head_dim = self._grouped(array.shape, dims, self.sources[0])
        rest = array.shape[1:]
        grouped = array.reshape(groups, 2 * per_group + 2, head_dim, *rest)
        query_gate = np.stack([grouped[:, :per_group], grouped[:, per_group : 2 * per_group]], axis=2)
        return [
            query_gate.reshape(-1, *rest),
            grouped[:, 2 * per_group].reshape(-1, *rest),
            grouped[:, 2 * per_group + 1].reshape(-1, *rest),
        ]


GDN_IN_PROJ_PARTS = (".query", ".key", ".value", ".z", ".beta", ".alpha")  # how Megatron saves in_proj apart
GDN_CONV_PARTS = (".query", ".key", ".value")


def _whole(key: str) -> str:
    """The name of a tensor Megatron saved apart, from one of its pieces' keys."""
    base, _, piece = key.rpartition(".")
    return base if f".{piece}" in GDN_IN_PROJ_PARTS else key


def _linear_heads(dims: Dims) -> tuple[int, int, int, int]:
    """(key heads, key head dim, value heads, value head dim) of the Gated DeltaNet layers."""
    names = ("linear_num_key_heads", "linear_key_head_dim", "linear_num_value_heads", "linear_value_head_dim")
    try:
        nk, dk, nv, dv = (int(hf_value(dims.config, name)) for name in names)
    except KeyError as exc:
        raise CheckpointError(f"the HF config lacks {exc}, needed for the Gated DeltaNet layers") from exc
    return nk, dk, nv, dv


def _tp_blocks(source: Source, parts: list[int], tp: int) -> Source:
    return replace(source, row_order=RowOrder("tp_blocks", tp, tuple(parts))) if tp > 1 else source


@dataclass(frozen=True)
class GatedDeltaPieces(Rule):
    """A GDN tensor Megatron saves apart, its pieces joined piece-major (each over all heads); or, fused
    (legacy `--ckpt-format torch`), in TP-local blocks: per TP rank its own slice of every piece in turn."""

    def piece_rows(self, shape: Shape, dims: Dims, key: str) -> list[int]:
        raise NotImplementedError

    def row_orders(
        self, source: Source | None, delta: Delta | None, dims: Dims, saved_tp: object
    ) -> tuple[Source | None, Delta | None]:
        """A fused tensor (one part) is in TP-local blocks at the training TP. A LoRA B (and DoRA magnitude)
        has no split factory: its rows are TP-local blocks at the adapter's TP."""
        if source is not None and len(source.parts) == 1:
            if not isinstance(saved_tp, int) or saved_tp < 1:
                raise CheckpointError(
                    f"{source.key} is fused in its TP-local layout, but the checkpoint's args give no training TP"
                )
            source = _tp_blocks(source, self.piece_rows(source.shape, dims, source.key), saved_tp)
        if delta is not None and delta.tp > 1:
            pieces = tuple(
                None if p is None else (p[0], _tp_blocks(p[1], self.piece_rows(p[1].shape, dims, p[1].key), delta.tp))
                for p in delta.pieces
            )
            m = delta.magnitude
            m = None if m is None else _tp_blocks(m, self.piece_rows(m.shape, dims, m.key), delta.tp)
            delta = replace(delta, pieces=pieces, magnitude=m)
        return source, delta

    def joined(self, array: np.ndarray, dims: Dims) -> list[np.ndarray]:
        """The pieces, in true order once read."""
        rows = self.piece_rows(array.shape, dims, self.sources[0])
        return np.split(array, np.cumsum(rows)[:-1])


@dataclass(frozen=True)
class GatedDeltaConv(GatedDeltaPieces):
    """GDN conv1d `[C, 1, K]` from its q, k, v channels (HF conv1d runs over `[q; k; v]` too)."""

    def piece_rows(self, shape: Shape, dims: Dims, key: str) -> list[int]:
        nk, dk, nv, dv = _linear_heads(dims)
        if shape[0] != 2 * nk * dk + nv * dv:
            raise CheckpointError(
                f"{_whole(key)} has {shape[0]} channels; the config's linear heads need {2 * nk * dk + nv * dv}"
            )
        return [nk * dk, nk * dk, nv * dv]

    def apply(self, array: np.ndarray, dims: Dims) -> list[np.ndarray]:
        return [np.concatenate(self.joined(array, dims))]


@dataclass(frozen=True)
class GatedDeltaInProj(GatedDeltaPieces):
    """GDN in_proj `[q; k; v; z; b; a]` → Qwen3.5 `in_proj_qkv`, `in_proj_z`, `in_proj_b`, `in_proj_a`, or with
    ``grouped`` Qwen3-Next `in_proj_qkvz` `[q; k; v; z]` and `in_proj_ba` `[b; a]`, both grouped per key head."""

    grouped: bool = False

    def piece_rows(self, shape: Shape, dims: Dims, key: str) -> list[int]:
        nk, dk, nv, dv = _linear_heads(dims)
        if shape[0] != 2 * nk * dk + 2 * nv * dv + 2 * nv or nv % nk:
            raise CheckpointError(
                f"{_whole(key)} has {shape[0]} rows; linear_num_key_heads={nk}, linear_key_head_dim={dk}, "
                f"linear_num_value_heads={nv}, linear_value_head_dim={dv} need {2 * nk * dk + 2 * nv * dv + 2 * nv}"
            )
        return [nk * dk, nk * dk, nv * dv, nv * dv, nv, nv]

    def target_shapes(self, shape: Shape, dims: Dims, key: str) -> list[Shape]:
        q, k, v, z, b, a = self.piece_rows(shape, dims, key)
        rest = shape[1:]
        if self.grouped:
            return [(q + k + v + z, *rest), (b + a, *rest)]
        return [(q + k + v, *rest), (z, *rest), (b, *rest), (a, *rest)]

    def apply(self, array: np.ndarray, dims: Dims) -> list[np.ndarray]:
        q, k, v, z, b, a = self.joined(array, dims)
        if not self.grouped:
            return [np.concatenate([q, k, v]), z, b, a]
        nk, rest = _linear_heads(dims)[0], array.shape[1:]
        per_key = [t.reshape(nk, -1, *rest) for t in (q, k, v, z, b, a)]  # value heads follow their key head
        qkvz = np.concatenate(per_key[:4], axis=1).reshape(-1, *rest)
        return [qkvz, np.concatenate(per_key[4:], axis=1).reshape(-1, *rest)]
