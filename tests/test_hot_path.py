"""The host hot path gives exactly what the general path gives.

`StepBatch.step` must equal `KVCacheManager.step_metadata` array for array, and the
fast `append` / `admit` / `release` / `commit` must leave the manager exactly as the
general code would (same slots, same block ids in the same order, same free list),
raise the same typed errors and change nothing when they raise. Each comparison
runs with the small-batch (per-element) and the vectorized variants forced.
"""

from __future__ import annotations

import random

import numpy as np
import pytest

import paged_kv as pk
from paged_kv.derived import derive_slots
from paged_kv.allocator import decode_layout, hot_path, step_arrays, manager as manager_mod

FIELDS = ("block_tables", "slot_mapping", "start", "copy_src", "copy_dst", "copy_len", "block_gens", "copy_src_gen",
          "copy_dst_gen")


def spec(sliding: bool = False, num_blocks: int = 3000) -> pk.CacheSpec:
    extra = dict(sliding_window=8, sliding_layers=(1,)) if sliding else {}
    return pk.CacheSpec(num_layers=2, num_blocks=num_blocks, block_size=4, max_blocks_per_seq=64,
                        max_batch_slots=64, num_kv_heads=1, head_dim=8, **extra)


def assert_same_metadata(a: pk.StepMetadata, b: pk.StepMetadata) -> None:
    assert a.built_for == b.built_for
    assert a.owner.shape == b.owner.shape == ()  # each its own manager's serial (they may differ)
    for name in ("kv_lens", "query_lens", "positions"):
        x, y = getattr(a, name), getattr(b, name)
        assert x.shape == y.shape and x.dtype == y.dtype and np.array_equal(x, y), name
    assert len(a.groups) == len(b.groups)
    for ga, gb in zip(a.groups, b.groups):
        for name in FIELDS:
            x, y = getattr(ga, name), getattr(gb, name)
            assert x.shape == y.shape and x.dtype == y.dtype and np.array_equal(x, y), name


def general_step_metadata(m, ids, counts) -> pk.StepMetadata:
    """`step_metadata` through its general code, never the plain shortcut."""
    m._plain_step_metadata = lambda *args: None
    try:
        return m.step_metadata(ids, counts)
    finally:
        del m._plain_step_metadata


@pytest.fixture(params=["small", "vector"])
def variant(request, monkeypatch):
    """Force the per-element or the vectorized variant of every fast path."""
    size = 10**6 if request.param == "small" else 0
    monkeypatch.setattr(hot_path, "SMALL_APPEND", size)
    for module in (step_arrays, decode_layout):
        monkeypatch.setattr(module, "SCALAR_ROWS", size)
    return request.param


def _random_steps(m: pk.KVCacheManager, rng: random.Random, steps: int, fork: bool = False):
    """Yield (seq_ids, counts) for a churning continuous batch, mutating ``m``."""
    ids: list[int] = []
    nxt = 0
    for _ in range(steps):
        r = rng.random()
        counts = 1
        if r < 0.06 and len(ids) < 40:
            m.admit(nxt, rng.randint(1, 30))
            m.append(ids, 1)
            ids.append(nxt)
            counts = [1] * (len(ids) - 1) + [m.kv_len(nxt)]
            nxt += 1
        elif r < 0.09 and ids:
            m.release(ids.pop(rng.randrange(len(ids))))
            continue
        elif r < 0.11 and ids:
            counts = [rng.randint(0, 3) for _ in ids]
            m.append(ids, counts)
        elif fork and r < 0.12 and ids and m.num_free_blocks > 100:
            m.fork(rng.choice(ids), nxt)
            ids.append(nxt)
            nxt += 1
            continue
        else:
            if not ids:
                continue
            for s in [s for s in ids if m.kv_len(s) > 200]:
                ids.remove(s)
                m.release(s)
            if not ids:
                continue
            m.append(ids, 1)
        yield list(ids), counts


