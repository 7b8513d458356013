"""`KVCacheManager`'s commits: the device has run a step (`paged_kv.allocator.steps`).

A part of the manager class (a mixin `KVCacheManager` inherits), in its own file so
that each file holds one idea; it reads and writes the manager's own state.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from paged_kv.allocator.manager_base import ManagerBase
from paged_kv.allocator.seq_ids import id_list
from paged_kv.allocator.steps import Step, stale_error
from paged_kv.errors import InvalidArgumentError, InvalidTokenCountError, StepError
from paged_kv.metadata import StepMetadata


class CommitMixin(ManagerBase):
    # ---- commit: the device has run a step ------------------------------------------------
    def commit(self, seq_ids: Step | StepMetadata | Sequence[int],
               num_tokens: int | Sequence[int] | np.ndarray | None = None, *, skip_released: bool = False) -> None:
        """Tell the manager a described step has run: its keys and values are in the pages.

        Call it after every forward pass. It retires that step's copy-on-write copies
        and, with the prefix cache, makes the newly written full blocks hittable: no
        block is ever offered to another request before it is written. Skipping it is
        safe but wasteful (copies are re-run, nothing gets cached).

        * ``commit(step)`` (a `Step`, or the `StepMetadata` carrying it as ``.step``):
          exactly that step ran. Several steps may be in flight (an overlap scheduler
          describes step N+1 while N runs); each commit covers only what its step
          wrote. `StepError` for another manager's step, one committed already, or one
          older than a step committed since; `StaleStepError` when a sequence of the
          step was released since -- ``skip_released=True`` then commits the others.
          See `paged_kv.allocator.steps`.
        * ``commit(seq_ids)``: the step last described for each of ``seq_ids`` ran (the
          synchronous form: with a step in flight, commit the `Step` instead).
        * ``commit(seq_ids, num_tokens)`` (an int or one per sequence): that many leading
          tokens are written, for pages filled outside a step (your own kernel, a
          contiguous prefill).

        `UnknownSequenceError` / `InvalidTokenCountError` / `StepError`, changing nothing.
        """
        if type(seq_ids) is Step and num_tokens is None:
            # The async decode step's commit, inline: this manager's, the next in order,
            # no row released since, no copy pending, no cache to key (lengths None).
            step_id, _, _, epoch, owner, lengths, _ = seq_ids  # one unpack: the fields' properties cost more
            log = self.steps
            if (lengths is None and owner == log.owner and log.committed < step_id <= log.described
                    and epoch == log.table.epoch  # type: ignore[union-attr]  # the manager's log has a table
                    and not any(map(len, self._copies))):
                log.committed = step_id
                return
        elif num_tokens is None and self._nothing_to_commit(seq_ids):
            return  # no copy pending, no prefix cache: a valid commit changes nothing
        if isinstance(seq_ids, StepMetadata):
            holder = seq_ids.step
            if holder is None:
                raise StepError("this StepMetadata carries no step (to_device and tree maps drop it): "
                                "commit the meta.step you kept, or the seq_ids")
            # A StepBatch's reused metadata names the batch: its last step is this one.
            seq_ids = holder if isinstance(holder, Step) else holder.last_step  # type: ignore[attr-defined]  # a StepBatch
        if isinstance(seq_ids, Step):
            if num_tokens is not None:
                raise InvalidArgumentError("commit(step, num_tokens): a step says what it wrote; num_tokens goes "
                                           "with a list of seq_ids")
            return self._commit_step(seq_ids, bool(skip_released))
        seq_ids = id_list(seq_ids)
        rows = [self._row(s) for s in seq_ids]
        lengths = [None] * len(rows)
        if num_tokens is not None:
            _, counts = self._rows_and_counts(seq_ids, num_tokens)
            kv = self.table.kv_lens[np.asarray(rows, np.int64)] if rows else np.zeros(0, np.int32)
            if np.any(counts > kv):
                i = int(np.flatnonzero(counts > kv)[0])
                raise InvalidTokenCountError(
                    f"commit(seq_id={seq_ids[i]}, num_tokens={int(counts[i])}): it holds only {int(kv[i])} tokens"
                )
            lengths = counts.tolist()
        # Explicit lengths say what some writer put in the pages, not that the last
        # described step (and its copies) ran: only a plain commit retires copies.
        ran = max((self._described.pop(row, 0) for row in rows), default=0) if num_tokens is None else 0
        if ran:
            for g in self.groups:
                g.retire_copies(ran)
        if self.prefix_cache is not None:
            for row, length in zip(rows, lengths):
                self._written.commit(row, length)
                self._key_written(row)

    def _commit_step(self, step: Step, skip_released: bool) -> None:
        gone = self.steps.check(step)
        if gone and not skip_released:
            raise stale_error(step, gone)
        self.steps.committed = step.id
        for g, copies in zip(self.groups, self._copies):
            if len(copies):
                g.retire_copies(step.id)
        if step.lengths is not None:  # the prefix cache is on: key what the step wrote
            skip = set(gone)
            for i, (row, length) in enumerate(zip(np.asarray(step.rows).tolist(), step.lengths)):
                if i not in skip:
                    self._written.commit(row, length)
                    self._key_written(row)

    def note_step(self, step_id: int, seq_ids: Sequence[int], rows: Sequence[int] | np.ndarray,
                  lengths: Sequence[int] | np.ndarray) -> Step:
        """Record step ``step_id`` (from ``steps.next_id()``) over ``rows`` (the rows of
        ``seq_ids``, in batch order) leaving ``lengths`` tokens each, and return its
        `Step`. For the builders of step metadata (`StepBatch`, `DecodeSlots`); with the
        prefix cache the synchronous ``commit(seq_ids)`` reads the per-row note."""
        cached = self.prefix_cache is not None
        if cached:
            lengths = lengths.tolist() if isinstance(lengths, np.ndarray) else list(lengths)
            self._written.describe(rows.tolist() if isinstance(rows, np.ndarray) else rows, lengths)
        return self.steps.step(step_id, seq_ids, rows, self.table.epoch,
                               lengths if cached else None)  # type: ignore[arg-type]  # a list when cached


__all__ = ["CommitMixin"]
