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

With token ids -- a `Workload`, such as `multiturn_workload`'s chat sessions -- the
paged manager's prefix cache and fork (parallel samples) run too:

    work = sim.multiturn_workload(64, turns=6, seed=0, max_total_tokens=spec.max_seq_len)
    report = sim.simulate(work, spec, prefix_cache=True)
    report.token_hit_rate, report.prefill_tokens_saved, report.group_utilization
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
from paged_kv.sim.layouts import LAYOUTS, demand_share, sliding_layers, spec_at_memory
from paged_kv.sim.multiturn import multiturn_workload
from paged_kv.sim.profile import StepSeries, write_series
from paged_kv.sim.scheduler import ARRIVALS, PROGRESS_EVERY, SchedulerConfig, SimulationError, run_schedule
from paged_kv.sim.simulate import BASELINES, SimReport, baseline_backends, compare, format_table, simulate
from paged_kv.sim.synthetic import synthetic_trace
from paged_kv.sim.trace import BUNDLED_ATTRIBUTION, BUNDLED_TRACE, COLUMNS, Trace, load_trace
from paged_kv.sim.workload import Workload

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
    "LAYOUTS",
    "PagedBackend",
    "Sample",
    "SchedulerConfig",
    "SimReport",
    "SimulationError",
    "StepSeries",
    "Trace",
    "Workload",
    "baseline_backends",
    "compare",
    "demand_share",
    "equal_memory_slots",
    "format_table",
    "load_trace",
    "multiturn_workload",
    "run_schedule",
    "simulate",
    "sliding_layers",
    "spec_at_memory",
    "synthetic_trace",
    "write_series",
]
