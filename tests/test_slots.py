"""Decode slots and prefill insertion: continuous batching over a fixed-size decode batch."""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import paged_kv as pk
import paged_kv.insertion as insertion
from paged_kv import DecodeSlots, SlotError, slot_step_metadata
from paged_kv.insertion import insert_prefill
from paged_kv.ops import gather_pages
from paged_kv.spec import compute_dtype
from test_transformer_model import LAYOUTS
from tiny_model import TinyConfig, _qkv, attention, forward_cached, forward_full, init_params

CFG = TinyConfig()
PAD_LEN = 64  # fixed length for the no-cache passes: causal, so padding never changes earlier positions


def host_spec(**kw):
    base = dict(num_layers=2, num_blocks=17, block_size=4, max_blocks_per_seq=6, max_batch_slots=4,
                num_kv_heads=1, head_dim=2, dtype="float32")
    base.update(kw)
    return pk.CacheSpec(**base)


def full_state(slots: DecodeSlots):
    return slots.snapshot(), slots.manager.snapshot()


# ---- (a) slot API semantics and bad inputs ------------------------------------------------------
def test_insert_remove_release_semantics():
    m = pk.KVCacheManager(host_spec())
    for s, n in [(10, 3), (11, 5), (12, 1)]:
        m.admit(s, n)
    slots = DecodeSlots(m)
    assert slots.num_slots == 4 and slots.free_slots() == [0, 1, 2, 3] and slots.occupied() == []
    blocks = m.block_table(11).copy()
    assert slots.insert(11, 2) == 2
    assert slots.insert(10) == 0  # lowest free slot
    assert slots.occupied() == [(0, 10), (2, 11)] and slots.free_slots() == [1, 3]
    assert slots.slot_of(11) == 2 and slots.seq_at(2) == 11 and slots.seq_at(1) is None
    assert slots.seq_ids == [10, None, 11, None] and slots.active_mask().tolist() == [True, False, True, False]
    assert 11 in slots and 12 not in slots and len(slots) == 2
    ids = slots.seq_ids  # a property, like KVCacheManager.seq_ids, and a fresh list
    ids[1] = 99
    assert slots.seq_ids == [10, None, 11, None]
    with pytest.warns(DeprecationWarning, match=r"not slots\.seq_ids\(\)"):
        assert slots.seq_ids() == [10, None, 11, None]  # the old method form still answers
    assert np.array_equal(m.block_table(11), blocks)  # binding a slot touches no table
    slots.check_integrity()

    assert slots.remove(2) == 11  # blocks stay held
    assert 11 in m and m.kv_len(11) == 5 and slots.free_slots() == [1, 2, 3]
    assert slots.insert(11, 3) == 3  # re-inserted elsewhere, same row and blocks
    assert np.array_equal(m.block_table(11), blocks)
    free_before = m.num_free_blocks
    assert slots.release(3) == 11
    assert 11 not in m and 11 not in slots and m.num_free_blocks == free_before + 2
    assert slots.can_insert(12, 3) and not slots.can_insert(12, 0) and not slots.can_insert(99)
    slots.check_integrity()
    m.check_integrity()


@pytest.mark.parametrize(
    "call,error,match",
    [
        (lambda s: s.insert(12, 4), SlotError, r"slot=4 is out of range \[0, 4\)"),
        (lambda s: s.insert(12, -1), SlotError, r"slot=-1 is out of range"),
        (lambda s: s.insert(12, 1.0), SlotError, r"slot=1\.0 must be an integer"),
        (lambda s: s.insert(12, True), SlotError, r"slot=True must be an integer"),
        (lambda s: s.insert(12, 0), SlotError, r"slot=0 is taken by seq_id=10; free slots: \[1, 3\]"),
        (lambda s: s.insert(99, 1), pk.UnknownSequenceError, r"seq_id=99 is not admitted"),
        (lambda s: s.insert("a", 1), pk.UnknownSequenceError, r"seq_id='a' is not admitted"),
        (lambda s: s.insert(11, 1), pk.DuplicateSequenceError, r"seq_id=11 already occupies slot 2"),
        (lambda s: s.insert(10, 0), pk.DuplicateSequenceError, r"seq_id=10 already occupies slot 0"),
        (lambda s: s.remove(1), SlotError, r"slot=1 is empty; occupied slots: \[0, 2\]"),
        (lambda s: s.remove(7), SlotError, r"slot=7 is out of range"),
        (lambda s: s.release(3), SlotError, r"slot=3 is empty"),
        (lambda s: s.slot_of(12), pk.UnknownSequenceError, r"seq_id=12 is in no decode slot"),
        (lambda s: s.seq_at(9), SlotError, r"slot=9 is out of range"),
    ],
)
def test_bad_slot_calls_raise_typed_errors_and_change_nothing(call, error, match):
    m = pk.KVCacheManager(host_spec())
    for s, n in [(10, 3), (11, 5), (12, 1)]:
        m.admit(s, n)
    slots = DecodeSlots(m)
    slots.insert(10, 0)
    slots.insert(11, 2)
    before = full_state(slots)
    with pytest.raises(error, match=match) as info:
        call(slots)
    assert isinstance(info.value, pk.PagedKVError)
    assert full_state(slots) == before
    slots.check_integrity()


