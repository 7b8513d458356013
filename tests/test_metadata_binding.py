"""Metadata the host cannot check any more never touches another owner's bytes.

`tests/test_stale_metadata.py` covers host metadata (its `Step` is checked when it is
flattened). These cover what carries no step: metadata already on the device
(`to_device` before the release), metadata built by hand, metadata of another manager
with the same spec, and metadata whose sliding-window block was trimmed and handed to
another sequence while the row lives on. The device refuses each by the blocks'
generations and the pages' owner (`paged_kv.binding`): the new owner's bytes are
unchanged, and reads of its blocks see zeros, never its values. Split, unified and
quantized pages alike.
"""

from __future__ import annotations


import attrs
import jax
import numpy as np
import pytest

import paged_kv as pk

KINDS = {"split": ("split", {}), "unified": ("unified", {}), "int8": ("split", dict(kv_format="int8")),
         "fp8": ("unified", dict(kv_format="fp8"))}


def _spec(kind: str, **extra) -> pk.CacheSpec:
    return pk.CacheSpec(num_layers=1, num_blocks=8, block_size=4, max_blocks_per_seq=4, max_batch_slots=2,
                        num_kv_heads=1, head_dim=4, dtype="float32", **KINDS[kind][1], **extra)


@jax.jit
def _write(cache, k, meta):
    return pk.PagedKVCache(tuple(view.write(k, k, meta) for view in cache.views))


@jax.jit
def _read(cache, meta):
    return tuple(view.read(meta)[0] for view in cache.views)


@jax.jit
def _attend(cache, q, meta):
    return tuple(view.attend(q, meta) for view in cache.views)


def _pages(cache):
    return [np.asarray(leaf).copy() for leaf in jax.tree_util.tree_leaves([v.pages() for v in cache.views])]


def _tokens(meta, value: float):
    return np.full((meta.batch_size, meta.query_len, 1, 4), value, np.float32)


def _run(cache, m, ids, counts, value: float):
    meta = m.step_metadata(ids, counts)
    cache = _write(cache, _tokens(meta, value), meta)
    m.commit(meta.step)
    return cache


def _assert_untouched_and_unseen(cache, before, stale, m, new_id: int, n: int, value: float):
    """Writing and reading with ``stale`` changed no page byte and saw none of ``value``;
    the new owner still reads its own ``value`` back."""
    cache = _write(cache, _tokens(stale, 3.0), stale)
    assert all(np.array_equal(a, b) for a, b in zip(before, _pages(cache)))
    seen = np.asarray(_read(cache, stale)[0])
    assert not np.any(np.isclose(seen, value, atol=0.1)), "stale metadata read the new owner's keys"
    q = np.ones((stale.batch_size, stale.query_len, 1, 4), np.float32)
    out = np.asarray(_attend(cache, q, stale)[0])
    assert not np.any(np.isclose(out, value, atol=0.1)), "stale metadata attended to the new owner's values"
    keys = np.asarray(_read(cache, m.step_metadata([new_id], 0))[0])
    assert np.allclose(keys[0, :n], value, atol=0.1)
    return cache


@pytest.mark.parametrize("kind", list(KINDS))
def test_device_resident_metadata_of_a_released_sequence(kind):
    spec = _spec(kind)
    m = pk.KVCacheManager(spec)
    cache = pk.PagedKVCache.init(spec, layout=KINDS[kind][0])
    m.admit(1, 6)
    cache = _run(cache, m, [1], 6, 1.0)
    m.append([1], 1)
    stale = m.step_metadata([1], 1).to_device()  # on the device: no Step to check any more
    assert stale.step is None
    m.release(1)
    m.admit(2, 7)  # the new tenant gets sequence 1's blocks
    assert set(m.block_table(2).tolist()) & set(np.asarray(stale.block_tables)[0].tolist()) - {0}
    cache = _run(cache, m, [2], 7, 7.0)
    _assert_untouched_and_unseen(cache, _pages(cache), stale, m, 2, 7, 7.0)


@pytest.mark.parametrize("kind", list(KINDS))
def test_hand_built_metadata_reads_and_writes_nothing(kind):
    spec = _spec(kind)
    m = pk.KVCacheManager(spec)
    cache = pk.PagedKVCache.init(spec, layout=KINDS[kind][0])
    m.admit(2, 7)
    cache = _run(cache, m, [2], 7, 7.0)
    real = m.step_metadata([2], 1)
    # The same arrays without the generations and owner the manager put there.
    forged = pk.StepMetadata(real.kv_lens, real.query_lens, real.positions,
                             (pk.GroupMetadata(real.block_tables, real.slot_mapping, real.groups[0].start),),
                             real.built_for)
    _assert_untouched_and_unseen(cache, _pages(cache), forged, m, 2, 7, 7.0)
    # The owner copied too, the generations not: still nothing.
    forged = forged.replace(owner=real.owner)
    _assert_untouched_and_unseen(cache, _pages(cache), forged, m, 2, 7, 7.0)


@pytest.mark.parametrize("kind", list(KINDS))
def test_another_managers_metadata(kind):
    spec = _spec(kind)
    mine, other = pk.KVCacheManager(spec), pk.KVCacheManager(spec)  # data-parallel replicas, say
    cache = pk.PagedKVCache.init(spec, layout=KINDS[kind][0])
    mine.admit(2, 7)
    cache = _run(cache, mine, [2], 7, 7.0)
    other.admit(5, 7)  # a fresh pool hands out the same block ids
    foreign = other.step_metadata([5], 7)
    assert set(other.block_table(5).tolist()) == set(mine.block_table(2).tolist())
    _assert_untouched_and_unseen(cache, _pages(cache), foreign, mine, 2, 7, 7.0)
    # Once bound to the other manager (it takes the pages over), its metadata works.
    cache = cache.bind(other)
    cache = _write(cache, _tokens(foreign, 5.0), foreign)
    assert np.allclose(np.asarray(_read(cache, other.step_metadata([5], 0))[0])[0, :7], 5.0, atol=0.1)


