"""Casts without torch: `ml_dtypes` gives torch's bits on every non-NaN value (random bit patterns cover
subnormals, infinities and NaN), and a conversion that casts never imports torch."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from offline_bridge.dtypes import by_torch_name
from offline_bridge.plan.rules import Dims
from offline_bridge.plan.rules.core import PlusOne
from offline_bridge.transform.casting import cast

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "tiny-llama"
PAIRS = [
    ("float32", "bfloat16"),
    ("bfloat16", "float32"),
    ("float32", "float16"),
    ("float16", "float32"),
    ("bfloat16", "float16"),
    ("float16", "bfloat16"),
    ("float64", "float32"),
    ("float64", "bfloat16"),
    ("float64", "float16"),
    ("float32", "float8_e4m3fn"),
    ("bfloat16", "float8_e4m3fn"),
    ("float32", "float8_e5m2"),
]
DIMS = Dims(num_layers=1, hidden_size=8, num_heads=1, num_query_groups=1, head_dim=8, vocab_size=8, tied=True)
_UNSIGNED = {1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint64}
_SIGNED = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def _bits(name: str, count: int, seed: int) -> np.ndarray:
    """Random bit patterns of ``name`` (every class of value), then its edge values; odd length, so torch's
    vectorised loops also run their scalar tails."""
    dtype = by_torch_name(name)
    unsigned = _UNSIGNED[dtype.itemsize]
    bits = np.random.default_rng(seed).integers(0, np.iinfo(unsigned).max, count, dtype=unsigned, endpoint=True)
    edges = np.array([0.0, -0.0, 1.0, -1.0, np.inf, -np.inf, np.nan, 448.0, 464.0, 480.0, 1e-40, 6e-8, 65504.0])
    with np.errstate(over="ignore", invalid="ignore"):
        edge_bits = edges.astype(dtype.values).view(unsigned)
    return np.concatenate([bits, edge_bits])


def _torch_bits(bits: np.ndarray, source: str, target: str) -> np.ndarray:
    """torch's ``.to`` on the same bits, as unsigned bits of ``target``."""
    signed = {1: np.uint8, 2: np.int16, 4: np.int32, 8: np.int64}[bits.itemsize]
    tensor = torch.from_numpy(bits.view(signed)).view(getattr(torch, source)).to(getattr(torch, target))
    size = by_torch_name(target).itemsize
    return tensor.view(_SIGNED[size]).numpy().view(_UNSIGNED[size])


@pytest.mark.parametrize(("source", "target"), PAIRS)
def test_cast_is_torch_bit_for_bit(source: str, target: str) -> None:
    src, dst = by_torch_name(source), by_torch_name(target)
    bits = _bits(source, 200_001, seed=len(source) * 31 + len(target))
    with np.errstate(over="ignore", invalid="ignore"):
        ours = cast(bits.view(src.np), src, dst).view(_UNSIGNED[dst.itemsize])
    theirs = _torch_bits(bits, source, target)
    nan = np.isnan(theirs.view(dst.values).astype(np.float32))
    assert np.isnan(ours[nan].view(dst.values).astype(np.float32)).all(), "NaN stays NaN"
    mismatch = np.flatnonzero((ours != theirs) & ~nan)
    assert mismatch.size == 0, [(hex(bits[i]), hex(theirs[i]), hex(ours[i])) for i in mismatch[:5]]


def test_plus_one_rounds_like_torch() -> None:
    """A zero-centred bf16 norm weight plus one, rounded once: torch's `(w.float() + 1).to(bfloat16)`."""
    bits = _bits("bfloat16", 100_001, seed=5)
    with np.errstate(invalid="ignore"):  # NaN + 1
        (ours,) = PlusOne(("norm.weight",), ("norm.weight",)).apply(bits.view(np.uint16), DIMS)
    weight = torch.from_numpy(bits.view(np.int16)).view(torch.bfloat16)
    theirs = (weight.float() + 1).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
    finite = ~np.isnan(theirs.view(by_torch_name("bfloat16").values).astype(np.float32))
    assert ours.dtype == np.uint16 and np.array_equal(ours[finite], theirs[finite])


def test_casting_conversion_never_imports_torch(tmp_path: Path) -> None:
    """`--dtype fp32` of the bf16 example casts every tensor without torch, to the bytes torch would give."""
    code = (
        "import sys; from offline_bridge import convert; "
        f"convert({str(EXAMPLE)!r}, {str(tmp_path / 'out')!r}, dtype='fp32', progress=False); "
        f"convert({str(EXAMPLE)!r}, {str(tmp_path / 'auto')!r}, progress=False); "
        "assert 'torch' not in sys.modules, 'torch was imported'"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    wide, stored = load_file(tmp_path / "out" / "model.safetensors"), load_file(tmp_path / "auto" / "model.safetensors")
    assert wide.keys() == stored.keys() and {t.dtype for t in stored.values()} == {torch.bfloat16}
    for name, tensor in stored.items():
        assert wide[name].dtype == torch.float32 and torch.equal(
            wide[name].view(torch.int32), tensor.float().view(torch.int32)
        )
