"""`StepBatch`: a persistent batch -- step metadata kept across steps, rewritten only where a step changed it.

A serving loop asks for metadata every step, mostly for the same sequences, each one
token longer. `KVCacheManager.step_metadata` builds every array afresh: its cost
grows with batch x table width even when a single block changed, and a mixed
prefill step's fresh ``[B, T]`` arrays pay page faults on first touch. A `StepBatch` keeps its arrays (vLLM's model runner keeps a
persistent input batch the same way):

- ``decode(ids)`` on the last step's rows appends one token to each and rewrites,
  in place, only each row's length, position and write slot (the previous slot + 1),
  plus the table entry of the rows that started a block. Up to `SCALAR_ROWS` rows
  run inline through memoryviews; more take a handful of vectorized calls.
- ``decode(ids)`` on a subsequence of the last rows (some finished or were preempted)
  moves the kept rows up in the same buffers, without re-validating them, then decodes.
- ``step(ids, counts)``: the decode layout of its rows (rows joining the last ones are
  written alone) plus, when some row writes other than one token, the step's own
  ``[B, T]`` positions and slots beside it; the layout stays current for the next
  `decode`. Forked layouts (copy-on-write copies ride in the metadata) and
  local-attention groups go through `step_metadata` itself.

Either way the result is exactly what `step_metadata` would return
(`tests/test_hot_path.py` compares them array for array). A layout is trusted only
while the page table says nothing else touched its rows: ``epoch`` (rows added or
removed), ``version`` (any change to a row in use: an `append` outside the batch)
and ``born`` (a released row given to a new sequence) -- see `PageTable`.
"""

from __future__ import annotations

from collections.abc import Sequence
from operator import is_
from typing import TYPE_CHECKING

import numpy as np

from paged_kv.allocator.hot_path import plain, same_ids
from paged_kv.allocator.plain_metadata import EMPTY as _EMPTY, INT as _INT, bucket_int as _bucket, plain_picked as _plain_picked, run_slots as _run_slots
from paged_kv.allocator.steps import Step
from paged_kv.batch.buffers import Buffers as _Buffers, fill as _fill
from paged_kv.batch.in_place import InPlaceDecode
from paged_kv.errors import StateError
from paged_kv.metadata import GroupMetadata, StepMetadata
from paged_kv.spec import NULL_BLOCK

if TYPE_CHECKING:
    from paged_kv.allocator.manager import KVCacheManager

SCALAR_ROWS = 12
"""Up to this many rows `decode` runs inline, element by element through memoryviews
(about twice as fast as numpy scalar indexing); more rows take vectorized calls,
whose fixed cost (~1 µs a call) the per-row Python then exceeds."""


