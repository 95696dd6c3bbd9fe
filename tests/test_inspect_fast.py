"""`inspect` on the committed example, no megatron-core fixture: how it reads the marker, how it shows dtypes."""

from __future__ import annotations

from pathlib import Path

import pytest

from offline_bridge.commands.inspection import format_report, inspect_checkpoint

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "tiny-llama"


def test_marker_is_read_through_the_bounded_reader(monkeypatch: pytest.MonkeyPatch) -> None:
    """`metadata.json` is read like `convert` reads it (`readers.marker`), never whole by `read_text`."""
    read_text = Path.read_text

    def refuse_marker(self: Path, *args: object, **kwargs: object) -> str:
        if self.name == "metadata.json":
            raise AssertionError(f"{self} read whole")
        return read_text(self, *args, **kwargs)

    monkeypatch.setattr(Path, "read_text", refuse_marker)
    report = inspect_checkpoint(EXAMPLE)
    assert report["version"]["sharded_backend_version"] == 1


def test_dtype_args_are_shown_by_name() -> None:
    """The example's args hold `params_dtype=torch.bfloat16`: shown as `bfloat16`, not as a record's fields."""
    report = inspect_checkpoint(EXAMPLE)
    assert report["args"]["params_dtype"] == "bfloat16"
    assert "params_dtype=bfloat16," in format_report(report)
