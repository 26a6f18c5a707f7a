"""The canonical walk: a stable digest of any value (and of large buffers, in place).

Rules of the walk (``fingerprint_value``), chosen so that equal values give
equal digests in any process, whatever their identity or insertion order:

- no ``hash()`` anywhere (it is salted per process for str and bytes), and no
  pickle bytes (they depend on memo sharing and dict order);
- scalars with a type tag; lists and tuples tagged apart; dicts and sets
  order-independent (sorted keys when they are all str or all int, else
  sorted per-item digests);
- numpy arrays: dtype, shape and the raw C-order bytes hashed straight from
  the array's memory (numpy is never imported here: an array can only reach
  us if the caller already imported it);
- functions by their code fingerprint (``_callable`` registers the encoders),
  classes and modules by name;
- anything else through ``__reduce_ex__`` (what pickle would save: the class,
  the constructor arguments and the state), walked with the same rules;
- what cannot be reduced (locks, open files, connections, generators) or
  nests deeper than 100 levels is *unfingerprintable*: recorded by name
  with the reason, never an error, never alarmed about.

Cycles are walked once: a reference back to an object that is being walked
is written as its distance up the stack.
"""

from __future__ import annotations

import copyreg
import enum
import hashlib
import os
import struct
import types
from typing import Any, Callable, Dict, Iterator, List

from .._errors import CheckpointError

__all__ = [
    "UnfingerprintableError",
    "fingerprint_value",
]

# The hash: sha256, the fastest collision-resistant hash of the standard
# library where the CPU has SHA instructions (every recent x86 and ARM core;
# sha1 is broken). The algorithm cannot depend on the machine: digests are
# compared across runs. Buffers above _LEAF are hashed as fixed 16 MiB
# leaves, in threads (hashlib releases the GIL), and the leaf digests go
# into the stream. A faster non-cryptographic hash (xxhash) would be a
# compiled dependency; sha256 keeps us on the standard library. The figures
# behind this choice are in docs/performance.md ("Fingerprints").
# 128 bits of output: a chance collision is out of reach for any store.
_hash = hashlib.sha256
_DIGEST_BYTES = 16
_LEAF = 16 << 20
# Copy buffers up to this size into the small-item stream; above, feed them
# to the hash object straight from their own memory.
_INLINE_BUFFER = 1 << 16
_MAX_DEPTH = 100
_MAX_WORKERS = 8
# Caches keyed by code objects (hashable, and shared by all closures made
# from one ``def``). Bounded so that code generated in a loop cannot grow
# them forever: when full they are simply cleared.
_CACHE_MAX = 4096
_INLINE_REPR = 24

_pack_q = struct.Struct("<q").pack
_pack_Q = struct.Struct("<Q").pack
_pack_d = struct.Struct("<d").pack
_pack_dd = struct.Struct("<dd").pack


class UnfingerprintableError(CheckpointError, TypeError):
    """A value that has no stable fingerprint (a lock, an open file, a generator...)."""

    def __init__(self, type_name: str, reason: str) -> None:
        self.type_name = type_name
        self.reason = reason
        super().__init__(f"cannot fingerprint a {type_name}: {reason}")


def _type_name(t: Any) -> str:
    return f"{getattr(t, '__module__', '?')}.{getattr(t, '__qualname__', getattr(t, '__name__', '?'))}"


# -- the canonical walk -------------------------------------------------------


class _Walker:
    """Writes a canonical, self-delimiting byte stream of values and hashes it."""

    __slots__ = ("buf", "hasher", "stack", "legacy", "funcs")

    def __init__(self, stack: Dict[int, int] | None = None, legacy: bool = False) -> None:
        self.buf = bytearray()
        self.hasher: Any = None
        # id -> depth of the containers being walked: a cycle's back edge is
        # written as a distance, the same in every process.
        self.stack: Dict[int, int] = {} if stack is None else stack
        # Functions inside values are digested by their code: from bytecode
        # under the rules of records version 1 (``legacy``), from source now.
        # ``funcs`` tells whether any was met, i.e. whether the two rules can
        # give different digests for this value.
        self.legacy = legacy
        self.funcs = False

    def digest(self) -> bytes:
        h = self.hasher
        if h is None:
            return _hash(self.buf).digest()[:_DIGEST_BYTES]
        h.update(self.buf)
        return h.digest()[:_DIGEST_BYTES]  # type: ignore[no-any-return]

    def flush(self) -> Any:
        h = self.hasher
        if h is None:
            h = self.hasher = _hash()
        h.update(self.buf)
        self.buf = bytearray()
        return h

    def walk(self, x: Any) -> None:
        enc = _EXACT.get(type(x))
        if enc is not None:
            enc(self, x)
        else:
            _walk_other(self, x)

    def sub_digest(self, x: Any) -> bytes:
        sub = _Walker(self.stack, self.legacy)
        sub.walk(x)
        if sub.funcs:
            self.funcs = True
        return sub.digest()

    def enter(self, x: Any) -> int | None:
        """Push a container; the distance of a back reference when already open."""
        stack = self.stack
        key = id(x)
        depth = stack.get(key)
        if depth is not None:
            return len(stack) - depth
        if len(stack) >= _MAX_DEPTH:
            raise UnfingerprintableError(type(x).__name__, f"nested more than {_MAX_DEPTH} levels deep")
        stack[key] = len(stack)
        return None


