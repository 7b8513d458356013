"""A greedy step returns each row's argmax token (`paged_kv.models.decoder.forward(greedy=True)`):
the token numpy's argmax picks from the same step's logits, for a tied head (Gemma 2) and
a separate one (Mistral), and its argmax rule matches numpy's on ties, NaN and -inf."""

from __future__ import annotations

import pathlib
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import paged_kv as pk
from paged_kv.models.decoder import _first_max, cache_spec, forward
from paged_kv.models.loader import load_model

FIXTURES = pathlib.Path(__file__).parent / "fixtures" / "hf"


@pytest.mark.parametrize("name", ["gemma2", "mistral"])
def test_greedy_tokens_are_the_logits_argmax(name):
    cfg, params = load_model(FIXTURES / name)
    spec = cache_spec(cfg, num_blocks=64, block_size=4, max_seq_len=64, max_batch_slots=4)
    m = pk.KVCacheManager(spec)
    rng = np.random.default_rng(0)
    prompts = [rng.integers(3, cfg.vocab_size, n) for n in (9, 4, 13)]
    for s, p in enumerate(prompts):
        m.admit(s, p.size)
    meta = m.step_metadata([0, 1, 2], [p.size for p in prompts])
    tokens = np.zeros((meta.batch_size, meta.query_len), np.int32)
    for b, p in enumerate(prompts):
        tokens[b, : p.size] = p

    @partial(jax.jit, static_argnums=4)
    def run(params, cache, tokens, meta, greedy):
        return forward(cfg, params, cache, tokens, meta, last_only=True, greedy=greedy)[0]

    device_meta = meta.to_device()
    logits = np.asarray(run(params, pk.PagedKVCache.init(spec), tokens, device_meta, False))
    picked = np.asarray(run(params, pk.PagedKVCache.init(spec), tokens, device_meta, True))
    assert picked.dtype == np.int32 and picked.shape == (meta.batch_size,)
    assert np.array_equal(picked[:3], np.argmax(logits[:3], axis=-1))


def test_the_argmax_rule_is_numpys():
    rng = np.random.default_rng(1)
    for trial in range(300):
        a = rng.integers(-3, 3, (7, 5)).astype(np.float32)  # many ties
        if trial % 3 == 0:
            a[rng.integers(7), rng.integers(5)] = np.nan
        if trial % 5 == 0:
            a[:, rng.integers(5)] = -np.inf
        for axis in (0, 1):
            assert np.array_equal(np.asarray(_first_max(jnp.asarray(a), axis)), np.argmax(a, axis=axis)), (a, axis)
