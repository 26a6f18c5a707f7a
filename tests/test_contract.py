"""One contract, every store: what any engine behind a Checkpointer must do."""

from __future__ import annotations

import dataclasses
import threading
from typing import Any, Callable

import numpy as np
import pytest

from ai2_kit.core.checkpoint import Checkpointer, InvalidKeyError
from ai2_kit.core.checkpoint.stores import Store


@dataclasses.dataclass
class Point:
    x: float
    y: float


VALUES: list[Any] = [
    None, False, True, 0, 0.0, -1.5, "", "text", b"", b"\x00\xff", [], {}, (), set(), frozenset(),
    [1, [2, [3]]], {"systems": ["a.xyz", "b.xyz"], "n": 2}, ("traj", 42), {1, 2, 3},
    ValueError("an exception as a value"), Point(1.0, 2.0), 2**100, complex(1, 2),
]


@pytest.mark.parametrize("value", VALUES, ids=lambda v: type(v).__name__)
def test_round_trip(store: Store, value: Any) -> None:
    store.put("k", value)
    hit = store.lookup("k")
    assert hit is not None
    if isinstance(value, BaseException):
        assert type(hit.value) is type(value) and hit.value.args == value.args
    else:
        assert hit.value == value
        assert type(hit.value) is type(value)


def test_missing_key_is_none(store: Store) -> None:
    assert store.lookup("nothing/here") is None
    assert store.get_meta("nothing") is None
    assert "nothing" not in store


def test_lambda_and_closure(store: Store) -> None:
    k = 3
    store.put("fn", lambda x: x * k)
    hit = store.lookup("fn")
    assert hit is not None and hit.value(2) == 6


@pytest.mark.parametrize("shape", [(0,), (1000,), (3, 4, 5), (600, 600)])
def test_numpy_arrays(store: Store, shape: tuple[int, ...]) -> None:
    a = np.arange(int(np.prod(shape)), dtype=np.float64).reshape(shape)
    store.put("arr", a)
    hit = store.lookup("arr")
    assert hit is not None
    assert hit.value.dtype == a.dtype and hit.value.shape == a.shape
    np.testing.assert_array_equal(hit.value, a)
    hit.value[...] = 0  # the loaded array is writable, like the original


def test_non_contiguous_and_structured_arrays(store: Store) -> None:
    a = np.arange(100).reshape(10, 10)[:, ::3]
    rec = np.zeros(4, dtype=[("a", "i4"), ("b", "f8")])
    rec["a"] = [1, 2, 3, 4]
    store.put("views", {"nc": a, "rec": rec, "f": np.asfortranarray(np.ones((3, 4)))})
    hit = store.lookup("views")
    assert hit is not None
    np.testing.assert_array_equal(hit.value["nc"], a)
    np.testing.assert_array_equal(hit.value["rec"], rec)
    np.testing.assert_array_equal(hit.value["f"], np.ones((3, 4)))


def test_large_value_round_trip(store: Store) -> None:
    # Larger than any inline limit: exercises side files / chunked storage.
    a = np.random.default_rng(0).random(3_000_000)
    store.put("big", {"a": a, "tag": "x"})
    hit = store.lookup("big")
    assert hit is not None
    np.testing.assert_array_equal(hit.value["a"], a)
    meta = store.get_meta("big")
    assert meta is not None and meta["size"] > a.nbytes


def test_overwrite_replaces(store: Store) -> None:
    store.put("k", 1)
    store.put("k", np.zeros(400_000))  # inline -> large
    store.put("k", "small again")  # large -> inline: no leftover
    hit = store.lookup("k")
    assert hit is not None and hit.value == "small again"
    assert store.keys() == ["k"]


def test_delete(store: Store) -> None:
    store.put("a/b", 1)
    store.put("a/c", np.ones(300_000))
    assert store.delete("a/b") is True
    assert store.delete("a/b") is False
    assert store.delete_many(["a/c", "zzz"]) == 1
    assert store.keys() == []
    assert len(store) == 0


