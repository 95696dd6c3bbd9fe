"""Bounds a pickle must keep before the C unpickler runs it: memo indices in sequence, nesting not too deep,
no more copying than its size allows. Our own code: no library checks this (pickletools only lists opcodes).

The C unpickler allocates on a pickle's say-so (a memo index of 1e9 grows its table to 16 GB); hashes dict
keys and set members as it inserts them, and a tuple nested a million deep overflows the C stack there (a
crash, not an exception); and copies what BUILD and the allowed callables are given (a state dict, the
items of a set, the bytes of a BytesIO): handing the same memoized object to them again and again asks for
memory and time out of proportion to the file. So the opcodes are walked once first, without building
anything, simulating the stack with each item's nesting depth and size, and what BUILD and the calls would
copy is counted against `COPY_FACTOR` times the pickle's size. Objects built by calling an allowed class
(`frozenset(...)`, `torch.Size(...)`) are checked by `hash_depth` on their arguments, and the object
unpickled by `check_nesting` (a list can be made to contain itself, or be deepened after it was nested).
"""

from __future__ import annotations

import gc
import io
import pickletools
from typing import Any

__all__ = ["MAX_NESTING", "HashDepth", "check_nesting", "check_opcodes"]

MAX_NESTING = 100  # DCP metadata and Megatron's common state nest about 10 deep
COPY_FACTOR = 4  # items copied by BUILD and calls, per byte of pickle (DCP metadata: under 1)
_MEMO_PUTS = ("PUT", "BINPUT", "LONG_BINPUT")
_MEMO_GETS = ("GET", "BINGET", "LONG_BINGET")
_MUTATORS = ("APPEND", "APPENDS", "SETITEM", "SETITEMS", "ADDITEMS")  # add to the container below them
_CALLS = ("REDUCE", "NEWOBJ", "NEWOBJ_EX", "OBJ", "INST")  # copy what they are given, as BUILD does
_PUT, _MEMOIZE, _GET, _PUSH_MARK, _DUP, _MUTATE, _CALL, _STATE, _MAKE = range(9)


def _kind(opcode: pickletools.OpcodeInfo) -> tuple[int, int, bool, int]:
    """How an opcode moves the stack: (kind, items it pops below any mark, pops to a mark, items it pushes)."""
    name, before = opcode.name, opcode.stack_before
    marked = pickletools.markobject in before
    below = before.index(pickletools.markobject) if marked else len(before)
    kinds = {"MEMOIZE": _MEMOIZE, "MARK": _PUSH_MARK, "DUP": _DUP}
    kind = _PUT if name in _MEMO_PUTS else _GET if name in _MEMO_GETS else kinds.get(name, _MAKE)
    kind = _MUTATE if name in _MUTATORS else _CALL if name in _CALLS else _STATE if name == "BUILD" else kind
    return kind, below, marked, len(opcode.stack_after)


_KINDS = {opcode.name: _kind(opcode) for opcode in pickletools.opcodes}
# What nothing can add to (the unpickler fails first): one shared immutable cell per size, not a cell each
_IMMUTABLE = {"int", "int_or_bool", "bool", "float", "None", "str", "bytes", "bytes_or_str", "tuple"}
_ATOMS = frozenset(
    op.name
    for op in pickletools.opcodes
    if not op.stack_before and [t.name for t in op.stack_after] in [[name] for name in _IMMUTABLE]
)


def check_opcodes(data: bytes | memoryview) -> None:
    """Raise ValueError for a memo index beyond the opcodes so far (pickles number their memo entries 0, 1,
    2, ..., one opcode each at least), a length field running past the data (genops reads no further than
    there is), objects nested deeper than `MAX_NESTING`, or more copying than `COPY_FACTOR` allows."""
    enabled = gc.isenabled()
    gc.disable()  # the walk makes a million cells and frees none: collecting them again and again is quadratic
    try:
        _walk(data)
    finally:
        if enabled:
            gc.enable()


