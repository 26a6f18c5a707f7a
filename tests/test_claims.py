"""Directory-store claims: decided by link() alone; renew and release touch only the caller's own claim."""

from __future__ import annotations

import os
import random
import threading
import time
from typing import Any

import pytest

from ai2_kit.core.checkpoint.stores import DirectoryStore


@pytest.fixture
def store(tmp_path: Any) -> DirectoryStore:
    return DirectoryStore(str(tmp_path / "d"))


def race(fns: list[Any], jitter: float, rng: random.Random) -> list[Any]:
    """Run ``fns`` in threads released together, each after a small random delay."""
    barrier = threading.Barrier(len(fns))
    delays = [rng.uniform(0, jitter) for _ in fns]
    out: list[Any] = [None] * len(fns)

    def run(i: int) -> None:
        barrier.wait()
        time.sleep(delays[i])  # varied interleavings, not ordering: any order must be right
        out[i] = fns[i]()

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(fns))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return out


@pytest.mark.timeout(120)
def test_expired_claim_is_taken_over_by_exactly_one(store: DirectoryStore) -> None:
    rng = random.Random(5)
    for r in range(60):
        key = f"k{r}"
        assert store.try_claim(key, "ghost", -1.0)  # a dead owner's claim, expired already
        got = race([lambda t=t, k=key: store.try_claim(k, f"o{t}", 30) for t in range(8)], 0.03, rng)
        winners = [t for t, won in enumerate(got) if won]
        assert len(winners) == 1, (r, winners)
        # The winner holds it: nobody else can take it, and only the winner renews.
        assert store.try_claim(key, "late", 30) is False
        assert store.renew_claim(key, f"o{winners[0]}", 30) is True
        assert all(store.renew_claim(key, f"o{t}", 30) is False for t in range(8) if t != winners[0])


@pytest.mark.timeout(120)
def test_release_by_a_former_owner_never_frees_the_new_owners_claim(store: DirectoryStore) -> None:
    rng = random.Random(11)
    for r in range(150):
        key = f"k{r}"
        assert store.try_claim(key, "A", -1.0)  # A's lease has run out, and A is releasing
        got = race([lambda k=key: store.release_claim(k, "A"), lambda k=key: store.try_claim(k, "B", 30)], 0.002, rng)
        assert got[1] is True  # released or expired: B takes it either way
        # B holds it now, whatever the order: A's release must not have removed B's claim.
        assert store.try_claim(key, "C", 30) is False, r
        assert store.renew_claim(key, "A", 30) is False


def _contents(folder: str) -> dict[str, str]:
    out = {}
    for n in os.listdir(folder):
        with open(os.path.join(folder, n), encoding="utf-8") as f:
            out[n] = f.read()
    return out


def test_renew_and_release_touch_only_the_callers_claim(store: DirectoryStore) -> None:
    assert store.try_claim("k", "A", 30)
    folder = store._claim_path("k")
    before = _contents(folder)
    store.release_claim("k", "B")  # not B's
    assert store.renew_claim("k", "B", 30) is False
    assert _contents(folder) == before
    store.release_claim("k", "A")
    assert store.try_claim("k", "B", 30) is True
    assert store.try_claim("k", "A", 30) is False


def test_claims_survive_many_cycles_without_piling_up(store: DirectoryStore) -> None:
    for i in range(30):
        assert store.try_claim("k", f"o{i}", 30)
        store.release_claim("k", f"o{i}")
    folder = store._claim_path("k")
    assert len([n for n in os.listdir(folder) if n.isdigit()]) == 1  # the older numbers were removed
    assert store.keys() == []  # claims are not entries