def test_full_batch_and_failed_decode_change_nothing():
    m = pk.KVCacheManager(host_spec(num_blocks=6, max_batch_slots=2, max_blocks_per_seq=4))
    m.admit(0, 8)  # 2 blocks per group
    m.admit(1, 8)
    m.admit(2, 1)
    slots = DecodeSlots(m)
    slots.insert(0)
    slots.insert(1)
    with pytest.raises(SlotError, match="all 2 slots are occupied"):
        slots.insert(2)
    assert not slots.can_insert(2)
    # Both sequences need a new block and the pool has none left: decode fails as a whole.
    assert not slots.can_decode()
    before = full_state(slots)
    with pytest.raises(pk.OutOfBlocksError):
        slots.decode_step()
    assert full_state(slots) == before
    with pytest.raises(pk.SpecError, match="num_slots=3"):
        DecodeSlots(m, num_slots=3)


def test_a_slotted_sequence_cannot_be_released_behind_the_slots_back():
    m = pk.KVCacheManager(host_spec())
    m.admit(5, 2)
    slots = DecodeSlots(m)
    slots.insert(5, 1)
    before = full_state(slots)
    # Released directly, the slot would keep id 5 and later decode whoever reuses it.
    with pytest.raises(pk.SlotError, match=r"seq_id=5\): it occupies decode slot 1; use slots.release\(1\)"):
        m.release(5)
    with pytest.raises(pk.SlotError, match="decode slot 1"):
        m.swap_out(5)
    assert full_state(slots) == before
    other = DecodeSlots(m)  # a second batch over the same manager may not take it either
    with pytest.raises(pk.DuplicateSequenceError, match="another DecodeSlots"):
        other.insert(5, 0)
    assert other.seq_ids == [None] * other.num_slots
    assert slots.remove(1) == 5  # out of the slot, the manager may release it
    m.release(5)
    m.admit(5, 3)  # the id is reused: no slot decodes it by accident
    assert 5 not in slots and slots.seq_ids == [None] * slots.num_slots
    slots.check_integrity()
    m.check_integrity()
    slots.insert(5, 0)
    del slots, other  # slots the engine dropped hold nothing: the sequence is free to go
    import gc

    gc.collect()
    m.release(5)
    m.check_integrity()


# ---- (b) fixed-B metadata, inert padding rows ---------------------------------------------------
@pytest.mark.parametrize("layout", ["full", "mixed"])
def test_decode_metadata_has_one_row_per_slot(layout):
    kw = dict(sliding_window=4, sliding_layers=(1,)) if layout == "mixed" else {}
    spec = host_spec(max_batch_slots=8, num_blocks=40, **kw)
    m = pk.KVCacheManager(spec)
    for s in range(5):
        m.admit(s, 1 + 3 * s)
    slots = DecodeSlots(m)
    placements = [[], [3], [7, 0], [1, 6, 4], [0, 2, 5, 7, 3]]
    for i, where in enumerate(placements):
        for slot in list(slots.occupied()):
            slots.remove(slot[0])
        for s, slot in enumerate(where):
            slots.insert(s, slot)
        meta = slots.decode_step()
        assert meta.batch_size == 8 and meta.query_len == 1
        ids = [s for _, s in slots.occupied()]
        occ = np.array([b for b, _ in slots.occupied()], dtype=np.int64)
        pad = np.setdiff1d(np.arange(8), occ)
        ref = m.step_metadata(ids, 1) if ids else None
        for name in ("kv_lens", "query_lens", "positions"):
            got = getattr(meta, name)
            if ref is not None:
                np.testing.assert_array_equal(got[occ], getattr(ref, name)[: len(ids)])
            assert not got[pad].any(), name
        assert meta.query_lens[occ].tolist() == [1] * len(ids)
        for g, grp in enumerate(meta.groups):
            if ref is not None:
                assert grp.block_tables.shape[1] == ref.groups[g].block_tables.shape[1]
                for name in ("block_tables", "slot_mapping", "start"):
                    np.testing.assert_array_equal(getattr(grp, name)[occ], getattr(ref.groups[g], name)[: len(ids)])
            assert (grp.block_tables[pad] == pk.NULL_BLOCK).all()
            assert (grp.slot_mapping[pad] == spec.groups[g].num_blocks * spec.block_size).all()
            assert not grp.start[pad].any()
        m.check_integrity()
        slots.check_integrity()


