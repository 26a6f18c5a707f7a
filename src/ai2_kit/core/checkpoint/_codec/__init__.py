"""Values to bytes and back, independent of where the bytes are stored.

One job per module, imported in one direction (each only from those above it):

- ``_record``: the JSON metadata record, with a checksum of itself; a
  save's usual record written by a template.
- ``_signing``: ``Signer`` and ``Verifier``, an HMAC-SHA256 over the record
  and the frame, checked before anything is unpickled.
- ``_checksum``: the frame's CRC-32 (zlib-ng's for big buffers when
  installed, the same values) and the thread that sums a big frame's slices.
- ``_fileio``: ``write_all`` against short writes, write-out hints for big
  frames, exact reads into each part's final buffer.
- ``_frame``: pickling (cloudpickle at protocol 5, buffers out of band;
  the standard pickler for plain data), the frame layout, and decoding
  that checks every byte before unpickling.

The stores import the names below from this package, never from a module
inside it.
"""

from __future__ import annotations

from ._checksum import _CHUNK, _THREAD_MIN, _crc_update, _fast_crc32
from ._fileio import write_all
from ._frame import (
    _PLAIN_MAX,
    CHECKED,
    FRAME_MAGIC,
    Encoded,
    _is_plain,
    checking_only,
    decode_bytes,
    encode,
    read_frame,
    settle_crc,
)
from ._record import _JSON, _save_record, meta_from_json, meta_to_json
from ._signing import SignatureError, Signer, Verifier, verifier_for

__all__ = [
    "Encoded",
    "encode",
    "settle_crc",
    "decode_bytes",
    "read_frame",
    "meta_to_json",
    "meta_from_json",
    "FRAME_MAGIC",
    "write_all",
    "Signer",
    "Verifier",
    "SignatureError",
    "checking_only",
    "verifier_for",
    "CHECKED",
    # Private: imported by the SQLite store (its own frame checksum) and by tests.
    "_fast_crc32",
    "_crc_update",
    "_CHUNK",
    "_THREAD_MIN",
    "_PLAIN_MAX",
    "_is_plain",
    "_JSON",
    "_save_record",
]
