"""Ours beside the real ai2-kit 1.1.1: install in both orders, uninstall each, nothing breaks.

What a user does, in fresh virtual environments: ``pip install`` the two
distributions one after the other, use both, uninstall one. Checked after
every step: who provides ``ai2_kit.core.checkpoint``, that the real package's
files and commands are intact (``ai2-kit tool hpc --help``, ``ai2-kit-rpc``'s
``rpc_main``, ``ai2_kit.__file__`` for its HPC executor), the seed's command
lines, and ``pip check``.

Cost. A full install of the real package is ~700 MB and takes about a
minute, so it is done once into a cached environment (``.coexist/base``,
gitignored; reused until the real version or the Python changes), and then
uninstalled there, leaving its dependencies. Each scenario is a new, empty
virtual environment that sees those dependencies through a ``.pth`` line and
gets only the two distributions themselves installed into its own
site-packages: the files that matter (``ai2_kit/...``, ``bin/ai2-kit``) are
created, overwritten and removed there exactly as in a full install, in a
few seconds. The first run needs the package index.

The real package's ``cll_mlp`` workflow runs here with its four steps
(cp2k, deepmd, lammps, model-deviation selector) replaced by Python
stand-ins, so no HPC program or queue system is involved: what is exercised
is the workflow's own loop, its keys and awaited steps, a crash and the
resumed run. Its domain modules import pymatgen, which the real package does
not declare; an empty stand-in module is put beside the script for that.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path
from typing import Iterator, NamedTuple

import pytest

from helpers_cli import AFTER_RM_DEEPMD, KEYS, make_store

pytestmark = pytest.mark.slow

REAL = "ai2-kit==1.1.1"
REAL_WHEEL = "ai2_kit-1.1.1-py3-none-any.whl"
REPO = Path(__file__).resolve().parent.parent
CACHE = Path(os.environ.get("AI2_KIT_COEXIST_CACHE", REPO / ".coexist"))
PY = f"{sys.version_info[0]}.{sys.version_info[1]}"
#: Our runtime dependencies that the real package does not bring: installed
#: in the base environment too, so that ``pip check`` sees ours satisfied.
OURS_ONLY = ["zlib-ng>=0.4"]
STAMP = f"{REAL} {' '.join(OURS_ONLY)} python{sys.version.split()[0]}\n"

SEED_LINES = [
    "ai2-kit tool checkpoint load ./path/to/checkpoint.pkl - ls",
    "ai2-kit tool checkpoint load ./path/to/checkpoint.pkl - ls --verbose",
    'ai2-kit tool checkpoint load ./path/to/checkpoint.pkl - rm "iters-000/deepmd"',
]

# Run in a scenario's interpreter: who is who after an install step.
PROBE = r"""
import importlib, json, os, sys
out = {}
import ai2_kit
out["ai2_kit_file"] = getattr(ai2_kit, "__file__", None)
ck = importlib.import_module("ai2_kit.core.checkpoint")
out["checkpoint_file"] = ck.__file__
out["ours"] = hasattr(ck, "Checkpointer")
out["real_api"] = all(hasattr(ck, n) for n in ("set_checkpoint_dir", "apply_checkpoint", "FnInfo", "KeyFn", "EMPTY"))
try:
    from ai2_kit.main import main, rpc_main
    import ai2_kit.core.executor, ai2_kit.tool.hpc
    out["real_imports"] = True
except ImportError as e:
    out["real_imports"] = f"{type(e).__name__}: {e}"
site = ck.__file__.rsplit("/ai2_kit/", 1)[0]
out["typed_at_top"] = os.path.exists(os.path.join(site, "ai2_kit", "py.typed"))
print(json.dumps(out))
"""


# The real workflow's steps replaced by stand-ins; each step that runs
# appends its key to LOG, and the step named FAIL_AT crashes.
CLL_SCRIPT = '''\
"""The real ai2-kit's cll_mlp workflow, its four steps replaced by stand-ins (no HPC programs).

