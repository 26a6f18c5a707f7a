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


BIG_BYTES = int(os.environ.get("AI2_KIT_KILL_BIG_BYTES", str(1_600_000)))


def value_for(tag: str, i: int, big_every: int) -> object:
    """A value whose content is derived from (tag, i), so readers can check it."""
    if big_every and i % big_every == big_every - 1:
        return np.full(BIG_BYTES // 4, i, dtype=np.int32)  # a side file / chunks
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


def fill_until_failure(ckpt: Checkpointer, tag: str, limit: int) -> None:
    """Under RLIMIT_FSIZE (EFBIG instead of SIGXFSZ), save until a save fails."""
    import resource
    import signal

    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    failed = 0
    for i in range(40):
        ok = ckpt.save(f"{tag}/k{i:03d}", value_for(tag, i, 2))
        print(("ack" if ok else "fail") + f" {i}", flush=True)
        failed += not ok
    print(f"failed {failed}", flush=True)


def load(ckpt: Checkpointer, tag: str, seconds: float, nkeys: int) -> None:
    """4 threads writing and reading overlapping keys; every value read must be whole."""
    import random

    deadline = time.monotonic() + seconds
    errors: list[str] = []
    ops = [0]

    def work(t: int) -> None:
        rng = random.Random(f"{tag}-{t}")
        while time.monotonic() < deadline:
            key = f"load/k{rng.randrange(nkeys):03d}"
            try:
                if rng.random() < 0.5:
                    nonce = rng.randrange(1 << 30)
                    size = rng.choice([10, 1000, 300_000])
                    ckpt.store.put(key, {"key": key, "nonce": nonce, "data": np.full(size, nonce % 251, np.uint8)})
                else:
                    hit = ckpt.store.lookup(key)
                    if hit is not None:
                        v = hit.value
                        if v["key"] != key or not (v["data"] == v["nonce"] % 251).all():
                            errors.append(f"{key}: mixed value")
                ops[0] += 1
            except Exception as e:  # reported to the parent, which fails the test
                errors.append(f"{key}: {type(e).__name__}: {e}")

    threads = [threading.Thread(target=work, args=(t,)) for t in range(4)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    print(json.dumps({"ops": ops[0], "errors": errors[:20], "nerrors": len(errors)}), flush=True)


def main() -> None:
    role, kind, location = sys.argv[1:4]
    options = json.loads(sys.argv[4]) if len(sys.argv) > 4 else {}
    args = sys.argv[5:]
    lease = float(os.environ.get("AI2_KIT_TEST_LEASE", "60"))
    ckpt = Checkpointer(store=open_store(kind, location, options), dedup=role == "dedup", lease=lease)
    if role == "writer":
        writer(ckpt, args[0], int(args[1]), int(args[2]))
    elif role == "overwriter":
        overwriter(ckpt, args[0], int(args[1]))
    elif role == "mixed":
        mixed(ckpt, args[0], int(args[1]))
    elif role == "dedup":
        print("value", ckpt("slow/step")(slow_step)(args[0], float(args[1])), flush=True)
    elif role == "fill":
        fill_until_failure(ckpt, args[0], int(args[1]))
    elif role == "load":
        load(ckpt, args[0], float(args[1]), int(args[2]))
    elif role == "sleep-after-start":
        print("ready", flush=True)
        time.sleep(60)
    else:
        raise SystemExit(f"unknown role {role}")
    ckpt.close()
    os._exit(0)


if __name__ == "__main__":
    main()
