"""A freed block's old keys and values never reach the next sequence that gets it.

Every usable block of both layer groups (full attention and a sliding window) is
filled with a sentinel bit pattern (a NaN with a payload, different for keys and
values), partly through `insert_prefill` and partly through `concatenate_to_cache`.
The sequences are released and new ones admitted into exactly those blocks with
lengths at the block edges (1, bs-1, bs, bs+1, 2*bs), so most of each reused block
still holds sentinel bytes. Every view's read must then return exactly the new
sequence's own tokens below its length and zeros from there on, padding rows and
padding table entries included; padding tokens (fed the sentinel too) must be
dropped, so the null block 0 stays all zero. Decode steps through `DecodeSlots` with
empty slots (fed the sentinel) and a second round of reuse (one new sequence taking
the blocks of a released one) must expose no foreign values either.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import paged_kv as pk
from paged_kv import DecodeSlots
from paged_kv.insertion import insert_prefill
from paged_kv.spec import compute_dtype, storage_dtype
from paged_kv.views import SlidingWindowCacheView, TransformerCacheView, UnifiedCacheView

BS = 4
H, D = 2, 4
EDGES = [1, BS - 1, BS, BS + 1, 2 * BS]
# NaN bit patterns with payloads; values get the negative NaN so keys and values differ.
SENTINELS = {16: (0x7FA5, 0xFFB6), 32: (0x7FA5A5A5, 0xFFB6B6B6)}


def make_spec(dtype):
    return pk.CacheSpec(num_layers=2, num_blocks=17, block_size=BS, max_blocks_per_seq=8, max_batch_slots=8,
                        num_kv_heads=H, head_dim=D, dtype=dtype, sliding_window=6, sliding_layers=(1,))


class World:
    """A cache, its manager and a reference copy of every token each live sequence holds."""

    def __init__(self, layout: str, dtype: str):
        self.spec = spec = make_spec(dtype)
        self.dt = compute_dtype(spec)
        self.store = storage_dtype(spec)
        self.sent_k, self.sent_v = SENTINELS[8 * self.store.itemsize]
        self.m = pk.KVCacheManager(spec)
        self.cache = pk.PagedKVCache.init(spec, layout=layout)
        want = [UnifiedCacheView] * 2 if layout == "unified" else [TransformerCacheView, SlidingWindowCacheView]
        assert [type(v) for v in self.cache.views] == want
        self.ref: dict[int, list[np.ndarray]] = {}  # seq -> per layer [k tokens, v tokens]
        self.rng = np.random.default_rng(0)

    # ---- data ---------------------------------------------------------------------------------
    def sentinel(self, shape, which: str) -> np.ndarray:
        bits = self.sent_k if which == "k" else self.sent_v
        return np.full(shape, bits, self.store).view(self.dt)

    def fresh(self, shape) -> np.ndarray:
        """Finite values, none zero (so a zero read can only mean 'masked')."""
        x = self.rng.uniform(0.5, 2.0, size=shape) * self.rng.choice([-1.0, 1.0], size=shape)
        return x.astype(self.dt)

    # ---- device -------------------------------------------------------------------------------
    def step(self, meta, ids, counts):
        """One forward step over rows ``ids`` (None: a padding row / empty slot) writing
        ``counts`` new tokens each; every padding token and padding row carries the
        sentinel. Returns per layer (keys, values, mask, keys re-read via `read`)."""
        B, T = meta.batch_size, meta.query_len
        ks, vs = [], []
        for layer in range(self.spec.num_layers):
            k, v = self.sentinel((B, T, H, D), "k"), self.sentinel((B, T, H, D), "v")
            for b, (s, n) in enumerate(zip(ids, counts)):
                if s is None or n == 0:
                    continue
                new_k, new_v = self.fresh((n, H, D)), self.fresh((n, H, D))
                k[b, :n], v[b, :n] = new_k, new_v
                old_k, old_v = self.ref[s][layer]
                self.ref[s][layer] = [np.concatenate([old_k, new_k]), np.concatenate([old_v, new_v])]
            ks.append(jnp.asarray(k))
            vs.append(jnp.asarray(v))
        outs, self.cache = _step(self.cache, tuple(ks), tuple(vs), meta.to_device())
        return outs

    def admit(self, s: int, n: int) -> None:
        self.m.admit(s, n)
        empty = np.zeros((0, H, D), self.dt)
        self.ref[s] = [[empty, empty] for _ in range(self.spec.num_layers)]

    def release(self, s: int) -> set[tuple[int, int]]:
        held = self.held(s)
        self.m.release(s)
        del self.ref[s]
        return held

    def held(self, s: int) -> set[tuple[int, int]]:
        """(group, block id) of every block ``s`` holds."""
        return {(g, int(b)) for g in range(len(self.spec.groups)) for b in self.m.block_table(s, g)}

    def pages(self, layer: int) -> tuple[np.ndarray, np.ndarray]:
        """Storage bits of layer ``layer``'s keys and values, ``[num_blocks, bs, H, D]`` each."""
        view = self.cache[layer]
        if isinstance(view, UnifiedCacheView):
            kv = np.asarray(view.kv_pages).reshape(-1, BS, H, 2, D)
            return kv[:, :, :, 0], kv[:, :, :, 1]
        return np.asarray(view.key_pages), np.asarray(view.value_pages)

    # ---- checks -------------------------------------------------------------------------------
    def check_null_block(self) -> None:
        for layer in range(self.spec.num_layers):
            for what, p in zip("kv", self.pages(layer)):
                assert not p[pk.NULL_BLOCK].any(), f"layer {layer} {what}: the null block was written"

    def check_reads(self, outs, meta, ids) -> None:
        """Row b of every layer's keys/values: its sequence's own tokens [start, kv_len),
        then zeros; a padding row (None) all zeros; no sentinel and no NaN anywhere."""
        for layer, (keys, values, mask, rk, rv) in enumerate(outs):
            g = self.spec.group_of(layer)
            start = meta.groups[g].start
            for what, got, again in (("keys", keys, rk), ("values", values, rv)):
                got, bits = np.asarray(got), np.asarray(got).view(self.store)
                where = f"layer {layer} {what}"
                np.testing.assert_array_equal(bits, np.asarray(again).view(self.store), err_msg=f"{where}: read()")
                assert not np.isnan(got.astype(np.float32)).any(), f"{where}: NaN (stale or sentinel) exposed"
                assert not np.isin(bits, [self.sent_k, self.sent_v]).any(), f"{where}: sentinel exposed"
                for b in range(got.shape[0]):
                    s = ids[b] if b < len(ids) else None
                    if s is None:
                        assert not bits[b].any(), f"{where} padding row {b} is not all zero"
                        continue
                    first, n = int(start[b]), int(meta.kv_lens[b])
                    assert n == self.m.kv_len(s)
                    own = self.ref[s][layer][0 if what == "keys" else 1][first:n]
                    np.testing.assert_array_equal(
                        bits[b, : n - first], own.view(self.store), err_msg=f"{where} seq {s}: not its own tokens"
                    )
                    assert not bits[b, n - first:].any(), f"{where} seq {s}: nonzero at positions >= its length"
            assert int(np.asarray(mask.kv_lens)[0]) == int(meta.kv_lens[0] - start[0])


