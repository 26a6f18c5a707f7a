"""The user's own helpers are followed; libraries are not; old records still compare; the environment is context."""

from __future__ import annotations

import importlib.util
import itertools
import json
import linecache
import logging
import sys
import textwrap
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pytest

from ai2_kit.core.checkpoint import Checkpointer
from ai2_kit.core.checkpoint._fingerprint import _code as codemod
from ai2_kit.core.checkpoint._fingerprint import (
    code_part,
    compare,
    fingerprint,
    format_fingerprint,
    judge,
    legacy_code,
)

LOGGER = "ai2_kit.core.checkpoint"
_counter = itertools.count()


def load(folder: Path, source: str, name: str = "step") -> Any:
    """Import ``source`` as a fresh module (a new file each time) and return ``name``."""
    mod_name = f"helpers_case_{next(_counter)}"
    path = folder / f"{mod_name}.py"
    path.write_text(textwrap.dedent(source))
    spec = importlib.util.spec_from_file_location(mod_name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[mod_name] = module
    spec.loader.exec_module(module)
    return getattr(module, name)


def warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]


@pytest.fixture
def ckpt(tmp_path: Path) -> Iterator[Checkpointer]:
    with Checkpointer(tmp_path / "c.db") as c:
        yield c


MODULE = """
import math

def scale(i):
    return 2 * i + offset()

def offset():
    return 1

def unrelated():
    return 'not called by step'

def step(n):
    return [scale(i) for i in range(n)]
"""


def test_edited_helper_is_reported_by_name(ckpt: Checkpointer, tmp_path: Path,
                                           caplog: pytest.LogCaptureFixture) -> None:
    assert ckpt("k")(load(tmp_path, MODULE))(3) == [1, 3, 5]
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        assert ckpt("k")(load(tmp_path, MODULE.replace("2 * i", "3 * i")))(3) == [1, 3, 5]
    (msg,) = warnings(caplog)
    assert "code of scale (called by step) changed" in msg
    assert "code of step" not in msg  # the step itself did not change
    assert f"ai2-kit tool checkpoint load {tmp_path / 'c.db'} - rm k" in msg
    assert "rm --from k" in msg


def test_helper_of_a_helper_is_reported_with_its_caller(ckpt: Checkpointer, tmp_path: Path,
                                                        caplog: pytest.LogCaptureFixture) -> None:
    ckpt("k")(load(tmp_path, MODULE))(3)
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        ckpt("k")(load(tmp_path, MODULE.replace("return 1", "return 2")))(3)
    (msg,) = warnings(caplog)
    assert "code of offset (called by scale) changed" in msg


def test_unrelated_function_comments_and_docstrings_are_silent(ckpt: Checkpointer, tmp_path: Path,
                                                               caplog: pytest.LogCaptureFixture) -> None:
    ckpt("k")(load(tmp_path, MODULE))(3)
    edited = MODULE.replace("'not called by step'", "'edited'").replace(
        "def scale(i):\n", "def scale(i):\n    '''Now documented.'''\n    # and commented\n")
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        assert ckpt("k")(load(tmp_path, edited))(3) == [1, 3, 5]
    assert warnings(caplog) == []


def test_rerun_policy_reruns_on_a_helper_edit(tmp_path: Path) -> None:
    with Checkpointer(tmp_path / "c.db", stale="rerun") as c:
        c("k")(load(tmp_path, MODULE))(3)
        assert c("k")(load(tmp_path, MODULE.replace("2 * i", "3 * i")))(3) == [1, 4, 7]


def test_closures_defaults_module_attributes_classes_and_methods(tmp_path: Path) -> None:
    (tmp_path / "mylib_helpers.py").write_text("def util(x):\n    return x + 1\n")
    sys.path.insert(0, str(tmp_path))
    try:
        src = """
        import mylib_helpers

        def by_default(x):
            return x

        def captured(x):
            return -x

        class Model:
            def predict(self, x):
                return self.prepare(x)

            def prepare(self, x):
                return mylib_helpers.util(x)

        class Runner:
            def run(self, x):
                return self.inner(x)

            def inner(self, x):
                return x

            def unused(self):
                return 0

        def make():
            f = captured
            def step(x, post=by_default):
                return post(f(Model().predict(x)))
            return step

        step = make()
        """
        helpers = fingerprint(load(tmp_path, src), (1,), {})["helpers"]
        assert set(helpers) >= {"by_default", "captured", "Model", "mylib_helpers.util"}
        assert helpers["mylib_helpers.util"][1] == "Model"
        # A bound method: the methods of its class it uses, not the others.
        runner = load(tmp_path, src, "Runner")()
        helpers = fingerprint(runner.run, (1,), {})["helpers"]
        assert set(helpers) == {"Runner.inner"}
    finally:
        sys.path.remove(str(tmp_path))


