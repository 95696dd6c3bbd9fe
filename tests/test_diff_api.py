"""The Python `diff()` checks its own tolerances (issue 16): the CLI is not the only caller."""

from __future__ import annotations

from pathlib import Path

import pytest

from offline_bridge.commands.diff import diff
from offline_bridge.errors import OptionError


@pytest.mark.parametrize(
    ("option", "value"), [("atol", -1.0), ("atol", float("nan")), ("rtol", float("inf")), ("rtol", "0.1")]
)
def test_diff_refuses_a_bad_tolerance_before_opening_anything(tmp_path: Path, option: str, value: object) -> None:
    missing = tmp_path / "missing"
    with pytest.raises(OptionError, match=f"--{option}"):
        diff(missing, missing, **{option: value})
