"""Steps as values: ``commit(step)`` commits exactly the step it names, with steps in
flight (issue 22: an overlap scheduler describes N+1 while N runs)."""

from __future__ import annotations

import numpy as np
import pytest

import paged_kv as pk


def _spec(**kw) -> pk.CacheSpec:
    base = dict(num_layers=1, num_blocks=32, block_size=4, max_blocks_per_seq=8, max_batch_slots=8,
                num_kv_heads=1, head_dim=2, dtype="float32")
    return pk.CacheSpec(**{**base, **kw})


def _unchanged(m, call, error):
    before = m.snapshot()
    with pytest.raises(error):
        call()
    assert m.snapshot() == before


def test_committing_step_n_keys_only_what_step_n_wrote():
    m = pk.KVCacheManager(_spec(), prefix_cache=True)
    prompt = np.arange(16)
    m.admit_prompt(0, prompt, chunk=8)  # holds 8 tokens now
    n = m.step_metadata([0], 8).step  # step N: tokens 0..7
    m.append([0], 8)
    n1 = m.step_metadata([0], 8).step  # step N+1, described while N runs
    m.commit(n)
    # Only N's two full blocks are written: a second tenant hits 8 tokens, never 16.
    assert m.admit_prompt(1, prompt) == 8
    m.release(1)
    m.commit(n1)
    assert m.admit_prompt(2, prompt) == 15 // 4 * 4  # the last token is always computed
    m.check_integrity()


def test_the_synchronous_form_still_commits_the_last_description():
    m = pk.KVCacheManager(_spec(), prefix_cache=True)
    m.admit_prompt(0, np.arange(12))
    m.step_metadata([0], 12)
    m.commit([0])
    assert m.admit_prompt(1, np.arange(12)) == 8


def test_commit_twice_out_of_order_or_foreign_is_refused_and_changes_nothing():
    m, other = pk.KVCacheManager(_spec(), prefix_cache=True), pk.KVCacheManager(_spec(), prefix_cache=True)
    m.admit(0, 5)
    m.admit(1, 3)
    a = m.step_metadata([0, 1], [5, 3]).step
    m.append([0, 1], 1)
    b = m.step_metadata([0, 1], 1).step
    m.commit(b)  # a was passed over (abandoned, or skipped): it cannot be committed after b
    _unchanged(m, lambda: m.commit(a), pk.StepError)
    _unchanged(m, lambda: m.commit(b), pk.StepError)
    other.admit(0, 5)
    foreign = other.step_metadata([0], 5).step
    _unchanged(m, lambda: m.commit(foreign), pk.StepError)
    _unchanged(m, lambda: m.commit(b, 1), pk.InvalidArgumentError)
    _unchanged(m, lambda: m.commit("step"), pk.PagedKVError)
    m.check_integrity()


def test_a_step_whose_sequence_was_released_or_reincarnated_is_stale():
    m = pk.KVCacheManager(_spec(), prefix_cache=True)
    prompt = np.arange(8)
    m.admit_prompt(0, prompt)
    m.admit_prompt(1, np.arange(100, 108))
    step = m.step_metadata([0, 1], 8).step
    m.release(0)
    m.admit_prompt(0, prompt)  # the same id, most likely the same (recycled) row: a new incarnation
    _unchanged(m, lambda: m.commit(step), pk.StaleStepError)
    m.commit(step, skip_released=True)  # sequence 1's blocks are written; the new 0 holds nothing yet
    assert m.admit_prompt(2, np.arange(100, 108)) == 4
    assert m.admit_prompt(3, prompt) == 0
    m.check_integrity()


def test_copies_retire_at_the_step_that_carried_them():
    m = pk.KVCacheManager(_spec())
    m.admit(0, 6)
    m.step_metadata([0], 6)
    m.fork(0, 1)
    m.fork(0, 2)
    m.append([1], 1)  # copy-on-write of block 1
    n = m.step_metadata([1], 1).step
    m.append([2], 1)  # another copy: 0 and 2 still share block 1
    n1 = m.step_metadata([2], 1).step
    assert m.num_pending_copies == 2
    m.commit(n)
    assert m.num_pending_copies == 1  # N+1's copy has not run yet
    m.commit(n1)
    assert m.num_pending_copies == 0
    m.check_integrity()