def test_padding_rows_write_nothing_and_read_zeros():
    spec = host_spec(num_blocks=12, max_batch_slots=4)
    m = pk.KVCacheManager(spec)
    view = pk.TransformerCacheView.init(spec)
    m.admit(0, 3)
    m.admit(1, 6)
    slots = DecodeSlots(m)
    slots.insert(0, 3)
    slots.insert(1, 1)
    meta = slots.decode_step()
    before_k = np.asarray(view.key_pages).copy()
    rng = np.random.default_rng(0)
    k = jnp.asarray(rng.normal(size=(4, 1, 1, 2)), jnp.float32) + 1.0  # garbage in the padding rows too
    view = view.write(k, k, meta.to_device())
    after = np.asarray(view.key_pages)
    changed = np.flatnonzero((after != before_k).reshape(-1, 2).any(axis=1))
    written = sorted(int(meta.slot_mapping[b, 0]) for b in (1, 3))
    assert changed.tolist() == written  # exactly the two occupied rows' new tokens
    keys, _ = view.read(meta.to_device())
    keys = np.asarray(keys)
    assert not keys[[0, 2]].any()
    np.testing.assert_array_equal(keys[3, 3], np.asarray(k[3, 0]))
    np.testing.assert_array_equal(keys[1, 6], np.asarray(k[1, 0]))


def test_slot_step_metadata_with_no_sequence_is_all_padding():
    spec = host_spec()
    meta = slot_step_metadata(pk.KVCacheManager(spec), [None] * 4)
    assert meta.batch_size == 4 and meta.query_len == 1 and meta.table_width == 1
    assert not meta.kv_lens.any() and (meta.block_tables == pk.NULL_BLOCK).all()


# ---- (c, d) continuous batching with the tiny transformer --------------------------------------
@partial(jax.jit, static_argnums=(0, 3))
def contiguous_prefill(cfg, params, tokens, windows):
    """No-cache forward over tokens [1, PAD_LEN]: logits and each layer's keys/values [PAD_LEN, H, D]."""
    length = tokens.shape[1]
    positions = jnp.arange(length, dtype=jnp.int32)[None]
    s = jnp.arange(length)
    causal = s[None, :] <= s[:, None]
    x = params["embed"][tokens]
    keys, values = [], []
    for i, layer in enumerate(params["layers"]):
        mask = causal if windows[i] is None else causal & (s[None, :] > s[:, None] - windows[i])
        q, k, v = _qkv(cfg, layer, x, positions)
        keys.append(k[0])
        values.append(v[0])
        x = x + attention(q, k, v, mask[None]) @ layer["wo"]
    return x @ params["unembed"], keys, values


def widths_of(meta) -> tuple[int, ...]:
    """Block-table width of every group: with B fixed, the only shape a decode step varies in."""
    return tuple(g.block_tables.shape[1] for g in meta.groups)


def padded(tokens: list[int]) -> jnp.ndarray:
    out = np.zeros((1, PAD_LEN), np.int32)
    out[0, : len(tokens)] = tokens
    return jnp.asarray(out)


# (prompt length, tokens to generate, how it is prefilled)
REQUESTS = [
    (5, 9, "paged"), (17, 3, "insert"), (7, 12, "paged"), (30, 5, "insert"),
    (12, 7, "paged"), (9, 14, "insert"), (14, 2, "paged"), (3, 6, "insert"), (21, 4, "insert"),
]


