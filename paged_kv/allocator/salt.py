"""Prefix-cache salts (``cache_key``): what keeps one tenant's or adapter's cached blocks
from serving another's prompts.

What a salt promises. Two prompts share cached blocks only if their salts are equal
*as typed values* -- the same type among ``bytes``, ``str`` and ``int``, and the same
value -- and their token prefixes are equal. ``None`` (no salt) is its own class:
unsalted prompts share only with each other, never with a salted one, and the empty
salts ``b""`` and ``""`` are salts like any other. ``"1"``, ``b"1"`` and ``1`` are three
different salts; ``bytearray`` counts as ``bytes``, numpy integers and ``int``
subclasses as ``int`` (by value), ``str`` subclasses as ``str``. Anything else (floats,
bools, tuples, numpy arrays, objects) is refused with `InvalidArgumentError`: those
have no canonical bytes, and the old rule (``repr`` of the key) let two different
salts with equal reprs -- numpy arrays of over 1,000 elements, which ``repr``
abbreviates with ``...``, or objects with a default repr once an address is reused --
read each other's keys and values.

How. A salt's canonical bytes are a one-byte type tag followed by its value (UTF-8 for
``str``, strictly: lone surrogates are refused; minimal two's complement for ``int``).
Its digest is BLAKE2b-256 of those bytes, personalised ``paged_kv/salt/v1`` so no
token hash (unpersonalised BLAKE2b-128) can equal it, and that 32-byte digest is
hashed into every block key of the chain (`prefix_cache.chain_hashes`), so every
block of a salted prompt is keyed apart, not only the first.

Strength and limits. A block key is 128 bits: to hit another salt's block, a request
must find a second preimage of a key it did not choose (about 2**128 work); a
birthday collision (about 2**64) needs one party to choose both colliding inputs.
The salt separates cached *content*; it is not a secret: block keys are published on
the event stream (`PrefixCache.subscribe`) and ``admit_prompt`` returns the tokens
hit, so whoever can read those and guess a salt and a prompt can confirm the guess.
Use an unguessable salt per tenant (e.g. 32 random bytes, as TensorRT-LLM asks) where
the event stream or hit timing is visible to other tenants.
"""

from __future__ import annotations

import hashlib

import numpy as np

from paged_kv.errors import InvalidArgumentError

SALT_PERSON = b"paged_kv/salt/v1"
"""BLAKE2b personalisation of salt digests (domain separation from the token hashes)."""


def salt_bytes(cache_key: object) -> bytes:
    """The canonical, typed bytes of a salt: a type tag, then the value.
    `InvalidArgumentError` naming the value for a type with no canonical bytes."""
    if isinstance(cache_key, (bytes, bytearray)):
        return b"b" + bytes(cache_key)
    if isinstance(cache_key, str):
        try:
            return b"s" + cache_key.encode("utf-8")
        except UnicodeEncodeError as exc:  # lone surrogates: no canonical UTF-8
            raise InvalidArgumentError(f"cache_key={cache_key!r} is not valid Unicode ({exc.reason}); "
                                       "use a str that encodes as UTF-8, or bytes") from None
    if isinstance(cache_key, (int, np.integer)) and not isinstance(cache_key, bool):
        value = int(cache_key)
        return b"i" + value.to_bytes(value.bit_length() // 8 + 1, "big", signed=True)
    raise InvalidArgumentError(
        f"cache_key={_short(cache_key)} (a {type(cache_key).__name__}) has no canonical bytes; use bytes, str or int "
        "(e.g. a tenant's 32 random bytes, or an adapter's name), or None for no salt"
    )


def salt_digest(cache_key: object) -> bytes:
    """``b""`` for ``None`` (no salt), else the 32-byte BLAKE2b-256 of `salt_bytes`."""
    if cache_key is None:
        return b""
    return hashlib.blake2b(salt_bytes(cache_key), digest_size=32, person=SALT_PERSON).digest()


def _short(value: object) -> str:
    """A bounded description for messages (a refused key may be a huge array)."""
    try:
        text = repr(value)
    except Exception:  # noqa: BLE001 - a broken __repr__ must not hide the real error
        text = f"<{type(value).__name__}>"
    return text if len(text) <= 80 else text[:77] + "..."


__all__ = ["SALT_PERSON", "salt_bytes", "salt_digest"]
