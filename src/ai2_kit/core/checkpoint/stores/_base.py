"""The store contract: what every storage engine implements, and the policy above it."""

from __future__ import annotations

import json
import logging
import math
import numbers
import os
import time
from abc import ABC, abstractmethod
from typing import Any, Callable, Iterator, NamedTuple, Optional, Union

from .._codec import CHECKED, Encoded, SignatureError, Signer, checking_only, encode, settle_crc
from .._display import MAX_TIME, number
from .._errors import (
    CorruptEntryError,
    NewerFormatError,
    ReadOnlyStoreError,
    SaveError,
    SignatureMismatchError,
    StoreRemovedError,
)
from .._keys import key_matcher, prefix_of, validate_key
from .._version import VERSION
from ._fs import HOST

logger = logging.getLogger(__name__)

__all__ = ["Store", "Hit", "FORMAT_VERSION", "MISSING", "LARGE", "library_version", "clean_run", "parse_run", "own_key",
           "MAX_RUN_BYTES"]

#: Version of the on-disk formats written by this library (metadata record,
#: frame layout, SQLite schema, directory layout).
FORMAT_VERSION = 1

def library_version() -> str:
    """This distribution's version, as recorded in the stores it writes.

    Not ``ai2_kit.__version__``: ``ai2_kit`` is a namespace shared with the
    real ai2-kit package, whose ``__init__.py`` (when installed) is not ours.
    A constant (``_version.py``), not a metadata lookup: that imports
    ``importlib.metadata`` and scans ``sys.path``, which the first save of
    every process would pay.
    """
    return VERSION


#: What ``Store.lookup_fast`` answers when the key has no entry.
MISSING: Any = object()
#: What ``Store.lookup_fast`` answers, when given a ``limit``, for an entry
#: larger than that (or in a side file): the value was not read.
LARGE: Any = object()


def check_seconds(name: str, value: Any) -> float:
    """``value`` as a number of seconds for the option ``name``: finite and positive.

    Checked where the option comes in, with one line naming it: an infinite
    lease reaching the heartbeat thread would fail its wait, and every other
    lease of the process would stop being renewed.
    """
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"{name} must be a number of seconds, not {value!r}")
    seconds = float(value)
    if not (math.isfinite(seconds) and seconds > 0):
        raise ValueError(f"{name} must be a finite positive number of seconds, not {value!r}")
    return seconds


class Hit(NamedTuple):
    """A stored entry: its metadata record and its value."""

    meta: dict[str, Any]
    value: Any


#: Reads and unpickles a value; given the store's Signer (or None), it must
#: check the MAC before unpickling anything.
Loader = Callable[[Optional[Signer]], Any]


