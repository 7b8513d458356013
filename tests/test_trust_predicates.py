"""Predicates answer, they never raise (issue 23 item 10).

A scheduler asks ``can_*`` before it acts, so a predicate that raises on the input the
action would refuse turns a clean "no" into a crash: ``can_admit(-1)`` and
``can_admit(2**80)`` raised `InvalidTokenCountError` where ``can_append`` and
``can_admit_prompt`` returned False. Every manager predicate, fed every odd value,
returns a bool, agrees with the action it predicts, and changes nothing.
"""

from __future__ import annotations

import numpy as np
import pytest

import paged_kv as pk
from paged_kv.allocator.swap_record import SwapRecord

ODD = [3, -1, 0, 2**80, -(2**80), 2**31, 2**63, np.int64(-5), np.uint64(2**64 - 1), True, 1.5, float("nan"), "3",
       None, [], [1], np.array([2]), np.array([1.0]), (1,), object(), 10**9, b"\x00"]


def manager() -> pk.KVCacheManager:
    spec = pk.CacheSpec(num_layers=2, num_blocks=17, block_size=4, max_blocks_per_seq=6, num_kv_heads=1, head_dim=2,
                        dtype="float32", sliding_window=8, sliding_layers=(1,))
    m = pk.KVCacheManager(spec, prefix_cache=True)
    m.admit(1, 5)
    return m


def record(num_tokens) -> SwapRecord:
    """A record of one block per group (right for 1 to 4 tokens)."""
    return SwapRecord(50, num_tokens, (0, 0), (np.zeros(1, np.int32), np.zeros(1, np.int32)))


PREDICATES = {
    "can_admit": (lambda m, v: m.can_admit(v), lambda m, v: m.admit(50, v)),
    "can_append.ids": (lambda m, v: m.can_append(v), lambda m, v: m.append(v)),
    "can_append.count": (lambda m, v: m.can_append([1], v), lambda m, v: m.append([1], v)),
    "can_admit_prompt.tokens": (lambda m, v: m.can_admit_prompt(v), lambda m, v: m.admit_prompt(50, v)),
    "can_admit_prompt.key": (lambda m, v: m.can_admit_prompt([1, 2, 3], cache_key=v),
                             lambda m, v: m.admit_prompt(50, [1, 2, 3], cache_key=v)),
    "can_admit_prompt.chunk": (lambda m, v: m.can_admit_prompt([1, 2, 3], chunk=v),
                               lambda m, v: m.admit_prompt(50, [1, 2, 3], chunk=v)),
    "can_swap_in.record": (lambda m, v: m.can_swap_in(v), lambda m, v: m.swap_in(v)),
    "can_swap_in.num_tokens": (lambda m, v: m.can_swap_in(record(v)), lambda m, v: m.swap_in(record(v))),
}


@pytest.mark.parametrize("name", sorted(PREDICATES))
def test_predicates_return_a_bool_that_matches_the_action(name):
    ask, act = PREDICATES[name]
    for value in ODD:
        m = manager()
        before = m.snapshot()
        answer = ask(m, value)  # must not raise
        assert type(answer) is bool, f"{name}({value!r}) returned {answer!r}"
        assert m.snapshot() == before, f"{name}({value!r}) changed the manager"
        try:
            act(m, value)
            acted = True
        except pk.PagedKVError:
            acted = False
        assert acted == answer, f"{name}({value!r}) answered {answer} but the action {'ran' if acted else 'refused'}"
        m.check_integrity()


def test_can_admit_out_of_range_counts_are_false():
    m = manager()
    assert [m.can_admit(v) for v in (-1, 0, 2**80, np.int64(-5), np.uint64(2**64 - 1))] == [False] * 5
    assert m.can_admit(4)
