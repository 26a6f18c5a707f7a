"""Save throughput of the PostgreSQL store next to the SQLite store, from 1, 4 and 8 processes.

    source scripts/postgres.sh                 # a local test server, or your own:
    python benchmarks/bench_postgres.py [--url postgresql://...] [--n 1000] [--procs 1,4,8]

Every process saves ``--n`` entries of about 1 KB under keys of its own, each
``put`` one durable transaction (PostgreSQL: synchronous_commit on; SQLite:
synchronous=FULL, WAL). Processes start together at a common instant; the
rate is all entries over the time until the last process finished. Stores are
created before the clock starts, in a fresh schema / a fresh file, and removed
afterwards. Prints a table (and ``--json`` the raw figures).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from typing import Any

VALUE_BYTES = 1000


def open_store(kind: str, location: str, schema: str) -> Any:
    if kind == "postgres":
        from ai2_kit.core.checkpoint.stores._postgres import PostgresStore

        return PostgresStore(location, schema=schema)
    from ai2_kit.core.checkpoint.stores import SQLiteStore

    return SQLiteStore(location)


def worker(kind: str, location: str, schema: str, proc: int, n: int, start: float) -> None:
    """Save n entries once the common start instant has come; print timings as JSON."""
    store = open_store(kind, location, schema)
    try:
        store.put(f"warm/{proc}", b"")  # connection and statements ready before the clock
        payload = os.urandom(VALUE_BYTES // 2).hex()  # ~1 KB pickled, not compressible to nothing
        while time.time() < start:
            time.sleep(0.0005)
        t0 = time.time()
        lat = []
        for i in range(n):
            a = time.perf_counter()
            store.put(f"bench/p{proc:02d}/k{i:06d}", {"i": i, "payload": payload})
            lat.append(time.perf_counter() - a)
        t1 = time.time()
    finally:
        store.close()
    print(json.dumps({"t0": t0, "t1": t1, "median_ms": statistics.median(lat) * 1e3}))


def run(kind: str, procs: int, n: int, url: str, tmp: str) -> dict[str, Any]:
    schema = "bench_" + uuid.uuid4().hex[:10]
    location = url if kind == "postgres" else os.path.join(tmp, f"{schema}.db")
    open_store(kind, location, schema).close()  # create it before the clock starts
    start = time.time() + 1.0 + 0.1 * procs
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", kind, location, schema]
    ps = [subprocess.Popen([*cmd, str(p), str(n), repr(start)], stdout=subprocess.PIPE, text=True)
          for p in range(procs)]
    results = []
    for p in ps:
        out, _ = p.communicate()
        if p.returncode != 0:
            raise SystemExit(f"a {kind} worker failed (exit {p.returncode})")
        results.append(json.loads(out))
    with open_store(kind, location, schema) as store:
        saved = len(store.keys("bench"))
    cleanup(kind, location, schema)
    if saved != procs * n:
        raise SystemExit(f"{kind}: {saved} entries saved, expected {procs * n}")
    elapsed = max(r["t1"] for r in results) - min(r["t0"] for r in results)
    return {
        "store": kind, "procs": procs, "entries": saved, "seconds": elapsed,
        "rate": saved / elapsed, "median_ms": statistics.median(r["median_ms"] for r in results),
    }


def cleanup(kind: str, location: str, schema: str) -> None:
    if kind == "postgres":
        import psycopg

        with psycopg.connect(location, autocommit=True) as conn:
            conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
        return
    for suffix in ("", "-wal", "-shm", "-journal"):
        if os.path.exists(location + suffix):
            os.unlink(location + suffix)


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        kind, location, schema, proc, n, start = sys.argv[2:8]
        worker(kind, location, schema, int(proc), int(n), float(start))
        return
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--url", default=os.environ.get("AI2_KIT_TEST_PG_URL", ""),
                    help="PostgreSQL URL (default: $AI2_KIT_TEST_PG_URL)")
    ap.add_argument("--n", type=int, default=1000, help="entries saved per process")
    ap.add_argument("--procs", default="1,4,8", help="process counts, comma-separated")
    ap.add_argument("--dir", default=None, help="directory for the SQLite files (default: a temp dir)")
    ap.add_argument("--json", action="store_true", help="print the raw figures as JSON too")
    args = ap.parse_args()
    if not args.url:
        raise SystemExit("no PostgreSQL URL: pass --url or `source scripts/postgres.sh` first")
    counts = [int(x) for x in args.procs.split(",")]
    rows = []
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        for procs in counts:
            for kind in ("postgres", "sqlite"):
                sys.stderr.write(f"{kind} x{procs}...\n")
                rows.append(run(kind, procs, args.n, args.url, tmp))
    print(f"# {args.n} puts of ~1 KB per process, one transaction each; "
          f"{platform.node()}, {os.cpu_count()} CPUs, Python {platform.python_version()}")
    print("| processes | PostgreSQL entries/s | PostgreSQL median put "
          "| SQLite entries/s | SQLite median put |")
    print("|---:|---:|---:|---:|---:|")
    for procs in counts:
        pg = next(r for r in rows if r["store"] == "postgres" and r["procs"] == procs)
        sq = next(r for r in rows if r["store"] == "sqlite" and r["procs"] == procs)
        print(f"| {procs} | {pg['rate']:,.0f} | {pg['median_ms']:.2f} ms | "
              f"{sq['rate']:,.0f} | {sq['median_ms']:.2f} ms |")
    if args.json:
        print(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
