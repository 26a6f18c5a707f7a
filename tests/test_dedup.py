"""Same-key dedup: one live caller computes a key, the others wait for its result."""

from __future__ import annotations

import asyncio
import json
import logging
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

LOGGER = "ai2_kit.core.checkpoint"
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
    # A held claim is checked on a key whose lease cannot run out during the
    # test; expiry on another, and waited for (with a deadline), not slept on.
    assert store.try_claim("held", "live-owner", 300) is True
    assert store.try_claim("held", "B", 30) is False
    assert store.try_claim("k", "dead-owner", 0.3) is True
    deadline = time.monotonic() + 30
    while not store.try_claim("k", "B", 30):
        assert time.monotonic() < deadline, "an expired claim was never taken over"
        time.sleep(0.05)
    assert store.renew_claim("k", "dead-owner", 30) is False
    assert store.try_claim("held", "B", 30) is False  # the live one was not taken
    assert store.keys() == []  # claims are not entries


def spawn(factory: Any, runs: Path, seconds: float, lease: float) -> subprocess.Popen[str]:
    env = dict(os.environ, AI2_KIT_TEST_LEASE=str(lease))
    return subprocess.Popen(
        [sys.executable, PROCS, "dedup", factory.kind, factory.location, json.dumps(factory.options),
         str(runs), str(seconds)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
    )


def test_four_processes_one_slow_step_runs_once(
    store_factory: Callable[..., Store], tmp_path: Path, reap: Any
) -> None:
    runs = tmp_path / "runs"
    procs = reap([spawn(store_factory, runs, 2.0, 30) for _ in range(4)])
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


class _Seen(logging.Handler):
    """Sets an event when a log line containing ``text`` is emitted."""

    def __init__(self, text: str) -> None:
        super().__init__(logging.DEBUG)
        self.text, self.event = text, threading.Event()

    def emit(self, record: logging.LogRecord) -> None:
        if self.text in record.getMessage():
            self.event.set()


def test_failed_owner_releases_and_a_waiter_computes(store_factory: Callable[..., Store]) -> None:
    ckpt = Checkpointer(store=store_factory(), dedup=True, lease=30)
    owner_running, gate = threading.Event(), threading.Event()

    def failing() -> str:
        owner_running.set()
        assert gate.wait(60)
        raise RuntimeError("step failed")

    errors: list[BaseException] = []

    def first() -> None:
        try:
            ckpt("k")(failing)()
        except RuntimeError as e:
            errors.append(e)

    seen = _Seen("Waiting for checkpoint k")
    logger = logging.getLogger(LOGGER)
    old_level = logger.level
    logger.addHandler(seen)
    logger.setLevel(logging.INFO)
    try:
        t = threading.Thread(target=first)
        t.start()
        assert owner_running.wait(60)  # the owner holds the key
        # Open the gate only once the second caller is waiting for the owner.
        threading.Thread(target=lambda: seen.event.wait(60) and gate.set()).start()
        assert ckpt("k")(lambda: "second")() == "second"  # waited, then took over
        t.join()
    finally:
        logger.removeHandler(seen)
        logger.setLevel(old_level)
    assert seen.event.is_set() and len(errors) == 1


def test_owner_saving_between_lookup_and_claim_is_a_hit(store_factory: Callable[..., Store]) -> None:
    # Case 8: the caller looks up (a miss), then another caller saves and
    # releases the key before this caller claims it; the claim succeeds, and
    # the step must not run again: the key is looked up once the claim is ours.
    store = store_factory()

    class OtherFinishesRightAfterTheLookup(Checkpointer):
        first = True

        # The look-up of a call (its short way, or lookup).
        def lookup_call(self, key: str, digest: Any, short: Any) -> tuple[bool, Any, dict[str, Any], bool]:
            found = super().lookup_call(key, digest, short)
            if self.first:
                self.first = False
                other = Checkpointer(store=store_factory(), dedup=True, lease=30)
                assert other.store.try_claim(key, "other-owner", 30)
                other.save(key, "theirs")
                other.store.release_claim(key, "other-owner")
            return found

    ckpt = OtherFinishesRightAfterTheLookup(store=store, dedup=True, lease=30)
    ran: list[int] = []
    assert ckpt("k8")(lambda: ran.append(1) or "mine")() == "theirs"
    assert ran == []
