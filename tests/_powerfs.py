"""A FUSE file system that forgets, on a power cut, everything that was not fsynced.

It passes every call through to a real folder (the "disk") and keeps, beside
it, a model of what a disk would hold after a power cut, by the POSIX rules
the stores rely on:

- a file's bytes (and its size) are durable up to its last ``fsync`` or
  ``fdatasync``; later writes and truncations are lost;
- a folder's entries (names made by create, mkdir, link, symlink, rename; names
  removed by unlink, rmdir, rename) are durable up to the folder's last
  ``fsync``; everything after it is undone. A rename is two changes, one in
  each folder: each survives only if its own folder was synced after it.

A name that survives refers to the file's *durable* content, so a file created,
written and renamed without any fsync comes back, if at all, empty. File
modes, owners and times are not modelled (they pass through and stay).
Everything on the disk when the file system is mounted counts as durable.

``cut`` unmounts and rewrites the disk folder into what the model says a disk
holds; ``unmount`` is a clean shutdown that keeps everything. Mount again to
"reboot". The daemon runs in a subprocess of its own:

    python _powerfs.py DISK MOUNTPOINT      # then write "cut" or "sync" to stdin and unmount

Bytes are tracked per inode as dirty extents: an fsync copies only the
extents written since the previous one into a shadow copy (the durable
content), so the model costs one extra copy of each synced byte.
"""

from __future__ import annotations

import bisect
import errno
import json
import os
import shutil
import stat
import subprocess
import sys
import time
from typing import Any, Callable, Iterator

__all__ = ["PowerFS", "Mount", "fuse_unavailable"]


# -- the model, inside the daemon ---------------------------------------------------


class Node:
    """One inode: a file, a folder or a symlink, with what a disk holds of it."""

    __slots__ = ("nid", "kind", "ino", "shadow", "dirty", "live", "durable", "target")

    def __init__(self, nid: int, kind: str, ino: int) -> None:
        self.nid = nid
        self.kind = kind  # "f" file, "d" folder, "l" symlink
        self.ino = ino  # valid while the inode is alive on the disk folder
        # Files: the durable bytes live in ``shadow`` (None: the file is as it
        # was at mount time, so the live bytes are the durable ones);
        # ``dirty`` lists the extents written since the last fsync.
        self.shadow: str | None = None
        self.dirty: list[list[int]] = []
        # Folders: name -> Node as the folder is now and as a disk holds it
        # (both None: untouched since mount, the live listing is the durable one).
        self.live: dict[str, Node] | None = None
        self.durable: dict[str, Node] | None = None
        self.target: str | None = None


def _kind(mode: int) -> str:
    if stat.S_ISDIR(mode):
        return "d"
    if stat.S_ISLNK(mode):
        return "l"
    return "f"


def _add_extent(extents: list[list[int]], start: int, end: int) -> None:
    """Insert [start, end) into a sorted list of disjoint extents, merging neighbours."""
    if end <= start:
        return
    i = bisect.bisect_left(extents, [start, start])
    if i > 0 and extents[i - 1][1] >= start:
        i -= 1
    j = i
    while j < len(extents) and extents[j][0] <= end:
        start = min(start, extents[j][0])
        end = max(end, extents[j][1])
        j += 1
    extents[i:j] = [[start, end]]