class Store(ABC):
    """A place that keeps checkpoint entries.

    The public methods (``lookup``, ``put``, ``delete``, ``iter_meta``...)
    validate keys, build metadata, encode values, map errors and enforce
    read-only mode, once for every engine. An engine implements only these
    hooks, each called with a key that is already valid:

    ``_get(key) -> (meta, loader) | None``
        The metadata record and a function ``loader(signer)`` that returns
        the value (it may raise; the caller reports it as a damaged entry).
        A loader that holds an open file also has ``close()``, which the
        caller always calls, whether the loader ran or not.
        With a signer, the loader passes ``signer.verifier(meta)`` to the
        codec, which checks the MAC before unpickling.
    ``_get_meta(key) -> meta | None``
        The metadata record alone, without reading or unpickling the value.
    ``_put(key, meta, encoded)``
        Store atomically: afterwards the entry is complete and durable, or
        (on error, crash or kill) the previous state is untouched.
    ``_delete(key) -> bool``
        Remove one entry; True when something was removed.
    ``_iter_meta(prefix) -> iterator of meta``
        Metadata records of every key that starts with the string ``prefix``,
        sorted by key, never unpickling a value.
    ``_close()``
        Release connections and files.

    Engines that can coordinate callers of one key across processes (and
    hosts) also implement leases, and set ``supports_claims = True``:

    ``_try_claim(key, owner, ttl) -> bool``
        Atomically take the claim on ``key`` when nobody holds it, when the
        holder's lease has expired, or when ``owner`` holds it already;
        the lease then ends ``ttl`` seconds from now. True when ``owner``
        holds it afterwards.
    ``_renew_claim(key, owner, ttl) -> bool``
        Extend ``owner``'s lease; False when someone else holds it now.
    ``_release_claim(key, owner)``
        Drop the claim if ``owner`` holds it.

    ``location`` names the store in messages; ``kind`` is a short word
    (``sqlite``, ``directory``, ``legacy-file``, ``postgres``).
    """

    kind: str = "abstract"
    supports_claims: bool = False
    #: Errors that mean "try again later" (a dropped connection), not damage:
    #: they propagate as they are instead of becoming CorruptEntryError.
    transient_errors: tuple[type[BaseException], ...] = ()
    #: True for stores whose ``_put`` writes a big frame first and then calls
    #: ``settle_crc(meta, encoded)`` before it serializes ``meta``: the checksum
    #: is then computed while the frame is written (``Encoded.write_to``).
    #: Other stores get ``meta`` with the checksum already in it.
    checksum_while_writing: bool = False
    #: Errors the engine raises for I/O trouble: a save that fails with one is a SaveError.
    storage_errors: tuple[type[BaseException], ...] = (OSError,)
    #: Errors of the engine's driver that say its bytes are damaged, less those
    #: of them that do not (a lock, a busy file): see ``_damaged``.
    damage_errors: tuple[type[BaseException], ...] = ()
    not_damage_errors: tuple[type[BaseException], ...] = ()
    #: Whether reading it costs no network round trip, so that a small read
    #: may run on an event loop's thread.
    is_local: bool = False
    #: The ``open_store(prefer=...)`` that creates a store of this engine at a new path.
    prefer: str = "file"
    #: Whether it holds the reference library's own format, which ``migrate`` converts.
    reference_format: bool = False
    #: Whether ``len(store)`` is one query, not a walk of every entry (a
    #: progress bar then shows a total).
    counts_cheaply: bool = False
    #: Whether same-key dedup is on when the checkpointer is not told: a store
    #: that several hosts usually share at once.
    dedup_default: bool = False

    def __init__(self, location: str, *, readonly: bool = False, readonly_reason: str = "") -> None:
        self.location = location
        self.readonly = readonly
        self.readonly_reason = readonly_reason or "opened read-only"
        self.closed = False
        self.signer: Signer | None = None
        #: Set when the store was written by a newer library (opened read-only).
        self.newer_format: NewerFormatError | None = None

    def set_signing_key(self, secret: Optional[Union[bytes, str]]) -> None:
        """Sign every new entry, and refuse entries without a valid MAC, with ``secret``."""
        if isinstance(secret, str):
            secret = secret.encode("utf-8")
        self.signer = Signer(secret) if secret else None

    # -- hooks ------------------------------------------------------------
    @abstractmethod
    def _get(self, key: str) -> tuple[dict[str, Any], Loader] | None: ...

    @abstractmethod
    def _get_meta(self, key: str) -> dict[str, Any] | None: ...

    @abstractmethod
    def _put(self, key: str, meta: dict[str, Any], encoded: Encoded) -> None: ...

    @abstractmethod
    def _delete(self, key: str) -> bool: ...

    @abstractmethod
    def _iter_meta(self, prefix: str) -> Iterator[dict[str, Any]]: ...

    def _close(self) -> None:
        """Release resources; the default has nothing to release."""

    def _try_claim(self, key: str, owner: str, ttl: float) -> bool:
        raise NotImplementedError

    def _renew_claim(self, key: str, owner: str, ttl: float) -> bool:
        raise NotImplementedError

    def _release_claim(self, key: str, owner: str) -> None:
        raise NotImplementedError

    # -- public API ---------------------------------------------------------
    def _damaged(self, e: BaseException) -> bool:
        """Whether ``e`` says the store's bytes are damaged (engines refine this)."""
        return isinstance(e, (ValueError, UnicodeDecodeError, IsADirectoryError, NotADirectoryError)) or (
            isinstance(e, self.damage_errors) and not isinstance(e, self.not_damage_errors)
        )

    def lookup(self, key: str) -> Optional[Hit]:
        """The entry stored under ``key``, or None. Raises CorruptEntryError."""
        key = validate_key(key)
        try:
            got = self._get(key)
        except Exception as e:
            if self._damaged(e):
                raise CorruptEntryError(self.location, key, f"{type(e).__name__}: {e}") from e
            raise
        if got is None:
            return None
        meta, load = got
        try:
            value = self._load(key, meta, load)
        finally:
            close = getattr(load, "close", None)
            if close is not None:  # loaders holding an open file release it
                close()
        return Hit(meta, value)

    def lookup_fast(self, key: str, digest: Optional[str], limit: Optional[int] = None) -> Any:
        """A hit's short way, for engines that keep what a hit needs apart from the metadata.

        ``(value, duration, is_awaitable)`` when the entry is there, intact,
        and saved for a call whose fingerprint digest is ``digest`` (any,
        when None); ``MISSING`` when there is no entry; ``LARGE`` (only with
        a ``limit``) when its value is over ``limit`` bytes or in a side
        file, left unread; None when the engine cannot tell that way (the
        caller then uses ``lookup``, which reads, checks and compares the
        whole record). ``key`` is valid already. The default always answers
        None.
        """
        return None

    def _load(self, key: str, meta: dict[str, Any], load: Loader) -> Any:
        if meta.get("key") != key:
            # A damaged key column (or a file moved by hand) must never hand one
            # step's result to another.
            raise CorruptEntryError(self.location, key, f"it holds the entry of {meta.get('key')!r}")
        if self.signer is not None and meta.get("legacy"):
            raise SignatureMismatchError(
                self.location, key, "it is a reference-format entry, which carries no signature, "
                "and a signing key is in use; it was not unpickled"
            )
        try:
            return load(self.signer)
        except CorruptEntryError:
            raise
        except SignatureError as e:
            raise SignatureMismatchError(self.location, key, f"{e}; it was not unpickled") from e
        except self.transient_errors:
            raise
        except Exception as e:  # any other failure to read or unpickle is damage
            # A loader may know a better fix than removing the entry (a side-file
            # folder left behind by a copy: the value still exists elsewhere).
            raise CorruptEntryError(self.location, key, f"{type(e).__name__}: {e}",
                                    fix=getattr(e, "fix", None)) from e

    def verify(self, key: str) -> Optional[str]:
        """Check one entry's bytes (checksum, and MAC with a signing key) without unpickling.

        Returns None when the entry is sound (or missing), else the reason.
        Reference-format entries are only checked to be pickles.
        """
        try:
            meta = self.get_meta(key)
            if meta is None or ("crc32" not in meta and "damaged" not in meta):
                return None  # missing, or a reference-format file (no checksum to check)
            if "damaged" in meta:
                return str(meta["damaged"])
            with checking_only():
                hit = self.lookup(key)
            if hit is not None and hit.value is not CHECKED:
                return "the entry was decoded by an engine that ignores check-only mode"
        except CorruptEntryError as e:
            return e.reason
        except Exception as e:
            if self._damaged(e):
                return f"{type(e).__name__}: {e}"
            raise
        return None

    def get_meta(self, key: str) -> Optional[dict[str, Any]]:
        """The metadata record of ``key`` (never unpickles), or None.

        Raises CorruptEntryError when the record itself is damaged.
        """
        key = validate_key(key)
        try:
            return self._get_meta(key)
        except (ValueError, UnicodeDecodeError) as e:  # a damaged record, not a bad argument
            raise CorruptEntryError(self.location, key, f"its metadata record is damaged ({e})") from e

    def __contains__(self, key: object) -> bool:
        return self._get_meta(validate_key(key)) is not None

    def put(self, key: str, value: Any, **fields: Any) -> dict[str, Any]:
        """Save ``value`` under ``key`` durably; returns the metadata record.

        Raises SaveError (unpicklable value, I/O failure) or ReadOnlyStoreError.
        """
        key = validate_key(key)
        if self.readonly:
            raise ReadOnlyStoreError(self.location, self.readonly_reason)
        try:
            encoded = encode(value)
        except Exception as e:
            raise SaveError(key, f"the value cannot be pickled ({type(e).__name__}: {e})") from e
        meta = self.make_meta(key, encoded, fields)
        if self.signer is not None:
            settle_crc(meta, encoded)  # the MAC covers the checksum
            meta["mac"] = self.signer.sign(meta, encoded)
        self.put_encoded(key, meta, encoded)
        settle_crc(meta, encoded)  # (already done by the store)
        return meta

    def put_encoded(self, key: str, meta: dict[str, Any], encoded: Encoded) -> None:
        """Store an already encoded value with a complete metadata record."""
        if self.readonly:
            raise ReadOnlyStoreError(self.location, self.readonly_reason)
        if not self.checksum_while_writing:
            settle_crc(meta, encoded)
        try:
            self._put(key, meta, encoded)
        except self.storage_errors as e:
            raise SaveError(key, f"{type(e).__name__}: {e} (store {self.location})") from e

    @staticmethod
    def make_meta(key: str, encoded: Encoded, fields: dict[str, Any]) -> dict[str, Any]:
        meta: dict[str, Any] = {
            "key": key,
            "format": FORMAT_VERSION,
            "created": time.time(),
            "size": encoded.size,
            # None for a big frame: filled in while it is written (settle_crc).
            "crc32": encoded.crc if encoded.crc_known else None,
            "host": HOST,
            "pid": os.getpid(),
            "version": library_version(),
        }
        meta.update(fields)
        return meta

    def delete(self, key: str) -> bool:
        """Remove ``key``; True when it existed."""
        key = validate_key(key)
        if self.readonly:
            raise ReadOnlyStoreError(self.location, self.readonly_reason)
        return self._delete(key)

    def iter_meta(self, pattern: Optional[str] = None) -> Iterator[dict[str, Any]]:
        """Metadata of entries matching ``pattern`` (see ``key_matcher``), sorted."""
        match = key_matcher(pattern)
        for meta in self._iter_meta(prefix_of(pattern or "")):
            if match(meta["key"]):
                yield meta

    def delete_many(self, keys: list[str]) -> int:
        """Remove several keys; returns how many existed."""
        keys = [validate_key(k) for k in keys]
        if self.readonly:
            raise ReadOnlyStoreError(self.location, self.readonly_reason)
        return self._delete_many(keys)

    def _delete_many(self, keys: list[str]) -> int:
        """Engines with transactions override this to remove in one go."""
        return sum(1 for k in keys if self._delete(k))

    # -- leases: one live caller computes a key, the others wait for it -------
    def try_claim(self, key: str, owner: str, ttl: float) -> bool:
        """Take the lease on ``key`` for ``owner``; True when it is ours to compute.

        Stores without leases, and read-only stores, always answer True:
        every caller computes, as without dedup.
        """
        if not self.supports_claims or self.readonly:
            return True
        return self._try_claim(validate_key(key), owner, ttl)

    def renew_claim(self, key: str, owner: str, ttl: float) -> bool:
        if not self.supports_claims or self.readonly:
            return True
        return self._renew_claim(key, owner, ttl)

    def release_claim(self, key: str, owner: str) -> None:
        if self.supports_claims and not self.readonly:
            self._release_claim(key, owner)

    # -- runs: which process saved what, and what its hits saved (_runs.py) ---
    def put_run(self, record: dict[str, Any]) -> None:
        """Write or replace one run record (``record["id"]``); read-only stores keep none.

        Raises StoreRemovedError, writing nothing, when the store was removed
        since it was opened: a run record must never re-create a store.
        """
        if not self.readonly:
            gone = self._gone()
            if gone is not None:
                raise StoreRemovedError(self.location, gone)
            self._put_run(str(record["id"]), record)

    def _gone(self) -> Optional[str]:
        """Why the store is no longer where it was opened, or None (engines with files override this)."""
        return None

    def iter_runs(self) -> list[dict[str, Any]]:
        """Run records, oldest first; a store written before runs existed has none.

        Each record is checked field by field (``clean_run``): a field of the
        wrong type or out of range reads as None. Records that are not
        objects with a text id are left out, with one WARNING for them all.
        """
        runs, bad = [], 0
        for r in self._iter_runs():
            clean = clean_run(r)
            if clean is None:
                bad += 1
            else:
                runs.append(clean)
        if bad:
            logger.warning("%d run record(s) in %s are not run records (no object with a text id); left out",
                           bad, self.location)
        return sorted(runs, key=lambda r: (r["started"] or 0.0, r["id"]))

    def _put_run(self, run_id: str, record: dict[str, Any]) -> None:
        """Engines that keep runs override this and ``_iter_runs``; others keep none."""

    def _iter_runs(self) -> Iterator[dict[str, Any]]:
        return iter(())

    def keys(self, pattern: Optional[str] = None) -> list[str]:
        return [m["key"] for m in self.iter_meta(pattern)]

    def __len__(self) -> int:
        return sum(1 for _ in self._iter_meta(""))

    # -- what differs by engine, for the layers above ------------------------------
    def describe(self) -> Optional[tuple[str, tuple[tuple[str, Any], ...]]]:
        """(location, engine options) that open this store again in another process, or None if unknown."""
        for attr in ("path", "root"):
            value = getattr(self, attr, None)
            if isinstance(value, str):
                return value, ()
        return None

    def structure_problems(self) -> list[str]:
        """What the engine's own check of its structure finds (``verify``); empty when sound or unchecked."""
        return []

    def missing_side_files(self) -> Optional[str]:
        """Why entries cannot be read here because the folder of their side files is missing, or None.

        A store copied without that folder (``cp FILE`` leaves ``FILE.blobs/``
        behind) lists every entry but reads none kept there; the values may
        still exist beside the original. Engines that keep no side files: None.
        """
        return None

    def orphan_files(self) -> list[str]:
        """Files of the store that no entry owns (left by writers killed mid-save); harmless, removable."""
        return []

    def probe_keys(self) -> Optional[Iterator[str]]:
        """Keys found one by one when a listing stopped at damage (``StoreDamagedError``); None: no such way.

        The keys may repeat those the listing gave before it stopped.
        """
        return None

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self._close()

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.location!r}{' read-only' if self.readonly else ''}>"


