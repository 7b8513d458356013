"""Fork with copy-on-write: children share their parent's blocks until they write."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

import paged_kv as pk
from test_transformer_model import LAYOUTS, Driver


def tiny_manager(num_blocks: int, max_blocks_per_seq: int) -> pk.KVCacheManager:
    """One layer, one head of dim 2, blocks of 4 tokens: bookkeeping-only tests."""
    return pk.KVCacheManager(pk.CacheSpec(num_layers=1, num_blocks=num_blocks, block_size=4,
                                          max_blocks_per_seq=max_blocks_per_seq, num_kv_heads=1, head_dim=2,
                                          dtype="float32"))


def fork(d: Driver, parent: int, child: int) -> None:
    d.manager.fork(parent, child)
    d.tokens[child] = list(d.tokens[parent])
    d.logits[child] = dict(d.logits[parent])
    d.manager.check_integrity()


@pytest.mark.parametrize("layout", ["split", "unified"])
@pytest.mark.parametrize("spec_kw", ["full", "mixed"])
def test_decoding_after_fork_equals_recompute(layout, spec_kw):
    d = Driver("float32", num_blocks=48, layout=layout, **LAYOUTS[spec_kw])
    d.step({0: d.random_tokens(17), 1: d.random_tokens(32), 2: d.random_tokens(1)})
    for parent, children in ((0, (10, 11, 12)), (1, (13,)), (2, (14,))):
        for c in children:
            fork(d, parent, c)
    live = [0, 1, 2, 10, 11, 12, 13, 14]
    for _ in range(20):  # every member diverges with its own tokens; sliding layers trim shared blocks
        d.step({s: d.random_tokens(1) for s in live})
    d.assert_matches_recompute(live, jnp.float32, 2e-4)


def test_copy_on_write_copies_one_block_per_diverging_writer():
    m = tiny_manager(num_blocks=32, max_blocks_per_seq=8)
    m.admit(0, 9)  # blocks: 4 | 4 | 1 (last partially filled)
    for c in (1, 2, 3):
        m.fork(0, c)
    shared = m.block_table(0)
    assert all(np.array_equal(m.block_table(c), shared) for c in (1, 2, 3))
    assert m.pool.ref_counts[shared].tolist() == [4, 4, 4] and m.num_used_blocks == 3

    m.append([1], 1)  # one writer of four holders: one copy, of the last block only
    assert m.num_pending_copies == 1
    assert m.block_table(1)[:2].tolist() == shared[:2].tolist() and m.block_table(1)[2] != shared[2]
    m.append([0, 2, 3], 1)  # the three remaining holders all write: two copies, the last keeps it
    assert m.num_pending_copies == 3 and m.num_used_blocks == 6
    # One holder left; each pending copy pins the source until its step is committed.
    assert m.pool.ref_counts[shared].tolist() == [4, 4, 1 + 3]
    tails = {int(m.block_table(s)[2]) for s in range(4)}
    assert len(tails) == 4 and int(shared[2]) in tails
    meta = m.step_metadata([0, 1, 2, 3], [1, 1, 1, 1])
    src, dst, length = meta.groups[0].copy_src, meta.groups[0].copy_dst, meta.groups[0].copy_len
    real = dst < m.spec.num_blocks
    assert (src[real] == shared[2]).all() and sorted(dst[real].tolist()) == sorted(tails - {int(shared[2])})
    assert (length[real] == 1).all() and (length[~real] == 0).all()  # only the shared token slot
    # Describing the step again (a retry) carries the same copies: nothing is lost.
    again = m.step_metadata([0, 1, 2, 3], [1, 1, 1, 1]).groups[0]
    assert np.array_equal(again.copy_dst, meta.groups[0].copy_dst) and m.num_pending_copies == 3
    m.commit([0, 1, 2, 3])  # the step ran: copies retire, the source loses its pins
    assert m.num_pending_copies == 0 and m.pool.ref_counts[shared].tolist() == [4, 4, 1]
    assert m.step_metadata([0], 1).groups[0].copy_src.size == 0
    m.check_integrity()

    # Full shared blocks are never copied: a block-aligned fork appends into new blocks.
    m.admit(5, 8)
    m.fork(5, 6)
    m.append([5, 6], 3)
    assert m.num_pending_copies == 0
    assert m.block_table(5)[:2].tolist() == m.block_table(6)[:2].tolist()


def test_release_frees_only_unshared_blocks():
    m = tiny_manager(num_blocks=32, max_blocks_per_seq=8)
    m.admit(0, 10)
    m.fork(0, 1)
    m.append([1], 5)  # copies block 2, adds one more
    assert m.release(0) == 0  # its last block stays pinned until 1's copy of it has run
    m.check_integrity()
    m.step_metadata([1], 5)
    m.commit([1])  # the copy ran: the pin goes and the block is free
    m.check_integrity()
    assert m.num_used_blocks == 4
    assert m.release(1) == 4 and m.num_used_blocks == 0
    m.check_integrity()


def test_fork_errors_change_nothing():
    m = tiny_manager(num_blocks=8, max_blocks_per_seq=4)
    m.admit(0, 3)
    m.admit(1, 3)
    before = m.snapshot()
    with pytest.raises(pk.UnknownSequenceError, match="seq_id=7"):
        m.fork(7, 2)
    with pytest.raises(pk.DuplicateSequenceError, match="seq_id=1 is already admitted"):
        m.fork(0, 1)
    with pytest.raises(pk.InvalidTokenCountError, match="seq_id=True"):
        m.fork(0, True)
    assert m.snapshot() == before


def test_copy_on_write_when_the_pool_is_short():
    m = tiny_manager(num_blocks=4, max_blocks_per_seq=3)
    m.admit(0, 6)  # blocks A (full) and B (2 tokens); 1 of 3 usable blocks left
    m.fork(0, 1)
    m.append([0], 1)  # 0 copies B into the last free block
    assert m.num_pending_copies == 1 and m.pool.num_free == 0
    assert m.can_append([1], 1)  # 1 now holds B alone: it writes in place, no block needed
    m.append([1], 1)
    assert m.num_pending_copies == 1
    m.fork(1, 2)  # B shared again
    before = m.snapshot()
    assert not m.can_append([2], 1)
    with pytest.raises(pk.OutOfBlocksError, match="need 1 free blocks"):
        m.append([2], 1)  # its copy needs a block the pool does not have
    assert m.snapshot() == before and m.num_pending_copies == 1
    m.release(0)  # frees 0's copy of B (its pending copy dies with it): now 2's copy fits
    assert m.num_pending_copies == 0
    m.append([2], 1)
    assert m.num_pending_copies == 1
    m.check_integrity()
