"""A continuous-batching scheduler that replays a trace over any memory `Backend`.

One step is one forward pass of a vLLM-v1-style engine:

1. Requests whose arrival time has come join the waiting queue (FCFS).
2. Running sequences are scheduled oldest first: each decoding sequence gets one
   token, then prefilling sequences get prompt chunks while the step's token
   budget lasts. All their tokens go to the backend in one batched ``append``. If
   memory is short, the newest running sequence is preempted and put back at the
   queue front, and the step is planned again. Preemption by *recompute* releases
   its blocks; it is prefilled again later with its prompt plus the tokens it had
   generated. By *swap* its blocks go to host memory and come back unchanged when
   it is readmitted (bytes moved are counted; no token is recomputed).
3. With the budget left, waiting requests are admitted from the queue head while
   the batch has room and the backend accepts (the paged one keeps a watermark of
   free blocks while others run). Admission takes the first prompt chunk.
4. The profiler records the step, then sequences that produced their last token
   (or reached the point where their client cancels) are released.

A prompt's final chunk also yields the first output token, in the same step, and
that token is held from then on; so a request holds ``context + output`` tokens at
its end, one slot per token it produced. A request with no output tokens is
prefill only: it runs for the steps its prompt chunks take and is then released.
A request longer than ``max_seq_len`` has its output cut to fit (``truncated``);
one whose prompt alone leaves no room for an output token is not run
(``skipped``).
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable

import attrs
import numpy as np

from paged_kv.errors import OutOfBlocksError, PagedKVError
from paged_kv.sim.backends.base import Backend
from paged_kv.sim.profile import StepSeries
from paged_kv.sim.trace import Trace

PROGRESS_EVERY = 1000
"""Rows between two calls of the ``progress`` callback."""

ARRIVALS = ("offline", "trace")
PREEMPTION = ("recompute", "swap")


class SimulationError(PagedKVError, ValueError):
    """The simulator was given settings it cannot run with (batch size, watermark, budget)."""


def _check_int(name: str, value, low: int) -> int:
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


@attrs.frozen(kw_only=True)
class ScheduleResult(ReplayCounts):
    """Counts of one replay plus its per-step series (see `StepSeries`)."""

    queue_delay_steps: np.ndarray  # per request run: first admission step - arrival step
    series: StepSeries
    wall_s: float


def run_schedule(
    trace: Trace,
    backend: Backend,
    config: SchedulerConfig,
    max_seq_len: int,
    progress: Callable[[int, int], None] | None = None,
    check: bool = False,
) -> ScheduleResult:
    """Serve every request of ``trace`` over ``backend``; see the module docstring.

    ``progress(requests_done, requests_total)`` is called every `PROGRESS_EVERY`
    rows; ``check=True`` runs the backend's integrity check after every step (slow;
    for tests).
    """
    started = time.perf_counter()
    n_req = len(trace)
    context = trace.context_tokens
    gen = trace.generated_tokens
    fits = context + np.minimum(gen, 1) <= max_seq_len
    target = np.where(fits, np.minimum(gen, max_seq_len - context), 0)
    truncated = int(np.count_nonzero(fits & (target < gen)))
    # A client that cancels stops its request early: that is its output length.
    cancels = fits & (trace.cancel_after >= 0) & (trace.cancel_after < target)
    target = np.where(cancels, trace.cancel_after, target)
    if config.arrivals == "offline":
        arrival_step = np.zeros(n_req, dtype=np.int64)
    else:
        arrival_step = np.floor(trace.arrival_s / config.speedup / config.step_s).astype(np.int64)
    order = np.flatnonzero(fits)
    order = order[np.argsort(arrival_step[order], kind="stable")].tolist()
    first_step = np.full(n_req, -1, dtype=np.int64)
    done = np.zeros(n_req, dtype=np.int64)  # tokens generated so far, kept across preemptions

    budget = config.token_budget
    max_batch = config.max_batch
    skip_ahead = backend.reserves_ahead
    waiting: deque[int] = deque()
    # Running sequences in admission order (the last is the newest, the one to
    # preempt), with per-sequence state in parallel arrays so a step's bookkeeping
    # is a few vectorized operations, not a loop over the batch.
    running: list[int] = []
    prompt_left = np.empty(0, dtype=np.int64)  # prompt tokens not yet prefilled
    remaining = np.empty(0, dtype=np.int64)  # output tokens still to generate
    held = np.empty(0, dtype=np.int64)  # tokens the backend holds for the sequence

    swap = config.preemption == "swap"
    swapped: dict[int, tuple[int, int, int, int]] = {}  # seq -> (prompt_left, remaining, held, bytes)
    swap_ins = bytes_out = bytes_in = swapped_bytes = peak_swapped = 0

    rows: list[tuple] = []
    step = ptr = steps = served = cancelled = preemptions = admissions = 0
    prefill_tokens = generated = stored = 0
    finished_total = 0
    n_runnable = len(order)

    def finish(i: int) -> None:
        nonlocal served, cancelled, finished_total
        finished_total += 1
        if cancels[i]:
            cancelled += 1
        else:
            served += 1

    while True:
        while ptr < n_runnable and arrival_step[order[ptr]] <= step:
            waiting.append(order[ptr])
            ptr += 1
        if not running and not waiting:
            if ptr == n_runnable:
                break
            step = int(arrival_step[order[ptr]])  # idle until the next arrival
            continue

        n_run = len(running)
        if skip_ahead and n_run and not prompt_left.any():
            # Nothing can change until a sequence finishes or a request arrives:
            # appends never fail, and admission is refused now and stays refused
            # until a release. Replay that span as one row.
            head_blocked = (
                not waiting
                or n_run >= max_batch
                or not backend.can_admit(waiting[0], *_first_chunk(waiting[0], context, done, target, budget - n_run), True)
            )
            k = int(remaining.min()) - 1
            if ptr < n_runnable:
                k = min(k, int(arrival_step[order[ptr]]) - step)
            if head_blocked and k >= 2:
                counts = np.full(n_run, k, dtype=np.int64)
                backend.append(running, counts)
                # Tokens grow by n_run per step; the row carries their mean over the span.
                mean_tokens = stored + n_run * (k + 1) / 2
                s = backend.sample()
                rows.append((step, k, n_run, len(waiting), mean_tokens, s.slots_allocated, s.free_slots,
                             s.largest_free_run, s.sliding_blocks, s.used_bytes))
                held += k
                remaining -= k
                done[running] += k
                stored += n_run * k
                generated += n_run * k
                steps += k
                step += k
                continue

        # (2) schedule running sequences, preempting the newest on shortage
        while True:
            counts, granted, gen_now, used = _plan_running(prompt_left, remaining, budget)
            if not running:
                break
            try:
                backend.append(running, counts)
                break
            except OutOfBlocksError:
                victim = running.pop()
                if swap:
                    moved = backend.swap_out(victim)
                    swapped[victim] = (int(prompt_left[-1]), int(remaining[-1]), int(held[-1]), moved)
                    bytes_out += moved
                    swapped_bytes += moved
                    peak_swapped = max(peak_swapped, swapped_bytes)
                else:
                    backend.release(victim)
                stored -= int(held[-1])
                prompt_left, remaining, held = prompt_left[:-1], remaining[:-1], held[:-1]
                waiting.appendleft(victim)
                preemptions += 1
        if running:
            held += counts
            stored += int(counts.sum())
            prompt_left -= granted
            prefill_tokens += int(granted.sum())
            if gen_now.any():
                done[np.asarray(running)[gen_now]] += 1
                remaining -= gen_now
                generated += int(gen_now.sum())
        budget_left = budget - used

        # (3) admission from the queue head
        new_ids: list[int] = []
        new_state: list[tuple[int, int, int]] = []
        while waiting and len(running) + len(new_ids) < max_batch and budget_left > 0:
            i = waiting[0]
            if i in swapped:
                # Back from host memory as it was: no prefill, no budget spent.
                if not backend.can_swap_in(i, bool(running or new_ids)):
                    break
                waiting.popleft()
                left, rest, h, moved = swapped.pop(i)
                bytes_in += backend.swap_in(i)
                swapped_bytes -= moved
                swap_ins += 1
                new_ids.append(i)
                new_state.append((left, rest, h))
                stored += h
                continue
            tokens, final_i = _first_chunk(i, context, done, target, budget_left)
            if not backend.can_admit(i, tokens, final_i, bool(running or new_ids)):
                break
            waiting.popleft()
            backend.admit(i, tokens, final_i)
            admissions += 1
            if first_step[i] < 0:
                first_step[i] = step
            prompt = int(context[i] + done[i])
            rest = int(target[i] - done[i])
            chunk = min(prompt, budget_left)
            first = tokens - chunk  # 1 when this chunk ends the prompt and output is due
            prefill_tokens += chunk
            budget_left -= chunk
            done[i] += first
            generated += first
            # A request with nothing to generate (prefill only) runs too: it holds its
            # blocks for the step that prefills it, which is profiled and counted, and
            # is released with the step's finished sequences.
            new_ids.append(i)
            new_state.append((prompt - chunk, rest - first, tokens))
            stored += tokens
        if new_ids:
            running.extend(new_ids)
            state = np.array(new_state, dtype=np.int64).reshape(-1, 3)
            prompt_left = np.concatenate([prompt_left, state[:, 0]])
            remaining = np.concatenate([remaining, state[:, 1]])
            held = np.concatenate([held, state[:, 2]])
        if not running:
            if waiting and not new_ids:
                # Unreachable while a lone sequence of max_seq_len fits the backend;
                # guards an endless loop.
                raise SimulationError(f"request {waiting[0]} cannot be admitted into an empty {backend.name} backend")
            step += 1
            continue

        # (4) profile, then release what finished
        steps += 1
        s = backend.sample()
        rows.append((step, 1, len(running), len(waiting), stored, s.slots_allocated, s.free_slots,
                     s.largest_free_run, s.sliding_blocks, s.used_bytes))
        ended = (prompt_left == 0) & (remaining == 0)
        if ended.any():
            for k in np.flatnonzero(ended).tolist():
                backend.release(running[k])
                finish(running[k])
            stored -= int(held[ended].sum())
            keep = ~ended
            running = [r for r, kept in zip(running, keep.tolist()) if kept]
            prompt_left, remaining, held = prompt_left[keep], remaining[keep], held[keep]
        step += 1
        if check:
            backend.check_integrity()
        if progress is not None and len(rows) % PROGRESS_EVERY == 0:
            progress(finished_total, n_runnable)

    if progress is not None:
        progress(finished_total, n_runnable)
    ran = first_step >= 0
    series = StepSeries.from_rows(rows, backend.block_size, backend.capacity_slots)
    return ScheduleResult(
        requests_served=served,
        cancelled=cancelled,
        skipped=int(np.count_nonzero(~fits)),
        truncated=truncated,
        steps=steps,
        idle_steps=step - steps,
        tokens_generated=generated,
        prefill_tokens=prefill_tokens,
        admissions=admissions,
        preemptions=preemptions,
        swap_ins=swap_ins,
        bytes_swapped_out=bytes_out,
        bytes_swapped_in=bytes_in,
        peak_swapped_bytes=peak_swapped,
        queue_delay_steps=(first_step - arrival_step)[ran],
        series=series,
        wall_s=time.perf_counter() - started,
    )


def _first_chunk(i: int, context, done, target, budget_left: int) -> tuple[int, int]:
    """Tokens admission would give request ``i`` now (its first prompt chunk, plus its
    first output token when the chunk ends the prompt), and its final length."""
    prompt = int(context[i] + done[i])
    chunk = min(prompt, budget_left)
    first = 1 if chunk == prompt and target[i] > done[i] else 0
    return chunk + first, int(context[i] + target[i])


def _plan_running(prompt_left: np.ndarray, remaining: np.ndarray, budget: int):
    """Tokens per running sequence this step: decoders one each, then prompt chunks
    in admission order while the budget lasts. Returns (tokens, prompt tokens
    granted, whether each sequence produces an output token, budget used)."""
    prefilling = prompt_left > 0
    counts = (~prefilling).astype(np.int64)
    used = int(counts.sum())
    granted = np.zeros_like(prompt_left)
    gen_now = ~prefilling
    if prefilling.any():
        idx = np.flatnonzero(prefilling)
        want = prompt_left[idx]
        before = np.cumsum(want) - want
        got = np.clip(budget - used - before, 0, want)
        granted[idx] = got
        completes = (got == want) & (remaining[idx] > 0)
        gen_now = gen_now.copy()
        gen_now[idx] = completes
        counts[idx] = got + completes
        used += int(got.sum())
    return counts, granted, gen_now, used


__all__ = ["ARRIVALS", "PREEMPTION", "PROGRESS_EVERY", "ReplayCounts", "ScheduleResult", "SchedulerConfig", "SimulationError", "run_schedule"]
