"""The safe unpickler and torch.save archive reading used by the readers: no pickle runs code here. Our own,
not `torch.load(weights_only=True)`, which needs torch, reads storages whole and lets a pickle allocate."""

__all__: list[str] = []
