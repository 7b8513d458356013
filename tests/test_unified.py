"""The unified layout (keys and values in one page tensor) equals the split layout bit for bit."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import paged_kv as pk
from paged_kv.spec import compute_dtype
from paged_kv.views.unified import UnifiedCacheView
from test_transformer_model import LAYOUTS, Driver, edge_scenario

# key_heads, value_heads, key_dim, value_dim
SHAPES = {
    "interleaved": (2, 2, 4, 4),
    "flat-dims": (2, 2, 3, 5),  # MLA-style: key_dim != value_dim
    "flat-heads": (2, 1, 3, 5),  # and key_heads != value_heads
}


def make_spec(dtype, shape, **kw):
    kh, vh, kd, vd = SHAPES[shape]
    base = dict(num_layers=2, num_blocks=24, block_size=4, max_blocks_per_seq=8, max_batch_slots=8,
                key_heads=kh, value_heads=vh, key_dim=kd, value_dim=vd, dtype=dtype,
                sliding_window=6, sliding_layers=(1,), sliding_num_blocks=20)
    base.update(kw)
    return pk.CacheSpec(**base)


def bits(x) -> np.ndarray:
    x = np.asarray(x)
    return x.view(f"uint{8 * x.dtype.itemsize}")


def assert_same(a, b, what: str) -> None:
    """Equal values and equal bit patterns (so -0.0 vs 0.0 or NaN payloads would show)."""
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=what)
    np.testing.assert_array_equal(bits(a), bits(b), err_msg=what)
    assert np.asarray(a).dtype == np.asarray(b).dtype, what


def assert_masks_equal(m1: pk.AttentionMask, m2: pk.AttentionMask) -> None:
    assert m1.window == m2.window
    for f in ("kv_lens", "positions", "query_lens"):
        np.testing.assert_array_equal(np.asarray(getattr(m1, f)), np.asarray(getattr(m2, f)), err_msg=f)


@jax.jit
def _step(split, unified, ks, vs, meta):
    """Both layouts, every layer: write this step's keys/values, read back, mask."""
    outs, new_split, new_unified = [], [], []
    for s, u, k, v in zip(split, unified, ks, vs):
        sk, sv, smask, s = s.concatenate_to_cache(None, k, v, meta)
        uk, uv, umask, u = u.concatenate_to_cache(None, k, v, meta)
        outs.append((sk, sv, smask, uk, uv, umask))
        new_split.append(s)
        new_unified.append(u)
    return outs, new_split, new_unified


@pytest.mark.parametrize(
    "dtype,shape",
    [("float32", "interleaved"), ("float32", "flat-dims"), ("bfloat16", "interleaved"), ("bfloat16", "flat-heads")],
)
def test_unified_equals_split_bit_for_bit(dtype, shape):
    spec = make_spec(dtype, shape)
    dt = compute_dtype(spec)
    kh, vh, kd, vd = SHAPES[shape]
    assert UnifiedCacheView.init(spec).interleaved == (shape == "interleaved")
    rng = np.random.default_rng(0)
    m = pk.KVCacheManager(spec)
    split = pk.PagedKVCache.init(spec).views
    unified = pk.PagedKVCache.init(spec, layout="unified").views
    assert [type(u) for u in unified] == [UnifiedCacheView] * 2
    dense_k: dict[int, np.ndarray] = {}  # what layer 0 (full attention) holds per sequence
    dense_v: dict[int, np.ndarray] = {}
    next_id, released, reused, slid = 0, set(), False, False
    for step in range(24):
        live = list(dense_k)
        action = rng.random()
        if live and (action < 0.15 or len(live) >= 4):
            s = live[rng.integers(len(live))]
            released.update(int(b) for b in m.block_table(s, 0))
            m.release(s)
            del dense_k[s], dense_v[s]
            continue
        # Every step writes for all live sequences (0 new tokens for the idle ones), so
        # the keys concatenate_to_cache returns cover the whole cache.
        counts = {s: 0 for s in live}
        if action < 0.45 or not live:
            n = int(rng.integers(1, 9))
            if not m.can_admit(n):
                continue
            m.admit(next_id, n)
            reused |= bool(released & {int(b) for b in m.block_table(next_id, 0)})
            counts[next_id] = n
            dense_k[next_id] = np.zeros((0, kh, kd), dt)
            dense_v[next_id] = np.zeros((0, vh, vd), dt)
            next_id += 1
        else:
            grow = [s for s in live if rng.random() < 0.7] or live[:1]
            more = rng.integers(0, 5, size=len(grow)).tolist()
            if not m.can_append(grow, more):
                continue
            m.append(grow, more)
            counts.update(zip(grow, more))
        ids = list(counts)
        meta = m.step_metadata(ids, [counts[s] for s in ids])
        slid |= bool(np.any(meta.groups[1].start > 0))  # the sliding layer reads from an offset
        ks = [rng.normal(size=(meta.batch_size, meta.query_len, kh, kd)).astype(dt) for _ in range(2)]
        vs = [rng.normal(size=(meta.batch_size, meta.query_len, vh, vd)).astype(dt) for _ in range(2)]
        for b, s in enumerate(ids):
            dense_k[s] = np.concatenate([dense_k[s], ks[0][b, : counts[s]]])
            dense_v[s] = np.concatenate([dense_v[s], vs[0][b, : counts[s]]])
        outs, split, unified = _step(split, unified, ks, vs, meta.to_device())
        for layer, (sk, sv, smask, uk, uv, umask) in enumerate(outs):
            assert_same(uk, sk, f"step {step} layer {layer} keys")
            assert_same(uv, sv, f"step {step} layer {layer} values")
            assert uk.shape[2:] == (kh, kd) and uv.shape[2:] == (vh, vd)
            assert_masks_equal(umask, smask)
        # Not vacuous: layer 0 returns exactly what was written, zero past each length.
        uk, uv = np.asarray(outs[0][3]), np.asarray(outs[0][4])
        for b, s in enumerate(ids):
            n = len(dense_k[s])
            assert_same(uk[b, :n], dense_k[s], f"sequence {s} keys")
            assert_same(uv[b, :n], dense_v[s], f"sequence {s} values")
            assert not np.any(uk[b, n:]) and not np.any(uv[b, n:])
        m.check_integrity()
    assert reused, "the random walk never reused a released block"
    assert slid, "the sliding layer never read from a nonzero start"
    # The pages themselves hold the documented layout and the same bits.
    for s, u in zip(split, unified):
        kp, vp, up = np.asarray(s.key_pages), np.asarray(s.value_pages), np.asarray(u.kv_pages)
        if u.interleaved:
            assert up.shape == (*kp.shape[:2], 2 * kh, kd)
            np.testing.assert_array_equal(up[:, :, 0::2], kp)
            np.testing.assert_array_equal(up[:, :, 1::2], vp)
        else:
            assert up.shape == (*kp.shape[:2], kh * kd + vh * vd)
            np.testing.assert_array_equal(up[:, :, : kh * kd], kp.reshape(*kp.shape[:2], -1))
            np.testing.assert_array_equal(up[:, :, kh * kd :], vp.reshape(*vp.shape[:2], -1))
        assert not np.any(up[pk.NULL_BLOCK])


