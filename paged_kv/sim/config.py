"""What a replay is given and what it counts: `SchedulerConfig` (how the simulated
engine schedules: the shared `paged_kv.sched.SchedulingPolicy` plus the watermark,
arrivals and preemption mode), `ReplayCounts` and `ScheduleResult`.
`paged_kv.sim.scheduler` runs the replay and re-exports these names."""

from __future__ import annotations

import attrs
import numpy as np

from paged_kv.errors import PagedKVError
from paged_kv.sched import SchedulingPolicy
from paged_kv.sim.profile import StepSeries
from paged_kv.sim.trace import Trace

ARRIVALS = ("offline", "trace")
PREEMPTION = ("recompute", "swap")


class SimulationError(PagedKVError, ValueError):
    """The simulator was given settings it cannot run with (batch size, watermark, budget)."""


def _check_int(name: str, value: object, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
        raise SimulationError(f"{name}={value!r} must be an integer >= {low}")
    return int(value)


@attrs.frozen(kw_only=True)
class SchedulerConfig:
    """How the simulated engine schedules. Defaults follow vLLM v1's online serving."""

    max_batch: int = 256
    """Most sequences in one step (running plus those being prefilled)."""
    token_budget: int = 8192
    """Tokens one step may process: one per decoding sequence plus prefill chunks."""
    watermark: float = 0.01
    """Fraction of the paged pool that admission leaves free while others run."""
    arrivals: str = "offline"
    """``offline``: every request waits at step 0 (sustained full load, what memory
    capacity decides); ``trace``: requests arrive at their trace times."""
    step_s: float = 0.025
    """Model time of one step, turning trace arrival times into steps."""
    speedup: float = 1.0
    """Divides trace arrival times: 4 replays the trace's requests four times as fast."""
    preemption: str = "recompute"
    """What a preempted sequence loses: ``recompute`` (its blocks; prefilled again) or
    ``swap`` (nothing; its blocks are copied to host memory and back)."""

    def __attrs_post_init__(self) -> None:
        _check_int("max_batch", self.max_batch, 1)
        _check_int("token_budget", self.token_budget, 1)
        if self.token_budget < self.max_batch:
            raise SimulationError(
                f"token_budget={self.token_budget} < max_batch={self.max_batch}: a full batch of decoding "
                "sequences needs one token each per step"
            )
        if not (isinstance(self.watermark, (int, float)) and 0.0 <= self.watermark < 1.0):
            raise SimulationError(f"watermark={self.watermark!r} must be a fraction of the pool in [0, 1)")
        if self.arrivals not in ARRIVALS:
            raise SimulationError(f"arrivals={self.arrivals!r} must be one of {ARRIVALS}")
        if self.preemption not in PREEMPTION:
            raise SimulationError(f"preemption={self.preemption!r} must be one of {PREEMPTION}")
        for name in ("step_s", "speedup"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and np.isfinite(value) and value > 0):
                raise SimulationError(f"{name}={value!r} must be a positive number")

    @property
    def policy(self) -> SchedulingPolicy:
        """The scheduling policy these settings give: FCFS under ``max_batch`` and
        ``token_budget``, chunked prefill by the budget, newest-first preemption."""
        return SchedulingPolicy(max_batch=self.max_batch, token_budget=self.token_budget)


@attrs.frozen(kw_only=True)
class ReplayCounts:
    """What one replay counted, whatever the backend (shared by `ScheduleResult` and
    `paged_kv.sim.simulate.SimReport`)."""

    requests_served: int
    cancelled: int
    skipped: int
    truncated: int
    steps: int
    idle_steps: int
    tokens_generated: int
    prefill_tokens: int
    admissions: int
    preemptions: int
    swap_ins: int
    bytes_swapped_out: int
    bytes_swapped_in: int
    peak_swapped_bytes: int
    prompt_tokens: int = 0
    """Prompt tokens of every request's first admission (what the workload asks for)."""
    cached_prompt_tokens: int = 0
    """Of those, the tokens the prefix cache already held (not computed)."""
    prefill_tokens_saved: int = 0
    """Cached tokens over every admission, re-admissions after preemption included."""
    forks: int = 0
    """Samples that shared their request's blocks (parallel sampling)."""

    @property
    def token_hit_rate(self) -> float:
        """``cached_prompt_tokens / prompt_tokens``: the share of the workload's prompt
        tokens the prefix cache served (0 without one)."""
        return self.cached_prompt_tokens / self.prompt_tokens if self.prompt_tokens else 0.0


@attrs.frozen(kw_only=True)
class ScheduleResult(ReplayCounts):
    """Counts of one replay plus its per-step series (see `StepSeries`)."""

    queue_delay_steps: np.ndarray  # per request run: first admission step - arrival step
    series: StepSeries
    wall_s: float


def request_targets(trace: Trace, max_seq_len: int) -> tuple[np.ndarray, int, np.ndarray, np.ndarray, np.ndarray]:
    """What a replay serves of each request of ``trace``: ``(fits, truncated, context,
    target, cancels)`` -- whether it runs at all (its prompt and one output token fit
    ``max_seq_len``), how many had their output cut to fit, and each one's prompt and
    output length after truncation and cancellation."""
    context, gen = trace.context_tokens, trace.generated_tokens
    fits = context + np.minimum(gen, 1) <= max_seq_len
    target = np.where(fits, np.minimum(gen, max_seq_len - context), 0)
    truncated = int(np.count_nonzero(fits & (target < gen)))
    # A client that cancels stops its request early: that is its output length.
    cancels = fits & (trace.cancel_after >= 0) & (trace.cancel_after < target)
    return fits, truncated, context, np.where(cancels, trace.cancel_after, target), cancels


__all__ = ["ARRIVALS", "PREEMPTION", "ReplayCounts", "ScheduleResult", "SchedulerConfig", "SimulationError",
           "request_targets"]
