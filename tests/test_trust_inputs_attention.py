"""Issue 23 item 4: paged attention gives 0 only where a query sees no key.

A NaN key or query must read back NaN, as a dense softmax gives it, not a plausible 0;
a NaN parked where no query looks (past a row's length, after a query's position) must
not reach anyone. Each case is compared with a float64 dense softmax over exactly the
keys the query may see (NaN propagates through it as numpy propagates it).
"""

from __future__ import annotations


import jax
import jax.numpy as jnp
import numpy as np
import pytest

import paged_kv as pk
from paged_kv.attention import paged_attention_xla

BS, HQ, HK, D = 4, 4, 2, 8


def dense_softmax(q, keys, values, lo, hi, scale):
    """q [Hq, D] over keys/values [lo, hi] (inclusive) -> [Hq, D]; zeros if the range is empty."""
    out = np.zeros((q.shape[0], values.shape[-1]))
    if hi < lo:
        return out
    k, v = keys[lo:hi + 1].astype(np.float64), values[lo:hi + 1].astype(np.float64)
    for h in range(q.shape[0]):
        with np.errstate(invalid="ignore", over="ignore"):
            logits = k[:, h // (HQ // HK)] @ q[h].astype(np.float64) * scale
            p = np.exp(logits - logits.max())
            out[h] = (p / p.sum()) @ v[:, h // (HQ // HK)]
    return out


def _pool(rng, num_blocks=20, width=4):
    keys = rng.normal(size=(num_blocks, BS, HK, D)).astype(np.float32)
    values = rng.normal(size=(num_blocks, BS, HK, D)).astype(np.float32)
    tables = rng.permutation(np.arange(1, num_blocks))[: 4 * width].reshape(4, width).astype(np.int32)
    return keys, values, tables


def _run(q, keys, values, tables, kv_lens, positions, **kw):
    kj, vj = jnp.asarray(keys), jnp.asarray(values)

    def read(ids):
        b, c = ids.shape
        return kj[ids].reshape(b, c * BS, HK, D), vj[ids].reshape(b, c * BS, HK, D)

    run = jax.jit(lambda q, t, k, p: paged_attention_xla(q, read, t, k, p, block_size=BS, **kw))
    return np.asarray(run(jnp.asarray(q), jnp.asarray(tables), jnp.asarray(kv_lens), jnp.asarray(positions)))


def _flat(pool, tables, row):
    return pool[tables[row]].reshape(-1, *pool.shape[2:])


@pytest.mark.parametrize("chunk_blocks,window", [(8, None), (1, None), (1, 6)])
def test_nan_key_or_query_reads_nan_and_only_empty_rows_read_zero(chunk_blocks, window):
    rng = np.random.default_rng(0)
    keys, values, tables = _pool(rng)
    kv_lens = np.array([9, 0, 16, 5], np.int32)
    positions = np.array([[7, 8], [0, 0], [14, 15], [3, 4]], np.int32)
    q = rng.normal(size=(4, 2, HQ, D)).astype(np.float32)

    def poison(row, index, pool):
        block, slot = tables[row, index // BS], index % BS
        pool[block, slot, :, 0] = np.nan  # every head: every query head reads it

    poison(0, 2, keys)  # seen by both queries of row 0; with the window, by the first only
    poison(2, 15, keys)  # seen by row 2's last query only: the one before it stays finite
    poison(3, 7, keys)  # past row 3's length: a previous owner's bytes, seen by no one
    poison(3, 6, values)
    q[3, 0, 1, 2] = np.nan  # one NaN query head: that head's output is NaN, the rest are not

    out = _run(q, keys, values, tables, kv_lens, positions, chunk_blocks=chunk_blocks, window=window)
    scale = D ** -0.5
    for row in range(4):
        kf, vf = _flat(keys, tables, row), _flat(values, tables, row)
        for t in range(2):
            hi = min(int(positions[row, t]), int(kv_lens[row]) - 1)
            lo = 0 if window is None else max(0, int(positions[row, t]) - window + 1)
            want = dense_softmax(q[row, t], kf, vf, lo, hi, scale)
            np.testing.assert_allclose(out[row, t], want, atol=2e-5, rtol=2e-5, equal_nan=True,
                                       err_msg=f"row {row} query {t}")
    assert np.isnan(out[0, 0]).all() and np.isnan(out[0, 1]).all() == (window is None)
    assert np.isnan(out[2, 1]).all() and np.isfinite(out[2, 0]).all()
    assert not out[1].any(), "a row with no key reads zeros"
    assert np.isnan(out[3, 0, 1]).all() and np.isfinite(np.delete(out[3], 1, axis=1)[0]).all()
    assert np.isfinite(out[3, 1]).all()


def test_logits_below_any_finite_floor_still_weigh_their_keys():
    """The running max starts at -inf: keys whose logits are all far below zero (-1e35
    here) still get their softmax weights, not zeros."""
    rng = np.random.default_rng(1)
    keys, values, tables = _pool(rng)
    keys = np.abs(keys) * 1e17
    kv_lens = np.array([6, 3, 1, 0], np.int32)
    positions = (np.maximum(kv_lens, 1) - 1)[:, None].astype(np.int32)
    q = -np.abs(rng.normal(size=(4, 1, HQ, D))).astype(np.float32) * 1e19
    out = _run(q, keys, values, tables, kv_lens, positions)
    for row in range(3):
        want = dense_softmax(q[row, 0], _flat(keys, tables, row), _flat(values, tables, row), 0,
                             int(positions[row, 0]), D ** -0.5)
        assert np.isfinite(want).all()
        np.testing.assert_allclose(out[row, 0], want, atol=1e-5, rtol=1e-5)
    assert not out[3].any()


@jax.jit
def _view_step(view, q, k, v, meta):
    return view.attention(q, k, v, meta)


def test_view_attention_propagates_a_nan_key_written_through_the_cache():
    """The same through the public path: a NaN key written by one sequence makes its own
    queries NaN, leaves the other sequence of the step finite, and padding rows zero."""
    spec = pk.CacheSpec(num_layers=1, num_blocks=16, block_size=BS, max_blocks_per_seq=4, max_batch_slots=4,
                        key_heads=HK, value_heads=HK, key_dim=D, value_dim=D, dtype="float32")
    manager = pk.KVCacheManager(spec)
    cache = pk.PagedKVCache.init(spec)
    manager.admit(0, 5)
    manager.admit(1, 5)
    meta = manager.step_metadata([0, 1], [5, 5])
    b, t = meta.positions.shape
    rng = np.random.default_rng(2)
    q = rng.normal(size=(b, t, HQ, D)).astype(np.float32)
    k = rng.normal(size=(b, t, HK, D)).astype(np.float32)
    v = rng.normal(size=(b, t, HK, D)).astype(np.float32)
    k[0, 2, 1, 3] = np.nan  # sequence 0, token 2, key head 1: query heads 2, 3 of queries 2..4 see it
    out, _ = _view_step(cache.views[0], jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), meta.to_device())
    out = np.asarray(out)
    assert np.isnan(out[0, 2:5, 2:]).all()
    assert np.isfinite(out[0, 2:5, :2]).all(), "query heads of the other key head"
    assert np.isfinite(out[0, :2]).all() and np.isfinite(out[1, :5]).all()
    assert not out[2:].any(), "padding rows attend to nothing: zeros"
