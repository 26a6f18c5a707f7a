"""Operations over a whole store: select, remove, summarise as a tree, migrate.

These are what ``ai2-kit tool checkpoint ...`` runs, and they are plain
library functions so that scripts can call them too::

    from ai2_kit.core.checkpoint import open_store
    from ai2_kit.core.checkpoint._ops import remove

    with open_store("./checkpoint.db") as store:
        gone = remove(store, "iters-003")      # redo from iteration 3 on

None of them unpickles a stored value of the project's own stores: they work
on the metadata records only (``migrate`` is the exception: converting a
reference file means reading its values).

Patterns follow ``key_matcher``: without ``* ? [`` a pattern names a key and
everything below it (``iters-000/deepmd`` matches ``iters-000/deepmd/red``
but not ``iters-000/deepmd-old``); with them it is a glob over whole keys,
except that a pattern that is exactly an existing key names that key alone
(``iter[0]``, as ``ls`` printed it, is that key, not a glob matching
``iter0``). ``pattern_rule`` says which rule a pattern takes.
"""

from __future__ import annotations

import os
import re
import shutil
from dataclasses import dataclass, field
from typing import Any, Iterable, Iterator, Sequence, Union

from ._display import MAX_TIME, count, number
from ._errors import CheckpointError, CorruptEntryError, InvalidKeyError, ReadOnlyStoreError, StoreOpenError
from ._keys import is_glob, key_matcher
from ._maintenance import Progress, no_progress
from ._report import stale_by, stale_judgements
from .stores import Store, is_postgres_url, migrate_legacy_file, open_store
from .stores._fs import store_path
from .stores._legacy import backup_path, load_legacy_file

__all__ = [
    "Exclude",
    "open_existing",
    "iter_select",
    "select",
    "remove",
    "created_since",
    "stale_now",
    "iter_stale",
    "from_key_on",
    "key_order",
    "TreeNode",
    "tree",
    "MigrationReport",
    "migrate",
    "pattern_rule",
    "describe_rule",
    "entry_meta",
]

#: One glob/prefix pattern, or several, naming keys to leave out.
Exclude = Union[str, Sequence[str], None]


def open_existing(location: Any, *, readonly: bool = False, allow_newer: bool = True) -> Store:
    """Open a store that must already exist; never creates one.

    ``open_store`` creates a new store at a path that does not exist yet,
    which is right for a workflow and wrong for a tool: a typo in
    ``ls ./chekpoint.db`` must say so, not leave an empty database behind.

    Parameters:
        location: a path or a ``postgresql://`` URL.
        readonly: open for reading only.
        allow_newer: with False, a store written by a newer version of the
            library raises ``NewerFormatError`` instead of opening read-only.

    Raises:
        StoreOpenError: the location is missing or cannot be read.
        NotACheckpointStoreError: something is there, but not a store.
        NewerFormatError: (only with ``allow_newer=False``).
    """
    if is_postgres_url(location):
        store = open_store(location, readonly=readonly)
        return _refuse_newer(store) if not allow_newer else store
    if not isinstance(location, (str, os.PathLike)):
        raise StoreOpenError(repr(location), "a store location must be a path or a postgresql:// URL")
    path = store_path(location)
    if not os.path.exists(path):
        raise StoreOpenError(path, "no such file or directory", "Check the path; nothing was created")
    if os.path.isdir(path) and not os.access(path, os.R_OK | os.X_OK):
        # os.walk skips unreadable folders silently; an empty listing would lie.
        raise StoreOpenError(path, "permission denied", "Check the directory's permissions")
    store = open_store(path, readonly=readonly)
    return _refuse_newer(store) if not allow_newer else store


def _refuse_newer(store: Store) -> Store:
    err = store.newer_format
    if err is not None:
        store.close()
        raise err
    return store


