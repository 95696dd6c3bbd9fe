"""`python -m offline_bridge` is the `offline-bridge` command."""

from .cli import entry

entry()
