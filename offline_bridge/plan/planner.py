"""The one planner: a family's tables walked against a checkpoint's metadata, with the hooks `convert`, the
quantizer export and `export-adapter` build their steps with (resolve a source, attach an adapter, add a
step), and one validation of the result that names every missing, unused and duplicate tensor at once."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import replace

from ..dtypes import DType
from ..errors import CheckpointError
from ..families import Family
from ..readers.base import CheckpointReader, is_model_key, is_quantizer_key
from .adapters import ADAPTER, Find, find_delta
from .layout import layout
from .rules import Dims, Rule
from .rules.registry import rule_ref
from .schema import Delta, Lora, Plan, RuleRef, Source, Step, Target
from .sources import expand, finder, missing, packs_experts, resolve

__all__ = ["Planner", "build_plan"]

SHOWN = 5  # names listed per problem before "and N more"


def _listed(names: list[str]) -> str:
    more = f" and {len(names) - SHOWN} more" if len(names) > SHOWN else ""
    return ", ".join(names[:SHOWN]) + more


class Planner:
    """One planning pass of ``family`` over ``reader``: `rules` to walk, `resolve` / `find` / `attach` to
    look tensors up, `add` to make steps, and `checked` to validate them all at once."""

    def __init__(self, family: Family, reader: CheckpointReader, dims: Dims) -> None:
        self.family, self.reader, self.dims = family, reader, dims
        self.steps: list[Step] = []
        self._missing: list[str] = []
        self._adapters = any(ADAPTER in key for key in reader.tensors)  # none: no tensor needs looking for one
        # a rule's data by its id (rules need not be hashable); the rule is kept too, so its id is never reused
        self._refs: dict[int, tuple[Rule, RuleRef]] = {}

    def rules(self) -> list[tuple[Rule, dict[str, int]]]:
        """Every (rule, placeholder values) of the family's tables for this model, in HF state-dict order."""
        return expand(self.family, self.dims)

    def find(self, index: dict[str, int]) -> Find:
        """Tensors by table pattern at fixed placeholder values (None when absent)."""
        return finder(self.reader, index, self.dims)

    def resolve(self, rule: Rule, index: dict[str, int]) -> Source | None:
        """The rule's tensor at ``index``; a missing one is noted for `checked` and gives None."""
        source = resolve(self.reader, rule, index, self.dims)
        if source is None:
            self._missing.append(missing(self.reader, rule, index, self.dims))
        return source

    def attach(self, rule: Rule, index: dict[str, int], source: Source | None, lora: Lora | None) -> Delta | None:
        """The adapter on the rule's tensor at ``index`` (on every packed expert), if the checkpoint holds one;
        checked against ``source`` when it is known (adapter export reads no base)."""
        if not self._adapters:
            return None
        if packs_experts(rule, index):
            return self._stacked_delta(rule, index, lora)
        patterns = (source.pattern,) if source is not None else rule.sources
        find = self.find(index)
        return next((d for p in patterns if (d := find_delta(find, p, lora, self.dims, source)) is not None), None)

    def _stacked_delta(self, rule: Rule, index: dict[str, int], lora: Lora | None) -> Delta | None:
        """The expert adapters on a packed parameter: expert e's `B_e @ A_e` lands on its rows of the stack."""
        deltas = []
        for e in range(self.dims.num_experts):
            expert = {**index, "e": e}
            base = resolve(self.reader, rule, expert, self.dims)
            deltas.append(find_delta(self.find(expert), rule.sources[0], lora, self.dims, base))
        found = [d for d in deltas if d is not None]
        if not found:
            return None
        if len(found) != len(deltas) or any(d.layout != "plain" or d.magnitude is not None for d in found):
            raise CheckpointError(
                f"{found[0].sources()[0].key}: packed experts take plain LoRA adapters on every expert; "
                "use a per-expert family (e.g. --model-type qwen3_next) for this adapter"
            )
        return replace(found[0], pieces=tuple(d.pieces[0] for d in found), layout="stacked")

    def add(self, rule: Rule, source: Source, names: Iterable[str], dtype: DType, delta: Delta | None = None) -> Step:
        """A step: ``source`` (plus ``delta``) through ``rule`` into HF tensors ``names`` of ``dtype``."""
        shapes = rule.target_shapes(source.shape, self.dims, source.key)
        targets = tuple(Target(name, tuple(shape), dtype) for name, shape in zip(names, shapes, strict=True))
        if id(rule) not in self._refs:
            self._refs[id(rule)] = (rule, rule_ref(rule))
        step = Step(self._refs[id(rule)][1], source, targets, delta)
        self.steps.append(step)
        return step

    def checked(self, owned: Callable[[str], bool], what: str, hint: str = "") -> list[Step]:
        """The steps, once every checkpoint tensor ``owned`` selects is used by one, every rule found its
        tensor and no HF name repeats; else one `CheckpointError` naming every problem."""
        sources = [s for step in self.steps for s in (step.source, *(step.delta.sources() if step.delta else ()))]
        used = {key for source in sources for key, _ in source.parts}
        unused = sorted(key for key in self.reader.tensors if owned(key) and key not in used)
        counts = Counter(t.name for step in self.steps for t in step.targets)
        duplicates = sorted(name for name, n in counts.items() if n > 1)
        problems = [
            *([_listed(self._missing)] if self._missing else []),
            *([f"{what} the {self.family.name} mapping does not use: {_listed(unused)}"] if unused else []),
            *([f"the {self.family.name} mapping gives duplicate HF names {_listed(duplicates)}"] if duplicates else []),
        ]
        if problems:
            raise CheckpointError(f"{self.reader.path}: {'; '.join(problems)}{'; ' + hint if hint else ''}")
        return self.steps


def _converted(tensor: str) -> bool:
    return is_model_key(tensor) and not is_quantizer_key(tensor)


def build_plan(
    family: Family, reader: CheckpointReader, dims: Dims, dtype: DType, max_shard_size: int, lora: Lora | None = None
) -> Plan:
    """The conversion plan: every table rule's tensor (trimmed, with its adapter) into its HF tensors."""
    planner = Planner(family, reader, dims)
    for rule, index in planner.rules():
        source = planner.resolve(rule, index)
        if source is None:
            continue
        delta = planner.attach(rule, index, source, lora)
        source, delta = rule.row_orders(source, delta, dims, getattr(reader.args, "tensor_model_parallel_size", None))
        rule.check(source.shape, dims, source.key)
        rows = rule.rows(source.shape, dims)
        if rows < source.shape[0]:  # read only what is kept (vocab trim); too few rows: `add` raises
            (key, box), *more = source.parts
            axis = len(box) - len(source.shape)
            if more:
                raise CheckpointError(f"{key}: cannot trim rows of a tensor saved in parts")
            box = (*box[:axis], (0, rows), *box[axis + 1 :])
            source = replace(source, parts=((key, box),), shape=(rows, *source.shape[1:]))
        planner.add(rule, source, (t.format(**index) for t in rule.targets), dtype, delta)
    steps = planner.checked(_converted, "checkpoint tensors", "pass the right --model-type or --hf-config")
    if lora is not None and not any(step.delta for step in steps):
        raise CheckpointError(f"{reader.path}: LoRA settings were given but the checkpoint holds no adapter tensors")
    steps, files = layout(steps, max_shard_size)
    return Plan(tuple(steps), tuple(files), dtype, dims)
