"""Fingerprints of a call's inputs, of a step's code and of its environment, to tell a stale entry.

At save time the checkpointer records ``fingerprint(fn, args, kwargs)`` in the
entry's metadata; on a hit it fingerprints the new call the same way and
``judge`` (or ``compare``, its list of changes) says what changed, in words a
warning can quote:

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

    {"v": 2,                          # digest rules (1: bytecode only, still read)
     "fn": "qualname",                # for messages
     "code": "<src>.<bytecode>",      # 32 hex each; "-" for <src> without source;
                                      # None: no Python code (a builtin)
     "bc": "cpython-311",             # which bytecode the <bytecode> digests are of
     "helpers": {"scale": ["<src>.<bytecode>", "step"]},   # name -> [code, referred to by]
     "env": {"python": "3.11.7", "packages": {"numpy": "1.26.4"}},
     "args": {"x": "3", "data": "<32 hex>", ...},
     "unhashable": {"conn": "TypeError: cannot pickle 'sqlite3.Connection' object"}}

Code is compared by its source digest (the same under every Python version)
when both records have one, else by bytecode under the same interpreter,
else it "cannot be compared", which is said but is not staleness. Records of
version 1 (bytecode only) are compared like with like: the new call's
version-1 digests are computed for them; the entry gets a version-2 record
when its step runs again.

Each argument has its own entry, so a warning can name the one that changed.
Short ints, floats, strings, None and booleans are kept as their ``repr``
(at most 24 characters, so never mistaken for a 32-character digest);
everything else as a 128-bit digest of a canonical walk of the value
(``_walk``). The environment (the Python version, and the versions of the
installed distributions that the modules of the step and its helpers
import) is context: a change is reported, and is staleness only when the
checkpointer is told so (``environment="stale"``).
"""

from __future__ import annotations

import hashlib
import os
import platform
import re
import shlex
import sys
import types
import weakref
from typing import Any, Callable, Dict, FrozenSet, List, NamedTuple, Optional, Tuple
from urllib.parse import urlsplit, urlunsplit

from ._bind import _LAYOUTS, _bind_function, _BindError, _inputs, fingerprint_inputs
from ._code import (
    BYTECODE_TAG,
    CodePart,
    _is_user_file,
    _validity,
    code_part,
    fingerprint_code,
    legacy_code,
    unwrap_bound,
)
from ._walk import _INLINE_REPR, UnfingerprintableError, _inline, fingerprint_value

__all__ = [
    "FORMAT_VERSION",
    "ENVIRONMENT_POLICIES",
    "UnfingerprintableError",
    "Verdict",
    "fingerprint",
    "call_digest",
    "hit_digest",
    "fingerprint_inputs",
    "fingerprint_code",
    "fingerprint_value",
    "code_part",
    "CodePart",
    "environment",
    "compare",
    "judge",
    "describe",
    "explain",
    "format_fingerprint",
    "show_fingerprint",
    "rerun_hint",
    "check_environment_policy",
]

FORMAT_VERSION = 2
CLI = "ai2-kit tool checkpoint"
# What a changed environment (Python, installed distributions) does on a hit:
# "report" says so (as context of a stale warning, else in an INFO line),
# "stale" counts it as staleness (warned, or rerun under stale="rerun"),
# "ignore" says nothing.
ENVIRONMENT_POLICIES = ("report", "stale", "ignore")


def check_environment_policy(policy: str) -> str:
    if policy not in ENVIRONMENT_POLICIES:
        raise ValueError(f"environment must be one of {', '.join(map(repr, ENVIRONMENT_POLICIES))}, "
                         f"not {policy!r}")
    return policy


# -- environment ----------------------------------------------------------------

_PYTHON = platform.python_version()
_TOP_TO_DISTS: Dict[str, List[str]] | None = None
_DIST_VERSIONS: Dict[str, str | None] = {}
_ENVS: Dict[FrozenSet[str], Dict[str, Any]] = {}


