"""`DecodeLayout`: a persistent batch's step arrays, kept across steps and rewritten
only where a step changed them (the writers of `paged_kv.allocator.step_arrays`, in
reused `Buffers`).

A layout is the decode-shaped metadata of some rows of a plain manager (one
full-attention group, nothing forked): each row's length, last position and that
position's slot, its table and the tables' generations. It is valid for the page
table's counters it was written at (`epoch`, `version`, each row's ``born``); its
holder (`paged_kv.batch.StepBatch`) checks them before trusting it. Then:

* `advance` appends one token to every row and advances the layout in place -- each
  row's length, position and slot (the previous slot + 1), and the table entry of a
  row that takes a block (`room`). It is the fused ``append`` of a decode step: it
  writes the page table's lengths and new blocks and `touch`es it. Up to
  `SCALAR_ROWS` rows run element by element through memoryviews, counting down the
  steps before any row needs a block (``runway``); more take a handful of vectorized
  calls.
* `compact` keeps a subsequence of the rows (others left), moved up in the same buffers;
* `join` writes rows joining after the last one;
* `mixed` writes a step whose rows write other than one token each beside the layout,
  which stays current for the next decode.

Rows are contiguous in each flat buffer, so a batch bucket that shrinks or grows is a
shorter or longer view of the same bytes.
"""

from __future__ import annotations

import numpy as np

from paged_kv.allocator.step_arrays import (
    SCALAR_ROWS,
    Buffers,
    bucket_int,
    decode_arrays,
    mixed_arrays,
    room,
    slot,
    step_metadata,
)
from paged_kv.spec import NULL_BLOCK


