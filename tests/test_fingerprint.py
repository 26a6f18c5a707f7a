"""Fingerprints of inputs and code: what counts as a change, and what never does."""

from __future__ import annotations

import collections
import dataclasses
import enum
import functools
import importlib.util
import itertools
import json
import os
import subprocess
import sys
import textwrap
import threading
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pytest

from ai2_kit.core.checkpoint._fingerprint import (
    UnfingerprintableError,
    _bytecode,
    _source,
    compare,
    describe,
    fingerprint,
    fingerprint_code,
    fingerprint_inputs,
    fingerprint_value,
)
from ai2_kit.core.checkpoint._fingerprint import _walk as fpmod


def step(x: Any, y: Any = 2, *, z: Any = None) -> Any:
    return x


def changes(fn: Callable[..., Any], call1: tuple, call2: tuple) -> list[str]:
    (a1, k1), (a2, k2) = call1, call2
    return compare(fingerprint(fn, a1, k1), fingerprint(fn, a2, k2))


# -- the issue's cases ---------------------------------------------------------


def test_changed_positional_argument() -> None:
    assert changes(step, ((1, 5), {}), ((1, 6), {})) == ["argument 'y' changed (5 -> 6)"]


def test_changed_keyword_argument() -> None:
    assert changes(step, ((1,), {"z": "a"}), ((1,), {"z": "b"})) == ["argument 'z' changed ('a' -> 'b')"]


def test_changed_value_deep_in_nested_dict() -> None:
    old = {"md": {"steps": [1, 2, {"dt": 0.5, "tags": {"a", "b"}}]}, "name": "run"}
    new = {"md": {"steps": [1, 2, {"dt": 0.25, "tags": {"a", "b"}}]}, "name": "run"}
    assert changes(step, ((old,), {}), ((new,), {})) == ["argument 'x' changed"]


def test_changed_numpy_array() -> None:
    a = np.arange(1000, dtype=np.float64)
    b = a.copy()
    b[537] += 1e-12
    assert changes(step, ((a,), {}), ((b,), {})) == ["argument 'x' changed"]
    # The same values under another dtype or shape are another input.
    assert fingerprint_value(a) != fingerprint_value(a.astype(np.float32))
    assert fingerprint_value(a) != fingerprint_value(a.reshape(10, 100))


def test_equal_object_built_anew_is_no_change() -> None:
    @dataclasses.dataclass
    class Config:
        temps: list
        name: str

    class Plain:
        def __init__(self, n: int) -> None:
            self.n = n
            self.data = {"k": [n, n + 1]}

    def build() -> tuple:
        return (Config([300.0, 400.0], "nvt"), Plain(3), np.linspace(0, 1, 50), {"a": [1, (2, 3)]})

    first, second = build(), build()
    assert first[0] is not second[0]
    assert changes(step, (first, {}), (second, {})) == []


def test_reordered_dict_is_no_change() -> None:
    d1 = {"a": 1, "b": [1, 2], "c": {"x": 1, "y": 2}}
    d2 = {"c": {"y": 2, "x": 1}, "b": [1, 2], "a": 1}
    assert changes(step, ((d1,), {}), ((d2,), {})) == []
    # Mixed-type keys take the per-item digest route, also order-free.
    m1 = {1: "a", "1": "b", (1,): "c", None: "d"}
    m2 = {None: "d", (1,): "c", "1": "b", 1: "a"}
    assert fingerprint_value(m1) == fingerprint_value(m2)


def test_unfingerprintable_argument_is_recorded_not_raised() -> None:
    lock = threading.Lock()
    rec = fingerprint(step, (lock,), {"z": 1})
    assert rec["args"] == {"y": "2", "z": "1"}
    assert "lock" in rec["unhashable"]["x"]
    json.dumps(rec)
    # Never an alarm for it, even when the other side could be fingerprinted.
    assert compare(rec, fingerprint(step, (lock,), {"z": 1})) == []
    assert compare(rec, fingerprint(step, (3,), {"z": 1})) == []
    assert compare(fingerprint(step, (3,), {"z": 1}), rec) == []
    with pytest.raises(UnfingerprintableError):
        fingerprint_value({"inner": [lock]})


