"""Every host entry point, fed values of the wrong type or range: a typed error or a
success, never a builtin exception, and a failed call changes nothing.

The bad-input table (`test_bad_input.py`) pins the exact error and message of named
cases; this sweep covers the class: each argument of each call takes every value of
`WEIRD` (None, bools, floats, NaN, strings, nested lists, float arrays, numpy
integers that overflow int64, huge Python ints, objects).
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest

import paged_kv as pk
from paged_kv import DecodeSlots

WEIRD = [None, -1, True, 1.5, "x", [], [[1]], np.array([1.0]), 2**70, float("nan"), {}, (1,), np.int64(-5),
         np.uint64(2**64 - 1), object(), 0, 10**9]
SECOND = [None, 1, -1, "x", [1, 1]]


def env():
    spec = pk.CacheSpec(num_layers=2, num_blocks=17, block_size=4, max_blocks_per_seq=6, max_batch_slots=4,
                        num_kv_heads=2, head_dim=4, dtype="float32", sliding_window=8, sliding_layers=(1,))
    m = pk.KVCacheManager(spec)
    m.admit(1, 5)
    m.admit(2, 3)
    slots = DecodeSlots(m)
    slots.insert(1, 0)
    pspec = pk.CacheSpec(num_layers=1, num_blocks=17, block_size=4, max_blocks_per_seq=6, num_kv_heads=1,
                         head_dim=2, dtype="float32")
    pm = pk.KVCacheManager(pspec, prefix_cache=True)
    pm.admit_prompt(1, np.arange(5))
    return spec, m, slots, pm


CALLS = {
    "admit": lambda e, a, b: e[1].admit(a, b),
    "append": lambda e, a, b: e[1].append(a, b),
    "can_admit": lambda e, a, b: e[1].can_admit(a),
    "can_append": lambda e, a, b: e[1].can_append(a, b),
    "release": lambda e, a, b: e[1].release(a),
    "kv_len": lambda e, a, b: e[1].kv_len(a),
    "block_table": lambda e, a, b: e[1].block_table(b, a),
    "step_metadata": lambda e, a, b: e[1].step_metadata(a, b),
    "commit": lambda e, a, b: e[1].commit(a, b),
    "fork": lambda e, a, b: e[1].fork(a, b),
    "swap_out": lambda e, a, b: e[1].swap_out(a),
    "swap_in": lambda e, a, b: e[1].swap_in(a),
    "can_swap_in": lambda e, a, b: e[1].can_swap_in(a),
    "admit_prompt": lambda e, a, b: e[3].admit_prompt(9, a, chunk=b),
    "admit_prompt_cache_key": lambda e, a, b: e[3].admit_prompt(b, [1, 2, 3], cache_key=a),
    "can_admit_prompt": lambda e, a, b: e[3].can_admit_prompt(a, chunk=b),
    "cache_tokens": lambda e, a, b: e[3].cache_tokens(a, b),
    "slots.insert": lambda e, a, b: e[2].insert(a, b),
    "slots.remove": lambda e, a, b: e[2].remove(a),
    "slots.release": lambda e, a, b: e[2].release(a),
    "slots.slot_of": lambda e, a, b: e[2].slot_of(a),
    "slots.seq_at": lambda e, a, b: e[2].seq_at(a),
    "slots.step_metadata": lambda e, a, b: e[2].step_metadata(a),
    "slots.can_insert": lambda e, a, b: e[2].can_insert(a, b),
    "DecodeSlots": lambda e, a, b: DecodeSlots(e[1], a),
    "slot_step_metadata": lambda e, a, b: pk.slot_step_metadata(e[1], a, b),
    "spec.blocks_for": lambda e, a, b: e[0].blocks_for(a),
    "spec.group_of": lambda e, a, b: e[0].group_of(a),
    "spec.window_blocks": lambda e, a, b: e[0].window_blocks(a),
    "CacheSpec.for_memory": lambda e, a, b: pk.CacheSpec.for_memory(a, num_layers=2, block_size=4, num_kv_heads=1,
                                                                    head_dim=2),
    "CacheSpec.num_blocks": lambda e, a, b: pk.CacheSpec(num_layers=2, num_blocks=a, block_size=4,
                                                         max_blocks_per_seq=2, num_kv_heads=1, head_dim=2),
    "CacheSpec.window": lambda e, a, b: pk.CacheSpec(num_layers=2, num_blocks=9, block_size=4, max_blocks_per_seq=2,
                                                     num_kv_heads=1, head_dim=2, sliding_window=a, sliding_layers=b),
    "CacheSpec.dtype": lambda e, a, b: pk.CacheSpec(num_layers=2, num_blocks=9, block_size=4, max_blocks_per_seq=2,
                                                    num_kv_heads=1, head_dim=2, dtype=a),
    "KVCacheManager": lambda e, a, b: pk.KVCacheManager(a, b),
    "PagedKVCache.init.layout": lambda e, a, b: pk.PagedKVCache.init(e[0], layout=a),
    "bucket": lambda e, a, b: pk.bucket(a, b),
}


def _state(e):
    return e[1].snapshot(), e[2].snapshot(), e[3].snapshot()


@pytest.mark.parametrize("name", sorted(CALLS))
def test_weird_arguments_raise_typed_errors_and_change_nothing(name):
    call = CALLS[name]
    for a, b in itertools.product(WEIRD, SECOND):
        e = env()
        before = _state(e)
        try:
            call(e, a, b)
        except pk.PagedKVError:
            assert _state(e) == before, f"{name}({a!r}, {b!r}) raised but changed state"
        except Exception as exc:  # noqa: BLE001 - the point: no builtin error escapes
            pytest.fail(f"{name}({a!r}, {b!r}) raised {type(exc).__name__}: {exc}")
        e[1].check_integrity()
        e[2].check_integrity()
        e[3].check_integrity()
