"""Writers run in subprocesses by the power-cut tests (tests/test_powercut.py).

Usage: python _powercut_procs.py ROLE KIND LOCATION CONTROL [ARGS...]

KIND is sqlite, directory or legacy (a reference 2023 file, migrated by the
first write). CONTROL is "none" for the store as shipped, or a deliberately
broken store that the power-cut harness must catch:

- ``sync-off``: SQLite with ``synchronous=OFF`` (no fsync at all);
- ``no-dir-fsync``: no folder fsync in ``put`` (the directory store);
- ``no-file-fsync``: no file fsync in ``put`` (entry files; SQLite's side files);
- ``unsynced-claims``: SQLite whose claims, lease renewals and run records
  commit with ``synchronous=OFF`` (what the store did before issue 21).

Role ``crowd`` (``TAG PROC THREADS``): THREADS threads of this process save
at once (group commit), every step claimed first (``dedup=True``), some steps
long enough for the heartbeat to renew their lease, a few keys shared by
every writer of every process (contended claims), all in a few folders that
whichever writer comes first creates, and the run recorder flushing all the
while. Prints ``ack KEY`` once a call returned; the value is
``crowd_value(KEY)``.
"""

from __future__ import annotations

import os
import stat
import sys
import threading
import time
from typing import Any

import numpy as np

from _procs import value_for
from ai2_kit.core.checkpoint import Checkpointer
from ai2_kit.core.checkpoint.stores import DirectoryStore, SQLiteStore, Store, open_store


class NoSyncSQLiteStore(SQLiteStore):
    """A control: commits reach the kernel but never the disk."""

    def _connect(self):  # type: ignore[no-untyped-def]
        conn = super()._connect()
        conn.execute("PRAGMA synchronous=OFF")
        return conn


class UnsyncedClaimsSQLiteStore(SQLiteStore):
    """A control: entries synced, but claims, renewals and run records committed unsynced.

    In WAL mode such a commit that crosses the auto-checkpoint threshold
    copies the WAL into the database without syncing either, and the next
    synced save restarts the WAL over pages the database does not hold.
    """

    def _unsynced(self, op: Any, *args: Any) -> Any:
        with self._session() as conn:
            conn.execute("PRAGMA synchronous=OFF")
            try:
                return op(*args)
            finally:
                conn.execute("PRAGMA synchronous=EXTRA")

    def _try_claim(self, key, owner, ttl):  # type: ignore[no-untyped-def]
        return self._unsynced(super()._try_claim, key, owner, ttl)

    def _renew_claim(self, key, owner, ttl):  # type: ignore[no-untyped-def]
        return self._unsynced(super()._renew_claim, key, owner, ttl)

    def _release_claim(self, key, owner):  # type: ignore[no-untyped-def]
        return self._unsynced(super()._release_claim, key, owner)

    def _put_run(self, run_id, record):  # type: ignore[no-untyped-def]
        return self._unsynced(super()._put_run, run_id, record)


#: Crowd values: every 10th a side file (SQLite), every 3rd 300 KB inline
#: (the WAL reaches SQLite's auto-checkpoint threshold within a trial), the
#: rest 6 KB.
CROWD_BIG = 1_200_000


def crowd_value(key: str) -> Any:
    i = int(key[-5:])
    if i % 10 == 9:
        return np.full(CROWD_BIG // 4, i, dtype=np.int32)
    return {"key": key, "pad": ("y" if i % 3 == 0 else "x") * (300_000 if i % 3 == 0 else 6_000)}


def crowd_key(tag: str, proc: int, thread: int, i: int) -> str:
    if i % 7 == 3:
        return f"{tag}/shared/s{i:05d}"  # every writer of every process: one computes, the rest hit
    return f"{tag}/g{i % 3}/p{proc}t{thread}-{i:05d}"


def crowd(ckpt: Checkpointer, tag: str, proc: int, threads: int) -> None:
    from ai2_kit.core.checkpoint import _runs

    _runs.FLUSH_EVERY = 0.05  # run records written all the time, not every 5 s
    out = threading.Lock()

    def step(key: str) -> Any:
        if int(key[-5:]) % 8 == 5:
            time.sleep(ckpt.lease * 0.7)  # the heartbeat renews the lease meanwhile
        return crowd_value(key)

    def work(t: int) -> None:
        for i in range(100_000):
            key = crowd_key(tag, proc, t, i)
            ckpt(key)(step)(key)
            with out:
                sys.stdout.write(f"ack {key}\n")
                sys.stdout.flush()

    workers = [threading.Thread(target=work, args=(t,), daemon=True) for t in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()


def without_fsync(of: str, base: type[Store]) -> type[Store]:
    """A control: ``base`` whose ``_put`` skips every fsync of a folder (``of="dir"``) or of a file.

    The filter sits on ``os.fsync`` itself, whichever helper calls it, so the
    control keeps working when the store's code moves. SQLite's own commits
    are not Python calls: for the SQLite store this removes the side files'
    fsyncs only.
    """

    class Control(base):  # type: ignore[valid-type,misc]
        def _put(self, key, meta, encoded):  # type: ignore[no-untyped-def]
            real_fsync = os.fsync

            def some_fsyncs(fd: int) -> None:
                if stat.S_ISDIR(os.fstat(fd).st_mode) != (of == "dir"):
                    real_fsync(fd)

            os.fsync = some_fsyncs
            try:
                super()._put(key, meta, encoded)
            finally:
                os.fsync = real_fsync

    return Control


def open_kind(kind: str, location: str, control: str) -> Store:
    if control == "sync-off":
        return NoSyncSQLiteStore(location)
    if control == "unsynced-claims":
        return UnsyncedClaimsSQLiteStore(location)
    base = SQLiteStore if kind == "sqlite" else DirectoryStore
    if control == "no-dir-fsync":
        return without_fsync("dir", base)(location)
    if control == "no-file-fsync":
        return without_fsync("file", base)(location)
    if kind == "sqlite":
        return SQLiteStore(location)
    if kind == "directory":
        return DirectoryStore(location)
    return open_store(location)  # legacy: a reference file, migrated by the first put


def main() -> None:
    role, kind, location, control = sys.argv[1:5]
    args = sys.argv[5:]
    lease = float(os.environ.get("AI2_KIT_TEST_LEASE", "60"))
    ckpt = Checkpointer(store=open_kind(kind, location, control), dedup=role in ("claimer", "crowd"), lease=lease)
    print("ready", flush=True)
    if role == "writer":
        tag, big_every, count = args[0], int(args[1]), int(args[2])
        for i in range(count or 100_000):
            ckpt(f"{tag}/k{i:05d}")(value_for)(tag, i, big_every)
            print(f"ack {i}", flush=True)
        # A workflow busy with its next step: the power goes while nothing is written.
        print("idle", flush=True)
        time.sleep(600)
    elif role == "claimer":
        # Holds the claim on one key (heartbeat running) until killed. The
        # save inside syncs the store, and with it (SQLite) the claim's row,
        # so that the claim outlives the power cut and has to expire.
        def slow() -> str:
            ckpt.save(args[0] + "-inside", "saved while holding the claim")
            print("running", flush=True)
            time.sleep(600)
            return "never"

        ckpt(args[0])(slow)()
    elif role == "crowd":
        crowd(ckpt, args[0], int(args[1]), int(args[2]))
    else:
        raise SystemExit(f"unknown role {role}")


if __name__ == "__main__":
    main()
