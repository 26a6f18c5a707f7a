"""File-system helpers shared by the file-based stores."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import secrets
import stat
import time
from typing import Any, BinaryIO

from .._errors import StoreOpenError

__all__ = [
    "fsync_dir", "fsync_file", "ensure_durable", "folders_between", "DurabilityError", "DIR_FSYNC_UNSUPPORTED",
    "fs_type", "store_path", "identity", "gone_reason", "is_network_fs", "temp_name", "replace_file", "NETWORK_FS",
    "HOST", "left_by_dead_writer",
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


#: What a folder's fsync may answer on a file system that cannot fsync folders
#: (some FUSE and network file systems): the rename or new name is then as
#: durable as that file system makes it, and nothing more can be done. Every
#: other errno (EIO above all: the disk lost writes) fails the save.
#: ENOTSUP and EOPNOTSUPP are one value on Linux, two on some other systems.
DIR_FSYNC_UNSUPPORTED = frozenset({errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP})


class DurabilityError(OSError):
    """A file or folder could not be made durable (its fsync, or the open before it, failed)."""

    def __init__(self, what: str, path: str, cause: OSError) -> None:
        super().__init__(cause.errno, cause.strerror or str(cause), path)
        self.what = what

    def __str__(self) -> str:
        name = errno.errorcode.get(self.errno or 0, str(self.errno))
        return f"cannot make {self.filename} durable: {self.what} failed with {name} ({self.strerror})"


def fsync_file(fd: int, path: str) -> None:
    """``os.fsync(fd)``; a failure raised as a DurabilityError naming ``path`` and the errno."""
    try:
        os.fsync(fd)
    except OSError as e:
        raise DurabilityError("fsync", path, e) from e


def _open_dir(path: str) -> int:
    return os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0) | getattr(os, "O_CLOEXEC", 0))


def _fsync_dir_fd(fd: int, path: str) -> None:
    try:
        os.fsync(fd)
    except OSError as e:
        if e.errno not in DIR_FSYNC_UNSUPPORTED:
            raise DurabilityError("fsync", path, e) from e


def fsync_dir(path: str, *, missing_ok: bool = False, outside: bool = False) -> None:
    """Make a rename, a new name or a removal in the folder ``path`` durable.

    Raises DurabilityError naming the folder and the errno when the folder
    cannot be opened or its fsync fails, except for the errnos of a file
    system that cannot fsync folders (``DIR_FSYNC_UNSUPPORTED``).
    ``missing_ok``: a folder removed meanwhile is no error (a removal that
    another process finished). ``outside``: the folder is above the store
    (the user's); one we may not open for reading is left as it is.
    """
    try:
        fd = _open_dir(path)
    except FileNotFoundError as e:
        if missing_ok:
            return
        raise DurabilityError("opening the folder for fsync", path, e) from e
    except OSError as e:
        if outside and e.errno in (errno.EACCES, errno.EPERM):
            return
        raise DurabilityError("opening the folder for fsync", path, e) from e
    try:
        _fsync_dir_fd(fd, path)
    finally:
        os.close(fd)


#: Folders whose entries this process knows to be durable: path -> (st_dev,
#: st_ino, st_ctime_ns) as read just before an fsync of that folder. Any
#: change to a folder's entries (a name created, removed or renamed, the
#: folder removed and made again, even on a reused inode number) moves its
#: ctime, so a folder whose three numbers still match needs no fsync. A
#: ctime is remembered only once it is old enough (``_settle_ns``):
#: timestamps are coarse (a clock tick; a second or two on some file
#: systems), and a change right after the fsync, within the same tick as the
#: ctime read, would carry the same value. A forked child inherits the
#: memory, and it stays true there: durability is the disk's, not the process's.
_durable: dict[str, tuple[int, int, int]] = {}
_DURABLE_MAX = 1 << 16
#: Trusted age of a ctime with sub-second digits: well above a clock tick (at most 10 ms).
_SETTLE_FINE_NS = 50_000_000
#: Trusted age of a ctime in whole seconds (1 s or 2 s timestamps: Lustre, HFS+, FAT...).
_SETTLE_COARSE_NS = 3_000_000_000


def _settle_ns(ctime_ns: int) -> int:
    """How old ``ctime_ns`` must be before a folder showing it can be trusted unchanged.

    The file system's timestamp grain is guessed from the value's trailing
    zeros: a grain is a multiple of the power of ten its values end with,
    and this waits 100 times that power (50 ms at least, 3 s at most), so a
    grain such as 250 ms (values ending in 7 zeros) is covered too. A fine
    timestamp that ends in zeros by chance only waits longer.
    """
    if ctime_ns % 1_000_000_000 == 0:
        return _SETTLE_COARSE_NS
    grain = 1
    while grain < 100_000_000 and ctime_ns % (grain * 10) == 0:
        grain *= 10
    return min(max(100 * grain, _SETTLE_FINE_NS), _SETTLE_COARSE_NS)


def ensure_durable(folders: list[str], *, outside: int = 0) -> None:
    """Make the entries of each folder in ``folders`` durable (an fsync unless known durable).

    Used for every folder above the one a save wrote into, from the store's
    parent down: each holds the name of the next, so a save is durable only
    when all of them are, whoever created them. ``outside``: how many of the
    first folders are above the store (see ``fsync_dir``).
    """
    for i, folder in enumerate(folders):
        try:
            st = os.stat(folder)
        except OSError as e:
            raise DurabilityError("looking up the folder", folder, e) from e
        if _durable.get(folder) == (st.st_dev, st.st_ino, st.st_ctime_ns):
            continue
        try:
            fd = _open_dir(folder)
        except OSError as e:
            if i < outside and e.errno in (errno.EACCES, errno.EPERM):
                continue
            raise DurabilityError("opening the folder for fsync", folder, e) from e
        try:
            st = os.fstat(fd)  # the folder fsynced below, as it is before the fsync
            _fsync_dir_fd(fd, folder)
        finally:
            os.close(fd)
        if time.time_ns() - st.st_ctime_ns > _settle_ns(st.st_ctime_ns):
            if len(_durable) >= _DURABLE_MAX:
                _durable.clear()  # the memory only spares fsyncs: start again
            _durable[folder] = (st.st_dev, st.st_ino, st.st_ctime_ns)


def folders_between(top: str, folder: str) -> list[str]:
    """The folders from ``top``'s parent down to ``folder``'s parent (``folder`` under ``top``, or ``top``)."""
    chain = [os.path.dirname(top)]
    rel = os.path.relpath(folder, top)
    if rel != ".":
        cur = top
        for part in rel.split(os.sep)[:-1]:
            chain.append(cur)
            cur = os.path.join(cur, part)
        chain.append(cur)
    return chain


def store_path(location: Any) -> str:
    """The absolute path of a store location given as a path; an empty one is refused.

    ``os.path.abspath("")`` is the current folder: a variable left unset
    (``load "$STORE" - rm "*"``) would make the current folder the store.
    """
    path = os.fspath(location)
    if isinstance(path, bytes):
        path = os.fsdecode(path)
    if not path.strip():
        raise StoreOpenError(
            path, "the store path is empty (an unset variable?); it would mean the current folder",
            "Give the store's path; to use the current folder, say '.'",
        )
    return os.path.abspath(path)


def identity(path: str) -> tuple[int, int] | None:
    """``(st_dev, st_ino)`` of what ``path`` names now, or None when nothing is there."""
    try:
        st = os.stat(path)
    except (FileNotFoundError, NotADirectoryError):
        return None
    return st.st_dev, st.st_ino


def gone_reason(path: str, opened: tuple[int, int] | None) -> str | None:
    """Why the store opened at ``path`` as ``opened`` (its ``identity``) is not there any more, or None."""
    now = identity(path)
    if now is None:
        return f"{path} was removed while this process used it; nothing is written there"
    if opened is not None and now != opened:
        return f"{path} was removed and replaced by another while this process used it; nothing is written there"
    return None


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
                fsync_file(f.fileno(), path)
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


def open_regular(path: str, *, nofollow: bool = False) -> BinaryIO:
    """Open ``path`` for reading, unbuffered, only if it is a regular file.

    Opened with ``O_NONBLOCK`` and checked with ``fstat`` before anything is
    read: a plain ``open()`` of a FIFO waits for a writer for ever, and a
    device may answer anything. Raises NotRegularFileError (an OSError) for
    anything but a regular file, and the usual OSErrors otherwise.
    ``nofollow``: a symbolic link as the last part of ``path`` is refused by
    the open itself (``O_NOFOLLOW``), a NotRegularFileError with errno
    ELOOP; one open, no ``lstat`` before it (a round trip on NFS and Lustre).
    """
    flags = os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0)
    if nofollow:
        flags |= getattr(os, "O_NOFOLLOW", 0)
    try:
        fd = os.open(path, flags)
    except OSError as e:
        if nofollow and e.errno == errno.ELOOP:
            raise NotRegularFileError(errno.ELOOP, "it is a symbolic link, not a regular file", path) from e
        raise
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
    and every entry in it, away. A save makes every folder on its path
    durable, whoever created it (``ensure_durable``); creating a store, the
    caller fsyncs the parent of each returned folder (``fsync_parents``).
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
        fsync_dir(os.path.dirname(folder), outside=True)


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
