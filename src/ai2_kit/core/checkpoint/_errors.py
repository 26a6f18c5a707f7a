"""The exception hierarchy: one base class, specific subclasses carrying data."""

from __future__ import annotations

import shlex
from typing import Optional

__all__ = [
    "CheckpointError",
    "InvalidKeyError",
    "StoreOpenError",
    "NotACheckpointStoreError",
    "NewerFormatError",
    "ReadOnlyStoreError",
    "CorruptEntryError",
    "SaveError",
    "SignatureMismatchError",
    "StoreDamagedError",
    "StoreRemovedError",
    "StoreTimeoutError",
]


class CheckpointError(Exception):
    """Base class of every error raised by ``ai2_kit.core.checkpoint``."""


class InvalidKeyError(CheckpointError, ValueError):
    """A key that cannot address an entry (empty, NUL, ``..``, absolute...)."""

    def __init__(self, key: object, reason: str) -> None:
        self.key = key
        self.reason = reason
        super().__init__(
            f"invalid checkpoint key {key!r}: {reason}. Keys are non-empty strings "
            "of '/'-separated parts such as 'iters-000/deepmd/red'; no part may be "
            "empty, '.' or '..', and NUL and control characters are not allowed."
        )


class StoreOpenError(CheckpointError, OSError):
    """A store location that cannot be opened (missing, unreadable, wrong kind)."""

    def __init__(self, location: str, reason: str, hint: str = "") -> None:
        self.location = location
        self.reason = reason
        self.hint = hint
        msg = f"cannot open checkpoint store {location!r}: {reason}"
        if hint:
            msg += f". {hint}"
        # OSError's own __init__ would reinterpret the arguments; keep ours.
        Exception.__init__(self, msg)

    def __str__(self) -> str:
        return str(self.args[0])


class StoreTimeoutError(StoreOpenError, TimeoutError):
    """The store's server did not answer within the store's timeout; the connection was dropped."""

    def __init__(self, location: str, reason: str, hint: str = "") -> None:
        super().__init__(location, reason, hint)
        # Not an open that failed: a call on an open store that waited too long.
        msg = f"checkpoint store {location!r}: {reason}"
        self.args = (msg + f". {hint}" if hint else msg,)


class NotACheckpointStoreError(StoreOpenError, FileExistsError):
    """The location exists but holds something that is not a checkpoint store.

    Also a ``FileExistsError``: the real ai2-kit raised that for a file where
    its checkpoint folder belongs, and callers written for it catch it.
    """


class NewerFormatError(StoreOpenError):
    """The store was written by a newer version of the library; reading only."""

    def __init__(self, location: str, found: int, supported: int, writer: str = "") -> None:
        self.found = found
        self.supported = supported
        self.writer = writer
        by = f" (written by ai2-kit-checkpoint {writer})" if writer else ""
        super().__init__(
            location,
            f"format version {found}{by} is newer than this library's {supported}",
            "It is opened read-only; upgrade ai2-kit-checkpoint to write to it",
        )


class StoreDamagedError(CheckpointError):
    """The store's file itself is damaged (not one entry): nothing is overwritten."""

    def __init__(self, location: str, reason: str) -> None:
        self.location = location
        self.reason = reason
        super().__init__(
            f"checkpoint store {location!r} is damaged: {reason}. It is left as it is; "
            f"'ai2-kit tool checkpoint verify {location} --salvage NEW' copies every readable "
            "entry into a new store"
        )


class StoreRemovedError(CheckpointError):
    """The store was removed (or replaced) since this process opened it; nothing re-creates it."""

    def __init__(self, location: str, reason: str) -> None:
        self.location = location
        self.reason = reason
        super().__init__(f"checkpoint store {location!r} is gone: {reason}")


class ReadOnlyStoreError(CheckpointError, PermissionError):
    """A write was attempted on a store that was opened read-only."""

    def __init__(self, location: str, reason: str) -> None:
        self.location = location
        self.reason = reason
        Exception.__init__(self, f"checkpoint store {location!r} is read-only: {reason}")

    def __str__(self) -> str:
        return str(self.args[0])


class CorruptEntryError(CheckpointError):
    """A stored entry failed its integrity check; its value is never returned."""

    def __init__(self, location: str, key: str, reason: str, fix: Optional[str] = None) -> None:
        self.location = location
        self.key = key
        self.reason = reason
        # ``fix``: the reader knows the bytes may be sound elsewhere (a folder
        # left behind by a copy), so removing the entry is not the advice.
        state = "cannot be read here" if fix else "is damaged"
        if fix is None:
            fix = (f"Remove it (ai2-kit tool checkpoint load {shlex.quote(location)} - rm {shlex.quote(key)}) "
                   "so the step runs again, or run 'verify' to salvage the rest.")
        super().__init__(f"checkpoint entry {key!r} in {location!r} {state}: {reason}. {fix}")


class SignatureMismatchError(CorruptEntryError):
    """A signing key is in use and the entry's MAC is missing or wrong; never unpickled."""


class SaveError(CheckpointError):
    """Saving a step's result failed (unpicklable value, disk full, read-only...)."""

    def __init__(self, key: str, reason: str) -> None:
        self.key = key
        self.reason = reason
        super().__init__(f"could not save checkpoint {key!r}: {reason}")
