"""Staleness across real Python interpreters: an upgrade is no code change, an edit still is.

Each case runs a small workflow in subprocesses under the pyenv interpreters
(3.9, 3.10, 3.12, 3.13) and this one, importing the package from ``src``
through PYTHONPATH. The package's runtime dependencies, cloudpickle (and
typing_extensions before 3.10), are pure Python: the copies installed for
this interpreter are linked into a folder on that path, so nothing is
downloaded or built. A missing
interpreter skips its cases, except under CI (CI=true), where it fails.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any, Dict, List

import pytest

VERSIONS = ("3.9.18", "3.10.13", "3.12.1", "3.13.0")
SRC = Path(__file__).resolve().parent.parent / "src"

RUNNER = """
import json, logging, sys
sys.path.insert(0, sys.argv[1])
from ai2_kit.core.checkpoint import Checkpointer

records = []
class Keep(logging.Handler):
    def emit(self, record):
        records.append([record.levelname, record.getMessage()])
log = logging.getLogger("ai2_kit.core.checkpoint")
log.addHandler(Keep())
log.setLevel(logging.INFO)

import wf
with Checkpointer(sys.argv[2], stale=sys.argv[3]) as ckpt:
    value = ckpt("k")(wf.step)(3)
    fp = ckpt.store.get_meta("k")["fingerprint"]
print(json.dumps({"value": value, "logs": records, "code": fp.get("code"),
                  "python": fp.get("env", {}).get("python")}))
"""

WORKFLOW = """
import sys

def scale(i):
    return 2 * i

def unrelated():
    return 0

def step(n):
    \"\"\"The step: which interpreter ran it is in its result.\"\"\"
    return [scale(i) for i in range(n)] + [sys.version.split()[0]]
"""

NO_SOURCE = """
import sys
# Defined from a string: there is no file to read its source from.
exec(compile("def step(n):\\n    return [n, sys.version.split()[0]]\\n", "<generated>", "exec"))
"""


SYNTAX = """
from __future__ import annotations
import functools
from typing import Any

X: int = 3


def deco(n):
    return lambda f: f


class Meta(type):
    pass


@deco(1)
class Base(metaclass=Meta):
    \"\"\"Doc.\"\"\"
    attr: int = 1

    @property
    def value(self) -> int:
        return self.attr


def helper(a, /, b: int = 2, *args, c=None, d: "Any" = (1, 2.5, 'x', b'y', None, ...), **kw) -> list[int]:
    \"\"\"Docstring.\"\"\"
    s = f"{a!r:>{b}} {c=} {d:.3f}" f'{{lit}}' 'plain' u"u"
    t = [i ** 2 for i in range(a) if i % 2] + list({k: v for k, v in kw.items()}) + [*{1, 2}]
    try:
        with open("f") as fh, open("g") as gh:
            pass
    except (OSError, ValueError) as e:
        raise RuntimeError("x") from e
    finally:
        del s
    lam = lambda q, *r, z=1, **w: (q, r, z, w)
    if (n := len(t)) > 3 and not a or b is not None:
        global X
        X += 1
    while True:
        break
    else:
        pass
    x = a[1:2, ::3, ...] if isinstance(a, list) else a[0] if a else -a
    y = 1j + 0x10 + 0o7 + 1_000 + 1e-3

    def inner():
        nonlocal y
        return y
    assert a, "msg"
    return [lam, n, x, y, inner, Base().value]


async def agen(xs):
    async with xs as v:
        await v
    async for i in xs:
        yield i


@functools.lru_cache(maxsize=None)
def step(n):
    return [helper(n), agen, (lambda: 1, lambda: 2)]
"""

DIGESTS = """
import json, sys
sys.path.insert(0, sys.argv[1])
from ai2_kit.core.checkpoint._fingerprint import code_part
import syntax_case
out = {}
for name in ("step", "helper", "agen", "Base"):
    part = code_part(getattr(syntax_case, name))
    out[name] = [part.code.split(".")[0], {k: v[0].split(".")[0] for k, v in part.helpers.items()}]
print(json.dumps(out, sort_keys=True))
"""


def _interpreter(version: str) -> str | None:
    found = None
    if shutil.which("pyenv"):
        out = subprocess.run(["pyenv", "prefix", version], capture_output=True, text=True)
        if out.returncode == 0 and out.stdout.strip():
            found = os.path.join(out.stdout.strip(), "bin", "python3")
    if found is None:
        root = os.environ.get("PYENV_ROOT") or os.path.expanduser("~/.pyenv")
        found = os.path.join(root, "versions", version, "bin", "python3")
    return found if os.access(found, os.X_OK) else None


def python_for(version: str) -> str:
    exe = _interpreter(version)
    if exe is None:
        if os.environ.get("CI") == "true":
            pytest.fail(f"Python {version} is missing: install it with `pyenv install {version}`")
        pytest.skip(f"Python {version} is not installed (pyenv install {version})")
    return exe


@pytest.fixture(scope="module")
def deps(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A folder holding only our pure-Python dependencies, for the other interpreters."""
    import cloudpickle
    import typing_extensions

    folder = tmp_path_factory.mktemp("deps")
    (folder / "cloudpickle").symlink_to(Path(cloudpickle.__file__).parent, target_is_directory=True)
    (folder / "typing_extensions.py").symlink_to(Path(typing_extensions.__file__))
    return str(folder)


