"""Reading the reference's pickles without running them.

The reference design stored every result as a cloudpickle, and unpickling
runs code: a planted ``__reduce__`` executes in whoever loads it. Listing,
showing, verifying and removing entries of such files must not load them,
yet need their keys and the small fields around each value (function name,
call site, ``is_awaitable``). ``inert_load`` walks the pickle with the
standard unpickler, except that every global it names (a class, a function,
``os.system``...) resolves to a placeholder class made here: calling it,
building it, setting its state only records the arguments. Nothing outside
this module is imported or called, so the walk gives the structure (dicts,
lists, strings, numbers, bytes, and placeholders where objects were) and no
side effect.

``is_reference_record_head`` recognises a reference per-key file from its
first bytes alone, without even that walk; ``remove_keys`` takes entries out
of a reference 2023 file by rewriting its opcodes, without loading it.
"""

from __future__ import annotations

import io
import pickle
import pickletools
from typing import Any, BinaryIO

__all__ = [
    "inert_load", "inert_loads", "Inert", "is_reference_record_head", "RECORD_FIELDS", "HEAD_BYTES",
    "remove_keys", "shape",
]

#: The fields of the reference's per-key record, in the order it wrote them.
RECORD_FIELDS = ("return", "is_awaitable", "info")
#: How many leading bytes ``is_reference_record_head`` needs.
HEAD_BYTES = 64


class _Both:
    """A method bound to the class when looked up on the class, to the instance otherwise.

    The unpickler looks up ``__setstate__``, ``append``, ``extend`` and
    ``add`` on whatever it builds, which here may be a placeholder class (a
    call's result, used as a class by NEWOBJ) or a placeholder instance.
    """

    def __init__(self, fn: Any) -> None:
        self.fn = fn

    def __get__(self, obj: Any, owner: Any) -> Any:
        target = owner if obj is None else obj
        return lambda *args: self.fn(target, *args)


def _record(target: Any, field: str, value: Any) -> None:
    target._rec.setdefault(field, []).append(value)


def _record_all(target: Any, field: str, values: Any) -> None:
    for value in values:
        _record(target, field, value)


class _InertMeta(type):
    """The type of placeholder classes: calling one records the call and answers another class."""

    def __call__(cls, *args: Any, **kwargs: Any) -> Any:
        # A class, not an instance: cloudpickle calls a function that makes a
        # class and then builds objects of it with NEWOBJ, which needs a type.
        return _new_class(("", "<call>"), {"fn": cls, "args": args, "kwargs": kwargs})

    def __setitem__(cls, key: Any, value: Any) -> None:
        _record(cls, "items", (key, value))

    def __setattr__(cls, name: str, value: Any) -> None:
        _record(cls, "attrs", (name, value))

    def __repr__(cls) -> str:
        ref = cls.ref  # type: ignore[attr-defined]
        return f"<inert {ref[0]}.{ref[1]}>" if ref[0] else "<inert call>"


class Inert(metaclass=_InertMeta):
    """What an object of the pickle became: the global it named and what was done to it.

    Placeholder classes (one per global name, ``ref`` is ``(module, name)``,
    and one per call) and their instances (built by NEWOBJ) keep what the
    pickle did to them in ``_rec``, and do nothing else.
    """

    ref: tuple[str, str] = ("", "")
    _rec: dict[str, Any] = {}

    def __new__(cls, *args: Any, **kwargs: Any) -> Inert:
        obj = object.__new__(cls)
        object.__setattr__(obj, "_rec", {"new": (args, kwargs)})
        return obj

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return _new_class(("", "<call>"), {"fn": self, "args": args, "kwargs": kwargs})

    def __setitem__(self, key: Any, value: Any) -> None:
        _record(self, "items", (key, value))

    def __setattr__(self, name: str, value: Any) -> None:
        # BUILD with a (state, slotstate) pair sets attributes one by one.
        _record(self, "attrs", (name, value))

    __setstate__ = _Both(lambda t, state: _record(t, "state", state))
    append = _Both(lambda t, item: _record(t, "list", item))
    extend = _Both(lambda t, items: _record_all(t, "list", items))
    add = _Both(lambda t, item: _record(t, "list", item))

    def __repr__(self) -> str:
        return f"<inert {self.ref[0]}.{self.ref[1]} object>"


def _new_class(ref: tuple[str, str], rec: dict[str, Any]) -> type:
    return _InertMeta("Inert", (Inert,), {"ref": ref, "_rec": rec, "__module__": __name__})