def test_broken_reduce_is_recorded_not_raised() -> None:
    class Broken:
        def __reduce_ex__(self, protocol: Any) -> Any:
            raise RuntimeError("no")

    class Weird:
        def __reduce_ex__(self, protocol: Any) -> Any:
            return 42

    rec = fingerprint_inputs(step, (Broken(), Weird()), {})
    assert set(rec["unhashable"]) == {"x", "y"}
    assert "RuntimeError: no" in rec["unhashable"]["x"]


# -- binding ---------------------------------------------------------------------


def test_positional_passed_as_keyword_and_explicit_default() -> None:
    base = fingerprint_inputs(step, (1,), {})
    assert fingerprint_inputs(step, (), {"x": 1}) == base
    assert fingerprint_inputs(step, (1, 2), {}) == base
    assert fingerprint_inputs(step, (1,), {"y": 2, "z": None}) == base
    assert list(base["args"]) == ["x", "y", "z"]


def test_var_args_and_var_kwargs_are_named() -> None:
    def f(a: Any, /, *rest: Any, **opts: Any) -> None:
        pass

    rec = fingerprint_inputs(f, (1, 2, 3), {"a": 4, "k": "v"})
    assert rec["args"] == {"a": "1", "rest[0]": "2", "rest[1]": "3", "opts['a']": "4", "opts['k']": "'v'"}
    assert compare(rec, fingerprint_inputs(f, (1, 2), {"a": 4, "k": "v"})) == ["argument 'rest[1]' removed"]
    assert compare(rec, fingerprint_inputs(f, (1, 2, 3), {"a": 4, "k": "v", "n": 0})) == [
        "argument \"opts['n']\" added"
    ]


def test_call_that_does_not_bind_falls_back_to_positions() -> None:
    assert fingerprint_inputs(step, (1, 2, 3), {})["args"] == {"arg0": "1", "arg1": "2", "arg2": "3"}
    assert fingerprint_inputs(step, (), {"w": 1})["args"] == {"w": "1"}
    assert fingerprint_inputs(step, (1,), {"x": 1})["args"] == {"arg0": "1", "x": "1"}
    # A builtin without a signature.
    assert fingerprint_inputs(max, (1, 2), {})["args"] == {"arg0": "1", "arg1": "2"}


def test_partial_method_wrapped_and_callable_object() -> None:
    part = functools.partial(step, 1, z=3)
    assert fingerprint_inputs(part, (5,), {}) == fingerprint_inputs(step, (1, 5), {"z": 3})

    class Model:
        def __init__(self, k: int) -> None:
            self.k = k

        def run(self, n: int) -> int:
            return self.k * n

        def __call__(self, n: int) -> int:
            return self.k + n

    m = Model(2)
    assert fingerprint_inputs(m.run, (3,), {})["args"]["n"] == "3"
    assert compare(fingerprint(m.run, (3,), {}), fingerprint(Model(5).run, (3,), {})) == [
        "argument 'self' changed"
    ]
    assert list(fingerprint_inputs(m, (1,), {})["args"]) == ["self", "n"]

    @functools.wraps(step)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        return step(*args, **kwargs)

    assert fingerprint_inputs(wrapper, (1,), {}) == fingerprint_inputs(step, (1,), {})
    assert fingerprint_code(part) == fingerprint_code(step)
    assert fingerprint_code(m.run) == fingerprint_code(Model.run)
    assert fingerprint_code(wrapper) is not None


# -- values ------------------------------------------------------------------------


def test_types_are_told_apart() -> None:
    values = [1, 1.0, True, "1", b"1", [1], (1,), {1}, frozenset({1}), {1: None}, None, 1 + 0j, np.int64(1)]
    fps = [fingerprint_value(v) for v in values]
    assert len(set(fps)) == len(fps)