argv: CONFIG FAIL_AT LOG. A step named FAIL_AT ('iters-001/explore-lammps')
raises, as a crashed job would; every step that runs appends its key to LOG.
"""
import sys
from dataclasses import dataclass, field

from ai2_kit.domain import cp2k, deepmd, lammps, selector
from ai2_kit.workflow import cll_mlp

config, fail_at, log = sys.argv[1:4]


def ran(step: str, n: int) -> None:
    key = f"iters-{n:03d}/{step}"
    with open(log, "a") as f:
        f.write(key + "\\n")
    if key == fail_at:
        raise RuntimeError(f"{key}: simulated crash")


@dataclass
class Label:
    n: int
    def get_labeled_system_dataset(self):
        return [f"labelled-{self.n}"]


@dataclass
class Train:
    n: int
    data: list = field(default_factory=list)
    def get_training_dataset(self):
        return self.data
    def get_mlp_models(self):
        return [f"model-{self.n}-{k}" for k in range(2)]


@dataclass
class Explore:
    n: int
    def get_model_devi_dataset(self):
        return [f"traj-{self.n}"]


@dataclass
class Select:
    n: int
    def get_model_devi_dataset(self):
        return [f"picked-{self.n}"]
    def get_new_explore_systems(self):
        return []
    def get_passing_rate(self):
        return 0.5


def iteration(ctx) -> int:
    return int(ctx.path_prefix.split("iters-")[1][:3])


async def fake_cp2k(inp, ctx):
    ran("label-cp2k", iteration(ctx))
    return Label(iteration(ctx))


async def fake_deepmd(inp, ctx):
    ran("train-deepmd", iteration(ctx))
    return Train(iteration(ctx), list(inp.old_dataset) + list(inp.new_dataset))


async def fake_lammps(inp, ctx):
    ran("explore-lammps", iteration(ctx))
    assert inp.dp_models[""] == [f"model-{iteration(ctx)}-{k}" for k in range(2)]
    return Explore(iteration(ctx))


async def fake_selector(inp, ctx):
    ran("selector-model-devi", iteration(ctx))
    return Select(iteration(ctx))


cp2k.cll_cp2k = fake_cp2k
deepmd.cll_deepmd = fake_deepmd
lammps.cll_lammps = fake_lammps
selector.cll_model_devi_selector = fake_selector
cll_mlp.run_workflow(config, executor="local", path_prefix="out", checkpoint="ckpt")
print("workflow finished")
'''

CLL_CONFIG = """\
executors:
  local:
    queue_system:
      slurm: {}
    work_dir: ./work
    context:
      train:
        deepmd:
          script_template: {}
      explore:
        lammps:
          script_template: {}
      label:
        cp2k:
          script_template: {}
artifacts:
  init:
    url: ./init.xyz
workflow:
  general:
    type_map: [H, O]
    mass_map: [1.008, 15.999]
    max_iters: 3
  label:
    cp2k: {}
  train:
    deepmd: {}
  explore:
    lammps:
      explore_vars:
        TEMP: [300]
      system_files: [init]
      nsteps: 10
  select:
    model_devi: {}
  update:
    walkthrough: {}
"""

FAKE_PYMATGEN_INPUTS = "class Incar(dict):\n    pass\n\n\nclass Kpoints:\n    pass\n"


def _run(argv: list[str], **kw: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=600,
                          **kw)  # type: ignore[call-overload]


def _need(ok: bool, what: str) -> None:
    if not ok:
        if os.environ.get("CI") == "true":
            pytest.fail(f"{what} (needed under CI=true)")
        pytest.skip(what)


def _site_packages(venv: Path) -> Path:
    return venv / "lib" / f"python{PY}" / "site-packages"


def _base() -> Path:
    """The cached environment holding the real package's dependencies and ours (not the packages)."""
    base = CACHE / "base"
    stamp = base / ".ready"
    if stamp.is_file() and stamp.read_text() == STAMP and (CACHE / REAL_WHEEL).is_file():
        return base
    shutil.rmtree(base, ignore_errors=True)
    CACHE.mkdir(parents=True, exist_ok=True)
    steps = [
        [sys.executable, "-m", "venv", str(base)],
        [str(base / "bin" / "python"), "-m", "pip", "install", "-q", "--disable-pip-version-check", REAL],
        [str(base / "bin" / "python"), "-m", "pip", "uninstall", "-q", "-y", "ai2-kit"],
        [str(base / "bin" / "python"), "-m", "pip", "install", "-q", "--disable-pip-version-check", *OURS_ONLY],
        [str(base / "bin" / "python"), "-m", "pip", "download", "-q", "--no-deps", REAL, "-d", str(CACHE)],
    ]
    for argv in steps:
        proc = _run(argv)
        _need(proc.returncode == 0, f"cannot prepare {base}: {' '.join(argv[-3:])}: {proc.stderr[-500:]}")
    stamp.write_text(STAMP)
    return base


