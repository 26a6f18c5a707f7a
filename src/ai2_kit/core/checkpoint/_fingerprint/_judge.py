"""Judging a hit: what differs between a saved record and the call's, sorted by what it means.

Arguments, code and helpers that changed make the entry stale; code that
cannot be compared (another Python, no source) is said but is not
staleness; a changed environment is context, staleness only by policy
(``ENVIRONMENT_POLICIES``). Records of version 1 (bytecode only) are
compared like with like.
"""

from __future__ import annotations

from typing import Any, Dict, List, NamedTuple

from ._callable import legacy_code
from ._record import FORMAT_VERSION
from ._walk import _INLINE_REPR

__all__ = ["ENVIRONMENT_POLICIES", "check_environment_policy", "Verdict", "judge", "compare"]

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