@pytest.mark.parametrize("kind", ["plain", "prefix", "sliding", "fork"])
def test_step_batch_equals_step_metadata(kind, variant):
    rng = random.Random(hash((kind, variant)) & 0xFFFF)
    m = pk.KVCacheManager(spec(sliding=kind == "sliding"), prefix_cache=kind == "prefix")
    batch = pk.StepBatch(m)
    advanced = 0
    for ids, counts in _random_steps(m, rng, 700, fork=kind == "fork"):
        before = batch._meta
        expected = general_step_metadata(m, ids, counts)
        assert_same_metadata(m.step_metadata(ids, counts), expected)  # the plain shortcut too
        got = batch.step(ids, counts)
        assert_same_metadata(got, expected)
        advanced += got is before
        m.commit(ids)
        m.check_integrity()
    if kind in ("plain", "prefix"):
        assert advanced > 200, "the in-place decode step was never taken"


def test_step_batch_reuses_its_buffers_and_rebuilds_on_change():
    m = pk.KVCacheManager(spec())
    batch = pk.StepBatch(m)
    for s in range(3):
        m.admit(s, 9 + s)  # 3 blocks of 4 each, 4 after the appends: one table-width bucket
    first = batch.step([0, 1, 2], [9, 10, 11])
    m.append([0, 1, 2], 1)
    decode = batch.step([0, 1, 2], 1)  # prefill -> decode: new shapes
    m.append([0, 1, 2], 1)
    again = batch.step([0, 1, 2], 1)
    assert again is decode and decode is not first  # same buffers, patched in place
    m.release(1)
    m.admit(1, 3)  # same id, another row: the layout is stale
    m.append([0, 2], 1)
    after = batch.step([0, 1, 2], [1, 1, 3])
    assert after is not decode
    assert_same_metadata(after, general_step_metadata(m, [0, 1, 2], [1, 1, 3]))


def test_step_batch_bad_input_raises_like_step_metadata():
    m = pk.KVCacheManager(spec())
    batch = pk.StepBatch(m)
    m.admit(0, 4)
    for ids, n, err in (([9], 1, pk.UnknownSequenceError), ([0, 0], 1, pk.DuplicateSequenceError),
                        ([0], 5, pk.InvalidTokenCountError), ([True], 1, pk.UnknownSequenceError),
                        ([0], -1, pk.InvalidTokenCountError)):
        with pytest.raises(err):
            m.step_metadata(ids, n)
        with pytest.raises(err):
            general_step_metadata(m, ids, n)
        with pytest.raises(err):
            batch.step(ids, n)


def test_to_device_copies_persistent_buffers():
    jax = pytest.importorskip("jax")
    m = pk.KVCacheManager(spec())
    batch = pk.StepBatch(m)
    m.admit(0, 5)
    batch.step([0], 5)
    m.append([0], 1)
    meta = batch.step([0], 1)
    on_device = meta.to_device()
    m.append([0], 1)
    assert batch.step([0], 1) is meta and int(meta.kv_lens[0]) == 7  # patched in place
    assert int(jax.device_get(on_device.kv_lens)[0]) == 6  # the device copy kept its step


def _general_only(monkeypatch):
    for fast in ("_fast_append", "_fast_admit", "_fast_release"):
        monkeypatch.setattr(manager_mod.KVCacheManager, fast, lambda *args: None)


def _twin_managers(monkeypatch, prefix=False):
    """Two identical managers; the second always takes the general append, admit and release paths."""
    fast, slow = pk.KVCacheManager(spec(num_blocks=400), prefix_cache=prefix), pk.KVCacheManager(
        spec(num_blocks=400), prefix_cache=prefix)  # small pools: appends run out of blocks too

    def general(name):
        method = getattr(manager_mod.KVCacheManager, name)

        def call(self, *args):
            with monkeypatch.context() as mp:
                _general_only(mp)
                return method(self, *args)
        return call.__get__(slow)

    for name in ("append", "admit", "release"):
        setattr(slow, name, general(name))
    return fast, slow


