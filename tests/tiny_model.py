"""A tiny attention-only transformer (GQA, RoPE) used to prove the cache is exact.

`forward_cached` runs one step through a `PagedKVCache` with the in-place path
(`view.attention`: write, then attend to the pages); `forward_gathered` runs it
through the seed-compatible gathered view (`concatenate_to_cache` + dense
attention); `forward_full` recomputes full causal attention over a whole sequence
with no cache. All share every weight, so their logits must agree.
"""

from __future__ import annotations

import dataclasses
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np


@dataclasses.dataclass(frozen=True)
class TinyConfig:
    vocab: int = 61
    d_model: int = 32
    num_layers: int = 2
    q_heads: int = 4
    kv_heads: int = 2
    head_dim: int = 8


def init_params(cfg: TinyConfig, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    def w(*shape):
        return jnp.asarray(rng.normal(0, 1 / np.sqrt(shape[0]), size=shape), jnp.float32)
    layers = [
        dict(
            wq=w(cfg.d_model, cfg.q_heads * cfg.head_dim),
            wk=w(cfg.d_model, cfg.kv_heads * cfg.head_dim),
            wv=w(cfg.d_model, cfg.kv_heads * cfg.head_dim),
            wo=w(cfg.q_heads * cfg.head_dim, cfg.d_model),
        )
        for _ in range(cfg.num_layers)
    ]
    return dict(embed=w(cfg.vocab, cfg.d_model) * 4, unembed=w(cfg.d_model, cfg.vocab), layers=layers)


def rope(x: jax.Array, positions: jax.Array) -> jax.Array:
    """Rotary embedding: x [B, T, H, D], positions [B, T]."""
    d = x.shape[-1] // 2
    freq = 1.0 / (10000.0 ** (jnp.arange(d, dtype=jnp.float32) / d))
    ang = positions[..., None].astype(jnp.float32) * freq  # [B, T, d]
    cos, sin = jnp.cos(ang)[:, :, None, :], jnp.sin(ang)[:, :, None, :]
    x1, x2 = x[..., :d], x[..., d:]
    return jnp.concatenate([x1 * cos - x2 * sin, x1 * sin + x2 * cos], axis=-1)


def attention(q, keys, values, mask) -> jax.Array:
    """q [B,T,Hq,D], keys/values [B,S,Hkv,D], mask bool [B,T,S] -> [B,T,Hq*D]."""
    group = q.shape[2] // keys.shape[2]
    keys = jnp.repeat(keys.astype(jnp.float32), group, axis=2)
    values = jnp.repeat(values.astype(jnp.float32), group, axis=2)
    scores = jnp.einsum("bthd,bshd->bhts", q, keys) / np.sqrt(q.shape[-1])
    scores = jnp.where(mask[:, None], scores, -1e30)
    out = jnp.einsum("bhts,bshd->bthd", jax.nn.softmax(scores, axis=-1), values)
    return out.reshape(*out.shape[:2], -1)


def _qkv(cfg, layer, x, positions):
    b, t, _ = x.shape
    q = rope((x @ layer["wq"]).reshape(b, t, cfg.q_heads, cfg.head_dim), positions)
    k = rope((x @ layer["wk"]).reshape(b, t, cfg.kv_heads, cfg.head_dim), positions)
    v = (x @ layer["wv"]).reshape(b, t, cfg.kv_heads, cfg.head_dim)
    return q, k, v


@partial(jax.jit, static_argnums=0, donate_argnums=2)
def forward_cached(cfg: TinyConfig, params, cache, tokens, metadata):
    """One serving step: tokens [B, T] at metadata.positions -> logits [B, T, V], new cache.
    Attention reads the pages in place."""
    x = params["embed"][tokens]
    views = []
    for i, layer in enumerate(params["layers"]):
        q, k, v = _qkv(cfg, layer, x, metadata.positions)
        out, view = cache[i].attention(q, k, v, metadata)
        views.append(view)
        x = x + out.reshape(*out.shape[:2], -1) @ layer["wo"]
    return x @ params["unembed"], type(cache)(tuple(views))


@partial(jax.jit, static_argnums=0, donate_argnums=2)
def forward_gathered(cfg: TinyConfig, params, cache, tokens, metadata):
    """`forward_cached` through the gathered view: contiguous keys/values, dense mask."""
    x = params["embed"][tokens]
    views = []
    for i, layer in enumerate(params["layers"]):
        q, k, v = _qkv(cfg, layer, x, metadata.positions)
        keys, values, mask, view = cache[i].concatenate_to_cache(q, k, v, metadata)
        views.append(view)
        x = x + attention(q, keys, values, mask.dense(keys.shape[1])) @ layer["wo"]
    return x @ params["unembed"], type(cache)(tuple(views))


@partial(jax.jit, static_argnums=(0, 3, 4, 5))
def forward_full(cfg: TinyConfig, params, tokens, kv_dtype=jnp.float32, windows=None, chunks=None):
    """No cache: causal attention over tokens [B, L]; logits [B, L, V] (a row padded at
    its end gives its real positions' logits: attention is causal).

    ``windows[i]``: layer i attends to the last windows[i] tokens only (None: all).
    ``chunks[i]``: layer i attends only within its chunk of chunks[i] positions (Llama 4).
    Keys/values are rounded through ``kv_dtype`` exactly as the cache stores them; for
    quantized pages ``kv_dtype`` is one (key, value) pair of `paged_kv.quant.PageCodec`
    per layer, and each goes through its codec's encode and decode.
    """
    length = tokens.shape[1]
    positions = jnp.arange(length, dtype=jnp.int32)[None]
    x = params["embed"][tokens]
    s = jnp.arange(length)
    causal = s[None, :] <= s[:, None]
    for i, layer in enumerate(params["layers"]):
        window = windows[i] if windows is not None else None
        mask = causal if window is None else causal & (s[None, :] > s[:, None] - window)
        chunk = chunks[i] if chunks is not None else None
        if chunk is not None:
            mask &= s[None, :] // chunk == s[:, None] // chunk
        q, k, v = _qkv(cfg, layer, x, positions)
        if isinstance(kv_dtype, tuple):
            (kc, vc) = kv_dtype[i]
            k, v = kc.decode(*kc.encode(k)), vc.decode(*vc.encode(v))
        else:
            k, v = k.astype(kv_dtype), v.astype(kv_dtype)
        x = x + attention(q, k, v, mask[None]) @ layer["wo"]
    return x @ params["unembed"]
