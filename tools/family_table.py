"""(Re)write ``formats/families.md``: every registered family's table, from `Family.describe()`.

Run from anywhere: ``python tools/family_table.py``; tests/test_family_registry.py fails while the committed
file differs from what this writes.
"""

from __future__ import annotations

import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from offline_bridge.families import FAMILIES, Family  # noqa: E402

TARGET = REPO / "formats" / "families.md"

HEADER = """# Family tables (generated)

Written by `python tools/family_table.py` from the registered families (`offline_bridge/families/`); do not
edit by hand. Per family: the HF class, how it is inferred from Megatron args (the matching family of
highest priority wins; equal priorities are an error), and its rules in HF state-dict order. Placeholders:
`{i}` layer, `{e}` expert, `{k}` MTP depth (HF layer `{i}` = num_layers + k). Megatron names separated by
`or` are alternatives; a row applies only where its condition holds.
"""


def _code(names: tuple[str, ...], joiner: str) -> str:
    return joiner.join(f"`{n}`" for n in names)


def section(family: Family) -> str:
    inferred = f"inferred from args, priority {family.priority}" if family.detect else "never inferred"
    lines = [
        f"## {family.name}",
        "",
        f"`{family.architecture}` (model_type `{family.model_type}`), {inferred}.",
        "",
        "| table | HF name | ← Megatron | rule | condition |",
        "|---|---|---|---|---|",
    ]
    lines += [
        f"| {row.table} | {_code(row.hf, ', ')} | {_code(row.megatron, ' or ')} | {row.kind} | {row.condition} |"
        for row in family.describe()
    ]
    return "\n".join(lines) + "\n"


def render() -> str:
    return "\n".join([HEADER, *(section(f) for f in FAMILIES.values())])


def main() -> None:
    TARGET.write_text(render())
    print(f"wrote {TARGET} ({len(FAMILIES)} families)")


if __name__ == "__main__":
    main()