def _outcome(call):
    """What ``call()`` returns, or the type of the `PagedKVError` it raises."""
    try:
        return call()
    except pk.PagedKVError as exc:
        return type(exc)


def _release_longest(ids: list, managers) -> None:
    """Both managers refused a step alike: make room by releasing the longest sequence from each."""
    s = max(ids, key=managers[0].kv_len)
    ids.remove(s)
    for m in managers:
        m.release(s)


def _state(m):
    return m.snapshot(), m.pool._free[: m.pool._num_free].tobytes()


@pytest.mark.parametrize("prefix", [False, True])
def test_fast_append_matches_the_general_path(variant, monkeypatch, prefix):
    fast, slow = _twin_managers(monkeypatch, prefix)
    rng = random.Random(7)
    ids: list[int] = []
    for step in range(600):
        if rng.random() < 0.08 or not ids:
            n = rng.randint(1, 40)
            if fast.can_admit(n) and len(ids) < 30:
                a, b = (m.admit(step, n) for m in (fast, slow))
                assert np.array_equal(a, b) and a.dtype == b.dtype and a.shape == b.shape == (1, n)
                ids.append(step)
            continue
        if rng.random() < 0.06:
            s = ids.pop(rng.randrange(len(ids)))
            assert fast.release(s) == slow.release(s)
            continue
        batch = rng.sample(ids, rng.randint(1, len(ids)))
        n = rng.choice([1, 1, 1, 2, 4, "array", "ragged"])
        if n == "array":  # one count repeated, as a simulator passes it
            n = np.full(len(batch), rng.choice([1, 2]), dtype=np.int64)
        elif n == "ragged":
            n = np.array([rng.randint(0, 3) for _ in batch])
        outcome = [_outcome(lambda: m.append(batch, n)) for m in (fast, slow)]
        if isinstance(outcome[0], type):
            assert outcome[0] is outcome[1]
            _release_longest(ids, (fast, slow))
        else:
            assert np.array_equal(outcome[0], outcome[1]) and outcome[0].dtype == outcome[1].dtype
        assert _state(fast) == _state(slow)
        fast.check_integrity()


@pytest.mark.parametrize("bad", [[7], [0, 0], [True], [0.0], np.array([0])])
def test_fast_append_bad_ids_raise_the_general_errors(bad, variant):
    m = pk.KVCacheManager(spec())
    m.admit(0, 3)
    before = _state(m)
    expected = {7: pk.UnknownSequenceError}
    if isinstance(bad, np.ndarray):
        m.append(bad, 1)  # numpy ids are valid: the general path takes them
        assert m.kv_len(0) == 4
        return
    with pytest.raises(pk.PagedKVError) as info:
        m.append(bad, 1)
    assert isinstance(info.value, expected.get(bad[0], pk.PagedKVError))
    assert _state(m) == before


def test_fast_append_out_of_blocks_and_too_long_change_nothing(variant):
    m = pk.KVCacheManager(pk.CacheSpec(num_layers=1, num_blocks=9, block_size=4, max_blocks_per_seq=8,
                                       num_kv_heads=1, head_dim=8))  # 8 usable blocks of 4 tokens
    m.admit(0, 16)
    m.admit(1, 16)
    before = _state(m)
    with pytest.raises(pk.OutOfBlocksError):
        m.append([0, 1], 1)  # both need a block, none is free
    assert _state(m) == before
    big = pk.KVCacheManager(pk.CacheSpec(num_layers=1, num_blocks=64, block_size=4, max_blocks_per_seq=2,
                                         num_kv_heads=1, head_dim=8))
    big.admit(0, 8)
    before = _state(big)
    with pytest.raises(pk.SequenceTooLongError):
        big.append([0], 1)
    assert _state(big) == before