def test_batch_and_slots_hand_out_their_steps():
    m = pk.KVCacheManager(_spec(), prefix_cache=True)
    batch = pk.StepBatch(m)
    m.admit_prompt(0, np.arange(7))
    batch.step([0], 7)
    first = batch.last_step
    assert batch.decode([0]) is not None
    second = batch.last_step
    assert second.id == first.id + 1
    m.commit(first)
    assert m.admit_prompt(5, np.arange(7)) == 4
    batch.commit(second)
    slots = pk.DecodeSlots(m, num_slots=2)
    slots.insert(0, 0)
    meta = slots.decode_step()
    assert meta.step is not None and meta.step.id == second.id + 1
    slots.commit(meta.step)
    with pytest.raises(pk.StepError):
        slots.commit(meta.step)
    m.check_integrity()


def test_metadata_on_the_device_drops_the_step_but_stays_one_pytree():
    import jax

    m = pk.KVCacheManager(_spec())
    m.admit(0, 3)
    meta = m.step_metadata([0], 3)
    assert meta.step is not None
    leaves, tree = jax.tree_util.tree_flatten(meta)
    assert all(isinstance(x, np.ndarray) for x in leaves)
    assert jax.tree_util.tree_unflatten(tree, leaves).step is None
    with pytest.raises(pk.StepError):
        m.commit(meta.to_device())


def test_eager_calls_with_copy_carrying_host_metadata():
    """A view's write / attention / concatenate_to_cache outside jit, handed host (numpy)
    metadata that carries a copy-on-write copy (issue 22: a TracerArrayConversionError)."""
    import jax.numpy as jnp

    spec = _spec(num_kv_heads=1, head_dim=4)
    m = pk.KVCacheManager(spec)
    cache = pk.PagedKVCache.init(spec)
    view = cache.views[0]
    m.admit(0, 6)
    meta = m.step_metadata([0], 6)
    kv = jnp.ones((meta.batch_size, meta.query_len, 1, 4), jnp.float32)
    view = view.write(kv, kv, meta)
    m.commit(meta)
    m.fork(0, 1)
    m.append([1], 1)
    meta = m.step_metadata([1], 1)
    assert meta.groups[0].copy_src.size and isinstance(meta.groups[0].copy_src, np.ndarray)
    q = jnp.ones((meta.batch_size, meta.query_len, 1, 4), jnp.float32)
    out, view2 = view.attention(q, 2 * q, 2 * q, meta)
    assert out.shape[:2] == (meta.batch_size, meta.query_len)
    keys, _values, _mask, _ = view.concatenate_to_cache(q, 2 * q, 2 * q, meta)
    assert np.asarray(keys)[0, :7, 0, 0].tolist() == [1.0] * 6 + [2.0]  # the copied tokens, then the new one


def test_a_step_batch_step_in_flight_keeps_its_own_arrays():
    """A jitted call given a `StepBatch`'s metadata, still running when the next step is
    described, sees the arrays of its own step. On CPU a jitted call may take a numpy
    argument without copying it (about half of 4 KiB buffers here), and the batch
    rewrites its buffers in place: without the copy at flattening, the running step's
    slots would move under it. Several shapes and rounds: a batch whose buffers are
    never copied fails on nearly every run."""
    import jax
    import jax.numpy as jnp

    @jax.jit
    def slow_echo(big, meta):
        x = big
        for _ in range(12):  # long enough that the call returns before it has run
            x = jnp.tanh(x @ x.T * 1e-3)
        late = (x[0, 0] > 1e9).astype(jnp.int32)  # 0, known only once the loop has run: read the metadata after it
        return meta.groups[0].slot_mapping + late, meta.kv_lens + late

    big = jnp.ones((512, 512), jnp.float32)
    spec = pk.CacheSpec(num_layers=1, num_blocks=4096, block_size=16, max_blocks_per_seq=64, max_batch_slots=1024,
                        num_kv_heads=1, head_dim=8)
    for rows in (600, 1000):  # [rows bucket, 1] int32 slots: 4 KiB buffers
        m = pk.KVCacheManager(spec)
        batch = pk.StepBatch(m)
        ids = list(range(rows))
        for i in ids:
            m.admit(i, 3)
        batch.step(ids, 1)
        batch.commit()
        for _ in range(4):
            meta = batch.decode(ids)
            want = (meta.groups[0].slot_mapping.copy(), meta.kv_lens.copy())
            running = slow_echo(big, meta)
            batch.decode(ids)  # the next step, described while this one runs: its buffers move on
            batch.commit()
            np.testing.assert_array_equal(np.asarray(running[0]), want[0])
            np.testing.assert_array_equal(np.asarray(running[1]), want[1])
