"""The per-process registry of open checkpointers, by the description of their store.

Each store is opened once per process: a received wrapper finds the
checkpointer of its description here (``registry.get``), or opens one. The
registry knows a checkpointer only by its ``spec`` and ``closing`` fields and a
description only by its ``location`` and ``open()``, so it sits below the
checkpointer and its description (``_policy``) in the import order.
"""

from __future__ import annotations

import logging
import os
import threading
import weakref
from typing import Any, Optional, Protocol, Union

from ..stores import _redact, is_postgres_url

__all__ = ["DEFAULT_ENV", "registry", "_normalize_location", "_warn_off"]

logger = logging.getLogger("ai2_kit.core.checkpoint")


class _Spec(Protocol):
    """A store's description (``StoreSpec``), as the registry sees it."""

    @property
    def location(self) -> str: ...

    def open(self) -> Any: ...


class _Opened(Protocol):
    """An open checkpointer, as the registry sees it."""

    @property
    def spec(self) -> Any: ...

    @property
    def closing(self) -> bool: ...


#: Environment variable through which the facade's default store reaches
#: child processes (spawn, forkserver, Dask workers): a JSON description,
#: never a signing key.
DEFAULT_ENV = "AI2_KIT_CHECKPOINT_DEFAULT"


def _normalize_location(location: Any) -> str:
    if is_postgres_url(location):
        return str(location)
    return os.path.abspath(os.fspath(location))


class _Registry:
    """The checkpointers of this process, by description: each store opened once.

    Checkpointers the user made are held weakly (they end when the user drops
    them); those opened here for a received wrapper live as long as the
    process. A description that cannot be opened is warned about once.
    """

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        """Empty it, with a new lock (a forked child: the parent's threads may have held the old one)."""
        # Reentrant: opening a store here creates a Checkpointer, which registers itself.
        self.lock = threading.RLock()
        self.user: weakref.WeakValueDictionary[_Spec, _Opened] = weakref.WeakValueDictionary()
        self.opened: dict[_Spec, _Opened] = {}
        self.failed: set[_Spec] = set()

    def add(self, ckpt: _Opened) -> None:
        spec = ckpt.spec
        if spec is None:
            return
        with self.lock:
            cur = self.user.get(spec) or self.opened.get(spec)
            if cur is None or cur.closing:
                self.user[spec] = ckpt

    def remove(self, ckpt: _Opened) -> None:
        spec = ckpt.spec
        if spec is None:
            return
        with self.lock:
            if self.user.get(spec) is ckpt:
                del self.user[spec]
            if self.opened.get(spec) is ckpt:
                del self.opened[spec]

    def get(self, spec: _Spec) -> Optional[Any]:
        with self.lock:
            cur = self.user.get(spec) or self.opened.get(spec)
            if cur is not None and not cur.closing:
                return cur
            if spec in self.failed:
                return None
            try:
                cur = spec.open()
            except Exception as e:
                self.failed.add(spec)
                _warn_off(spec.location, e)
                return None
            self.opened[spec] = cur
            return cur


def _warn_off(location: str, e: Union[BaseException, str]) -> None:
    where = _redact(location) if is_postgres_url(location) else location
    logger.warning("Checkpointing is OFF in this process (pid %d): the store %s cannot be opened here (%s); "
                   "steps sent here run without being saved or looked up", os.getpid(), where,
                   e if isinstance(e, str) else f"{type(e).__name__}: {e}")


registry = _Registry()

