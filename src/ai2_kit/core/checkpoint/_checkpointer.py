"""The decorator logic: keys, sync and async calls, hits, saves and their failures.

Also what lets steps run wherever a workflow runs them:

- a wrapper (``CheckpointedFunction``) pickles with a *description* of its
  store (``StoreSpec``: location and options, never a connection or a lock),
  and a process that receives one opens that store once (``checkpointer_for``);
- a ``Checkpointer`` stays open while calls that started on it run, so a
  switch or a close never loses their results;
- the store work of async steps runs in a bounded thread pool of our own and
  is awaited, so the event loop stays free; same-key calls in one process
  share one computation (``_Flight``) before they touch the store's claim.
"""

from __future__ import annotations

import asyncio
import collections.abc
import concurrent.futures
import dataclasses
import functools
import importlib
import inspect
import json
import logging
import math
import os
import pickle
import secrets
import sys
import threading
import time
import types
import weakref
from typing import Any, Awaitable, Callable, Coroutine, Mapping, NamedTuple, Optional, TypeVar, Union, overload

import cloudpickle  # at import, not lazily: a fork during a lazy import can deadlock a child

from ._errors import CheckpointError, CorruptEntryError, SaveError
from ._fingerprint import check_environment_policy, explain, fingerprint, hit_digest, judge
from ._keys import validate_key
from ._runs import RunRecorder
from .stores import SIGNING_KEY_ENV, Store, is_postgres_url, open_store
from .stores._base import LARGE, MISSING, check_seconds
from .stores._fs import HOST

# At run time too, so that typing.get_type_hints() finds P (the real
# ai2-kit's tooling and documentation generators call it); the facade
# imports this one.
if sys.version_info >= (3, 10):
    from typing import ParamSpec
else:  # pragma: no cover - Python 3.9
    from typing_extensions import ParamSpec

P = ParamSpec("P")

__all__ = [
    "FnInfo",
    "KeyFn",
    "Checkpointer",
    "CheckpointedFunction",
    "Lease",
    "StoreSpec",
    "checkpointer_for",
    "make_wrapper",
    "DEFAULT_ENV",
]

logger = logging.getLogger("ai2_kit.core.checkpoint")
R = TypeVar("R")

#: Environment variable through which the facade's default store reaches
#: child processes (spawn, forkserver, Dask workers): a JSON description,
#: never a signing key.
DEFAULT_ENV = "AI2_KIT_CHECKPOINT_DEFAULT"


class FnInfo(NamedTuple):
    """What a key function is given: the call it names."""

    fn_name: str
    args: tuple
    kwargs: dict
    call_site: str


KeyFn = Callable[[FnInfo], str]
Key = Union[str, KeyFn]


def _call_site(depth: int) -> str:
    # One frame lookup, not inspect.stack(): the reference spent most of a
    # hit's time walking (and reading source lines of) the whole stack.
    try:
        frame = sys._getframe(depth + 1)
    except ValueError:
        return "?"
    return f"{frame.f_code.co_filename}:{frame.f_lineno}"


async def _ready(value: Any) -> Any:
    return value


# -- the thread pool that keeps store work off the event loop -----------------------

#: Threads that do the store work of async steps. Bounded, and our own: the
#: loop's default executor belongs to the application, and long-lived threads
#: keep the number of per-thread store connections bounded too. Enough of
#: them that gathered saves arrive together (the stores commit them as a
#: group), few enough that the loop does not queue long for the GIL behind
#: them: with 16, PostgreSQL's 1,000 gathered saves stalled the loop about
#: twice as long as with 8 (benchmarks/bench_async.py).
OFFLOAD_THREADS = 8

_pool: Optional[concurrent.futures.ThreadPoolExecutor] = None
_pool_lock = threading.Lock()


def _executor() -> concurrent.futures.ThreadPoolExecutor:
    global _pool
    pool = _pool
    if pool is None:
        with _pool_lock:
            if _pool is None:
                _pool = concurrent.futures.ThreadPoolExecutor(OFFLOAD_THREADS, thread_name_prefix="ai2-kit-ckpt")
            pool = _pool
    return pool


#: Jobs submitted to the pool and not finished yet: while there are any, the
#: loop does no store I/O of its own (each I/O call gives the GIL away, and
#: getting it back from busy threads costs a switch interval, 5 ms, each time).
_busy = [0]
_busy_lock = threading.Lock()


def _done_one(_: object) -> None:
    with _busy_lock:
        # Never below zero: an interrupted _submit may count a job out twice,
        # and a negative count would keep the loop's own reads off for good
        # (the count only chooses where small reads run).
        _busy[0] = max(0, _busy[0] - 1)


def _submit(func: Callable[..., Any], *args: Any) -> concurrent.futures.Future[Any]:
    counted = False
    try:
        with _busy_lock:
            _busy[0] += 1
            counted = True
        job = _executor().submit(func, *args)
        job.add_done_callback(_done_one)
        counted = False  # the callback counts it out (at once if the job is done already)
        return job
    except RuntimeError:
        _done_one(None)  # interpreter shutting down: do it here and now
        fut: concurrent.futures.Future[Any] = concurrent.futures.Future()
        try:
            fut.set_result(func(*args))
        except BaseException as e:
            fut.set_exception(e)
        return fut
    except BaseException:
        if counted:  # interrupted before the job could count itself out: the loop's reads would stay off
            _done_one(None)
        raise


async def _offload(func: Callable[..., R], *args: Any) -> R:
    """Run ``func`` in our thread pool and await it without blocking the loop.

    Shielded: a cancelled caller stops waiting, but the work, once submitted,
    runs to its end (a half-done claim or save is worse than a late one).
    """
    fut = _submit(func, *args)
    return await asyncio.shield(asyncio.wrap_future(fut))  # type: ignore[no-any-return]


# -- small work that may stay on the loop ---------------------------------------------

#: Entries up to this size may be read on the loop (see ``_prepare_inline``).
INLINE_MAX_BYTES = 64 * 1024
#: Seconds of such reads per turn of the loop; past it, callers wait for the next turn.
INLINE_BUDGET_S = 0.005
#: What steps usually return, none of them awaitable: no ABC check for them
#: (``inspect.isawaitable`` costs a few isinstance checks, one against an ABC).
_NOT_AWAITABLE = frozenset((dict, list, tuple, str, bytes, int, float, bool, type(None), set))
_BIG_ARG = 256 * 1024
#: Async calls started per turn of the loop (and waiting ones let in per turn).
_LANE_WAKE = 32


