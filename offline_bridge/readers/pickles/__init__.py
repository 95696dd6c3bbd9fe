"""The safe unpickler and torch.save archive reading used by the readers: no pickle runs code here."""

__all__: list[str] = []
