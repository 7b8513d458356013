"""A prefix-cache hit never hands a request bytes nobody wrote for its prefix.

The pool starts full of a sentinel (another tenant's bytes). Keys and values are a
function of the token prefix, as a model's are: position p holds f(tokens[:p+1]).
So a correct hit returns exactly what the request would have computed itself, and
any byte of the sentinel, or of another prompt, inside a sequence's length fails
the comparison. Covered: a request released before its prefill runs, identical
prompts admitted in one step, a chunked prefill cancelled midway, eviction then a
re-hit, a second request stepped before the first one's prefill, and a step
described twice before it runs (a retry); split and unified layouts, and a model
mixing full and sliding-window layers (whose hits need only the window's blocks).
"""

from __future__ import annotations

import jax
import numpy as np
import pytest

import paged_kv as pk
from paged_kv.allocator.prefix_cache import chain_hashes
from paged_kv.spec import compute_dtype

BS, H, D = 4, 2, 4
SENTINEL = 0x7FA5  # a bfloat16 NaN with a payload


class Tenant:
    """A cache with the prefix cache on, and a model of what it must show. ``hybrid``:
    layer 1 slides (a window of 6 over blocks of 4) in a pool of its own."""

    def __init__(self, layout: str, hybrid: bool = False, num_blocks: int = 13, sliding_num_blocks: int = 13):
        window = dict(sliding_window=6, sliding_layers=(1,), sliding_num_blocks=sliding_num_blocks) if hybrid else {}
        self.spec = pk.CacheSpec(num_layers=2, num_blocks=num_blocks, block_size=BS, max_blocks_per_seq=12,
                                 max_batch_slots=4, num_kv_heads=H, head_dim=D, dtype="bfloat16", **window)
        self.m = pk.KVCacheManager(self.spec, prefix_cache=True)
        self.cache = pk.PagedKVCache.init(self.spec, layout=layout)
        self.tokens: dict[int, np.ndarray] = {}

    @staticmethod
    def kv_of(tokens: np.ndarray) -> np.ndarray:
        """[len, H, D] keys of a token sequence: position p depends on every token <= p."""
        out = np.empty((tokens.size, H, D), np.float32)
        h = 0
        for p, t in enumerate(tokens.tolist()):
            h = (h * 1000003 + t + 1) % 2**31
            out[p] = ((h >> np.arange(H * D).reshape(H, D)) % 97) / 4 + 0.25  # exact in bfloat16
        return out

    def fill_with_sentinel(self) -> None:
        """Every usable block of every pool holds another tenant's bytes (the null block stays zero)."""
        self.cache = pk.PagedKVCache(tuple(v.map_pages(lambda pages: pages.at[1:].set(SENTINEL))
                                           for v in self.cache.views))

    def admit(self, seq: int, tokens, **kw) -> int:
        self.tokens[seq] = np.asarray(tokens)
        return self.m.admit_prompt(seq, self.tokens[seq], **kw)

    def run(self, ids: list[int], counts: list[int], commit: bool = True) -> None:
        """One step writing each sequence's last ``counts`` held tokens, as a model would."""
        meta = self.m.step_metadata(ids, counts)
        k = np.zeros((meta.batch_size, meta.query_len, H, D), np.float32)
        for b, (s, c) in enumerate(zip(ids, counts)):
            n = self.m.kv_len(s)
            k[b, :c] = self.kv_of(self.tokens[s][:n])[n - c:]
        dt = compute_dtype(self.spec)
        self.cache = _write(self.cache, k.astype(dt), (-k).astype(dt), meta.to_device())
        if commit:
            self.m.commit(ids)

    def check(self, ids: list[int]) -> None:
        """Every live sequence reads exactly its own prefix's keys/values (a sliding layer:
        from its window's first block on), zeros after."""
        meta = self.m.step_metadata(ids, 0)
        for layer in range(self.spec.num_layers):
            view = self.cache[layer]
            keys, values = jax.device_get(view.read(meta.to_device()))
            start = meta.groups[view.group].start
            for b, s in enumerate(ids):
                n, first = self.m.kv_len(s), int(start[b])
                want = self.kv_of(self.tokens[s][:n])[first:]
                got_k, got_v = np.asarray(keys[b], np.float32), np.asarray(values[b], np.float32)
                assert np.array_equal(got_k[: n - first], want), f"seq {s} layer {layer}: keys are not its own"
                assert np.array_equal(got_v[: n - first], -want), f"seq {s} layer {layer}: values are not its own"
                assert not got_k[n - first:].any() and not got_v[n - first:].any()
        self.m.check_integrity()


@jax.jit
def _write(cache, k, v, meta):
    return pk.PagedKVCache(tuple(view.write(k, v, meta) for view in cache.views))


PROMPT = np.arange(10, 23)  # 13 tokens: 3 full blocks, the last token always computed


