"""`KVCacheManager`'s swapping, host side: the record of a sequence's blocks, and
its re-admission into fresh ones (`paged_kv.swap` moves the bytes).

A part of the manager class (a mixin `KVCacheManager` inherits), in its own file so
that each file holds one idea; it reads and writes the manager's own state.
"""

from __future__ import annotations

import numpy as np

from paged_kv.allocator.manager_base import ManagerBase
from paged_kv.allocator.swap_record import SwapRecord, check_record
from paged_kv.errors import DuplicateSequenceError, OutOfBlocksError, PagedKVError, StateError


class SwapMixin(ManagerBase):
    # ---- swapping (host side; `paged_kv.swap` moves the bytes) --------------------------
    def swap_record(self, seq_id: int) -> SwapRecord:
        """What `swap_out` would return, without releasing anything: the blocks to copy.
        `SlotError` while it is in a decode slot; `StateError` while a copy-on-write
        copy into one of its blocks has not been committed (the pages do not hold
        those tokens yet)."""
        row = self._row(seq_id)
        self._check_not_slotted(seq_id, "swap_out")
        if any(g.copies_into(row) for g in self.groups):
            raise StateError(
                f"swap(seq_id={seq_id}): a copy-on-write copy into its blocks has not run yet; run and commit "
                "the step that carries it (manager.commit) before swapping it out"
            )
        return SwapRecord(
            seq_id=int(seq_id),
            num_tokens=int(self.table.kv_lens[row]),
            first_blocks=tuple(int(g.table.first_block[row]) for g in self.groups),
            blocks=tuple(g.table.blocks_of(row).copy() for g in self.groups),
        )

    def swap_out(self, seq_id: int) -> SwapRecord:
        """Release ``seq_id`` and return the record `swap_in` needs to bring it back.

        Host bookkeeping only: copy the record's blocks off the device before anything
        else is written to the pool (`paged_kv.swap.swap_out` does both in order).
        """
        record = self.swap_record(seq_id)
        self.release(seq_id)
        return record

    def committed_tokens(self, seq_id: int) -> int:
        """Leading tokens of ``seq_id`` known to be on the device: with the prefix cache,
        those committed (`paged_kv.allocator.written`); without it writes are not
        tracked and nothing is ever keyed, so all of them. `paged_kv.swap` carries it
        so a swap-in never marks tokens written that no step wrote."""
        row = self._row(seq_id)
        held = int(self.table.kv_lens[row])
        return min(self._written.written.get(row, 0), held) if self.prefix_cache is not None else held

    def can_swap_in(self, record: SwapRecord) -> bool:
        """Whether ``swap_in(record)`` would succeed now."""
        try:
            seq_id, _, _, counts = check_record(record, self.spec)
        except PagedKVError:
            return False
        return seq_id not in self._rows and all(g.pool.can_allocate(n) for g, n in zip(self.groups, counts))

    def swap_in(self, record: SwapRecord) -> tuple[np.ndarray, ...]:
        """Re-admit a swapped-out sequence into fresh blocks, one set per group.

        Returns the new block ids per group, in logical order, for the copy back in.
        The sequence resumes with its length, and a local group with the same first
        block as before. The record is checked against this manager's spec first
        (`check_record`: `InvalidArgumentError`, `InvalidSequenceIdError`,
        `InvalidTokenCountError`, `SequenceTooLongError`); then `DuplicateSequenceError`
        or `OutOfBlocksError`. Any failure changes nothing. The blocks count as written
        once the bytes are back: `paged_kv.swap_in` commits those written before the
        swap-out; a caller copying the bytes itself calls ``commit([seq_id], n)`` with
        the tokens it knows were written.
        """
        seq_id, num_tokens, firsts, counts = check_record(record, self.spec)
        if seq_id in self._rows:
            raise DuplicateSequenceError(f"seq_id={seq_id} is admitted again; release it before swapping the old one in")
        for g, n in zip(self.groups, counts):
            if not g.pool.can_allocate(n):
                raise OutOfBlocksError(n, g.pool.num_free, f"swap_in(seq_id={seq_id})")
        row = self._add_row(seq_id)
        total = self.spec.blocks_for(num_tokens)
        return tuple(g.fill_row(row, first, total, num_tokens) for g, first in zip(self.groups, firsts))


__all__ = ["SwapMixin"]
