"""`StepBatch`: a persistent batch -- step metadata kept across steps, rewritten only where a step changed it.

A serving loop asks for metadata every step, mostly for the same sequences, each one
token longer. `KVCacheManager.step_metadata` builds every array afresh: its cost
grows with batch x table width even when a single block changed, and a mixed
prefill step's fresh ``[B, T]`` arrays pay page faults on first touch. A `StepBatch`
keeps its arrays (vLLM's model runner keeps a persistent input batch the same way),
in a `DecodeLayout` (`paged_kv.allocator.decode_layout`, written by the one builder
of step arrays, `paged_kv.allocator.step_arrays`):

- ``decode(ids)`` on the last step's rows appends one token to each and advances the
  layout in place (`DecodeLayout.advance`).
- ``decode(ids)`` on a subsequence of the last rows (some finished or were preempted)
  moves the kept rows up in the same buffers, without re-validating them, then decodes.
- ``step(ids, counts)``: the decode layout of its rows (rows joining the last ones are
  written alone) plus, when some row writes other than one token, the step's own
  ``[B, T]`` positions and slots beside it; the layout stays current for the next
  `decode`. Forked layouts (copy-on-write copies ride in the metadata) and
  local-attention groups go through `step_metadata` itself.

Either way the result is exactly what `step_metadata` would return
(`tests/test_hot_path.py` compares them array for array). The batch decides when the
layout is still the manager's: it is trusted only while the page table says nothing
else touched its rows -- ``epoch`` (rows added or removed), ``version`` (any change to
a row in use: an `append` outside the batch) and ``born`` (a released row given to a
new sequence), see `PageTable` -- and only for the ids it was written for.
"""

from __future__ import annotations

from collections.abc import Sequence
from operator import is_
from typing import TYPE_CHECKING

import numpy as np

from paged_kv.allocator.decode_layout import DecodeLayout
from paged_kv.allocator.hot_path import same_ids
from paged_kv.allocator.steps import Step
from paged_kv.errors import StateError
from paged_kv.metadata import StepMetadata

if TYPE_CHECKING:
    from paged_kv.allocator.manager import KVCacheManager

_INT = {int}

if TYPE_CHECKING:
    # A decode step's `Step`, before it is made (`last_step` makes it): number, ids, rows, epoch.
    _Pending = tuple[int, list[int], list[int], int]