@jax.jit
def _step(cache, ks, vs, meta):
    outs, views = [], []
    for view, k, v in zip(cache.views, ks, vs):
        keys, values, mask, view = view.concatenate_to_cache(None, k, v, meta)
        rk, rv = view.read(meta)  # the read path on its own, after the write
        outs.append((keys, values, mask, rk, rv))
        views.append(view)
    return outs, pk.PagedKVCache(tuple(views))


@pytest.mark.parametrize("layout,dtype", [("split", "bfloat16"), ("unified", "bfloat16"), ("unified", "float32")])
def test_reused_blocks_never_expose_previous_owner(layout, dtype):
    w = World(layout, dtype)
    spec, m = w.spec, w.m
    L = spec.max_seq_len  # 32 tokens = 8 blocks: two such sequences hold all 16 usable blocks of each group

    # -- 1. fill every usable block of both groups with the sentinel ----------------------------
    k_fill = w.sentinel((spec.num_layers, L, H, D), "k")
    v_fill = w.sentinel((spec.num_layers, L, H, D), "v")
    w.cache = insert_prefill(w.cache, m, 100, k_fill, v_fill)
    w.admit(101, L)
    meta = m.step_metadata([101], L)
    w.ref[101] = [[k_fill[i], v_fill[i]] for i in range(spec.num_layers)]
    # 0 fresh tokens: every row of the step's keys/values stays sentinel, and the
    # metadata (32 new tokens) writes all of them into seq 101's blocks.
    w.step(meta, [101], [0])
    w.ref[100] = [[k_fill[i], v_fill[i]] for i in range(spec.num_layers)]
    assert m.num_free_blocks == 0
    for layer in range(spec.num_layers):
        for p, bits in zip(w.pages(layer), (w.sent_k, w.sent_v)):
            assert np.all(p[1:] == bits), f"layer {layer}: not every usable block holds the sentinel"
    w.check_null_block()
    stale = w.release(100) | w.release(101)
    assert len(stale) == 2 * spec.usable_blocks

    # -- 2. new sequences reuse those blocks, each written only partly ---------------------------
    ids = list(range(len(EDGES)))
    for s, n in zip(ids, EDGES):
        w.admit(s, n)
        assert w.held(s) <= stale, f"seq {s} got a block that was never filled"
    meta = m.step_metadata(ids, EDGES)
    assert meta.batch_size > len(ids) and meta.query_len > min(EDGES)  # padding rows and tokens exist
    outs = w.step(meta, ids, EDGES)
    w.check_reads(outs, meta, ids)
    w.check_null_block()
    # The reused blocks still hold sentinel bytes past each length: the zeros above come
    # from the read masking them, not from the pool clearing freed blocks.
    k_pages, _ = w.pages(0)
    tail = [k_pages[int(m.block_table(s)[-1]), n % BS:] for s, n in zip(ids, EDGES) if n % BS]
    assert all(np.all(t == w.sent_k) for t in tail)

    # -- 3. decode through slots, with empty slots fed the sentinel -----------------------------
    slots = DecodeSlots(m)
    layout_of_slots = [0, None, 1, 2, None, 3, 4, None]
    for b, s in enumerate(layout_of_slots):
        if s is not None:
            slots.insert(s, b)
    for _ in range(6):  # far enough for the sliding layer to read from an offset
        meta = slots.decode_step()
        seq_at = slots.seq_ids
        assert meta.batch_size == slots.num_slots and seq_at == layout_of_slots
        outs = w.step(meta, seq_at, [1 if s is not None else 0 for s in seq_at])
        w.check_reads(outs, meta, seq_at)
        w.check_null_block()
    assert np.any(meta.groups[1].start > 0), "the sliding layer never read from an offset"
    assert np.all(meta.kv_lens[[1, 4, 7]] == 0) and np.all(meta.block_tables[[1, 4, 7]] == pk.NULL_BLOCK)

    # -- 4. a second round: a new sequence takes the blocks of a released one -------------------
    longest = ids[-1]
    freed = w.held(longest)
    slots.release(layout_of_slots.index(longest))
    w.ref.pop(longest)
    w.admit(50, BS + 1)
    assert w.held(50) <= freed, "the new sequence did not reuse the released blocks"
    meta = m.step_metadata([50, 0], [BS + 1, 0])
    outs = w.step(meta, [50, 0], [BS + 1, 0])
    w.check_reads(outs, meta, [50, 0])
    w.check_null_block()
    m.check_integrity()
    slots.check_integrity()


