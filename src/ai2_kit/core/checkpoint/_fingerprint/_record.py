"""A call's record and its digests: what a save stores and what a hit compares first.

``fingerprint`` builds the whole record (inputs, code, helpers, environment)
with its ``call_digest``; ``hit_digest`` gives that same digest without the
record for the usual short call (a plain function, no keywords, short
scalar arguments). Both take the parts that are the same for every call of
a function from one per-process cache (``_BASES``) and the arguments'
fingerprints by the same rules (``_short_inputs``), so the two cannot
disagree: where the short way cannot be sure, it answers None and the
full way decides.
"""

from __future__ import annotations

import hashlib
import types
import weakref
from typing import Any, Callable, Dict, Optional, Tuple

from ._bind import _LAYOUTS, _bind_function, _BindError, _inputs
from ._bytecode import BYTECODE_TAG
from ._callable import unwrap_bound
from ._code import CodePart, _validity, code_part
from ._env import environment
from ._walk import _inline

__all__ = ["FORMAT_VERSION", "Record", "fingerprint", "call_digest", "hit_digest"]

FORMAT_VERSION = 2


class Record(dict):  # type: ignore[type-arg]
    """A record (a plain dict for JSON) that also carries, unsaved, what comparing
    with a version-1 record needs: the function and the arguments whose digest
    differs under version-1 rules."""

    __slots__ = ("fn_obj", "legacy_args", "digest")
    fn_obj: Any
    legacy_args: Dict[str, str]
    #: ``call_digest`` of the record: what a hit compares before anything else.
    digest: str


#: (id of a CodePart, id of an environment dict) -> (the two, digest of the
#: parts that are the same for every call of a function in this process).
_STATIC: Dict[Tuple[int, int], Tuple[Any, Any, bytes]] = {}


def _static_digest(part: CodePart, env: Dict[str, Any]) -> bytes:
    # Both objects are cached for the life of the process (code_part,
    # environment): their ids name them while we hold them here.
    k = (id(part), id(env))
    got = _STATIC.get(k)
    if got is not None and got[0] is part and got[1] is env:
        return got[2]
    helpers = sorted((name, list(v)) for name, v in (part.helpers or {}).items())
    text = repr((FORMAT_VERSION, part.code, BYTECODE_TAG, helpers, env.get("python"),
                 sorted((env.get("packages") or {}).items())))
    digest = hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=16).digest()
    if len(_STATIC) >= 4096:
        _STATIC.clear()
    _STATIC[k] = (part, env, digest)
    return digest


def call_digest(static: bytes, inputs: Dict[str, Any]) -> str:
    """One digest of everything ``judge`` compares: equal digests, nothing to report.

    A hit compares this one string first, and reads and compares the whole
    records only when it differs (or is missing: entries saved before it
    existed). Unequal digests do not mean stale (``**kwargs`` items passed
    in another order, say: the digest follows the record's order, which is
    the parameters' and then the call's): the records decide then.
    """
    return _seal(static, repr((inputs["args"], inputs["unhashable"])))


_blake2b = hashlib.blake2b


def _seal(static: bytes, text: str) -> str:
    """The call digest from its two halves: the function's static digest and the text of its inputs.

    The one hash of ``call_digest`` and ``hit_digest``: ``text`` is always
    ``repr((args, unhashable))`` of the record's two input dicts, whichever
    of the two writes it.
    """
    # The static digest as a prefix (fixed length): cheaper than a keyed hash here.
    return _blake2b(static + text.encode("utf-8", "surrogatepass"), digest_size=16).hexdigest()


#: Plain functions -> (validity, the record's parts that are the same for
#: every call, static digest): a hit's fingerprint is then its arguments'.
#: Weak keys, as code_part's cache (whose validity rule this follows).
_BASES: weakref.WeakKeyDictionary[Any, Tuple[Tuple[int, ...], Dict[str, Any], bytes]] = weakref.WeakKeyDictionary()


def _fn_name(fn: Any) -> str:
    target = unwrap_bound(fn)
    name = getattr(target, "__qualname__", None) or getattr(target, "__name__", None)
    return str(name) if name else type(target).__qualname__


def fingerprint(fn: Callable[..., Any], args: Tuple[Any, ...], kwargs: Dict[str, Any]) -> Dict[str, Any]:
    """The whole record for an entry's metadata: inputs, code, helpers, environment.

    The code side is computed once per function per process (``code_part``).

    >>> def f(x):
    ...     return x
    >>> rec = fingerprint(f, (1,), {})
    >>> sorted(rec), rec["fn"], rec["args"]
    (['args', 'bc', 'code', 'env', 'fn', 'unhashable', 'v'], 'f', {'x': '1'})
    """
    # A save's usual call: the parts cached, short scalar arguments.
    short = _short_inputs(fn, args, kwargs)
    if short is not None:
        (base, static), digests = short
        # Short scalars digest the same under version 1 rules: no legacy_args.
        return _record(fn, base, static, {"args": digests, "unhashable": {}}, {})
    inputs, legacy_args = _inputs(fn, args, kwargs)
    got = _valid_base(fn) if type(fn) is types.FunctionType else None
    if got is not None:
        base, static = got[1], got[2]
    else:
        part = code_part(fn)
        base = {"v": FORMAT_VERSION, "fn": _fn_name(fn), "code": part.code, "bc": BYTECODE_TAG}
        if part.helpers:
            base["helpers"] = dict(part.helpers)
        env = base["env"] = environment(part.imports)
        static = _static_digest(part, env)
        if type(fn) is types.FunctionType and "__wrapped__" not in fn.__dict__:
            _BASES[fn] = (_validity([fn]), base, static)
    return _record(fn, base, static, inputs, legacy_args)


