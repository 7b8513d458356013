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


def test_decoding_after_a_prefix_hit_equals_recompute():
    d = Driver("float32", num_blocks=40)
    d.manager = pk.KVCacheManager(d.spec, prefix_cache=True)
    system = d.random_tokens(40)  # 2 full blocks of 16 and 8 tokens
    assert admit_cached(d, 0, system + d.random_tokens(5)) == 0
    # A concurrent request with the same system prompt: hits the 2 full blocks while 0 holds them.
    assert admit_cached(d, 1, system + d.random_tokens(9), source=0) == 32
    shared = d.manager.block_table(0)[:2]
    assert np.array_equal(d.manager.block_table(1)[:2], shared)
    for _ in range(6):
        d.step({s: d.random_tokens(1) for s in (0, 1)})
    d.manager.release(0)
    d.manager.release(1)
    assert d.manager.num_used_blocks == 0 and d.manager.pool.num_cached >= 2
    # After both are gone the blocks wait in the cache; a third request revives them.
    assert admit_cached(d, 2, system + d.random_tokens(3), source=0) == 32
    assert np.array_equal(d.manager.block_table(2)[:2], shared)
    for _ in range(4):
        d.step({2: d.random_tokens(1)})
    d.assert_matches_recompute([2], jnp.float32, 2e-4)
    stats = d.manager.prefix_cache.stats()
    assert stats.queries == 3 and stats.blocks_reused == 4 and stats.hit_tokens == 64
    assert stats.hit_rate == pytest.approx(64 / (45 + 49 + 43))


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


def test_sliding_layers_refuse_prefix_caching():
    with pytest.raises(pk.SpecError, match="sliding-window layers"):
        pk.KVCacheManager(pk.CacheSpec(num_layers=2, num_blocks=8, block_size=4, max_blocks_per_seq=4,
                                       num_kv_heads=1, head_dim=2, dtype="float32", sliding_window=4,
                                       sliding_layers=(1,), sliding_num_blocks=4), prefix_cache=True)


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
