"""`BlockPool`: which blocks are free, and how many owners each used block has.

Plain numpy host state, no jit: allocation decisions are made here, never on the device.
"""

from __future__ import annotations

from typing import NewType

import numpy as np

from paged_kv.errors import OutOfBlocksError, PagedKVError
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

    def __init__(self, num_blocks: int):
        if num_blocks < 2:
            raise PagedKVError(f"num_blocks={num_blocks}: need the null block plus at least one usable block")
        self.num_blocks = int(num_blocks)
        self.ref_counts = np.zeros(self.num_blocks, dtype=np.int32)
        # Usable ids, popped from the end; reversed so block 1 is handed out first.
        self._free = np.arange(self.num_blocks - 1, NULL_BLOCK, -1, dtype=np.int32)
        self._num_free = self.num_blocks - 1

    # ---- predicates -------------------------------------------------------------
    @property
    def num_free(self) -> int:
        return self._num_free

    @property
    def num_used(self) -> int:
        return self.num_blocks - 1 - self._num_free

    def can_allocate(self, n: int) -> bool:
        return 0 <= n <= self._num_free

    # ---- actions ----------------------------------------------------------------
    def allocate(self, n: int) -> np.ndarray:
        """Take ``n`` free blocks (ref count 1 each). All or nothing."""
        n = int(n)
        if n > self._num_free:
            raise OutOfBlocksError(n, self._num_free)
        if n <= 0:
            return np.empty(0, dtype=np.int32)
        top = self._num_free
        ids = self._free[top - n : top][::-1].copy()
        self._num_free = top - n
        self.ref_counts[ids] = 1
        return ids

    def incref(self, ids: np.ndarray) -> None:
        """Add one owner to each block in ``ids`` (each must be in use)."""
        ids = np.asarray(ids, dtype=np.int32)
        if ids.size and (np.any(self.ref_counts[ids] <= 0) or np.any(ids == NULL_BLOCK)):
            raise PagedKVError(f"incref of blocks that are not in use: {ids[self.ref_counts[ids] <= 0].tolist()}")
        np.add.at(self.ref_counts, ids, 1)

    def free(self, ids: np.ndarray) -> np.ndarray:
        """Drop one owner of each block in ``ids``; returns the ids that became free."""
        ids = np.asarray(ids, dtype=np.int32)
        if ids.size == 0:
            return ids
        if np.any(ids == NULL_BLOCK) or np.any(self.ref_counts[ids] <= 0):
            raise PagedKVError(f"double free or free of the null block among {ids.tolist()}")
        np.subtract.at(self.ref_counts, ids, 1)
        released = np.unique(ids[self.ref_counts[ids] == 0]) if ids.size > 1 else ids[self.ref_counts[ids] == 0]
        k = released.size
        self._free[self._num_free : self._num_free + k] = released[::-1]
        self._num_free += k
        return released

    # ---- checks -----------------------------------------------------------------
    def check_integrity(self) -> None:
        """Raise if the free list and the ref counts disagree."""
        free = self._free[: self._num_free]
        if self.ref_counts[NULL_BLOCK] != 0 or np.any(free == NULL_BLOCK):
            raise AssertionError("null block was handed out or counted")
        if np.unique(free).size != free.size:
            raise AssertionError("a block is on the free list twice")
        if np.any(self.ref_counts[free] != 0):
            raise AssertionError(f"free blocks with owners: {free[self.ref_counts[free] != 0].tolist()}")
        if np.any(self.ref_counts < 0):
            raise AssertionError("negative ref count")
        used = np.count_nonzero(self.ref_counts)
        if used + self._num_free != self.num_blocks - 1:
            raise AssertionError(f"used {used} + free {self._num_free} != usable {self.num_blocks - 1}")


__all__ = ["BlockPool", "BlockId"]
