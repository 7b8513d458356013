"""Swap preemption: a sequence's pages go to host memory and come back bit-exact."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

import paged_kv as pk
from paged_kv.swap import swap_in, swap_out
from test_transformer_model import EDGE_LENGTHS, LAYOUTS, Driver

CASES = {
    "split-bf16": ("bfloat16", "split", {}),
    "unified-bf16": ("bfloat16", "unified", {}),
    "split-f32-mixed-sliding": ("float32", "split", LAYOUTS["mixed"]),
    "unified-bf16-all-sliding": ("bfloat16", "unified", LAYOUTS["all-sliding"]),
}


@pytest.mark.parametrize("case", list(CASES))
def test_swap_round_trip_is_bit_exact_and_decoding_continues(case):
    dtype, layout, spec_kw = CASES[case]
    d = Driver(dtype, num_blocks=40, layout=layout, **spec_kw)
    d.step({i: d.random_tokens(n) for i, n in enumerate(EDGE_LENGTHS)})
    live = list(range(len(EDGE_LENGTHS)))
    for _ in range(3):
        d.step({s: d.random_tokens(1) for s in live})

    free_before = d.manager.num_free_blocks
    out = {}
    for s in (3, 5):
        out[s] = swap_out(d.cache, d.manager, s)
        live.remove(s)
        assert s not in d.manager
        d.manager.check_integrity()
    freed = [b for s in out for b in out[s].record.blocks[0].tolist()]
    assert d.manager.num_free_blocks > free_before
    assert out[3].nbytes == sum(a.nbytes for layer in out[3].pages for a in layer) > 0

    # A newcomer takes (and overwrites) the freed blocks while 3 and 5 are away.
    d.step({200: d.random_tokens(40)})
    assert set(d.manager.block_table(200).tolist()) & set(freed)
    live.append(200)
    d.step({s: d.random_tokens(1) for s in live})

    for s in (3, 5):
        d.cache = swap_in(d.cache, d.manager, out[s])
        d.manager.check_integrity()
        assert d.manager.kv_len(s) == len(d.tokens[s])
        # Out again, the bits are the same as the first time: nothing was lost or altered.
        again = swap_out(d.cache, d.manager, s)
        for layer_a, layer_b in zip(out[s].pages, again.pages):
            for a, b in zip(layer_a, layer_b):
                assert a.dtype == b.dtype and np.array_equal(a, b)
        d.cache = swap_in(d.cache, d.manager, again)
        live.append(s)

    for _ in range(4):
        d.step({s: d.random_tokens(1) for s in live})
    kv_dtype = jnp.bfloat16 if dtype == "bfloat16" else jnp.float32
    d.assert_matches_recompute(live, kv_dtype, 2e-3 if dtype == "bfloat16" else 2e-4)


def test_swap_in_failures_change_nothing():
    d = Driver("float32", num_blocks=12)
    d.step({0: d.random_tokens(33), 1: d.random_tokens(20)})
    gone = swap_out(d.cache, d.manager, 0)  # 3 blocks to host
    d.step({2: d.random_tokens(16 * 8)})  # takes 8 of the 9 free blocks, leaving 1
    before = d.manager.snapshot()
    assert not d.manager.can_swap_in(gone.record)
    with pytest.raises(pk.OutOfBlocksError, match="need 3 free blocks for swap_in\\(seq_id=0\\)"):
        d.cache = swap_in(d.cache, d.manager, gone)
    assert d.manager.snapshot() == before

    d.manager.release(2)
    d.step({0: d.random_tokens(5)})  # the id is taken by a new sequence
    before = d.manager.snapshot()
    with pytest.raises(pk.DuplicateSequenceError, match="seq_id=0"):
        d.cache = swap_in(d.cache, d.manager, gone)
    assert d.manager.snapshot() == before

    with pytest.raises(pk.UnknownSequenceError, match="seq_id=7"):
        swap_out(d.cache, d.manager, 7)
    assert d.manager.snapshot() == before


def test_swap_rejects_pages_of_another_shape():
    d = Driver("float32")
    d.step({0: d.random_tokens(20)})
    gone = swap_out(d.cache, d.manager, 0)
    bad = type(gone)(gone.record, tuple(tuple(a[:, :-1] for a in layer) for layer in gone.pages))
    before = d.manager.snapshot()
    with pytest.raises(pk.ShapeError, match="layer 0"):
        swap_in(d.cache, d.manager, bad)
    assert d.manager.snapshot() == before
    other = pk.PagedKVCache.init(pk.CacheSpec(num_layers=2, num_blocks=8, block_size=16, max_blocks_per_seq=4,
                                              num_kv_heads=2, head_dim=8, dtype="float32"))
    with pytest.raises(pk.SpecError, match="built for"):
        swap_in(other, d.manager, gone)


def test_host_only_swap_keeps_sliding_offsets():
    spec = pk.CacheSpec(num_layers=2, num_blocks=40, block_size=4, max_blocks_per_seq=16, num_kv_heads=1,
                        head_dim=2, dtype="float32", sliding_window=8, sliding_layers=(1,), sliding_num_blocks=12)
    m = pk.KVCacheManager(spec)
    m.admit(1, 6)
    m.append([1], 1)
    for _ in range(20):
        m.append([1], 1)
    rec = m.swap_out(1)
    assert rec.num_tokens == 27 and rec.first_blocks[0] == 0 and rec.first_blocks[1] > 0
    assert rec.num_blocks == (7, 7 - rec.first_blocks[1])
    new = m.swap_in(rec)
    m.check_integrity()
    assert [a.size for a in new] == list(rec.num_blocks)
    assert m.kv_len(1) == 27 and np.array_equal(m.block_table(1, 1), new[1])
    m.append([1], 5)  # and it keeps sliding
    m.check_integrity()
