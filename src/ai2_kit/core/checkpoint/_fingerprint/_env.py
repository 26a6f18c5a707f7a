"""The environment side of a record: the Python version and the versions of the distributions a step imports.

Which distributions: those providing the top-level modules that the modules
of the step and its helpers import (``CodePart.imports``), each looked up
once per process. A version is read from the distribution's ``dist-info``
folder as importlib.metadata would read it; importlib.metadata itself is
imported only when that reading cannot be certain (its import and scan of
``sys.path`` would otherwise sit on a first save).
"""

from __future__ import annotations

import os
import platform
import re
import sys
from typing import Any, Dict, FrozenSet, List, Tuple

from ._code import _is_user_file

__all__ = ["environment"]

_PYTHON = platform.python_version()
_TOP_TO_DISTS: Dict[str, List[str]] | None = None
_DIST_VERSIONS: Dict[str, str | None] = {}
_ENVS: Dict[FrozenSet[str], Dict[str, Any]] = {}


def _top_to_dists() -> Dict[str, List[str]]:
    """Top-level importable name -> distributions providing it (read once per process)."""
    global _TOP_TO_DISTS
    if _TOP_TO_DISTS is None:
        import importlib.metadata as md  # only when an environment is first recorded

        mapping: Dict[str, List[str]] = {}
        try:
            pd = getattr(md, "packages_distributions", None)
            if pd is not None:
                mapping = {k: list(v) for k, v in pd().items()}
            else:  # Python 3.9: the same from each distribution's files
                for dist in md.distributions():
                    name = dist.metadata["Name"]
                    tops = (dist.read_text("top_level.txt") or "").split()
                    if not tops:
                        tops = [str(f).split("/")[0].split(".")[0] for f in dist.files or ()
                                if "/" in str(f) and not str(f).split("/")[0].endswith((".dist-info", ".egg-info"))]
                    for top in set(tops):
                        mapping.setdefault(top, []).append(name)
        except Exception:  # a broken distribution's metadata must not break a step
            mapping = {}
        _TOP_TO_DISTS = mapping
    return _TOP_TO_DISTS


def _dist_version(dist: str) -> str | None:
    if dist not in _DIST_VERSIONS:
        found = _scan_version(dist)
        if found is _UNSURE:
            import importlib.metadata as md

            try:
                found = md.version(dist)
            except Exception:
                found = None
        _DIST_VERSIONS[dist] = found  # type: ignore[assignment]
    return _DIST_VERSIONS[dist]


#: What ``_scan_version`` answers when only importlib.metadata can tell.
_UNSURE: Any = object()
_LISTINGS: Dict[str, Tuple[str, ...]] = {}
_NAME_RUNS = re.compile(r"[-_.]+")


def _scan_version(dist: str) -> Any:
    """``importlib.metadata.version(dist)`` without importing it (a cost on a first save), or ``_UNSURE``.

    The same search as importlib.metadata's (Python 3.10 to 3.13) for plain
    folders on ``sys.path``:
    the first folder holding a ``NAME-*.dist-info`` or ``NAME-*.egg-info``
    folder whose normalized name is the distribution's, and the ``Version``
    header of its ``METADATA`` (or ``PKG-INFO``). Anything else (a zip on
    the path, a finder of distributions asked before the standard one, two
    candidates in one folder, a header it does not read the same way)
    answers ``_UNSURE``, and importlib.metadata decides. Finders asked after
    the standard one (the ``importlib_metadata`` backport's, which importing
    dask installs) matter only when the standard one finds nothing: the
    first answer wins.
    """
    if sys.version_info < (3, 10):
        return _UNSURE
    finders = [f for f in sys.meta_path if getattr(f, "find_distributions", None) is not None]
    if not finders or getattr(finders[0], "__name__", "") != "PathFinder":
        return _UNSURE
    missing = None if len(finders) == 1 else _UNSURE  # what a later finder might still find
    want = _NAME_RUNS.sub("_", dist).lower()
    for entry in sys.path:
        root = entry or "."
        if os.path.basename(str(root)).lower().endswith(".egg"):
            return _UNSURE  # an egg's metadata is found by other rules
        names = _LISTINGS.get(root)
        if names is None:
            if not os.path.isdir(root):
                if os.path.exists(root):
                    return _UNSURE  # a zip file or another kind of path entry
                continue
            try:
                names = tuple(os.listdir(root))
            except OSError:
                return _UNSURE
            _LISTINGS[root] = names
        hits = [n for n in names if n.lower().endswith((".dist-info", ".egg-info"))
                and _NAME_RUNS.sub("_", n.lower().rpartition(".")[0].partition("-")[0]) == want]
        if not hits:
            continue
        if len(hits) > 1:
            return _UNSURE
        return _version_header(os.path.join(root, hits[0]))
    return missing


