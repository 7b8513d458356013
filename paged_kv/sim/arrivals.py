"""When a replay's requests join the waiting queue (`paged_kv.sim.scheduler`)."""

from __future__ import annotations

import heapq
from collections.abc import Iterator

import numpy as np

from paged_kv.sim.config import SchedulerConfig
from paged_kv.sim.workload import Workload


class Arrivals:
    """The arrival heap of ``(step, request)``. ``offline``: every request may arrive at
    step 0; ``trace``: at its trace time over ``step_s`` (sped up by ``speedup``). A
    request that follows another (a session's next turn) goes in when that one
    finishes (`finished`), its think time later. ``step[i]``: the step request ``i``
    arrived (or will at the earliest)."""

    def __init__(self, work: Workload, config: SchedulerConfig, fits: np.ndarray):
        n = len(work)
        if config.arrivals == "offline":
            self.earliest = np.zeros(n, dtype=np.int64)
        else:
            self.earliest = np.floor(work.trace.arrival_s / config.speedup / config.step_s).astype(np.int64)
        self.think_steps = np.floor(work.think_s / config.speedup / config.step_s).astype(np.int64)
        self.followers: dict[int, list[int]] = {}
        for j in np.flatnonzero(work.follows >= 0).tolist():
            self.followers.setdefault(int(work.follows[j]), []).append(j)
        self.step = self.earliest.copy()
        self.heap: list[tuple[int, int]] = []
        for i in np.flatnonzero(work.follows < 0).tolist():
            if fits[i]:
                self.heap.append((int(self.earliest[i]), i))
            else:
                self.finished(i, int(self.earliest[i]))  # never runs; its followers still come
        heapq.heapify(self.heap)

    def next_step(self) -> int | None:
        """The step of the next arrival, None when none is due."""
        return self.heap[0][0] if self.heap else None

    def due(self, step: int) -> Iterator[tuple[int, int]]:
        """``(request, arrival step)`` of each request arrived by ``step``, earliest first
        (one popped at a time: a follower released meanwhile is seen too)."""
        while self.heap and self.heap[0][0] <= step:
            at, i = heapq.heappop(self.heap)
            self.step[i] = at
            yield i, at

    def finished(self, r: int, step: int) -> None:
        """Request ``r`` finished (or was skipped) at ``step``: its followers arrive their
        think time later (not before their own earliest step)."""
        for j in self.followers.get(r, ()):
            heapq.heappush(self.heap, (max(int(self.earliest[j]), step + 1 + int(self.think_steps[j])), j))


__all__ = ["Arrivals"]
