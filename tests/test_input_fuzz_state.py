"""Input fuzz of the state a caller hands back: restored allocator state and swap records
(issue 23). The companion of `test_input_fuzz.py`, which covers the call arguments.

Restored state: random single-field edits of a saved manager state (a value, or a row
added or dropped) either restore or raise `CheckpointError`; what restores passes
``check_integrity`` and then serves a workload raising only typed errors, with the
integrity check after every call. Edits of saved decode-slot claims restore
consistently or are refused too. Swap records: every field of a `SwapRecord` and of a
`SwappedSequence`, replaced by odd values, gives a typed error that changes nothing,
or (the unedited ones) a swap-in.
"""

from __future__ import annotations

import attrs
import numpy as np
import pytest

import paged_kv as pk
from paged_kv import CheckpointError, KVCacheManager
from paged_kv.swap import swap_in, swap_out

HYBRID = pk.CacheSpec(num_layers=2, num_blocks=24, block_size=4, max_blocks_per_seq=8, num_kv_heads=1, head_dim=2,
                      dtype="float32", sliding_window=6, sliding_layers=(1,), sliding_num_blocks=16)
CHUNKED = pk.CacheSpec(num_layers=2, num_blocks=24, block_size=4, max_blocks_per_seq=8, num_kv_heads=1, head_dim=2,
                       dtype="float32", attention_chunk_size=6, chunked_layers=(1,), chunked_num_blocks=16)


def scenario(spec: pk.CacheSpec, prefix: bool) -> KVCacheManager:
    """A manager in a state worth saving: hits, a fork, a chunked prefill part-way,
    trimmed local rows, cached blocks in both eviction tiers."""
    m = KVCacheManager(spec, prefix_cache=prefix)
    if prefix:
        m.admit_prompt(0, np.arange(21))
        m.commit([0], 21)
        m.admit_prompt(2, np.arange(200, 229), chunk=5)
        m.commit([2], 5)
        m.admit_prompt(3, np.arange(21))
    else:
        m.admit(0, 21)
        m.admit(2, 5)
        m.admit(3, 9)
    m.fork(0, 1)
    m.release(0)
    m.append([1], 9)
    m.commit([1], 30)
    return m


def odd_values(value, dtype: np.dtype, limit: int, rng) -> list:
    """Values an edit may put where ``value`` was: off by one, the array's limits, out of range."""
    if dtype == np.bool_:
        return [not value]
    if dtype == np.uint64:
        return [0, 1, int(value) ^ 1, int(rng.integers(0, 2**63))]
    info = np.iinfo(dtype)
    v = int(value)
    return [x for x in (-1, 0, 1, v - 1, v + 1, 2 * v, limit - 1, limit, info.max, info.min,
                        int(rng.integers(0, 2 * limit))) if info.min <= x <= info.max and x != v]


def edits(state: dict, rng, count: int, limit: int):
    """``count`` single-field edits of ``state``: (description, edited copy)."""
    names = sorted(state)
    for _ in range(count):
        name = names[int(rng.integers(len(names)))]
        a = state[name]
        edited = dict(state)
        if a.ndim and a.shape[0] and rng.random() < 0.15:  # a row (or element) added or dropped
            i = int(rng.integers(a.shape[0]))
            new = np.delete(a, i, axis=0) if rng.random() < 0.5 else np.insert(a, i, a[i], axis=0)
            edited[name] = new
            yield f"{name}: row {i} {'dropped' if new.shape[0] < a.shape[0] else 'repeated'}", edited
            continue
        if not a.size:
            continue
        flat = a.reshape(-1).copy()
        i = int(rng.integers(flat.size))
        values = odd_values(flat[i], a.dtype, limit, rng)
        if not values:
            continue
        value = values[int(rng.integers(len(values)))]
        flat[i] = value
        edited[name] = flat.reshape(a.shape)
        yield f"{name}[{np.unravel_index(i, a.shape)}] = {value} (was {a.reshape(-1)[i]})", edited


def workload(m: KVCacheManager, what: str) -> None:
    """Serve on: each call succeeds or raises a typed error; the manager stays consistent."""
    calls = [
        lambda: m.append(m.seq_ids, 1),
        lambda: m.commit(m.step_metadata(m.seq_ids, 0).step) if m.seq_ids else None,
        lambda: [m.commit([s], m.kv_len(s)) for s in m.seq_ids],
        lambda: m.admit_prompt(100, np.arange(21)) if m.prefix_cache is not None else m.admit(100, 21),
        lambda: m.commit([100], 21),
        lambda: m.admit_prompt(101, np.arange(200, 229), chunk=3) if m.prefix_cache is not None else None,
        lambda: m.fork(m.seq_ids[0], 102) if m.seq_ids else None,
        lambda: m.swap_in(m.swap_out(m.seq_ids[-1])) if m.seq_ids else None,
        lambda: [m.cache_tokens(s, np.arange(m.kv_len(s))) for s in m.seq_ids] if m.prefix_cache is not None else None,
        lambda: [m.release(s) for s in list(m.seq_ids)[::2]],
        lambda: m.admit(103, 28),
        lambda: [m.release(s) for s in list(m.seq_ids)],
        lambda: m.admit_prompt(104, np.arange(21)) if m.prefix_cache is not None else None,
    ]
    for i, call in enumerate(calls):
        try:
            call()
        except pk.PagedKVError:
            pass
        except Exception as exc:  # noqa: BLE001 - the point: no builtin error escapes
            pytest.fail(f"after {what}: workload call {i} raised {type(exc).__name__}: {exc}")
        try:
            m.check_integrity()
        except AssertionError as exc:
            pytest.fail(f"after {what}: workload call {i} left the manager inconsistent: {exc}")