class _Lane:
    """One loop's account of small reads done on it: at most a budget per turn.

    Callers past the budget wait (awaited, in order) for the next turn, so a
    thousand gathered hits are spread over turns and the loop keeps ticking.
    """

    def __init__(self) -> None:
        self.spent = 0.0
        self.admitted = 0
        self.armed = False
        self.waiters: collections.deque[asyncio.Future[None]] = collections.deque()

    def arm(self, loop: asyncio.AbstractEventLoop) -> None:
        if not self.armed:
            self.armed = True
            loop.call_soon(self.refill)  # runs in the next turn of the loop

    def refill(self) -> None:
        self.armed = False
        self.spent = 0.0
        self.admitted = 0
        # Wake up to a turn's worth of *live* waiters: a cancelled one is
        # skipped, not counted, or a block of cancelled callers would use up
        # the turn and leave the live ones behind them asleep.
        woken, waiters = 0, self.waiters
        while waiters and woken < _LANE_WAKE:
            fut = waiters.popleft()
            if not fut.done():
                fut.set_result(None)
                woken += 1
        if waiters:
            # The lane re-arms itself while anyone waits: a woken caller may be
            # cancelled before it runs, and then nobody else would.
            self.arm(asyncio.get_running_loop())  # refill runs as a callback of its loop


_lanes: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _Lane] = weakref.WeakKeyDictionary()


async def _inline_turn() -> _Lane:
    """Wait for this loop's turn to start an async call; the lane to charge inline reads to.

    At most ``_LANE_WAKE`` calls start per turn, and small reads on the loop
    stop for the turn once they took ``INLINE_BUDGET_S``: a gather of a
    thousand steps starts them over many short turns, not in one long one
    (which, besides its own length, fights the pool's threads for the GIL).
    """
    loop = asyncio.get_running_loop()
    lane = _lanes.get(loop)
    if lane is None:
        lane = _lanes[loop] = _Lane()
    while lane.spent >= INLINE_BUDGET_S or lane.admitted >= _LANE_WAKE:
        fut: asyncio.Future[None] = loop.create_future()
        lane.waiters.append(fut)
        lane.arm(loop)
        await fut
    lane.arm(loop)
    lane.admitted += 1
    return lane


def _small(args: tuple, kwargs: dict) -> bool:
    """Whether fingerprinting these arguments is cheap (no large buffer in sight)."""
    todo: list[Any] = [*args, *kwargs.values()]
    seen = 0
    while todo:
        a = todo.pop()
        seen += 1
        if seen > 200:
            return False
        n = getattr(a, "nbytes", None)
        if isinstance(n, int) and n > _BIG_ARG:
            return False
        if isinstance(a, (bytes, bytearray, str, memoryview)):
            if len(a) > _BIG_ARG:
                return False
        elif isinstance(a, (list, tuple, set, frozenset)):
            if len(a) > 200:
                return False
            todo.extend(a)
        elif isinstance(a, dict):
            if len(a) > 200:
                return False
            todo.extend(a.values())
    return True


# -- descriptions of stores, and the per-process registry of open ones ---------------


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
        # Reentrant: opening a store here creates a Checkpointer, which registers itself.
        self.lock = threading.RLock()
        self.user: weakref.WeakValueDictionary[StoreSpec, Checkpointer] = weakref.WeakValueDictionary()
        self.opened: dict[StoreSpec, Checkpointer] = {}
        self.failed: set[StoreSpec] = set()

    def add(self, ckpt: Checkpointer) -> None:
        spec = ckpt.spec
        if spec is None:
            return
        with self.lock:
            cur = self.user.get(spec) or self.opened.get(spec)
            if cur is None or cur.closing:
                self.user[spec] = ckpt

    def remove(self, ckpt: Checkpointer) -> None:
        spec = ckpt.spec
        if spec is None:
            return
        with self.lock:
            if self.user.get(spec) is ckpt:
                del self.user[spec]
            if self.opened.get(spec) is ckpt:
                del self.opened[spec]

    def get(self, spec: StoreSpec) -> Optional[Checkpointer]:
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
    from .stores import _redact

    where = _redact(location) if is_postgres_url(location) else location
    logger.warning("Checkpointing is OFF in this process (pid %d): the store %s cannot be opened here (%s); "
                   "steps sent here run without being saved or looked up", os.getpid(), where,
                   e if isinstance(e, str) else f"{type(e).__name__}: {e}")


_registry = _Registry()


def checkpointer_for(spec: StoreSpec) -> Optional[Checkpointer]:
    """The open checkpointer of this process for ``spec``, opening it once.

    None (after one WARNING) when this process cannot open the store.
    """
    return _registry.get(spec)


def _rebuild_checkpointer(spec: StoreSpec) -> Checkpointer:
    ckpt = checkpointer_for(spec)
    if ckpt is None:
        raise CheckpointError(f"cannot open the checkpoint store {spec.location} in this process")
    return ckpt


# -- the checkpointer ------------------------------------------------------------------