class Workflow:
    def __init__(self, folder: Path, deps: str) -> None:
        self.folder, self.deps = folder, deps
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "run.py").write_text(RUNNER)
        self.store = str(folder / "c.db")

    def write(self, source: str) -> None:
        (self.folder / "wf.py").write_text(textwrap.dedent(source))
        shutil.rmtree(self.folder / "__pycache__", ignore_errors=True)

    def run(self, python: str, stale: str = "warn") -> Dict[str, Any]:
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(SRC), self.deps, str(self.folder)]),
               "PYTHONDONTWRITEBYTECODE": "1"}
        out = subprocess.run([python, str(self.folder / "run.py"), str(SRC), self.store, stale],
                             capture_output=True, text=True, env=env, timeout=120, cwd=self.folder)
        assert out.returncode == 0, out.stderr
        return json.loads(out.stdout.strip().splitlines()[-1])  # type: ignore[no-any-return]


def warnings_of(result: Dict[str, Any]) -> List[str]:
    return [msg for level, msg in result["logs"] if level == "WARNING"]


HERE = sys.version.split()[0]


@pytest.mark.parametrize("version", VERSIONS)
def test_saved_here_hit_silently_under_another_python(tmp_path: Path, deps: str, version: str) -> None:
    other = python_for(version)
    wf = Workflow(tmp_path, deps)
    wf.write(WORKFLOW)
    saved = wf.run(sys.executable, stale="rerun")
    assert saved["value"] == [0, 2, 4, HERE]
    hit = wf.run(other, stale="rerun")
    assert hit["value"] == [0, 2, 4, HERE]  # the saved result, not rerun under the new Python
    assert warnings_of(hit) == []
    infos = [msg for level, msg in hit["logs"] if level == "INFO"]
    # The upgrade is reported as context only, at INFO.
    assert any(f"Python {HERE} -> {version}" in m for m in infos), infos


@pytest.mark.parametrize(("saver", "reader"), [("3.9.18", "3.13.0"), ("3.13.0", "3.10.13"), ("3.12.1", "3.9.18")])
def test_real_edit_reported_across_versions(tmp_path: Path, deps: str, saver: str, reader: str) -> None:
    save_py, read_py = python_for(saver), python_for(reader)
    wf = Workflow(tmp_path, deps)
    wf.write(WORKFLOW)
    assert wf.run(save_py)["value"] == [0, 2, 4, saver]
    # An unrelated function of the same module: still silent.
    wf.write(WORKFLOW.replace("return 0", "return 1"))
    assert warnings_of(wf.run(read_py)) == []
    wf.write(WORKFLOW.replace("2 * i", "3 * i"))
    hit = wf.run(read_py)
    assert hit["value"] == [0, 2, 4, saver]  # stale="warn": the saved result, with a warning
    (msg,) = warnings_of(hit)
    assert "'k'" in msg and "code of scale (called by step) changed" in msg, msg
    assert f"Python {saver} -> {reader} since this entry was saved" in msg, msg
    assert "rm k" in msg and "rm --from k" in msg, msg
    rerun = wf.run(read_py, stale="rerun")
    assert rerun["value"] == [0, 3, 6, reader]


@pytest.mark.parametrize("version", ("3.9.18", "3.13.0"))
def test_code_without_source_cannot_be_compared_and_is_not_rerun(tmp_path: Path, deps: str, version: str) -> None:
    other = python_for(version)
    wf = Workflow(tmp_path, deps)
    wf.write(NO_SOURCE)
    saved = wf.run(sys.executable, stale="rerun")
    assert saved["code"].startswith("-.")  # bytecode only
    hit = wf.run(other, stale="rerun")
    assert hit["value"] == [3, HERE]  # not rerun
    (msg,) = warnings_of(hit)
    assert "cannot compare code of step across Python versions" in msg, msg
    assert "changed" not in msg.split(";")[0], msg
    # Under the same Python the bytecode still compares: silent.
    assert warnings_of(wf.run(sys.executable, stale="rerun")) == []


def test_source_digests_equal_under_every_python(tmp_path: Path, deps: str) -> None:
    (tmp_path / "syntax_case.py").write_text(SYNTAX)
    (tmp_path / "digests.py").write_text(DIGESTS)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(SRC), deps, str(tmp_path)]),
           "PYTHONDONTWRITEBYTECODE": "1"}
    results = {}
    for version in (HERE, *VERSIONS):
        python = sys.executable if version == HERE else python_for(version)
        out = subprocess.run([python, str(tmp_path / "digests.py"), str(SRC)], capture_output=True, text=True,
                             env=env, timeout=120)
        assert out.returncode == 0, out.stderr
        results[version] = json.loads(out.stdout)
    here = results[HERE]
    assert "-" not in {v[0] for v in here.values()}  # all from source
    assert set(here["step"][1]) == {"helper", "agen", "Base"}
    for version, got in results.items():
        assert got == here, version
