"""A restore checks every cross-field invariant (issue 23 item 2).

Digests only catch accidents: a buggy writer or an edited file carries valid ones. These
edits loaded before and then handed out block -1, keyed blocks no step had written (a
prefix hit then read a previous tenant's bytes), or failed later inside ``commit``. Each
is now a `CheckpointError` naming the array, and nothing is returned.
"""

from __future__ import annotations

import numpy as np
import pytest

import paged_kv as pk
from paged_kv import CheckpointError, KVCacheManager
from tests.test_checkpoint import rewrite

SPEC = pk.CacheSpec(num_layers=1, num_blocks=20, block_size=4, max_blocks_per_seq=8, num_kv_heads=1, head_dim=2,
                    dtype="float32")
HYBRID = pk.CacheSpec(num_layers=2, num_blocks=24, block_size=4, max_blocks_per_seq=8, num_kv_heads=1, head_dim=2,
                      dtype="float32", sliding_window=6, sliding_layers=(1,), sliding_num_blocks=16)


def saved_manager(spec=SPEC) -> KVCacheManager:
    """Seq 0: 13 tokens written and keyed; seq 1: a 6-token prompt with one block written."""
    m = KVCacheManager(spec, prefix_cache=True)
    m.admit_prompt(0, np.arange(13))
    m.commit([0], 13)
    m.admit_prompt(1, np.arange(100, 106))
    m.commit([1], 4)
    return m


def edited(m: KVCacheManager, edit) -> dict:
    state = {k: v.copy() for k, v in m.state().items()}
    edit(state)
    return state


def refused(m: KVCacheManager, edit, match: str) -> None:
    state = edited(m, edit)
    with pytest.raises(CheckpointError, match=match):
        KVCacheManager.from_state(m.spec, True, state)


def row_of(m: KVCacheManager, seq_id: int) -> int:
    return dict(m.state()["manager.rows"].tolist())[seq_id]


def test_written_past_the_length_is_refused_through_load_checkpoint(tmp_path):
    """The attack: seq 1 holds 6 tokens, 4 written. Claiming 8 written made the next
    commit key block 1, whose slots 6 and 7 nobody wrote, and a later prompt hit it."""
    m = saved_manager()
    pk.save_checkpoint(tmp_path / "ok.npz", pk.PagedKVCache.init(SPEC), m)
    lengths = m.state()["written.lengths"].copy()
    lengths[lengths[:, 0] == row_of(m, 1), 1] = 8
    path = rewrite(tmp_path / "ok.npz", tmp_path / "bad.npz", replace={"written.lengths": lengths}, redigest=True)
    with pytest.raises(CheckpointError, match="written.lengths: row 1 has 8 tokens written but holds 6") as info:
        pk.load_checkpoint(path)
    assert str(path) in str(info.value)
    assert pk.load_checkpoint(tmp_path / "ok.npz").manager.snapshot() == m.snapshot()


def _free_top(value):
    def edit(s):
        s["group0.pool.free_stack"][int(s["group0.pool.num_free"]) - 1] = value
    return edit


def _pair(name, row_seq, value, col=1):
    def edit(s):
        m = saved_manager()
        a = s[name]
        a[a[:, 0] == row_of(m, row_seq), col] = value
    return edit


def _long_chain(s):
    """Seq 1's chain grows past max_blocks_per_seq=8."""
    row = row_of(saved_manager(), 1)
    extra = np.array([(row, i) for i in range(1, 10)], np.int64)
    s["written.hash_index"] = np.concatenate([s["written.hash_index"], extra])
    s["written.hash_value"] = np.concatenate([s["written.hash_value"], np.ones((9, 2), np.uint64)])


def _zero_key(s):
    s["written.hash_value"][0] = 0


def _shared_at_two_positions(s):
    t = s["group0.table.block_tables"]
    refs = s["group0.pool.ref_counts"]
    r0, r1 = row_of(saved_manager(), 0), row_of(saved_manager(), 1)
    refs[t[r1, 1]] -= 1
    t[r1, 1] = t[r0, 0]  # seq 1 reads seq 0's first block as its second
    refs[t[r0, 0]] += 1
    s["group0.pool.free_stack"][int(s["group0.pool.num_free"])] = 0  # keep the counts adding up: refused anyway


def _key_on_unwritten_block(s):
    """Seq 1's second block (unwritten) gets a cache key of its own."""
    t, row = s["group0.table.block_tables"], row_of(saved_manager(), 1)
    s["group0.prefix.hash"][t[row, 1]] = [123, 456]


