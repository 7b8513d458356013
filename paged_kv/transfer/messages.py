"""Control messages of a page transfer: plain JSON, versioned, size-bounded, checked
against a schema on arrival.

Every message is one UTF-8 JSON object ``{"protocol": "paged_kv.transfer", "version":
2, "type": ..., "transfer": ID, ...}``. The pages themselves never travel here: they
go through a shared-memory ring on one host (`paged_kv.transfer.shm`), else through
`jax.experimental.transfer`. These messages say which sequence, its length, its
tokens, its salt, the ring offered and the shapes to pull, and carry each side's
answer:

    sender                                  receiver
    offer  (sequence, tokens, spec, ring) ──▶  checks, admits its blocks (all or nothing),
           ◀─ ready (path: shm | tcp)          maps the ring (or says why not: tcp)
           | refused (reason)
    shm:  stream (first chunk, count) ───────▶  copies each chunk out of the ring into
           (chunks: counters in the ring)      its pages as the sender puts them in
    tcp:  pull (transfer address, uuid) ─────▶  pulls the pages, writes them
           ◀─ done  | failed  (reason)         (after the last chunk or the pull; keys them)
    abort  (the sequence changed) ───────────▶  frees what it admitted

Anything else -- bytes that are not JSON, another protocol or version, a message over
the bound, a field missing or of the wrong type -- is a `TransferMessageError`; the
receiver answers it with ``refused`` (reason ``"message"``) and holds nothing for it.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from typing import Any, NoReturn

from paged_kv.errors import TransferMessageError

PROTOCOL = "paged_kv.transfer"
VERSION = 2
MAX_MESSAGE_BYTES = 4 << 20
"""Default bound of one message: an offer holds the prompt's token ids (a 128k-token
prompt is ~1 MiB of JSON), everything else is small."""

_MAX_INT = 2**63 - 1
_MAX_STR = 4096
_MAX_DEPTH = 32

Check = Callable[[Any], bool]
"""A field's check; its ``what`` attribute says what it wants (for the error)."""


def _int(low: int = 0, high: int = _MAX_INT) -> Check:
    def check(v: object) -> bool:
        return isinstance(v, int) and not isinstance(v, bool) and low <= v <= high
    check.what = f"an integer in [{low}, {high}]"  # type: ignore[attr-defined]  # what a check wants: a function attribute
    return check


def _str(v: object) -> bool:
    return isinstance(v, str) and len(v) <= _MAX_STR


_str.what = f"a string of at most {_MAX_STR} characters"  # type: ignore[attr-defined]  # what a check wants: a function attribute


def _ints(low: int = 0, high: int = _MAX_INT) -> Check:
    item = _int(low, high)

    def check(v: object) -> bool:
        return isinstance(v, list) and all(item(x) for x in v)
    check.what = f"a list of integers in [{low}, {high}]"  # type: ignore[attr-defined]  # what a check wants: a function attribute
    return check


def _salt(v: object) -> bool:
    return v is None or _int()(v) or _str(v) or (
        isinstance(v, dict) and set(v) == {"hex"} and _str(v["hex"]) and _is_hex(v["hex"]))


_salt.what = 'null, an integer >= 0, a string or {"hex": bytes as hex}'  # type: ignore[attr-defined]  # what a check wants: a function attribute


def _is_hex(s: str) -> bool:
    try:
        bytes.fromhex(s)
    except ValueError:
        return False
    return True


def _object(v: object) -> bool:
    return isinstance(v, dict) and all(isinstance(k, str) for k in v)


_object.what = "a JSON object"  # type: ignore[attr-defined]  # what a check wants: a function attribute


def _leaves(v: object) -> bool:
    """Per layer, per page array: ``[shape after the block axis, dtype string]``."""
    def leaf(x: object) -> bool:
        return (isinstance(x, list) and len(x) == 2 and _ints(1, 1 << 31)(x[0]) and len(x[0]) <= 8 and _str(x[1]))
    return isinstance(v, list) and all(isinstance(layer, list) and len(layer) <= 16 and all(leaf(x) for x in layer)
                                       for layer in v)


_leaves.what = "per layer a list of [shape, dtype] pairs"  # type: ignore[attr-defined]  # what a check wants: a function attribute

def _ring(v: object) -> bool:
    return v is None or (isinstance(v, dict) and set(v) == {"name", "nonce", "slots", "slot_bytes"}
                         and _str(v["name"]) and _str(v["nonce"]) and _int(0, 1 << 40)(v["slots"])
                         and _int(0, 1 << 40)(v["slot_bytes"]))


_ring.what = 'null or {"name", "nonce", "slots", "slot_bytes"}'  # type: ignore[attr-defined]  # what a check wants: a function attribute


def _path(v: object) -> bool:
    return v in ("shm", "tcp")


_path.what = '"shm" or "tcp"'  # type: ignore[attr-defined]  # what a check wants: a function attribute

_COMMON = {"protocol": _str, "version": _int(), "type": _str, "transfer": _str}

SCHEMA: dict[str, dict[str, Check]] = {
    "offer": {"seq_id": _int(), "num_tokens": _int(1, 2**31 - 1), "tokens": _ints(), "cache_key": _salt,
              "first_blocks": _ints(0, 2**31 - 1), "blocks": _ints(0, 2**31 - 1), "padded": _ints(0, 2**31 - 1),
              "spec": _object, "leaves": _leaves, "info": _object, "shm": _ring},
    "ready": {"seq_id": _int(), "path": _path, "why": _str},
    "refused": {"reason": _str, "message": _str, "needed": _int(-1), "free": _int(-1)},
    "pull": {"address": _str, "uuid": _int(0, 2**62)},
    "stream": {"first": _int(0, 2**62), "count": _int(1, 2**40), "nbytes": _int(1, 2**50)},
    "done": {"seq_id": _int(), "keyed": _int()},
    "failed": {"reason": _str, "message": _str},
    "abort": {"reason": _str, "message": _str},
}
"""Each message type's fields (beside the common ones) and their checks; no others are allowed."""


