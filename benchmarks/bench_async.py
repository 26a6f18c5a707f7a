"""Event-loop stalls of async steps, and the throughput of gathered saves.

    python benchmarks/bench_async.py [--stores sqlite,dir,postgres] [--url postgresql://...]
                                     [--n 1000] [--big-mb 300] [--arg-mb 100] [--json]

A task ticking every 5 ms records the longest stall of the loop (the largest
gap between two ticks, less the 5 ms it asked for) while:

- ``--n`` gathered async steps each save a ~1 KB value (misses), then hit;
- one async step returns a ``--big-mb`` MB array (saved), then hits;
- one async step is called with a ``--arg-mb`` MB array argument (fingerprinted);

and, without the ticker, compares ``--gather`` (64) gathered async steps and
8 threads saving 1 KB each with sequential durable ``Store.put`` calls (and
diskcache's non-durable ``set`` when it is installed). PostgreSQL runs when
``--url`` or ``AI2_KIT_TEST_PG_URL`` gives a server (a fresh schema, dropped
afterwards). Prints a markdown table; ``--json`` prints the raw figures.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import json
import os
import platform
import shutil
import sys
import tempfile
import threading
import time
import uuid
from typing import Any, Awaitable, Callable

import numpy as np

from ai2_kit.core.checkpoint import Checkpointer

TICK = 0.005
VALUE_BYTES = 1000
#: The same ~1 KB in every run: a closure over a random one would make every
#: rerun's code fingerprint differ.
PAYLOAD = "x" * VALUE_BYTES


class Ticker:
    """A task that wakes every 5 ms; ``stall`` is the longest extra wait it saw."""

    def __init__(self) -> None:
        self.stall = 0.0
        self._task: asyncio.Task[None] | None = None

    async def _run(self) -> None:
        last = time.perf_counter()
        while True:
            await asyncio.sleep(TICK)
            now = time.perf_counter()
            self.stall = max(self.stall, now - last - TICK)
            last = now

    async def __aenter__(self) -> Ticker:
        self._task = asyncio.ensure_future(self._run())
        await asyncio.sleep(TICK * 2)  # running before the work starts
        self.stall = 0.0
        return self

    async def __aexit__(self, *exc: object) -> None:
        await asyncio.sleep(TICK * 2)  # a stall at the very end is seen too
        assert self._task is not None
        self._task.cancel()


async def stall_of(work: Callable[[], Awaitable[Any]]) -> tuple[float, float]:
    """(longest stall, wall time) of awaiting ``work()`` beside the ticker, in ms."""
    async with Ticker() as t:
        t0 = time.perf_counter()
        await work()
        wall = time.perf_counter() - t0
    return t.stall * 1e3, wall * 1e3


def open_ckpt(kind: str, where: str, url: str | None) -> tuple[Checkpointer, Callable[[], None]]:
    if kind == "postgres":
        schema = "bench_" + uuid.uuid4().hex[:10]
        ckpt = Checkpointer(url, store_options={"schema": schema}, dedup=False)

        def drop() -> None:
            import psycopg

            with psycopg.connect(url, autocommit=True) as conn:
                conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')

        return ckpt, drop
    path = os.path.join(where, f"{kind}-{uuid.uuid4().hex[:6]}" + (".db" if kind == "sqlite" else ""))
    ckpt = Checkpointer(path, prefer="file" if kind == "sqlite" else "dir")
    return ckpt, lambda: shutil.rmtree(path, ignore_errors=True) if kind == "dir" else None


async def small_steps(ckpt: Checkpointer, n: int, tag: str) -> None:
    async def step(i: int) -> dict[str, Any]:
        return {"i": i, "payload": PAYLOAD}

    await asyncio.gather(*(ckpt(f"{tag}/k{i:05d}")(step)(i) for i in range(n)))


async def big_step(ckpt: Checkpointer, value: np.ndarray) -> None:
    # The array is made before the clock starts: filling it is the step's own
    # work on the loop, not the checkpointer's.
    async def step() -> np.ndarray:
        return value

    out = await ckpt("big/value")(step)()
    if out.nbytes != value.nbytes:
        raise RuntimeError("wrong value returned")


async def big_argument(ckpt: Checkpointer, arg: np.ndarray) -> None:
    async def step(a: np.ndarray) -> int:
        return int(a.shape[0])

    await ckpt("big/argument")(step)(arg)


def throughput(ckpt: Checkpointer, n: int, threads: int) -> dict[str, float]:
    """Saves per second: sequential puts, gathered async steps, threads."""
    payload = PAYLOAD
    store = ckpt.store
    store.put("warm", b"")
    t0 = time.perf_counter()
    for i in range(n):
        store.put(f"seq/k{i:05d}", {"i": i, "payload": payload})
    seq = n / (time.perf_counter() - t0)

    async def gathered() -> None:
        async def step(i: int) -> dict[str, Any]:
            return {"i": i, "payload": payload}

        await asyncio.gather(*(ckpt(f"gather/k{i:05d}")(step)(i) for i in range(n)))

    t0 = time.perf_counter()
    asyncio.run(gathered())
    gat = n / (time.perf_counter() - t0)

    per = max(1, n // threads)

    def work(t: int) -> None:
        for i in range(per):
            ckpt(f"threads/t{t}/k{i:05d}")(lambda i=i: {"i": i, "payload": payload})()

    ths = [threading.Thread(target=work, args=(t,)) for t in range(threads)]
    t0 = time.perf_counter()
    for th in ths:
        th.start()
    for th in ths:
        th.join()
    thr = per * threads / (time.perf_counter() - t0)
    return {"sequential_per_s": seq, "gathered_per_s": gat, "threads_per_s": thr}


def diskcache_rate(where: str, n: int) -> float | None:
    try:
        import diskcache
    except ImportError:
        return None
    payload = PAYLOAD
    with diskcache.Cache(os.path.join(where, "diskcache")) as cache:
        t0 = time.perf_counter()
        for i in range(n):
            cache.set(f"k{i:05d}", {"i": i, "payload": payload})
        return n / (time.perf_counter() - t0)


async def plain_steps(n: int) -> None:
    async def step(i: int) -> dict[str, Any]:
        return {"i": i, "payload": PAYLOAD}

    await asyncio.gather(*(step(i) for i in range(n)))


def run_store(kind: str, where: str, url: str | None, args: argparse.Namespace) -> dict[str, Any]:
    out: dict[str, Any] = {"store": kind}
    ckpt, drop = open_ckpt(kind, where, url)
    try:
        out["small_save"] = asyncio.run(stall_of(lambda: small_steps(ckpt, args.n, "small")))
        out["small_hit"] = asyncio.run(stall_of(lambda: small_steps(ckpt, args.n, "small")))
        value = np.ones(args.big_mb * 1024 * 1024 // 8)
        out["big_save"] = asyncio.run(stall_of(functools.partial(big_step, ckpt, value)))
        out["big_hit"] = asyncio.run(stall_of(functools.partial(big_step, ckpt, value)))
        ckpt.delete("big/value")
        del value
        arg = np.random.default_rng(0).random(args.arg_mb * 1024 * 1024 // 8)
        out["big_arg"] = asyncio.run(stall_of(functools.partial(big_argument, ckpt, arg)))
        del arg
        out.update(throughput(ckpt, args.gather, args.threads))
    finally:
        ckpt.close()
        drop()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--stores", default="sqlite,dir,postgres")
    ap.add_argument("--url", default=os.environ.get("AI2_KIT_TEST_PG_URL"))
    ap.add_argument("--n", type=int, default=1000)
    ap.add_argument("--big-mb", type=int, default=300)
    ap.add_argument("--arg-mb", type=int, default=100)
    ap.add_argument("--gather", type=int, default=64)
    ap.add_argument("--threads", type=int, default=8)
    ap.add_argument("--tmp", default=None, help="folder for the stores (default: a fresh temp folder)")
    ap.add_argument("--offload-threads", type=int, default=None,
                    help="size of the checkpointer's thread pool (default: the library's)")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    if args.offload_threads:
        from ai2_kit.core.checkpoint._checkpointer import _async

        _async.OFFLOAD_THREADS = args.offload_threads
    where = tempfile.mkdtemp(prefix="bench-async-", dir=args.tmp)
    rows = []
    floor = asyncio.run(stall_of(lambda: plain_steps(args.n)))
    try:
        for kind in args.stores.split(","):
            if kind == "postgres" and not args.url:
                print("postgres: skipped (no --url and no AI2_KIT_TEST_PG_URL)", file=sys.stderr)
                continue
            rows.append(run_store(kind, where, args.url, args))
        dc = diskcache_rate(where, args.gather)
    finally:
        shutil.rmtree(where, ignore_errors=True)
    if args.json:
        print(json.dumps({"python": platform.python_version(), "cpus": os.cpu_count(), "rows": rows,
                          "diskcache_per_s": dc, "floor": floor, "args": vars(args)}, indent=1))
        return
    print(f"Longest loop stall (ms; wall time in parentheses), Python {platform.python_version()}, "
          f"{os.cpu_count()} CPUs\n")
    print(f"| store | {args.n} small saves | {args.n} small hits | {args.big_mb} MB save | {args.big_mb} MB hit "
          f"| {args.arg_mb} MB argument |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        cells = [f"{r[k][0]:.0f} ({r[k][1]:.0f})" for k in ("small_save", "small_hit", "big_save", "big_hit",
                                                           "big_arg")]
        print(f"| {r['store']} | " + " | ".join(cells) + " |")
    print(f"| no checkpoint | {floor[0]:.0f} ({floor[1]:.0f}) | | | | |")
    print(f"\nSaves of 1 KB per second: sequential durable puts, {args.gather} gathered async steps, "
          f"{args.threads} threads\n")
    print("| store | sequential | gathered | threads | gathered / sequential | threads / sequential |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        s, g, t = r["sequential_per_s"], r["gathered_per_s"], r["threads_per_s"]
        print(f"| {r['store']} | {s:.0f} | {g:.0f} | {t:.0f} | {g / s:.1f}x | {t / s:.1f}x |")
    if dc is not None:
        print(f"\ndiskcache (not durable), sequential set: {dc:.0f} per second")


if __name__ == "__main__":
    main()
