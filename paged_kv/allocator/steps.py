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
from operator import itemgetter
from typing import TYPE_CHECKING, Any

import numpy as np

from paged_kv.errors import StaleStepError, StepError

if TYPE_CHECKING:
    from paged_kv.allocator.page_table import PageTable

_SERIALS = itertools.count(1)  # one process-unique number per manager: steps carry their owner's


class Step(tuple):  # type: ignore[type-arg]  # a fixed layout, read through the properties below
    """A described step: which manager, its number, and the rows it wrote.

    ``rows`` and ``seq_ids`` are in batch order; ``lengths`` (only with the prefix
    cache: what the step leaves written per row) lets its commit key exactly the
    blocks it wrote. Immutable. A tuple underneath, ``(id, seq_ids, rows, epoch,
    owner, lengths, table)``, because a decode step makes one: a persistent batch keeps
    its first four as a plain tuple and makes the `Step` only if asked (one
    concatenation with ``(owner, lengths, table)``).
    Compared and hashed by identity, like any object.
    """

    __slots__ = ()

    def __new__(cls, owner: int, id: int, seq_ids: Sequence[int], rows: Sequence[int] | np.ndarray, epoch: int,
                lengths: Sequence[int] | None = None, table: PageTable | None = None) -> Step:
        return tuple.__new__(cls, (id, seq_ids, rows, epoch, owner, lengths, table))

    id: int = property(itemgetter(0), doc="Its number in its manager's `StepLog`.")  # type: ignore[assignment]
    seq_ids: Sequence[int] = property(itemgetter(1), doc="The sequences, in batch order.")  # type: ignore[assignment]
    rows: Sequence[int] | np.ndarray = property(itemgetter(2), doc="Their page-table rows.")  # type: ignore[assignment]
    epoch: int = property(itemgetter(3), doc="The page table's epoch when described.")  # type: ignore[assignment]
    owner: int = property(itemgetter(4), doc="The serial of the manager that described it.")  # type: ignore[assignment]
    lengths: Sequence[int] | None = property(itemgetter(5), doc="Per row, what it leaves written (prefix cache).")  # type: ignore[assignment]
    table: PageTable | None = property(itemgetter(6), doc="The manager's page table.")  # type: ignore[assignment]

    __eq__ = object.__eq__  # a step is itself, not its fields
    __ne__ = object.__ne__
    __hash__ = object.__hash__

    def __repr__(self) -> str:
        return f"Step(id={self.id}, seq_ids={list(self.seq_ids)})"

    def __reduce__(self) -> Any:  # a tuple subclass with a custom __new__: pickle its arguments
        return (Step, (self.owner, self.id, self.seq_ids, self.rows, self.epoch, self.lengths, self.table))

    def released(self) -> list[int]:
        """Indices (into ``rows``) of the rows whose sequence was released (or swapped
        out, or re-admitted into a new row) since this step was described."""
        table, epoch, rows = self[6], self[3], self[2]
        if table is None or table.epoch == epoch or not len(rows):
            return []
        if len(rows) <= 12:  # element reads: numpy's ~1 µs per call would be the whole cost
            in_use, born = table.in_use, table.born
            return [i for i, r in enumerate(rows) if not in_use.item(r) or born.item(r) > epoch]
        at = np.asarray(rows, dtype=np.int64)
        gone = ~table.in_use[at] | (table.born[at] > epoch)
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