def test_inline_reprs_are_short_and_digests_are_not() -> None:
    assert fingerprint_value(-7) == "-7"
    assert fingerprint_value(0.1) == "0.1"
    assert fingerprint_value("x" * 22) == repr("x" * 22)
    long = fingerprint_value("x" * 23)
    assert len(long) == 32 and long == fingerprint_value("x" * 23)
    assert len(fingerprint_value(10 ** 20)) == 32


def test_huge_int() -> None:
    big = 3 ** 100_000  # beyond sys.int_max_str_digits: str() would refuse it
    assert fingerprint_value(big) == fingerprint_value(3 ** 100_000)
    assert fingerprint_value(big) != fingerprint_value(big + 1)
    assert fingerprint_value(-big) != fingerprint_value(big)


def test_cycles_do_not_hang() -> None:
    a: list = [1]
    a.append(a)
    b: list = [1]
    b.append(b)
    assert fingerprint_value(a) == fingerprint_value(b)
    d: dict = {"k": 1}
    d["self"] = d
    fingerprint_value(d)

    class Node:
        def __init__(self) -> None:
            self.next = self

    assert fingerprint_value(Node()) == fingerprint_value(Node())


def test_deep_nesting_is_unfingerprintable_not_a_crash() -> None:
    deep: list = []
    for _ in range(5000):
        deep = [deep]
    assert "nested" in fingerprint_inputs(step, (deep,), {})["unhashable"]["x"]


def test_common_library_values() -> None:
    class Color(enum.Enum):
        RED = 1

    for make in (
        lambda: Path("/data/run-1"),
        lambda: collections.OrderedDict(a=1, b=2),
        lambda: collections.defaultdict(list, a=[1]),
        lambda: Color.RED,
        lambda: np.float32(1.5),
        lambda: np.dtype([("a", "<i4"), ("b", "<f8")]),
        lambda: np.array([{"a": 1}, None], dtype=object),
        lambda: range(3),
        lambda: step,
        lambda: len,
        lambda: int,
    ):
        assert fingerprint_value(make()) == fingerprint_value(make())
    assert fingerprint_value(Path("/a")) != fingerprint_value(Path("/b"))
    assert fingerprint_value(np.array([{"a": 1}], dtype=object)) != fingerprint_value(
        np.array([{"a": 2}], dtype=object)
    )


def test_numpy_non_contiguous_arrays_hash_their_values() -> None:
    base = np.arange(4 * 6 * 5, dtype=np.int32).reshape(4, 6, 5)
    for view in (base[:, ::2], base.T, base[..., 1], np.asfortranarray(base), base[::-1]):
        assert not view.flags.c_contiguous or view is base
        assert fingerprint_value(view) == fingerprint_value(np.ascontiguousarray(view))
    assert fingerprint_value(base[:, ::2]) != fingerprint_value(base[:, 1::2])


@pytest.mark.parametrize(("leaf", "inline"), [(64, 16), (100, 16), (64, 1 << 16)])
def test_large_buffers_hashed_as_leaves(monkeypatch: pytest.MonkeyPatch, leaf: int, inline: int) -> None:
    # A small leaf size exercises the 16 MiB leaf path (threads, pending
    # leaf, non-contiguous blocks) on small arrays.
    monkeypatch.setattr(fpmod, "_LEAF", leaf)
    monkeypatch.setattr(fpmod, "_INLINE_BUFFER", inline)
    rng = np.random.default_rng(0)
    a = rng.integers(0, 1000, size=(37, 11), dtype=np.int64)
    fp = fingerprint_value(a)
    assert fp == fingerprint_value(a.copy())
    assert fp == fingerprint_value(np.asfortranarray(a))
    b = a.copy()
    b[36, 10] += 1
    assert fp != fingerprint_value(b)
    wide = rng.integers(0, 1000, size=(3, 50), dtype=np.int64)
    assert fingerprint_value(wide[:, ::2]) == fingerprint_value(np.ascontiguousarray(wide[:, ::2]))
    rec = np.tile(np.zeros(3, dtype=[("a", "<i4"), ("b", "<f8")]), 10)[::2]
    assert fingerprint_value(rec) == fingerprint_value(np.ascontiguousarray(rec))
    assert fingerprint_value(bytes(1000)) != fingerprint_value(bytes(1001))
    assert fingerprint_value("é" * 300) == fingerprint_value("é" * 300)


