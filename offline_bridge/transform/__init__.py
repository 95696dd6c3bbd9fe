"""The compute stage: casting, LoRA merge, quantisation and the GPU split, applied to one planned step at a time."""

__all__: list[str] = []
