"""Writers run in subprocesses by the power-cut tests (tests/test_powercut.py).

Usage: python _powercut_procs.py ROLE KIND LOCATION CONTROL [ARGS...]

KIND is sqlite, directory or legacy (a reference 2023 file, migrated by the
first write). CONTROL is "none" for the store as shipped, or a deliberately
broken store that the power-cut harness must catch:

- ``sync-off``: SQLite with ``synchronous=OFF`` (no fsync at all);
- ``no-dir-fsync``: no folder fsync in ``put`` (the directory store);
- ``no-file-fsync``: no file fsync in ``put`` (entry files; SQLite's side files).
"""

from __future__ import annotations

import os
import stat
import sys
import time

from _procs import value_for
from ai2_kit.core.checkpoint import Checkpointer
from ai2_kit.core.checkpoint.stores import DirectoryStore, SQLiteStore, Store, open_store


class NoSyncSQLiteStore(SQLiteStore):
    """A control: commits reach the kernel but never the disk."""

    def _connect(self):  # type: ignore[no-untyped-def]
        conn = super()._connect()
        conn.execute("PRAGMA synchronous=OFF")
        return conn


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
    ckpt = Checkpointer(store=open_kind(kind, location, control), dedup=role == "claimer", lease=lease)
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
    else:
        raise SystemExit(f"unknown role {role}")


if __name__ == "__main__":
    main()