def _walk(data: bytes | memoryview) -> None:
    """The opcodes of ``data``, simulated. Each stack item is a cell [depth, size, items]; the memo holds the
    same cells, so that a container filled after it was memoized is seen at its full size wherever it is used."""
    stack: list[list] = []
    atoms: dict[int, tuple[int, int, tuple]] = {}  # size -> the shared cell of constants that size
    marks: list[int] = []  # where each MARK is in the stack, as the unpickler keeps them
    memo: dict[int, list] = {}
    budget = COPY_FACTOR * len(data) + (1 << 16)
    push = stack.append
    for count, (opcode, arg, _) in enumerate(pickletools.genops(io.BytesIO(data))):
        kind, below, marked, pushed = _KINDS[opcode.name]
        if kind == _GET:
            push(memo[arg])  # KeyError for an index never set
        elif kind == _MAKE and not (below or marked):  # a constant, a global, an empty container
            if pushed:
                size = max(1, len(arg)) if isinstance(arg, str | bytes) else 1
                push(atoms.setdefault(size, (0, size, ())) if opcode.name in _ATOMS else [0, size, []])
        elif kind == _PUSH_MARK:
            marks.append(len(stack))
        elif len(stack) - (marks[-1] if marks and not marked else 0) < (below or kind in (_PUT, _MEMOIZE, _DUP)):
            raise ValueError(f"{opcode.name} with too little on the stack")
        elif kind in (_PUT, _MEMOIZE):
            if kind == _PUT and arg > count:
                raise ValueError(f"memo index {arg} at opcode {count} is out of sequence")
            memo[len(memo) if kind == _MEMOIZE else arg] = stack[-1]
        elif kind == _DUP:
            stack.append(stack[-1])
        else:
            taken = _take(stack, marks, below, marked, opcode.name)
            if kind in (_CALL, _STATE):
                budget -= sum([c[1] + sum([k[1] for k in c[2]]) for c in taken[kind == _STATE :]])
                if budget < 0:
                    raise ValueError("the pickle copies its objects over and over (more than its size allows)")
            if kind in (_MUTATE, _STATE):  # the object below the others now holds them
                cell = taken[0]
                if isinstance(cell, tuple):
                    raise ValueError(f"{opcode.name} adds to a constant")
                cell[0] = max(cell[0], 1 + max([c[0] for c in taken[1:]], default=-1))
                cell[1] += sum(c[1] for c in taken[1:]) if kind == _STATE else len(taken) - 1
                cell[2].extend(taken[1:])
            else:
                size = max(1, len(arg) if isinstance(arg, str | bytes) else len(taken))
                cell = [1 + max([c[0] for c in taken], default=-1), size, taken]
            if cell[0] > MAX_NESTING:
                raise ValueError(f"objects nested more than {MAX_NESTING} deep")
            if pushed:
                push(cell)


def _take(stack: list[list], marks: list[int], below: int, marked: bool, name: str) -> list[list]:
    """Pop what an opcode consumes: everything down to a mark if ``marked``, then ``below`` more items; the
    deepest first."""
    taken: list[list] = []
    if marked:
        if not marks:
            raise ValueError(f"{name} without a MARK")
        at = marks.pop()
        taken = stack[at:]
        del stack[at:]
        if len(stack) - (marks[-1] if marks else 0) < below:
            raise ValueError(f"{name} with too little on the stack")
    if below:
        taken[:0] = stack[-below:]
        del stack[-below:]
    return taken


class HashDepth:
    """How deep the tuples and frozensets an unpickler builds nest (what hashing them recurses through),
    each measured once and remembered (the objects are kept, so their ids stay theirs)."""

    def __init__(self) -> None:
        self._known: dict[int, tuple[Any, int]] = {}

    def check_items(self, *args: Any) -> None:
        """Raise ValueError if an item of an argument (a member, a key, a pair) nests too deep to hash."""
        for arg in args:
            if isinstance(arg, list | tuple | set | frozenset | dict):
                for item in arg:
                    self._measure(item)

    def _measure(self, root: Any) -> None:
        todo = [(root, False)]
        while todo:
            obj, expanded = todo.pop()
            if not isinstance(obj, tuple | frozenset) or (id(obj) in self._known and not expanded):
                continue
            if not expanded:
                todo.append((obj, True))
                todo.extend((item, False) for item in obj)
                continue
            depth = 1 + max((self._known[id(i)][1] for i in obj if id(i) in self._known), default=0)
            if depth > MAX_NESTING:
                raise ValueError(f"objects nested more than {MAX_NESTING} deep")
            self._known[id(obj)] = (obj, depth)


def check_nesting(value: Any) -> None:
    """Raise ValueError if ``value``'s containers nest more than `MAX_NESTING` deep (or in a cycle)."""
    depths: dict[int, int] = {}
    todo: list[tuple[Any, list[Any] | None]] = [(value, None)]
    on_path: set[int] = set()
    while todo:
        obj, kids = todo.pop()
        if kids is not None:  # all children done
            on_path.discard(id(obj))
            depths[id(obj)] = depth = 1 + max((depths[id(k)] for k in kids), default=0)
            if depth > MAX_NESTING:
                raise ValueError(f"objects nested more than {MAX_NESTING} deep")
        elif id(obj) not in depths:
            if id(obj) in on_path:
                raise ValueError("objects nested in a cycle")
            on_path.add(id(obj))
            kids = _children(obj)
            todo.append((obj, kids))
            todo.extend((k, None) for k in kids if id(k) not in depths)


def _children(obj: Any) -> list[Any]:
    if isinstance(obj, dict):
        return [*obj.keys(), *obj.values()]
    if isinstance(obj, list | tuple | set | frozenset):
        return list(obj)
    attributes = getattr(obj, "__dict__", None)  # records, argparse.Namespace
    return list(attributes.values()) if isinstance(attributes, dict) else []
