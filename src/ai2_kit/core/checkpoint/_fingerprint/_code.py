"""The code side of a step's record: its own code and the user's helpers it reaches.

``code_part`` follows the user's own code from a step: the functions and
classes it refers to through its module's globals (and the attributes it
uses of the user's own modules), its closure and its default arguments,
recursively, but only those defined in the user's own source files (not
the standard library, not installed packages, not this package), with a
bounded depth and count. Each is digested by its source (``_source``), else
its tagged bytecode (``_bytecode``). It is computed once per function per
process, and notes the top-level modules those functions' modules import
(the environment's distributions are looked up from them: ``_env``).
"""

from __future__ import annotations

import enum
import functools
import linecache
import os
import sys
import sysconfig
import types
import weakref
from typing import Any, Callable, Dict, FrozenSet, List, NamedTuple, Set, Tuple

from ._bind import _class_call
from ._bytecode import _code_digest, _hash_bytes
from ._callable import _is_constant
from ._source import _ast_digest, _class_pair, _methods
from ._walk import _CACHE_MAX, _str_bytes, _type_name, _Walker

__all__ = ["code_part", "CodePart", "MAX_HELPER_DEPTH", "MAX_HELPERS"]

# How far and how wide the helpers of one step are followed: enough for a
# script's own call tree, bounded for a module that imports a big package
# of the user's own (every helper costs its source's parse once per process).
MAX_HELPER_DEPTH = 8
MAX_HELPERS = 200


class CodePart(NamedTuple):
    """The code side of a record, the same for every call of one function."""

    code: str | None  # the step's own code: "<source hex>.<bytecode hex>", "-" for no source
    helpers: Dict[str, List[str]]  # name -> [code, name of the function or class that refers to it]
    imports: FrozenSet[str]  # top-level modules that the modules of the step and its helpers import


def _pair_text(a: bytes | None, b: bytes) -> str:
    return f"{a.hex() if a is not None else '-'}.{b.hex()}"


_EXCLUDED_DIRS: Tuple[str, ...] | None = None
_USER_FILES: Dict[str, bool] = {}


