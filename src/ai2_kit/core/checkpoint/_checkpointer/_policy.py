"""The checkpointer: the policy of one store (hits, saves, staleness, dedup, lifetime) and its description.

``Checkpointer`` holds a store and the options that say what a call does
with it; ``StoreSpec`` describes one (location and options, never a
connection) so that another process can open the same checkpointer. The
wrappers it makes (``Checkpointer.__call__``) are in ``_wrapper``.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import json
import logging
import os
import sys
import threading
import time
import weakref
from typing import Any, Callable, Mapping, Optional, TypeVar, Union, cast

from .._errors import CheckpointError, CorruptEntryError, SaveError
from .._fingerprint import check_environment_policy, explain, fingerprint, judge
from .._forking import at_fork
from .._runs import RunRecorder
from ..stores import SIGNING_KEY_ENV, Store, open_store
from ..stores._base import LARGE, MISSING, check_seconds
from ._async import _submit
from ._calls import Key, _check_policy
from ._dedup import Lease, _drop_claim_of, _Flight, _join_flight, _Waiter
from ._registry import _normalize_location, registry
from ._wrapper import _wrap

# At run time too, so that typing.get_type_hints() finds P (the real
# ai2-kit's tooling and documentation generators call it); the facade
# imports this one.
if sys.version_info >= (3, 10):
    from typing import ParamSpec
else:  # pragma: no cover - Python 3.9
    from typing_extensions import ParamSpec

P = ParamSpec("P")
R = TypeVar("R")

__all__ = ["Checkpointer", "P", "StoreSpec", "checkpointer_for"]

logger = logging.getLogger("ai2_kit.core.checkpoint")


@dataclasses.dataclass(frozen=True)
class StoreSpec:
    """What is needed to open a checkpointer again in another process.

    A location and options only: never a connection, a lock or a thread.
    The signing key is part of it (pickled wrappers carry it to their
    workers), but never shown and never put in the environment.
    """

    location: str
    prefer: str = "file"
    readonly: bool = False
    strict: bool = False
    dedup: bool = False
    lease: float = 60.0
    stale: str = "warn"
    environment: str = "report"
    signing_key: Optional[bytes] = dataclasses.field(default=None, repr=False)
    store_options: tuple[tuple[str, Any], ...] = ()

    def open(self) -> Checkpointer:
        """A new Checkpointer on this store with these options."""
        return Checkpointer(
            self.location, prefer=self.prefer, readonly=self.readonly, strict=self.strict,
            dedup=self.dedup, lease=self.lease, stale=self.stale, environment=self.environment,
            signing_key=self.signing_key or b"", store_options=dict(self.store_options),
        )

    def to_env(self) -> str:
        """JSON for ``DEFAULT_ENV``: the key is replaced by whether one is needed."""
        d = dataclasses.asdict(self)
        d["signing_key"] = None
        d["signed"] = bool(self.signing_key)
        d["store_options"] = dict(self.store_options)
        return json.dumps(d, sort_keys=True)

    @classmethod
    def from_env(cls, text: str) -> StoreSpec:
        """The inverse of ``to_env``; the key comes from this process's ``AI2_KIT_CHECKPOINT_KEY``.

        Raises ValueError when the text is not a description, or when the
        store is signed and this process has no key.
        """
        d = json.loads(text)
        if not isinstance(d, dict) or not isinstance(d.get("location"), str):
            raise ValueError("not a store description")
        signed = bool(d.pop("signed", False))
        d.pop("signing_key", None)
        opts = d.pop("store_options", None) or {}
        key = os.environ.get(SIGNING_KEY_ENV, "").encode("utf-8") or None
        if signed and key is None:
            raise ValueError(f"its entries are signed and {SIGNING_KEY_ENV} is not set in this process")
        fields = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in fields}, signing_key=key,
                   store_options=tuple(sorted(opts.items())))

def _rebuild_checkpointer(spec: StoreSpec) -> Checkpointer:
    ckpt = checkpointer_for(spec)
    if ckpt is None:
        raise CheckpointError(f"cannot open the checkpoint store {spec.location} in this process")
    return ckpt


# -- the checkpointer ------------------------------------------------------------------


class Checkpointer:
    """Saves the results of steps in a store and returns them on later calls.

    >>> import tempfile, os
    >>> with Checkpointer(os.path.join(tempfile.mkdtemp(), "ckpt.db")) as ckpt:
    ...     square = ckpt("square")(lambda x: x * x)
    ...     square(3), square(4)   # the second call is a hit: the saved 9
    (9, 9)

    Parameters:
        location: a file path (SQLite store, or a reference 2023 pickle file),
            a directory, or a ``postgresql://`` URL; see ``open_store``.
        store: an already opened ``Store`` instead of ``location``.
        prefer: ``"file"`` or ``"dir"``: what to create when ``location``
            does not exist yet.
        strict: raise ``SaveError`` when a result cannot be saved, instead of
            logging a warning and going on.
        dedup: while one live caller computes a key, other callers of the
            same key (threads, tasks, processes, hosts sharing the store) wait
            for its result instead of running the step again. Callers in one
            process share one computation; across processes the claim is a
            lease of ``lease`` seconds, renewed by a heartbeat; if its owner
            dies, the lease runs out and one waiting caller takes over. Costs
            one small write per miss; off by default except on PostgreSQL.
        lease: seconds a claim lasts without a heartbeat (the longest a rerun
            after a crash can wait for a dead owner's claim).
        stale: what to do when a hit's saved fingerprints (of the call's
            arguments and of the function's code) differ from this call's:
            ``"warn"`` (return the saved value, log one WARNING naming what
            changed), ``"rerun"`` (run again and replace the entry) or
            ``"ignore"`` (return the saved value unjudged; no fingerprinting cost).
        environment: what a hit saved under other versions of Python or of the
            installed packages the step's modules import means:
            ``"report"`` (say so, as context of a stale warning or in an INFO
            line; the saved result stands), ``"stale"`` (count it as stale,
            handled by ``stale``) or ``"ignore"``.
        signing_key: sign every entry with an HMAC under this secret and
            refuse, before unpickling, entries whose MAC is missing or wrong
            (default: the ``AI2_KIT_CHECKPOINT_KEY`` environment variable).
        store_options: engine options for ``open_store`` (``schema`` for
            PostgreSQL).

    Wrappers made by a checkpointer pickle (to process pools, Dask) with a
    description of its store; a process receiving one opens that store once.
    ``close()`` waits for the calls running on it: the store closes when the
    last one has saved.
    """

    def __init__(
        self,
        location: Any = None,
        *,
        store: Optional[Store] = None,
        prefer: str = "file",
        strict: bool = False,
        readonly: bool = False,
        dedup: Optional[bool] = None,
        lease: float = 60.0,
        signing_key: Optional[Union[bytes, str]] = None,
        stale: str = "warn",
        environment: str = "report",
        store_options: Optional[Mapping[str, Any]] = None,
    ) -> None:
        self.environment = check_environment_policy(environment)
        if (location is None) == (store is None):
            raise TypeError("Checkpointer needs exactly one of location or store")
        self.stale = _check_policy(stale)
        lease = check_seconds("lease", lease)
        opts = dict(store_options or {})
        if store is None:
            store = open_store(location, prefer=prefer, readonly=readonly, signing_key=signing_key, **opts)
        elif signing_key is not None:
            store.set_signing_key(signing_key)
        self.store: Store = store
        if store.newer_format is not None:
            logger.warning("%s", store.newer_format)
        self.strict = strict
        self.dedup = self.store.dedup_default if dedup is None else bool(dedup)
        self.lease = float(lease)
        self._lock = threading.Lock()
        self._run: Optional[RunRecorder] = None
        self._inflight = 0
        self.closing = False
        self.spec = self._describe(location, prefer, opts)
        _live.add(self)
        registry.add(self)

    def _describe(self, location: Any, prefer: str, opts: dict[str, Any]) -> Optional[StoreSpec]:
        signer = self.store.signer
        key = signer.secret if signer is not None else None
        if location is not None:
            where, options = _normalize_location(location), tuple(sorted(opts.items()))
        else:
            found = self.store.describe()
            if found is None:
                return None
            where, options = found
        return StoreSpec(
            location=where, prefer=prefer, readonly=bool(self.store.readonly), strict=bool(self.strict),
            dedup=self.dedup, lease=self.lease, stale=self.stale, environment=self.environment,
            signing_key=key if isinstance(key, bytes) else None, store_options=options,
        )

    @property
    def location(self) -> str:
        return self.store.location

    def __call__(
        self, key: Key, disable: bool = False, *, stale: Optional[str] = None,
        validate: Optional[Callable[[Any], Any]] = None,
    ) -> Callable[[Callable[P, R]], Callable[P, R]]:
        """A decorator that checkpoints calls of a function under ``key``.

        ``stale`` overrides the checkpointer's policy for these calls.
        ``validate``: a function of a hit's value; when it returns a false
        value or raises, the hit is not used: the step runs again and its
        result is saved, with one WARNING naming the key.
        """
        if disable or stale is not None or validate is not None:
            return functools.partial(_wrap, self, None, key, disable=disable, stale=stale,  # type: ignore[return-value]
                                     validate=validate)
        return functools.partial(_wrap, self, None, key)  # type: ignore[return-value]

    apply = __call__

    def delete(self, key: str) -> bool:
        """Remove one entry; True when it existed."""
        return self.store.delete(key)

    @property
    def run(self) -> RunRecorder:
        """This process's run on the store (a forked child starts its own)."""
        rec = self._run
        if rec is None or rec.pid != os.getpid():
            with self._lock:
                rec = self._run
                if rec is None or rec.pid != os.getpid():
                    rec = self._run = RunRecorder(self.store)
        return rec

    def _close_store(self) -> None:
        if self._run is not None:
            self._run.flush(final=True)  # the run's last counts, while the store is still open
        self.store.close()

    # -- lifetime: calls in flight keep the store open ----------------------------------
    def _enter(self) -> bool:
        """Count a call that starts on this checkpointer; False once it is closing."""
        with self._lock:
            if self.closing:
                return False
            self._inflight += 1
            return True

    def _leave(self) -> None:
        with self._lock:
            self._inflight = max(0, self._inflight - 1)
            last = self.closing and self._inflight == 0
        if last:
            self._close_store()

    def close(self) -> None:
        """Close the store, once the calls running on it have finished (and saved)."""
        with self._lock:
            self.closing = True
            busy = self._inflight > 0
        registry.remove(self)
        if not busy:
            self._close_store()

    def __enter__(self) -> Checkpointer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Checkpointer({self.store!r})"

    def __reduce__(self) -> tuple[Any, ...]:
        if self.spec is None:
            raise TypeError(f"{self!r} was made from a store object that cannot be described; "
                            "create it from a location to send it to other processes")
        return _rebuild_checkpointer, (self.spec,)

    # -- the steps of one call ------------------------------------------------
    def lookup(self, key: str) -> tuple[bool, Any, dict[str, Any]]:
        """(found, value, meta) for ``key``; a damaged entry counts as not found."""
        try:
            hit = self.store.lookup(key)
        except CorruptEntryError as e:
            if self.strict:
                raise
            logger.warning("%s Running the step again.", e)
            return False, None, {}
        if hit is None:
            return False, None, {}
        return True, hit.value, hit.meta

    def lookup_call(
        self, key: str, digest: Optional[str], short: bool, limit: Optional[int] = None
    ) -> Any:
        """The look-up of a call: (found, value, meta, settled).

        ``settled``: found with the call's fingerprint digest ``digest`` (any,
        when None), or surely missing; nothing left to judge. The short way
        (``Store.lookup_fast``: one SELECT, one CRC, one digest compared, one
        ``loads``) when the store has one and ``short`` is
        given; whatever it cannot settle (a digest that differs: maybe stale)
        goes the full way, ``lookup``, which also reports any damage. With
        ``limit``: None when the short way found the entry larger than
        ``limit`` bytes (or in a side file), and the full way is not taken.
        """
        if short:
            try:
                fast = self.store.lookup_fast(key, digest, limit)
            except Exception as e:  # the full way says what it is
                logger.debug("short look-up of checkpoint %s failed: %s", key, e)
                fast = None
            if fast is MISSING:
                return False, None, {}, True
            if fast is not None:
                if fast is LARGE:
                    return None
                return True, fast[0], {"key": key, "duration": fast[1], "is_awaitable": fast[2]}, True
        if limit is not None:
            return False, None, {}, False  # the caller checks the size before the full way
        found, value, meta = self.lookup(key)
        return found, value, meta, False

    def log_hit(self, key: str, meta: dict[str, Any]) -> None:
        """The one INFO line a returned hit gets (and the run's count of hits)."""
        # No getpid() here (a system call on every hit): a forked child's
        # hook drops the parent's recorder (_after_fork_in_child).
        dur = meta.get("duration")
        rec = self._run
        if rec is None:
            rec = self.run
        rec.hit(dur)
        if not logger.isEnabledFor(logging.INFO):
            return
        if dur is None:
            logger.info("Hit checkpoint: %s", key)
        else:
            logger.info("Hit checkpoint: %s (the original call took %.3f s)", key, dur)

    def save(self, key: str, value: Any, **fields: Any) -> bool:
        """Save a step's result; on failure warn (or raise in strict mode)."""
        # No getpid() per save either (see log_hit): a child's hook drops the parent's recorder.
        run = self._run
        if run is None:
            run = self.run
        try:
            self.store.put(key, value, run=run.id, **fields)
            run.ran(fields.get("duration") or 0.0)
            return True
        except Exception as e:
            run.save_failed()
            err = e if isinstance(e, SaveError) else SaveError(key, f"{type(e).__name__}: {e}")
            if self.strict:
                if err is e:
                    raise
                raise err from e
            logger.warning("%s; the result was returned but NOT saved, so the step "
                           "will run again next time", err)
            return False

    # -- staleness ---------------------------------------------------------------
    def fingerprint(self, fn: Callable[..., Any], args: tuple, kwargs: dict) -> Optional[dict[str, Any]]:
        """The fingerprints of a call, or None if fingerprinting itself failed."""
        try:
            return fingerprint(fn, args, kwargs)
        except Exception as e:  # never let a staleness check break a workflow
            logger.debug("could not fingerprint a call of %r: %s", fn, e)
            return None

    def accept(self, key: str, meta: dict[str, Any], fp: Optional[dict[str, Any]], policy: str) -> bool:
        """Whether a hit may be returned: compares saved and current fingerprints."""
        old = meta.get("fingerprint")
        if not old or fp is None:
            return True  # saved before fingerprints existed, or with stale="ignore"
        try:
            verdict = judge(old, fp)
        except Exception as e:  # a malformed saved record must not break a hit
            logger.debug("could not compare the fingerprints of checkpoint %s: %s", key, e)
            return True
        env_policy = getattr(self, "environment", "report")
        stale = bool(verdict.changes) or (env_policy == "stale" and bool(verdict.env))
        if env_policy == "ignore":
            verdict = verdict._replace(env=[])
        if stale:
            self.run.stale(key, rerun=policy == "rerun")
        if stale and policy == "rerun":
            logger.warning("%s", explain(key, verdict, location=self.store.location, rerun=True))
            return False
        if stale or verdict.uncertain:
            # Code that cannot be compared (another Python, no source) is
            # said, never rerun: an upgrade must not redo a whole workflow.
            logger.warning("%s", explain(key, verdict, location=self.store.location, stale=stale))
        elif verdict.env:
            logger.info("%s", explain(key, verdict, location=self.store.location, stale=False))
        return True

    # -- same-key dedup -----------------------------------------------------------
    def claim(self, key: str, rejected: Any = None) -> tuple[Optional[Lease], tuple[bool, Any, dict[str, Any]]]:
        """Wait until ``key`` is ours to compute (a Lease) or someone saved it (a hit).

        ``rejected`` is the ``created`` time of an entry this caller already
        judged stale: finding that same entry again is not a hit.
        """
        waiter = _Waiter(self, key, rejected)
        while (done := waiter.attempt()) is None:
            time.sleep(waiter.delay())
        return done

    async def claim_async(
        self, key: str, rejected: Any = None
    ) -> tuple[Optional[Lease], tuple[bool, Any, dict[str, Any]]]:
        """``claim`` for coroutines: every attempt runs in a thread, waits are awaited."""
        waiter = _Waiter(self, key, rejected)
        while True:
            fut = _submit(waiter.attempt)
            try:
                done = await asyncio.shield(asyncio.wrap_future(fut))
            except asyncio.CancelledError:
                # The attempt goes on in its thread: a claim it takes must not outlive us.
                fut.add_done_callback(_drop_claim_of)
                raise
            if done is not None:
                return done
            await asyncio.sleep(waiter.delay())

    # -- in-process flights: one computation per key, shared by threads and tasks -----
    def _flight_scope(self) -> tuple[str, str, Any]:
        return (self.store.kind, self.store.location, getattr(self.store, "schema", None))

    def _join_flight(self, key: str, fn: Any, awaitable: bool,
                     owned: Optional[list[_Flight]] = None) -> tuple[_Flight, bool]:
        """(flight, True) when this caller computes ``key``; (flight, False) to wait for it (see ``_dedup``)."""
        return _join_flight((self._flight_scope(), key), fn, awaitable, owned)


def checkpointer_for(spec: StoreSpec) -> Optional[Checkpointer]:
    """The open checkpointer of this process for ``spec``, opening it once.

    None (after one WARNING) when this process cannot open the store.
    """
    return cast(Optional[Checkpointer], registry.get(spec))


# -- fork: children start with fresh locks and a registry of their own --------------------

_live: weakref.WeakSet[Checkpointer] = weakref.WeakSet()


def _after_fork_in_child() -> None:
    # The calls of the parent's other threads do not exist here, and a lock one
    # of them held would stay held for ever in the child.
    registry.reset()
    for ckpt in list(_live):
        ckpt._lock = threading.Lock()
        ckpt._inflight = 0
        ckpt._run = None  # the child's run is its own (log_hit counts on it without a pid check)
        if not ckpt.closing:
            registry.add(ckpt)


at_fork(after_in_child=_after_fork_in_child)