class PowerFS:
    """The pass-through operations (fusepy's interface) and the durability model."""

    use_ns = True
    # Writes and reads of a file whose last name is gone come with no path.
    flag_nullpath_ok = True

    def __init__(self, disk: str) -> None:
        self.disk = os.path.abspath(disk)
        self.shadow_dir = self.disk + ".powerfs-shadow"
        shutil.rmtree(self.shadow_dir, ignore_errors=True)
        os.makedirs(self.shadow_dir)
        self.next_id = 0
        self.by_ino: dict[int, Node] = {}
        self.by_fh: dict[int, Node] = {}
        self.sync_fhs: set[int] = set()
        self.counts = {"writes": 0, "fsyncs": 0, "dir_fsyncs": 0, "namespace_ops": 0}
        self.errors: list[str] = []
        self.root = self._node("/")

    # fusepy calls the object with the operation's name.
    def __call__(self, op: str, *args: Any) -> Any:
        method = getattr(self, op, None)
        if method is None:
            raise OSError(errno.ENOSYS, op)
        try:
            return method(*args)
        except OSError:
            raise
        except Exception as e:  # a bug of the model: fail the test, not only this call
            self.errors.append(f"{op}{args[:2]!r}: {type(e).__name__}: {e}")
            raise OSError(errno.EIO, str(e)) from e

    # -- nodes ---------------------------------------------------------------
    def _full(self, path: str) -> str:
        return self.disk + path if path != "/" else self.disk

    def _new(self, kind: str, ino: int) -> Node:
        self.next_id += 1
        node = Node(self.next_id, kind, ino)
        self.by_ino[ino] = node
        return node

    def _node(self, path: str) -> Node:
        st = os.lstat(self._full(path))
        node = self.by_ino.get(st.st_ino)
        if node is None:
            node = self._new(_kind(st.st_mode), st.st_ino)
        return node

    def _folder(self, path: str) -> Node:
        """The folder at ``path``, its listing taken on first touch (then live == durable)."""
        node = self._node(path)
        if node.live is None:
            node.live = {name: self._node(os.path.join(path, name)) for name in os.listdir(self._full(path))}
            node.durable = dict(node.live)
        return node

    def _parent(self, path: str) -> tuple[Node, str]:
        head, name = os.path.split(path)
        self.counts["namespace_ops"] += 1
        return self._folder(head or "/"), name

    def _keep(self, node: Node, source: str) -> None:
        """Before the first change to a file's bytes since mount, copy what the disk holds."""
        if node.kind == "f" and node.shadow is None:
            shadow = os.path.join(self.shadow_dir, str(node.nid))
            shutil.copyfile(source, shadow)
            node.shadow = shadow

    def _forget_inode(self, path: str, node: Node) -> None:
        """``path`` is about to lose its name: keep what a disk holds if it was the last one."""
        st = os.lstat(self._full(path))
        if node.kind == "d":
            self._folder(path)
        elif st.st_nlink <= 1:
            self._keep(node, self._full(path))
        if node.kind == "d" or st.st_nlink <= 1:
            # Its inode number may be reused by a new file from now on.
            self.by_ino.pop(st.st_ino, None)

    def _empty_shadow(self, node: Node) -> None:
        node.shadow = os.path.join(self.shadow_dir, str(node.nid))
        open(node.shadow, "wb").close()

    # -- durability ------------------------------------------------------------
    def _sync_file(self, node: Node, fh: int) -> None:
        if node.shadow is None or not node.dirty:
            node.dirty = []
            if node.shadow is not None:
                size = os.fstat(fh).st_size
                if os.path.getsize(node.shadow) != size:
                    os.truncate(node.shadow, size)
            return
        size = os.fstat(fh).st_size
        src = os.open(f"/proc/self/fd/{fh}", os.O_RDONLY)  # fh may be write-only
        try:
            dst = os.open(node.shadow, os.O_WRONLY)
            try:
                for start, end in node.dirty:
                    end = min(end, size)
                    while start < end:
                        data = os.pread(src, min(end - start, 1 << 20), start)
                        if not data:
                            break
                        os.pwrite(dst, data, start)
                        start += len(data)
                os.ftruncate(dst, size)
            finally:
                os.close(dst)
        finally:
            os.close(src)
        node.dirty = []

    # -- reading ---------------------------------------------------------------
    def getattr(self, path: str, fh: int | None = None) -> dict[str, Any]:
        st = os.fstat(fh) if fh is not None else os.lstat(self._full(path))
        attrs = {k: getattr(st, k) for k in ("st_mode", "st_nlink", "st_size", "st_uid", "st_gid")}
        attrs.update(st_atime=st.st_atime_ns, st_mtime=st.st_mtime_ns, st_ctime=st.st_ctime_ns)
        return attrs

    def readdir(self, path: str, fh: int) -> list[str]:
        return [".", "..", *os.listdir(self._full(path))]

    def readlink(self, path: str) -> str:
        return os.readlink(self._full(path))

    def statfs(self, path: str) -> dict[str, Any]:
        sv = os.statvfs(self._full(path))
        return {k: getattr(sv, k) for k in ("f_bavail", "f_bfree", "f_blocks", "f_bsize", "f_favail",
                                            "f_ffree", "f_files", "f_flag", "f_frsize", "f_namemax")}

    def access(self, path: str, amode: int) -> int:
        if not os.access(self._full(path), amode):
            raise OSError(errno.EACCES, path)
        return 0

    def read(self, path: str, size: int, offset: int, fh: int) -> bytes:
        return os.pread(fh, size, offset)

    # -- metadata (passed through, not modelled) ----------------------------------
    def chmod(self, path: str, mode: int) -> None:
        os.chmod(self._full(path), mode)

    def chown(self, path: str, uid: int, gid: int) -> None:
        os.chown(self._full(path), uid, gid, follow_symlinks=False)

    def utimens(self, path: str, times: tuple[int, int] | None = None) -> None:
        if times is None:
            os.utime(self._full(path), follow_symlinks=False)
        else:
            os.utime(self._full(path), ns=times, follow_symlinks=False)

    # -- file contents -----------------------------------------------------------
    def _register(self, fd: int, node: Node, flags: int) -> int:
        self.by_fh[fd] = node
        if flags & (os.O_SYNC | os.O_DSYNC):
            self.sync_fhs.add(fd)
        return fd

    def open(self, path: str, flags: int) -> int:
        node = self._node(path)
        if flags & os.O_TRUNC:
            self._keep(node, self._full(path))
            _add_extent(node.dirty, 0, os.path.getsize(self._full(path)))
        # O_APPEND is the kernel's business: the offsets it sends are final.
        fd = os.open(self._full(path), flags & ~(os.O_APPEND | os.O_CREAT | os.O_EXCL))
        return self._register(fd, node, flags)

    def create(self, path: str, mode: int, fi: Any = None) -> int:
        full = self._full(path)
        if os.path.lexists(full):
            return self.open(path, os.O_RDWR)
        parent, name = self._parent(path)
        fd = os.open(full, os.O_RDWR | os.O_CREAT | os.O_EXCL, mode)
        node = self._new("f", os.fstat(fd).st_ino)
        self._empty_shadow(node)  # a new file: a disk holds no byte of it yet
        assert parent.live is not None
        parent.live[name] = node
        return self._register(fd, node, 0)

    def write(self, path: str, data: bytes, offset: int, fh: int) -> int:
        node = self.by_fh[fh]
        self._keep(node, f"/proc/self/fd/{fh}")
        n = os.pwrite(fh, data, offset)
        _add_extent(node.dirty, offset, offset + n)
        self.counts["writes"] += 1
        if fh in self.sync_fhs:
            self._sync_file(node, fh)
        return n

    def truncate(self, path: str, length: int, fh: int | None = None) -> None:
        node = self.by_fh[fh] if fh is not None else self._node(path)
        self._keep(node, f"/proc/self/fd/{fh}" if fh is not None else self._full(path))
        old = os.fstat(fh).st_size if fh is not None else os.path.getsize(self._full(path))
        _add_extent(node.dirty, min(old, length), max(old, length))
        if fh is not None:
            os.ftruncate(fh, length)
        else:
            os.truncate(self._full(path), length)

    def fsync(self, path: str, datasync: int, fh: int) -> None:
        # fdatasync too: it must flush the size, without which the data cannot be read.
        self.counts["fsyncs"] += 1
        self._sync_file(self.by_fh[fh], fh)

    def flush(self, path: str, fh: int) -> None:
        return None

    def release(self, path: str, fh: int) -> None:
        self.by_fh.pop(fh, None)
        self.sync_fhs.discard(fh)
        os.close(fh)

    # -- folders -------------------------------------------------------------
    def fsyncdir(self, path: str, datasync: int, fh: int) -> None:
        self.counts["dir_fsyncs"] += 1
        node = self._folder(path)
        assert node.live is not None
        node.durable = dict(node.live)

    def mkdir(self, path: str, mode: int) -> None:
        parent, name = self._parent(path)
        os.mkdir(self._full(path), mode)
        node = self._new("d", os.lstat(self._full(path)).st_ino)
        node.live, node.durable = {}, {}
        assert parent.live is not None
        parent.live[name] = node

    def symlink(self, target: str, source: str) -> None:
        parent, name = self._parent(target)
        os.symlink(source, self._full(target))
        node = self._new("l", os.lstat(self._full(target)).st_ino)
        node.target = source
        assert parent.live is not None
        parent.live[name] = node

    def link(self, target: str, source: str) -> None:
        parent, name = self._parent(target)
        node = self._node(source)
        os.link(self._full(source), self._full(target))
        assert parent.live is not None
        parent.live[name] = node

    def unlink(self, path: str) -> None:
        parent, name = self._parent(path)
        node = self._node(path)
        self._forget_inode(path, node)
        os.unlink(self._full(path))
        assert parent.live is not None
        parent.live.pop(name, None)

    def rmdir(self, path: str) -> None:
        parent, name = self._parent(path)
        node = self._node(path)
        self._forget_inode(path, node)
        os.rmdir(self._full(path))
        assert parent.live is not None
        parent.live.pop(name, None)

    def rename(self, old: str, new: str) -> None:
        old_parent, old_name = self._parent(old)
        new_parent, new_name = self._parent(new)
        node = self._node(old)
        if node.kind == "d":
            self._folder(old)  # its listing, while it is still at a known place
        if os.path.lexists(self._full(new)):
            replaced = self._node(new)
            if replaced is not node:
                self._forget_inode(new, replaced)
        os.rename(self._full(old), self._full(new))
        assert old_parent.live is not None and new_parent.live is not None
        old_parent.live.pop(old_name, None)
        new_parent.live[new_name] = node

    # -- the power cut -----------------------------------------------------------
    def cut(self) -> dict[str, Any]:
        """Rewrite the disk folder into what a disk holds after a power cut; return what was undone."""
        live: dict[int, str] = {}  # inode -> a current path, for what was never touched
        for dirpath, dirnames, filenames in os.walk(self.disk):
            for name in dirnames + filenames:
                p = os.path.join(dirpath, name)
                live.setdefault(os.lstat(p).st_ino, p)
        live[os.lstat(self.disk).st_ino] = self.disk
        report = {"entries_undone": 0, "files_rolled_back": 0, "files_kept": 0}
        for node in list(self.by_ino.values()):
            if node.kind == "f" and node.dirty:
                report["files_rolled_back"] += 1
        new_root = self.disk + ".powerfs-new"
        shutil.rmtree(new_root, ignore_errors=True)
        os.mkdir(new_root)
        made: dict[int, str] = {}  # node id -> first path made for it (hard links)

        def entries(node: Node, where: str | None) -> dict[str, Node | tuple[str, int]]:
            if node.durable is not None:
                assert node.live is not None
                undone = set(node.live.items()) ^ set(node.durable.items())
                report["entries_undone"] += len({name for name, _ in undone})
                return dict(node.durable)
            assert where is not None, f"untouched folder {node.nid} without a path"
            out: dict[str, Node | tuple[str, int]] = {}
            for name in os.listdir(where):
                p = os.path.join(where, name)
                st = os.lstat(p)
                out[name] = self.by_ino.get(st.st_ino) or (p, st.st_mode)
            return out

        def build(dst: str, node: Node, where: str | None, stack: set[int]) -> None:
            for name, child in sorted(entries(node, where).items()):
                target = os.path.join(dst, name)
                if isinstance(child, tuple):  # never looked at since mount: as it is
                    path, mode = child
                    if stat.S_ISDIR(mode):
                        # Not copied whole: a file below it may hold unsynced writes.
                        os.mkdir(target)
                        build(target, Node(-1, "d", -1), path, stack)
                    elif stat.S_ISLNK(mode):
                        os.symlink(os.readlink(path), target)
                    else:
                        os.link(path, target)
                    report["files_kept"] += 1
                elif child.kind == "d":
                    if child.nid in stack:
                        continue  # renames undone in one folder and not the other made a loop
                    os.mkdir(target)
                    build(target, child, live.get(child.ino) if child.durable is None else None,
                          stack | {child.nid})
                elif child.kind == "l":
                    os.symlink(child.target if child.target is not None else os.readlink(live[child.ino]), target)
                elif child.nid in made:
                    os.link(made[child.nid], target)
                else:
                    source = child.shadow if child.shadow is not None else live[child.ino]
                    os.link(source, target)
                    made[child.nid] = target
                    report["files_kept"] += 1

        build(new_root, self.root, self.disk if self.root.durable is None else None, {self.root.nid})
        old_root = self.disk + ".powerfs-old"
        os.rename(self.disk, old_root)
        os.rename(new_root, self.disk)
        shutil.rmtree(old_root)
        shutil.rmtree(self.shadow_dir)
        return report


