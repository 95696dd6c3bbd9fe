"""Benchmark `offline-bridge convert` against `cp -r` and the two tools people use today.

Usage (from the repository root; the first run writes the checkpoint, ~1 min, 2.2 GB)::

    python tools/bench.py [--cache DIR] [--runs 5] [--workers N]      # cp, DCP, megatron-core, convert
    python tools/bench.py --lora                                      # merge cost: convert vs convert --adapter
    python tools/bench.py --export-adapter                            # export-adapter vs cp of the adapter
    python tools/bench.py --lora --layers 44                          # the same on a 4.2 GB checkpoint
    python tools/bench.py --layers 61 --experts 256                   # many small tensors (tools/bench_many.py)

The benchmark checkpoint is a llama-family model written by megatron-core itself (bf16, TP2 PP2, 2.2 GB),
cached under ``--cache``; ``--lora`` adds a Megatron-Bridge LoRA adapter (all four targets). Every tool runs
in its own process, one after the other in turn (so load from other processes hits them alike; each round
starts with the next tool), after a warm-up round that also fills the page cache; outputs are deleted and
flushed (`sync`) between runs, outside the timing. Peak RSS is the child's ``ru_maxrss`` (`os.wait4`). The anchors:

- PyTorch DCP: `torch.distributed.checkpoint.state_dict_loader._load_state_dict` with
  `_EmptyStateDictLoadPlanner` and ``no_dist=True``, then `safetensors.torch.save_file`;
- megatron-core: `dist_checkpointing.load_plain_tensors`, then `save_file`.

They write Megatron's own names (no HF mapping), which is less work than a conversion. `offline-bridge`
flushes every file it writes to disk (`fsync`) and hashes every tensor it writes (sha256, for the manifest),
which `cp -r` and the anchors do not: the table also shows `cp -r` followed by `sync` of each copied file,
and by `sync` and a sha256 of each file (`openssl sha256`: the same guarantees as a conversion).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import shutil
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from tools.lora_fixtures import AdapterSpec  # noqa: E402
from tools.megatron_fixtures import FixtureSpec, pending_builds, write_checkpoint  # noqa: E402
from tools.megatron_fixtures import _free_port as free_port  # noqa: E402

SPEC = FixtureSpec(
    "llama",
    tp=2,
    pp=2,
    dtype="bf16",
    num_layers=22,
    hidden_size=2048,
    ffn_hidden_size=5632,
    num_attention_heads=16,
    num_query_groups=4,
    vocab_size=32000,
)
DEFAULT_CACHE = Path.home() / ".cache" / "offline-bridge" / "bench"


@dataclass(frozen=True)
class Tool:
    name: str
    argv: Callable[[Path], list[str]]  # output path -> command line


@dataclass
class Sample:
    wall: float
    cpu: float  # user + system seconds: what the tool itself spent, less sensitive to other load
    rss: int  # bytes


def base_checkpoint(cache: Path, spec: FixtureSpec) -> Path:
    """The benchmark checkpoint's save root, written by megatron-core on first use."""
    root = cache / spec.name / "ckpt"
    cache.mkdir(parents=True, exist_ok=True)
    with pending_builds(cache, [spec], ".bench-build.lock") as todo:
        if todo:
            print(f"writing the benchmark checkpoint to {root} (megatron-core, 4 ranks) ...", file=sys.stderr)
            write_checkpoint(spec, root)
    return root


def adapter_checkpoint(cache: Path, spec: FixtureSpec) -> Path:
    """The LoRA adapter's save root (adapter-only, as Megatron-Bridge saves it), written on first use: rank 8
    on linear_qkv, linear_proj, linear_fc1 and linear_fc2, saved at TP2."""
    from tools.lora_fixtures import _spawn

    base = base_checkpoint(cache, spec)
    adapter = AdapterSpec(spec)
    root = cache / adapter.name / adapter.save_dir
    with pending_builds(cache, [adapter], ".bench-build.lock") as todo:
        if todo:
            print(f"writing the benchmark adapter to {root} ...", file=sys.stderr)
            root.mkdir(parents=True)
            _spawn(adapter.world_size, "save", [{"spec": adapter, "base_root": str(base), "save": str(root)}])
    return root


def iteration_dir(root: Path) -> Path:
    return root / f"iter_{int((root / 'latest_checkpointed_iteration.txt').read_text()):07d}"


