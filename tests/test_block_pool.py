import numpy as np
import pytest

import paged_kv as pk


def test_allocate_free_round_trip_never_hands_out_null():
    pool = pk.BlockPool(9)
    a = pool.allocate(5)
    assert pk.NULL_BLOCK not in a and len(set(a.tolist())) == 5
    b = pool.allocate(3)
    assert pool.num_free == 0 and not pool.can_allocate(1)
    pool.check_integrity()
    assert set(pool.free(a).tolist()) == set(a.tolist())
    assert pool.num_free == 5
    c = pool.allocate(5)
    assert set(c.tolist()) == set(a.tolist())  # LIFO: the freed blocks come back
    pool.free(np.concatenate([b, c]))
    pool.check_integrity()
    assert pool.num_free == 8


def test_out_of_blocks_is_typed_and_changes_nothing():
    pool = pk.BlockPool(5)
    pool.allocate(2)
    with pytest.raises(pk.OutOfBlocksError, match="need 3 free blocks but only 2"):
        pool.allocate(3)
    assert pool.num_free == 2
    pool.check_integrity()


def test_ref_counts_share_blocks():
    pool = pk.BlockPool(5)
    ids = pool.allocate(2)
    pool.incref(ids)
    assert pool.free(ids).size == 0  # still one owner each
    assert pool.num_free == 2
    assert set(pool.free(ids).tolist()) == set(ids.tolist())
    pool.check_integrity()


def test_double_free_and_null_free_raise():
    pool = pk.BlockPool(5)
    ids = pool.allocate(1)
    pool.free(ids)
    with pytest.raises(pk.PagedKVError, match="double free"):
        pool.free(ids)
    with pytest.raises(pk.PagedKVError):
        pool.free(np.array([pk.NULL_BLOCK]))
    pool.check_integrity()
