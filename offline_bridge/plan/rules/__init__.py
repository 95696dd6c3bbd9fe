"""The transforms a mapping table can name: copy, vocab trim, QKV split, gated-MLP split, and the Gated
DeltaNet hybrids' gated QKV, GDN input projection, packed experts and zero-centred norm.

A rule reads one Megatron tensor (global, TP-invariant layout) and produces one or more HF tensors. Rules
work on numpy arrays of any dtype (bf16 moves as uint16): they slice and reshape, and compute nothing but
the +1 of a zero-centred norm. Patterns may hold ``{i}``, the global layer index, and ``{e}``, the global
expert index; a rule whose source holds ``{e}`` and whose targets do not stacks all experts (packed).

One module per job: `dims` (model dimensions, layer conditions), `core`, `lora` (adapter layouts) and
`gdn` (Gated DeltaNet hybrids), `transposed` (GPT-OSS's packed experts); every rule is importable from here.
"""

from .core import QKV, Copy, GatedMLP, Packed, PlusOne, Repeat, Rule, VocabRows, only
from .dims import Condition, Dims, Shape, dense_layer, full_attention_layer, linear_attention_layer, moe_layer, untied
from .lora import ExpertMajorA, RankMajorB, fused_part_rows
from .transposed import InterleavedPacked, InterleavedRankMajorB, TransposedPacked

__all__ = [
    "QKV",
    "Condition",
    "Copy",
    "Dims",
    "ExpertMajorA",
    "GatedMLP",
    "InterleavedPacked",
    "InterleavedRankMajorB",
    "Packed",
    "PlusOne",
    "RankMajorB",
    "Repeat",
    "Rule",
    "Shape",
    "TransposedPacked",
    "VocabRows",
    "dense_layer",
    "full_attention_layer",
    "fused_part_rows",
    "linear_attention_layer",
    "moe_layer",
    "only",
    "untied",
]
