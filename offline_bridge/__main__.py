"""`python -m offline_bridge` is the `offline-bridge` command."""

from .commands.cli import entry

entry()
