"""Pure planning: the plan's data types, the rules that map checkpoint tensors to HF tensors, and the planner."""

__all__: list[str] = []
