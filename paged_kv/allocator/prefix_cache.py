"""`PrefixCache`: full blocks addressed by their content, kept after release until
the pool needs them.

A block's key is a chained hash: BLAKE2b-128 of (the previous block's key, this
block's token ids, an optional extra key for an adapter or a tenant salt). Equal
keys therefore mean equal token prefixes, so a new request whose prompt starts
like a cached one reuses those blocks instead of computing them. The hash is a
cryptographic one with 128 bits, not Python's ``hash``: a collision would hand one
request another's keys and values, and the keys are stable across processes, so a
router can match them from the event stream.

Eviction: a cached block whose last holder is released goes to the end of an
`OrderedDict` (O(1) insert, O(1) removal from the middle on a hit, O(1) pop of
the least recently used). A sequence's blocks are released tail first, so within
a chain the tail is evicted before its parents and a cached chain never has a hole.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict, deque
from collections.abc import Callable

import attrs
import numpy as np

MAX_EVENTS = 100_000
"""Undrained events kept; older ones are dropped (subscribers see every event)."""

NO_HASH = 0
"""Hash value meaning "not cached" (BLAKE2b output is never mapped to 0; see `chain_hashes`)."""


@attrs.frozen
class PrefixEvent:
    """A block entered (``stored``) or left (``removed``) the prefix cache."""

    kind: str  # "stored" | "removed"
    block_hash: int
    parent_hash: int  # NO_HASH for a chain's first block
    block_id: int


@attrs.frozen
class PrefixStats:
    """What the prefix cache has done: lookups, tokens looked up and hit, blocks reused / stored / evicted."""
    queries: int
    query_tokens: int
    hit_tokens: int
    blocks_reused: int
    blocks_stored: int
    blocks_evicted: int

    @property
    def hit_rate(self) -> float:
        """Fraction of queried prompt tokens served from the cache."""
        return self.hit_tokens / self.query_tokens if self.query_tokens else 0.0


def chain_hashes(token_ids: np.ndarray, block_size: int, num_blocks: int, extra_key=None) -> list[int]:
    """Keys of the first ``num_blocks`` full blocks of ``token_ids``."""
    salt = b"" if extra_key is None else repr(extra_key).encode()
    tokens = np.ascontiguousarray(token_ids[: num_blocks * block_size], dtype=np.int64)
    out, parent = [], NO_HASH
    for i in range(num_blocks):
        h = hashlib.blake2b(digest_size=16)
        h.update(parent.to_bytes(16, "little"))
        h.update(tokens[i * block_size : (i + 1) * block_size].tobytes())
        h.update(salt)
        parent = int.from_bytes(h.digest(), "little") or 1  # never NO_HASH
        out.append(parent)
    return out


class PrefixCache:
    """Hash <-> block maps of one pool, its evictable blocks, stats and events."""

    def __init__(self, num_blocks: int):
        self.block_of: dict[int, int] = {}
        self.hash_of = [NO_HASH] * num_blocks
        self.parent_of = [NO_HASH] * num_blocks
        self.evictable: OrderedDict[int, None] = OrderedDict()  # ref count 0, content kept; LRU first
        self.queries = self.query_tokens = self.hit_tokens = 0
        self.blocks_reused = self.blocks_stored = self.blocks_evicted = 0
        # Bounded: an engine that never drains must not grow without limit.
        self._events: deque[PrefixEvent] = deque(maxlen=MAX_EVENTS)
        self._subscribers: list[Callable[[PrefixEvent], None]] = []

    # ---- lookups ---------------------------------------------------------------------
    def match(self, hashes: list[int]) -> list[int]:
        """Blocks of the longest cached prefix of ``hashes``."""
        blocks = []
        for h in hashes:
            b = self.block_of.get(h)
            if b is None:
                break
            blocks.append(b)
        return blocks

    # ---- changes (the pool and the manager call these) ------------------------------------
    def store(self, block: int, block_hash: int, parent_hash: int) -> bool:
        """Key a freshly computed full block; False if that content is already cached."""
        if block == 0:  # the null block (NULL_BLOCK) holds nobody's tokens: never a hit
            raise AssertionError("the null block was offered to the prefix cache")
        if block_hash in self.block_of or self.hash_of[block] != NO_HASH:
            return False
        self.block_of[block_hash] = block
        self.hash_of[block] = block_hash
        self.parent_of[block] = parent_hash
        self.blocks_stored += 1
        self._emit(PrefixEvent("stored", block_hash, parent_hash, block))
        return True

    def retain(self, released: np.ndarray) -> np.ndarray:
        """Of blocks whose last holder just left (in release order), keep the cached ones
        as evictable; return a mask of those kept."""
        keep = np.fromiter((self.hash_of[b] != NO_HASH for b in released.tolist()), bool, released.size)
        for b in released[keep].tolist():
            self.evictable[b] = None
        return keep

    def revive(self, block: int) -> None:
        """A hit on an evictable block: it is in use again."""
        del self.evictable[block]

    def evict(self, n: int) -> np.ndarray:
        """Forget the ``n`` least recently released cached blocks; return their ids."""
        out = np.empty(n, dtype=np.int32)
        for i in range(n):
            b, _ = self.evictable.popitem(last=False)
            h = self.hash_of[b]
            del self.block_of[h]
            self._emit(PrefixEvent("removed", h, self.parent_of[b], b))
            self.hash_of[b] = self.parent_of[b] = NO_HASH
            out[i] = b
        self.blocks_evicted += n
        return out

    # ---- stats and events -----------------------------------------------------------------
    def stats(self) -> PrefixStats:
        """Counters since the cache was made: queries, tokens hit, blocks reused, stored and evicted."""
        return PrefixStats(self.queries, self.query_tokens, self.hit_tokens, self.blocks_reused,
                           self.blocks_stored, self.blocks_evicted)

    def subscribe(self, callback: Callable[[PrefixEvent], None]) -> None:
        """Call ``callback(event)`` for every event from now on (a router's feed)."""
        self._subscribers.append(callback)

    def drain_events(self) -> list[PrefixEvent]:
        """Events since the last drain, oldest first."""
        events = list(self._events)
        self._events.clear()
        return events

    def _emit(self, event: PrefixEvent) -> None:
        self._events.append(event)
        for callback in self._subscribers:
            callback(event)

    def check_integrity(self, ref_counts: np.ndarray) -> None:
        """Raise AssertionError unless the key maps agree and only unreferenced blocks are evictable."""
        for h, b in self.block_of.items():
            if self.hash_of[b] != h:
                raise AssertionError(f"cached hash of block {b} disagrees with the hash map")
        hashed = sum(h != NO_HASH for h in self.hash_of)
        if hashed != len(self.block_of):
            raise AssertionError(f"{hashed} blocks carry a hash, the map has {len(self.block_of)}")
        for b in self.evictable:
            if ref_counts[b] != 0 or self.hash_of[b] == NO_HASH:
                raise AssertionError(f"evictable block {b} has ref count {ref_counts[b]} or no hash")


__all__ = ["NO_HASH", "PrefixCache", "PrefixEvent", "PrefixStats", "chain_hashes"]
