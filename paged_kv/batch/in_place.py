"""`InPlaceDecode`: the part of `StepBatch` that advances a decode layout in place.

When the rows of the last step each grow by one token, only each row's length,
position and write slot change (the previous slot + 1), plus the table entry of a
row that starts a block. Up to `SCALAR_ROWS` rows run inline through memoryviews;
more take a handful of vectorized calls. A mixin `StepBatch` inherits: it reads and
writes the batch's own layout state.
"""

from __future__ import annotations

import numpy as np

from paged_kv.metadata import StepMetadata


class InPlaceDecode:
    # ---- the in-place decode step -------------------------------------------------------------
    def _decode_rows(self) -> bool | None:
        """Append one token to every row of the decode layout and describe that step, in
        place: a few vectorized calls, plus Python for the rows that start a block.
        None: not possible (a row at max_seq_len, too few free blocks), nothing changed;
        False: done, but a row outgrew the table's width bucket (lay it out again)."""
        m = self.manager
        numeric, views, width = self._hot
        if numeric is None:  # a few rows: `decode` takes them inline
            return None
        kv, pos, slot, off = numeric
        bs = m.spec.block_size
        np.remainder(kv, bs, out=off)  # the new token's offset in its block: 0 starts one
        grew = np.flatnonzero(off == 0)
        fits = True
        if grew.size:
            grew, kv_old = grew.tolist(), views[3]
            if max([kv_old[b] for b in grew]) >= m.spec.max_seq_len:
                return None
            ids = self._pool.take(len(grew))
            if ids is None:
                return None
            fits = self._new_blocks(grew, ids, views, width, bs)
        np.copyto(pos, kv)
        np.add(kv, 1, out=kv)
        np.add(slot, 1, out=slot)
        t = self._table
        t.kv_lens[self._rows] = kv
        t.version = self._version = t.version + 1
        return fits

    def _inline_done(self, seq_ids: list, done: bool | None) -> StepMetadata:
        """The end of `decode` of a few rows, some starting a block, after `_start_block` /
        `_decode_inline`: when that was not possible (too few blocks, too long), through
        `append`, which raises; when a row outgrew the table width, laid out again."""
        if done is None:
            self.manager.append(seq_ids, 1)
            return self.step(seq_ids, 1)
        if not done:
            self._decode_layout(self._ids, self._row_list)
        self._note()
        return self._meta

    def _start_block(self, r: int, o: int) -> bool | None:
        """`_decode_inline` of a one-row layout whose row ``r`` (``o`` tokens) starts a block."""
        if o >= self._max_len:
            return None
        ids = self._pool.take(1)
        if ids is None:
            return None
        (_, views, width) = self._hot
        fits = self._new_blocks([0], ids, views, width, self._block_size)
        kvl, _, _, kv_out, pos_col, slot_col, _ = views
        kvl[r] = kv_out[0] = o + 1
        pos_col[0] = o
        slot_col[0] += 1
        t = self._table
        t.version = self._version = t.version + 1
        return fits

    def _decode_inline(self) -> bool | None:
        """`_decode_rows` for a few rows, element by element, when some start a block:
        the rows are checked first, then blocks are handed out in row order as
        `append` hands them. Same contract: None (nothing changed), True, or False (a row
        outgrew the table's width bucket)."""
        (_, views, width) = self._hot
        kvl, _, _, kv_out, pos_col, slot_col, _ = views
        bs, rows = self._block_size, self._row_list
        old = [kvl[r] for r in rows]
        starts = [b for b, o in enumerate(old) if not o % bs]
        if max([old[b] for b in starts]) >= self._max_len:
            return None
        ids = self._pool.take(len(starts))
        if ids is None:
            return None
        fits = self._new_blocks(starts, ids, views, width, bs)  # reads the old lengths: before the loop
        for b, (r, o) in enumerate(zip(rows, old)):
            kvl[r] = kv_out[b] = o + 1
            pos_col[b] = o
            slot_col[b] += 1
        t = self._table
        t.version = self._version = t.version + 1
        return fits

    def _new_blocks(self, grew: list, ids: list, views: tuple, width: int, bs: int) -> bool:
        """Give each row in ``grew`` (batch indices, in order) its block from ``ids``, as
        `append` hands them out; slots are set one short of the block's first (the
        caller adds 1). False when a row's new column is past the table width."""
        kvl, bt, nbl, kv_out, _, slot_col, tables = views
        pool_gens, gens = self._gen_views
        rows = self._row_list
        fits = True
        for b, blk in zip(grew, ids):
            r, col = rows[b], kv_out[b] // bs
            bt[r, col] = blk
            nbl[r] = col + 1
            slot_col[b] = blk * bs - 1
            if col < width:
                tables[b, col] = blk
                gens[b, col] = pool_gens[blk]
            else:
                fits = False
        return fits


__all__ = ["InPlaceDecode"]
