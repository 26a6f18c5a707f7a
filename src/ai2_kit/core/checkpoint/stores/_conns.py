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
from typing import Any, Callable, Generic, Iterator, Optional, TypeVar

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
        begin, ``ForkGate.close_for_fork``): about 0.5 us less per hit. Only
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


if hasattr(os, "register_at_fork"):
    os.register_at_fork(before=_before_fork, after_in_parent=_after_fork_in_parent,
                        after_in_child=_after_fork_in_child)


class _Request(Generic[T, R]):
    __slots__ = ("item", "size", "thread", "wakeup", "lead", "done", "result", "error")

    def __init__(self, item: T, size: int) -> None:
        self.item = item
        self.size = size
        self.thread = threading.get_ident()
        # A bare lock, taken now and released once to wake the caller: much
        # cheaper than an Event, which matters at thousands of saves a second.
        self.wakeup = threading.Lock()
        self.wakeup.acquire()
        self.lead = False
        self.done = False
        self.result: R | None = None
        self.error: BaseException | None = None


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
    items, like a lock timeout), so a bad item fails alone.
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
        self._enough = threading.Condition(self._lock)
        self._queue: list[_Request[T, R]] = []
        self._busy = False
        self._waiting = False
        self._target = 1  # how many items a leader waits for
        self._last_threads: set[int] = set()
        self._delay = 0.0  # how long the last commit took

    def submit(self, item: T, size: int = 0) -> R:
        """Write ``item`` (with others that arrive together); returns its result once committed."""
        with self._lock:
            # Nobody writing, nobody queued, and the last batches came from one
            # thread: write at once, without a request to queue and hand over
            # (a sequential workflow's every save). Others arriving meanwhile
            # queue up as usual and are handed the lead afterwards.
            alone = not self._busy and not self._queue and self._target <= 1
            if alone:
                self._busy = True
        if alone:
            return self._write_alone(item)
        me: _Request[T, R] = _Request(item, size)
        with self._lock:
            self._queue.append(me)
            if not self._busy:
                self._busy = me.lead = True
            elif self._waiting and len(self._queue) >= self._target:
                self._enough.notify()
        if not me.lead:
            try:
                me.wakeup.acquire()
            except BaseException:
                self._abandon(me)
                raise
        if not me.done:  # leading: our item is first in the queue
            self._lead(me)
        if me.error is not None:
            raise me.error
        return me.result  # type: ignore[return-value]

    def _write_alone(self, item: T) -> R:
        """``_lead`` for a batch of one caller's one item, written directly."""
        try:
            t0 = time.monotonic()
            self.batches += 1
            result = self._write_one(item)
            self._delay = time.monotonic() - t0
            me, last = threading.get_ident(), self._last_threads
            if len(last) != 1 or me not in last:  # else: the same thread as last time, nothing changes
                self._target = len(last | {me})
                self._last_threads = {me}
            return result
        finally:
            with self._lock:
                nxt = self._next_leader()
            if nxt is not None:
                nxt.wakeup.release()

    def _abandon(self, me: _Request[T, R]) -> None:
        """A waiting caller was interrupted: withdraw its item, never strand the queue."""
        with self._lock:
            if me in self._queue:
                self._queue.remove(me)
            if not (me.lead and not me.done):
                return  # not our turn to lead: a leader is (or will be) at work
            nxt = self._next_leader()
        if nxt is not None:
            nxt.wakeup.release()

    def _next_leader(self) -> Optional[_Request[T, R]]:
        """With the lock held: hand the lead to the first waiting request (to wake), or go idle."""
        nxt = self._queue[0] if self._queue else None
        if nxt is None:
            self._busy = False
        else:
            nxt.lead = True
        return nxt

    def _take(self) -> list[_Request[T, R]]:
        with self._lock:
            if self._target > 1 and len(self._queue) < self._target and self._delay > 0:
                self._waiting = True
                try:
                    self._enough.wait(min(self._delay, self.MAX_DELAY))
                finally:
                    self._waiting = False
                if len(self._queue) < self._target:  # they did not come: expect fewer next time
                    self._target, self._last_threads = len(self._queue), set()
            n, size = 0, 0
            for req in self._queue:
                if n and (n >= self._max_items or size + req.size > self._max_bytes):
                    break
                n, size = n + 1, size + req.size
            batch, self._queue = self._queue[:n], self._queue[n:]
        return batch

    def _lead(self, me: _Request[T, R]) -> None:
        batch = self._take()
        try:
            t0 = time.monotonic()
            self._run(batch)
            self._delay = time.monotonic() - t0
            # Wait next time for the threads seen in the last two batches
            # (with several threads, alternate batches often hold alternate halves).
            threads = {r.thread for r in batch}
            self._target = len(threads | self._last_threads)
            self._last_threads = threads
        except BaseException as e:  # interrupted (KeyboardInterrupt...): not the others' fault
            me.error, me.done = e, True
            with self._lock:  # the others' items go back first in the queue, for the next leader
                self._queue[:0] = [r for r in batch if not r.done]
        finally:
            for req in batch:
                if req is not me and req.done:
                    req.wakeup.release()
            with self._lock:
                nxt = self._next_leader()
            if nxt is not None:
                nxt.wakeup.release()

    def _run(self, batch: list[_Request[T, R]]) -> None:
        self.batches += 1  # only the leader counts: one at a time
        try:
            results = self._write([r.item for r in batch])
        except Exception as e:
            if len(batch) == 1 or self._shared_failure(e):
                for req in batch:
                    req.error, req.done = e, True
                return
            for req in batch:  # one by one: only a bad item fails
                try:
                    req.result = self._write([req.item])[0]
                except Exception as e1:
                    req.error = e1
                req.done = True
            return
        for req, result in zip(batch, results):
            req.result, req.done = result, True
