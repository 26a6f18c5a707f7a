"""Tables, target checks and the growth plot, from the results JSON of run.py."""

from __future__ import annotations

import os
from typing import Any, Iterable

__all__ = ["render", "write_docs", "targets", "LABELS"]

LABELS = {
    "sqlite": "ours: SQLite store",
    "sqlite_ignore": "ours: SQLite store, stale=\"ignore\"",
    "dir": "ours: directory store",
    "joblib": "joblib.Memory",
    "diskcache": "diskcache memoize",
    "reference": "reference (dict re-pickled per entry)",
    "floor_full": "floor: SQLite INSERT, WAL+FULL",
    "floor_normal": "floor: SQLite INSERT, WAL+NORMAL (info)",
    "pickle_append": "floor: pickle.dump appended",
    "np_save": "np.save / np.load",
    "np_save_fsync": "np.save + fsync / np.load",
    "cli": "CLI `ai2-kit tool checkpoint load F - ls`",
    "bare": "bare interpreter",
}
OURS = ("sqlite", "dir")
ORDER = list(LABELS)


class Results:
    def __init__(self, data: dict[str, Any]) -> None:
        self.meta = data["meta"]
        self.records = data["records"]

    def get(self, workload: str, contender: str, n: int | None = None) -> dict[str, Any] | None:
        for r in self.records:
            if r["workload"] == workload and r["contender"] == contender and (n is None or r["n"] == n):
                return r
        return None

    def contenders(self, *workloads: str) -> list[str]:
        seen = {r["contender"] for r in self.records if r["workload"] in workloads}
        return [c for c in ORDER if c in seen]

    def sizes(self) -> list[int]:
        return sorted({r["n"] for r in self.records if r["workload"] == "W1"})


def _ok(r: dict[str, Any] | None) -> bool:
    return r is not None and "error" not in r and "skipped" not in r


def num(x: float | None, digits: int = 3) -> str:
    if x is None:
        return "-"
    if abs(x) >= 100:
        return f"{x:,.0f}"
    return f"{x:.{digits}g}"


def ratio(a: float | None, b: float | None) -> float | None:
    if a is None or b is None or b == 0:
        return None
    return a / b


def rx(x: float | None) -> str:
    return "-" if x is None else f"{x:.2f}x"


