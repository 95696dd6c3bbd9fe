"""Write ``tests/data/zarr/``: a real megatron-core 0.15 zarr checkpoint, its torch_dist twin and Megatron's logits.

Run by hand, once (CI never runs it; the output is committed):

    python tools/make_zarr_fixture.py [--venv /tmp/offline-bridge-zarr-venv] [--out tests/data/zarr]

megatron-core 0.16 dropped the zarr backend, so the zarr save runs in a separate virtualenv with
``megatron-core==0.15.*``, ``zarr<3``, ``tensorstore`` and the CPU ``torch==2.13.0`` (created on first use).
Steps (the Megatron code is in ``tools/zarr_megatron.py``):

1. 0.15, 4 ranks: build a TP2 PP2 qwen3-like GPT in bf16 and ``dist_checkpointing.save(...,
   sharded_strategy=("zarr", 1))`` like Megatron-LM's training loop -> ``zarr_ckpt/``.
2. 0.15, 1 rank: ``load_plain_tensors`` of that checkpoint -> every tensor in full (work dir only), and a
   TP1 reload through ``dist_checkpointing.load`` + forward -> ``reference.pt``.
3. 0.16.1 (this environment), 4 ranks: the same TP2 PP2 model with those tensors placed shard by shard,
   saved as torch_dist -> ``torch_dist_ckpt/`` (0.15's own torch_dist save hangs on CPU).
4. 0.16.1, 1 rank: TP1 reload of the twin + forward must give ``reference.pt``'s logits.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
HELPER = ROOT / "tools" / "zarr_megatron.py"
VENV_PACKAGES = (["torch==2.13.0"], ["megatron-core==0.15.*", "zarr<3", "tensorstore"])
MAX_BYTES = 1_000_000
OUTPUTS = ("zarr_ckpt", "torch_dist_ckpt", "reference.pt")

README = """\
# zarr test data

Written by `python tools/make_zarr_fixture.py` (by hand, not in CI); used by `tests/test_zarr.py`.

| path | what |
|---|---|
| `zarr_ckpt/` | a Megatron save root written by **megatron-core {mcore015}** (`zarr {zarr}`, `tensorstore {tensorstore}`, torch {torch015}) on CPU with `dist_checkpointing.save(state, "iter_0000020", sharded_strategy=("zarr", 1))`, 4 ranks (TP2 PP2, gloo) |
| `torch_dist_ckpt/` | the same weights saved as torch_dist by **megatron-core {mcore016}** (torch {torch016}), also TP2 PP2 |
| `reference.pt` | `{{"input_ids": [2, 12] int64, "logits": [2, 12, 256] fp32}}`: Megatron 0.15's forward after a TP1 reload of `zarr_ckpt` with `dist_checkpointing.load` (bf16 weights widened to fp32) |

Model: qwen3-like GPT, local (non-TE) layer spec: 2 layers, hidden 64, 8 heads, 2 query groups, head dim 8,
SwiGLU ffn 96, RMSNorm (eps 1e-6, norm weights 1 + 0.3·randn), qk_layernorm, rope base 1e6, vocab 256
(padded 256), untied output layer, everything **bf16**. The common state holds Megatron-LM's `args`
(megatron-core <= 0.15 argument names: `norm_epsilon`, `apply_layernorm_1p`), `checkpoint_version` 3.0,
`iteration` 20, and `rng_state` ShardedObjects per (pp, tp) rank.

How the twin was made: Megatron 0.15 read the zarr checkpoint back with `load_plain_tensors`; Megatron
0.16.1 built the same TP2 PP2 model, copied each ShardedTensor's `global_slice()` of those tensors into
it (checked equal afterwards, every key covered) and saved torch_dist. A TP1 reload of the twin in 0.16.1
reproduces the reference logits with max |diff| = {check}.

Files besides this README ({nfiles}, {nbytes} bytes):

```
{listing}
```
"""


def ensure_venv(venv: Path) -> Path:
    """The 0.15 virtualenv's python, created and filled on first use."""
    python = venv / "bin" / "python"
    probe = "import megatron.core, zarr, tensorstore; assert megatron.core.__version__.startswith('0.15.')"
    if python.exists() and subprocess.run([python, "-c", probe], capture_output=True).returncode == 0:
        return python
    subprocess.run([sys.executable, "-m", "venv", "--clear", venv], check=True)
    for packages in VENV_PACKAGES:  # torch first, so that megatron-core does not pull a CUDA build
        subprocess.run([python, "-m", "pip", "install", "-q", *packages], check=True)
    subprocess.run([python, "-c", probe], check=True)
    return python


def versions(python: Path | str, modules: list[str]) -> dict[str, str]:
    code = "import importlib.metadata as m, sys; print(' '.join(m.version(n) for n in sys.argv[1:]))"
    out = subprocess.run([python, "-c", code, *modules], check=True, capture_output=True, text=True).stdout
    return dict(zip(modules, out.split()))


def run(python: Path | str, task: str, work: Path) -> None:
    start = time.monotonic()
    done = subprocess.run([python, HELPER, task, work], capture_output=True, text=True)
    if done.returncode:
        sys.stderr.write(done.stdout[-4000:] + done.stderr[-8000:])
        raise SystemExit(f"{task} failed")
    print(f"{task}: {time.monotonic() - start:.1f}s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--venv", type=Path, default=Path(tempfile.gettempdir()) / "offline-bridge-zarr-venv")
    parser.add_argument("--out", type=Path, default=ROOT / "tests" / "data" / "zarr")
    parser.add_argument("--work", type=Path, help="keep intermediate files here (default: a temporary directory)")
    options = parser.parse_args()

    start = time.monotonic()
    python = ensure_venv(options.venv)
    print(f"venv {options.venv}: {time.monotonic() - start:.1f}s")
    with tempfile.TemporaryDirectory(prefix="zarr-fixture-") as tmp:
        work = options.work or Path(tmp)
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir(parents=True)
        run(python, "save-zarr", work)
        run(python, "dump", work)
        run(sys.executable, "save-torch-dist", work)
        run(sys.executable, "check", work)
        out = options.out
        shutil.rmtree(out, ignore_errors=True)
        out.mkdir(parents=True)
        for name in OUTPUTS:
            (shutil.copytree if (work / name).is_dir() else shutil.copy2)(work / name, out / name)
        check = (work / "check.txt").read_text().strip()
    files = sorted(p for p in out.rglob("*") if p.is_file())
    nbytes = sum(p.stat().st_size for p in files)
    old = versions(python, ["megatron-core", "zarr", "tensorstore", "torch"])
    new = versions(sys.executable, ["megatron-core", "torch"])
    listing = "\n".join(f"{p.stat().st_size:>8}  {p.relative_to(out).as_posix()}" for p in files)
    (out / "README.md").write_text(
        README.format(
            mcore015=old["megatron-core"],
            zarr=old["zarr"],
            tensorstore=old["tensorstore"],
            torch015=old["torch"],
            mcore016=new["megatron-core"],
            torch016=new["torch"],
            check=check,
            nfiles=len(files),
            nbytes=nbytes,
            listing=listing,
        )
    )
    print(f"{out}: {len(files)} files, {nbytes} bytes, {time.monotonic() - start:.1f}s in all")
    if nbytes > MAX_BYTES:
        raise SystemExit(f"test data is {nbytes} bytes, over the {MAX_BYTES} budget")


if __name__ == "__main__":
    main()
