"""`StepBatch`: step metadata kept across steps, rewritten only where a step changed it.

A serving loop asks for metadata every step, mostly for the same sequences, each one
token longer. `KVCacheManager.step_metadata` builds every array afresh: its cost
grows with batch x table width even when a single block changed. A `StepBatch` keeps
the previous step's arrays (vLLM's model runner keeps a persistent input batch the
same way) and, when the same sequences decode one token each, writes only what
moved: each row's length, position and write slot, and the table entries of rows
that gained a block. `decode` also does the step's append in the same pass.
Sequences joining or leaving, prefill rows or a different table-width bucket
rebuild the arrays (in O(B x W) gathers plus O(tokens) writes); forked sequences
with copy-on-write copies and sliding-window groups go through `step_metadata`
itself. Either way the result is exactly what `step_metadata` would return
(`tests/test_hot_path.py` compares them array for array).

The state is kept per layer group (`_GroupState`), and the step loops over groups:
each group's tables are updated from its own page table.
"""

from __future__ import annotations

from collections.abc import Sequence
from operator import is_
from typing import TYPE_CHECKING

import numpy as np

from paged_kv.allocator.hot_path import plain, same_ids
from paged_kv.errors import PagedKVError
from paged_kv.metadata import GroupMetadata, StepMetadata, bucket

if TYPE_CHECKING:  # annotations only: the manager imports this module
    from paged_kv.allocator.manager import KVCacheManager

SMALL_BATCH = 24
"""Up to this many rows a step is updated in Python rather than in vectorized numpy:
below it, numpy's fixed cost per call (~1 µs) outweighs its speed per element."""
_INT = {int}
SCALAR_ROWS = 6
"""Up to this many rows `decode` runs inline, element by element through memoryviews.
A row starting a block hands the step to the slower path, and from ~16 rows on some
row starts one most steps, so larger batches write Python lists in one call per array."""


class _GroupState:
    """One layer group's view of the batch: its page table and the blocks each row held."""

    __slots__ = ("table", "pad_slot", "num_blocks", "nb_list")

    def __init__(self, group, rows: np.ndarray):
        self.table = group.table
        self.pad_slot = group.pad_slot
        self.num_blocks = group.table.num_blocks[rows]  # per batch row, at the last step
        self.nb_list = self.num_blocks.tolist()


