"""Checkpoints: a restored cache + manager (+ decode slots) continues exactly like the original,
and every kind of bad file or bad save raises `CheckpointError` naming the problem."""

from __future__ import annotations

import hashlib
import json
import os
import struct
import zipfile
from functools import partial

import attrs
import jax
import numpy as np
import pytest

import paged_kv as pk
import paged_kv.checkpoint as ckpt
import paged_kv.checkpoint_files as ckpt_files
from paged_kv import CheckpointError, DecodeSlots, KVCacheManager, PagedKVCache
from paged_kv.spec import compute_dtype

BASE = dict(num_layers=2, num_blocks=32, block_size=4, max_blocks_per_seq=8, max_batch_slots=8,
            num_kv_heads=2, head_dim=8)
SLIDING = dict(sliding_window=8, sliding_layers=(1,), sliding_num_blocks=20)
CHUNKED = dict(attention_chunk_size=6, chunked_layers=(1,), chunked_num_blocks=20)  # chunks straddle blocks
CASES = {
    "split-bf16": (dict(dtype="bfloat16"), "split"),
    "unified-f32": (dict(dtype="float32"), "unified"),
    "sliding-bf16": (dict(dtype="bfloat16", **SLIDING), "split"),
    "chunked-unified-f16": (dict(dtype="float16", **CHUNKED), "unified"),
}


def make_spec(**kw) -> pk.CacheSpec:
    return pk.CacheSpec(**{**BASE, **kw})


@partial(jax.jit, donate_argnums=0)
def _write(cache, keys, values, meta):
    """Every layer writes its keys/values ``[L, B, T, H, D]`` at the step's slots."""
    return PagedKVCache(tuple(v.write(keys[i], values[i], meta) for i, v in enumerate(cache.views)))


@jax.jit
def _read(cache, meta):
    return [v.read(meta) for v in cache.views]


class Server:
    """A cache, its manager and decode slots, driven with real key/value writes.

    ``written[seq]`` keeps the layer-0 keys written for each sequence, so the test can
    check that the pages hold what was written, not just that two caches agree.
    """

    def __init__(self, cache, manager, slots):
        self.cache, self.manager, self.slots = cache, manager, slots
        self.spec = manager.spec
        self.written: dict[int, list[np.ndarray]] = {}

    @classmethod
    def fresh(cls, spec, layout):
        manager = KVCacheManager(spec)
        return cls(PagedKVCache.init(spec, layout=layout), manager, DecodeSlots(manager, 4))

    def _kv(self, rng, *shape):
        s = self.spec
        dt = compute_dtype(s)
        k = rng.normal(size=(s.num_layers, *shape, s.key_heads, s.key_dim)).astype(dt)
        v = rng.normal(size=(s.num_layers, *shape, s.value_heads, s.value_dim)).astype(dt)
        return k, v

    def prefill(self, rng, seq_id, n, slot=None):
        k, v = self._kv(rng, n)
        self.cache, slot = pk.insert_prefill_slot(self.cache, self.slots, seq_id, k, v, slot)
        self.written[seq_id] = [k[0]]
        return [self.manager.block_table(seq_id, g) for g in range(len(self.spec.groups))]

    def _write_step(self, rng, ids, counts, meta):
        k, v = self._kv(rng, meta.batch_size, meta.query_len)
        self.cache = _write(self.cache, k, v, meta)
        for b, (s, c) in enumerate(zip(ids, counts)):
            if s is not None:
                self.written[s].append(k[0, b, :c])

    def append(self, rng, ids, counts):
        slots = self.manager.append(ids, counts)
        self._write_step(rng, ids, counts, self.manager.step_metadata(ids, counts))
        return slots

    def decode(self, rng):
        meta = self.slots.decode_step()
        self._write_step(rng, self.slots.seq_ids, [1] * self.slots.num_slots, meta)
        return meta

    def release(self, seq_id):
        self.slots.release(self.slots.slot_of(seq_id))

    def gathered(self):
        ids = self.manager.seq_ids
        meta = self.manager.step_metadata(ids, 1)
        return ids, meta, [(np.asarray(k), np.asarray(v)) for k, v in _read(self.cache, meta)]

    def check_written(self):
        """Layer 0 (full attention in every case) returns exactly the keys written."""
        ids, meta, layers = self.gathered()
        for b, s in enumerate(ids):
            want = np.concatenate(self.written[s])
            assert layers[0][0][b, : want.shape[0]].tobytes() == want.tobytes(), f"seq {s}"


