"""File-system helpers shared by the file-based stores."""

from __future__ import annotations

import os
import secrets
import time

__all__ = ["fsync_dir", "fs_type", "is_network_fs", "temp_name", "NETWORK_FS", "HOST", "left_by_dead_writer"]

#: This host's name as it appears in the names of files we write.
HOST = os.uname().nodename.replace("/", "_")

#: File systems where SQLite's WAL (shared memory) and POSIX locks cannot be
#: trusted across hosts; the SQLite store falls back to a rollback journal.
NETWORK_FS = frozenset(
    {"nfs", "nfs4", "lustre", "gpfs", "cifs", "smb3", "smbfs", "ceph", "beegfs", "9p",
     "fuse.sshfs", "fuse.glusterfs", "glusterfs", "fuse.ceph", "panfs", "wekafs", "afs"}
)


def fsync_dir(path: str) -> None:
    """Make a rename or a new file in ``path`` durable (a no-op where unsupported)."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some file systems refuse fsync on directories; the rename still happened
    finally:
        os.close(fd)


def fs_type(path: str) -> str:
    """The type of the file system holding ``path`` ('' when unknown)."""
    path = os.path.realpath(path)
    best, best_type = "", ""
    try:
        with open("/proc/self/mountinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                fields = line.split()
                try:
                    sep = fields.index("-")
                except ValueError:
                    continue
                mount = fields[4].replace("\\040", " ")
                if (path == mount or path.startswith(mount.rstrip("/") + "/")) and len(mount) >= len(best):
                    best, best_type = mount, fields[sep + 1]
    except OSError:
        return ""
    return best_type


def is_network_fs(path: str) -> bool:
    return fs_type(path) in NETWORK_FS


def temp_name(final: str) -> str:
    """A temporary sibling name for ``final`` that carries host and pid.

    Hidden (leading dot) and ending in ``.tmp`` so listings skip it; unique
    across hosts sharing a file system, so writers never collide.
    """
    head, tail = os.path.split(final)
    return os.path.join(head, f".{tail}.{HOST}.{os.getpid()}.{secrets.token_hex(4)}.tmp")


def left_by_dead_writer(path: str, host: str, pid: str, min_age: float) -> bool:
    """Whether a file named after its writer (``host``, ``pid``) was left by one that is gone.

    On this host the process table answers; for another host's writer only
    age can, so the file must be older than ``min_age`` seconds.
    """
    if host == HOST and pid.isdigit():
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            return True
        except PermissionError:
            return False  # another user's live process
        return False
    try:
        return time.time() - os.stat(path).st_mtime >= min_age
    except FileNotFoundError:
        return False
