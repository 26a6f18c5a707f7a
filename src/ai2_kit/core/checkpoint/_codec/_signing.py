"""Signing of entries: an HMAC-SHA256 over the metadata record and the frame.

With a signing key in use, every entry written carries a MAC in its record
(``"mac"``), and every entry read is checked against it before anything is
unpickled: a value from someone without the key is never run.
"""

from __future__ import annotations

import hashlib
import hmac
from typing import Any, Protocol

from ._record import meta_to_json

__all__ = ["Signer", "Verifier", "SignatureError", "verifier_for"]


class _Framed(Protocol):
    """What a signature covers besides the record: a frame's header and parts (an ``Encoded``)."""

    @property
    def header(self) -> bytes: ...

    @property
    def parts(self) -> list[memoryview]: ...


class Verifier:
    """Accumulates an entry's bytes and checks its MAC before anything is unpickled."""

    def __init__(self, secret: bytes, meta: dict[str, Any]) -> None:
        self._mac = _mac_start(secret, meta)
        self._expected = meta.get("mac")

    def update(self, data: bytes | memoryview) -> None:
        self._mac.update(data)

    def check(self) -> None:
        if not isinstance(self._expected, str):
            raise SignatureError("the entry is not signed, and a signing key is in use")
        if not hmac.compare_digest(self._mac.hexdigest(), self._expected):
            raise SignatureError("its signature (HMAC) does not match: it was altered or signed with another key")


class SignatureError(ValueError):
    """Raised inside the codec; the store reports it as a damaged entry."""


def _mac_start(secret: bytes, meta: dict[str, Any]) -> Any:
    mac = hmac.new(secret, digestmod=hashlib.sha256)
    body = {k: v for k, v in meta.items() if k != "mac"}
    mac.update(meta_to_json(body).encode("utf-8"))
    return mac


class Signer:
    """Signs entries with a secret key, and makes verifiers for reading them."""

    def __init__(self, secret: bytes) -> None:
        if not secret:
            raise ValueError("a signing key must not be empty")
        self._secret = secret

    @property
    def secret(self) -> bytes:
        """The signing key: what another process of the same workflow needs to open this store alike.

        A worker that reopens the store (``StoreSpec.signing_key``) must sign
        and check with the same key, or its saves would be refused as unsigned
        and its hits as altered. The key goes nowhere else: no record, log or
        message holds it.
        """
        return self._secret

    def sign(self, meta: dict[str, Any], encoded: _Framed) -> str:
        mac = _mac_start(self._secret, meta)
        mac.update(encoded.header)
        for part in encoded.parts:
            mac.update(part)
        return str(mac.hexdigest())

    def verifier(self, meta: dict[str, Any]) -> Verifier:
        return Verifier(self._secret, meta)


def verifier_for(signer: Signer | None, meta: dict[str, Any]) -> Verifier | None:
    """The verifier a loader hands to the decoder: None when no signing key is in use."""
    return None if signer is None else signer.verifier(meta)
