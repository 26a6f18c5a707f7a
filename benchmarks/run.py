"""Run the checkpoint benchmark suite and print its tables.

    python benchmarks/run.py              # the full suite (about 10-15 minutes)
    python benchmarks/run.py --quick      # a CI-sized smoke run (seconds)
    python benchmarks/run.py --only W1,W4 --contenders sqlite,dir,floor_full

Every (contender, workload) runs in a fresh process (benchmarks/_worker.py).
Results go to benchmarks/results/ as JSON; the tables and the growth plot are
regenerated into docs/ (``--out``) from them, unless ``--no-docs``.
Re-render the docs from a saved run with ``--render benchmarks/results/latest.json``.
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

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
WORKER = os.path.join(HERE, "_worker.py")
sys.path.insert(0, HERE)

from report import render, write_docs  # noqa: E402

# Only these stop at the time budget; the others must finish every size.
SLOW = {"joblib", "reference"}
SMALL = ["sqlite", "sqlite_ignore", "dir", "joblib", "diskcache", "reference", "floor_full", "floor_normal",
         "pickle_append"]
BIG = ["sqlite", "dir", "joblib", "diskcache", "reference", "np_save", "np_save_fsync"]
WORKLOADS = ["W1", "W2", "W3", "W4", "W5"]


def log(msg: str) -> None:
    sys.stderr.write(msg + "\n")
    sys.stderr.flush()


def run_worker(contender: str, workload: str, n: int, tmp: str, *, budget: float, mb: float = 5.0,
               python: str = sys.executable) -> dict[str, Any]:
    """Run one measurement in a fresh interpreter; a failure becomes a record with ``error``."""
    cmd = [python, WORKER, contender, workload, str(n), tmp, "--budget", str(budget), "--mb", str(mb)]
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=budget * 4 + 300, check=False)
    except subprocess.TimeoutExpired:
        rec = {"contender": contender, "workload": workload, "n": n, "error": "timed out"}
    else:
        lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
        if proc.returncode == 0 and lines:
            rec = json.loads(lines[-1][len("RESULT "):])
        else:
            tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
            rec = {"contender": contender, "workload": workload, "n": n,
                   "error": f"exit {proc.returncode}: {tail[:400]}"}
    rec["wall_s"] = time.perf_counter() - t0
    brief = {k: rec[k] for k in ("mean_us", "x_floor_mean", "open_ms", "ls_ms", "save_s", "load_s", "error",
                                 "stopped_at") if rec.get(k) is not None}
    log(f"  {workload:8s} {contender:14s} n={n:<7d} {rec['wall_s']:6.1f}s {_short(brief)}")
    return rec


def run_hit_pairs(n: int, tmp: str, who: list[str], passes: int) -> dict[str, Any]:
    """The hit goals' figures: benchmarks/bench_hits.py, contenders call by call in one process."""
    cmd = [sys.executable, os.path.join(HERE, "bench_hits.py"), "--n", str(n), "--dir", tmp,
           "--passes", str(max(passes, 3)), "--contenders", ",".join(who), "--json"]
    t0 = time.perf_counter()
    rec: dict[str, Any] = {"contender": "sqlite", "workload": "W2pair", "n": n}
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=3600, check=False)
    except subprocess.TimeoutExpired:
        rec["error"] = "timed out"
    else:
        lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
        if proc.returncode == 0 and lines:
            out = json.loads(lines[-1])
            passes_ = out["passes"]
            rec["passes"] = passes_
            rec["peak_rss_mb"] = out["peak_rss_mb"]
            # Each pass's own ratios; the median over the passes is the figure.
            for name in passes_[0]["x_floor"]:
                rec[f"{name}_x_floor"] = statistics.median(p["x_floor"][name] for p in passes_)
            if "sqlite_x_diskcache" in passes_[0]:
                rec["sqlite_x_diskcache"] = statistics.median(p["sqlite_x_diskcache"] for p in passes_)
            rec["median_us"] = {c: statistics.median(p["median_us"][c] for p in passes_)
                                for c in passes_[0]["median_us"]}
        else:
            tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
            rec["error"] = f"exit {proc.returncode}: {tail[:400]}"
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    rec["wall_s"] = time.perf_counter() - t0
    brief = {k: rec[k] for k in ("sqlite_x_floor", "sqlite_ignore_x_floor", "sqlite_x_diskcache", "error")
             if k in rec}
    log(f"  W2pair   sqlite         n={n:<7d} {rec['wall_s']:6.1f}s {_short(brief)}")
    return rec


