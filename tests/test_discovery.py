"""Which iteration directory a CKPT_DIR argument means, as Megatron-LM's training loop lays them out."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from offline_bridge.errors import CheckpointError, OptionError
from offline_bridge.readers.discovery import find_iteration_dir


@pytest.fixture
def root(tmp_path: Path) -> Path:
    for name in ("iter_0000100", "iter_0000200", "release"):
        (tmp_path / name).mkdir()
    (tmp_path / "latest_checkpointed_iteration.txt").write_text("100\n")
    return tmp_path


def test_tracker_decides(root: Path) -> None:
    assert find_iteration_dir(root) == root / "iter_0000100"


def test_tracker_may_say_release(root: Path) -> None:
    (root / "latest_checkpointed_iteration.txt").write_text("release")
    assert find_iteration_dir(root) == root / "release"


def test_iteration_option(root: Path) -> None:
    assert find_iteration_dir(root, 200) == root / "iter_0000200"
    assert find_iteration_dir(root, "release") == root / "release"


def test_missing_iteration_lists_present(root: Path) -> None:
    with pytest.raises(CheckpointError, match=r"iteration 300 not found \(iterations present: 100, 200, release\)"):
        find_iteration_dir(root, 300)


def test_iteration_directory_itself(root: Path) -> None:
    assert find_iteration_dir(root / "iter_0000200") == root / "iter_0000200"


def test_without_tracker_takes_the_largest(root: Path) -> None:
    (root / "latest_checkpointed_iteration.txt").unlink()
    assert find_iteration_dir(root) == root / "iter_0000200"


def test_not_a_save_root(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="not a Megatron save directory"):
        find_iteration_dir(tmp_path)


def test_only_names_megatron_writes(root: Path) -> None:
    """`iter_{n:07d}` only: other zero paddings and non-ASCII digits (int() reads '٣') name no iteration."""
    for name in ("iter_00000300", "iter_٠٠٠٠٤٠٠", "iter_0000５00"):
        (root / name).mkdir()
    with pytest.raises(CheckpointError, match=r"iterations present: 100, 200, release\)"):
        find_iteration_dir(root, 300)


@pytest.mark.parametrize("text", ["²", "٣", "1" * 5000, "+100", "1_00", "100 200"], ids=range(6))
def test_tracker_holding_no_ascii_number(root: Path, text: str) -> None:
    (root / "latest_checkpointed_iteration.txt").write_text(text)
    with pytest.raises(CheckpointError, match="neither an iteration number nor 'release'") as error:
        find_iteration_dir(root)
    assert len(str(error.value)) < len(str(root)) + 250  # the content is quoted, clipped


@pytest.mark.parametrize("value", ["²", "٣", "1" * 5000, "-1", ""], ids=range(5))
def test_iteration_option_holding_no_ascii_number(root: Path, value: str) -> None:
    with pytest.raises(OptionError, match="neither an iteration number"):
        find_iteration_dir(root, value)


def test_tracker_is_read_as_a_small_regular_file(root: Path) -> None:
    tracker = root / "latest_checkpointed_iteration.txt"
    tracker.unlink()
    os.mkfifo(tracker)
    with pytest.raises(CheckpointError, match="not a regular file"):
        find_iteration_dir(root)
