#!/usr/bin/env python3
"""Run the fault-injection tests in their long versions and print the reliability table.

The tests in tests/test_durability.py, tests/test_faults.py,
tests/test_powercut.py and tests/test_interrupts.py (the signal storm) are the single
implementation of every scenario; CI runs them short, this script scales them
up through environment variables and collects the figures they print.

    python scripts/stress.py                  # long run (about 45 minutes, power cuts 13 of them)
    python scripts/stress.py --quick          # CI-sized, a few minutes
    python scripts/stress.py --markdown docs/reliability-table.md
    python scripts/stress.py --fuzz 2000      # only the record fuzz test, 2000 rounds per store kind
    python scripts/stress.py --crowd 100      # only the power cuts of many writers at once
                                              # (claims, renewals, run records), 100 cuts per store
    python scripts/stress.py --liveness       # tests/test_liveness.py, long: cancellation
                                              # and Ctrl-C storms (every wait ends)
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from collections import defaultdict

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LONG = {
    "AI2_KIT_KILL_TRIALS": "200",
    "AI2_KIT_KILL_BIG_BYTES": str(50_000_000),
    "AI2_KIT_LOAD_SECONDS": "30",
    "AI2_KIT_DAMAGE_TRIALS": "200",
    "AI2_KIT_POWERCUT_TRIALS": "200",
    "AI2_KIT_CROWD_TRIALS": "200",
    "AI2_KIT_STORM_SIGNALS": "2000",
}
CROWD = "tests/test_powercut.py::test_many_writers_with_claims_and_runs_lose_nothing"
TESTS = [
    "tests/test_durability.py::test_sigkill_during_writes_loses_nothing",
    "tests/test_durability.py::test_sigkill_during_overwrites_keeps_a_complete_value",
    "tests/test_faults.py",
    "tests/test_powercut.py",  # power cuts on the FUSE file system of tests/_powerfs.py
    # SIGINTs at random moments of saves, claims and run flushes (issue 21)
    "tests/test_interrupts.py::test_a_signal_storm_leaves_every_connection_durable",
]


def make_table(output: str) -> list[str]:
    """The markdown table from the RELIABILITY rows in pytest's output."""
    rows: dict[tuple[str, str], dict[str, int]] = defaultdict(lambda: defaultdict(int))
    for line in output.splitlines():
        # With -q, a row may follow the progress dots on the same line.
        if "RELIABILITY {" in line:
            row = json.loads(line.split("RELIABILITY ", 1)[1])
            agg = rows[(row["scenario"], row["store"])]
            for field in ("trials", "faults", "acknowledged", "lost"):
                agg[field] += row[field]
    table = ["| scenario | store | trials | faults injected | entries acknowledged | entries lost |",
             "| --- | --- | ---: | ---: | ---: | ---: |"]
    for (scenario, store), agg in rows.items():
        table.append(f"| {scenario} | {store} | {agg['trials']:,} | {agg['faults']:,} | "
                     f"{agg['acknowledged']:,} | {agg['lost']:,} |")
    return table


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="CI-sized trials")
    parser.add_argument("--markdown", help="also write the table to this file")
    parser.add_argument("-k", default="", help="pytest -k expression to select scenarios or stores")
    parser.add_argument("--parse", metavar="LOG", help="only rebuild the table from a saved stress.log")
    parser.add_argument("--fuzz", type=int, metavar="ROUNDS",
                        help="only the fuzz test of records and outputs (tests/test_records.py), ROUNDS rounds "
                             "per store kind; AI2_KIT_FUZZ_SEED picks another seed")
    parser.add_argument("--crowd", type=int, metavar="CUTS",
                        help="only the power cuts of several writer processes at once, CUTS per store")
    parser.add_argument("--liveness", action="store_true",
                        help="run tests/test_liveness.py with many more cancellation and Ctrl-C storms instead")
    args = parser.parse_args()
    if args.fuzz:
        env = dict(os.environ, AI2_KIT_FUZZ_ROUNDS=str(args.fuzz))
        cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-o", "timeout=0",
               "tests/test_records.py::test_fuzz_records"]
        return subprocess.run(cmd, cwd=ROOT, env=env).returncode
    if args.liveness:
        cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-o", "timeout=0",
               "tests/test_liveness.py", *(["-k", args.k] if args.k else [])]
        env = dict(os.environ, AI2_KIT_LIVENESS_LONG="" if args.quick else "1")
        return subprocess.run(cmd, cwd=ROOT, env=env).returncode
    if args.parse:
        with open(args.parse, encoding="utf-8") as f:
            print("\n".join(make_table(f.read())))
        return 0
    env = dict(os.environ)
    if not args.quick:
        env.update(LONG)
    # No per-test timeout: 200 kill trials of one store take several minutes.
    tests = TESTS
    if args.crowd:
        env["AI2_KIT_CROWD_TRIALS"] = str(args.crowd)
        tests = [CROWD]
    cmd = [sys.executable, "-m", "pytest", "-q", "-s", "-p", "no:cacheprovider", "-o", "timeout=0", *tests]
    if args.k:
        cmd += ["-k", args.k]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    table = make_table(proc.stdout)
    print("\n".join(table))
    summary = proc.stdout.strip().splitlines()[-1:] or ["(no pytest summary)"]
    print(f"\npytest: {summary[0]}")
    if args.markdown:
        with open(args.markdown, "w", encoding="utf-8") as f:
            f.write("\n".join(table) + "\n")
    log = os.path.join(ROOT, "benchmarks", "results", "stress.log")
    os.makedirs(os.path.dirname(log), exist_ok=True)
    with open(log, "w", encoding="utf-8") as f:
        f.write(proc.stdout + proc.stderr)
    print(f"full pytest output: {log}")
    if proc.returncode != 0:
        print(proc.stdout[-5000:], proc.stderr[-3000:], file=sys.stderr)
    return proc.returncode


if __name__ == "__main__":
    raise SystemExit(main())