@pytest.mark.parametrize("layout", ["full", "mixed"])
def test_continuous_batching_equals_recompute_and_compiles_per_width_bucket(layout):
    spec = pk.CacheSpec(num_layers=CFG.num_layers, num_blocks=40, block_size=8, max_blocks_per_seq=8,
                        max_batch_slots=4, num_kv_heads=CFG.kv_heads, head_dim=CFG.head_dim, dtype="float32",
                        **LAYOUTS[layout])
    windows = tuple(spec.sliding_window if i in spec.sliding_layers else None for i in range(CFG.num_layers))
    params = init_params(CFG)
    manager = pk.KVCacheManager(spec)
    cache = pk.PagedKVCache.init(spec)
    slots = DecodeSlots(manager)
    B = slots.num_slots

    traces = []

    @partial(jax.jit, donate_argnums=1)
    def decode(params, cache, tokens, metadata):
        traces.append(widths_of(metadata))  # runs once per compilation
        return forward_cached(CFG, params, cache, tokens, metadata)

    tokens: dict[int, list[int]] = {}
    logits: dict[int, dict[int, np.ndarray]] = {}
    remaining: dict[int, int] = {}
    queue = list(enumerate(REQUESTS))
    parked: list[int] = []  # removed from their slot mid-run, blocks kept, waiting to come back
    rng = np.random.default_rng(0)

    def start(sid, prompt_len, gen, how) -> None:
        """Prefill request ``sid`` one of three ways and bind it to the lowest free slot."""
        nonlocal cache
        prompt = rng.integers(0, CFG.vocab, size=prompt_len).tolist()
        tokens[sid], remaining[sid] = list(prompt), gen
        if how == "paged":  # prefill through the paged cache itself
            manager.admit(sid, prompt_len)
            meta = manager.step_metadata([sid], prompt_len)
            tok = np.zeros((meta.batch_size, meta.query_len), np.int32)
            tok[0, :prompt_len] = prompt
            out, cache = forward_cached(CFG, params, cache, jnp.asarray(tok), meta.to_device())
            slots.insert(sid)
        else:  # prefilled elsewhere into a contiguous cache, then inserted
            out, keys, values = contiguous_prefill(CFG, params, padded(prompt), windows)
            old = cache
            if sid % 2:  # per-layer host arrays, then bind the slot
                keys = [np.asarray(k)[:prompt_len] for k in keys]
                values = [np.asarray(v)[:prompt_len] for v in values]
                cache = insert_prefill(cache, manager, sid, keys, values)
                slots.insert(sid)
            else:  # stacked device arrays through the slots' convenience
                keys = jnp.stack(keys)[:, :prompt_len]
                values = jnp.stack(values)[:, :prompt_len]
                cache, _ = pk.insert_prefill_slot(cache, slots, sid, keys, values)
            assert old[0].key_pages.is_deleted(), "insert_prefill copied the pages"
        out = np.asarray(out)[0]
        logits[sid] = {p: out[p] for p in range(prompt_len)}

    widths, running, bucketed, steps = set(), set(), set(), 0
    while queue or parked or len(slots):
        while slots.free_slots() and (parked or queue):
            if parked:
                slots.insert(parked.pop(0))
            else:
                sid, request = queue.pop(0)
                start(sid, *request)
        meta = slots.decode_step()
        assert meta.batch_size == B
        widths.add(widths_of(meta))
        running.add(len(slots))
        # What a batch of only the running sequences (manager.step_metadata) would compile for.
        bucketed.add((pk.bucket(len(slots), B), widths_of(manager.step_metadata([s for _, s in slots.occupied()], 1))))
        tok = np.zeros((B, 1), np.int32)
        for b, s in slots.occupied():
            tok[b, 0] = int(np.argmax(logits[s][len(tokens[s]) - 1]))
        out, cache = decode(params, cache, jnp.asarray(tok), meta.to_device())
        out = np.asarray(out)
        steps += 1
        for b, s in slots.occupied():
            logits[s][len(tokens[s])] = out[b, 0]
            tokens[s].append(int(tok[b, 0]))
            remaining[s] -= 1
            if remaining[s] == 0:
                slots.release(b)
        if steps == 3:  # preempt a running sequence from its slot without freeing its blocks
            b, s = slots.occupied()[0]
            assert slots.remove(b) == s and s in manager
            parked.append(s)
        manager.check_integrity()
        slots.check_integrity()
        assert not np.asarray(cache[0].key_pages[pk.NULL_BLOCK]).any()

    assert len(manager) == 0 and manager.num_used_blocks == 0
    for sid, (prompt_len, gen, _) in enumerate(REQUESTS):
        assert len(tokens[sid]) == prompt_len + gen
        ref = np.asarray(forward_full(CFG, params, padded(tokens[sid]), jnp.float32, windows))[0]
        got = np.stack([logits[sid][p] for p in range(len(tokens[sid]))])
        np.testing.assert_allclose(got, ref[: len(tokens[sid])], atol=2e-4, rtol=0, err_msg=f"sequence {sid}")

    # (d) one compilation per table-width bucket, whatever the number of running sequences.
    assert len(traces) == len(set(traces)) == len(widths), (traces, widths)
    assert set(traces) == widths
    assert running == {1, 2, 3, 4}
    assert len(traces) < len(bucketed), (traces, bucketed)  # fixed B saves the per-batch-size compilations