def _idle_row_with_blocks(s):
    s["group0.table.block_tables"][5, 0] = 9


EDITS = {
    "free stack holds -1": (_free_top(-1), r"free_stack holds \[-1\]"),
    "free stack holds the null block": (_free_top(0), r"free_stack holds \[0\]"),
    "free stack holds a held block": (lambda s: _free_top(int(s["group0.table.block_tables"][0, 0]))(s),
                                      "free_stack holds"),
    "free stack holds a block twice": (lambda s: _free_top(int(s["group0.pool.free_stack"][0]))(s),
                                       "free_stack holds a block twice"),
    "negative seq id": (lambda s: s["manager.rows"].__setitem__((0, 0), -3), r"sequence ids \[-3\]"),
    "two sequences in one row": (lambda s: s["manager.rows"].__setitem__((1, 1), s["manager.rows"][0, 1]),
                                 "several sequences in rows|written.* names rows"),
    "negative keyed": (_pair("written.keyed", 1, -2), "row 1 has -2 blocks keyed"),
    "keyed past written": (_pair("written.keyed", 1, 2), "row 1 has 2 blocks keyed, 4 tokens written"),
    "negative written": (_pair("written.lengths", 1, -1), "row 1 has -1 tokens written"),
    "written past kv_len": (_pair("written.lengths", 0, 14), "row 0 has 14 tokens written but holds 13"),
    "chain past max_blocks_per_seq": (_long_chain, "chain has 10 keys > max_blocks_per_seq=8"),
    "chain holds the no-key value": (_zero_key, "holds the no-key value 0"),
    "row named twice in written": (lambda s: s.__setitem__("written.lengths", np.repeat(s["written.lengths"], 2, 0)),
                                   "written.lengths names a row twice"),
    "negative kv_len": (lambda s: s["group0.table.kv_lens"].__setitem__(1, -3), "kv_lens must lie in"),
    "first_block in a full group": (lambda s: s["group0.table.first_block"].__setitem__(0, 1),
                                    "a full group never drops blocks"),
    "a block out of range": (lambda s: s["group0.table.block_tables"].__setitem__((0, 0), 20), r"\[1, 20\)"),
    "a row not in use holds blocks": (_idle_row_with_blocks, "rows not in use must be empty"),
    "a block at two positions": (_shared_at_two_positions, "different logical positions|free_stack"),
    "a key on an unwritten held block": (_key_on_unwritten_block, "carries a key past the row's keyed end"),
    "evictable twice": (lambda s: s.__setitem__("group0.prefix.evictable", np.array([7, 7], np.int64)),
                        "evictable names a block twice"),
    "negative counter": (lambda s: s["group0.prefix.stats"].__setitem__(2, -1), "counters are >= 0"),
    "free rows twice": (lambda s: s["group0.table.free_rows"].__setitem__(0, s["group0.table.free_rows"][1]),
                        "free_rows must list each row not in use exactly once"),
}


@pytest.mark.parametrize("name", sorted(EDITS))
def test_inconsistent_edits_are_refused(name):
    edit, match = EDITS[name]
    refused(saved_manager(), edit, match)


def test_an_unedited_state_restores_and_continues_identically():
    m = saved_manager()
    r = KVCacheManager.from_state(SPEC, True, m.state())
    assert r.snapshot() == m.snapshot()
    for mgr in (m, r):
        mgr.append([1], 6)
        mgr.commit([1], 12)
        mgr.cache_tokens(1, np.arange(100, 112))
        assert mgr.admit_prompt(5, np.arange(100, 113)) == 12
    assert r.snapshot() == m.snapshot()


def test_hybrid_state_with_fork_chunked_prefill_and_evictions_restores():
    """Legitimate states the checks must accept: a fork sharing blocks, a chunked prefill
    whose chain is longer than its blocks, trimmed sliding rows, both eviction tiers."""
    m = KVCacheManager(HYBRID, prefix_cache=True)
    m.admit_prompt(0, np.arange(21))
    m.commit([0], 21)
    m.fork(0, 1)
    m.admit_prompt(2, np.arange(200, 229), chunk=5)
    m.commit([2], 5)
    m.admit_prompt(3, np.arange(21))
    m.release(0)
    m.append([1], 9)
    m.commit([1], 30)
    r = KVCacheManager.from_state(HYBRID, True, m.state())
    assert r.snapshot() == m.snapshot()
    r.check_integrity()
