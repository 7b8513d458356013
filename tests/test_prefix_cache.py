"""Prefix caching: full blocks keyed by their token prefix, reused across requests."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

import paged_kv as pk
from paged_kv.allocator.prefix_cache import chain_hashes
from test_transformer_model import Driver


def small(num_blocks=32, prefix_cache=True, max_blocks_per_seq=8, **kw) -> pk.KVCacheManager:
    spec = pk.CacheSpec(num_layers=1, num_blocks=num_blocks, block_size=4, max_blocks_per_seq=max_blocks_per_seq,
                        num_kv_heads=1,
                        head_dim=2, dtype="float32", **kw)
    return pk.KVCacheManager(spec, prefix_cache=prefix_cache)


def prefilled(m: pk.KVCacheManager, seq: int, token_ids, **kw) -> int:
    """`admit_prompt`, then describe and commit its prefill step (host only: no device)."""
    cached = m.admit_prompt(seq, np.asarray(token_ids), **kw)
    m.step_metadata([seq], m.kv_len(seq) - cached)
    m.commit([seq])
    return cached


def admit_cached(d: Driver, seq: int, prompt: list[int], source: int | None = None) -> int:
    """Admit through the prefix cache and run the uncached tail; cached positions take
    their logits from ``source`` (a sequence that computed the same prefix)."""
    cached = d.manager.admit_prompt(seq, np.asarray(prompt))
    d.tokens[seq] = list(prompt[:cached])
    d.logits[seq] = {p: d.logits[source][p] for p in range(cached)} if cached else {}
    d.step({seq: prompt[cached:]})
    return cached


def test_decoding_after_prefix_hits_equals_recompute():
    """A model with full and sliding layers (window 16 over blocks of 16): a concurrent
    hit, a hit on blocks whose holders have all left, and the next turn of a conversation
    whose first blocks the sliding window has already returned."""
    d = Driver("float32", num_blocks=40, sliding_window=16, sliding_layers=(1,), sliding_num_blocks=24)
    d.manager = pk.KVCacheManager(d.spec, prefix_cache=True)
    system = d.random_tokens(40)  # 2 full blocks of 16 and 8 tokens
    assert admit_cached(d, 0, system + d.random_tokens(5)) == 0
    # A concurrent request with the same system prompt: hits the 2 full blocks while 0 holds them.
    assert admit_cached(d, 1, system + d.random_tokens(9), source=0) == 32
    shared = d.manager.block_table(0)[:2]
    assert np.array_equal(d.manager.block_table(1)[:2], shared)
    for _ in range(6):
        d.step({s: d.random_tokens(1) for s in (0, 1)})
    assert d.manager.block_table(1, 1).size == 2  # the window returned blocks 0 and 1 (still keyed)
    d.manager.cache_tokens(0, d.tokens[0])  # 51 tokens: blocks 0..2 keyed; the window holds 2..3
    conversation = list(d.tokens[0])
    d.manager.release(0)
    d.manager.release(1)
    assert d.manager.num_used_blocks == 0 and d.manager.pool.num_cached >= 3
    # After both are gone the blocks wait in the cache; new requests revive them.
    assert admit_cached(d, 2, system + d.random_tokens(3), source=0) == 32
    assert np.array_equal(d.manager.block_table(2)[:2], shared)
    assert admit_cached(d, 3, conversation + d.random_tokens(4), source=0) == 48
    assert d.manager.block_table(3, 1).size == 2  # sliding: block 2 hit, block 3 new; 0 and 1 null
    for _ in range(4):
        d.step({s: d.random_tokens(1) for s in (2, 3)})
    d.assert_matches_recompute([2, 3], jnp.float32, 2e-4)
    stats = d.manager.prefix_cache.stats()
    assert stats.queries == 4 and stats.blocks_reused == 2 + 2 + 3 and stats.hit_tokens == 32 + 32 + 48
    assert stats.hit_rate == pytest.approx(112 / (45 + 49 + 43 + 55))


def test_last_token_is_always_computed():
    m = small()
    prompt = np.arange(8)  # exactly 2 full blocks
    assert prefilled(m, 0, prompt) == 0
    assert prefilled(m, 1, prompt) == 4  # only the first block: the last token is recomputed
    assert prefilled(m, 2, np.arange(9)) == 8
    m.check_integrity()


def test_cache_key_and_chain_separate_contents():
    m = small()
    prefilled(m, 0, np.arange(9))
    assert prefilled(m, 1, np.arange(9), cache_key="adapter-b") == 0
    other = np.arange(9)
    other[1] = 99  # first block differs: its successors' keys differ too (chained)
    assert prefilled(m, 2, other) == 0
    assert chain_hashes(np.arange(8), 4, 2)[1] != chain_hashes(other[:8], 4, 2)[1]
    m.check_integrity()


def test_eviction_is_lru_tail_first_and_events_stream():
    m = small(num_blocks=9)  # 8 usable blocks
    seen = []
    m.prefix_cache.subscribe(seen.append)
    prefilled(m, 0, np.arange(13))  # 4 blocks, 3 full keyed
    prefilled(m, 1, np.arange(100, 113))  # 4 blocks, 3 full keyed
    stored = [e for e in m.prefix_cache.drain_events() if e.kind == "stored"]
    assert len(stored) == 6 and stored[1].parent_hash == stored[0].block_hash
    chain0 = m.block_table(0)[:3].tolist()
    chain1 = m.block_table(1)[:3].tolist()
    m.release(0)  # released first: its blocks are the least recently used
    m.release(1)
    assert m.pool.num_cached == 6 and m.num_free_blocks == 8
    m.admit(5, 4 * 4)  # 4 blocks: the 2 never-keyed free ones, then 2 evicted
    removed = [e.block_id for e in m.prefix_cache.drain_events() if e.kind == "removed"]
    assert removed == chain0[::-1][:2]  # seq 0's chain (least recent), tail before parent
    assert m.prefix_cache.stats().blocks_evicted == 2
    assert m.admit_prompt(6, np.arange(100, 113)) == 12  # seq 1's chain is still whole
    assert m.block_table(6)[:3].tolist() == chain1
    assert [e.block_id for e in m.prefix_cache.drain_events()] == chain0[:1]  # its head went last
    assert len(seen) == 6 + 3 and seen[-1].kind == "removed"
    m.check_integrity()


def test_multi_turn_reuses_the_conversation():
    m = small(num_blocks=40)
    prompt = np.arange(10)
    prefilled(m, 0, prompt)
    m.append([0], 7)  # 7 generated tokens
    conversation = np.concatenate([prompt, np.arange(500, 507)])
    assert m.cache_tokens(0, conversation) == 0  # blocks 2 and 3 are full, but not written yet
    m.step_metadata([0], 7)
    m.commit([0])  # their decode steps ran: now they are keyed
    assert m.prefix_cache.stats().blocks_stored == 4
    m.release(0)
    follow_up = np.concatenate([conversation, np.arange(900, 905)])
    assert m.admit_prompt(1, follow_up) == 16
    m.check_integrity()


def test_prefix_cache_failures_change_nothing():
    m = small(num_blocks=6, max_blocks_per_seq=5)  # 5 usable
    prefilled(m, 0, np.arange(9))  # 3 blocks, 2 keyed once committed
    before = m.snapshot()
    with pytest.raises(pk.OutOfBlocksError, match="need 4 free blocks"):
        m.admit_prompt(1, np.arange(50, 63))
    with pytest.raises(pk.DuplicateSequenceError):
        m.admit_prompt(0, np.arange(3))
    with pytest.raises(pk.InvalidTokenCountError, match="token_ids"):
        m.admit_prompt(2, np.array([[1, 2]]))
    with pytest.raises(pk.InvalidTokenCountError, match="token_ids"):
        m.admit_prompt(2, np.array([1.5, 2.0]))
    with pytest.raises(pk.SequenceTooLongError):
        m.admit_prompt(2, np.arange(21))
    with pytest.raises(pk.InvalidTokenCountError, match="need the sequence's 9"):
        m.cache_tokens(0, np.arange(8))
    assert m.snapshot() == before
    assert not m.can_admit_prompt(np.arange(50, 63)) and m.can_admit_prompt(np.arange(9))
    with pytest.raises(pk.SpecError, match="prefix_cache=True"):
        small(prefix_cache=False).admit_prompt(0, np.arange(3))


def test_a_sliding_only_model_never_caches_the_null_block():
    """One group with a window (Mistral): blocks the window returned are null entries;
    caching the conversation afterwards keys only blocks still held."""
    m = pk.KVCacheManager(pk.CacheSpec(num_layers=1, num_blocks=16, block_size=4, max_blocks_per_seq=8,
                                       num_kv_heads=1, head_dim=2, dtype="float32", sliding_window=4,
                                       sliding_layers=(0,)), prefix_cache=True)
    prompt = np.arange(8)
    m.admit_prompt(0, prompt)
    m.commit([0], 8)
    m.append([0], 12)  # the window has moved on: the first blocks went back to the pool
    m.commit([0], 20)
    assert m.block_table(0).size < 5
    m.cache_tokens(0, np.arange(20))
    assert m.prefix_cache.hash_of[pk.NULL_BLOCK] == 0
    m.release(0)
    m.check_integrity()
    assert m.admit_prompt(1, prompt) == 4  # the prompt's head block was keyed before it left the window
    m.check_integrity()


# ---- models mixing full and sliding-window (or chunked) layers ----------------------------
def hybrid(num_blocks=40, sliding_num_blocks=20, **kw) -> pk.KVCacheManager:
    """Layer 0 full, layer 1 a window of 6 over blocks of 4: a hit at block h needs
    blocks h-2 and h-1 of the sliding group (positions 4h-5 .. 4h-1), all of the full one."""
    spec = pk.CacheSpec(num_layers=2, num_blocks=num_blocks, block_size=4, max_blocks_per_seq=12, num_kv_heads=1,
                        head_dim=2, dtype="float32", sliding_window=6, sliding_layers=(1,),
                        sliding_num_blocks=sliding_num_blocks, **kw)
    return pk.KVCacheManager(spec, prefix_cache=True)


def test_a_hybrid_hit_is_the_longest_every_group_serves():
    m = hybrid()
    prompt = np.arange(100, 130)
    m.admit_prompt(0, prompt[:26], chunk=16)  # 4 blocks, never committed before the next chunk
    m.append([0], 10)  # the window moves on: sliding blocks 0 and 1 go back unkeyed
    m.commit([0], 26)  # full group keys blocks 0..5, the sliding group the 2..5 it still holds
    assert [m.groups[g].cache.stats().blocks_stored for g in (0, 1)] == [6, 4]
    # The sliding group holds the window of block 6's hit point: the whole chain hits.
    assert m.admit_prompt(1, prompt[:27]) == 24
    assert m.block_table(1, 0).size == 7 and m.block_table(1, 1).size == 3  # sliding: blocks 4, 5 hit + 1 new
    # Diverging after block 4: full serves 4 blocks, the sliding group's window (2, 3) too.
    assert m.admit_prompt(2, np.concatenate([prompt[:16], [7, 7, 7, 7, 7]])) == 16
    # Diverging after block 3: full serves 3, the sliding group lacks block 1, so 1, then
    # 0 (block 0 missing too): the fixed point is no hit at all.
    assert m.admit_prompt(3, np.concatenate([prompt[:12], [7, 7, 7, 7, 7]])) == 0
    m.check_integrity()


def test_hybrid_hits_after_the_window_moved_and_after_release():
    m = hybrid()
    prompt = np.arange(13)
    assert prefilled(m, 0, prompt) == 0
    assert prefilled(m, 1, prompt) == 12  # concurrent: both groups' blocks shared
    for _ in range(12):  # decode: seq 0's window leaves the prompt's first blocks
        m.append([0], 1)
        m.step_metadata([0], 1)
        m.commit([0])
    m.release(1)
    assert m.block_table(0, 1).size == 3 and m.groups[1].cache.block_of  # trimmed blocks stay keyed
    m.release(0)
    assert m.num_used_blocks == 0
    assert prefilled(m, 2, np.concatenate([prompt, [1, 2, 3]])) == 12
    assert m.block_table(2, 1).size == 3  # blocks 1..2 hit, block 3 new; block 0 stays null
    m.check_integrity()


def test_hybrid_admission_counts_every_group():
    m = hybrid(sliding_num_blocks=4)  # 3 usable sliding blocks: the scarcer pool decides
    assert m.can_admit_prompt(np.arange(12)) and not m.can_admit_prompt(np.arange(13))
    before = m.snapshot()
    with pytest.raises(pk.OutOfBlocksError, match="layer group 1"):
        m.admit_prompt(0, np.arange(13))
    assert m.snapshot() == before


def test_retention_keeps_window_tails_over_blocks_behind_a_window():
    """The rule behind vLLM issue #48435: blocks a sliding window sheds while a sequence
    grows must be recycled before the window tails finished turns leave for the next turn.
    Under plain LRU session A's tail (released first) would be evicted here, and its next
    turn would hit nothing."""
    m = hybrid(num_blocks=64, sliding_num_blocks=17, max_batch_slots=4)  # 16 usable sliding blocks
    sliding = m.groups[1].cache
    a_turn = np.arange(8)
    prefilled(m, 0, a_turn)  # session A: a prompt of 2 blocks, then 8 generated tokens
    for _ in range(8):
        m.append([0], 1)
        m.step_metadata([0], 1)
        m.commit([0])
    conversation = np.concatenate([a_turn, np.arange(900, 908)])
    m.cache_tokens(0, conversation)
    tail = m.block_table(0, 1).tolist()
    m.release(0)  # A's window tail (blocks 2, 3) waits for A's next turn
    assert set(tail) <= set(sliding.evictable) and len(sliding.behind) == 2
    prefilled(m, 1, np.arange(200, 240))  # session B: 10 blocks, keyed
    m.append([1], 1)  # B decodes: its window sheds blocks 0..7, keyed and newer than A's tail
    assert len(sliding.behind) == 2 + 8
    seen = []
    sliding.subscribe(seen.append)
    m.admit(2, 4 * 11)  # another request takes 11 sliding blocks: the last free one, then 10 evicted
    assert len(seen) == 10 and {e.block_id for e in seen}.isdisjoint(tail)
    m.release(2)
    assert m.admit_prompt(3, np.concatenate([conversation, [5, 6, 7]])) == 16  # A's next turn hits it all
    m.check_integrity()


def test_chunked_layers_cache_prefixes():
    """Chunked local layers (chunks of 8 over blocks of 4): a hit at a chunk edge needs no
    chunked block, elsewhere the blocks of the current chunk before it."""
    spec = pk.CacheSpec(num_layers=2, num_blocks=40, block_size=4, max_blocks_per_seq=12, num_kv_heads=1,
                        head_dim=2, dtype="float32", attention_chunk_size=8, chunked_layers=(1,))
    m = pk.KVCacheManager(spec, prefix_cache=True)
    prefilled(m, 0, np.arange(21))
    m.append([0], 12)  # the chunk of position 21 is current: chunks 0..1 go back, keyed
    m.commit([0], 33)
    m.release(0)
    assert prefilled(m, 1, np.arange(17)) == 16  # chunk edge: chunked row starts at block 4, nothing hit
    assert m.block_table(1, 1).size == 1
    assert prefilled(m, 2, np.arange(14)) == 12  # inside chunk 1: block 2 (positions 8..11) hit
    assert m.block_table(2, 1).size == 2
    m.check_integrity()
