"""A pending copy-on-write copy whose destination a chunked trim freed must die with
it: the free list may hand that block straight back (issue 28, item 1).

Before the fix, ``grow`` trimmed, re-allocated the trimmed block to the same row and
only then dropped dead copies: the stale copy (now pointing at a live block) ran
again on every later step and overwrote the new tokens with the fork's old ones.
"""

from __future__ import annotations

import jax
import numpy as np
import pytest

import paged_kv as pk

BLOCK, CHUNK = 4, 6


def _spec() -> pk.CacheSpec:
    return pk.CacheSpec(num_layers=2, num_blocks=14, block_size=BLOCK, max_blocks_per_seq=6, max_batch_slots=4,
                        num_kv_heads=1, head_dim=2, dtype="bfloat16", attention_chunk_size=CHUNK,
                        chunked_num_blocks=9, chunked_layers=(1,))


@jax.jit
def _write(cache, k, v, meta):
    return pk.PagedKVCache(tuple(view.write(k, v, meta) for view in cache.views))


@jax.jit
def _read(cache, meta):
    return tuple(view.read(meta) for view in cache.views)


class _Run:
    """Writes distinct bit patterns per token and keeps what each sequence should hold."""

    def __init__(self, layout):
        self.m = pk.KVCacheManager(_spec())
        self.cache = pk.PagedKVCache.init(self.m.spec, layout=layout)
        self.shadow: dict[int, list[int]] = {}
        self.next_bits = 0x3C00

    def step(self, seqs: list[int], counts: list[int], commit: bool):
        meta = self.m.step_metadata(seqs, counts)
        B, T = meta.batch_size, meta.query_len
        bits = np.zeros((B, T, 1, 2), np.uint16)
        for b, (s, c) in enumerate(zip(seqs, counts)):
            new = list(range(self.next_bits, self.next_bits + c))
            self.next_bits += c
            bits[b, :c] = np.array(new, np.uint16)[:, None, None]
            self.shadow[s] = self.shadow.get(s, [])[: self.m.kv_len(s) - c] + new
        kv = jax.lax.bitcast_convert_type(bits, jax.numpy.bfloat16)
        self.cache = _write(self.cache, kv, kv, meta.to_device())
        if commit:
            self.m.commit(seqs)

    def check(self, seqs: list[int]):
        meta = self.m.step_metadata(seqs, 0)
        out = jax.device_get(_read(self.cache, meta.to_device()))
        for layer, (keys, _) in enumerate(out):
            start = meta.groups[self.m.spec.layer_groups[layer] if hasattr(self.m.spec, "layer_groups") else 0].start
            for b, s in enumerate(seqs):
                first = int(meta.groups[self.cache.views[layer].group].start[b])
                n = self.m.kv_len(s)
                got = keys[b, : n - first, 0, 0].view(np.uint16).tolist()
                assert got == self.shadow[s][first:n], f"seq {s} layer {layer}"


@pytest.mark.parametrize("layout", ["split", "unified"])
def test_trimmed_copy_destination_is_never_copied_into_again(layout):
    r = _Run(layout)
    m = r.m
    m.admit(0, 14)
    r.step([0], [14], commit=True)
    m.fork(0, 2)
    r.shadow[2] = list(r.shadow[0])
    m.append([2], 5)  # copy-on-write of block 3 into a fresh block D (pending)
    r.step([2], [5], commit=False)
    m.append([2], 3)  # the chunk moves on: the chunked group trims D, and the free list hands it back
    r.step([2], [3], commit=False)
    m.check_integrity()
    m.append([0], 1)
    r.step([0], [1], commit=True)  # a stale copy would run again here
    m.check_integrity()
    r.check([0, 2])