def history(server: Server, rng) -> None:
    """Admits into non-lowest slots, decodes, releases out of order, chunked appends: the
    free stack and free page-table rows end up in an order no fresh manager has."""
    server.prefill(rng, 0, 7)
    server.prefill(rng, 1, 13, slot=3)
    server.prefill(rng, 2, 3)
    server.prefill(rng, 3, 9)
    for _ in range(3):
        server.decode(rng)
    server.release(1)
    server.append(rng, [3], [6])  # a chunk of a long prompt
    server.prefill(rng, 4, 5)
    server.release(0)
    for _ in range(2):
        server.decode(rng)


def continuation(server: Server, rng) -> list:
    """What both the original and the restored server do next; returns every block id handed out."""
    out = [server.prefill(rng, 10, 11)]
    for _ in range(4):
        meta = server.decode(rng)
        out.append([g.block_tables for g in meta.groups])
    server.release(2)
    out.append(server.prefill(rng, 11, 6))
    out.append(server.append(rng, [4, 10], [5, 2]))
    return out


def storage_bits(cache):
    """The page (and scale) bits; the binding arrays beside them are `binding_state`'s."""
    return [np.asarray(x) for x in jax.device_get(jax.tree_util.tree_leaves([v.pages() for v in cache.views]))]


def binding_state(cache):
    """Each layer's block generations (a restore keeps them; its owner is the restored manager)."""
    return [np.asarray(v.generations) for v in cache.views]


def host_state(manager):
    """Everything `snapshot` leaves out: the whole free stacks and the free page-table rows."""
    return [(g.pool._free.tobytes(), g.pool._num_free, list(g.table._free_rows)) for g in manager.groups]


# ---- round trips -----------------------------------------------------------------------------
@pytest.mark.parametrize("case", list(CASES))
def test_round_trip_continues_exactly(case, tmp_path):
    spec_kw, layout = CASES[case]
    spec = make_spec(**spec_kw)
    orig = Server.fresh(spec, layout)
    history(orig, np.random.default_rng(0))
    pool = orig.manager.pool
    fresh_order = np.arange(pool.num_blocks - 1, 0, -1, dtype=np.int32)[: pool.num_free]
    assert not np.array_equal(pool._free[: pool.num_free], fresh_order), "history too simple to test free order"
    if len(spec.groups) > 1:  # the local group has returned blocks: the saved first blocks matter
        assert orig.manager.groups[1].table.first_block.any(), "history too short to trim a local group"

    path = tmp_path / "ck.npz"
    pk.save_checkpoint(path, orig.cache, orig.manager, orig.slots)
    assert os.listdir(tmp_path) == ["ck.npz"]  # no temporary file left behind
    ck = pk.load_checkpoint(path, spec=spec)
    assert ck.spec == spec and ck.layout == layout
    assert jax.tree_util.tree_structure(ck.cache) == jax.tree_util.tree_structure(orig.cache)
    for a, b in zip(storage_bits(orig.cache), storage_bits(ck.cache)):
        assert a.dtype == b.dtype and a.dtype.kind == "u" and a.tobytes() == b.tobytes()
    for g, h in zip(ck.manager.groups, orig.manager.groups):  # block generations restored, the pages bound to them
        assert np.array_equal(g.pool.generation, h.pool.generation)
    for view, gens in zip(ck.cache.views, binding_state(ck.cache)):
        assert np.array_equal(gens, ck.manager.groups[view.group].pool.generation)
        assert int(view.owner) == ck.manager.steps.owner
    assert ck.manager.snapshot() == orig.manager.snapshot()
    assert ck.manager.seq_ids == orig.manager.seq_ids
    assert host_state(ck.manager) == host_state(orig.manager)
    assert ck.slots.snapshot() == orig.slots.snapshot() and ck.slots.free_slots() == orig.slots.free_slots()
    assert ck.slots.manager is ck.manager

    restored = Server(ck.cache, ck.manager, ck.slots)
    restored.written = {s: list(w) for s, w in orig.written.items()}
    ids_orig = continuation(orig, np.random.default_rng(1))
    ids_rest = continuation(restored, np.random.default_rng(1))
    for a, b in zip(jax.tree_util.tree_leaves(ids_orig), jax.tree_util.tree_leaves(ids_rest)):
        assert np.array_equal(a, b)  # the same block ids handed out, in the same order
    restored.manager.check_integrity()
    assert restored.manager.snapshot() == orig.manager.snapshot()
    assert host_state(restored.manager) == host_state(orig.manager)
    assert restored.slots.snapshot() == orig.slots.snapshot()

    (ids_a, _, got_a), (ids_b, _, got_b) = orig.gathered(), restored.gathered()
    assert ids_a == ids_b
    for (ka, va), (kb, vb) in zip(got_a, got_b):
        assert ka.tobytes() == kb.tobytes() and va.tobytes() == vb.tobytes()
    restored.check_written()
    for a, b in zip(storage_bits(orig.cache), storage_bits(restored.cache)):
        assert a.tobytes() == b.tobytes()


