"""`KVCacheManager`: the scheduler-facing host API.

Predicate/action pairs (`can_admit`/`admit`, `can_append`/`append`) over plain numpy
state. Every action validates everything first and mutates last, so a call that
raises leaves the manager exactly as it was: no half-admitted sequence, no leaked
block.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import NewType

import numpy as np

from paged_kv.allocator.block_pool import BlockPool
from paged_kv.allocator.page_table import PageTable
from paged_kv.errors import (
    BatchTooLargeError,
    DuplicateSequenceError,
    InvalidTokenCountError,
    OutOfBlocksError,
    SequenceTooLongError,
    UnknownSequenceError,
)
from paged_kv.metadata import StepMetadata, bucket
from paged_kv.spec import NULL_BLOCK, CacheSpec

SeqId = NewType("SeqId", int)
"""The caller's name for a request: any non-negative Python or numpy integer."""


def _check_seq_id(seq_id) -> int:
    if isinstance(seq_id, bool) or not isinstance(seq_id, (int, np.integer)):
        raise InvalidTokenCountError(f"seq_id={seq_id!r} must be an integer (got {type(seq_id).__name__})")
    return int(seq_id)


def _segment_offsets(counts: np.ndarray) -> np.ndarray:
    """For counts [2, 3] -> [0, 1, 0, 1, 2]: index within each run, vectorized."""
    total = int(counts.sum())
    starts = np.repeat(np.cumsum(counts) - counts, counts)
    return np.arange(total, dtype=np.int64) - starts