def run(argv: list[str], env: dict[str, str], log: Path) -> Sample:
    """Wall time and peak RSS of one child process (which must succeed). `posix_spawn` (vfork) so that the
    child's peak RSS does not start from a copy of this process."""
    with open(log, "wb") as err, open(os.devnull, "wb") as null:
        actions = [(os.POSIX_SPAWN_DUP2, null.fileno(), 1), (os.POSIX_SPAWN_DUP2, err.fileno(), 2)]
        start = time.perf_counter()
        pid = os.posix_spawn(shutil.which(argv[0]) or argv[0], argv, env, file_actions=actions)
        _, status, usage = os.wait4(pid, 0)
        wall = time.perf_counter() - start
    if os.waitstatus_to_exitcode(status):
        raise SystemExit(f"{' '.join(argv)} failed ({os.waitstatus_to_exitcode(status)}):\n{log.read_text()}")
    return Sample(wall, usage.ru_utime + usage.ru_stime, usage.ru_maxrss * 1024)


def remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path)
    elif path.exists():
        path.unlink()


def measure(tools: list[Tool], scratch: Path, runs: int, warmup: int) -> dict[str, list[Sample]]:
    """Every tool once per round, in turn, each round starting with the next tool (whichever runs after
    another's output was deleted pays for it on some VMs); the warm-up rounds are dropped."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}  # as installed: .pyc cached
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    samples: dict[str, list[Sample]] = {t.name: [] for t in tools}
    for round_ in range(warmup + runs):
        for tool in tools[round_ % len(tools) :] + tools[: round_ % len(tools)]:  # each round starts elsewhere
            out = scratch / "out"
            remove(out)
            os.sync()
            sample = run(tool.argv(out), env, scratch / "stderr.log")
            remove(out)
            if round_ >= warmup:
                samples[tool.name].append(sample)
            print(
                f"round {round_}: {tool.name}: {sample.wall:.2f} s wall, {sample.cpu:.2f} s CPU, "
                f"{sample.rss / 1e9:.2f} GB",
                file=sys.stderr,
            )
    return samples


def table(samples: dict[str, list[Sample]], baseline: str) -> str:
    floor = statistics.median(s.wall for s in samples[baseline])
    lines = [
        "| tool | median wall | × `cp -r` | median CPU (user + sys) | peak RSS | runs |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for name, found in samples.items():
        wall = statistics.median(s.wall for s in found)
        cpu = statistics.median(s.cpu for s in found)
        rss = max(s.rss for s in found)
        lines.append(
            f"| {name} | {wall:.2f} s | {wall / floor:.2f}× | {cpu:.2f} s | {rss / 1e9:.2f} GB | {len(found)} |"
        )
    return "\n".join(lines)


def size_of(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def largest_tensor(root: Path) -> int:
    """Bytes of the checkpoint's largest single (global, per-layer) tensor."""
    from offline_bridge.config.inputs import open_checkpoint

    reader, _ = open_checkpoint(root)
    with reader:
        largest = 0
        for info in reader.tensors.values():
            numel = 1
            for n in info.shape[1:] if info.key.startswith("decoder.layers.") else info.shape:
                numel *= n
            largest = max(largest, numel * info.dtype.itemsize)
    return largest


# --------------------------------------------------------------------------- the anchors (run in a child)


def anchor_dcp(iter_dir: Path, out: Path) -> None:
    """PyTorch's own consolidation: every tensor of the DCP checkpoint, loaded without a process group."""
    import torch
    from safetensors.torch import save_file
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.default_planner import _EmptyStateDictLoadPlanner
    from torch.distributed.checkpoint.state_dict_loader import _load_state_dict

    state: dict = {}
    _load_state_dict(state, FileSystemReader(str(iter_dir)), planner=_EmptyStateDictLoadPlanner(), no_dist=True)
    out.mkdir(parents=True)
    save_file({k: v for k, v in _flat(state).items() if isinstance(v, torch.Tensor)}, str(out / "model.safetensors"))


def anchor_mcore(iter_dir: Path, out: Path) -> None:
    """megatron-core's `load_plain_tensors` (a single process, gloo world of one)."""
    import torch
    from megatron.core import dist_checkpointing
    from safetensors.torch import save_file

    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(free_port()))
    torch.distributed.init_process_group("gloo", rank=0, world_size=1)
    state = dist_checkpointing.load_plain_tensors(str(iter_dir))
    out.mkdir(parents=True)
    save_file({k: v for k, v in _flat(state).items() if isinstance(v, torch.Tensor)}, str(out / "model.safetensors"))
    torch.distributed.destroy_process_group()


def _flat(state: dict, prefix: str = "") -> dict:
    flat = {}
    for key, value in state.items():
        if isinstance(value, dict):
            flat.update(_flat(value, f"{prefix}{key}."))
        else:
            flat[prefix + key] = value
    return flat


ANCHORS = {"dcp": anchor_dcp, "mcore": anchor_mcore}


# --------------------------------------------------------------------------- main


