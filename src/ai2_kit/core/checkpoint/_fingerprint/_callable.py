"""Functions as values: a callable's digest (code, defaults, closure), and records version 1.

``fingerprint_code`` digests one callable as the user passed it: bound
methods and partials unwrapped, its source (or tagged bytecode), its
default values and closure cells; the globals it calls are not followed
(that is ``_code.code_part``). The same digest is what the canonical walk
(``_walk``) writes for a function or code object met inside an argument,
registered here. ``legacy_code`` gives the bytecode-only digest of records
version 1, to compare with them like with like.
"""

from __future__ import annotations

import enum
import functools
import types
from typing import Any, Callable, Dict, Tuple

from ._bind import _class_call
from ._bytecode import _code_digest, _hash_bytes
from ._source import _class_digest, _portable_digest
from ._walk import _CACHE_MAX, _EXACT, _str_bytes, _type_name, _Walker

__all__ = ["fingerprint_code", "legacy_code", "unwrap_bound"]

_SCALARS = (type(None), bool, int, float, complex, str, bytes)


def _closure_part(w: _Walker, v: Any, seen: set, legacy: bool) -> None:
    # Closure cells count as code when they hold code (helpers, the function
    # a decorator wraps) or constants; mutable objects count by type only: a
    # memo dict or a counter in a closure changes at every call, and would
    # otherwise make every hit look stale.
    if isinstance(v, (types.FunctionType, types.MethodType, functools.partial)):
        d = _callable_digest(v, seen, legacy)
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
# One cache per rule (version 1: bytecode; now: source).
_DEFAULTS_DIGESTS: Dict[bool, Dict[types.CodeType, Tuple[Any, Tuple[Any, ...], bytes]]] = {False: {}, True: {}}


def _function_digest(fn: types.FunctionType, seen: set, legacy: bool = False) -> bytes:
    """A function as a value: its code, defaults and closure (version 1: bytecode)."""
    code_d = _code_digest(fn.__code__) if legacy else _portable_digest(fn.__code__)
    defaults, kwdefaults, closure = fn.__defaults__, fn.__kwdefaults__, fn.__closure__
    wrapped = fn.__dict__.get("__wrapped__")
    if not (defaults or kwdefaults or closure or wrapped is not None):
        return code_d
    cacheable = closure is None and wrapped is None
    if cacheable:
        kw_values = tuple(kwdefaults.items()) if kwdefaults else ()
        cache = _DEFAULTS_DIGESTS[legacy]
        hit = cache.get(fn.__code__)
        if (
            hit is not None and hit[0] is defaults and len(hit[1]) == len(kw_values)
            and all(a[0] == b[0] and a[1] is b[1] for a, b in zip(hit[1], kw_values))
        ):
            return hit[2]
    if id(fn) in seen:  # a recursive nested function refers to itself
        return b"self"
    seen.add(id(fn))
    try:
        w = _Walker(legacy=legacy)
        w.buf += code_d
        try:
            w.walk(defaults)
            w.walk(kwdefaults)
        except Exception:
            # An unfingerprintable default counts by its type, the others by value.
            w = _Walker(legacy=legacy)
            w.buf += code_d + b"?"
            for d in (*(defaults or ()), *sorted((kwdefaults or {}).items())):
                try:
                    w.buf += _Walker(legacy=legacy).sub_digest(d)
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
                _closure_part(w, v, seen, legacy)
        if wrapped is not None:
            d = _callable_digest(wrapped, seen, legacy)
            w.buf += b"W" + (d if d is not None else b"-")
        digest = w.digest()
        if cacheable and all(_is_constant(v) for v in (*(defaults or ()), *(kwdefaults or {}).values())):
            if len(cache) >= _CACHE_MAX:
                cache.clear()
            cache[fn.__code__] = (defaults, kw_values, digest)
        return digest
    finally:
        seen.discard(id(fn))


def unwrap_bound(fn: Any) -> Any:
    """The function under bound methods and ``functools.partial`` layers (at most 8)."""
    for _ in range(8):
        if isinstance(fn, types.MethodType):
            fn = fn.__func__
        elif isinstance(fn, functools.partial):
            fn = fn.func
        else:
            break
    return fn


def _callable_digest(fn: Any, seen: set, legacy: bool = False) -> bytes | None:
    fn = unwrap_bound(fn)
    if isinstance(fn, types.FunctionType):
        return _function_digest(fn, seen, legacy)
    if isinstance(fn, type):
        if not legacy:
            d = _class_digest(fn)
            if d is not None:
                return d
        # A class as a step: the code of the methods defined in its body.
        w = _Walker(legacy=legacy)
        for name, member in sorted(vars(fn).items()):
            if isinstance(member, (staticmethod, classmethod)):
                member = member.__func__
            if isinstance(member, types.FunctionType):
                w.buf += _str_bytes(name) + _function_digest(member, seen, legacy)
        return w.digest() if w.buf else None
    wrapped = getattr(fn, "__wrapped__", None)  # functools.lru_cache and the like
    if wrapped is not None and wrapped is not fn:
        return _callable_digest(wrapped, seen, legacy)
    call = _class_call(fn)
    if isinstance(call, types.FunctionType):
        return _function_digest(call, seen, legacy)
    return None


# -- functions and code objects as values --------------------------------------


def _enc_code(w: _Walker, x: types.CodeType) -> None:
    w.funcs = True
    w.buf += b"K" + (_code_digest(x) if w.legacy else _portable_digest(x))


def _enc_function(w: _Walker, x: types.FunctionType) -> None:
    w.funcs = True
    w.buf += b"P" + _str_bytes(_type_name(x)) + _function_digest(x, set(), w.legacy)


_EXACT[types.CodeType] = _enc_code
_EXACT[types.FunctionType] = _enc_function


def fingerprint_code(fn: Callable[..., Any]) -> str | None:
    """A digest of what ``fn`` does: its source as parsed, defaults and closure.

    Comments, blank lines, docstrings, the file's name, the function's name,
    its decorators and the Python version do not count; a changed body,
    constant or default value does. Nested functions, lambdas and
    comprehensions count as part of the source. Closure cells count when
    they hold functions (by their code) or constants; any other captured
    object counts by its type only, since a captured memo or counter changes
    at every call. Without source, the bytecode counts (tagged with the
    interpreter). The globals a function calls are not followed here (see
    ``code_part``).

    Bound methods and ``functools.partial`` objects are unwrapped, a
    ``functools.wraps`` wrapper counts with the function it wraps, a class
    by its class statement, a callable object by its ``__call__``.

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
    return None if d is None else _hash_bytes(d).hex() if len(d) != 16 else d.hex()


def legacy_code(fn: Callable[..., Any]) -> str | None:
    """The code digest of records version 1 (bytecode, constants and defaults), to compare with them."""
    d = _callable_digest(fn, set(), legacy=True)
    return None if d is None else d.hex()
