"""The scheduling policy of continuous batching: what the simulator's replay
(`paged_kv.sim.scheduler`) and the model generator (`paged_kv.models.generate`) both
follow. The policy decides; each loop acts on its own memory (a simulator backend, or
a `KVCacheManager` with `DecodeSlots`) and answers the policy's questions through
callbacks ("does this fit", "admit this one").

- **Admission** (`SchedulingPolicy.admit`): first come, first served from the queue
  head while the batch has room, the step's token budget lasts and the loop takes the
  head; the first refusal ends it (nothing overtakes the head).
- **Prompt chunks** (`chunk`, `plan`): a sequence computes what is left of its prompt,
  capped by the per-sequence chunk and the budget left; the running sequences are
  planned together, decoders one token each, then prompt chunks in admission order
  while the budget lasts.
- **Headroom** (`leaves_headroom`): admission leaves a reserve of free blocks for the
  running sequences to grow (the simulator's watermark: a fraction of the pool while
  others run; the generator's headroom: blocks per running sequence).
- **Preemption** (`newest`, `make_room`): while the running sequences cannot all grow,
  the newest admitted is preempted. What a preempted sequence loses (its blocks,
  recomputed later, or nothing: swapped to host memory) is the loop's.

Host only (numpy); of paged_kv it imports only `paged_kv.errors`, so the host
simulator and the device-side models share it.
"""

from __future__ import annotations

import dataclasses
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple, TypeVar

import numpy as np

from paged_kv.errors import InvalidArgumentError

T = TypeVar("T")


def leaves_headroom(free_blocks: float, need_blocks: float, reserve_blocks: float) -> bool:
    """Whether an admission that takes ``need_blocks`` of ``free_blocks`` leaves
    ``reserve_blocks`` free for the running sequences to grow (the watermark)."""
    return free_blocks - need_blocks >= reserve_blocks


class StepPlan(NamedTuple):
    """The running sequences' share of one step (`SchedulingPolicy.plan`), one entry each."""

    tokens: np.ndarray
    """Tokens each holds more after the step: its prompt chunk, plus the output token it produces."""
    granted: np.ndarray
    """Prompt tokens each computes."""
    generates: np.ndarray
    """Whether each produces an output token (a decoder, or a prompt whose last chunk this is)."""
    used: int
    """Budget the step's running sequences take (decode tokens plus prompt chunks)."""


@dataclasses.dataclass(frozen=True)
class SchedulingPolicy:
    """FCFS continuous batching with a batch limit, an optional token budget per step
    and optional chunked prefill; newest-first preemption. See the module docstring."""

    max_batch: int
    """Most sequences in one step (running, plus those admitted into it)."""
    token_budget: int | None = None
    """Tokens one step may process (one per decoder plus prompt chunks); None: no limit."""
    prefill_chunk: int | None = None
    """Prompt tokens one sequence computes per step; None: what is left of its prompt."""

    def __post_init__(self) -> None:
        for name in ("max_batch", "token_budget", "prefill_chunk"):
            value = getattr(self, name)
            if (value is not None or name == "max_batch") and (
                    isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1):
                raise InvalidArgumentError(f"{name}={value!r} must be an integer >= 1"
                                           + ("" if name == "max_batch" else " or None"))

    def chunk(self, prompt_left: int, budget_left: int | None = None) -> int:
        """Prompt tokens a sequence with ``prompt_left`` to compute gets now."""
        if self.prefill_chunk is not None:
            prompt_left = min(prompt_left, self.prefill_chunk)
        return prompt_left if budget_left is None else min(prompt_left, budget_left)

    def plan(self, prompt_left: np.ndarray, remaining: np.ndarray) -> StepPlan:
        """The running sequences' tokens this step, given each one's prompt tokens not yet
        computed and output tokens still due, in admission order: decoders one each, then
        prompt chunks in admission order while the budget lasts."""
        prefilling = prompt_left > 0
        counts = (~prefilling).astype(np.int64)
        used = int(counts.sum())
        granted = np.zeros_like(prompt_left)
        generates = ~prefilling
        if prefilling.any():
            idx = np.flatnonzero(prefilling)
            left = prompt_left[idx]
            want = left if self.prefill_chunk is None else np.minimum(left, self.prefill_chunk)
            if self.token_budget is None:
                got = want
            else:
                got = np.clip(self.token_budget - used - (np.cumsum(want) - want), 0, want)
            granted[idx] = got
            completes = (got == left) & (remaining[idx] > 0)
            generates = generates.copy()
            generates[idx] = completes
            counts[idx] = got + completes
            used += int(got.sum())
        return StepPlan(counts, granted, generates, used)

    def admit(self, waiting: deque[T], running: int, take: Callable[[T, int | None], int | None],
              budget_used: int = 0) -> list[T]:
        """Admit from the head of ``waiting``, in order, while the batch (``running``
        sequences already) has room and the token budget (``budget_used`` of it spent)
        lasts. ``take(head, budget_left)`` admits the head and returns the prompt tokens it
        computes this step, or returns None and changes nothing (it does not fit, has not
        arrived, ...): admission stops there. Returns the admitted, popped from
        ``waiting``."""
        budget_left = None if self.token_budget is None else self.token_budget - budget_used
        admitted: list[T] = []
        while waiting and running + len(admitted) < self.max_batch and (budget_left is None or budget_left > 0):
            computed = take(waiting[0], budget_left)
            if computed is None:
                break
            admitted.append(waiting.popleft())
            if budget_left is not None:
                budget_left -= computed
        return admitted

    def room(self, running: int) -> int:
        """Sequences the batch can still take beside ``running``."""
        return self.max_batch - running

    @staticmethod
    def newest(running: Sequence[T], admitted_at: Callable[[T], Any] | None = None) -> T:
        """The sequence to preempt: the newest admitted. Without ``admitted_at``,
        ``running`` is in admission order (the last); with it, the one with the highest
        stamp (the first listed among equal stamps)."""
        return running[-1] if admitted_at is None else max(running, key=admitted_at)

    @staticmethod
    def make_room(fits: Callable[[], bool], preempt_newest: Callable[[], None]) -> int:
        """Preempt the newest running sequence until ``fits()``: the running sequences can
        all grow this step (``fits`` may grow them when they can: it is asked once more
        after every preemption). Returns how many were preempted."""
        preempted = 0
        while not fits():
            preempt_newest()
            preempted += 1
        return preempted


__all__ = ["SchedulingPolicy", "StepPlan", "leaves_headroom"]
