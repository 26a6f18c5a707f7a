"""Steps sent to Dask workers (a real LocalCluster, worker processes) are checkpointed there."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Iterator

import pytest

import _pool_steps as steps
from ai2_kit.core.checkpoint import apply_checkpoint, get_checkpointer, set_checkpoint_file

distributed = pytest.importorskip("distributed")

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]
N = 20


@pytest.fixture
def client(tmp_path: Path) -> Iterator[Any]:
    import cloudpickle

    # Workers then need not import the test helpers by name.
    cloudpickle.register_pickle_by_value(steps)
    # Set before the cluster starts: its workers inherit the default's description.
    set_checkpoint_file(tmp_path / "ckpt.db")
    cluster = distributed.LocalCluster(
        n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None,
        local_directory=str(tmp_path / "dask"),
    )
    c = distributed.Client(cluster)
    try:
        yield c
    finally:
        c.close()
        cluster.close()
        cloudpickle.unregister_pickle_by_value(steps)


def test_two_rounds_second_all_hits_and_a_killed_worker_loses_nothing(client: Any, tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    step = apply_checkpoint(steps.key_of)(steps.square_or_die_once)
    workers_before = set(client.run(os.getpid).values())
    # Round 1: step 7's first run kills its whole worker process (SIGKILL);
    # Dask restarts the worker and runs the step again.
    futures = client.map(step, range(N), [str(runs)] * N, [7] * N, pure=False)
    assert client.gather(futures) == [i * i for i in range(N)]
    assert os.path.exists(tmp_path / "killed-once")
    assert set(client.run(os.getpid).values()) != workers_before  # a worker really died
    # Every step once, step 7 twice. Results the dead worker held in memory
    # are recomputed by Dask elsewhere: those are hits, they do not run again.
    # (One thread per worker: no other step was half-way on the killed one.)
    assert steps.count_runs(str(runs)) == N + 1
    ckpt = get_checkpointer()
    assert ckpt is not None and len(ckpt.store.keys("sq")) == N  # nothing saved was lost
    # Round 2: all hits, in the workers; the step never runs.
    futures = client.map(step, range(N), [str(runs)] * N, [7] * N, pure=False)
    assert client.gather(futures) == [i * i for i in range(N)]
    assert steps.count_runs(str(runs)) == N + 1


def test_worker_without_a_received_wrapper_uses_the_inherited_default(client: Any, tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    for _ in range(2):
        futures = client.map(steps.through_module_wrapper, range(N), [str(runs)] * N, pure=False)
        assert client.gather(futures) == [i * i for i in range(N)]
    assert steps.count_runs(str(runs)) == N
