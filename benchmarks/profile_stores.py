"""Profile our stores on W1 (small saves), W2 (hits) and W4 (one big array).

    python benchmarks/profile_stores.py [--n 3000] [--mb 512] [--top 18] [--only sqlite,dir]

cProfile, in this process, on fresh stores in a temporary directory; prints
the functions with the most own time and the share of a few known steps.
cProfile adds its own cost per Python call, so read shares, not absolutes.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import os
import pstats
import shutil
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import _worker  # noqa: E402
from _worker import big_array, big_step, key_of, small_step, small_value  # noqa: E402


def show(prof: cProfile.Profile, title: str, total_ops: int, top: int) -> None:
    s = io.StringIO()
    st = pstats.Stats(prof, stream=s)
    total = st.total_tt  # type: ignore[attr-defined]
    print(f"\n=== {title}: {total / total_ops * 1e6:.1f} us per op under cProfile ===")
    st.sort_stats("tottime").print_stats(top)
    lines = s.getvalue().splitlines()
    start = next(i for i, ln in enumerate(lines) if ln.strip().startswith("ncalls"))
    print("\n".join(lines[start : start + top + 1]))


def timed(label: str, fn, n: int) -> float:
    t0 = time.perf_counter()
    for i in range(n):
        fn(i)
    dt = (time.perf_counter() - t0) / n * 1e6
    print(f"  {label:55s} {dt:8.1f} us")
    return dt


def parts_of_a_save(root: str, n: int) -> None:
    """Time the pieces of one small save separately, without the profiler's distortion."""
    import sqlite3

    from ai2_kit.core.checkpoint import Checkpointer
    from ai2_kit.core.checkpoint._codec import encode, meta_to_json
    from ai2_kit.core.checkpoint._keys import validate_key
    from ai2_kit.core.checkpoint.stores._base import Store, library_version

    print("\n=== pieces of one small save (no profiler) ===")
    values = [small_value(i) for i in range(n)]
    timed("validate_key", lambda i: validate_key(key_of(i)), n)
    timed("encode (cloudpickle protocol 5 + crc32)", lambda i: encode(values[i]), n)
    enc = encode(values[0])
    timed("library_version() (a relative import per save)", lambda i: library_version(), n)
    fields = {"fn_name": "f", "call_site": "x:1", "duration": 0.1, "is_awaitable": False}
    timed("make_meta", lambda i: Store.make_meta(key_of(i), enc, fields), n)
    meta = Store.make_meta("k", enc, fields)
    timed("meta_to_json", lambda i: meta_to_json(meta), n)
    timed("Encoded.to_bytes", lambda i: enc.to_bytes(), n)
    conn = sqlite3.connect(os.path.join(root, "parts.db"), isolation_level=None)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=FULL")
    conn.execute("CREATE TABLE t (key TEXT PRIMARY KEY, created REAL, meta TEXT, value BLOB, blob TEXT)")
    text, blob = meta_to_json(meta), enc.to_bytes()

    def autocommit(i: int) -> None:
        conn.execute("INSERT OR REPLACE INTO t VALUES (?,?,?,?,?)", (key_of(i), 0.0, text, blob, None))

    def explicit(i: int) -> None:
        conn.execute("BEGIN IMMEDIATE")
        conn.execute("SELECT blob FROM t WHERE key=?", (key_of(i),)).fetchone()
        conn.execute("INSERT OR REPLACE INTO t VALUES (?,?,?,?,?)", (key_of(i + n), 0.0, text, blob, None))
        conn.execute("COMMIT")

    timed("SQLite row, autocommit INSERT (WAL, FULL)", autocommit, n)
    timed("SQLite row, BEGIN IMMEDIATE+SELECT+INSERT+COMMIT (ours)", explicit, n)
    conn.close()
    with Checkpointer(os.path.join(root, "whole.db")) as ck:
        timed("whole save, ours (sqlite)", lambda i: ck(key_of(i))(small_step)(i), n)
        timed("whole hit, ours (sqlite)", lambda i: ck(key_of(i))(small_step)(i), n)
        store = ck.store
        timed("  store.lookup alone", lambda i: store.lookup(key_of(i)), n)
        timed("  store._get_meta alone (one SELECT + json)", lambda i: store._get_meta(key_of(i)), n)


def profile_small(kind: str, root: str, n: int, top: int) -> None:
    from ai2_kit.core.checkpoint import Checkpointer

    loc = os.path.join(root, f"p-{kind}")
    # The same n calls twice, each from a fresh store object: misses, then hits.
    for label in ("W1 save", "W2 hit"):
        ck = Checkpointer(loc, prefer="file" if kind == "sqlite" else "dir")
        prof = cProfile.Profile()
        prof.enable()
        for i in range(n):
            ck(key_of(i))(small_step)(i)
        prof.disable()
        show(prof, f"{label}, {kind}", n, top)
        ck.close()


def profile_big(kind: str, root: str, mb: float, top: int) -> None:
    from ai2_kit.core.checkpoint import Checkpointer

    loc = os.path.join(root, f"big-{kind}")
    _worker.BIG = big_array(mb)
    ck = Checkpointer(loc, prefer="file" if kind == "sqlite" else "dir")
    prof = cProfile.Profile()
    os.sync()
    t0 = time.perf_counter()
    prof.enable()
    ck("big")(big_step)(0)
    prof.disable()
    print(f"\n(W4 save {kind}: {time.perf_counter() - t0:.3f} s wall)")
    show(prof, f"W4 save {mb:g} MB, {kind}", 1, top)
    ck.close()
    _worker.BIG = None
    ck = Checkpointer(loc, prefer="file" if kind == "sqlite" else "dir")
    prof = cProfile.Profile()
    t0 = time.perf_counter()
    prof.enable()
    ck("big")(big_step)(0)
    prof.disable()
    print(f"\n(W4 load {kind}: {time.perf_counter() - t0:.3f} s wall)")
    show(prof, f"W4 load {mb:g} MB, {kind}", 1, top)
    ck.close()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=3000)
    p.add_argument("--mb", type=float, default=512.0)
    p.add_argument("--top", type=int, default=18)
    p.add_argument("--only", default="sqlite,dir")
    p.add_argument("--tmp")
    a = p.parse_args()
    root = tempfile.mkdtemp(prefix="ckpt-prof-", dir=a.tmp)
    try:
        parts_of_a_save(root, a.n)
        for kind in a.only.split(","):
            profile_small(kind, root, a.n, a.top)
        for kind in a.only.split(","):
            profile_big(kind, root, a.mb, a.top)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
