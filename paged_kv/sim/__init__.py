"""Trace replay: request traces, a continuous-batching scheduler over the paged
manager or a contiguous baseline, and the fragmentation profile of each run."""

from paged_kv.sim.backends import (
    Backend,
    ContiguousMaxLenBackend,
    FirstFitArena,
    FirstFitBackend,
    PagedBackend,
    Sample,
    equal_memory_slots,
)
from paged_kv.sim.profile import StepSeries, write_series
from paged_kv.sim.scheduler import ARRIVALS, PROGRESS_EVERY, SchedulerConfig, SimulationError, run_schedule
from paged_kv.sim.simulate import BASELINES, SimReport, baseline_backends, compare, format_table, simulate
from paged_kv.sim.synthetic import synthetic_trace
from paged_kv.sim.trace import BUNDLED_ATTRIBUTION, BUNDLED_TRACE, COLUMNS, Trace, load_trace

__all__ = [
    "ARRIVALS",
    "BASELINES",
    "BUNDLED_ATTRIBUTION",
    "BUNDLED_TRACE",
    "COLUMNS",
    "PROGRESS_EVERY",
    "Backend",
    "ContiguousMaxLenBackend",
    "FirstFitArena",
    "FirstFitBackend",
    "PagedBackend",
    "Sample",
    "SchedulerConfig",
    "SimReport",
    "SimulationError",
    "StepSeries",
    "Trace",
    "baseline_backends",
    "compare",
    "equal_memory_slots",
    "format_table",
    "load_trace",
    "run_schedule",
    "simulate",
    "synthetic_trace",
    "write_series",
]