def test_admit_and_release_keep_block_order_and_integrity():
    m = pk.KVCacheManager(spec(num_blocks=65))
    slots = m.admit(0, 10)
    table = m.block_table(0)
    assert np.array_equal(slots[0], (table[:, None] * 4 + np.arange(4)).ravel()[:10])
    m.admit(1, 7)
    free_before = m.pool._free[: m.pool._num_free].copy()
    assert m.release(0) == 3
    # Released tail first, as the general free does: the last block is handed out last.
    assert np.array_equal(m.pool._free[: m.pool._num_free], np.concatenate([free_before, table]))
    m.check_integrity()
    with pytest.raises(pk.UnknownSequenceError):
        m.release(0)


def test_commit_fast_check_still_rejects_bad_ids():
    m = pk.KVCacheManager(spec())
    m.admit(0, 3)
    m.commit([0])
    for bad, err in (([5], pk.UnknownSequenceError), ([True], pk.UnknownSequenceError)):
        with pytest.raises(err):
            m.commit(bad)


@pytest.mark.parametrize("prefix", [False, True])
def test_fused_decode_equals_append_then_step_metadata(variant, prefix):
    rng = random.Random(11)
    fused = pk.KVCacheManager(spec(num_blocks=500), prefix_cache=prefix)
    plain = pk.KVCacheManager(spec(num_blocks=500), prefix_cache=prefix)
    batch = pk.StepBatch(fused)
    ids: list[int] = []
    for step in range(800):
        if rng.random() < 0.05 and len(ids) < 30 and fused.can_admit(20):
            n = rng.randint(1, 20)
            for m in (fused, plain):
                m.admit(step, n)
            ids.append(step)
            assert_same_metadata(batch.step(list(ids), [1] * (len(ids) - 1) + [n]),
                                 general_step_metadata(plain, list(ids), [1] * (len(ids) - 1) + [n]))
            continue
        if ids:
            _decode_both(batch, fused, plain, ids)


def _decode_both(batch, fused, plain, ids: list):
    """``batch.decode(ids)`` on ``fused`` against append + general step_metadata on
    ``plain``: same metadata or the same error (then both release the longest
    sequence), same state after the commit. Returns the batch's metadata (or None)."""
    def general_decode():
        plain.append(list(ids), 1)
        return general_step_metadata(plain, list(ids), 1)

    outcome = [_outcome(lambda: batch.decode(list(ids))), _outcome(general_decode)]
    if isinstance(outcome[0], type):
        assert outcome[0] is outcome[1]
        _release_longest(ids, (fused, plain))
    else:
        assert_same_metadata(*outcome)
    for m in (fused, plain):
        m.commit(list(ids))
    assert _state(fused) == _state(plain)
    fused.check_integrity()
    return None if isinstance(outcome[0], type) else outcome[0]


def test_a_bool_id_equal_to_the_last_batch_never_aliases():
    m = pk.KVCacheManager(spec())
    batch = pk.StepBatch(m)
    m.admit(1, 5)
    batch.step([1], 5)
    m.append([1], 1)
    batch.step([1], 1)
    before = _state(m)
    for call in (lambda: batch.step([True], 1), lambda: batch.decode([True]), lambda: m.append([True], 1)):
        with pytest.raises(pk.UnknownSequenceError):
            call()
        assert _state(m) == before


@pytest.mark.parametrize("prefix", [False, True])
def test_step_batch_commit_is_manager_commit_of_the_ids_it_described(prefix):
    # A fork makes a copy-on-write copy pending; a sequence released before the commit
    # has nothing left to commit. batch.commit() must equal manager.commit(live ids).
    batched, direct = (pk.KVCacheManager(spec(num_blocks=200), prefix_cache=prefix) for _ in range(2))
    batch = pk.StepBatch(batched)
    for m in (batched, direct):
        m.admit(0, 40)
        m.admit(1, 5)
        m.fork(1, 2)
    for step in range(3):
        batch.decode([0, 1, 2])
        direct.append([0, 1, 2], 1)
        direct.step_metadata([0, 1, 2], 1)
        if step == 1:
            for m in (batched, direct):
                m.release(0)
            batch.decode([1, 2])
            direct.append([1, 2], 1)
            direct.step_metadata([1, 2], 1)
            batch.commit()
            direct.commit([1, 2])
            assert batched.snapshot() == direct.snapshot()
            break
        assert batched.num_pending_copies > 0 or step
        batch.commit()
        direct.commit([0, 1, 2])
        assert batched.snapshot() == direct.snapshot()
    batched.check_integrity()


