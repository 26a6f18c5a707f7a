"""Small-value hits, paired in one process: ours against the floor and diskcache.

    python benchmarks/bench_hits.py                      # 10,000 keys, stores in a temporary folder
    python benchmarks/bench_hits.py --n 10000 --dir /tmp/hits --passes 3
    python benchmarks/bench_hits.py --dir /tmp/hits --profile sqlite_ignore

Issue 15's hit goals are ratios (ours with staleness checks on <= 0.8x
diskcache's memoize hit and <= 2x the floor; ours with ``stale="ignore"`` <=
1.3x the floor), and on a shared machine a contender measured a minute after
another can read 30% slower for reasons of its own. So here every contender
runs in the same process, call by call in turn: key ``i`` is asked of each
(the one that goes first rotating with ``i``), each call timed on its own.
A contender's figure is the median over its calls; the ratios divide medians
of the same pass. ``--passes`` repeats the whole walk over the keys (the
later passes find the file pages and SQLite's cache warm; the first is the
closest to benchmarks/run.py's W2).

Contenders (benchmarks/_worker.py's, so the calls are W2's):

- ``sqlite``: ours, SQLite store, staleness checks on (the default);
  ``ckpt(key_of(i))(small_step)(i)``, a wrapper made per call as workflows do.
- ``sqlite_ignore``: the same with ``stale="ignore"``.
- ``floor_full``: one indexed SELECT and ``pickle.loads``: the floor.
- ``diskcache``: ``diskcache.Cache.memoize()``.
- ``facade`` (not by default): ours through the seed interface,
  ``apply_checkpoint(key)(fn)(i)`` after ``set_checkpoint_file``.

Each store is built by W1 (``_worker.w1_save``: its saves, as benchmarks/run.py
makes them) in a process of its own, under ``--dir``, and kept there (built
with ``_worker`` imported, not run as ``__main__``: diskcache's memoize and our
fingerprints name the step by its module, so the calls here must find them):
a later run with the same ``--dir`` and ``--n`` measures the same files (e.g.
the code before and after a change, with ``PYTHONPATH`` pointing at either).
``--profile C`` runs cProfile over one pass of contender C instead.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any, Callable

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import _worker  # noqa: E402

CONTENDERS = ["sqlite", "sqlite_ignore", "floor_full", "diskcache"]


class Facade(_worker.Ours):
    """Ours through the seed interface: ``apply_checkpoint(key)(fn)(i)`` on the default store."""

    def open(self, fn: _worker.Step) -> _worker.Call:
        from ai2_kit.core.checkpoint import apply_checkpoint, set_checkpoint_file

        self.ckpt = set_checkpoint_file(os.path.join(self.root, self.name))
        key_of = _worker.key_of
        return lambda i: apply_checkpoint(key_of(i))(fn)(i)


KINDS: dict[str, type[_worker.Contender]] = {**_worker.CONTENDERS, "facade": Facade}


def build(root: str, n: int, names: list[str]) -> None:
    """Each contender's store of ``n`` small entries, made by W1 in a fresh process (once)."""
    for name in names:
        where = os.path.join(root, name)
        done = os.path.join(where, f".built-{n}")
        if os.path.exists(done):
            continue
        os.makedirs(where, exist_ok=True)
        t0 = time.perf_counter()
        proc = subprocess.run([sys.executable, __file__, "--build-one", name, "--n", str(n), "--dir", where],
                              capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            raise SystemExit(f"building {name} failed: {proc.stderr.strip()[-500:]}")
        open(done, "w").close()  # noqa: SIM115 - an empty marker
        sys.stderr.write(f"built {name}: {n} entries in {time.perf_counter() - t0:.1f} s\n")


def open_all(root: str, names: list[str]) -> tuple[list[_worker.Contender], list[Callable[[int], Any]]]:
    contenders = [KINDS[name](os.path.join(root, name)) for name in names]
    return contenders, [c.open(_worker.small_step) for c in contenders]


def one_pass(calls: list[Callable[[int], Any]], n: int) -> list[list[float]]:
    """Key by key, each contender in turn (rotating who goes first); seconds per call."""
    times: list[list[float]] = [[] for _ in calls]
    clock = time.perf_counter
    m = len(calls)
    order = [[(s + j) % m for j in range(m)] for s in range(m)]
    bad = 0
    for i in range(n):
        expected = _worker.small_value(i)
        for j in order[i % m]:
            call = calls[j]
            t0 = clock()
            value = call(i)
            times[j].append(clock() - t0)
            if value != expected:
                bad += 1
    if bad or _worker.RUNS[0]:
        raise SystemExit(f"not all hits: {bad} wrong values, {_worker.RUNS[0]} steps ran")
    return times


def main(argv: list[str]) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=10_000, help="keys (entries per store)")
    p.add_argument("--dir", default=None, help="where the stores are built and kept (default: a temporary one)")
    p.add_argument("--passes", type=int, default=3, help="walks over all the keys")
    p.add_argument("--contenders", default=",".join(CONTENDERS))
    p.add_argument("--profile", default=None, metavar="C", help="cProfile one pass of contender C")
    p.add_argument("--json", action="store_true", help="print the result as JSON too")
    p.add_argument("--build-one", default=None, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.build_one:
        _worker.import_for("sqlite" if a.build_one == "facade" else a.build_one)
        return _worker.w1_save(KINDS[a.build_one](a.dir), a.n, 1e9)
    names = a.contenders.split(",")
    root = a.dir or tempfile.mkdtemp(prefix="bench-hits-")
    build(root, a.n, names)
    for name in names:
        _worker.import_for("sqlite" if name == "facade" else name)
    contenders, calls = open_all(root, names)
    if a.profile:
        import cProfile
        import pstats

        call = calls[names.index(a.profile)]
        prof = cProfile.Profile()
        prof.enable()
        for i in range(a.n):
            call(i)
        prof.disable()
        pstats.Stats(prof).sort_stats("tottime").print_stats(25)
        return {}
    gc.collect()
    out: dict[str, Any] = {"n": a.n, "loadavg": os.getloadavg()[0], "passes": []}
    for k in range(a.passes):
        times = one_pass(calls, a.n)
        med = {name: statistics.median(t) * 1e6 for name, t in zip(names, times)}
        row: dict[str, Any] = {"median_us": med}
        if "floor_full" in med:
            row["x_floor"] = {nm: med[nm] / med["floor_full"] for nm in names
                              if nm.startswith("sqlite") or nm == "facade"}
        if "diskcache" in med and "sqlite" in med:
            row["sqlite_x_diskcache"] = med["sqlite"] / med["diskcache"]
        out["passes"].append(row)
        cells = "  ".join(f"{nm} {v:5.2f}" for nm, v in med.items())
        ratios = "  ".join(f"{nm}/floor {v:.2f}x" for nm, v in row.get("x_floor", {}).items())
        if "sqlite_x_diskcache" in row:
            ratios += f"  sqlite/diskcache {row['sqlite_x_diskcache']:.2f}x"
        sys.stdout.write(f"pass {k + 1} (median us)  {cells}\n    {ratios}\n")
    for c in contenders:
        c.close()
    out["peak_rss_mb"] = _worker.peak_rss_mb()
    if a.json:
        sys.stdout.write(json.dumps(out) + "\n")
    return out


if __name__ == "__main__":
    main(sys.argv[1:])
