"""Group commit: 8 threads saving ~1 KB each, against sequential durable saves and diskcache.

    python benchmarks/bench_group_commit.py [--n 2000] [--threads 8] [--repeat 3] [--url postgresql://...]

Rows, each the median of ``--repeat`` rounds (every setup runs once per round,
on a fresh store):

- **SQLite, sequential**: one thread, one ``put`` after the other; every put
  is its own durable transaction (``synchronous=FULL``, WAL, one fsync).
- **SQLite, N threads**: N threads saving distinct keys at once; saves that
  arrive together share one transaction and one fsync (group commit), each
  ``put`` still returning only once its own entry is durable.
- **diskcache, sequential / N threads**: ``Cache.set`` of the same values in
  the same setup (diskcache commits without fsync: not durable on a power cut).
- **PostgreSQL** rows when ``--url`` (or ``$AI2_KIT_TEST_PG_URL``) is given.

Prints a Markdown table (and ``--json`` the raw figures).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import threading
import time
import uuid
from typing import Any, Callable

VALUE_BYTES = 1000


def payload() -> str:
    return os.urandom(VALUE_BYTES // 2).hex()  # ~1 KB pickled, not compressible to nothing


def timed(threads: int, n: int, save: Callable[[str, Any], Any]) -> float:
    """Entries per second of ``threads`` threads saving ``n`` entries each, started together."""
    data = payload()
    barrier = threading.Barrier(threads + 1)
    errors: list[BaseException] = []

    def work(t: int) -> None:
        barrier.wait()
        try:
            for i in range(n):
                save(f"bench/t{t:02d}/k{i:06d}", {"i": i, "payload": data})
        except BaseException as e:  # reported below
            errors.append(e)

    ths = [threading.Thread(target=work, args=(t,)) for t in range(threads)]
    for th in ths:
        th.start()
    barrier.wait()
    t0 = time.perf_counter()
    for th in ths:
        th.join()
    elapsed = time.perf_counter() - t0
    if errors:
        raise SystemExit(f"a save failed: {errors[0]!r}")
    return threads * n / elapsed


def run_sqlite(tmp: str, threads: int, n: int) -> float:
    from ai2_kit.core.checkpoint.stores import SQLiteStore

    path = os.path.join(tmp, f"{uuid.uuid4().hex}.db")
    with SQLiteStore(path) as store:
        store.put("warm", b"")
        rate = timed(threads, n, store.put)
        if len(store) != threads * n + 1:
            raise SystemExit("SQLite: entries missing")
    return rate


def run_diskcache(tmp: str, threads: int, n: int) -> float:
    import diskcache

    with diskcache.Cache(os.path.join(tmp, uuid.uuid4().hex)) as cache:
        cache.set("warm", b"")
        rate = timed(threads, n, cache.set)
        if len(cache) != threads * n + 1:
            raise SystemExit("diskcache: entries missing")
    return rate


def run_postgres(url: str, threads: int, n: int) -> float:
    import psycopg

    from ai2_kit.core.checkpoint.stores._postgres import PostgresStore

    schema = "bench_" + uuid.uuid4().hex[:10]
    try:
        with PostgresStore(url, schema=schema) as store:
            store.put("warm", b"")
            return timed(threads, n, store.put)
    finally:
        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=2000, help="entries saved per thread (sequential: in all)")
    ap.add_argument("--threads", type=int, default=8)
    ap.add_argument("--repeat", type=int, default=3, help="runs per row; the median is shown")
    ap.add_argument("--url", default=os.environ.get("AI2_KIT_TEST_PG_URL", ""), help="PostgreSQL URL")
    ap.add_argument("--dir", default=None, help="directory for the stores (default: a temp dir)")
    ap.add_argument("--json", action="store_true", help="print the raw figures as JSON too")
    args = ap.parse_args()
    k, n = args.threads, args.n
    rows: list[tuple[str, Callable[[], float]]] = []
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        rows += [
            ("SQLite, sequential durable saves", lambda: run_sqlite(tmp, 1, n)),
            (f"SQLite, {k} threads (group commit)", lambda: run_sqlite(tmp, k, n // k)),
            ("diskcache, sequential (no fsync)", lambda: run_diskcache(tmp, 1, n)),
            (f"diskcache, {k} threads (no fsync)", lambda: run_diskcache(tmp, k, n // k)),
        ]
        if args.url:
            rows += [
                ("PostgreSQL, sequential", lambda: run_postgres(args.url, 1, n // 4)),
                (f"PostgreSQL, {k} threads (group commit)", lambda: run_postgres(args.url, k, n // 4 // k)),
            ]
        figures: dict[str, list[float]] = {name: [] for name, _ in rows}
        # Round after round, every setup once per round: a noisy moment of a
        # shared machine then weighs on all setups alike, and each round gives
        # its own ratios.
        for r in range(args.repeat):
            for name, fn in rows:
                sys.stderr.write(f"round {r + 1}: {name}...\n")
                figures[name].append(fn())
    base = figures["SQLite, sequential durable saves"]
    print(f"# ~1 KB values; median of {args.repeat} rounds; {platform.node()}, {os.cpu_count()} CPUs, "
          f"Python {platform.python_version()}")
    print("| setup | entries/s | vs SQLite sequential (median of the rounds' ratios) |")
    print("|---|---:|---:|")
    for name, rates in figures.items():
        ratio = statistics.median(x / b for x, b in zip(rates, base))
        print(f"| {name} | {statistics.median(rates):,.0f} | {ratio:.1f}x |")
    if args.json:
        print(json.dumps(figures, indent=1))


if __name__ == "__main__":
    main()
