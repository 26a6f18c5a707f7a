"""Runs: what each process did with a store (steps run, hits, time saved), recorded in batches.

A run is one process working with one store. Its record names the process
(host, pid, user, command line with its secrets masked, Python) and counts what happened; each entry
the process saves names its run (``meta["run"]``), so ``runs`` and the report
can say which run computed what and how much time the hits saved.

The counters are bumped on the hot path (a lock and a few additions) and
written by a background thread every ``FLUSH_EVERY`` seconds when they
changed, and once more at exit: a hit never waits for the store, and the
exit waits for the last write at most ``EXIT_BOUND`` seconds (a record is a
report, written best effort: one WARNING when it could not be written).
"""

from __future__ import annotations

import atexit
import collections
import getpass
import logging
import os
import platform
import re
import secrets
import sys
import threading
import time
import weakref
from typing import TYPE_CHECKING, Any, Optional, Sequence

from ._errors import StoreRemovedError
from ._forking import at_fork
from .stores._fs import HOST

if TYPE_CHECKING:
    from .stores import Store

__all__ = ["RunRecorder", "new_run_id", "FLUSH_EVERY", "MAX_STALE_KEYS", "mask_argv", "recorded_argv", "ARGV_ENV"]

logger = logging.getLogger(__name__)

#: Seconds between two writes of a run's counters while they change.
FLUSH_EVERY = 5.0
#: Stale keys remembered per run (the report lists them).
MAX_STALE_KEYS = 1000
#: The longest the exit of a process waits for its last run records to be written.
EXIT_BOUND = 1.0


def new_run_id(now: float | None = None) -> str:
    """A run id that sorts by start time and is unique across hosts: ``20261127T081431-host-1234-a1b2``."""
    stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime(time.time() if now is None else now))
    return f"{stamp}-{HOST}-{os.getpid()}-{secrets.token_hex(2)}"


#: Set to ``off`` (or ``0``, ``no``, ``false``) to record no command line in
#: run records at all; any other value, or none, records it with secrets masked.
ARGV_ENV = "AI2_KIT_CHECKPOINT_ARGV"
MASK = "***"
#: An option or NAME=VALUE name that holds a secret: it says password,
#: secret, token or credential anywhere, or key as a word of its own
#: (``--signing-key``, ``API_KEY``, ``--apikey``; not ``--monkey``).
_SECRET_NAME = re.compile(
    r"pass(word|wd)?($|[-_.])|passw|pwd|secret|token|credential|(^|[-_.]|api|priv)keys?($|[-_.])", re.I)
#: The password of a URL: ``scheme://user:PASSWORD@host``, up to the last
#: '@' of the word (a password may hold '@' or '/' unencoded; masking a
#: little more than the password is the safe side).
_URL_PASSWORD = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*://[^/?#@:\s]*:)\S*@")
#: ``NAME=VALUE`` as the environment spells it (``PGPASSWORD=...``).
_ENV_STYLE = re.compile(r"([A-Za-z_][A-Za-z0-9_.-]*)=")
#: ``name=value`` inside a word: libpq's ``"host=h password=pw"``, a URL's
#: ``?sslpassword=pw&...``.
_INLINE = re.compile(r"(?<![^\s;&?,])([A-Za-z_][A-Za-z0-9_.-]*)=([^\s;&,]+)")


def _secret_name(name: str) -> bool:
    return _SECRET_NAME.search(name) is not None


def mask_argv(argv: Sequence[object]) -> list[str]:
    """``argv`` with its secrets replaced by ``***``, as run records keep it.

    Masked: the password of every URL (``postgresql://me:***@host/db``);
    the value of an option whose name says password, secret, token,
    credential or key, as ``--signing-key=***`` and as ``--signing-key ***``
    (the next argument); and the value of ``NAME=VALUE`` arguments with such
    names (``AWS_SECRET_ACCESS_KEY=***``), also inside a word (a libpq
    ``"host=db password=***"``, a URL's ``?sslpassword=***``). The program
    and everything else stay as they were.

    >>> mask_argv(["wf.py", "postgresql://me:pw@db/x", "--api-token", "t0k", "--signing-key=k", "PGPASSWORD=p"])
    ['wf.py', 'postgresql://me:***@db/x', '--api-token', '***', '--signing-key=***', 'PGPASSWORD=***']
    """
    out: list[str] = []
    hide_next = False
    for arg in map(str, argv):
        if hide_next:
            hide_next = False
            if not arg.startswith("--"):
                out.append(MASK)
                continue
        arg = _URL_PASSWORD.sub(lambda m: m.group(1) + MASK + "@", arg)
        if arg.startswith("-") and len(arg) > 2:
            name, eq, _ = arg.partition("=")
            if _secret_name(name.lstrip("-")):
                if eq:
                    arg = name + "=" + MASK
                else:
                    hide_next = True
        else:
            m = _ENV_STYLE.match(arg)
            if m and _secret_name(m.group(1)):
                arg = m.group(1) + "=" + MASK
        arg = _INLINE.sub(lambda m: m.group(1) + "=" + MASK if _secret_name(m.group(1)) else m.group(0), arg)
        out.append(arg)
    return out