def test_library_decorated_helper_is_followed_inside(ckpt: Checkpointer, tmp_path: Path,
                                                     caplog: pytest.LogCaptureFixture) -> None:
    # A step calling another checkpointed step: the wrapper is this package's,
    # the function inside it is the user's.
    src = """
    from ai2_kit.core.checkpoint import apply_checkpoint

    @apply_checkpoint("inner")
    def prepare(n):
        return list(range(n))

    def step(n):
        return sum(prepare(n))
    """
    rec = fingerprint(load(tmp_path, src), (3,), {})
    assert set(rec["helpers"]) == {"prepare"}
    ckpt("k")(load(tmp_path, src))(3)
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        ckpt("k")(load(tmp_path, src.replace("range(n)", "range(n + 1)")))(3)
    (msg,) = warnings(caplog)
    assert "code of prepare (called by step) changed" in msg


def test_helper_in_an_installed_package_is_not_followed(tmp_path: Path, ckpt: Checkpointer,
                                                        caplog: pytest.LogCaptureFixture) -> None:
    site = tmp_path / "venv" / "lib" / "site-packages"
    (site / "extpkg_i14").mkdir(parents=True)
    (site / "extpkg_i14" / "__init__.py").write_text("def ext_scale(i):\n    return 2 * i\n")
    sys.path.insert(0, str(site))
    try:
        src = """
        import json
        from extpkg_i14 import ext_scale

        def step(n):
            return [ext_scale(i) for i in range(n)] + [json.dumps(n)]
        """
        fn = load(tmp_path, src)
        rec = fingerprint(fn, (3,), {})
        assert "helpers" not in rec  # neither the installed package nor the standard library
        ckpt("k")(fn)(3)
        (site / "extpkg_i14" / "__init__.py").write_text("def ext_scale(i):\n    return 3 * i\n")
        del sys.modules["extpkg_i14"]
        with caplog.at_level(logging.WARNING, logger=LOGGER):
            ckpt("k")(load(tmp_path, src))(3)
        assert warnings(caplog) == []
    finally:
        sys.path.remove(str(site))
        sys.modules.pop("extpkg_i14", None)


def test_recursion_cycles_depth_and_width_are_bounded(tmp_path: Path) -> None:
    src = """
    def a(n):
        return n if n <= 0 else b(n - 1)

    def b(n):
        return a(n) + a(n - 1)

    def rec(n):
        return 1 if n <= 0 else n * rec(n - 1)
    """
    assert set(fingerprint(load(tmp_path, src, "a"), (3,), {})["helpers"]) == {"b"}
    assert "helpers" not in fingerprint(load(tmp_path, src, "rec"), (3,), {})
    chain = "\n".join(f"def f{i}(x):\n    return f{i + 1}(x)\n" for i in range(40)) + "\ndef f40(x):\n    return x\n"
    helpers = fingerprint(load(tmp_path, chain, "f0"), (1,), {})["helpers"]
    assert len(helpers) == codemod.MAX_HELPER_DEPTH
    wide = "\n".join(f"def g{i}(x):\n    return x + {i}\n" for i in range(300))
    wide += "\ndef step(x):\n    return [" + ", ".join(f"g{i}(x)" for i in range(300)) + "]\n"
    helpers = fingerprint(load(tmp_path, wide), (1,), {})["helpers"]
    assert len(helpers) == codemod.MAX_HELPERS


def test_code_part_is_computed_once_per_function(tmp_path: Path) -> None:
    fn = load(tmp_path, MODULE)
    first = code_part(fn)
    assert code_part(fn) is first
    assert fingerprint(fn, (1,), {})["helpers"] == first.helpers


def test_source_edited_after_import_is_not_trusted(tmp_path: Path) -> None:
    # A file edited while the workflow runs must not pass for the running code.
    fn = load(tmp_path, MODULE)
    path = fn.__code__.co_filename
    Path(path).write_text(textwrap.dedent(MODULE).replace("for i in range(n)", "for i in range(n + 1)"))
    linecache.checkcache(path)
    code = fingerprint(fn, (1,), {})["code"]
    assert code.startswith("-.")  # bytecode only: the source on disk is not what runs