class Env(NamedTuple):
    base: Path
    real_wheel: Path
    our_wheel: Path


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Env:
    _need(sys.platform.startswith("linux"), "the coexistence test builds Linux virtual environments")
    base = _base()
    out = tmp_path_factory.mktemp("wheel")
    proc = _run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--disable-pip-version-check",
                 "-w", str(out), str(REPO)])
    assert proc.returncode == 0, f"cannot build our wheel: {proc.stderr[-2000:]}"
    (wheel,) = out.glob("ai2_kit_checkpoint-*.whl")
    return Env(base, CACHE / REAL_WHEEL, wheel)


class Scenario:
    """A fresh virtual environment, with the real package's dependencies visible to it."""

    def __init__(self, env: Env, root: Path) -> None:
        self.env = env
        self.venv = root / "venv"
        self.work = root / "work"
        self.work.mkdir()
        proc = _run([sys.executable, "-m", "venv", "--without-pip", str(self.venv)])
        assert proc.returncode == 0, proc.stderr
        base_site = sysconfig.get_path("purelib", vars={"base": str(env.base), "platbase": str(env.base)})
        (_site_packages(self.venv) / "_coexist_base.pth").write_text(base_site + "\n")
        self.bin = self.venv / "bin"

    def run(self, line: str) -> subprocess.CompletedProcess[str]:
        """A shell line as a user types it, with this environment's scripts first on PATH."""
        path = f"{self.bin}{os.pathsep}{os.environ.get('PATH', '')}"
        env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
        env.update(PATH=path, VIRTUAL_ENV=str(self.venv))
        return _run(["bash", "-c", line], cwd=self.work, env=env)

    def pip(self, *args: str) -> str:
        proc = _run([str(self.bin / "python"), "-m", "pip", "--disable-pip-version-check", *args])
        assert proc.returncode == 0, (args, proc.stdout, proc.stderr)
        return proc.stdout

    def install(self, wheel: Path, *extra: str) -> None:
        # The dependencies are in the base environment already; nothing is fetched.
        self.pip("install", "-q", "--no-index", "--no-deps", *extra, str(wheel))

    def probe(self) -> dict[str, object]:
        proc = _run([str(self.bin / "python"), "-W", "ignore", "-c", PROBE], cwd=self.work)
        assert proc.returncode == 0, proc.stderr
        result: dict[str, object] = json.loads(proc.stdout)
        return result

    def site(self) -> Path:
        return _site_packages(self.venv)

    # -- what must hold ------------------------------------------------------
    def check_pip(self) -> None:
        out = self.pip("check")
        assert "No broken requirements" in out, out

    def check_ours_provides_checkpoint(self, real_installed: bool) -> None:
        info = self.probe()
        assert info["ours"] is True and info["real_api"] is True, info
        assert str(info["checkpoint_file"]).endswith("ai2_kit/core/checkpoint/__init__.py"), info
        assert info["typed_at_top"] is False, info  # mypy must not type-check the whole real package
        if real_installed:
            assert info["real_imports"] is True, info
            assert info["ai2_kit_file"] == str(self.site() / "ai2_kit" / "__init__.py"), info
        else:
            assert info["ai2_kit_file"] is None, info

    def check_real_alone(self) -> None:
        info = self.probe()
        assert info["ours"] is False and info["real_imports"] is True, info
        assert str(info["checkpoint_file"]).endswith("ai2_kit/core/checkpoint.py"), info
        assert info["ai2_kit_file"] == str(self.site() / "ai2_kit" / "__init__.py"), info

    def check_real_commands(self) -> None:
        proc = self.run("ai2-kit tool hpc --help")
        assert proc.returncode == 0, proc.stderr
        shown = proc.stdout + proc.stderr  # python-fire prints help to stderr when not on a terminal
        assert "ai2-kit tool hpc" in shown and "slurm" in shown, shown

    def check_seed_lines(self, tool: str = "ai2-kit tool checkpoint") -> None:
        store = self.work / "path" / "to" / "checkpoint.pkl"
        if store.exists():
            shutil.rmtree(store) if store.is_dir() else store.unlink()
        make_store(self.work / "path" / "to", "sqlite")
        ls, verbose, rm = (self.run(line.replace("ai2-kit tool checkpoint", tool)) for line in SEED_LINES)
        for proc in (ls, verbose, rm):
            assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr
        assert ls.stdout.splitlines() == sorted(KEYS)
        assert verbose.stdout.splitlines()[0].split()[:3] == ["CREATED", "DURATION", "SIZE"]
        assert "Removed 2 entries" in rm.stdout
        assert self.run(SEED_LINES[0].replace("ai2-kit tool checkpoint", tool)).stdout.splitlines() == AFTER_RM_DEEPMD