def _top_to_dists() -> Dict[str, List[str]]:
    """Top-level importable name -> distributions providing it (read once per process)."""
    global _TOP_TO_DISTS
    if _TOP_TO_DISTS is None:
        import importlib.metadata as md  # only when an environment is first recorded

        mapping: Dict[str, List[str]] = {}
        try:
            pd = getattr(md, "packages_distributions", None)
            if pd is not None:
                mapping = {k: list(v) for k, v in pd().items()}
            else:  # Python 3.9: the same from each distribution's files
                for dist in md.distributions():
                    name = dist.metadata["Name"]
                    tops = (dist.read_text("top_level.txt") or "").split()
                    if not tops:
                        tops = [str(f).split("/")[0].split(".")[0] for f in dist.files or ()
                                if "/" in str(f) and not str(f).split("/")[0].endswith((".dist-info", ".egg-info"))]
                    for top in set(tops):
                        mapping.setdefault(top, []).append(name)
        except Exception:  # a broken distribution's metadata must not break a step
            mapping = {}
        _TOP_TO_DISTS = mapping
    return _TOP_TO_DISTS


def _dist_version(dist: str) -> str | None:
    if dist not in _DIST_VERSIONS:
        found = _scan_version(dist)
        if found is _UNSURE:
            import importlib.metadata as md

            try:
                found = md.version(dist)
            except Exception:
                found = None
        _DIST_VERSIONS[dist] = found  # type: ignore[assignment]
    return _DIST_VERSIONS[dist]


#: What ``_scan_version`` answers when only importlib.metadata can tell.
_UNSURE: Any = object()
_LISTINGS: Dict[str, Tuple[str, ...]] = {}
_NAME_RUNS = re.compile(r"[-_.]+")


def _scan_version(dist: str) -> Any:
    """``importlib.metadata.version(dist)`` without importing it (~26 ms on a first save), or ``_UNSURE``.

    The same search as importlib.metadata's (Python 3.10 to 3.13) for plain
    folders on ``sys.path``:
    the first folder holding a ``NAME-*.dist-info`` or ``NAME-*.egg-info``
    folder whose normalized name is the distribution's, and the ``Version``
    header of its ``METADATA`` (or ``PKG-INFO``). Anything else (a zip on
    the path, a finder of distributions asked before the standard one, two
    candidates in one folder, a header it does not read the same way)
    answers ``_UNSURE``, and importlib.metadata decides. Finders asked after
    the standard one (the ``importlib_metadata`` backport's, which importing
    dask installs) matter only when the standard one finds nothing: the
    first answer wins.
    """
    if sys.version_info < (3, 10):
        return _UNSURE
    finders = [f for f in sys.meta_path if getattr(f, "find_distributions", None) is not None]
    if not finders or getattr(finders[0], "__name__", "") != "PathFinder":
        return _UNSURE
    missing = None if len(finders) == 1 else _UNSURE  # what a later finder might still find
    want = _NAME_RUNS.sub("_", dist).lower()
    for entry in sys.path:
        root = entry or "."
        if os.path.basename(str(root)).lower().endswith(".egg"):
            return _UNSURE  # an egg's metadata is found by other rules
        names = _LISTINGS.get(root)
        if names is None:
            if not os.path.isdir(root):
                if os.path.exists(root):
                    return _UNSURE  # a zip file or another kind of path entry
                continue
            try:
                names = tuple(os.listdir(root))
            except OSError:
                return _UNSURE
            _LISTINGS[root] = names
        hits = [n for n in names if n.lower().endswith((".dist-info", ".egg-info"))
                and _NAME_RUNS.sub("_", n.lower().rpartition(".")[0].partition("-")[0]) == want]
        if not hits:
            continue
        if len(hits) > 1:
            return _UNSURE
        return _version_header(os.path.join(root, hits[0]))
    return missing


