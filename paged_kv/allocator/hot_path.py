"""Hot paths of `KVCacheManager`: the common append (every sequence of a step grows by
the same few tokens, nothing forked, full-attention groups only), the fill of a
freshly admitted row, the plain step description, and the accessors a persistent
batch reads the manager through.

A part of the manager class (a mixin `KVCacheManager` inherits), in its own file so
that each file holds one idea; it reads and writes the manager's own state.

The general path plans per group with numpy over the whole batch (trims, copy-on-
write, ragged counts): ~20 numpy calls, tens of µs even for one sequence. Here a
small batch is grown element by element in Python and a large one with a handful
of vectorized calls. Anything unusual -- a bad id, a duplicate, a sequence too long,
too few free blocks, a sliding or chunked group, a fork -- returns ``None`` before changing
anything, and the general path runs instead (and raises the typed error).
The slot formula and the append rule are `paged_kv.allocator.step_arrays`' `slot` and
`room`; step arrays are that module's too.
"""

from __future__ import annotations

from collections.abc import Sequence
from operator import is_
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

import numpy as np

from paged_kv.allocator.manager_base import ManagerBase
from paged_kv.allocator.step_arrays import FRESH, blocks_for, plain_step, room, slot
from paged_kv.errors import PagedKVError

if TYPE_CHECKING:
    from paged_kv.metadata import StepMetadata

SMALL_APPEND = 20
"""Up to this many sequences the append runs per element in Python."""
MAX_TOKENS = 4
"""Tokens per sequence the fast path takes (decode, short speculative drafts)."""
_INT = {int}


def same_ids(ids: list[Any], last: list[Any] | None) -> bool:
    """``ids`` names exactly the sequences ``last`` named, element for element.

    ``==`` alone is not enough: ``[True] == [1]`` (and ``1.0 == 1``), and an alias
    must reach the general path's typed error, never act on sequence 1. The same
    int objects (a scheduler reusing its ids) pass by identity; otherwise every
    element must be a plain int.
    """
    return (
        last is not None
        and ids == last
        and (all(map(is_, ids, last)) or set(map(type, ids)) <= _INT)
    )


def _uniform_count(counts: object, n: int) -> int | None:
    """The one count a per-sequence integer array repeats (a simulator's decode step
    passes ``[1] * n`` as an array), else None."""
    if not isinstance(counts, np.ndarray) or counts.shape != (n,) or counts.dtype.kind not in "iu" or not n:
        return None
    first = counts.item(0)
    return None if np.count_nonzero(counts != first) else int(first)


