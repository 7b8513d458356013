"""A continuous-batching scheduler that replays a trace or a `Workload` over any memory `Backend`.

One step is one forward pass of a vLLM-v1-style engine (the choices of 2 and 3 are
`paged_kv.sched.SchedulingPolicy`'s, which the model generator follows too):

1. Requests whose arrival time has come join the waiting queue (FCFS). A request
   that follows another (a session's next turn) arrives its think time after that
   one finished.
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
   free blocks while others run). Admission takes the first prompt chunk. With a
   prefix-caching backend admission goes by token ids: the cached leading tokens are
   held at once and only the rest is prefilled (chunked as usual).
4. The backend is told the step ran (the paged one commits what it wrote, so the
   prefix cache can offer it). A request with parallel samples whose prompt was
   completed in this step is forked into its samples (they share the prompt and the
   first output token; a sample that finds no room in the batch waits in the queue
   and is prefilled like a preempted one). The profiler records the step, then
   sequences that produced their last token (or reached the point where their client
   cancels) are released; a prefix-caching backend first keys all their tokens, as it
   does for a sequence preempted by recompute.

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

import numpy as np

from paged_kv.errors import OutOfBlocksError
from paged_kv.sim.arrivals import Arrivals
from paged_kv.sim.backends.base import Backend
from paged_kv.sim.config import (
    ARRIVALS, PREEMPTION, ReplayCounts, ScheduleResult, SchedulerConfig, SimulationError, request_targets,
)
from paged_kv.sim.profile import Row, StepSeries, live_tokens
from paged_kv.sim.trace import Trace
from paged_kv.sim.workload import Workload

PROGRESS_EVERY = 1000
"""Rows between two calls of the ``progress`` callback."""


def run_schedule(
    trace: Trace | Workload,
    backend: Backend,
    config: SchedulerConfig,
    max_seq_len: int,
    progress: Callable[[int, int], None] | None = None,
    check: bool = False,
) -> ScheduleResult:
    """Serve every request of ``trace`` (a `Trace`, or a `Workload` with token ids,
    dependencies and parallel samples) over ``backend``; see the module docstring.

    ``progress(requests_done, requests_total)`` is called every `PROGRESS_EVERY`
    rows; ``check=True`` runs the backend's integrity check after every step (slow;
    for tests).
    """
    work = trace if isinstance(trace, Workload) else Workload.from_trace(trace)
    return _Replay(work, backend, config, max_seq_len, progress, check).run()


class _Replay:
    """One replay's state. Running sequences are kept in admission order (the last is
    the newest, the one to preempt), with their per-sequence state in parallel numpy
    arrays so a step's bookkeeping is a few vectorized operations, not a loop over the
    batch. Sequence ids are request indices; a request's extra samples get ids after
    the last request's."""

    def __init__(self, work: Workload, backend: Backend, config: SchedulerConfig, max_seq_len: int,
                 progress: Callable[[int, int], None] | None, check: bool) -> None:
        self.started = time.perf_counter()
        self.work, self.backend, self.config, self.progress, self.check = work, backend, config, progress, check
        self.policy = config.policy  # admission order, budget and chunks, the preemption victim
        self.tokens = backend.caches_prefixes  # admission by token ids
        self.kinds = backend.group_kinds
        self._last_ids: tuple[int | None, int | None, np.ndarray | None] = (None, None, None)
        self.tally = dict.fromkeys(("step", "steps", "served", "cancelled", "preemptions", "admissions", "prefill",
                                    "generated", "stored", "finished", "swap_ins", "bytes_out", "bytes_in",
                                    "swapped_bytes", "peak_swapped", "prompt", "cached", "saved", "forks"), 0)
        self.waiting: deque[int] = deque()
        self.running: list[int] = []
        self.prompt_left = np.empty(0, dtype=np.int64)  # prompt tokens not yet prefilled
        self.remaining = np.empty(0, dtype=np.int64)  # output tokens still to generate
        self.held = np.empty(0, dtype=np.int64)  # tokens the backend holds for the sequence
        self.swapped: dict[int, tuple[int, int, int, int]] = {}  # seq -> (prompt_left, remaining, held, bytes)
        self.rows: list[Row] = []
        self.group_rows: list[Row] = []
        self.fits, self.truncated, *targets = request_targets(work.trace, max_seq_len)
        self._sequences(work, *targets)
        self.arrivals = Arrivals(work, config, self.fits)
        self.first_step = np.full(len(work), -1, dtype=np.int64)
        self.n_runnable = int(np.count_nonzero(self.fits))

    def _sequences(self, work: Workload, context: np.ndarray, target: np.ndarray, cancels: np.ndarray) -> None:
        """Per-sequence arrays: requests first, then their extra samples (a request that
        generates nothing has none)."""
        n = len(work)
        extra = np.where(self.fits & (target > 0), work.samples - 1, 0)
        self.first_child = n + np.cumsum(extra) - extra
        self.request_of = np.concatenate([np.arange(n), np.repeat(np.arange(n), extra)])
        total = int(extra.sum())
        self.sample_of = np.concatenate([np.zeros(n, np.int64),
                                         np.arange(total) - np.repeat(self.first_child - n, extra) + 1])
        self.extra = extra
        self.context = context[self.request_of]
        self.target = target[self.request_of]
        self.cancels = cancels[self.request_of]
        self.done = np.zeros(n + total, dtype=np.int64)  # tokens generated so far, kept across preemptions
        self.open = 1 + extra  # sequences of each request not finished yet
        self.to_fork = set(np.flatnonzero(extra > 0).tolist())  # requests whose samples are not forked yet

    # ---- the loop -------------------------------------------------------------------
    def run(self) -> ScheduleResult:
        c = self.tally
        while True:
            self._arrive()
            if not self.running and not self.waiting:
                if self.arrivals.next_step() is None:
                    break
                c["step"] = self.arrivals.next_step()  # type: ignore[assignment]  # idle until the next arrival (there is one)
                continue
            if self.backend.reserves_ahead and self._skip_decode_span():
                continue
            used, added = self._run_running()
            new_ids = self._admit(used)
            if not self.running:
                if self.waiting and not new_ids:
                    # Unreachable while a lone sequence of max_seq_len fits the backend;
                    # guards an endless loop.
                    raise SimulationError(f"request {self.waiting[0]} cannot be admitted into an empty "
                                          f"{self.backend.name} backend")
                c["step"] += 1
                continue
            self._end_step(added)
        if self.progress is not None:
            self.progress(c["finished"], self.n_runnable)
        return self._result()

    def _arrive(self) -> None:
        for i, at in self.arrivals.due(self.tally["step"]):
            if self.fits[i]:
                self.waiting.append(i)
            else:
                self._request_done(i, at)

    def _skip_decode_span(self) -> bool:
        """Nothing can change until a sequence finishes or a request arrives: appends
        never fail, and admission is refused now and stays refused until a release.
        Replay that span as one row (backends that reserve ahead only)."""
        c, running = self.tally, self.running
        n_run = len(running)
        if not n_run or self.prompt_left.any():
            return False
        waiting = self.waiting
        head_blocked = (
            not waiting
            or self.policy.room(n_run) <= 0
            or not self.backend.can_admit(waiting[0], *self._first_chunk(waiting[0], self.config.token_budget - n_run),
                                          True)
        )
        k = int(self.remaining.min()) - 1
        if self.arrivals.next_step() is not None:
            k = min(k, self.arrivals.next_step() - c["step"])  # type: ignore[operator]  # not None: checked above
        if not head_blocked or k < 2:
            return False
        self.backend.append(running, np.full(n_run, k, dtype=np.int64))
        # Tokens grow by n_run per step; the row carries their mean over the span.
        self._profile(k, c["stored"] + n_run * (k + 1) / 2, span=k)
        self.held += k
        self.remaining -= k
        self.done[running] += k
        c["stored"] += n_run * k
        c["generated"] += n_run * k
        c["steps"] += k
        c["step"] += k
        return True

    # ---- (2) running sequences -----------------------------------------------------
    def _run_running(self) -> tuple[int, np.ndarray]:
        """Schedule the running sequences (the policy's plan), preempting the newest on
        shortage; returns the budget they used and the tokens each got."""
        c, plan = self.tally, None

        def fits() -> bool:  # plan the step and append its tokens, unless memory is short
            nonlocal plan
            plan = self.policy.plan(self.prompt_left, self.remaining)
            try:
                if self.running:
                    self.backend.append(self.running, plan.tokens)
            except OutOfBlocksError:
                return False
            return True

        self.policy.make_room(fits, self._preempt)
        counts, granted, gen_now, used = plan  # type: ignore[misc]  # planned: make_room asks fits at least once
        if not self.running:
            return used, counts
        self.held += counts
        c["stored"] += int(counts.sum())
        self.prompt_left -= granted
        c["prefill"] += int(granted.sum())
        if gen_now.any():
            self.done[np.asarray(self.running)[gen_now]] += 1
            self.remaining -= gen_now
            c["generated"] += int(gen_now.sum())
        return used, counts

    def _preempt(self) -> None:
        c = self.tally
        victim = self.policy.newest(self.running)  # the last admitted
        self.running.pop()
        if self.config.preemption == "swap":
            moved = self.backend.swap_out(victim)
            self.swapped[victim] = (int(self.prompt_left[-1]), int(self.remaining[-1]), int(self.held[-1]), moved)
            c["bytes_out"] += moved
            c["swapped_bytes"] += moved
            c["peak_swapped"] = max(c["peak_swapped"], c["swapped_bytes"])
        else:
            self.backend.finish(victim, self._ids(victim, int(self.held[-1])))
        c["stored"] -= int(self.held[-1])
        self.prompt_left, self.remaining, self.held = self.prompt_left[:-1], self.remaining[:-1], self.held[:-1]
        self.waiting.appendleft(victim)
        c["preemptions"] += 1

    # ---- (3) admission ---------------------------------------------------------------
    def _admit(self, budget_used: int) -> list[int]:
        """Admit from the queue head (the policy's order) while the batch, the budget and
        the backend allow."""
        new_state: list[tuple[int, int, int, int]] = []

        def take(i: int, budget_left: int) -> int | None:
            busy = bool(self.running or new_state)
            admitted = self._swap_in(i, busy) if i in self.swapped else self._admit_one(i, budget_left, busy)
            if admitted is None:
                return None
            new_state.append(admitted[1])
            return admitted[0]

        # The simulator's policy always has a token budget (SchedulerConfig): budget_left is an int.
        new_ids = self.policy.admit(self.waiting, len(self.running), take, budget_used)  # type: ignore[arg-type]
        if new_ids:
            self.running.extend(new_ids)
            state = np.array(new_state, dtype=np.int64).reshape(-1, 4)
            self.prompt_left = np.concatenate([self.prompt_left, state[:, 0]])
            self.remaining = np.concatenate([self.remaining, state[:, 1]])
            self.held = np.concatenate([self.held, state[:, 2]])
            self._new_added = state[:, 3]
        else:
            self._new_added = np.empty(0, dtype=np.int64)
        return new_ids

    def _swap_in(self, i: int, busy: bool) -> tuple[int, tuple[int, int, int, int]] | None:
        """Bring swapped-out ``i`` back from host memory as it was: no prefill, no budget
        spent. None if the backend has no room for it yet."""
        if not self.backend.can_swap_in(i, busy):
            return None
        c = self.tally
        left, rest, h, moved = self.swapped.pop(i)
        c["bytes_in"] += self.backend.swap_in(i)
        c["swapped_bytes"] -= moved
        c["swap_ins"] += 1
        c["stored"] += h
        return 0, (left, rest, h, 0)

    def _admit_one(self, i: int, budget_left: int, busy: bool) -> tuple[int, tuple[int, int, int, int]] | None:
        """Admit sequence ``i`` with its first prompt chunk, or None if the backend refuses.
        Returns the prompt tokens computed and its (prompt left, remaining, held, added)."""
        c, backend = self.tally, self.backend
        prompt = int(self.context[i] + self.done[i])
        rest = int(self.target[i] - self.done[i])
        if self.tokens:
            ids = self._ids(i, prompt)
            chunk = self.policy.chunk(prompt, budget_left)  # the most it can compute now, whatever it hits
            # A backend that matches tokens (self.tokens) gets them from _ids.
            if not backend.can_admit_prompt(i, ids, chunk, rest > 0, busy):  # type: ignore[arg-type]
                return None
            cached = backend.admit_prompt(i, ids, chunk, rest > 0)  # type: ignore[arg-type]
            if cached is None:
                return None
        else:
            tokens, final = self._first_chunk(i, budget_left)
            if not backend.can_admit(i, tokens, final, busy):
                return None
            backend.admit(i, tokens, final)
            cached = 0
        c["admissions"] += 1
        r = int(self.request_of[i])
        if self.first_step[r] < 0 and i == r:
            self.first_step[r] = c["step"]
            c["prompt"] += prompt
            c["cached"] += cached
        c["saved"] += cached
        chunk = self.policy.chunk(prompt - cached, budget_left)
        first = 1 if chunk == prompt - cached and rest > 0 else 0  # this chunk ends the prompt: output is due
        c["prefill"] += chunk
        self.done[i] += first
        c["generated"] += first
        tokens = cached + chunk + first
        c["stored"] += tokens
        # A request with nothing to generate (prefill only) runs too: it holds its
        # blocks for the step that prefills it, which is profiled and counted, and
        # is released with the step's finished sequences.
        return chunk, (prompt - cached - chunk, rest - first, tokens, chunk + first)

    def _first_chunk(self, i: int, budget_left: int) -> tuple[int, int]:
        """Tokens admission would give sequence ``i`` now (its first prompt chunk, plus its
        first output token when the chunk ends the prompt), and its final length."""
        prompt = int(self.context[i] + self.done[i])
        chunk = self.policy.chunk(prompt, budget_left)
        first = 1 if chunk == prompt and self.target[i] > self.done[i] else 0
        return chunk + first, int(self.context[i] + self.target[i])

    # ---- (4) the step ran ---------------------------------------------------------------
    def _end_step(self, added: np.ndarray) -> None:
        c = self.tally
        added = np.concatenate([added, self._new_added]) if self._new_added.size else added
        self.backend.end_step(self.running, self.held, added)
        if self.to_fork:
            self._fork_samples()
        c["steps"] += 1
        self._profile(1, c["stored"])
        ended = (self.prompt_left == 0) & (self.remaining == 0)
        if ended.any():
            for k in np.flatnonzero(ended).tolist():
                s = self.running[k]
                self.backend.finish(s, self._ids(s, int(self.held[k])) if self.tokens else None)
                self._sequence_done(s)
            c["stored"] -= int(self.held[ended].sum())
            keep = ~ended
            self.running = [s for s, kept in zip(self.running, keep.tolist()) if kept]
            self.prompt_left, self.remaining, self.held = self.prompt_left[keep], self.remaining[keep], self.held[keep]
        c["step"] += 1
        if self.check:
            self.backend.check_integrity()
        if self.progress is not None and len(self.rows) % PROGRESS_EVERY == 0:
            self.progress(c["finished"], self.n_runnable)

    def _fork_samples(self) -> None:
        """Fork every running request whose prompt is done into its samples."""
        ready = [(k, s) for k, s in enumerate(self.running) if s in self.to_fork and self.done[s] > 0]
        for k, parent in ready:
            self.to_fork.discard(parent)
            first = int(self.first_child[parent])
            children = range(first, first + int(self.extra[parent]))
            tokens, final = int(self.held[k]), int(self.context[parent] + self.target[parent])
            joined: list[int] = []
            for child in children:
                self.done[child] = self.done[parent]
                if self.done[child] >= self.target[child]:
                    self._sequence_done(child)  # its one output token is the shared first one
                elif self.policy.room(len(self.running) + len(joined)) > 0 and \
                        self.backend.can_fork(parent, child, tokens, final):
                    self.backend.fork(parent, child, tokens, final)
                    joined.append(child)
                else:
                    # No room now: it waits to be prefilled like a preempted sequence.
                    self.waiting.appendleft(child)
            self.tally["forks"] += len(joined)
            if joined:
                m = len(joined)
                self.running.extend(joined)
                self.prompt_left = np.concatenate([self.prompt_left, np.zeros(m, np.int64)])
                self.remaining = np.concatenate([self.remaining, self.target[joined] - self.done[joined]])
                self.held = np.concatenate([self.held, np.full(m, tokens, np.int64)])
                self.tally["stored"] += m * tokens

    def _ids(self, seq: int, stop: int) -> np.ndarray | None:
        """Token ids of ``seq``'s first ``stop`` tokens, when the backend matches tokens.
        The last answer is kept: a queue head the backend refuses is asked again each step."""
        if not self.tokens:
            return None
        if self._last_ids[:2] != (seq, stop):
            self._last_ids = (seq, stop, self.work.token_ids(int(self.request_of[seq]), stop, int(self.sample_of[seq])))
        return self._last_ids[2]

    def _sequence_done(self, s: int) -> None:
        r = int(self.request_of[s])
        self.open[r] -= 1
        if not self.open[r]:
            self._request_done(r, self.tally["step"])

    def _request_done(self, r: int, step: int) -> None:
        """Request ``r`` finished (or was skipped) at ``step``: count it, release its followers."""
        c = self.tally
        if self.fits[r]:
            c["finished"] += 1
            if self.cancels[r]:
                c["cancelled"] += 1
            else:
                c["served"] += 1
        self.arrivals.finished(r, step)

    # ---- profile and result ----------------------------------------------------------------
    def _profile(self, steps: int, tokens: float, span: int = 0) -> None:
        s = self.backend.sample()
        c = self.tally
        self.rows.append((c["step"], steps, len(self.running), len(self.waiting), tokens, s.slots_allocated,
                          s.free_slots, s.largest_free_run, s.sliding_blocks, s.used_bytes))
        blocks = s.group_blocks or (s.slots_allocated / self.backend.block_size,)
        cached = s.group_cached or (0,) * len(blocks)
        if self.kinds == ("full",):  # the common case, without the per-kind call
            self.group_rows.append((*blocks, *cached, tokens))
        else:
            self.group_rows.append((*blocks, *cached, *(live_tokens(self.held, k, span, tokens) for k in self.kinds)))

    def _result(self) -> ScheduleResult:
        c = self.tally
        ran = self.first_step >= 0
        series = StepSeries.from_rows(self.rows, self.backend.block_size, self.backend.capacity_slots,
                                      self.group_rows, self.kinds)
        return ScheduleResult(
            requests_served=c["served"], cancelled=c["cancelled"], skipped=int(np.count_nonzero(~self.fits)),
            truncated=self.truncated, steps=c["steps"], idle_steps=c["step"] - c["steps"],
            tokens_generated=c["generated"], prefill_tokens=c["prefill"], admissions=c["admissions"],
            preemptions=c["preemptions"], swap_ins=c["swap_ins"], bytes_swapped_out=c["bytes_out"],
            bytes_swapped_in=c["bytes_in"], peak_swapped_bytes=c["peak_swapped"], prompt_tokens=c["prompt"],
            cached_prompt_tokens=c["cached"], prefill_tokens_saved=c["saved"], forks=c["forks"],
            queue_delay_steps=(self.first_step - self.arrivals.step)[ran], series=series,
            wall_s=time.perf_counter() - self.started,
        )


__all__ = ["ARRIVALS", "PREEMPTION", "PROGRESS_EVERY", "ReplayCounts", "ScheduleResult", "SchedulerConfig", "SimulationError", "run_schedule"]
