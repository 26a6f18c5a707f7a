"""Binding a call to its parameters, and the fingerprints of its arguments."""

from __future__ import annotations

import functools
import inspect
import types
from typing import Any, Callable, Dict, NamedTuple, Tuple

from ._walk import _CACHE_MAX, UnfingerprintableError, _digest_walk, _inline

__all__ = ["fingerprint_inputs"]


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
        # Read from the code object: inspect.signature is far slower and
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
    return _inputs(fn, args, kwargs)[0]


def _inputs(
    fn: Callable[..., Any], args: Tuple[Any, ...], kwargs: Dict[str, Any]
) -> Tuple[Dict[str, Any], Dict[str, str]]:
    """``fingerprint_inputs``, and the digests under version 1 rules of the
    arguments where they differ (values holding functions, digested by
    bytecode then, by source now), to compare with records of version 1."""
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
    legacy: Dict[str, str] = {}
    for name, value in bound.items():
        r = _inline(value)
        if r is not None:
            digests[name] = r
            continue
        try:
            digests[name], funcs = _digest_walk(value)
            if funcs:
                legacy[name] = _digest_walk(value, legacy=True)[0]
        except UnfingerprintableError as e:
            unhashable[name] = f"{e.type_name}: {e.reason}"
        except Exception as e:
            # A broken __reduce__ or __eq__-only proxy must not break the
            # step: the argument is recorded as unchecked, with the reason.
            unhashable[name] = f"{type(value).__name__}: {type(e).__name__}: {e}"
    return {"args": digests, "unhashable": unhashable}, legacy

