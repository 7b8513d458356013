"""Derived positions and slots (`paged_kv.metadata.derive_positions`, `derive_slots`).

A step whose rows write more than one token carries no ``[B, T]`` arrays: its positions
and slots follow from the lengths, tables and starts. These tests hold the derivation to
a reference written here from the manager's public state (each sequence's length and
blocks), for every describer (the general path, the plain path, the persistent batch,
decode slots) and every kind of layer group; the device's derivation (under jit) to the
host's; and hand-built metadata to its checks.
"""

from __future__ import annotations

import random

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import paged_kv as pk
from paged_kv.metadata import derive_positions, derive_slots, pad_slot

BS = 4

KINDS = {
    "full": {},
    "sliding": dict(sliding_window=8, sliding_layers=(1,)),
    "chunked": dict(attention_chunk_size=8, chunked_layers=(1,), chunked_num_blocks=400),
}


def spec(kind: str) -> pk.CacheSpec:
    return pk.CacheSpec(num_layers=2, num_blocks=800, block_size=BS, max_blocks_per_seq=64, max_batch_slots=16,
                        num_kv_heads=1, head_dim=8, **KINDS[kind])


def reference(m: pk.KVCacheManager, ids: list[int], counts: list[int], B: int, T: int):
    """Positions ``[B, T]`` and each group's slots ``[B, T]`` from the manager's public state."""
    positions = np.zeros((B, T), np.int32)
    slots = [np.full((B, T), pad_slot(m.spec, g), np.int32) for g in range(len(m.spec.groups))]
    for b, (s, q) in enumerate(zip(ids, counts)):
        kv = m.kv_len(s)
        positions[b] = [min(kv - q + t, kv - 1) for t in range(T)]
        for g in range(len(m.spec.groups)):
            held = m.block_table(s, g)  # logical blocks [first, ceil(kv / BS))
            first = -(-kv // BS) - held.size
            for t in range(q):
                p = kv - q + t
                slots[g][b, t] = held[p // BS - first] * BS + p % BS
    return positions, slots


def check(meta: pk.StepMetadata, m: pk.KVCacheManager, ids: list[int], counts: list[int], rows=None) -> None:
    """``meta``'s positions and slots (rows ``rows[i]`` holding ``ids[i]``) equal the reference."""
    rows = list(range(len(ids))) if rows is None else rows
    B, T = meta.batch_size, meta.query_len
    want_pos, want_slots = reference(m, ids, counts, len(ids), T)
    pos = meta.positions
    assert pos.shape == (B, T) and pos.dtype == np.int32
    assert np.array_equal(pos[rows], want_pos)
    padding = [b for b in range(B) if b not in rows]
    assert not pos[padding].any()
    for g, gm in enumerate(meta.groups):
        got = gm.slot_mapping
        assert got.shape == (B, T) and got.dtype == np.int32
        assert np.array_equal(got[rows], want_slots[g]), g
        assert (got[padding] == pad_slot(m.spec, g)).all()


def _churn(m: pk.KVCacheManager, rng: random.Random, steps: int):
    """(ids, counts) of a churning batch where prompts join often (a [B, T] step), mutating ``m``."""
    ids: list[int] = []
    nxt = 0
    for _ in range(steps):
        r = rng.random()
        if r < 0.25 and len(ids) < 12:
            m.admit(nxt, rng.randint(1, 40))
            if ids:
                m.append(ids, 1)
            ids.append(nxt)
            yield list(ids), [1] * (len(ids) - 1) + [m.kv_len(nxt)]
            nxt += 1
        elif r < 0.35 and ids:
            m.release(ids.pop(rng.randrange(len(ids))))
        elif r < 0.5 and ids:
            counts = [rng.randint(0, 5) for _ in ids]
            m.append(ids, counts)
            yield list(ids), counts
        elif ids:
            for s in [s for s in ids if m.kv_len(s) > 180]:
                ids.remove(s)
                m.release(s)
            if ids:
                m.append(ids, 1)
                yield list(ids), [1] * len(ids)


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_every_describer_derives_the_reference(kind):
    m = pk.KVCacheManager(spec(kind))
    batch = pk.StepBatch(m)
    derived = 0
    for ids, counts in _churn(m, random.Random(kind), 300):
        for meta in (m.step_metadata(ids, counts), batch.step(ids, counts)):
            check(meta, m, ids, counts)
            derived += meta.derived
            assert meta.derived == (meta.query_len > 1)  # a one-token step carries its arrays
        m.commit(ids)
        m.check_integrity()
    assert derived > 100


def test_forks_and_the_prefix_cache_derive_the_reference():
    m = pk.KVCacheManager(spec("full"), prefix_cache=True)
    prompt = np.arange(1, 23)
    m.admit_prompt(0, prompt)
    meta = m.step_metadata([0], 22)
    check(meta, m, [0], [22])
    m.commit(meta.step)
    m.fork(0, 1)
    m.append([0, 1], [3, 5])
    meta = m.step_metadata([0, 1], [3, 5])
    assert meta.derived and meta.groups[0].copy_len.any()  # copy-on-write copies ride along
    check(meta, m, [0, 1], [3, 5])
    m.commit(meta.step)
    hit = m.admit_prompt(2, prompt)  # a hit: only the prompt's tail is new
    assert 0 < hit < 22
    check(m.step_metadata([2], 22 - hit), m, [2], [22 - hit])


def test_decode_slots_place_derived_rows():
    m = pk.KVCacheManager(spec("full"))
    slots = pk.DecodeSlots(m, 8)
    for s, n in ((0, 9), (1, 17), (2, 5)):
        m.admit(s, n)
    slots.insert(0, 5)
    slots.insert(1, 2)
    slots.insert(2, 6)
    order = [s for s in slots.seq_ids if s is not None]
    meta = slots.step_metadata([0 if s is None else m.kv_len(s) for s in slots.seq_ids])
    assert meta.derived and meta.batch_size == 8
    rows = [b for b, s in enumerate(slots.seq_ids) if s is not None]
    check(meta, m, order, [m.kv_len(s) for s in order], rows)


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_the_device_derives_what_the_host_does(kind):
    m = pk.KVCacheManager(spec(kind))
    for s, n in enumerate((3, 30, 11, 64)):
        m.admit(s, n)
    meta = m.step_metadata([0, 1, 2, 3], [3, 30, 4, 1])
    assert meta.derived

    @jax.jit
    def derive(meta):
        return meta.positions, tuple(g.slot_mapping for g in meta.groups)

    pos, slots = derive(meta)
    assert isinstance(pos, jax.Array) and np.array_equal(np.asarray(pos), meta.positions)
    for g, gm in enumerate(meta.groups):
        assert np.array_equal(np.asarray(slots[g]), gm.slot_mapping)
    moved = meta.to_device()  # carries the compact arrays; derives on the device
    assert moved.derived and np.array_equal(np.asarray(moved.groups[0].slot_mapping), meta.groups[0].slot_mapping)


def test_derivation_rules_on_edges():
    kv = np.array([5, 0, 8], np.int32)
    q = np.array([3, 0, 0], np.int32)
    pos = derive_positions(kv, q, 4)
    assert pos.tolist() == [[2, 3, 4, 4], [0, 0, 0, 0], [7, 7, 7, 7]]
    assert np.array_equal(np.asarray(derive_positions(jnp.asarray(kv), jnp.asarray(q), 4)), pos)
    tables = np.array([[7, 9, 0], [0, 0, 0], [3, 4, 0]], np.int32)
    start = np.zeros(3, np.int32)
    slots = derive_slots(q, pos, tables, start, 999, 4)
    assert slots.tolist() == [[30, 31, 36, 999], [999] * 4, [999] * 4]
    # A column outside the table, or the null block, goes nowhere.
    assert derive_slots(np.array([2], np.int32), np.array([[11, 12]], np.int32), np.array([[5, 6]], np.int32),
                        np.zeros(1, np.int32), 999, 4).tolist() == [[999, 999]]
    assert derive_slots(np.array([1], np.int32), np.array([[4]], np.int32), np.array([[5, 0]], np.int32),
                        np.zeros(1, np.int32), 999, 4).tolist() == [[999]]
    # A table starting at logical block 2 (a sliding window's): position 9 is its column 0.
    assert derive_slots(np.array([1], np.int32), np.array([[9]], np.int32), np.array([[6, 0]], np.int32),
                        np.array([8], np.int32), 999, 4).tolist() == [[25]]


def test_hand_built_derived_metadata_is_checked():
    tables = np.array([[1, 2]], np.int32)
    with pytest.raises(pk.InvalidArgumentError, match="query_len"):
        pk.StepMetadata(np.array([5], np.int32), np.array([5], np.int32), None,
                        (pk.GroupMetadata(tables, None, np.zeros(1, np.int32), pad=64, block_size=4),))
    with pytest.raises(pk.InvalidArgumentError, match="pad"):
        pk.GroupMetadata(tables, None, np.zeros(1, np.int32))
    alone = pk.GroupMetadata(tables, None, np.zeros(1, np.int32), pad=64, block_size=4)
    with pytest.raises(pk.StateError, match="StepMetadata"):
        alone.slot_mapping
    meta = pk.StepMetadata(np.array([5], np.int32), np.array([5], np.int32), None, (alone,), query_len=8)
    assert meta.slot_mapping.tolist() == [[4, 5, 6, 7, 8, 64, 64, 64]]
    assert meta.positions.tolist() == [[0, 1, 2, 3, 4, 4, 4, 4]]
    with pytest.raises(AttributeError):
        meta.kv_lens = np.array([6], np.int32)  # immutable
    # One group in two steps with other lengths: each step derives from its own.
    other = pk.StepMetadata(np.array([3], np.int32), np.array([2], np.int32), None, (alone,), query_len=2)
    assert other.slot_mapping.tolist() == [[5, 6]]
    assert meta.slot_mapping.tolist() == [[4, 5, 6, 7, 8, 64, 64, 64]]