def table(headers: list[str], rows: Iterable[list[str]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def _label(c: str) -> str:
    return LABELS.get(c, c)


def _problem(r: dict[str, Any] | None) -> str:
    if r is None:
        return "not run"
    if "skipped" in r:
        return r["skipped"]
    return "error: " + r.get("error", "?")


# -- sections ---------------------------------------------------------------------


def section_w1(res: Results) -> str:
    sizes = res.sizes()
    cs = res.contenders("W1")
    headers = ["contender"]
    for n in sizes:
        headers += [f"n={n:,}: us/save", "x floor FULL", "x ours SQLite"]
    rows = []
    for c in cs:
        row = [_label(c)]
        for n in sizes:
            r = res.get("W1", c, n)
            if not _ok(r):
                row += [_problem(r), "", ""]
                continue
            assert r is not None
            cell = num(r["mean_us"])
            if r.get("stopped_at"):
                cell += f" (stopped at {r['stopped_at']:,})"
            floor, ours = res.get("W1", "floor_full", n), res.get("W1", "sqlite", n)
            x = r.get("x_floor") or ratio(r["mean_us"], floor["mean_us"] if _ok(floor) else None)  # type: ignore[index]
            row += [cell, rx(x),
                    rx(ratio(r["mean_us"], ours["mean_us"] if _ok(ours) else None))]  # type: ignore[index]
        rows.append(row)
    out = [
        "## W1 save: n steps returning about 1 KB each",
        "",
        "Mean time per call of a step that is not stored yet (look-up, run, save), over all n calls, "
        "into a store that starts empty (with several rounds: the median of the rounds' means, and "
        "\"x floor\" the median of each round's ratio to the floor measured in the same round). "
        "Slow contenders stop after the time budget "
        f"({res.meta['budget_s']:.0f} s per size) and are not run at larger n.",
        "",
        table(headers, rows),
    ]
    # Every contender against every other, at the largest size each finished.
    means = {}
    for c in cs:
        for n in reversed(sizes):
            r = res.get("W1", c, n)
            if _ok(r):
                means[c] = r["mean_us"]  # type: ignore[index]
                break
    if len(means) > 1:
        names = list(means)
        out += ["", "Pairwise ratios of mean save time (row / column), at the largest n each "
                "contender ran:", ""]
        out.append(table([""] + [c for c in names],
                         [[c] + [rx(ratio(means[c], means[d])) for d in names] for c in names]))
    return "\n".join(out)


def section_w2(res: Results) -> str:
    out = ["## W2 resume: a new process opens the store and calls all n steps again",
           "",
           "Open: constructing the store object (bytes read: `rchar` from /proc/self/io during the open). "
           "Hit: one call returning the stored value (ours: staleness checks on, the default, unless "
           "marked stale=\"ignore\"; the floor: one SELECT and one `pickle.loads`). "
           "Every value is compared with the original after "
           "its call (outside the timing); `reran` counts step functions that ran although stored.",
           ""]
    for n in res.sizes():
        rows = []
        floor = res.get("W2", "floor_full", n)
        dc = res.get("W2", "diskcache", n)
        for c in res.contenders("W2"):
            r = res.get("W2", c, n)
            if r is None:
                w1 = res.get("W1", c, n)
                if w1 is not None and not _ok(w1):
                    rows.append([_label(c), _problem(w1)] + [""] * 8)
                continue
            if not _ok(r):
                rows.append([_label(c), _problem(r)] + [""] * 8)
                continue
            checked = f"{r['checked']:,}"
            if r.get("stopped_at"):
                checked += f" (stopped at {r['stopped_at']:,})"
            rows.append([_label(c), num(r["open_ms"]), f"{r['open_read_bytes']:,}", num(r["mean_us"]),
                         num(r["median_us"]),
                         rx(ratio(r["mean_us"], floor["mean_us"] if _ok(floor) else None)),  # type: ignore[index]
                         rx(ratio(r["mean_us"], dc["mean_us"] if _ok(dc) else None)),  # type: ignore[index]
                         checked, str(r["mismatches"]), str(r["reran"])])
        out += [f"### n = {n:,}", "",
                table(["contender", "open ms", "bytes read at open", "us/hit mean", "us/hit median",
                       "x floor FULL read", "x diskcache hit", "values checked", "unequal", "reran"], rows), ""]
    return "\n".join(out)


def section_w3(res: Results) -> str:
    n, mb = res.meta["w3"]
    rows = []
    for c in res.contenders("W3", "W3build"):
        build, r = res.get("W3build", c), res.get("W3", c)
        if not _ok(build) or not _ok(r):
            rows.append([_label(c), _problem(r if _ok(build) else build)] + [""] * 6)
            continue
        assert r is not None and build is not None
        rows.append([_label(c), f"{r['listed']:,}", num(r["ls_ms"]), num(r["baseline_rss_mb"]),
                     num(r["peak_rss_mb"]), num(r["peak_rss_mb"] - r["baseline_rss_mb"]),
                     f"{r['read_bytes'] / 2**20:,.2f}", num(build["build_s"])])
    cli = res.get("W3cli", "cli")
    bare = res.get("rss", "bare")
    if cli is not None:
        if _ok(cli) and cli.get("returncode") == 0:
            base = bare["peak_rss_mb"] if _ok(bare) else None  # type: ignore[index]
            rows.append([_label("cli"), f"{cli['listed']:,}", num(cli["ls_ms"]) + " (whole process)",
                         num(base) + " (bare)", num(cli["child_peak_rss_mb"]),
                         num(ratio(cli["child_peak_rss_mb"], 1) - base if base else None), "-", "-"])
        else:
            rows.append([_label("cli"), "not available: " + str(cli.get("error", _problem(cli)))[:120]]
                        + [""] * 6)
    return "\n".join([
        f"## W3 list: a store of {n} entries of {mb:g} MB arrays",
        "",
        "`ls` in a fresh process: open the store and list every key (our stores: `iter_meta()`). "
        "Baseline: the process's peak RSS after importing the contender's library, before opening. "
        "MB read: bytes read through read() during open+ls (values are "
        f"{n * mb:,.0f} MB in all). Build: writing the store (not part of the measure; the reference "
        "store is written in one go, as rewriting it per entry would not finish).",
        "",
        table(["contender", "listed", "ls ms", "baseline RSS MB", "peak RSS MB", "peak - baseline MB",
               "MB read", "build s"], rows),
    ])


def section_w4(res: Results) -> str:
    mb = res.meta["w4_mb"]
    np_save, np_fsync = res.get("W4save", "np_save"), res.get("W4save", "np_save_fsync")
    np_cold, np_warm = res.get("W4load", "np_save"), res.get("W4warm", "np_save")
    rows = []
    for c in res.contenders("W4save"):
        s, ld, lw = res.get("W4save", c), res.get("W4load", c), res.get("W4warm", c)
        if not (_ok(s) and _ok(ld) and _ok(lw)):
            bad = next(r for r in (s, ld, lw) if not _ok(r))
            rows.append([_label(c), _problem(bad)] + [""] * 10)
            continue
        assert s is not None and ld is not None and lw is not None
        arr = s["array_mb"]
        rows.append([
            _label(c), num(s["save_s"]),
            rx(ratio(s["save_s"], np_save["save_s"] if _ok(np_save) else None)),  # type: ignore[index]
            rx(ratio(s["save_s"], np_fsync["save_s"] if _ok(np_fsync) else None)),  # type: ignore[index]
            num(ld["load_s"]),
            rx(ratio(ld["load_s"], np_cold["load_s"] if _ok(np_cold) else None)),  # type: ignore[index]
            num(lw["load_s"]),
            rx(ratio(lw["load_s"], np_warm["load_s"] if _ok(np_warm) else None)),  # type: ignore[index]
            rx((s["peak_rss_mb"] - s["baseline_rss_mb"]) / arr),
            rx(max(r["peak_rss_mb"] - r["baseline_rss_mb"] for r in (ld, lw)) / arr),
            "yes" if ld["equal"] and lw["equal"] and not (ld["reran"] or lw["reran"]) else "NO",
        ])
    return "\n".join([
        f"## W4 big value: one {mb:g} MB numpy array saved, then loaded in another process",
        "",
        "Save: the wrapped call of a step returning an array that already exists (or np.save of it). "
        "Load: a fresh process calls the step again (or np.load), once with the store's files "
        "dropped from the page cache (cold: `os.sync()` then `posix_fadvise(DONTNEED)`), once "
        "right after reading them through (warm). Memory: (peak RSS - RSS after imports) / array "
        f"size, so 1.00x is the array alone. Fastest of {res.meta.get('w4_repeat', 1)} rounds "
        "(each a fresh process per step; every round's times are in the results JSON).",
        "",
        table(["contender", "save s", "x np.save", "x np.save+fsync", "load cold s", "x np.load cold",
               "load warm s", "x np.load warm", "save memory / array", "load memory / array", "equal"],
              rows),
    ])


def growth(res: Results, c: str) -> dict[str, Any]:
    """Save medians by store size (blocks of the largest W1 run) and hit medians by store size."""
    save: dict[int, float] = {}
    curve: list[tuple[int, float]] = []
    for n in reversed(res.sizes()):
        r = res.get("W1", c, n)
        if _ok(r) and r["blocks"]:  # type: ignore[index]
            curve = [(b[0], b[1]) for b in r["blocks"]]  # type: ignore[index]
            for at, med in curve:
                if at in res.sizes():
                    save[at] = med
            break
    hits = {}
    for n in res.sizes():
        r = res.get("W2", c, n)
        if _ok(r) and not r.get("stopped_at"):  # type: ignore[union-attr]
            hits[n] = r["median_us"]  # type: ignore[index]
    return {"save": save, "curve": curve, "hits": hits}


def section_w5(res: Results) -> str:
    sizes = res.sizes()
    rows = []
    for c in res.contenders("W1"):
        g = growth(res, c)
        s, h = g["save"], g["hits"]
        row = [_label(c)] + [num(s.get(n)) for n in sizes]
        row.append(rx(ratio(s.get(sizes[-1]), s.get(sizes[0]))) if len(sizes) > 1 else "-")
        row += [num(h.get(n)) for n in sizes]
        row.append(rx(ratio(h.get(sizes[-1]), h.get(sizes[0]))) if len(sizes) > 1 else "-")
        rows.append(row)
    big, small = f"{sizes[-1]:,}", f"{sizes[0]:,}"
    headers = (["contender"] + [f"save us @{n:,}" for n in sizes] + [f"save {big}/{small}"]
               + [f"hit us @{n:,}" for n in sizes] + [f"hit {big}/{small}"])
    return "\n".join([
        "## W5 growth: cost per save and per hit as the store grows",
        "",
        "Save: median over the 1,000 saves that brought the store to that size (from the largest W1 "
        "run). Hit: median per hit in W2 on a store of that size. Flat is the goal.",
        "",
        table(headers, rows),
        "",
        "![time per save and per hit against store size](performance-growth.png)",
    ])


# -- targets ----------------------------------------------------------------------


def targets(res: Results) -> list[tuple[str, str, str, bool | None]]:
    """(target, store, measured, met) for each target of the issue; met None = not measured."""
    out: list[tuple[str, str, str, bool | None]] = []
    sizes = res.sizes()

    def largest(workload: str, c: str) -> dict[str, Any] | None:
        for n in reversed(sizes):
            r = res.get(workload, c, n)
            if _ok(r) and not r.get("stopped_at"):  # type: ignore[union-attr]
                return r
        return None

    def same_n(workload: str, c: str, other: str) -> tuple[dict[str, Any], dict[str, Any]] | None:
        for n in reversed(sizes):
            a, b = res.get(workload, c, n), res.get(workload, other, n)
            if _ok(a) and _ok(b) and not a.get("stopped_at") and not b.get("stopped_at"):  # type: ignore[union-attr]
                return a, b  # type: ignore[return-value]
        return None

    hits = next((r for n in sizes if _ok(r := res.get("W2pair", "sqlite", n))), None)
    # Issue 15's goals for 1 KB values on the SQLite store: (goal, workload, ours, reference, bound).
    for goal, workload, ours, ref, bound in (
        ("sequential durable save <= 1.15x the durable floor (WAL + FULL INSERT)", "W1", "sqlite", "floor_full",
         1.15),
        ("hit, staleness checks on, <= 0.8x diskcache's memoize hit", "W2", "sqlite", "diskcache", 0.8),
        ("hit, staleness checks on, <= 2x the floor (SELECT + unpickle)", "W2", "sqlite", "floor_full", 2.0),
        ('hit, stale="ignore", <= 1.3x the floor', "W2", "sqlite_ignore", "floor_full", 1.3),
    ):
        got = same_n(workload, ours, ref)
        if got:
            q = got[0]["mean_us"] / got[1]["mean_us"]
            how = f"{q:.2f}x at n={got[0]['n']:,}"
            pair = res.get("W1pair", "sqlite", got[0]["n"]) if ours == "sqlite" and ref == "floor_full" else None
            paired = f"{ours}_x_floor" if ref == "floor_full" else "sqlite_x_diskcache"
            if workload == "W1" and _ok(pair):
                # Ours and the floor called in turn in one process (see _worker.w1_pair).
                assert pair is not None
                q = pair["x_floor_mean"]
                rounds = ", ".join(f"{x:.2f}" for x in pair.get("rounds_x_floor_mean", [q]))
                how = (f"{q:.2f}x at n={got[0]['n']:,}, called in turn with the floor in one process "
                       f"({pair['ours_mean_us']:.0f} vs {pair['floor_mean_us']:.0f} us; rounds {rounds}; "
                       f"ratio of medians {pair['x_floor_median']:.2f}x)")
            elif workload == "W2" and hits is not None and paired in hits:
                # Contenders call by call in one process (see benchmarks/bench_hits.py).
                q = hits[paired]
                us = hits["median_us"]
                how = (f"{q:.2f}x at n={hits['n']:,}, called in turn in one process (medians: {us[ours]:.1f} vs "
                       f"{us[ref]:.1f} us; {len(hits['passes'])} passes); separate processes: {how}")
            elif ref == "floor_full" and workload == "W1" and "x_floor" in got[0]:
                # Rounds: each paired with the floor's run of the same round (see run.merge_rounds).
                q = got[0]["x_floor"]
                rounds = ", ".join(f"{x:.2f}" for x in got[0]["x_floor_rounds"])
                how = f"{q:.2f}x at n={got[0]['n']:,} (median of rounds {rounds})"
            out.append((goal, ours, how, q <= bound))

    for c in OURS:
        w1, f1, d1 = largest("W1", c), largest("W1", "floor_full"), largest("W1", "diskcache")
        if w1 and f1 and w1["n"] == f1["n"] and c != "sqlite":  # the SQLite store's goal is above
            q = w1["mean_us"] / f1["mean_us"]
            out.append(("save <= 1.3x bare SQLite floor", c, f"{q:.2f}x at n={w1['n']:,}", q <= 1.3))
        if w1 and d1 and w1["n"] == d1["n"]:
            q = d1["mean_us"] / w1["mean_us"]
            out.append(("save ~3x faster than diskcache", c, f"diskcache/ours = {q:.2f}x", q >= 2.5))
        w2, f2 = largest("W2", c), largest("W2", "floor_full")
        if w2 and f2 and w2["n"] == f2["n"] and c != "sqlite":
            q = w2["mean_us"] / f2["mean_us"]
            out.append(("hit <= 2x floor read", c, f"{q:.2f}x at n={w2['n']:,}", q <= 2.0))
        g = growth(res, c)
        if len(sizes) > 1:
            a, b = sizes[0], sizes[-1]
            for what in ("save", "hits"):
                q = ratio(g[what].get(b), g[what].get(a))
                out.append((f"{what.rstrip('s')} at {b:,} <= 1.2x at {a:,}", c,
                            rx(q), None if q is None else q <= 1.2))
        r = res.get("W2", c, sizes[-1]) if sizes else None
        if _ok(r):
            assert r is not None
            fine = r["open_ms"] < 50 and r["open_read_bytes"] < 1 << 20
            out.append((f"open a {sizes[-1]:,}-entry store < 50 ms, values untouched", c,
                        f"{r['open_ms']:.1f} ms, {r['open_read_bytes']:,} bytes read", fine))
        ls, bare = res.get("W3", c), res.get("rss", "bare")
        if _ok(ls) and _ok(bare):
            assert ls is not None and bare is not None
            extra = ls["peak_rss_mb"] - bare["peak_rss_mb"]
            n3, mb3 = res.meta["w3"]
            fine = extra <= 10 and ls["read_bytes"] < n3 * mb3 * 2**20 / 100
            out.append(("ls: bare interpreter + <= 10 MB, values never read", c,
                        f"+{extra:.1f} MB over bare python, {ls['read_bytes'] / 2**20:.2f} MB read", fine))
        s, ld, lw = res.get("W4save", c), res.get("W4load", c), res.get("W4warm", c)
        ns, nf = res.get("W4save", "np_save"), res.get("W4save", "np_save_fsync")
        nl, nw = res.get("W4load", "np_save"), res.get("W4warm", "np_save")
        if _ok(s) and _ok(ld) and _ok(lw):
            assert s is not None and ld is not None and lw is not None
            if _ok(ns):
                q = s["save_s"] / ns["save_s"]  # type: ignore[index]
                out.append(("big save <= 1.2x np.save", c, f"{q:.2f}x", q <= 1.2))
            if _ok(nf):
                q = s["save_s"] / nf["save_s"]  # type: ignore[index]
                out.append(("big save <= 1.15x np.save + fsync", c, f"{q:.2f}x", q <= 1.15))
            if _ok(nl):
                q = ld["load_s"] / nl["load_s"]  # type: ignore[index]
                out.append(("big load <= 1.15x np.load (cold cache)", c, f"{q:.2f}x", q <= 1.15))
            if _ok(nw):
                q = lw["load_s"] / nw["load_s"]  # type: ignore[index]
                out.append(("big load <= 1.3x np.load (warm cache)", c, f"{q:.2f}x", q <= 1.3))
            arr = s["array_mb"]
            q = max(r["peak_rss_mb"] - r["baseline_rss_mb"] for r in (s, ld, lw)) / arr
            out.append(("big value peak memory <= array + 10%", c, f"{q:.2f}x the array", q <= 1.1))
    return out


def section_targets(res: Results) -> str:
    rows = [[t, _label(c), m, "-" if ok is None else ("met" if ok else "MISSED")]
            for t, c, m, ok in targets(res)]
    return "\n".join(["## Targets", "", table(["target", "store", "measured", ""], rows)])


def section_env(res: Results) -> str:
    m = res.meta
    rss = [f"{_label(r['contender'])} {r['peak_rss_mb']:.1f} MB" for r in res.records
           if r["workload"] == "rss" and _ok(r)]
    probes = [r["fsync_us"] for r in res.records if "fsync_us" in r]
    loads = [r["loadavg"] for r in res.records if "loadavg" in r]
    noise = ""
    if probes and loads:
        noise = (f" Machine noise during the run: fsync of 1 KB took {min(probes):.0f}-{max(probes):.0f} us "
                 f"(median probe per worker), 1-minute load average {min(loads):.1f}-{max(loads):.1f} "
                 f"on {m['cpus']} CPUs (other work was running on this shared machine).")
    return "\n".join([
        f"Run {m['date']}, commit {m['commit']}, Python {m['python']}, {m['platform']}, {m['cpus']} CPUs, "
        f"stores in {m['tmp']}; suite took {m['total_s'] / 60:.1f} min"
        + (" (**--quick smoke sizes: not meaningful as figures**)" if m.get("quick") else "") + ".",
        "Peak RSS (VmHWM) of an interpreter with only the imports: " + ", ".join(rss) + "." + noise,
    ])


def render(data: dict[str, Any]) -> str:
    res = Results(data)
    parts = [section_env(res), section_targets(res)]
    wl = {r["workload"] for r in res.records}
    if "W1" in wl:
        parts.append(section_w1(res))
    if "W2" in wl:
        parts.append(section_w2(res))
    if wl & {"W3", "W3build"}:
        parts.append(section_w3(res))
    if wl & {"W4save", "W4load", "W4warm"}:
        parts.append(section_w4(res))
    if "W1" in wl and len(res.sizes()) > 1:
        parts.append(section_w5(res))
    return "\n\n".join(parts) + "\n"


# -- docs -------------------------------------------------------------------------

INTRO = """# Performance

How the checkpoint stores compare with other ways to keep results of steps,
measured by one command:

    python benchmarks/run.py            # full suite, ~10-15 min; --quick for a smoke run

Each contender runs each workload in its own fresh process
(`benchmarks/_worker.py`), timed with `time.perf_counter`, peak memory from
`getrusage(RUSAGE_SELF).ru_maxrss`. Contenders:

- **ours: SQLite store** / **ours: directory store**: `Checkpointer(path,
  prefer="file"|"dir")`, called as a workflow does, `ckpt(key)(step)(i)`,
  staleness checks on (the default); **stale="ignore"**: the SQLite store
  with `Checkpointer(path, stale="ignore")`, which fingerprints nothing.
  Durable: each save is fsync'd before the call returns.
- **joblib.Memory** (`Memory(dir).cache(step)`), **diskcache memoize**
  (`Cache(dir).memoize()(step)`): neither fsyncs a save (diskcache runs SQLite
  with WAL and synchronous=NORMAL).
- **reference**: what the 2023 reference does, rewritten for this benchmark:
  one dict, re-pickled whole with cloudpickle after every new entry, and
  `inspect.stack()` on every call. No fsync.
- **floor: SQLite INSERT**: the least an SQLite memo can do per step:
  `SELECT` (miss), run, `pickle.dumps`, one `INSERT` in autocommit, WAL,
  synchronous=FULL (the durability ours has); NORMAL shown for information.
- **floor: pickle.dump appended** to one open file, flushed, not fsync'd;
  reopening reads (unpickles) every record.

The results below come from one run on a small shared VM (2 cores, ext4 on
a virtual disk, fsync about 0.1 ms); ratios between contenders of the same
run are the figures to read, absolute times are this machine's. The goals'
ratios come from contenders called in turn in one process, so that both
sides of a ratio meet the same disk and the same neighbours: saves by
`_worker.py W1pair` (ours and the floor alternating call by call), hits by
`benchmarks/bench_hits.py` (ours, ours with stale="ignore", the floor and
diskcache, key by key, who goes first rotating).
"""


def plot(res: Results, path: str) -> str | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    for c in res.contenders("W1"):
        g = growth(res, c)
        style = {"linewidth": 2.2} if c in OURS else {"linewidth": 1.1, "alpha": 0.85}
        if g["curve"]:
            xs, ys = zip(*g["curve"])
            ax1.plot(xs, ys, label=_label(c), **style)
        if g["hits"]:
            xs, ys = zip(*sorted(g["hits"].items()))
            ax2.plot(xs, ys, marker="o", label=_label(c), **style)
    for ax, title in ((ax1, "save: median us per save vs entries in store"),
                      (ax2, "hit: median us per hit vs entries in store")):
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("entries in the store")
        ax.set_title(title, fontsize=10)
        ax.grid(True, which="both", alpha=0.3)
    ax1.set_ylabel("microseconds")
    handles, labels = ax1.get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=4, fontsize=8)
    fig.tight_layout(rect=(0, 0.12, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


#: Sections other benchmarks write into performance.md (bench_async.py: loop
#: stalls); a rerun of this suite keeps them as they are.
KEPT_START = "<!-- kept:"
KEPT_END = "<!-- /kept -->"


def _page(md: str) -> str:
    """The page as it is now ("" before its first run)."""
    try:
        with open(md, encoding="utf-8") as f:
            return f.read()
    except FileNotFoundError:
        return ""


def kept_sections(md: str) -> str:
    text = _page(md)
    out = []
    while KEPT_START in text:
        start = text.index(KEPT_START)
        end = text.find(KEPT_END, start)
        if end < 0:
            break
        out.append(text[start:end + len(KEPT_END)])
        text = text[end + len(KEPT_END):]
    return "".join("\n" + block + "\n" for block in out)


#: Sections of workloads a run may leave out (``--only``): kept from the page as it was.
SECTIONS = (("## W3 ", {"W3", "W3build"}), ("## W4 ", {"W4save", "W4load", "W4warm"}))


def earlier_sections(md: str, workloads: set[str]) -> str:
    """The sections of ``md`` for the workloads this run did not measure, marked as such."""
    text = _page(md)
    out = []
    for head, wls in SECTIONS:
        if workloads & wls or head not in text:
            continue
        start = text.index(head)
        ends = [i for i in (text.find("\n## ", start + 1), text.find(KEPT_START, start)) if i >= 0]
        body = text[start:min(ends) if ends else len(text)].rstrip()
        note = "(Kept from an earlier run: the run above did not measure this workload; its targets are not checked.)"
        if note not in body:
            body = body.replace("\n", f"\n\n{note}\n", 1)
        out.append(body)
    return "".join("\n" + b + "\n" for b in out)


def write_docs(data: dict[str, Any], out: str) -> list[str]:
    os.makedirs(out, exist_ok=True)
    res = Results(data)
    written = []
    png = os.path.join(out, "performance-growth.png")
    if "W1" in {r["workload"] for r in res.records} and plot(res, png):
        written.append(png)
    md = os.path.join(out, "performance.md")
    kept = kept_sections(md)
    earlier = earlier_sections(md, {r["workload"] for r in res.records})
    with open(md, "w", encoding="utf-8") as f:
        f.write(INTRO + "\n" + render(data) + earlier + kept)
    written.append(md)
    return written