def test_without_slots_and_onto_a_device(tmp_path):
    spec = make_spec(dtype="bfloat16")
    manager = KVCacheManager(spec)
    manager.admit(5, 6)
    cache = PagedKVCache.init(spec)
    pk.save_checkpoint(str(tmp_path / "plain"), cache, manager)  # a str path, no suffix appended
    ck = pk.load_checkpoint(tmp_path / "plain", device=jax.devices()[0])
    assert ck.slots is None and ck.manager.snapshot() == manager.snapshot()
    assert all(leaf.devices() == {jax.devices()[0]} for leaf in jax.tree_util.tree_leaves(ck.cache))
    assert ck.manager.admit(6, 1).tolist() == manager.admit(6, 1).tolist()


def test_save_overwrites_atomically(tmp_path):
    spec = make_spec()
    manager = KVCacheManager(spec)
    cache = PagedKVCache.init(spec)
    path = tmp_path / "ck.npz"
    pk.save_checkpoint(path, cache, manager)
    manager.admit(1, 9)
    pk.save_checkpoint(path, cache, manager)
    assert os.listdir(tmp_path) == ["ck.npz"]
    assert pk.load_checkpoint(path).manager.snapshot() == manager.snapshot()


class _OtherProcessShards:
    """Stands in for a page array sharded over two processes' devices (one process
    cannot build a real one): what `save_checkpoint` asks of it, from process 0's side."""

    def __init__(self, leaf):
        self.shape, self.dtype = leaf.shape, leaf.dtype
        device = type("Device", (), {"process_index": 1})()
        self.sharding = type("Sharding", (), {"device_set": {next(iter(leaf.devices())), device}})()

    is_fully_addressable = False

    def is_deleted(self) -> bool:
        return False


def test_save_of_pages_other_processes_hold_is_a_checkpoint_error(tmp_path):
    """A cache sharded over several processes (`paged_kv.multihost`): no process can fetch
    it whole. Refused before anything is fetched or written, naming the sharded save;
    jax itself would raise a bare RuntimeError from the fetch."""
    spec = make_spec()
    manager = KVCacheManager(spec)
    manager.admit(1, 5)
    leaves, treedef = jax.tree_util.tree_flatten(PagedKVCache.init(spec))
    leaves[0] = _OtherProcessShards(leaves[0])
    cache = jax.tree_util.tree_unflatten(treedef, leaves)
    before = manager.snapshot()
    with pytest.raises(CheckpointError, match=r"layer0\.key_pages is sharded over the devices of processes \[0, 1\]"
                       r".*save_sharded_checkpoint"):
        pk.save_checkpoint(tmp_path / "ck", cache, manager)
    assert os.listdir(tmp_path) == [] and manager.snapshot() == before


