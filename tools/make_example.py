"""(Re)write ``examples/tiny-llama``: a real TP2 PP2 bf16 llama-family Megatron checkpoint.

Run from anywhere: ``python tools/make_example.py``. Needs megatron-core and torch
(CPU is enough); takes ~20–30 s. The result is the save-root layout a converter is
pointed at (``latest_checkpointed_iteration.txt`` + ``iter_0000010/``), under 1 MB.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from tools.megatron_fixtures import FixtureSpec, write_checkpoint  # noqa: E402

EXAMPLE = REPO / "examples" / "tiny-llama"
SPEC = FixtureSpec("llama", tp=2, pp=2, dtype="bf16", vocab_size=256, num_layers=4, hidden_size=64)


def main() -> None:
    """Replace the example directory with a freshly saved checkpoint."""
    shutil.rmtree(EXAMPLE, ignore_errors=True)
    write_checkpoint(SPEC, EXAMPLE)
    size = sum(f.stat().st_size for f in EXAMPLE.rglob("*") if f.is_file())
    print(f"wrote {EXAMPLE} ({SPEC.name}, {size / 1024:.0f} KiB)")


if __name__ == "__main__":
    main()
