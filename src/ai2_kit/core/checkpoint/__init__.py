"""Checkpoints for long workflows: skip every step that already finished.

The seed's interface, verbatim::

    from ai2_kit.core.checkpoint import set_checkpoint_file, apply_checkpoint

    set_checkpoint_file("./checkpoint.pkl")
    apply_checkpoint("time_consuming_step")(a_time_consuming_step)(10)

The module functions are a thin layer over one default ``Checkpointer``;
create your own ``Checkpointer`` objects to hold several stores at once.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import os
import threading
from typing import Any, Callable, Optional, TypeVar, Union

from ._checkpointer import (
    DEFAULT_ENV,
    CheckpointedFunction,
    Checkpointer,
    FnInfo,
    Key,
    KeyFn,
    P,  # defined at run time, so typing.get_type_hints() on the public functions finds it
    StoreSpec,
    _normalize_location,
    _warn_off,
    _wrap,
    check_seconds,
    checkpointer_for,
)
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
    StoreTimeoutError,
)
from ._forking import at_fork
from .stores import SIGNING_KEY_ENV, DirectoryStore, SQLiteStore, Store, is_postgres_url, open_store

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
    "CheckpointedFunction",
    "Store",
    "SQLiteStore",
    "DirectoryStore",
    "open_store",
    "CheckpointError",
    "InvalidKeyError",
    "StoreOpenError",
    "StoreTimeoutError",
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

_default: Optional[Checkpointer] = None
_default_lock = threading.Lock()
#: Whether this process has decided its default (set, reset, or read from
#: DEFAULT_ENV); until then a worker started by a workflow takes the
#: workflow's default from the environment.
_env_checked = False

#: What ``set_checkpoint_file(path, **options)`` accepts besides ``path``.
_OPTIONS = ("strict", "readonly", "dedup", "lease", "signing_key", "stale", "environment", "store_options")


def _publish(ckpt: Optional[Checkpointer]) -> None:
    """Record the default where child processes (spawn, forkserver, Dask) find it."""
    spec = None if ckpt is None else ckpt.spec
    if spec is None:
        os.environ.pop(DEFAULT_ENV, None)
    else:
        os.environ[DEFAULT_ENV] = spec.to_env()


def _respec(old: StoreSpec, options: dict[str, Any]) -> StoreSpec:
    """``old`` with the options given explicitly; those not given stay as they are."""
    unknown = sorted(set(options) - set(_OPTIONS))
    if unknown:
        raise TypeError(f"unknown checkpoint option(s) {', '.join(map(repr, unknown))}; "
                        f"the options are {', '.join(_OPTIONS)}")
    changes: dict[str, Any] = {}
    for name, value in options.items():
        if name == "signing_key":
            if value is None:
                value = os.environ.get(SIGNING_KEY_ENV) or None
            if isinstance(value, str):
                value = value.encode("utf-8")
            changes[name] = value or None
        elif name == "dedup":
            changes[name] = is_postgres_url(old.location) if value is None else bool(value)
        elif name == "store_options":
            changes[name] = tuple(sorted(dict(value or {}).items()))
        elif name == "lease":
            changes[name] = check_seconds("lease", value)
        else:
            changes[name] = value
    return dataclasses.replace(old, **changes)


def _set_default(location: Any, prefer: str, **options: Any) -> Checkpointer:
    global _default, _env_checked
    target = _normalize_location(location)
    switched = False
    with _default_lock:
        _env_checked = True
        old = _default
        if old is not None and old.spec is not None and old.spec.location == target and not old.closing:
            wanted = _respec(old.spec, options)
            if wanted == old.spec:
                return old  # the same location and options again: harmless
            # Other options for the same store: applied, through a new
            # checkpointer; calls running on the old one finish there.
            new = wanted.open()
        else:
            new = Checkpointer(location, prefer=prefer, **options)
            switched = old is not None
        _default = new
        _publish(new)
    if old is not None:
        if switched:
            logger.warning("Checkpoint store switched from %s to %s", old.location, new.location)
        else:
            logger.info("Checkpoint options for %s changed", new.location)
        old.close()  # closes once the calls running on it have saved
    return new


def set_checkpoint_file(path: Union[str, os.PathLike[str]], **options: Any) -> Checkpointer:
    """Turn checkpointing on, with a single-file store at ``path``.

    A new path becomes an SQLite store; an existing reference pickle file is
    read as it is and migrated (with a backup) on the first write; a
    ``postgresql://`` URL selects the PostgreSQL store. Calling it again with
    the same path does nothing; with other options applies them (the options
    not given stay); another path switches stores (logged). Calls running on
    the previous store save there first. Options go to ``Checkpointer``
    (``strict=True`` makes failed saves raise).

    The default reaches the workers of process pools (fork, spawn,
    forkserver) and Dask: see docs/parallel.md.
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
    """The default checkpointer, or None when checkpointing is off.

    In a process that set none, reset none, and was started by a workflow
    that had one (a spawn or forkserver worker, a Dask worker), the
    workflow's default, opened once from the ``AI2_KIT_CHECKPOINT_DEFAULT``
    environment variable; a worker that cannot open it logs one WARNING and
    runs its steps without checkpoints.
    """
    ckpt = _default
    if ckpt is None and not _env_checked:
        return _default_from_env()
    return ckpt