@pytest.fixture
def scenario(env: Env, tmp_path: Path) -> Iterator[Scenario]:
    yield Scenario(env, tmp_path)


def test_our_wheel_ships_only_our_folder(env: Env) -> None:
    with zipfile.ZipFile(env.our_wheel) as z:
        names = [n for n in z.namelist() if not n.startswith("ai2_kit_checkpoint-")]
        entry_points = z.read(next(n for n in z.namelist() if n.endswith("entry_points.txt"))).decode()
        licence = [n for n in z.namelist() if n.endswith("/LICENSE")]
    assert names and all(n.startswith("ai2_kit/core/checkpoint/") for n in names), names
    assert "ai2_kit/core/checkpoint/py.typed" in names
    assert "ai2-kit-checkpoint = ai2_kit.core.checkpoint._main:checkpoint_main" in entry_points
    assert "ai2-kit = ai2_kit.core.checkpoint._main:main" in entry_points
    assert licence, "the wheel carries the LICENSE file"


def test_real_first_then_ours(scenario: Scenario) -> None:
    s = scenario
    s.install(s.env.real_wheel)
    s.check_real_alone()
    s.check_real_commands()

    s.install(s.env.our_wheel)
    s.check_ours_provides_checkpoint(real_installed=True)
    s.check_real_commands()  # handed to the real package by our ai2-kit script
    s.check_seed_lines()
    s.check_seed_lines("ai2-kit-checkpoint")
    s.check_pip()

    # Uninstalling ours leaves every file of the real package ...
    s.pip("uninstall", "-q", "-y", "ai2-kit-checkpoint")
    s.check_real_alone()
    s.check_pip()
    # ... but pip also removes the ai2-kit script both declared (the README's trade-off),
    assert not (s.bin / "ai2-kit").exists()
    # which one command restores.
    s.install(s.env.real_wheel, "--force-reinstall")
    s.check_real_commands()


def test_ours_first_then_real(scenario: Scenario) -> None:
    s = scenario
    s.install(s.env.our_wheel)
    s.check_ours_provides_checkpoint(real_installed=False)
    s.check_seed_lines()
    proc = s.run("ai2-kit tool hpc --help")  # not here: one line saying where it comes from
    assert proc.returncode == 2 and "pip install ai2-kit" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1

    s.install(s.env.real_wheel)
    s.check_ours_provides_checkpoint(real_installed=True)
    s.check_real_commands()
    # The ai2-kit script is now the real one's, which has no 'tool checkpoint';
    # ours is there under its own name, and reinstalling ours brings it back.
    s.check_seed_lines("ai2-kit-checkpoint")
    s.check_pip()
    s.install(s.env.our_wheel, "--force-reinstall")
    s.check_seed_lines()
    s.check_real_commands()

    # Uninstalling the real package leaves ours working.
    s.pip("uninstall", "-q", "-y", "ai2-kit")
    s.check_ours_provides_checkpoint(real_installed=False)
    s.check_seed_lines("ai2-kit-checkpoint")
    assert not (s.bin / "ai2-kit").exists()  # the shared script went with it
    s.install(s.env.our_wheel, "--force-reinstall")
    s.check_seed_lines()
    s.check_pip()


def test_a_store_the_real_package_wrote_is_read_by_ours(scenario: Scenario) -> None:
    """The real package's own checkpoint code writes a directory; ours, installed after, reads it."""
    s = scenario
    s.install(s.env.real_wheel)
    script = (
        "import asyncio\n"
        "from ai2_kit.core.checkpoint import set_checkpoint_dir, apply_checkpoint\n"
        "set_checkpoint_dir('ckpt')\n"
        "async def label(n):\n    return ['labelled', n]\n"
        "print(asyncio.run(apply_checkpoint('iters-000/label-cp2k')(label)(1)))\n"
        "print(apply_checkpoint('iters-000/train-deepmd')(lambda: 'model')())\n"
    )
    (s.work / "step.py").write_text(script)
    first = s.run("python -W ignore step.py")
    assert first.returncode == 0, first.stderr
    s.install(s.env.our_wheel)
    ls = s.run("ai2-kit tool checkpoint load ckpt - ls")
    assert ls.returncode == 0 and ls.stdout.split() == ["iters-000/label-cp2k", "iters-000/train-deepmd"]
    # The same script now runs on ours and hits both (nothing recomputed, same values).
    (s.work / "step.py").write_text(script.replace("return ['labelled', n]", "raise SystemExit('reran')")
                                    .replace("lambda: 'model'", "lambda: 1/0"))
    again = s.run("python -W ignore step.py")
    assert again.returncode == 0, again.stderr
    assert again.stdout == first.stdout

    # Going back (README): a step saved by ours is not seen by the real
    # package, which reruns it; its own entries still hit.
    ours = s.run("python -W ignore -c \"from ai2_kit.core.checkpoint import set_checkpoint_dir, apply_checkpoint; "
                 "set_checkpoint_dir('ckpt'); print(apply_checkpoint('iters-001/label-cp2k')(lambda: 'ours')())\"")
    assert ours.returncode == 0 and ours.stdout == "ours\n", ours.stderr
    s.pip("uninstall", "-q", "-y", "ai2-kit-checkpoint")
    back = s.run("python -W ignore -c \"from ai2_kit.core.checkpoint import set_checkpoint_dir, apply_checkpoint; "
                 "set_checkpoint_dir('ckpt'); "
                 "print(apply_checkpoint('iters-001/label-cp2k')(lambda: 'rerun by the real one')()); "
                 "print(apply_checkpoint('iters-000/train-deepmd')(lambda: 1/0)())\"")
    assert back.returncode == 0, back.stderr
    assert back.stdout.splitlines() == ["rerun by the real one", "model"]


