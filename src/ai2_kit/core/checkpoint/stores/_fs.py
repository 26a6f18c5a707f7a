"""File-system helpers shared by the file-based stores."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import secrets
import stat
import time
from typing import BinaryIO

__all__ = [
    "fsync_dir", "fs_type", "is_network_fs", "temp_name", "replace_file", "NETWORK_FS", "HOST", "left_by_dead_writer",
    "open_regular", "read_head", "NotRegularFileError", "make_dirs", "fsync_parents", "file_kind", "fix_for",
]

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


def replace_file(path: str, data: bytes, durable: bool) -> None:
    """Put ``data`` at ``path`` whole or not at all: written to a ``temp_name``, renamed over ``path``.

    ``durable``: the file is fsynced before the rename (the caller fsyncs the
    folder when the name must survive a power cut too). The temporary file is
    removed when anything fails.
    """
    tmp = temp_name(path)
    try:
        with open(tmp, "xb") as f:
            f.write(data)
            if durable:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


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


class NotRegularFileError(OSError):
    """The path names a FIFO, socket, device or folder where a regular file was expected."""


def file_kind(mode: int) -> str:
    """A word for what ``mode`` (from ``stat``) is, for messages."""
    for test, word in ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO (named pipe)"),
                       (stat.S_ISSOCK, "a socket"), (stat.S_ISCHR, "a character device"),
                       (stat.S_ISBLK, "a block device")):
        if test(mode):
            return word
    return "not a regular file"


def open_regular(path: str) -> BinaryIO:
    """Open ``path`` for reading, unbuffered, only if it is a regular file.

    Opened with ``O_NONBLOCK`` and checked with ``fstat`` before anything is
    read: a plain ``open()`` of a FIFO waits for a writer for ever, and a
    device may answer anything. Raises NotRegularFileError (an OSError) for
    anything but a regular file, and the usual OSErrors otherwise.
    """
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            raise NotRegularFileError(errno.EINVAL, f"it is {file_kind(mode)}, not a regular file", path)
        # Blocking again for the reads that follow (regular files never block anyway).
        fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) & ~os.O_NONBLOCK)
        return os.fdopen(fd, "rb", buffering=0)
    except BaseException:
        os.close(fd)
        raise


def read_head(path: str, n: int) -> bytes:
    """The first ``n`` bytes of the regular file ``path`` (see ``open_regular``)."""
    with open_regular(path) as f:
        out = b""
        while len(out) < n:
            chunk = f.read(n - len(out))
            if not chunk:
                break
            out += chunk
        return out


def make_dirs(path: str, stop: str) -> list[str]:
    """Create ``path`` and its missing parents; return the folders created, outermost first.

    ``mkdir`` alone is not durable: the new folder's name lives in its
    parent, which must be fsynced too, or a power cut can take the folder,
    and every entry in it, away. The caller fsyncs the parent of each
    returned folder once its own work is durable (``fsync_parents``).
    Folders at or above ``stop`` are never created here.
    """
    created: list[str] = []
    missing: list[str] = []
    cur = path
    while cur != stop and not os.path.isdir(cur):
        missing.append(cur)
        parent = os.path.dirname(cur)
        if parent == cur:
            break
        cur = parent
    for folder in reversed(missing):
        try:
            os.mkdir(folder)
            created.append(folder)
        except FileExistsError:
            if not os.path.isdir(folder):
                raise
    return created


def fsync_parents(created: list[str]) -> None:
    """Fsync the parent of each folder in ``created`` (from ``make_dirs``)."""
    for folder in created:
        fsync_dir(os.path.dirname(folder))


def fix_for(e: OSError) -> str:
    """What a user can do about ``e``, in a few words, for one-line messages."""
    return {
        errno.EACCES: "Check the permissions of the path and its folders",
        errno.EPERM: "Check the permissions of the path and its folders",
        errno.EROFS: "The file system is read-only; pick a path on a writable one",
        errno.ENOSPC: "Free some disk space and retry",
        errno.EDQUOT: "Free some space within your quota and retry",
        errno.ENOENT: "Check the path",
        errno.ENOTDIR: "A parent of the path is a file, not a folder; check the path",
        errno.EEXIST: "A parent of the path is a file, not a folder; check the path",
        errno.ENAMETOOLONG: "Pick a shorter path",
        errno.EINVAL: "Pick a regular file or folder on an ordinary file system",
    }.get(e.errno or 0, "Check the path")
