"""Signing: with a key, an entry whose MAC is missing or wrong is refused before unpickling."""

from __future__ import annotations

import logging
import sqlite3
import struct
from pathlib import Path
from typing import Any, Callable

import cloudpickle
import pytest

from ai2_kit.core.checkpoint import Checkpointer, SignatureMismatchError, StoreOpenError, set_checkpoint_dir
from ai2_kit.core.checkpoint._codec import encode, meta_from_json, meta_to_json
from ai2_kit.core.checkpoint.stores import DirectoryStore, SQLiteStore, Store, open_store


class Payload:
    """Unpickling this creates a marker file: proof that a pickle ran."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> Any:
        return (Path.touch, (self.marker,))


def test_signed_round_trip_and_wrong_key(store_factory: Callable[..., Store], tmp_path: Path) -> None:
    writer = store_factory()
    writer.set_signing_key("s3cret")
    meta = writer.put("k", {"v": [1, 2]})
    assert isinstance(meta["mac"], str) and len(meta["mac"]) == 64
    hit = writer.lookup("k")
    assert hit is not None and hit.value == {"v": [1, 2]}
    marker = tmp_path / "ran"
    writer.put("evil", Payload(marker))
    assert not marker.exists()  # pickling does not run it
    other = store_factory()
    other.set_signing_key(b"another key")
    with pytest.raises(SignatureMismatchError, match="signature"):
        other.lookup("evil")
    assert not marker.exists()


def test_signer_secret_signs_and_checks_alike(store_factory: Callable[..., Store]) -> None:
    """``Signer.secret`` (what a worker's StoreSpec carries) opens the store with the same key."""
    writer = store_factory()
    writer.set_signing_key("s3cret")
    writer.put("k", [1, 2])
    assert writer.signer is not None and writer.signer.secret == b"s3cret"
    worker = store_factory()
    worker.set_signing_key(writer.signer.secret)
    hit = worker.lookup("k")
    assert hit is not None and hit.value == [1, 2]
    worker.put("w", 3)  # signed by the worker, accepted by the writer
    back = writer.lookup("w")
    assert back is not None and back.value == 3


def test_unsigned_entry_is_refused_unpickled(store_factory: Callable[..., Store], tmp_path: Path) -> None:
    marker = tmp_path / "ran"
    plain = store_factory()
    plain.put("evil", Payload(marker))
    signed = store_factory()
    signed.set_signing_key("k")
    with pytest.raises(SignatureMismatchError, match="not signed"):
        signed.lookup("evil")
    assert not marker.exists()
    assert signed.get_meta("evil") is not None  # metadata is still readable


def test_tampered_sqlite_entry_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "c.db"
    marker = tmp_path / "ran"
    with SQLiteStore(str(path)) as store:
        store.set_signing_key("k")
        store.put("step", "honest result")
    # An attacker with write access swaps in a payload and fixes the checksum.
    evil = encode(Payload(marker))
    conn = sqlite3.connect(path)
    meta = meta_from_json(conn.execute("SELECT meta FROM entries WHERE key='step'").fetchone()[0])
    meta["crc32"], meta["size"] = evil.crc, evil.size
    conn.execute("UPDATE entries SET value=?, meta=? WHERE key='step'", (evil.to_bytes(), meta_to_json(meta)))
    conn.commit()
    conn.close()
    with SQLiteStore(str(path)) as store:
        store.set_signing_key("k")
        with pytest.raises(SignatureMismatchError):
            store.lookup("step")
    assert not marker.exists()


def test_tampered_metadata_is_refused(tmp_path: Path) -> None:
    root = tmp_path / "d"
    with DirectoryStore(str(root)) as store:
        store.set_signing_key("k")
        store.put("step", 42, fn_name="train")
    path = root / "step.ckpt"
    data = path.read_bytes()
    # A careful attacker rewrites the record with its checksum fixed up.
    (n,) = struct.unpack_from("<I", data, 4)
    meta = meta_from_json(data[8 : 8 + n])
    meta["fn_name"] = "trane"
    text = meta_to_json(meta).encode()
    path.write_bytes(data[:4] + struct.pack("<I", len(text)) + text + data[8 + n :])
    with DirectoryStore(str(root)) as store:
        store.set_signing_key("k")
        with pytest.raises(SignatureMismatchError):
            store.lookup("step")


def test_reference_files_are_refused_when_signing(tmp_path: Path) -> None:
    marker = tmp_path / "ran"
    legacy = tmp_path / "old.pkl"
    legacy.write_bytes(cloudpickle.dumps({"k": {"return": Payload(marker), "is_awaitable": False, "info": {}}}))
    # The 2023 format must be unpickled whole to be read at all: with a key in
    # use, the per-key directory format is the one that can be refused unread.
    root = tmp_path / "dir-era"
    root.mkdir()
    (root / "k").write_bytes(cloudpickle.dumps({"return": Payload(marker), "is_awaitable": False, "info": {}}))
    with pytest.raises(StoreOpenError, match="not unpickled"):
        open_store(str(legacy), signing_key="k")
    with open_store(str(root), signing_key="k") as store:
        with pytest.raises(SignatureMismatchError, match="reference-format"):
            store.lookup("k")
    assert not marker.exists()


def test_checkpointer_reruns_a_forged_entry_and_signs_it(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    root = tmp_path / "d"
    marker = tmp_path / "ran"
    with DirectoryStore(str(root)) as plain:
        plain.put("step", Payload(marker))
    ckpt = set_checkpoint_dir(root, signing_key="team key")
    with caplog.at_level(logging.WARNING, logger="ai2_kit.core.checkpoint"):
        assert ckpt("step")(lambda: "recomputed")() == "recomputed"
    assert not marker.exists()
    assert any("'step'" in r.getMessage() and "not signed" in r.getMessage() for r in caplog.records)
    assert ckpt("step")(lambda: "again")() == "recomputed"  # now signed and trusted
    strict = Checkpointer(root, strict=True, signing_key="wrong key")
    with pytest.raises(SignatureMismatchError):
        strict("step")(lambda: "x")()
    strict.close()


def test_signing_key_from_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AI2_KIT_CHECKPOINT_KEY", "from-env")
    with Checkpointer(tmp_path / "c.db") as ckpt:
        ckpt("k")(lambda: 1)()
        meta = ckpt.store.get_meta("k")
        assert meta is not None and "mac" in meta
    monkeypatch.setenv("AI2_KIT_CHECKPOINT_KEY", "changed")
    with Checkpointer(tmp_path / "c.db", strict=True) as ckpt, pytest.raises(SignatureMismatchError):
        ckpt("k")(lambda: 2)()