def recorded_argv() -> list[str] | None:
    """This process's command line as a run record keeps it: masked, or None when ``ARGV_ENV`` is off."""
    if os.environ.get(ARGV_ENV, "").strip().lower() in ("off", "0", "no", "false"):
        return None
    return mask_argv(sys.argv)


def _user() -> str:
    try:
        return getpass.getuser()
    except Exception:  # no name for this uid (containers): the number will do
        return str(os.getuid()) if hasattr(os, "getuid") else "?"


class RunRecorder:
    """This process's run on one store.

    ``ran``, ``hit``, ``stale`` and ``save_failed`` only append an event to a
    deque (atomic, no lock: a hit pays one append); ``flush`` folds the
    events into the record and writes it (``Store.put_run``). The shared
    flusher thread flushes every live recorder with new events every
    ``FLUSH_EVERY`` seconds, and at exit. Failing to write a run record never
    fails a step: it is logged at DEBUG and the next flush writes it again.
    """

    def __init__(self, store: Store) -> None:
        now = time.time()
        self.store = store
        self.pid = os.getpid()
        self.id = new_run_id(now)
        self._events: collections.deque[tuple[str, Any]] = collections.deque()
        self._lock = threading.Lock()  # one flush at a time
        self._unwritten = True  # the record itself was never written
        self._store_gone = False  # the store was removed: nothing more is written
        self._warned = False  # said once that the record could not be written
        self.record: dict[str, Any] = {
            "id": self.id,
            "host": HOST,
            "pid": self.pid,
            "user": _user(),
            "argv": recorded_argv(),
            "python": platform.python_version(),
            "started": now,
            "last": now,
            "steps_run": 0,
            "hits": 0,
            "stale": 0,
            "reruns": 0,
            "save_failures": 0,
            "run_seconds": 0.0,
            "saved_seconds": 0.0,
            "stale_keys": [],
        }
        _flusher.add(self)

    # -- counting (hot path: one append, no I/O, no lock) --------------------------------
    def ran(self, duration: float) -> None:
        """A step ran and its result was saved."""
        self._events.append(("ran", duration))

    def hit(self, original_duration: object) -> None:
        """A saved result was returned; ``original_duration`` is what the step took when it ran."""
        self._events.append(("hit", original_duration))

    def stale(self, key: str, rerun: bool) -> None:
        """A hit was found stale (and, with ``rerun``, its step runs again)."""
        self._events.append(("stale", (key, rerun)))

    def save_failed(self) -> None:
        self._events.append(("failed", None))

    # -- writing --------------------------------------------------------------------
    def _fold(self) -> bool:
        """Fold the queued events into the record; True when there were any."""
        rec, events, n = self.record, self._events, 0
        while events:
            what, data = events.popleft()
            n += 1
            if what == "hit":
                rec["hits"] += 1
                if isinstance(data, (int, float)) and not isinstance(data, bool):
                    rec["saved_seconds"] += float(data)
            elif what == "ran":
                rec["steps_run"] += 1
                rec["run_seconds"] += float(data or 0.0)
            elif what == "stale":
                key, rerun = data
                rec["stale"] += 1
                rec["reruns"] += bool(rerun)
                if len(rec["stale_keys"]) < MAX_STALE_KEYS and key not in rec["stale_keys"]:
                    rec["stale_keys"].append(key)
            else:
                rec["save_failures"] += 1
        return n > 0

    def flush(self, final: bool = False) -> None:
        """Write the record if something happened since the last write.

        ``final``: the last write (at exit, or as the store closes): a failure
        is a WARNING, since no later flush will write it again.
        """
        if os.getpid() != self.pid:
            return  # a forked child's copy: the parent writes this run
        with self._lock:
            if not (self._fold() or self._unwritten) or self._untouched():
                return
            self.record["last"] = time.time()
            record = dict(self.record, stale_keys=list(self.record["stale_keys"]))
            try:
                if not self.store.closed and not self._store_gone:
                    self.store.put_run(record)
                    self._unwritten = False
            except StoreRemovedError as e:
                # Said once; later flushes skip it: writing would re-create the store.
                self._store_gone = True
                logger.warning("run %s not recorded: %s", self.id, e)
            except Exception as e:  # a run record is a report, never worth failing a step for
                if final:
                    self.warn_unwritten(f"{type(e).__name__}: {e}")
                else:  # the next flush writes it again
                    logger.debug("could not write run %s to %s: %s", self.id, self.store.location, e)

    def warn_unwritten(self, why: str) -> None:
        """The one WARNING for a run whose record could not be written."""
        if not self._warned:
            self._warned = True
            logger.warning("The run record %s could not be written to %s (%s); the results are saved, "
                           "only this run's counts are missing from 'runs' and the report",
                           self.id, self.store.location, why)

    def _untouched(self) -> bool:
        """A run that neither saved nor hit anything is not worth a record."""
        r = self.record
        return not (r["steps_run"] or r["hits"] or r["stale"] or r["save_failures"])


