"""Messages: the warning for a stale hit with the command that reruns the step, and a record shown as text."""

from __future__ import annotations

import shlex
from typing import Any, Dict, List, Tuple
from urllib.parse import urlsplit, urlunsplit

from ._judge import Verdict, _is_inline

__all__ = ["describe", "explain", "rerun_hint", "format_fingerprint", "show_fingerprint"]

CLI = "ai2-kit tool checkpoint"


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


# -- show ----------------------------------------------------------------------


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
