"""asyncio: store work off the loop, dedup that cannot deadlock, claims that end with their awaitable."""

from __future__ import annotations

import asyncio
import gc
import threading
import time
import uuid
from typing import Any, Callable

import numpy as np
import pytest

from ai2_kit.core.checkpoint import Checkpointer
from ai2_kit.core.checkpoint.stores import SQLiteStore, Store


def wait_until(cond: Callable[[], bool], what: str, deadline: float = 20.0) -> None:
    end = time.monotonic() + deadline
    while not cond():
        if time.monotonic() > end:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.01)


def claim_is_free(store: Store, key: str) -> bool:
    other = f"probe-{uuid.uuid4().hex}"
    if store.try_claim(key, other, 30):
        store.release_claim(key, other)
        return True
    return False


@pytest.mark.timeout(60)
def test_same_key_twice_in_one_gather_does_not_hang(store_factory: Callable[..., Store]) -> None:
    # The hang: a plain function returning an awaitable, two calls of
    # one key in one gather, dedup on. The second call used to sleep on the
    # loop's thread in claim() while the owner's coroutine could never run.
    ckpt = Checkpointer(store=store_factory(), dedup=True, lease=30)
    runs: list[int] = []

    def fetch(i: int) -> Any:
        runs.append(i)
        return asyncio.sleep(0.2, result=i)

    step = ckpt("fetch/1")(fetch)

    async def main() -> list[int]:
        return list(await asyncio.gather(step(1), step(1)))

    assert asyncio.run(main()) == [1, 1]
    assert runs == [1]  # one computation, shared
    assert ckpt.store.keys() == ["fetch/1"] and claim_is_free(ckpt.store, "fetch/1")


@pytest.mark.timeout(60)
def test_gathered_same_key_coroutines_share_one_computation_and_one_claim(tmp_path: Any) -> None:
    claims: list[str] = []

    class Counting(SQLiteStore):
        def _try_claim(self, key: str, owner: str, ttl: float) -> bool:
            claims.append(key)
            return super()._try_claim(key, owner, ttl)

    ckpt = Checkpointer(store=Counting(str(tmp_path / "c.db")), dedup=True, lease=30)
    runs: list[int] = []

    async def astep() -> str:
        runs.append(1)
        await asyncio.sleep(0.05)
        return "once"

    async def main() -> list[str]:
        return list(await asyncio.gather(*(ckpt("a")(astep)() for _ in range(10))))

    assert asyncio.run(main()) == ["once"] * 10
    assert runs == [1] and claims == ["a"]
    ckpt.close()


def test_store_io_of_async_steps_runs_off_the_loop(tmp_path: Any) -> None:
    seen: dict[str, set[int]] = {}
    claimed_on_loop: list[str] = []

    def record(what: str) -> None:
        seen.setdefault(what, set()).add(threading.get_ident())

    class Recording(SQLiteStore):
        def _get(self, key: str) -> Any:
            record("lookup")
            return super()._get(key)

        def put(self, key: str, value: Any, **fields: Any) -> dict[str, Any]:
            record("encode and write")
            return super().put(key, value, **fields)

        def _get_meta(self, key: str) -> Any:
            record("probe")
            return super()._get_meta(key)

        def _try_claim(self, key: str, owner: str, ttl: float) -> bool:
            record("claim")
            if threading.get_ident() == threading.main_thread().ident:
                claimed_on_loop.append(key)
            return super()._try_claim(key, owner, ttl)

        def _release_claim(self, key: str, owner: str) -> None:
            record("release")
            super()._release_claim(key, owner)

    class RecordingCheckpointer(Checkpointer):
        def fingerprint(self, fn: Callable[..., Any], args: tuple, kwargs: dict) -> dict[str, Any] | None:
            record("fingerprint")
            return super().fingerprint(fn, args, kwargs)

    ckpt = RecordingCheckpointer(store=Recording(str(tmp_path / "c.db")), dedup=True, lease=30)
    big_arg = np.ones(1 << 17)  # 1 MB: fingerprinting it is real work
    big_value = b"v" * (1 << 20)

    async def big(a: np.ndarray) -> bytes:
        return big_value

    async def small(x: int) -> int:
        return x + 1

    def plain_returning_awaitable(x: int) -> Any:
        return small(x)

    async def large_steps() -> int:
        assert await ckpt("big")(big)(big_arg) == big_value  # a miss: fingerprint, lookup, claim, save, release
        assert await ckpt("big")(big)(big_arg) == big_value  # a hit
        return threading.get_ident()

    loop_thread = asyncio.run(large_steps())
    assert {"lookup", "encode and write", "claim", "release", "fingerprint"} <= set(seen)
    assert not any(loop_thread in threads for threads in seen.values()), seen

    async def small_steps() -> int:
        assert await ckpt("s")(small)(1) == 2
        assert await ckpt("s")(small)(1) == 2
        assert await ckpt("p")(plain_returning_awaitable)(1) == 2
        return threading.get_ident()

    seen.clear()
    loop_thread = asyncio.run(small_steps())
    # Small reads may stay on the loop (a thread hop costs more, and a budget
    # per turn bounds them); a plain function decides synchronously what to
    # return, so its lookup and claim happen in its caller's thread. Saves and
    # releases never run on the loop.
    on_loop = {what for what, threads in seen.items() if loop_thread in threads}
    assert on_loop <= {"lookup", "probe", "claim", "fingerprint"} and "encode and write" in seen, seen
    assert "claim" not in on_loop or "p" in claimed_on_loop, claimed_on_loop
    ckpt.close()


