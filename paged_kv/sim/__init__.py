"""Trace replay: request traces, a continuous-batching scheduler over the paged
manager or a contiguous baseline, and the fragmentation profile of each run.

No model runs and no device memory is allocated: a `CacheSpec` only says how many
bytes a block stands for. ``paged-kv simulate`` is the command-line front end.

    from paged_kv import CacheSpec, sim

    trace = sim.load_trace().head(300)              # or sim.synthetic_trace(n, seed=0)
    spec = CacheSpec.for_memory(2 * 2**30, block_size=16, max_blocks_per_seq=1024,
                                num_layers=32, num_kv_heads=8, head_dim=128)
    report = sim.simulate(trace, spec, config=sim.SchedulerConfig(max_batch=64))
    print(sim.format_table(sim.compare(trace, spec)))  # paged vs contiguous caches

`SimReport` holds the figures (``report.series`` the per-step profile, written by
`write_series`); `paged_kv.sim.plot.plot_series` draws it (needs matplotlib).
"""

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
