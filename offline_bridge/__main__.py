"""`python -m offline_bridge` is the `offline-bridge` command."""

from .cli import main

main(prog_name="offline-bridge")
