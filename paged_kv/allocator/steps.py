"""`Step`: one described forward pass, and the rules for committing it.

Describing a step (`KVCacheManager.step_metadata`, `StepBatch`, `DecodeSlots`)
hands out a `Step`; ``manager.commit(step)`` later says *that* step ran on the
device. Several steps may be in flight at once -- an overlap scheduler describes
step N+1 while step N runs -- and each commit covers exactly what its own step
wrote: the lengths it described, the copy-on-write copies it carried. A full
block therefore becomes hittable only when the step that wrote it is committed,
never when a later description merely names it.

The rules (`check`), each a `StepError` that changes nothing:

* a step is committed by the manager that described it;
* steps are committed in the order they were described, each at most once (the
  device runs them in that order; a step described earlier and never committed
  was abandoned: a later commit passes over it, and it cannot be committed after);
* every sequence of the step still holds the row it held when the step was
  described (`StaleStepError` otherwise). Releasing (or swapping out) a sequence
  while a step that names it is in flight is allowed -- its blocks go back to the
  pool at once -- but that step can then be committed only with
  ``skip_released=True``, which commits the step's other sequences and nothing of
  the released one.

Why rows and an epoch rather than sequence ids: a preempted request is often
re-admitted under the same id into the same (LIFO-recycled) row, and a stale step
would then mark the new incarnation's unwritten tokens as written. `PageTable.born`
tells the incarnations apart.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np

from paged_kv.errors import StaleStepError, StepError

if TYPE_CHECKING:
    from paged_kv.allocator.page_table import PageTable

_SERIALS = itertools.count(1)  # one process-unique number per manager: steps carry their owner's


class Step:
    """A described step: which manager, its number, and the rows it wrote.

    ``rows`` and ``seq_ids`` are in batch order; ``lengths`` (only with the prefix
    cache: what the step leaves written per row) lets its commit key exactly the
    blocks it wrote. Immutable by convention; cheap to make (a decode step makes one).
    """

    __slots__ = ("owner", "id", "seq_ids", "rows", "epoch", "lengths", "table")

    def __init__(self, owner: int, id: int, seq_ids: Sequence[int], rows: Sequence[int] | np.ndarray, epoch: int,
                 lengths: Sequence[int] | None = None, table: PageTable | None = None):
        self.owner, self.id, self.seq_ids, self.rows, self.epoch, self.lengths = owner, id, seq_ids, rows, epoch, lengths
        self.table = table

    def __repr__(self) -> str:
        return f"Step(id={self.id}, seq_ids={list(self.seq_ids)})"

    def released(self) -> list[int]:
        """Indices (into ``rows``) of the rows whose sequence was released (or swapped
        out, or re-admitted into a new row) since this step was described."""
        table = self.table
        if table is None or table.epoch == self.epoch or not len(self.rows):
            return []
        rows = np.asarray(self.rows, dtype=np.int64)
        gone = ~table.in_use[rows] | (table.born[rows] > self.epoch)
        return np.flatnonzero(gone).tolist()

    def check_live(self) -> None:
        """`StaleStepError` when a sequence of this step was released since it was
        described: its blocks may belong to another sequence now, so its metadata must
        not reach the device (`StepMetadata` checks this whenever it is flattened: a
        jitted call, `to_device`, a tree map)."""
        gone = self.released()
        if gone:
            raise stale_error(self, gone, "their blocks may hold another sequence's tokens now; describe the step again")


class StepLog:
    """One manager's step numbers: how many steps were described, the newest committed.

    Every describer (the manager, a `StepBatch`, `DecodeSlots`) numbers its steps
    here, so one order covers them all. `next_id` is all a decode step pays; the
    `Step` object is made only when someone asks for it."""

    __slots__ = ("owner", "tag", "described", "committed", "table")

    def __init__(self, table: PageTable | None = None):
        self.owner = next(_SERIALS)
        # The owner as every metadata of this manager carries it (`StepMetadata.owner`):
        # one shared read-only int32 scalar, made once.
        self.tag = np.array(self.owner, dtype=np.int32)
        self.tag.flags.writeable = False
        self.described = 0
        self.committed = 0
        self.table = table  # the manager's first page table: rows and their incarnations

    def next_id(self) -> int:
        """Number a new step description."""
        self.described += 1
        return self.described

    def step(self, id: int, seq_ids: Sequence[int], rows: Sequence[int] | np.ndarray, epoch: int,
             lengths: Sequence[int] | None = None) -> Step:
        """The `Step` numbered ``id`` (from `next_id`)."""
        return Step(self.owner, id, seq_ids, rows, epoch, lengths, self.table)

    def check(self, step: Step) -> list[int]:
        """Indices (into ``step.rows``) of the rows whose sequence was released since
        ``step`` was described; `StepError` when ``step`` is not this manager's, was
        committed already, or is older than a step committed since."""
        if type(step) is not Step and not isinstance(step, Step):
            raise StepError(f"commit needs the Step a description returned (metadata.step); got {type(step).__name__}")
        if step.owner != self.owner:
            raise StepError(f"{step!r} was described by another manager; commit it with that one")
        if not 0 < step.id <= self.described:
            raise StepError(f"{step!r} was never described by this manager ({self.described} steps so far)")
        if step.id <= self.committed:
            raise StepError(f"{step!r} is committed already, or older than step {self.committed}, committed since: "
                            "commit each step once, in the order they were described")
        return step.released()


def stale_error(step: Step, gone: list[int],
                what_to_do: str = "commit(step, skip_released=True) commits its other sequences") -> StaleStepError:
    """The `StaleStepError` naming the sequences of ``step`` at indices ``gone`` (`Step.released`)."""
    ids = [step.seq_ids[i] for i in gone]
    return StaleStepError(f"{step!r}: seq_ids {ids} were released since it was described; {what_to_do}")


__all__ = ["Step", "StepLog", "stale_error"]