#: What the hot path of a hit does in place of calling these methods.
_HOT_STEPS = ("lookup_call", "lookup", "log_hit", "count_hit", "fingerprint", "accept", "_enter", "_leave")


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
            ``"ignore"`` (the reference's behaviour; no fingerprinting cost).
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
        self.dedup = (self.store.kind == "postgres") if dedup is None else bool(dedup)
        self.lease = float(lease)
        self._lock = threading.Lock()
        self._run: Optional[RunRecorder] = None
        self._inflight = 0
        self.closing = False
        self.spec = self._describe(location, prefer, opts)
        #: Whether plain calls may take the hot path of a hit (``CheckpointedFunction.__call__``):
        #: the store has the short way, and no subclass changed a step the hot path writes out.
        self._hot = type(store).lookup_fast is not Store.lookup_fast and not any(
            getattr(type(self), name) is not getattr(Checkpointer, name) for name in _HOT_STEPS)
        _live.add(self)
        _registry.add(self)

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
        self, key: Key, disable: bool = False, *, stale: Optional[str] = None
    ) -> Callable[[Callable[P, R]], Callable[P, R]]:
        """A decorator that checkpoints calls of a function under ``key``.

        ``stale`` overrides the checkpointer's policy for these calls.
        """
        if type(key) is str and not disable and stale is None:
            # The commonest decorator, made afresh by every call of a workflow
            # (``apply_checkpoint(key)(f)(x)``): the wrapper without __init__.
            return functools.partial(_plain_wrapper, self, None, key)  # type: ignore[return-value]
        return lambda fn: CheckpointedFunction(fn, key, disable, stale, ckpt=self)  # type: ignore[return-value]

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
        _registry.remove(self)
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
        true; whatever it cannot settle (a digest that differs: maybe stale)
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
        self.count_hit(key, meta.get("duration"))

    def count_hit(self, key: str, dur: Any) -> None:
        """``log_hit`` for a caller that has the original call's duration in hand."""
        # No getpid() here (a system call, a tenth of a hit's Python time): a
        # forked child's hook drops the parent's recorder (_after_fork_in_child).
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
        """(flight, True) when this caller computes ``key``; (flight, False) to wait for it.

        ``owned``: a new flight of this caller is also appended to it, under
        the lock, so that an interrupt arriving before the caller has stored
        the answer still finds the flight to end (else its waiters wait for ever).
        """
        scope = (self._flight_scope(), key)
        with _flights.lock:
            cur = _flights.table.get(scope)
            if cur is not None and not cur.cf.done():
                return cur, False
            flight = _Flight(scope, fn)
            if awaitable:
                flight.loop_thread = threading.get_ident()
            _flights.table[scope] = flight
            if owned is not None:
                owned.append(flight)
            return flight, True


def _drop_claim_of(fut: concurrent.futures.Future[Any]) -> None:
    if fut.cancelled() or fut.exception() is not None:
        return
    done = fut.result()
    if done is not None and done[0] is not None:
        _submit(done[0].release)  # this may run on the loop (a future already done): I/O goes to the pool


class _Flights:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.table: dict[Any, _Flight] = {}


_flights = _Flights()


class _Flight:
    """One in-process computation of a key that other callers of it wait for."""

    def __init__(self, scope: Any, fn: Any) -> None:
        self.scope = scope
        self.fn = fn
        self.cf: concurrent.futures.Future[None] = concurrent.futures.Future()
        #: Set when the owner's work goes on as an awaitable on this thread's loop.
        self.loop_thread: Optional[int] = None
        self._cond = threading.Condition()

    def became_awaitable(self) -> None:
        with self._cond:
            self.loop_thread = threading.get_ident()
            self._cond.notify_all()

    def finish(self) -> None:
        with _flights.lock:
            if _flights.table.get(self.scope) is self:
                del _flights.table[self.scope]
        with self._cond:
            if not self.cf.done():
                self.cf.set_result(None)
            self._cond.notify_all()

    def wait_sync(self) -> bool:
        """Wait for the owner: True when it finished; False when its work is an
        awaitable on this very thread's loop, which waiting here would freeze."""
        me = threading.get_ident()
        with self._cond:
            while not self.cf.done():
                if self.loop_thread == me:
                    return False
                self._cond.wait()
            return True

    async def wait_async(self) -> None:
        # Shielded: a cancelled waiter must not cancel the flight of the others.
        await asyncio.shield(asyncio.wrap_future(self.cf))


def _log_wait(key: str) -> None:
    logger.info("Waiting for checkpoint %s: another caller in this process is computing it", key)


def _fresh(meta: dict[str, Any], rejected: Any) -> bool:
    """Whether a found entry is not the one this caller already judged stale."""
    return rejected is None or meta.get("created") != rejected


class _Waiter:
    """One caller's attempts at a key: take the claim, or find the result saved."""

    def __init__(self, ckpt: Checkpointer, key: str, rejected: Any = None) -> None:
        self.ckpt, self.key, self.rejected = ckpt, key, rejected
        self.owner = f"{HOST}:{os.getpid()}:{secrets.token_hex(6)}"
        self.tries = 0
        self._delay = _POLL_MIN

    def _hit(self) -> Optional[tuple[bool, Any, dict[str, Any]]]:
        hit = self.ckpt.lookup(self.key)
        if hit[0] and _fresh(hit[2], self.rejected):
            return hit
        return None

    def attempt(self) -> Optional[tuple[Optional[Lease], tuple[bool, Any, dict[str, Any]]]]:
        """A lease, a hit, or None (wait and try again)."""
        if self.tries:
            hit = self._hit()
            if hit is not None:
                return None, hit
        self.tries += 1
        if self.ckpt.store.try_claim(self.key, self.owner, self.ckpt.lease):
            # Look again now that the claim is ours: an owner that saved and
            # released between our lookup and our claim has made this key a
            # hit, and running the step would run it twice.
            hit = self._hit()
            if hit is not None:
                self.ckpt.store.release_claim(self.key, self.owner)
                return None, hit
            return Lease(self.ckpt, self.key, self.owner), (False, None, {})
        if self.tries == 1:
            logger.info("Waiting for checkpoint %s: another live caller is computing it", self.key)
        return None

    def delay(self) -> float:
        delay, self._delay = self._delay, min(self._delay * 1.5, _POLL_MAX)
        return delay


_POLL_MIN = 0.02
_POLL_MAX = 1.0


