"""Trace replay: load request traces and run them through a `KVCacheManager`."""

from paged_kv.sim.simulate import PROGRESS_EVERY, SimReport, SimulationError, simulate
from paged_kv.sim.trace import BUNDLED_ATTRIBUTION, BUNDLED_TRACE, COLUMNS, Trace, load_trace

__all__ = [
    "BUNDLED_ATTRIBUTION",
    "BUNDLED_TRACE",
    "COLUMNS",
    "PROGRESS_EVERY",
    "SimReport",
    "SimulationError",
    "Trace",
    "load_trace",
    "simulate",
]
