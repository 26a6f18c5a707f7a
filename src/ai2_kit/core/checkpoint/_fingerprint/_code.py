"""Fingerprints of code: from the source as the compiler parses it, and the helpers a step reaches.

A function's code is fingerprinted from its abstract syntax tree (the AST,
without docstrings; comments and blank lines are not in it), which is the
same under every Python version, while the bytecode of one source differs
from version to version. The tree is trusted only after the file it came
from is compiled again and gives the running function's own bytecode: a
file edited after its module was imported must not be taken for the code
that runs. Where there is no source (code built by ``exec``, a ``-c``
script, a ``.pyc``-only install) or it does not match, the bytecode is the
fallback, tagged with the interpreter (``sys.implementation.cache_tag``)
so that another version reports "cannot compare", not "changed".

``code_part`` follows the user's own code from a step: the functions and
classes it refers to through its module's globals (and the attributes it
uses of the user's own modules), its closure and its default arguments,
recursively, but only those defined in the user's own source files (not
the standard library, not installed packages, not this package), with a
bounded depth and count. It is computed once per function per process.
"""

from __future__ import annotations

import ast
import dis
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
from ._walk import _CACHE_MAX, _EXACT, _pack_Q, _str_bytes, _type_name, _Walker

__all__ = ["fingerprint_code", "code_part", "CodePart", "BYTECODE_TAG", "legacy_code"]

# Which bytecode a bytecode digest was made from: "cpython-311". Digests of
# two tags are never compared.
BYTECODE_TAG: str = (sys.implementation.cache_tag
                     or f"{sys.implementation.name}-{sys.version_info[0]}{sys.version_info[1]}")

# How far and how wide the helpers of one step are followed: enough for a
# script's own call tree, bounded for a module that imports a big package
# of the user's own (every helper costs its source's parse once per process).
MAX_HELPER_DEPTH = 8
MAX_HELPERS = 200

# -- bytecode -----------------------------------------------------------------

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




# -- source -------------------------------------------------------------------


class _Source(NamedTuple):
    """One parsed and compiled source file, indexed by where definitions start."""

    lines: List[str]  # linecache's list: a new list means the file was read again
    nodes: Dict[Tuple[str, int], List[ast.AST]]  # (name, first line) -> defs, in source order
    codes: Dict[Tuple[str, int], List[types.CodeType]]  # the same, compiled
    classes: Dict[str, List[ast.ClassDef]]  # qualified name -> class statements


_SOURCES: Dict[str, _Source | None] = {}
_SOURCE_KEYS: Dict[str, List[str]] = {}
_DEFS = (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda, ast.ClassDef)


def _first_line(node: Any) -> int:
    # Where the compiler starts a definition's code: its first decorator.
    decorators = getattr(node, "decorator_list", None)
    return min([node.lineno, *(d.lineno for d in decorators)]) if decorators else node.lineno  # type: ignore[no-any-return]


def _index_nodes(tree: ast.AST) -> Tuple[Dict[Tuple[str, int], List[ast.AST]], Dict[str, List[ast.ClassDef]]]:
    nodes: Dict[Tuple[str, int], List[ast.AST]] = {}
    classes: Dict[str, List[ast.ClassDef]] = {}

    def visit(node: ast.AST, qual: str) -> None:
        # Depth first, in the order the compiler makes code objects: what a
        # definition evaluates where it stands (decorators, defaults, bases)
        # before the definition itself, its body after. Two lambdas on one
        # line are told apart by this order.
        for child in ast.iter_child_nodes(node):
            if not isinstance(child, _DEFS):
                visit(child, qual)
                continue
            for field in _OUTSIDE:
                for sub in _as_list(getattr(child, field, None)):
                    visit_one(sub, qual)
            name = "<lambda>" if isinstance(child, ast.Lambda) else child.name  # type: ignore[union-attr]
            nodes.setdefault((name, _first_line(child)), []).append(child)
            if isinstance(child, ast.ClassDef):
                classes.setdefault(qual + child.name, []).append(child)
                inner = f"{qual}{child.name}."
            else:
                inner = f"{qual}{name}.<locals>."
            for sub in _as_list(child.body):  # type: ignore[union-attr]
                visit_one(sub, inner)

    def visit_one(node: ast.AST, qual: str) -> None:
        wrapper = ast.Module(body=[], type_ignores=[])
        wrapper.body = [node]  # type: ignore[list-item]
        visit(wrapper, qual)

    visit(tree, "")
    return nodes, classes


