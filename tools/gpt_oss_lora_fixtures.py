"""Megatron-Bridge LoRA saves on a GPT-OSS base (tools/gpt_oss_fixtures.py), with Megatron's merged-model logits.

lora_fixtures writes and checks the adapters (`AdapterSpec` on the GPT-OSS spec's generic MoE base: attention
`linear_qkv` / `linear_proj` and the experts' `linear_fc1` / `linear_fc2`) and computes the reference: Megatron's
TP1 EP1 forward with every targeted weight merged. Its jobs run here in a worker that builds the GPT-OSS model
in place of the generic one, against the GPT-OSS base save. Adapters are cached under
`cache_dir/<GPT-OSS spec name>/adapters/<adapter name>/` (their names end in the generic base's name).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tools import lora_fixtures as lf
from tools import megatron_fixtures as mf
from tools.gpt_oss_fixtures import GptOssSpec, gpt_oss_model
from tools.megatron_fixtures import cpu_rank, pending_builds

__all__ = ["build_gpt_oss_adapters"]


def build_gpt_oss_adapters(
    specs: list[lf.AdapterSpec], base: GptOssSpec, base_root: Path, cache_dir: Path
) -> dict[lf.AdapterSpec, Path]:
    """Each adapter's save root on ``base`` (saved at ``base_root``), with ``reference.pt`` beside it."""
    if any(s.base != base.base for s in specs):
        raise ValueError(f"adapters must be specified on {base.name}'s generic base, GptOssSpec.base")
    cache_dir = Path(cache_dir).resolve() / base.name / "adapters"
    cache_dir.mkdir(parents=True, exist_ok=True)
    roots = {s: cache_dir / s.name / s.save_dir for s in specs}
    with pending_builds(cache_dir, specs, ".gpt_oss_lora.lock") as todo:
        for spec in todo:
            job = {"spec": spec, "base_root": str(base_root), "save": str(roots[spec]), "gpt_oss": base}
            mf._spawn(spec.world_size, "save", [job], worker=_worker)
            mf._spawn(1, "reference", [job], worker=_worker)
    return roots


def _worker(rank: int, world: int, port: int, task: str, jobs: list[dict[str, Any]]) -> None:
    with cpu_rank(rank, world, port):
        for job in jobs:
            job = dict(job)
            gpt_oss_model(job.pop("gpt_oss"))
            {"save": lf._save_job, "reference": lf._reference_job}[task](**job)