class _InertUnpickler(pickle.Unpickler):
    """The standard unpickler with every global replaced by a placeholder class of its own."""

    def __init__(self, f: BinaryIO) -> None:
        super().__init__(f)
        self._classes: dict[tuple[str, str], type] = {}

    def find_class(self, module: str, name: str) -> Any:
        ref = (str(module), str(name))
        cls = self._classes.get(ref)
        if cls is None:
            # A class of our own making: its name is only a label, nothing is imported.
            cls = self._classes[ref] = _new_class(ref, {})
        return cls

    def persistent_load(self, pid: Any) -> Any:
        raise pickle.UnpicklingError("persistent references are not part of a checkpoint file")


def inert_load(f: BinaryIO) -> Any:
    """The structure of the pickle in ``f``, with every global as an ``Inert`` placeholder.

    Never imports or calls anything the pickle names. Raises the usual
    unpickling errors (``pickle.UnpicklingError``, ``EOFError``, ``ValueError``...)
    for bytes that are not a whole pickle.
    """
    return _InertUnpickler(f).load()


def inert_loads(data: bytes) -> Any:
    return inert_load(io.BytesIO(data))


_STRING_OPS = frozenset({"SHORT_BINUNICODE", "BINUNICODE", "BINUNICODE8", "UNICODE"})
_MEMO_OPS = frozenset({"MEMOIZE", "BINPUT", "LONG_BINPUT", "PUT"})


def is_reference_record_head(head: bytes) -> bool:
    """Whether ``head`` starts a pickle of a dict whose first key is a reference record field.

    That is what the reference wrote for every key (``{'return': ...,
    'is_awaitable': ..., 'info': ...}``): protocol 2 or newer, an empty dict,
    a mark, then the field's name. Read from the opcodes, nothing is loaded.
    A pickle head of a file shorter than ``HEAD_BYTES`` that ends before the
    first field counts too: it is a reference file cut short.
    """
    if len(head) < 2 or head[0] != 0x80 or not 2 <= head[1] <= 5:
        return False
    want = ["PROTO", "EMPTY_DICT"]
    marks = 0
    try:
        for op, arg, _pos in pickletools.genops(io.BytesIO(head)):
            if op.name == "FRAME":
                continue
            if want:
                if op.name != want.pop(0):
                    return False
                continue
            if op.name in _MEMO_OPS:
                continue
            if op.name == "MARK" and marks == 0:  # absent when the dict has one item
                marks += 1
                continue
            return op.name in _STRING_OPS and arg in RECORD_FIELDS
    except (ValueError, EOFError):
        # The bytes end before the record's first field: a reference file cut
        # short (listed as damaged), unless there were enough bytes to decide.
        return len(head) < HEAD_BYTES
    return False


# -- removing keys from a reference 2023 file without loading it -------------------
_PRIMITIVES = frozenset({
    "NONE", "NEWTRUE", "NEWFALSE", "INT", "BININT", "BININT1", "BININT2", "LONG", "LONG1", "LONG4",
    "FLOAT", "BINFLOAT", "STRING", "BINSTRING", "SHORT_BINSTRING", "UNICODE", "SHORT_BINUNICODE",
    "BINUNICODE", "BINUNICODE8", "BINBYTES", "SHORT_BINBYTES", "BINBYTES8", "EMPTY_TUPLE", "GLOBAL",
})
_GET_OPS = frozenset({"GET", "BINGET", "LONG_BINGET"})
_MARK = object()
_NO_KEY = object()  # a pair whose key is not a plain string pushed by one opcode


def _long_binput(idx: int) -> bytes:
    return b"r" + idx.to_bytes(4, "little")


class _Item:
    """One key/value pair of the top-level dict: its opcodes, and the memo slots it sets and reads."""

    def __init__(self) -> None:
        self.key: Any = None
        self.chunks: list[bytes] = []
        self.puts: dict[int, bytes | None] = {}  # memo slot -> bytes that rebuild its object alone
        self.gets: set[int] = set()
        #: Not a pair: opcodes at the top level that push and pop again (what
        #: an earlier removal left to set memo slots), kept as they are.
        self.junk = False