def test_step_batch_takes_counts_as_an_array_like_step_metadata():
    # An array of counts compared with == gives an array: it must not reach a bool test.
    m = pk.KVCacheManager(spec())
    batch = pk.StepBatch(m)
    for s, n in ((0, 5), (1, 7)):
        m.admit(s, n)
    batch.step([0, 1], [5, 7])
    m.append([0, 1], 1)
    assert_same_metadata(batch.step([0, 1], np.array([1, 1])), general_step_metadata(m, [0, 1], np.array([1, 1])))


@pytest.mark.parametrize("prefix", [False, True])
def test_decode_after_leaves_rejoins_and_outside_appends(variant, prefix):
    # The persistent batch must notice everything that happened to its rows between
    # two decodes: rows that finished (a subsequence is decoded next), an id released
    # and admitted again (same id, maybe the same row, another sequence), and appends
    # made through the manager rather than the batch (a block the layout never saw).
    rng = random.Random(23)
    fused, plain = (pk.KVCacheManager(spec(num_blocks=600), prefix_cache=prefix) for _ in range(2))
    batch = pk.StepBatch(fused)
    ids: list[int] = []
    taken = 0
    for step in range(900):
        r = rng.random()
        if r < 0.06 and len(ids) < 24 and fused.can_admit(20):
            s = rng.choice([s for s in range(40) if s not in ids])  # ids come back: same id, new sequence
            n = rng.randint(1, 20)
            through_batch = ids and rng.random() < 0.5 and fused.can_append(ids, 1)
            if through_batch:  # as a serving loop does: decode the running rows, admit, one mixed step
                batch.decode(list(ids))
                plain.append(list(ids), 1)
            for m in (fused, plain):
                m.admit(s, n)
            ids.append(s)
            counts = [1] * (len(ids) - 1) + [rng.randint(1, n) if rng.random() < 0.3 else n]
            for m in (fused, plain):  # or the rows already in the batch grow outside it
                if len(ids) > 1 and not through_batch:
                    m.append(ids[:-1], 1)
            assert_same_metadata(batch.step(list(ids), counts), general_step_metadata(plain, list(ids), counts))
            continue
        if r < 0.12 and ids:
            for s in rng.sample(ids, rng.randint(1, min(3, len(ids)))):  # finished or preempted
                ids.remove(s)
                for m in (fused, plain):
                    m.release(s)
        elif r < 0.16 and ids:
            outside = rng.sample(ids, rng.randint(1, len(ids)))
            for m in (fused, plain):  # an append the batch did not make
                if m.can_append(outside, 1):
                    m.append(outside, 1)
        if not ids:
            continue
        before = batch._meta
        taken += _decode_both(batch, fused, plain, ids) is before
    assert taken > 300, "the in-place decode was never taken"


def test_decode_of_a_subsequence_keeps_the_layout_and_refuses_a_reused_row():
    m, ref = (pk.KVCacheManager(spec()) for _ in range(2))
    batch = pk.StepBatch(m)
    for s in range(8):
        for x in (m, ref):
            x.admit(s, 3 + s)
    batch.step(list(range(8)), [3 + s for s in range(8)])
    batch.decode(list(range(8)))
    ref.append(list(range(8)), 1)
    for s in (2, 5):  # finished: the rest decode next, in order
        for x in (m, ref):
            x.release(s)
    kept = [0, 1, 3, 4, 6, 7]
    layout = batch._meta
    got = batch.decode(kept)
    ref.append(kept, 1)
    assert got is layout  # same bucket: the kept rows were laid out in the same buffers
    assert_same_metadata(got, general_step_metadata(ref, kept, 1))
    # Id 4 leaves and comes back as a new sequence, on the row it just freed.
    row = m.rows_by_id[4]
    for x in (m, ref):
        x.release(4)
        x.admit(4, 30)
    assert m.rows_by_id[4] == row
    got = batch.decode([0, 1, 3, 4])
    ref.append([0, 1, 3, 4], 1)
    assert_same_metadata(got, general_step_metadata(ref, [0, 1, 3, 4], 1))
    assert int(got.kv_lens[3]) == 31