# ---- corrupt files -------------------------------------------------------------------------
@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A small checkpoint with real writes: (path, spec)."""
    spec = make_spec(dtype="bfloat16")
    server = Server.fresh(spec, "split")
    history(server, np.random.default_rng(2))
    path = tmp_path_factory.mktemp("saved") / "ck.npz"
    pk.save_checkpoint(path, server.cache, server.manager, server.slots)
    return path, spec


def rewrite(src, dst, *, drop=(), replace=None, edit_header=None, redigest=False):
    """Write a modified copy of checkpoint ``src`` to ``dst`` that np.load still opens.

    ``redigest=False`` keeps the old digests (simulates corruption); True recomputes them
    (simulates a buggy writer, which only the semantic checks can catch).
    """
    with np.load(src) as z:
        arrays = {k: z[k] for k in z.files}
    for k in drop:
        del arrays[k]
    arrays.update(replace or {})
    header = json.loads(arrays["header"].tobytes())
    if edit_header:
        edit_header(header)
    if redigest:
        for entry in header["arrays"]:
            a = arrays[entry["name"]]
            entry.update(shape=list(a.shape), dtype=a.dtype.str, sha256=ckpt._sha256(a))
    header_bytes = json.dumps(header, sort_keys=True).encode()
    arrays["header"] = np.frombuffer(header_bytes, np.uint8)
    if redigest:
        arrays["digest"] = np.frombuffer(hashlib.sha256(header_bytes).hexdigest().encode(), np.uint8)
    with open(dst, "wb") as f:
        np.savez(f, **arrays)
    return dst


def load_error(path, **kw) -> str:
    with pytest.raises(CheckpointError) as info:
        pk.load_checkpoint(path, **kw)
    assert str(path) in str(info.value), "the message must name the file"
    assert isinstance(info.value, ValueError) and isinstance(info.value, pk.PagedKVError)
    return str(info.value)


def test_missing_file(tmp_path):
    assert "does not exist" in load_error(tmp_path / "nope.npz")


def test_not_an_npz(tmp_path, saved):
    garbage = tmp_path / "garbage.npz"
    garbage.write_bytes(b"definitely not a zip file" * 10)
    assert "not a readable .npz" in load_error(garbage)
    empty = tmp_path / "empty.npz"
    empty.write_bytes(b"")
    assert "not a readable .npz" in load_error(empty)
    truncated = tmp_path / "truncated.npz"
    data = saved[0].read_bytes()
    truncated.write_bytes(data[: len(data) // 2])
    assert "not a readable .npz" in load_error(truncated)
    npy = tmp_path / "single.npy"
    np.save(npy, np.zeros(3))
    assert "single .npy" in load_error(npy)
    other = tmp_path / "other.npz"
    np.savez(other, x=np.zeros(3))
    assert "lacks arrays ['header', 'digest']" in load_error(other)


def test_missing_array(tmp_path, saved):
    path = rewrite(saved[0], tmp_path / "ck.npz", drop=["layer1.value_pages"])
    assert "lacks arrays ['layer1.value_pages']" in load_error(path)


def test_array_digest_mismatch(tmp_path, saved):
    with np.load(saved[0]) as z:
        pages = z["layer0.key_pages"].copy()
    pages[1, 0, 0, 0] ^= 1  # one bit of one stored bfloat16 in a used block
    path = rewrite(saved[0], tmp_path / "ck.npz", replace={"layer0.key_pages": pages})
    assert "digest mismatch in array 'layer0.key_pages'" in load_error(path)


def test_header_digest_mismatch(tmp_path, saved):
    def edit(h):
        h["spec"]["max_batch_slots"] = 16

    path = rewrite(saved[0], tmp_path / "ck.npz", edit_header=edit)
    assert "header digest mismatch" in load_error(path)


def test_flipped_byte_in_the_file(tmp_path, saved):
    """A raw byte flip inside an array's stored bytes: the zip CRC catches it on read."""
    with zipfile.ZipFile(saved[0]) as zf:
        info = zf.getinfo("layer0.key_pages.npy")
    raw = bytearray(saved[0].read_bytes())
    n_name, n_extra = struct.unpack("<HH", raw[info.header_offset + 26 : info.header_offset + 30])
    raw[info.header_offset + 30 + n_name + n_extra + info.file_size - 3] ^= 0x10
    path = tmp_path / "ck.npz"
    path.write_bytes(bytes(raw))
    msg = load_error(path)
    assert "'layer0.key_pages'" in msg and ("cannot be read" in msg or "digest mismatch" in msg)


def test_unknown_version(tmp_path, saved):
    path = rewrite(saved[0], tmp_path / "ck.npz", edit_header=lambda h: h.update(version=99), redigest=True)
    msg = load_error(path)
    assert "format version 99" in msg and f"reads version {ckpt.FORMAT_VERSION}" in msg


