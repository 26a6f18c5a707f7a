"""Leases and run records of a directory store: numbered claim files created with ``link()``,
and one small JSON file per run in ``.runs/``."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import logging
import os
import stat
import time
from typing import Any, Iterator

from .._base import MAX_RUN_BYTES, parse_run
from .._fs import NotRegularFileError, file_kind, make_dirs, replace_file, temp_name
from ._folder import Folder
from ._names import CLAIMS, RUNS

__all__ = ["ClaimsAndRuns"]

logger = logging.getLogger("ai2_kit.core.checkpoint.stores._directory")


def _read_run_file(path: str) -> bytes:
    """The bytes of a run record file: a regular file, not a link, of at most ``MAX_RUN_BYTES``.

    Like an entry file, never followed (``O_NOFOLLOW``: a link to another
    user's JSON is not this store's run), never waited on (``O_NONBLOCK``: a
    FIFO), and read only up to the bound (a link to /dev/zero, a huge file).
    """
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0))
    with os.fdopen(fd, "rb", buffering=0) as f:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise NotRegularFileError(errno.EINVAL, f"it is {file_kind(st.st_mode)}, not a run record file", path)
        if st.st_size > MAX_RUN_BYTES:
            raise OSError(errno.EFBIG, f"it holds {st.st_size} bytes, more than a run record may", path)
        data = f.read(MAX_RUN_BYTES + 1)
        if len(data) > MAX_RUN_BYTES:
            raise OSError(errno.EFBIG, "it grew beyond the size a run record may have", path)
        return data


def _run_file_problem(e: OSError) -> str:
    if e.errno == errno.ELOOP:
        return "it is a symbolic link, not a run record file of this store"
    return e.strerror or str(e)


class ClaimsAndRuns(Folder):
    """The leases' and run records' part of ``DirectoryStore``."""

    # -- leases: numbered claim files, each created with link() ------------------
    # The claims on one key are files .claims/<digest>/<n>, n = 1, 2, ...; the
    # one with the highest number is the current claim. A caller takes a free,
    # released or expired claim by creating the next number with link(), which
    # creates a name only if it is free, with its whole content in place, on
    # local and NFS file systems alike: of all callers that saw claim n, exactly
    # one creates n + 1. No lock, no sleep, no read-back decides who won.
    # The owner renews or releases by renaming a new version over its own file
    # only; a file of another owner is never written or removed.
    def _claim_path(self, key: str) -> str:
        """The folder holding the numbered claims on ``key``."""
        digest = hashlib.sha256(key.encode("utf-8")).hexdigest()[:40]
        return os.path.join(self.root, CLAIMS, digest)

    @staticmethod
    def _claim_numbers(folder: str) -> list[int]:
        try:
            return sorted(int(n) for n in os.listdir(folder) if n.isdigit())
        except FileNotFoundError:
            return []

    def _read_claim(self, path: str) -> dict[str, Any] | None:
        """The claim record in ``path``; ``{}`` when unreadable (as good as expired); None when gone."""
        try:
            with open(path, encoding="utf-8") as f:
                data = json.load(f)
        except FileNotFoundError:
            return None
        except (OSError, ValueError):
            return {}
        return data if isinstance(data, dict) else {}

    def _write_claim_tmp(self, path: str, key: str, owner: str, ttl: float | None) -> str:
        """A complete claim record under a temporary name next to ``path`` (``ttl`` None: released)."""
        tmp = temp_name(path)
        record = {"key": key, "owner": owner, "expires": time.time() + ttl if ttl is not None else 0.0}
        if ttl is None:
            record["released"] = True
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(record, f)
        return tmp

    def _current_claim(self, folder: str) -> tuple[int, dict[str, Any]] | None:
        """The highest-numbered claim and its record, or None when there is none."""
        for _ in range(10):
            numbers = self._claim_numbers(folder)
            if not numbers:
                return None
            held = self._read_claim(os.path.join(folder, str(numbers[-1])))
            if held is not None:
                return numbers[-1], held
            # Removed under us: only a lower number is ever removed, so a
            # higher one exists now. Look again.
        return None

    def _try_claim(self, key: str, owner: str, ttl: float) -> bool:
        folder = self._claim_path(key)
        make_dirs(folder, self.root)  # never the store's own folder: one removed stays removed
        for _ in range(10):
            current = self._current_claim(folder)
            number = 1
            if current is not None:
                n, held = current
                live = not held.get("released") and float(held.get("expires", 0)) > time.time()
                if live and held.get("owner") == owner:
                    return self._renew_claim(key, owner, ttl)
                if live:
                    return False
                number = n + 1  # free: released, expired or unreadable
            path = os.path.join(folder, str(number))
            tmp = self._write_claim_tmp(path, key, owner, ttl)
            try:
                os.link(tmp, path)
            except FileExistsError:
                continue  # another caller took it first: see whose it is now
            finally:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(tmp)
            # A caller that read an older state may have created a number that
            # a cleanup had removed; the highest number wins, so check.
            numbers = self._claim_numbers(folder)
            if numbers and numbers[-1] != number:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(path)
                return False
            for old in numbers:  # the numbers below ours are over
                if old < number:
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(os.path.join(folder, str(old)))
            return True
        return False

    def _renew_claim(self, key: str, owner: str, ttl: float) -> bool:
        folder = self._claim_path(key)
        current = self._current_claim(folder)
        if current is None:
            return False
        n, held = current
        if held.get("owner") != owner or held.get("released") or float(held.get("expires", 0)) <= time.time():
            # Not ours, or our lease ran out and another caller may have taken it.
            return False
        path = os.path.join(folder, str(n))
        os.replace(self._write_claim_tmp(path, key, owner, ttl), path)  # our own file only
        # Taken over meanwhile (right at expiry): the higher number is the owner.
        return self._claim_numbers(folder)[-1:] == [n]

    def _release_claim(self, key: str, owner: str) -> None:
        folder = self._claim_path(key)
        current = self._current_claim(folder)
        if current is None:
            return
        n, held = current
        if held.get("owner") == owner and not held.get("released"):
            # Marked released, not removed: the highest number must stay, so
            # that the next caller creates n + 1 and numbers never repeat.
            path = os.path.join(folder, str(n))
            os.replace(self._write_claim_tmp(path, key, owner, None), path)

    # -- runs: one small JSON file each in .runs/ -----------------------------------
    def _put_run(self, run_id: str, record: dict[str, Any]) -> None:
        self._ensure_marker()
        folder = os.path.join(self.root, RUNS)
        # mkdir, not makedirs: a store folder removed meanwhile stays removed.
        with contextlib.suppress(FileExistsError):
            os.mkdir(folder)
        mode = os.lstat(folder).st_mode
        if not stat.S_ISDIR(mode):
            # A link would send every run record (command lines, hosts) to
            # wherever it points; the store's own folder or nothing.
            kind = "a symbolic link" if stat.S_ISLNK(mode) else file_kind(mode)
            raise OSError(errno.ENOTDIR, f"{RUNS} is {kind}, not the store's own folder; no run record written",
                          folder)
        # No fsync: a run record is a report; one lost to a power cut costs nothing.
        replace_file(os.path.join(folder, run_id + ".json"), json.dumps(record).encode("utf-8"), durable=False)

    def _iter_runs(self) -> Iterator[Any]:
        folder = os.path.join(self.root, RUNS)
        try:
            if not stat.S_ISDIR(os.lstat(folder).st_mode):
                logger.warning("%s is not a folder of this store (a link or a file); its run records are not read",
                               folder)
                return
            names = [n for n in os.listdir(folder) if n.endswith(".json") and not n.startswith(".")]
        except FileNotFoundError:
            return
        for name in names:
            path = os.path.join(folder, name)
            try:
                yield parse_run(_read_run_file(path))
            except FileNotFoundError:
                continue  # replaced or removed since the listing: nothing to report
            except OSError as e:
                logger.warning("skipped %s: %s", path, _run_file_problem(e))
