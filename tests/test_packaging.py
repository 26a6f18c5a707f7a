"""What a user gets from the package index: licence, sdist, README that stands on its own."""

from __future__ import annotations

import re
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
README = (REPO / "README.md").read_text(encoding="utf-8")


def test_license_file_matches_the_metadata() -> None:
    text = (REPO / "pyproject.toml").read_text()
    assert 'license = "MIT"' in text and 'license-files = ["LICENSE"]' in text
    assert (REPO / "LICENSE").read_text().startswith("MIT License")


def test_readme_links_resolve_inside_the_repository() -> None:
    targets = re.findall(r"\]\(([^)\s]+)\)", README)
    assert targets
    for target in targets:
        if target.startswith(("http://", "https://")):
            continue
        if target.startswith("#"):
            anchor = target[1:]
            headings = [re.sub(r"[^a-z0-9 -]", "", h.lower()).replace(" ", "-")
                        for h in re.findall(r"^#+ (.+)$", README, re.M)]
            assert anchor in headings, target
            continue
        path = (REPO / target.split("#")[0]).resolve()
        assert path.is_relative_to(REPO) and path.exists(), target


def test_readme_shows_no_paths_of_a_development_machine() -> None:
    for machine_path in ("/work/", "/tmp/sess", "/root/", "../shared"):
        assert machine_path not in README, machine_path


@pytest.mark.slow
def test_sdist_has_docs_and_licence_and_no_tests(tmp_path: Path) -> None:
    code = f"from setuptools import build_meta; print(build_meta.build_sdist({str(tmp_path)!r}))"
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    with tarfile.open(tmp_path / proc.stdout.split()[-1]) as tar:
        names = {n.split("/", 1)[1] for n in tar.getnames() if "/" in n}
    assert {"LICENSE", "README.md", "docs/cli.md", "src/ai2_kit/core/checkpoint/py.typed"} <= names
    # Tests need the repository (scripts, fixtures, a PostgreSQL server): they are not shipped half.
    assert not [n for n in names if n.startswith("tests")]
    assert not [n for n in names if n in ("src/ai2_kit/__init__.py", "src/ai2_kit/core/__init__.py")]