def _default_from_env() -> Optional[Checkpointer]:
    global _default, _env_checked
    with _default_lock:
        if _env_checked:
            return _default
        _env_checked = True
        text = os.environ.get(DEFAULT_ENV)
        if not text:
            return None
        try:
            _check_env_description(text)
            spec = StoreSpec.from_env(text)
        except (ValueError, TypeError, AttributeError) as e:
            location = text
            try:
                location = str(json.loads(text).get("location", text))
            except (ValueError, AttributeError):
                pass
            _warn_off(location or repr(location), f"{DEFAULT_ENV}: {e}")
            return None
        _default = checkpointer_for(spec)
        return _default


def _check_env_description(text: str) -> None:
    """Refuse (ValueError) a ``DEFAULT_ENV`` description whose fields would not open the store it names.

    The variable is inherited by every child process, so a wrong one must
    cost a WARNING and checkpoints, never an exception out of a step; and an
    empty location would quietly make a store in the current folder.
    """
    d = json.loads(text)
    if not isinstance(d, dict):
        raise ValueError("not a store description (a JSON object)")
    location = d.get("location")
    if not isinstance(location, str):
        raise ValueError(f"'location' must name a store, not {location!r}")
    if not location.strip():
        raise ValueError("'location' is empty: the store path is empty; name a store file, folder or URL")
    if not isinstance(d.get("store_options") or {}, dict):
        raise ValueError(f"'store_options' must be an object, not {d['store_options']!r}")
    for name, kind in (("prefer", str), ("stale", str), ("environment", str)):
        if name in d and not isinstance(d[name], kind):
            raise ValueError(f"{name!r} must be text, not {d[name]!r}")
    for name in ("readonly", "strict", "dedup", "signed"):
        if name in d and not isinstance(d[name], bool):
            raise ValueError(f"{name!r} must be true or false, not {d[name]!r}")
    lease = d.get("lease", 60.0)
    if not isinstance(lease, (int, float)) or isinstance(lease, bool) or not 0 < lease < float("inf"):
        raise ValueError(f"'lease' must be a positive number of seconds, not {lease!r}")


def reset_checkpoint() -> None:
    """Turn checkpointing off and close the default store (once its running calls saved)."""
    global _default, _env_checked
    with _default_lock:
        _env_checked = True
        old, _default = _default, None
        _publish(None)
    if old is not None:
        old.close()


def apply_checkpoint(
    key_fn: Key, disable: bool = False, *, stale: Optional[str] = None,
    validate: Optional[Callable[[Any], Any]] = None,
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
    ``validate`` is a function of a hit's value (for an async step, the
    awaited result): when it returns a false value or raises, the step runs
    again and its new result is saved, with one WARNING naming the key (e.g.
    ``validate=os.path.exists`` for a result that is a path to a file).
    """
    if disable or stale is not None or validate is not None:
        return functools.partial(_wrap, None, get_checkpointer, key_fn, disable=disable,  # type: ignore[return-value]
                                 stale=stale, validate=validate)
    return functools.partial(_wrap, None, get_checkpointer, key_fn)  # type: ignore[return-value]


def del_checkpoint(key: str) -> bool:
    """Remove one entry from the default store; True when it existed."""
    ckpt = _default
    if ckpt is None:
        raise CheckpointError("no checkpoint store is set; call set_checkpoint_file() first")
    return ckpt.delete(key)


def _after_fork_in_child() -> None:
    global _default_lock
    _default_lock = threading.Lock()  # a parent thread may have held it at the fork


at_fork(after_in_child=_after_fork_in_child)
