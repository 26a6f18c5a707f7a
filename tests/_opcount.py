"""Counting a store's file-system metadata operations with strace (issue 26).

On NFS and Lustre each path look-up, open, stat, mkdir, rename, unlink,
folder read, fsync and byte-range lock is a round trip to a server, so their
count per step sets a resume's time. ``per_op`` runs one script twice under
``strace -f``, with N operations and with none (same setup), and returns
(count with N - count with 0) / N. An ``fstat`` of an open descriptor and
``fcntl`` F_GETFL/F_SETFL/F_GETFD/F_SETFD/F_DUPFD stay on the client and are
not counted; nor are reads and writes of open files (data, not metadata).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from collections import Counter

STRACE = shutil.which("strace")

#: The system calls that reach a network file system's server.
TRACED = (
    "open,openat,openat2,creat,stat,lstat,newfstatat,fstatat64,statx,access,faccessat,faccessat2,"
    "mkdir,mkdirat,rmdir,rename,renameat,renameat2,unlink,unlinkat,link,linkat,symlink,symlinkat,"
    "readlink,readlinkat,getdents,getdents64,fsync,fdatasync,sync_file_range,fcntl,flock,"
    "truncate,chmod,fchmodat,utimensat"
)
_LOCAL_FCNTL = ("F_GETFL", "F_SETFL", "F_GETFD", "F_SETFD", "F_DUPFD")
_CALL = re.compile(r"^(?:\[pid\s+\d+\]\s+|\d+\s+)?(\w+)\((.*)$")


def counted(trace: str) -> Counter[str]:
    """The metadata operations in an ``strace -f`` output, by system call name."""
    out: Counter[str] = Counter()
    for line in trace.splitlines():
        if "resumed>" in line or line.startswith("+++") or line.startswith("---"):
            continue
        m = _CALL.match(line.strip())
        if m is None:
            continue
        name, args = m.groups()
        if name in ("newfstatat", "fstatat64", "statx") and "AT_EMPTY_PATH" in args and '""' in args:
            continue  # fstat of an open descriptor
        if name == "fcntl" and any(f in args for f in _LOCAL_FCNTL):
            continue
        out[name] += 1
    return out


def run_counted(script: str, *args: str, cwd: str) -> Counter[str]:
    """Run ``script`` (Python source, argv = args) under strace; its metadata operations."""
    assert STRACE is not None
    log = os.path.join(cwd, "strace.log")
    env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1"}
    subprocess.run(
        [STRACE, "-f", "-qq", "-o", log, "-e", f"trace={TRACED}", sys.executable, "-c", script, *args],
        check=True, cwd=cwd, env=env, timeout=300,
    )
    with open(log) as f:
        trace = f.read()
    os.unlink(log)
    return counted(trace)


def per_op(script: str, n: int, *args: str, cwd: str) -> tuple[float, Counter[str]]:
    """(operations per step, the difference by call) of ``script`` run with ``n`` steps minus 0 steps.

    ``script`` receives the step count as ``sys.argv[1]`` and ``args`` after it.
    """
    with_n = run_counted(script, str(n), *args, cwd=cwd)
    with_0 = run_counted(script, "0", *args, cwd=cwd)
    diff = Counter({k: with_n[k] - with_0[k] for k in set(with_n) | set(with_0) if with_n[k] != with_0[k]})
    return (sum(with_n.values()) - sum(with_0.values())) / n, diff