def serve(disk: str, mountpoint: str) -> None:
    """The daemon: serve until unmounted, then do what stdin says ("cut" or "sync")."""
    import warnings

    from fuse import FUSE  # fusepy, over libfuse 2

    fs = PowerFS(disk)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        # One thread: the model needs no lock, and no call here blocks (locks
        # are left to the kernel: no lock operation is defined).
        # hard_remove: unlink for real, no .fuse_hidden files in the folder.
        FUSE(fs, mountpoint, foreground=True, nothreads=True, hard_remove=True, big_writes=True,
             max_write=131072, fsname="powerfs", subtype="powerfs")
    command = sys.stdin.readline().strip() or "sync"
    report: dict[str, Any] = {"command": command, "errors": fs.errors, **fs.counts}
    if command == "cut":
        lost = sum(end - start for node in fs.by_ino.values() if node.kind == "f" for start, end in node.dirty)
        report["bytes_lost"] = lost
        report.update(fs.cut())
    else:
        shutil.rmtree(fs.shadow_dir, ignore_errors=True)
    print(json.dumps(report), flush=True)


# -- the test side: start, cut, unmount ---------------------------------------------


def fuse_unavailable() -> str | None:
    """Why this machine cannot run the power-cut tests, or None when it can."""
    if not os.path.exists("/dev/fuse"):
        return "no /dev/fuse"
    try:
        import fuse  # noqa: F401
    except (ImportError, OSError) as e:  # fusepy raises OSError without libfuse
        return f"fusepy or libfuse2 missing ({e}); scripts/test.sh installs both"
    return None


