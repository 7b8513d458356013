"""Bad input across the public API: a typed error naming the bad value, and nothing changed.

One table, one test. Each case runs against a fresh environment (a manager holding
seq 1 (5 tokens) and seq 2 (3 tokens), decode slots with seq 1 in slot 0, a split and
a unified cache) and asserts:
(a) the exact `PagedKVError` subclass (not a builtin, not a parent class),
(b) a regex showing the message names the offending value,
(c) the manager and slot snapshots are unchanged, and every page array of both
    caches is still alive (not donated) and bit-identical: the call raised before
    any device write.
"""

from __future__ import annotations

import types
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import paged_kv as pk
from paged_kv import DecodeSlots
from paged_kv.insertion import insert_prefill, insert_prefill_slot
from paged_kv.sim.trace import load_trace

BASE = dict(num_layers=2, num_blocks=17, block_size=4, max_blocks_per_seq=6, max_batch_slots=4,
            num_kv_heads=2, head_dim=4, dtype="float32", sliding_window=8, sliding_layers=(1,))
H, D = 2, 4
HEADER = "TIMESTAMP,ContextTokens,GeneratedTokens\n"
ROW = "2023-11-16 18:15:46.6805900,374,44\n"


def make_spec(**kw) -> pk.CacheSpec:
    return pk.CacheSpec(**{**BASE, **kw})


def make_env(tmp_path) -> types.SimpleNamespace:
    spec = make_spec()
    m = pk.KVCacheManager(spec)
    m.admit(1, 5)
    m.admit(2, 3)
    slots = DecodeSlots(m)
    slots.insert(1, 0)
    meta = m.step_metadata([1, 2], [5, 3])  # B=2, T=8
    pm = pk.KVCacheManager(make_spec(sliding_window=None, sliding_layers=()), prefix_cache=True)
    pm.admit_prompt(1, np.arange(5))
    return types.SimpleNamespace(
        spec=spec, m=m, slots=slots, meta=meta, B=meta.batch_size, T=meta.query_len, tmp=tmp_path, pm=pm,
        cache=pk.PagedKVCache.init(spec), ucache=pk.PagedKVCache.init(spec, layout="unified"),
    )


def kv(length, heads=H, dim=D, dtype=np.float32, layers=2):
    return np.ones((layers, length, heads, dim), dtype)


def step_kv(e, heads=H, dim=D, dtype=jnp.float32, t_extra=0):
    return jnp.ones((e.B, e.T + t_extra, heads, dim), dtype)


def csv(e, text: str) -> str:
    path = e.tmp / "trace.csv"
    path.write_text(text)
    return str(path)


# ---- setups ---------------------------------------------------------------------------------
def fill_pool(e):
    """Leave 1 free block in each group: 2 + 1 + 6 + 6 of 16 usable blocks held."""
    e.m.admit(3, 24)
    e.m.admit(4, 24)


def admit_three_more(e):
    for s in (3, 4, 5):
        e.m.admit(s, 1)


@partial(jax.jit, donate_argnums=0)
def _jit_concat(view, key, value, meta):
    return view.concatenate_to_cache(None, key, value, meta)


def C(id, call, error, match, setup=None):
    return pytest.param(setup, call, error, match, id=id)


def record(e, seq_id=9, num_tokens=5, firsts=(0, 0), sizes=(2, 2)):
    """A hand-built `SwapRecord` (untrusted: the manager must check every field)."""
    return pk.SwapRecord(seq_id, num_tokens, tuple(firsts), tuple(np.arange(n, dtype=np.int32) for n in sizes))


def foreign_record(e):
    """A genuine record from a manager of another spec (full attention only: one group)."""
    other = pk.KVCacheManager(make_spec(sliding_window=None, sliding_layers=()))
    other.admit(9, 5)
    return other.swap_out(9)


def full_only_metadata(e):
    """Metadata from a manager with no sliding group, for a cache that has one."""
    other = pk.KVCacheManager(make_spec(sliding_window=None, sliding_layers=()))
    other.admit(1, 5)
    other.admit(2, 3)
    return other.step_metadata([1, 2], [5, 3])


def bigger_pool_metadata(e):
    other = pk.KVCacheManager(make_spec(num_blocks=64, sliding_num_blocks=64))
    other.admit(1, 5)
    other.admit(2, 3)
    return other.step_metadata([1, 2], [5, 3])


def query(e, heads=H, dim=D, dtype=jnp.float32, t_extra=0):
    return jnp.ones((e.B, e.T + t_extra, heads, dim), dtype)


def flip_zip_flag(e) -> str:
    """A saved checkpoint with one general-purpose flag bit (bit 0: "encrypted") set in
    its zip central directory."""
    path = e.tmp / "flag.ckpt"
    pk.save_checkpoint(path, e.cache, e.m, e.slots)
    data = bytearray(path.read_bytes())
    central = data.find(b"PK\x01\x02")
    data[central + 8] |= 1
    path.write_bytes(bytes(data))
    return str(path)