def _version_header(info: str) -> Any:
    for name in ("METADATA", "PKG-INFO"):
        try:
            with open(os.path.join(info, name), encoding="utf-8") as f:
                lines = f.read().split("\n")
        except FileNotFoundError:
            continue
        except (OSError, ValueError):
            return _UNSURE
        for i, line in enumerate(lines):
            if not line.strip():
                break  # the end of the headers
            if line[:8].lower() == "version:":
                nxt = lines[i + 1] if i + 1 < len(lines) else ""
                if nxt[:1] in (" ", "\t") or "\r" in line:
                    return _UNSURE  # a folded or odd header: the email parser's business
                return line[8:].lstrip(" \t")
        return _UNSURE
    return _UNSURE


# Import names whose distribution is named otherwise, tried before reading
# the metadata of every installed distribution (packages_distributions reads
# every distribution's files: slow with many installed, slower on a network
# file system).
_ALIASES: Dict[str, Tuple[str, ...]] = {
    "ai2_kit": ("ai2-kit", "ai2-kit-checkpoint"),
    "sklearn": ("scikit-learn",),
    "skimage": ("scikit-image",),
    "yaml": ("PyYAML",),
    "PIL": ("Pillow",),
    "cv2": ("opencv-python", "opencv-python-headless", "opencv-contrib-python"),
    "dateutil": ("python-dateutil",),
    "attr": ("attrs",),
}
_DISTS_OF: Dict[str, Tuple[str, ...]] = {}
_STDLIB_DIRS: Tuple[str, ...] | None = None


def _stdlib_dirs() -> Tuple[str, ...]:
    global _STDLIB_DIRS
    if _STDLIB_DIRS is None:
        import sysconfig

        paths = sysconfig.get_paths()
        _STDLIB_DIRS = tuple({os.path.realpath(paths[k]) + os.sep for k in ("stdlib", "platstdlib") if k in paths})
    return _STDLIB_DIRS


def _installed(top: str) -> bool:
    """Whether the imported top-level module ``top`` comes from an installed package."""
    if top in sys.builtin_module_names or top in getattr(sys, "stdlib_module_names", ()):
        return False
    module = sys.modules.get(top)
    if module is None:
        return False
    paths = [module.__file__] if getattr(module, "__file__", None) else list(getattr(module, "__path__", ()))
    if not paths:
        return False
    for path in paths:
        real = os.path.realpath(str(path))
        parts = real.split(os.sep)
        if "site-packages" in parts or "dist-packages" in parts:
            return True
        if real.startswith(_stdlib_dirs()) or _is_user_file(str(path)):
            return False
    return True


def _dists_of(top: str) -> Tuple[str, ...]:
    found = _DISTS_OF.get(top)
    if found is None:
        found = ()
        try:
            if _installed(top):
                # The distribution named like the module, else a known alias,
                # else (slow, once per process) every distribution's files.
                found = tuple(d for d in _ALIASES.get(top, (top,)) if _dist_version(d) is not None)
                if not found:
                    found = tuple(_top_to_dists().get(top, ()))
        except Exception:  # odd module objects (lazy proxies) must not break a step
            found = ()
        _DISTS_OF[top] = found
    return found


def environment(imports: FrozenSet[str] = frozenset()) -> Dict[str, Any]:
    """The Python version and the versions of the distributions providing ``imports``.

    >>> environment()["python"] == platform.python_version()
    True
    """
    env = _ENVS.get(imports)
    if env is None:
        packages: Dict[str, str] = {}
        for top in sorted(imports):
            for dist in _dists_of(top):
                v = _dist_version(dist)
                if v is not None:
                    packages[dist] = v
        env = {"python": _PYTHON, "packages": dict(sorted(packages.items()))}
        if len(_ENVS) >= 1024:
            _ENVS.clear()
        _ENVS[imports] = env
    return env