def _wait_for(cond: Callable[[], bool], what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    delay = 0.005
    while not cond():
        if time.monotonic() > deadline:
            raise TimeoutError(f"gave up waiting for {what}")
        time.sleep(delay)
        delay = min(delay * 2, 0.1)


class Mount:
    """The power-cut file system over ``disk``, mounted at ``mountpoint`` by a daemon."""

    def __init__(self, disk: str, mountpoint: str) -> None:
        self.disk = os.path.abspath(disk)
        self.mountpoint = os.path.abspath(mountpoint)
        os.makedirs(self.disk, exist_ok=True)
        os.makedirs(self.mountpoint, exist_ok=True)
        self.proc: subprocess.Popen[str] | None = None
        self.reports: list[dict[str, Any]] = []

    def __enter__(self) -> Mount:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        if self.proc is not None:
            self.unmount()

    def start(self) -> Mount:
        if self.proc is not None:
            raise RuntimeError("already mounted")
        self.proc = subprocess.Popen([sys.executable, os.path.abspath(__file__), self.disk, self.mountpoint],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     text=True)
        proc = self.proc

        def mounted() -> bool:
            if proc.poll() is not None:
                raise RuntimeError(f"the power-cut file system did not mount: {proc.stderr.read()}")  # type: ignore[union-attr]
            return os.path.ismount(self.mountpoint)

        _wait_for(mounted, f"{self.mountpoint} to be mounted")
        return self

    def path(self, *parts: str) -> str:
        return os.path.join(self.mountpoint, *parts)

    def cut(self) -> dict[str, Any]:
        """Power cut: everything not fsynced is gone. Mount again with ``start``."""
        return self._stop("cut")

    def unmount(self) -> dict[str, Any]:
        """Clean shutdown: everything stays."""
        return self._stop("sync")

    def _stop(self, command: str) -> dict[str, Any]:
        proc = self.proc
        if proc is None:
            raise RuntimeError("not mounted")
        assert proc.stdin is not None and proc.stdout is not None and proc.stderr is not None
        proc.stdin.write(command + "\n")
        proc.stdin.flush()

        # Busy while a killed writer's files are still being closed by the kernel.
        def unmounted() -> bool:
            return subprocess.run(["umount", self.mountpoint], capture_output=True).returncode == 0 \
                or not os.path.ismount(self.mountpoint)

        try:
            _wait_for(unmounted, f"{self.mountpoint} to unmount (is a file on it still open?)")
        except TimeoutError:
            subprocess.run(["umount", "-l", self.mountpoint], capture_output=True)
            proc.kill()
            proc.communicate()
            self.proc = None
            raise
        out, err = proc.communicate(timeout=300)
        self.proc = None
        lines = out.strip().splitlines()
        if proc.returncode != 0 or not lines:
            raise RuntimeError(f"the power-cut file system failed ({proc.returncode}): {err[-3000:]}")
        report: dict[str, Any] = json.loads(lines[-1])
        if report["errors"]:
            raise RuntimeError(f"the power-cut model failed: {report['errors'][:5]}")
        self.reports.append(report)
        return report


def walk(root: str) -> Iterator[str]:
    """Every path under ``root``, relative, sorted (for tests comparing trees)."""
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in sorted(dirnames + filenames):
            yield os.path.relpath(os.path.join(dirpath, name), root)


if __name__ == "__main__":
    serve(sys.argv[1], sys.argv[2])