CASES = [
    # ---- KVCacheManager: sequence ids ---------------------------------------------------------
    C("release-unknown-id", lambda e: e.m.release(42), pk.UnknownSequenceError, r"seq_id=42 is not admitted"),
    C("append-unknown-id", lambda e: e.m.append([1, 42], 1), pk.UnknownSequenceError, r"seq_id=42"),
    C("block-table-unknown-id", lambda e: e.m.block_table(7), pk.UnknownSequenceError, r"seq_id=7"),
    C("admit-duplicate", lambda e: e.m.admit(1, 2), pk.DuplicateSequenceError, r"seq_id=1 is already admitted"),
    C("append-duplicate-id-in-one-call", lambda e: e.m.append([1, 2, 1], 1), pk.DuplicateSequenceError,
      r"seq_id=1 appears twice"),
    C("release-twice", lambda e: e.m.release(2), pk.UnknownSequenceError, r"seq_id=2 is not admitted",
      setup=lambda e: e.m.release(2)),
    C("admit-str-id", lambda e: e.m.admit("a", 2), pk.InvalidSequenceIdError, r"seq_id='a' must be an integer"),
    C("admit-float-id", lambda e: e.m.admit(3.0, 2), pk.InvalidSequenceIdError, r"seq_id=3\.0 must be an integer"),
    C("admit-None-id", lambda e: e.m.admit(None, 2), pk.InvalidSequenceIdError, r"seq_id=None must be an integer"),
    # True == 1 and hash(True) == hash(1): must be rejected, never aliased to seq 1.
    C("admit-bool-id", lambda e: e.m.admit(True, 2), pk.InvalidSequenceIdError, r"seq_id=True must be an integer"),
    C("release-bool-id", lambda e: e.m.release(True), pk.UnknownSequenceError, r"seq_id=True .*integers, not bool"),
    C("release-float-id", lambda e: e.m.release(1.0), pk.UnknownSequenceError, r"seq_id=1\.0 .*not float"),
    C("release-str-id", lambda e: e.m.release("1"), pk.UnknownSequenceError, r"seq_id='1'"),
    C("append-bool-id", lambda e: e.m.append([2, True], 1), pk.UnknownSequenceError, r"seq_id=True"),
    C("append-numpy-float-ids", lambda e: e.m.append(np.array([1.0, 2.0]), 1), pk.UnknownSequenceError,
      r"seq_id=(np\.float64\()?1\.0"),
    C("kv-len-bool-id", lambda e: e.m.kv_len(True), pk.UnknownSequenceError, r"seq_id=True"),
    C("step-metadata-bool-id", lambda e: e.m.step_metadata([True], 1), pk.UnknownSequenceError, r"seq_id=True"),
    C("admit-negative-id", lambda e: e.m.admit(-1, 2), pk.InvalidSequenceIdError, r"seq_id=-1 must be >= 0"),
    C("append-bare-id", lambda e: e.m.append(1, 1), pk.UnknownSequenceError, r"seq_ids=1 must be a list"),
    C("step-metadata-bare-id", lambda e: e.m.step_metadata(2), pk.UnknownSequenceError, r"seq_ids=2 must be a list"),
    # ---- KVCacheManager: token counts ---------------------------------------------------------
    C("admit-zero-tokens", lambda e: e.m.admit(9, 0), pk.InvalidTokenCountError, r"num_tokens=0"),
    C("admit-negative-tokens", lambda e: e.m.admit(9, -3), pk.InvalidTokenCountError, r"num_tokens=-3"),
    C("admit-more-blocks-than-max", lambda e: e.m.admit(9, 25), pk.SequenceTooLongError,
      r"25 tokens needs 7 blocks > max_blocks_per_seq=6"),
    C("admit-float-tokens", lambda e: e.m.admit(9, 3.0), pk.InvalidTokenCountError, r"num_tokens=3\.0 must be an integer"),
    C("admit-bool-tokens", lambda e: e.m.admit(9, True), pk.InvalidTokenCountError, r"num_tokens=True must be an integer"),
    C("admit-numpy-float-tokens", lambda e: e.m.admit(9, np.float64(3)), pk.InvalidTokenCountError,
      r"num_tokens=(np\.float64\()?3\.0"),
    C("admit-huge-tokens", lambda e: e.m.admit(9, 2**40), pk.InvalidTokenCountError, r"num_tokens=1099511627776"),
    C("append-negative-tokens", lambda e: e.m.append([1], -2), pk.InvalidTokenCountError, r"num_tokens=-2"),
    C("append-negative-per-seq", lambda e: e.m.append([1, 2], [1, -1]), pk.InvalidTokenCountError,
      r"num_tokens=\[1, -1\]"),
    C("append-more-blocks-than-max", lambda e: e.m.append([1, 2], [1, 22]), pk.SequenceTooLongError,
      r"seq_id=2 would hold 25 tokens = 7 blocks > max_blocks_per_seq=6"),
    C("append-float-tokens", lambda e: e.m.append([1], 1.5), pk.InvalidTokenCountError, r"num_tokens=1\.5"),
    C("append-bool-tokens", lambda e: e.m.append([1], True), pk.InvalidTokenCountError, r"num_tokens=True"),
    C("append-numpy-float-tokens", lambda e: e.m.append([1], np.float32(2)), pk.InvalidTokenCountError,
      r"num_tokens=(np\.float32\()?2\.0"),
    C("append-float-per-seq", lambda e: e.m.append([1, 2], [1.0, 2.0]), pk.InvalidTokenCountError, r"dtype float64"),
    C("append-bool-per-seq", lambda e: e.m.append([1, 2], [True, False]), pk.InvalidTokenCountError, r"dtype bool"),
    C("append-counts-wrong-length", lambda e: e.m.append([1, 2], [1, 1, 1]), pk.InvalidTokenCountError,
      r"shape \(3,\) .*need 2 integers"),
    C("append-counts-ragged", lambda e: e.m.append([1, 2], [[1], [2, 3]]), pk.InvalidTokenCountError,
      r"num_tokens=\[\[1\], \[2, 3\]\]"),
    C("append-counts-uint64-overflow", lambda e: e.m.append([1], np.array([2**63 + 5], np.uint64)),
      pk.InvalidTokenCountError, r"num_tokens=\[9223372036854775813\]"),
    C("admit-out-of-blocks", lambda e: e.m.admit(9, 5), pk.OutOfBlocksError,
      r"need 2 free blocks for admit\(seq_id=9, num_tokens=5\) but only 1 are free", setup=fill_pool),
    C("append-out-of-blocks", lambda e: e.m.append([1, 2], [4, 4]), pk.OutOfBlocksError,
      r"need 2 free blocks .* but only 1 are free", setup=fill_pool),
    # ---- KVCacheManager: step metadata -------------------------------------------------------
    C("step-metadata-more-new-than-held", lambda e: e.m.step_metadata([1, 2], [1, 4]), pk.InvalidTokenCountError,
      r"seq_id=2 has 3 tokens, fewer than num_new_tokens=4"),
    C("step-metadata-batch-over-max-slots", lambda e: e.m.step_metadata([1, 2, 3, 4, 5], 1), pk.BatchTooLargeError,
      r"5 sequences in one step > max_batch_slots=4", setup=admit_three_more),
    # ---- DecodeSlots -------------------------------------------------------------------------
    C("slot-out-of-range", lambda e: e.slots.insert(2, 4), pk.SlotError, r"slot=4 is out of range \[0, 4\)"),
    C("slot-negative", lambda e: e.slots.insert(2, -1), pk.SlotError, r"slot=-1 is out of range"),
    C("slot-float", lambda e: e.slots.insert(2, 1.0), pk.SlotError, r"slot=1\.0 must be an integer"),
    C("slot-taken", lambda e: e.slots.insert(2, 0), pk.SlotError, r"slot=0 is taken by seq_id=1"),
    C("slot-insert-unknown-seq", lambda e: e.slots.insert(42, 1), pk.UnknownSequenceError, r"seq_id=42 is not admitted"),
    C("slot-insert-bool-seq", lambda e: e.slots.insert(True, 1), pk.UnknownSequenceError, r"seq_id=True"),
    C("slot-insert-already-inserted", lambda e: e.slots.insert(1, 2), pk.DuplicateSequenceError,
      r"seq_id=1 already occupies slot 0"),
    C("slot-remove-empty", lambda e: e.slots.remove(1), pk.SlotError, r"slot=1 is empty"),
    C("slot-release-empty", lambda e: e.slots.release(3), pk.SlotError, r"slot=3 is empty"),
    C("slot-of-bool-seq", lambda e: e.slots.slot_of(True), pk.UnknownSequenceError, r"seq_id=True is in no decode slot"),
    C("slots-step-metadata-counts-wrong-length", lambda e: e.slots.step_metadata([1, 1]), pk.InvalidTokenCountError,
      r"shape \(2,\); need one count per slot \(4,\)"),
    C("slots-insert-prefill-slot-taken", lambda e: insert_prefill_slot(e.cache, e.slots, 9, kv(3), kv(3), slot=0),
      pk.SlotError, r"slot=0 is taken by seq_id=1"),
    C("slots-insert-prefill-bool-seq", lambda e: insert_prefill_slot(e.cache, e.slots, True, kv(3), kv(3), slot=1),
      pk.InvalidSequenceIdError, r"seq_id=True must be an integer"),
    C("slots-insert-prefill-unhashable-seq", lambda e: insert_prefill_slot(e.cache, e.slots, [9], kv(3), kv(3)),
      pk.InvalidSequenceIdError, r"seq_id=\[9\] must be an integer"),
    # ---- insert_prefill ----------------------------------------------------------------------
    C("prefill-wrong-dtype", lambda e: insert_prefill(e.cache, e.m, 9, kv(5, dtype=np.float16), kv(5)),
      pk.ShapeError, r"keys\[0\] has shape \(5, 2, 4\) float16; expected \[L, 2, 4\] float32"),
    C("prefill-int-dtype-unified", lambda e: insert_prefill(e.ucache, e.m, 9, kv(5), kv(5, dtype=np.int32)),
      pk.ShapeError, r"values\[0\] has shape \(5, 2, 4\) int32"),
    C("prefill-wrong-heads", lambda e: insert_prefill(e.cache, e.m, 9, kv(5, heads=3), kv(5)),
      pk.ShapeError, r"keys\[0\] has shape \(5, 3, 4\)"),
    C("prefill-wrong-head-dim", lambda e: insert_prefill(e.cache, e.m, 9, kv(5), kv(5, dim=5)),
      pk.ShapeError, r"values\[0\] has shape \(5, 2, 5\)"),
    C("prefill-wrong-rank", lambda e: insert_prefill(e.cache, e.m, 9, np.ones((2, 5, 8), np.float32), kv(5)),
      pk.ShapeError, r"keys is one array of shape \(2, 5, 8\)"),
    C("prefill-wrong-num-layers", lambda e: insert_prefill(e.cache, e.m, 9, kv(5, layers=1), kv(5, layers=1)),
      pk.ShapeError, r"keys is one array of shape \(1, 5, 2, 4\)"),
    C("prefill-key-value-length-mismatch", lambda e: insert_prefill(e.cache, e.m, 9, kv(5), kv(6)),
      pk.ShapeError, r"keys hold L=5 tokens but values hold L=6"),
    C("prefill-layer-lengths-differ", lambda e: insert_prefill(e.cache, e.m, 9, [kv(5)[0], kv(4)[0]], kv(5)),
      pk.ShapeError, r"keys\[1\] has shape \(4, 2, 4\)"),
    C("prefill-zero-length", lambda e: insert_prefill(e.cache, e.m, 9, kv(0), kv(0)),
      pk.InvalidTokenCountError, r"seq_id=9\) got L=0"),
    C("prefill-longer-than-max-seq-len", lambda e: insert_prefill(e.cache, e.m, 9, kv(25), kv(25)),
      pk.SequenceTooLongError, r"L=25 tokens > max_seq_len=24"),
    # seq 1 is held with 5 tokens; a 7-token prefill of it must not overwrite or re-admit it.
    C("prefill-seq-held-with-other-length", lambda e: insert_prefill(e.cache, e.m, 1, kv(7), kv(7)),
      pk.DuplicateSequenceError, r"seq_id=1 is already admitted"),
    C("prefill-out-of-blocks", lambda e: insert_prefill(e.cache, e.m, 9, kv(5), kv(5)), pk.OutOfBlocksError,
      r"need 2 free blocks .*only 1 are free", setup=fill_pool),
    C("prefill-cache-spec-differs-from-manager",
      lambda e: insert_prefill(pk.PagedKVCache.init(make_spec(num_blocks=20)), e.m, 9, kv(5), kv(5)),
      pk.SpecError, r"num_blocks=17 vs 20"),
    C("prefill-cache-spec-differs-only-in-batch-slots",
      lambda e: insert_prefill(pk.PagedKVCache.init(make_spec(max_batch_slots=8)), e.m, 9, kv(5), kv(5)),
      pk.SpecError, r"max_batch_slots=4 vs 8"),
    C("prefill-not-a-cache", lambda e: insert_prefill(e.cache.views, e.m, 9, kv(5), kv(5)),
      pk.ShapeError, r"cache is a tuple"),
    # ---- views: write / concatenate_to_cache (shapes and dtypes are static: trace time) -------
    C("view-write-int-keys", lambda e: e.cache[0].write(step_kv(e, dtype=jnp.int32), step_kv(e), e.meta),
      pk.ShapeError, r"keys have dtype int32"),
    C("view-write-wrong-heads", lambda e: e.cache[0].write(step_kv(e, heads=3), step_kv(e), e.meta),
      pk.ShapeError, r"keys have shape \(2, 8, 3, 4\); expected \(2, 8, 2, 4\)"),
    C("view-concat-key-value-lengths-differ",
      lambda e: e.cache[0].concatenate_to_cache(None, step_kv(e), step_kv(e, t_extra=1), e.meta),
      pk.ShapeError, r"values have shape \(2, 9, 2, 4\)"),
    C("sliding-view-concat-wrong-head-dim-jit",
      lambda e: _jit_concat(e.cache[1], step_kv(e), step_kv(e, dim=5), e.meta.to_device()),
      pk.ShapeError, r"layer 1: values have shape \(2, 8, 2, 5\)"),
    C("unified-view-concat-wrong-heads-jit",
      lambda e: _jit_concat(e.ucache[0], step_kv(e, heads=1), step_kv(e), e.meta.to_device()),
      pk.ShapeError, r"keys have shape \(2, 8, 1, 4\)"),
    C("unified-view-write-bool-values", lambda e: e.ucache[1].write(step_kv(e), step_kv(e, dtype=bool), e.meta),
      pk.ShapeError, r"values have dtype bool"),
    # ---- CacheSpec ---------------------------------------------------------------------------
    C("spec-window-smaller-than-block", lambda e: make_spec(sliding_window=3), pk.SpecError,
      r"sliding_window=3 is smaller than block_size=4"),
    C("spec-window-zero", lambda e: make_spec(sliding_window=0), pk.SpecError, r"sliding_window=0"),
    C("spec-num-blocks-1", lambda e: make_spec(num_blocks=1, max_blocks_per_seq=1), pk.SpecError, r"num_blocks=1"),
    C("spec-max-blocks-over-usable", lambda e: make_spec(max_blocks_per_seq=17), pk.SpecError,
      r"max_blocks_per_seq=17 exceeds the 16 usable blocks"),
    C("spec-unknown-dtype", lambda e: make_spec(dtype="float99"), pk.SpecError, r"dtype='float99' is not a dtype"),
    C("spec-integer-dtype", lambda e: make_spec(dtype="int8"), pk.SpecError, r"dtype='int8' is not a floating"),
    C("spec-None-dtype", lambda e: make_spec(dtype=None), pk.SpecError, r"dtype=None"),
    # ---- swap_in: a SwapRecord is untrusted input --------------------------------------------
    C("swap-in-not-a-record", lambda e: e.m.swap_in({"seq_id": 9}), pk.InvalidArgumentError, r"got dict"),
    C("swap-in-str-id", lambda e: e.m.swap_in(record(e, seq_id="9")), pk.InvalidSequenceIdError, r"seq_id='9'"),
    C("swap-in-negative-id", lambda e: e.m.swap_in(record(e, seq_id=-1)), pk.InvalidSequenceIdError, r"seq_id=-1"),
    C("swap-in-bool-id", lambda e: e.m.swap_in(record(e, seq_id=True)), pk.InvalidSequenceIdError, r"seq_id=True"),
    C("swap-in-zero-tokens", lambda e: e.m.swap_in(record(e, num_tokens=0, sizes=(0, 0))), pk.InvalidTokenCountError,
      r"num_tokens=0"),
    C("swap-in-float-tokens", lambda e: e.m.swap_in(record(e, num_tokens=3.5)), pk.InvalidTokenCountError,
      r"num_tokens=3\.5"),
    C("swap-in-too-long", lambda e: e.m.swap_in(record(e, num_tokens=25, sizes=(7, 7))), pk.SequenceTooLongError,
      r"25 tokens need 7 blocks"),
    C("swap-in-full-group-first-block", lambda e: e.m.swap_in(record(e, num_tokens=20, firsts=(2, 0), sizes=(3, 5))),
      pk.InvalidArgumentError, r"first_blocks\[0\]=2 is impossible .*full-attention group starts at block 0"),
    C("swap-in-sliding-first-block-inside-window",
      lambda e: e.m.swap_in(record(e, num_tokens=20, firsts=(0, 4), sizes=(5, 1))),
      pk.InvalidArgumentError, r"first_blocks\[1\]=4 .*window of 8 keeps every block from 3 on"),
    C("swap-in-negative-first-block", lambda e: e.m.swap_in(record(e, firsts=(0, -1))),
      pk.InvalidArgumentError, r"first_blocks\[1\]=-1"),
    C("swap-in-block-count-mismatch", lambda e: e.m.swap_in(record(e, sizes=(2, 3))), pk.InvalidArgumentError,
      r"blocks\[1\] must be .* of 2 block ids"),
    C("swap-in-groups-mismatch", lambda e: e.m.swap_in(record(e, firsts=(0,), sizes=(2,))), pk.InvalidArgumentError,
      r"first_blocks=\(0,\) needs one entry per layer group \(2\)"),
    C("swap-in-record-of-another-spec", lambda e: e.m.swap_in(foreign_record(e)), pk.InvalidArgumentError,
      r"another spec"),
    C("device-swap-in-record-of-another-spec",
      lambda e: pk.swap_in(e.cache, e.m, pk.SwappedSequence(foreign_record(e), ())), pk.InvalidArgumentError,
      r"another spec"),
    C("device-swap-in-not-swapped", lambda e: pk.swap_in(e.cache, e.m, "seq"), pk.InvalidArgumentError, r"got str"),
    C("swap-in-duplicate", lambda e: e.m.swap_in(record(e, seq_id=1)), pk.DuplicateSequenceError, r"seq_id=1"),
    C("swap-out-slotted", lambda e: e.m.swap_out(1), pk.SlotError, r"decode slot 0"),
    # ---- groups, slots and commit ------------------------------------------------------------
    C("block-table-group-out-of-range", lambda e: e.m.block_table(1, group=5), pk.InvalidArgumentError, r"group=5"),
    C("block-table-group-negative", lambda e: e.m.block_table(1, group=-1), pk.InvalidArgumentError, r"group=-1"),
    C("block-table-group-float", lambda e: e.m.block_table(1, group=0.0), pk.InvalidArgumentError, r"group=0\.0"),
    C("block-table-group-bool", lambda e: e.m.block_table(1, group=True), pk.InvalidArgumentError, r"group=True"),
    C("release-slotted", lambda e: e.m.release(1), pk.SlotError, r"release\(seq_id=1\): it occupies decode slot 0"),
    C("second-slots-same-seq", lambda e: DecodeSlots(e.m).insert(1, 0), pk.DuplicateSequenceError,
      r"seq_id=1 already occupies a slot of another DecodeSlots"),
    C("slots-over-a-dict", lambda e: DecodeSlots({}), pk.SpecError, r"needs a KVCacheManager; got dict"),
    C("commit-unknown-id", lambda e: e.m.commit([1, 42]), pk.UnknownSequenceError, r"seq_id=42"),
    C("commit-more-than-held", lambda e: e.m.commit([2], 4), pk.InvalidTokenCountError,
      r"commit\(seq_id=2, num_tokens=4\): it holds only 3"),
    C("commit-bare-id", lambda e: e.m.commit(1), pk.UnknownSequenceError, r"seq_ids=1 must be a list"),
    # ---- views: the query and the metadata ----------------------------------------------------
    C("view-int-query", lambda e: e.cache[0].concatenate_to_cache(query(e, dtype=jnp.int32), step_kv(e), step_kv(e),
                                                                 e.meta), pk.ShapeError, r"query has dtype int32"),
    C("view-query-wrong-dim", lambda e: e.cache[0].concatenate_to_cache(query(e, dim=5), step_kv(e), step_kv(e), e.meta),
      pk.ShapeError, r"query has shape \(2, 8, 2, 5\)"),
    C("view-query-heads-not-multiple", lambda e: e.ucache[0].concatenate_to_cache(query(e, heads=3), step_kv(e),
                                                                                 step_kv(e), e.meta),
      pk.ShapeError, r"multiple of the 2 key heads"),
    C("view-query-wrong-length-jit",
      lambda e: jax.jit(lambda v, q, k, m: v.concatenate_to_cache(q, k, k, m))(e.cache[1], query(e, t_extra=1),
                                                                                step_kv(e), e.meta.to_device()),
      pk.ShapeError, r"query has shape \(2, 9, 2, 4\)"),
    C("view-query-list", lambda e: e.cache[0].concatenate_to_cache([[1.0]], step_kv(e), step_kv(e), e.meta),
      pk.ShapeError, r"query is a list"),
    C("view-metadata-dict", lambda e: e.cache[0].write(step_kv(e), step_kv(e), {"kv_lens": 1}), pk.ShapeError,
      r"metadata is a dict"),
    C("view-read-metadata-dict", lambda e: e.ucache[0].read({"kv_lens": 1}), pk.ShapeError, r"metadata is a dict"),
    C("view-metadata-of-bigger-pool", lambda e: e.cache[0].write(step_kv(e), step_kv(e), bigger_pool_metadata(e)),
      pk.ShapeError, r"built for pages \(4, \(\(64, None, None\), \(64, 8, None\)\)\)"),
    C("sliding-view-metadata-of-full-only-manager",
      lambda e: e.cache[1].concatenate_to_cache(None, step_kv(e), step_kv(e), full_only_metadata(e)),
      pk.ShapeError, r"built for pages \(4, \(\(17, None, None\),\)\)"),
    C("unified-view-metadata-of-bigger-pool-jit",
      lambda e: _jit_concat(e.ucache[0], step_kv(e), step_kv(e), bigger_pool_metadata(e).to_device()),
      pk.ShapeError, r"built for pages"),
    C("view-hand-built-metadata",
      lambda e: e.cache[0].write(step_kv(e), step_kv(e), e.meta.replace(built_for=None)),
      pk.ShapeError, r"built for pages None"),
    # ---- token ids ----------------------------------------------------------------------------
    C("prefix-negative-token", lambda e: e.pm.admit_prompt(9, [1, -1, 2]), pk.InvalidTokenIdError,
      r"token id -1 is outside \[0, 2\*\*63\)"),
    C("prefix-uint64-max-token", lambda e: e.pm.admit_prompt(9, np.array([1, 2**64 - 1], np.uint64)),
      pk.InvalidTokenIdError, r"token id 18446744073709551615"),
    C("prefix-huge-python-token", lambda e: e.pm.admit_prompt(9, [1, 2**70]), pk.InvalidTokenIdError,
      r"dtype object"),
    C("prefix-float-tokens", lambda e: e.pm.admit_prompt(9, [1.0, 2.0]), pk.InvalidTokenIdError, r"dtype float64"),
    C("prefix-bool-tokens", lambda e: e.pm.admit_prompt(9, [True, False]), pk.InvalidTokenIdError, r"dtype bool"),
    C("prefix-ragged-tokens", lambda e: e.pm.admit_prompt(9, [[1], [2, 3]]), pk.InvalidTokenIdError, r"token_ids"),
    C("prefix-str-tokens", lambda e: e.pm.admit_prompt(9, "abc"), pk.InvalidTokenIdError, r"dtype <U3"),
    C("prefix-cache-tokens-negative", lambda e: e.pm.cache_tokens(1, [0, 1, 2, 3, -4]), pk.InvalidTokenIdError,
      r"token id -4"),
    C("prefix-chunk-zero", lambda e: e.pm.admit_prompt(9, [1, 2, 3], chunk=0), pk.InvalidTokenCountError,
      r"chunk=0"),
    C("prefix-chunk-float", lambda e: e.pm.admit_prompt(9, [1, 2, 3], chunk=1.5), pk.InvalidTokenCountError,
      r"chunk=1\.5"),
    # ---- construction: specs, managers, caches ------------------------------------------------
    C("spec-sliding-layers-None", lambda e: make_spec(sliding_layers=None), pk.SpecError, r"sliding_layers=None"),
    C("spec-sliding-layers-int", lambda e: make_spec(sliding_layers=1), pk.SpecError, r"sliding_layers=1 must be a tuple"),
    C("spec-sliding-layers-str", lambda e: make_spec(sliding_layers="1"), pk.SpecError, r"sliding_layers='1'"),
    C("spec-chunked-layers-int", lambda e: make_spec(attention_chunk_size=4, chunked_layers=0), pk.SpecError,
      r"chunked_layers=0 must be a tuple"),
    C("spec-chunked-layers-without-chunk", lambda e: make_spec(chunked_layers=(0,)), pk.SpecError,
      r"chunked_layers=\(0,\) given without attention_chunk_size"),
    C("spec-chunk-without-layers", lambda e: make_spec(attention_chunk_size=8), pk.SpecError,
      r"attention_chunk_size=8 given but chunked_layers is empty"),
    C("spec-chunk-zero", lambda e: make_spec(attention_chunk_size=0, chunked_layers=(0,)), pk.SpecError,
      r"attention_chunk_size=0 must be a positive integer"),
    C("spec-chunk-bool", lambda e: make_spec(attention_chunk_size=True, chunked_layers=(0,)), pk.SpecError,
      r"attention_chunk_size=True"),
    C("spec-chunked-layer-out-of-range", lambda e: make_spec(attention_chunk_size=8, chunked_layers=(2,)),
      pk.SpecError, r"chunked_layers=\(2,\) must be distinct indices in \[0, 2\)"),
    C("spec-layer-sliding-and-chunked", lambda e: make_spec(attention_chunk_size=8, chunked_layers=(1,)), pk.SpecError,
      r"layers \[1\] are in both sliding_layers and chunked_layers"),
    C("spec-chunked-num-blocks-without-layers", lambda e: make_spec(chunked_num_blocks=8), pk.SpecError,
      r"chunked_num_blocks=8 given but no layer is chunked"),
    C("spec-chunked-num-blocks-1", lambda e: make_spec(attention_chunk_size=8, chunked_layers=(0,), chunked_num_blocks=1),
      pk.SpecError, r"chunked_num_blocks=1 must be in \[2,"),
    C("spec-unknown-field", lambda e: make_spec(num_heads=4), pk.SpecError, r"no field\(s\) \['num_heads'\]"),
    C("spec-positional", lambda e: pk.CacheSpec(2, 17), pk.SpecError, r"keyword fields only"),
    C("spec-missing-field", lambda e: pk.CacheSpec(num_layers=2), pk.SpecError, r"needs field\(s\) \['block_size'"),
    C("spec-float64", lambda e: make_spec(dtype="float64"), pk.SpecError, r"dtype='float64'.*jax_enable_x64"),
    C("spec-huge-pool", lambda e: make_spec(num_kv_heads=2**30, head_dim=2**20), pk.SpecError,
      r"pages take [\d,]+ bytes .*more than any accelerator"),
    C("spec-for-memory-nan", lambda e: pk.CacheSpec.for_memory(float("nan"), num_layers=2, block_size=4, num_kv_heads=1,
                                                               head_dim=2), pk.SpecError, r"pool_bytes=nan"),
    C("spec-for-memory-inf", lambda e: pk.CacheSpec.for_memory(float("inf"), num_layers=2, block_size=4, num_kv_heads=1,
                                                               head_dim=2), pk.SpecError, r"pool_bytes=inf"),
    C("spec-for-memory-str", lambda e: pk.CacheSpec.for_memory("1e9", num_layers=2, block_size=4, num_kv_heads=1,
                                                               head_dim=2), pk.SpecError, r"pool_bytes='1e9'"),
    C("manager-of-a-dict", lambda e: pk.KVCacheManager({"num_layers": 2}), pk.SpecError, r"needs a paged_kv.CacheSpec"),
    C("manager-prefix-cache-str", lambda e: pk.KVCacheManager(e.spec, prefix_cache="yes"), pk.InvalidArgumentError,
      r"prefix_cache='yes'"),
    C("cache-device-str", lambda e: pk.PagedKVCache.init(e.spec, device="cpu"), pk.SpecError, r"device='cpu'"),
    C("cache-of-a-dict", lambda e: pk.PagedKVCache.init({}), pk.SpecError, r"got dict"),
    C("cache-larger-than-memory",
      lambda e: pk.PagedKVCache.init(make_spec(num_blocks=2**26, num_kv_heads=64, head_dim=256, sliding_window=None,
                                               sliding_layers=())),
      pk.SpecError, r"pages take [\d,]+ bytes .* but cpu:0 has"),
    # ---- checkpoints --------------------------------------------------------------------------
    C("checkpoint-save-path-None", lambda e: pk.save_checkpoint(None, e.cache, e.m), pk.CheckpointError, r"path=None"),
    C("checkpoint-save-path-int", lambda e: pk.save_checkpoint(3, e.cache, e.m), pk.CheckpointError, r"path=3"),
    C("checkpoint-load-path-None", lambda e: pk.load_checkpoint(None), pk.CheckpointError, r"path=None"),
    C("checkpoint-load-spec-dict", lambda e: pk.load_checkpoint(e.tmp / "x", spec={"num_layers": 2}),
      pk.CheckpointError, r"spec=\.\.\.\) must be a CacheSpec"),
    C("checkpoint-zip-flag-bit", lambda e: pk.load_checkpoint(flip_zip_flag(e)), pk.CheckpointError,
      r"not a readable \.npz file|cannot be read"),
    # ---- trace CSV ---------------------------------------------------------------------------
    C("trace-nan-context-tokens", lambda e: load_trace(csv(e, HEADER + ROW + "2023-11-16 18:15:47.0,nan,3\n")),
      pk.TraceError, r"line 3: ContextTokens='nan'"),
    C("trace-NaN-generated-tokens", lambda e: load_trace(csv(e, HEADER + ROW + "2023-11-16 18:15:47.0,3,NaN\n")),
      pk.TraceError, r"line 3: GeneratedTokens='NaN'"),
    C("trace-NaN-timestamp", lambda e: load_trace(csv(e, HEADER + ROW + "NaN,3,4\n")),
      pk.TraceError, r"line 3: TIMESTAMP='NaN'"),
    C("trace-truncated-last-row", lambda e: load_trace(csv(e, HEADER + ROW + "2023-11-16 18:15:47.0,3")),
      pk.TraceError, r"line 3: 2 fields \['2023-11-16 18:15:47\.0', '3'\]"),
    C("trace-empty-file", lambda e: load_trace(csv(e, "")), pk.TraceError, r"trace\.csv: empty file"),
    C("trace-missing-column", lambda e: load_trace(csv(e, "TIMESTAMP,ContextTokens\n2023-11-16 18:15:46,3\n")),
      pk.TraceError, r"lacks column\(s\) \['GeneratedTokens'\]"),
]