class _Heartbeat:
    """One thread that renews every lease of this process, each at a third of its length."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._due: dict[Lease, float] = {}
        self._thread: Optional[threading.Thread] = None

    #: The longest the thread sleeps at once, whatever a lease says.
    MAX_WAIT = 3600.0

    def add(self, lease: Lease) -> None:
        with self._cond:
            self._due[lease] = time.monotonic() + _period(lease)
            if self._thread is None or not self._thread.is_alive():
                # (Started again should it ever have ended: a dead heartbeat
                # would let every claim of the process expire under its owner.)
                self._thread = threading.Thread(target=self._run, name="ai2-kit-lease", daemon=True)
                self._thread.start()
            self._cond.notify()

    def remove(self, lease: Lease) -> None:
        with self._cond:
            self._due.pop(lease, None)

    def _run(self) -> None:
        while True:
            try:
                self._turn()
            except Exception as e:  # one lease's failure must not end the renewals of all the others
                logger.warning("The claim heartbeat met an error and goes on: %s: %s", type(e).__name__, e)
                time.sleep(0.1)  # a pause before the next turn, so that a persistent error cannot spin

    def _turn(self) -> None:
        with self._cond:
            now = time.monotonic()
            due = [lease for lease, t in self._due.items() if t <= now]
            if not due:
                wait = min(self._due.values(), default=now + self.MAX_WAIT) - now
                self._cond.wait(min(max(wait, 0.0), self.MAX_WAIT))
                return
            for lease in due:
                self._due[lease] = now + _period(lease)
        for lease in due:
            try:
                lease.renew()
            except Exception as e:  # renew() reports store errors itself; anything else is logged here
                logger.warning("Could not renew the claim on checkpoint %s: %s: %s", lease.key, type(e).__name__, e)


def _period(lease: Lease) -> float:
    """Seconds between two renewals of ``lease``: a third of its length, bounded."""
    try:
        period = float(lease.ckpt.lease) / 3
    except (TypeError, ValueError):
        return _Heartbeat.MAX_WAIT
    if not math.isfinite(period) or period <= 0:
        return _Heartbeat.MAX_WAIT
    return min(period, _Heartbeat.MAX_WAIT)


_heartbeat = _Heartbeat()


class Lease:
    """A claim on a key, kept alive by the process's heartbeat thread until released."""

    def __init__(self, ckpt: Checkpointer, key: str, owner: str) -> None:
        self.ckpt, self.key, self.owner = ckpt, key, owner
        # Renewal and release never overlap: a renewal that ran after the
        # release could not bring the claim back, but it would warn wrongly.
        self._lock = threading.Lock()
        self.released = False
        _heartbeat.add(self)

    def renew(self) -> None:
        with self._lock:
            if self.released:
                return
            ttl = self.ckpt.lease
            try:
                if not self.ckpt.store.renew_claim(self.key, self.owner, ttl):
                    logger.warning("Lost the claim on checkpoint %s (this process was stalled longer "
                                   "than the %.0f s lease); another caller may compute it too", self.key, ttl)
                    self.released = True
                    _heartbeat.remove(self)
            except Exception as e:  # the step goes on; the claim just may expire
                logger.warning("Could not renew the claim on checkpoint %s: %s", self.key, e)

    def release(self) -> None:
        """Drop the claim. Blocking I/O (async steps call it in a thread); never joins a thread."""
        _heartbeat.remove(self)
        with self._lock:
            if self.released:
                return
            self.released = True
            try:
                self.ckpt.store.release_claim(self.key, self.owner)
            except Exception as e:  # an unreleased claim expires on its own
                logger.warning("Could not release the claim on checkpoint %s: %s (it expires in %.0f s)",
                               self.key, e, self.ckpt.lease)


def _end_call(ckpt: Checkpointer, lease: Optional[Lease], flight: Optional[_Flight]) -> None:
    """What ends every call that started on ``ckpt``: claim, flight, then the count."""
    try:
        if lease is not None:
            lease.release()
    finally:
        try:
            if flight is not None:
                flight.finish()
        finally:
            ckpt._leave()


def _save_and_end(ckpt: Checkpointer, key: str, value: Any, fields: dict[str, Any],
                  lease: Optional[Lease], flight: Optional[_Flight]) -> None:
    try:
        ckpt.save(key, value, **fields)
    finally:
        _end_call(ckpt, lease, flight)


_POLICIES = ("warn", "rerun", "ignore")


def _check_policy(policy: str) -> str:
    if policy not in _POLICIES:
        raise ValueError(f"stale must be one of {', '.join(map(repr, _POLICIES))}, not {policy!r}")
    return policy


def _resolve_key(key: Key, fn: Callable[..., Any], args: tuple, kwargs: dict, site: str) -> str:
    if isinstance(key, str):
        return validate_key(key)
    if callable(key):
        return validate_key(key(FnInfo(getattr(fn, "__name__", repr(fn)), args, kwargs, site)))
    return validate_key(key)


# -- awaitables handed out by plain functions -----------------------------------------


class _Pending(collections.abc.Coroutine):  # type: ignore[type-arg]
    """A coroutine that owns a claim until it is run to the end.

    What a wrapped plain function returning an awaitable hands back on a
    miss (a coroutine, so that ``asyncio.run`` and ``create_task`` take it).
    Closed, or garbage-collected before it ever started, it still releases
    its claim and ends its call (in a thread: the collector may run on the
    loop); once started, the coroutine inside does that itself.
    """

    def __init__(self, start: Callable[[], Coroutine[Any, Any, Any]], inner: Any,
                 cleanup: Callable[[], None]) -> None:
        self._start: Optional[Callable[[], Coroutine[Any, Any, Any]]] = start
        self._coro: Optional[Coroutine[Any, Any, Any]] = None
        self._inner = inner
        self._finalizer = weakref.finalize(self, _submit, cleanup)

    def _begin(self) -> Coroutine[Any, Any, Any]:
        if self._coro is None:
            start, self._start = self._start, None
            if start is None:
                raise RuntimeError("cannot reuse a closed checkpointed awaitable")
            self._finalizer.detach()
            self._inner = None
            self._coro = start()
        return self._coro

    def __await__(self) -> Any:
        return self._begin().__await__()

    def send(self, value: Any) -> Any:
        return self._begin().send(value)

    def throw(self, typ: Any, val: Any = None, tb: Any = None) -> Any:
        if self._coro is None:
            self.close()  # never started: nothing inside would run its cleanup
            if val is None:
                raise typ
            raise val
        if val is None and tb is None:  # the one-argument form (the only one from Python 3.12 on)
            return self._coro.throw(typ)
        return self._coro.throw(typ, val, tb)

    def close(self) -> None:
        """Stop it: an unstarted one releases its claim now (and closes what it wraps)."""
        if self._coro is not None:
            self._coro.close()
            return
        if self._start is None:
            return
        self._start = None
        inner, self._inner = self._inner, None
        close = getattr(inner, "close", None)
        if close is not None:
            close()
        self._finalizer()


# -- the wrapper --------------------------------------------------------------------------


class _FnRef(NamedTuple):
    """A module-level function that the module holds only under our wrapper."""

    module: str
    qualname: str

    def resolve(self) -> Any:
        obj: Any = importlib.import_module(self.module)
        for part in self.qualname.split("."):
            obj = getattr(obj, part)
        if isinstance(obj, CheckpointedFunction):
            return obj.__wrapped__
        return obj


