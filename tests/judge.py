"""The outside world's verdict on a converted directory: transformers loads it and runs it."""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

from offline_bridge.write.manifest import MANIFEST
from tools.megatron_fixtures import FixtureSpec, reference_logits


def load_clean(out_dir: Path, *, extra: str | None = None) -> torch.nn.Module:
    """Load with transformers in fp32 and insist on a clean loading report.

    ``extra`` is a regex of keys transformers may call unexpected because its forward does not use them
    (DeepSeek-V3 MTP layers); those are checked by name and value elsewhere.
    """
    model, info = AutoModelForCausalLM.from_pretrained(out_dir, dtype=torch.float32, output_loading_info=True)
    if extra:
        info["unexpected_keys"] = {k for k in info["unexpected_keys"] if not re.fullmatch(extra, k)}
    problems = {k: v for k, v in info.items() if v and k in ("missing_keys", "unexpected_keys", "mismatched_keys")}
    assert not problems, f"transformers loading report for {out_dir}: {problems}"
    return model.eval()


def assert_matches_megatron(
    out_dir: Path, spec: FixtureSpec, checkpoint: Path, atol: float = 1e-5, *, extra: str | None = None
) -> None:
    """HF logits of the converted model equal Megatron's forward of the same checkpoint."""
    model = load_clean(out_dir, extra=extra)
    input_ids, expected = reference_logits(checkpoint)
    with torch.no_grad():
        logits = model(input_ids).logits
    expected = expected[..., : spec.vocab_size]
    assert logits.shape == expected.shape
    err = (logits - expected).abs().max().item()
    assert err <= atol, f"{out_dir}: max |logits - megatron| = {err:.3g} > {atol}"


def convert_fails(src: Path, out: Path, *extra: str) -> str:
    """Run `offline-bridge convert`, expect exit 2 with a one-line error, and no output (complete or partial)."""
    from click.testing import CliRunner

    from offline_bridge.commands.cli import main

    result = CliRunner().invoke(main, ["convert", str(src), str(out), "--quiet", *[str(e) for e in extra]])
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert not out.exists() or not any(out.iterdir())
    assert not [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.")]
    return lines[0]


def assert_same_output(a: Path, b: Path) -> None:
    """Two output directories hold the same files byte for byte; their manifests differ at most in the
    sources they fingerprint (two saves of the same weights)."""
    names = sorted(p.name for p in a.iterdir())
    assert names == sorted(p.name for p in b.iterdir())
    assert MANIFEST in names
    for name in names:
        if name == MANIFEST:
            mine, theirs = (json.loads((d / name).read_text()) for d in (a, b))
            assert {**mine, "sources": None} == {**theirs, "sources": None}
        else:
            assert (a / name).read_bytes() == (b / name).read_bytes(), name