def test_page_shapes_that_do_not_match_the_spec(tmp_path, saved):
    with np.load(saved[0]) as z:
        pages = z["layer1.value_pages"][:-1]
    path = rewrite(saved[0], tmp_path / "ck.npz", replace={"layer1.value_pages": pages}, redigest=True)
    msg = load_error(path)
    assert "layer1.value_pages is (31, 4, 2, 8) uint16" in msg and "needs (32, 4, 2, 8) uint16" in msg


def test_expected_spec_differs(saved):
    path, spec = saved
    msg = load_error(path, spec=attrs.evolve(spec, num_blocks=64, dtype="float32"))
    assert "checkpoint vs expected: num_blocks=32 vs 64" in msg and "dtype='bfloat16' vs 'float32'" in msg
    assert pk.load_checkpoint(path, spec=spec).spec == spec


def test_inconsistent_allocator_state(tmp_path, saved):
    """A digest-consistent file whose ref counts disagree with the tables (a writer bug)."""
    with np.load(saved[0]) as z:
        refs = z["group0.pool.ref_counts"].copy()
    refs[refs.argmax()] += 1
    path = rewrite(saved[0], tmp_path / "ck.npz", replace={"group0.pool.ref_counts": refs}, redigest=True)
    msg = load_error(path)
    assert "group0.pool.ref_counts: block" in msg and "table entries" in msg


# ---- refused saves -------------------------------------------------------------------------
def assert_save_refused(path, *args, match: str) -> None:
    before = path.read_bytes() if path.exists() else None
    with pytest.raises(CheckpointError, match=match):
        pk.save_checkpoint(path, *args)
    assert (path.read_bytes() if path.exists() else None) == before  # untouched
    assert [p for p in os.listdir(path.parent) if p.endswith(".tmp")] == []


def test_save_refuses_mismatched_or_foreign_state(tmp_path, saved):
    spec = saved[1]
    manager = KVCacheManager(spec)
    manager.admit(1, 3)
    cache = PagedKVCache.init(spec)
    path = tmp_path / "ck.npz"
    path.write_bytes(saved[0].read_bytes())  # an existing checkpoint that must survive

    other = attrs.evolve(spec, num_blocks=16)
    assert_save_refused(path, PagedKVCache.init(other), manager, match=r"manager vs cache: num_blocks=32 vs 16")
    assert_save_refused(path, cache, manager, DecodeSlots(KVCacheManager(spec)), match="belong to another")
    assert_save_refused(tmp_path / "fresh.npz", cache, manager, DecodeSlots(KVCacheManager(spec)),
                        match="belong to another")

    manager.future_state = {}  # state this module does not know about: refuse rather than drop it
    assert_save_refused(path, cache, manager, match=r"KVCacheManager has state .*\['future_state'\]")
    del manager.future_state

    donated = _write(cache, *Server(cache, manager, None)._kv(np.random.default_rng(0), 1, 1),
                     manager.step_metadata([1], 1))
    assert_save_refused(path, cache, manager, match="donated")
    pk.save_checkpoint(path, donated, manager)  # the cache the step returned is fine
    with pytest.raises(CheckpointError, match="does not exist; create it first"):
        pk.save_checkpoint(tmp_path / "no_dir" / "ck.npz", donated, manager)


def test_failed_write_leaves_the_old_file(tmp_path, saved, monkeypatch):
    spec = saved[1]
    manager = KVCacheManager(spec)
    cache = PagedKVCache.init(spec)
    path = tmp_path / "ck.npz"
    path.write_bytes(saved[0].read_bytes())

    def disk_full(f, arrays):
        f.write(b"PK\x03\x04 half a checkpoint")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(ckpt_files, "write_npz", disk_full)
    assert_save_refused(path, cache, manager, match="No space left on device.*unchanged")

    def interrupted(f, arrays):
        f.write(b"PK\x03\x04")
        raise KeyboardInterrupt

    monkeypatch.setattr(ckpt_files, "write_npz", interrupted)
    with pytest.raises(KeyboardInterrupt):
        pk.save_checkpoint(path, cache, manager)
    assert path.read_bytes() == saved[0].read_bytes() and os.listdir(tmp_path) == ["ck.npz"]
    assert pk.load_checkpoint(path).manager.snapshot() != manager.snapshot()  # still the old checkpoint


