"""`PrefixCache`: full blocks addressed by their content, kept after release until
the pool needs them.

A block's key is a chained hash: BLAKE2b-128 of (the previous block's key, this
block's token ids, an optional extra key for an adapter or a tenant salt: its typed
digest, see `paged_kv.allocator.salt` for what a salt promises). Equal
keys therefore mean equal token prefixes, so a new request whose prompt starts
like a cached one reuses those blocks instead of computing them. The hash is a
cryptographic one with 128 bits, not Python's ``hash``: a collision would hand one
request another's keys and values, and the keys are stable across processes, so a
router can match them from the event stream.

Eviction: a cached block whose last holder is released goes to the end of an
`OrderedDict` (O(1) insert, O(1) removal from the middle on a hit, O(1) pop of
the least recently used). A sequence's blocks are released tail first, so within
a chain the tail is evicted before its parents and a cached chain never has a hole.

Retention for sliding-window and chunked groups: a second `OrderedDict`, ``behind``,
holds cached blocks that lie behind the window of their chain's latest keyed end --
blocks a request continuing that chain never reads (only a prompt that branches off
earlier could). They are evicted before any block in ``evictable``, least recently
freed first. Without this, the blocks a sliding window sheds as a live sequence
grows (cached, freed every few tokens) are always more recent than the window tails
of finished turns, so LRU recycles exactly the tails the next turn needs and a
multi-session workload's hit rate collapses (vLLM issue #48435). The group decides
what is behind (`GroupAllocator.retire_behind`); a full-attention group never puts
anything there.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict, deque
from collections.abc import Callable
from itertools import islice

import attrs
import numpy as np

from paged_kv.allocator.salt import salt_digest
from paged_kv.allocator.saved_state import check_captured, take
from paged_kv.errors import CheckpointError

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
    block_id: int  # the device block; a tier's slot (host), -1 (disk)
    medium: str = "device"  # where the block is stored or removed: "device" | "host" | "disk" (paged_kv.tiers)


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


def to_u128(values: list[int]) -> np.ndarray:
    """128-bit keys as ``[n, 2]`` uint64 (low, high) pairs (numpy has no 128-bit integer)."""
    return np.array([[v & 0xFFFFFFFFFFFFFFFF, v >> 64] for v in values], np.uint64).reshape(-1, 2)


def from_u128(pairs: np.ndarray) -> list[int]:
    """Inverse of `to_u128`."""
    return [int(lo) | (int(hi) << 64) for lo, hi in pairs.tolist()]


def chain_hashes(token_ids: np.ndarray, block_size: int, num_blocks: int,
                 extra_key: bytes | str | int | None = None) -> list[int]:
    """Keys of the first ``num_blocks`` full blocks of ``token_ids``.

    Each key is BLAKE2b-128 over (parent key, the block's int64 token bytes, the salt's
    32-byte digest if ``extra_key`` is not None): salted and unsalted messages differ in
    length, so neither kind of chain can be made to feed the other's input. The salt is a typed value
    (`paged_kv.allocator.salt`: bytes, str or int, else `InvalidArgumentError`) whose
    digest is computed once per call. The tokens are turned into bytes once and sliced
    as a memoryview (no numpy slice and copy per block): hashing is most of an
    admission's host time."""
    salt = salt_digest(extra_key)
    data = memoryview(np.ascontiguousarray(token_ids[: num_blocks * block_size], dtype=np.int64)).cast("B")  # type: ignore[arg-type, unused-ignore]  # numpy's stubs give ndarray __buffer__ only on Python >= 3.12
    step = 8 * block_size
    blake2b, out, parent = hashlib.blake2b, [], NO_HASH
    for start in range(0, num_blocks * step, step):
        h = blake2b(parent.to_bytes(16, "little"), digest_size=16)
        h.update(data[start : start + step])
        if salt:
            h.update(salt)
        parent = int.from_bytes(h.digest(), "little") or 1  # never NO_HASH
        out.append(parent)
    return out


