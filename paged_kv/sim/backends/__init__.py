"""Memory backends the scheduler simulator can run: the paged manager and the
contiguous caches it replaces, so all of them replay one trace under one scheduler."""

from paged_kv.sim.backends.arena import FirstFitArena, FirstFitBackend
from paged_kv.sim.backends.base import Backend, Sample, equal_memory_slots
from paged_kv.sim.backends.contiguous import ContiguousMaxLenBackend
from paged_kv.sim.backends.paged import PagedBackend

__all__ = [
    "Backend",
    "ContiguousMaxLenBackend",
    "FirstFitArena",
    "FirstFitBackend",
    "PagedBackend",
    "Sample",
    "equal_memory_slots",
]
