"""Scripts for the fork, thread and group-commit tests, run in real subprocesses.

Usage: python _store_procs.py ROLE KIND LOCATION OPTIONS_JSON [ARGS...]
Each role prints one JSON line with what it saw; the test decides.
"""

from __future__ import annotations

import importlib.abc
import json
import os
import signal
import sys
import threading
import time
from typing import Any


def _child(deadline: float, work: Any) -> None:
    """In a forked child: run ``work()`` under a hard deadline, then leave without cleanup."""
    # SIGALRM's default action ends the process: a child that hangs (a lock
    # inherited from the parent) is reported by its exit status.
    signal.signal(signal.SIGALRM, signal.SIG_DFL)
    signal.alarm(max(1, int(deadline)))
    code = 1
    try:
        code = 0 if work() else 2
    except BaseException as e:
        print(f"child {os.getpid()}: {type(e).__name__}: {e}", file=sys.stderr, flush=True)
    finally:
        os._exit(code)


def _wait_all(pids: list[int]) -> list[int | str]:
    """Exit codes of the children (or 'signal N')."""
    out: list[int | str] = []
    for pid in pids:
        _, status = os.waitpid(pid, 0)
        out.append(os.WEXITSTATUS(status) if os.WIFEXITED(status) else f"signal {os.WTERMSIG(status)}")
    return out


def fork_while_saving(kind: str, location: str, options: dict[str, Any], forks: int, deadline: float) -> None:
    """A thread saves without pause (some values in side files) while the main thread forks."""
    import numpy as np

    from _procs import open_store

    store = open_store(kind, location, options)
    stop = threading.Event()
    saved = [0]
    errors: list[str] = []

    def saver() -> None:
        i = 0
        while not stop.is_set():
            try:
                value: Any = np.full(300_000, i, np.int32) if i % 20 == 19 else {"i": i}
                store.put(f"parent/{i:06d}", value)
                saved[0] = i + 1
            except Exception as e:
                errors.append(f"{type(e).__name__}: {e}")
                return
            i += 1

    thread = threading.Thread(target=saver)
    thread.start()
    pids = []
    for n in range(forks):
        # Fork at different points of the saver's work.
        target = saved[0] + 1 + n % 3
        limit = time.monotonic() + 30
        while saved[0] < target and time.monotonic() < limit and thread.is_alive():
            time.sleep(0.0005 * (n % 4))
        pid = os.fork()
        if pid == 0:  # the child: save and read back promptly

            def work(n: int = n) -> bool:
                store.put(f"child/{n:03d}", n)
                hit = store.lookup(f"child/{n:03d}")
                return hit is not None and hit.value == n and store.lookup("parent/000000") is not None

            _child(deadline, work)
        pids.append(pid)
    codes = _wait_all(pids)
    stop.set()
    thread.join()
    store.close()
    print(json.dumps({"codes": codes, "saved": saved[0], "errors": errors}), flush=True)


class _SlowImport(importlib.abc.MetaPathFinder):
    """Holds any thread but the main one inside ``import cloudpickle`` until released.

    It stands for a slow first import (a cold file system): the importing
    thread holds cloudpickle's module lock meanwhile.
    """

    def __init__(self) -> None:
        self.entered = threading.Event()
        self.release = threading.Event()

    def find_spec(self, name: str, path: Any, target: Any = None) -> None:
        if name == "cloudpickle" and threading.current_thread() is not threading.main_thread():
            self.entered.set()
            self.release.wait(60)
        return None  # the normal finders do the import


def fork_during_import(kind: str, location: str, options: dict[str, Any], deadline: float) -> None:
    """Fork while another thread is (or would be) in its first save's imports."""
    slow = _SlowImport()
    sys.meta_path.insert(0, slow)
    from _procs import open_store

    store = open_store(kind, location, options)
    first = threading.Event()

    def saver() -> None:
        store.put("parent/first", 1)
        first.set()

    thread = threading.Thread(target=saver)
    thread.start()
    # Either the saver is stuck in the import (the old lazy import) or it has saved.
    limit = time.monotonic() + 30
    while not (slow.entered.is_set() or first.is_set()) and time.monotonic() < limit:
        time.sleep(0.001)
    in_import = slow.entered.is_set()
    pid = os.fork()
    if pid == 0:
        _child(deadline, lambda: store.put("child/0", 0) is not None and store.lookup("child/0") is not None)
    slow.release.set()
    codes = _wait_all([pid])
    thread.join()
    store.close()
    print(json.dumps({"codes": codes, "in_import": in_import}), flush=True)


def thread_churn(kind: str, location: str, options: dict[str, Any], iterations: int, nofile: int) -> None:
    """A fresh 2-thread pool per iteration, as in a loop of checkpointed calls."""
    import resource
    from concurrent.futures import ThreadPoolExecutor

    from _procs import open_store

    resource.setrlimit(resource.RLIMIT_NOFILE, (nofile, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))
    store = open_store(kind, location, options)
    store.put("seed", 0)

    def call(i: int) -> bool:
        if i % 50 == 0:
            store.put(f"k/{i:06d}", i)
        return store.lookup("seed") is not None

    def fds() -> int:
        return len(os.listdir("/proc/self/fd"))

    counts = []
    error = ""
    try:
        for it in range(iterations):
            with ThreadPoolExecutor(2) as pool:
                if not all(pool.map(call, (2 * it, 2 * it + 1))):
                    raise RuntimeError("a lookup missed")
            if it in (100, iterations - 1):
                counts.append(fds())
    except Exception as e:
        error = f"{type(e).__name__}: {e}"
    n = len(store.keys("k/"))
    store.close()
    print(json.dumps({"fds": counts, "error": error, "saved": n, "after_close": fds()}), flush=True)


def thread_writer(kind: str, location: str, options: dict[str, Any], tag: str, threads: int) -> None:
    """Threads saving distinct keys at once (group commit at work); 'ack KEY' once put returned."""
    from _procs import open_store

    store = open_store(kind, location, options)
    lock = threading.Lock()

    def work(t: int) -> None:
        for i in range(100_000):
            key = f"{tag}/t{t}/k{i:05d}"
            store.put(key, {"key": key, "pad": "x" * (i % 300)})
            with lock:
                sys.stdout.write(f"ack {key}\n")
                sys.stdout.flush()

    for t in range(threads):
        threading.Thread(target=work, args=(t,), daemon=True).start()
    time.sleep(3600)


def main() -> None:
    here = os.path.dirname(os.path.abspath(__file__))
    if here not in sys.path:
        sys.path.insert(0, here)
    role, kind, location, options_json, *args = sys.argv[1:]
    options = json.loads(options_json)
    if role == "fork-while-saving":
        fork_while_saving(kind, location, options, int(args[0]), float(args[1]))
    elif role == "fork-during-import":
        fork_during_import(kind, location, options, float(args[0]))
    elif role == "churn":
        thread_churn(kind, location, options, int(args[0]), int(args[1]))
    elif role == "thread-writer":
        thread_writer(kind, location, options, args[0], int(args[1]))
    else:
        raise SystemExit(f"unknown role {role}")


if __name__ == "__main__":
    main()