def _lookup_qualname(fn: Any) -> Any:
    module = sys.modules.get(getattr(fn, "__module__", None) or "")
    qualname = getattr(fn, "__qualname__", "")
    if module is None or not qualname or "<" in qualname:
        return None
    obj: Any = module
    for part in qualname.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            return None
    return obj


def _rebuild_wrapper(payload: bytes, disable: bool, stale: Optional[str], spec: Optional[StoreSpec]) -> Any:
    fn, key = pickle.loads(payload)
    if isinstance(fn, _FnRef):
        fn = fn.resolve()
    return CheckpointedFunction(fn, key, disable, stale, spec=spec, received=True)


#: What ``functools.update_wrapper`` would copy, per wrapped function, worked
#: out once: workflows make a wrapper per call (``apply_checkpoint(key)(f)(x)``),
#: and copying the attributes one by one was a tenth of a hit. Weak keys: the
#: entry goes with its function (the values never refer to it).
_FN_STATE: weakref.WeakKeyDictionary[Any, tuple[dict[str, Any], str, bool]] = weakref.WeakKeyDictionary()
_WRAPPER_ATTRS = functools.WRAPPER_ASSIGNMENTS


def _fn_state(fn: Callable[..., Any]) -> tuple[dict[str, Any], str, bool]:
    """(attributes to copy, qualified name, is a coroutine function) of ``fn``."""
    try:
        got = _FN_STATE.get(fn)
    except TypeError:  # not weakly referable (nor hashable): worked out each time
        got = None
    if got is not None:
        return got
    attrs: dict[str, Any] = {}
    for attr in _WRAPPER_ATTRS:
        try:
            attrs[attr] = getattr(fn, attr)
        except AttributeError:
            pass
    qualname = getattr(fn, "__qualname__", None) or getattr(fn, "__name__", None) or repr(fn)
    state = (attrs, str(qualname), inspect.iscoroutinefunction(fn))
    try:
        _FN_STATE[fn] = state
    except TypeError:
        pass
    return state


def _plain_wrapper(ckpt: Optional[Checkpointer], default: Optional[Callable[[], Optional[Checkpointer]]], key: str,
                   fn: Callable[..., Any]) -> CheckpointedFunction:
    """``CheckpointedFunction(fn, key, ckpt=ckpt, default=default)`` for a string key, no other option.

    The decorators made afresh by every call of a workflow (``ckpt(key)``,
    and the facade's ``apply_checkpoint(key)``): the same fields as
    ``__init__`` sets for such a wrapper of a plain function (``__dict__``
    empty, not a coroutine function), without its general case; anything
    else goes through ``__init__``.
    """
    try:
        state = _FN_STATE.get(fn) if callable(fn) else None
    except TypeError:  # not weakly referable
        state = None
    if state is None or state[2] or getattr(fn, "__dict__", None):
        return CheckpointedFunction(fn, key, ckpt=ckpt, default=default)
    validate_key(key)  # fail at decoration time, before any step runs
    w = _new_object(CheckpointedFunction)
    d = w.__dict__
    d.update(state[0])
    d["__wrapped__"] = fn
    d["_ck_key"] = key
    d["_ck_k"] = key
    d["_ck_bound"] = ckpt
    d["_ck_name"] = state[1]
    if default is not None:
        d["_ck_default"] = default
    return w  # type: ignore[no-any-return]


_new_object = object.__new__