class StepBatch:
    """A persistent batch over one `KVCacheManager`: `step` returns what
    `manager.step_metadata` would, reusing the previous step's arrays.

    The returned metadata's arrays belong to the batch and are overwritten by the
    next `step`: hand them to the device (``meta.to_device()`` copies them) before
    asking for the next step. `step_metadata` itself is unchanged (fresh arrays).
    """

    def __init__(self, manager: KVCacheManager):
        self.manager = manager
        self._meta: StepMetadata | None = None
        self._ids: list | None = None
        self._rows: np.ndarray | None = None
        self._row_list: list = []
        self._epoch = -1
        self._table0 = manager.groups[0].table
        self._hot: tuple = ()
        self._groups: list[_GroupState] = []
        self._decode = False  # the last step was a decode step (T == 1, every query_len 1)
        self._cache = manager.prefix_cache  # fixed for the manager's life
        self._tiny: tuple | None = None  # see `_tiny_refs`
        self._described_ids: list = []

    def step(self, seq_ids: Sequence[int], num_new_tokens: int | Sequence[int] | np.ndarray = 1) -> StepMetadata:
        """Metadata for a forward pass over ``seq_ids`` writing their last
        ``num_new_tokens`` tokens (see `KVCacheManager.step_metadata`)."""
        if type(num_new_tokens) is int and num_new_tokens == 1 and self._same_batch(seq_ids) and self._advance():
            return self._meta
        return self._rebuild(seq_ids, num_new_tokens)

    def decode(self, seq_ids: Sequence[int]) -> StepMetadata:
        """``manager.append(seq_ids, 1)`` then ``step(seq_ids, 1)``, in one pass when the
        batch is the last step's: rows known, no id lookups, each row's length, new
        block and metadata written together. All or nothing like `append`."""
        tiny = self._tiny
        if tiny is not None and type(seq_ids) is list and seq_ids == self._ids:
            # A few rows: fixed costs dominate, so the whole step is inline, with every
            # reference prefetched. Every row is checked before any is written: a row
            # that starts a block leaves the whole step to the path below, unchanged.
            kvl, bt, kv_out, pos_col, slot_col, bs, rows, table, epoch = tiny
            if table.epoch == epoch and (all(map(is_, seq_ids, self._ids)) or set(map(type, seq_ids)) <= _INT):
                for r in rows:
                    if kvl[r] % bs == 0:  # a row starts a block (or is at max_seq_len): the path below
                        break
                else:
                    b = 0
                    for r in rows:
                        o = kvl[r]
                        kvl[r] = kv_out[b] = o + 1
                        pos_col[b] = o
                        slot_col[b] = bt[r, o // bs] * bs + o % bs
                        b += 1
                    if self._cache is not None:
                        self._noted()
                    return self._meta
        if self._same_batch(seq_ids):
            grown = self._decode_small() if len(self._row_list) <= SMALL_BATCH else self._decode_vector()
            if grown is not None:  # the append happened; False: patch impossible, rebuild
                if grown:
                    self._note()
                    return self._meta
                return self._rebuild(seq_ids, 1)
        self.manager.append(seq_ids, 1)
        return self.step(seq_ids, 1)

    def commit(self) -> None:
        """``manager.commit(ids)`` for the ids of the step this batch last described:
        call it after that step ran. With no copy pending and no prefix cache (and
        so nothing to record) it returns at once."""
        if self._cache is None and self._ids is not None and self._table0.epoch == self._epoch:
            return  # a plain layout, nobody forked since: no copy can be pending
        m = self.manager
        if self._cache is None and not m.num_pending_copies:
            return
        # Sequences released since the step was described have nothing left to commit.
        m.commit([s for s in self._described_ids if s in m])

    def _same_batch(self, seq_ids) -> bool:
        """``seq_ids`` is the last step's batch, nobody joined or left the manager since,
        and the metadata is in decode shape (converted from a prefill step if need be).

        The layout is kept only for a plain manager (`hot_path.plain`), and it stays
        plain while no row is added: only a fork makes copies, and a fork adds a row.
        """
        if type(seq_ids) is not list or self._table0.epoch != self._epoch or not same_ids(seq_ids, self._ids):
            return False
        if not self._decode:
            self._to_decode()
        return True

    def _to_decode(self) -> None:
        """The last step had prefill rows (T > 1): the same rows decoding need [B, 1]
        positions and slots; tables, lengths and starts carry over."""
        meta = self._meta
        n, B = len(self._row_list), meta.batch_size
        query_lens = np.zeros(B, dtype=np.int32)
        query_lens[:n] = 1
        groups = tuple(
            GroupMetadata(gm.block_tables, np.full((B, 1), g.pad_slot, dtype=np.int32), gm.start, gm.copy_src,
                          gm.copy_dst, gm.copy_len)
            for g, gm in zip(self.manager.groups, meta.groups)
        )
        # Real rows' positions and slots are written by the advance; padding rows stay 0 / dropped.
        self._meta = StepMetadata(meta.kv_lens, query_lens, np.zeros((B, 1), dtype=np.int32), groups, meta.built_for)
        self._decode = True
        self._hot = self._hot_refs()
        self._tiny = self._tiny_refs()

    def _decode_small(self) -> bool | None:
        """Fused decode of up to `SMALL_BATCH` rows; None: not possible (nothing changed),
        False: appended but the table outgrew its width bucket (the caller rebuilds).
        Python arithmetic, then one bulk write per array."""
        kvl, bt, kv_out, pos_col, slot_col, bs, _ = self._hot
        rows = self._row_list
        n = len(rows)
        old = kvl[self._rows].tolist()
        for o in old:
            if o % bs == 0:  # a new block (or at max_seq_len, a block multiple): the slower variant
                return self._decode_small_new_blocks(old)
        new = [o + 1 for o in old]
        kvl[self._rows] = new
        kv_out[:n] = new
        pos_col[:n] = old
        slot_col[:n] = [bt.item(r, o // bs) * bs + o % bs for r, o in zip(rows, old)]
        return True

    def _hot_refs(self) -> tuple:
        """What the small decode touches, looked up once per layout (a rebuild or a
        reshape), not once per step: the page table's arrays are replaced only when a
        row is added, which changes the epoch and forces a rebuild."""
        meta, t, spec = self._meta, self.manager.groups[0].table, self.manager.spec
        return (t.kv_lens, t.block_tables, meta.kv_lens, meta.positions[:, 0], meta.groups[0].slot_mapping[:, 0],
                spec.block_size, spec.max_seq_len)

    def _tiny_refs(self) -> tuple | None:
        """`_hot_refs` plus the rows and the epoch, for `decode`'s inline path: set only
        while the layout is a decode layout of at most `SCALAR_ROWS` rows."""
        if not self._decode or len(self._row_list) > SCALAR_ROWS:
            return None
        kvl, bt, kv_out, pos_col, slot_col, bs, _ = self._hot
        # Memoryviews read and write one element about twice as fast as numpy's scalar
        # indexing, which is most of a one-row step. They stay valid as long as the
        # arrays do: the page table replaces its arrays only when it grows (a new epoch)
        # and the metadata only on a rebuild, and both drop these references.
        views = tuple(memoryview(a) for a in (kvl, bt, kv_out, pos_col, slot_col))
        return (*views, bs, self._row_list, self._table0, self._epoch)

    def _decode_small_new_blocks(self, old: list) -> bool | None:
        """`_decode_small` when some row starts a block (or may be too long)."""
        m, meta = self.manager, self._meta
        spec = m.spec
        bs = spec.block_size
        need = sum(1 for o in old if o % bs == 0)
        g = m.groups[0]
        if max(old) >= spec.max_seq_len or need > g.pool.num_free:
            return None
        ids = g.pool.allocate(need).tolist()  # handed to rows in order, as append does
        kvl, bt, kv_out, pos_col, slot_col, _, _ = self._hot
        nbl = g.table.num_blocks
        tables = meta.groups[0].block_tables
        W = tables.shape[1]
        held = self._groups[0].nb_list
        rows = self._row_list
        slots, grown, k = [], [], 0
        for b, (r, o) in enumerate(zip(rows, old)):
            col, off = divmod(o, bs)
            if off:
                slots.append(bt.item(r, col) * bs + off)
            else:
                blk = ids[k]
                k += 1
                grown.append((b, r, col, blk))
                held[b] = col + 1
                slots.append(blk * bs)
        for b, r, col, blk in grown:
            bt[r, col] = blk
            nbl[r] = col + 1
            if col < W:
                tables[b, col] = blk
        n = len(rows)
        new = [o + 1 for o in old]
        kvl[self._rows] = new
        kv_out[:n] = new
        pos_col[:n] = old
        slot_col[:n] = slots
        return all(col < W for _, _, col, _ in grown)

    def _decode_vector(self) -> bool | None:
        """Fused decode over many rows, vectorized: one gather and one divmod, new blocks
        written straight into the persistent table (same contract as `_decode_small`)."""
        m, meta, rows = self.manager, self._meta, self._rows
        spec = m.spec
        bs = spec.block_size
        (g,) = m.groups
        (st,) = self._groups
        (gm,) = meta.groups
        t = g.table
        old = t.kv_lens[rows]
        if np.count_nonzero(old >= spec.max_seq_len):
            return None
        col, off = np.divmod(old, bs)
        grew = (off == 0).nonzero()[0]
        fits = True
        if grew.size:
            if grew.size > g.pool.num_free:
                return None
            ids = g.pool.allocate(grew.size)
            at, cols = rows[grew], col[grew]
            t.block_tables[at, cols] = ids
            t.num_blocks[at] = cols + 1
            st.num_blocks[grew] = cols + 1
            W = gm.block_tables.shape[1]
            if np.count_nonzero(cols >= W):
                fits = False
            else:
                gm.block_tables[grew, cols] = ids
        new = old + 1
        t.kv_lens[rows] = new
        n = rows.size
        meta.kv_lens[:n] = new
        meta.positions[:n, 0] = old
        gm.slot_mapping[:n, 0] = t.block_tables[rows, col] * bs + off
        return fits

    # ---- rebuild -------------------------------------------------------------------
    def _rebuild(self, seq_ids, num_new_tokens) -> StepMetadata:
        m = self.manager
        meta = m.step_metadata(seq_ids, num_new_tokens)  # plain managers: `plain_step_metadata` inside
        self._meta = meta
        self._decode = False
        self._tiny = None
        self._described_ids = list(seq_ids)  # valid ids: the step was described
        if type(seq_ids) is not list or not self._incremental_ok():
            self._ids = None
            return meta
        self._ids = list(seq_ids)
        self._row_list = [m._rows[s] for s in seq_ids]
        self._rows = np.array(self._row_list, dtype=np.int64)
        self._table0 = m.groups[0].table
        self._epoch = self._table0.epoch
        self._groups = [_GroupState(g, self._rows) for g in m.groups]
        self._decode = meta.query_len == 1 and bool(np.all(meta.query_lens[: len(seq_ids)] == 1))
        self._hot = self._hot_refs()
        self._tiny = self._tiny_refs()
        return meta

    def _incremental_ok(self) -> bool:
        """Whether the next decode step may be patched in place: full-attention groups
        only, and no fork (whose copy-on-write copies ride in the metadata)."""
        return plain(self.manager)

    # ---- in-place decode step ---------------------------------------------------------
    def _advance(self) -> bool:
        """Patch the last metadata for one more decode step; False: rebuild instead."""
        if not (self._advance_small() if len(self._row_list) <= SMALL_BATCH else self._advance_vector()):
            return False
        self._note()
        return True

    def _note(self) -> None:
        """What step_metadata records of a step it describes: one more description, and
        with the prefix cache each row's length, so that `commit` knows what was written."""
        self.manager._descriptions += 1
        if self._cache is not None:
            self._noted()

    def _noted(self) -> None:
        self.manager._written.describe(self._row_list, self._meta.kv_lens[: len(self._row_list)].tolist())

    def _advance_vector(self) -> bool:
        m, meta, rows = self.manager, self._meta, self._rows
        n = rows.size
        bs = m.spec.block_size
        W = meta.groups[0].block_tables.shape[1]
        held = [st.table.num_blocks[rows] for st in self._groups]
        if any(bucket(int(nb.max()), m.spec.max_blocks_per_seq) != W for nb in held):
            return False
        kv = m.groups[0].table.kv_lens[rows]
        meta.kv_lens[:n] = kv
        pos = kv.astype(np.int64) - 1
        meta.positions[:n, 0] = pos
        col, off = pos // bs, pos % bs
        for st, gm, nb in zip(self._groups, meta.groups, held):
            grew = np.flatnonzero(nb != st.num_blocks)
            if grew.size:
                # Only rows that gained a block since the last step get their table rewritten.
                gm.block_tables[grew] = st.table.block_tables[rows[grew], :W]
                st.num_blocks = nb
            gm.slot_mapping[:n, 0] = st.table.block_tables[rows, col] * bs + off
        return True

    def _advance_small(self) -> bool:
        # One group (no sliding layers); element by element, fewest numpy scalar accesses.
        m, meta = self.manager, self._meta
        spec = m.spec
        bs = spec.block_size
        (st,) = self._groups
        (gm,) = meta.groups
        t = st.table
        kvl, nbl, bt = t.kv_lens, t.num_blocks, t.block_tables
        tables, slots, kv_out, pos_out = gm.block_tables, gm.slot_mapping, meta.kv_lens, meta.positions
        W = tables.shape[1]
        held = st.nb_list
        widest = 0
        for b, r in enumerate(self._row_list):
            kv = kvl.item(r)
            kv_out[b] = kv
            pos_out[b, 0] = kv - 1
            nb = nbl.item(r)
            if nb != held[b]:
                if nb > W:
                    return False  # wider than the table bucket: rebuild
                tables[b] = bt[r, :W]
                held[b] = nb
            if nb > widest:
                widest = nb
            slots[b, 0] = bt.item(r, (kv - 1) // bs) * bs + (kv - 1) % bs
        # The same bucket step_metadata would choose (it shrinks only when rows leave).
        return bucket(widest, spec.max_blocks_per_seq) == W


def plain_step_metadata(m, seq_ids, num_new_tokens) -> StepMetadata | None:
    """`KVCacheManager.step_metadata` of a plain manager (no copies, no sliding group),
    fresh arrays, in O(B x W) gathers plus O(tokens) writes: the [B, T] arrays of a
    mixed prefill + decode step are filled with their padding in one pass, decode rows
    are written vectorized and each prefill row as one contiguous run. None when the
    input is bad (the caller lets the general path raise the typed error)."""
    spec = m.spec
    picked = _plain_rows_and_counts(m, seq_ids, num_new_tokens)
    if picked is None:
        try:
            picked = m._rows_and_counts(seq_ids, num_new_tokens)
        except PagedKVError:
            return None
    rows, q = picked
    n = rows.size
    kv = m.groups[0].table.kv_lens[rows]
    if n > spec.max_batch_slots or np.count_nonzero(q > kv):
        return None
    B = bucket(n, spec.max_batch_slots)
    T = bucket(int(q.max()) if n else 1, spec.max_seq_len)
    kv_lens = np.zeros(B, dtype=np.int32)
    kv_lens[:n] = kv
    query_lens = np.zeros(B, dtype=np.int32)
    query_lens[:n] = q
    positions = np.empty((B, T), dtype=np.int32)
    positions[:] = np.maximum(kv_lens - 1, 0)[:, None]  # padding sits at the last real position
    one = np.flatnonzero(q == 1)  # decode rows: one token each, vectorized
    many = np.flatnonzero(q > 1).tolist()  # prefill rows: a contiguous run each, row by row
    groups = tuple(_build_group(m, g, rows, q, kv, one, many, B, T) for g in m.groups)
    for b in many:
        first = int(kv[b]) - int(q[b])
        positions[b, : int(q[b])] = np.arange(first, int(kv[b]), dtype=np.int32)
    m._descriptions += 1  # as step_metadata does (no copies are pending: nothing else to note)
    if m.prefix_cache is not None:  # commit() learns what this step wrote
        m._written.describe(rows.tolist(), kv.tolist())
    return StepMetadata(kv_lens, query_lens, positions, groups, spec.pool_signature())


def _plain_rows_and_counts(m, seq_ids, counts) -> tuple[np.ndarray, np.ndarray] | None:
    """`KVCacheManager._rows_and_counts` for the shapes a serving loop passes -- a list
    of distinct admitted plain-int ids, an int count or a list of int counts -- with
    C-level checks instead of numpy sorting; None for anything else (the general
    check then runs and names the problem)."""
    if type(seq_ids) is not list or not set(map(type, seq_ids)) <= _INT:
        return None
    rows_of = m._rows
    try:
        rows = [rows_of[s] for s in seq_ids]
    except KeyError:
        return None
    n = len(rows)
    if len(set(rows)) != n:
        return None
    if type(counts) is int:
        if not 0 <= counts < 2**31:
            return None
        return np.array(rows, dtype=np.int64), np.full(n, counts, dtype=np.int64)
    if type(counts) is not list or len(counts) != n or not set(map(type, counts)) <= _INT:
        return None
    if n and not (0 <= min(counts) and max(counts) < 2**31):
        return None
    return np.array(rows, dtype=np.int64), np.array(counts, dtype=np.int64)


def _build_group(m, g, rows, q, kv, one, many: list, B: int, T: int) -> GroupMetadata:
    """One full-attention group's tables and slots for `plain_step_metadata`."""
    spec = m.spec
    bs = spec.block_size
    t = g.table
    n = rows.size
    widest = int(t.num_blocks[rows].max()) if n else 0
    tables = np.zeros((B, bucket(widest, spec.max_blocks_per_seq)), dtype=np.int32)
    tables[:n, :widest] = t.block_tables[rows, :widest]  # past a row's blocks: null already
    slots = np.full((B, T), g.pad_slot, dtype=np.int32)
    last = kv[one].astype(np.int64) - 1
    slots[one, 0] = t.block_tables[rows[one], last // bs] * bs + last % bs
    offsets = np.arange(bs, dtype=np.int64)
    for b in many:
        qb, first = int(q[b]), int(kv[b]) - int(q[b])
        blocks = t.block_tables[rows[b], first // bs : (first + qb - 1) // bs + 1].astype(np.int64)
        slots[b, :qb] = (blocks[:, None] * bs + offsets).ravel()[first % bs : first % bs + qb]
    empty = np.zeros(0, dtype=np.int32)
    return GroupMetadata(tables, slots, np.zeros(B, dtype=np.int32), empty, empty, empty)


__all__ = ["SCALAR_ROWS", "SMALL_BATCH", "StepBatch", "plain_step_metadata"]