def _record(fn: Callable[..., Any], base: Dict[str, Any], static: bytes, inputs: Dict[str, Any],
            legacy_args: Dict[str, str]) -> Record:
    """A call's record: its function's parts (maybe the cached ones) and its inputs, with its digest."""
    rec = Record(base)
    if "helpers" in rec:  # the caller may change its record: never the cached one's parts
        rec["helpers"] = dict(rec["helpers"])
    rec.update(inputs)
    rec.fn_obj = fn
    rec.legacy_args = legacy_args
    rec.digest = call_digest(static, inputs)
    return rec


#: Code object -> ``repr(name) + ": "`` of each positional parameter: the
#: fixed pieces of a positional call's digest text (``hit_digest``); False
#: for functions with keyword-only parameters (bound the general way).
_HEADS: Dict[types.CodeType, Any] = {}


def _heads(code: types.CodeType) -> Any:
    """``_HEADS``'s entry for ``code``, made once; None before its layout is known."""
    lay = _LAYOUTS.get(code)  # there once the function was fingerprinted (_BASES)
    if lay is None:
        return None
    if len(_HEADS) >= 4096:
        _HEADS.clear()
    heads = _HEADS[code] = False if lay.kwonly else tuple(repr(name) + ": " for name in lay.pos)
    return heads


def _valid_base(fn: types.FunctionType) -> Optional[Tuple[Any, Dict[str, Any], bytes]]:
    """A plain function's cached record parts (``_BASES``) while they still hold, else None."""
    if "__wrapped__" in fn.__dict__:
        return None
    got = _BASES.get(fn)
    if got is None:
        return None
    # _validity([fn]), written out for the common function without a closure.
    valid = (id(fn.__defaults__), id(fn.__kwdefaults__)) if fn.__closure__ is None else _validity([fn])
    return got if got[0] == valid else None


def _short_inputs(
    fn: Callable[..., Any], args: Tuple[Any, ...], kwargs: Dict[str, Any]
) -> Optional[Tuple[Tuple[Dict[str, Any], bytes], Dict[str, str]]]:
    """((cached record parts, static digest), argument fingerprints) the short way, or None.

    ``hit_digest``'s conditions and rules (a plain function with valid cached
    parts, no keywords, every argument kept as its ``repr``): the same
    argument fingerprints ``_inputs`` gives then, without unwrapping, the
    walk, or the version-1 digests (which short scalars do not have). A miss
    builds its record this way after ``hit_digest`` found no entry.
    """
    if kwargs or type(fn) is not types.FunctionType:
        return None
    got = _valid_base(fn)
    if got is None:
        return None
    lay = _LAYOUTS.get(fn.__code__)
    if lay is not None and len(args) == len(lay.pos) and not lay.kwonly:
        names: Any = lay.pos
        values: Any = args
    else:
        try:
            bound = _bind_function(fn, args, kwargs)
        except _BindError:
            return None
        names, values = bound.keys(), bound.values()
    digests: Dict[str, str] = {}
    for name, value in zip(names, values):
        r = _inline(value)
        if r is None:
            return None
        digests[name] = r
    return (got[1], got[2]), digests


def hit_digest(fn: Callable[..., Any], args: Tuple[Any, ...], kwargs: Dict[str, Any]) -> Optional[str]:
    """``fingerprint(fn, args, kwargs).digest`` without building the record, or None.

    What a hit compares (``call_digest``), the short way: for a plain
    function whose record parts are cached and valid (``_BASES``), called
    without keywords, with arguments that are all kept as their ``repr``
    (short ints, strings, floats, booleans, None). The same cached parts
    and validity rule (``_valid_base``), the same argument fingerprints
    (``_inline``, ``_short_inputs``) and the same hash (``_seal``) as
    ``fingerprint`` give the same digest; anything else answers None, and
    the caller fingerprints in full. Never raises.
    """
    if kwargs or type(fn) is not types.FunctionType:
        return None
    try:
        got = _valid_base(fn)
        if got is None:
            return None
        code = fn.__code__
        heads: Any = _HEADS.get(code)
        if heads is None:
            heads = _heads(code)
        if (heads and len(heads) == len(args)) or (heads == () and not args):
            # Every parameter passed by position (_bind_function's answer is
            # then the parameters in order): call_digest's text, written
            # straight from the pieces, as repr would join them.
            parts = []
            r: Optional[str]
            for head, value in zip(heads, args):
                if type(value) is int and -(10 ** 20) < value < 10 ** 20:
                    r = repr(value)  # _inline's first case, without a call
                else:
                    r = _inline(value)
                    if r is None:
                        return None
                parts.append(head + repr(r))
            text = "({" + ", ".join(parts) + "}, {})"
            return _seal(got[2], text)
        short = _short_inputs(fn, args, kwargs)  # None: the canonical walk's business
        return None if short is None else call_digest(got[2], {"args": short[1], "unhashable": {}})
    except Exception:  # never let a staleness check break a workflow: the full way decides
        return None
