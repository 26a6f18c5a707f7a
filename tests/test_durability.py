"""Durable on return: SIGKILL a writer at random moments, lose nothing it acknowledged."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
from typing import Any, Callable

import numpy as np
import pytest

from _procs import BIG_BYTES, value_for
from _reliability import record
from ai2_kit.core.checkpoint.stores import DirectoryStore, SQLiteStore, Store

PROCS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_procs.py")
TRIALS = int(os.environ.get("AI2_KIT_KILL_TRIALS", "30"))


def spawn(role: str, factory: Any, *args: object) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, PROCS, role, factory.kind, factory.location, json.dumps(factory.options),
         *map(str, args)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )


def kill_at_random(proc: subprocess.Popen[str], delay: float) -> list[int]:
    """Read acks until a random moment, SIGKILL, then collect the acks already printed."""
    acks: list[int] = []

    def read() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            if line.startswith("ack "):
                acks.append(int(line.split()[1]))

    reader = threading.Thread(target=read)
    reader.start()
    time.sleep(delay)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    reader.join()
    assert proc.stdout is not None and proc.stderr is not None
    proc.stdout.close()
    err = proc.stderr.read()
    proc.stderr.close()
    assert "Traceback" not in err, err
    return acks


def check_value(got: Any, want: Any) -> None:
    if isinstance(want, np.ndarray):
        np.testing.assert_array_equal(got, want)
    else:
        assert got == want


def test_sigkill_during_writes_loses_nothing(store_factory: Callable[..., Store]) -> None:
    rng = random.Random(1234)
    acknowledged = 0
    for trial in range(TRIALS):
        tag = f"trial{trial:03d}"
        proc = spawn("writer", store_factory, tag, 4, 100_000)
        # Python start-up and imports take ~0.3 s; kill anywhere from before the
        # first write to well into the writing.
        acks = kill_at_random(proc, rng.uniform(0.2, 1.2))
        store = store_factory()  # the store always opens after a kill
        try:
            for i in acks:
                hit = store.lookup(f"{tag}/k{i:05d}")
                assert hit is not None, f"{tag}/k{i:05d} was acknowledged but is missing"
                check_value(hit.value, value_for(tag, i, 4))
            # Whatever else is there (the write in flight) is complete too.
            for meta in store.iter_meta(tag):
                assert store.lookup(meta["key"]) is not None
            if isinstance(store, SQLiteStore):
                assert store.integrity_check() == []
                assert store.orphan_blobs() == []  # the dead writer's side file was reclaimed
            if isinstance(store, DirectoryStore):
                store.remove_dead_writers_files()  # the killed writer's partial temp file
            # Checked: free the space (long runs write tens of GB otherwise).
            store.delete_many(store.keys(tag))
        finally:
            store.close()
        acknowledged += len(acks)
    record(f"SIGKILL during writes (values up to {BIG_BYTES / 1e6:.1f} MB)", store_factory.kind,  # type: ignore[attr-defined]
           TRIALS, TRIALS, acknowledged, 0)
    assert acknowledged > 0


def test_sigkill_during_overwrites_keeps_a_complete_value(store_factory: Callable[..., Store]) -> None:
    rng = random.Random(99)
    trials = max(3, TRIALS // 5)
    acknowledged = 0
    for trial in range(trials):
        tag = f"ow{trial}"
        acks = kill_at_random(spawn("overwriter", store_factory, tag, 100_000), rng.uniform(0.3, 1.0))
        store = store_factory()
        try:
            hit = store.lookup(f"{tag}/same")
            if acks:
                assert hit is not None
                # The last acknowledged write, or the one in flight: never a mix.
                last = max(acks)
                candidates = [value_for(tag, last, 3), value_for(tag, last + 1, 3)]
                assert any(_equal(hit.value, c) for c in candidates)
        finally:
            store.close()
        acknowledged += len(acks)
    record("SIGKILL during overwrites of one key", store_factory.kind,  # type: ignore[attr-defined]
           trials, trials, acknowledged, 0)


def _equal(a: Any, b: Any) -> bool:
    if isinstance(a, np.ndarray) or isinstance(b, np.ndarray):
        return isinstance(a, np.ndarray) and isinstance(b, np.ndarray) and np.array_equal(a, b)
    return bool(a == b)


def test_processes_tasks_and_threads_all_land(store_factory: Callable[..., Store], reap: Any) -> None:
    """4 processes, each with 8 asyncio tasks and 4 threads, distinct keys: all land."""
    count = 10
    procs = reap([spawn("mixed", store_factory, f"p{p}", count) for p in range(4)])
    for proc in procs:
        out, err = proc.communicate(timeout=240)
        assert proc.returncode == 0, err
        assert "done" in out
    store = store_factory()
    keys = set(store.keys())
    expected = {f"p{p}/task{t}/k{i}" for p in range(4) for t in range(8) for i in range(count)}
    expected |= {f"p{p}/thread{t}/k{i}" for p in range(4) for t in range(4) for i in range(count)}
    assert keys == expected
    for key in sorted(expected)[::37]:
        hit = store.lookup(key)
        assert hit is not None and hit.value == int(key.rsplit("k", 1)[1])


def test_same_key_from_many_writers_corrupts_nothing(store_factory: Callable[..., Store], reap: Any) -> None:
    procs = reap([spawn("overwriter", store_factory, "shared", 30) for _ in range(4)])
    for proc in procs:
        _, err = proc.communicate(timeout=240)
        assert proc.returncode == 0, err
    store = store_factory()
    hit = store.lookup("shared/same")
    assert hit is not None
    assert any(_equal(hit.value, value_for("shared", i, 3)) for i in range(30))
    assert store.keys() == ["shared/same"]


@pytest.mark.parametrize("n", [1])
def test_kill_before_anything_leaves_an_openable_store(store_factory: Callable[..., Store], n: int) -> None:
    proc = spawn("sleep-after-start", store_factory)
    assert proc.stdout is not None
    assert proc.stdout.readline().strip() == "ready"
    proc.kill()
    proc.communicate()
    store = store_factory()
    assert store.keys() == []