#: Fields of a run record (``_runs.RunRecorder``) and what each must be to be used.
_RUN_TEXT = ("host", "user", "python")
_RUN_COUNTS = ("pid", "steps_run", "hits", "stale", "reruns", "save_failures")
_RUN_SECONDS = ("run_seconds", "saved_seconds")
_RUN_TIMES = ("started", "last")


def own_key(key: str, meta: dict[str, Any]) -> dict[str, Any]:
    """A listed metadata record, or a damaged stand-in when its ``key`` field is not the row's key.

    The row's key is what the store is indexed by; a record naming another
    key (or a number) is crafted or misplaced, and listing it under that
    name would show, select and remove the wrong entry.
    """
    if meta.get("key") == key:
        return meta
    return {"key": key, "damaged": f"its metadata record names another key ({meta.get('key')!r:.80})"}


#: Size a run record may have (1,000 stale keys of 1 KiB each fit with room
#: to spare); a bigger one is not read.
MAX_RUN_BYTES = 16 << 20


def parse_run(text: Any) -> Any:
    """A run record's stored JSON text parsed, or None when it is not JSON (counted as not a record)."""
    try:
        return json.loads(text)
    except (ValueError, TypeError, RecursionError):  # not JSON, not text, nested beyond reason
        return None


def clean_run(record: object) -> Optional[dict[str, Any]]:
    """A run record as read from a store, every known field checked; None when it is not one.

    Anyone who can write to a store can write its run records, so nothing
    in them is trusted: a field of the wrong type, a negative or non-finite
    number, a time beyond the year 9999 becomes None (shown as '-');
    ``argv`` must be a list of strings, ``stale_keys`` keeps its strings.
    Other fields are kept as they are.
    """
    if not isinstance(record, dict) or not isinstance(record.get("id"), str):
        return None
    out = dict(record)
    for name in _RUN_TEXT:
        out[name] = record.get(name) if isinstance(record.get(name), str) else None
    for name in _RUN_COUNTS:
        v = record.get(name)
        out[name] = v if isinstance(v, int) and not isinstance(v, bool) and 0 <= v < 2**63 else None
    for name in _RUN_SECONDS:
        out[name] = number(record.get(name))
    for name in _RUN_TIMES:
        out[name] = number(record.get(name), high=MAX_TIME)
    argv = record.get("argv")
    out["argv"] = argv if isinstance(argv, list) and all(isinstance(a, str) for a in argv) else None
    keys = record.get("stale_keys")
    out["stale_keys"] = [k for k in keys if isinstance(k, str)] if isinstance(keys, list) else []
    return out
