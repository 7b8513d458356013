"""Chunked local attention on the host: a chunked group returns the blocks of earlier
chunks exactly when a sequence's first new token enters a new chunk, keeps a block
straddling the chunk edge, stays all-or-nothing, and swaps out and back in."""

from __future__ import annotations

import numpy as np
import pytest

import paged_kv as pk

BS = 4


def spec(chunk: int, **kw) -> pk.CacheSpec:
    """Layer 0 full, layer 1 sliding (window 6), layer 2 chunked: one manager for all three."""
    base = dict(num_layers=3, num_blocks=40, block_size=BS, max_blocks_per_seq=16, max_batch_slots=8,
                num_kv_heads=1, head_dim=2, sliding_window=6, sliding_layers=(1,), attention_chunk_size=chunk,
                chunked_layers=(2,), chunked_num_blocks=12)
    return pk.CacheSpec(**{**base, **kw})


def first_block(m: pk.KVCacheManager, seq: int, group: int = 2) -> int:
    return int(m.groups[group].table.first_block[m._rows[seq]])


@pytest.mark.parametrize("chunk", [8, 6, 3, 13])
def test_decode_returns_earlier_chunks_exactly_at_the_chunk_edge(chunk):
    """One token at a time: the chunked group's first block moves only on the append
    whose token starts a chunk, to the block holding that chunk's first position (a
    block straddling the edge is kept, with the same id); its pool gets back exactly
    the blocks before it."""
    m = pk.KVCacheManager(spec(chunk))
    m.admit(0, 1)
    usable = m.spec.groups[2].num_blocks - 1
    for pos in range(1, 60):
        before_first, before = first_block(m, 0), m.block_table(0, 2)
        m.append([0], 1)  # the new token sits at position `pos`
        m.check_integrity()
        want_first = (pos // chunk * chunk) // BS
        assert first_block(m, 0) == want_first
        if pos % chunk:
            assert want_first == before_first  # inside a chunk nothing goes back
        table = m.block_table(0, 2)
        assert table.size == m.spec.blocks_for(pos + 1) - want_first
        kept = before[want_first - before_first:]
        assert np.array_equal(table[: kept.size], kept), "a kept (straddling) block changed"
        assert m.groups[2].pool.num_free == usable - table.size
        assert m.block_table(0, 0).size == m.spec.blocks_for(pos + 1)  # the full group keeps all
    m.release(0)
    assert m.groups[2].pool.num_free == usable
    m.check_integrity()


def test_a_step_crossing_a_chunk_edge_keeps_the_chunk_it_starts_in():
    """A prefill chunk from position 5 to 13 (chunks of 8): its first queries still
    see chunk 0, so nothing goes back; the next step (first query in chunk 1) frees."""
    m = pk.KVCacheManager(spec(8))
    m.admit(0, 5)
    m.append([0], 9)
    m.check_integrity()
    assert first_block(m, 0) == 0
    meta = m.step_metadata([0], 9)
    assert int(meta.groups[2].start[0]) == 0
    m.append([0], 1)  # position 14: chunk 1 starts at 8 = block 2
    assert first_block(m, 0) == 2
    meta = m.step_metadata([0], 1)
    assert int(meta.groups[2].start[0]) == 8
    assert meta.groups[2].block_tables[0, :2].tolist() == m.block_table(0, 2).tolist()
    m.check_integrity()


def test_zero_token_append_changes_nothing_and_mixed_batches_trim_per_row():
    m = pk.KVCacheManager(spec(6))
    m.admit(0, 12)
    m.admit(1, 3)
    before = m.snapshot()
    m.append([0, 1], [0, 0])
    assert m.snapshot() == before
    m.append([0, 1], [1, 4])  # 0's token at 12 starts chunk 2 (block 3); 1 stays in chunk 0/1 edge
    assert first_block(m, 0) == 3 and first_block(m, 1) == 0
    m.check_integrity()


def test_trimmed_blocks_count_as_free_and_failures_change_nothing():
    """An append fits only because the chunk edge returns blocks in the same call; one
    block more does not fit and leaves everything as it was."""
    m = pk.KVCacheManager(spec(8, chunked_num_blocks=6))  # 5 usable chunked blocks
    m.admit(0, 8)  # blocks 0, 1 of chunk 0
    m.admit(1, 8)
    m.append([0], 1)  # position 8: chunk 1, block 2; blocks 0 and 1 go back
    assert m.groups[2].pool.num_free == 5 - 2 - 1
    m.append([0], 3)
    before = m.snapshot()
    with pytest.raises(pk.OutOfBlocksError):
        m.append([1], 20)  # 28 tokens: 5 new blocks (2..6) > 2 free + 2 trimmed (0, 1)
    assert m.snapshot() == before
    m.check_integrity()
    assert m.can_append([1], 16) and not m.can_append([1], 17)
    m.append([1], 16)  # 24 tokens: blocks 2..5, taking the 2 free and the 2 it returns
    assert m.groups[2].pool.num_free == 0
    assert first_block(m, 1) == 2
    m.check_integrity()


def test_check_integrity_catches_a_block_trimmed_too_early():
    m = pk.KVCacheManager(spec(8))
    m.admit(0, 11)
    m.append([0], 2)  # positions 11, 12: chunk 1 (from 8, block 2) holds blocks 2 and 3
    assert first_block(m, 0) == 2
    m.check_integrity()
    g, row = m.groups[2], m._rows[0]
    # Return block 2 (it holds position 8..11, which the next query at 13 still sees)
    # consistently everywhere, as a wrong trim would: only the chunk rule catches it.
    g.pool.free(g.table.block_tables[row, 2:3].copy())
    g.table.block_tables[row, 2] = 0
    g.table.first_block[row] = 3
    with pytest.raises(AssertionError, match="chunked query can see was returned"):
        m.check_integrity()


def test_swap_round_trip_keeps_the_chunk_offset():
    m = pk.KVCacheManager(spec(6))
    m.admit(0, 5)
    m.append([0], 9)  # 14 tokens
    m.append([0], 1)  # position 14: chunk 2 starts at 12, block 3
    record = m.swap_out(0)
    assert record.first_blocks == (0, first_of_window(15), 3)
    assert record.num_blocks == (4, 4 - first_of_window(15), 1)
    assert m.groups[2].pool.num_free == m.spec.groups[2].num_blocks - 1
    m.swap_in(record)
    assert first_block(m, 0) == 3 and m.kv_len(0) == 15
    m.check_integrity()
    m.append([0], 3)  # position 15..17: chunk 2 until 17, no trim; position 18 would
    assert first_block(m, 0) == 3
    forged = pk.SwapRecord(1, 15, (0, first_of_window(15), 4), tuple(np.arange(n, dtype=np.int32) for n in (4, 2, 0)))
    before = m.snapshot()
    with pytest.raises(pk.InvalidArgumentError, match=r"first_blocks\[2\]=4 .*chunk of 6 keeps every block from 3 on"):
        m.swap_in(forged)
    assert m.snapshot() == before


def first_of_window(length: int, window: int = 6) -> int:
    """The sliding group's first block after decoding to ``length`` tokens one by one."""
    return max(length - 1 - window + 1, 0) // BS


def test_fork_shares_the_chunked_blocks_and_both_trim():
    m = pk.KVCacheManager(spec(8))
    m.admit(0, 7)
    m.fork(0, 1)
    m.append([0, 1], [1, 1])  # both at position 7: copy-on-write of the shared partial block
    assert m.num_pending_copies == 3  # one per group: full, sliding, chunked
    m.step_metadata([0, 1], 1)
    m.commit([0, 1])  # the step that carried the copies ran
    assert m.num_pending_copies == 0
    m.append([0, 1], [1, 1])  # position 8: chunk 1; block 0 is held by both, freed once both drop it
    m.check_integrity()
    assert first_block(m, 0) == first_block(m, 1) == 2
    assert m.groups[2].pool.num_used == 2  # each row's own block 2: shared block 0 and both block 1s went back


@pytest.mark.parametrize("kind", ["sliding", "chunked"])
def test_a_step_older_than_the_last_append_is_refused_when_its_blocks_were_dropped(kind):
    # Two 1-token appends, then one step describing both tokens: the second append
    # trimmed what the first token's query needs. Attention would silently run
    # without those keys, so the step is refused (typed, nothing changed).
    local = dict(sliding_window=4, sliding_layers=(1,)) if kind == "sliding" else dict(
        attention_chunk_size=4, chunked_layers=(1,))
    spec = pk.CacheSpec(num_layers=2, num_blocks=64, block_size=4, max_blocks_per_seq=16, max_batch_slots=4,
                        num_kv_heads=1, head_dim=8, **local)
    m = pk.KVCacheManager(spec)
    m.admit(0, 7)
    m.step_metadata([0], 7)
    m.append([0], 1)  # token 7: its query (chunk 4..7, window 4..7) needs block 1
    m.append([0], 1)  # token 8: block 1 is still visible to the window; the chunk moves to block 2
    m.append([0], 1)  # token 9: the window (6..9) still needs block 1
    m.append([0], 3)  # tokens 10..12: the window starts at 9 for token 12, 7 for token 10: block 1 kept
    m.append([0], 1)  # token 13: the window starts at 10 -> block 1 (tokens 4..7) dropped
    before = m.snapshot()
    with pytest.raises(pk.InvalidTokenCountError, match="went back to the pool"):
        m.step_metadata([0], 7)  # first query at 7: needs block 1
    assert m.snapshot() == before
    assert m.step_metadata([0], 1).kv_lens[0] == 14  # the last token alone is fine
    m.check_integrity()
