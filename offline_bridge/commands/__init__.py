"""The user-facing commands (convert, export-adapter, inspect, diff, verify) and the CLI around them."""

__all__: list[str] = []