VALUES_SRC = """[
    {"b": 1, "a": [1.5, None, True], "c": {"z", "y", "x", "w"}},
    frozenset({"alpha", "beta", "gamma", "delta", "epsilon"}),
    {("t", 1), ("t", 2), 3, "s"},
    b"bytes" * 10,
    2 ** 200,
    "x" * 100,
]"""


def _run_values_in_subprocess(seed: str) -> list:
    code = (
        "import json\n"
        "import numpy as np\n"
        "from ai2_kit.core.checkpoint._fingerprint import compare, fingerprint_code, fingerprint_value\n"
        f"values = {VALUES_SRC} + [np.arange(12.0).reshape(3, 4).T]\n"
        "print(json.dumps([fingerprint_value(v) for v in values] + [fingerprint_code(compare)]))\n"
    )
    env = {**os.environ, "PYTHONHASHSEED": seed}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    return list(json.loads(out.stdout))


def test_digests_equal_across_processes_and_hash_seeds() -> None:
    values = eval(VALUES_SRC) + [np.arange(12.0).reshape(3, 4).T]
    here = [fingerprint_value(v) for v in values] + [fingerprint_code(compare)]
    assert _run_values_in_subprocess("1") == here
    assert _run_values_in_subprocess("12345") == here


def test_importing_does_not_import_numpy() -> None:
    code = "import sys, ai2_kit.core.checkpoint._fingerprint as f; f.fingerprint_value({'a': [1]}); " \
           "print('numpy' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


# -- code ----------------------------------------------------------------------------

_counter = itertools.count()


