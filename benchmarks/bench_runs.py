"""What recording runs costs a hit: the same hits with the run's counters on and off, in one process.

    python benchmarks/bench_runs.py              # 20,000 hits, 7 rounds
    python benchmarks/bench_runs.py --hits 2000  # a quick run

A hit bumps its run's counters (a lock and a few additions); the record is
written by a background thread every few seconds, never by the hit. This
measures a hit through a ``Checkpointer`` (SQLite store, ``stale="ignore"``
so that nothing else dominates) with the counters as they are, against the
same hits with ``RunRecorder.hit`` replaced by a no-op, alternating rounds
and keeping the fastest of each, and prints the ratio.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "src"))

from ai2_kit.core.checkpoint import Checkpointer  # noqa: E402
from ai2_kit.core.checkpoint._runs import RunRecorder  # noqa: E402


def square(x: int) -> int:
    return x * x


def hits(ckpt: Checkpointer, n: int) -> float:
    """Seconds per hit over ``n`` hits of one saved key."""
    step = ckpt("k", stale="ignore")(square)
    step(3)
    started = time.perf_counter()
    for _ in range(n):
        step(3)
    return (time.perf_counter() - started) / n


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hits", type=int, default=20_000)
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args()
    counting = RunRecorder.hit
    best = {"recorded": float("inf"), "not recorded": float("inf")}
    with tempfile.TemporaryDirectory() as tmp, Checkpointer(os.path.join(tmp, "bench.db")) as ckpt:
        for _ in range(args.rounds):
            for label in best:
                RunRecorder.hit = counting if label == "recorded" else (lambda self, d: None)  # type: ignore[method-assign]
                best[label] = min(best[label], hits(ckpt, args.hits))
        RunRecorder.hit = counting  # type: ignore[method-assign]
        runs = ckpt.store.iter_runs()
    print(f"hit, run counters on:  {best['recorded'] * 1e6:7.2f} us")
    print(f"hit, run counters off: {best['not recorded'] * 1e6:7.2f} us")
    print(f"ratio on/off: {best['recorded'] / best['not recorded']:.3f} "
          f"(fastest of {args.rounds} rounds of {args.hits} hits each)")
    print(f"runs written to the store: {len(runs)}")


if __name__ == "__main__":
    main()
