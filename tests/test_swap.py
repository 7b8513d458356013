"""Swap preemption: a sequence's pages go to host memory and come back bit-exact."""

from __future__ import annotations

import attrs
import jax
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
    bad = attrs.evolve(gone, pages=tuple(tuple(a[:, :-1] for a in layer) for layer in gone.pages))
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


# ---- trust: what swap_in takes back (issue 23 item 3) ----------------------------------------
def _dead_slot_driver():
    """Seq 0 fills two blocks and leaves; seq 1 (BLOCK + 3 tokens) gets them, so its last
    block's slots past its length still hold seq 0's keys and values."""
    from test_transformer_model import BLOCK
    d = Driver("float32", num_blocks=12, layout="unified")
    d.step({0: d.random_tokens(2 * BLOCK)})
    old = set(d.manager.block_table(0).tolist())
    d.manager.release(0)
    d.step({1: d.random_tokens(BLOCK + 3)})
    assert set(d.manager.block_table(1).tolist()) <= old
    return d, BLOCK


def test_swap_out_zeroes_the_previous_owners_slots_past_the_length():
    d, block = _dead_slot_driver()
    used = 3  # tokens of seq 1 in its last block
    stale = [np.asarray(leaf)[d.manager.block_table(1)[-1], used:] for view in d.cache.views
             for leaf in jax.tree_util.tree_leaves(view.pages())]
    assert any(a.any() for a in stale), "the setup must leave another sequence's bytes there"
    gone = swap_out(d.cache, d.manager, 1)
    for layer in gone.pages:
        for a in layer:
            assert not a[-1, used:].any(), "a host copy carries another sequence's bytes past the length"
            assert a[-1, :used].any() and a[0].any()  # its own tokens are kept
    d.step({5: d.random_tokens(2 * block)})  # someone takes the blocks again
    d.cache = swap_in(d.cache, d.manager, gone)
    table = d.manager.block_table(1)
    for view in d.cache.views:
        for leaf in jax.tree_util.tree_leaves(view.pages()):
            assert not np.asarray(leaf)[table[-1], used:].any()


def test_swap_in_refuses_anything_but_what_swap_out_made():
    d, _ = _dead_slot_driver()
    gone = swap_out(d.cache, d.manager, 1)
    rec = gone.record
    raised = attrs.evolve(rec, num_tokens=rec.num_tokens + 1)  # the same block count: the old check passed it
    bad = {
        "num_tokens raised": (attrs.evolve(gone, record=raised), pk.InvalidArgumentError, "does not match"),
        "hand-built, no spec": (pk.SwappedSequence(rec, gone.pages), pk.InvalidArgumentError, "has no spec"),
        "hand-built with a spec": (pk.SwappedSequence(rec, gone.pages, gone.spec), pk.InvalidArgumentError,
                                   "does not match"),
        "spec removed": (attrs.evolve(gone, spec=None), pk.InvalidArgumentError, "has no spec"),
        "spec not a spec": (attrs.evolve(gone, spec="x"), pk.InvalidArgumentError, "swapped.spec is a str"),
        "written raised": (attrs.evolve(gone, written=gone.written + 1), pk.InvalidArgumentError, "does not match"),
        "written not an int": (attrs.evolve(gone, written=None), pk.InvalidArgumentError, "does not match"),
        "seal not bytes": (attrs.evolve(gone, seal="x"), pk.InvalidArgumentError, "does not match"),
        "pages as tuples": (attrs.evolve(gone, pages=tuple(tuple(a.tolist() for a in layer) for layer in gone.pages)),
                            pk.ShapeError, "tuple of numpy arrays"),
        "pages not a tuple": (attrs.evolve(gone, pages=3), pk.ShapeError, "pages for int layers"),
    }
    before = d.manager.snapshot()
    for name, (swapped, error, match) in bad.items():
        with pytest.raises(error, match=match):
            swap_in(d.cache, d.manager, swapped)
        assert d.manager.snapshot() == before, name
    d.cache = swap_in(d.cache, d.manager, gone)  # the real one still comes back
    assert d.manager.kv_len(1) == rec.num_tokens


def test_swap_in_marks_only_written_tokens_written():
    """A prompt swapped out before its step ran comes back unwritten: its blocks must not
    become prefix hits (before, swap_in committed every token it held)."""
    spec = pk.CacheSpec(num_layers=1, num_blocks=20, block_size=4, max_blocks_per_seq=8, num_kv_heads=1,
                        head_dim=2, dtype="float32")
    cache, m = pk.PagedKVCache.init(spec), pk.KVCacheManager(spec, prefix_cache=True)
    m.admit_prompt(0, np.arange(13))  # no step ran: nothing written
    m.admit_prompt(1, np.arange(100, 113))
    m.commit([1], 8)  # two blocks written
    gone = {s: swap_out(cache, m, s) for s in (0, 1)}
    assert (gone[0].written, gone[1].written) == (0, 8)
    for s in (0, 1):
        cache = swap_in(cache, m, gone[s])
    assert m.admit_prompt(2, np.arange(13)) == 0
    assert m.admit_prompt(3, np.arange(100, 113)) == 8
    m.check_integrity()
