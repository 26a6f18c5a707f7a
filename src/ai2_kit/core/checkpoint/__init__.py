"""Checkpoints for long workflows: skip every step that already finished.

The seed's interface, verbatim::

    from ai2_kit.core.checkpoint import set_checkpoint_file, apply_checkpoint

    set_checkpoint_file("./checkpoint.pkl")
    apply_checkpoint("time_consuming_step")(a_time_consuming_step)(10)

The module functions are a thin layer over one default ``Checkpointer``;
create your own ``Checkpointer`` objects to hold several stores at once.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
from typing import Any, Callable, Optional, TypeVar, Union

from ._checkpointer import Checkpointer, FnInfo, Key, KeyFn, make_wrapper
from ._compat import CheckpointService, checkpoint_service
from ._errors import (
    CheckpointError,
    CorruptEntryError,
    InvalidKeyError,
    NewerFormatError,
    NotACheckpointStoreError,
    ReadOnlyStoreError,
    SaveError,
    SignatureMismatchError,
    StoreOpenError,
)
from .stores import DirectoryStore, SQLiteStore, Store, open_store

# Defined at run time, not only for type checkers: typing.get_type_hints()
# on the public functions must find P (the real ai2-kit's tooling and
# documentation generators call it).
if sys.version_info >= (3, 10):
    from typing import ParamSpec
else:  # pragma: no cover - Python 3.9
    from typing_extensions import ParamSpec

P = ParamSpec("P")

__all__ = [
    "set_checkpoint_file",
    "set_checkpoint_dir",
    "apply_checkpoint",
    "del_checkpoint",
    "get_checkpointer",
    "reset_checkpoint",
    "FnInfo",
    "KeyFn",
    "EMPTY",
    "CheckpointService",
    "checkpoint_service",
    "Checkpointer",
    "Store",
    "SQLiteStore",
    "DirectoryStore",
    "open_store",
    "CheckpointError",
    "InvalidKeyError",
    "StoreOpenError",
    "NotACheckpointStoreError",
    "NewerFormatError",
    "ReadOnlyStoreError",
    "CorruptEntryError",
    "SaveError",
    "SignatureMismatchError",
]

logger = logging.getLogger("ai2_kit.core.checkpoint")
R = TypeVar("R")

#: The real ai2-kit's marker for "no saved result". Nothing here returns it;
#: it exists so that code written against ai2-kit 1.1.1 that compares with
#: it (``if value is EMPTY``) keeps importing and running.
EMPTY: Any = object()

_default: Checkpointer | None = None
_default_lock = threading.Lock()


def _set_default(location: Any, prefer: str, **options: Any) -> Checkpointer:
    global _default
    target = location if isinstance(location, str) and "://" in location else os.path.abspath(os.fspath(location))
    with _default_lock:
        old = _default
        if old is not None and old.location in (target, location):
            return old  # the same location again: harmless
        new = Checkpointer(location, prefer=prefer, **options)
        _default = new
    if old is not None:
        logger.warning("Checkpoint store switched from %s to %s", old.location, new.location)
        old.close()
    return new


def set_checkpoint_file(path: Union[str, os.PathLike[str]], **options: Any) -> Checkpointer:
    """Turn checkpointing on, with a single-file store at ``path``.

    A new path becomes an SQLite store; an existing reference pickle file is
    read as it is and migrated (with a backup) on the first write; a
    ``postgresql://`` URL selects the PostgreSQL store. Calling it again with
    the same path does nothing; another path switches stores (logged).
    Options go to ``Checkpointer`` (``strict=True`` makes failed saves raise).
    """
    if (not isinstance(path, str) or "://" not in path) and os.path.isdir(os.fspath(path)):
        raise NotACheckpointStoreError(
            os.path.abspath(os.fspath(path)), "it is a directory",
            "Use set_checkpoint_dir() for a directory store",
        )
    return _set_default(path, "file", **options)


def set_checkpoint_dir(checkpoint_dir: Union[str, os.PathLike[str]], **options: Any) -> Checkpointer:
    """Turn checkpointing on, with a directory store (one file per key) at ``checkpoint_dir``.

    Safe on NFS and Lustre (no locks); reads the reference's per-key files.
    The parameter's name is the real ai2-kit's (``checkpoint_dir=``). A file
    at that path raises ``NotACheckpointStoreError``, which is also a
    ``FileExistsError`` as the real package's ``os.makedirs`` raised.
    """
    path = checkpoint_dir
    if os.path.isfile(os.fspath(path)):
        raise NotACheckpointStoreError(
            os.path.abspath(os.fspath(path)), "it is a file",
            "Use set_checkpoint_file() for a single-file store",
        )
    return _set_default(path, "dir", **options)


def get_checkpointer() -> Optional[Checkpointer]:
    """The default checkpointer, or None when checkpointing is off."""
    return _default


def reset_checkpoint() -> None:
    """Turn checkpointing off and close the default store."""
    global _default
    with _default_lock:
        old, _default = _default, None
    if old is not None:
        old.close()


def apply_checkpoint(
    key_fn: Key, disable: bool = False, *, stale: Optional[str] = None
) -> Callable[[Callable[P, R]], Callable[P, R]]:
    """Checkpoint calls of a function under ``key``.

    ``apply_checkpoint(key)(fn)(*args, **kwargs)`` runs ``fn`` the first time
    and saves its result; later calls, in this process or the next run,
    return the saved result without running ``fn``. ``key`` is a string or a
    function of ``FnInfo`` returning one. Without a store set (or with
    ``disable=True``) ``fn`` just runs. The store is looked up at call time,
    so decorating before ``set_checkpoint_file`` is fine. ``stale``
    (``"warn"``, ``"rerun"``, ``"ignore"``) overrides the store's policy for
    saved results whose arguments or code changed since (see ``Checkpointer``).
    """
    return lambda fn: make_wrapper(fn, key_fn, disable, get_checkpointer, stale)  # type: ignore[return-value]


def del_checkpoint(key: str) -> bool:
    """Remove one entry from the default store; True when it existed."""
    ckpt = _default
    if ckpt is None:
        raise CheckpointError("no checkpoint store is set; call set_checkpoint_file() first")
    return ckpt.delete(key)
