"""Store work of async steps off the event loop: the offload pool, the loop's lane, ``_Pending``.

The pool is bounded and our own (the loop's default executor belongs to the
application); the lane spreads the starts and small inline reads of gathered
calls over turns of the loop; ``_Pending`` is the awaitable a plain function
returning an awaitable hands back, owning its claim until it runs.
"""

from __future__ import annotations

import asyncio
import collections
import collections.abc
import concurrent.futures
import threading
import weakref
from typing import Any, Callable, Coroutine, Optional, TypeVar

from .._forking import at_fork

__all__ = [
    "INLINE_BUDGET_S",
    "INLINE_MAX_BYTES",
    "OFFLOAD_THREADS",
    "_NOT_AWAITABLE",
    "_Lane",
    "_Pending",
    "_busy",
    "_inline_turn",
    "_offload",
    "_ready",
    "_small",
    "_submit",
]

R = TypeVar("R")

async def _ready(value: Any) -> Any:
    return value


# -- the thread pool that keeps store work off the event loop -----------------------

#: Threads that do the store work of async steps. Bounded, and our own: the
#: loop's default executor belongs to the application, and long-lived threads
#: keep the number of per-thread store connections bounded too. Enough of
#: them that gathered saves arrive together (the stores commit them as a
#: group), few enough that the loop does not queue long for the GIL behind
#: them (benchmarks/bench_async.py measures the loop's stalls; figures in
#: docs/performance.md).
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
#: getting it back from busy threads costs a switch interval each time).
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


def _after_fork_in_child() -> None:
    global _pool, _pool_lock, _busy_lock
    # Threads do not cross a fork: the pool's are gone, and a lock one of
    # them held would stay held for ever in the child.
    _pool, _pool_lock = None, threading.Lock()
    _busy[0] = 0
    _busy_lock = threading.Lock()


at_fork(after_in_child=_after_fork_in_child)
