"""Big arrays: one float64 array saved and loaded by our stores, against np.save + fsync / np.load.

    python benchmarks/bench_arrays.py [--mb 256] [--rounds 3] [--stores sqlite,dir] [--json OUT]

Every operation runs in a fresh process (this script started again with
``--op``), as a workflow that saves a step and a later one that resumes it:

- **save**: the wrapped call of a step returning an array that already
  exists (``Checkpointer(path, prefer=...)``, called as ``ckpt(key)(step)(0)``),
  durable on return; the floor is ``np.save`` into an open file, then
  ``flush`` and ``fsync`` (the same durability).
- **load cold**: a fresh process calls the step again (or ``np.load``) after
  the files were written back (``os.sync``) and dropped from the page cache
  (``posix_fadvise(DONTNEED)`` on every file: no other process's cache is
  touched).
- **load warm**: the same, right after every file was read through once.
- rows **put / lookup only** use the store without a Checkpointer (no
  fingerprints, no staleness check); their save times one ``put`` into a
  store opened before the clock starts (creating a store and closing it,
  once per workflow, are left out), their loads open the store and look up.

Memory: (peak RSS - RSS before the operation) / array size, so 1.00x is the
array alone. Each figure is the fastest of ``--rounds`` rounds (one-shot
timings of a big write swing on a shared disk); ratios compare figures of the
same run; a second table gives the median over rounds of each round's
ratio (contenders run back to back within a round, so a slow drift of a
shared machine cancels out). Prints Markdown, and the raw figures with
``--json``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any

KEY = "step/000000"
RAN = [0]  # how many times the step function really ran (a load must not run it)
STORES = {"sqlite": ("file", "ckpt.db"), "dir": ("dir", "ckpt.d"),
          "sqlite-put": ("file", "ckpt.db"), "dir-put": ("dir", "ckpt.d")}
LABELS = {"np": "np.save + fsync / np.load", "sqlite": "ours: SQLite store", "dir": "ours: directory store",
          "sqlite-put": "SQLite store, put / lookup only", "dir-put": "directory store, put / lookup only"}


def rss_mb(field: str) -> float:
    """VmRSS or VmHWM of this process in MiB (VmHWM starts afresh at exec)."""
    with open("/proc/self/status", encoding="ascii") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024.0
    return float("nan")


# The array W4 of benchmarks/run.py saves, its slice-by-slice check, and the page-cache switch.
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _worker import big_array as make_array  # noqa: E402
from _worker import big_equal as is_expected  # noqa: E402
from _worker import set_cache  # noqa: E402


def open_store(who: str, root: str) -> Any:
    """The store alone, without a Checkpointer (no fingerprints, no staleness check)."""
    from ai2_kit.core.checkpoint.stores import DirectoryStore, SQLiteStore

    name = STORES[who][1]
    path = os.path.join(root, name)
    return SQLiteStore(path) if who.startswith("sqlite") else DirectoryStore(path)


def run_op(op: str, who: str, root: str, mb: float) -> dict[str, Any]:
    """One operation in this (fresh) process; returns its figures."""
    import numpy as np

    if who != "np":
        from ai2_kit.core.checkpoint import Checkpointer
    out: dict[str, Any] = {"op": op, "who": who}
    if op == "save":
        big = make_array(mb)

        def step(i: int) -> Any:
            RAN[0] += 1
            return big

        # The store alone is opened (created) before the clock starts and closed
        # after it stops: its row measures one durable put, nothing else.
        store = open_store(who, root) if who.endswith("-put") else None
        os.sync()
        base = rss_mb("VmRSS")
        t0 = time.perf_counter()
        if who == "np":
            with open(os.path.join(root, "big.npy"), "wb") as f:
                np.save(f, big)
                f.flush()
                os.fsync(f.fileno())
        elif store is not None:
            store.put(KEY, big)
        else:
            prefer, name = STORES[who]
            ckpt = Checkpointer(os.path.join(root, name), prefer=prefer)
            ckpt(KEY)(step)(0)
            ckpt.close()
        out["s"] = time.perf_counter() - t0
        if store is not None:
            store.close()
    else:
        set_cache(root, warm=op == "warm")

        def step(i: int) -> Any:
            RAN[0] += 1
            return None

        base = rss_mb("VmRSS")
        t0 = time.perf_counter()
        if who == "np":
            value = np.load(os.path.join(root, "big.npy"))
        elif who.endswith("-put"):
            with open_store(who, root) as reader:
                hit = reader.lookup(KEY)
            value = None if hit is None else hit.value
        else:
            prefer, name = STORES[who]
            ckpt = Checkpointer(os.path.join(root, name), prefer=prefer)
            value = ckpt(KEY)(step)(0)
            ckpt.close()
        out["s"] = time.perf_counter() - t0
        out["memory"] = (rss_mb("VmHWM") - base) / mb  # before the check, which makes slices
        out["equal"] = RAN[0] == 0 and is_expected(value, mb)
        return out
    out["memory"] = (rss_mb("VmHWM") - base) / mb
    return out


def spawn(op: str, who: str, root: str, mb: float) -> dict[str, Any]:
    cmd = [sys.executable, os.path.abspath(__file__), "--op", op, "--who", who, "--root", root, "--mb", str(mb)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    if done.returncode != 0:
        raise RuntimeError(f"{op} {who} failed:\n{done.stderr}")
    return dict(json.loads(done.stdout.strip().splitlines()[-1]))


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mb", type=float, default=256.0, help="array size in MiB (default 256)")
    p.add_argument("--rounds", type=int, default=3, help="rounds, the fastest of each figure kept (default 3)")
    p.add_argument("--stores", default="sqlite,dir",
                   help="comma-separated: sqlite, dir (through a Checkpointer, as a workflow calls it), "
                        "sqlite-put, dir-put (the store's put and lookup alone); default sqlite,dir")
    p.add_argument("--tmp", default=None, help="folder for the files (default: a new one in $TMPDIR)")
    p.add_argument("--json", help="write the raw figures to this file")
    p.add_argument("--op", help=argparse.SUPPRESS)
    p.add_argument("--who", help=argparse.SUPPRESS)
    p.add_argument("--root", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.op:
        print(json.dumps(run_op(a.op, a.who, a.root, a.mb)))
        return 0
    who_all = ["np", *[s for s in a.stores.split(",") if s]]
    results: dict[str, dict[str, list[dict[str, Any]]]] = {w: {} for w in who_all}
    t_start = time.time()
    for rnd in range(a.rounds):
        for who in who_all:  # interleaved: drifts of the machine hit every contender alike
            root = tempfile.mkdtemp(prefix="bench_arrays_", dir=a.tmp)
            try:
                for op in ("save", "cold", "warm"):
                    r = spawn(op, who, root, a.mb)
                    results[who].setdefault(op, []).append(r)
                    print(f"round {rnd + 1} {who:6s} {op:5s} {r['s'] * 1000:8.1f} ms  mem {r['memory']:.2f}x"
                          + ("" if op == "save" or r.get("equal") else "  NOT EQUAL"), file=sys.stderr)
            finally:
                shutil.rmtree(root, ignore_errors=True)
    best = {w: {op: min(rs, key=lambda r: r["s"]) for op, rs in ops.items()} for w, ops in results.items()}
    floor = best["np"]
    print(f"One {a.mb:g} MiB float64 array; fastest of {a.rounds} rounds; {time.strftime('%Y-%m-%d %H:%M')}, "
          f"Python {platform.python_version()}, {os.cpu_count()} CPUs, files in {a.tmp or tempfile.gettempdir()}; "
          f"took {time.time() - t_start:.0f} s.\n")
    print("| contender | save s | x np.save+fsync | load cold s | x np.load cold | load warm s | x np.load warm "
          "| save memory / array | load memory / array | equal |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for who in who_all:
        b = best[who]
        equal = all(r.get("equal", True) for rs in results[who].values() for r in rs)
        print(f"| {LABELS[who]} | {b['save']['s']:.3f} | {b['save']['s'] / floor['save']['s']:.2f}x "
              f"| {b['cold']['s']:.3f} | {b['cold']['s'] / floor['cold']['s']:.2f}x "
              f"| {b['warm']['s']:.4f} | {b['warm']['s'] / floor['warm']['s']:.2f}x "
              f"| {b['save']['memory']:.2f}x | {max(b['cold']['memory'], b['warm']['memory']):.2f}x "
              f"| {'yes' if equal else 'NO'} |")
    # Each round runs every contender back to back: the ratio within a round
    # cancels slow drifts of a shared machine; its median over rounds is the
    # second figure to read.
    print(f"\nMedian over the {a.rounds} rounds of the ratio within each round "
          "(ours / np of the same round):\n")
    print("| contender | save | load cold | load warm |")
    print("|---|---|---|---|")
    for who in who_all[1:]:
        cells = []
        for op in ("save", "cold", "warm"):
            ratios = sorted(r["s"] / f["s"] for r, f in zip(results[who][op], results["np"][op]))
            cells.append(f"{statistics.median(ratios):.2f}x")
        print(f"| {LABELS[who]} | " + " | ".join(cells) + " |")
    if a.json:
        with open(a.json, "w", encoding="utf-8") as f:
            json.dump({"mb": a.mb, "rounds": a.rounds, "results": results}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