def _split_top_dict(data: bytes) -> tuple[int, bytes, list[_Item]]:
    """(protocol, prefix opcodes, items) of a pickle whose top object is a dict built in place.

    Simulates the unpickler's stack over the opcodes (nothing is built) to
    find where each top-level key/value pair starts and ends. Every MEMOIZE
    is rewritten as an explicit LONG_BINPUT of the same slot, so pairs can be
    left out without renumbering the memo; FRAME opcodes (a read-ahead hint)
    are dropped. Raises ValueError for a layout it does not follow.
    """
    ops = list(pickletools.genops(data))
    # Pass 1, depths only. A pair's value may be followed by opcodes that
    # fill it (SETITEM, APPENDS, BUILD) at the very depth where the next key
    # would start, so a pair starts only where the depth, from then until
    # the batch ends, never falls back to that level.
    dummy: list[Any] = []
    after: list[int] = []
    for op, _arg, _pos in ops:
        if op.name in ("PROTO", "FRAME"):
            after.append(len(dummy))
            continue
        _apply(op, dummy, [None] * len(dummy))
        after.append(len(dummy))
    floor = [0] * len(ops)
    running = 1 << 30
    for i in range(len(ops) - 1, -1, -1):
        running = 1 << 30 if after[i] <= 1 else min(running, after[i])
        floor[i] = running
    proto = 2
    prefix: list[bytes] = []
    items: list[_Item] = []
    stack: list[Any] = []  # _MARK, or bytes that rebuild the slot's object alone, or None
    strings: list[Any] = []  # parallel to stack: the str pushed, where known (for keys)
    memo: dict[int, bytes | None] = {}
    memo_str: dict[int, Any] = {}
    base = 1  # stack depth where the pairs of the current batch start
    pairs = 0  # pairs started in the current batch
    cur: _Item | None = None
    started = stopped = False
    for i, (op, arg, pos) in enumerate(ops):
        end = ops[i + 1][2] if i + 1 < len(ops) else len(data)
        raw = data[pos:end]
        name = op.name
        if name == "PROTO":
            proto = int(arg)  # type: ignore[arg-type]
            continue
        if name == "FRAME":
            continue
        depth = len(stack)
        if name in ("MEMOIZE", "PUT", "BINPUT", "LONG_BINPUT"):
            if not stack or stack[-1] is _MARK:
                raise ValueError("a memo put without an object")
            idx = len(memo) if name == "MEMOIZE" else int(arg)  # type: ignore[arg-type]
            memo[idx], memo_str[idx] = stack[-1], strings[-1]
            raw = _long_binput(idx)
            if cur is not None:
                cur.puts[idx] = stack[-1]
                cur.chunks.append(raw)
            elif depth == 1:
                prefix.append(raw)  # the top dict itself
            else:
                raise ValueError("a memo put outside any pair")
            continue
        if not started:
            if name != "EMPTY_DICT" or stack:
                raise ValueError(f"the top object is not a dict built in place ({name})")
            started = True
            prefix.append(raw)
            stack.append(None)
            strings.append(None)
            continue
        if depth == 1:
            cur = None
            if name == "STOP":
                stopped = True
                break
            if name == "MARK":
                base, pairs = 2, 0
                stack.append(_MARK)
                strings.append(None)
                continue
            base, pairs = 1, 0  # a single pair, closed by SETITEM
        if (name == "SETITEMS" and base == 2 and depth == base + 2 * pairs and _top_mark(stack) == 1) or (
            name == "SETITEM" and base == 1 and depth == 3
        ):
            cur = None
            _apply(op, stack, strings)
            continue
        first = depth == base + 2 * pairs and floor[i] > depth
        if first:
            cur = _Item()
            items.append(cur)
            pairs += 1
        if cur is None:
            raise ValueError(f"opcode {name} outside any pair of the top-level dict")
        cur.chunks.append(raw)
        if name in _GET_OPS:
            idx = int(arg)  # type: ignore[arg-type]
            cur.gets.add(idx)
            stack.append(memo.get(idx))
            strings.append(memo_str.get(idx))
        elif name in _PRIMITIVES:
            stack.append(raw)
            strings.append(arg if isinstance(arg, str) else None)
        elif name == "STACK_GLOBAL":
            if len(stack) < 2 or stack[-1] is _MARK or stack[-2] is _MARK:
                raise ValueError("STACK_GLOBAL without its two names")
            a, b = stack[-2], stack[-1]
            del stack[-2:], strings[-2:]
            stack.append(a + b + raw if isinstance(a, bytes) and isinstance(b, bytes) else None)
            strings.append(None)
        elif name == "DUP":
            stack.append(stack[-1])
            strings.append(strings[-1])
        else:
            _apply(op, stack, strings)
        if first:
            key_pushed = len(stack) == depth + 1 and isinstance(strings[-1], str)
            cur.key = strings[-1] if key_pushed else _NO_KEY
        if base == 1 and len(stack) == 1:
            cur.junk, cur = True, None
    if not stopped or len(stack) != 1:
        raise ValueError("the pickle does not end with its top-level dict")
    return proto, b"".join(prefix), items


