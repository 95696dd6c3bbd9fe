"""The model description: Megatron args, run_config.yaml, the HF config derived from them, and the inputs named."""

__all__: list[str] = []