def _version_header(info: str) -> Any:
    for name in ("METADATA", "PKG-INFO"):
        try:
            with open(os.path.join(info, name), encoding="utf-8") as f:
                lines = f.read().split("\n")
        except FileNotFoundError:
            continue
        except (OSError, ValueError):
            return _UNSURE
        for i, line in enumerate(lines):
            if not line.strip():
                break  # the end of the headers
            if line[:8].lower() == "version:":
                nxt = lines[i + 1] if i + 1 < len(lines) else ""
                if nxt[:1] in (" ", "\t") or "\r" in line:
                    return _UNSURE  # a folded or odd header: the email parser's business
                return line[8:].lstrip(" \t")
        return _UNSURE
    return _UNSURE


# Import names whose distribution is named otherwise, tried before reading
# the metadata of every installed distribution (packages_distributions: about
# 1 ms per distribution, more on a network file system).
_ALIASES: Dict[str, Tuple[str, ...]] = {
    "ai2_kit": ("ai2-kit", "ai2-kit-checkpoint"),
    "sklearn": ("scikit-learn",),
    "skimage": ("scikit-image",),
    "yaml": ("PyYAML",),
    "PIL": ("Pillow",),
    "cv2": ("opencv-python", "opencv-python-headless", "opencv-contrib-python"),
    "dateutil": ("python-dateutil",),
    "attr": ("attrs",),
}
_DISTS_OF: Dict[str, Tuple[str, ...]] = {}
_STDLIB_DIRS: Tuple[str, ...] | None = None


def _stdlib_dirs() -> Tuple[str, ...]:
    global _STDLIB_DIRS
    if _STDLIB_DIRS is None:
        import sysconfig

        paths = sysconfig.get_paths()
        _STDLIB_DIRS = tuple({os.path.realpath(paths[k]) + os.sep for k in ("stdlib", "platstdlib") if k in paths})
    return _STDLIB_DIRS


def _installed(top: str) -> bool:
    """Whether the imported top-level module ``top`` comes from an installed package."""
    if top in sys.builtin_module_names or top in getattr(sys, "stdlib_module_names", ()):
        return False
    module = sys.modules.get(top)
    if module is None:
        return False
    paths = [module.__file__] if getattr(module, "__file__", None) else list(getattr(module, "__path__", ()))
    if not paths:
        return False
    for path in paths:
        real = os.path.realpath(str(path))
        parts = real.split(os.sep)
        if "site-packages" in parts or "dist-packages" in parts:
            return True
        if real.startswith(_stdlib_dirs()) or _is_user_file(str(path)):
            return False
    return True


def _dists_of(top: str) -> Tuple[str, ...]:
    found = _DISTS_OF.get(top)
    if found is None:
        found = ()
        try:
            if _installed(top):
                # The distribution named like the module, else a known alias,
                # else (slow, once per process) every distribution's files.
                found = tuple(d for d in _ALIASES.get(top, (top,)) if _dist_version(d) is not None)
                if not found:
                    found = tuple(_top_to_dists().get(top, ()))
        except Exception:  # odd module objects (lazy proxies) must not break a step
            found = ()
        _DISTS_OF[top] = found
    return found


def environment(imports: FrozenSet[str] = frozenset()) -> Dict[str, Any]:
    """The Python version and the versions of the distributions providing ``imports``.

    >>> environment()["python"] == platform.python_version()
    True
    """
    env = _ENVS.get(imports)
    if env is None:
        packages: Dict[str, str] = {}
        for top in sorted(imports):
            for dist in _dists_of(top):
                v = _dist_version(dist)
                if v is not None:
                    packages[dist] = v
        env = {"python": _PYTHON, "packages": dict(sorted(packages.items()))}
        if len(_ENVS) >= 1024:
            _ENVS.clear()
        _ENVS[imports] = env
    return env