TOL = {"float32": (jnp.float32, 2e-4), "bfloat16": (jnp.bfloat16, 2e-3)}


@pytest.mark.parametrize(
    "layout,dtype", [("full", "float32"), ("all-sliding", "bfloat16"), ("mixed", "float32"), ("mixed", "bfloat16")]
)
def test_tiny_transformer_through_unified_cache(layout, dtype):
    kv_dtype, atol = TOL[dtype]
    unified = Driver(dtype, layout="unified", **LAYOUTS[layout])
    assert all(type(v) is UnifiedCacheView for v in unified.cache.views)
    live = edge_scenario(unified, steps=8, release_at=3)
    # Recompute (one compile per length) for the block-edge prompts 1, 16 and 33 and
    # for the sequence prefilled into released blocks; the rest match bit for bit below.
    unified.assert_matches_recompute([0, 3, 6, 100], kv_dtype, atol)
    # The same steps through split pages give bit-identical logits.
    split = Driver(dtype, layout="split", **LAYOUTS[layout])
    assert edge_scenario(split, steps=8, release_at=3) == live
    assert split.tokens == unified.tokens
    for s in split.logits:
        assert split.logits[s].keys() == unified.logits[s].keys()
        for p in split.logits[s]:
            assert_same(unified.logits[s][p], split.logits[s][p], f"sequence {s} position {p}")


def _count(jaxpr, name: str) -> int:
    """Occurrences of primitive ``name`` over page bits (unsigned ints: the block
    generations beside the pages are int32 and not counted) in a jaxpr, sub-jaxprs
    (pjit, cond, ...) included."""
    n = 0
    for eqn in jaxpr.eqns:
        n += eqn.primitive.name == name and np.dtype(eqn.outvars[0].aval.dtype).kind == "u"
        for p in eqn.params.values():
            for sub in p if isinstance(p, (tuple, list)) else (p,):
                sub = getattr(sub, "jaxpr", sub)  # ClosedJaxpr -> Jaxpr
                if hasattr(sub, "eqns"):
                    n += _count(sub, name)
    return n


def _small_step(spec, n=3):
    m = pk.KVCacheManager(spec)
    m.admit(0, n)
    m.admit(1, 1)
    meta = m.step_metadata([0, 1], [n, 1])
    rng = np.random.default_rng(2)
    dt = compute_dtype(spec)
    k = jnp.asarray(rng.normal(size=(meta.batch_size, meta.query_len, spec.key_heads, spec.key_dim)), dt)
    v = jnp.asarray(rng.normal(size=(meta.batch_size, meta.query_len, spec.value_heads, spec.value_dim)), dt)
    return meta.to_device(), k, v


