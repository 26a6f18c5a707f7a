"""One code object's bytecode digest: what the code does under this interpreter.

The fallback where there is no source to parse (code built by ``exec``, a
``-c`` script, a ``.pyc``-only install) or the source no longer matches the
running code, and the check that a parsed source is what runs. A bytecode
digest is tagged with the interpreter (``BYTECODE_TAG``): digests of two
tags are never compared, so another Python reports "cannot compare", not
"changed".
"""

from __future__ import annotations

import dis
import sys
import types
from typing import Dict

from ._walk import _CACHE_MAX, _pack_Q, _Walker

__all__ = ["BYTECODE_TAG"]

# Which bytecode a bytecode digest was made from: "cpython-311". Digests of
# two tags are never compared.
BYTECODE_TAG: str = (sys.implementation.cache_tag
                     or f"{sys.implementation.name}-{sys.version_info[0]}{sys.version_info[1]}")


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


def _hash_bytes(data: bytes) -> bytes:
    """A digest of raw bytes, made as the walker makes its digests."""
    w = _Walker()
    w.buf += data
    return w.digest()
