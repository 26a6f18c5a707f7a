"""Steps that process-pool and Dask workers run: importable by name in every worker."""

from __future__ import annotations

import os
import signal
import time
import uuid
from typing import Any

from ai2_kit.core.checkpoint import FnInfo, apply_checkpoint


def mark_run(runs_dir: str, tag: str) -> None:
    """Leave one file per run of a step: the parent counts them."""
    os.makedirs(runs_dir, exist_ok=True)
    with open(os.path.join(runs_dir, f"{tag}-{os.getpid()}-{uuid.uuid4().hex}"), "w") as f:
        f.write("ran")


def key_of(info: FnInfo) -> str:
    return f"sq/{info.args[0]}"


def square(i: int, runs_dir: str) -> int:
    mark_run(runs_dir, f"sq{i}")
    return i * i


@apply_checkpoint(key_of)
def square_decorated(i: int, runs_dir: str) -> int:
    """Decorated at module level: the module's name ``square_decorated`` is the wrapper."""
    mark_run(runs_dir, f"sq{i}")
    return i * i


def through_module_wrapper(i: int, runs_dir: str) -> int:
    """A plain task that calls a checkpointed step: the worker's own default store decides."""
    return int(square_decorated(i, runs_dir))


def pid(_: Any = None) -> int:
    return os.getpid()


def square_or_die_once(i: int, runs_dir: str, die_at: int) -> int:
    """Like ``square``; the first run of step ``die_at`` kills its whole worker process."""
    mark_run(runs_dir, f"sq{i}")
    if i == die_at:
        flag = os.path.join(runs_dir, "..", "killed-once")
        try:
            fd = os.open(flag, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            pass
        else:
            os.close(fd)
            os.kill(os.getpid(), signal.SIGKILL)
            time.sleep(60)  # pragma: no cover - the signal ends us first
    return i * i


def count_runs(runs_dir: str) -> int:
    return len(os.listdir(runs_dir)) if os.path.isdir(runs_dir) else 0


async def _async_square(i: int) -> int:
    return i * i


def async_square_in_child(args: tuple[Any, int]) -> int:
    """Run a checkpointed async step under a fresh loop in a (forked) worker."""
    import asyncio

    wrapped, i = args
    return int(asyncio.run(wrapped(i)))
