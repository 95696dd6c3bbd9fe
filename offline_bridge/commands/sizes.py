"""Sizes as a user writes them on the command line (`--max-shard-size 5GB`)."""

from __future__ import annotations

from ..errors import OptionError

__all__ = ["parse_size"]

_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}


def parse_size(text: str | int) -> int:
    """`5GB` → 5·10⁹ (decimal, as transformers counts); `KiB`/`MiB`/`GiB` are binary."""
    if isinstance(text, int):
        return text
    value = text.strip().upper()
    number = value.rstrip("KMGTIB")
    unit = value[len(number) :]
    try:
        return int(float(number) * _UNITS[unit])
    except (KeyError, ValueError):
        raise OptionError(f"invalid size {text!r}; use e.g. 5GB, 500MB or 2GiB") from None