class CheckpointedFunction:
    """A function whose calls are checkpointed: what ``apply_checkpoint`` returns.

    It looks like the function it wraps (name, docstring, signature,
    ``inspect.iscoroutinefunction``) and works as a method. It pickles, for
    process pools and Dask, with the function, the key and a description of
    its store (``StoreSpec``); a worker receiving it opens that store once per
    process. A facade wrapper carries the default store of the moment it was
    sent (or "off" when none was set).
    """

    __wrapped__: Callable[..., Any]
    _ck_key: Key
    _ck_k: Optional[str]
    _ck_bound: Optional[Checkpointer]
    _ck_name: str
    # What most wrappers have: set on one only when it differs.
    _ck_disable: bool = False
    _ck_stale: Optional[str] = None
    _ck_default: Optional[Callable[[], Optional[Checkpointer]]] = None
    _ck_spec: Optional[StoreSpec] = None
    _ck_received: bool = False
    _ck_coro: bool = False

    def __init__(
        self,
        fn: Callable[..., Any],
        key: Key,
        disable: bool = False,
        stale: Optional[str] = None,
        *,
        ckpt: Optional[Checkpointer] = None,
        default: Optional[Callable[[], Optional[Checkpointer]]] = None,
        spec: Optional[StoreSpec] = None,
        received: bool = False,
    ) -> None:
        if not callable(fn):
            raise TypeError(f"apply_checkpoint(...) must wrap a callable, not {type(fn).__name__}")
        if isinstance(key, str):
            validate_key(key)  # fail at decoration time, before any step runs
        elif not callable(key):
            raise TypeError(f"a checkpoint key must be a str or a function of FnInfo, not {type(key).__name__}")
        if stale is not None:
            _check_policy(stale)
        attrs, name, coro = _fn_state(fn)
        # functools.update_wrapper, from what was worked out once per function.
        d = self.__dict__
        d.update(attrs)
        fn_dict = getattr(fn, "__dict__", None)
        d["__wrapped__"] = fn
        d["_ck_key"] = key
        d["_ck_k"] = key if isinstance(key, str) else None  # the key when it is a string (checked above)
        d["_ck_bound"] = ckpt
        d["_ck_name"] = name
        if fn_dict:
            d.update(fn_dict)
            d["__wrapped__"] = fn
            # Another wrapper's fields (a CheckpointedFunction wrapped again) must not leak into ours.
            d.update(_ck_key=key, _ck_k=key if isinstance(key, str) else None, _ck_bound=ckpt, _ck_name=name,
                     _ck_disable=disable, _ck_stale=stale, _ck_default=default, _ck_spec=spec,
                     _ck_received=received, _ck_coro=coro)
        else:
            # The rest only when not the class's default: workflows make a wrapper per call.
            if disable:
                d["_ck_disable"] = disable
            if stale is not None:
                d["_ck_stale"] = stale
            if default is not None:
                d["_ck_default"] = default
            if spec is not None:
                d["_ck_spec"] = spec
            if received:
                d["_ck_received"] = received
            if coro:
                d["_ck_coro"] = coro
        if coro:
            _mark_coroutine_function(self, fn)

    # -- looking like the function ------------------------------------------------
    def __get__(self, obj: Any, objtype: Any = None) -> Any:
        if obj is None:
            return self
        return types.MethodType(self, obj)

    def __repr__(self) -> str:
        return f"<checkpointed {self._ck_name} key={self._ck_key!r}>"

    # -- travelling ------------------------------------------------------------------
    def _carried_spec(self) -> Optional[StoreSpec]:
        if self._ck_received or self._ck_disable:
            return self._ck_spec
        ckpt = self._ck_bound if self._ck_bound is not None else (
            self._ck_default() if self._ck_default is not None else None)
        if ckpt is None:
            return None
        if ckpt.spec is None:
            raise TypeError(f"cannot send {self!r} to another process: {ckpt!r} was made from a store "
                            "object that cannot be described; create the Checkpointer from a location")
        return ckpt.spec

    def __reduce__(self) -> tuple[Any, ...]:
        fn: Any = self.__wrapped__  # type: ignore[attr-defined]
        target = _lookup_qualname(fn)
        if (target is not fn and isinstance(target, CheckpointedFunction) and target.__wrapped__ is fn
                and fn.__module__ != "__main__"):
            # Decorated at module level: the module's name now means the wrapper,
            # so the plain function cannot be pickled by name; send the name, and
            # the receiver unwraps what it finds there. (A script's __main__ is
            # not the worker's: cloudpickle sends those functions by value.)
            fn = _FnRef(fn.__module__, fn.__qualname__)
        # cloudpickle for the function and the key: lambdas and local
        # functions travel too (module-level functions still go by name).
        payload = cloudpickle.dumps((fn, self._ck_key))
        return _rebuild_wrapper, (payload, self._ck_disable, self._ck_stale, self._carried_spec())

    # -- which checkpointer a call uses --------------------------------------------------
    def _resolve(self) -> Optional[Checkpointer]:
        if self._ck_disable:
            return None
        if self._ck_bound is not None:
            return self._ck_bound
        if self._ck_received:
            return None if self._ck_spec is None else checkpointer_for(self._ck_spec)
        return self._ck_default() if self._ck_default is not None else None

    def _acquire(self) -> Optional[Checkpointer]:
        """The checkpointer for a call, counted as in flight on it (None: just run)."""
        for _ in range(100):
            ckpt = self._resolve()
            if ckpt is None or ckpt._enter():
                return ckpt
            if self._ck_bound is not None:
                raise CheckpointError(f"{ckpt!r} is closed; create a new Checkpointer to go on")
        raise CheckpointError("the checkpoint store kept being switched while a call started")  # pragma: no cover

    # -- one call ----------------------------------------------------------------------------
    def _fields(self, site: str, started: float, awaitable: bool, fp: Optional[dict[str, Any]]) -> dict[str, Any]:
        out = {
            "fn_name": self._ck_name,
            "call_site": site,
            "duration": time.perf_counter() - started,
            "is_awaitable": awaitable,
        }
        if fp is not None:
            out["fingerprint"] = fp
            digest = getattr(fp, "digest", None)
            if digest is not None:
                out["fpd"] = digest  # what later hits compare first (see Store.lookup_fast)
        return out

    @overload
    def _prepare(self, ckpt: Checkpointer, k: str, args: tuple, kwargs: dict,
                 limit: None = None, tried: Optional[tuple[Optional[str]]] = None) -> tuple[Any, ...]: ...

    @overload
    def _prepare(self, ckpt: Checkpointer, k: str, args: tuple, kwargs: dict,
                 limit: int, tried: Optional[tuple[Optional[str]]] = None) -> Optional[tuple[Any, ...]]: ...

    def _prepare(self, ckpt: Checkpointer, k: str, args: tuple, kwargs: dict,
                 limit: Optional[int] = None, tried: Optional[tuple[Optional[str]]] = None
                 ) -> Optional[tuple[Any, ...]]:
        """Look ``k`` up and judge staleness: (found, value, meta, fingerprint, rejected).

        A hit whose digest matches needs no fingerprint record (only its
        digest, ``hit_digest``, when it can be had the short way): the record
        is built when the entry is missing (the save keeps it) or differs
        (``accept`` compares it). With ``limit`` (a read on the event loop):
        None when the entry is larger than ``limit`` bytes or in a side file
        (read it in a thread instead). ``tried``: ``(digest,)`` when the hot
        path took the short way with that digest already and it could not
        settle the call (only the full way is left).
        """
        policy = self._ck_stale or ckpt.stale
        fn = self.__wrapped__  # type: ignore[attr-defined]
        fp = None
        if tried is not None:
            digest = tried[0]
        elif policy == "ignore":
            digest = None
        else:
            digest = hit_digest(fn, args, kwargs)
            if digest is None:
                fp = ckpt.fingerprint(fn, args, kwargs)
                digest = None if fp is None else getattr(fp, "digest", None)
        short = tried is None and (fp is None or digest is not None)  # else: judged in full
        if limit is None:
            found, value, meta, settled = ckpt.lookup_call(k, digest, short)
        else:
            got = ckpt.lookup_call(k, digest, short, limit)
            if got is None:
                return None
            found, value, meta, settled = got
        if fp is None and digest is not None and not (settled and found):
            # Missing (the save records the call) or maybe stale (judged on the record).
            fp = ckpt.fingerprint(fn, args, kwargs)
        if settled:
            return found, value, meta, fp, None
        if limit is not None:  # the short way could not tell the size (a store without it)
            head = ckpt.store.get_meta(k)
            if head is None:
                return False, None, {}, fp, None
            size = head.get("size")
            if not isinstance(size, int) or size > limit:
                return None
            found, value, meta = ckpt.lookup(k)
        # else lookup_call took the full way already: reading it again would
        # unpickle the value twice (a big array's memory doubled).
        rejected = None
        if found and fp is not None and not ckpt.accept(k, meta, fp, policy):
            found, rejected = False, meta.get("created", 0)
        return found, value, meta, fp, rejected

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        fn = self.__wrapped__  # type: ignore[attr-defined]
        if self._ck_coro:
            if self._ck_disable or self._resolve() is None:
                return fn(*args, **kwargs)
            at = _call_site(1)
            ak = self._ck_k or _resolve_key(self._ck_key, fn, args, kwargs, at)
            # Nothing is counted or claimed before the coroutine starts: one
            # that is never awaited holds nothing.
            return self._run_async(ak, at, args, kwargs)
        ckpt = self._ck_bound
        if ckpt is None and self._ck_default is not None and not self._ck_received:
            ckpt = self._ck_default()  # the facade's default store (``_resolve``)
        k = self._ck_k
        prepared: Optional[tuple[Any, ...]] = None
        tried: Optional[tuple[Optional[str]]] = None
        entered = False
        if ckpt is not None and k is not None and ckpt._hot and not self._ck_disable:
            # The hot path: a plain function with a string key on a checkpointer
            # whose store has the short way (SQLite, unsigned): counted in (a
            # closing one: ``_acquire`` below says what to do), ``_prepare``'s
            # short way, ending in the hit itself; anything it cannot settle
            # goes on below, as before.
            entered = ckpt._enter()
        if ckpt is not None and k is not None and entered:
            returned = False
            try:
                if self._ck_stale == "ignore" or (self._ck_stale is None and ckpt.stale == "ignore"):
                    digest = None
                    fast = True
                else:
                    digest = hit_digest(fn, args, kwargs)
                    fast = digest is not None  # else the full way fingerprints the call
                if fast:
                    try:
                        got = ckpt.store.lookup_fast(k, digest)
                    except Exception as e:  # the full way says what it is
                        logger.debug("short look-up of checkpoint %s failed: %s", k, e)
                        got = None
                    if got is MISSING:
                        # Settled: a miss (the save records the call's fingerprints).
                        prepared = (False, None, {}, None if digest is None else ckpt.fingerprint(fn, args, kwargs),
                                    None)
                    elif got is None:
                        tried = (digest,)  # the short way could not settle it: the full way only
                    else:
                        value, dur, aw = got
                        ckpt.count_hit(k, dur)
                        got = _ready(value) if aw else value
                        returned = True
            except BaseException:
                ckpt._leave()
                raise
            if returned:
                ckpt._leave()
                return got
        else:
            ckpt = self._acquire()
            if ckpt is None:
                return fn(*args, **kwargs)
        lease: Optional[Lease] = None
        flight: Optional[_Flight] = None
        owned: list[_Flight] = []  # our own flight, once we have one (see _join_flight)
        handed_over = False
        try:
            site: Optional[str] = None
            if k is None:
                site = _call_site(1)
                k = _resolve_key(self._ck_key, fn, args, kwargs, site)
            if prepared is None:
                prepared = self._prepare(ckpt, k, args, kwargs, None, tried)
            found, value, meta, fp, rejected = prepared
            if found:
                ckpt.log_hit(k, meta)
                return _ready(value) if meta.get("is_awaitable") else value
            if site is None:  # a string key: the call site is needed only by a save
                site = _call_site(1)
            if ckpt.dedup:
                while True:
                    # ``flight`` is set only to a flight of our own: the finally
                    # below ends it, and ending another caller's (we were
                    # interrupted while waiting for it, or found its result)
                    # would wake its waiters while its owner still computes.
                    theirs, mine = ckpt._join_flight(k, fn, False, owned)
                    if mine:
                        flight = theirs
                        break
                    _log_wait(k)
                    if not theirs.wait_sync():
                        if theirs.fn is fn:
                            # The owner is an awaitable on this thread's loop, made by this
                            # same function: ours is an awaitable too, that awaits theirs.
                            handed_over = True
                            cont = functools.partial(self._wait_then_run, ckpt, k, site, args, kwargs,
                                                     fp, rejected, theirs)
                            return _Pending(cont, None, functools.partial(_end_call, ckpt, None, None))
                        logger.info("Checkpoint %s is being computed by an awaitable on this thread's "
                                    "loop; a plain call cannot wait for it, so it computes too", k)
                        break
                    hit = ckpt.lookup(k)
                    if hit[0] and _fresh(hit[2], rejected):
                        ckpt.log_hit(k, hit[2])
                        return _ready(hit[1]) if hit[2].get("is_awaitable") else hit[1]
                lease, (found, value, meta) = ckpt.claim(k, rejected)
                if found:
                    ckpt.log_hit(k, meta)
                    return _ready(value) if meta.get("is_awaitable") else value
            started = time.perf_counter()
            ret = fn(*args, **kwargs)
            if type(ret) not in _NOT_AWAITABLE and inspect.isawaitable(ret):
                # A plain function that returned an awaitable: like the reference,
                # save what it resolves to, and hand back an awaitable on hits.
                if flight is not None:
                    flight.became_awaitable()
                handed_over = True
                start = functools.partial(self._finish, ckpt, k, site, started, ret, lease, flight, fp)
                return _Pending(start, ret, functools.partial(_end_call, ckpt, lease, flight))
            ckpt.save(k, ret, **self._fields(site, started, False, fp))
            return ret
        finally:
            if flight is None and owned:
                flight = owned[0]  # interrupted as it became ours
            if not handed_over:
                if lease is None and flight is None:
                    ckpt._leave()  # a hit, or a plain miss: nothing else to end
                else:
                    _end_call(ckpt, lease, flight)

    async def _finish(self, ckpt: Checkpointer, k: str, site: str, started: float, pending: Awaitable[Any],
                      lease: Optional[Lease], flight: Optional[_Flight], fp: Optional[dict[str, Any]]) -> Any:
        try:
            value = await pending
        except GeneratorExit:  # closed mid-way: no awaiting now
            _submit(_end_call, ckpt, lease, flight)
            raise
        except BaseException:
            await _offload(_end_call, ckpt, lease, flight)
            raise
        await _offload(_save_and_end, ckpt, k, value, self._fields(site, started, True, fp), lease, flight)
        return value

    def _prepare_inline(
        self, lane: _Lane, ckpt: Checkpointer, k: str, args: tuple, kwargs: dict
    ) -> Optional[tuple[Any, ...]]:
        """``_prepare`` on the loop for a small call of a local store, or None (do it in a thread).

        A thread hop costs more than reading a small entry, and a thousand
        gathered hits are faster here; a budget per loop iteration keeps
        their sum bounded, and anything large goes to a thread.
        """
        t0 = time.perf_counter()
        try:
            return self._prepare(ckpt, k, args, kwargs, INLINE_MAX_BYTES)
        except Exception:  # whatever it was, the thread path reports it properly
            return None
        finally:
            lane.spent += time.perf_counter() - t0

    async def _run_async(self, k: str, site: str, args: tuple, kwargs: dict) -> Any:
        ckpt = self._acquire()
        if ckpt is None:
            return await self.__wrapped__(*args, **kwargs)  # type: ignore[attr-defined]
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            # Driven by something other than asyncio (trio, a hand-rolled
            # send()): no loop to keep free, and no asyncio to wait with.
            return await self._run_without_asyncio(ckpt, k, site, args, kwargs)
        try:
            prepared = None
            lane = await _inline_turn()
            if ckpt.store.is_local and not _busy[0] and _small(args, kwargs):
                prepared = self._prepare_inline(lane, ckpt, k, args, kwargs)
            if prepared is None:
                prepared = await _offload(self._prepare, ckpt, k, args, kwargs)
        except BaseException:
            ckpt._leave()
            raise
        return await self._async_miss(ckpt, k, site, args, kwargs, prepared, None)

    async def _run_without_asyncio(self, ckpt: Checkpointer, k: str, site: str, args: tuple,
                                   kwargs: dict) -> Any:
        lease: Optional[Lease] = None
        try:
            found, value, meta, fp, rejected = self._prepare(ckpt, k, args, kwargs)
            if not found and ckpt.dedup:
                lease, (found, value, meta) = ckpt.claim(k, rejected)
            if found:
                ckpt.log_hit(k, meta)
                return value
            started = time.perf_counter()
            value = await self.__wrapped__(*args, **kwargs)  # type: ignore[attr-defined]
            ckpt.save(k, value, **self._fields(site, started, True, fp))
            return value
        finally:
            _end_call(ckpt, lease, None)

    async def _wait_then_run(self, ckpt: Checkpointer, k: str, site: str, args: tuple, kwargs: dict,
                             fp: Optional[dict[str, Any]], rejected: Any, theirs: _Flight) -> Any:
        return await self._async_miss(ckpt, k, site, args, kwargs, (False, None, {}, fp, rejected), theirs)

    async def _async_miss(self, ckpt: Checkpointer, k: str, site: str, args: tuple, kwargs: dict,
                          prepared: tuple[Any, ...], theirs: Optional[_Flight]) -> Any:
        """After the lookup: a hit, or wait for / take the key, run the step, save off the loop."""
        fn = self.__wrapped__  # type: ignore[attr-defined]
        found, value, meta, fp, rejected = prepared
        lease: Optional[Lease] = None
        flight: Optional[_Flight] = None
        try:
            if not found and ckpt.dedup:
                while True:
                    if theirs is None:
                        theirs, mine = ckpt._join_flight(k, fn, True)
                        if mine:
                            flight, theirs = theirs, None
                            break
                    _log_wait(k)
                    await theirs.wait_async()
                    theirs = None
                    found, value, meta = await _offload(ckpt.lookup, k)
                    if found and _fresh(meta, rejected):
                        break
                    found = False
                if not found:
                    lease, (found, value, meta) = await ckpt.claim_async(k, rejected)
            if not found:
                started = time.perf_counter()
                ret = fn(*args, **kwargs)
                value = (await ret) if inspect.isawaitable(ret) else ret
        except GeneratorExit:  # closed mid-way: no awaiting now
            _submit(_end_call, ckpt, lease, flight)
            raise
        except BaseException:
            await _offload(_end_call, ckpt, lease, flight)
            raise
        # Past this point every path ends the call exactly once (an _offload
        # cancelled while waiting still finishes its work in the thread).
        if found:
            ckpt.log_hit(k, meta)
            if lease is None and flight is None:
                ckpt._leave()  # nothing to release: no thread hop
            else:
                await _offload(_end_call, ckpt, lease, flight)
            return value
        await _offload(_save_and_end, ckpt, k, value, self._fields(site, started, True, fp), lease, flight)
        return value


