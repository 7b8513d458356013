"""Baseline: exact-length contiguous reservations in one linear arena, first fit.

Each sequence reserves one contiguous range of exactly the length it will reach
(prompt plus output, taken from the trace). No server knows output lengths in
advance, so this is an optimistic contiguous cache: it has no internal waste past
the final length, and what it loses is the output it holds before generating it
and *external* fragmentation: free slots split into runs too short for the next
request. `Sample.largest_free_run` against `Sample.free_slots` shows the latter.
"""

from __future__ import annotations

import numpy as np

from paged_kv.sim.backends.base import Backend, Sample
from paged_kv.spec import CacheSpec


class FirstFitArena:
    """Free ranges of a ``capacity``-slot arena as two sorted numpy arrays.

    Arrays rather than a linked list: first fit is one vectorized ``argmax`` over
    the runs, and inserting a freed run is a ``searchsorted`` plus at most one
    merge on each side. A server holds a few hundred reservations, so the O(runs)
    copies of ``np.insert``/``np.delete`` stay in microseconds.
    """

    def __init__(self, capacity: int):
        self.capacity = int(capacity)
        self.starts = np.array([0], dtype=np.int64)
        self.lengths = np.array([self.capacity], dtype=np.int64)
        self.used = 0

    @property
    def free(self) -> int:
        """Free slots, in all runs together."""
        return self.capacity - self.used

    @property
    def largest_free_run(self) -> int:
        """Slots of the longest free run: the biggest reservation possible now."""
        return int(self.lengths.max()) if self.lengths.size else 0

    def can_allocate(self, n: int) -> bool:
        """Whether some free run holds ``n`` slots."""
        return bool(self.lengths.size) and bool((self.lengths >= n).any())

    def allocate(self, n: int) -> int:
        """Reserve ``n`` contiguous slots at the lowest address that has room; return the start."""
        fits = self.lengths >= n
        i = int(np.argmax(fits))
        if not fits[i]:
            raise MemoryError(f"no free run of {n} slots (largest {self.largest_free_run}, free {self.free})")
        start = int(self.starts[i])
        if self.lengths[i] == n:
            self.starts = np.delete(self.starts, i)
            self.lengths = np.delete(self.lengths, i)
        else:
            self.starts[i] += n
            self.lengths[i] -= n
        self.used += n
        return start

    def release(self, start: int, n: int) -> None:
        """Return ``[start, start + n)`` and merge it with adjacent free runs."""
        i = int(np.searchsorted(self.starts, start))
        merge_left = i > 0 and self.starts[i - 1] + self.lengths[i - 1] == start
        merge_right = i < self.starts.size and start + n == self.starts[i]
        if merge_left and merge_right:
            self.lengths[i - 1] += n + self.lengths[i]
            self.starts = np.delete(self.starts, i)
            self.lengths = np.delete(self.lengths, i)
        elif merge_left:
            self.lengths[i - 1] += n
        elif merge_right:
            self.starts[i] = start
            self.lengths[i] += n
        else:
            self.starts = np.insert(self.starts, i, start)
            self.lengths = np.insert(self.lengths, i, n)
        self.used -= n

    def check_integrity(self) -> None:
        """Raise AssertionError unless runs are sorted, disjoint, merged and sum to `free`."""
        if self.starts.size:
            ends = self.starts + self.lengths
            if np.any(self.lengths <= 0) or np.any(ends[:-1] >= self.starts[1:]):
                raise AssertionError("free runs are empty, overlapping, unsorted or unmerged")
            if self.starts[0] < 0 or ends[-1] > self.capacity:
                raise AssertionError("a free run lies outside the arena")
        if int(self.lengths.sum()) != self.free:
            raise AssertionError(f"free runs sum to {int(self.lengths.sum())}, expected {self.free}")


class FirstFitBackend(Backend):
    """Each sequence reserves exactly its final length in a first-fit arena (told every output length in advance)."""
    name = "contiguous-first-fit"
    reserves_ahead = True

    def __init__(self, spec: CacheSpec, capacity_slots: int):
        super().__init__(spec, capacity_slots)
        self.arena = FirstFitArena(self.capacity_slots)
        self.ranges: dict[int, tuple[int, int]] = {}

    def can_admit(self, seq: int, tokens: int, final_tokens: int, busy: bool) -> bool:
        return self.arena.can_allocate(final_tokens)

    def admit(self, seq: int, tokens: int, final_tokens: int) -> None:
        assert seq not in self.ranges
        self.ranges[seq] = (self.arena.allocate(final_tokens), final_tokens)

    def append(self, seqs: list[int], counts: np.ndarray) -> None:
        pass  # the reservation already covers the final length

    def release(self, seq: int) -> None:
        self.arena.release(*self.ranges.pop(seq))

    def sample(self) -> Sample:
        a = self.arena
        return Sample(a.used, a.free, a.largest_free_run, 0, a.used * self.spec.bytes_per_token)

    def check_integrity(self) -> None:
        self.arena.check_integrity()
        spans = sorted(self.ranges.values())
        if sum(n for _, n in spans) != self.arena.used:
            raise AssertionError("reservations and the arena's used count disagree")
        for (s0, n0), (s1, _) in zip(spans, spans[1:]):
            if s0 + n0 > s1:
                raise AssertionError(f"reservations [{s0}, {s0 + n0}) and [{s1}, ...) overlap")


__all__ = ["FirstFitArena", "FirstFitBackend"]