def test_save_refuses_pending_copy_on_write(tmp_path):
    spec = pk.CacheSpec(num_layers=1, num_blocks=8, block_size=4, max_blocks_per_seq=4, num_kv_heads=1,
                        head_dim=2, dtype="float32")
    m = pk.KVCacheManager(spec)
    cache = pk.PagedKVCache.init(spec)
    m.admit(0, 3)
    m.fork(0, 1)
    m.append([1], 1)
    with pytest.raises(pk.CheckpointError, match="1 copy-on-write block copies are pending"):
        pk.save_checkpoint(tmp_path / "c.npz", cache, m)
    assert not (tmp_path / "c.npz").exists()
    m.step_metadata([1], 1)  # the step carries the copy, but it may not have run yet
    with pytest.raises(pk.CheckpointError, match="1 copy-on-write block copies are pending"):
        pk.save_checkpoint(tmp_path / "c.npz", cache, m)
    m.commit([1])  # the step ran
    pk.save_checkpoint(tmp_path / "c.npz", cache, m)
    restored = pk.load_checkpoint(tmp_path / "c.npz")
    assert restored.manager.snapshot() == m.snapshot()


def test_prefix_cache_round_trip(tmp_path):
    """Cached chains, their LRU order and the counters survive; the restored manager
    hits, evicts and keys blocks exactly like the original."""
    spec = pk.CacheSpec(num_layers=1, num_blocks=20, block_size=4, max_blocks_per_seq=8, num_kv_heads=1,
                        head_dim=2, dtype="float32")
    cache = pk.PagedKVCache.init(spec)
    m = pk.KVCacheManager(spec, prefix_cache=True)
    m.admit_prompt(0, np.arange(13))
    m.commit([0], 13)  # written: its full blocks become hittable
    m.admit_prompt(1, np.arange(100, 109))
    m.commit([1], 9)
    m.admit_prompt(2, np.arange(13))  # a hit
    m.release(0)
    m.release(1)
    pk.save_checkpoint(tmp_path / "c.npz", cache, m)
    r = pk.load_checkpoint(tmp_path / "c.npz").manager
    assert r.snapshot() == m.snapshot()
    assert r.prefix_cache.stats() == m.prefix_cache.stats()
    for mgr in (m, r):  # the same continuation: eviction order, hits and new keys
        mgr.admit(5, 32)
        mgr.admit(7, 24)  # 14 blocks: the 13 free ones, then the least recent cached one (seq 1's tail)
        assert mgr.prefix_cache.stats().blocks_evicted == 1
        mgr.release(7)
        assert mgr.admit_prompt(6, np.arange(100, 109)) == 4  # the chain's head is still cached
        mgr.commit([5], 32)
        mgr.cache_tokens(5, np.arange(300, 332))
    assert r.snapshot() == m.snapshot() and r.prefix_cache.stats() == m.prefix_cache.stats()
    r.check_integrity()


def test_uncommitted_prompt_keys_round_trip(tmp_path):
    """A prompt admitted but not yet written is saved as such: after the restore its
    blocks are not hittable, and committing its step keys them as it would have."""
    spec = pk.CacheSpec(num_layers=1, num_blocks=20, block_size=4, max_blocks_per_seq=8, num_kv_heads=1,
                        head_dim=2, dtype="float32")
    m = pk.KVCacheManager(spec, prefix_cache=True)
    m.admit_prompt(0, np.arange(13), chunk=6)  # chunked prefill: 6 tokens held
    m.commit([0], 6)  # one full block written
    pk.save_checkpoint(tmp_path / "c.npz", pk.PagedKVCache.init(spec), m)
    r = pk.load_checkpoint(tmp_path / "c.npz").manager
    assert r.snapshot() == m.snapshot()
    for mgr in (m, r):
        assert not mgr.can_admit_prompt(np.arange(13)) or mgr.admit_prompt(1, np.arange(13)) == 4
        mgr.append([0], 7)  # the rest of the prompt
        mgr.commit([0], 13)
        assert mgr.admit_prompt(2, np.arange(13)) == 12
    assert r.snapshot() == m.snapshot() and r.prefix_cache.stats() == m.prefix_cache.stats()


