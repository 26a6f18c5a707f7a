"""One measurement in a fresh process; prints one ``RESULT {json}`` line.

    python benchmarks/_worker.py CONTENDER WORKLOAD N TMPDIR [--budget S] [--mb M]

A fresh process per (contender, workload) keeps imports, caches and the
allocator of one contender from helping or hurting another, and makes
``ru_maxrss`` (the process's peak resident memory) mean one thing.

Workloads:
  W1     save N small steps (~1 KB each) into an empty store under TMPDIR
  W1pair W1 for ours (SQLite) and the durable floor, one call of each in turn
  W2     open the store W1 left and call the same N steps again (all hits)
  W3build  write 200 (or N) arrays of M MB, untimed set-up for W3
  W3     list the W3 store (keys and metadata), never needing the values
  W3cli  the same through ``ai2-kit tool checkpoint load F - ls``
  W4save / W4load / W4warm  one array of M MB saved, then loaded in another
         process from a cold (files dropped from the page cache) or warm cache
  rss    nothing: the resident memory of the interpreter with the imports
"""

from __future__ import annotations

import json
import os
import pickle
import resource
import statistics
import subprocess
import sys
import time
from typing import Any, Callable

Call = Callable[[int], Any]
Step = Callable[[int], Any]

# -- values -------------------------------------------------------------------

PAYLOAD_WORDS = 124  # 124 x 8 bytes: a pickled value of about 1 KB


def small_value(i: int) -> dict[str, Any]:
    """What a small step returns: deterministic, so a later process can check it."""
    payload = i.to_bytes(8, "little") * PAYLOAD_WORDS
    return {"step": i, "name": f"task-{i:06d}", "energy": i * 0.5, "payload": payload}


RUNS = [0]  # how many times a step function really ran


def small_step(i: int) -> dict[str, Any]:
    RUNS[0] += 1
    return small_value(i)


BIG: Any = None  # the W4 array, built before timing so the save alone is timed


def big_step(i: int) -> Any:
    RUNS[0] += 1
    return BIG


def key_of(i: int) -> str:
    return f"step/{i:06d}"


# -- measuring ----------------------------------------------------------------


def peak_rss_mb() -> float:
    """Peak resident memory of this process image, in MiB.

    VmHWM, not getrusage's ru_maxrss: ru_maxrss survives exec(), so a worker
    started (by vfork+exec) from a parent that holds 100 MB of results
    reports the parent's 100 MB as its own peak. VmHWM starts afresh at exec.
    """
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return ru_maxrss_mb()


def ru_maxrss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux reports KiB