def _excluded_dirs() -> Tuple[str, ...]:
    global _EXCLUDED_DIRS
    if _EXCLUDED_DIRS is None:
        dirs: Set[str] = set()
        for scheme_key in ("stdlib", "platstdlib", "purelib", "platlib"):
            p = sysconfig.get_paths().get(scheme_key)
            if p:
                dirs.add(os.path.realpath(p))
        for base in {sys.base_prefix, sys.base_exec_prefix}:
            dirs.add(os.path.realpath(sysconfig.get_paths(vars={"base": base, "platbase": base})["stdlib"]))
        # This package: its own functions are never a user's helpers.
        dirs.add(os.path.realpath(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
        _EXCLUDED_DIRS = tuple(sorted(d.rstrip(os.sep) + os.sep for d in dirs))
    return _EXCLUDED_DIRS


def _is_user_file(filename: str | None) -> bool:
    """Whether ``filename`` is the user's own source (not stdlib, installed packages or ours)."""
    if not filename:
        return False
    if filename.startswith("<"):
        # Notebook cells registered with linecache (IPython) are the user's;
        # "<string>" (exec, dataclass-made methods) and "<frozen ...>" are not.
        return filename in linecache.cache and not filename.startswith("<frozen")
    known = _USER_FILES.get(filename)
    if known is None:
        path = os.path.realpath(filename)
        parts = path.split(os.sep)
        known = ("site-packages" not in parts and "dist-packages" not in parts
                 and not path.startswith(_excluded_dirs()))
        if len(_USER_FILES) >= _CACHE_MAX:
            _USER_FILES.clear()
        _USER_FILES[filename] = known
    return known


def _file_of(obj: Any) -> str | None:
    if isinstance(obj, types.FunctionType):
        return obj.__code__.co_filename
    if isinstance(obj, types.ModuleType):
        return getattr(obj, "__file__", None)
    if isinstance(obj, type):
        f = getattr(sys.modules.get(obj.__module__), "__file__", None)
        if f:
            return f  # type: ignore[no-any-return]
        for m in _methods(obj):
            return m.__code__.co_filename
    return None


_NAMES: Dict[types.CodeType, Tuple[str, ...]] = {}


def _names(co: types.CodeType) -> Tuple[str, ...]:
    """Every global and attribute name the code (and its nested code) uses, sorted."""
    hit = _NAMES.get(co)
    if hit is None:
        found: Set[str] = set()
        stack = [co]
        while stack:
            c = stack.pop()
            found.update(c.co_names)
            stack.extend(k for k in c.co_consts if type(k) is types.CodeType)
        hit = tuple(sorted(found))
        if len(_NAMES) >= _CACHE_MAX:
            _NAMES.clear()
        _NAMES[co] = hit
    return hit


def _as_unit(v: Any) -> Tuple[Any, type | None]:
    """The function or class a referred-to object stands for, and the class it belongs to."""
    owner: type | None = None
    for _ in range(8):
        if isinstance(v, types.MethodType):
            self = v.__self__
            owner = self if isinstance(self, type) else type(self)
            v = v.__func__
        elif isinstance(v, (staticmethod, classmethod)):
            v = v.__func__
        elif isinstance(v, functools.partial):
            v = v.func
        elif not isinstance(v, (types.FunctionType, type)) and callable(getattr(v, "__wrapped__", None)):
            v = v.__wrapped__  # functools.lru_cache and the like
        else:
            break
    if isinstance(v, (types.FunctionType, type)):
        return v, owner
    if isinstance(v, types.ModuleType) or v is None:
        return None, None
    t = type(v)
    if t.__module__ not in ("builtins",) and not isinstance(v, (enum.Enum, type)):
        return t, None  # an instance the step uses: the code is its class's
    return None, None


def _display(unit: Any, home: str) -> str:
    name = getattr(unit, "__qualname__", None) or getattr(unit, "__name__", "?")
    if isinstance(unit, types.FunctionType) and "__wrapped__" in unit.__dict__:
        name = f"{name} (wrapper)"  # functools.wraps copied the wrapped function's name
    module = getattr(unit, "__module__", None)
    return str(name) if module == home or not module else f"{module}.{name}"


def _closure_values(fn: types.FunctionType) -> Tuple[Any, ...]:
    out = []
    for cell in fn.__closure__ or ():
        try:
            out.append(cell.cell_contents)
        except ValueError:  # an empty cell
            out.append(_EMPTY)
    return tuple(out)


_EMPTY = object()


def _unit_pair(unit: Any, owner: type | None) -> Tuple[bytes | None, bytes, List[Tuple[Any, type | None]]]:
    """(source digest, bytecode digest, referred objects with their class) of a function or class."""
    if isinstance(unit, type):
        a, b = _class_pair(unit)
        refs: List[Tuple[Any, type | None]] = [(base, None) for base in unit.__bases__ if base is not object]
        for f in _methods(unit):
            # No owner: the class's own methods are in its digest already.
            refs.extend(_function_refs(f, None))
        return a, b, refs
    co = unit.__code__
    a = _ast_digest(co, unit.__globals__)
    b = _code_digest(co)
    refs = _function_refs(unit, owner)
    if unit.__closure__:
        # Captured constants are code (a factory's parameters); captured
        # mutable objects count by type only: a memo or a counter changes at
        # every call. Captured functions and classes are helpers (in refs).
        w = _Walker()
        for name, v in zip(co.co_freevars, _closure_values(unit)):
            w.buf += _str_bytes(name)
            if v is _EMPTY:
                w.buf += b"-"
            elif isinstance(v, (types.ModuleType, enum.Enum)) or _is_constant(v):
                w.walk(v)
            else:
                w.buf += b"o" + _str_bytes(_type_name(type(v)))
        cells = bytes(w.buf)
        a = None if a is None else _hash_bytes(a + cells)
        b = _hash_bytes(b + cells)
    return a, b, refs


def _function_refs(fn: types.FunctionType, owner: type | None) -> List[Tuple[Any, type | None]]:
    """What ``fn`` refers to that may be code: globals, user modules' attributes, closure, defaults."""
    names = _names(fn.__code__)
    g = fn.__globals__
    refs: List[Tuple[Any, type | None]] = []
    for n in names:
        v = g.get(n, _EMPTY)
        if v is _EMPTY:
            continue
        if isinstance(v, types.ModuleType):
            if _is_user_file(_file_of(v)):
                # ``helpers.scale(x)``: the attribute names the code uses, on
                # the user's own module.
                mod = vars(v)
                refs.extend((mod[m], None) for m in names if m in mod)
            continue
        refs.append((v, None))
    if fn.__closure__:
        refs.extend((v, None) for v in _closure_values(fn) if v is not _EMPTY)
    refs.extend((v, None) for v in fn.__defaults__ or ())
    refs.extend((v, None) for v in (fn.__kwdefaults__ or {}).values())
    if owner is not None:
        # ``self.other(x)``: methods of the step's own class that it uses.
        for n in names:
            for klass in owner.__mro__:
                if n in klass.__dict__:
                    member = klass.__dict__[n]
                    if isinstance(member, (types.FunctionType, staticmethod, classmethod)):
                        refs.append((member, owner))
                    break
    wrapped = fn.__dict__.get("__wrapped__")
    if wrapped is not None:
        refs.append((wrapped, owner))
    return refs


def _root_units(fn: Any) -> Tuple[List[Any], type | None]:
    """The functions (or class) whose code is a step's own code, and its class."""
    owner: type | None = None
    for _ in range(8):
        if isinstance(fn, types.MethodType):
            self = fn.__self__
            owner = self if isinstance(self, type) else type(self)
            fn = fn.__func__
        elif isinstance(fn, functools.partial):
            fn = fn.func
        elif isinstance(fn, (types.FunctionType, type)):
            break
        elif callable(getattr(fn, "__wrapped__", None)) and getattr(fn, "__wrapped__", None) is not fn:
            fn = fn.__wrapped__
        else:
            call = _class_call(fn)
            if isinstance(call, types.FunctionType):
                owner, fn = type(fn), call
            break
    if isinstance(fn, type):
        return [fn], None
    if not isinstance(fn, types.FunctionType):
        return [], None
    units = [fn]
    # A functools.wraps wrapper and the function it wraps are one step.
    while len(units) < 8:
        wrapped = units[-1].__dict__.get("__wrapped__")
        if not isinstance(wrapped, types.FunctionType) or wrapped in units:
            break
        units.append(wrapped)
    return units, owner


# Weak keys: a cache must not keep alive a function made in a loop, nor what
# its closure holds (a captured array). The entry goes with its function.
_PARTS: weakref.WeakKeyDictionary[Any, Dict[Any, Tuple[Tuple[int, ...], CodePart]]] = weakref.WeakKeyDictionary()


def _validity(units: List[Any]) -> Tuple[int, ...]:
    # What may change in a function without a new function object: its
    # defaults and its closure cells (the rest, its code, cannot). Kept as
    # ids, not the objects: they live as long as the function does.
    out: List[int] = []
    for u in units:
        if isinstance(u, types.FunctionType):
            out.append(id(u.__defaults__))
            out.append(id(u.__kwdefaults__))
            if u.__closure__:
                out.extend(map(id, _closure_values(u)))
    return tuple(out)


def code_part(fn: Callable[..., Any]) -> CodePart:
    """The code side of a step's record: its own code and its helpers', computed once.

    Cached per function (and per class, for a bound method's owner) for the
    life of the process: a hit pays a dictionary lookup for it, the first
    call the parse and compile of the step's source files (figures:
    benchmarks/bench_fingerprint.py, docs/performance.md). A global
    rebound while the process runs (``scale = other``) is seen by the next
    process, not this one.
    """
    units, owner = _root_units(fn)
    if not units:
        return CodePart(None, {}, frozenset())
    valid = _validity(units)
    try:
        by_owner = _PARTS.get(units[0])
    except TypeError:  # not weakly referable: no caching
        by_owner = None
    hit = by_owner.get(owner) if by_owner is not None else None
    if hit is not None and hit[0] == valid:
        return hit[1]
    part = _compute_part(units, owner)
    try:
        if by_owner is None:
            by_owner = _PARTS.setdefault(units[0], {})
        by_owner[owner] = (valid, part)
    except TypeError:
        pass
    return part


def _compute_part(units: List[Any], owner: type | None) -> CodePart:
    root = units[0]
    home = getattr(root, "__module__", None) or ""
    root_name = _display(units[-1], home)
    wa, wb = _Walker(), _Walker()
    all_source = True
    seen: Set[int] = {id(u) for u in units}
    queue: List[Tuple[Any, int, str, type | None]] = []
    imports: Set[str] = set()
    for u in units:
        a, b, refs = _unit_pair(u, owner)
        all_source = all_source and a is not None
        wa.buf += a or b""
        wb.buf += b
        _note_imports(u, imports)
        queue.extend((r, 1, root_name, r_owner) for r, r_owner in refs)
    code = _pair_text(wa.digest() if all_source else None, wb.digest())
    helpers: Dict[str, List[str]] = {}
    i = 0
    while i < len(queue) and len(helpers) < MAX_HELPERS:
        ref, depth, caller, ref_owner = queue[i]
        i += 1
        try:
            unit, unit_owner = _as_unit(ref)
            if unit is None or id(unit) in seen:
                continue
            seen.add(id(unit))
            if not _is_user_file(_file_of(unit)):
                # A library's decorator around the user's function (this
                # package's own checkpoint wrapper among them): the user's
                # function inside is still the user's code.
                wrapped = unit.__dict__.get("__wrapped__") if isinstance(unit, types.FunctionType) else None
                if wrapped is not None:
                    queue.append((wrapped, depth, caller, ref_owner))
                continue
            a, b, refs = _unit_pair(unit, unit_owner or ref_owner)
        except Exception:
            # An object that misbehaves when looked at (a proxy raising from
            # __getattr__...) is skipped: it must not cost the step its record.
            continue
        name = _display(unit, home)
        while name in helpers:
            name += "'"  # two helpers of one name (closures made by one factory)
        helpers[name] = [_pair_text(a, b), caller]
        _note_imports(unit, imports)
        if depth < MAX_HELPER_DEPTH:
            queue.extend((r, depth + 1, name, r_owner) for r, r_owner in refs)
    return CodePart(code, helpers, frozenset(imports))


_IMPORTS: Dict[str, FrozenSet[str]] = {}


def _note_imports(unit: Any, out: Set[str]) -> None:
    name = getattr(unit, "__module__", None)
    if not name:
        return
    found = _IMPORTS.get(name)
    if found is None:
        tops: Set[str] = {name.partition(".")[0]}
        module = sys.modules.get(name)
        for v in list(vars(module).values()) if module is not None else ():
            if isinstance(v, types.ModuleType):
                tops.add(v.__name__.partition(".")[0])
            elif isinstance(v, (type, types.FunctionType)):
                m = getattr(v, "__module__", None)
                if isinstance(m, str):
                    tops.add(m.partition(".")[0])
        found = frozenset(tops)
        if len(_IMPORTS) >= _CACHE_MAX:
            _IMPORTS.clear()
        _IMPORTS[name] = found
    out.update(found)