def make(type_: str, transfer: str, **fields: Any) -> dict[str, Any]:
    """A message of ``type_`` for transfer ``transfer`` (checked like a received one)."""
    msg = {"protocol": PROTOCOL, "version": VERSION, "type": type_, "transfer": transfer, **fields}
    check(msg)
    return msg


def encode(msg: dict[str, Any], max_bytes: int = MAX_MESSAGE_BYTES) -> bytes:
    """``msg`` as bytes; `TransferMessageError` if it is not a valid message or over ``max_bytes``."""
    check(msg)
    data = json.dumps(msg, separators=(",", ":"), allow_nan=False).encode("utf-8")
    if len(data) > max_bytes:
        raise TransferMessageError(f"a {msg['type']!r} message of {len(data)} bytes is over the bound of {max_bytes} "
                                   "bytes (raise max_message_bytes on both sides for longer prompts)")
    return data


def _no_constant(name: str) -> NoReturn:
    raise ValueError(f"{name} is not JSON")


def _depth(v: object, level: int = 0) -> int:
    if level > _MAX_DEPTH:
        return level
    if isinstance(v, dict):
        return max((_depth(x, level + 1) for x in v.values()), default=level + 1)
    if isinstance(v, list):
        return max((_depth(x, level + 1) for x in v), default=level + 1)
    return level


def decode(data: bytes, max_bytes: int = MAX_MESSAGE_BYTES) -> dict[str, Any]:
    """The message in ``data``; `TransferMessageError` for anything but a valid message of at
    most ``max_bytes`` bytes (checked before parsing)."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise TransferMessageError(f"a message is bytes; got {type(data).__name__}")
    if len(data) > max_bytes:
        raise TransferMessageError(f"a message of {len(data)} bytes is over the bound of {max_bytes} bytes")
    try:
        msg = json.loads(bytes(data).decode("utf-8"), parse_constant=_no_constant)
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise TransferMessageError(f"a message that is not UTF-8 JSON ({type(exc).__name__}: {str(exc)[:200]})") from None
    check(msg)
    return msg  # type: ignore[no-any-return]  # checked: a message object


def check(msg: object) -> None:
    """`TransferMessageError` unless ``msg`` is a message of this protocol and version whose
    fields are exactly its type's, each of the right type."""
    if not isinstance(msg, dict):
        raise TransferMessageError(f"a message is a JSON object; got {type(msg).__name__}")
    if msg.get("protocol") != PROTOCOL:
        raise TransferMessageError(f"protocol={str(msg.get('protocol'))[:80]!r}; expected {PROTOCOL!r}")
    if msg.get("version") != VERSION:
        raise TransferMessageError(f"protocol version {str(msg.get('version'))[:20]} is not supported (this side "
                                   f"speaks version {VERSION})")
    kind = msg.get("type")
    fields = SCHEMA.get(kind) if isinstance(kind, str) else None
    if fields is None:
        raise TransferMessageError(f"unknown message type {str(kind)[:80]!r}; known: {sorted(SCHEMA)}")
    wanted = {**_COMMON, **fields}
    extra, missing = sorted(set(msg) - set(wanted)), sorted(set(wanted) - set(msg))
    if extra or missing:
        raise TransferMessageError(f"a {kind!r} message with fields {[k[:40] for k in extra]} unknown and "
                                   f"{missing} missing")
    for name, ok in wanted.items():
        if not ok(msg[name]):
            raise TransferMessageError(f"{kind!r} field {name!r} must be {ok.what}; got {str(msg[name])[:80]}")  # type: ignore[attr-defined]
    if _depth(msg) > _MAX_DEPTH:
        raise TransferMessageError(f"a {kind!r} message nested deeper than {_MAX_DEPTH} levels")
    if kind == "offer":
        groups = len(msg["first_blocks"])
        if not (len(msg["blocks"]) == len(msg["padded"]) == groups) or len(msg["tokens"]) != msg["num_tokens"]:
            raise TransferMessageError("an offer needs one first block, block count and padded count per layer "
                                       "group, and num_tokens token ids")
        if any(not b <= p <= max(2 * b, 1) for b, p in zip(msg["blocks"], msg["padded"])):
            raise TransferMessageError(f"offer padded={msg['padded']} for blocks={msg['blocks']}: padding is at most "
                                       "to the next power of two")


def salt_to_json(cache_key: object) -> int | str | dict[str, str] | None:
    """A prefix-cache salt (None, int >= 0, str, bytes) as a message field."""
    if cache_key is None or isinstance(cache_key, str) or (isinstance(cache_key, int) and not isinstance(cache_key, bool)
                                                           and 0 <= cache_key <= _MAX_INT):
        return cache_key
    if isinstance(cache_key, (bytes, bytearray)):
        return {"hex": bytes(cache_key).hex()}
    raise TransferMessageError(f"cache_key={cache_key!r:.80} cannot be sent: use None, an int in [0, 2**63), "
                               "a str or bytes")


def salt_from_json(value: Any) -> int | str | bytes | None:
    """The salt a message field stands for (`salt_to_json` reversed)."""
    return bytes.fromhex(value["hex"]) if isinstance(value, dict) else value


def finite(x: float) -> bool:
    """Whether ``x`` is a finite float (timeouts and deadlines are)."""
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


__all__ = ["MAX_MESSAGE_BYTES", "PROTOCOL", "SCHEMA", "VERSION", "check", "decode", "encode", "make",
           "salt_from_json", "salt_to_json"]
