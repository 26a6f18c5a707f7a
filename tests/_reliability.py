"""Figures the fault tests print for scripts/stress.py to collect (`pytest -s`)."""

from __future__ import annotations

import json


def record(scenario: str, store: str, trials: int, faults: int, acknowledged: int, lost: int) -> None:
    """Print one row of the reliability table."""
    row = {"scenario": scenario, "store": store, "trials": trials, "faults": faults,
           "acknowledged": acknowledged, "lost": lost}
    print("RELIABILITY " + json.dumps(row), flush=True)
