"""Run in every Ray worker of tests/test_ray.py (`worker_process_setup_hook`): the first worker to finish an
output file dies right after (os._exit, as a lost node or an OOM kill would), once per marker file."""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["die_once"]


def die_once() -> None:
    from offline_bridge.write import output_files

    marker = Path(os.environ["OFFLINE_BRIDGE_DIE_ONCE"])
    flush = output_files.OutputFiles._flush

    def flush_then_die(self: output_files.OutputFiles, name: str) -> None:
        flush(self, name)
        try:
            descriptor = os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            return
        os.write(descriptor, f"{os.getpid()} {name}".encode())
        os.close(descriptor)
        os._exit(1)

    output_files.OutputFiles._flush = flush_then_die
