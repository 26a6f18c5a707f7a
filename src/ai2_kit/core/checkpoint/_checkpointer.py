"""The decorator logic: keys, sync and async calls, hits, saves and their failures."""

from __future__ import annotations

import functools
import inspect
import logging
import os
import secrets
import sys
import threading
import time
from typing import Any, Awaitable, Callable, NamedTuple, Optional, TypeVar, Union

from ._errors import CorruptEntryError, SaveError
from ._fingerprint import check_environment_policy, explain, fingerprint, judge
from ._keys import validate_key
from .stores import Store, open_store
from .stores._fs import HOST

# At run time too, so that typing.get_type_hints() finds P.
if sys.version_info >= (3, 10):
    from typing import ParamSpec
else:  # pragma: no cover - Python 3.9
    from typing_extensions import ParamSpec

P = ParamSpec("P")

__all__ = ["FnInfo", "KeyFn", "Checkpointer", "Lease", "make_wrapper"]

logger = logging.getLogger("ai2_kit.core.checkpoint")
R = TypeVar("R")


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
            for its result instead of running the step again. The claim is a
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
    ) -> None:
        self.environment = check_environment_policy(environment)
        if (location is None) == (store is None):
            raise TypeError("Checkpointer needs exactly one of location or store")
        self.stale = _check_policy(stale)
        if not lease > 0:
            raise ValueError(f"lease must be a positive number of seconds, not {lease!r}")
        if store is None:
            store = open_store(location, prefer=prefer, readonly=readonly, signing_key=signing_key)
        elif signing_key is not None:
            store.set_signing_key(signing_key)
        self.store: Store = store
        if store.newer_format is not None:
            logger.warning("%s", store.newer_format)
        self.strict = strict
        self.dedup = (self.store.kind == "postgres") if dedup is None else bool(dedup)
        self.lease = float(lease)

    @property
    def location(self) -> str:
        return self.store.location

    def __call__(
        self, key: Key, disable: bool = False, *, stale: Optional[str] = None
    ) -> Callable[[Callable[P, R]], Callable[P, R]]:
        """A decorator that checkpoints calls of a function under ``key``.

        ``stale`` overrides the checkpointer's policy for these calls.
        """
        return lambda fn: make_wrapper(fn, key, disable, lambda: self, stale)  # type: ignore[return-value]

    apply = __call__

    def delete(self, key: str) -> bool:
        """Remove one entry; True when it existed."""
        return self.store.delete(key)

    def close(self) -> None:
        self.store.close()

    def __enter__(self) -> Checkpointer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Checkpointer({self.store!r})"

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

    @staticmethod
    def log_hit(key: str, meta: dict[str, Any]) -> None:
        """The one INFO line a returned hit gets."""
        dur = meta.get("duration")
        if dur is None:
            logger.info("Hit checkpoint: %s", key)
        else:
            logger.info("Hit checkpoint: %s (the original call took %.3f s)", key, dur)

    def save(self, key: str, value: Any, **fields: Any) -> bool:
        """Save a step's result; on failure warn (or raise in strict mode)."""
        try:
            self.store.put(key, value, **fields)
            return True
        except Exception as e:
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
    def claim(self, key: str) -> tuple[Optional[Lease], tuple[bool, Any, dict[str, Any]]]:
        """Wait until ``key`` is ours to compute (a Lease) or someone saved it (a hit)."""
        waiter = _Waiter(self, key)
        while (done := waiter.attempt()) is None:
            time.sleep(waiter.delay())
        return done

    async def claim_async(self, key: str) -> tuple[Optional[Lease], tuple[bool, Any, dict[str, Any]]]:
        """``claim`` for coroutines: waits with ``asyncio.sleep``."""
        import asyncio  # only coroutines that wait need it

        waiter = _Waiter(self, key)
        while (done := waiter.attempt()) is None:
            await asyncio.sleep(waiter.delay())
        return done


class _Waiter:
    """One caller's attempts at a key: take the claim, or find the result saved."""

    def __init__(self, ckpt: Checkpointer, key: str) -> None:
        self.ckpt, self.key = ckpt, key
        self.owner = f"{HOST}:{os.getpid()}:{secrets.token_hex(6)}"
        self.tries = 0
        self._delay = _POLL_MIN

    def attempt(self) -> tuple[Lease | None, tuple[bool, Any, dict[str, Any]]] | None:
        """A lease, a hit, or None (wait and try again)."""
        if self.tries:
            hit = self.ckpt.lookup(self.key)
            if hit[0]:
                return None, hit
        self.tries += 1
        if self.ckpt.store.try_claim(self.key, self.owner, self.ckpt.lease):
            return Lease(self.ckpt, self.key, self.owner), (False, None, {})
        if self.tries == 1:
            logger.info("Waiting for checkpoint %s: another live caller is computing it", self.key)
        return None

    def delay(self) -> float:
        delay, self._delay = self._delay, min(self._delay * 1.5, _POLL_MAX)
        return delay


_POLL_MIN = 0.02
_POLL_MAX = 1.0