class _Flusher:
    """One daemon thread per process that writes the runs that have new events."""

    def __init__(self) -> None:
        self._live: weakref.WeakSet[RunRecorder] = weakref.WeakSet()
        self._lock = threading.Lock()
        self._thread: Optional[threading.Thread] = None
        #: Set to have the thread flush now (at exit), instead of at its next period.
        self._wake = threading.Event()
        self._final = False
        self._final_done = threading.Event()

    def add(self, recorder: RunRecorder) -> None:
        with self._lock:
            self._live.add(recorder)
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._loop, name="ai2-kit-runs", daemon=True)
                self._thread.start()

    def _loop(self) -> None:
        while True:
            # A timer (flushing is periodic by design), cut short by the exit's request.
            self._wake.wait(FLUSH_EVERY)
            # Cleared before the request is read: an exit's request that lands
            # between the two is then either seen now or wakes the next wait,
            # never erased unseen (the exit would wait its whole bound).
            self._wake.clear()
            final = self._final
            try:
                self.flush_all(final)
            except Exception as e:  # a report's trouble must not end the thread that writes the others
                logger.debug("flushing run records failed: %s", e)
            finally:
                if final:
                    self._final_done.set()

    def flush_all(self, final: bool = False) -> None:
        with self._lock:
            live = list(self._live)
        for recorder in live:
            if recorder._events or recorder._unwritten:
                recorder.flush(final)

    def flush_at_exit(self) -> None:
        """The last flush, waited for at most ``EXIT_BOUND`` seconds.

        Done by the flusher's own thread (none can be started this late on
        every Python), which the exit waits for a bounded time: a store that
        is busy (another process holds its write lock), unreachable or slow
        must not hold the exit of a workflow whose results are all saved;
        what is not written by then is left out, with a WARNING.
        """
        with self._lock:
            pending = [r for r in self._live if (r._events or r._unwritten) and r.pid == os.getpid()]
            thread = self._thread
        if not pending:
            return
        if thread is None or not thread.is_alive():
            self.flush_all(True)  # (no thread to wait for: each store's own bounds apply)
            return
        self._final = True
        self._wake.set()
        if not self._final_done.wait(EXIT_BOUND):
            for recorder in pending:
                if recorder._events or (recorder._unwritten and not recorder._untouched()):
                    recorder.warn_unwritten(f"not written within {EXIT_BOUND:g} s of the exit")

    def after_fork(self) -> None:
        # The child has none of the parent's threads; its runs are its own.
        self._live = weakref.WeakSet()
        self._lock = threading.Lock()
        self._thread = None
        self._wake = threading.Event()
        self._final = False
        self._final_done = threading.Event()


_flusher = _Flusher()
atexit.register(_flusher.flush_at_exit)
at_fork(after_in_child=_flusher.after_fork)