@pytest.fixture(params=["split", "unified", "split-hybrid"])
def t(request) -> Tenant:
    tenant = Tenant(request.param.split("-")[0], hybrid=request.param.endswith("hybrid"))
    tenant.fill_with_sentinel()
    return tenant


def test_released_before_prefill_caches_nothing(t):
    assert t.admit(1, PROMPT) == 0
    t.m.release(1)  # cancelled (or preempted) before its prefill ran
    assert t.m.prefix_cache.stats().blocks_stored == 0
    assert t.admit(2, PROMPT) == 0  # on today's main: 12 tokens "cached", all sentinel
    t.run([2], [13])
    t.check([2])
    assert t.admit(3, PROMPT) == 12  # written and committed: now a hit is real
    t.run([3], [1])
    t.check([2, 3])


def test_identical_prompts_in_one_step_never_hit_each_other(t):
    assert t.admit(1, PROMPT) == 0
    assert t.admit(2, PROMPT) == 0  # 1's blocks are not written yet
    t.run([2], [13])  # the second one is stepped first
    t.check([2])
    assert t.admit(3, PROMPT) == 12  # 2's committed blocks, not 1's unwritten ones
    t.run([1, 3], [13, 1])
    t.check([1, 2, 3])


def test_cancelled_chunked_prefill_caches_only_written_blocks(t):
    assert t.admit(1, PROMPT, chunk=6) == 0  # tokens 0..5 now: one full block
    t.run([1], [6])
    t.m.append([1], 5)  # the next chunk, tokens 6..10: allocated, never run
    t.m.step_metadata([1], 5)  # described, but cancelled before it runs
    t.m.release(1)
    assert t.admit(2, PROMPT) == 4  # only the block the first chunk wrote
    t.run([2], [9])
    t.check([2])


def test_eviction_then_rehit(t):
    assert t.admit(1, PROMPT) == 0
    t.run([1], [13])
    t.m.release(1)  # 3 keyed blocks wait in the cache
    t.m.admit(5, t.spec.usable_blocks * BS)  # needs every block: the cached ones are evicted
    t.tokens[5] = np.arange(500, 500 + t.spec.usable_blocks * BS)
    t.run([5], [t.spec.usable_blocks * BS])  # and overwritten by another prompt
    t.m.release(5)
    assert t.admit(2, PROMPT) == 0  # the keys left with the bytes
    t.run([2], [13])
    t.check([2])


def test_a_retried_step_and_copy_on_write_expose_nothing(t):
    assert t.admit(1, PROMPT) == 0
    t.run([1], [13])
    t.m.fork(1, 2)  # shares the partial last block
    t.tokens[2] = np.concatenate([PROMPT, [7]])
    t.tokens[1] = np.concatenate([PROMPT, [8]])
    t.m.append([2], 1)  # copy-on-write of the shared partial block
    t.m.step_metadata([2], 1)  # a step described, abandoned: its copy must not be lost
    t.m.append([1], 1)
    t.run([1, 2], [1, 1], commit=False)  # run, not committed: copies are carried again
    t.check([1, 2])
    t.run([1, 2], [0, 0])  # re-running a carried copy changes nothing
    t.check([1, 2])
    assert t.m.num_pending_copies == 0
    assert t.admit(3, np.concatenate([PROMPT, [7, 1, 2, 3]])) == 12
    t.run([3], [5])
    t.check([1, 2, 3])


def test_hybrid_hits_after_the_window_moved_and_sliding_evictions_expose_nothing():
    """Full + sliding layers, the sliding pool smaller: a conversation whose window has
    left its first blocks is continued (the sliding group hits only its window), then
    the sliding pool alone is pressed until its cached blocks are reused by another
    prompt: the full group still has the chain, and the hit must shrink to what both serve."""
    t = Tenant("split", hybrid=True, num_blocks=25, sliding_num_blocks=9)
    t.fill_with_sentinel()
    assert t.admit(1, PROMPT) == 0
    t.run([1], [13])
    for _ in range(7):  # decode: the window returns blocks 0..3 (keyed, cached)
        t.tokens[1] = np.concatenate([t.tokens[1], [len(t.tokens[1])]])
        t.m.append([1], 1)
        t.run([1], [1])
    t.m.cache_tokens(1, t.tokens[1])
    t.check([1])
    conversation = t.tokens[1]
    t.m.release(1)
    assert t.admit(2, np.concatenate([conversation, [3, 3]])) == 20  # window blocks 3, 4 hit; 0..2 null
    t.run([2], [2])
    t.check([2])
    t.m.release(2)
    assert t.admit(3, np.arange(300, 332)) == 0  # 8 blocks: the sliding pool evicts all it cached
    t.run([3], [32])
    t.m.release(3)
    assert len(t.m.prefix_cache.match(chain_hashes(conversation, BS, 5))) == 5  # the full group kept the chain
    assert t.admit(4, np.concatenate([conversation, [4, 4]])) == 0  # but no sliding window: no hit
    t.run([4], [22])
    t.check([4])
