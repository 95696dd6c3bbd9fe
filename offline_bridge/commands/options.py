"""Range checks of every option, before the checkpoint is read: the same for the CLI and the Python API.

A value out of range would hang (`--workers 10⁹` threads), exhaust memory, or fail deep inside with an
internal error (`--iteration ²`, `--max-shard-size inf`); here it is one line naming the option.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable

from ..errors import OptionError
from ..readers.discovery import iteration_key
from .sizes import parse_size

__all__ = ["MAX_WORKERS", "check_options"]

MAX_WORKERS = 64
MAX_VOCAB_SIZE = 2**31 - 1  # token ids are int32 in every tokenizer we know
MAX_LORA_DIM = 2**16
MAX_SHARD_SIZE = 10**15  # 1 PB: no file system takes larger files
MAX_ITERATION = 10**12  # Megatron names iter_%07d; a trillion steps is far beyond any run
_DEVICE = re.compile(r"auto|cpu|cuda(:[0-9]{1,3})?", re.ASCII)


def _shown(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _integer(low: int, high: int) -> Callable[[str, object], None]:
    def check(option: str, value: object) -> None:
        if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
            raise OptionError(f"{option} must be an integer from {low} to {high}, got {_shown(value)}")

    return check


def _real(low: float | None) -> Callable[[str, object], None]:
    def check(option: str, value: object) -> None:
        try:
            ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
        except OverflowError:  # an int beyond any float
            ok = False
        if not ok or (low is not None and value < low):
            bound = "a finite number" if low is None else f"a finite number >= {low:g}"
            raise OptionError(f"{option} must be {bound}, got {_shown(value)}")

    return check


def _iteration(option: str, value: object) -> None:
    if isinstance(value, int) and not isinstance(value, bool):
        text = str(value)
    else:
        text = value if isinstance(value, str) else ""
    key = iteration_key(text) if text == text.strip() else None  # the rule the tracker file is read by
    if key is None or (key != "release" and int(key) >= MAX_ITERATION):
        raise OptionError(f"{option} must be 'release' or an iteration number (ASCII digits), got {_shown(value)}")


def _shard_size(option: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise OptionError(f"{option} must be a size like 5GB or a number of bytes, got {_shown(value)}")
    try:
        size = parse_size(value)
    except OverflowError:  # inf
        size = -1
    except OptionError as exc:
        raise OptionError(f"{option}: {exc}") from None
    if not 1 <= size <= MAX_SHARD_SIZE:
        raise OptionError(f"{option} must be from 1 byte to 1PB, got {_shown(value)}")


def _device(option: str, value: object) -> None:
    if not isinstance(value, str) or not _DEVICE.fullmatch(value):
        raise OptionError(f"{option} must be auto, cpu or cuda[:N], got {_shown(value)}")


def _choice(*names: str) -> Callable[[str, object], None]:
    def check(option: str, value: object) -> None:
        if not isinstance(value, str) or value not in names:
            raise OptionError(f"{option} must be one of {', '.join(names)}, got {_shown(value)}")

    return check


_CHECKS: dict[str, Callable[[str, object], None]] = {
    "iteration": _iteration,
    "max_shard_size": _shard_size,
    "workers": _integer(1, MAX_WORKERS),
    "vocab_size": _integer(1, MAX_VOCAB_SIZE),
    "lora_alpha": _real(None),
    "lora_dim": _integer(1, MAX_LORA_DIM),
    "device": _device,
    "dtype": _choice("auto", "bf16", "fp16", "fp32"),
    "expert_format": _choice("paramwrapper", "per-expert"),
    "atol": _real(0),
    "rtol": _real(0),
}


def check_options(**options: object) -> None:
    """Raise `OptionError` for the first option out of range; None stands for "not given"."""
    for name, value in options.items():
        if value is not None:
            _CHECKS[name]("--" + name.replace("_", "-"), value)
