"""`BlockPool`: which blocks are free, and how many owners each used block has.

Plain numpy host state, no jit: allocation decisions are made here, never on the device.
"""

from __future__ import annotations

from typing import NewType

import numpy as np

from paged_kv.allocator.prefix_cache import PrefixCache
from paged_kv.allocator.saved_state import check_captured, take
from paged_kv.errors import CheckpointError, OutOfBlocksError, PagedKVError
from paged_kv.spec import NULL_BLOCK

BlockId = NewType("BlockId", int)
"""A block's index in the device pages' leading axis."""


class BlockPool:
    """Free list and reference counts of ``num_blocks`` blocks, block 0 reserved.

    The free list is a numpy stack (array + top index) rather than a deque or a set:
    allocating or freeing *k* blocks is one slice copy, O(k) with no per-block Python,
    which is what lets a decode step of hundreds of sequences stay in microseconds.
    LIFO order also hands back the most recently freed blocks first, whose pages are
    likeliest to still be in cache.

    Reference counts (not a used/free bit) so that several page tables may share a
    block (fork, prefix caching); a block returns to the free list when its count
    reaches zero.
    """

    def __init__(self, num_blocks: int, prefix_cache: bool = False):
        if num_blocks < 2:
            raise PagedKVError(f"num_blocks={num_blocks}: need the null block plus at least one usable block")
        self.num_blocks = int(num_blocks)
        # With a prefix cache, a block whose last owner leaves keeps its content (and
        # its key) while it waits, evictable, until an allocation needs it.
        self.cache = PrefixCache(self.num_blocks) if prefix_cache else None
        self.ref_counts = np.zeros(self.num_blocks, dtype=np.int32)
        # Each block's generation: +1 every time it is handed out fresh (not when a prefix
        # hit revives it: its bytes are shared on purpose). Step metadata carries the
        # generation of every block it names and the device keeps the newest one each
        # block was written under, so metadata built before the block changed hands reads
        # the null block and writes nothing (`paged_kv.binding`). int32 that wraps:
        # the device compares by serial-number arithmetic. The null block stays at 0.
        self.generation = np.zeros(self.num_blocks, dtype=np.int32)
        # Usable ids, popped from the end; reversed so block 1 is handed out first.
        self._free = np.arange(self.num_blocks - 1, NULL_BLOCK, -1, dtype=np.int32)
        self._num_free = self.num_blocks - 1
        self._views: tuple[memoryview, memoryview, memoryview] | None = None  # see `take` (transient)

    # ---- predicates -------------------------------------------------------------
    @property
    def num_free(self) -> int:
        """Blocks an allocation can take: never used, or cached and evictable."""
        return self._num_free + self.num_cached

    @property
    def num_cached(self) -> int:
        """Blocks nobody holds whose content the prefix cache keeps (evictable)."""
        cache = self.cache
        return len(cache.evictable) + len(cache.behind) if cache is not None else 0

    @property
    def num_used(self) -> int:
        """Blocks handed out and not yet freed (the null block is never counted)."""
        return self.num_blocks - 1 - self.num_free

    def can_allocate(self, n: int) -> bool:
        """Whether ``allocate(n)`` would succeed now (cached blocks count as free)."""
        return 0 <= n <= self.num_free

    def generations_of(self, ids: np.ndarray) -> np.ndarray:
        """The generation of each block in ``ids`` (int32), 0 for an id past the pool: the
        padding a device write drops, whose generation no one checks."""
        ids = np.asarray(ids)
        inside = ids < self.num_blocks
        return np.where(inside, self.generation[np.where(inside, ids, 0)], 0).astype(np.int32)

    # ---- actions ----------------------------------------------------------------
    def allocate(self, n: int) -> np.ndarray:
        """Take ``n`` free blocks (ref count 1 each). All or nothing."""
        top = self._num_free
        if 0 < n <= top:  # the common case, first: no eviction, fewest Python steps
            ids = self._free[top - n : top][::-1].copy()
            self._num_free = top - n
            self.ref_counts[ids] = 1
            self.generation[ids] += 1
            return ids
        n = int(n)
        if n > self.num_free:
            raise OutOfBlocksError(n, self.num_free)
        if n <= 0:
            return np.empty(0, dtype=np.int32)
        if n > self._num_free:
            self._push(self.cache.evict(n - self._num_free))  # type: ignore[union-attr]  # n > _num_free: num_free counted cached blocks, so there is a cache
        top = self._num_free
        ids = self._free[top - n : top][::-1].copy()
        self._num_free = top - n
        self.ref_counts[ids] = 1
        self.generation[ids] += 1
        return ids

    def take(self, n: int) -> list[int] | None:
        """`allocate` of blocks from the free stack as a Python list, or None when fewer
        than ``n`` are there (evicting cached blocks is `allocate`'s work: the caller's
        general path). A decode step usually needs one or two blocks, and for so few,
        element access through memoryviews beats numpy's fixed cost per call (~1 µs)."""
        top = self._num_free
        if not 0 < n <= top:
            return [] if n == 0 else None
        if n > 8:
            return self.allocate(n).tolist()  # type: ignore[no-any-return]  # numpy types tolist() as Any: int32 ids give list[int]
        if self._views is None:  # the stack, counts and generations are never replaced, only written
            self._views = (memoryview(self._free), memoryview(self.ref_counts), memoryview(self.generation))  # type: ignore[arg-type, unused-ignore]  # numpy's stubs give ndarray __buffer__ only on Python >= 3.12
        free, refs, gens = self._views
        ids = [free[top - 1 - i] for i in range(n)]  # allocate's order: the top of the stack first
        for b in ids:
            refs[b] = 1
            g = gens[b] + 1  # wrap as numpy's int32 does (a memoryview refuses to overflow)
            gens[b] = g if g < 0x80000000 else g - 0x100000000
        self._num_free = top - n
        return ids

    def revive(self, ids: np.ndarray) -> None:
        """Take cached blocks (prefix-cache hits) into use: evictable ones leave the
        evictable set; every one gains an owner."""
        for b in np.asarray(ids).tolist():
            if self.ref_counts[b] == 0:
                self.cache.revive(b)  # type: ignore[union-attr]  # only a prefix cache keeps a block with no owner to revive
        np.add.at(self.ref_counts, np.asarray(ids, dtype=np.int32), 1)

    def incref(self, ids: np.ndarray) -> None:
        """Add one owner to each block in ``ids`` (each must be in use)."""
        ids = np.asarray(ids, dtype=np.int32)
        if ids.size and (np.any(self.ref_counts[ids] <= 0) or np.any(ids == NULL_BLOCK)):
            raise PagedKVError(f"incref of blocks that are not in use: {ids[self.ref_counts[ids] <= 0].tolist()}")
        np.add.at(self.ref_counts, ids, 1)

    def free(self, ids: np.ndarray, behind: np.ndarray | None = None) -> np.ndarray:
        """Drop one owner of each block in ``ids``; returns the ids that became free.
        ``behind`` (a mask over ``ids``): cached blocks to keep in the prefix cache's
        first-evicted tier (`PrefixCache.retain`)."""
        ids = np.asarray(ids, dtype=np.int32)
        if ids.size == 0:
            return ids
        if np.any(ids == NULL_BLOCK) or np.any(self.ref_counts[ids] <= 0):
            raise PagedKVError(f"double free or free of the null block among {ids.tolist()}")
        np.subtract.at(self.ref_counts, ids, 1)
        zero = self.ref_counts[ids] == 0
        released = ids[zero]
        tiers = None if behind is None else behind[zero]
        if released.size > 1:
            # Unique, in the order given: the prefix cache's eviction order depends on it.
            _, first = np.unique(released, return_index=True)
            first = np.sort(first)
            released = released[first]
            tiers = None if tiers is None else tiers[first]
        return self._released(released, tiers)

    def free_distinct(self, ids: np.ndarray, behind: np.ndarray | None = None) -> np.ndarray:
        """`free` for ids known to be distinct (one row's blocks): a plain fancy-index
        decrement instead of ``np.subtract.at`` and ``np.unique``, a few µs per release."""
        if ids.size == 0:
            return ids
        rc = self.ref_counts
        before = rc[ids]
        if before.min() <= 0:  # the null block never has an owner, so this catches it too
            raise PagedKVError(f"double free or free of the null block among {ids.tolist()}")
        after = before - 1
        rc[ids] = after
        zero = after == 0
        return self._released(ids[zero], None if behind is None else behind[zero])

    def _released(self, released: np.ndarray, behind: np.ndarray | None) -> np.ndarray:
        """Blocks that lost their last owner: to the prefix cache when it keeps them,
        else onto the free stack. Returns them."""
        if self.cache is not None and released.size:
            self._push(released[~self.cache.retain(released, behind)])
        else:
            self._push(released)
        return released

    def free_unshared(self, ids: np.ndarray) -> None:
        """`free` for blocks the caller knows have exactly one owner, itself, and that
        no prefix cache keeps (one row's blocks in a manager that never forked and has
        no prefix cache): every one becomes free, with no count arithmetic. Pushed so
        that the last of ``ids`` is handed out first, as `free_distinct` of ``ids[::-1]``
        does (a release frees a row tail first)."""
        k = ids.size
        top = self._num_free
        self._free[top : top + k] = ids
        self._num_free = top + k
        self.ref_counts[ids] = 0

    def _push(self, ids: np.ndarray) -> None:
        k = ids.size
        self._free[self._num_free : self._num_free + k] = ids[::-1]
        self._num_free += k

    # ---- saved state (paged_kv.checkpoint) ------------------------------------------
    SAVED_ATTRS = frozenset({"num_blocks", "ref_counts", "generation", "_free", "_num_free", "cache", "_views"})
    """Attributes `state` covers (the cache saves its own state; ``_views`` is transient)."""

    def state(self) -> dict[str, np.ndarray]:
        """Ref counts and the whole free stack with its top, so the next ``allocate``
        after a restore pops the same ids in the same order."""
        check_captured(self, self.SAVED_ATTRS)
        return {"ref_counts": self.ref_counts.copy(), "free_stack": self._free.copy(),
                "num_free": np.array(self._num_free, np.int64), "generation": self.generation.copy()}

    @classmethod
    def from_state(cls, state: dict[str, np.ndarray], num_blocks: int, cache: PrefixCache | None = None) -> "BlockPool":
        """The pool `state` describes, with ``cache`` (`CheckpointError` naming a malformed array)."""
        pool = cls(num_blocks)
        pool.ref_counts = take(state, "ref_counts", np.int32, (num_blocks,))
        pool._free = take(state, "free_stack", np.int32, (num_blocks - 1,))
        pool._num_free = int(take(state, "num_free", np.int64, ()))
        # Checkpoints from before block generations: every block at 0, as the device's
        # pages restored with them (`PagedKVCache.bind` makes the two agree either way).
        if "generation" in state:
            pool.generation = take(state, "generation", np.int32, (num_blocks,))
        pool._views = None  # `take`'s memoryviews were of the arrays just replaced
        if not 0 <= pool._num_free <= num_blocks - 1:
            raise CheckpointError(f"pool.num_free={pool._num_free} is outside [0, {num_blocks - 1}]")
        pool.cache = cache
        return pool

    # ---- checks -----------------------------------------------------------------
    def check_integrity(self) -> None:
        """Raise if the free list and the ref counts disagree."""
        free = self._free[: self._num_free]
        if self.ref_counts[NULL_BLOCK] != 0 or np.any(free == NULL_BLOCK) or self.generation[NULL_BLOCK] != 0:
            raise AssertionError("null block was handed out or counted")
        if np.unique(free).size != free.size:
            raise AssertionError("a block is on the free list twice")
        if np.any(self.ref_counts[free] != 0):
            raise AssertionError(f"free blocks with owners: {free[self.ref_counts[free] != 0].tolist()}")
        if np.any(self.ref_counts < 0):
            raise AssertionError("negative ref count")
        used = np.count_nonzero(self.ref_counts)
        cached = self.num_cached
        if used + self._num_free + cached != self.num_blocks - 1:
            raise AssertionError(f"used {used} + free {self._num_free} + cached {cached} != usable {self.num_blocks - 1}")
        if self.cache is not None:
            self.cache.check_integrity(self.ref_counts)
            hashed_free = [b for b in free.tolist() if self.cache.hash_of[b] != 0]
            if hashed_free:
                raise AssertionError(f"blocks on the free list still carry a cache key: {hashed_free}")


__all__ = ["BlockPool", "BlockId"]
