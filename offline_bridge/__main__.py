"""`python -m offline_bridge ...`: the same command line as `offline-bridge`."""

from .cli import main

main()