class HotPathMixin(ManagerBase):
    # ---- what a persistent batch reads (`paged_kv.batch`) -----------------------------------
    @property
    def plain(self) -> bool:
        """No fork, no pending copy-on-write copy, no sliding or chunked group: appends and
        steps touch nothing but lengths, new blocks and slots (a local-attention group also
        returns blocks and starts its tables past them). The in-place paths serve this case."""
        spec = self.spec
        return (not self._forked and spec.sliding_window is None and spec.attention_chunk_size is None
                and not len(self._copies[0]))

    @property
    def rows_by_id(self) -> MappingProxyType[int, int]:
        """Sequence id -> page-table row of every admitted sequence (read-only, live)."""
        return MappingProxyType(self._rows)

    def step_rows(self, seq_ids: Sequence[int],
                  counts: int | Sequence[int] | np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
        """The rows and counts of a step over ``seq_ids`` as `step_metadata` validates them
        (admitted, distinct ids; counts ints from 0), as int64 arrays; None for bad input
        (`step_metadata` names the error). A list of distinct plain-int ids with an int
        count or a list of int counts takes C-level checks instead of numpy sorting."""
        plain_rows = self._plain_rows(seq_ids)
        if plain_rows is not None:
            n = len(plain_rows)
            if type(counts) is int:
                if 0 <= counts < 2**31:
                    return np.array(plain_rows, dtype=np.int64), np.full(n, counts, dtype=np.int64)
            elif (type(counts) is list and len(counts) == n and set(map(type, counts)) <= _INT
                  and (not n or 0 <= min(counts) and max(counts) < 2**31)):
                return np.array(plain_rows, dtype=np.int64), np.array(counts, dtype=np.int64)
        try:
            return self._rows_and_counts(seq_ids, counts)
        except PagedKVError:
            return None

    def _plain_rows(self, seq_ids: object) -> list[int] | None:
        """The rows of a list of distinct admitted plain-int ids; None for anything else."""
        if type(seq_ids) is not list or not set(map(type, seq_ids)) <= _INT:
            return None
        rows_of = self._rows
        try:
            rows = [rows_of[s] for s in seq_ids]
        except KeyError:
            return None
        return rows if len(set(rows)) == len(rows) else None

    # ---- the plain step description ------------------------------------------------------
    def _plain_step_metadata(self, seq_ids: Any, counts: Any) -> StepMetadata | None:
        """`step_metadata` of a plain manager (no copies, no local group) through the builder
        (`step_arrays.plain_step`), in fresh arrays; None when the input is bad (the general
        path then raises the typed error)."""
        rows = self._plain_rows(seq_ids)
        if rows is None:
            return None
        n, spec = len(rows), self.spec
        if n > spec.max_batch_slots:
            return None
        kvl = self.table.views()[0]
        kv = [kvl[r] for r in rows]
        if type(counts) is int:
            if not 0 <= counts <= min(kv, default=counts):
                return None
            counts = [counts] * n
        elif not (type(counts) is list and len(counts) == n and set(map(type, counts)) <= _INT
                  and all(0 <= c <= k for c, k in zip(counts, kv))):
            return None
        step = self.note_step(self.steps.next_id(), seq_ids, rows, kv)
        return plain_step(self.table, self.pool.generation, spec, self.pad_slot, rows, None, counts,
                          self.signature, step, self.steps.tag)

    # ---- appends ---------------------------------------------------------------------------
    def _fast_append(self, seq_ids: Any, num_tokens: Any) -> np.ndarray | None:
        """Grow each of ``seq_ids`` by ``num_tokens`` like `append`, or return None
        (changing nothing) when this case is not the common one."""
        if type(seq_ids) is not list:
            return None
        if type(num_tokens) is not int:
            num_tokens = _uniform_count(num_tokens, len(seq_ids))
        if num_tokens is None or not 0 < num_tokens <= MAX_TOKENS:
            return None
        if not seq_ids or not self.plain:
            return None
        rows_of = self._rows
        try:
            rows = [rows_of[s] for s in seq_ids]
        except (KeyError, TypeError):
            return None
        for s in seq_ids:
            if type(s) is not int:
                return None  # bool/float ids alias an int, numpy ids: the general path sorts them out
        if len(rows) > 1 and len(set(rows)) != len(rows):
            return None  # duplicates: the general path names them
        if len(rows) <= SMALL_APPEND:
            return self._small_decode(rows) if num_tokens == 1 else self._small(rows, num_tokens)
        return self._vector(np.array(rows, dtype=np.int64), num_tokens)

    def _small_decode(self, rows: list[int]) -> np.ndarray | None:
        """One token each, element by element: a row without `room` takes a block. Blocks go
        to rows in the order given, as in the general path."""
        spec = self.spec
        bs, limit = spec.block_size, spec.max_seq_len
        (g,) = self.groups  # no sliding layers: one full-attention group
        t = g.table
        kv, bt, nbl = t.views()
        old = [kv[r] for r in rows]
        starts = [not room(o, bs) for o in old]
        if max(old) >= limit:
            return None
        need = sum(starts)
        if need:
            ids = g.pool.take(need)
            if ids is None:  # too few free blocks (or only cached ones left): the general path evicts or raises
                return None
            k = 0
        out = []
        for r, o, start in zip(rows, old, starts):
            kv[r] = o + 1
            col = o // bs
            if start:
                bt[r, col] = ids[k]  # type: ignore[index]  # taken above when a row starts a block
                k += 1
                nbl[r] = col + 1
            out.append(slot(bt[r, col], o, bs))
        t.touch()  # rows in use changed: a cached batch layout is stale
        return np.array([out], dtype=np.int32)

    def _small(self, rows: list[int], n: int) -> np.ndarray | None:
        spec = self.spec
        bs, cap = spec.block_size, spec.max_blocks_per_seq
        (g,) = self.groups  # no sliding layers: one full-attention group
        t = g.table
        kv, bt, nbl = t.kv_lens, t.block_tables, t.num_blocks
        old = [int(kv[r]) for r in rows]
        need = 0
        for o in old:
            after = blocks_for(o + n, bs)
            if after > cap:
                return None
            need += after - blocks_for(o, bs)
        if need:
            if need > g.pool.num_free:
                return None
            ids = g.pool.allocate(need).tolist()
        out = []
        for r, o in zip(rows, old):
            kv[r] = o + n
            before, after = blocks_for(o, bs), blocks_for(o + n, bs)
            if after != before:
                bt[r, before:after] = ids[:after - before]
                del ids[:after - before]
                nbl[r] = after
            for p in range(o, o + n):
                out.append(slot(int(bt[r, p // bs]), p, bs))
        t.touch()
        return np.array([out], dtype=np.int32)

    def _vector(self, rows: np.ndarray, n: int) -> np.ndarray | None:
        if n == 1:
            return self._vector_decode(rows)
        spec = self.spec
        bs = spec.block_size
        old = self.groups[0].table.kv_lens[rows].astype(np.int64)
        if blocks_for(int(old.max()) + n, bs) > spec.max_blocks_per_seq:
            return None
        before, after = blocks_for(old, bs), blocks_for(old + n, bs)
        new = after - before  # 0 or 1 for n <= block_size; MAX_TOKENS keeps it small
        need = int(new.sum())
        if need and any(need > g.pool.num_free for g in self.groups):
            return None
        grew = np.flatnonzero(new)
        pos = (old[:, None] + np.arange(n)[None, :]).ravel() if n > 1 else old
        tok_rows = np.repeat(rows, n) if n > 1 else rows
        slots = np.empty((len(self.groups), pos.size), dtype=np.int32)
        for i, g in enumerate(self.groups):
            t = g.table
            if need:
                ids = g.pool.allocate(need)
                if int(new.max()) == 1:
                    t.block_tables[rows[grew], before[grew]] = ids
                else:  # n > block_size is excluded, but a row may still cross two boundaries
                    r_idx = np.repeat(rows[grew], new[grew])
                    c_idx = np.repeat(before[grew], new[grew]) + (
                        np.arange(need) - np.repeat(np.cumsum(new[grew]) - new[grew], new[grew]))
                    t.block_tables[r_idx, c_idx] = ids
                t.num_blocks[rows[grew]] = after[grew]
            t.kv_lens[rows] = old + n
            t.touch()
            slots[i] = t.slots(tok_rows, pos, bs)
        return slots

    def _vector_decode(self, rows: np.ndarray) -> np.ndarray | None:
        """One token each: a row without `room` takes a block."""
        spec = self.spec
        bs = spec.block_size
        old = self.groups[0].table.kv_lens[rows]
        if int(old.max()) >= spec.max_seq_len:
            return None
        col = old // bs
        grew = np.flatnonzero(room(old, bs) == 0)
        if grew.size and any(grew.size > g.pool.num_free for g in self.groups):
            return None
        slots = np.empty((len(self.groups), rows.size), dtype=np.int32)
        for i, g in enumerate(self.groups):
            t = g.table
            if grew.size:
                at = rows[grew]
                t.block_tables[at, col[grew]] = g.pool.allocate(grew.size)
                t.num_blocks[at] += 1
            t.kv_lens[rows] = old + 1
            t.touch()
            slots[i] = slot(t.block_tables[rows, col], old, bs)
        return slots

    # ---- admit and release ---------------------------------------------------------------------
    def _fill_new_row(self, row: int, n: int, blocks: int) -> np.ndarray:
        """Give a new (validated, empty) row ``blocks`` fresh blocks per group holding ``n``
        tokens; returns their slots ``[num_groups, n]``. What `_plan` + `_grow` do for a
        row that holds nothing yet -- no trim, no copy-on-write -- without their batch
        machinery, so an admit costs a few µs."""
        bs = self.spec.block_size
        slots = np.empty((len(self.groups), n), dtype=np.int32)
        for i, g in enumerate(self.groups):
            ids = g.pool.allocate(blocks)
            g.table.fill_row(row, 0, ids, n)
            slots[i] = slot(ids[:, None], g.offsets, bs).ravel()[:n]
        return slots

    def _fast_admit(self, seq_id: object, n: object) -> np.ndarray | None:
        """`admit` of a new sequence into a manager with one full-attention group and no
        prefix cache, in a few numpy calls; None (nothing changed) for anything else -- a
        bad or taken id, a bad count, too long, too few free blocks -- and the general
        path raises the typed error."""
        if type(seq_id) is not int or type(n) is not int or seq_id < 0 or n < 1 or seq_id in self._rows:
            return None
        groups = self.groups
        if len(groups) != 1:
            return None
        g = groups[0]
        pool, t, bs = g.pool, g.table, g.block_size
        blocks = blocks_for(n, bs)
        if blocks > t.max_blocks_per_seq or pool.cache is not None or not 0 < blocks <= pool.num_free:
            return None
        row = t.add_row()
        self._rows[seq_id] = row
        ids = pool.allocate(blocks)
        t.fill_row(row, 0, ids, n)
        # [blocks, bs] slots, flattened: a view of one fresh array, no second copy.
        return slot(ids[:, None], g.offsets, bs).reshape(1, -1)[:, :n]

    def _fast_release(self, seq_id: object) -> int | None:
        """`release` when no block can be shared -- one full-attention group, never forked,
        no prefix cache, no copy pending -- so every block of the row has exactly one owner
        and goes straight back to the free list; None (nothing changed) otherwise, or for
        an id that is not a plain admitted int or sits in a decode slot."""
        if type(seq_id) is not int or self._forked or len(self.groups) != 1 or (
                self._slotted and seq_id in self._slotted):
            return None
        g = self.groups[0]
        if g.pool.cache is not None or len(self._copies[0]):
            return None
        row = self._rows.pop(seq_id, None)
        if row is None:
            return None
        self._described.pop(row, None)
        blocks = g.table.remove_row(row)
        g.pool.free_unshared(blocks)
        return int(blocks.size)

    def _nothing_to_commit(self, seq_ids: object) -> bool:
        """True when `commit(seq_ids)` has nothing to do -- no copy pending in any group, no
        prefix cache -- and every id is a plain int the manager holds (anything else:
        False, and the full commit raises the typed error)."""
        if self.prefix_cache is not None or type(seq_ids) is not list:
            return False
        for copies in self._copies:
            if len(copies):
                return False
        rows_of = self._rows
        for s in seq_ids:
            if type(s) is not int or s not in rows_of:
                return False
        return True


__all__ = ["FRESH", "HotPathMixin", "MAX_TOKENS", "SMALL_APPEND", "same_ids"]
