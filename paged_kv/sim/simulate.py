"""Replay a request trace through the paged manager, and through the contiguous
caches it replaces at equal memory.

No model runs and no device memory is touched: this measures the allocator under a
realistic mix of prompt and output lengths, how full memory runs, how much of what
is allocated holds tokens, and how many sequences fit at once.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import attrs
import numpy as np

from paged_kv.sim.backends import (
    Backend,
    ContiguousMaxLenBackend,
    FirstFitBackend,
    PagedBackend,
    equal_memory_slots,
)
from paged_kv.sim.profile import StepSeries
from paged_kv.sim.scheduler import PROGRESS_EVERY, ReplayCounts, ScheduleResult, SchedulerConfig, SimulationError, run_schedule
from paged_kv.sim.trace import Trace
from paged_kv.sim.workload import Workload
from paged_kv.spec import CacheSpec

BASELINES = ("contiguous-max-len", "contiguous-first-fit")


@attrs.frozen(kw_only=True)
class SimReport(ReplayCounts):
    """What one replay measured over one backend: the `ReplayCounts` plus the profile's
    summary. Per-step figures are taken after the step's appends, when its forward
    pass holds the most tokens; "blocks" are the paged pool's, or slots / block_size
    for a contiguous backend. ``group_*`` figures have one entry per layer group
    (`CacheSpec.groups`; a contiguous backend is one full group): blocks held by
    running sequences, blocks cached for reuse that no one holds, and utilization:
    the tokens a group keeps live (a sliding group only each sequence's last
    ``window``) over its held slots, time-averaged."""

    backend: str
    preemption: str
    queue_delay_mean: float
    queue_delay_p50: float
    queue_delay_p99: float
    capacity_slots: int
    usable_blocks: int
    peak_blocks_in_use: int
    mean_blocks_in_use: float
    mean_group_blocks: tuple[float, ...]
    peak_group_blocks: tuple[int, ...]
    mean_group_cached: tuple[float, ...]
    group_utilization: tuple[float, ...]
    group_kinds: tuple[str, ...]
    token_hit_rate: float
    mean_used_bytes: float
    peak_used_bytes: int
    time_avg_utilization: float
    p1_utilization: float
    p50_utilization: float
    p99_utilization: float
    mean_internal_fragmentation: float
    mean_free_run_ratio: float
    min_free_run_ratio: float
    peak_running: int
    mean_running: float
    mean_waiting: float
    wall_s: float
    series: StepSeries = attrs.field(repr=False)
    tiers: dict[str, Any] | None = None
    """With tiers below the device (`paged_kv.tiers`): prompt tokens hit per medium, bytes moved each way."""

    @classmethod
    def from_result(cls, backend: Backend, result: ScheduleResult, preemption: str = "recompute") -> "SimReport":
        """The report of one `run_schedule` over ``backend``: its counts plus the profile's summary."""
        s = result.series.summary()
        bs = backend.block_size
        delays = result.queue_delay_steps
        mean_blocks = s["mean_slots_allocated"] / bs
        g = result.series.group_summary()
        return cls(
            **{a.name: getattr(result, a.name) for a in attrs.fields(ReplayCounts)},
            backend=backend.name,
            preemption=preemption,
            queue_delay_mean=float(delays.mean()) if delays.size else 0.0,
            queue_delay_p50=float(np.percentile(delays, 50)) if delays.size else 0.0,
            queue_delay_p99=float(np.percentile(delays, 99)) if delays.size else 0.0,
            capacity_slots=backend.capacity_slots,
            usable_blocks=backend.capacity_slots // bs,
            peak_blocks_in_use=-(-s["peak_slots_allocated"] // bs),
            mean_blocks_in_use=mean_blocks,
            mean_group_blocks=tuple(g["mean_blocks"]),
            peak_group_blocks=tuple(g["peak_blocks"]),
            mean_group_cached=tuple(g["mean_cached_blocks"]),
            group_utilization=tuple(g["utilization"]),
            group_kinds=tuple(g["kinds"]),
            token_hit_rate=result.token_hit_rate,
            mean_used_bytes=s["mean_used_bytes"],
            peak_used_bytes=s["peak_used_bytes"],
            time_avg_utilization=s["time_avg_utilization"],
            p1_utilization=s["p1_utilization"],
            p50_utilization=s["p50_utilization"],
            p99_utilization=s["p99_utilization"],
            mean_internal_fragmentation=s["mean_internal_fragmentation"],
            mean_free_run_ratio=s["mean_free_run_ratio"],
            min_free_run_ratio=s["min_free_run_ratio"],
            peak_running=s["peak_running"],
            mean_running=s["mean_running"],
            mean_waiting=s["mean_waiting"],
            wall_s=result.wall_s,
            series=result.series,
            tiers=backend.tier_report() if hasattr(backend, "tier_report") else None,
        )

    def as_dict(self) -> dict[str, Any]:
        """Every figure (not the series) as plain JSON-ready values."""
        return attrs.asdict(self, filter=lambda a, _: a.name != "series")

    def rows(self) -> list[tuple[str, str]]:
        """(label, value) pairs for a terminal table."""
        return self._count_rows() + self._tier_rows() + self._memory_rows()

    def _tier_rows(self) -> list[tuple[str, str]]:
        t = self.tiers
        if not t:
            return []
        hits = t["hit_tokens"]
        return [("prompt tokens hit: device / host / disk", f"{hits['device']:,} / {hits['host']:,} / {hits['disk']:,}"),
                ("tier bytes down / up / to disk / from disk",
                 " / ".join(f"{t[k] / 2**30:,.2f}" for k in ("bytes_down", "bytes_up", "bytes_to_disk",
                                                            "bytes_from_disk")) + " GiB")]

    def _count_rows(self) -> list[tuple[str, str]]:
        return [
            ("requests served", f"{self.requests_served:,}"),
            ("cancelled by client", f"{self.cancelled:,}"),
            ("skipped (prompt > max_seq_len)", f"{self.skipped:,}"),
            ("truncated (output cut to max_seq_len)", f"{self.truncated:,}"),
            ("steps", f"{self.steps:,}"),
            ("tokens generated", f"{self.tokens_generated:,}"),
            ("prefill tokens (incl. recompute)", f"{self.prefill_tokens:,}"),
            ("admissions", f"{self.admissions:,}"),
            ("preemptions", f"{self.preemptions:,} ({self.preemption})"),
            ("swapped out / in / peak held", f"{self.bytes_swapped_out / 2**30:,.2f} / "
             f"{self.bytes_swapped_in / 2**30:,.2f} / {self.peak_swapped_bytes / 2**30:,.2f} GiB"),
            ("queue delay mean / p50 / p99 (steps)",
             f"{self.queue_delay_mean:,.0f} / {self.queue_delay_p50:,.0f} / {self.queue_delay_p99:,.0f}"),
            ("prefix cache: token hit rate", f"{self.token_hit_rate:.1%} of {self.prompt_tokens:,} prompt tokens"),
            ("prefill tokens saved (all admissions)", f"{self.prefill_tokens_saved:,}"),
            ("parallel samples forked", f"{self.forks:,}"),
        ]

    def _memory_rows(self) -> list[tuple[str, str]]:
        return [
            ("peak blocks in use", f"{self.peak_blocks_in_use:,} / {self.usable_blocks:,}"),
            ("mean blocks in use", f"{self.mean_blocks_in_use:,.1f} / {self.usable_blocks:,}"),
            ("mean blocks per layer group", " / ".join(f"{b:,.1f}" for b in self.mean_group_blocks)),
            ("peak blocks per layer group", " / ".join(f"{b:,}" for b in self.peak_group_blocks)),
            ("mean cached blocks per group (no holder)", " / ".join(f"{b:,.1f}" for b in self.mean_group_cached)),
            ("utilization per group (live tokens/slots)", " / ".join(f"{u:.4f}" for u in self.group_utilization)),
            ("mean KV bytes held", f"{self.mean_used_bytes / 2**30:,.2f} GiB"),
            ("peak KV bytes held", f"{self.peak_used_bytes / 2**30:,.2f} GiB"),
            ("time-avg utilization (tokens/slots)", f"{self.time_avg_utilization:.4f}"),
            ("utilization p1 / p50 / p99",
             f"{self.p1_utilization:.3f} / {self.p50_utilization:.3f} / {self.p99_utilization:.3f}"),
            ("mean empty slots allocated", f"{self.mean_internal_fragmentation:,.0f}"),
            ("largest free run / free (mean, min)", f"{self.mean_free_run_ratio:.3f}, {self.min_free_run_ratio:.3f}"),
            ("peak running", f"{self.peak_running:,}"),
            ("mean running", f"{self.mean_running:.1f}"),
            ("wall time", f"{self.wall_s:.2f} s"),
        ]

    def format(self) -> str:
        """An aligned two-column text table, one figure per line."""
        return format_table([self])


def format_table(reports: list[SimReport]) -> str:
    """Reports side by side: one row per figure, one column per backend."""
    labels = [label for label, _ in reports[0].rows()]
    columns = [[value for _, value in r.rows()] for r in reports]
    header = ["", *(r.backend for r in reports)] if len(reports) > 1 else None
    width = max(len(x) for x in labels)
    widths = [max(len(v) for v in [r.backend, *col]) for r, col in zip(reports, columns)]
    lines = []
    if header:
        lines.append("  ".join([" " * width, *(h.rjust(w) for h, w in zip(header[1:], widths))]))
    for i, label in enumerate(labels):
        lines.append("  ".join([label.ljust(width), *(col[i].rjust(w) for col, w in zip(columns, widths))]))
    return "\n".join(lines)


def _config(config: SchedulerConfig | None, max_batch: int | None, watermark: float, spec: CacheSpec) -> SchedulerConfig:
    if config is None:
        max_batch = spec.max_batch_slots if max_batch is None else max_batch
        if isinstance(max_batch, bool) or not isinstance(max_batch, (int, np.integer)) or not 1 <= max_batch <= spec.max_batch_slots:
            raise SimulationError(f"max_batch={max_batch!r} must be an integer in [1, max_batch_slots={spec.max_batch_slots}]")
        config = SchedulerConfig(max_batch=int(max_batch), watermark=watermark,
                                 token_budget=max(SchedulerConfig().token_budget, int(max_batch)))
    elif config.max_batch > spec.max_batch_slots:
        raise SimulationError(f"max_batch={config.max_batch} > the spec's max_batch_slots={spec.max_batch_slots}")
    return config


def simulate(
    trace: Trace | Workload,
    spec: CacheSpec,
    max_batch: int | None = None,
    watermark: float = 0.01,
    progress: Callable[[int, int], None] | None = None,
    check: bool = False,
    config: SchedulerConfig | None = None,
    prefix_cache: bool = False,
    tiers: dict[str, Any] | None = None,
) -> SimReport:
    """Serve every request of ``trace`` (or a `Workload`: token ids, sessions, parallel
    samples) from a fresh `KVCacheManager` built from ``spec``, with its prefix cache
    when ``prefix_cache`` (the manager's `SpecError` if it refuses the spec).

    ``config`` sets the scheduler (see `SchedulerConfig`); without it, ``max_batch``
    (default: the spec's ``max_batch_slots``) and ``watermark`` are used with the
    other defaults: offline arrivals, an 8192-token step budget.
    ``progress(done, total)`` is called every `PROGRESS_EVERY` steps with requests
    finished so far; ``check=True`` runs the manager's integrity check after every
    step (slow; for tests). ``tiers``: `paged_kv.tiers.CacheTiers` arguments (host_bytes,
    disk_bytes, policy, write) for tiers below the device, bookkeeping only.
    """
    config = _config(config, max_batch, watermark, spec)
    backend = PagedBackend(spec, config.watermark, prefix_cache=prefix_cache, tiers=tiers)
    result = run_schedule(trace, backend, config, spec.max_seq_len, progress, check)
    return SimReport.from_result(backend, result, config.preemption)


def baseline_backends(spec: CacheSpec) -> list[Backend]:
    """The contiguous caches paged_kv replaces, given the bytes of ``spec``'s pool."""
    slots = equal_memory_slots(spec)
    return [ContiguousMaxLenBackend(spec, slots), FirstFitBackend(spec, slots)]


def compare(
    trace: Trace | Workload,
    spec: CacheSpec,
    config: SchedulerConfig | None = None,
    progress: Callable[[str, int, int], None] | None = None,
    check: bool = False,
    prefix_cache: bool = False,
    tiers: dict[str, Any] | None = None,
) -> list[SimReport]:
    """Replay ``trace`` over the paged manager (with its prefix cache when
    ``prefix_cache``) and each baseline at equal memory, under one scheduler: reports
    in the order paged, `BASELINES`. The contiguous baselines share nothing: a forked
    sample gets a copy.

    ``progress(backend_name, done, total)`` reports each replay's progress.
    """
    config = _config(config, None, 0.01, spec)
    reports = []
    for backend in [PagedBackend(spec, config.watermark, prefix_cache=prefix_cache, tiers=tiers),
                    *baseline_backends(spec)]:
        tick = None if progress is None else (lambda d, t, name=backend.name: progress(name, d, t))
        result = run_schedule(trace, backend, config, spec.max_seq_len, tick, check)
        reports.append(SimReport.from_result(backend, result, config.preemption))
    return reports


__all__ = ["BASELINES", "PROGRESS_EVERY", "SimReport", "SimulationError", "baseline_backends", "compare",
           "format_table", "simulate"]
