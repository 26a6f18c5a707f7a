"""The store's folder: creating it, its marker file, and judging, without unpickling anything,
whether a folder found without a marker is a store (ours, the reference's, or new) or someone else's."""

from __future__ import annotations

import json
import os
from typing import Optional

from ..._errors import NewerFormatError, NotACheckpointStoreError, StoreOpenError
from .._base import FORMAT_VERSION, library_version
from .._fs import DurabilityError, fix_for, fsync_dir, gone_reason, make_dirs, open_regular, replace_file
from ._names import CLAIMS, MARKER, SUFFIX, is_our_entry_file, is_our_temp, is_reference_entry

__all__ = ["Folder"]


class Folder:
    """The folder's part of ``DirectoryStore``: creation, marker, classification, removal seen."""

    root: str
    layout: str
    readonly: bool
    readonly_reason: str
    newer_format: Optional[NewerFormatError]
    _marker_ok: bool
    _no_reference: bool
    _opened_id: Optional[tuple[int, int]]

    def _create_root(self) -> None:
        try:
            created = make_dirs(self.root, "")
            if self.root in created:
                self.layout = "new"  # made empty here: the marker says no reference file can be in it
            self._ensure_marker()
            # The new folders' names live in their parents: durable only once those are fsynced.
            for folder in created:
                fsync_dir(os.path.dirname(folder), outside=True)
        except OSError as e:
            raise StoreOpenError(self.root, f"cannot create the directory ({e})"
                                 if isinstance(e, DurabilityError) else
                                 f"cannot create the directory ({e.strerror or e})", fix_for(e)) from e
        self.layout = "current"

    def _read_marker(self, marker: str) -> None:
        try:
            with open_regular(marker) as f:
                info = json.loads(f.read(1 << 16).decode("utf-8"))
            found = int(info["format"])
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise NotACheckpointStoreError(
                self.root, f"its marker file {MARKER} is unreadable ({e})",
                "Restore or remove the marker file",
            ) from e
        if found > FORMAT_VERSION:
            err = NewerFormatError(self.root, found, FORMAT_VERSION, str(info.get("created_by", "")))
            self.readonly, self.readonly_reason, self.newer_format = True, str(err), err
        # Only a marker that says so spares the look-ups of reference per-key
        # files; markers written before the field existed keep them.
        self._no_reference = info.get("reference_files") is False
        self._marker_ok = True

    def _classify(self, adopt: bool) -> None:
        """Decide, without unpickling anything, whether an unmarked folder is a store.

        Every file is looked at. A folder with no file at all is a new, empty
        store. One holding our entries is a store only when nothing else is
        there: a marker of another store below it (a store lives below), or a
        file that is not ours beside our entries, makes it somebody's folder,
        refused untouched; taken as a store, ``rm "*"`` would remove the
        entries of every store below. A folder of the reference's 2024
        per-key files is a store with or without other files beside them (the
        reference wrote no marker, and users kept their files there); those
        stay invisible to the store.
        """
        foreign: str | None = None
        other_store: str | None = None
        ours = reference = False
        problem: list[OSError] = []
        for dirpath, dirnames, filenames in os.walk(self.root, onerror=problem.append):
            dirnames[:] = sorted(d for d in dirnames if not (dirpath == self.root and d == CLAIMS))
            for name in sorted(filenames):
                if is_our_temp(name):
                    continue
                path = os.path.join(dirpath, name)
                if name == MARKER:
                    if dirpath == self.root:
                        # Written since ``__init__`` looked for it (another process creating
                        # this store at the same time): judged as the marker, not a stranger.
                        self._read_marker(path)
                        return
                    other_store = other_store or path
                elif name.endswith(SUFFIX) and is_our_entry_file(path):
                    ours = True
                elif not name.startswith(".") and is_reference_entry(path):
                    reference = True
                else:
                    foreign = foreign or path
            if other_store is not None and not adopt:
                break
        if foreign is None and problem:
            foreign = problem[0].filename or self.root
        if adopt:
            self.layout = "current" if ours or not reference else "reference-dir"
            return
        if other_store is not None:
            reason = (f"another checkpoint store lives below it ({os.path.relpath(other_store, self.root)!r})"
                      f" and it has no marker file {MARKER} of its own")
        elif foreign is not None and (ours or not reference):
            reason = (f"the folder holds files that no checkpoint store wrote (such as "
                      f"{os.path.relpath(foreign, self.root)!r}) and no marker file {MARKER}")
        else:
            self.layout = "current" if ours else "reference-dir" if reference else "new"
            return
        raise NotACheckpointStoreError(
            self.root, reason,
            "Pick a new or empty folder for the checkpoint store (or the store's own folder);"
            " nothing in this one was changed",
        )

    def _ensure_marker(self) -> None:
        if self._marker_ok:
            return
        marker = os.path.join(self.root, MARKER)
        if not os.path.lexists(marker):
            record: dict[str, object] = {"format": FORMAT_VERSION, "created_by": library_version()}
            if self.layout == "new":
                # Made by this library in an empty folder: the reference never
                # wrote here, and the store never writes its per-key files.
                record["reference_files"] = False
            replace_file(marker, json.dumps(record).encode("utf-8"), durable=True)
            fsync_dir(self.root)
            self._no_reference = self.layout == "new"
        self._marker_ok = True
        self.layout = "current"

    def _gone(self) -> str | None:
        reason = gone_reason(self.root, self._opened_id)
        if reason is None and self._marker_ok and not os.path.lexists(os.path.join(self.root, MARKER)):
            reason = f"its marker file {MARKER} was removed while this process used it; nothing is written there"
        return reason
