"""The writer stage: safetensors output files, staging, the output lock, the manifest and the step scheduler."""

__all__: list[str] = []