def make_wrapper(
    fn: Callable[..., Any],
    key: Key,
    disable: bool,
    resolve: Callable[[], Optional[Checkpointer]],
    stale: Optional[str] = None,
) -> Callable[..., Any]:
    """Wrap ``fn``; ``resolve`` gives the checkpointer at call time (None: just run).

    ``resolve`` must be picklable by name (a module-level function) for the
    wrapper to travel; the facade passes its ``get_checkpointer``.
    """
    return CheckpointedFunction(fn, key, disable, stale, default=resolve)


def _mark_coroutine_function(wrapper: Any, fn: Any) -> None:
    # The wrapper is an object (so that it pickles by description) whose call
    # returns a coroutine; tell inspect it is async. Python 3.12+ has a
    # marker; before, inspect accepts objects that look like functions, so
    # lend it the code object, which carries the coroutine flag.
    marker = getattr(asyncio.coroutines, "_is_coroutine", None)
    if marker is not None:  # what asyncio.iscoroutinefunction looks for
        wrapper._is_coroutine = marker
    mark = getattr(inspect, "markcoroutinefunction", None)
    if mark is not None:
        mark(wrapper)
        return
    code = getattr(fn, "__code__", None)
    if isinstance(code, types.CodeType):
        wrapper.__code__ = code
        wrapper.__defaults__ = getattr(fn, "__defaults__", None)
        wrapper.__kwdefaults__ = getattr(fn, "__kwdefaults__", None)


# -- fork: children start with fresh locks, threads and registries ----------------------

_live: weakref.WeakSet[Checkpointer] = weakref.WeakSet()


def _after_fork_in_child() -> None:
    global _pool, _pool_lock, _busy_lock, _registry, _heartbeat, _flights
    # Threads do not cross a fork: the pool's and the heartbeat's are gone,
    # and a lock one of them held would stay held for ever in the child.
    _pool, _pool_lock = None, threading.Lock()
    _busy[0] = 0
    _busy_lock = threading.Lock()
    _heartbeat = _Heartbeat()
    _flights = _Flights()
    _registry = _Registry()
    for ckpt in list(_live):
        ckpt._lock = threading.Lock()
        ckpt._inflight = 0  # the calls of the parent's other threads do not exist here
        ckpt._run = None  # the child's run is its own (log_hit counts on it without a pid check)
        if not ckpt.closing:
            _registry.add(ckpt)


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)