def _exclude_matcher(exclude: Exclude) -> Any:
    if exclude is None:
        return None
    patterns = [exclude] if isinstance(exclude, str) else list(exclude)
    matchers = [key_matcher(p) for p in patterns if p]
    if not matchers:
        return None
    return lambda key: any(m(key) for m in matchers)


def entry_meta(store: Store, key: str) -> dict[str, Any] | None:
    """The metadata record of ``key``, or None; a damaged record is ``{'key', 'damaged'}``.

    Never raises for a damaged record (``show`` prints it as damaged);
    raises InvalidKeyError for a string that cannot be a key.
    """
    try:
        return store.get_meta(key)
    except CorruptEntryError as e:
        return {"key": key, "damaged": e.reason}


def pattern_rule(store: Store, pattern: str | None) -> str:
    """Which rule ``pattern`` selects by in ``store``: ``"all"``, ``"exact key"``, ``"prefix"`` or ``"glob"``.

    A pattern with glob characters that is also exactly an existing key is
    that key: keys are printed as they are, so one copied from ``ls`` must
    name that entry and nothing else.
    """
    if not pattern:
        return "all"
    if not is_glob(pattern):
        return "prefix"
    try:
        return "exact key" if entry_meta(store, pattern) is not None else "glob"
    except InvalidKeyError:
        return "glob"


def describe_rule(rule: str, pattern: str | None) -> str:
    """One line saying how ``pattern`` was read (for ``rm --dry-run``)."""
    if rule == "exact key":
        return f"pattern {pattern!r} is an existing key: it names that entry alone (no glob applied)"
    if rule == "glob":
        return f"pattern {pattern!r} is a glob over whole keys ('*' also crosses '/')"
    if rule == "prefix":
        return f"pattern {pattern!r} names that key and every key below it"
    return "no pattern: every entry"


def iter_select(
    store: Store, pattern: str | None = None, exclude: Exclude = None
) -> Iterator[dict[str, Any]]:
    """Metadata records of the entries matching ``pattern`` and no ``exclude``, sorted by key.

    A generator: records come as the store yields them, so a listing of a
    large store starts at once and holds one record at a time.

    Parameters:
        store: any open store.
        pattern: a key prefix or a glob (see the module docstring); None or
            ``""`` selects everything. A pattern that is exactly an existing
            key selects that key alone (``pattern_rule``).
        exclude: one pattern or several, with the same rules, to leave out.
    """
    skip = _exclude_matcher(exclude)
    if pattern and pattern_rule(store, pattern) == "exact key":
        meta = entry_meta(store, pattern)
        if meta is not None and (skip is None or not skip(meta["key"])):
            yield meta
        return
    for meta in store.iter_meta(pattern or None):
        if skip is None or not skip(meta["key"]):
            yield meta


def select(store: Store, pattern: str | None = None, exclude: Exclude = None) -> list[dict[str, Any]]:
    """Like ``iter_select``, as a list."""
    return list(iter_select(store, pattern, exclude))


def created_since(store: Store, key: str, pattern: str | None = None, exclude: Exclude = None) -> list[str]:
    """``key`` and every entry created at the same time or after it, oldest first.

    What "redo everything from this step on" removes. Entries without a
    created time (none written by this library) are left out. Raises
    ``CheckpointError`` when ``key`` is not in the store.
    """
    meta = entry_meta(store, key)
    if meta is None:
        raise CheckpointError(f"no entry {key!r} in {store.location}; 'ls' shows the keys")
    since = number(meta.get("created"), high=MAX_TIME)
    if "damaged" in meta or since is None:
        # Guessing a time would remove too much (or too little).
        raise CheckpointError(
            f"cannot tell when {key!r} in {store.location} was created: its metadata is "
            f"{'damaged (' + str(meta['damaged']) + ')' if 'damaged' in meta else 'without a created time'}. "
            "Remove it by name, or give --from another key"
        )
    # A created time that is not a number (a crafted or damaged record) counts as none.
    later = [m for m in iter_select(store, pattern, exclude)
             if m["key"] == key or (number(m.get("created"), high=MAX_TIME) or -1.0) >= since]
    later.sort(key=lambda m: (number(m.get("created"), high=MAX_TIME) or 0.0, m["key"]))
    return [m["key"] for m in later]


