"""Scripts run in real subprocesses by the crash and multi-process tests.

Usage: python _procs.py ROLE KIND LOCATION [OPTIONS_JSON] [ARGS...]
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import threading
import time

import numpy as np

from ai2_kit.core.checkpoint import Checkpointer
from ai2_kit.core.checkpoint.stores import DirectoryStore, SQLiteStore, Store


def open_store(kind: str, location: str, options: dict) -> Store:
    if kind == "sqlite":
        return SQLiteStore(location)
    if kind == "directory":
        return DirectoryStore(location)
    from ai2_kit.core.checkpoint.stores._postgres import PostgresStore

    return PostgresStore(location, **options)


def value_for(tag: str, i: int, big_every: int) -> object:
    """A value whose content is derived from (tag, i), so readers can check it."""
    if big_every and i % big_every == big_every - 1:
        return np.full(400_000, i, dtype=np.int32)  # 1.6 MB: a side file / chunks
    return {"tag": tag, "i": i, "pad": "x" * (i % 50)}


def writer(ckpt: Checkpointer, tag: str, big_every: int, count: int) -> None:
    """Save entries one after another, printing 'ack N' once each call returned."""
    for i in range(count):
        ckpt(f"{tag}/k{i:05d}")(value_for)(tag, i, big_every)
        print(f"ack {i}", flush=True)


def overwriter(ckpt: Checkpointer, tag: str, count: int) -> None:
    """Overwrite one key again and again; print 'ack N' after each complete write."""
    for i in range(count):
        ckpt.store.put(f"{tag}/same", value_for(tag, i, 3))
        print(f"ack {i}", flush=True)


def mixed(ckpt: Checkpointer, tag: str, count: int) -> None:
    """8 asyncio tasks and 4 threads saving distinct keys at once in one process."""

    async def step(i: int) -> int:
        await asyncio.sleep(0)
        return i

    async def tasks() -> None:
        await asyncio.gather(*(ckpt(f"{tag}/task{t}/k{i}")(step)(i) for t in range(8) for i in range(count)))

    def thread(t: int) -> None:
        for i in range(count):
            ckpt(f"{tag}/thread{t}/k{i}")(lambda i=i: i)()

    threads = [threading.Thread(target=thread, args=(t,)) for t in range(4)]
    for th in threads:
        th.start()
    asyncio.run(tasks())
    for th in threads:
        th.join()
    print("done", flush=True)


def slow_step(runs_dir: str, seconds: float) -> str:
    """Record that the step ran (one file per run), then take a while."""
    os.makedirs(runs_dir, exist_ok=True)
    with open(os.path.join(runs_dir, f"{os.getpid()}-{time.monotonic_ns()}"), "w") as f:
        f.write("ran")
    print("running", flush=True)
    time.sleep(seconds)
    return f"result of {os.getpid()}"


def main() -> None:
    role, kind, location = sys.argv[1:4]
    options = json.loads(sys.argv[4]) if len(sys.argv) > 4 else {}
    args = sys.argv[5:]
    lease = float(os.environ.get("AI2_KIT_TEST_LEASE", "60"))
    ckpt = Checkpointer(store=open_store(kind, location, options), dedup=True, lease=lease)
    if role == "writer":
        writer(ckpt, args[0], int(args[1]), int(args[2]))
    elif role == "overwriter":
        overwriter(ckpt, args[0], int(args[1]))
    elif role == "mixed":
        mixed(ckpt, args[0], int(args[1]))
    elif role == "dedup":
        print("value", ckpt("slow/step")(slow_step)(args[0], float(args[1])), flush=True)
    elif role == "sleep-after-start":
        print("ready", flush=True)
        time.sleep(60)
    else:
        raise SystemExit(f"unknown role {role}")
    ckpt.close()
    os._exit(0)


if __name__ == "__main__":
    main()
