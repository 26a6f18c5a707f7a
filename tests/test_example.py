"""The example workflow resumes: a run that failed half-way is finished by a rerun."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "workflow.py"


@pytest.mark.parametrize("flag", [[], ["--dir"]], ids=["file", "dir"])
def test_example_fails_then_resumes(tmp_path: Path, flag: list[str]) -> None:
    store = str(tmp_path / "store")
    cmd = [sys.executable, str(EXAMPLE), "--store", store, "--step-seconds", "0.01", *flag]
    env = dict(os.environ, AI2_KIT_EXAMPLE_FAIL_AT="iters-001/explore")
    first = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert first.returncode == 1 and "simulated failure" in first.stderr
    env.pop("AI2_KIT_EXAMPLE_FAIL_AT")
    second = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert second.returncode == 0, second.stderr
    # Iteration 0 (8 steps) and iteration 1's label and training (5) were skipped.
    assert second.stderr.count("Hit checkpoint: ") == 13
    assert "11 steps ran in this process" in second.stderr  # 3 explores + iteration 2 (8)
    third = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert "0 steps ran in this process" in third.stderr