def iter_stale(store: Store, pattern: str | None = None, exclude: Exclude = None) -> Iterator[dict[str, Any]]:
    """The metadata of the entries stale now (see ``stale_now``), in key order, streamed."""
    judged = stale_judgements(store.iter_runs())
    if not judged:
        return
    for meta in iter_select(store, pattern, exclude):
        if stale_by(judged, meta) is not None:
            yield meta


def stale_now(store: Store, pattern: str | None = None, exclude: Exclude = None) -> dict[str, str]:
    """The entries stale now: key -> id of the run that judged it, in key order.

    Stale now: a run judged the entry stale (its arguments, code or, with
    ``environment="stale"``, environment differed) after it was saved, and it
    was neither replaced nor removed since. Runs' own ``stale_keys`` are their
    history and keep every judgement.
    """
    judged = stale_judgements(store.iter_runs())
    out: dict[str, str] = {}
    for meta in iter_select(store, pattern, exclude) if judged else ():
        rid = stale_by(judged, meta)
        if rid is not None:
            out[meta["key"]] = rid
    return out


_DIGITS = re.compile(r"([0-9]+)")


def key_order(key: str) -> tuple[list[list[Any]], str]:
    """The sort key of ``rm --from KEY --by key``: part by part, runs of digits compared as numbers.

    So ``iters-9`` comes before ``iters-10``, and a key part before every key
    below it (``iters-001`` before ``iters-001/label``). ``re.split`` with a
    group alternates text and digits, so every position compares like with
    like; the key itself breaks ties (``it-09`` and ``it-9``).
    """
    parts = [[int(c) if i % 2 else c for i, c in enumerate(_DIGITS.split(part))] for part in key.split("/")]
    return parts, key


def from_key_on(store: Store, key: str, pattern: str | None = None, exclude: Exclude = None) -> list[str]:
    """Every entry whose key comes at or after ``key`` in ``key_order``, in that order.

    What "redo everything from this step on" removes when the keys carry the
    workflow's order (``iters-003/...``), whenever each entry was saved: an
    iteration redone after a later one keeps its place. ``key`` need not be an
    entry (``iters-003`` starts at that iteration's first key).
    """
    start = key_order(key)
    later = [m["key"] for m in iter_select(store, pattern, exclude) if key_order(m["key"]) >= start]
    return sorted(later, key=key_order)


def remove(store: Store, pattern: str, exclude: Exclude = None) -> list[str]:
    """Remove the entries matching ``pattern`` (and no ``exclude``); return their keys.

    The keys returned are those that matched and are gone afterwards. An
    empty ``pattern`` is refused: removing everything is spelled ``"*"``.
    Values are never unpickled. A reference 2023 file is first converted to
    the SQLite format, with a backup (see ``LegacyFileStore``).

    >>> import os, tempfile
    >>> with open_store(os.path.join(tempfile.mkdtemp(), "c.db")) as s:
    ...     for k in ("iters-000/deepmd/red", "iters-000/deepmd-old", "iters-001/deepmd"):
    ...         _ = s.put(k, 1)
    ...     remove(s, "iters-000/deepmd"), s.keys()
    (['iters-000/deepmd/red'], ['iters-000/deepmd-old', 'iters-001/deepmd'])

    Raises:
        ValueError: ``pattern`` is empty.
        ReadOnlyStoreError: the store cannot be written.
    """
    if not pattern:
        raise ValueError("remove() needs a pattern; use '*' to remove every entry")
    keys = [m["key"] for m in iter_select(store, pattern, exclude)]
    if keys:
        store.delete_many(keys)
    return keys