@pytest.mark.parametrize("spec, prefix, seed", [(HYBRID, True, 0), (HYBRID, True, 1), (CHUNKED, True, 2),
                                                (HYBRID, False, 3), (CHUNKED, False, 4)])
def test_single_field_edits_restore_consistently_or_are_refused(spec, prefix, seed):
    base = scenario(spec, prefix)
    state = base.state()
    rng = np.random.default_rng(seed)
    refused = restored = 0
    for what, edited in edits(state, rng, 250, spec.num_blocks):
        try:
            m = KVCacheManager.from_state(spec, prefix, edited)
        except CheckpointError:
            refused += 1
            continue
        except Exception as exc:  # noqa: BLE001
            pytest.fail(f"{what}: from_state raised {type(exc).__name__}: {exc}")
        restored += 1
        try:
            m.check_integrity()
        except AssertionError as exc:
            pytest.fail(f"{what}: restored a manager whose check_integrity fails: {exc}")
        workload(m, what)
    assert refused > 100 and restored > 5  # both outcomes were exercised
    workload(KVCacheManager.from_state(spec, prefix, state), "no edit")


def test_slot_claim_edits_restore_consistently_or_are_refused():
    spec = attrs.evolve(HYBRID, max_batch_slots=4)
    m = scenario(spec, True)
    slots = pk.DecodeSlots(m)
    for slot, seq_id in enumerate(m.seq_ids[:3]):
        slots.insert(seq_id, slot)
    state, rng = slots.state(), np.random.default_rng(5)
    for what, edited in edits(state, rng, 200, 4):
        restored = KVCacheManager.from_state(spec, True, m.state())
        try:
            back = pk.DecodeSlots.from_state(restored, 4, edited)
        except CheckpointError:
            continue
        except Exception as exc:  # noqa: BLE001
            pytest.fail(f"{what}: DecodeSlots.from_state raised {type(exc).__name__}: {exc}")
        back.check_integrity()
        restored.check_integrity()
        for seq_id in back.seq_ids:
            if seq_id is not None:  # a slotted sequence cannot be released behind its slot's back
                with pytest.raises(pk.SlotError):
                    restored.release(seq_id)


# ---- swap records ------------------------------------------------------------------------------------
ODD = [None, -1, 0, 1, True, 1.5, "x", 2**70, np.int64(-5), np.uint64(2**64 - 1), (), (0,), (0, 0, 0), [0, 0],
       np.zeros(3, np.float32), np.zeros((1, 2), np.int32), object()]


def test_host_swap_records_with_odd_fields_are_typed_errors():
    m = scenario(HYBRID, True)
    record = m.swap_out(1)
    fields = {"seq_id": ODD, "num_tokens": ODD + [record.num_tokens + 1, record.num_tokens - 1],
              "first_blocks": ODD + [(0, 9), (0, -1), (1, 0)],
              "blocks": ODD + [(np.zeros(1, np.int32),) * 2, tuple(b.astype(float) for b in record.blocks),
                               tuple(b.tolist() for b in record.blocks), tuple(b[:-1] for b in record.blocks)]}
    for field, values in fields.items():
        for value in values:
            edited = attrs.evolve(record, **{field: value})
            before = m.snapshot()
            can = m.can_swap_in(edited)
            assert type(can) is bool
            try:
                m.swap_in(edited)
            except pk.PagedKVError:
                assert not can and m.snapshot() == before, f"{field}={value!r}"
            except Exception as exc:  # noqa: BLE001
                pytest.fail(f"swap_in with {field}={value!r} raised {type(exc).__name__}: {exc}")
            else:
                assert can, f"{field}={value!r}: can_swap_in said no, swap_in did it"
                m.release(int(edited.seq_id))
            m.check_integrity()


def test_device_swapped_sequences_with_odd_fields_are_refused():
    spec = pk.CacheSpec(num_layers=2, num_blocks=16, block_size=4, max_blocks_per_seq=4, num_kv_heads=1,
                        head_dim=2, dtype="float32", sliding_window=6, sliding_layers=(1,), sliding_num_blocks=12)
    cache, m = pk.PagedKVCache.init(spec), KVCacheManager(spec, prefix_cache=True)
    m.admit_prompt(1, np.arange(10))
    m.commit([1], 10)
    gone = swap_out(cache, m, 1)
    pages = gone.pages
    values = {
        "record": ODD + [attrs.evolve(gone.record, num_tokens=gone.record.num_tokens + 1),
                         attrs.evolve(gone.record, seq_id=2)],
        "pages": ODD + [pages[:1], tuple(layer[:1] for layer in pages), tuple(tuple(a.tolist() for a in layer)
                                                                                    for layer in pages),
                        tuple(tuple(a.astype(np.float64) for a in layer) for layer in pages),
                        tuple(tuple(a[:, :2] for a in layer) for layer in pages)],
        "spec": ODD + [attrs.evolve(spec, dtype="bfloat16"), attrs.evolve(spec, num_blocks=20)],
        "written": ODD + [gone.written + 1],
        "seal": ODD + [b"", gone.seal[::-1]],
    }
    before = m.snapshot()
    for field, odd in values.items():
        for value in odd:
            try:
                cache = swap_in(cache, m, attrs.evolve(gone, **{field: value}))
            except pk.PagedKVError:
                assert m.snapshot() == before, f"{field}={value!r} raised but changed the manager"
            except Exception as exc:  # noqa: BLE001
                pytest.fail(f"swap_in with {field}={value!r} raised {type(exc).__name__}: {exc}")
            else:
                pytest.fail(f"swap_in accepted a SwappedSequence with {field}={value!r}")
    cache = swap_in(cache, m, gone)
    assert m.kv_len(1) == 10
    m.check_integrity()