def _pages(e) -> list[np.ndarray]:
    leaves = jax.tree_util.tree_leaves((e.cache, e.ucache))
    assert not any(x.is_deleted() for x in leaves), "a failed call donated the cache's pages"
    return [np.asarray(x).copy() for x in leaves]


@pytest.mark.parametrize("setup,call,error,match", CASES)
def test_bad_input_is_typed_names_the_value_and_changes_nothing(tmp_path, setup, call, error, match):
    e = make_env(tmp_path)
    if setup is not None:
        setup(e)
    before = (e.m.snapshot(), e.slots.snapshot(), e.pm.snapshot())
    pages = _pages(e)
    with pytest.raises(pk.PagedKVError) as info:
        call(e)
    assert type(info.value) is error, f"raised {type(info.value).__name__}: {info.value}"
    info.match(match)
    assert (e.m.snapshot(), e.slots.snapshot(), e.pm.snapshot()) == before
    for got, want in zip(_pages(e), pages):
        np.testing.assert_array_equal(got, want)
    e.m.check_integrity()
    e.slots.check_integrity()


def test_membership_never_aliases_bool_or_float():
    m = pk.KVCacheManager(pk.CacheSpec(num_layers=1, num_blocks=8, block_size=4, max_blocks_per_seq=4,
                                       num_kv_heads=1, head_dim=2, dtype="float32"))
    m.admit(1, 3)
    assert 1 in m and np.int64(1) in m
    assert True not in m and 1.0 not in m
    assert not m.can_append(1, 1) and m.can_append(iter([1]), 1)