class DecodeLayout:
    """The decode layout of a batch of rows of one plain manager, in `Buffers` (see the
    module docstring). ``holder`` is what the metadata names as its ``step`` (the batch:
    its last step)."""

    def __init__(self, manager, holder):
        spec = manager.spec
        self.buffers = Buffers()
        self.table, self.pool, self.pad = manager.table, manager.pool, manager.pad_slot
        self.bs, self.max_len = spec.block_size, spec.max_seq_len
        self.max_batch, self.max_width = spec.max_batch_slots, spec.max_blocks_per_seq
        self.signature = spec.pool_signature()  # the spec is immutable
        self.owner = manager.steps.tag  # `StepMetadata.owner`
        self.holder = holder
        self.meta = None  # the decode layout's StepMetadata; None: none written
        self.mixed_meta = None  # the last mixed step's (`mixed`)
        self.rows: list = []  # the layout's rows, in batch order
        self.row_array = np.zeros(0, np.int64)
        self.born: list = []  # each row's `PageTable.born` when written
        self.epoch = self.version = -1  # the table's counters the layout is valid for
        self.runway = 0  # decode steps before some row needs a block (a few rows; else 0)
        self.tiny: tuple | None = None  # what a few rows' `advance` touches
        self.vector: tuple | None = None  # what more rows' `advance` touches
        self._shapes: dict[tuple, tuple] = {}  # see `_shape`
        self._pool_gens = memoryview(self.pool.generation)  # never replaced, only written

    # ---- writing a layout ---------------------------------------------------------------
    def write(self, row_list: list) -> None:
        """The decode layout of ``row_list`` (valid, non-empty rows) from the page table."""
        rows = np.array(row_list, dtype=np.int64) if len(row_list) > SCALAR_ROWS else None
        B = bucket_int(len(row_list), self.max_batch)
        arrays = decode_arrays(self.buffers, self.table, self.pool.generation, row_list, rows, B, self.max_width,
                               self.pad, self.bs)
        self.meta = self._shape(B, arrays[3].shape[1])[0]
        self._keep(row_list, rows)

    def compact(self, kept: list, at: list) -> bool:
        """Keep only rows ``kept`` (at batch indices ``at``, in order), moved up in the same
        buffers. False (nothing written) when the table's width bucket would shrink."""
        dec = self.meta
        B0, W = dec.groups[0].block_tables.shape
        nbl = self.table.views()[2]
        if bucket_int(max([nbl[r] for r in kept]), self.max_width) != W:
            return False
        n0, n1 = len(self.rows), len(kept)
        gm = dec.groups[0]
        kv, pos, slots, tables, gens = dec.kv_lens, dec.positions[:, 0], gm.slot_mapping[:, 0], gm.block_tables, gm.block_gens
        if at[-1] != n1 - 1:  # rows left before the end: move the rest up
            sel = np.array(at, dtype=np.int64)
            kv[:n1], pos[:n1], slots[:n1], tables[:n1], gens[:n1] = kv[sel], pos[sel], slots[sel], tables[sel], gens[sel]
        kv[n1:n0], pos[n1:n0], slots[n1:n0], tables[n1:n0], gens[n1:n0] = 0, 0, self.pad, NULL_BLOCK, 0  # padding now
        dec.query_lens[n1:n0] = 0
        B1 = bucket_int(n1, self.max_batch)
        if B1 != B0:  # a shorter view of the same bytes
            self.meta = self._shape(B1, W)[0]
        self._keep(kept, None)
        return True

    def join(self, new_rows: list) -> bool:
        """Rows joining after the last one (their last token is this step's), written alone
        when the table's width bucket holds them (a batch bucket that grows is a longer
        view of the same bytes); False (nothing written) otherwise."""
        dec = self.meta
        n = len(self.rows)
        total = n + len(new_rows)
        B0, W = dec.groups[0].block_tables.shape
        kvl, btv, nbl = self.table.views()
        if max([nbl[r] for r in new_rows]) > W:
            return False
        B1 = bucket_int(total, self.max_batch)
        if B1 != B0:  # a longer view of the same bytes
            dec = self.meta = self._shape(B1, W)[0]
            self._pad_rows(dec, B0, B1)
        gm = dec.groups[0]
        bt, bs, generation = self.table.block_tables, self.bs, self.pool.generation
        for b, r in enumerate(new_rows, n):
            last = kvl[r] - 1
            dec.kv_lens[b], dec.query_lens[b], dec.positions[b, 0] = last + 1, 1, last
            gm.slot_mapping[b, 0] = slot(btv[r, last // bs], last, bs)
            gm.block_tables[b] = bt[r, :W]  # null past the row's blocks
            gm.block_gens[b] = generation[gm.block_tables[b]]
        self._keep(self.rows + new_rows, None)
        return True

    def mixed(self, counts: list):
        """The step writing each row's last ``counts[b]`` tokens, beside the decode layout
        (shared: lengths, tables, starts); the same object as the last mixed step when it
        has the same buffers."""
        dec = self.meta
        query_lens, positions, slots = mixed_arrays(self.buffers, dec, self.table.block_tables, self.rows, counts,
                                                    bucket_int(max(counts), self.max_len), self.pad, self.bs)
        gm, last = dec.groups[0], self.mixed_meta
        if not (last is not None and last.positions is positions and last.kv_lens is dec.kv_lens
                and last.groups[0].block_tables is gm.block_tables and last.groups[0].slot_mapping is slots):
            self.mixed_meta = step_metadata(dec.kv_lens, query_lens, positions, gm.block_tables, slots, gm.start,
                                            gm.block_gens, self.signature, self.holder, self.owner)
        return self.mixed_meta

    def _shape(self, B: int, W: int) -> tuple:
        """The decode layout's metadata over ``B`` rows and ``W`` table columns of the
        buffers, and the memoryviews `advance` writes through: made once per shape (and
        again when a buffer grew, replacing its views)."""
        entry = self._shapes.get((B, W))
        buf = self.buffers
        if entry is None or entry[0] != buf.epoch:
            get, mv = buf.get, buf.memoryview
            meta = step_metadata(get("kv", (B,)), get("q", (B,)), get("pos", (B, 1)), get("tables", (B, W)),
                                 get("slot", (B, 1)), get("start", (B,)), get("gens", (B, W)), self.signature,
                                 self.holder, self.owner)
            # The [B, 1] columns are the same bytes as [B] vectors.
            columns = (mv("kv", (B,)), mv("pos", (B,)), mv("slot", (B,)))
            entry = self._shapes[(B, W)] = (buf.epoch, meta, columns, mv("tables", (B, W)), mv("gens", (B, W)))
        return entry[1:]

    def _pad_rows(self, dec, lo: int, hi: int) -> None:
        """Rows ``lo .. hi`` of the layout become padding rows."""
        gm = dec.groups[0]
        dec.kv_lens[lo:hi], dec.query_lens[lo:hi], dec.positions[lo:hi] = 0, 0, 0
        gm.slot_mapping[lo:hi], gm.block_tables[lo:hi], gm.block_gens[lo:hi], gm.start[lo:hi] = self.pad, NULL_BLOCK, 0, 0

    def _keep(self, row_list: list, rows: np.ndarray | None) -> None:
        """Remember the rows just written and the table counters the layout is valid for;
        look up once what `advance` touches (memoryviews stay valid as long as their
        arrays: the table replaces its arrays only when it grows -- a new row, a new
        epoch -- and the layout's only when it is written)."""
        t, n = self.table, len(row_list)
        self.rows, self.row_array = row_list, rows
        self.epoch, self.version = t.epoch, t.version
        dec = self.meta
        B, W = dec.groups[0].block_tables.shape
        _, columns, tables, gens = self._shape(B, W)
        views = t.views()
        self.new_block_refs = (views, columns, tables, self._pool_gens, gens, W)
        if n <= SCALAR_ROWS:
            born, kvl, bs = t.born, views[0], self.bs
            self.born = [born.item(r) for r in row_list]
            self.tiny = (kvl, *columns, row_list[0] if n == 1 else None)
            self.vector = None
            self.runway = min([room(kvl[r], bs) for r in row_list])
        else:
            if rows is None:
                rows = self.row_array = np.array(row_list, dtype=np.int64)
            self.born = t.born[rows].tolist()
            self.tiny, self.runway = None, 0
            self.vector = (dec.kv_lens[:n], dec.positions[:n, 0], dec.groups[0].slot_mapping[:n, 0])

    # ---- the in-place decode step -------------------------------------------------------
    def advance(self) -> bool | None:
        """Append one token to every row and advance the layout in place: the fused append
        and description of a decode step. None: not possible (a row at max_seq_len, too
        few free blocks), nothing changed; True: done; False: done, but a row outgrew the
        table's width bucket (`write` the layout again)."""
        if self.runway:  # a few rows, none takes a block: lengths, positions, slots + 1
            self.runway -= 1
            kvl, kv_out, pos_col, slot_col, one = self.tiny
            if one is not None:  # one row (local serving): no loop
                o = kvl[one]
                kvl[one] = kv_out[0] = o + 1
                pos_col[0] = o
                slot_col[0] += 1
            else:
                for b, r in enumerate(self.rows):
                    o = kvl[r]
                    kvl[r] = kv_out[b] = o + 1
                    pos_col[b] = o
                    slot_col[b] += 1
            self.version = self.table.touch()
            return True
        if self.tiny is not None:
            return self._advance_few()
        return self._advance_many()

    def _advance_few(self) -> bool | None:
        """`advance` of a few rows, some of which take a block: every row is checked first,
        then blocks are handed out in row order, as `append` hands them."""
        kvl, kv_out, pos_col, slot_col, _ = self.tiny
        bs, rows = self.bs, self.rows
        old = [kvl[r] for r in rows]
        starts = [b for b, o in enumerate(old) if not room(o, bs)]
        if max([old[b] for b in starts]) >= self.max_len:
            return None
        ids = self.pool.take(len(starts))
        if ids is None:
            return None
        fits = self._new_blocks(starts, ids)  # reads the old lengths: before the loop
        for b, (r, o) in enumerate(zip(rows, old)):
            kvl[r] = kv_out[b] = o + 1
            pos_col[b] = o
            slot_col[b] += 1
        self.version = self.table.touch()
        self.runway = min([room(o + 1, bs) for o in old])
        return fits

    def _advance_many(self) -> bool | None:
        """`advance` of many rows: a few vectorized calls, plus Python for the rows that take a block."""
        kv, pos, slots = self.vector
        grew = np.flatnonzero(room(kv, self.bs) == 0)
        fits = True
        if grew.size:
            grew = grew.tolist()
            kv_old = self.new_block_refs[1][0]
            if max([kv_old[b] for b in grew]) >= self.max_len:
                return None
            ids = self.pool.take(len(grew))
            if ids is None:
                return None
            fits = self._new_blocks(grew, ids)
        np.copyto(pos, kv)
        np.add(kv, 1, out=kv)
        np.add(slots, 1, out=slots)
        self.table.kv_lens[self.row_array] = kv
        self.version = self.table.touch()
        return fits

    def _new_blocks(self, grew: list, ids: list) -> bool:
        """Give each row at batch index ``grew[i]`` block ``ids[i]`` (its next logical block,
        in the page table and the layout); its slot is set one short of the block's first
        (the caller adds 1). False when a row's new column is past the table width."""
        (_, bt, nbl), (kv_out, _, slot_col), tables, pool_gens, gens, width = self.new_block_refs
        rows, bs = self.rows, self.bs
        fits = True
        for b, blk in zip(grew, ids):
            r, col = rows[b], kv_out[b] // bs  # the old length: a block multiple
            bt[r, col] = blk
            nbl[r] = col + 1
            slot_col[b] = slot(blk, 0, bs) - 1
            if col < width:
                tables[b, col] = blk
                gens[b, col] = pool_gens[blk]
            else:
                fits = False
        return fits


__all__ = ["DecodeLayout"]
