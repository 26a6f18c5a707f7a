"""Two versions of the library in one process: hits and saves, call by call in turn.

    python benchmarks/bench_versions.py --old /tmp/old/src            # this checkout against another
    python benchmarks/bench_versions.py --old /tmp/old/src --n 5000 --passes 5

A change to the call path is judged by the ratio of its hit and save times to
the code before it; measured a minute apart on a shared machine, two runs of
the same code can differ by more than the change. So both versions run in this
process: the other checkout's ``ai2_kit`` is copied under the name
``ai2_kit_old`` (its modules import each other relatively), and key ``i`` is
asked of each version in turn (the one that goes first alternating with ``i``),
each call timed on its own. A figure is the median over a pass's calls; the
ratio (this checkout / the old one) is the median of the passes' ratios.

Workloads, each a wrapper made per call as workflows do (``ckpt(key)(fn)(i)``):

- ``hit``: a hit on a SQLite store, staleness checks on (the default);
- ``hit_ignore``: the same with ``stale="ignore"``;
- ``hit_facade``: a hit through ``apply_checkpoint(key)(fn)(i)`` on the default store;
- ``hit_reused``: a hit of a wrapper made once per key beforehand (``wrappers[i](i)``);
- ``save``: a miss and its save on a fresh SQLite store.
"""

from __future__ import annotations

import argparse
import gc
import importlib
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from typing import Any, Callable

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "src"))


def small_step(i: int) -> dict[str, Any]:
    return {"i": i, "values": list(range(8))}


def key_of(i: int) -> str:
    return f"step/{i}"


def load(old_src: str, tmp: str) -> tuple[Any, Any]:
    """(this checkout's package, the old one's) as two modules of one process."""
    dst = os.path.join(tmp, "pkgs")
    shutil.copytree(os.path.join(old_src, "ai2_kit"), os.path.join(dst, "ai2_kit_old"))
    sys.path.insert(0, dst)
    new = importlib.import_module("ai2_kit.core.checkpoint")
    old = importlib.import_module("ai2_kit_old.core.checkpoint")
    assert new.__file__ != old.__file__
    return new, old


def calls(pkg: Any, where: str, workload: str, n: int) -> Callable[[int], Any]:
    if workload == "hit_facade":
        pkg.set_checkpoint_file(where)
        apply = pkg.apply_checkpoint
        return lambda i: apply(key_of(i))(small_step)(i)
    ckpt = pkg.Checkpointer(where, stale="ignore" if workload == "hit_ignore" else "warn")
    if workload == "hit_reused":
        wrappers = [ckpt(key_of(i))(small_step) for i in range(n)]
        return lambda i: wrappers[i](i)
    return lambda i: ckpt(key_of(i))(small_step)(i)


def one_pass(pair: list[Callable[[int], Any]], n: int) -> list[float]:
    times: list[list[float]] = [[], []]
    clock = time.perf_counter
    gc.disable()
    try:
        for i in range(n):
            order = (0, 1) if i % 2 == 0 else (1, 0)
            for c in order:
                t0 = clock()
                pair[c](i)
                times[c].append(clock() - t0)
    finally:
        gc.enable()
    return [statistics.median(t) * 1e6 for t in times]


def main(argv: list[str]) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--old", required=True, help="the src/ folder of the other checkout")
    ap.add_argument("--n", type=int, default=3000)
    ap.add_argument("--passes", type=int, default=5)
    ap.add_argument("--workloads", default="hit,hit_ignore,hit_facade,save")
    a = ap.parse_args(argv)
    tmp = tempfile.mkdtemp(prefix="bench-versions-")
    out: dict[str, Any] = {"n": a.n, "passes": a.passes}
    try:
        pkgs = load(a.old, tmp)
        for workload in a.workloads.split(","):
            rows = []
            pair: list[Callable[[int], Any]] = []
            for p in range(a.passes):
                if workload == "save" or not pair:
                    pair = [calls(pkg, os.path.join(tmp, f"{workload}-{v}-{p}.db"), workload, a.n)
                            for v, pkg in enumerate(pkgs)]
                    if workload != "save":
                        for call in pair:
                            for i in range(a.n):  # the entries the hits find
                                call(i)
                new_us, old_us = one_pass(pair, a.n)
                rows.append({"new_us": new_us, "old_us": old_us, "ratio": new_us / old_us})
            ratio = statistics.median(r["ratio"] for r in rows)
            out[workload] = {"ratio": ratio, "passes": rows}
            print(f"{workload:11s} new/old = {ratio:.3f}  "
                  f"(new {statistics.median(r['new_us'] for r in rows):.1f} us, "
                  f"old {statistics.median(r['old_us'] for r in rows):.1f} us; per pass "
                  + " ".join(f"{r['ratio']:.3f}" for r in rows) + ")", flush=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


if __name__ == "__main__":
    result = main(sys.argv[1:])
    print(json.dumps(result))
