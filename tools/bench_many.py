"""Many small tensors: `convert` on a DeepSeek-V3-shaped checkpoint at tiny widths (issue 21).

``python tools/bench.py --layers 61 --experts 256`` writes (once, with megatron-core, about a minute) a
checkpoint with DeepSeek-V3's tensor count: 61 layers, the first 3 dense, 256 routed experts and a shared
expert per MoE layer, one MTP layer, hidden 64, expert FFN 16, small MLA ranks (bf16, TP1 EP1, 0.2 GB). The
bytes are few, so the time beyond copying them is the per-tensor cost of reading the metadata, planning,
writing headers, scheduling and the manifest, reported as (convert wall - the `cp -r` + `sync` floor of the
same bytes) / HF tensors; and the wall time of `convert --dry-run` (reads the metadata and plans).
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
from pathlib import Path

from tools.bench import Sample, Tool, measure, table
from tools.megatron_fixtures import FixtureSpec, _job, _spawn, pending_builds

__all__ = ["bench_many_tensors", "many_tensors_spec"]

DENSE_LAYERS = 3  # DeepSeek-V3's first_k_dense_replace
BUILD_TIMEOUT = 3600.0  # seconds: 15k expert modules, saved by one CPU rank


def many_tensors_spec(layers: int, experts: int) -> FixtureSpec:
    """DeepSeek-V3's layer and expert structure (group-limited routing, shared expert, MTP) at tiny widths."""
    groups = 8 if experts % 8 == 0 and experts >= 16 else 0
    return FixtureSpec(
        "deepseek_v3",
        dtype="bf16",
        num_layers=layers,
        hidden_size=64,
        ffn_hidden_size=96,
        num_attention_heads=4,
        num_experts=experts,
        moe_ffn_hidden_size=16,
        moe_router_topk=min(8, experts),
        moe_layer_freq=(0,) * DENSE_LAYERS + (1,) * (layers - DENSE_LAYERS),
        moe_shared_expert_intermediate_size=16,
        moe_router_num_groups=groups,
        moe_router_group_topk=4 if groups else 0,
        mtp_num_layers=1,
    )


def many_tensors_checkpoint(cache: Path, spec: FixtureSpec) -> Path:
    """The checkpoint's save root, written by megatron-core (one rank) on first use."""
    root = cache / spec.name / "ckpt"
    cache.mkdir(parents=True, exist_ok=True)
    with pending_builds(cache, [spec], ".bench-build.lock") as todo:
        if todo:
            print(f"writing the benchmark checkpoint to {root} (megatron-core, 1 rank) ...", file=sys.stderr)
            root.mkdir(parents=True)
            _spawn(1, "save", [_job(spec, None, root, 1, 1, 1, 1, 1)], timeout=BUILD_TIMEOUT)
    return root


def hf_tensors(base: Path, cli: list[str], env: dict[str, str]) -> int:
    """How many tensors the conversion writes (the last line of `--dry-run`)."""
    out = subprocess.run([*cli, "convert", str(base), "unused", "--dry-run"], env=env, capture_output=True, text=True)
    found = re.search(r"^total: (\d+) tensors", out.stdout, re.MULTILINE)
    if out.returncode or not found:
        raise SystemExit(f"convert --dry-run failed:\n{out.stderr}")
    return int(found.group(1))


def bench_many_tensors(args: argparse.Namespace) -> None:
    """Time `cp -r` (+ `sync`), `convert` and `convert --dry-run` in turn; print the table and the cost per
    tensor beyond moving the bytes."""
    spec = many_tensors_spec(args.layers, args.experts)
    base = many_tensors_checkpoint(args.cache, spec)
    cli = [sys.executable, "-m", "offline_bridge"]
    workers = ["--workers", str(args.workers)] if args.workers else []
    script = 'cp -r "$1" "$2" && find "$2" -type f -exec sync {} +'
    synced = "`cp -r`, then `sync` of each file"
    tools = [
        Tool("`cp -r`", lambda out: ["cp", "-r", str(base), str(out)]),
        Tool(synced, lambda out: ["sh", "-c", script, "sh", str(base), str(out)]),
        Tool("`offline-bridge convert`", lambda out: [*cli, "convert", str(base), str(out), "--quiet", *workers]),
        Tool("`offline-bridge convert --dry-run`", lambda out: [*cli, "convert", str(base), str(out), "--dry-run"]),
    ]
    scratch = (args.scratch or args.cache / "scratch").resolve()
    scratch.mkdir(parents=True, exist_ok=True)
    samples = measure(tools, scratch, args.runs, args.warmup)
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
    count = hf_tensors(base, cli, env)
    print(
        f"DeepSeek-V3 shape: {spec.num_layers} layers ({DENSE_LAYERS} dense), {spec.num_experts} experts + shared, "
        f"MTP {spec.mtp_num_layers}, hidden {spec.hidden_size}, expert FFN {spec.moe_ffn_hidden_size}, bf16 TP1; "
        f"{count} HF tensors; {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}; median of "
        f"{args.runs} runs after {args.warmup} warm-up\n"
    )
    print(table(samples, tools[0].name))
    print(f"\n{_per_tensor(samples, synced, count)}")


def _per_tensor(samples: dict[str, list[Sample]], floor_name: str, count: int) -> str:
    floor = statistics.median(s.wall for s in samples[floor_name])
    convert = statistics.median(s.wall for s in samples["`offline-bridge convert`"])
    cpu = statistics.median(s.cpu for s in samples["`offline-bridge convert`"])
    rss = max(s.rss for s in samples["`offline-bridge convert`"])
    return (
        f"convert beyond the cp + sync floor: ({convert:.2f} s - {floor:.2f} s) / {count} tensors = "
        f"{(convert - floor) / count * 1e3:.3f} ms per tensor (CPU {cpu / count * 1e3:.3f} ms per tensor); "
        f"peak RSS {rss / 1e9:.2f} GB"
    )