# -- records ------------------------------------------------------------------


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
    text = repr((inputs["args"], inputs["unhashable"]))
    # The static digest as a prefix (fixed length): cheaper than a keyed hash here.
    return hashlib.blake2b(static + text.encode("utf-8", "surrogatepass"), digest_size=16).hexdigest()


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
        rec = Record(base)
        if "helpers" in rec:
            rec["helpers"] = dict(rec["helpers"])
        inputs = {"args": digests, "unhashable": {}}
        rec.update(inputs)
        rec.fn_obj = fn
        rec.legacy_args = {}  # short scalars digest the same under version 1 rules
        rec.digest = call_digest(static, inputs)
        return rec
    inputs, legacy_args = _inputs(fn, args, kwargs)
    plain = type(fn) is types.FunctionType and "__wrapped__" not in fn.__dict__
    got = _BASES.get(fn) if plain else None
    if got is not None and got[0] == _validity([fn]):
        base, static = got[1], got[2]
    else:
        part = code_part(fn)
        base = {"v": FORMAT_VERSION, "fn": _fn_name(fn), "code": part.code, "bc": BYTECODE_TAG}
        if part.helpers:
            base["helpers"] = dict(part.helpers)
        env = base["env"] = environment(part.imports)
        static = _static_digest(part, env)
        if plain:
            _BASES[fn] = (_validity([fn]), base, static)
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
_blake2b = hashlib.blake2b


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
    (short ints, strings, floats, booleans, None). The same rules as
    ``fingerprint`` (``_validity``, ``_bind_function``, ``_inline``,
    ``call_digest``) give the same digest; anything else answers None, and
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
            lay = _LAYOUTS.get(code)  # there once the function was fingerprinted (_BASES)
            if lay is not None:
                if len(_HEADS) >= 4096:
                    _HEADS.clear()
                heads = _HEADS[code] = False if lay.kwonly else tuple(repr(name) + ": " for name in lay.pos)
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
            return _blake2b(got[2] + text.encode("utf-8", "surrogatepass"), digest_size=16).hexdigest()
        short = _short_inputs(fn, args, kwargs)  # None: the canonical walk's business
        return None if short is None else call_digest(got[2], {"args": short[1], "unhashable": {}})
    except Exception:  # never let a staleness check break a workflow: the full way decides
        return None


class Verdict(NamedTuple):
    """What differs between a saved record and a call's."""

    changes: List[str]  # what makes the entry stale: arguments, code, helpers
    uncertain: List[str]  # code that cannot be compared (another Python, no source)
    env: List[str]  # "numpy 1.26.4 -> 2.1.0": context, staleness only by policy


_SAME, _CHANGED, _UNKNOWN = 0, 1, 2
_PARTS = ("args", "unhashable", "code", "bc", "helpers", "env")


def _code_state(old: Any, new: Any, old_tag: Any, new_tag: Any) -> int:
    if not isinstance(old, str) or not isinstance(new, str) or "." not in old or "." not in new:
        return _SAME  # nothing to compare (a builtin, a damaged field)
    oa, _, ob = old.partition(".")
    na, _, nb = new.partition(".")
    if oa != "-" and na != "-":
        return _SAME if oa == na else _CHANGED
    if old_tag == new_tag:
        return _SAME if ob == nb else _CHANGED
    return _UNKNOWN


def _is_inline(fp: Any) -> bool:
    return isinstance(fp, str) and len(fp) <= _INLINE_REPR


def _compare_args(old: Dict[str, Any], new: Dict[str, Any], new_args: Dict[str, Any]) -> List[str]:
    out: List[str] = []
    if "args" not in old or "args" not in new:
        return out
    old_args = old.get("args") or {}
    old_un, new_un = old.get("unhashable") or {}, new.get("unhashable") or {}
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
    return out


def _python_of(rec: Dict[str, Any]) -> str:
    env = rec.get("env")
    if isinstance(env, dict) and env.get("python"):
        return f"Python {env['python']}"
    return str(rec.get("bc") or "another Python")


