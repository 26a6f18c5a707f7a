"""What durable claims cost a deduplicated save, in one process (issue 21).

    python benchmarks/bench_claims.py               # 300 saves of 6 KB per round, 5 rounds
    python benchmarks/bench_claims.py --saves 50    # a quick run

With ``dedup=True`` each step takes a claim before it runs and releases it
after its save: two more commits. Since issue 21 they commit as entries do
(``synchronous=EXTRA``): before, they ran at ``synchronous=OFF``, which let a
WAL checkpoint run unsynced and damage the store in a power cut. This times
the same deduplicated saves with claims as shipped, with claims unsynced (the
old way, emulated by a subclass), and without dedup, alternating rounds and
keeping the fastest of each; the store lives in ``--dir`` (default: the
system's temporary folder, which must be a real disk for the figures to mean
anything), and prints the ratios.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from typing import Any

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "src"))

from ai2_kit.core.checkpoint import Checkpointer  # noqa: E402
from ai2_kit.core.checkpoint.stores import SQLiteStore  # noqa: E402

VALUE = "x" * 6_000


class UnsyncedClaims(SQLiteStore):
    """Claims and releases committed at synchronous=OFF, as before issue 21."""

    def _unsynced(self, op: Any, *args: Any) -> Any:
        with self._session() as conn:
            conn.execute("PRAGMA synchronous=OFF")
            try:
                return op(*args)
            finally:
                conn.execute("PRAGMA synchronous=EXTRA")

    def _try_claim(self, key: str, owner: str, ttl: float) -> bool:
        return bool(self._unsynced(super()._try_claim, key, owner, ttl))

    def _release_claim(self, key: str, owner: str) -> None:
        self._unsynced(super()._release_claim, key, owner)


def step(i: int) -> str:
    return VALUE


def saves(ckpt: Checkpointer, tag: str, n: int) -> float:
    """Seconds per save of ``n`` new keys."""
    started = time.perf_counter()
    for i in range(n):
        ckpt(f"{tag}/{i}")(step)(i)
    return (time.perf_counter() - started) / n


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--saves", type=int, default=300)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--dir", default=None, help="where the stores live (a real disk)")
    args = parser.parse_args()
    best = {"dedup, claims synced (now)": float("inf"), "dedup, claims unsynced (before)": float("inf"),
            "no dedup": float("inf")}
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        ckpts = {
            "dedup, claims synced (now)": Checkpointer(store=SQLiteStore(os.path.join(tmp, "a.db")), dedup=True),
            "dedup, claims unsynced (before)": Checkpointer(store=UnsyncedClaims(os.path.join(tmp, "b.db")),
                                                            dedup=True),
            "no dedup": Checkpointer(store=SQLiteStore(os.path.join(tmp, "c.db"))),
        }
        try:
            for r in range(args.rounds):
                for label, ckpt in ckpts.items():
                    best[label] = min(best[label], saves(ckpt, f"r{r}", args.saves))
        finally:
            for ckpt in ckpts.values():
                ckpt.close()
    for label, t in best.items():
        print(f"{label:<34} {t * 1e3:8.3f} ms per save")
    now, before, plain = (best[k] for k in best)
    print(f"ratio now/before: {now / before:.2f}; now/no dedup: {now / plain:.2f}; before/no dedup: "
          f"{before / plain:.2f} (fastest of {args.rounds} rounds of {args.saves} saves each)")


if __name__ == "__main__":
    main()
