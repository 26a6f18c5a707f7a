"""Same-key dedup: one live caller computes a key, the others wait for its result."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable

from ai2_kit.core.checkpoint import Checkpointer
from ai2_kit.core.checkpoint.stores import Store

PROCS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_procs.py")


def test_claims_contract(store: Store) -> None:
    assert store.supports_claims
    assert store.try_claim("k", "A", 30) is True
    assert store.try_claim("k", "B", 30) is False
    assert store.try_claim("k", "A", 30) is True  # the owner may take it again
    assert store.renew_claim("k", "A", 30) is True
    assert store.renew_claim("k", "B", 30) is False
    store.release_claim("k", "B")  # not B's: nothing happens
    assert store.try_claim("k", "B", 30) is False
    store.release_claim("k", "A")
    assert store.try_claim("k", "B", 30) is True
    assert store.try_claim("other", "A", 30) is True  # claims are per key


def test_expired_claim_is_taken_over(store: Store) -> None:
    assert store.try_claim("k", "dead-owner", 0.3) is True
    assert store.try_claim("k", "B", 30) is False
    time.sleep(0.6)
    assert store.try_claim("k", "B", 30) is True
    assert store.renew_claim("k", "dead-owner", 30) is False
    assert store.keys() == []  # claims are not entries


def spawn(factory: Any, runs: Path, seconds: float, lease: float) -> subprocess.Popen[str]:
    env = dict(os.environ, AI2_KIT_TEST_LEASE=str(lease))
    return subprocess.Popen(
        [sys.executable, PROCS, "dedup", factory.kind, factory.location, json.dumps(factory.options),
         str(runs), str(seconds)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
    )


def test_four_processes_one_slow_step_runs_once(store_factory: Callable[..., Store], tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    procs = [spawn(store_factory, runs, 2.0, 30) for _ in range(4)]
    values = set()
    for p in procs:
        out, err = p.communicate(timeout=120)
        assert p.returncode == 0, err
        values.add(out.strip().splitlines()[-1])
    assert len(os.listdir(runs)) == 1
    assert len(values) == 1  # everybody got the one computed result


def test_killed_owner_step_runs_exactly_once_more(store_factory: Callable[..., Store], tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    lease = 2.0
    owner = spawn(store_factory, runs, 60.0, lease)
    assert owner.stdout is not None
    assert owner.stdout.readline().strip() == "running"  # the owner holds the claim
    waiters = [spawn(store_factory, runs, 1.0, lease) for _ in range(3)]
    time.sleep(0.5)
    killed_at = time.monotonic()
    owner.send_signal(signal.SIGKILL)
    owner.communicate()
    values = set()
    for p in waiters:
        out, err = p.communicate(timeout=120)
        assert p.returncode == 0, err
        values.add(out.strip().splitlines()[-1])
    took = time.monotonic() - killed_at
    assert len(os.listdir(runs)) == 2  # the killed run, and exactly one more
    assert len(values) == 1
    print(f"after the owner's SIGKILL the waiters finished in {took:.1f} s (lease {lease} s, step 1 s)")


def test_threads_and_tasks_in_one_process_run_once(store_factory: Callable[..., Store]) -> None:
    ckpt = Checkpointer(store=store_factory(), dedup=True, lease=30)
    ran: list[int] = []
    lock = threading.Lock()

    def step() -> str:
        with lock:
            ran.append(1)
        time.sleep(0.5)
        return "once"

    results: list[str] = []
    threads = [threading.Thread(target=lambda: results.append(ckpt("t")(step)())) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == ["once"] * 4 and len(ran) == 1

    async def astep() -> str:
        ran.append(2)
        await asyncio.sleep(0.3)
        return "async once"

    async def many() -> list[str]:
        return await asyncio.gather(*(ckpt("a")(astep)() for _ in range(5)))

    assert asyncio.run(many()) == ["async once"] * 5
    assert ran.count(2) == 1


def test_failed_owner_releases_and_a_waiter_computes(store_factory: Callable[..., Store]) -> None:
    ckpt = Checkpointer(store=store_factory(), dedup=True, lease=30)
    gate = threading.Event()

    def failing() -> str:
        gate.wait(5)
        raise RuntimeError("step failed")

    errors: list[BaseException] = []

    def first() -> None:
        try:
            ckpt("k")(failing)()
        except RuntimeError as e:
            errors.append(e)

    t = threading.Thread(target=first)
    t.start()
    time.sleep(0.3)
    threading.Timer(0.3, gate.set).start()
    assert ckpt("k")(lambda: "second")() == "second"  # waited, then took over
    t.join()
    assert len(errors) == 1