def tools_for(args: argparse.Namespace) -> tuple[list[Tool], Path, str]:
    """The tools to compare, the directory `cp -r` copies, and a one-line description."""
    python = [sys.executable]
    bench = [*python, str(Path(__file__).resolve())]
    cli = [*python, "-m", "offline_bridge"]
    workers = ["--workers", str(args.workers)] if args.workers else []
    base = base_checkpoint(args.cache, args.spec)

    def cp(src: Path) -> Tool:
        return Tool("`cp -r`", lambda out: ["cp", "-r", str(src), str(out)])

    def cp_synced(src: Path) -> Tool:  # the same copy, flushed to disk file by file as convert does
        script = 'cp -r "$1" "$2" && find "$2" -type f -exec sync {} +'
        return Tool("`cp -r`, then `sync` of each file", lambda out: ["sh", "-c", script, "sh", str(src), str(out)])

    def cp_guaranteed(src: Path) -> Tool:  # what convert guarantees: bytes on disk and a sha256 of every byte
        # openssl's sha256 uses the CPU's SHA instructions, as Python's hashlib does (coreutils' is 7x slower)
        script = 'cp -r "$1" "$2" && find "$2" -type f -exec sync {} + && find "$2" -type f -exec openssl sha256 {} +'
        return Tool(
            "`cp -r`, `sync`, `openssl sha256` of each file", lambda out: ["sh", "-c", script, "sh", str(src), str(out)]
        )

    def convert(name: str, *extra: str) -> Tool:
        return Tool(name, lambda out: [*cli, "convert", str(base), str(out), "--quiet", *workers, *extra])

    if args.export_adapter:
        adapter = adapter_checkpoint(args.cache, args.spec)
        export = Tool(
            "`offline-bridge export-adapter`",
            lambda out: [*cli, "export-adapter", str(adapter), str(out), "--quiet", "--base", str(base)],
        )
        return [cp(adapter), export], adapter, f"LoRA adapter ({AdapterSpec(args.spec).name.split('--')[0]})"
    if args.lora:
        adapter = adapter_checkpoint(args.cache, args.spec)
        merge = convert("`offline-bridge convert --adapter` (merge)", "--adapter", str(adapter), "--device", "cpu")
        plain = convert("`offline-bridge convert`")
        return [cp(base), cp_guaranteed(base), plain, merge], base, "base + LoRA (qkv, proj, fc1, fc2)"
    iter_dir = iteration_dir(base)
    anchors = [
        Tool(
            "PyTorch DCP `_load_state_dict` + `save_file`",
            lambda out: [*bench, "--anchor", "dcp", str(iter_dir), str(out)],
        ),
        Tool(
            "megatron-core `load_plain_tensors` + `save_file`",
            lambda out: [*bench, "--anchor", "mcore", str(iter_dir), str(out)],
        ),
    ]
    floors = [cp(base), cp_synced(base), cp_guaranteed(base)]
    return [*floors, *anchors, convert("`offline-bridge convert`")], base, "base checkpoint"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cache", type=Path, default=DEFAULT_CACHE, help=f"checkpoint cache (default {DEFAULT_CACHE})")
    parser.add_argument("--scratch", type=Path, help="where outputs go (default: beside the cache)")
    parser.add_argument("--runs", type=int, default=5, help="timed rounds (default 5)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed rounds first (default 1)")
    parser.add_argument("--workers", type=int, help="offline-bridge --workers (default: its own)")
    parser.add_argument(
        "--layers", type=int, default=SPEC.num_layers, help=f"transformer layers (default {SPEC.num_layers}: 2.25 GB)"
    )
    parser.add_argument("--experts", type=int, help="many small tensors: a DeepSeek-V3 shape with this many experts")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--lora", action="store_true", help="merge cost: convert with and without --adapter")
    mode.add_argument("--export-adapter", action="store_true", help="export-adapter against cp of the adapter")
    mode.add_argument("--anchor", nargs=3, metavar=("NAME", "ITER_DIR", "OUT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.anchor:
        name, iter_dir, out = args.anchor
        ANCHORS[name](Path(iter_dir), Path(out))
        return
    args.cache = args.cache.resolve()
    if args.experts:
        from tools.bench_many import bench_many_tensors

        bench_many_tensors(args)
        return
    args.spec = spec = dataclasses.replace(SPEC, num_layers=args.layers)
    tools, copied, what = tools_for(args)
    scratch = (args.scratch or args.cache / "scratch").resolve()
    scratch.mkdir(parents=True, exist_ok=True)
    samples = measure(tools, scratch, args.runs, args.warmup)
    largest = largest_tensor(base_checkpoint(args.cache, spec))
    print(
        f"{what}: {size_of(copied) / 1e9:.2f} GB; base: {spec.family}, {spec.dtype}, TP{spec.tp} PP{spec.pp}, "
        f"{spec.num_layers} layers, hidden {spec.hidden_size}, largest tensor {largest / 1e9:.3f} GB; "
        f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}; median of {args.runs} runs after "
        f"{args.warmup} warm-up\n"
    )
    print(table(samples, tools[0].name))


if __name__ == "__main__":
    main()