# -- tree ---------------------------------------------------------------------
@dataclass
class TreeNode:
    """One level of keys grouped by ``/``: totals of everything at and below it.

    ``entry`` is True when the node's own path is also a key (a key may
    have keys below it: ``a/b`` and ``a/b/c``).
    """

    name: str
    count: int = 0
    size: int = 0
    entry: bool = False
    children: dict[str, TreeNode] = field(default_factory=dict)

    def add(self, parts: Sequence[str], size: int) -> None:
        node = self
        node.count += 1
        node.size += size
        for part in parts:
            child = node.children.get(part)
            if child is None:
                child = node.children[part] = TreeNode(part)
            child.count += 1
            child.size += size
            node = child
        node.entry = True

    def walk(self, depth: int | None = None) -> Iterator[tuple[int, TreeNode]]:
        """(level, node) below this node, depth first, children sorted by name."""
        stack: list[tuple[int, TreeNode]] = [(1, c) for c in sorted(self.children.values(),
                                                                   key=lambda n: n.name, reverse=True)]
        while stack:
            level, node = stack.pop()
            yield level, node
            if depth is None or level < depth:
                stack.extend((level + 1, c) for c in sorted(node.children.values(),
                                                            key=lambda n: n.name, reverse=True))


def tree(metas: Iterable[dict[str, Any]], name: str = "") -> TreeNode:
    """Group metadata records by ``/`` into a ``TreeNode`` with counts and sizes per level.

    >>> t = tree([{"key": "a/x", "size": 10}, {"key": "a/y", "size": 5}, {"key": "b", "size": 1}])
    >>> [(lvl, n.name, n.count, n.size) for lvl, n in t.walk()]
    [(1, 'a', 2, 15), (2, 'x', 1, 10), (2, 'y', 1, 5), (1, 'b', 1, 1)]
    """
    root = TreeNode(name)
    for meta in metas:
        size = meta.get("size")
        root.add(meta["key"].split("/"), count(size) or 0)
    return root


# -- migration ------------------------------------------------------------------
@dataclass
class MigrationReport:
    """What ``migrate`` did.

    ``source_format`` is ``"reference-file"`` (2023 single pickle file),
    ``"reference-dir"`` (2024 directory of per-key pickles) or ``"current"``
    (nothing to convert). ``migrated`` counts the entries converted and
    verified, ``already`` those that were in the project's format before,
    ``failed`` lists ``(key, reason)`` of entries left as they were.
    """

    location: str
    source_format: str
    store_kind: str
    backup: str | None = None
    migrated: int = 0
    already: int = 0
    failed: list[tuple[str, str]] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.failed


def _is_reference_dir_entry(meta: dict[str, Any]) -> bool:
    # A reference per-key file is listed with the few fields the directory
    # store can learn without unpickling it; our own entries always carry a
    # checksum.
    return meta.get("legacy") == "reference-dir" and "crc32" not in meta


def migrate(location: str | os.PathLike[str], progress: Progress = no_progress) -> MigrationReport:
    """Convert a store written by the reference design to the project's format.

    - a reference 2023 file becomes an SQLite store in place, through
      ``migrate_legacy_file`` (backup ``PATH.legacy-<time>.bak`` first);
    - in a reference 2024 directory every per-key pickle file is rewritten
      as the directory store's own entry, after the whole directory was
      copied to ``DIR.legacy-<time>.bak``;
    - a store already in the project's format is left alone.

    Every converted entry is read back (checksum verified) and its key set
    and metadata compared with the original; entries that cannot be read
    are left untouched and listed in ``failed``.

    Raises:
        StoreOpenError, NotACheckpointStoreError: the location is missing or
            not a store.
        ReadOnlyStoreError: the store cannot be written.
    """
    if is_postgres_url(location):
        store = open_existing(location, readonly=True, allow_newer=False)
        with store:
            return MigrationReport(str(store.location), "current", store.kind, already=len(store))
    path = store_path(location)
    if os.path.isdir(path):
        return _migrate_dir(path, progress)
    store = open_existing(path, allow_newer=False)
    kind = store.kind
    if not store.reference_format:
        with store:
            return MigrationReport(path, "current", kind, already=len(store))
    readonly, reason = store.readonly, store.readonly_reason
    store.close()
    if readonly or not os.access(os.path.dirname(path), os.W_OK) or not os.access(path, os.W_OK):
        why = reason if readonly else "no write permission on the file or its folder"
        raise ReadOnlyStoreError(path, why)
    return _migrate_file(path, progress)