def test_empty_steps_and_back():
    m = pk.KVCacheManager(spec())
    batch = pk.StepBatch(m)
    for call in (lambda: batch.step([], 1), lambda: batch.step([], 1), lambda: batch.decode([])):
        assert_same_metadata(call(), general_step_metadata(m, [], 1))
    m.admit(0, 3)
    assert_same_metadata(batch.step([0], 3), general_step_metadata(m, [0], 3))
    assert_same_metadata(batch.step([], 1), general_step_metadata(m, [], 1))
    got = batch.decode([0])
    assert_same_metadata(got, general_step_metadata(m, [0], 1))
    assert int(got.kv_lens[0]) == 4


@pytest.mark.parametrize("batch", [1, 3])
def test_decode_across_block_edges_and_width_buckets(variant, batch):
    # A few rows decoding from inside their first block past several block edges and
    # table-width buckets (1 -> 2 -> 4 -> 8 blocks): every step equals the general path.
    fused, plain = (pk.KVCacheManager(spec(num_blocks=200)) for _ in range(2))
    b = pk.StepBatch(fused)
    ids = list(range(batch))
    for m in (fused, plain):
        for s in ids:
            m.admit(s, 2 + s)
    b.step(list(ids), [2 + s for s in ids])
    for _ in range(40):
        _decode_both(b, fused, plain, ids)


def test_the_rules_and_runs_of_slots():
    # The slot formula and the append rule, written once in step_arrays, against their
    # definitions; a run of slots (a prompt) from any first token, any length.
    bs_list, rng = (1, 2, 4, 16), np.random.default_rng(3)
    for bs in bs_list:
        n = np.arange(0, 5 * bs)
        assert np.array_equal(step_arrays.room(n, bs), [(-(-t // bs)) * bs - t for t in n.tolist()])
        assert np.array_equal(step_arrays.blocks_for(n, bs), [-(-t // bs) for t in n.tolist()])
        assert [step_arrays.room(int(t), bs) for t in n] == step_arrays.room(n, bs).tolist()
        table = rng.integers(1, 1000, (3, 64)).astype(np.int32)
        for first in range(0, 3 * bs + 1):
            for count in range(1, 3 * bs + 2):
                pos = np.arange(first, first + count)
                want = table[1, pos // bs].astype(np.int64) * bs + pos % bs
                assert np.array_equal(step_arrays.slot(table[1, pos // bs], pos, bs), want)
                # A run of a row's tokens, as a step writing them derives it (`paged_kv.derived`).
                got = derive_slots(np.array([count]), pos[None, :], table[1:2], np.zeros(1, np.int64), -1, bs)
                assert np.array_equal(got[0], want)


def test_decode_slots_hand_out_fresh_arrays():
    # A jitted call on CPU reads numpy arguments in place, later: decode-slot metadata
    # passed to it as it is must not be overwritten by the next decode step.
    m = pk.KVCacheManager(spec())
    for s in range(3):
        m.admit(s, 5 + s)
    slots = pk.DecodeSlots(m, 4)
    for s in range(3):
        slots.insert(s, s)
    first = slots.decode_step()
    kept = [np.array(a) for a in (first.kv_lens, first.positions, first.slot_mapping, first.block_tables)]
    slots.decode_step()
    for a, b in zip(kept, (first.kv_lens, first.positions, first.slot_mapping, first.block_tables)):
        assert np.array_equal(a, b)
