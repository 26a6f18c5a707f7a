"""Run inside a private network namespace (``unshare -n``): a PostgreSQL server
of its own on loopback, a client store, and nftables rules that cut the
connection the way a dead switch or a NAT timeout does.

Usage: python _netns_pg.py BINDIR WORKDIR TIMEOUT DEADLINE
Prints one JSON line with what each phase saw; exits 0 unless the harness
itself broke. tests/test_pg_partition.py starts it and judges the result.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
import traceback
from typing import Any, Callable

PORT = 5432


def sh(*cmd: str, user: str | None = None) -> None:
    if user is not None:
        cmd = ("runuser", "-u", user, "--", *cmd)
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, timeout=120)


def start_server(bindir: str, work: str) -> None:
    data = os.path.join(work, "data")
    sh(os.path.join(bindir, "initdb"), "-D", data, "-U", "postgres", "--auth=trust", "-E", "UTF8",
       "--locale=C", "--no-sync", user="postgres")
    sh(os.path.join(bindir, "pg_ctl"), "start", "-D", data, "-l", os.path.join(work, "server.log"), "-w",
       "-t", "60", "-o", f"-p {PORT} -c listen_addresses=127.0.0.1 -c unix_socket_directories='' -c fsync=off",
       user="postgres")


def stop_server(bindir: str, work: str) -> None:
    sh(os.path.join(bindir, "pg_ctl"), "stop", "-D", os.path.join(work, "data"), "-m", "immediate", "-w",
       user="postgres")


def cut(*rules: str) -> None:
    """Drop the packets matching each rule (on the way out of either side)."""
    sh("nft", "add", "table", "inet", "cut")
    sh("nft", "add", "chain", "inet", "cut", "out", "{ type filter hook output priority 0; }")
    for rule in rules:
        sh("nft", "add", "rule", "inet", "cut", "out", *rule.split(), "drop")


def heal() -> None:
    sh("nft", "delete", "table", "inet", "cut")


class Worker:
    """A thread that keeps its own connection to the store and runs calls on request."""

    def __init__(self) -> None:
        self.jobs: list[Callable[[], Any]] = []
        self.ready = threading.Semaphore(0)
        self.outcome: dict[str, Any] = {}
        self.done = threading.Event()
        threading.Thread(target=self._loop, daemon=True).start()

    def _loop(self) -> None:
        while True:
            self.ready.acquire()
            job = self.jobs.pop(0)
            started = time.monotonic()
            try:
                self.outcome = {"result": repr(job())}
            except Exception as e:
                self.outcome = {"error": type(e).__name__, "message": str(e),
                                "cause": type(e.__cause__).__name__ if e.__cause__ else None}
            self.outcome["seconds"] = round(time.monotonic() - started, 2)
            self.done.set()

    def start(self, job: Callable[[], Any]) -> None:
        self.done.clear()
        self.jobs.append(job)
        self.ready.release()

    def call(self, job: Callable[[], Any], deadline: float) -> dict[str, Any]:
        """Run ``job`` on this thread; the outcome, or ``{"hung": True}`` past the deadline."""
        self.start(job)
        return self.wait(deadline)

    def wait(self, deadline: float) -> dict[str, Any]:
        if not self.done.wait(deadline):
            return {"hung": True, "deadline": deadline}
        return dict(self.outcome)


def main() -> int:
    bindir, work, timeout, deadline = sys.argv[1], sys.argv[2], float(sys.argv[3]), float(sys.argv[4])
    sh("ip", "link", "set", "lo", "up")
    start_server(bindir, work)
    report: dict[str, Any] = {}
    try:
        from ai2_kit.core.checkpoint.stores._postgres import PostgresStore

        url = f"postgresql://postgres:sekret@127.0.0.1:{PORT}/postgres?schema=cut"
        store = PostgresStore(url, timeout=timeout)
        hitter, saver = Worker(), Worker()
        # Each thread holds a connection before the cut.
        report["warm"] = [saver.call(lambda: store.put("kept", "acknowledged"), deadline),
                          hitter.call(lambda: store.lookup("kept") is not None, deadline)]

        # 1. The server's replies are dropped: the requests arrive, the answers never do.
        cut(f"tcp sport {PORT}")
        # Together: a connection left idle through a cut is ended by its
        # keepalives, and the next call would find it gone before sending.
        hitter.start(lambda: store.lookup("kept"))
        saver.start(lambda: store.put("half", "half-open value"))
        report["hit_half_open"] = hitter.wait(deadline)
        report["save_half_open"] = saver.wait(deadline)
        heal()
        report["save_after_heal_1"] = saver.call(lambda: store.put("after1", 1), deadline)
        hitter.call(lambda: store.lookup("kept"), deadline)  # reconnected: holds a connection again

        # 2. Both directions dropped: the save never reaches the server.
        cut(f"tcp sport {PORT}", f"tcp dport {PORT}")
        saver.start(lambda: store.put("full", "fully cut value"))
        hitter.start(lambda: store.lookup("kept"))
        report["save_full_cut"] = saver.wait(deadline)
        report["hit_full_cut"] = hitter.wait(deadline)
        heal()
        # Another host saves the same key before this one re-sends its cut-off
        # save (on its next call): the newer value must stay.
        other = PostgresStore(url, timeout=timeout)
        other.put("full", "newer, from another host")
        other.close()
        report["save_after_heal_2"] = saver.call(lambda: store.put("after2", 2), deadline)
        report["hit_after_heal"] = hitter.call(lambda: store.lookup("after2") is not None, deadline)

        # 3. A request received and acknowledged, then silence: the save waits
        # on a row lock held by another session when the replies stop.
        import psycopg

        locker = psycopg.connect(f"postgresql://postgres@127.0.0.1:{PORT}/postgres")
        locker.execute("SELECT 1 FROM cut.entries WHERE key = 'kept' FOR UPDATE")
        saver.start(lambda: store.put("kept", "saved behind a lock"))
        waiting = 0
        until = time.monotonic() + deadline
        while not waiting and time.monotonic() < until and not saver.done.is_set():
            waiting = locker.execute("SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock'"
                                     ).fetchone()[0]
        cut(f"tcp sport {PORT}")
        report["save_behind_lock"] = dict(saver.wait(deadline), waiting=waiting)
        heal()
        locker.rollback()
        locker.close()
        report["save_after_heal_3"] = saver.call(lambda: store.put("after3", 3), deadline)

        fresh = PostgresStore(url, timeout=timeout)
        report["final"] = {key: (hit.value if (hit := fresh.lookup(key)) is not None else None)
                           for key in ("kept", "half", "after1", "full", "after2", "after3")}
        fresh.close()
        store.close()
    except Exception:
        report["harness_error"] = traceback.format_exc()
    finally:
        try:
            heal()
        except subprocess.CalledProcessError:
            pass  # no rule left in place: nothing to remove
        stop_server(bindir, work)
    print(json.dumps(report), flush=True)
    return 0


if __name__ == "__main__":
    # os._exit: a call still hung on a dead socket must not keep the process alive.
    code = main()
    sys.stdout.flush()
    os._exit(code)