class Lease:
    """A claim on a key, kept alive by a heartbeat thread until released."""

    def __init__(self, ckpt: Checkpointer, key: str, owner: str) -> None:
        self.ckpt, self.key, self.owner = ckpt, key, owner
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, name=f"ai2-kit-lease:{key}", daemon=True)
        self._thread.start()

    def _beat(self) -> None:
        ttl = self.ckpt.lease
        while not self._stop.wait(ttl / 3):
            try:
                if not self.ckpt.store.renew_claim(self.key, self.owner, ttl):
                    logger.warning("Lost the claim on checkpoint %s (this process was stalled longer "
                                   "than the %.0f s lease); another caller may compute it too", self.key, ttl)
                    return
            except Exception as e:  # the step goes on; the claim just may expire
                logger.warning("Could not renew the claim on checkpoint %s: %s", self.key, e)

    def release(self) -> None:
        self._stop.set()
        self._thread.join()
        try:
            self.ckpt.store.release_claim(self.key, self.owner)
        except Exception as e:  # an unreleased claim expires on its own
            logger.warning("Could not release the claim on checkpoint %s: %s (it expires in %.0f s)",
                           self.key, e, self.ckpt.lease)


def _release(lease: Lease | None) -> None:
    if lease is not None:
        lease.release()


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


def make_wrapper(
    fn: Callable[..., Any],
    key: Key,
    disable: bool,
    resolve: Callable[[], Checkpointer | None],
    stale: str | None = None,
) -> Callable[..., Any]:
    """Wrap ``fn``; ``resolve`` gives the checkpointer at call time (None: just run)."""
    if not callable(fn):
        raise TypeError(f"apply_checkpoint(...) must wrap a callable, not {type(fn).__name__}")
    if not isinstance(key, str) and not callable(key):
        raise TypeError(f"a checkpoint key must be a str or a function of FnInfo, not {type(key).__name__}")
    if isinstance(key, str):
        validate_key(key)  # fail at decoration time, before any step runs
    if stale is not None:
        _check_policy(stale)
    fn_name = getattr(fn, "__qualname__", getattr(fn, "__name__", repr(fn)))
    is_coro_fn = inspect.iscoroutinefunction(fn)

    def fields(site: str, started: float, awaitable: bool, fp: dict[str, Any] | None) -> dict[str, Any]:
        out = {
            "fn_name": fn_name,
            "call_site": site,
            "duration": time.perf_counter() - started,
            "is_awaitable": awaitable,
        }
        if fp is not None:
            out["fingerprint"] = fp
        return out

    def prepare(ckpt: Checkpointer, k: str, args: tuple, kwargs: dict) -> tuple[Any, ...]:
        """Look ``k`` up and judge staleness: (found, value, meta, fingerprint)."""
        policy = stale or ckpt.stale
        fp = None if policy == "ignore" else ckpt.fingerprint(fn, args, kwargs)
        found, value, meta = ckpt.lookup(k)
        if found and fp is not None and not ckpt.accept(k, meta, fp, policy):
            found = False
        return found, value, meta, fp

    async def run_async(ckpt: Checkpointer, k: str, site: str, args: tuple, kwargs: dict) -> Any:
        found, value, meta, fp = prepare(ckpt, k, args, kwargs)
        lease = None
        if not found and ckpt.dedup:
            lease, (found, value, meta) = await ckpt.claim_async(k)
        if found:
            ckpt.log_hit(k, meta)
            return value
        try:
            started = time.perf_counter()
            value = await fn(*args, **kwargs)
            ckpt.save(k, value, **fields(site, started, True, fp))
        finally:
            _release(lease)
        return value

    async def finish(
        ckpt: Checkpointer, k: str, site: str, started: float, pending: Awaitable[Any], lease: Lease | None,
        fp: dict[str, Any] | None,
    ) -> Any:
        try:
            value = await pending
            ckpt.save(k, value, **fields(site, started, True, fp))
        finally:
            _release(lease)
        return value

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        ckpt = None if disable else resolve()
        if ckpt is None:
            return fn(*args, **kwargs)
        site = _call_site(1)
        k = _resolve_key(key, fn, args, kwargs, site)
        if is_coro_fn:
            return run_async(ckpt, k, site, args, kwargs)
        found, value, meta, fp = prepare(ckpt, k, args, kwargs)
        lease = None
        if not found and ckpt.dedup:
            lease, (found, value, meta) = ckpt.claim(k)
        if found:
            ckpt.log_hit(k, meta)
            return _ready(value) if meta.get("is_awaitable") else value
        try:
            started = time.perf_counter()
            ret = fn(*args, **kwargs)
            if inspect.isawaitable(ret):
                # A plain function that returned an awaitable: like the reference,
                # save what it resolves to, and hand back an awaitable on hits.
                pending, lease = finish(ckpt, k, site, started, ret, lease, fp), None
                return pending
            ckpt.save(k, ret, **fields(site, started, False, fp))
        finally:
            _release(lease)
        return ret

    if is_coro_fn:
        _mark_coroutine_function(wrapper)
    return wrapper


def _mark_coroutine_function(fn: Callable[..., Any]) -> None:
    # The wrapper is a plain function (so it sees the caller's frame for the
    # call site) that returns a coroutine; tell inspect it is async.
    mark = getattr(inspect, "markcoroutinefunction", None)
    if mark is not None:
        mark(fn)


