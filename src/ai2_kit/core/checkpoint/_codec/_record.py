"""The JSON metadata record of an entry: written with a checksum of itself, checked when read.

A record is JSON with sorted keys, its own CRC-32 as the first field
(``{"_crc":"...",...}``), so that a damaged field is reported as damage
rather than read as a different value. A save's usual record (its fields
and their types known in advance) is written by a template, with the
fingerprint's per-step parts encoded once; every other record takes the
general encoder, and both give the same text.
"""

from __future__ import annotations

import json
import operator
import zlib
from typing import Any, Callable, Optional

__all__ = ["meta_to_json", "meta_from_json"]

_META_HEAD = '{"_crc":"'
# One encoder for every record: json.dumps with options builds a new one per call.
_JSON = json.JSONEncoder(sort_keys=True, separators=(",", ":"), ensure_ascii=False)


# -- a save's usual record, written without the general encoder ------------------
# What the checkpointer saves for a step (the store's fields, the wrapper's and
# a fingerprint record): in sorted order, with the type each must have. The
# general encoder sorts and inspects every key and value of each save; these are
# known, and the fingerprint's parts that are the same for every call of a
# step (code, helpers, environment) are encoded once (``_STATIC_JSON``).
# Anything else (other fields, other types, a non-finite float) takes the
# general encoder; both give the same text (tests/test_save_path.py).
_SAVE_FIELDS = (
    ("call_site", str), ("crc32", str), ("created", float), ("duration", float), ("fingerprint", dict),
    ("fn_name", str), ("format", int), ("fpd", str), ("host", str), ("is_awaitable", bool),
    ("key", str), ("pid", int), ("run", str), ("size", int), ("version", str),
)
_SAVE_KEYS = frozenset(name for name, _ in _SAVE_FIELDS)
_save_values = operator.itemgetter(*(name for name, _ in _SAVE_FIELDS))
#: The types of the fields but the fingerprint (a dict or a subclass).
_SAVE_TYPES = tuple(t for name, t in _SAVE_FIELDS if name != "fingerprint")
_STATIC_FP = ("bc", "code", "env", "fn", "helpers")
_FP_KEYS = frozenset(("args", "unhashable", "v", *_STATIC_FP))
_FP_KEYS_NO_HELPERS = _FP_KEYS - {"helpers"}
#: code digest -> (copy of the static parts, their JSON text between "args" and "unhashable").
_STATIC_JSON: dict[Any, tuple[tuple[Any, ...], str]] = {}
_enc_str: Callable[[str], str] = json.encoder.encode_basestring  # type: ignore[attr-defined]
_float_repr = float.__repr__
_int_repr = int.__repr__
_INF = float("inf")


def _str_map(d: Any) -> Optional[str]:
    """JSON of a dict of str to str, keys sorted (an argument fingerprint map); None if not one."""
    if type(d) is not dict:
        return None
    parts = []
    for k in sorted(d) if len(d) > 1 else d:
        v = d[k]
        if type(k) is not str or type(v) is not str:
            return None
        parts.append(_enc_str(k) + ":" + _enc_str(v))
    return "{" + ",".join(parts) + "}"


def _fingerprint_json(fp: Any) -> Optional[str]:
    if not isinstance(fp, dict) or type(fp.get("v")) is not int:
        return None
    keys = fp.keys()
    if keys != _FP_KEYS and keys != _FP_KEYS_NO_HELPERS:
        return None
    args, unhashable = fp["args"], fp["unhashable"]
    # The usual: one argument, none unhashable (written out: a save's every call).
    if type(args) is dict and len(args) == 1:
        (name, value), = args.items()
        args = "{" + _enc_str(name) + ":" + _enc_str(value) + "}" if type(name) is str and type(value) is str else None
    else:
        args = _str_map(args)
    unhashable = "{}" if type(unhashable) is dict and not unhashable else _str_map(unhashable)
    if args is None or unhashable is None:
        return None
    static = (fp.get("bc"), fp.get("code"), fp.get("env"), fp.get("fn"), fp.get("helpers"))  # _STATIC_FP
    got = _STATIC_JSON.get(static[1]) if type(static[1]) is str else None
    # Equal to a fresh copy (not the same objects): a record changed in place
    # is never written with the text of what it was.
    if got is None or got[0] != static:
        text = _JSON.encode({k: v for k, v in zip(_STATIC_FP, static) if v is not None or k != "helpers"})
        # Copied through JSON: only a record that encodes the same compares equal
        # (JSON keeps str, int, list, dict; anything else is not cached).
        copy = tuple(json.loads(text).get(k) for k in _STATIC_FP)
        if copy != static or "helpers" in keys and static[4] is None:
            return None
        if type(static[1]) is str:
            if len(_STATIC_JSON) >= 256:
                _STATIC_JSON.clear()
            _STATIC_JSON[static[1]] = (copy, text[1:-1])
        got = (copy, text[1:-1])
    return '{"args":' + args + "," + got[1] + ',"unhashable":' + unhashable + ',"v":' + _int_repr(fp["v"]) + "}"