# -- records of version 1 (bytecode), written by the previous release -------------------


def v1_record(fn: Any, args: dict) -> dict:
    rec = fingerprint(fn, (), args)
    legacy = getattr(rec, "legacy_args", {})
    return {"v": 1, "fn": rec["fn"], "code": legacy_code(fn), "args": {**rec["args"], **legacy},
            "unhashable": rec["unhashable"]}


def test_version1_record_compares_like_with_like(tmp_path: Path) -> None:
    fn = load(tmp_path, MODULE)
    assert compare(v1_record(fn, {"n": 3}), fingerprint(fn, (3,), {})) == []
    # A function as an argument: digested from bytecode under version 1.
    old = v1_record(fn, {"n": fn})
    assert compare(old, fingerprint(fn, (fn,), {})) == []
    assert compare(old, fingerprint(fn, (4,), {})) == ["argument 'n' changed"]
    edited = load(tmp_path, MODULE.replace("range(n)", "range(n + 1)"))
    (change,) = compare(v1_record(fn, {"n": 3}), fingerprint(edited, (3,), {}))
    assert change.startswith("code of step changed, or Python was upgraded")


def test_version1_entry_is_hit_then_upgraded_when_its_step_reruns(ckpt: Checkpointer, tmp_path: Path,
                                                                  caplog: pytest.LogCaptureFixture) -> None:
    fn = load(tmp_path, MODULE)
    ckpt.store.put("k", "saved", fn_name="step", fingerprint=v1_record(fn, {"n": 3}))
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        assert ckpt("k", stale="rerun")(fn)(3) == "saved"
    assert warnings(caplog) == []
    assert ckpt("k", stale="rerun")(fn)(4) == [1, 3, 5, 7]  # an argument changed: rerun
    assert ckpt.store.get_meta("k")["fingerprint"]["v"] == 2


# -- environment -------------------------------------------------------------------------

NUMPY_STEP = """
import numpy as np

def step(n):
    return float(np.arange(n).sum())
"""


def plant_env(ckpt: Checkpointer, fn: Any, numpy_version: str) -> None:
    rec = json.loads(json.dumps(fingerprint(fn, (3,), {})))
    rec["env"]["packages"]["numpy"] = numpy_version
    ckpt.store.put("k", -1.0, fn_name="step", fingerprint=rec)


def test_environment_is_recorded_and_shown(ckpt: Checkpointer, tmp_path: Path) -> None:
    fn = load(tmp_path, NUMPY_STEP)
    ckpt("k")(fn)(3)
    fp = ckpt.store.get_meta("k")["fingerprint"]
    assert fp["env"]["packages"]["numpy"] == np.__version__
    assert fp["env"]["python"] == sys.version.split()[0]
    text = "\n".join(format_fingerprint(fp))
    assert f"numpy {np.__version__}" in text and "python" in text and "source" in text


def test_environment_change_is_reported_not_rerun_by_default(ckpt: Checkpointer, tmp_path: Path,
                                                             caplog: pytest.LogCaptureFixture) -> None:
    fn = load(tmp_path, NUMPY_STEP)
    plant_env(ckpt, fn, "1.0.0")
    with caplog.at_level(logging.INFO, logger=LOGGER):
        assert ckpt("k", stale="rerun")(fn)(3) == -1.0
    assert warnings(caplog) == []
    assert any(f"numpy 1.0.0 -> {np.__version__} since this entry was saved" in r.getMessage()
               for r in caplog.records if r.levelno == logging.INFO)
    # As context of a stale warning.
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        ckpt("k")(fn)(4)
    (msg,) = warnings(caplog)
    assert "argument 'n' changed (3 -> 4)" in msg and f"numpy 1.0.0 -> {np.__version__}" in msg


def test_environment_policy_stale_reruns(tmp_path: Path) -> None:
    with Checkpointer(tmp_path / "c.db", stale="rerun", environment="stale") as c:
        fn = load(tmp_path, NUMPY_STEP)
        plant_env(c, fn, "1.0.0")
        assert c("k")(fn)(3) == 3.0
    with pytest.raises(ValueError, match="environment must be one of"):
        Checkpointer(tmp_path / "d.db", environment="sometimes")


