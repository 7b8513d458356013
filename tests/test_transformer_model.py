"""Decoding through the paged cache gives the logits of recomputing without a cache."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

import paged_kv as pk
from tiny_model import TinyConfig, forward_cached, forward_full, forward_gathered, init_params

CFG = TinyConfig()
BLOCK = 16
EDGE_LENGTHS = [1, 15, 16, 17, 31, 32, 33]


class Driver:
    """Runs serving steps for many sequences and keeps every logit it produced."""

    def __init__(self, dtype: str, num_blocks: int = 40, layout: str = "split", forward=forward_cached, cfg=CFG,
                 **spec_kw):
        self.forward, self.cfg = forward, cfg
        self.spec = pk.CacheSpec(
            num_layers=cfg.num_layers, num_blocks=num_blocks, block_size=BLOCK, max_blocks_per_seq=8,
            max_batch_slots=8, num_kv_heads=cfg.kv_heads, head_dim=cfg.head_dim, dtype=dtype, **spec_kw,
        )
        self.windows = tuple(
            self.spec.sliding_window if i in self.spec.sliding_layers else None for i in range(cfg.num_layers)
        )
        self.chunks = tuple(
            self.spec.attention_chunk_size if i in self.spec.chunked_layers else None for i in range(cfg.num_layers)
        )
        self.manager = pk.KVCacheManager(self.spec)
        self.cache = pk.PagedKVCache.init(self.spec, layout=layout)
        self.params = init_params(cfg)
        self.tokens: dict[int, list[int]] = {}
        self.logits: dict[int, dict[int, np.ndarray]] = {}
        self.rng = np.random.default_rng(1)

    def step(self, new_tokens: dict[int, list[int]]) -> None:
        """Write ``new_tokens[seq]`` for each sequence in one forward pass."""
        ids = list(new_tokens)
        counts = [len(new_tokens[s]) for s in ids]
        for s in ids:
            if s in self.manager:
                continue
            self.manager.admit(s, counts[ids.index(s)])
            self.tokens[s], self.logits[s] = [], {}
        grow = [s for s in ids if self.manager.kv_len(s) < len(self.tokens[s]) + len(new_tokens[s])]
        if grow:
            self.manager.append(grow, [len(new_tokens[s]) for s in grow])
        meta = self.manager.step_metadata(ids, counts)
        tok = np.zeros((meta.batch_size, meta.query_len), np.int32)
        for b, s in enumerate(ids):
            tok[b, : counts[b]] = new_tokens[s]
        logits, self.cache = self.forward(self.cfg, self.params, self.cache, jnp.asarray(tok), meta.to_device())
        self.manager.commit(ids)  # the step ran: its blocks may now be hit, its copies retire
        logits = np.asarray(logits)
        for b, s in enumerate(ids):
            for t, token in enumerate(new_tokens[s]):
                self.logits[s][len(self.tokens[s])] = logits[b, t]
                self.tokens[s].append(token)
        self.manager.check_integrity()

    def random_tokens(self, n: int) -> list[int]:
        return self.rng.integers(0, self.cfg.vocab, size=n).tolist()

    def assert_matches_recompute(self, seq_ids, kv_dtype, atol, pad_to: int | None = None) -> None:
        """Every logit each sequence produced equals recomputing it without a cache.
        ``pad_to``: recompute all of them in one call of that length (one compilation)."""
        if pad_to is not None:
            tokens = np.zeros((len(seq_ids), pad_to), np.int32)
            for b, s in enumerate(seq_ids):
                tokens[b, : len(self.tokens[s])] = self.tokens[s]
            refs = np.asarray(forward_full(self.cfg, self.params, jnp.asarray(tokens), kv_dtype, self.windows,
                                           self.chunks))
        for b, s in enumerate(seq_ids):
            n = len(self.tokens[s])
            if pad_to is None:
                ref = np.asarray(forward_full(self.cfg, self.params, jnp.asarray([self.tokens[s]]), kv_dtype,
                                              self.windows, self.chunks))[0]
            else:
                ref = refs[b, :n]
            got = np.stack([self.logits[s][p] for p in range(n)])
            np.testing.assert_allclose(got, ref, atol=atol, rtol=0, err_msg=f"sequence {s}")


LAYOUTS = {
    "full": {},
    "all-sliding": dict(sliding_window=20, sliding_layers=(0, 1), sliding_num_blocks=24),
    "mixed": dict(sliding_window=16, sliding_layers=(1,), sliding_num_blocks=24),
}


def edge_scenario(d: Driver, steps: int, release_at: int, after_step=None) -> list[int]:
    """Batched prefill of prompts at every block edge, then ``steps`` decode steps; at
    step ``release_at`` one sequence finishes and a new request, prefilled in two
    chunks, gets its blocks (stale keys must not leak into it). Returns the live ids."""
    d.step({i: d.random_tokens(n) for i, n in enumerate(EDGE_LENGTHS)})
    live = list(range(len(EDGE_LENGTHS)))
    for step in range(steps):
        if step == release_at:
            d.manager.release(2)
            live.remove(2)
            d.step({100: d.random_tokens(20)})
            d.step({100: d.random_tokens(13)})
            live.append(100)
        d.step({s: d.random_tokens(1) for s in live})
        if after_step is not None:
            after_step(live)
    return live


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("dtype,kv_dtype,atol", [("float32", jnp.float32, 2e-4), ("bfloat16", jnp.bfloat16, 2e-3)])
def test_decode_through_pages_equals_recompute(layout, dtype, kv_dtype, atol):
    d = Driver(dtype, **LAYOUTS[layout])

    def sliding_bound(live):
        if d.spec.sliding_layers:
            # A decoding sequence holds at most ceil(W / block) + 1 blocks of a sliding layer.
            g = len(d.spec.groups) - 1
            assert max(d.manager.block_table(s, g).size for s in live) <= d.spec.window_blocks(1)

    live = edge_scenario(d, steps=20, release_at=6, after_step=sliding_bound)
    d.assert_matches_recompute(live, kv_dtype, atol)
    lengths = sorted(len(d.tokens[s]) for s in live)
    assert lengths == sorted([1 + 20, 15 + 20, 17 + 20, 31 + 20, 32 + 20, 33 + 20, 33 + 14])


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_mixed_prefill_and_decode_in_one_step(layout):
    """A chunked-prefill step: one row decodes 1 token while another prefills 9."""
    d = Driver("float32", **LAYOUTS[layout])
    d.step({0: d.random_tokens(16), 1: d.random_tokens(5)})
    d.step({0: d.random_tokens(1), 1: d.random_tokens(9)})
    d.step({0: d.random_tokens(1), 1: d.random_tokens(1), 2: d.random_tokens(17)})
    d.assert_matches_recompute([0, 1, 2], jnp.float32, 2e-4)


def test_gathered_view_path_equals_recompute():
    """The seed-compatible path (`concatenate_to_cache` + dense attention) stays exact."""
    d = Driver("bfloat16", forward=forward_gathered, **LAYOUTS["mixed"])
    live = edge_scenario(d, steps=6, release_at=2)
    d.assert_matches_recompute(live, jnp.bfloat16, 2e-3)


CHUNKED_MIXES = {  # chunks of 24 (not a multiple of the 16-token block) and 32 (a multiple)
    "full+chunked": (CFG, dict(attention_chunk_size=24, chunked_layers=(1,), chunked_num_blocks=16)),
    "sliding+chunked": (CFG, dict(sliding_window=16, sliding_layers=(0,), attention_chunk_size=32, chunked_layers=(1,))),
    "full+sliding+chunked": (TinyConfig(num_layers=3), dict(sliding_window=16, sliding_layers=(1,),
                                                            attention_chunk_size=24, chunked_layers=(2,))),
}


@pytest.mark.parametrize("mix", list(CHUNKED_MIXES))
def test_chunked_layers_decode_equals_recompute(mix):
    """Chunked local attention (Llama 4) beside full and sliding layers, through one
    manager: a prefill, then a mixed step (decodes beside a prefill that crosses a
    chunk edge), then decodes whose tokens start new chunks (the host returns the
    earlier chunk's blocks then). Two step shapes (T=32, T=1): few compilations."""
    cfg, spec_kw = CHUNKED_MIXES[mix]
    d = Driver("float32", cfg=cfg, **spec_kw)
    chunk = d.spec.attention_chunk_size
    g = len(d.spec.groups) - 1  # the chunked group comes last
    d.step({0: d.random_tokens(31), 1: d.random_tokens(25), 2: d.random_tokens(23), 3: d.random_tokens(4)})
    d.step({0: d.random_tokens(1), 1: d.random_tokens(1), 2: d.random_tokens(1), 3: d.random_tokens(28)})
    assert d.manager.block_table(3, g).size == 2  # its prefill began in chunk 0: nothing freed yet
    for _ in range(6):
        d.step({s: d.random_tokens(1) for s in range(4)})
        for s in range(4):  # a row holds its blocks from the one holding its last token's chunk start
            n = d.manager.kv_len(s)
            assert d.manager.block_table(s, g).size == d.spec.blocks_for(n) - (n - 1) // chunk * chunk // BLOCK
    d.assert_matches_recompute(list(range(4)), jnp.float32, 2e-4, pad_to=48)
