"""Metadata kept after its sequence was released never reaches the pages again.

A step's metadata names blocks; once a sequence of the step is released those blocks
may be handed to another sequence. Host metadata carries its `Step` (a `StepBatch`'s
reused metadata, its batch), and flattening it -- every jitted call, `to_device` --
refuses a step whose sequences were released since (`StaleStepError`), so neither a
read nor a retried write touches the new owner's bytes.
"""

from __future__ import annotations

import jax
import numpy as np
import pytest

import paged_kv as pk

LAYOUTS = {"split": dict(layout="split"), "unified": dict(layout="unified"), "int8": dict(layout="split")}


def _spec(kind: str) -> pk.CacheSpec:
    extra = dict(kv_format="int8") if kind == "int8" else {}
    return pk.CacheSpec(num_layers=1, num_blocks=8, block_size=4, max_blocks_per_seq=4, max_batch_slots=2,
                        num_kv_heads=1, head_dim=4, dtype="float32", **extra)


@jax.jit
def _write(cache, k, meta):
    return pk.PagedKVCache(tuple(view.write(k, k, meta) for view in cache.views))


@jax.jit
def _read(cache, meta):
    return tuple(view.read(meta)[0] for view in cache.views)


def _pages(cache):
    return [np.asarray(leaf).copy() for leaf in jax.tree_util.tree_leaves(cache)]


@pytest.mark.parametrize("kind", list(LAYOUTS))
@pytest.mark.parametrize("describer", ["manager", "batch", "slots"])
def test_released_sequence_metadata_is_refused(kind, describer):
    spec = _spec(kind)
    m = pk.KVCacheManager(spec)
    cache = pk.PagedKVCache.init(spec, **LAYOUTS[kind])
    m.admit(1, 6)
    first = m.step_metadata([1], 6)
    cache = _write(cache, np.full((first.batch_size, first.query_len, 1, 4), 1.0, np.float32), first)
    m.commit(first)
    if describer == "manager":
        m.append([1], 1)
        old = m.step_metadata([1], 1)
    elif describer == "batch":
        old = pk.StepBatch(m).decode([1])
    else:
        slots = pk.DecodeSlots(m, 2)
        slots.insert(1, 0)
        old = slots.decode_step()
        slots.remove(0)
    m.release(1)
    m.admit(2, 7)  # a new tenant, on the blocks sequence 1 held
    new = m.step_metadata([2], 7)
    assert set(m.block_table(2).tolist()) & set(old.block_tables[0].tolist()) - {0}
    cache = _write(cache, np.full((new.batch_size, new.query_len, 1, 4), 7.0, np.float32), new)
    before = _pages(cache)
    k = np.full((old.batch_size, old.query_len, 1, 4), 3.0, np.float32)
    with pytest.raises(pk.StaleStepError):
        _write(cache, k, old)  # a retried write of the released sequence's step
    with pytest.raises(pk.StaleStepError):
        _read(cache, old)
    with pytest.raises(pk.StaleStepError):
        old.to_device()
    after = _pages(cache)
    assert all(np.array_equal(a, b) for a, b in zip(before, after))
    keys = np.asarray(_read(cache, m.step_metadata([2], 0))[0])
    assert np.allclose(keys[0, :7], 7.0, atol=0.1)  # the new tenant's bytes, untouched


def test_live_metadata_still_flattens_and_batches_move_on():
    spec = _spec("split")
    m = pk.KVCacheManager(spec)
    batch = pk.StepBatch(m)
    m.admit(1, 3)
    m.admit(2, 3)
    meta = batch.step([1, 2], [3, 3])
    meta.to_device()
    m.release(2)
    with pytest.raises(pk.StaleStepError):
        meta.to_device()
    meta = batch.decode([1])  # the batch's next step: the same objects, live again
    meta.to_device()
    m.admit(3, 2)  # a sequence joining does not make a step stale
    meta.to_device()