@pytest.mark.parametrize("kind", ["split", "int8"])
def test_bind_copies_the_generations_so_a_new_owner_reads_nothing_before_it_writes(kind):
    """`bind` puts the pool's generations on the device. On CPU device_put may alias a
    numpy buffer, and the pool bumps generations in place when it hands a block out: an
    aliased array would say the new owner had written the block already, and its first
    read would see the previous owner's bytes. Whether it aliases depends on the
    buffer's alignment (about half of 4 KiB numpy arrays here), so several pools are
    tried: a `bind` without the copy fails this test on all but ~1 run in 500."""
    spec = attrs.evolve(_spec(kind), num_blocks=1024)  # a 4 KiB generations array
    for _ in range(8):
        m = pk.KVCacheManager(spec)
        cache = pk.PagedKVCache.init(spec, layout=KINDS[kind][0])
        m.admit(1, 6)
        cache = _run(cache, m, [1], 6, 1.0).bind(m)
        m.release(1)
        m.admit(2, 6)  # sequence 1's blocks, handed out again: their generations move on, on the host only
        keys = np.asarray(_read(cache, m.step_metadata([2], 0))[0])
        assert not np.any(np.isclose(keys, 1.0, atol=0.1)), "a new owner read the previous owner's keys"
        cache = _run(cache, m, [2], 6, 2.0)  # once it writes, it reads its own
        assert np.allclose(np.asarray(_read(cache, m.step_metadata([2], 0))[0])[0, :6], 2.0, atol=0.1)


@pytest.mark.parametrize("kind", ["split", "unified", "int8"])
def test_trimmed_window_block_handed_to_another_sequence(kind):
    spec = _spec(kind, sliding_window=4, sliding_layers=(0,))
    m = pk.KVCacheManager(spec)
    cache = pk.PagedKVCache.init(spec, layout=KINDS[kind][0])
    m.admit(1, 5)
    cache = _run(cache, m, [1], 5, 1.0)
    m.append([1], 1)
    kept = m.step_metadata([1], 1)
    stale = kept.to_device()  # reads the block of tokens 0..3 (the window reaches token 2)
    first = int(np.asarray(stale.block_tables)[0, 0])
    cache = _write(cache, _tokens(kept, 1.0), stale)
    m.commit(kept.step)
    while first in m.block_table(1).tolist():  # the window moves on: the first block goes back to the pool
        m.append([1], 1)
        cache = _run(cache, m, [1], 1, 1.0)
    m.admit(2, 3)
    assert first in m.block_table(2).tolist()
    cache = _run(cache, m, [2], 3, 7.0)
    before = _pages(cache)
    cache = _write(cache, _tokens(stale, 3.0), stale)  # a replay: sequence 1 still lives
    after = _pages(cache)
    for a, b in zip(before, after):  # the other tenant's block is untouched (the replay's own block may change)
        assert np.array_equal(a[first], b[first])
    seen = np.asarray(_read(cache, stale)[0])
    assert not np.any(np.isclose(seen, 7.0, atol=0.1))
    keys = np.asarray(_read(cache, m.step_metadata([2], 0))[0])
    assert np.allclose(keys[0, :3], 7.0, atol=0.1)


@pytest.mark.parametrize("kind", ["split", "unified"])
def test_a_replayed_copy_on_write_copy_never_lands_in_a_new_owners_block(kind):
    spec = _spec(kind)
    m = pk.KVCacheManager(spec)
    cache = pk.PagedKVCache.init(spec, layout=KINDS[kind][0])
    m.admit(1, 6)
    cache = _run(cache, m, [1], 6, 1.0)
    m.fork(1, 9)
    m.append([9], 1)  # the shared, partial block is copied for the child
    with_copy = m.step_metadata([9], 1)
    assert int(np.asarray(with_copy.groups[0].copy_len).max()) > 0
    stale = with_copy.to_device()
    dst = int(np.asarray(with_copy.groups[0].copy_dst)[0])
    cache = _write(cache, _tokens(with_copy, 2.0), with_copy)
    m.commit(with_copy.step)
    m.release(9)  # the copy's destination goes back to the pool ...
    m.admit(2, 4)  # ... and to a new tenant
    assert dst in m.block_table(2).tolist()
    cache = _run(cache, m, [2], 4, 7.0)
    _assert_untouched_and_unseen(cache, _pages(cache), stale, m, 2, 4, 7.0)


def test_checkpoint_restore_binds_the_pages_to_the_restored_manager(tmp_path):
    spec = _spec("split")
    m = pk.KVCacheManager(spec)
    cache = pk.PagedKVCache.init(spec)
    m.admit(2, 7)
    cache = _run(cache, m, [2], 7, 7.0)
    pk.save_checkpoint(tmp_path / "ck", cache, m)
    ck = pk.load_checkpoint(tmp_path / "ck")
    assert ck.manager.steps.owner != m.steps.owner
    keys = np.asarray(_read(ck.cache, ck.manager.step_metadata([2], 0))[0])
    assert np.allclose(keys[0, :7], 7.0, atol=0.1)
    # The old manager's metadata does not serve the restored pages.
    seen = np.asarray(_read(ck.cache, m.step_metadata([2], 0))[0])
    assert not np.any(np.isclose(seen, 7.0, atol=0.1))
