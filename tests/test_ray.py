"""`convert --ray` (issue 21): the parts as Ray tasks on a 2-node cluster on this machine
(`ray.cluster_utils.Cluster`), byte-identical to a plain run; a task whose worker dies is retried and keeps
the files the dead one completed."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import ROOT
from split_runs import EXAMPLE, SHARD, tree

from offline_bridge import convert
from offline_bridge.commands.cli import run
from offline_bridge.errors import CheckpointError

ray = pytest.importorskip("ray")  # declared in the test extra; absent only outside the test environment
from ray.cluster_utils import Cluster  # noqa: E402

pytestmark = pytest.mark.slow  # a Ray cluster takes 10-20 s to start on 2 cores


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """Two nodes of one CPU each; every worker runs tests/ray_hooks.die_once. Yields the marker file the
    first dying worker creates."""
    marker = tmp_path_factory.mktemp("ray") / "died"
    nodes = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    nodes.add_node(num_cpus=1)
    path = os.pathsep.join([str(ROOT), str(ROOT / "tests")])
    runtime_env = {
        "env_vars": {"PYTHONPATH": path, "OFFLINE_BRIDGE_DIE_ONCE": str(marker)},
        "worker_process_setup_hook": "ray_hooks.die_once",
    }
    ray.init(address=nodes.address, runtime_env=runtime_env, logging_level="ERROR", log_to_driver=False)
    try:
        yield marker
    finally:
        ray.shutdown()
        nodes.shutdown()


def test_parts_on_ray_with_a_worker_killed(cluster: Path, plain: dict[str, bytes], tmp_path: Path) -> None:
    out = convert(EXAMPLE, tmp_path / "out", max_shard_size=SHARD, workers=1, progress=False, ray="")
    assert tree(out) == plain
    pid, file = cluster.read_text().split()
    assert int(pid) != os.getpid() and file.endswith(".safetensors")  # a worker died after writing `file` ...
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # ... its task was retried, and the parts finalized


def test_moe_checkpoint_on_ray(cluster: Path, checkpoints: dict, tmp_path: Path) -> None:
    from conftest import MOE_SPECS

    ckpt = checkpoints[MOE_SPECS[0]]
    expected = tree(convert(ckpt, tmp_path / "plain", max_shard_size="200KB", progress=False))
    assert run(["convert", str(ckpt), str(tmp_path / "out"), "--max-shard-size", "200KB", "--workers", "1",
                "--ray", "-q"]) == 0  # fmt: skip
    assert tree(tmp_path / "out") == expected


def test_a_bad_input_fails_once_with_its_own_error(cluster: Path, tmp_path: Path) -> None:
    """Damaged tensor bytes, found by a task (the metadata the driver planned from is intact): the task's own
    error, once, not a retry loop."""
    ckpt = Path(shutil.copytree(EXAMPLE, tmp_path / "ckpt"))
    victim = ckpt / "iter_0000010" / "__1_0.distcp"
    data = bytearray(victim.read_bytes())
    data[20000] ^= 1  # inside the embedding's record
    victim.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=r"__1_0\.distcp.*CRC-32"):
        convert(ckpt, tmp_path / "out", max_shard_size=SHARD, workers=1, progress=False, ray="", check_crc=True)
    assert not (tmp_path / "out").exists()
