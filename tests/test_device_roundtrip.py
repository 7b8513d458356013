"""Random writes through the pages, then gathers, equal a dense numpy model of each sequence."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import paged_kv as pk
from paged_kv.ops import gather_pages, gather_pages_into, write_pages
from paged_kv.spec import compute_dtype


# The view's write and read, jitted: called eagerly, each of their dozens of primitives
# compiles a program of its own for every bucket of shapes the trace meets (most of this
# file's time on a cold compilation cache); eager calls have their own tests
# (test_steps.py, test_quant.py).
_write = jax.jit(lambda view, k, v, meta: view.write(k, v, meta))
_read = jax.jit(lambda view, meta: view.read(meta))


def make_spec(dtype, **kw):
    base = dict(num_layers=1, num_blocks=48, block_size=4, max_blocks_per_seq=10, max_batch_slots=64,
                key_heads=2, value_heads=1, key_dim=3, value_dim=5, dtype=dtype)
    base.update(kw)
    return pk.CacheSpec(**base)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
def test_random_writes_then_gather_equal_dense_model(dtype):
    spec = make_spec(dtype)
    dt = compute_dtype(spec)
    rng = np.random.default_rng(0)
    m = pk.KVCacheManager(spec)
    view = pk.TransformerCacheView.init(spec)
    dense_k: dict[int, np.ndarray] = {}
    dense_v: dict[int, np.ndarray] = {}
    next_id = 0
    for step in range(60):
        live = list(dense_k)
        action = rng.random()
        if live and action < 0.15:
            s = live[rng.integers(len(live))]
            m.release(s)
            del dense_k[s], dense_v[s]
            continue
        if action < 0.45 or not live:
            n = int(rng.integers(1, 13))
            if not m.can_admit(n):
                continue
            m.admit(next_id, n)
            ids, counts = [next_id], [n]
            next_id += 1
        else:
            ids = [s for s in live if rng.random() < 0.7] or live[:1]
            counts = rng.integers(0, 6, size=len(ids))
            if not m.can_append(ids, counts):
                continue
            m.append(ids, counts)
            counts = counts.tolist()
        meta = m.step_metadata(ids, counts)
        k = rng.normal(size=(meta.batch_size, meta.query_len, 2, 3)).astype(dt)
        v = rng.normal(size=(meta.batch_size, meta.query_len, 1, 5)).astype(dt)
        view = _write(view, jnp.asarray(k), jnp.asarray(v), meta.to_device())
        for b, s in enumerate(ids):
            dense_k[s] = np.concatenate([dense_k.get(s, np.zeros((0, 2, 3), dt)), k[b, : counts[b]]])
            dense_v[s] = np.concatenate([dense_v.get(s, np.zeros((0, 1, 5), dt)), v[b, : counts[b]]])
        m.check_integrity()
        # Read every live sequence back and compare with the dense model.
        live = list(dense_k)
        meta = m.step_metadata(live, 0)
        keys, values = _read(view, meta.to_device())
        keys, values = np.asarray(keys), np.asarray(values)
        for b, s in enumerate(live):
            n = len(dense_k[s])
            np.testing.assert_array_equal(keys[b, :n], dense_k[s])
            np.testing.assert_array_equal(values[b, :n], dense_v[s])
            # Past the length the view is zero, never a previous owner's bytes.
            assert not np.any(keys[b, n:]) and not np.any(values[b, n:])
        assert not np.any(keys[len(live):]) and not np.any(values[len(live):])
    # The null block was never written: padding reads zeros.
    assert not np.any(np.asarray(view.key_pages[pk.NULL_BLOCK]))
    assert not np.any(np.asarray(view.value_pages[pk.NULL_BLOCK]))


def test_jitted_ops_donate_and_match():
    spec = make_spec("bfloat16", key_heads=2, value_heads=2, key_dim=4, value_dim=4)
    dt = compute_dtype(spec)
    m = pk.KVCacheManager(spec)
    m.admit(0, 7)
    m.admit(1, 3)
    meta = m.step_metadata([0, 1], [7, 3])
    new = jnp.asarray(np.random.default_rng(1).normal(size=(meta.batch_size, meta.query_len, 2, 4)), dt)
    pages = pk.TransformerCacheView.init(spec).key_pages
    old = pages
    pages = write_pages(pages, new, jnp.asarray(meta.slot_mapping), compute_dtype=dt)
    assert old.is_deleted(), "pages were not donated: the write copied the pool"
    view = gather_pages(pages, jnp.asarray(meta.block_tables), jnp.asarray(meta.kv_lens), compute_dtype=dt)
    out = jnp.zeros_like(view)
    out = gather_pages_into(out, pages, jnp.asarray(meta.block_tables), jnp.asarray(meta.kv_lens))
    np.testing.assert_array_equal(np.asarray(view), np.asarray(out))
    np.testing.assert_array_equal(np.asarray(view[0, :7]), np.asarray(new[0, :7]))
    np.testing.assert_array_equal(np.asarray(view[1, :3]), np.asarray(new[1, :3]))


def test_wrong_shapes_raise_shape_error():
    spec = make_spec("float32")
    m = pk.KVCacheManager(spec)
    m.admit(0, 2)
    meta = m.step_metadata([0], 2).to_device()
    view = pk.TransformerCacheView.init(spec)
    with pytest.raises(pk.ShapeError, match=r"\(1, 2, 3, 3\)"):
        view.write(jnp.zeros((1, 2, 3, 3)), jnp.zeros((1, 2, 1, 5)), meta)
    bad = pk.TransformerCacheView(jnp.zeros((3, 4, 2, 3), jnp.uint32), view.value_pages, spec)
    with pytest.raises(pk.ShapeError, match="key_pages"):
        bad.check_pages()
    view.check_pages()


def test_compiles_once_per_bucket():
    """Changing batch size, query length and table width inside a bucket does not recompile."""
    spec = make_spec("float32", key_heads=1, value_heads=1, key_dim=2, value_dim=2)
    traces = []

    @jax.jit
    def step(view, k, v, meta):
        traces.append(1)  # runs only when jit traces, i.e. compiles
        keys, values, mask, view = view.concatenate_to_cache(None, k, v, meta)
        return keys.sum() + values.sum(), view

    m = pk.KVCacheManager(spec)
    view = pk.TransformerCacheView.init(spec)
    shapes = set()
    for s in range(7):
        m.admit(s, 1 + s)
    for n in range(5, 8):  # 5, 6, 7 sequences: all bucket to 8 rows
        for _ in range(3):
            ids = list(range(n))
            m.append(ids, 1)
            meta = m.step_metadata(ids, 1)
            shapes.add((meta.batch_size, meta.query_len, meta.table_width))
            k = jnp.ones((meta.batch_size, meta.query_len, 1, 2))
            _, view = step(view, k, k, meta.to_device())
    assert len(traces) == len(shapes) <= 2, (len(traces), shapes)
