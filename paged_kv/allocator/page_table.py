"""`PageTable`: for each live sequence, its block ids in logical order and its length.

One row per sequence (not per decode slot): a sequence keeps its row while it is
queued, prefilled, decoding or swapped, and a decode batch is just a list of rows.
Binding a sequence to a batch slot therefore never copies its table.
"""

from __future__ import annotations

import numpy as np

from paged_kv.spec import NULL_BLOCK


class PageTable:
    """Block tables ``[rows, max_blocks_per_seq]`` padded with the null block, plus lengths.

    Column ``j`` of a row is the sequence's logical block ``j`` (tokens ``j*block_size``
    onward). A sliding-window group returns blocks that fall behind the window to the
    pool; their entries become the null block and ``first_block`` moves past them, so
    a row holds columns ``[first_block, num_blocks)``.

    Rows are recycled through a free stack and the arrays double when full, so the
    number of sequences tracked at once has no fixed limit and adding one is O(1)
    amortized.
    """

    def __init__(self, max_blocks_per_seq: int, initial_rows: int = 64):
        self.max_blocks_per_seq = int(max_blocks_per_seq)
        self.block_tables = np.full((initial_rows, self.max_blocks_per_seq), NULL_BLOCK, dtype=np.int32)
        self.kv_lens = np.zeros(initial_rows, dtype=np.int32)
        self.num_blocks = np.zeros(initial_rows, dtype=np.int32)
        self.first_block = np.zeros(initial_rows, dtype=np.int32)
        self.in_use = np.zeros(initial_rows, dtype=bool)
        self._free_rows = list(range(initial_rows - 1, -1, -1))
        # Bumped whenever a row is added or removed: a cached batch layout (see
        # `StepBatch`) is still valid while it has not moved.
        self.epoch = 0

    @property
    def capacity(self) -> int:
        """Rows allocated so far (in use or free); doubles when rows run out."""
        return self.kv_lens.shape[0]

    def add_row(self) -> int:
        """A free row, emptied, for a new sequence; grows the table if none is free."""
        if not self._free_rows:
            self._grow()
        row = self._free_rows.pop()
        self.in_use[row] = True
        self.epoch += 1
        return row

    def remove_row(self, row: int) -> np.ndarray:
        """Forget a row; returns the block ids it held (the caller frees them)."""
        first, held = self.first_block.item(row), self.num_blocks.item(row)  # Python ints: cheap slicing
        blocks = self.block_tables[row, first:held].copy()
        self.block_tables[row, first:held] = NULL_BLOCK  # the columns before first are null already
        self.kv_lens[row] = 0
        self.num_blocks[row] = 0
        self.first_block[row] = 0
        self.in_use[row] = False
        self.epoch += 1
        self._free_rows.append(row)
        return blocks

    def blocks_of(self, row: int) -> np.ndarray:
        """The blocks a row holds, in logical order (a view)."""
        return self.block_tables[row, self.first_block[row] : self.num_blocks[row]]

    def _grow(self) -> None:
        old = self.capacity
        new = 2 * old
        table = np.full((new, self.max_blocks_per_seq), NULL_BLOCK, dtype=np.int32)
        table[:old] = self.block_tables
        self.block_tables = table
        self.kv_lens = np.concatenate([self.kv_lens, np.zeros(old, np.int32)])
        self.num_blocks = np.concatenate([self.num_blocks, np.zeros(old, np.int32)])
        self.first_block = np.concatenate([self.first_block, np.zeros(old, np.int32)])
        self.in_use = np.concatenate([self.in_use, np.zeros(old, bool)])
        self._free_rows.extend(range(new - 1, old - 1, -1))

    def check_integrity(self, block_size: int) -> None:
        """Raise AssertionError unless free and used rows, lengths and block counts agree."""
        rows = np.flatnonzero(self.in_use)
        if sorted(self._free_rows) != sorted(set(range(self.capacity)) - set(rows.tolist())):
            raise AssertionError("free rows and rows in use disagree")
        expected = -(-self.kv_lens // block_size)
        if np.any(self.num_blocks != expected):
            bad = np.flatnonzero(self.num_blocks != expected)
            raise AssertionError(f"rows {bad.tolist()} hold {self.num_blocks[bad].tolist()} blocks for lengths {self.kv_lens[bad].tolist()}")
        cols = np.arange(self.max_blocks_per_seq)
        held = (cols[None, :] < self.num_blocks[:, None]) & (cols[None, :] >= self.first_block[:, None])
        if np.any((self.block_tables == NULL_BLOCK) & held):
            raise AssertionError("a held block-table entry is the null block")
        if np.any((self.block_tables != NULL_BLOCK) & ~held):
            raise AssertionError("padding beyond a row's blocks is not the null block")


__all__ = ["PageTable"]
