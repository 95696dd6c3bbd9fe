"""Safe file access shared by every stage: bounded small reads, open handles, shape checks."""

__all__: list[str] = []
