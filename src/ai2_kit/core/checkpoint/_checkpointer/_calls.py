"""What a wrapper knows of a call before any store: its key, its call site, the function it wraps.

Key resolution (a string or a function of ``FnInfo``), the one-frame call
site, the staleness policy's names, what ``functools.update_wrapper`` would
copy from a function (worked out once per function) and how a wrapper object
tells ``inspect`` that it is a coroutine function.
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import sys
import types
import weakref
from typing import Any, Callable, NamedTuple, Union

from .._keys import validate_key

__all__ = [
    "FnInfo",
    "Key",
    "KeyFn",
    "_FN_STATE",
    "_call_site",
    "_check_policy",
    "_fn_state",
    "_lookup_qualname",
    "_mark_coroutine_function",
    "_resolve_key",
]


class FnInfo(NamedTuple):
    """What a key function is given: the call it names."""

    fn_name: str
    args: tuple
    kwargs: dict
    call_site: str


KeyFn = Callable[[FnInfo], str]
Key = Union[str, KeyFn]


def _call_site(depth: int) -> str:
    # One frame lookup, not inspect.stack(), which walks the whole stack and
    # reads source lines: this runs on every save and every key function call.
    try:
        frame = sys._getframe(depth + 1)
    except ValueError:
        return "?"
    return f"{frame.f_code.co_filename}:{frame.f_lineno}"


_POLICIES = ("warn", "rerun", "ignore")


def _check_policy(policy: str) -> str:
    if policy not in _POLICIES:
        raise ValueError(f"stale must be one of {', '.join(map(repr, _POLICIES))}, not {policy!r}")
    return policy


def _resolve_key(key: Key, fn: Callable[..., Any], args: tuple, kwargs: dict, site: str) -> str:
    if isinstance(key, str):
        return validate_key(key)
    if callable(key):
        return validate_key(key(FnInfo(getattr(fn, "__name__", repr(fn)), args, kwargs, site)))
    return validate_key(key)


def _lookup_qualname(fn: Any) -> Any:
    module = sys.modules.get(getattr(fn, "__module__", None) or "")
    qualname = getattr(fn, "__qualname__", "")
    if module is None or not qualname or "<" in qualname:
        return None
    obj: Any = module
    for part in qualname.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            return None
    return obj


#: What ``functools.update_wrapper`` would copy, per wrapped function, worked
#: out once: workflows make a wrapper per call (``apply_checkpoint(key)(f)(x)``),
#: and a hit should not pay for copying the attributes one by one. Weak keys: the
#: entry goes with its function (the values never refer to it).
_FN_STATE: weakref.WeakKeyDictionary[Any, tuple[dict[str, Any], str, bool]] = weakref.WeakKeyDictionary()
_WRAPPER_ATTRS = functools.WRAPPER_ASSIGNMENTS


def _fn_state(fn: Callable[..., Any]) -> tuple[dict[str, Any], str, bool]:
    """(attributes to copy, qualified name, is a coroutine function) of ``fn``."""
    try:
        got = _FN_STATE.get(fn)
    except TypeError:  # not weakly referable (nor hashable): worked out each time
        got = None
    if got is not None:
        return got
    attrs: dict[str, Any] = {}
    for attr in _WRAPPER_ATTRS:
        try:
            attrs[attr] = getattr(fn, attr)
        except AttributeError:
            pass
    qualname = getattr(fn, "__qualname__", None) or getattr(fn, "__name__", None) or repr(fn)
    state = (attrs, str(qualname), inspect.iscoroutinefunction(fn))
    try:
        _FN_STATE[fn] = state
    except TypeError:
        pass
    return state


def _mark_coroutine_function(wrapper: Any, fn: Any) -> None:
    # The wrapper is an object (so that it pickles by description) whose call
    # returns a coroutine; tell inspect it is async. Python 3.12+ has a
    # marker; before, inspect accepts objects that look like functions, so
    # lend it the code object, which carries the coroutine flag.
    marker = getattr(asyncio.coroutines, "_is_coroutine", None)
    if marker is not None:  # what asyncio.iscoroutinefunction looks for
        wrapper._is_coroutine = marker
    mark = getattr(inspect, "markcoroutinefunction", None)
    if mark is not None:
        mark(wrapper)
        return
    code = getattr(fn, "__code__", None)
    if isinstance(code, types.CodeType):
        wrapper.__code__ = code
        wrapper.__defaults__ = getattr(fn, "__defaults__", None)
        wrapper.__kwdefaults__ = getattr(fn, "__kwdefaults__", None)

