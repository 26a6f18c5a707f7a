"""A small active-learning workflow in the reference's style, resumable.

Each iteration labels structures (DFT), trains models side by side, explores
with MD and selects new structures. Every step is checkpointed under a key
like ``iters-001/train/model-0``. Make it fail on purpose, then rerun:

    AI2_KIT_EXAMPLE_FAIL_AT=iters-001/explore python examples/workflow.py
    python examples/workflow.py     # skips everything that finished

Options: ``--store PATH`` (default ``examples/workdir/checkpoint.db``; a
directory path with ``--dir``), ``--iterations N``, ``--step-seconds S``.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import random
import time

from ai2_kit.core.checkpoint import apply_checkpoint, set_checkpoint_dir, set_checkpoint_file

log = logging.getLogger("workflow")
FAIL_AT = os.environ.get("AI2_KIT_EXAMPLE_FAIL_AT", "")
STEP_SECONDS = 0.5
RUN: list[str] = []  # steps that really ran in this process


class StepFailed(RuntimeError):
    pass


async def work(name: str, seconds: float | None = None) -> None:
    """Stand-in for a cluster job: sleeps, and fails where told to."""
    RUN.append(name)
    await asyncio.sleep(STEP_SECONDS if seconds is None else seconds)
    if FAIL_AT and name.startswith(FAIL_AT):
        raise StepFailed(f"{name}: simulated failure (AI2_KIT_EXAMPLE_FAIL_AT={FAIL_AT})")


async def label(it: int, structures: list[str]) -> dict[str, float]:
    await work(f"iters-{it:03d}/label")
    return {s: -100.0 - 0.1 * i for i, s in enumerate(structures)}


async def train(it: int, seed: int, data: dict[str, float]) -> str:
    await work(f"iters-{it:03d}/train/model-{seed}")
    return f"model-{it:03d}-{seed}.pb (trained on {len(data)} frames)"


async def explore(it: int, model: str, temperature: int) -> list[str]:
    await work(f"iters-{it:03d}/explore/T{temperature}")
    rng = random.Random(f"{it}-{temperature}")
    return [f"md-{it}-{temperature}-{rng.randrange(1000)}.xyz" for _ in range(3)]


async def iteration(it: int, structures: list[str]) -> list[str]:
    pre = f"iters-{it:03d}"
    data = await apply_checkpoint(f"{pre}/label")(label)(it, structures)
    models = await asyncio.gather(
        *(apply_checkpoint(f"{pre}/train/model-{seed}")(train)(it, seed, data) for seed in range(4))
    )
    found = await asyncio.gather(
        *(apply_checkpoint(f"{pre}/explore/T{t}")(explore)(it, models[0], t) for t in (300, 600, 900))
    )
    return sorted(s for batch in found for s in batch)[:4]


async def main(iterations: int) -> list[str]:
    structures = ["init-a.xyz", "init-b.xyz"]
    for it in range(iterations):
        structures = await iteration(it, structures)
        log.info("iteration %d selected %s", it, structures)
    return structures


def cli() -> int:
    global STEP_SECONDS
    here = os.path.dirname(os.path.abspath(__file__))
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--store", default=os.path.join(here, "workdir", "checkpoint.db"))
    parser.add_argument("--dir", action="store_true", help="use a directory store")
    parser.add_argument("--iterations", type=int, default=3)
    parser.add_argument("--step-seconds", type=float, default=STEP_SECONDS)
    args = parser.parse_args()
    STEP_SECONDS = args.step_seconds
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    (set_checkpoint_dir if args.dir else set_checkpoint_file)(args.store)
    started = time.perf_counter()
    try:
        final = asyncio.run(main(args.iterations))
    except StepFailed as e:
        log.error("workflow stopped: %s. %d steps ran. Fix it and rerun: finished steps are skipped.",
                  e, len(RUN))
        return 1
    log.info("workflow finished in %.1f s: %d steps ran in this process, result %s",
             time.perf_counter() - started, len(RUN), final)
    return 0


if __name__ == "__main__":
    raise SystemExit(cli())
