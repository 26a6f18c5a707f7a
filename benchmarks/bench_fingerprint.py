"""What fingerprinting costs: a 1 GiB array, small calls, code.

    python benchmarks/bench_fingerprint.py            # 1 GiB array (about 2 GiB of RAM)
    python benchmarks/bench_fingerprint.py --mib 64   # a quick run

Prints three tables:

1. fingerprinting a large numpy array against one plain ``hashlib`` pass of
   the same algorithm over the same bytes (the ratio is what the canonical
   walk and the leaf tree cost or save; below 1 means the threads won), and
   a ``memcpy`` of the same bytes for the machine's memory bandwidth;
2. ``fingerprint_inputs`` for a few typical small calls, and a whole hit's
   extra work (fingerprint the call, compare with the saved record), in
   microseconds, to set against a hit (~40 us) and a save (~150 us);
3. ``fingerprint_code``, cached (every call after the first) and uncached;
4. the code side of a record (the step's source digest and the helpers it
   reaches, ``code_part``): first computation in a process (parse and
   compile of the file included) against every later call (cached), and a
   whole hit through a ``Checkpointer`` with fingerprints (``stale="warn"``)
   against one without (``stale="ignore"``).
"""

from __future__ import annotations

import argparse
import hashlib
import os
import platform
import sys
import time
import timeit
from typing import Any, Callable

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "src"))

from ai2_kit.core.checkpoint import Checkpointer  # noqa: E402
from ai2_kit.core.checkpoint import _fingerprint as fp  # noqa: E402
from ai2_kit.core.checkpoint._fingerprint import _bytecode, _callable, _code, _source, _walk  # noqa: E402


def best_of(fn: Callable[[], Any], repeat: int) -> float:
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def per_call_us(fn: Callable[[], Any], number: int) -> float:
    return min(timeit.repeat(fn, number=number, repeat=5)) / number * 1e6


def memcpy_time(arr: Any, repeat: int) -> float:
    dst = np.empty_like(arr)
    return best_of(lambda: np.copyto(dst, arr), repeat)


def big_array_table(mib: int, repeat: int) -> None:
    n = mib << 20
    arr = np.random.default_rng(0).integers(0, 256, size=n, dtype=np.uint8).view(np.float64)
    mv = memoryview(arr).cast("B")
    gb = n / 1e9
    rows: list[tuple[str, float]] = [("memcpy (np.copyto)", memcpy_time(arr, repeat))]
    algo = _walk._hash().name
    plain = best_of(lambda: _walk._hash(mv).digest(), repeat)
    rows.append((f"plain hashlib.{algo}, one pass", plain))
    rows.append(("fingerprint_value(contiguous)", best_of(lambda: fp.fingerprint_value(arr), repeat)))
    strided = arr.reshape(-1, 2)[:, 0]  # half the bytes, every other float
    t_strided = best_of(lambda: fp.fingerprint_value(strided), repeat)
    try:
        import xxhash  # type: ignore[import-not-found]

        t_xx = best_of(lambda: xxhash.xxh3_128(mv).digest(), repeat)
        rows.append(("xxhash.xxh3_128 (not a dependency)", t_xx))
    except ImportError:
        pass
    for name, alt in (("sha1", hashlib.sha1), ("blake2b", hashlib.blake2b), ("md5", hashlib.md5)):
        rows.append((f"plain hashlib.{name}, one pass", best_of(lambda alt=alt: alt(mv).digest(), repeat)))  # type: ignore[misc]

    print(f"\n## Large array: {mib} MiB float64, best of {repeat}, {_walk._workers()} hashing threads\n")
    print(f"| {'what':38s} | {'time (s)':>9s} | {'GB/s':>6s} | {'vs plain ' + algo:>15s} |")
    print(f"|{'-' * 40}|{'-' * 11}|{'-' * 8}|{'-' * 17}|")
    for name, t in rows:
        print(f"| {name:38s} | {t:9.3f} | {gb / t:6.2f} | {t / plain:15.2f} |")
    print(f"| {'fingerprint_value(strided view, n/2)':38s} | {t_strided:9.3f} | {gb / 2 / t_strided:6.2f} "
          f"| {t_strided / (plain / 2):15.2f} |")


def step(structure: Any, temps: Any = (300.0, 400.0), *, label: str = "nvt", seed: int = 0) -> None:
    pass


def small_calls_table(number: int) -> None:
    small_arr = np.arange(100, dtype=np.float64)
    config = {"md": {"steps": 1000, "dt": 0.5, "ensemble": "nvt"}, "tags": ["a", "b"], "cutoff": 6.0}
    calls: list[tuple[str, Callable[..., Any], tuple, dict]] = [
        ("(3, 'abc', {'a': 1})", lambda a, b, c: None, (3, "abc", {"a": 1}), {}),
        ("step('POSCAR', label='npt')", step, ("POSCAR",), {"label": "npt"}),
        ("step(config_dict, [300.0, 400.0])", step, (config, [300.0, 400.0]), {}),
        ("step(np.arange(100))", step, (small_arr,), {}),
        ("step(x=1) via **kwargs fn", lambda **kw: None, (), {"x": 1}),
    ]
    print(f"\n## Small calls: microseconds per call (best of 5 x {number})\n")
    print(f"| {'call':36s} | {'inputs':>7s} | {'hit: fingerprint + compare':>27s} |")
    print(f"|{'-' * 38}|{'-' * 9}|{'-' * 29}|")
    for label, fn, args, kwargs in calls:
        t_in = per_call_us(lambda fn=fn, a=args, k=kwargs: fp.fingerprint_inputs(fn, a, k), number)
        saved = fp.fingerprint(fn, args, kwargs)
        t_hit = per_call_us(
            lambda fn=fn, a=args, k=kwargs, s=saved: fp.compare(s, fp.fingerprint(fn, a, k)), number
        )
        print(f"| {label:36s} | {t_in:7.2f} | {t_hit:27.2f} |")


