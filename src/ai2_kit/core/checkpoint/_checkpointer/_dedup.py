"""Same-key dedup: in-process flights, claim attempts, leases and the heartbeat that renews them.

Callers of one key in one process share one computation (``_Flight``); across
processes the claim is a store lease (``Lease``) renewed by one heartbeat
thread per process. Every call that started on a checkpointer ends through
``_end_call``: claim, flight, then the in-flight count, in that order.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import math
import os
import secrets
import threading
import time
from typing import TYPE_CHECKING, Any, Optional

from .._forking import at_fork
from ..stores._fs import HOST
from ._async import _submit

if TYPE_CHECKING:
    from ._policy import Checkpointer

__all__ = [
    "Lease",
    "_Flight",
    "_Waiter",
    "_drop_claim_of",
    "_end_call",
    "_fresh",
    "_join_flight",
    "_log_wait",
    "_save_and_end",
]

logger = logging.getLogger("ai2_kit.core.checkpoint")

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


def _join_flight(scope: Any, fn: Any, awaitable: bool, owned: Optional[list[_Flight]]) -> tuple[_Flight, bool]:
    """(flight, True) when this caller computes ``scope``'s key; (flight, False) to wait for it.

    ``owned``: a new flight of this caller is also appended to it, under
    the lock, so that an interrupt arriving before the caller has stored
    the answer still finds the flight to end (else its waiters wait for ever).
    """
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


def _after_fork_in_child() -> None:
    global _heartbeat, _flights
    # The heartbeat's thread is gone in the child, and the flights are the
    # parent's threads' computations, which do not exist here.
    _heartbeat = _Heartbeat()
    _flights = _Flights()


at_fork(after_in_child=_after_fork_in_child)