@pytest.mark.parametrize("layout", ["split", "unified"])
def test_crafted_metadata_ids_stay_inside_the_pool(layout):
    """Metadata is caller-constructible: slots and block ids outside the pool (negative
    ones too, which JAX indexing would wrap onto the pool's last blocks) and copy-on-write
    sources or targets outside it must write nothing and read only the null block's zeros.
    Another sequence's bytes and the null block stay as they were."""

    spec = make_spec("float32")
    m, cache = pk.KVCacheManager(spec), pk.PagedKVCache.init(spec, layout=layout)
    nb = spec.num_blocks
    m.admit(10, 8 * BS)  # the victims hold every block but one: -1 wraps onto theirs
    m.admit(11, 7 * BS)
    m.admit(1, 2)
    rng = np.random.default_rng(1)
    meta = m.step_metadata([10, 11], [8 * BS, 7 * BS])
    k = jnp.asarray(rng.normal(size=(2, meta.query_len, H, D)), jnp.float32)
    write = jax.jit(lambda c, k, meta: pk.PagedKVCache(tuple(v.write(k, k, meta) for v in c.views)))
    cache = write(cache, k, meta.to_device())
    before = [np.asarray(x).copy() for x in jax.tree_util.tree_leaves(cache)]
    good = m.step_metadata([1], 2)
    bad_ids = np.array([-1, -nb, nb, 2**30], np.int32)
    groups = tuple(g.replace(
        slot_mapping=np.array([[-1, -BS * nb]], np.int32)[:, : g.slot_mapping.shape[1]],
        block_tables=np.resize(bad_ids, g.block_tables.shape).astype(np.int32),
        copy_src=np.array([-1, 3, nb + 1], np.int32), copy_dst=np.array([3, -1, 0], np.int32),
        copy_len=np.full(3, BS, np.int32), copy_src_gen=np.ones(3, np.int32), copy_dst_gen=np.ones(3, np.int32))
        for g in good.groups)
    crafted = good.replace(groups=groups)
    lopsided = good.replace(groups=tuple(g.replace(copy_src_gen=np.ones(2, np.int32)) for g in groups))
    with pytest.raises(pk.ShapeError, match="copy_src_gen"):  # generations must describe what they name
        write(cache, k[:1], lopsided)
    new = jnp.asarray(rng.normal(size=(1, good.query_len, H, D)) + 100, jnp.float32)
    cache = write(cache, new, crafted.to_device())
    for a, b in zip(before, jax.tree_util.tree_leaves(cache), strict=True):
        np.testing.assert_array_equal(a, np.asarray(b))  # nothing written anywhere, block 0 included
    for view in cache.views:
        keys, values = jax.jit(lambda v, meta: v.read(meta))(view, crafted.to_device())
        assert not np.asarray(keys).any() and not np.asarray(values).any()  # bad ids read the null block
