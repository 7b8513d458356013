"""Prefix-cache salts are typed values with a canonical encoding (issue 23 item 1).

Under the old rule (``repr`` of the key) two different salts with equal reprs -- numpy
arrays of over 1,000 elements, objects with one repr -- keyed the same chain, so the
second tenant hit the first one's blocks. Salts are now bytes, str or int, compared as
typed values, hashed with BLAKE2b-256 apart from the token hashes.
"""

from __future__ import annotations

import hashlib

import numpy as np
import pytest

import paged_kv as pk
from paged_kv.allocator.prefix_cache import NO_HASH, chain_hashes
from paged_kv.allocator.salt import SALT_PERSON, salt_bytes, salt_digest

PROMPT = np.arange(21)  # 5 full blocks of 4, the last token always computed: up to 20 tokens hit


def manager() -> pk.KVCacheManager:
    spec = pk.CacheSpec(num_layers=1, num_blocks=40, block_size=4, max_blocks_per_seq=8, num_kv_heads=1,
                        head_dim=2, dtype="float32")
    return pk.KVCacheManager(spec, prefix_cache=True)


def served(m: pk.KVCacheManager, seq_id: int, key) -> int:
    """Admit PROMPT under ``key``, write it (commit), release it (its blocks stay
    cached) and return the tokens it hit."""
    hit = m.admit_prompt(seq_id, PROMPT, cache_key=key)
    m.commit([seq_id], PROMPT.size)
    m.release(seq_id)
    return hit


class Opaque:
    """An object whose repr is the same for every instance (like a default repr after
    the previous object's address is reused)."""

    def __repr__(self) -> str:
        return "<Opaque>"


BIG = np.zeros(1001, np.int64)
BIG_OTHER = BIG.copy()
BIG_OTHER[500] = 7  # repr abbreviates the middle: both print alike


@pytest.mark.parametrize("first, second", [(BIG, BIG_OTHER), (Opaque(), Opaque())], ids=["big-arrays", "objects"])
def test_salts_with_equal_reprs_never_share_blocks(first, second):
    assert repr(first) == repr(second)
    m = manager()
    for seq_id, key in enumerate((first, second)):
        before = m.snapshot()
        with pytest.raises(pk.InvalidArgumentError, match="no canonical bytes; use bytes, str or int"):
            m.admit_prompt(seq_id, PROMPT, cache_key=key)
        assert m.snapshot() == before
        assert not m.can_admit_prompt(PROMPT, cache_key=key)
    m.check_integrity()


@pytest.mark.parametrize("key", [1.0, True, np.bool_(True), (1,), [1], {"t": 1}, np.array([1]), object(),
                                 "\ud800", memoryview(b"x")])
def test_salts_of_other_types_are_refused(key):
    m = manager()
    m.admit(1, 21)
    m.commit([1], 21)
    before = m.snapshot()
    with pytest.raises(pk.InvalidArgumentError, match="cache_key="):
        m.admit_prompt(0, PROMPT, cache_key=key)
    with pytest.raises(pk.InvalidArgumentError, match="cache_key="):
        m.cache_tokens(1, PROMPT, cache_key=key)
    assert m.snapshot() == before
    assert not m.can_admit_prompt(PROMPT, cache_key=key)


def test_equal_typed_values_share_and_different_types_do_not():
    m = manager()
    assert served(m, 0, "tenant-1") == 0
    assert served(m, 1, "tenant-1") == 20
    assert served(m, 2, "tenant-2") == 0
    for i, key in enumerate(["1", b"1", 1, None, b"", ""]):  # each its own salt
        assert served(m, 10 + i, key) == 0, key
    assert served(m, 20, np.int64(1)) == 20  # an int by value
    assert served(m, 21, bytearray(b"1")) == 20  # bytes by value
    assert served(m, 22, np.str_("1")) == 20
    m.check_integrity()


def test_salt_encoding_and_digest_are_pinned():
    """The construction the docstring promises: a tagged canonical encoding, BLAKE2b-256
    personalised, hashed into every block key (a change here re-keys every cache)."""
    assert salt_bytes(b"ab") == b"bab" and salt_bytes(bytearray(b"ab")) == b"bab"
    assert salt_bytes("é") == b"s\xc3\xa9"
    assert salt_bytes(255) == b"i\x00\xff" and salt_bytes(-1) == b"i\xff" and salt_bytes(0) == b"i\x00"
    assert salt_bytes(2**300) == b"i" + (2**300).to_bytes(38, "big", signed=True)
    assert salt_digest(None) == b""
    assert salt_digest("t") == hashlib.blake2b(b"st", digest_size=32, person=SALT_PERSON).digest()
    tokens = np.arange(8)
    keys = chain_hashes(tokens, 4, 2, "t")
    parent = NO_HASH
    for i in range(2):
        h = hashlib.blake2b(parent.to_bytes(16, "little"), digest_size=16)
        h.update(tokens[4 * i: 4 * i + 4].astype(np.int64).tobytes())
        h.update(salt_digest("t"))
        parent = int.from_bytes(h.digest(), "little")
        assert keys[i] == parent
    assert chain_hashes(tokens, 4, 2) != keys  # unsalted chains differ in every block
    assert all(a != b for a, b in zip(chain_hashes(tokens, 4, 2, b""), chain_hashes(tokens, 4, 2)))
