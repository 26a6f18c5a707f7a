"""The console scripts: ``ai2-kit`` with and without the real ai2-kit beside it, and ``ai2-kit-checkpoint``.

The real package is played here by a stand-in ``ai2_kit/main.py`` on
PYTHONPATH (``ai2_kit`` is a namespace package, so it joins ours); the real
ai2-kit 1.1.1 itself is installed in tests/test_coexist.py.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from helpers_cli import KEYS, make_store

BIN = Path(sys.executable).parent
AI2_KIT = str(BIN / "ai2-kit")
AI2_KIT_CHECKPOINT = str(BIN / "ai2-kit-checkpoint")

FAKE_REAL_MAIN = '''
import json, sys

def main():
    # Like the real one (python-fire): no arguments, reads sys.argv, exits.
    print(json.dumps(sys.argv[1:]))
    if sys.argv[1:2] == ["fail"]:
        sys.exit(3)
'''

LOOPING_MAIN = "from ai2_kit.core.checkpoint._main import main\n"


def run(script: str, *argv: str, pythonpath: Path | None = None) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ)
    if pythonpath is not None:
        env["PYTHONPATH"] = str(pythonpath)
    return subprocess.run([script, *argv], capture_output=True, text=True, stdin=subprocess.DEVNULL,
                          env=env, timeout=120)


@pytest.fixture
def fake_real(tmp_path: Path) -> Path:
    (tmp_path / "real" / "ai2_kit").mkdir(parents=True)
    (tmp_path / "real" / "ai2_kit" / "main.py").write_text(FAKE_REAL_MAIN)
    return tmp_path / "real"


def test_other_commands_without_the_real_package_are_one_line() -> None:
    for argv in (["workflow", "cll_mlp_training", "x.yml"], ["tool", "hpc", "--help"]):
        proc = run(AI2_KIT, *argv)
        assert proc.returncode == 2 and proc.stdout == ""
        lines = proc.stderr.strip().splitlines()
        named = argv[1] if argv[0] == "tool" else argv[0]
        assert len(lines) == 1 and "pip install ai2-kit" in lines[0] and repr(named) in lines[0]


def test_other_commands_go_to_the_real_package_with_their_arguments(fake_real: Path, tmp_path: Path) -> None:
    argv = ["workflow", "cll_mlp_training", "a b.yml", "--checkpoint", "ckpt", "-"]
    proc = run(AI2_KIT, *argv, pythonpath=fake_real)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout) == argv
    assert json.loads(run(AI2_KIT, "--help", pythonpath=fake_real).stdout) == ["--help"]
    assert json.loads(run(AI2_KIT, "tool", "hpc", pythonpath=fake_real).stdout) == ["tool", "hpc"]
    assert run(AI2_KIT, "fail", pythonpath=fake_real).returncode == 3
    # ... and 'tool checkpoint' stays ours.
    path = str(make_store(tmp_path, "sqlite"))
    proc = run(AI2_KIT, "tool", "checkpoint", "load", path, "-", "ls", pythonpath=fake_real)
    assert proc.returncode == 0 and proc.stdout.splitlines() == sorted(KEYS)


def test_an_ai2_kit_main_that_calls_us_does_not_loop(tmp_path: Path) -> None:
    (tmp_path / "ai2_kit").mkdir()
    (tmp_path / "ai2_kit" / "main.py").write_text(LOOPING_MAIN)
    proc = run(AI2_KIT, "workflow", pythonpath=tmp_path)
    assert proc.returncode == 1 and "--force-reinstall --no-deps ai2-kit" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


def test_ai2_kit_checkpoint_takes_the_same_lines(tmp_path: Path) -> None:
    path = str(make_store(tmp_path, "sqlite"))
    proc = run(AI2_KIT_CHECKPOINT, "load", path, "-", "ls")
    assert proc.returncode == 0 and proc.stdout.splitlines() == sorted(KEYS)
    proc = run(AI2_KIT_CHECKPOINT, "rm", "--help")
    assert proc.returncode == 0 and proc.stdout.startswith("usage: ai2-kit-checkpoint load STORE - rm PATTERN")
    proc = run(AI2_KIT_CHECKPOINT, "load", path, "-", "lss")
    assert proc.returncode == 2 and proc.stderr.startswith("ai2-kit-checkpoint: unknown command 'lss'")


def test_no_fire() -> None:
    code = ("import sys, ai2_kit.core.checkpoint.cli, ai2_kit.core.checkpoint._main as m; "
            "m.main(['tool', 'checkpoint', '--help']); assert 'fire' not in sys.modules, 'fire imported'")
    subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, timeout=120)
    from importlib.metadata import requires

    assert not [r for r in requires("ai2-kit-checkpoint") or [] if r.split()[0].lower().startswith("fire")]


def test_version_from_the_distribution() -> None:
    from importlib.metadata import version

    from ai2_kit.core.checkpoint.stores._base import library_version

    assert library_version() == version("ai2-kit-checkpoint")
    assert run(AI2_KIT, "--version").stdout == f"ai2-kit-checkpoint {version('ai2-kit-checkpoint')}\n"


def test_only_our_folder_is_shipped() -> None:
    import ai2_kit
    import ai2_kit.core

    # Namespace packages here: no __init__.py of ours that the real one would fight over.
    # (The wheel's file list is checked in test_coexist.py.)
    assert getattr(ai2_kit, "__file__", None) is None and getattr(ai2_kit.core, "__file__", None) is None


def test_the_installed_version_is_the_constant() -> None:
    # The constant (_version.py) saves the first save of a process an
    # importlib.metadata scan; pyproject.toml takes its version from it.
    import importlib.metadata

    from ai2_kit.core.checkpoint._version import VERSION

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    with open(os.path.join(root, "pyproject.toml"), encoding="utf-8") as f:
        assert 'attr = "ai2_kit.core.checkpoint._version.VERSION"' in f.read()
    assert importlib.metadata.version("ai2-kit-checkpoint") == VERSION


def test_first_save_does_not_read_distribution_metadata(tmp_path: Path) -> None:
    # importlib.metadata (~26 ms to import and scan sys.path) was on the path of
    # every process's first save, a tenth of saving a 512 MB array.
    code = (
        "import sys\n"
        "from ai2_kit.core.checkpoint import Checkpointer\n"
        "def step(x):\n"
        "    return {'x': x}\n"
        f"ck = Checkpointer({str(tmp_path / 'c.db')!r})\n"
        "assert ck('k')(step)(1) == {'x': 1}\n"
        "assert ck('k')(step)(1) == {'x': 1}\n"
        "ck.close()\n"
        "assert 'importlib.metadata' not in sys.modules, 'importlib.metadata imported'\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