# ---- (e) insert_prefill: in place, bucketed, nothing changes on bad input ------------------------
def _ins_spec(**kw):
    base = dict(num_layers=3, num_blocks=30, block_size=4, max_blocks_per_seq=8, max_batch_slots=4,
                key_heads=2, value_heads=1, key_dim=3, value_dim=5, dtype="bfloat16",
                sliding_window=8, sliding_layers=(1,), sliding_num_blocks=20)
    base.update(kw)
    return pk.CacheSpec(**base)


def _kv(spec, length, seed=0):
    rng = np.random.default_rng(seed)
    dt = compute_dtype(spec)
    keys = [rng.normal(size=(length, spec.key_heads, spec.key_dim)).astype(dt) for _ in range(spec.num_layers)]
    values = [rng.normal(size=(length, spec.value_heads, spec.value_dim)).astype(dt) for _ in range(spec.num_layers)]
    return keys, values


def _read_back(cache, manager, seq_id, layer):
    spec = cache.spec
    g = spec.group_of(layer)
    table = jnp.asarray(manager.block_table(seq_id, g)[None])
    n = jnp.asarray([manager.kv_len(seq_id)])
    dt = compute_dtype(spec)
    k = np.asarray(gather_pages(cache[layer].key_pages, table, n, compute_dtype=dt))[0]
    v = np.asarray(gather_pages(cache[layer].value_pages, table, n, compute_dtype=dt))[0]
    length = manager.kv_len(seq_id)
    assert not k[length:].any() and not v[length:].any()
    return k[:length], v[:length]


def test_insert_prefill_writes_in_place_once_per_bucket():
    spec = _ins_spec(num_blocks=31)  # a spec no other test uses: its compilations are counted
    m = pk.KVCacheManager(spec)
    cache = pk.PagedKVCache.init(spec)
    compiled = insertion._write_prefill._cache_size()
    written = {}
    for sid, length in enumerate([5, 7, 8, 6, 3, 1]):  # buckets 8, 8, 8, 8, 4, 1
        keys, values = _kv(spec, length, seed=sid)
        old = cache
        cache = insert_prefill(cache, m, sid, keys, values)
        assert all(v.key_pages.is_deleted() and v.value_pages.is_deleted() for v in old.views), "pages were copied"
        assert m.kv_len(sid) == length
        written[sid] = (keys, values)
        m.check_integrity()
    assert insertion._write_prefill._cache_size() - compiled == 3
    for sid, (keys, values) in written.items():
        for layer in range(spec.num_layers):
            k, v = _read_back(cache, m, sid, layer)
            np.testing.assert_array_equal(k, keys[layer])
            np.testing.assert_array_equal(v, values[layer])
    for layer in range(spec.num_layers):  # padding was dropped, never written to the null block
        assert not np.asarray(cache[layer].key_pages[pk.NULL_BLOCK]).any()


def test_insert_prefill_device_padding_path(monkeypatch):
    """Arrays on an accelerator are padded there; on CPU we force that branch."""
    monkeypatch.setattr(insertion, "_on_host", lambda x: False)
    spec = _ins_spec(dtype="float32")
    m = pk.KVCacheManager(spec)
    cache = pk.PagedKVCache.init(spec)
    keys, values = _kv(spec, 6)
    cache = insert_prefill(cache, m, 0, [jnp.asarray(k) for k in keys], jnp.asarray(np.stack(values)))
    for layer in range(spec.num_layers):
        k, v = _read_back(cache, m, 0, layer)
        np.testing.assert_array_equal(k, keys[layer])
        np.testing.assert_array_equal(v, values[layer])