def judge(old: Dict[str, Any], new: Dict[str, Any]) -> Verdict:
    """What differs between a saved record and a new one, sorted by what it means.

    >>> v = judge({"v": 2, "fn": "f", "code": "a" * 32 + ".1", "bc": "cpython-311",
    ...            "env": {"python": "3.11.7", "packages": {"numpy": "1.26.4"}}},
    ...           {"v": 2, "fn": "f", "code": "a" * 32 + ".2", "bc": "cpython-312",
    ...            "env": {"python": "3.12.1", "packages": {"numpy": "2.1.0"}}})
    >>> v.changes, v.uncertain, v.env
    ([], [], ['Python 3.11.7 -> 3.12.1', 'numpy 1.26.4 -> 2.1.0'])
    """
    none = Verdict([], [], [])
    if not old or not new or not isinstance(old, dict):
        return none
    old_v, new_v = old.get("v", FORMAT_VERSION), new.get("v", FORMAT_VERSION)
    if old_v == 1:
        return Verdict(_compare_v1(old, new), [], [])
    if old_v != FORMAT_VERSION or new_v != FORMAT_VERSION:
        return none  # a newer format than this code knows: say nothing rather than guess
    if all(old.get(k) == new.get(k) for k in _PARTS):
        return none  # the common hit: nothing differs (compared in C, no words built)
    changes = _compare_args(old, new, new.get("args") or {})
    uncertain: List[str] = []
    fn = new.get("fn") or old.get("fn") or "the function"
    old_tag, new_tag = old.get("bc"), new.get("bc")
    across = f"across Python versions ({_python_of(old)} when saved, {_python_of(new)} now)"
    state = _code_state(old.get("code"), new.get("code"), old_tag, new_tag)
    if state == _CHANGED:
        changes.append(f"code of {fn} changed")
    elif state == _UNKNOWN:
        uncertain.append(f"cannot compare code of {fn} {across}: it has no source file")
    old_h, new_h = old.get("helpers") or {}, new.get("helpers") or {}
    membership: List[str] = []
    for name, (code, caller) in new_h.items():
        if name in old_h:
            st = _code_state(old_h[name][0], code, old_tag, new_tag)
            if st == _CHANGED:
                changes.append(f"code of {name} (called by {caller}) changed")
            elif st == _UNKNOWN:
                uncertain.append(f"cannot compare code of {name} (called by {caller}) {across}")
        else:
            membership.append(f"{name} (called by {caller}) is new")
    for name, (_code, caller) in old_h.items():
        if name not in new_h:
            membership.append(f"{name} (called by {caller}) is no longer used")
    if membership and state != _CHANGED:
        # A new or dropped helper with the step's code unchanged: a global
        # now names other code. With the step's code changed, it is implied.
        changes.extend(membership)
    return Verdict(changes, uncertain, _compare_env(old.get("env"), new.get("env")))


def _compare_env(old: Any, new: Any) -> List[str]:
    if not isinstance(old, dict) or not isinstance(new, dict):
        return []
    out: List[str] = []
    if old.get("python") and new.get("python") and old["python"] != new["python"]:
        out.append(f"Python {old['python']} -> {new['python']}")
    old_p, new_p = old.get("packages") or {}, new.get("packages") or {}
    for dist in sorted(set(old_p) & set(new_p)):
        if old_p[dist] != new_p[dist]:
            out.append(f"{dist} {old_p[dist]} -> {new_p[dist]}")
    return out


def _compare_v1(old: Dict[str, Any], new: Dict[str, Any]) -> List[str]:
    """A version-1 record against a call: like with like (bytecode, version-1 digests)."""
    if new.get("v", 1) == 1:
        view = new
    else:
        legacy_args = getattr(new, "legacy_args", None) or {}
        fn = getattr(new, "fn_obj", None)
        view = {"args": {**(new.get("args") or {}), **legacy_args}, "unhashable": new.get("unhashable"),
                "fn": new.get("fn")}
        if "args" not in new:
            view.pop("args")
        if fn is not None and old.get("code"):
            try:
                view["code"] = legacy_code(fn)
            except Exception:
                view["code"] = None
    out = _compare_args(old, view, view.get("args") or {})
    old_code, new_code = old.get("code"), view.get("code")
    if old_code and new_code and old_code != new_code:
        name = view.get("fn") or old.get("fn") or "the function"
        if view is new:
            out.append(f"code of {name} changed")
        else:
            # Version 1 recorded bytecode and no Python version: an upgrade
            # and an edit look the same. Said as such; counted as a change,
            # since a stale result is the worse mistake.
            out.append(f"code of {name} changed, or Python was upgraded (this entry has a bytecode-only "
                       "fingerprint from an older ai2-kit, which cannot tell; once the step runs again "
                       "its new record survives upgrades)")
    return out