class KVCacheManager:
    """Maps each sequence's token positions to blocks of the device pages.

    ``append`` and ``step_metadata`` take many sequences at once and do their work
    in numpy over the whole batch; the only per-sequence Python is the id lookup.
    """

    def __init__(self, spec: CacheSpec):
        self.spec = spec
        self.pool = BlockPool(spec.num_blocks)
        self.table = PageTable(spec.max_blocks_per_seq)
        self._rows: dict[int, int] = {}
        # Flat slot the write drops: one past the last token slot of the pages.
        self.pad_slot = spec.num_blocks * spec.block_size

    # ---- queries -------------------------------------------------------------------
    def __contains__(self, seq_id) -> bool:
        return seq_id in self._rows

    def __len__(self) -> int:
        return len(self._rows)

    @property
    def seq_ids(self) -> list[int]:
        return list(self._rows)

    @property
    def num_free_blocks(self) -> int:
        return self.pool.num_free

    @property
    def num_used_blocks(self) -> int:
        return self.pool.num_used

    def kv_len(self, seq_id) -> int:
        return int(self.table.kv_lens[self._row(seq_id)])

    def block_table(self, seq_id) -> np.ndarray:
        """The sequence's block ids in logical order (a copy)."""
        return self.table.blocks_of(self._row(seq_id)).copy()

    def num_tokens_stored(self) -> int:
        return int(self.table.kv_lens.sum())

    # ---- predicates ----------------------------------------------------------------
    def can_admit(self, num_tokens: int) -> bool:
        """Whether ``admit(new_id, num_tokens)`` would succeed now."""
        blocks = self.spec.blocks_for(num_tokens)
        return num_tokens >= 1 and blocks <= self.spec.max_blocks_per_seq and self.pool.can_allocate(blocks)

    def can_append(self, seq_ids: Sequence[int], num_tokens=1) -> bool:
        """Whether ``append(seq_ids, num_tokens)`` would succeed now."""
        try:
            rows, counts = self._rows_and_counts(seq_ids, num_tokens)
        except (UnknownSequenceError, DuplicateSequenceError, InvalidTokenCountError):
            return False
        new_blocks, needed = self._blocks_after(rows, counts)
        return bool(np.all(new_blocks <= self.spec.max_blocks_per_seq)) and self.pool.can_allocate(int(needed.sum()))

    # ---- actions -------------------------------------------------------------------
    def admit(self, seq_id, num_tokens: int) -> np.ndarray:
        """Register ``seq_id`` holding its first ``num_tokens`` tokens (the prompt).

        Returns the flat page slot of each of those tokens, in order, for the prefill
        write. Raises `DuplicateSequenceError`, `InvalidTokenCountError`,
        `SequenceTooLongError` or `OutOfBlocksError`, changing nothing.
        """
        seq_id = _check_seq_id(seq_id)
        if seq_id in self._rows:
            raise DuplicateSequenceError(f"seq_id={seq_id} is already admitted; release it first or pick a new id")
        n = self._check_count(num_tokens, "num_tokens")
        if n < 1:
            raise InvalidTokenCountError(f"admit(seq_id={seq_id}, num_tokens={n}): a sequence starts with >= 1 token")
        blocks = self.spec.blocks_for(n)
        if blocks > self.spec.max_blocks_per_seq:
            raise SequenceTooLongError(
                f"seq_id={seq_id} with {n} tokens needs {blocks} blocks > max_blocks_per_seq="
                f"{self.spec.max_blocks_per_seq} (max_seq_len={self.spec.max_seq_len})"
            )
        if not self.pool.can_allocate(blocks):
            raise OutOfBlocksError(blocks, self.pool.num_free, f"admit(seq_id={seq_id}, num_tokens={n})")
        row = self.table.add_row()
        self._rows[seq_id] = row
        return self._grow(np.array([row]), np.array([n]))

    def append(self, seq_ids: Sequence[int], num_tokens=1) -> np.ndarray:
        """Grow each sequence by ``num_tokens`` (an int, or one count per sequence).

        Allocates the blocks the batch needs in one pool call. Returns the flat page
        slot of every new token, sequence by sequence in the order given (the
        concatenation vLLM calls ``slot_mapping``). All or nothing.
        """
        rows, counts = self._rows_and_counts(seq_ids, num_tokens)
        new_blocks, needed = self._blocks_after(rows, counts)
        too_long = new_blocks > self.spec.max_blocks_per_seq
        if np.any(too_long):
            i = int(np.flatnonzero(too_long)[0])
            raise SequenceTooLongError(
                f"seq_id={list(seq_ids)[i]} would hold {int(self.table.kv_lens[rows[i]] + counts[i])} tokens = "
                f"{int(new_blocks[i])} blocks > max_blocks_per_seq={self.spec.max_blocks_per_seq}"
            )
        total = int(needed.sum())
        if not self.pool.can_allocate(total):
            raise OutOfBlocksError(total, self.pool.num_free, f"append to {len(rows)} sequences")
        return self._grow(rows, counts)

    def release(self, seq_id) -> int:
        """Forget ``seq_id`` and drop its hold on its blocks; returns how many became free."""
        row = self._row(seq_id)
        del self._rows[int(seq_id)]
        return int(self.pool.free(self.table.remove_row(row)).size)

    # ---- step metadata ----------------------------------------------------------------
    def step_metadata(self, seq_ids: Sequence[int], num_new_tokens=1) -> StepMetadata:
        """Describe a forward pass over ``seq_ids`` whose last ``num_new_tokens`` tokens
        (already added by `admit`/`append`) are written this step.

        Pure: reads the tables, changes nothing. Shapes are bucketed (see `bucket`).
        """
        rows, q = self._rows_and_counts(seq_ids, num_new_tokens)
        n = rows.size
        if n > self.spec.max_batch_slots:
            raise BatchTooLargeError(f"{n} sequences in one step > max_batch_slots={self.spec.max_batch_slots}")
        kv = self.table.kv_lens[rows]
        if np.any(q > kv):
            i = int(np.flatnonzero(q > kv)[0])
            raise InvalidTokenCountError(
                f"seq_id={list(seq_ids)[i]} has {int(kv[i])} tokens, fewer than num_new_tokens={int(q[i])}; "
                "admit or append them first"
            )
        nblk = self.table.num_blocks[rows]
        B = bucket(n, self.spec.max_batch_slots)
        W = bucket(int(nblk.max(initial=1)), self.spec.max_blocks_per_seq)
        T = bucket(int(q.max(initial=1)), self.spec.max_seq_len)
        bs = self.spec.block_size

        block_tables = np.full((B, W), NULL_BLOCK, dtype=np.int32)
        block_tables[:n] = self.table.block_tables[rows, :W]
        kv_lens = np.zeros(B, dtype=np.int32)
        kv_lens[:n] = kv
        query_lens = np.zeros(B, dtype=np.int32)
        query_lens[:n] = q

        t = np.arange(T, dtype=np.int32)[None, :]
        start = (kv_lens - query_lens)[:, None]
        valid = t < query_lens[:, None]
        # Padding tokens sit at the row's last real position so a causal mask built
        # from `positions` never leaves a padding query with nothing to attend to.
        positions = np.where(valid, start + t, np.maximum(kv_lens[:, None] - 1, 0)).astype(np.int32)
        blk = np.take_along_axis(block_tables, np.minimum(positions // bs, W - 1), axis=1)
        slot_mapping = np.where(valid, blk * bs + positions % bs, self.pad_slot).astype(np.int32)
        return StepMetadata(block_tables, kv_lens, query_lens, positions, slot_mapping)

    # ---- integrity -----------------------------------------------------------------
    def check_integrity(self) -> None:
        """Raise AssertionError if any invariant is broken. Tests call it after every operation.

        Invariants: every usable block is free xor referenced; ref counts equal the
        number of table entries naming the block; each row holds exactly
        ceil(len / block_size) blocks and null padding after them; rows in use are the
        rows of admitted sequences.
        """
        self.pool.check_integrity()
        self.table.check_integrity(self.spec.block_size)
        rows = np.array(sorted(self._rows.values()), dtype=np.int64)
        if not np.array_equal(rows, np.flatnonzero(self.table.in_use)):
            raise AssertionError("admitted sequences and page-table rows in use disagree")
        held = np.concatenate([self.table.blocks_of(r) for r in rows]) if rows.size else np.empty(0, np.int32)
        refs = np.bincount(held, minlength=self.spec.num_blocks).astype(np.int32)
        if not np.array_equal(refs, self.pool.ref_counts):
            bad = np.flatnonzero(refs != self.pool.ref_counts)
            raise AssertionError(f"blocks {bad.tolist()}: table references {refs[bad].tolist()} != ref counts {self.pool.ref_counts[bad].tolist()}")

    def snapshot(self) -> tuple:
        """A comparable copy of all host state (tests check a failed call left it unchanged)."""
        rows = sorted(self._rows.items())
        return (
            tuple(rows),
            tuple((sid, self.table.blocks_of(r).tobytes(), int(self.table.kv_lens[r])) for sid, r in rows),
            self.pool.ref_counts.tobytes(),
            self.pool.num_free,
        )

    # ---- internals -----------------------------------------------------------------
    def _row(self, seq_id) -> int:
        try:
            return self._rows[seq_id]
        except (KeyError, TypeError):
            raise UnknownSequenceError(f"seq_id={seq_id!r} is not admitted (held: {len(self._rows)} sequences)") from None

    def _check_count(self, value, name: str) -> int:
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
            raise InvalidTokenCountError(f"{name}={value!r} must be an integer")
        if value < 0:
            raise InvalidTokenCountError(f"{name}={value} must be >= 0")
        return int(value)

    def _rows_and_counts(self, seq_ids: Iterable[int], num_tokens) -> tuple[np.ndarray, np.ndarray]:
        seq_ids = list(seq_ids)
        rows = np.fromiter((self._row(s) for s in seq_ids), dtype=np.int64, count=len(seq_ids))
        if np.unique(rows).size != rows.size:
            raise DuplicateSequenceError(f"a sequence appears twice in one call: {seq_ids}")
        if np.ndim(num_tokens) == 0:
            counts = np.full(rows.size, self._check_count(num_tokens, "num_tokens"), dtype=np.int64)
        else:
            counts = np.asarray(num_tokens)
            if counts.shape != rows.shape or not np.issubdtype(counts.dtype, np.integer):
                raise InvalidTokenCountError(
                    f"num_tokens has shape {counts.shape} dtype {counts.dtype}; need {rows.size} integers"
                )
            if np.any(counts < 0):
                raise InvalidTokenCountError(f"num_tokens={counts.tolist()} has negative counts")
            counts = counts.astype(np.int64)
        return rows, counts

    def _blocks_after(self, rows: np.ndarray, counts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        bs = self.spec.block_size
        new_blocks = -(-(self.table.kv_lens[rows].astype(np.int64) + counts) // bs)
        return new_blocks, new_blocks - self.table.num_blocks[rows]

    def _grow(self, rows: np.ndarray, counts: np.ndarray) -> np.ndarray:
        """Allocate and record blocks for ``counts`` more tokens per row (already validated)."""
        bs = self.spec.block_size
        table = self.table
        new_blocks, needed = self._blocks_after(rows, counts)
        ids = self.pool.allocate(int(needed.sum()))
        if ids.size:
            block_rows = np.repeat(rows, needed)
            block_cols = np.repeat(table.num_blocks[rows], needed) + _segment_offsets(needed)
            table.block_tables[block_rows, block_cols] = ids
        old_lens = table.kv_lens[rows].astype(np.int64)
        table.kv_lens[rows] = old_lens + counts
        table.num_blocks[rows] = new_blocks
        tok_rows = np.repeat(rows, counts)
        pos = np.repeat(old_lens, counts) + _segment_offsets(counts)
        return (table.block_tables[tok_rows, pos // bs].astype(np.int64) * bs + pos % bs).astype(np.int32)


__all__ = ["KVCacheManager", "SeqId"]