def _save_record(meta: Any) -> Optional[str]:
    """``_JSON.encode(meta)`` for a save's usual record, or None (use the encoder)."""
    if type(meta) is not dict or meta.keys() != _SAVE_KEYS:
        return None
    (site, crc, created, duration, fp, fn_name, fmt, fpd, host, awaitable, key, pid, run, size,
     version) = _save_values(meta)
    if (type(site), type(crc), type(created), type(duration), type(fn_name), type(fmt), type(fpd), type(host),
            type(awaitable), type(key), type(pid), type(run), type(size), type(version)) != _SAVE_TYPES:
        return None
    if not (-_INF < created < _INF and -_INF < duration < _INF):
        return None  # the encoder's NaN and Infinity
    fp_text = _fingerprint_json(fp)
    if fp_text is None:
        return None
    return (
        f'{{"call_site":{_enc_str(site)},"crc32":{_enc_str(crc)},"created":{_float_repr(created)},'
        f'"duration":{_float_repr(duration)},"fingerprint":{fp_text},"fn_name":{_enc_str(fn_name)},'
        f'"format":{_int_repr(fmt)},"fpd":{_enc_str(fpd)},"host":{_enc_str(host)},'
        f'"is_awaitable":{"true" if awaitable else "false"},"key":{_enc_str(key)},"pid":{_int_repr(pid)},'
        f'"run":{_enc_str(run)},"size":{_int_repr(size)},"version":{_enc_str(version)}}}'
    )


def meta_to_json(meta: dict[str, Any]) -> str:
    """Serialize a metadata record, with a CRC-32 of itself as its first field.

    Keys are sorted (stable for MACs). The record checks itself because a
    damaged field is as dangerous as a damaged value: a flipped byte in
    ``"crc32"`` would otherwise switch the value's check off, and one in
    ``"is_awaitable"`` would change what a hit returns. The checksum stays
    inside valid JSON (``{"_crc":"...",...}``) so SQL users can still query it.
    """
    body = _save_record(meta)
    if body is None:
        body = _JSON.encode(meta)
    if body == "{}":
        return f'{_META_HEAD}{zlib.crc32(body.encode("utf-8")):08x}"}}'
    return f'{_META_HEAD}{zlib.crc32(body.encode("utf-8")):08x}",{body[1:]}'


def meta_from_json(text: str | bytes) -> dict[str, Any]:
    """Check and parse a record written by ``meta_to_json``; ValueError on damage."""
    if isinstance(text, bytes):
        text = text.decode("utf-8")  # UnicodeDecodeError is a ValueError
    n = len(_META_HEAD)
    if not text.startswith(_META_HEAD) or text[n + 8 : n + 10] not in ('",', '"}'):
        raise ValueError("the metadata record has no checksum header")
    body = "{" + text[n + 10 :] if text[n + 8 : n + 10] == '",' else "{}"
    if f"{zlib.crc32(body.encode('utf-8', 'surrogatepass')):08x}" != text[n : n + 8]:
        raise ValueError("the metadata record fails its checksum")
    try:
        meta = json.loads(body)
    except RecursionError:  # a crafted record: listing goes on past it as a damaged one
        raise ValueError("the metadata record is nested too deeply") from None
    if not isinstance(meta, dict):
        raise ValueError("metadata is not a JSON object")
    return meta
