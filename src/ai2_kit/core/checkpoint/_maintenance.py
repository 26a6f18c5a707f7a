"""Store-level maintenance: verify, salvage, and copy entries between stores."""

from __future__ import annotations

import dataclasses
import logging
import os
from typing import Any, Callable, Iterable, Iterator, Optional

from ._errors import CheckpointError, CorruptEntryError, StoreDamagedError
from ._keys import key_matcher
from .stores import Store, is_postgres_url

__all__ = ["VerifyReport", "CopyReport", "Progress", "no_progress", "verify_store", "copy_entries", "salvage",
           "same_store"]

logger = logging.getLogger("ai2_kit.core.checkpoint")

# Fields that describe the stored bytes and are recomputed by the destination.
_DERIVED = frozenset({"key", "size", "crc32", "format", "mac", "version"})


@dataclasses.dataclass
class VerifyReport:
    """What ``verify_store`` found; ``ok`` when nothing is damaged."""

    location: str
    entries: int = 0
    damaged: dict[str, str] = dataclasses.field(default_factory=dict)
    store_problems: list[str] = dataclasses.field(default_factory=list)
    orphan_files: list[str] = dataclasses.field(default_factory=list)
    #: Why entries cannot be read here although their values may exist elsewhere
    #: (``Store.missing_side_files``: a copy left their folder behind), or None.
    missing_side_files: Optional[str] = None
    #: The damaged keys whose side-file folder is missing (restore it; do not remove them).
    unreadable_here: list[str] = dataclasses.field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.damaged and not self.store_problems and self.missing_side_files is None


@dataclasses.dataclass
class CopyReport:
    """What ``copy_entries``/``salvage`` did: every key is in exactly one list."""

    copied: list[str] = dataclasses.field(default_factory=list)
    failed: dict[str, str] = dataclasses.field(default_factory=dict)
    #: Keys left alone because the destination had them and ``overwrite=False``
    #: asked for that: a request fulfilled, not a failure.
    skipped: list[str] = dataclasses.field(default_factory=list)


def _keys(store: Store, pattern: str | None) -> Iterator[str]:
    """Every key, even from an SQLite file whose index pages are damaged."""
    seen: set[str] = set()
    try:
        for meta in store.iter_meta(pattern):
            seen.add(meta["key"])
            yield meta["key"]
        return
    except StoreDamagedError as e:
        probe = store.probe_keys()
        if probe is None:
            raise
        logger.warning("%s; probing rows one by one", e)
    for key in probe:
        if key not in seen:
            seen.add(key)
            yield key


#: Wraps an iterable of keys to show progress: ``progress(keys, total, label)``
#: yields the same keys (the CLI passes a tqdm bar on a terminal).
Progress = Callable[[Iterable[str], Optional[int], str], Iterable[str]]


def no_progress(items: Iterable[str], total: Optional[int], label: str) -> Iterable[str]:
    return items


def _total(store: Store) -> Optional[int]:
    """The entry count where it is one query; None where it would cost a second walk."""
    return len(store) if store.counts_cheaply else None


def verify_store(store: Store, progress: Progress = no_progress) -> VerifyReport:
    """Check every entry's bytes (checksums, MACs) and the store's own structure.

    Never unpickles a value. For SQLite it also runs ``PRAGMA integrity_check``
    and lists side files no entry refers to (left by a writer killed between
    writing a large value and committing it; harmless, and removable).
    """
    report = VerifyReport(store.location)
    report.store_problems.extend(store.structure_problems())
    report.orphan_files.extend(store.orphan_files())
    report.missing_side_files = store.missing_side_files()
    try:
        for key in progress(_keys(store, None), _total(store), "verify"):
            report.entries += 1
            reason = store.verify(key)
            if reason is not None:
                report.damaged[key] = reason
                if report.missing_side_files is not None and "side-file folder" in reason:
                    report.unreadable_here.append(key)
    except StoreDamagedError as e:
        report.store_problems.append(e.reason)
    return report


def copy_entries(
    src: Store, dst: Store, pattern: str | None = None, *, overwrite: bool = True, exclude: Any = None,
    progress: Progress = no_progress,
) -> CopyReport:
    """Copy entries (all, or those matching ``pattern``) from ``src`` to ``dst``.

    Each value is read (checksum and MAC checked), written, and read back
    from ``dst`` before it counts as copied. Metadata (function, call site,
    created time, duration, fingerprints) is kept. An entry that cannot be
    read or written is listed in ``failed`` with the reason; the rest go on.
    """
    if same_store(src, dst):
        # Every entry would be rewritten over itself (and, before side files
        # were found from the real path, left damaged): refused, untouched.
        raise CheckpointError(f"copy needs a destination other than the store itself: {dst.location} is "
                              f"{src.location}. Pick another path")
    report = CopyReport()
    skip = [key_matcher(p) for p in ([exclude] if isinstance(exclude, str) else exclude or [])]
    # One entry's failure, reported with its key; the copy goes on.
    failures: tuple[type[BaseException], ...] = (CheckpointError, *src.storage_errors, *dst.storage_errors)
    for key in progress(_keys(src, pattern), None if pattern else _total(src), "copy"):
        if any(m(key) for m in skip):
            continue
        try:
            if not overwrite and dst.get_meta(key) is not None:
                report.skipped.append(key)
                continue
            hit = src.lookup(key)
            if hit is None:
                report.failed[key] = "removed while copying"
                continue
            fields = {k: v for k, v in hit.meta.items() if k not in _DERIVED and k != "damaged"}
            written = dst.put(key, hit.value, **fields)
            if dst.verify(key) is not None or dst.get_meta(key) != written:
                raise CorruptEntryError(dst.location, key, "the copy does not read back")
            report.copied.append(key)
        except failures as e:
            report.failed[key] = str(e)
    return report


def same_store(a: Store, b: Store) -> bool:
    """Whether two open stores are one, however their locations are spelled.

    Relative and absolute paths, symbolic links to the file or to a folder on
    the way, and hard links all name the same file (``os.path.samefile``).
    """
    la, lb = str(a.location), str(b.location)
    if la == lb:
        return True
    if is_postgres_url(la) or is_postgres_url(lb):
        return False
    try:
        return os.path.samefile(la, lb)
    except FileNotFoundError:  # one of them is not there (yet): not the same
        return False


def salvage(src: Store, dst: Store, progress: Progress = no_progress) -> CopyReport:
    """Copy every readable entry of a damaged store into a new one; ``src`` is untouched."""
    if same_store(src, dst):
        raise CheckpointError("salvage needs a new destination, not the damaged store itself")
    return copy_entries(src, dst, progress=progress)


