"""The decorator logic: checkpointers, the wrappers they make, and what lets steps run anywhere.

Modules, each importing at run time only those listed before it (``_dedup``
and ``_wrapper`` name ``Checkpointer`` in annotations, imported for type
checkers only: the policy builds wrappers, and the wrapper calls the
policy's steps without the policy ever looking inside a wrapper):

- ``_calls``: keys, call sites, what a wrapper copies from the function it wraps;
- ``_async``: the offload pool and event-loop lane for async steps, ``_Pending``;
- ``_dedup``: same-key dedup (flights, claim attempts, leases, the heartbeat);
- ``_registry``: the per-process registry of open checkpointers, by description;
- ``_wrapper``: ``CheckpointedFunction``, its one call path and its pickling;
- ``_policy``: ``Checkpointer`` and ``StoreSpec``, its description.
"""

from __future__ import annotations

from ..stores._base import check_seconds
from ._calls import FnInfo, Key, KeyFn
from ._policy import Checkpointer, P, StoreSpec, checkpointer_for
from ._registry import DEFAULT_ENV, _normalize_location, _warn_off
from ._wrapper import CheckpointedFunction, _wrap, make_wrapper

__all__ = [
    "DEFAULT_ENV",
    "CheckpointedFunction",
    "Checkpointer",
    "FnInfo",
    "Key",
    "KeyFn",
    "P",
    "StoreSpec",
    "_normalize_location",
    "_warn_off",
    "_wrap",
    "check_seconds",
    "checkpointer_for",
    "make_wrapper",
]