@pytest.mark.parametrize("ending", ["fails", "cancelled", "closed", "collected"])
@pytest.mark.timeout(60)
def test_claim_ends_with_its_awaitable(store_factory: Callable[..., Store], ending: str) -> None:
    ckpt = Checkpointer(store=store_factory(), dedup=True, lease=30)
    key = f"end/{ending}"

    async def main() -> None:
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[int] = loop.create_future()
        pending = ckpt(key)(lambda: fut)()  # a plain function returning an awaitable
        assert not claim_is_free(ckpt.store, key)  # the call holds the claim
        if ending == "fails":
            fut.set_exception(RuntimeError("step failed"))
            with pytest.raises(RuntimeError):
                await pending
        elif ending == "cancelled":
            task = asyncio.ensure_future(pending)
            await asyncio.sleep(0)  # the task starts and waits on fut
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
        elif ending == "closed":
            pending.close()
        else:
            del pending
            gc.collect()
        fut.cancel()

    asyncio.run(main())
    wait_until(lambda: claim_is_free(ckpt.store, key), f"the claim on {key} to be released")
    assert ckpt.store.keys() == []
    # The in-process computation ended too: the next caller computes at once.
    assert asyncio.run(_await(ckpt(key)(lambda: asyncio.sleep(0, result=5))())) == 5
    assert ckpt.store.keys() == [key]


async def _await(aw: Any) -> Any:
    return await aw


@pytest.mark.timeout(60)
def test_waiting_for_another_process_is_awaited_not_slept(store_factory: Callable[..., Store]) -> None:
    # Another owner (as if in another process) holds the claim: the waiting
    # coroutine must leave the loop free; a ticker keeps running meanwhile.
    ckpt = Checkpointer(store=store_factory(), dedup=True, lease=30)
    assert ckpt.store.try_claim("w", "another-process", 30)
    ticks: list[float] = []

    async def astep() -> str:
        return "mine"

    async def main() -> str:
        async def ticker() -> None:
            while True:
                ticks.append(time.monotonic())
                await asyncio.sleep(0.005)

        t = asyncio.ensure_future(ticker())
        waiter = asyncio.ensure_future(ckpt("w")(astep)())
        while len(ticks) < 20:  # the loop runs while the step waits for the claim
            await asyncio.sleep(0.005)
        assert not waiter.done()
        await asyncio.get_running_loop().run_in_executor(None, ckpt.store.release_claim, "w", "another-process")
        out = await waiter
        t.cancel()
        return out

    assert asyncio.run(main()) == "mine"


def test_async_benchmark_runs(tmp_path: Any) -> None:
    """benchmarks/bench_async.py end to end at tiny sizes (no timing is checked)."""
    import json
    import os
    import subprocess
    import sys

    bench = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks",
                         "bench_async.py")
    proc = subprocess.run(
        [sys.executable, bench, "--stores", "sqlite,dir", "--n", "20", "--big-mb", "1", "--arg-mb", "1",
         "--gather", "8", "--threads", "2", "--tmp", str(tmp_path), "--json"],
        capture_output=True, text=True, timeout=240, check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout)
    assert [r["store"] for r in out["rows"]] == ["sqlite", "dir"]
    assert all(r["gathered_per_s"] > 0 and len(r["big_hit"]) == 2 for r in out["rows"])


def test_coroutine_driven_without_asyncio_still_checkpoints(tmp_path: Any) -> None:
    # Not every runner is asyncio (trio, or send() by hand): no loop to keep
    # free there, and the step is still saved and hit.
    ckpt = Checkpointer(str(tmp_path / "c.db"), dedup=True)
    runs: list[int] = []

    async def astep() -> int:
        runs.append(1)
        return 41

    for _ in range(2):
        coro = ckpt("no-loop")(astep)()
        with pytest.raises(StopIteration) as stop:
            coro.send(None)
        assert stop.value.value == 41
    assert runs == [1] and ckpt.store.keys() == ["no-loop"]
    ckpt.close()