def bytes_read() -> int:
    """Bytes this process has read through read() so far (rchar), or -1."""
    try:
        with open("/proc/self/io", encoding="ascii") as f:
            for line in f:
                if line.startswith("rchar:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return -1


def fsync_probe(root: str, count: int = 20) -> float:
    """Median microseconds of a 1 KB write + fsync here: how busy the disk is right now."""
    path = os.path.join(root, ".fsync-probe")
    times = []
    with open(path, "wb", buffering=0) as f:
        for _ in range(count):
            t0 = time.perf_counter()
            f.write(b"x" * 1024)
            os.fsync(f.fileno())
            times.append(time.perf_counter() - t0)
    os.unlink(path)
    return statistics.median(times) * 1e6


def blocks(times: list[float], size: int) -> list[list[float]]:
    """[ops so far, median us, mean us] for each consecutive block of ``size`` ops."""
    out = []
    for start in range(0, len(times) - size + 1, size):
        chunk = times[start : start + size]
        out.append([start + size, statistics.median(chunk) * 1e6, sum(chunk) / size * 1e6])
    return out


def summary(times: list[float]) -> dict[str, Any]:
    if not times:
        return {"mean_us": None, "median_us": None}
    return {"mean_us": sum(times) / len(times) * 1e6, "median_us": statistics.median(times) * 1e6}


# -- contenders -----------------------------------------------------------------
# Each opens a memoizing "call(i)" over a step function in ``root``: the value
# of step(i), computed once and stored under key_of(i).


class Contender:
    durable = False  # fsync'd before a save returns

    def __init__(self, root: str) -> None:
        self.root = root

    def open(self, fn: Step) -> Call:
        raise NotImplementedError

    def close(self) -> None:
        pass

    def ls(self) -> list[str]:
        raise NotImplementedError

    def bulk(self, items: list[tuple[str, Any]]) -> None:
        """Build a store holding ``items`` (W3 set-up); by default one call each."""
        values = dict(items)
        call = self.open(lambda i: values[key_of(i)])
        for i in range(len(items)):
            call(i)


class Ours(Contender):
    durable = True
    prefer = "file"
    name = "ckpt.db"
    stale = "warn"  # the default: staleness checks on

    def open(self, fn: Step) -> Call:
        from ai2_kit.core.checkpoint import Checkpointer

        self.ckpt = Checkpointer(os.path.join(self.root, self.name), prefer=self.prefer, stale=self.stale)
        ckpt = self.ckpt
        # As a workflow calls it: a decorator per call, keyed by a string.
        return lambda i: ckpt(key_of(i))(fn)(i)

    def close(self) -> None:
        self.ckpt.close()

    def ls(self) -> list[str]:
        return [m["key"] for m in self.ckpt.store.iter_meta()]


class OursDir(Ours):
    prefer = "dir"
    name = "ckpt.d"


class OursIgnore(Ours):
    """The SQLite store with stale="ignore": no fingerprints, as the reference."""

    stale = "ignore"


class Joblib(Contender):
    def open(self, fn: Step) -> Call:
        import joblib

        self.mem = joblib.Memory(os.path.join(self.root, "joblib"), verbose=0)
        return self.mem.cache(fn)

    def ls(self) -> list[str]:
        # Item directories only: joblib has no public listing, and this one
        # does not load outputs.
        return [item.path for item in self.mem.store_backend.get_items()]


class Diskcache(Contender):
    def open(self, fn: Step) -> Call:
        import diskcache

        self.cache = diskcache.Cache(os.path.join(self.root, "diskcache"))
        return self.cache.memoize()(fn)

    def close(self) -> None:
        self.cache.close()

    def ls(self) -> list[str]:
        return [str(k) for k in self.cache.iterkeys()]


class Reference(Contender):
    """What the 2023 reference does: one dict, pickled whole after every new entry.

    Written for this benchmark from the seed's description: the key is looked
    up in an in-memory dict loaded at start; a new entry is added to it and
    the whole dict is written again with cloudpickle (no fsync); every call
    walks the caller's stack with ``inspect.stack()`` for the call site.
    """

    def open(self, fn: Step) -> Call:
        import inspect

        import cloudpickle

        self.path = os.path.join(self.root, "checkpoint.pkl")
        self.data: dict[str, Any] = {}
        if os.path.exists(self.path):
            with open(self.path, "rb") as f:
                self.data = cloudpickle.load(f)
        data, path = self.data, self.path

        def call(i: int) -> Any:
            site = inspect.getframeinfo(inspect.stack()[1][0])
            key = key_of(i)
            if key in data:
                return data[key]["return"]
            ret = fn(i)
            data[key] = {"return": ret, "is_awaitable": False,
                         "info": {"fn_name": fn.__name__, "args": (i,), "kwargs": {}, "call_site": site}}
            with open(path, "wb") as f:
                cloudpickle.dump(data, f)
            return ret

        return call

    def ls(self) -> list[str]:
        return sorted(self.data)

    def bulk(self, items: list[tuple[str, Any]]) -> None:
        # The file the reference would end with, written once: rewriting 1 GB
        # after each of 200 entries would take the whole time budget.
        import cloudpickle

        self.open(small_step)
        for key, value in items:
            self.data[key] = {"return": value, "is_awaitable": False, "info": {"fn_name": "bulk"}}
        with open(self.path, "wb") as f:
            cloudpickle.dump(self.data, f)


class SqliteFloor(Contender):
    """The least any SQLite-backed checkpoint can do: look up, miss, INSERT one row."""

    durable = True
    synchronous = "FULL"

    def open(self, fn: Step) -> Call:
        import sqlite3

        conn = sqlite3.connect(os.path.join(self.root, "floor.db"), isolation_level=None)
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute(f"PRAGMA synchronous={self.synchronous}")
        conn.execute("CREATE TABLE IF NOT EXISTS t (k TEXT PRIMARY KEY, v BLOB)")
        self.conn = conn

        def call(i: int) -> Any:
            key = key_of(i)
            row = conn.execute("SELECT v FROM t WHERE k=?", (key,)).fetchone()
            if row is not None:
                return pickle.loads(row[0])
            ret = fn(i)
            conn.execute("INSERT INTO t VALUES (?, ?)", (key, pickle.dumps(ret, protocol=5)))
            return ret

        return call

    def close(self) -> None:
        self.conn.close()

    def ls(self) -> list[str]:
        return [k for (k,) in self.conn.execute("SELECT k FROM t ORDER BY k")]


class SqliteFloorNormal(SqliteFloor):
    durable = False  # WAL + NORMAL: survives a kill, not a power cut
    synchronous = "NORMAL"


class PickleAppend(Contender):
    """pickle.dump of (key, value) appended to one open file, flushed (no fsync)."""

    def open(self, fn: Step) -> Call:
        path = os.path.join(self.root, "append.pkl")
        data: dict[str, Any] = {}
        if os.path.exists(path):
            with open(path, "rb") as f:
                while True:
                    try:
                        key, value = pickle.load(f)
                    except EOFError:
                        break
                    data[key] = value
        self.data = data
        # Open for the whole run, as a log is: closed in close().
        self.f = f = open(path, "ab")  # noqa: SIM115

        def call(i: int) -> Any:
            key = key_of(i)
            if key in data:
                return data[key]
            ret = fn(i)
            pickle.dump((key, ret), f, protocol=5)
            f.flush()
            data[key] = ret
            return ret

        return call

    def close(self) -> None:
        self.f.close()

    def ls(self) -> list[str]:
        return sorted(self.data)


CONTENDERS: dict[str, type[Contender]] = {
    "sqlite": Ours,
    "sqlite_ignore": OursIgnore,
    "dir": OursDir,
    "joblib": Joblib,
    "diskcache": Diskcache,
    "reference": Reference,
    "floor_full": SqliteFloor,
    "floor_normal": SqliteFloorNormal,
    "pickle_append": PickleAppend,
}


def import_for(contender: str) -> None:
    """Import what a contender needs before the baseline memory is taken."""
    if contender in ("sqlite", "sqlite_ignore", "dir"):
        import ai2_kit.core.checkpoint  # noqa: F401
    elif contender == "joblib":
        import joblib  # noqa: F401
    elif contender == "diskcache":
        import diskcache  # noqa: F401
    elif contender == "reference":
        import inspect  # noqa: F401

        import cloudpickle  # noqa: F401
    elif contender in ("floor_full", "floor_normal"):
        import sqlite3  # noqa: F401


# -- workloads -------------------------------------------------------------------


def w1_save(c: Contender, n: int, budget: float) -> dict[str, Any]:
    os.sync()  # write-back left by an earlier contender must not land on this one
    call = c.open(small_step)
    times: list[float] = []
    clock = time.perf_counter
    start = clock()
    stopped_at = None
    for i in range(n):
        t0 = clock()
        call(i)
        times.append(clock() - t0)
        if i % 100 == 99 and clock() - start > budget and i + 1 < n:
            stopped_at = i + 1
            break
    total = clock() - start
    c.close()
    block = 1000 if len(times) >= 2000 else max(1, len(times) // 10)
    return {"done": len(times), "stopped_at": stopped_at, "total_s": total, **summary(times),
            "block": block, "blocks": blocks(times, block), "runs": RUNS[0]}


def w1_pair(root: str, n: int) -> dict[str, Any]:
    """W1 for ours (SQLite) and the durable floor in one process, one call of each in turn.

    The cost of an fsync drifts with whatever else the disk is doing; two
    runs made a minute apart can differ by 2x on their own. Alternating the
    two call by call (which goes first alternating too) puts both under the
    same conditions, so their ratio is the overhead alone.
    """
    os.sync()
    ours, floor = Ours(os.path.join(root, "ours")), SqliteFloor(os.path.join(root, "floor"))
    for c in (ours, floor):
        os.makedirs(c.root, exist_ok=True)
    calls = (ours.open(small_step), floor.open(small_step))
    times: tuple[list[float], list[float]] = ([], [])
    clock = time.perf_counter
    for i in range(n):
        for j in ((0, 1) if i % 2 == 0 else (1, 0)):
            t0 = clock()
            calls[j](i)
            times[j].append(clock() - t0)
    ours.close()
    floor.close()
    a, b = summary(times[0]), summary(times[1])
    return {"done": n, "runs": RUNS[0], "ours_mean_us": a["mean_us"], "ours_median_us": a["median_us"],
            "floor_mean_us": b["mean_us"], "floor_median_us": b["median_us"],
            "x_floor_mean": a["mean_us"] / b["mean_us"], "x_floor_median": a["median_us"] / b["median_us"]}


def w2_resume(c: Contender, n: int, budget: float) -> dict[str, Any]:
    clock = time.perf_counter
    read0 = bytes_read()
    t0 = clock()
    call = c.open(small_step)
    open_s = clock() - t0
    open_read = bytes_read() - read0
    times: list[float] = []
    mismatches = 0
    start = clock()
    stopped_at = None
    for i in range(n):
        t0 = clock()
        value = call(i)
        times.append(clock() - t0)
        if value != small_value(i):
            mismatches += 1
        if i % 100 == 99 and clock() - start > budget and i + 1 < n:
            stopped_at = i + 1
            break
    c.close()
    block = 1000 if len(times) >= 2000 else max(1, len(times) // 10)
    return {"open_ms": open_s * 1e3, "open_read_bytes": open_read, "checked": len(times),
            "mismatches": mismatches, "reran": RUNS[0], "stopped_at": stopped_at,
            "total_s": clock() - start, **summary(times), "block": block, "blocks": blocks(times, block)}


def w3_array(i: int, mb: float) -> Any:
    import numpy as np

    return np.arange(int(mb * (1 << 20)) // 8, dtype=np.float64) + i


def w3_build(c: Contender, n: int, mb: float) -> dict[str, Any]:
    t0 = time.perf_counter()
    c.bulk([(key_of(i), w3_array(i, mb)) for i in range(n)])
    c.close()
    return {"built": n, "build_s": time.perf_counter() - t0}


def w3_ls(c: Contender, n: int) -> dict[str, Any]:
    read0 = bytes_read()
    t0 = time.perf_counter()
    c.open(small_step)
    keys = c.ls()
    elapsed = time.perf_counter() - t0
    return {"listed": len(keys), "ls_ms": elapsed * 1e3, "read_bytes": bytes_read() - read0}


# The console script's entry point run in a fresh interpreter that reports
# its own peak memory on exit (RUSAGE_CHILDREN would include this worker's).
_CLI = """
import sys
from ai2_kit.core.checkpoint._main import main
try:
    rc = main(sys.argv[1:])
finally:
    with open("/proc/self/status") as f:
        hwm = [ln.split()[1] for ln in f if ln.startswith("VmHWM:")][0]
    sys.stderr.write("VMHWM_KB " + hwm + "\\n")
sys.exit(rc)
"""


def w3_cli(root: str, n: int) -> dict[str, Any]:
    path = os.path.join(root, Ours.name)
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", _CLI, "tool", "checkpoint", "load", path, "-", "ls"],
                          capture_output=True, text=True, check=False)
    elapsed = time.perf_counter() - t0
    lines = [ln for ln in proc.stdout.splitlines() if key_of(0)[:5] in ln]
    hwm = [ln.split()[1] for ln in proc.stderr.splitlines() if ln.startswith("VMHWM_KB ")]
    out = {"returncode": proc.returncode, "ls_ms": elapsed * 1e3, "listed": len(lines),
           "child_peak_rss_mb": int(hwm[0]) / 1024.0 if hwm else None}
    if proc.returncode != 0:
        errs = [ln for ln in proc.stderr.strip().splitlines() if not ln.startswith("VMHWM_KB ")]
        out["error"] = (errs or ["?"])[-1][:300]
    return out


def big_array(mb: float) -> Any:
    import numpy as np

    return np.arange(int(mb * (1 << 20)) // 8, dtype=np.float64)


def big_equal(value: Any, mb: float) -> bool:
    """Compare with the array W4 saved, slice by slice (no second full copy)."""
    import numpy as np

    n = int(mb * (1 << 20)) // 8
    if not isinstance(value, np.ndarray) or value.shape != (n,) or value.dtype != np.float64:
        return False
    step = 1 << 22
    return all(np.array_equal(value[s : s + step], np.arange(s, min(n, s + step), dtype=np.float64))
               for s in range(0, n, step))


def w4_save(contender: str, root: str, mb: float) -> dict[str, Any]:
    import numpy as np

    global BIG
    BIG = big_array(mb)
    rss_with_array = peak_rss_mb()
    os.sync()
    path = os.path.join(root, "big.npy")
    t0 = time.perf_counter()
    if contender in ("np_save", "np_save_fsync"):
        with open(path, "wb") as f:
            np.save(f, BIG)
            if contender == "np_save_fsync":
                f.flush()
                os.fsync(f.fileno())
    else:
        c = CONTENDERS[contender](root)
        c.open(big_step)(0)
        c.close()
    elapsed = time.perf_counter() - t0
    return {"save_s": elapsed, "array_mb": BIG.nbytes / 2**20, "rss_with_array_mb": rss_with_array}


def set_cache(root: str, warm: bool) -> None:
    """Put every file of the store in the page cache (warm) or out of it (cold).

    Without this, whether a 512 MB file is still cached depends on whether
    its writer fsync'd it (clean pages are evicted first under memory
    pressure), which made np.load look 6x faster than itself.
    """
    os.sync()
    buf = bytearray(1 << 20)
    for dirpath, _, names in os.walk(root):
        for name in names:
            fd = os.open(os.path.join(dirpath, name), os.O_RDONLY)
            try:
                if warm:
                    while os.readv(fd, [buf]):
                        pass
                else:
                    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


def w4_load(contender: str, root: str, mb: float, warm: bool) -> dict[str, Any]:
    import numpy as np

    set_cache(root, warm)
    t0 = time.perf_counter()
    if contender in ("np_save", "np_save_fsync"):
        value = np.load(os.path.join(root, "big.npy"))
    else:
        c = CONTENDERS[contender](root)
        value = c.open(big_step)(0)
        c.close()
    elapsed = time.perf_counter() - t0
    peak = peak_rss_mb()
    return {"load_s": elapsed, "peak_rss_mb": peak, "equal": big_equal(value, mb), "reran": RUNS[0],
            "cache": "warm" if warm else "cold"}


def main(argv: list[str]) -> dict[str, Any]:
    import argparse

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("contender")
    p.add_argument("workload")
    p.add_argument("n", type=int)
    p.add_argument("tmpdir")
    p.add_argument("--budget", type=float, default=60.0, help="seconds before a slow contender stops")
    p.add_argument("--mb", type=float, default=5.0, help="array size in MiB (W3, W4)")
    a = p.parse_args(argv)
    os.makedirs(a.tmpdir, exist_ok=True)
    wl = a.workload
    if wl.startswith("W4"):
        import numpy  # noqa: F401
    if wl != "W3cli":
        import_for(a.contender)
    base = {"contender": a.contender, "workload": wl, "n": a.n, "baseline_rss_mb": peak_rss_mb(),
            "loadavg": os.getloadavg()[0]}
    if wl in ("W1", "W1pair", "W4save"):
        base["fsync_us"] = fsync_probe(a.tmpdir)
    if wl == "rss":
        res: dict[str, Any] = {}
    elif wl == "W1":
        res = w1_save(CONTENDERS[a.contender](a.tmpdir), a.n, a.budget)
    elif wl == "W1pair":
        res = w1_pair(a.tmpdir, a.n)
    elif wl == "W2":
        res = w2_resume(CONTENDERS[a.contender](a.tmpdir), a.n, a.budget)
    elif wl == "W3build":
        res = w3_build(CONTENDERS[a.contender](a.tmpdir), a.n, a.mb)
    elif wl == "W3":
        res = w3_ls(CONTENDERS[a.contender](a.tmpdir), a.n)
    elif wl == "W3cli":
        res = w3_cli(a.tmpdir, a.n)
    elif wl == "W4save":
        res = w4_save(a.contender, a.tmpdir, a.mb)
    elif wl in ("W4load", "W4warm"):
        res = w4_load(a.contender, a.tmpdir, a.mb, warm=wl == "W4warm")
    else:
        p.error(f"unknown workload {wl}")
    res.setdefault("peak_rss_mb", peak_rss_mb())
    res["ru_maxrss_mb"] = ru_maxrss_mb()
    return {**base, **res}


if __name__ == "__main__":
    result = main(sys.argv[1:])
    sys.stdout.write("RESULT " + json.dumps(result) + "\n")