def compare(old: Dict[str, Any], new: Dict[str, Any]) -> List[str]:
    """What makes ``old`` stale for ``new``, in words; empty when nothing does.

    An argument that was unfingerprintable on either side is never reported
    (see the ``unhashable`` part of the records to mention it). Records of an
    unknown ``FORMAT_VERSION``, or an empty old record (an entry saved before
    fingerprints existed), compare as unchanged. Partial records (only
    ``fingerprint_inputs``, only ``code``) compare on what they hold.
    ``judge`` also says what could not be compared and what changed around.

    >>> compare({"args": {"x": "1", "y": "2"}}, {"args": {"x": "1", "y": "3", "z": "0"}})
    ["argument 'y' changed (2 -> 3)", "argument 'z' added"]
    >>> compare({"v": 2, "fn": "f", "code": "a" * 32 + ".0"}, {"v": 2, "fn": "f", "code": "b" * 32 + ".0"})
    ['code of f changed']
    """
    return judge(old, new).changes


# -- messages ----------------------------------------------------------------------


def describe(key: str, changes: List[str]) -> str:
    """One line for the warning about a stale entry.

    >>> describe("iter-000/train", ["argument 'x' changed", "code of train changed"])
    "checkpoint 'iter-000/train' was saved for another call: argument 'x' changed; code of train changed"
    """
    return f"checkpoint {key!r} was saved for another call: {'; '.join(changes)}"


def _store_arg(location: Any) -> str:
    text = str(location)
    if "://" in text:
        # Never print a password in a log line.
        try:
            parts = urlsplit(text)
            if parts.password:
                host = parts.hostname or ""
                user = f"{parts.username}:***@" if parts.username else ""
                port = f":{parts.port}" if parts.port else ""
                text = urlunsplit((parts.scheme, f"{user}{host}{port}", parts.path, parts.query, parts.fragment))
        except ValueError:
            text = "STORE"
    return shlex.quote(text)


def rerun_hint(key: str, location: Any) -> str:
    """The commands that rerun just this step (and, with --from, all saved after it).

    >>> rerun_hint("iter-000/train", "/work/c.db").split(" (")[0]
    'ai2-kit tool checkpoint load /work/c.db - rm iter-000/train'
    """
    store, k = _store_arg(location), shlex.quote(key)
    return f"{CLI} load {store} - rm {k} (or rm --from {k} to redo it and every step saved after it)"


def explain(key: str, verdict: Verdict, *, location: Any = None, stale: bool = True, rerun: bool = False) -> str:
    """The message for a hit whose records differ: what changed, and what to do.

    ``stale``: the entry counts as stale (arguments, code, or the environment
    by policy); ``rerun``: the step runs again now.

    >>> v = Verdict(["code of scale (called by step) changed"], [], ["numpy 1.26.4 -> 2.1.0"])
    >>> import textwrap
    >>> print(textwrap.fill(explain("k", v, location="c.db"), 100))
    checkpoint 'k' was saved for another call: code of scale (called by step) changed (numpy 1.26.4 ->
    2.1.0 since this entry was saved); returning the saved result. To run just this step again: ai2-kit
    tool checkpoint load c.db - rm k (or rm --from k to redo it and every step saved after it), or pass
    stale='rerun'
    """
    changed_env = verdict.env
    if verdict.uncertain:  # the Python versions are in the "cannot compare" words already
        changed_env = [e for e in changed_env if not e.startswith("Python ")]
    env = f"{', '.join(changed_env)} since this entry was saved" if changed_env else ""
    if stale:
        what = list(verdict.changes) + list(verdict.uncertain)
        if not verdict.changes and env:
            head = f"checkpoint {key!r} was saved in another environment: {env}"
            if what:
                head += "; " + "; ".join(what)
        else:
            head = describe(key, what) + (f" ({env})" if env else "")
    elif verdict.uncertain:
        head = f"checkpoint {key!r}: {'; '.join(verdict.uncertain)}" + (f" ({env})" if env else "")
    else:
        head = f"checkpoint {key!r}: {env}"
    if rerun:
        return f"{head}; running the step again (stale='rerun')"
    if not stale and not verdict.uncertain:
        return f"{head}; returning the saved result (pass environment='stale' to treat such changes as stale)"
    hint = rerun_hint(key, location) if location is not None else "remove the entry"
    if stale:
        return f"{head}; returning the saved result. To run just this step again: {hint}, or pass stale='rerun'"
    return f"{head}; returning the saved result. If its code did change, run it again: {hint}"