def _migrate_file(path: str, progress: Progress) -> MigrationReport:
    new, backup, count = migrate_legacy_file(path)
    report = MigrationReport(path, "reference-file", new.kind, backup=backup)
    with new:
        if backup is None:  # another process converted it just before us
            report.source_format, report.already = "current", count
            return report
        original = load_legacy_file(backup)
        for key in progress(sorted(original), len(original), "check"):
            problem = _check_entry(new, key, original[key])
            if problem:
                report.failed.append((key, problem))
            else:
                report.migrated += 1
        extra = set(new.keys()) - set(original)
        report.failed.extend((k, "present after migration but not in the original") for k in sorted(extra))
    return report


def _check_entry(store: Store, key: str, record: Any) -> str:
    """'' when ``key`` reads back from ``store`` with the reference record's metadata."""
    try:
        hit = store.lookup(key)
    except CheckpointError as e:
        return str(e)
    if hit is None:
        return "missing after migration"
    if isinstance(record, dict):
        info = record.get("info") or {}
        want = {
            "fn_name": info.get("fn_name") if isinstance(info, dict) else None,
            "call_site": info.get("call_site") if isinstance(info, dict) else None,
            "is_awaitable": bool(record.get("is_awaitable", False)),
        }
        for name, value in want.items():
            if hit.meta.get(name) != value:
                return f"metadata {name} is {hit.meta.get(name)!r}, expected {value!r}"
    return ""


def _migrate_dir(path: str, progress: Progress) -> MigrationReport:
    store = open_existing(path, allow_newer=False)
    with store:
        if store.prefer != "dir":  # pragma: no cover - open_store picks it for dirs
            raise StoreOpenError(path, f"expected a directory store, found {store.kind}")
        report = MigrationReport(path, "reference-dir", store.kind)
        legacy: list[str] = []
        for meta in store.iter_meta():
            if _is_reference_dir_entry(meta):
                legacy.append(meta["key"])
            else:
                report.already += 1
        if not legacy:
            report.source_format = "current"
            return report
        if store.readonly:
            raise ReadOnlyStoreError(path, store.readonly_reason)
        backup = backup_path(path)
        # The whole directory, before anything changes: a failure halfway
        # leaves every original file either in place or in the backup.
        shutil.copytree(path, backup, symlinks=True)
        report.backup = backup
        for key in progress(legacy, len(legacy), "migrate"):
            try:
                hit = store.lookup(key)
            except CheckpointError as e:
                report.failed.append((key, str(e)))
                continue
            if hit is None:  # removed meanwhile; the backup still has it
                report.failed.append((key, "disappeared during migration (kept in the backup)"))
                continue
            fields = {name: hit.meta.get(name) for name in ("fn_name", "call_site", "is_awaitable")}
            # 'migrated_from', not 'legacy': Store.verify skips entries marked
            # legacy, and these are now checksummed entries of our own.
            store.put(key, hit.value, migrated_from="reference-dir", created=hit.meta.get("created"),
                      **fields)
            got = store.get_meta(key)
            if got is None or "crc32" not in got:
                report.failed.append((key, "not found in the new format after writing it"))
                continue
            try:
                again = store.lookup(key)
            except CheckpointError as e:
                report.failed.append((key, str(e)))
                continue
            if again is None or any(again.meta.get(k) != v for k, v in fields.items()):
                report.failed.append((key, "the rewritten entry does not match the original"))
                continue
            report.migrated += 1
    return report