def load(tmp_path: Path, source: str, name: str = "step") -> Any:
    """Import ``source`` as a fresh module (a new file each time) and return ``name``."""
    mod_name = f"fp_edit_{next(_counter)}"
    path = tmp_path / f"{mod_name}.py"
    path.write_text(textwrap.dedent(source))
    spec = importlib.util.spec_from_file_location(mod_name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return getattr(module, name)


ORIGINAL = """
import math

def step(x, scale=2.0):
    total = 0
    for i in range(x):
        total += math.sqrt(i) * scale
    helper = lambda v: v + 1
    return [helper(t) for t in (total, -total)]
"""

SAME_CODE = {
    "comment and blank lines": """
import math


def step(x, scale=2.0):
    # accumulate
    total = 0

    for i in range(x):  # every i
        total += math.sqrt(i) * scale
    helper = lambda v: v + 1   # a helper

    return [helper(t) for t in (total, -total)]
""",
    "docstring added": '''
import math

def step(x, scale=2.0):
    """Sum square roots.

    Returns a list.
    """
    total = 0
    for i in range(x):
        total += math.sqrt(i) * scale
    helper = lambda v: v + 1
    return [helper(t) for t in (total, -total)]
''',
    "moved down the file": """
import math
X = 1



def step(x, scale=2.0):
    total = 0
    for i in range(x):
        total += math.sqrt(i) * scale
    helper = lambda v: v + 1
    return [helper(t) for t in (total, -total)]
""",
}

OTHER_CODE = {
    "body": ORIGINAL.replace("math.sqrt(i) * scale", "math.sqrt(i) + scale"),
    "constant": ORIGINAL.replace("v + 1", "v + 2"),
    "comprehension": ORIGINAL.replace("(total, -total)", "(total, total)"),
    "default": ORIGINAL.replace("scale=2.0", "scale=3.0"),
    "parameter name": ORIGINAL.replace("(x, scale", "(n, scale").replace("range(x)", "range(n)"),
    "called function": ORIGINAL.replace("math.sqrt", "math.log1p"),
}


def test_code_unchanged_by_comments_blank_lines_and_docstrings(tmp_path: Path) -> None:
    original = fingerprint_code(load(tmp_path, ORIGINAL))
    assert original is not None
    for label, src in SAME_CODE.items():
        assert fingerprint_code(load(tmp_path, src)) == original, label


def test_code_changed_by_body_constant_and_default(tmp_path: Path) -> None:
    original = fingerprint_code(load(tmp_path, ORIGINAL))
    seen = {original}
    for label, src in OTHER_CODE.items():
        fp = fingerprint_code(load(tmp_path, src))
        assert fp not in seen, label
        seen.add(fp)


def test_docstring_edit_where_none_is_a_constant(tmp_path: Path) -> None:
    # Python <= 3.13 keeps a None in the docstring's slot of co_consts, so
    # adding a docstring shifts the index of every other constant.
    without = "def step(x):\n    if x:\n        return None\n    print(x)\n"
    with_doc = 'def step(x):\n    """Doc."""\n    if x:\n        return None\n    print(x)\n'
    edited = 'def step(x):\n    """Another doc."""\n    if x:\n        return None\n    print(x)\n'
    fps = {fingerprint_code(load(tmp_path, src)) for src in (without, with_doc, edited)}
    assert len(fps) == 1


def test_code_change_reported_by_compare(tmp_path: Path) -> None:
    old_fn = load(tmp_path, ORIGINAL)
    new_fn = load(tmp_path, OTHER_CODE["body"])
    assert compare(fingerprint(old_fn, (3,), {}), fingerprint(new_fn, (3,), {})) == ["code of step changed"]
    documented = load(tmp_path, SAME_CODE["docstring added"])
    assert compare(fingerprint(old_fn, (3,), {}), fingerprint(documented, (3,), {})) == []
    new_default = load(tmp_path, OTHER_CODE["default"])
    assert compare(fingerprint(old_fn, (3,), {}), fingerprint(new_default, (3,), {})) == [
        "argument 'scale' changed (2.0 -> 3.0)",
        "code of step changed",
    ]


def test_code_fingerprint_stable_after_warm_up(tmp_path: Path) -> None:
    # 3.11+ specializes bytecode in place once a function runs hot;
    # co_code must still read the same.
    fn = load(tmp_path, ORIGINAL)
    fresh = fingerprint_code(load(tmp_path, ORIGINAL))
    for i in range(2000):
        fn(i % 7)
    _bytecode._CODE_DIGESTS.clear()
    _source._AST_DIGESTS.clear()
    assert fingerprint_code(fn) == fresh


def test_closures_count_code_and_constants_not_mutable_state(tmp_path: Path) -> None:
    src = """
def make(k):
    memo = {}
    def helper(v):
        return v * k
    def step(x):
        memo[x] = helper(x)
        return memo[x]
    return step
"""
    make = load(tmp_path, src, "make")
    step2 = make(2)
    before = fingerprint_code(step2)
    step2(1)
    step2(5)  # the memo dict changed: not a code change
    assert fingerprint_code(step2) == before
    assert fingerprint_code(make(3)) != before  # a captured constant changed
    make_edited = load(tmp_path, src.replace("v * k", "v * k + 1"), "make")
    assert fingerprint_code(make_edited(2)) != before  # the helper's code changed


def test_recursive_nested_function_and_classes(tmp_path: Path) -> None:
    src = """
def outer():
    def rec(n):
        return 1 if n <= 0 else n * rec(n - 1)
    return rec

class Step:
    def __call__(self, x):
        return x + 1

    @staticmethod
    def scale(x):
        return 2 * x
"""
    rec = load(tmp_path, src, "outer")()
    assert fingerprint_code(rec) == fingerprint_code(load(tmp_path, src, "outer")())
    cls = load(tmp_path, src, "Step")
    edited = load(tmp_path, src.replace("2 * x", "3 * x"), "Step")
    assert fingerprint_code(cls) != fingerprint_code(edited)
    assert fingerprint_code(cls()) == fingerprint_code(edited())  # __call__ is unchanged
    assert fingerprint_code(functools.lru_cache(maxsize=None)(step)) == fingerprint_code(step)
    assert fingerprint_code(len) is None


_LOCK = threading.Lock()


def test_unfingerprintable_default_does_not_raise() -> None:
    def f(x: Any, lock: Any = _LOCK) -> None:
        pass

    def g(x: Any, lock: Any = _LOCK, n: int = 1) -> None:
        pass

    def h(x: Any, lock: Any = _LOCK, n: int = 2) -> None:
        pass

    assert fingerprint_code(f) == fingerprint_code(f)
    assert fingerprint_code(g) != fingerprint_code(h)  # the other defaults still count


# -- records ------------------------------------------------------------------------


def test_record_is_json_and_compares_after_a_round_trip() -> None:
    rec = fingerprint(step, (np.ones(3), {"a": {1, 2}}), {"z": Path("p")})
    again = json.loads(json.dumps(rec))
    assert again == rec
    assert compare(again, fingerprint(step, (np.ones(3), {"a": {2, 1}}), {"z": Path("p")})) == []


def test_compare_edge_cases() -> None:
    rec = fingerprint(step, (1,), {})
    assert compare({}, rec) == []  # an entry saved before fingerprints existed
    assert compare({**rec, "v": 0}, rec) == []  # another digest format
    assert compare({**rec, "code": None}, rec) == []
    assert compare({"code": rec["code"], "fn": "step"}, rec) == []
    msg = describe("k", ["argument 'x' changed"])
    assert msg == "checkpoint 'k' was saved for another call: argument 'x' changed"


# -- the short way for small common shapes (issue 15) ---------------------------------

_SMALL_SHAPES: list[Any] = [
    (1, 2.5, "s"), [1, 2, 3], {"a": 1, "b": "x"}, {1: None, 2: True, 3: False},
    {"cfg": {"lr": 1e-3, "layers": [64, 64]}, "seed": 7}, ("a" * 30, -(2 ** 63), 2 ** 63 - 1),
    [(1, 2), [3, 4], {"k": 5}], {}, (), [], "é" * 40, (2 ** 64,), {"x": (1, "\ud800")},
    [float("inf"), -0.0, 0.0], (None,), [[]], {"a": {}}, {"b": [1, {"c": 2}]}, {1: "a", "b": 2},
    tuple(range(64)), tuple(range(65)), [1.5] * 64, {"n": float("nan")}, [[[[[1]]]]], [[[[1]]]],
    {"k": "x" * 70000}, (True, 1), {True: 1}, (1, np.int64(2)), [b"bytes"], {"s": {1, 2}},
]


@pytest.mark.parametrize("value", _SMALL_SHAPES, ids=lambda v: type(v).__name__)
def test_the_short_way_gives_the_walks_digest(value: Any) -> None:
    assert fpmod._digest_walk(value) == fpmod._walk_digest(value)


def test_a_container_holding_itself_takes_the_walk() -> None:
    loop: list[Any] = [1]
    loop.append(loop)
    assert fpmod._small_bytes(loop) is None
    assert fpmod._digest_walk(loop) == fpmod._walk_digest(loop)


@pytest.mark.parametrize("value, digest", [
    ((1, 2.5, "s"), "c60d2da3a10b836b858990b48c98fb36"),
    ({"cfg": {"lr": 1e-3, "layers": [64, 64]}, "seed": 7}, "0b6bc565cf5e2c8f5ddbd53c4b7c67c1"),
    ([None, True, -(2 ** 63)], "c76ba53ba08430ecab1d1e0144434d16"),
    ({3: "x", 1: ("y", 2.0)}, "bf88196a79610f7f8d797d8cfb476064"),
])
def test_digests_of_records_written_before_the_short_way_are_unchanged(value: Any, digest: str) -> None:
    # Computed by the canonical walk alone (the library before issue 15):
    # entries saved then must still compare equal.
    assert fpmod._small_bytes(value) is not None  # the short way is the one tested
    assert fingerprint_value(value) == digest