@pytest.mark.parametrize("shape", list(SHAPES))
def test_write_is_one_scatter_and_read_one_gather(shape):
    spec = make_spec("bfloat16", shape)
    meta, k, v = _small_step(spec)
    for layer in range(spec.num_layers):
        view = UnifiedCacheView.init(spec, layer)
        write = jax.make_jaxpr(lambda view, k, v, meta: view.write(k, v, meta))(view, k, v, meta)
        assert _count(write.jaxpr, "scatter") == 1, write
        read = jax.make_jaxpr(lambda view, meta: view.read(meta))(view, meta)
        assert _count(read.jaxpr, "gather") == 1, read
        # The split layout, for contrast, scatters twice.
        split = pk.TransformerCacheView.init(spec, layer)
        assert _count(jax.make_jaxpr(lambda view, k, v, meta: view.write(k, v, meta))(split, k, v, meta).jaxpr,
                      "scatter") == 2


def test_check_pages_and_shapes():
    for shape in SHAPES:
        spec = make_spec("float32", shape)
        for layer in range(spec.num_layers):
            view = UnifiedCacheView.init(spec, layer)
            view.check_pages()
            nb = spec.groups[spec.group_of(layer)].num_blocks
            assert view.kv_pages.shape[:2] == (nb, spec.block_size)
            assert view.window == (spec.sliding_window if layer in spec.sliding_layers else None)
            wrong = [
                jnp.zeros((nb + 1, *view.kv_pages.shape[1:]), jnp.uint32),  # wrong num_blocks
                jnp.zeros(view.kv_pages.shape, jnp.float32),  # wrong dtype
                pk.TransformerCacheView.init(spec, layer).key_pages,  # a split page
                jnp.zeros((*view.kv_pages.shape, 1), jnp.uint32),  # wrong rank
            ]
            for pages in wrong:
                with pytest.raises(pk.ShapeError, match="kv_pages"):
                    UnifiedCacheView(pages, spec, layer).check_pages()
    # Keys or values of the wrong shape are refused before anything is written.
    spec = make_spec("float32", "flat-heads")
    meta, k, v = _small_step(spec)
    view = UnifiedCacheView.init(spec)
    with pytest.raises(pk.ShapeError, match="values"):
        view.write(k, k, meta)
    with pytest.raises(pk.ShapeError, match="keys"):
        view.write(k[:, :1], v, meta)
    with pytest.raises(pk.SpecError, match="'fused'"):
        pk.PagedKVCache.init(spec, layout="fused")


@pytest.mark.parametrize("shape", ["interleaved", "flat-heads"])
def test_jitted_write_donates_pages(shape):
    spec = make_spec("bfloat16", shape)
    meta, k, v = _small_step(spec, n=7)
    write = jax.jit(lambda view, k, v, meta: view.write(k, v, meta), donate_argnums=0)
    view = UnifiedCacheView.init(spec)
    old = view.kv_pages
    view = write(view, k, v, meta)
    assert old.is_deleted(), "pages were not donated: the write copied the pool"
    keys, values = view.read(meta)
    np.testing.assert_array_equal(np.asarray(keys[0, :7]), np.asarray(k[0, :7]))
    np.testing.assert_array_equal(np.asarray(values[1, :1]), np.asarray(v[1, :1]))
    assert not np.any(np.asarray(keys[1, 1:])) and not np.any(np.asarray(values[0, 7:]))
    # The whole cache pytree donates too, every layer's one buffer.
    cache = pk.PagedKVCache.init(spec, layout="unified")
    olds = [x.kv_pages for x in cache.views]
    step = jax.jit(
        lambda cache, k, v, meta: type(cache)(tuple(x.write(k, v, meta) for x in cache.views)), donate_argnums=0
    )
    cache = step(cache, k, v, meta)
    assert all(o.is_deleted() for o in olds)
    assert len(jax.tree_util.tree_leaves([x.pages() for x in cache.views])) == spec.num_layers


def test_insert_prefill_into_unified_cache_reads_back():
    """`insert_prefill` writes through each view's own layout (unified included)."""
    spec = pk.CacheSpec(num_layers=2, num_blocks=16, block_size=4, max_blocks_per_seq=6, max_batch_slots=4,
                        key_heads=2, value_heads=1, key_dim=3, value_dim=5, dtype="float32",
                        sliding_window=4, sliding_layers=(1,))
    m = pk.KVCacheManager(spec)
    cache = pk.PagedKVCache.init(spec, layout="unified")
    rng = np.random.default_rng(3)
    keys = [rng.normal(size=(7, 2, 3)).astype(np.float32) for _ in range(2)]
    values = [rng.normal(size=(7, 1, 5)).astype(np.float32) for _ in range(2)]
    cache = pk.insert_prefill(cache, m, 0, keys, values)
    meta = m.step_metadata([0], 0).to_device()
    for layer in range(2):
        k, v = cache[layer].read(meta)
        start = int(meta.groups[cache[layer].group].start[0])
        np.testing.assert_array_equal(np.asarray(k)[0, : 7 - start], keys[layer][start:])
        np.testing.assert_array_equal(np.asarray(v)[0, : 7 - start], values[layer][start:])
