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
  writes the page table's lengths and new blocks and `touch`es it. Which rows take a
  block at which step follows from each row's room when the layout was written (a
  ring of ``block_size`` lists of rows), so a step evaluates no rule per row. Up to
  `SCALAR_ROWS` rows run element by element through memoryviews; more take a handful
  of vectorized calls.
* `compact` keeps a subsequence of the rows (others left), moved up in the same buffers;
* `join` writes rows joining after the last one;
* `mixed` writes a step whose rows write other than one token each beside the layout,
  which stays current for the next decode.

Rows are contiguous in each flat buffer, so a batch bucket that shrinks or grows is a
shorter or longer view of the same bytes.
"""

from __future__ import annotations

from collections.abc import Callable
from itertools import cycle
from typing import TYPE_CHECKING, Any

import numpy as np

from paged_kv.allocator.step_arrays import (
    SCALAR_ROWS,
    Buffers,
    bucket_int,
    decode_arrays,
    derived_step,
    mixed_lengths,
    room,
    slot,
    step_metadata,
)
from paged_kv.spec import NULL_BLOCK

if TYPE_CHECKING:
    from paged_kv.allocator.manager_base import ManagerBase
    from paged_kv.metadata import StepMetadata

    Tiny = tuple[memoryview, memoryview, memoryview, memoryview]
    Vector = tuple[np.ndarray, np.ndarray, np.ndarray]
    Shaped = tuple[StepMetadata, tuple[memoryview, memoryview, memoryview, memoryview], memoryview, memoryview]


class DecodeLayout:
    """The decode layout of a batch of rows of one plain manager, in `Buffers` (see the
    module docstring). ``holder`` is what the metadata names as its ``step`` (the batch:
    its last step).

    ``meta`` and ``turn`` are None until the first `write` (the batch writes a layout
    before it reads or advances one): typed as what they are from then on."""

    meta: StepMetadata
    turn: Callable[[], list[int]]

    def __init__(self, manager: ManagerBase, holder: object) -> None:
        spec = manager.spec
        self.buffers = Buffers()
        self.table, self.pool, self.pad = manager.table, manager.pool, manager.pad_slot
        self.bs, self.max_len = spec.block_size, spec.max_seq_len
        self.max_batch, self.max_width = spec.max_batch_slots, spec.max_blocks_per_seq
        self.signature = spec.pool_signature()  # the spec is immutable
        self.owner = manager.steps.tag  # `StepMetadata.owner`
        self.holder = holder
        self.meta = None  # type: ignore[assignment]  # the decode layout's StepMetadata; None: none written
        self.mixed_meta: StepMetadata | None = None  # the last mixed step's (`mixed`)
        self.rows: list[int] = []  # the layout's rows, in batch order
        self.row_array: np.ndarray | None = np.zeros(0, np.int64)
        self.born: list[int] = []  # each row's `PageTable.born` when written
        self.epoch = self.version = -1  # the table's counters the layout is valid for
        self.turn = None  # type: ignore[assignment]  # see `_keep`: the rows taking a block at the next step
        self.advance: Callable[[], bool | None] = self._advance  # see `_advance`
        self.tiny: Tiny | None = None  # what a few rows' `advance` touches
        self.vector: Vector | None = None  # what more rows' `advance` touches
        self._shapes: dict[tuple[int, int], tuple[int, StepMetadata, Any, memoryview, memoryview]] = {}  # see `_shape`
        self._pool_gens = memoryview(self.pool.generation)  # type: ignore[arg-type]  # never replaced, only written

    # ---- writing a layout ---------------------------------------------------------------
    def write(self, row_list: list[int]) -> None:
        """The decode layout of ``row_list`` (valid, non-empty rows) from the page table."""
        rows = np.array(row_list, dtype=np.int64) if len(row_list) > SCALAR_ROWS else None
        B = bucket_int(len(row_list), self.max_batch)
        arrays = decode_arrays(self.buffers, self.table, self.pool.generation, row_list, rows, B, self.max_width,
                               self.pad, self.bs)
        self.meta = self._shape(B, arrays[3].shape[1])[0]
        self._keep(row_list, rows)

    def compact(self, kept: list[int], at: list[int]) -> bool:
        """Keep only rows ``kept`` (at batch indices ``at``, in order), moved up in the same
        buffers. False (nothing written) when the table's width bucket would shrink."""
        dec = self.meta
        B0, W = dec.groups[0].block_tables.shape
        nbl = self.table.views()[2]
        if bucket_int(max([nbl[r] for r in kept]), self.max_width) != W:
            return False
        n0, n1 = len(self.rows), len(kept)
        gm = dec.groups[0]
        gens: Any  # a built layout's generations (never None)
        tables, gens = gm.block_tables, gm.block_gens
        (kv, pos, slots, q), _, _ = self._shape(B0, W)[1:]
        for i, j in enumerate(at):  # rows left before the end: move the rest up
            if i != j:
                kv[i], pos[i], slots[i] = kv[j], pos[j], slots[j]
                tables[i] = tables[j]
                gens[i] = gens[j]
        pad = self.pad
        for b in range(n1, n0):  # padding now
            kv[b] = pos[b] = q[b] = 0
            slots[b] = pad
        tables[n1:n0] = NULL_BLOCK
        gens[n1:n0] = 0
        B1 = bucket_int(n1, self.max_batch)
        if B1 != B0:  # a shorter view of the same bytes
            self.meta = self._shape(B1, W)[0]
        self._keep(kept, None)
        return True

    def join(self, new_rows: list[int]) -> bool:
        """Rows joining after the last one (their last token is this step's), written alone
        when the table's width bucket holds them (a batch bucket that grows is a longer
        view of the same bytes); False (nothing written) otherwise."""
        dec = self.meta
        n = len(self.rows)
        B0, W = dec.groups[0].block_tables.shape
        kvl, btv, nbl = self.table.views()
        if max([nbl[r] for r in new_rows]) > W:
            return False
        B1 = bucket_int(n + len(new_rows), self.max_batch)
        if B1 != B0:  # a longer view of the same bytes
            dec = self.meta = self._shape(B1, W)[0]
            self._pad_rows(dec, B0, B1)
        gm = dec.groups[0]
        (kv, pos, slots, q), _, _ = self._shape(B1, W)[1:]
        gens: Any  # as in `compact`
        bt, bs, generation, tables, gens = self.table.block_tables, self.bs, self.pool.generation, gm.block_tables, gm.block_gens
        for b, r in enumerate(new_rows, n):
            last = kvl[r] - 1
            kv[b], q[b], pos[b] = last + 1, 1, last
            slots[b] = slot(btv[r, last // bs], last, bs)
            tables[b] = bt[r, :W]  # null past the row's blocks
            generation.take(tables[b], None, gens[b], "wrap")
        self._keep(self.rows + new_rows, None)
        return True

    def mixed(self, counts: list[int]) -> StepMetadata:
        """The step writing each row's last ``counts[b]`` tokens, beside the decode layout
        (shared: lengths, tables, starts): its own query lengths, positions and slots
        derived (`step_arrays.derived_step`), so a prompt joining costs O(B), not O(B x T).
        The same object as the last mixed step when it has the same buffers and ``T``."""
        dec, last = self.meta, self.mixed_meta
        T = bucket_int(max(counts), self.max_len)
        q = mixed_lengths(self.buffers, dec.batch_size, counts)
        if not (last is not None and last.query_len == T and last.kv_lens is dec.kv_lens and last.query_lens is q
                and last.groups[0].block_tables is dec.groups[0].block_tables):
            self.mixed_meta = derived_step(dec, q, T, self.pad, self.bs, self.holder)
        return self.mixed_meta  # type: ignore[return-value]  # just set, or the last one (not None)

    def _shape(self, B: int, W: int) -> Shaped:
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
            columns = (mv("kv", (B,)), mv("pos", (B,)), mv("slot", (B,)), mv("q", (B,)))
            entry = self._shapes[(B, W)] = (buf.epoch, meta, columns, mv("tables", (B, W)), mv("gens", (B, W)))
        return entry[1:]

    def _pad_rows(self, dec: StepMetadata, lo: int, hi: int) -> None:
        """Rows ``lo .. hi`` of the layout become padding rows."""
        gm = dec.groups[0]
        dec.kv_lens[lo:hi], dec.query_lens[lo:hi], dec.positions[lo:hi] = 0, 0, 0
        gm.slot_mapping[lo:hi], gm.block_tables[lo:hi], gm.block_gens[lo:hi], gm.start[lo:hi] = (
            self.pad, NULL_BLOCK, 0, 0)

    def _keep(self, row_list: list[int], rows: np.ndarray | None) -> None:
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
        bs = self.bs
        ring: list[list[int]] = [[] for _ in range(bs)]
        if n <= SCALAR_ROWS:
            born, kvl = t.born, views[0]
            self.born = [born.item(r) for r in row_list]
            self.tiny = (kvl, *columns[:3])
            self.vector = None
            for b, r in enumerate(row_list):
                ring[room(kvl[r], bs)].append(b)
        else:
            if rows is None:
                rows = self.row_array = np.array(row_list, dtype=np.int64)
            self.born = t.born[rows].tolist()
            self.tiny = None
            self.vector = (dec.kv_lens[:n], dec.positions[:n, 0], dec.groups[0].slot_mapping[:n, 0])
            for b, x in enumerate(room(dec.kv_lens[:n], bs).tolist()):
                ring[x].append(b)
        # ring[k]: the rows (batch indices, in order) that take a block on decode step k
        # from now, 0-based: a row with room x takes one on step x (`room`), then every
        # block_size steps; `turn` walks the ring round.
        self.turn = cycle(ring).__next__
        self.advance = self._advance_one if n == 1 and self.tiny is not None else self._advance

    # ---- the in-place decode step -------------------------------------------------------
    def _advance(self) -> bool | None:
        """`advance` (the instance's, set per layout: `_advance_one` for one row).

        Append one token to every row and advance the layout in place: the fused append
        and description of a decode step. None: not possible (a row at max_seq_len, too
        few free blocks), nothing changed; True: done; False: done, but a row outgrew the
        table's width bucket (`write` the layout again)."""
        starts = self.turn()
        tiny = self.tiny
        if tiny is None:
            return self._advance_many(starts)
        if starts:
            return self._advance_few(starts)
        # A few rows, none takes a block: lengths, positions, slots + 1.
        kvl, kv_out, pos_col, slot_col = tiny
        for b, r in enumerate(self.rows):
            o = kvl[r]
            kvl[r] = kv_out[b] = o + 1
            pos_col[b] = o
            slot_col[b] += 1
        self.version = self.table.touch()
        return True

    def _advance_one(self) -> bool | None:
        """`advance` of a one-row layout (local serving), the loop unrolled."""
        starts = self.turn()
        if starts:
            return self._advance_few(starts)
        kvl, kv_out, pos_col, slot_col = self.tiny  # type: ignore[misc]  # a one-row layout has `tiny`
        r = self.rows[0]
        o = kvl[r]
        kvl[r] = kv_out[0] = o + 1
        pos_col[0] = o
        slot_col[0] += 1
        self.version = self.table.touch()
        return True

    def _advance_few(self, starts: list[int]) -> bool | None:
        """`advance` of a few rows, some of which (``starts``, batch indices in order) take a
        block: checked first, then blocks handed out in row order, as `append` hands them."""
        kvl, kv_out, pos_col, slot_col = self.tiny  # type: ignore[misc]  # a few rows: `tiny`
        ids = None if max([kv_out[b] for b in starts]) >= self.max_len else self.pool.take(len(starts))
        if ids is None:
            self._refused()
            return None
        fits = self._new_blocks(starts, ids)  # reads the old lengths: before the loop
        for b, r in enumerate(self.rows):
            o = kvl[r]
            kvl[r] = kv_out[b] = o + 1
            pos_col[b] = o
            slot_col[b] += 1
        return self._stepped(fits)

    def _advance_many(self, starts: list[int]) -> bool | None:
        """`advance` of many rows: a few vectorized calls, plus Python for the rows that take a block."""
        kv, pos, slots = self.vector  # type: ignore[misc]  # many rows: `vector`
        fits = True
        if starts:
            kv_old = self.new_block_refs[1][0]
            ids = None if max([kv_old[b] for b in starts]) >= self.max_len else self.pool.take(len(starts))
            if ids is None:
                self._refused()
                return None
            fits = self._new_blocks(starts, ids)
        np.copyto(pos, kv)
        np.add(kv, 1, out=kv)
        np.add(slots, 1, out=slots)
        self.table.kv_lens[self.row_array] = kv
        return self._stepped(fits)

    def _stepped(self, fits: bool) -> bool:
        """A step was taken: the table is touched."""
        self.version = self.table.touch()
        return fits

    def _refused(self) -> None:
        """No step (a row at max_seq_len, too few free blocks): nothing changed, but the ring
        turned, so the layout is written again before it is trusted."""
        self.version = -1

    def _new_blocks(self, grew: list[int], ids: list[int]) -> bool:
        """Give each row at batch index ``grew[i]`` block ``ids[i]`` (its next logical block,
        in the page table and the layout); its slot is set one short of the block's first
        (the caller adds 1). False when a row's new column is past the table width."""
        (_, bt, nbl), (kv_out, _, slot_col, _), tables, pool_gens, gens, width = self.new_block_refs
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
