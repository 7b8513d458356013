"""Replay a request trace through a `KVCacheManager` with continuous batching.

The point is to measure the allocator under a realistic mix of prompt and output
lengths: how full the pool runs, how much of what is allocated holds tokens, and
how often memory pressure forces a preemption. No model runs and no device memory
is touched; one step is one decode iteration of a vLLM-style scheduler.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable

import attrs
import numpy as np

from paged_kv.allocator.manager import KVCacheManager
from paged_kv.errors import OutOfBlocksError, PagedKVError
from paged_kv.sim.trace import Trace
from paged_kv.spec import CacheSpec

PROGRESS_EVERY = 1000
"""Steps between two calls of the ``progress`` callback."""


class SimulationError(PagedKVError, ValueError):
    """`simulate` was given settings it cannot run with (batch size, watermark)."""


@attrs.frozen(kw_only=True)
class SimReport:
    """What one `simulate` run measured. Per-step figures are taken after the step's
    decode append, when the step's forward pass would hold the most tokens."""

    requests_served: int
    skipped: int
    truncated: int
    steps: int
    tokens_generated: int
    prefill_tokens: int
    preemptions: int
    peak_blocks_in_use: int
    mean_blocks_in_use: float
    mean_group_blocks: tuple[float, ...]
    mean_used_bytes: float
    peak_used_bytes: int
    usable_blocks: int
    time_avg_utilization: float
    peak_running: int
    mean_running: float
    wall_s: float

    def as_dict(self) -> dict:
        return attrs.asdict(self)

    def format(self) -> str:
        """An aligned two-column text table, one figure per line."""
        rows = [
            ("requests served", f"{self.requests_served:,}"),
            ("skipped (prompt > max_seq_len)", f"{self.skipped:,}"),
            ("truncated (output cut to max_seq_len)", f"{self.truncated:,}"),
            ("steps", f"{self.steps:,}"),
            ("tokens generated", f"{self.tokens_generated:,}"),
            ("prefill tokens (incl. recompute)", f"{self.prefill_tokens:,}"),
            ("preemptions", f"{self.preemptions:,}"),
            ("peak blocks in use", f"{self.peak_blocks_in_use:,} / {self.usable_blocks:,}"),
            ("mean blocks in use", f"{self.mean_blocks_in_use:,.1f} / {self.usable_blocks:,}"),
            ("mean blocks per layer group", " / ".join(f"{b:,.1f}" for b in self.mean_group_blocks)),
            ("mean KV bytes held", f"{self.mean_used_bytes / 2**30:,.2f} GiB"),
            ("peak KV bytes held", f"{self.peak_used_bytes / 2**30:,.2f} GiB"),
            ("time-avg utilization (tokens/slots)", f"{self.time_avg_utilization:.4f}"),
            ("peak running", f"{self.peak_running:,}"),
            ("mean running", f"{self.mean_running:.1f}"),
            ("wall time", f"{self.wall_s:.2f} s"),
        ]
        width = max(len(k) for k, _ in rows)
        vwidth = max(len(v) for _, v in rows)
        return "\n".join(f"{k:<{width}}  {v:>{vwidth}}" for k, v in rows)


