"""Connections per thread that end with their thread and never cross a fork; group commit.

Shared by the SQLite and PostgreSQL stores.

**Threads.** Each thread gets its own connection (SQLite and psycopg
connections must not be used by two threads at once). A thread pool made per
iteration would otherwise leave one connection, and its file descriptors or
server session, behind for every thread that ever ran: when a thread opens
its connection, the connections of threads that have ended are closed.

**fork().** SQLite keeps the lock state of every open file in process-wide
structures (one per inode, shared by all connections to that file). A child
inherits them as they were at the fork, without the POSIX locks they describe
(those belong to the parent), so a fresh connection in the child trusts locks
it does not hold: it waits for a write lock "held" by a transaction that only
ran in the parent (SQLite's busy timeout, then "database is locked"), or
reads without the shared lock that keeps others from resetting the WAL under
it. Reopening connections in the child cannot fix that. So for SQLite the
fork itself is made clean: a ``before`` hook waits until no thread is inside
an SQLite call on our stores (operations hold a :class:`ForkGate`), holds new
ones back, and closes every connection, so none exists at the instant of the
fork and the child starts with no SQLite state for our files at all. The
parent reopens lazily afterwards.

A connection that still crosses a fork (a PostgreSQL session, which the
parent keeps; or one the hook could not close) is never closed by the child:
closing an SQLite connection with a transaction open rolls it back, which in
rollback-journal mode writes the shared database file under the parent's
transaction, and closing a psycopg connection sends "Terminate" on the
socket the parent still uses, ending its session. Nor may the garbage
collector close them (both close on deallocation): they are kept referenced
in ``_INHERITED`` for the child's lifetime, a deliberate, bounded leak.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
import weakref
from typing import Any, Callable, Generic, Iterator, Optional, TypeVar, Union

from .._forking import at_fork

__all__ = ["ForkGate", "ThreadConnections", "GroupCommit"]

C = TypeVar("C")
T = TypeVar("T")
R = TypeVar("R")

# Connections inherited over fork(): see the module docstring.
_INHERITED: list[Any] = []

# Every live ThreadConnections, for the fork hooks.
_LIVE: weakref.WeakSet[ThreadConnections[Any]] = weakref.WeakSet()
# Every live GroupCommit, to be reset in a forked child.
_COMMITS: weakref.WeakSet[GroupCommit[Any, Any]] = weakref.WeakSet()
# The ones whose gate the forking thread holds, in order (released in reverse).
_HELD: list[ThreadConnections[Any]] = []


class ForkGate:
    """Operations hold it shared (many at once); a fork holds it alone.

    Re-entrant per thread, so an operation may call another. The ``before``
    fork hook waits for the operations in flight to finish and keeps new
    ones waiting until the fork is done: the fork then lands between SQLite
    calls, never inside one (nor inside a transaction).
    """

    def __init__(self) -> None:
        # The lock is used bare on the hot path (its C-level context manager;
        # a Condition's is Python code), and waiters are woken only while a
        # fork waits for them. A single short query may instead hold the lock
        # itself for its whole length (``ThreadConnections.fetchone(held=)``): the
        # fork takes the lock to begin and keeps it until it is done, so no
        # fork lands inside that query either. Reentrant (as cheap as a plain
        # lock) so that a fork made while this thread holds it (a signal
        # handler's) sees that, as ``inside``, instead of waiting for itself.
        self._lock = threading.RLock()
        self._cond = threading.Condition(self._lock)
        self._active = 0
        self._forking = False
        self._depth = threading.local()

    @contextlib.contextmanager
    def shared(self) -> Iterator[None]:
        depth = self.enter()
        try:
            yield
        finally:
            self.leave(depth)

    def enter(self) -> int:
        """``shared()`` without a context manager (a hit's path): pair with ``leave``."""
        local = self._depth
        depth = getattr(local, "n", 0)
        if depth == 0:
            counted = False
            try:
                with self._lock:
                    while self._forking:
                        self._cond.wait()
                    self._active += 1
                    counted = True
            except BaseException:
                # A KeyboardInterrupt raised as the lock was let go: the caller
                # never gets ``depth`` to leave with, so the count is undone
                # here, or the next fork would wait for ever.
                if counted:
                    with self._lock:
                        self._active -= 1
                raise
        local.n = depth + 1
        return depth

    def leave(self, depth: int) -> None:
        self._depth.n = depth
        if depth == 0:
            with self._lock:
                self._active -= 1
                if self._active == 0 and self._forking:
                    self._cond.notify_all()

    def inside(self) -> bool:
        """Whether the calling thread is inside an operation."""
        return getattr(self._depth, "n", 0) > 0

    def close_for_fork(self) -> bool:
        """Wait until no operation runs and hold new ones; False if this thread is inside one."""
        if self.inside() or self._lock._is_owned():  # type: ignore[attr-defined]
            return False  # it would wait for itself; the fork then crosses this operation
        self._cond.acquire()
        self._forking = True
        while self._active:
            self._cond.wait()
        return True  # the condition's lock stays held until after the fork

    def reopen_after_fork(self) -> None:
        self._forking = False
        self._cond.notify_all()
        self._cond.release()


class ThreadConnections(Generic[C]):
    """One connection per thread, closed once its thread has ended, never used across fork().

    ``opener()`` makes a connection, ``closer(conn)`` closes one (it must not
    raise). With ``close_at_fork`` (SQLite) every connection is closed just
    before a fork, so none crosses it; without (PostgreSQL, whose sessions
    are separate per process anyway) the parent keeps its connections and the
    child leaves them alone. Callers use connections only inside
    ``gate.shared()``, which is what lets the fork wait for them.
    """

    def __init__(self, opener: Callable[[], C], closer: Callable[[C], None], *, close_at_fork: bool) -> None:
        self._opener = opener
        self._closer = closer
        self._close_at_fork = close_at_fork
        self.gate = ForkGate()
        self._local = threading.local()
        self._all: list[tuple[threading.Thread, C]] = []
        self._lock = threading.Lock()
        self._pid = os.getpid()
        _LIVE.add(self)

    def get(self) -> C:
        """This thread's connection, opened on first use (closing those of ended threads)."""
        if os.getpid() != self._pid:
            self._after_fork_in_child()  # a fork the hooks did not see (a C extension's)
        conn: C | None = getattr(self._local, "conn", None)
        if conn is None:
            self.sweep()
            conn = self._opener()
            self._local.conn = conn
            with self._lock:
                self._all.append((threading.current_thread(), conn))
        return conn

    def fetchone(self, sql: str, params: Any, held: bool = False) -> Any:
        """The first row of one query on this thread's connection, inside the gate.

        A hit's path: one call for the gate, the connection and the query.
        With ``held``, the gate's own lock is held for the query instead of
        counting it in and out as an operation (a fork needs that lock to
        begin, ``ForkGate.close_for_fork``): less work per hit. Only
        for a query that never waits on another thread of this process,
        since other threads' operations wait for the lock to start or end.
        An SQLite read in WAL mode never waits for a writer; in
        rollback-journal mode it waits for a pending commit, which waits for
        readers, one of which may be a thread of ours that needs the lock to
        go on: not there.
        """
        gate = self.gate
        if held:
            with gate._lock:
                conn: Any = getattr(self._local, "conn", None) if os.getpid() == self._pid else None
                if conn is not None:
                    return conn.execute(sql, params).fetchone()
        # Counted as an operation (and this thread's first query, or the first after a fork).
        depth = gate.enter()
        try:
            conn = getattr(self._local, "conn", None) if os.getpid() == self._pid else None
            if conn is None:
                conn = self.get()
            return conn.execute(sql, params).fetchone()
        finally:
            gate.leave(depth)

    def change(self, sql: str, params: Any) -> int:
        """Run one statement that writes, inside the gate; returns how many rows it changed.

        A lone save's path (SQLite): one call for the gate, the connection and
        the statement, meant to be a transaction of its own. -1, without running
        it, when the connection is inside a transaction already (left open by an
        interrupted one): the statement would join it, and nothing would commit.
        """
        gate = self.gate
        depth = gate.enter()
        try:
            conn: Any = getattr(self._local, "conn", None) if os.getpid() == self._pid else None
            if conn is None:
                conn = self.get()
            if conn.in_transaction:
                return -1
            return int(conn.execute(sql, params).rowcount)
        finally:
            gate.leave(depth)

    def current(self) -> C | None:
        """This thread's connection if it has one, without opening any."""
        return getattr(self._local, "conn", None) if os.getpid() == self._pid else None

    def sweep(self) -> int:
        """Close the connections of threads that have ended; returns how many."""
        with self._lock:
            dead = [c for t, c in self._all if not t.is_alive()]
            self._all = [(t, c) for t, c in self._all if t.is_alive()]
        for conn in dead:
            self._closer(conn)
        return len(dead)

    def drop(self, conn: C) -> None:
        """Forget (and close) one connection, e.g. after the server dropped it."""
        with self._lock:
            self._all = [(t, c) for t, c in self._all if c is not conn]
        if getattr(self._local, "conn", None) is conn:
            self._local.conn = None
        self._closer(conn)

    def connections(self) -> list[C]:
        with self._lock:
            return [c for _, c in self._all]

    def close_all(self) -> None:
        """Close every connection (the store is closing)."""
        if os.getpid() != self._pid:
            self._after_fork_in_child()
            return
        with self._lock:
            conns, self._all = [c for _, c in self._all], []
        self._local = threading.local()
        for conn in conns:
            self._closer(conn)
        _LIVE.discard(self)

    def __del__(self) -> None:
        # A store dropped without close(): its connections end with it, not at
        # some later collection of each (psycopg warns then, and a server
        # session stays open until it does). Not in a forked child: those
        # connections are the parent's.
        try:
            if os.getpid() == self._pid:
                for _, conn in self._all:
                    self._closer(conn)
        except Exception:  # interpreter shutdown: modules half torn down
            pass

    # -- fork hooks -----------------------------------------------------------
    def _before_fork(self) -> bool:
        if not self._close_at_fork:
            return False
        if not self.gate.close_for_fork():
            return False
        with self._lock:
            conns, self._all = [c for _, c in self._all], []
        # A new local: every thread's cached connection is forgotten at once.
        self._local = threading.local()
        for conn in conns:
            self._closer(conn)
        return True

    def _after_fork_in_parent(self) -> None:
        self.gate.reopen_after_fork()

    def _after_fork_in_child(self) -> None:
        # Only this thread exists now; any lock may have been held by a thread
        # that did not survive the fork, so every lock is new.
        _INHERITED.extend(c for _, c in self._all)
        self._all = []
        self._lock = threading.Lock()
        self._local = threading.local()
        self.gate = ForkGate()
        self._pid = os.getpid()


def _snapshot(items: weakref.WeakSet[Any]) -> list[Any]:
    """The members of a WeakSet that another thread may be adding to."""
    for _ in range(100):
        try:
            return list(items)
        except RuntimeError:  # changed size during iteration: look again
            continue
    return list(items)


def _before_fork() -> None:
    # Stores are taken in a fixed order; an operation holds one store's gate
    # at a time, so waiting for several cannot deadlock.
    for conns in sorted(_snapshot(_LIVE), key=id):
        if conns._before_fork():
            _HELD.append(conns)


def _after_fork_in_parent() -> None:
    while _HELD:
        _HELD.pop()._after_fork_in_parent()


def _after_fork_in_child() -> None:
    _HELD.clear()
    for conns in _snapshot(_LIVE):
        conns._after_fork_in_child()
    for commit in _snapshot(_COMMITS):  # its waiters did not survive the fork
        commit._reset()


at_fork(before=_before_fork, after_in_parent=_after_fork_in_parent, after_in_child=_after_fork_in_child)


class _Request(Generic[T, R]):
    __slots__ = ("item", "size", "thread", "wakeup", "lead", "done", "gone", "result", "error")

    def __init__(self, item: T, size: int) -> None:
        self.item = item
        self.size = size
        self.thread = threading.get_ident()
        # A bare lock, taken now and released once to wake the caller: much
        # cheaper than an Event, which matters at thousands of saves a second.
        self.wakeup = threading.Lock()
        self.wakeup.acquire()
        #: This caller holds the lead (set and cleared under the commit's lock only).
        self.lead = False
        self.done = False
        #: Its caller stopped waiting (interrupted): never hand it the lead, never queue it again.
        self.gone = False
        self.result: R | None = None
        self.error: BaseException | None = None


class _Lead:
    """A caller writing alone holds the lead through this (no request, no lock of its own)."""

    __slots__ = ("lead",)

    def __init__(self) -> None:
        self.lead = False


def _to_the_end(fn: Callable[..., None], *args: Any) -> None:
    """Run the idempotent ``fn(*args)`` to its end even when KeyboardInterrupt arrives meanwhile.

    A Ctrl-C can land between any two steps of the main thread; bookkeeping
    that hands the lead on or wakes waiters must not stop half-way (the
    waiters would wait for ever), so it runs again, and the interrupt is
    raised once it has finished.
    """
    interrupted: Optional[BaseException] = None
    for _ in range(1000):
        try:
            fn(*args)
        except BaseException as e:  # KeyboardInterrupt, or an exception raised asynchronously
            if interrupted is None:
                interrupted = e
            continue
        break
    if interrupted is not None:
        raise interrupted


class GroupCommit(Generic[T, R]):
    """Writes the items that callers submit together in one batch (one transaction).

    The first caller to arrive becomes the leader: it takes every item queued
    so far (its own first) and writes them with ``write(items)``, which
    returns one result per item, all committed together. Callers arriving
    meanwhile queue up and wait; when the leader is done, the first of them
    leads the next batch. So with one caller nothing waits and nothing
    changes, and with many, one commit (one fsync, one round trip) serves all
    that arrived during the previous one.

    When the last batches came from several threads, a leader waits a little
    (at most as long as one commit took) for as many of them to queue up
    before it writes: they are busy pickling their next value, and one commit
    for all costs less than one for each. A caller that is alone never waits.

    Each caller returns only once its own item is committed, with its own
    result or error: when a batch fails, its items are written again one by
    one (unless ``shared_failure(error)`` says the error is not about the
    items, like a lock timeout or an unreachable server), so a bad item fails
    alone. A shared failure fails, at once, the batch and every caller that
    queued meanwhile, each with that error, instead of each trying again in
    turn and waiting out the same timeout.
    """

    #: The longest a leader waits for others to queue up, in seconds (and never
    #: longer than the last commit took).
    MAX_DELAY = 0.001

    def __init__(
        self,
        write: Callable[[list[T]], list[R]],
        *,
        write_one: Optional[Callable[[T], R]] = None,
        max_items: int = 512,
        max_bytes: int = 32 << 20,
        shared_failure: Callable[[BaseException], bool] = lambda e: False,
    ) -> None:
        self._write = write
        # A lone caller's item: ``write([item])[0]``, or a cheaper way the writer has for one item.
        self._write_one = write_one if write_one is not None else (lambda item: write([item])[0])
        self._max_items = max_items
        self._max_bytes = max_bytes
        self._shared_failure = shared_failure
        self._reset()
        #: Transactions written so far (a batch retried one by one counts once).
        self.batches = 0
        _COMMITS.add(self)

    def _reset(self) -> None:
        self._lock = threading.Lock()
        self._queue: list[_Request[T, R]] = []
        self._busy = False
        self._waiting = False
        self._enough = threading.Lock()
        self._target = 1  # how many items a leader waits for
        self._last_threads: set[int] = set()
        self._delay = 0.0  # how long the last commit took

    def submit(self, item: T, size: int = 0) -> R:
        """Write ``item`` (with others that arrive together); returns its result once committed.

        Whatever interrupts the caller (KeyboardInterrupt in the main thread,
        at any point) is undone before it propagates: its item withdrawn if
        still queued, the lead handed on, the waiters of a batch it led woken
        (``_abandon``, ``_finish``), so the other callers never wait for ever.
        """
        solo = _Lead()
        try:
            with self._lock:
                # Nobody writing, nobody queued, and the last batches came from one
                # thread: write at once, without a request to queue and hand over
                # (a sequential workflow's every save). Others arriving meanwhile
                # queue up as usual and are handed the lead afterwards.
                if not self._busy and not self._queue and self._target <= 1:
                    self._busy = solo.lead = True
            if solo.lead:
                return self._write_alone(solo, item)
        except BaseException:
            _to_the_end(self._hand_on, solo)  # (nothing to do unless the lead was taken)
            raise
        me: _Request[T, R] = _Request(item, size)
        try:
            with self._lock:
                self._queue.append(me)
                if not self._busy:
                    self._busy = me.lead = True
                elif self._waiting and len(self._queue) >= self._target:
                    self._waiting = False
                    self._enough.release()
            if not me.lead:
                me.wakeup.acquire()  # released once our item is done, or the lead is ours
            if not me.done:  # leading: our item is first in the queue
                self._lead(me)
        except BaseException:
            _to_the_end(self._abandon, me)
            raise
        if me.error is not None:
            raise me.error
        return me.result  # type: ignore[return-value]

    def _write_alone(self, solo: _Lead, item: T) -> R:
        """``_lead`` for a batch of one caller's one item, written directly."""
        try:
            t0 = time.monotonic()
            self.batches += 1
            result = self._write_one(item)
            self._delay = time.monotonic() - t0
            tid, last = threading.get_ident(), self._last_threads
            if len(last) != 1 or tid not in last:  # else: the same thread as last time, nothing changes
                self._target = len(last | {tid})
                self._last_threads = {tid}
            return result
        except Exception as e:
            if self._shared_failure(e):
                self._fail_waiting(e)
            raise
        finally:
            _to_the_end(self._hand_on, solo)

    def _fail_waiting(self, error: BaseException) -> None:
        """Fail, with ``error``, every caller that queued while a write failed for all.

        A failure that is not about the items (the server unreachable, the
        lock not had in time) would meet each of them again, one leader after
        another, each waiting out its own timeout: they get the error now,
        once, and a caller arriving afterwards tries afresh.
        """
        with self._lock:
            waiting = [r for r in self._queue if not r.gone and not r.lead]
            self._queue = [r for r in self._queue if r.lead]
            for req in waiting:
                req.error, req.done = error, True
                req.wakeup.release()

    def _abandon(self, me: _Request[T, R]) -> None:
        """A caller was interrupted: withdraw its item, hand on the lead if it held it. Idempotent."""
        with self._lock:
            me.gone = True
            if me in self._queue:
                self._queue.remove(me)
            if me.lead:
                self._pass_lead(me)

    def _hand_on(self, me: Union[_Request[T, R], _Lead]) -> None:
        """The leader ``me`` is done: the next caller leads, or the commit goes idle. Idempotent."""
        with self._lock:
            if me.lead:
                self._pass_lead(me)

    def _pass_lead(self, me: Union[_Request[T, R], _Lead]) -> None:
        """With the lock held: ``me`` gives up the lead to the first live waiter, woken here."""
        me.lead = False
        queue = self._queue
        while queue and queue[0].gone:
            del queue[0]
        if queue:
            nxt = queue[0]
            nxt.lead = True
            nxt.wakeup.release()
        else:
            self._busy = False

    def _lead(self, me: _Request[T, R]) -> None:
        batch: list[_Request[T, R]] = []
        try:
            with self._lock:
                wait = self._target > 1 and len(self._queue) < self._target and self._delay > 0
                if wait:
                    # Released by the caller whose arrival makes the batch big
                    # enough; a bare lock (not a Condition) so that an interrupt
                    # cannot leave the commit's own lock in a half-released state.
                    enough = self._enough = threading.Lock()
                    enough.acquire()
                    self._waiting = True
            if wait:
                enough.acquire(True, min(self._delay, self.MAX_DELAY))
            with self._lock:
                if wait:
                    self._waiting = False
                    if len(self._queue) < self._target:  # they did not come: expect fewer next time
                        self._target, self._last_threads = len(self._queue), set()
                n, size = 0, 0
                for req in self._queue:
                    if n and (n >= self._max_items or size + req.size > self._max_bytes):
                        break
                    n, size = n + 1, size + req.size
                batch, self._queue = self._queue[:n], self._queue[n:]
            t0 = time.monotonic()
            self._run(batch)
            self._delay = time.monotonic() - t0
            # Wait next time for the threads seen in the last two batches
            # (with several threads, alternate batches often hold alternate halves).
            threads = {r.thread for r in batch}
            self._target = len(threads | self._last_threads)
            self._last_threads = threads
        finally:
            _to_the_end(self._finish, me, batch)

    def _finish(self, me: _Request[T, R], batch: list[_Request[T, R]]) -> None:
        """End a batch led by ``me``, however it ended. Idempotent (it may run again).

        Items written are handed to their callers; items not written (the
        leader was interrupted) go back first in the queue for the next leader;
        the lead is handed on.
        """
        with self._lock:
            self._waiting = False
            back = [r for r in batch if not r.done and not r.gone and r is not me and r not in self._queue]
            if back:
                self._queue[:0] = back
            for req in batch:
                # Each done caller is woken once (its lock is released once it
                # is held: a run again of this finds it released, or taken back
                # by its caller, who no longer waits on it).
                if req is not me and req.done and req.wakeup.locked():
                    req.wakeup.release()
            if me.lead:
                self._pass_lead(me)

    def _run(self, batch: list[_Request[T, R]]) -> None:
        self.batches += 1  # only the leader counts: one at a time
        try:
            results = self._write([r.item for r in batch])
        except Exception as e:
            if len(batch) == 1 or self._shared_failure(e):
                for req in batch:
                    req.error, req.done = e, True
                if self._shared_failure(e):
                    self._fail_waiting(e)
                return
            for i, req in enumerate(batch):  # one by one: only a bad item fails
                try:
                    req.result = self._write([req.item])[0]
                except Exception as e1:
                    req.error = e1
                    if self._shared_failure(e1):  # not about the items after all (an outage began)
                        for rest in batch[i:]:
                            rest.error, rest.done = e1, True
                        self._fail_waiting(e1)
                        return
                req.done = True
            return
        for req, result in zip(batch, results):
            req.result, req.done = result, True
