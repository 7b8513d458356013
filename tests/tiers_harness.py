"""A small serving loop over a manager with tiers, for the tier tests: prompts admitted
through the prefix cache, keys and values that are a function of (token, position,
layer) alone -- so writing a prompt again (a recompute) writes the same bits -- and a
read of any sequence through the views.

Every metadata is padded to one shape (`_one_shape`, as the device state machine does),
so the whole module compiles one write and one read per spec.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

import paged_kv as pk
from paged_kv.tiers import CacheTiers, flush
from test_state_machine import _one_shape

BLOCK = 4
KINDS = {
    "split-bf16": ("split", {}),
    "unified-bf16": ("unified", {}),
    "split-int8": ("split", dict(kv_format="int8")),
    "unified-fp8": ("unified", dict(kv_format="fp8")),
}
GROUPS = {
    "full": dict(num_layers=2),
    "full-sliding-chunked": dict(num_layers=3, sliding_window=6, sliding_layers=(1,), sliding_num_blocks=12,
                                 attention_chunk_size=8, chunked_layers=(2,), chunked_num_blocks=12),
}


def make_spec(groups: str = "full", num_blocks: int = 12, **kw) -> pk.CacheSpec:
    return pk.CacheSpec(num_blocks=num_blocks, block_size=BLOCK, max_blocks_per_seq=8, max_batch_slots=2,
                        dtype="bfloat16", **{"num_kv_heads": 2, "head_dim": 8, **GROUPS[groups], **kw})


def kv_of(tokens: np.ndarray, positions: np.ndarray, layers: int) -> tuple[np.ndarray, np.ndarray]:
    """Keys and values ``[n, layers, heads, dim]`` (float32) of tokens at positions: a
    hash of (token, position, layer, element), so equal prefixes give equal bits."""
    seed = (tokens.astype(np.uint64) * np.uint64(0x9E3779B97F4A7C15) + positions.astype(np.uint64))
    grid = np.arange(layers * 2 * 8 * 2, dtype=np.uint64).reshape(1, layers, 2, 8, 2)
    x = seed[:, None, None, None, None] * np.uint64(0xBF58476D1CE4E5B9) + grid * np.uint64(0x94D049BB133111EB)
    x ^= x >> np.uint64(31)
    vals = ((x % np.uint64(2001)).astype(np.float32) - 1000.0) / 250.0
    return vals[..., 0], vals[..., 1]


@jax.jit
def _write(cache, k, v, meta):
    return pk.PagedKVCache(tuple(view.write(k[:, :, i], v[:, :, i], meta) for i, view in enumerate(cache.views)))


@jax.jit
def _read(cache, meta):
    return tuple(view.read(meta) for view in cache.views)


class Server:
    """A manager, its cache and (optionally) tiers; `serve` admits a prompt through the
    prefix cache, flushes the tiers' moves, writes what was not hit and commits."""

    def __init__(self, spec: pk.CacheSpec, layout: str = "split", **tiers):
        self.spec, self.layout = spec, layout
        self.manager = pk.KVCacheManager(spec, prefix_cache=True)
        self.cache = pk.PagedKVCache.init(spec, layout=layout)
        self.tiers = CacheTiers(self.manager, layout=layout, **tiers) if tiers else None
        self.tokens: dict[int, np.ndarray] = {}

    def flush(self) -> None:
        if self.tiers is not None:
            self.cache = flush(self.cache, self.tiers, wait=True)

    def serve(self, seq: int, tokens, cache_key=None, retention=None) -> int:
        """Admit and prefill ``tokens``; returns the tokens the cache served."""
        tokens = np.asarray(tokens, np.int64)
        cached = self.manager.admit_prompt(seq, tokens, cache_key, retention=retention)
        self.tokens[seq] = tokens
        self.write(seq, cached, tokens.size)
        return cached

    def write(self, seq: int, start: int, stop: int) -> None:
        self.flush()  # evicted blocks copied down, hits brought up: before the step writes
        meta = self.manager.step_metadata([seq], stop - start)
        k, v = kv_of(self.tokens[seq][start:stop], np.arange(start, stop), self.spec.num_layers)
        T = self.spec.max_seq_len
        kk = np.zeros((self.spec.max_batch_slots, T, *k.shape[1:]), np.float32)
        vv = np.zeros_like(kk)
        kk[0, : stop - start], vv[0, : stop - start] = k, v
        self.cache = _write(self.cache, jnp.asarray(kk, jnp.bfloat16), jnp.asarray(vv, jnp.bfloat16),
                            _one_shape(meta, self.spec).to_device())
        self.manager.commit([seq])

    def finish(self, seq: int, cache_key=None) -> None:
        self.manager.cache_tokens(seq, self.tokens[seq], cache_key)
        self.manager.release(seq)

    def read(self, seq: int) -> list[tuple[np.ndarray, np.ndarray]]:
        """Every layer's keys and values of ``seq`` as its next decode step reads them."""
        meta = self.manager.step_metadata([seq], 0)
        out = _read(self.cache, _one_shape(meta, self.spec).to_device())
        return [(np.asarray(k[0]), np.asarray(v[0])) for k, v in out]

    def check(self) -> None:
        self.manager.check_integrity()
        if self.tiers is not None:
            self.tiers.check_integrity()


def recompute(spec: pk.CacheSpec, layout: str, tokens) -> list[tuple[np.ndarray, np.ndarray]]:
    """What a cache without tiers reads for ``tokens`` prefilled in one step."""
    s = Server(spec, layout)
    s.serve(0, tokens)
    return s.read(0)


def block_at(tiers: CacheTiers, group: int, key: int) -> tuple[str, int]:
    """Where a written block's bytes are: ``(segment path, byte offset)``."""
    import os

    seg, i = tiers.directory.loc[(group, key)]
    assert seg.written, "flush(wait=True) first: the block is still being written"
    return os.path.join(tiers.directory.path, seg.name), seg.start + seg.offsets[i]


def same_bits(a, b) -> bool:
    return all(np.array_equal(x.view(np.uint8), y.view(np.uint8)) for la, lb in zip(a, b) for x, y in zip(la, lb))
