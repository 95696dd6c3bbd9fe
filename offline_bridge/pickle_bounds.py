"""Bounds a pickle must keep before the C unpickler runs it: memo indices in sequence, nesting not too deep.

The C unpickler allocates on a pickle's say-so (a memo index of 1e9 grows its table to 16 GB) and hashes
dict keys and set members as it inserts them: a tuple nested a million deep overflows the C stack there
(a crash, not an exception). So the opcodes are walked once first, without building anything, simulating
the stack with each item's nesting depth. Objects built by calling an allowed class (`frozenset(...)`,
`torch.Size(...)`) are checked by `check_nesting` on their arguments. Our own code: pickletools only lists
the opcodes.
"""

from __future__ import annotations

import io
import pickletools
from typing import Any

__all__ = ["MAX_NESTING", "check_nesting", "check_opcodes"]

MAX_NESTING = 100  # DCP metadata and Megatron's common state nest about 10 deep
_MARK = -1
_MEMO_PUTS = ("PUT", "BINPUT", "LONG_BINPUT")
_MEMO_GETS = ("GET", "BINGET", "LONG_BINGET")
_MUTATORS = ("APPEND", "APPENDS", "SETITEM", "SETITEMS", "ADDITEMS", "BUILD")  # change the object below them


class _Stack(list):
    def take(self, before: list[Any]) -> list[int]:
        """Pop what an opcode consumes (``before`` as pickletools describes it), bottom first."""
        taken: list[int] = []
        count = len(before)
        if pickletools.markobject in before:
            while self and self[-1] != _MARK:
                taken.append(self.pop())
            if not self:
                raise ValueError("no MARK on the stack")
            self.pop()
            count = before.index(pickletools.markobject)
        if len(self) < count:
            raise ValueError("stack underflow")
        for _ in range(count):
            taken.append(self.pop())
        return taken[::-1]


def check_opcodes(data: bytes | memoryview) -> None:
    """Raise ValueError for a memo index beyond the opcodes so far (pickles number their memo entries 0, 1,
    2, ..., one opcode each at least), a length field running past the data (genops reads no further than
    there is), or objects nested deeper than `MAX_NESTING`."""
    stack, memo = _Stack(), {}
    for count, (opcode, arg, _) in enumerate(pickletools.genops(io.BytesIO(data))):
        name = opcode.name
        if name in _MEMO_PUTS or name == "MEMOIZE":
            if name != "MEMOIZE" and arg > count:
                raise ValueError(f"memo index {arg} at opcode {count} is out of sequence")
            if not stack or stack[-1] == _MARK:
                raise ValueError("nothing to memoize")
            memo[len(memo) if name == "MEMOIZE" else arg] = stack[-1]
        elif name in _MEMO_GETS:
            if arg not in memo:
                raise ValueError(f"memo index {arg} was never set")
            stack.append(memo[arg])
        elif name == "MARK":
            stack.append(_MARK)
        elif name == "DUP":
            if not stack or stack[-1] == _MARK:
                raise ValueError("nothing to duplicate")
            stack.append(stack[-1])
        else:
            taken = stack.take(opcode.stack_before)
            if name in _MUTATORS:
                depth = max(taken[0], 1 + max(taken[1:], default=0))
            else:
                depth = 1 + max(taken, default=-1)
            if depth > MAX_NESTING:
                raise ValueError(f"objects nested more than {MAX_NESTING} deep")
            stack.extend([depth] * len(opcode.stack_after))


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
    return []