def _cll(s: Scenario, fail_at: str) -> list[str]:
    """Run the real cll_mlp workflow in ``s``; return the keys of the steps that ran."""
    if not (s.work / "config.yml").exists():
        (s.work / "config.yml").write_text(CLL_CONFIG)
        (s.work / "run_cll.py").write_text(CLL_SCRIPT)
        (s.work / "init.xyz").write_text("")
        inputs = s.work / "pymatgen" / "io" / "vasp"
        inputs.mkdir(parents=True)
        for folder in (s.work / "pymatgen", s.work / "pymatgen" / "io", inputs):
            (folder / "__init__.py").write_text("")
        (inputs / "inputs.py").write_text(FAKE_PYMATGEN_INPUTS)
    log = s.work / "ran.log"
    log.write_text("")
    proc = s.run(f"python -W ignore run_cll.py config.yml {fail_at} ran.log")
    if fail_at == "none":
        assert proc.returncode == 0 and "workflow finished" in proc.stdout, proc.stderr[-3000:]
    else:
        assert proc.returncode != 0 and f"{fail_at}: simulated crash" in proc.stderr, proc.stderr[-3000:]
    return log.read_text().split()


STEPS = ["label-cp2k", "train-deepmd", "explore-lammps", "selector-model-devi"]
ALL_STEPS = [f"iters-{i:03d}/{step}" for i in range(3) for step in STEPS]
CRASH = "iters-001/explore-lammps"


def test_the_real_cll_mlp_workflow_crashes_and_resumes_on_our_store(env: Env, tmp_path: Path) -> None:
    """The same steps run, and the same hits happen, as with the real package's own store."""
    runs = {}
    for name, wheels in (("real alone", [env.real_wheel]), ("ours", [env.real_wheel, env.our_wheel])):
        (tmp_path / name).mkdir()
        s = Scenario(env, tmp_path / name)
        for wheel in wheels:
            s.install(wheel)
        runs[name] = (_cll(s, CRASH), _cll(s, "none"), _cll(s, "none"))
        if name == "ours":
            ls = s.run("ai2-kit tool checkpoint load ckpt - ls")
            assert ls.returncode == 0 and ls.stdout.split() == sorted(ALL_STEPS), ls.stderr
    crashed, resumed, again = runs["ours"]
    assert crashed == ALL_STEPS[:ALL_STEPS.index(CRASH) + 1]
    assert resumed == ALL_STEPS[ALL_STEPS.index(CRASH):]  # every finished step was a hit
    assert again == []  # a finished workflow reruns nothing
    assert runs["ours"] == runs["real alone"]


def test_a_run_that_crashed_on_the_real_package_resumes_on_ours(scenario: Scenario) -> None:
    """Installing ours between the crash and the rerun: the real package's saved steps are hits."""
    s = scenario
    s.install(s.env.real_wheel)
    crashed = _cll(s, CRASH)
    s.install(s.env.our_wheel)
    resumed = _cll(s, "none")
    assert crashed + resumed[1:] == ALL_STEPS and resumed[0] == CRASH
    verbose = s.run("ai2-kit tool checkpoint load ckpt - ls --verbose")
    assert verbose.returncode == 0, verbose.stderr
    assert verbose.stdout.count("(reference 2024 file)") == len(crashed) - 1  # the real's own files, read as they are