# ---- files of earlier format versions ------------------------------------------------------
OLD = os.path.join(os.path.dirname(__file__), "fixtures", "checkpoints")


def _old(name: str):
    with open(os.path.join(OLD, "expected.json")) as f:
        return pk.load_checkpoint(os.path.join(OLD, f"{name}.npz")), json.load(f)[name]


def test_version_2_hybrid_with_slots_loads_and_continues():
    """Written by the single-class manager (tests/fixtures/checkpoints/make_fixtures.py): the
    restored allocator hands out the block ids the writer's process handed out next."""
    ck, want = _old("v2_hybrid_slots")
    m = ck.manager
    assert m.seq_ids == want["seq_ids"] and [m.kv_len(s) for s in m.seq_ids] == want["kv_lens"]
    assert {str(s): [m.block_table(s, g).tolist() for g in range(2)] for s in m.seq_ids} == want["tables"]
    assert list(ck.slots.seq_ids) == want["slots"]
    keys, _ = ck.cache[0].read(m.step_metadata([3], 0).to_device())
    assert np.allclose(np.asarray(keys)[0, :7, 0], want["seq3_layer0_keys"])
    assert m.admit(9, 6).tolist() == want["next_admit"]
    assert m.append([3, 5], [2, 5]).tolist() == want["next_append"]
    m.check_integrity()


@pytest.mark.parametrize("name", ["v2_prefix", "v1_prefix"])
def test_prefix_checkpoints_of_versions_1_and_2_load_and_hit(name):
    ck, want = _old(name)
    m = ck.manager
    assert m.seq_ids == want["seq_ids"]
    assert m.admit_prompt(6, np.arange(100, 109)) == want["hit_100"]
    assert m.block_table(6).tolist() == want["table_6"]
    if name == "v1_prefix":  # version 1 kept no written state: its keys were all committed
        assert m.admit_prompt(7, np.arange(13)) == want["hit_13"]
    else:  # version 2: the uncommitted chunk of seq 4 is not hittable until it is committed
        assert m.admit_prompt(7, np.arange(200, 213)) == want["hit_200_before_commit"]
        m.append([4], 7)
        m.commit([4], 13)
        assert m.admit_prompt(8, np.arange(200, 213)) == want["hit_200_after_commit"]
    assert m.admit(9, 5).tolist() == want["next_admit"]
    m.check_integrity()


def test_hybrid_prefix_cache_round_trip(tmp_path):
    """Each layer group's cache (keys, both eviction tiers in order, counters) survives; the
    restored manager hits, evicts and keys exactly like the original."""
    spec = pk.CacheSpec(num_layers=2, num_blocks=24, block_size=4, max_blocks_per_seq=10, num_kv_heads=1,
                        head_dim=2, dtype="float32", sliding_window=6, sliding_layers=(1,), sliding_num_blocks=12)
    m = pk.KVCacheManager(spec, prefix_cache=True)
    m.admit_prompt(0, np.arange(9))
    m.commit([0], 9)
    m.append([0], 12)  # the window sheds keyed blocks (the behind tier)
    m.commit([0], 21)
    m.cache_tokens(0, np.arange(21))
    m.admit_prompt(1, np.arange(100, 113), chunk=6)  # a chunk committed, the rest not yet written
    m.commit([1], 6)
    m.release(0)  # its window tail waits in the cache
    sliding = m.groups[1].cache
    assert sliding.behind and sliding.evictable
    pk.save_checkpoint(tmp_path / "c.npz", pk.PagedKVCache.init(spec), m)
    r = pk.load_checkpoint(tmp_path / "c.npz").manager
    assert r.snapshot() == m.snapshot()
    assert [g.cache.stats() for g in r.groups] == [g.cache.stats() for g in m.groups]
    for mgr in (m, r):
        assert mgr.admit_prompt(2, np.arange(23)) == 20  # the conversation's next turn
        mgr.append([1], 7)
        mgr.commit([1], 13)
        mgr.admit(3, 4 * 4)  # the sliding pool evicts: the behind tier first
    assert sliding.stats().blocks_evicted > 0 and r.snapshot() == m.snapshot()
    assert [g.cache.stats() for g in r.groups] == [g.cache.stats() for g in m.groups]
    r.check_integrity()