# Fields of a definition evaluated where it stands, before its own code is made.
_OUTSIDE = ("decorator_list", "args", "bases", "keywords", "returns")


def _as_list(value: Any) -> List[Any]:
    if value is None:
        return []
    return list(value) if isinstance(value, list) else [value]


def _index_codes(co: types.CodeType, out: Dict[Tuple[str, int], List[types.CodeType]]) -> None:
    for const in co.co_consts:
        if type(const) is types.CodeType:
            out.setdefault((const.co_name, const.co_firstlineno), []).append(const)
            _index_codes(const, out)


def _source(filename: str, module_globals: Any = None) -> _Source | None:
    """The parsed source of a file as linecache holds it, or None."""
    try:
        lines = linecache.getlines(filename, module_globals)
    except Exception:  # a loader's get_source may raise anything
        return None
    if not lines:
        return None
    cached = _SOURCES.get(filename)
    if cached is not None and cached.lines is lines:
        return cached
    if filename in _SOURCES and _SOURCE_KEYS.get(filename) is lines:
        return None  # known not to parse
    try:
        tree = ast.parse("".join(lines), filename)
        # Compiled as an import compiles it (the same optimization level,
        # no inherited future flags): this gives the running code's bytecode
        # back when the file is what was imported.
        module_code = compile(tree, filename, "exec", dont_inherit=True)
    except (SyntaxError, ValueError, TypeError, RecursionError, MemoryError):
        result = None
    else:
        codes: Dict[Tuple[str, int], List[types.CodeType]] = {}
        _index_codes(module_code, codes)
        nodes, classes = _index_nodes(tree)
        result = _Source(lines, nodes, codes, classes)
    if len(_SOURCES) >= _CACHE_MAX:
        _SOURCES.clear()
        _SOURCE_KEYS.clear()
    _SOURCES[filename] = result
    _SOURCE_KEYS[filename] = lines
    return result


def _node_of(co: types.CodeType, module_globals: Any = None) -> ast.AST | None:
    """The definition in the source that compiles to ``co``, or None."""
    if co.co_filename.startswith("<") and co.co_filename not in linecache.cache:
        return None  # exec'd or generated code: no file to read
    src = _source(co.co_filename, module_globals)
    if src is None:
        return None
    where = (co.co_name, co.co_firstlineno)
    codes, nodes = src.codes.get(where), src.nodes.get(where)
    if not codes or not nodes or len(codes) != len(nodes):
        return None
    want = _code_digest(co)
    for compiled, node in zip(codes, nodes):
        if _code_digest(compiled) == want:
            return node
    return None  # the file changed since the code was compiled


# Fields that do not change what code does: comments that the parser keeps
# (type comments) and the kind of a string literal (u"..." is "...").
_SKIP_FIELDS = frozenset({"type_comment", "kind"})
_WITH_DOCSTRING = (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef, ast.Module)


def _walk_ast(w: _Walker, node: Any, top: bool = False) -> None:
    if isinstance(node, list):
        w.buf += b"[" + _pack_Q(len(node))
        for item in node:
            _walk_ast(w, item)
        return
    if not isinstance(node, ast.AST):
        w.walk(node)  # an identifier, a constant's value, a flag
        return
    w.buf += b"n" + _str_bytes(type(node).__name__)
    for field in node._fields:
        if field in _SKIP_FIELDS or (top and field in ("name", "decorator_list")):
            # A definition's own name and decorators are not its code: the
            # step's decorator holds its checkpoint key, and a renamed helper
            # is a new name in its caller's code anyway.
            continue
        value = getattr(node, field, None)
        # Absent and empty are the same: fields added by later Pythons
        # (type_params in 3.12) are empty for code that does not use them.
        if value is None or (isinstance(value, list) and not value):
            continue
        if field == "body" and isinstance(node, _WITH_DOCSTRING) and _is_docstring(value[0]):
            value = value[1:]
        elif field == "values" and isinstance(node, ast.JoinedStr):
            # Python 3.12.0-3.12.x leave an empty string part in nested
            # format specs (f"{a:>{b}}") where other versions have none.
            value = [v for v in value if not (isinstance(v, ast.Constant) and v.value == "")]
        w.buf += _str_bytes(field)
        _walk_ast(w, value)


