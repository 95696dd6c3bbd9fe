"""Which iteration directory a CKPT_DIR argument means, as Megatron-LM's training loop lays them out."""

from __future__ import annotations

from pathlib import Path

import pytest

from offline_bridge.discovery import find_iteration_dir
from offline_bridge.errors import CheckpointError


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