class StepBatch(InPlaceDecode):
    """A persistent batch over one `KVCacheManager`: `step` returns what
    `manager.step_metadata` would, reusing the previous step's arrays, and `decode`
    fuses ``append(ids, 1)`` with it.

    The returned metadata's arrays belong to the batch and are overwritten by the
    next `step` or `decode`: hand them to the device (``meta.to_device()`` copies them)
    before asking for the next step. `step_metadata` itself is unchanged (fresh arrays).
    """

    def __init__(self, manager: KVCacheManager):
        self.manager = manager
        self._buffers = _Buffers()
        self._meta: StepMetadata | None = None
        self._ids: list | None = None  # the layout's ids, when it may be patched in place
        self._row_list: list = []
        self._rows: np.ndarray | None = None
        self._born: list = []
        self._table = manager.groups[0].table
        self._epoch = self._version = -1
        self._decode = False  # the layout is a decode layout: [B, 1], slot = the last token's
        self._cache = manager.prefix_cache  # fixed for the manager's life
        self._hot: tuple = ()  # see `_hot_refs`
        self._tiny: tuple | None = None  # see `_hot_refs`
        self._step: Step | tuple | None = None  # see `last_step`
        self._next_id = manager.steps.next_id
        self._owner = manager.steps.owner
        self._tag = manager.steps.tag  # `StepMetadata.owner`
        self._signature = manager.spec.pool_signature()  # the spec is immutable
        self._ready: StepMetadata | None = None  # after a join: the decode layout of the same rows
        self._table_mv: tuple | None = None  # see `_table_views`
        self._last_mixed: StepMetadata | None = None  # see `_mixed_step`
        # Fixed for the manager's life, read every step.
        self._pool, self._block_size, self._max_len = manager.groups[0].pool, manager.spec.block_size, manager.spec.max_seq_len

    # ---- public ----------------------------------------------------------------------
    def step(self, seq_ids: Sequence[int], num_new_tokens: int | Sequence[int] | np.ndarray = 1) -> StepMetadata:
        """Metadata for a forward pass over ``seq_ids`` writing their last
        ``num_new_tokens`` tokens (see `KVCacheManager.step_metadata`)."""
        if type(num_new_tokens) is int and num_new_tokens == 1 and self._same_rows(seq_ids):
            # The rows appended outside the batch (or not at all): lay them out afresh.
            self._decode_layout(self._ids, self._row_list)
            self._note()
            return self._meta
        if type(num_new_tokens) is list and self._join(seq_ids, num_new_tokens):
            return self._meta
        return self._describe(seq_ids, num_new_tokens)

    def decode(self, seq_ids: Sequence[int]) -> StepMetadata:
        """``manager.append(seq_ids, 1)`` then ``step(seq_ids, 1)``, in one pass when the
        rows are the last step's or some of them. All or nothing like `append`."""
        tiny = self._tiny
        if tiny is not None and type(seq_ids) is list and seq_ids == self._ids:
            # A few rows: fixed costs dominate, so the whole step is inline (one long
            # function: a call costs ~60 ns of a ~400 ns step), with every reference
            # prefetched. Every row is checked before any is written: when a row starts
            # a block, `_inline_done` finishes the step.
            kvl, kv_out, pos_col, slot_col, bs, rows, table, epoch = tiny
            if table.version != self._version or table.epoch != epoch:
                pass  # the rows changed outside the batch: the paths below lay them out again
            elif len(rows) == 1:  # one sequence (local serving): the same step without loops
                s, r = seq_ids[0], rows[0]
                o = kvl[r]
                if o % bs and (s is self._ids[0] or type(s) is int):
                    kvl[r] = kv_out[0] = o + 1
                    pos_col[0] = o
                    slot_col[0] += 1
                    table.version = self._version = table.version + 1
                    self._note()
                    return self._meta
                if type(s) is int or s is self._ids[0]:
                    return self._inline_done(seq_ids, self._start_block(r, o))  # the row starts a block
            elif all(map(is_, seq_ids, self._ids)) or set(map(type, seq_ids)) <= _INT:
                for r in rows:
                    if not kvl[r] % bs:  # a row starts a block (or is at max_seq_len)
                        return self._inline_done(seq_ids, self._decode_inline())
                for b, r in enumerate(rows):
                    o = kvl[r]
                    kvl[r] = kv_out[b] = o + 1
                    pos_col[b] = o
                    slot_col[b] += 1
                table.version = self._version = table.version + 1
                self._note()
                return self._meta
        if self._can_patch(seq_ids) or self._kept(seq_ids):
            if self._tiny is not None and self._tiny is not tiny:
                # A few rows laid out just now: the inline path above takes them (it
                # accepts exactly the ids these checks accepted, so this recurses once).
                return self.decode(seq_ids)
            done = self._decode_rows()
            if done is not None:  # appended; False: a row outgrew the table's width bucket
                if not done:
                    self._decode_layout(self._ids, self._row_list)
                self._note()
                return self._meta
        self.manager.append(seq_ids, 1)
        return self.step(seq_ids, 1)

    @property
    def last_step(self) -> Step:
        """The `Step` this batch last described, for ``manager.commit(step)`` once it ran
        (with steps in flight, keep it before describing the next). The batch's
        metadata objects are reused, so they carry no ``step`` of their own."""
        step = self._step
        if step is None:
            raise StateError("this StepBatch has described no step yet")
        if type(step) is tuple:
            step = self._step = Step(self._owner, *step, None, self._table)
        return step

    def check_live(self) -> None:
        """`Step.check_live` of the step last described: the batch's metadata objects name
        the batch as their ``step``, so flattening them (a jitted call, `to_device`)
        refuses a step whose sequences were released since."""
        step = self._step
        if step is None or (type(step) is tuple and step[3] == self._table.epoch):
            return
        self.last_step.check_live()

    def commit(self, step: Step | None = None) -> None:
        """``manager.commit(step)``, by default for the step this batch last described:
        call it after that step ran. Sequences released since have nothing left to
        commit (``skip_released``). With no copy pending and no prefix cache (and so
        nothing to record) the default returns at once."""
        m = self.manager
        if step is None:
            if self._cache is None and (self._ids is not None and self._table.epoch == self._epoch
                                        or not m.num_pending_copies):
                return  # a plain layout, nobody forked since: no copy can be pending
            step = self.last_step
        m.commit(step, skip_released=True)

    # ---- is the layout still the manager's? -------------------------------------------------
    def _same_rows(self, seq_ids) -> bool:
        """``seq_ids`` names the layout's rows and no row was added or removed since."""
        return (type(seq_ids) is list and self._table.epoch == self._epoch
                and same_ids(seq_ids, self._ids))

    def _can_patch(self, seq_ids) -> bool:
        """`_same_rows`, and nothing touched the rows since the layout was written, so it
        can be advanced in place (in decode shape: a prefill layout is converted)."""
        if not (self._same_rows(seq_ids) and self._table.version == self._version):
            return False
        if not self._decode:
            if self._ready is not None:  # a join kept the decode layout current: O(1)
                self._meta, self._decode = self._ready, True
                self._hot_refs()
            else:
                self._decode_layout(self._ids, self._row_list)
        return True

    def _kept(self, seq_ids) -> bool:
        """``seq_ids`` is a subsequence of the layout's ids -- others finished or were
        preempted -- and each kept row is untouched since: lay the kept rows out in
        decode shape (no re-validation needed) and return True; else False."""
        old_ids = self._ids
        if (type(seq_ids) is not list or old_ids is None or not seq_ids or len(seq_ids) >= len(old_ids)
                or self._table.version != self._version or not plain(self.manager)):
            return False
        rows_of, born = self.manager._rows, self._table.born
        old_rows, old_born, n_old = self._row_list, self._born, len(old_ids)
        kept, at, i = [], [], 0
        for s in seq_ids:
            # Identity, or a plain int equal to it: an alias (True for 1) never matches.
            while i < n_old and not (old_ids[i] is s or (type(s) is int and old_ids[i] == s)):
                i += 1
            if i == n_old:
                return False
            r = old_rows[i]
            if rows_of.get(s) != r or born.item(r) != old_born[i]:
                return False  # released, and the row (or id) reused since
            kept.append(r)
            at.append(i)
            i += 1
        if not self._compact(seq_ids, kept, at):
            self._decode_layout(seq_ids, kept)
        return True

    def _compact(self, seq_ids: list, kept: list, at: list) -> bool:
        """Keep only the decode layout's rows ``at`` (batch indices, in order), moved up in
        the same buffers: rows are contiguous in each flat buffer, so a smaller batch
        bucket is a shorter view of the same bytes. False (nothing written) when there
        is no current decode layout or the table's width bucket would shrink."""
        dec = self._meta if self._decode else self._ready
        if dec is None:
            return False
        spec, g = self.manager.spec, self.manager.groups[0]
        B0, W = dec.groups[0].block_tables.shape
        nbl = self._table_views(self._table)[2]
        if _bucket(max([nbl[r] for r in kept]), spec.max_blocks_per_seq) != W:
            return False
        n0, n1 = len(self._row_list), len(kept)
        gm = dec.groups[0]
        kv, pos, slot, tables, gens = dec.kv_lens, dec.positions[:, 0], gm.slot_mapping[:, 0], gm.block_tables, gm.block_gens
        if at[-1] != n1 - 1:  # rows left before the end: move the rest up
            sel = np.array(at, dtype=np.int64)
            kv[:n1], pos[:n1], slot[:n1], tables[:n1], gens[:n1] = kv[sel], pos[sel], slot[sel], tables[sel], gens[sel]
        kv[n1:n0], pos[n1:n0], slot[n1:n0], tables[n1:n0], gens[n1:n0] = 0, 0, g.pad_slot, NULL_BLOCK, 0  # now padding rows
        dec.query_lens[n1:n0] = 0
        B1 = _bucket(n1, spec.max_batch_slots)
        get = self._buffers.get  # the layout's arrays are these buffers' views: a shorter view, the same bytes
        if B1 != B0 or dec is not self._meta:
            self._meta = StepMetadata(get("kv", (B1,)), get("q", (B1,)), get("pos", (B1, 1)), (GroupMetadata(
                get("tables", (B1, W)), get("slot", (B1, 1)), get("start", (B1,)), _EMPTY, _EMPTY, _EMPTY,
                get("gens", (B1, W)), _EMPTY, _EMPTY),), self._signature, self, self._tag)
        self._keep(list(seq_ids), kept, np.array(kept, dtype=np.int64), True)
        return True

    def _join(self, seq_ids, counts: list) -> bool:
        """Rows joining a decode layout: ``seq_ids`` is the layout's ids, each writing one
        token, then new rows with their prefill counts, and nothing else happened since
        (only those rows were added). Writes the new rows into the decode layout --
        which stays current for the next `decode` -- and the step's own ``[B, T]``
        positions and slots; the layout's rows are not read again. False (nothing
        written) for anything else: `_describe` then builds the step."""
        old, m, t = self._ids, self.manager, self._table
        if not self._decode or old is None or type(seq_ids) is not list:
            return False
        n, total = len(old), len(seq_ids)
        k = total - n
        if (k <= 0 or len(counts) != total or t.version != self._version or t.epoch - self._epoch != k
                or not plain(m) or total > m.spec.max_batch_slots or not same_ids(seq_ids[:n], old)
                or counts[:n] != [1] * n):
            return False
        new_rows = self._joining(seq_ids[n:], counts[n:])
        if new_rows is None:
            return False
        dec, rows = self._meta, self._row_list + new_rows
        width = dec.groups[0].block_tables.shape[1]
        if _bucket(total, m.spec.max_batch_slots) == dec.batch_size and max(
                [t.num_blocks.item(r) for r in new_rows]) <= width:
            self._write_joined(dec, n, new_rows)
            self._keep(list(seq_ids), rows, np.array(rows, dtype=np.int64), True)
        else:  # the batch or the table outgrew its bucket: lay every row out again (validated above)
            self._decode_layout(list(seq_ids), rows)
        self._beside_layout(counts)
        return True

    def _joining(self, ids: list, counts: list) -> list | None:
        """The rows of joining ``ids``: plain int ids admitted after the layout was
        written, distinct, each count an int from 1 to its length; None otherwise (the
        general path validates and names the error)."""
        rows_of, t, epoch = self.manager._rows, self._table, self._epoch
        rows = []
        for s, c in zip(ids, counts):
            if type(s) is not int or type(c) is not int:
                return None
            r = rows_of.get(s)
            if r is None or t.born.item(r) <= epoch or not 1 <= c <= t.kv_lens.item(r):
                return None
            rows.append(r)
        return rows if len(set(rows)) == len(rows) else None

    def _write_joined(self, dec: StepMetadata, n: int, rows: list) -> None:
        """The decode layout's entries for new rows ``n, n+1, ...``: length, last position,
        the last token's slot, table (their last prompt token is this step's last)."""
        t, bs = self._table, self.manager.spec.block_size
        gm = dec.groups[0]
        width = gm.block_tables.shape[1]
        for b, r in enumerate(rows, n):
            last = t.kv_lens.item(r) - 1
            dec.kv_lens[b], dec.query_lens[b], dec.positions[b, 0] = last + 1, 1, last
            gm.slot_mapping[b, 0] = t.block_tables.item(r, last // bs) * bs + last % bs
            gm.block_tables[b] = t.block_tables[r, :width]
            gm.block_gens[b] = self._pool.generation[gm.block_tables[b]]

    def _mixed_step(self, dec: StepMetadata, rows: list, counts: list) -> StepMetadata:
        """A step writing each row's last ``counts[b]`` tokens, from the decode layout
        ``dec`` of the same rows (shared: lengths, tables, starts): its own query
        lengths and ``[B, T]`` positions and slots. Padding sits at each row's last
        position; a one-token row's slot is the layout's, a longer row's a run."""
        spec, g = self.manager.spec, self.manager.groups[0]
        B, n = dec.batch_size, len(rows)
        T = _bucket(max(counts), spec.max_seq_len)
        new = self._buffers.get
        # Names of its own: at T = 1 the decode layout's buffers have the same shapes.
        query_lens, positions, slots = new("mq", (B,)), new("mpos", (B, T)), new("mslot", (B, T))
        query_lens[:n], query_lens[n:] = counts, 0
        np.copyto(positions, dec.positions)  # every row's padding sits at its last real position
        slots.fill(g.pad_slot)
        slots[:, 0] = dec.groups[0].slot_mapping[:, 0]  # the one-token rows' slot (padding rows: dropped)
        for b, c in enumerate(counts):
            if c == 1:
                continue
            if c == 0:
                slots[b, 0] = g.pad_slot
                continue
            end = int(dec.kv_lens[b])
            positions[b, :c] = np.arange(end - c, end, dtype=np.int32)
            slots[b, :c] = _run_slots(g, rows[b], end - c, c)
        gm = dec.groups[0]
        last = self._last_mixed  # the same buffers as the last mixed step: the same object
        if (last is not None and last.positions is positions and last.kv_lens is dec.kv_lens
                and last.groups[0].block_tables is gm.block_tables and last.groups[0].slot_mapping is slots):
            return last
        self._last_mixed = StepMetadata(dec.kv_lens, query_lens, positions, (GroupMetadata(
            gm.block_tables, slots, gm.start, _EMPTY, _EMPTY, _EMPTY, gm.block_gens, _EMPTY, _EMPTY),),
            self._signature, self, self._tag)
        return self._last_mixed

    def _beside_layout(self, counts: list) -> None:
        """After the decode layout of a step's rows: the step itself -- that layout when
        every row writes one token, else its own arrays beside it (the layout stays
        current for the next `decode`) -- noted as described."""
        if max(counts) != 1 or min(counts) != 1:
            dec = self._meta
            self._meta, self._decode, self._ready = self._mixed_step(dec, self._row_list, counts), False, dec
            self._hot_refs()
        self._note()

    # ---- writing a layout ---------------------------------------------------------------
    def _describe(self, seq_ids, num_new_tokens) -> StepMetadata:
        """Any step. A plain manager: the decode layout of its rows, then (when some row
        writes other than one token) the step's own arrays beside it, all in the batch's
        buffers; the layout stays current for the next `decode`. Otherwise, and for
        bad input (the typed error), `step_metadata` itself."""
        m = self.manager
        picked = _plain_picked(m, seq_ids, num_new_tokens) if plain(m) else None
        if picked is not None:
            rows, q = picked
            kv = m.groups[0].table.kv_lens[rows]
            if rows.size and rows.size <= m.spec.max_batch_slots and not np.count_nonzero(q > kv):
                self._decode_layout(list(seq_ids), rows.tolist())
                self._beside_layout(q.tolist())
                return self._meta
        self._ids = self._tiny = self._ready = None
        self._meta = m.step_metadata(seq_ids, num_new_tokens)  # raises the typed error, if any
        self._step = self._meta.step
        return self._meta

    def _decode_layout(self, seq_ids: list, row_list: list) -> None:
        """The decode-shaped metadata of ``row_list`` (valid rows of a plain manager)
        from the page table, into the buffers: each row's last token is this step's."""
        spec, g = self.manager.spec, self.manager.groups[0]  # plain: full attention only, one group
        t = g.table
        rows = np.array(row_list, dtype=np.int64)
        n = rows.size
        kv, last, slot, widest = self._last_tokens(row_list, rows)
        B, W = _bucket(n, spec.max_batch_slots), _bucket(widest, spec.max_blocks_per_seq)
        get, mv = self._buffers.get, self._buffers.memoryview
        kv_lens, query_lens, positions = get("kv", (B,)), get("q", (B,)), get("pos", (B, 1))
        tables, slots, start = get("tables", (B, W)), get("slot", (B, 1)), get("start", (B,))
        if n <= SCALAR_ROWS:  # a few rows: element writes beat numpy's ~1 µs per call
            for name, values, pad in (("kv", kv, 0), ("q", [1] * n, 0), ("pos", last, 0), ("slot", slot, g.pad_slot),
                                      ("start", (), 0)):
                _fill(mv(name, (B,)), values, pad)
        else:
            kv_lens[:n], kv_lens[n:] = kv, 0
            query_lens[:n], query_lens[n:] = 1, 0
            positions[:n, 0], positions[n:] = last, 0
            slots[:n, 0], slots[n:] = slot, g.pad_slot
            start[:] = 0
        tables[:n, :widest] = t.block_tables[rows, :widest]  # past a row's blocks: null
        tables[:n, widest:], tables[n:] = NULL_BLOCK, NULL_BLOCK
        gens = get("gens", (B, W))
        np.take(self._pool.generation, tables, out=gens)  # what each block is now (see `GroupMetadata.block_gens`)
        meta = self._meta
        if not (meta is not None and meta.kv_lens is kv_lens and meta.positions is positions
                and meta.groups[0].block_tables is tables and meta.groups[0].slot_mapping is slots
                and meta.groups[0].block_gens is gens):
            self._meta = StepMetadata(kv_lens, query_lens, positions, (GroupMetadata(
                tables, slots, start, _EMPTY, _EMPTY, _EMPTY, gens, _EMPTY, _EMPTY),), self._signature, self, self._tag)
        self._keep(list(seq_ids), row_list, rows, True)

    def _last_tokens(self, row_list: list, rows: np.ndarray) -> tuple:
        """Each row's length, last position and that position's slot, and the most blocks
        a row holds: Python lists for a few rows, numpy arrays for more."""
        t, bs = self._table, self._block_size
        if len(row_list) <= SCALAR_ROWS:
            kvl, btv, nbl = self._table_views(t)
            kv = [kvl[r] for r in row_list]
            last = [k - 1 for k in kv]
            return kv, last, [btv[r, p // bs] * bs + p % bs for r, p in zip(row_list, last)], max(
                [nbl[r] for r in row_list])
        kv = t.kv_lens[rows]
        last = kv - 1
        return kv, last, t.block_tables[rows, last // bs] * bs + last % bs, int(t.num_blocks[rows].max())

    def _keep(self, seq_ids: list, row_list: list, rows: np.ndarray, decode: bool) -> None:
        """Remember the layout just written and the table counters it is valid for."""
        t = self.manager.groups[0].table
        if not row_list:  # an empty step: nothing to patch later
            self._ids = self._tiny = self._ready = None
            return
        self._ids = seq_ids
        self._row_list, self._rows = row_list, rows
        self._born = t.born[rows].tolist()
        self._table, self._epoch, self._version = t, t.epoch, t.version
        self._decode = decode
        self._ready = None
        self._hot_refs()

    def _hot_refs(self) -> None:
        """What `decode` touches, looked up once per layout rather than once per step.

        Memoryviews read and write one element about twice as fast as numpy's scalar
        indexing, which is most of a small step. They stay valid as long as the arrays
        do: the page table replaces its arrays only when it grows (a new row: a new
        epoch) and the metadata only when a layout is written, and both rebuild these."""
        self._tiny = None
        if not self._decode:
            return
        meta, t, n, buf = self._meta, self._table, len(self._row_list), self._buffers
        B, W = meta.groups[0].block_tables.shape
        # The decode layout's arrays are the buffers' "kv", "pos", "slot", "tables"; a
        # [B, 1] column is the same bytes as a [B] vector.
        # The vectorized step's numpy views; a few rows never take that step (see `decode`).
        numeric = None if n <= SCALAR_ROWS else (buf.get("kv", (B,))[:n], buf.get("pos", (B, 1))[:n, 0],
                                                   buf.get("slot", (B, 1))[:n, 0], buf.get("off", (n,)))
        views = (*self._table_views(t), buf.memoryview("kv", (B,)), buf.memoryview("pos", (B,)),
                 buf.memoryview("slot", (B,)), buf.memoryview("tables", (B, W)))
        self._hot = (numeric, views, W)
        # `_new_blocks` gives a new table entry its block's generation.
        self._gen_views = (memoryview(self._pool.generation), buf.memoryview("gens", (B, W)))
        if n <= SCALAR_ROWS:
            kvl, _, _, kv_out, pos_col, slot_col, _ = views
            self._tiny = (kvl, kv_out, pos_col, slot_col, self.manager.spec.block_size, self._row_list, t, self._epoch)

    def _table_views(self, t) -> tuple:
        """Memoryviews of the page table's lengths, blocks and block counts, made again
        only when the table replaced its arrays (it grew)."""
        arrays = (t.kv_lens, t.block_tables, t.num_blocks)
        cached = self._table_mv
        if cached is None or any(a is not b for a, b in zip(arrays, cached[0])):
            cached = self._table_mv = (arrays, tuple(memoryview(a) for a in arrays))
        return cached[1]

    def _note(self) -> None:
        """What step_metadata records of a step it describes: its number and, with the
        prefix cache, each row's length (its `Step`, so that `commit` knows what was
        written). Without the cache the `Step` is made only if asked for (`last_step`):
        a decode step pays for a number and a tuple."""
        sid = self._next_id()
        if self._cache is None:
            self._step = (sid, self._ids, self._row_list, self._table.epoch)
        else:
            self._step = self.manager.note_step(sid, self._ids, self._row_list,
                                                self._meta.kv_lens[: len(self._row_list)])


__all__ = ["SCALAR_ROWS", "StepBatch"]