# -- show ---------------------------------------------------------------------------


def _short(digest: Any) -> str:
    return f"<{str(digest)[:8]}>" if isinstance(digest, str) and not _is_inline(digest) else str(digest)


def _code_text(code: Any, tag: Any) -> str:
    if not isinstance(code, str) or "." not in code:
        return "none (no Python code)" if code is None else str(code)
    a, _, b = code.partition(".")
    if a == "-":
        return f"bytecode {b[:12]} ({tag or '?'}; no source: not comparable across Python versions)"
    return f"source {a[:12]} (bytecode {b[:12]}, {tag or '?'})"


def _mapping(x: Any) -> Dict[Any, Any]:
    """A part of a record that must be an object: anything else (a crafted or damaged record) reads as empty."""
    return x if isinstance(x, dict) else {}


def format_fingerprint(fp: Any, indent: int = 0) -> List[str]:
    """Lines describing a metadata record's fingerprint: code, helpers, arguments, environment.

    >>> for line in format_fingerprint({"v": 2, "fn": "f", "code": "-.0a1b", "bc": "cpython-311",
    ...                                 "args": {"x": "3"}, "env": {"python": "3.11.7", "packages": {}}}):
    ...     print(line)
    function   f
    code       bytecode 0a1b (cpython-311; no source: not comparable across Python versions)
    arguments  x=3
    python     3.11.7
    """
    if not isinstance(fp, dict) or not fp:
        return [" " * indent + "none (saved without fingerprints)"]
    rows: List[Tuple[str, str]] = [("function", str(fp.get("fn", "?")))]
    if fp.get("v", 1) == 1:
        rows.append(("code", f"bytecode {str(fp.get('code'))[:12]} (format 1: no Python version recorded)"))
    else:
        rows.append(("code", _code_text(fp.get("code"), fp.get("bc"))))
    for name, item in _mapping(fp.get("helpers")).items():
        try:
            code, caller = item
        except (TypeError, ValueError):
            code, caller = item, "?"
        rows.append(("helper", f"{name} (called by {caller}): {_code_text(code, fp.get('bc'))}"))
    args = _mapping(fp.get("args"))
    if args:
        rows.append(("arguments", ", ".join(f"{k}={_short(v)}" for k, v in args.items())))
    for name, reason in _mapping(fp.get("unhashable")).items():
        rows.append(("unchecked", f"{name}: {reason}"))
    env = fp.get("env")
    if isinstance(env, dict):
        if env.get("python"):
            rows.append(("python", str(env["python"])))
        packages = _mapping(env.get("packages"))
        if packages:
            rows.append(("packages", ", ".join(f"{d} {v}" for d, v in packages.items())))
    width = max(len(r[0]) for r in rows) + 2
    return [" " * indent + f"{label:<{width}}{text}" for label, text in rows]


def show_fingerprint(fp: Any) -> str:
    """``format_fingerprint`` as one value for ``show``'s two-column layout (13 + 1 wide)."""
    lines = format_fingerprint(fp)
    return ("\n" + " " * 14).join(lines)