def test_environment_policy_ignore_says_nothing(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    with Checkpointer(tmp_path / "c.db", environment="ignore") as c:
        fn = load(tmp_path, NUMPY_STEP)
        plant_env(c, fn, "1.0.0")
        with caplog.at_level(logging.INFO, logger=LOGGER):
            assert c("k")(fn)(3) == -1.0
        assert not any("numpy" in r.getMessage() for r in caplog.records)


def test_judge_sorts_changes_uncertainty_and_environment() -> None:
    base = {"v": 2, "fn": "step", "bc": "cpython-311", "code": "a" * 32 + "." + "b" * 32,
            "helpers": {"scale": ["c" * 32 + "." + "d" * 32, "step"]},
            "env": {"python": "3.11.7", "packages": {"numpy": "1.26.4"}}, "args": {"n": "3"}}
    other_py = {**base, "bc": "cpython-312", "env": {"python": "3.12.1", "packages": {"numpy": "2.1.0"}},
                "helpers": {"scale": ["-." + "e" * 32, "step"]}}
    v = judge(base, other_py)
    assert v.changes == []
    assert v.uncertain == ["cannot compare code of scale (called by step) across Python versions "
                           "(Python 3.11.7 when saved, Python 3.12.1 now)"]
    assert v.env == ["Python 3.11.7 -> 3.12.1", "numpy 1.26.4 -> 2.1.0"]
    same_py = {**base, "helpers": {"scale": ["-." + "e" * 32, "step"]}}
    assert judge(base, same_py).changes == ["code of scale (called by step) changed"]
    moved = {**base, "helpers": {"shift": ["c" * 32 + "." + "d" * 32, "step"]}}
    assert judge(base, moved).changes == ["shift (called by step) is new", "scale (called by step) is no longer used"]


# -- show, and the benchmark -------------------------------------------------------------


def test_show_describes_code_helpers_and_environment(tmp_path: Path) -> None:
    from helpers_cli import cli

    path = str(tmp_path / "c.db")
    with Checkpointer(path) as c:
        c("k")(load(tmp_path, MODULE.replace("import math", "import math\nimport numpy")))(3)
    code, out, _ = cli("show", path, "k")
    assert code == 0, out
    assert "scale (called by step)" in out and "offset (called by scale)" in out
    assert f"python     {sys.version.split()[0]}" in out and f"numpy {np.__version__}" in out
    assert "source " in out and "n=3" in out


def test_benchmark_runs(tmp_path: Path) -> None:
    import subprocess

    bench = Path(__file__).resolve().parent.parent / "benchmarks" / "bench_fingerprint.py"
    out = subprocess.run([sys.executable, str(bench), "--mib", "1", "--repeat", "1", "--number", "20"],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "code_part, every later call (cached)" in out.stdout


def test_caches_do_not_keep_functions_or_their_captures_alive(tmp_path: Path) -> None:
    import gc
    import weakref

    class Big:
        pass

    def make(obj: Any) -> Any:
        def step(x: int) -> Any:
            return (x, obj)

        return step

    refs = []
    for _ in range(3):
        captured = Big()
        step = make(captured)
        fingerprint(step, (1,), {})
        refs.append((weakref.ref(step), weakref.ref(captured)))
        del step, captured
    gc.collect()
    assert all(f() is None and c() is None for f, c in refs)


def test_lambdas_on_one_line_are_told_apart(tmp_path: Path) -> None:
    src = """
    pair = (lambda: 1, lambda: 2)
    nested = lambda x=lambda: 10: x() + 1
    """
    pair = load(tmp_path, src, "pair")
    nested = load(tmp_path, src, "nested")
    codes = [code_part(f).code for f in (*pair, nested, nested.__defaults__[0])]
    assert all(not c.startswith("-.") for c in codes)  # from source, not bytecode
    assert len({c.split(".")[0] for c in codes}) == 4
    # The same lambdas in another file at other lines: the same source digests.
    again = load(tmp_path, "\n\n# moved\n" + textwrap.dedent(src), "pair")
    assert [code_part(f).code.split(".")[0] for f in again] == [c.split(".")[0] for c in codes[:2]]


def test_very_deep_expression_falls_back_to_bytecode(tmp_path: Path) -> None:
    # A sum of 2500 terms is a BinOp tree 2500 deep: deeper than the recursion limit.
    deep = "def step(x):\n    return " + " + ".join(["x"] * 2500) + "\n"
    try:
        fn = load(tmp_path, deep)
    except (RecursionError, SyntaxError, MemoryError):
        pytest.skip("this Python cannot compile it")
    assert code_part(fn).code is not None  # a record, from source or bytecode, never an error