def test_metadata_without_unpickling(store: Store) -> None:
    meta = store.put("iters-000/train", [1, 2, 3], fn_name="train", call_site="wf.py:10", duration=1.5)
    got = store.get_meta("iters-000/train")
    assert got == meta
    for field in ("key", "fn_name", "call_site", "created", "duration", "size", "host", "pid", "version"):
        assert field in got, field
    assert got["key"] == "iters-000/train" and got["duration"] == 1.5 and got["size"] > 0


def test_listing_sorted_and_prefix_rules(store: Store) -> None:
    keys = ["iters-000/deepmd/red", "iters-000/deepmd/neu", "iters-000/deepmd-old", "iters-000/cp2k/red",
            "iters-001/lammps", "time_consuming_step", "a", "a-c", "a/b"]
    for k in keys:
        store.put(k, k)
    assert store.keys() == sorted(keys)
    assert store.keys("iters-000/deepmd") == ["iters-000/deepmd/neu", "iters-000/deepmd/red"]
    assert store.keys("iters-000/deepmd/") == ["iters-000/deepmd/neu", "iters-000/deepmd/red"]
    assert store.keys("iters-000/deepmd*") == ["iters-000/deepmd-old", "iters-000/deepmd/neu",
                                               "iters-000/deepmd/red"]
    assert store.keys("*/red") == ["iters-000/cp2k/red", "iters-000/deepmd/red"]
    assert store.keys("iters-00?/lammps") == ["iters-001/lammps"]
    assert store.keys("a") == ["a", "a/b"]
    assert store.keys("nothing") == []
    assert [m["key"] for m in store.iter_meta()] == sorted(keys)


@pytest.mark.parametrize("key", ["ключ/шаг", "步骤/一", "emoji/🧪", "with space/and%percent",
                                 ".hidden/x", "x.ckpt", "a.ckpt/b", "%2E", "trailing.tmp"])
def test_unusual_keys(store: Store, key: str) -> None:
    store.put(key, key)
    hit = store.lookup(key)
    assert hit is not None and hit.value == key
    assert store.keys() == [key]
    assert store.delete(key)
    assert store.keys() == []


@pytest.mark.parametrize("key", ["", "/etc/passwd", "../x", "a/../../b", "a//b", "a/./b", "a/", "nul\x00",
                                 ".", "..", 5, None, b"bytes", "x" * 1025, "\ud800"])
def test_bad_keys_are_refused(store: Store, key: Any) -> None:
    with pytest.raises(InvalidKeyError) as info:
        store.put(key, 1)
    assert repr(key)[:30] in str(info.value)
    with pytest.raises(InvalidKeyError):
        store.lookup(key)
    with pytest.raises(InvalidKeyError):
        store.delete(key)
    assert store.keys() == []


def test_reopen_sees_entries(store_factory: Callable[..., Store]) -> None:
    first = store_factory()
    first.put("x/y", {"v": 1})
    first.close()
    second = store_factory()
    hit = second.lookup("x/y")
    assert hit is not None and hit.value == {"v": 1}


def test_threads_share_one_store(store: Store) -> None:
    errors: list[BaseException] = []

    def work(t: int) -> None:
        try:
            for i in range(25):
                store.put(f"t{t}/k{i}", (t, i))
                hit = store.lookup(f"t{t}/k{i}")
                assert hit is not None and hit.value == (t, i)
        except BaseException as e:  # collected and re-raised in the main thread
            errors.append(e)

    threads = [threading.Thread(target=work, args=(t,)) for t in range(4)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert not errors, errors
    assert len(store) == 100


def test_checkpointer_over_store(store: Store) -> None:
    calls: list[int] = []

    def step(x: int) -> int:
        calls.append(x)
        return x * 10

    ckpt = Checkpointer(store=store)
    assert ckpt("s")(step)(1) == 10
    assert ckpt("s")(step)(2) == 10
    assert calls == [1]
    assert ckpt.delete("s") is True
    assert ckpt("s")(step)(3) == 30
    assert calls == [1, 3]


def test_incomplete_store_cannot_be_instantiated() -> None:
    class Half(Store):
        def _get(self, key: str) -> None:
            return None

    with pytest.raises(TypeError):
        Half("x")  # type: ignore[abstract]
