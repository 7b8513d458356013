"""`PageTable`: for each live sequence, its block ids in logical order and its length.

One row per sequence (not per decode slot): a sequence keeps its row while it is
queued, prefilled, decoding or swapped, and a decode batch is just a list of rows.
Binding a sequence to a batch slot therefore never copies its table.
"""

from __future__ import annotations

import numpy as np

from paged_kv.allocator.saved_state import check_captured, take
from paged_kv.allocator.step_arrays import slot
from paged_kv.spec import NULL_BLOCK


def expand_runs(rows: np.ndarray, counts: np.ndarray, starts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Runs of ``counts[i]`` consecutive indices from ``starts[i]``, labelled ``rows[i]``.

    rows [7, 9], counts [2, 3], starts [0, 4] -> ([7, 7, 9, 9, 9], [0, 1, 4, 5, 6]).
    Vectorized; a decode step (every count 0 or 1) takes a mask instead of
    ``repeat``/``cumsum``, which halves the host cost of the common case.
    """
    if counts.size and counts.max() <= 1:
        keep = counts > 0
        return rows[keep], starts[keep].astype(np.int64)
    total = int(counts.sum())
    offsets = np.arange(total, dtype=np.int64) - np.repeat(np.cumsum(counts) - counts, counts)
    return np.repeat(rows, counts), np.repeat(starts, counts).astype(np.int64) + offsets


class PageTable:
    """Block tables ``[rows, max_blocks_per_seq]`` padded with the null block, plus lengths.

    Column ``j`` of a row is the sequence's logical block ``j`` (tokens ``j*block_size``
    onward). A sliding-window group returns blocks that fall behind the window to the
    pool; their entries become the null block and ``first_block`` moves past them, so
    a row holds columns ``[first_block, num_blocks)``.

    Rows are recycled through a free stack and the arrays double when full, so the
    number of sequences tracked at once has no fixed limit and adding one is O(1)
    amortized.

    Changes go through the methods below (the group allocator calls them); only the
    host hot paths (`hot_path.py`'s appends, `decode_layout.py`'s in-place decode) write
    the arrays in place, element by element (through `views`), because a method call
    per decode token would cost more than the write; they then call `touch`, as the
    methods bump ``version`` themselves. ``epoch``, ``version`` and ``born`` are read
    by others, written only here.
    """

    def __init__(self, max_blocks_per_seq: int, initial_rows: int = 64):
        self.max_blocks_per_seq = int(max_blocks_per_seq)
        self.block_tables = np.full((initial_rows, self.max_blocks_per_seq), NULL_BLOCK, dtype=np.int32)
        self.kv_lens = np.zeros(initial_rows, dtype=np.int32)
        self.num_blocks = np.zeros(initial_rows, dtype=np.int32)
        self.first_block = np.zeros(initial_rows, dtype=np.int32)
        self.in_use = np.zeros(initial_rows, dtype=bool)
        self._free_rows = list(range(initial_rows - 1, -1, -1))
        # Change counters for a cached batch layout (`StepBatch`), transient. ``epoch``:
        # bumped whenever a row is added or removed. ``version``: bumped by every change
        # to a row already in use (lengths, blocks, trims, copy-on-write), so a layout
        # built before it cannot miss a block. ``born[row]``: the epoch the row was added
        # at, which tells a reused row from the sequence that held it before.
        self.epoch = 0
        self.version = 0
        self.born = np.zeros(initial_rows, dtype=np.int64)
        self._views: tuple[np.ndarray, np.ndarray, np.ndarray, tuple[memoryview, memoryview, memoryview]] | None = None  # see `views`

    @property
    def capacity(self) -> int:
        """Rows allocated so far (in use or free); doubles when rows run out."""
        return self.kv_lens.shape[0]

    def touch(self) -> int:
        """Rows in use were changed in place (a hot path's element writes): a new ``version``,
        returned, so that a layout built before it is seen to be stale."""
        self.version += 1
        return self.version

    def views(self) -> tuple[memoryview, memoryview, memoryview]:
        """Memoryviews of ``(kv_lens, block_tables, num_blocks)`` for element reads and the
        hot paths' writes (about twice as fast as numpy scalar indexing), made again
        only when the table replaces its arrays (it grew: a new row, a new epoch).
        A writer calls `touch` after."""
        views = self._views
        if (views is None or views[0] is not self.kv_lens or views[1] is not self.block_tables
                or views[2] is not self.num_blocks):
            arrays = (self.kv_lens, self.block_tables, self.num_blocks)
            views = self._views = (*arrays, tuple(map(memoryview, arrays)))  # type: ignore[arg-type, assignment]  # arrays export buffers; three of them
        return views[3]  # type: ignore[index]  # set just above when None

    def add_row(self) -> int:
        """A free row, emptied, for a new sequence; grows the table if none is free."""
        if not self._free_rows:
            self._grow()
        row = self._free_rows.pop()
        self.in_use[row] = True
        self.epoch += 1
        self.born[row] = self.epoch
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

    def fill_row(self, row: int, first: int, ids: np.ndarray, kv_len: int) -> None:
        """Give an empty ``row`` blocks ``ids`` as its logical blocks ``first`` onward, holding ``kv_len`` tokens."""
        end = first + len(ids)
        self.block_tables[row, first:end] = ids
        self.first_block[row], self.num_blocks[row], self.kv_lens[row] = first, end, kv_len

    def copy_row(self, src: int, dst: int) -> None:
        """``dst`` (an empty row) names exactly the blocks of ``src`` (a fork)."""
        self.block_tables[dst] = self.block_tables[src]
        for a in (self.kv_lens, self.num_blocks, self.first_block):
            a[dst] = a[src]

    def trim(self, rows: np.ndarray, keep: np.ndarray) -> np.ndarray:
        """Null each row's columns before ``keep`` (a window or chunk moved past them);
        returns the dropped block ids, row by row in logical order."""
        self.version += 1
        first = self.first_block[rows]
        drop_rows, drop_cols = expand_runs(rows, keep - first, first)
        dropped: np.ndarray = self.block_tables[drop_rows, drop_cols]
        self.block_tables[drop_rows, drop_cols] = NULL_BLOCK
        self.first_block[rows] = keep
        return dropped

    def replace_blocks(self, rows: np.ndarray, cols: np.ndarray, ids: np.ndarray) -> np.ndarray:
        """Point ``(rows[i], cols[i])`` at ``ids[i]`` (copy-on-write); returns the blocks named before."""
        self.version += 1
        old: np.ndarray = self.block_tables[rows, cols].copy()
        self.block_tables[rows, cols] = ids
        return old

    def extend(self, rows: np.ndarray, counts: np.ndarray, ids: np.ndarray) -> None:
        """Append ``counts[i]`` of ``ids`` (in order) after the last block of ``rows[i]``."""
        self.version += 1
        start = self.num_blocks[rows]
        if ids.size:
            block_rows, block_cols = expand_runs(rows, counts, start)
            self.block_tables[block_rows, block_cols] = ids
        self.num_blocks[rows] = start + counts

    def set_lengths(self, rows: np.ndarray, kv_lens: np.ndarray) -> None:
        """Record that ``rows`` hold ``kv_lens`` tokens (their blocks already cover them)."""
        self.version += 1
        self.kv_lens[rows] = kv_lens

    def slots(self, rows: np.ndarray, positions: np.ndarray, block_size: int) -> np.ndarray:
        """Flat page slot of token ``positions[i]`` of row ``rows[i]`` (`step_arrays.slot`)."""
        return slot(self.block_tables[rows, positions // block_size].astype(np.int64), positions, block_size)

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
        self.born = np.concatenate([self.born, np.zeros(old, np.int64)])
        self._free_rows.extend(range(new - 1, old - 1, -1))

    # ---- saved state (paged_kv.checkpoint) ------------------------------------------
    SAVED_ATTRS = frozenset({"max_blocks_per_seq", "block_tables", "kv_lens", "num_blocks", "first_block", "in_use",
                             "_free_rows", "epoch", "version", "born", "_views"})
    """Attributes `state` covers; ``epoch``, ``version`` and ``born`` are transient (change
    counters for cached batch layouts): a restored table starts afresh, and ``_views``
    follow the arrays."""

    def state(self) -> dict[str, np.ndarray]:
        """Copies of every array a restored table needs, free rows in stack order."""
        check_captured(self, self.SAVED_ATTRS)
        return {"block_tables": self.block_tables.copy(), "kv_lens": self.kv_lens.copy(),
                "num_blocks": self.num_blocks.copy(), "first_block": self.first_block.copy(),
                "in_use": self.in_use.copy(), "free_rows": np.array(self._free_rows, np.int64)}

    @classmethod
    def from_state(cls, state: dict[str, np.ndarray], max_blocks_per_seq: int) -> "PageTable":
        """The table `state` describes (shapes and dtypes checked; consistency is the
        caller's ``check_integrity``). `CheckpointError` naming the bad array."""
        block_tables = take(state, "block_tables", np.int32, (None, max_blocks_per_seq))
        rows = block_tables.shape[0]
        table = cls(max_blocks_per_seq, initial_rows=rows)
        table.block_tables = block_tables
        table.kv_lens = take(state, "kv_lens", np.int32, (rows,))
        table.num_blocks = take(state, "num_blocks", np.int32, (rows,))
        table.first_block = take(state, "first_block", np.int32, (rows,))
        table.in_use = take(state, "in_use", np.bool_, (rows,))
        table._free_rows = [int(r) for r in take(state, "free_rows", np.int64, (None,))]
        return table

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


__all__ = ["PageTable", "expand_runs"]
