"""Eviction policies of a tier: which key leaves when a tier is full.

A tier is a cache of keys (chain hashes of full blocks) with a capacity in blocks.
Two policies, as vLLM's offloading connector ships:

* `LRU`: least recently inserted or hit first.
* `ARC` (Megiddo & Modha, FAST 2003): two lists, keys seen once (``t1``) and keys
  hit again (``t2``), whose split ``p`` adapts through two ghost lists of keys
  recently evicted from each (``b1``, ``b2``). A scan -- many keys seen once, say a
  burst of one-turn prompts -- only cycles ``t1``, so the conversations that come
  back (``t2``) survive it, which LRU does not.

Keys may be pinned by the tier (a move in flight reads or writes their slot): a
victim is never a pinned key. O(1) per operation except when pinned keys must be
skipped (there are few: a step's moves).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Container

from paged_kv.errors import InvalidArgumentError

POLICIES = ("lru", "arc")


class LRU:
    """Least recently used first."""

    name = "lru"

    def __init__(self, capacity: int):
        self.capacity = capacity
        self.order: OrderedDict[int, None] = OrderedDict()

    def __len__(self) -> int:
        return len(self.order)

    def __contains__(self, key: int) -> bool:
        return key in self.order

    def insert(self, key: int) -> None:
        """``key`` entered the tier (room was made first)."""
        self.order[key] = None

    def touch(self, key: int) -> None:
        """A hit on ``key``."""
        self.order.move_to_end(key)

    def remove(self, key: int) -> None:
        """``key`` left the tier for another reason than eviction (taken, corrupt)."""
        self.order.pop(key, None)

    def victim(self, pinned: Container[int] = (), incoming: int | None = None) -> int | None:
        """The key to evict next (not removed yet), or None when every key is pinned.
        (``incoming``, the key room is made for, matters only with priorities.)"""
        return next((k for k in self.order if k not in pinned), None)

    def evicted(self, key: int) -> None:
        """``victim`` was evicted."""
        del self.order[key]

    def keys(self) -> list[int]:
        """Keys, first to go first."""
        return list(self.order)


class ARC:
    """Adaptive replacement: recency (``t1``) against frequency (``t2``), ghosts steer ``p``."""

    name = "arc"

    def __init__(self, capacity: int):
        self.capacity = capacity
        self.p = 0.0  # target size of t1
        self.t1: OrderedDict[int, None] = OrderedDict()
        self.t2: OrderedDict[int, None] = OrderedDict()
        self.b1: OrderedDict[int, None] = OrderedDict()
        self.b2: OrderedDict[int, None] = OrderedDict()

    def __len__(self) -> int:
        return len(self.t1) + len(self.t2)

    def __contains__(self, key: int) -> bool:
        return key in self.t1 or key in self.t2

    def insert(self, key: int) -> None:
        c = self.capacity
        if key in self.b1:  # evicted from t1 too early: recency deserves more room
            self.p = min(c, self.p + max(len(self.b2) / max(len(self.b1), 1), 1))
            del self.b1[key]
            self.t2[key] = None
        elif key in self.b2:  # evicted from t2 too early: frequency deserves more room
            self.p = max(0.0, self.p - max(len(self.b1) / max(len(self.b2), 1), 1))
            del self.b2[key]
            self.t2[key] = None
        else:
            self.t1[key] = None
        # Ghosts are bounded by the capacity in all (the paper's |L1|, |L2| <= c).
        while len(self.t1) + len(self.b1) > c and self.b1:
            self.b1.popitem(last=False)
        while len(self.t1) + len(self.t2) + len(self.b1) + len(self.b2) > 2 * c and self.b2:
            self.b2.popitem(last=False)

    def touch(self, key: int) -> None:
        if key in self.t1:
            del self.t1[key]
        else:
            del self.t2[key]
        self.t2[key] = None

    def remove(self, key: int) -> None:
        self.t1.pop(key, None)
        self.t2.pop(key, None)

    def victim(self, pinned: Container[int] = (), incoming: int | None = None) -> int | None:
        first, second = (self.t1, self.t2) if self.t1 and len(self.t1) > self.p else (self.t2, self.t1)
        for order in (first, second):
            key = next((k for k in order if k not in pinned), None)
            if key is not None:
                return key
        return None

    def evicted(self, key: int) -> None:
        if key in self.t1:
            del self.t1[key]
            self.b1[key] = None
        else:
            del self.t2[key]
            self.b2[key] = None

    def keys(self) -> list[int]:
        return [*self.t1, *self.t2]


def make_policy(name: str, capacity: int) -> LRU | ARC:
    """The policy called ``name`` ("lru" or "arc") over ``capacity`` blocks."""
    if name == "lru":
        return LRU(capacity)
    if name == "arc":
        return ARC(capacity)
    raise InvalidArgumentError(f"policy={name!r} is not one of {POLICIES}: pick 'lru' (least recently used) or 'arc' "
                               "(scan-resistant)")


__all__ = ["ARC", "LRU", "POLICIES", "make_policy"]
