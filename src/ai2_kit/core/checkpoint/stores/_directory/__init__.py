"""The directory store, by job: ``_names`` (key to file name and back, recognising files),
``_folder`` (creating the folder, its marker, judging an unmarked one), ``_claims`` (leases
and run records), ``_store`` (``DirectoryStore``: entry files, listing, leftovers).
Import direction: ``_store`` -> ``_claims`` -> ``_folder`` -> ``_names``."""

from __future__ import annotations

from ._names import ENTRY_MAGIC, MARKER, is_pickle_head, is_reference_entry, legacy_meta, unwrap_legacy
from ._store import DirectoryStore

__all__ = ["DirectoryStore", "ENTRY_MAGIC", "MARKER", "legacy_meta", "unwrap_legacy", "is_pickle_head",
           "is_reference_entry"]
