"""`StepBatch`: step metadata kept across steps, rewritten only where a step changed it.

A serving loop asks for metadata every step, mostly for the same sequences, each one
token longer. `KVCacheManager.step_metadata` builds every array afresh: its cost
grows with batch x table width even when a single block changed. A `StepBatch` keeps
the previous step's arrays (vLLM's model runner keeps a persistent input batch the
same way) and, when the same sequences decode one token each, writes only what
moved: each row's length, position and write slot, and the table entries of rows
that gained a block. Anything else (sequences joining or leaving, prefill rows,
a different table-width bucket, forked sequences with copy-on-write, sliding-window
groups) rebuilds through `step_metadata`, so the result is always exactly what
`step_metadata` would return.

The state is kept per layer group (`_GroupState`), and the step loops over groups:
each group's tables are updated from its own page table.
"""

from __future__ import annotations

import numpy as np

from paged_kv.allocator.hot_path import plain, same_ids
from paged_kv.errors import PagedKVError
from paged_kv.metadata import GroupMetadata, StepMetadata, bucket

SMALL_BATCH = 24
"""Up to this many rows a step is updated element by element in Python: below it,
numpy's fixed cost per call (~1 µs) outweighs its speed per element."""


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

    def __init__(self, manager):
        self.manager = manager
        self._meta: StepMetadata | None = None
        self._ids: list | None = None
        self._rows: np.ndarray | None = None
        self._row_list: list = []
        self._epoch = -1
        self._groups: list[_GroupState] = []
        self._decode = False  # the last step was a decode step (T == 1, every query_len 1)

    def step(self, seq_ids, num_new_tokens=1) -> StepMetadata:
        """Metadata for a forward pass over ``seq_ids`` writing their last
        ``num_new_tokens`` tokens (see `KVCacheManager.step_metadata`)."""
        if (
            num_new_tokens == 1
            and type(num_new_tokens) is int
            and type(seq_ids) is list
            and self._decode
            and self._epoch == self.manager.membership_epoch
            and same_ids(seq_ids, self._ids)
            and self._advance()
        ):
            return self._meta
        return self._rebuild(seq_ids, num_new_tokens)

    def decode(self, seq_ids) -> StepMetadata:
        """``manager.append(seq_ids, 1)`` then ``step(seq_ids, 1)``, in one pass when the
        batch is the last step's: rows known, no id lookups, each row's length, new
        block and metadata written together. All or nothing like `append`."""
        m = self.manager
        if (
            type(seq_ids) is list
            and self._decode
            and self._epoch == m.membership_epoch
            and same_ids(seq_ids, self._ids)
            and self._incremental_ok()
        ):
            if len(self._row_list) <= SMALL_BATCH:
                grown = self._decode_small()
            else:
                grown = self._decode_vector()
            if grown is not None:  # the append happened; False: patch impossible, rebuild
                if grown and m.prefix_cache is not None:
                    m._written.describe(self._row_list, self._meta.kv_lens[: len(self._row_list)].tolist())
                return self._meta if grown else self._rebuild(seq_ids, 1)
        m.append(seq_ids, 1)
        return self.step(seq_ids, 1)

    def _decode_small(self) -> bool | None:
        """Fused small decode; None: not possible (nothing changed), False: appended but
        the table outgrew its width bucket (the caller rebuilds)."""
        m, meta = self.manager, self._meta
        spec = m.spec
        bs, limit = spec.block_size, spec.max_seq_len
        (g,) = m.groups
        (st,) = self._groups
        (gm,) = meta.groups
        t = g.table
        kvl, nbl, bt = t.kv_lens, t.num_blocks, t.block_tables
        rows = self._row_list
        old = [kvl.item(r) for r in rows]
        need = 0
        for o in old:
            if o >= limit:
                return None
            if o % bs == 0:
                need += 1
        if need:
            if need > g.pool.num_free:
                return None
            ids = g.pool.allocate(need).tolist()
            k = 0
        tables, slots, kv_out, pos_out = gm.block_tables, gm.slot_mapping, meta.kv_lens, meta.positions
        W = tables.shape[1]
        held = st.nb_list
        fits = True
        for b, (r, o) in enumerate(zip(rows, old)):
            kvl[r] = o + 1
            col, off = divmod(o, bs)
            if off:
                blk = bt.item(r, col)
            else:  # a new block, as append hands them out: in row order
                blk = ids[k]
                k += 1
                bt[r, col] = blk
                nbl[r] = col + 1
                held[b] = col + 1
                if col < W:
                    tables[b, col] = blk
                else:
                    fits = False
            kv_out[b] = o + 1
            pos_out[b, 0] = o
            slots[b, 0] = blk * bs + off
        return fits

    def _decode_vector(self) -> bool | None:
        """Fused decode over many rows, vectorized (same contract as `_decode_small`)."""
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
        meta = self._build(seq_ids, num_new_tokens) if self._incremental_ok() else None
        if meta is None:  # copies, sliding groups, bad input: step_metadata (raises the typed error)
            meta = m.step_metadata(seq_ids, num_new_tokens)
        self._meta = meta
        self._decode = False
        if type(seq_ids) is not list or not self._incremental_ok():
            self._ids = None
            return meta
        self._ids = list(seq_ids)
        self._row_list = [m._rows[s] for s in seq_ids]
        self._rows = np.array(self._row_list, dtype=np.int64)
        self._epoch = m.membership_epoch
        self._groups = [_GroupState(g, self._rows) for g in m.groups]
        self._decode = meta.query_len == 1 and bool(np.all(meta.query_lens[: len(seq_ids)] == 1))
        return meta

    def _build(self, seq_ids, num_new_tokens) -> StepMetadata | None:
        """`step_metadata` for a plain manager (no copies, no sliding group) in O(B x W)
        gathers plus O(tokens) writes: the [B, T] arrays of a mixed prefill + decode
        step are filled with their padding in one pass, decode rows are written
        vectorized and each prefill row as one contiguous run.
        None when the input is bad (the caller lets `step_metadata` raise)."""
        m = self.manager
        spec = m.spec
        try:
            rows, q = m._rows_and_counts(seq_ids, num_new_tokens)
        except PagedKVError:
            return None
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
        last = kv.astype(np.int64) - 1
        positions[one, 0] = last[one]
        bs = spec.block_size
        offsets = np.arange(bs, dtype=np.int64)
        groups = []
        for g in m.groups:
            t = g.table
            widest = int(t.num_blocks[rows].max()) if n else 0
            tables = np.zeros((B, bucket(widest, spec.max_blocks_per_seq)), dtype=np.int32)
            tables[:n, :widest] = t.block_tables[rows, :widest]  # past a row's blocks: null already
            slots = np.full((B, T), g.pad_slot, dtype=np.int32)
            slots[one, 0] = t.block_tables[rows[one], last[one] // bs] * bs + last[one] % bs
            for b in many:
                qb, first = int(q[b]), int(kv[b]) - int(q[b])
                blocks = t.block_tables[rows[b], first // bs : (first + qb - 1) // bs + 1].astype(np.int64)
                run = (blocks[:, None] * bs + offsets).ravel()
                slots[b, :qb] = run[first % bs : first % bs + qb]
            empty = np.zeros(0, dtype=np.int32)
            groups.append(GroupMetadata(tables, slots, np.zeros(B, dtype=np.int32), empty, empty, empty))
        for b in many:
            first = int(kv[b]) - int(q[b])
            positions[b, : int(q[b])] = np.arange(first, int(kv[b]), dtype=np.int32)
        if m.prefix_cache is not None:  # as step_metadata does: commit() learns what this step wrote
            m._written.describe(rows.tolist(), kv.tolist())
        return StepMetadata(kv_lens, query_lens, positions, tuple(groups), spec.pool_signature())

    def _incremental_ok(self) -> bool:
        """Whether the next decode step may be patched in place: full-attention groups
        only, and no fork (whose copy-on-write copies ride in the metadata)."""
        return plain(self.manager)

    # ---- in-place decode step ---------------------------------------------------------
    def _advance(self) -> bool:
        """Patch the last metadata for one more decode step; False: rebuild instead."""
        if not self._incremental_ok():
            return False
        if not (self._advance_small() if len(self._row_list) <= SMALL_BATCH else self._advance_vector()):
            return False
        m = self.manager
        if m.prefix_cache is not None:  # as step_metadata does: commit() learns what this step wrote
            m._written.describe(self._row_list, self._meta.kv_lens[: len(self._row_list)].tolist())
        return True

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


__all__ = ["SMALL_BATCH", "StepBatch"]