class StepBatch:
    """A persistent batch over one `KVCacheManager`: `step` returns what
    `manager.step_metadata` would, reusing the previous step's arrays, and `decode`
    fuses ``append(ids, 1)`` with it.

    The returned metadata's arrays belong to the batch and are overwritten by the
    next `step` or `decode`: read them (or keep ``meta.to_device()``) before asking for
    the next step. A jitted call copies them as it takes them (``reuses_buffers``: see
    `paged_kv.metadata`), so a step still running on the device when the next one is
    described keeps its own. `step_metadata` itself is unchanged (fresh arrays).
    """

    reuses_buffers = True  # flattening this batch's metadata copies its arrays (`paged_kv.metadata._copied`)

    def __init__(self, manager: KVCacheManager) -> None:
        self.manager = manager
        self._layout = DecodeLayout(manager, self)  # the metadata it writes names the batch as its step
        self._table = manager.table
        self._meta: StepMetadata | None = None  # what the last step returned
        self._ids: list[int] | None = None  # the layout's ids, while it is the manager's rows' layout
        self._step: Step | _Pending | None = None  # see `last_step`
        self._next_id = manager.steps.next_id
        self._rest = (manager.steps.owner, None, manager.table)  # a `Step`'s owner, lengths and table
        self._cache = manager.prefix_cache  # fixed for the manager's life
        self._max_batch = manager.spec.max_batch_slots

    # ---- public ----------------------------------------------------------------------
    def step(self, seq_ids: Sequence[int], num_new_tokens: int | Sequence[int] | np.ndarray = 1) -> StepMetadata:
        """Metadata for a forward pass over ``seq_ids`` writing their last
        ``num_new_tokens`` tokens (see `KVCacheManager.step_metadata`)."""
        lay = self._layout
        if type(num_new_tokens) is int and num_new_tokens == 1 and self._same_rows(seq_ids):
            if self._table.version != lay.version:  # the rows grew outside the batch: lay them out afresh
                lay.write(lay.rows)
            self._meta = lay.meta
            self._note()
            return self._meta
        if type(num_new_tokens) is list and self._join(seq_ids, num_new_tokens):
            return self._meta  # type: ignore[return-value]  # `_join` wrote it
        return self._describe(seq_ids, num_new_tokens)

    def decode(self, seq_ids: Sequence[int]) -> StepMetadata:
        """``manager.append(seq_ids, 1)`` then ``step(seq_ids, 1)``, in one pass when the
        rows are the last step's or some of them. All or nothing like `append`."""
        ids = self._ids
        if type(seq_ids) is list and seq_ids == ids:
            lay, t = self._layout, self._table
            # The same rows, untouched since; an id equal to the layout's but of another
            # type (True for 1) never matches: the general path raises for it.
            if (t.version == lay.version and t.epoch == lay.epoch
                    and ((len(ids) == 1 and seq_ids[0] is ids[0]) or all(map(is_, seq_ids, ids))
                         or set(map(type, seq_ids)) <= _INT)):
                done = lay.advance()
                if done:  # the common step, straight through
                    if self._cache is None:
                        self._step = (self._next_id(), ids, lay.rows, t.epoch)
                    else:
                        self._note()
                    self._meta = lay.meta
                    return self._meta
                return self._advanced(seq_ids, done)
        elif self._kept(seq_ids):  # a list (checked there)
            return self._advanced(seq_ids, self._layout.advance())  # type: ignore[arg-type]
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
            step = self._step = tuple.__new__(Step, step + self._rest)  # the tuple layout `Step` documents
        return step  # type: ignore[return-value]  # a tuple was made a Step above

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
        if step is None:
            if self._cache is None and (self._ids is not None and self._table.epoch == self._layout.epoch
                                        or not self.manager.num_pending_copies):
                return  # a plain layout, nobody forked since: no copy can be pending
            step = self.last_step
        self.manager.commit(step, skip_released=True)

    # ---- the layout's rows ------------------------------------------------------------------
    def _advanced(self, seq_ids: list[int], done: bool | None) -> StepMetadata:
        """The end of `decode` of the layout's rows after `DecodeLayout.advance` returned
        ``done``; None: not possible (too few free blocks, too long), nothing changed:
        through `append`, which raises; False: a row outgrew the table's width bucket:
        laid out again."""
        lay = self._layout
        if done is None:
            self.manager.append(seq_ids, 1)
            return self.step(seq_ids, 1)
        if not done:
            lay.write(lay.rows)
        self._meta = lay.meta
        self._note()
        return self._meta

    def _same_rows(self, seq_ids: Sequence[int]) -> bool:
        """``seq_ids`` names the layout's rows and no row was added or removed since."""
        return type(seq_ids) is list and self._table.epoch == self._layout.epoch and same_ids(seq_ids, self._ids)

    def _kept(self, seq_ids: Sequence[int]) -> bool:
        """``seq_ids`` is a subsequence of the layout's ids -- others finished or were
        preempted -- and each kept row is untouched since: lay the kept rows out (no
        re-validation needed) and return True; else False."""
        old_ids, lay, m = self._ids, self._layout, self.manager
        if (type(seq_ids) is not list or old_ids is None or not seq_ids or len(seq_ids) >= len(old_ids)
                or self._table.version != lay.version or not m.plain):
            return False
        rows_of, born = m.rows_by_id, self._table.born
        old_rows, old_born, n_old = lay.rows, lay.born, len(old_ids)
        kept: list[int] = []
        at: list[int] = []
        i = 0
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
        if not lay.compact(kept, at):
            lay.write(kept)
        self._ids = list(seq_ids)
        return True

    def _join(self, seq_ids: Sequence[int], counts: list[int]) -> bool:
        """Rows joining the layout: ``seq_ids`` is the layout's ids, each writing one token,
        then new rows with their prefill counts, and nothing else happened since (only
        those rows were added). Writes the new rows into the layout -- which stays
        current for the next `decode` -- and the step beside it; the layout's rows are
        not read again. False (nothing written) for anything else: `_describe` then
        builds the step."""
        old, m, t, lay = self._ids, self.manager, self._table, self._layout
        if old is None or type(seq_ids) is not list:
            return False
        n, total = len(old), len(seq_ids)
        k = total - n
        if (k <= 0 or len(counts) != total or t.version != lay.version or t.epoch - lay.epoch != k
                or not m.plain or total > self._max_batch or not same_ids(seq_ids[:n], old)
                or counts[:n] != [1] * n):
            return False
        new_rows = self._joining(seq_ids[n:], counts[n:])
        if new_rows is None:
            return False
        if not lay.join(new_rows):  # the table outgrew its width bucket: lay every row out again
            lay.write(lay.rows + new_rows)
        self._ids = list(seq_ids)
        self._beside(counts)
        return True

    def _joining(self, ids: Sequence[int], counts: list[int]) -> list[int] | None:
        """The rows of joining ``ids``: plain int ids admitted after the layout was
        written, distinct, each count an int from 1 to its length; None otherwise (the
        general path validates and names the error)."""
        rows_of, t, epoch = self.manager.rows_by_id, self._table, self._layout.epoch
        rows: list[int] = []
        for s, c in zip(ids, counts):
            if type(s) is not int or type(c) is not int:
                return None
            r = rows_of.get(s)
            if r is None or t.born.item(r) <= epoch or not 1 <= c <= t.kv_lens.item(r):
                return None
            rows.append(r)
        return rows if len(set(rows)) == len(rows) else None

    def _describe(self, seq_ids: Sequence[int], num_new_tokens: int | Sequence[int] | np.ndarray) -> StepMetadata:
        """Any step. A plain manager: the decode layout of its rows, then the step beside
        it. Otherwise, and for bad input (the typed error), `step_metadata` itself."""
        m = self.manager
        picked = m.step_rows(seq_ids, num_new_tokens) if m.plain else None
        if picked is not None:
            rows, q = picked
            if rows.size and rows.size <= self._max_batch and not np.count_nonzero(q > self._table.kv_lens[rows]):
                self._layout.write(rows.tolist())
                self._ids = list(seq_ids)
                self._beside(q.tolist())
                return self._meta  # type: ignore[return-value]  # `_beside` wrote it
        self._ids = None
        self._meta = m.step_metadata(seq_ids, num_new_tokens)  # raises the typed error, if any
        self._step = self._meta.step  # type: ignore[assignment]  # step_metadata's metadata carries its Step
        return self._meta

    def _beside(self, counts: list[int]) -> None:
        """After the layout of a step's rows: the step itself -- the layout when every row
        writes one token, else its own arrays beside it -- noted as described."""
        lay = self._layout
        self._meta = lay.meta if max(counts) == 1 and min(counts) == 1 else lay.mixed(counts)
        self._note()

    def _note(self) -> None:
        """What step_metadata records of a step it describes: its number and, with the
        prefix cache, each row's length (its `Step`, so that `commit` knows what was
        written). Without the cache the `Step` is made only if asked for (`last_step`):
        a decode step pays for a number and a tuple."""
        sid = self._next_id()
        rows = self._layout.rows
        # Called only after the layout's ids and the step's metadata were written.
        if self._cache is None:
            self._step = (sid, self._ids, rows, self._table.epoch)  # type: ignore[assignment]
        else:
            self._step = self.manager.note_step(sid, self._ids, rows, self._meta.kv_lens[: len(rows)])  # type: ignore[arg-type, union-attr]


__all__ = ["StepBatch"]