def _is_docstring(stmt: Any) -> bool:
    return (isinstance(stmt, ast.Expr) and isinstance(stmt.value, ast.Constant)
            and isinstance(stmt.value.value, str))


# Keyed by identity, not by the code object's own equality: two functions
# with equal bytecode at the same lines of two files compare equal, while
# their sources (their default values, for one) may differ.
_AST_DIGESTS: Dict[int, Tuple[types.CodeType, bytes | None]] = {}


def _ast_digest(co: types.CodeType, module_globals: Any = None) -> bytes | None:
    """Digest of the source of ``co`` (without docstrings), or None without source."""
    hit = _AST_DIGESTS.get(id(co))
    if hit is not None and hit[0] is co:
        return hit[1]
    node = _node_of(co, module_globals)
    d = None if node is None else _node_digest(node)
    if len(_AST_DIGESTS) >= _CACHE_MAX:
        _AST_DIGESTS.clear()
    _AST_DIGESTS[id(co)] = (co, d)
    return d


def _node_digest(node: ast.AST) -> bytes | None:
    w = _Walker()
    w.buf += b"S"
    try:
        _walk_ast(w, node, top=True)
    except RecursionError:  # an expression nested thousands deep: the bytecode will do
        return None
    return w.digest()


def _portable_digest(co: types.CodeType) -> bytes:
    """The source digest of ``co``, else its bytecode's tagged with the interpreter."""
    d = _ast_digest(co)
    return d if d is not None else b"B" + _str_bytes(BYTECODE_TAG) + _code_digest(co)


def _class_node(cls: type) -> Tuple[ast.ClassDef | None, List[types.FunctionType]]:
    """The class statement of ``cls`` (checked against its methods' code) and its methods."""
    methods = _methods(cls)
    module = sys.modules.get(cls.__module__)
    filename = getattr(module, "__file__", None)
    if not filename:
        filename = next((f.__code__.co_filename for f in methods), None)
    if not filename:
        return None, methods
    src = _source(filename, getattr(module, "__dict__", None))
    if src is None:
        return None, methods
    found = src.classes.get(cls.__qualname__)
    if not found or len(found) != 1:
        return None, methods
    for f in methods:
        if f.__code__.co_filename == filename and _node_of(f.__code__) is None:
            return None, methods  # the file changed since the class was made
    return found[0], methods


def _methods(cls: type) -> List[types.FunctionType]:
    out: List[types.FunctionType] = []
    for _name, member in sorted(vars(cls).items()):
        if isinstance(member, (staticmethod, classmethod)):
            member = member.__func__
        elif isinstance(member, property):
            out.extend(f for f in (member.fget, member.fset, member.fdel) if isinstance(f, types.FunctionType))
            continue
        if isinstance(member, types.FunctionType):
            out.append(member)
    return out


_CLASS_DIGESTS: weakref.WeakKeyDictionary[type, Tuple[bytes | None, bytes]] = weakref.WeakKeyDictionary()


def _class_pair(cls: type) -> Tuple[bytes | None, bytes]:
    """(source digest or None, bytecode digest) of a class."""
    try:
        hit = _CLASS_DIGESTS.get(cls)
    except TypeError:
        hit = None
    if hit is not None:
        return hit
    node, methods = _class_node(cls)
    a = None if node is None else _node_digest(node)
    w = _Walker()
    w.buf += b"c"
    for f in methods:
        w.buf += _str_bytes(f.__name__) + _code_digest(f.__code__)
    pair = (a, w.digest())
    try:
        _CLASS_DIGESTS[cls] = pair
    except TypeError:  # a class that refuses weak references: not cached
        pass
    return pair


def _class_digest(cls: type) -> bytes | None:
    a, b = _class_pair(cls)
    if a is not None:
        return a
    return b"B" + _str_bytes(BYTECODE_TAG) + b if _methods(cls) else None


# -- functions as values (and records version 1) ---------------------------------

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


# -- the step and the helpers it reaches -----------------------------------------


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


def _hash_bytes(data: bytes) -> bytes:
    w = _Walker()
    w.buf += data
    return w.digest()


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
    life of the process: a hit pays a dictionary lookup for it (measured by
    benchmarks/bench_fingerprint.py on 2 shared cores, Python 3.11: the
    first call 8.7 ms for a step in a 250-line file, parse and compile
    included; every later call 1.1-1.7 us). A global
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