def _leave(w: _Walker, x: Any) -> None:
    del w.stack[id(x)]


def _backref(w: _Walker, distance: int) -> None:
    w.buf += b"R" + _pack_Q(distance)


def _enc_none(w: _Walker, x: Any) -> None:
    w.buf += b"N"


def _enc_bool(w: _Walker, x: bool) -> None:
    w.buf += b"T" if x else b"F"


def _enc_int(w: _Walker, x: int) -> None:
    if -0x8000000000000000 <= x <= 0x7FFFFFFFFFFFFFFF:
        w.buf += b"i" + _pack_q(x)
    else:
        # to_bytes, not str(): str() of a huge int is quadratic and refused
        # beyond sys.int_max_str_digits.
        data = x.to_bytes((x.bit_length() + 8) // 8, "little", signed=True)
        w.buf += b"I" + _pack_Q(len(data)) + data


def _enc_float(w: _Walker, x: float) -> None:
    w.buf += b"f" + _pack_d(x)


def _enc_complex(w: _Walker, x: complex) -> None:
    w.buf += b"c" + _pack_dd(x.real, x.imag)


def _enc_str(w: _Walker, x: str) -> None:
    data = x.encode("utf-8", "surrogatepass")
    if len(data) <= _INLINE_BUFFER and len(data) <= _LEAF:
        w.buf += b"s" + _pack_Q(len(data)) + data
    else:
        _put_buffer(w, b"s", memoryview(data))


def _enc_bytes(w: _Walker, x: bytes) -> None:
    _put_buffer(w, b"b", memoryview(x))


def _enc_bytearray(w: _Walker, x: bytearray) -> None:
    _put_buffer(w, b"B", memoryview(x))


def _enc_ellipsis(w: _Walker, x: Any) -> None:
    w.buf += b"E"


def _enc_seq(tag: bytes) -> Callable[[_Walker, Any], None]:
    def enc(w: _Walker, x: Any) -> None:
        back = w.enter(x)
        if back is not None:
            _backref(w, back)
            return
        w.buf += tag + _pack_Q(len(x))
        get = _EXACT.get
        for item in x:
            # w.walk inlined: this loop is most of the cost of small arguments.
            enc = get(type(item))
            if enc is not None:
                enc(w, item)
            else:
                _walk_other(w, item)
        _leave(w, x)

    return enc


def _sortable(items: List[Any]) -> bool:
    # All str or all int (exact types: True and 1 must not meet in a sort).
    # set(map(type)) runs in C: the common small dict is settled without a Python loop.
    kinds = set(map(type, items))
    return len(kinds) <= 1 and (not kinds or str in kinds or int in kinds)


def _enc_dict_items(w: _Walker, x: Any) -> None:
    keys = list(x)
    if _sortable(keys):
        keys.sort()
        w.buf += b"D" + _pack_Q(len(keys))
        get = _EXACT.get
        for k in keys:
            get(type(k))(w, k)  # type: ignore[misc]  # str or int
            v = x[k]
            enc = get(type(v))
            if enc is not None:
                enc(w, v)
            else:
                _walk_other(w, v)
    else:
        # Mixed or unorderable keys: order by the items' own digests.
        digests = sorted(w.sub_digest((k, v)) for k, v in x.items())
        w.buf += b"d" + _pack_Q(len(digests)) + b"".join(digests)


def _enc_dict(w: _Walker, x: Any) -> None:
    back = w.enter(x)
    if back is not None:
        _backref(w, back)
        return
    _enc_dict_items(w, x)
    _leave(w, x)


def _enc_set(tag: bytes) -> Callable[[_Walker, Any], None]:
    def enc(w: _Walker, x: Any) -> None:
        back = w.enter(x)
        if back is not None:
            _backref(w, back)
            return
        items = list(x)
        if _sortable(items):
            items.sort()
            w.buf += tag + _pack_Q(len(items))
            walk = w.walk
            for item in items:
                walk(item)
        else:
            digests = sorted(w.sub_digest(item) for item in items)
            w.buf += tag.lower() + _pack_Q(len(digests)) + b"".join(digests)
        _leave(w, x)

    return enc


def _str_bytes(s: str) -> bytes:
    data = s.encode("utf-8", "surrogatepass")
    return _pack_Q(len(data)) + data


_EXACT: Dict[type, Callable[[_Walker, Any], None]] = {
    type(None): _enc_none,
    bool: _enc_bool,
    int: _enc_int,
    float: _enc_float,
    complex: _enc_complex,
    str: _enc_str,
    bytes: _enc_bytes,
    bytearray: _enc_bytearray,
    type(Ellipsis): _enc_ellipsis,
    list: _enc_seq(b"L"),
    tuple: _enc_seq(b"U"),
    dict: _enc_dict,
    set: _enc_set(b"S"),
    frozenset: _enc_set(b"Z"),
    # types.CodeType and types.FunctionType: added by _callable, which needs this module.
}


def _walk_other(w: _Walker, x: Any) -> None:
    t = type(x)
    if t.__module__.startswith("numpy") and _walk_numpy(w, x):
        return
    if isinstance(x, type):
        w.buf += b"t" + _str_bytes(_type_name(x))
        return
    if isinstance(x, types.ModuleType):
        w.buf += b"M" + _str_bytes(x.__name__)
        return
    if isinstance(x, (types.BuiltinFunctionType, types.MethodWrapperType, types.WrapperDescriptorType,
                      types.MethodDescriptorType)):
        w.buf += b"G" + _str_bytes(_type_name(x))
        return
    if isinstance(x, types.MethodType):
        # A bound method: its code and what it is bound to.
        w.buf += b"m"
        w.walk(x.__func__)
        w.walk(x.__self__)
        return
    back = w.enter(x)
    if back is not None:
        _backref(w, back)
        return
    w.buf += b"O" + _str_bytes(_type_name(t))
    if isinstance(x, enum.Enum):
        w.buf += b"e" + _str_bytes(x.name)
        w.walk(x.value)
    elif isinstance(x, dict):
        # OrderedDict, defaultdict, Counter...: their content, order-free.
        _enc_dict_items(w, x)
    elif isinstance(x, (list, tuple)):  # named tuples, list subclasses
        w.buf += b"L" + _pack_Q(len(x))
        for item in x:
            w.walk(item)
    else:
        _walk_reduced(w, x)
    _leave(w, x)


def _walk_reduced(w: _Walker, x: Any) -> None:
    # What pickle would save, walked canonically instead of pickled: pickle
    # bytes depend on object sharing (memo) and on dict insertion order.
    reducer = copyreg.dispatch_table.get(type(x))
    try:
        rv = reducer(x) if reducer is not None else x.__reduce_ex__(4)
    except Exception as e:
        raise UnfingerprintableError(type(x).__name__, f"{type(e).__name__}: {e}") from None
    if isinstance(rv, str):  # a global: its name is its identity
        w.buf += b"g" + _str_bytes(rv)
        return
    if not isinstance(rv, tuple) or not 2 <= len(rv) <= 6:
        raise UnfingerprintableError(type(x).__name__, f"__reduce_ex__ returned {type(rv).__name__}")
    func = rv[0]
    w.buf += b"r" + _str_bytes(_type_name(func))
    w.walk(rv[1])
    w.walk(rv[2] if len(rv) > 2 else None)
    w.walk(list(rv[3]) if len(rv) > 3 and rv[3] is not None else None)
    w.walk(dict(rv[4]) if len(rv) > 4 and rv[4] is not None else None)


# -- buffers -----------------------------------------------------------------


def _put_buffer(w: _Walker, tag: bytes, mv: memoryview) -> None:
    """Tag, length and bytes of a flat 'B' buffer; large ones hashed in place."""
    n = mv.nbytes
    w.buf += tag + _pack_Q(n)
    if n > _LEAF:
        leaves = _LeafHasher(n)
        leaves.feed(mv)
        w.buf += leaves.finish()
    elif n <= _INLINE_BUFFER:
        w.buf += mv
    else:
        w.flush().update(mv)


def _leaf_digest(leaf: Any) -> bytes:
    return _hash(leaf).digest()


def _workers() -> int:
    try:
        n = len(os.sched_getaffinity(0))  # type: ignore[attr-defined]
    except (AttributeError, OSError):
        n = os.cpu_count() or 1
    return max(1, min(n, _MAX_WORKERS))


class _LeafHasher:
    """Digests of the consecutive 16 MiB leaves of a byte stream, in threads."""

    def __init__(self, nbytes: int) -> None:
        workers = _workers() if nbytes >= 2 * _LEAF else 1
        from concurrent.futures import ThreadPoolExecutor  # only for buffers over 16 MiB

        self.pool = ThreadPoolExecutor(workers) if workers > 1 else None
        # Hash leaves in batches: bounded memory when the stream is made of
        # temporary copies (a non-contiguous array), parallel work otherwise.
        self.batch = 2 * workers
        self.ready: List[Any] = []
        self.pending = bytearray()
        self.digests: List[bytes] = []

    def feed(self, mv: memoryview) -> None:
        if self.pending:
            take = min(_LEAF - len(self.pending), mv.nbytes)
            self.pending += mv[:take]
            mv = mv[take:]
            if len(self.pending) == _LEAF:
                self._ready(self.pending)
                self.pending = bytearray()
        full = mv.nbytes - mv.nbytes % _LEAF
        for off in range(0, full, _LEAF):
            self._ready(mv[off:off + _LEAF])
        if full < mv.nbytes:
            self.pending += mv[full:]

    def _ready(self, leaf: Any) -> None:
        self.ready.append(leaf)
        if len(self.ready) >= self.batch:
            self._hash_ready()

    def _hash_ready(self) -> None:
        if self.pool is not None:
            self.digests.extend(self.pool.map(_leaf_digest, self.ready))
        else:
            self.digests.extend(map(_leaf_digest, self.ready))
        self.ready = []

    def finish(self) -> bytes:
        try:
            if self.pending:
                self.ready.append(self.pending)
                self.pending = bytearray()
            self._hash_ready()
        finally:
            if self.pool is not None:
                self.pool.shutdown()
        return b"".join(self.digests)


def _walk_numpy(w: _Walker, x: Any) -> bool:
    # numpy is imported by now: the value is one of its objects.
    import numpy as np

    if type(x) is np.ndarray or isinstance(x, np.memmap):
        _walk_array(w, np, x)
        return True
    if isinstance(x, np.generic):
        w.buf += b"a" + _str_bytes(_dtype_text(x.dtype))
        if x.dtype.hasobject:
            w.walk(x.item())
        else:
            data = x.tobytes()
            w.buf += _pack_Q(len(data)) + data
        return True
    if isinstance(x, np.dtype):
        w.buf += b"y" + _str_bytes(_dtype_text(x))
        return True
    return False  # other numpy objects (a Generator...): the generic walk


def _dtype_text(dt: Any) -> str:
    return dt.str if dt.fields is None and dt.subdtype is None else repr(dt.descr)


def _walk_array(w: _Walker, np: Any, x: Any) -> None:
    w.buf += b"A" + _str_bytes(_dtype_text(x.dtype)) + _pack_Q(x.ndim)
    for s in x.shape:
        w.buf += _pack_Q(s)
    if x.dtype.hasobject:
        # Object arrays hold pointers: walk the elements themselves.
        back = w.enter(x)
        if back is not None:
            _backref(w, back)
            return
        for item in x.flat:
            w.walk(item)
        _leave(w, x)
        return
    n = x.nbytes
    if n <= _INLINE_BUFFER and n <= _LEAF:
        # tobytes() is the C-order copy in one call: the cheapest for small arrays.
        w.buf += b"b" + _pack_Q(n) + x.tobytes()
    elif x.flags.c_contiguous:
        _put_buffer(w, b"b", memoryview(x.reshape(-1).view(np.uint8)))
    elif n <= _LEAF:
        _put_buffer(w, b"b", memoryview(np.ascontiguousarray(x).reshape(-1).view(np.uint8)))
    else:
        # The same bytes as the C-ordered copy, made in bounded pieces.
        w.buf += b"b" + _pack_Q(n)
        leaves = _LeafHasher(n)
        for block in _c_order_blocks(np, x):
            leaves.feed(memoryview(block))
        w.buf += leaves.finish()


def _c_order_blocks(np: Any, x: Any) -> Iterator[Any]:
    if x.flags.c_contiguous:
        yield x.reshape(-1).view(np.uint8)
        return
    row = x[0].nbytes if x.shape[0] else 0
    if row > _LEAF:
        for i in range(x.shape[0]):
            yield from _c_order_blocks(np, x[i])
        return
    rows = max(1, _LEAF // max(row, 1))
    for i in range(0, x.shape[0], rows):
        yield np.ascontiguousarray(x[i:i + rows]).reshape(-1).view(np.uint8)


# -- values -------------------------------------------------------------------


def _inline(x: Any) -> str | None:
    t = type(x)
    if t is int:
        if -(10 ** 20) < x < 10 ** 20:
            return repr(x)
    elif t is str:
        if len(x) <= _INLINE_REPR - 2:
            r = repr(x)
            if len(r) <= _INLINE_REPR:
                return r
    elif t is float or t is bool or x is None:
        return repr(x)
    return None


def fingerprint_value(x: Any) -> str:
    """A stable fingerprint of one value: its short ``repr`` or a 32-hex digest.

    Equal values give equal fingerprints in every process, whatever their
    identity, their dicts' insertion order or ``PYTHONHASHSEED``.

    >>> fingerprint_value(3), fingerprint_value("abc"), fingerprint_value(None)
    ('3', "'abc'", 'None')
    >>> fingerprint_value({"a": 1, "b": [1, 2]}) == fingerprint_value({"b": [1, 2], "a": 1})
    True
    >>> len(fingerprint_value(2 ** 100))
    32

    Raises:
        UnfingerprintableError: the value (or something inside it) has no
            stable fingerprint, e.g. a lock or an open file.
    """
    r = _inline(x)
    return _digest_hex(x) if r is None else r


def _digest_hex(x: Any) -> str:
    return _digest_walk(x)[0]


# -- the short way for small common shapes -----------------------------------------
#
# Scalars, and tuples, lists and dicts (str or int keys) of scalars or of such
# containers of scalars: what configs and step arguments mostly are. The same
# bytes as the canonical walk, written without its machinery (walker object,
# cycle stack, dispatch per item); anything else answers None and takes the
# walk. tests/test_fingerprint.py checks the two agree on many shapes.

_Q = _pack_Q
_SMALL_STR = _INLINE_BUFFER


_MIN_Q, _MAX_Q = -0x8000000000000000, 0x7FFFFFFFFFFFFFFF


class _NotSmall(Exception):
    pass


def _put_small(out: List[bytes], x: Any, depth: int) -> None:
    """Append the canonical stream of ``x`` to ``out``; _NotSmall when it is not a small common value.

    Containers nest at most 4 deep (so a cycle, which the walk writes as a
    back reference, can never be written here) and hold at most 64 items.
    """
    t = type(x)
    if t is str:
        data = x.encode("utf-8", "surrogatepass")
        if len(data) > _SMALL_STR:
            raise _NotSmall
        out.append(b"s" + _Q(len(data)) + data)
    elif t is int:
        if not _MIN_Q <= x <= _MAX_Q:
            raise _NotSmall
        out.append(b"i" + _pack_q(x))
    elif t is float:
        out.append(b"f" + _pack_d(x))
    elif t is bool:
        out.append(b"T" if x else b"F")
    elif x is None:
        out.append(b"N")
    elif t is tuple or t is list:
        if depth >= 4 or len(x) > 64:
            raise _NotSmall
        out.append((b"U" if t is tuple else b"L") + _Q(len(x)))
        for item in x:
            _put_small(out, item, depth + 1)
    elif t is dict:
        if depth >= 4 or len(x) > 64:
            raise _NotSmall
        keys = list(x)
        if not _sortable(keys):
            raise _NotSmall
        keys.sort()
        out.append(b"D" + _Q(len(keys)))
        for k in keys:
            _put_small(out, k, depth)  # str or int
            _put_small(out, x[k], depth + 1)
    else:
        raise _NotSmall


def _small_bytes(x: Any) -> bytes | None:
    """The canonical stream of a small common value, or None (take the walk)."""
    out: List[bytes] = []
    try:
        _put_small(out, x, 0)
    except _NotSmall:
        return None
    return b"".join(out)


def _digest_walk(x: Any, legacy: bool = False) -> tuple[str, bool]:
    """The hex digest of ``x``, and whether a function or code object was in it."""
    data = _small_bytes(x)
    if data is not None:  # no function can be inside: the same under both rules
        return _hash(data).digest()[:_DIGEST_BYTES].hex(), False
    return _walk_digest(x, legacy)


def _walk_digest(x: Any, legacy: bool = False) -> tuple[str, bool]:
    """``_digest_walk`` by the canonical walk alone."""
    w = _Walker(legacy=legacy)
    try:
        w.walk(x)
    except RecursionError:
        raise UnfingerprintableError(type(x).__name__, "nested too deeply") from None
    return w.digest().hex(), w.funcs