def test_slots_insert_prefill_binds_the_slot():
    spec = _ins_spec()
    m = pk.KVCacheManager(spec)
    slots = DecodeSlots(m)
    cache = pk.PagedKVCache.init(spec)
    keys, values = _kv(spec, 5)
    cache, slot = pk.insert_prefill_slot(cache, slots, 3, keys, values, slot=2)
    assert slot == 2 and slots.occupied() == [(2, 3)] and m.kv_len(3) == 5
    before = (full_state(slots), m.snapshot())
    with pytest.raises(SlotError, match="slot=2 is taken by seq_id=3"):
        pk.insert_prefill_slot(cache, slots, 4, keys, values, slot=2)
    assert (full_state(slots), m.snapshot()) == before
    assert not cache[0].key_pages.is_deleted()


def _bad_inputs(spec):
    keys, values = _kv(spec, 5)
    dt = compute_dtype(spec)
    return [
        (keys[:2], values, pk.ShapeError, r"keys has 2 layers; the cache has num_layers=3"),
        (keys, values + values[:1], pk.ShapeError, r"values has 4 layers"),
        ([keys[0], keys[1][:4], keys[2]], values, pk.ShapeError, r"keys\[1\] has shape \(4, 2, 3\) bfloat16; expected \[L, 2, 3\]"),
        (keys, [v.reshape(5, 5, 1) for v in values], pk.ShapeError, r"values\[0\] has shape \(5, 5, 1\)"),
        ([k.astype(np.float32) for k in keys], values, pk.ShapeError, r"keys\[0\] has shape \(5, 2, 3\) float32; expected \[L, 2, 3\] bfloat16"),
        (keys, [v[:4] for v in values], pk.ShapeError, r"keys hold L=5 tokens but values hold L=4"),
        (np.stack(keys)[:, None], values, pk.ShapeError, r"keys is one array of shape \(3, 1, 5, 2, 3\)"),
        ([k[:0] for k in keys], [v[:0] for v in values], pk.InvalidTokenCountError, r"L=0"),
        (keys, 7, pk.ShapeError, r"values is a int"),
        ([k.tolist() for k in keys], values, pk.ShapeError, r"keys\[0\] is a list, not an array"),
        ([np.zeros((33, 2, 3), dt)] * 3, [np.zeros((33, 1, 5), dt)] * 3, pk.SequenceTooLongError, r"L=33 tokens > max_seq_len=32"),
    ]


@pytest.mark.parametrize("case", range(11))
def test_insert_prefill_bad_input_changes_nothing(case):
    spec = _ins_spec()
    m = pk.KVCacheManager(spec)
    cache = pk.PagedKVCache.init(spec)
    keys, values = _kv(spec, 4)
    cache = insert_prefill(cache, m, 0, keys, values)
    bad_keys, bad_values, error, match = _bad_inputs(spec)[case]
    before = m.snapshot()
    with pytest.raises(error, match=match):
        insert_prefill(cache, m, 1, bad_keys, bad_values)
    assert m.snapshot() == before and 1 not in m
    assert not cache[0].key_pages.is_deleted(), "a failed insert must not consume the cache"
    m.check_integrity()


def test_insert_prefill_manager_refusals_change_nothing():
    spec = _ins_spec(num_blocks=4, sliding_num_blocks=4, max_blocks_per_seq=3)
    m = pk.KVCacheManager(spec)
    cache = pk.PagedKVCache.init(spec)
    keys, values = _kv(spec, 8)
    cache = insert_prefill(cache, m, 0, keys, values)  # 2 of the 3 usable blocks
    before = m.snapshot()
    with pytest.raises(pk.DuplicateSequenceError, match="seq_id=0"):
        insert_prefill(cache, m, 0, keys, values)
    with pytest.raises(pk.OutOfBlocksError):
        insert_prefill(cache, m, 1, keys, values)
    assert m.snapshot() == before and not cache[0].key_pages.is_deleted()
    with pytest.raises(pk.SpecError, match="spec"):
        insert_prefill(cache, pk.KVCacheManager(_ins_spec(num_blocks=5, sliding_num_blocks=4, max_blocks_per_seq=3)), 1, keys, values)
    consumed = cache
    cache = insert_prefill(cache, m, 1, [k[:1] for k in keys], [v[:1] for v in values])
    with pytest.raises(pk.ShapeError, match="donated"):
        insert_prefill(consumed, m, 2, [k[:1] for k in keys], [v[:1] for v in values])
    assert 2 not in m
