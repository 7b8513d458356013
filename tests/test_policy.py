"""The scheduling policy the simulator's replay and the model generator share."""

from __future__ import annotations

import subprocess
import sys
from collections import deque

import numpy as np
import pytest

from paged_kv.errors import InvalidArgumentError
from paged_kv.sched import SchedulingPolicy, leaves_headroom


def test_admission_is_fcfs_and_stops_at_the_first_refusal():
    policy = SchedulingPolicy(max_batch=4)
    waiting = deque(["a", "b", "c", "d"])
    asked = []

    def take(head, budget):
        asked.append((head, budget))
        return None if head == "b" else 5

    assert policy.admit(waiting, 1, take) == ["a"]
    assert list(waiting) == ["b", "c", "d"] and asked == [("a", None), ("b", None)]  # "c" never overtakes "b"


def test_admission_respects_the_batch_and_the_token_budget():
    take = lambda head, budget: min(10, budget)  # noqa: E731
    assert SchedulingPolicy(max_batch=3).admit(deque(range(5)), 1, lambda h, b: 0) == [0, 1]
    policy = SchedulingPolicy(max_batch=8, token_budget=24)
    waiting = deque(range(5))
    assert policy.admit(waiting, 0, take, budget_used=3) == [0, 1, 2]  # 21 left: 10, 10, 1
    assert list(waiting) == [3, 4]


def test_plan_decodes_first_then_chunks_in_admission_order():
    prompt_left = np.array([0, 7, 0, 5, 9])
    remaining = np.array([3, 2, 1, 0, 4])
    plan = SchedulingPolicy(max_batch=8, token_budget=12).plan(prompt_left, remaining)
    # decoders: 2 tokens; 10 left: 7 (completes, generates), then 3 of 5 (no output due anyway), then 0
    assert plan.granted.tolist() == [0, 7, 0, 3, 0]
    assert plan.generates.tolist() == [True, True, True, False, False]
    assert plan.tokens.tolist() == [1, 8, 1, 3, 0] and plan.used == 12
    capped = SchedulingPolicy(max_batch=8, prefill_chunk=4).plan(prompt_left, remaining)
    assert capped.granted.tolist() == [0, 4, 0, 4, 4] and not capped.generates[[1, 3, 4]].any()
    assert SchedulingPolicy(max_batch=1, prefill_chunk=4).chunk(9, budget_left=3) == 3


def test_preemption_takes_the_newest_until_the_rest_fit():
    policy = SchedulingPolicy(max_batch=4)
    assert policy.newest(["old", "new"]) == "new"
    stamps = {"x": 1, "y": 2, "z": 2}
    assert policy.newest(["x", "y", "z"], admitted_at=stamps.get) == "y"  # first among equal stamps
    running = ["a", "b", "c", "d"]
    assert policy.make_room(lambda: len(running) <= 2, running.pop) == 2 and running == ["a", "b"]


def test_headroom_and_bad_settings():
    assert leaves_headroom(10, 4, 6) and not leaves_headroom(10, 4, 6.5)
    for bad in (dict(max_batch=0), dict(max_batch=2, token_budget=0), dict(max_batch=2, prefill_chunk=True)):
        with pytest.raises(InvalidArgumentError):
            SchedulingPolicy(**bad)


def test_the_policy_imports_no_jax():
    code = "import sys, paged_kv.sched; assert 'jax' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)
