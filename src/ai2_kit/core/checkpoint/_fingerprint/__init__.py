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

The package's modules, each one job, in the order they import each other:
``_walk`` (the canonical walk of a value), ``_bind`` (a call's arguments by
parameter name), ``_bytecode`` and ``_source`` (one code object's digest),
``_callable`` (a function as a value), ``_code`` (a step and the helpers it
reaches), ``_env`` (distribution versions), ``_record`` (records and their
digests), ``_judge`` (what changed), ``_explain`` (messages). This module
only gathers their public names.
"""

from __future__ import annotations

from ._bind import fingerprint_inputs
from ._bytecode import BYTECODE_TAG
from ._callable import fingerprint_code, legacy_code
from ._code import CodePart, code_part
from ._env import environment
from ._explain import describe, explain, format_fingerprint, rerun_hint, show_fingerprint
from ._judge import ENVIRONMENT_POLICIES, Verdict, check_environment_policy, compare, judge
from ._record import FORMAT_VERSION, call_digest, fingerprint, hit_digest
from ._walk import UnfingerprintableError, fingerprint_value

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
    "legacy_code",
    "BYTECODE_TAG",
]