class PrefixCache:
    """Hash <-> block maps of one pool, its evictable blocks, stats and events."""

    # Hooks of the tiers below the device (`paged_kv.tiers`), None without tiers; set
    # per instance by `CacheTiers`. on_evict(block, key, parent, behind) runs before an
    # evicted block is handed out again (its bytes still on the device), on_store(block,
    # key, parent) when a block is keyed (write-through copies it down then).
    on_evict: Callable[[int, int, int, bool], None] | None = None
    on_store: Callable[[int, int, int], None] | None = None
    # choose(evictable, n): which n of ``evictable`` go first (the tiers' priorities,
    # lowest first); None: least recently released first.
    choose: Callable[[OrderedDict[int, None], int], list[int]] | None = None

    def __init__(self, num_blocks: int):
        self.block_of: dict[int, int] = {}
        self.hash_of = [NO_HASH] * num_blocks
        self.parent_of = [NO_HASH] * num_blocks
        self.evictable: OrderedDict[int, None] = OrderedDict()  # ref count 0, content kept; LRU first
        self.behind: OrderedDict[int, None] = OrderedDict()  # the same, behind their chain's window: evicted first
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
        if self.on_store is not None:
            self.on_store(block, block_hash, parent_hash)
        return True

    @property
    def num_evictable(self) -> int:
        """Cached blocks nobody holds (both tiers): an allocation may take them."""
        return len(self.evictable) + len(self.behind)

    def is_evictable(self, block: int) -> bool:
        """Whether ``block`` is cached and held by nobody."""
        return block in self.evictable or block in self.behind

    def retain(self, released: np.ndarray, behind: np.ndarray | None = None) -> np.ndarray:
        """Of blocks whose last holder just left (in release order), keep the cached ones
        as evictable (in the ``behind`` tier where the mask ``behind`` says so); return a
        mask of those kept."""
        keep = np.fromiter((self.hash_of[b] != NO_HASH for b in released.tolist()), bool, released.size)
        tiers = (self.evictable,) if behind is None else (self.evictable, self.behind)
        if behind is None:
            for b in released[keep].tolist():
                self.evictable[b] = None
        else:
            for b, back in zip(released[keep].tolist(), behind[keep].tolist()):
                tiers[back][b] = None
        return keep

    def demote(self, block: int) -> None:
        """A cached, unheld block fell behind its chain's window: it goes to the ``behind`` tier."""
        if block in self.evictable:
            del self.evictable[block]
            self.behind[block] = None

    def revive(self, block: int) -> None:
        """A hit on an evictable block: it is in use again."""
        if self.evictable.pop(block, NO_HASH) is NO_HASH:  # stored values are None: absent
            del self.behind[block]

    def evict(self, n: int) -> np.ndarray:
        """Forget ``n`` cached blocks nobody holds, least recently released first, the
        ``behind`` tier before the rest; return their ids."""
        out = np.empty(n, dtype=np.int32)
        behind = list(islice(self.behind, n))
        rest = n - len(behind)
        chosen = [] if not rest else (list(islice(self.evictable, rest)) if self.choose is None
                                      else self.choose(self.evictable, rest))
        for i, b in enumerate(behind + chosen):
            is_behind = i < len(behind)
            del (self.behind if is_behind else self.evictable)[b]
            h = self.hash_of[b]
            del self.block_of[h]
            self._emit(PrefixEvent("removed", h, self.parent_of[b], b))
            if self.on_evict is not None:  # a tier below keeps it (write-back) or lets it go
                self.on_evict(b, h, self.parent_of[b], is_behind)
            self.hash_of[b] = self.parent_of[b] = NO_HASH
            out[i] = b
        self.blocks_evicted += n
        return out

    # ---- stats and events -----------------------------------------------------------------
    def record_query(self, query_tokens: int, hit_tokens: int, blocks_reused: int) -> None:
        """A prompt of ``query_tokens`` was admitted with ``hit_tokens`` served from cache."""
        self.queries += 1
        self.query_tokens += int(query_tokens)
        self.hit_tokens += int(hit_tokens)
        self.blocks_reused += int(blocks_reused)

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

    # ---- saved state (paged_kv.checkpoint) --------------------------------------------------
    SAVED_ATTRS = frozenset({"block_of", "hash_of", "parent_of", "evictable", "behind", "queries", "query_tokens",
                             "hit_tokens", "blocks_reused", "blocks_stored", "blocks_evicted", "_events",
                             "_subscribers", "on_evict", "on_store", "choose"})
    """Attributes `state` covers (events, subscribers and tier hooks belong to the running process)."""

    def state(self) -> dict[str, np.ndarray]:
        """Keys as (low, high) uint64 pairs per block, both eviction tiers in LRU order (so
        eviction after a restore picks the same blocks), and the counters."""
        check_captured(self, self.SAVED_ATTRS)
        return {"hash": to_u128(self.hash_of), "parent": to_u128(self.parent_of),
                "evictable": np.array(list(self.evictable), np.int64), "behind": np.array(list(self.behind), np.int64),
                "stats": np.array([self.queries, self.query_tokens, self.hit_tokens, self.blocks_reused,
                                   self.blocks_stored, self.blocks_evicted], np.int64)}

    @classmethod
    def from_state(cls, state: dict[str, np.ndarray], num_blocks: int) -> "PrefixCache":
        """The cache `state` describes (`CheckpointError` naming a malformed array)."""
        cache = cls(num_blocks)
        cache.hash_of = from_u128(take(state, "hash", np.uint64, (num_blocks, 2)))
        cache.parent_of = from_u128(take(state, "parent", np.uint64, (num_blocks, 2)))
        cache.block_of = {h: b for b, h in enumerate(cache.hash_of) if h != NO_HASH}
        for name in ("evictable", "behind"):
            blocks = take(state, name, np.int64, (None,))
            if np.any((blocks < 1) | (blocks >= num_blocks)):
                raise CheckpointError(f"{name} names blocks outside [1, {num_blocks})")
            if np.unique(blocks).size != blocks.size:  # the OrderedDict would keep one silently
                raise CheckpointError(f"{name} names a block twice")
            getattr(cache, name).update((int(b), None) for b in blocks)
        (cache.queries, cache.query_tokens, cache.hit_tokens, cache.blocks_reused, cache.blocks_stored,
         cache.blocks_evicted) = (int(x) for x in take(state, "stats", np.int64, (6,)))
        return cache

    def snapshot(self) -> tuple[tuple[tuple[int, int], ...], tuple[int, ...], tuple[int, ...]]:
        """A comparable copy of the keys and both eviction tiers (for `KVCacheManager.snapshot`)."""
        return tuple(sorted(self.block_of.items())), tuple(self.evictable), tuple(self.behind)

    def check_integrity(self, ref_counts: np.ndarray) -> None:
        """Raise AssertionError unless the key maps agree and only unreferenced blocks are evictable."""
        for h, b in self.block_of.items():
            if self.hash_of[b] != h:
                raise AssertionError(f"cached hash of block {b} disagrees with the hash map")
        hashed = sum(h != NO_HASH for h in self.hash_of)
        if hashed != len(self.block_of):
            raise AssertionError(f"{hashed} blocks carry a hash, the map has {len(self.block_of)}")
        if set(self.evictable) & set(self.behind):
            raise AssertionError(f"blocks {sorted(set(self.evictable) & set(self.behind))} are in both eviction tiers")
        for b in (*self.evictable, *self.behind):
            if ref_counts[b] != 0 or self.hash_of[b] == NO_HASH:
                raise AssertionError(f"evictable block {b} has ref count {ref_counts[b]} or no hash")


__all__ = ["NO_HASH", "PrefixCache", "PrefixEvent", "PrefixStats", "chain_hashes", "from_u128", "to_u128"]