def code_table(number: int) -> None:
    import inspect
    import json

    def uncached(fn: Callable[..., Any]) -> Callable[[], Any]:
        def run() -> Any:
            _clear_code_caches()
            return fp.fingerprint_code(fn)

        return run

    funcs = [
        ("step (4 params, defaults)", step),
        ("fp.compare (~25 lines)", fp.compare),
        ("json.dumps (defaults)", json.dumps),
        ("inspect.signature (bound method)", inspect.Signature.from_callable),
    ]
    print("\n## Code: microseconds per fingerprint_code (best of 5)\n")
    print(f"| {'function':34s} | {'cached':>7s} | {'uncached':>9s} |")
    print(f"|{'-' * 36}|{'-' * 9}|{'-' * 11}|")
    for label, fn in funcs:
        cached = per_call_us(lambda fn=fn: fp.fingerprint_code(fn), number)
        cold = per_call_us(uncached(fn), max(1, number // 100))
        print(f"| {label:34s} | {cached:7.2f} | {cold:9.1f} |")


def _clear_code_caches() -> None:
    for cache in (_bytecode._CODE_DIGESTS, _source._AST_DIGESTS, _source._SOURCES, _source._SOURCE_KEYS,
                  _source._CLASS_DIGESTS, _code._NAMES, _code._PARTS, *_callable._DEFAULTS_DIGESTS.values()):
        cache.clear()


def _offset(i: int) -> float:
    return 0.5 * i


def _scale(x: float, factor: float = 2.0) -> float:
    return factor * x + _offset(int(x))


class _Model:
    def predict(self, x: float) -> float:
        return _scale(x)


def workflow_step(structure: Any, temps: Any = (300.0, 400.0), *, label: str = "nvt", seed: int = 0) -> list:
    """A step calling two levels of helpers and a class of this file."""
    return [_Model().predict(t) for t in temps]


def hit_table(number: int) -> None:
    import tempfile

    args, kwargs = ("POSCAR",), {"label": "npt"}
    _clear_code_caches()
    t0 = time.perf_counter()
    part = fp.code_part(workflow_step)
    first = (time.perf_counter() - t0) * 1e6
    cached = per_call_us(lambda: fp.code_part(workflow_step), number)
    saved = fp.fingerprint(workflow_step, args, kwargs)
    whole = per_call_us(lambda: fp.judge(saved, fp.fingerprint(workflow_step, args, kwargs)), number)
    inputs = per_call_us(lambda: fp.fingerprint_inputs(workflow_step, args, kwargs), number)
    print(f"\n## Code side of a record: microseconds (helpers followed: {len(part.helpers)}: "
          f"{', '.join(part.helpers)})\n")
    print(f"| {'what':58s} | {'us':>9s} |")
    print(f"|{'-' * 60}|{'-' * 11}|")
    print(f"| {'code_part, first call in the process (parse + compile)':58s} | {first:9.1f} |")
    print(f"| {'code_part, every later call (cached)':58s} | {cached:9.2f} |")
    print(f"| {'fingerprint_inputs only':58s} | {inputs:9.2f} |")
    print(f"| {'whole record + judge against the saved one':58s} | {whole:9.2f} |")
    with tempfile.TemporaryDirectory() as tmp:
        rows = []
        for policy in ("ignore", "warn"):
            with Checkpointer(os.path.join(tmp, f"{policy}.db"), stale=policy) as ckpt:
                wrapped = ckpt("bench/step")(workflow_step)
                wrapped(*args, **kwargs)  # the save; every later call is a hit
                rows.append((policy, per_call_us(lambda w=wrapped: w(*args, **kwargs), max(1, number // 10))))
        for policy, t in rows:
            label = f"hit through a Checkpointer, stale={policy!r}"
            print(f"| {label:58s} | {t:9.2f} |")
        print(f"| {'  fingerprint overhead of a hit':58s} | {rows[1][1] - rows[0][1]:9.2f} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mib", type=int, default=1024, help="size of the large array in MiB (default 1024)")
    ap.add_argument("--repeat", type=int, default=3, help="passes over the large array (default 3)")
    ap.add_argument("--number", type=int, default=20000, help="calls per timing of the small cases")
    opts = ap.parse_args()
    print(f"Python {platform.python_version()}, numpy {np.__version__}, {platform.machine()}, "
          f"{os.cpu_count()} CPUs, {platform.processor() or platform.platform()}")
    small_calls_table(opts.number)
    code_table(opts.number)
    hit_table(opts.number)
    big_array_table(opts.mib, opts.repeat)


if __name__ == "__main__":
    main()
