"""One code object's or class's source digest: the tree the compiler parses, checked against what runs.

A function's code is fingerprinted from its abstract syntax tree (the AST,
without docstrings; comments and blank lines are not in it), which is the
same under every Python version, while the bytecode of one source differs
from version to version. The tree is trusted only after the file it came
from is compiled again and gives the running function's own bytecode: a
file edited after its module was imported must not be taken for the code
that runs. Where it cannot be trusted, ``_portable_digest`` falls back to
the tagged bytecode (``_bytecode``).
"""

from __future__ import annotations

import ast
import linecache
import sys
import types
import weakref
from typing import Any, Dict, List, NamedTuple, Tuple

from ._bytecode import BYTECODE_TAG, _code_digest
from ._walk import _CACHE_MAX, _pack_Q, _str_bytes, _Walker

__all__: List[str] = []


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