def simulate(
    trace: Trace,
    spec: CacheSpec,
    max_batch: int | None = None,
    watermark: float = 0.01,
    progress: Callable[[int, int], None] | None = None,
    check: bool = False,
) -> SimReport:
    """Serve every request of ``trace`` from a fresh `KVCacheManager` built from ``spec``.

    Offline replay: all requests are queued in trace order at step 0 and
    ``trace.arrival_s`` is not used yet, so the pool runs as full as admission
    allows; this measures allocator behaviour under sustained load, not latency.

    Each step:

    (a) admit from the queue head, first come first served, while the prompt fits
        (``can_admit``), at least ``watermark * usable_blocks`` blocks stay free
        afterwards (headroom so running sequences can grow without an immediate
        preemption; waived when nothing runs, so a big prompt cannot stall the
        queue) and fewer than ``max_batch`` sequences run. Admission allocates the
        whole prompt at once: that is its prefill.
    (b) append one token to every running sequence in one batched ``append``. If
        the pool is short, the newest running sequence is preempted by recompute:
        released and put back at the queue front, to be re-prefilled later with
        its prompt plus the tokens it had generated; then the append is retried.
    (c) release every sequence that has generated all its tokens.

    A newly admitted sequence decodes in the step that admitted it, as in vLLM
    where the prefill pass emits the first output token. A request longer than
    ``spec.max_seq_len`` has its output cut to fit (counted in ``truncated``);
    one whose prompt alone leaves no room for an output token is not run
    (counted in ``skipped``); one with no output is released as soon as it is
    admitted. ``progress(steps, requests_served)`` is called every
    `PROGRESS_EVERY` steps; ``check=True`` runs the manager's integrity check
    after every step (slow; for tests).
    """
    max_batch = spec.max_batch_slots if max_batch is None else max_batch
    if isinstance(max_batch, bool) or not isinstance(max_batch, (int, np.integer)) or not 1 <= max_batch <= spec.max_batch_slots:
        raise SimulationError(f"max_batch={max_batch!r} must be an integer in [1, max_batch_slots={spec.max_batch_slots}]")
    if not 0.0 <= watermark < 1.0:
        raise SimulationError(f"watermark={watermark!r} must be a fraction of the pool in [0, 1)")

    started = time.perf_counter()
    manager = KVCacheManager(spec)
    reserve = watermark * spec.usable_blocks
    context = trace.context_tokens
    fits = context + np.minimum(trace.generated_tokens, 1) <= spec.max_seq_len
    # Output each request will produce: cut so prompt + output <= max_seq_len.
    target = np.where(fits, np.minimum(trace.generated_tokens, spec.max_seq_len - context), 0)
    truncated = int(np.count_nonzero(fits & (target < trace.generated_tokens)))
    done = np.zeros(len(trace), dtype=np.int64)  # tokens generated so far, kept across preemptions

    queue = deque(int(i) for i in np.flatnonzero(fits))
    # Running sequences in admission order (the last is the newest, the one to
    # preempt), with their remaining output in a parallel array so that a step's
    # bookkeeping is a few vectorized operations, not a loop over the batch.
    running: list[int] = []
    remaining = np.empty(0, dtype=np.int64)

    steps = served = preemptions = prefill_tokens = peak_blocks = peak_running = peak_bytes = 0
    sum_blocks = sum_tokens = sum_running = sum_bytes = 0
    sum_group_blocks = np.zeros(len(manager.groups), dtype=np.int64)
    while queue or running:
        # (a) admission
        admitted: list[int] = []
        while queue and len(running) + len(admitted) < max_batch:
            i = queue[0]
            prompt = int(context[i] + done[i])
            if not manager.can_admit(prompt):
                break
            if (running or admitted) and manager.num_free_blocks - spec.blocks_for(prompt) < reserve:
                # num_free_blocks is the scarcest group's, so the headroom holds for every group.
                break
            queue.popleft()
            manager.admit(i, prompt)
            prefill_tokens += prompt
            if target[i] == done[i]:
                # Nothing to generate: the prefill was all the work it needed.
                manager.release(i)
                served += 1
            else:
                admitted.append(i)
        if admitted:
            running.extend(admitted)
            remaining = np.concatenate([remaining, target[admitted] - done[admitted]])
        if not running:
            if queue:
                # Unreachable while max_blocks_per_seq <= usable blocks (CacheSpec enforces
                # it) and prompts fit max_seq_len (filtered above); guards an endless loop.
                raise SimulationError(f"request {queue[0]} cannot be admitted into an empty pool")
            break  # the last requests had no output to generate

        # (b) one decode token per running sequence, preempting the newest on shortage
        while True:
            try:
                manager.append(running, 1)
                break
            except OutOfBlocksError:
                victim = running.pop()
                remaining = remaining[:-1]
                manager.release(victim)
                queue.appendleft(victim)
                preemptions += 1
        remaining -= 1
        if running:
            done[running] += 1

        steps += 1
        # Blocks and utilization are the first group's (all layers unless some slide);
        # bytes count every group.
        blocks = manager.pool.num_used
        used_bytes = manager.used_bytes
        n = len(running)
        sum_blocks += blocks
        sum_bytes += used_bytes
        peak_bytes = max(peak_bytes, used_bytes)
        sum_group_blocks += [g.pool.num_used for g in manager.groups]
        sum_tokens += manager.num_tokens_stored()
        sum_running += n
        peak_blocks = max(peak_blocks, blocks)
        peak_running = max(peak_running, n)

        # (c) release finished sequences
        finished = remaining <= 0
        if finished.any():
            for k in np.flatnonzero(finished).tolist():
                manager.release(running[k])
            served += int(np.count_nonzero(finished))
            keep = ~finished
            running = [s for s, k in zip(running, keep.tolist()) if k]
            remaining = remaining[keep]

        if check:
            manager.check_integrity()
        if progress is not None and steps % PROGRESS_EVERY == 0:
            progress(steps, served)

    slots = sum_blocks * spec.block_size
    return SimReport(
        requests_served=served,
        skipped=int(np.count_nonzero(~fits)),
        truncated=truncated,
        steps=steps,
        tokens_generated=int(done.sum()),
        prefill_tokens=prefill_tokens,
        preemptions=preemptions,
        peak_blocks_in_use=peak_blocks,
        mean_blocks_in_use=sum_blocks / steps if steps else 0.0,
        mean_group_blocks=tuple((sum_group_blocks / max(steps, 1)).tolist()),
        mean_used_bytes=sum_bytes / steps if steps else 0.0,
        peak_used_bytes=peak_bytes,
        usable_blocks=spec.usable_blocks,
        time_avg_utilization=sum_tokens / slots if slots else 0.0,
        peak_running=peak_running,
        mean_running=sum_running / steps if steps else 0.0,
        wall_s=time.perf_counter() - started,
    )


__all__ = ["PROGRESS_EVERY", "SimReport", "SimulationError", "simulate"]
