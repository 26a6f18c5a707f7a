"""Fingerprints of a call's inputs and of a function's code, to tell a stale entry.

At save time the checkpointer records ``fingerprint(fn, args, kwargs)`` in the
entry's metadata; on a hit it fingerprints the new call the same way and
``compare`` says what changed, in words a warning can quote:

>>> def step(x, y=2, **options):
...     return x * y
>>> old = fingerprint(step, (3,), {"options": 1})
>>> old["args"]
{'x': '3', 'y': '2', "options['options']": '1'}
>>> compare(old, fingerprint(step, (), {"x": 3, "options": 1}))   # same call
[]
>>> compare(old, fingerprint(step, (4,), {"options": 1}))
["argument 'x' changed (3 -> 4)"]

The record is plain JSON::

    {"v": 1,                      # digest rules; records of other versions are not compared
     "fn": "qualname",            # for messages
     "code": "<32 hex>" | None,   # None: no Python code to fingerprint (a builtin)
     "args": {"x": "3", "data": "<32 hex>", ...},
     "unhashable": {"conn": "TypeError: cannot pickle 'sqlite3.Connection' object"}}

Each argument has its own entry, so a warning can name the one that changed.
Short ints, floats, strings, None and booleans are kept as their ``repr``
(at most 24 characters, so never mistaken for a 32-character digest);
everything else as a 128-bit digest of a canonical walk of the value.

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
- functions by their code fingerprint, classes and modules by name;
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
import dis
import enum
import functools
import hashlib
import inspect
import os
import struct
import types
from typing import Any, Callable, Dict, Iterator, List, NamedTuple, Tuple

from ._errors import CheckpointError

__all__ = [
    "FORMAT_VERSION",
    "UnfingerprintableError",
    "fingerprint",
    "fingerprint_inputs",
    "fingerprint_code",
    "fingerprint_value",
    "compare",
    "describe",
]

FORMAT_VERSION = 1

# The hash. Measured on the development machine (x86-64 with SHA extensions,
# 2 cores, one pass over 1 GiB already in memory, Python 3.11 / OpenSSL):
#   sha256 1.93 GB/s, sha1 2.04, blake2b 1.33, sha512 1.10, md5 0.82,
#   blake2s 0.72; zlib.crc32 6.5 GB/s but only 32 bits; memcpy 5.1 GB/s.
# sha256 is the fastest hash that is still collision-resistant (sha1 is only
# 5% faster and broken), and it runs in hardware on every recent x86 and ARM
# core. On old CPUs without SHA instructions blake2b would be ~2x faster,
# but the algorithm cannot depend on the machine: digests are compared
# across runs. Buffers above _LEAF are hashed as fixed 16 MiB leaves, in
# threads (hashlib releases the GIL), and the leaf digests go into the
# stream: 1 GiB in 0.28 s (3.9 GB/s) on 2 cores, vs 0.66 s for one plain
# sha256 pass (benchmarks/bench_fingerprint.py). Still hash-bound, not
# memory-bound (a hot memcpy runs at 16 GB/s): xxhash's xxh3_128 does 34 GB/s
# here, but it is a compiled dependency; sha256 keeps us on the stdlib.
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

    __slots__ = ("buf", "hasher", "stack")

    def __init__(self, stack: Dict[int, int] | None = None) -> None:
        self.buf = bytearray()
        self.hasher: Any = None
        # id -> depth of the containers being walked: a cycle's back edge is
        # written as a distance, the same in every process.
        self.stack: Dict[int, int] = {} if stack is None else stack

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
        sub = _Walker(self.stack)
        sub.walk(x)
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
    # set(map(type)) runs in C: the common small dict costs ~0.1 us here.
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


def _enc_code(w: _Walker, x: types.CodeType) -> None:
    w.buf += b"K" + _code_digest(x)


def _enc_function(w: _Walker, x: types.FunctionType) -> None:
    w.buf += b"P" + _str_bytes(_type_name(x)) + _function_digest(x, set())


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
    types.CodeType: _enc_code,
    types.FunctionType: _enc_function,
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
    w = _Walker()
    try:
        w.walk(x)
    except RecursionError:
        raise UnfingerprintableError(type(x).__name__, "nested too deeply") from None
    return w.digest().hex()


# -- arguments ----------------------------------------------------------------


class _Layout(NamedTuple):
    pos: Tuple[str, ...]  # positional parameters, positional-only first
    posonly: int
    kwonly: Tuple[str, ...]
    varargs: str | None
    varkw: str | None
    by_keyword: frozenset  # names that a keyword argument may bind
    order: Tuple[str, ...]  # all named parameters


_LAYOUTS: Dict[types.CodeType, _Layout] = {}
_SIGNATURES: Dict[Any, inspect.Signature | None] = {}


def _layout(co: types.CodeType) -> _Layout:
    lay = _LAYOUTS.get(co)
    if lay is None:
        # Read from the code object: inspect.signature is ~20x slower and
        # gives the same answer for a plain function.
        names = co.co_varnames
        n, k = co.co_argcount, co.co_kwonlyargcount
        i = n + k
        varargs = varkw = None
        if co.co_flags & inspect.CO_VARARGS:
            varargs = names[i]
            i += 1
        if co.co_flags & inspect.CO_VARKEYWORDS:
            varkw = names[i]
        posonly = co.co_posonlyargcount
        lay = _Layout(names[:n], posonly, names[n:n + k], varargs, varkw, frozenset(names[posonly:n + k]),
                      names[:n + k])
        if len(_LAYOUTS) >= _CACHE_MAX:
            _LAYOUTS.clear()
        _LAYOUTS[co] = lay
    return lay


class _BindError(Exception):
    pass


def _bind_function(fn: types.FunctionType, args: Tuple[Any, ...], kwargs: Dict[str, Any]) -> Dict[str, Any]:
    """Parameter name -> value, defaults applied; _BindError when the call is invalid."""
    lay = _layout(fn.__code__)
    pos = lay.pos
    npos = len(pos)
    bound: Dict[str, Any] = dict(zip(pos, args))
    if len(args) > npos:
        if lay.varargs is None:
            raise _BindError
        for j, v in enumerate(args[npos:]):
            bound[f"{lay.varargs}[{j}]"] = v
    extra: Dict[str, Any] | None = None
    for k, v in kwargs.items():
        if k in lay.by_keyword:
            if k in bound:
                raise _BindError
            bound[k] = v
        elif lay.varkw is not None:
            if extra is None:
                extra = {}
            extra[f"{lay.varkw}[{k!r}]"] = v
        else:
            raise _BindError
    if len(args) < npos:
        defaults = fn.__defaults__ or ()
        first_default = npos - len(defaults)
        for idx in range(len(args), npos):
            name = pos[idx]
            if name not in bound:
                if idx < first_default:
                    raise _BindError
                bound[name] = defaults[idx - first_default]
    for name in lay.kwonly:
        if name not in bound:
            kwd = fn.__kwdefaults__
            if not kwd or name not in kwd:
                raise _BindError
            bound[name] = kwd[name]
    if kwargs:
        # Parameter order, as if every argument had been passed by position.
        bound = {**{n: bound[n] for n in lay.order if n in bound}, **bound}
    if extra:
        bound.update(extra)
    return bound


def _bind_signature(fn: Any, args: Tuple[Any, ...], kwargs: Dict[str, Any]) -> Dict[str, Any]:
    try:
        sig = _SIGNATURES.get(fn, False)
    except TypeError:  # an unhashable callable: no caching
        sig = False
    if sig is False:
        try:
            sig = inspect.signature(fn)
        except (TypeError, ValueError):
            sig = None
        try:
            if len(_SIGNATURES) >= _CACHE_MAX:
                _SIGNATURES.clear()
            _SIGNATURES[fn] = sig
        except TypeError:
            pass
    if sig is None:
        raise _BindError
    try:
        ba = sig.bind(*args, **kwargs)  # type: ignore[union-attr]
    except TypeError:
        raise _BindError from None
    ba.apply_defaults()
    bound: Dict[str, Any] = {}
    for name, value in ba.arguments.items():
        kind = sig.parameters[name].kind  # type: ignore[union-attr]
        if kind is inspect.Parameter.VAR_POSITIONAL:
            for j, v in enumerate(value):
                bound[f"{name}[{j}]"] = v
        elif kind is inspect.Parameter.VAR_KEYWORD:
            for k, v in value.items():
                bound[f"{name}[{k!r}]"] = v
        else:
            bound[name] = value
    return bound


def _class_call(obj: Any) -> Any:
    # The __call__ a callable object runs (looked up on its class, as Python does).
    for klass in type(obj).__mro__:
        call = klass.__dict__.get("__call__")
        if call is not None:
            return call
    return None


def _unwrap_call(
    fn: Any, args: Tuple[Any, ...], kwargs: Dict[str, Any]
) -> Tuple[Any, Tuple[Any, ...], Dict[str, Any]]:
    """The Python function a call runs, with the arguments it receives."""
    for _ in range(8):
        if isinstance(fn, types.FunctionType):
            wrapped = fn.__dict__.get("__wrapped__")
            # functools.wraps wrappers take (*args, **kwargs): bind to the
            # wrapped function's names, as inspect.signature does.
            if wrapped is None:
                break
            fn = wrapped
        elif isinstance(fn, types.MethodType):
            args = (fn.__self__, *args)
            fn = fn.__func__
        elif isinstance(fn, functools.partial):
            args = (*fn.args, *args)
            kwargs = {**fn.keywords, **kwargs}
            fn = fn.func
        elif not isinstance(fn, type) and isinstance(_class_call(fn), types.FunctionType):
            args = (fn, *args)
            fn = _class_call(fn)
        else:
            break
    return fn, args, kwargs


def fingerprint_inputs(
    fn: Callable[..., Any], args: Tuple[Any, ...], kwargs: Dict[str, Any]
) -> Dict[str, Any]:
    """Fingerprints of a call's arguments, one per parameter name.

    Arguments are bound to ``fn``'s parameters, so a positional argument
    passed by keyword gives the same record, and defaults are applied, so
    an explicit default equals an omitted one (and a changed default shows
    as a changed argument). ``*args`` items are named ``args[0]``...,
    ``**kwargs`` items ``kwargs['key']``. When the arguments do not fit the
    signature (the call itself will fail), or there is no signature, the
    names are ``arg0``, ``arg1``... and the keywords as given.

    Returns:
        ``{"args": {name: fingerprint}, "unhashable": {name: reason}}``: an
        argument is in exactly one of the two. Never raises for a value.

    >>> def f(x, y=1, *, z=None):
    ...     pass
    >>> fingerprint_inputs(f, (3,), {"z": "abc"})
    {'args': {'x': '3', 'y': '1', 'z': "'abc'"}, 'unhashable': {}}
    >>> fingerprint_inputs(f, (), {"x": 3, "y": 1, "z": "abc"}) == fingerprint_inputs(f, (3,), {"z": "abc"})
    True
    """
    target, args, kwargs = _unwrap_call(fn, tuple(args), kwargs)
    try:
        if isinstance(target, types.FunctionType):
            bound = _bind_function(target, args, kwargs)
        else:
            bound = _bind_signature(target, args, kwargs)
    except _BindError:
        bound = {f"arg{i}": v for i, v in enumerate(args)}
        bound.update(kwargs)
    digests: Dict[str, str] = {}
    unhashable: Dict[str, str] = {}
    for name, value in bound.items():
        r = _inline(value)
        if r is not None:
            digests[name] = r
            continue
        try:
            digests[name] = _digest_hex(value)
        except UnfingerprintableError as e:
            unhashable[name] = f"{e.type_name}: {e.reason}"
        except Exception as e:
            # A broken __reduce__ or __eq__-only proxy must not break the
            # step: the argument is recorded as unchecked, with the reason.
            unhashable[name] = f"{type(value).__name__}: {type(e).__name__}: {e}"
    return {"args": digests, "unhashable": unhashable}


# -- code ---------------------------------------------------------------------

_CODE_DIGESTS: Dict[types.CodeType, bytes] = {}
_HASCONST = frozenset(dis.hasconst)
_EXTENDED_ARG = dis.opmap["EXTENDED_ARG"]
# Python 3.14 flags code with a docstring; the flag must not count.
_CO_HAS_DOCSTRING = 0x4000000


def _code_digest(co: types.CodeType) -> bytes:
    d = _CODE_DIGESTS.get(co)
    if d is None:
        w = _Walker()
        _walk_code(w, co)
        d = w.digest()
        if len(_CODE_DIGESTS) >= _CACHE_MAX:
            _CODE_DIGESTS.clear()
        _CODE_DIGESTS[co] = d
    return d


def _walk_code(w: _Walker, co: types.CodeType) -> None:
    # What the code does, not where it stands: no co_filename, co_firstlineno,
    # co_linetable/co_lnotab or co_name. Constants are written where the
    # bytecode loads them, not as the co_consts tuple: the docstring sits in
    # co_consts but is never loaded, and adding one shifts the indices of
    # the other constants (3.11 keeps a None placeholder in its slot, 3.14
    # drops it), so raw indices would make a docstring edit look like a
    # code change.
    w.buf += b"C" + _pack_Q(co.co_argcount) + _pack_Q(co.co_posonlyargcount) + _pack_Q(co.co_kwonlyargcount)
    w.buf += _pack_Q(co.co_flags & ~_CO_HAS_DOCSTRING)
    for names in (co.co_names, co.co_varnames, co.co_freevars, co.co_cellvars):
        w.walk(names)
    w.walk(getattr(co, "co_exceptiontable", b""))
    code = co.co_code
    consts = co.co_consts
    ext = 0
    out = w.buf
    for i in range(0, len(code), 2):
        op = code[i]
        arg = code[i + 1] | ext
        if op == _EXTENDED_ARG:
            ext = arg << 8
            continue
        ext = 0
        if op in _HASCONST:
            out.append(op)
            const = consts[arg]
            if type(const) is types.CodeType:
                out += b"K" + _code_digest(const)
            else:
                w.walk(const)
                out = w.buf
        else:
            out += bytes((op,)) + _pack_Q(arg)


_SCALARS = (type(None), bool, int, float, complex, str, bytes)


def _closure_part(w: _Walker, v: Any, seen: set) -> None:
    # Closure cells count as code when they hold code (helpers, the function
    # a decorator wraps) or constants; mutable objects count by type only: a
    # memo dict or a counter in a closure changes at every call, and would
    # otherwise make every hit look stale.
    if isinstance(v, (types.FunctionType, types.MethodType, functools.partial)):
        d = _callable_digest(v, seen)
        w.buf += b"P" + (d if d is not None else b"-")
    elif isinstance(v, (type, types.ModuleType, enum.Enum)) or _is_constant(v):
        w.walk(v)
    else:
        w.buf += b"o" + _str_bytes(_type_name(type(v)))


def _is_constant(v: Any) -> bool:
    return isinstance(v, _SCALARS) or (
        isinstance(v, (tuple, frozenset)) and all(isinstance(i, _SCALARS) for i in v)
    )


# Functions whose defaults are constants (the usual case) keep their digest
# while ``__defaults__`` is the same tuple and ``__kwdefaults__`` holds the
# same objects: a default that is a mutable list is walked at every call, as
# mutating it changes what the function does.
_DEFAULTS_DIGESTS: Dict[types.CodeType, Tuple[Any, Tuple[Any, ...], bytes]] = {}


def _function_digest(fn: types.FunctionType, seen: set) -> bytes:
    code_d = _code_digest(fn.__code__)
    defaults, kwdefaults, closure = fn.__defaults__, fn.__kwdefaults__, fn.__closure__
    wrapped = fn.__dict__.get("__wrapped__")
    if not (defaults or kwdefaults or closure or wrapped is not None):
        return code_d
    cacheable = closure is None and wrapped is None
    if cacheable:
        kw_values = tuple(kwdefaults.items()) if kwdefaults else ()
        hit = _DEFAULTS_DIGESTS.get(fn.__code__)
        if (
            hit is not None and hit[0] is defaults and len(hit[1]) == len(kw_values)
            and all(a[0] == b[0] and a[1] is b[1] for a, b in zip(hit[1], kw_values))
        ):
            return hit[2]
    if id(fn) in seen:  # a recursive nested function refers to itself
        return b"self"
    seen.add(id(fn))
    try:
        w = _Walker()
        w.buf += code_d
        try:
            w.walk(defaults)
            w.walk(kwdefaults)
        except Exception:
            # An unfingerprintable default counts by its type, the others by value.
            w = _Walker()
            w.buf += code_d + b"?"
            for d in (*(defaults or ()), *sorted((kwdefaults or {}).items())):
                try:
                    w.buf += _Walker().sub_digest(d)
                except Exception:
                    w.buf += b"o" + _str_bytes(_type_name(type(d)))
        if closure:
            for name, cell in zip(fn.__code__.co_freevars, closure):
                w.buf += _str_bytes(name)
                try:
                    v = cell.cell_contents
                except ValueError:  # an empty cell
                    w.buf += b"-"
                    continue
                _closure_part(w, v, seen)
        if wrapped is not None:
            d = _callable_digest(wrapped, seen)
            w.buf += b"W" + (d if d is not None else b"-")
        digest = w.digest()
        if cacheable and all(_is_constant(v) for v in (*(defaults or ()), *(kwdefaults or {}).values())):
            if len(_DEFAULTS_DIGESTS) >= _CACHE_MAX:
                _DEFAULTS_DIGESTS.clear()
            _DEFAULTS_DIGESTS[fn.__code__] = (defaults, kw_values, digest)
        return digest
    finally:
        seen.discard(id(fn))


def _callable_digest(fn: Any, seen: set) -> bytes | None:
    for _ in range(8):
        if isinstance(fn, types.MethodType):
            fn = fn.__func__
        elif isinstance(fn, functools.partial):
            fn = fn.func
        else:
            break
    if isinstance(fn, types.FunctionType):
        return _function_digest(fn, seen)
    if isinstance(fn, type):
        # A class as a step: the code of the methods defined in its body.
        w = _Walker()
        for name, member in sorted(vars(fn).items()):
            if isinstance(member, (staticmethod, classmethod)):
                member = member.__func__
            if isinstance(member, types.FunctionType):
                w.buf += _str_bytes(name) + _function_digest(member, seen)
        return w.digest() if w.buf else None
    wrapped = getattr(fn, "__wrapped__", None)  # functools.lru_cache and the like
    if wrapped is not None and wrapped is not fn:
        return _callable_digest(wrapped, seen)
    call = _class_call(fn)
    if isinstance(call, types.FunctionType):
        return _function_digest(call, seen)
    return None


def fingerprint_code(fn: Callable[..., Any]) -> str | None:
    """A digest of what ``fn`` does: its bytecode, constants and names, recursively.

    Comments, blank lines, docstrings, the file's name and the function's
    name do not count; a changed body, constant or default value does.
    Nested functions, lambdas and comprehensions count through their own
    code. Closure cells count when they hold functions (by their code) or
    constants; any other captured object counts by its type only, since a
    captured memo or counter changes at every call. The globals a function
    calls (another module-level function) are not followed.

    Bound methods and ``functools.partial`` objects are unwrapped, a
    ``functools.wraps`` wrapper counts with the function it wraps, a class
    by the functions in its body, a callable object by its ``__call__``.

    Returns:
        32 hex characters, or None when there is no Python code (a builtin).

    >>> def f(x):
    ...     return x + 1
    >>> def g(x):
    ...     "Add one."
    ...     # a comment
    ...     return x + 1
    >>> fingerprint_code(f) == fingerprint_code(g)
    True
    >>> fingerprint_code(lambda x: x + 2) == fingerprint_code(f)
    False
    >>> fingerprint_code(len) is None
    True
    """
    d = _callable_digest(fn, set())
    return None if d is None else d.hex()


# -- records ------------------------------------------------------------------


def _fn_name(fn: Any) -> str:
    target = fn
    for _ in range(8):
        if isinstance(target, types.MethodType):
            target = target.__func__
        elif isinstance(target, functools.partial):
            target = target.func
        else:
            break
    name = getattr(target, "__qualname__", None) or getattr(target, "__name__", None)
    return str(name) if name else type(target).__qualname__


def fingerprint(fn: Callable[..., Any], args: Tuple[Any, ...], kwargs: Dict[str, Any]) -> Dict[str, Any]:
    """The whole record for an entry's metadata: inputs, code and names.

    >>> def f(x):
    ...     return x
    >>> rec = fingerprint(f, (1,), {})
    >>> sorted(rec), rec["fn"], rec["args"]
    (['args', 'code', 'fn', 'unhashable', 'v'], 'f', {'x': '1'})
    """
    rec = fingerprint_inputs(fn, args, kwargs)
    return {"v": FORMAT_VERSION, "fn": _fn_name(fn), "code": fingerprint_code(fn), **rec}


def _is_inline(fp: Any) -> bool:
    return isinstance(fp, str) and len(fp) <= _INLINE_REPR


def compare(old: Dict[str, Any], new: Dict[str, Any]) -> List[str]:
    """What differs between two records, in words; empty when nothing does.

    An argument that was unfingerprintable on either side is never reported
    (see the ``unhashable`` part of the records to mention it). Records of
    another ``FORMAT_VERSION``, or an empty old record (an entry saved
    before fingerprints existed), compare as unchanged. Partial records
    (only ``fingerprint_inputs``, only ``code``) compare on what they hold.

    >>> compare({"args": {"x": "1", "y": "2"}}, {"args": {"x": "1", "y": "3", "z": "0"}})
    ["argument 'y' changed (2 -> 3)", "argument 'z' added"]
    >>> compare({"fn": "f", "code": "a" * 32}, {"fn": "f", "code": "b" * 32})
    ['code of f changed']
    """
    if not old or not new or old.get("v", FORMAT_VERSION) != new.get("v", FORMAT_VERSION):
        return []
    out: List[str] = []
    old_args, new_args = old.get("args") or {}, new.get("args") or {}
    old_un, new_un = old.get("unhashable") or {}, new.get("unhashable") or {}
    if "args" in old and "args" in new:
        for name, fp in new_args.items():
            if name in old_args:
                before = old_args[name]
                if before != fp:
                    detail = f" ({before} -> {fp})" if _is_inline(before) and _is_inline(fp) else ""
                    out.append(f"argument {name!r} changed{detail}")
            elif name not in old_un:
                out.append(f"argument {name!r} added")
        for name in old_args:
            if name not in new_args and name not in new_un:
                out.append(f"argument {name!r} removed")
    old_code, new_code = old.get("code"), new.get("code")
    if old_code and new_code and old_code != new_code:
        out.append(f"code of {new.get('fn') or old.get('fn') or 'the function'} changed")
    return out


def describe(key: str, changes: List[str]) -> str:
    """One line for the warning about a stale entry.

    >>> describe("iter-000/train", ["argument 'x' changed", "code of train changed"])
    "checkpoint 'iter-000/train' was saved for another call: argument 'x' changed; code of train changed"
    """
    return f"checkpoint {key!r} was saved for another call: {'; '.join(changes)}"