def merge_rounds(by_round: dict[str, list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """One W1 record per contender from its rounds: medians, and ratios paired by round.

    An fsync's cost drifts by 2x over minutes on a shared disk, so a ratio of
    two runs made minutes apart says little: ``x_floor_rounds`` divides each
    round's mean by the durable floor's mean *of the same round* (measured
    just before or after), and ``x_floor`` is the median of those.
    """
    floor = by_round.get("floor_full", [])
    out = []
    for recs in by_round.values():
        good = [r for r in recs if "error" not in r and not r.get("stopped_at")]
        if len(recs) == 1 or not good:
            out.append(recs[0])
            continue
        rec = dict(good[0])
        for field in ("mean_us", "median_us", "total_s"):
            rec[field] = statistics.median(r[field] for r in good)
        rec["rounds_mean_us"] = [r["mean_us"] for r in good]
        rec["rounds_median_us"] = [r["median_us"] for r in good]
        pairs = [r["mean_us"] / f["mean_us"] for r, f in zip(recs, floor)
                 if "error" not in r and "error" not in f and not r.get("stopped_at")]
        if pairs:
            rec["x_floor_rounds"] = pairs
            rec["x_floor"] = statistics.median(pairs)
        out.append(rec)
    return out


def merge_pairs(pairs: list[dict[str, Any]], n: int) -> dict[str, Any]:
    """One W1pair record from its rounds: the medians of each round's ratios."""
    good = [r for r in pairs if "error" not in r]
    if not good:
        return pairs[0]
    rec = dict(good[0])
    for field in ("x_floor_mean", "x_floor_median", "ours_mean_us", "floor_mean_us", "ours_median_us",
                  "floor_median_us"):
        rec[field] = statistics.median(r[field] for r in good)
    rec["rounds_x_floor_mean"] = [r["x_floor_mean"] for r in good]
    rec["rounds_x_floor_median"] = [r["x_floor_median"] for r in good]
    rec["n"] = n
    return rec


def _short(d: dict[str, Any]) -> str:
    return " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in d.items())


def git_commit() -> str:
    try:
        out = subprocess.run(["git", "-C", ROOT, "rev-parse", "--short", "HEAD"], capture_output=True,
                             text=True, check=False)
        dirty = subprocess.run(["git", "-C", ROOT, "status", "--porcelain", "src"], capture_output=True,
                               text=True, check=False).stdout.strip()
        return out.stdout.strip() + ("+dirty-src" if dirty else "")
    except OSError:
        return "?"


def run_suite(a: argparse.Namespace) -> dict[str, Any]:
    only = set(a.only.split(",")) if a.only else set(WORKLOADS)
    if "W5" in only:  # the growth figures come from W1 and W2
        only |= {"W1", "W2"}
    pick = set(a.contenders.split(",")) if a.contenders else None
    small = [c for c in SMALL if pick is None or c in pick]
    big = [c for c in BIG if pick is None or c in pick]
    sizes = [int(s) for s in a.sizes.split(",")]
    records: list[dict[str, Any]] = []
    base_tmp = tempfile.mkdtemp(prefix="ckpt-bench-", dir=a.tmp)
    started = time.perf_counter()
    try:
        log(f"interpreter baselines (tmp {base_tmp})")
        for who in ("bare", "sqlite", "diskcache"):
            if who == "bare" or who in small:
                records.append(run_worker(who, "rss", 0, base_tmp, budget=a.budget))
        capped: dict[str, int] = {}
        if only & {"W1", "W2"}:
            for n in sizes:
                log(f"W1/W2 n={n}" + (f", {a.rounds} rounds" if a.rounds > 1 else ""))
                by_round: dict[str, list[dict[str, Any]]] = {}
                for rnd in range(a.rounds):
                    # Rounds alternate the order, so that a contender is not always
                    # measured right after the same other one; W2 runs once.
                    order = small if rnd % 2 == 0 else small[::-1]
                    for c in order:
                        if c in capped:
                            if rnd == 0:
                                records.append({"contender": c, "workload": "W1", "n": n, "skipped":
                                                f"stopped at {capped[c]} for a smaller n"})
                            continue
                        tmp = os.path.join(base_tmp, f"{c}-{n}")
                        budget = a.budget if c in SLOW else max(a.budget, 900.0)
                        rec = run_worker(c, "W1", n, tmp, budget=budget)  # W2 resumes its store
                        by_round.setdefault(c, []).append(rec)
                        done = 0 if "error" in rec else rec.get("stopped_at") or n
                        if rec.get("stopped_at"):
                            capped[c] = rec["stopped_at"]
                        if "W2" in only and done and rnd == 0:
                            records.append(run_worker(c, "W2", done, tmp, budget=budget))
                        shutil.rmtree(tmp, ignore_errors=True)
                records += merge_rounds(by_round)
                if "sqlite" in small and "floor_full" in small:
                    # The save goal's figure: ours and the floor call by call in one process.
                    pairs = []
                    for _ in range(a.rounds):
                        tmp = os.path.join(base_tmp, f"pair-{n}")
                        pairs.append(run_worker("sqlite", "W1pair", n, tmp, budget=max(a.budget, 900.0)))
                        shutil.rmtree(tmp, ignore_errors=True)
                    records.append(merge_pairs(pairs, n))
                if n == a.pair_hits_n and {"sqlite", "floor_full"} <= set(small):
                    who = [c for c in ("sqlite", "sqlite_ignore", "floor_full", "diskcache") if c in small]
                    records.append(run_hit_pairs(n, os.path.join(base_tmp, f"hits-{n}"), who, a.rounds))
        if "W3" in only:
            log(f"W3 ls of {a.w3_n} x {a.w3_mb} MB")
            for c in small:
                if c == "sqlite_ignore":  # the same store as "sqlite" for listing
                    continue
                tmp = os.path.join(base_tmp, f"w3-{c}")
                build = run_worker(c, "W3build", a.w3_n, tmp, budget=a.budget, mb=a.w3_mb)
                records.append(build)
                if "error" not in build:
                    records.append(run_worker(c, "W3", a.w3_n, tmp, budget=a.budget, mb=a.w3_mb))
                    if c == "sqlite":
                        records.append(run_worker("cli", "W3cli", a.w3_n, tmp, budget=a.budget))
                shutil.rmtree(tmp, ignore_errors=True)
        if "W4" in only:
            # One-shot timings of a 512 MB write swing 3x on a shared disk:
            # rounds over all contenders, and the fastest of each is kept.
            w4: dict[tuple[str, str], list[dict[str, Any]]] = {}
            for rnd in range(a.repeat):
                log(f"W4 one array of {a.w4_mb} MB, round {rnd + 1} of {a.repeat}")
                for c in big:
                    tmp = os.path.join(base_tmp, f"w4-{c}")
                    save = run_worker(c, "W4save", 1, tmp, budget=a.budget, mb=a.w4_mb)
                    w4.setdefault((c, "W4save"), []).append(save)
                    if "error" not in save:
                        for wl in ("W4load", "W4warm"):
                            rec = run_worker(c, wl, 1, tmp, budget=a.budget, mb=a.w4_mb)
                            w4.setdefault((c, wl), []).append(rec)
                    shutil.rmtree(tmp, ignore_errors=True)
            for (_, wl), recs in w4.items():
                field = "save_s" if wl == "W4save" else "load_s"
                good = [r for r in recs if "error" not in r]
                best = dict(min(good, key=lambda r: r[field])) if good else recs[0]
                best["all_s"] = [r.get(field) for r in recs]
                records.append(best)
    finally:
        shutil.rmtree(base_tmp, ignore_errors=True)
    return {
        "meta": {
            "date": time.strftime("%Y-%m-%d %H:%M:%S"),
            "python": platform.python_version(),
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
            "commit": git_commit(),
            "quick": a.quick,
            "sizes": sizes,
            "budget_s": a.budget,
            "w3": [a.w3_n, a.w3_mb],
            "w4_mb": a.w4_mb,
            "w4_repeat": a.repeat,
            "w1_rounds": a.rounds,
            "tmp": a.tmp or tempfile.gettempdir(),
            "total_s": time.perf_counter() - started,
        },
        "records": records,
    }


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="tiny sizes: checks that the suite runs")
    p.add_argument("--only", help="comma-separated workloads, e.g. W1,W4 (default: all)")
    p.add_argument("--contenders", help=f"comma-separated subset of {','.join(dict.fromkeys(SMALL + BIG))}")
    p.add_argument("--sizes", help="W1/W2 entry counts (default 1000,10000,100000)")
    p.add_argument("--rounds", type=int, default=1,
                   help="W1 rounds over the contenders, order alternating; medians kept, and each "
                        "contender's ratio to the durable floor paired by round (default 1)")
    p.add_argument("--pair-hits-n", type=int,
                   help="the W1/W2 size at which hits are also measured in pairs in one process "
                        "(benchmarks/bench_hits.py; default 10000, the smallest size with --quick)")
    p.add_argument("--budget", type=float,
                   help=f"seconds per size before {'/'.join(sorted(SLOW))} stop (default 45)")
    p.add_argument("--w3-n", type=int, help="W3 entries (default 200)")
    p.add_argument("--w3-mb", type=float, help="W3 array size in MiB (default 5)")
    p.add_argument("--w4-mb", type=float, help="W4 array size in MiB (default 512)")
    p.add_argument("--repeat", type=int, help="W4 rounds, the fastest kept (default 3, 1 with --quick)")
    p.add_argument("--merge", metavar="JSON",
                   help="keep the records of this earlier results file for the workloads not run now")
    p.add_argument("--tmp", help="where stores are written (default: the system temp dir)")
    p.add_argument("--results", default=os.path.join(HERE, "results"), help="where JSON results go")
    p.add_argument("--out", help="where performance.md and the plot go (default docs/, not with --quick)")
    p.add_argument("--no-docs", action="store_true", help="do not write docs")
    p.add_argument("--render", metavar="JSON", help="only re-render the docs from a saved results file")
    a = p.parse_args(argv)
    q = a.quick
    a.sizes = a.sizes or ("200" if q else "1000,10000,100000")
    a.budget = a.budget or (20.0 if q else 45.0)
    if a.pair_hits_n is None:
        a.pair_hits_n = int(a.sizes.split(",")[0]) if q else 10_000
    a.w3_n = a.w3_n or (10 if q else 200)
    a.w3_mb = a.w3_mb or (1.5 if q else 5.0)
    a.w4_mb = a.w4_mb or (16.0 if q else 512.0)
    a.repeat = a.repeat or (1 if q else 3)
    if a.out is None and not q:
        a.out = os.path.join(ROOT, "docs")
    return a


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    if a.render:
        with open(a.render, encoding="utf-8") as f:
            results = json.load(f)
    else:
        results = run_suite(a)
        if a.merge:
            with open(a.merge, encoding="utf-8") as f:
                old = json.load(f)
            fresh = {r["workload"] for r in results["records"] if r["workload"] != "rss"}
            kept = [r for r in old["records"] if r["workload"] not in fresh]
            results["records"] = kept + [r for r in results["records"] if r["workload"] != "rss"]
            results["meta"] = {**old["meta"], "merged": results["meta"], "w4_repeat": a.repeat}
        os.makedirs(a.results, exist_ok=True)
        stamp = time.strftime("%Y%m%d-%H%M%S")
        for name in (f"run-{stamp}.json", "latest.json"):
            with open(os.path.join(a.results, name), "w", encoding="utf-8") as f:
                json.dump(results, f, indent=1)
        log(f"results: {os.path.join(a.results, f'run-{stamp}.json')}")
    print(render(results))
    if a.out and not a.no_docs:
        for path in write_docs(results, a.out):
            log(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