def _top_mark(stack: list[Any]) -> int:
    """Index of the topmost mark on the stack (-1 when none)."""
    for i in range(len(stack) - 1, -1, -1):
        if stack[i] is _MARK:
            return i
    return -1


def _apply(op: Any, stack: list[Any], strings: list[Any]) -> None:
    """The stack effect of ``op``, every object it pushes unknown (None)."""
    before = [s.name for s in op.stack_before]
    if "mark" in before:
        at = _top_mark(stack)
        if at < 0:
            raise ValueError(f"{op.name} without a mark")
        below = before.index("mark")
        del stack[at - below:], strings[at - below:]
    else:
        if len(stack) < len(before) or any(s is _MARK for s in stack[len(stack) - len(before):]):
            raise ValueError(f"{op.name} finds too few objects")
        if before:
            del stack[-len(before):], strings[-len(before):]
    for s in op.stack_after:
        stack.append(_MARK if s.name == "mark" else None)
        strings.append(None)


def remove_keys(data: bytes, drop: set[str]) -> tuple[bytes, list[str]]:
    """A reference 2023 file's bytes without the pairs whose key is in ``drop``; and the keys left.

    Nothing is unpickled: the kept pairs are copied opcode for opcode. Where
    a kept pair reads a memo slot that a removed pair set (cloudpickle shares
    strings such as 'return', and module-level names, across entries), the
    slot is set again from the opcodes of that object alone (a string, a
    number, a global's name). When the object is more than that, the removed
    pair stays in the stream inside a throwaway dict, so the file still
    loads exactly as before minus the removed keys. The caller checks the
    result with ``inert_loads`` before using it.

    Raises ValueError for a layout it does not follow.
    """
    proto, prefix, items = _split_top_dict(data)
    keys = [it.key for it in items if not it.junk]
    if any(not isinstance(k, str) for k in keys) or len(set(keys)) != len(keys):
        raise ValueError("the top-level dict's keys are not distinct strings")
    # Memo slots that what stays in the stream reads; a removed pair whose
    # slots cannot be set alone stays whole (in a throwaway dict), and then
    # what it reads is needed too.
    whole: set[int] = set()
    while True:
        needed: set[int] = set()
        for n, it in enumerate(items):
            if it.junk or it.key not in drop or n in whole:
                needed |= it.gets
        more = {n for n, it in enumerate(items) if not it.junk and it.key in drop and n not in whole
                and any(not isinstance(it.puts[idx], bytes) for idx in it.puts if idx in needed)}
        if not more:
            break
        whole |= more
    out = [b"\x80" + bytes([proto]), prefix]
    for n, it in enumerate(items):
        if it.junk:
            out += it.chunks
        elif it.key not in drop:
            out += [b"(", *it.chunks, b"u"]
        elif n in whole:
            out += [b"}(", *it.chunks, b"u0"]  # into a dict nobody keeps
        else:
            for idx in sorted(i for i in it.puts if i in needed):
                recipe = it.puts[idx]
                assert isinstance(recipe, bytes)  # decided above
                out += [recipe, _long_binput(idx), b"0"]  # the object, its memo slot, POP
    out.append(b".")
    return b"".join(out), [k for k in keys if k not in drop]


def shape(obj: Any) -> Any:
    """A comparable picture of an inert structure (shared and cyclic parts numbered)."""
    seen: dict[int, int] = {}

    def walk(o: Any) -> Any:
        if o is None or isinstance(o, (bool, int, float, complex, str, bytes)):
            return (type(o).__name__, o)
        if id(o) in seen:
            return ("same", seen[id(o)])
        seen[id(o)] = len(seen)
        if isinstance(o, (_InertMeta, Inert)):
            rec = o.__dict__.get("_rec", {})
            return ("inert", getattr(o, "ref", None), sorted((k, walk(v)) for k, v in rec.items()))
        if isinstance(o, (list, tuple)):
            return (type(o).__name__, [walk(x) for x in o])
        if isinstance(o, dict):
            return ("dict", [(walk(k), walk(v)) for k, v in o.items()])
        if isinstance(o, (set, frozenset)):
            return (type(o).__name__, sorted(repr(walk(x)) for x in o))
        if isinstance(o, bytearray):
            return ("bytearray", bytes(o))
        return ("other", type(o).__name__, repr(o))

    return walk(obj)
