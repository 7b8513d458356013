"""A Llama-family decoder (Llama 2, Llama 3, Mistral) in plain JAX over the paged cache.

RMSNorm, rotary embeddings (plain, linear-scaled, or Llama-3 scaled), grouped-query
attention and a SwiGLU MLP, numerically as Hugging Face ``transformers`` computes
them (float32 RMSNorm and softmax, ``rotate_half`` RoPE on the HF weight layout). Each
layer's attention goes through the cache exactly as the README tells users to, in one
function, `attention`; Mistral's ``sliding_window`` makes every layer a sliding layer
of the cache (`cache_spec`).
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np

from paged_kv.cache import PagedKVCache
from paged_kv.errors import SpecError
from paged_kv.metadata import StepMetadata
from paged_kv.spec import CacheSpec

ROPE_TYPES = ("default", "linear", "llama3")


@dataclasses.dataclass(frozen=True)
class RopeScaling:
    """How rotary frequencies are rescaled (``rope_type`` "linear" or "llama3").

    "linear" divides every frequency by ``factor``; "llama3" divides the low ones by
    ``factor``, keeps the high ones and interpolates between (Llama 3.1's scheme).
    """

    rope_type: str
    factor: float
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
    """The fields of a Llama/Mistral ``config.json`` the model needs (hashable: a static jit argument)."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling | None = None
    sliding_window: int | None = None
    tie_word_embeddings: bool = False
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()  # any of them ends generation (Llama 3 lists several)

    def __post_init__(self) -> None:
        if self.num_heads % self.num_kv_heads:
            raise SpecError(
                f"num_attention_heads={self.num_heads} is not a multiple of num_key_value_heads={self.num_kv_heads}"
            )


def rope_inv_freq(cfg: LlamaConfig) -> np.ndarray:
    """float32 ``[head_dim // 2]`` inverse frequencies, computed as transformers computes them."""
    dim = cfg.head_dim
    inv = (1.0 / (np.float32(cfg.rope_theta) ** (np.arange(0, dim, 2, dtype=np.float32) / np.float32(dim))))
    inv = inv.astype(np.float32)
    s = cfg.rope_scaling
    if s is None:
        return inv
    if s.rope_type == "linear":
        return (inv / np.float32(s.factor)).astype(np.float32)
    old = s.original_max_position_embeddings
    low_wavelen, high_wavelen = old / s.low_freq_factor, old / s.high_freq_factor
    wavelen = np.float32(2 * math.pi) / inv
    scaled = np.where(wavelen > low_wavelen, inv / np.float32(s.factor), inv).astype(np.float32)
    smooth = ((old / wavelen - s.low_freq_factor) / (s.high_freq_factor - s.low_freq_factor)).astype(np.float32)
    smoothed = (1 - smooth) * scaled / np.float32(s.factor) + smooth * scaled
    medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
    return np.where(medium, smoothed, scaled).astype(np.float32)


def rope_tables(positions: jax.Array, inv_freq: np.ndarray) -> tuple[jax.Array, jax.Array]:
    """cos, sin float32 ``[B, T, head_dim]`` for integer ``positions [B, T]`` (halves repeated, as HF)."""
    freqs = positions[..., None].astype(jnp.float32) * jnp.asarray(inv_freq)
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    return jnp.cos(emb), jnp.sin(emb)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """``x * cos + rotate_half(x) * sin`` over ``x [B, T, heads, head_dim]``."""
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    cos, sin = cos[:, :, None].astype(x.dtype), sin[:, :, None].astype(x.dtype)
    return x * cos + rotated * sin


def rms_norm(x: jax.Array, weight: jax.Array, eps: float) -> jax.Array:
    """HF's LlamaRMSNorm: normalize in float32, cast back, then scale."""
    x32 = x.astype(jnp.float32)
    normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    return weight * normed.astype(x.dtype)


def dense_attention(q: jax.Array, keys: jax.Array, values: jax.Array, mask: jax.Array) -> jax.Array:
    """Grouped-query attention: ``q [B, T, H, D]``, keys/values ``[B, S, KVH, D]``, mask bool ``[B, T, S]``.

    Query head ``h`` reads KV head ``h // (H // KVH)``, as HF's ``repeat_kv``. Masked
    scores take the float32 minimum (not -inf) so an all-masked padding row yields
    finite garbage rather than NaN; its output is never read.
    """
    b, t, h, d = q.shape
    kvh = keys.shape[2]
    qg = q.reshape(b, t, kvh, h // kvh, d)
    scores = jnp.einsum("btgrd,bsgd->bgrts", qg, keys, preferred_element_type=jnp.float32) / math.sqrt(d)
    scores = jnp.where(mask[:, None, None], scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(values.dtype)
    out = jnp.einsum("bgrts,bsgd->btgrd", probs, values)
    return out.reshape(b, t, h, d)


def attention(view, q: jax.Array, k: jax.Array, v: jax.Array, metadata: StepMetadata):
    """One layer's attention through its cache view: returns (out ``[B, T, H, D]``, new view).

    The single place the model touches the cache: `view.attention` writes this step's
    keys/values and attends to the pages in place (no gathered copy; sliding layers
    apply their window).
    """
    out, view = view.attention(q, k, v, metadata)
    return out, view


def _layer(cfg: LlamaConfig, layer: dict, x, cos, sin, attend):
    """One decoder layer; ``attend(q, k, v) -> (out, aux)`` does the attention (through
    the cache, or over the step's own keys); returns the new residual stream and ``aux``."""
    b, t, _ = x.shape
    h = rms_norm(x, layer["attn_norm"], cfg.rms_norm_eps)
    q = (h @ layer["wq"]).reshape(b, t, cfg.num_heads, cfg.head_dim)
    k = (h @ layer["wk"]).reshape(b, t, cfg.num_kv_heads, cfg.head_dim)
    v = (h @ layer["wv"]).reshape(b, t, cfg.num_kv_heads, cfg.head_dim)
    out, aux = attend(apply_rope(q, cos, sin), apply_rope(k, cos, sin), v)
    x = x + out.reshape(b, t, -1) @ layer["wo"]
    h = rms_norm(x, layer["mlp_norm"], cfg.rms_norm_eps)
    x = x + (jax.nn.silu(h @ layer["w_gate"]) * (h @ layer["w_up"])) @ layer["w_down"]
    return x, aux


def _logits(cfg: LlamaConfig, params: dict, x: jax.Array) -> jax.Array:
    x = rms_norm(x, params["norm"], cfg.rms_norm_eps)
    head = params["embed"].T if cfg.tie_word_embeddings else params["lm_head"]
    return (x @ head).astype(jnp.float32)


def forward(cfg: LlamaConfig, params: dict, cache: PagedKVCache, tokens: jax.Array, metadata: StepMetadata,
            last_only: bool = False) -> tuple[jax.Array, PagedKVCache]:
    """One step: ``tokens [B, T]`` laid out like ``metadata`` -> float32 logits and the new cache.

    Logits are ``[B, T, vocab]``, or ``[B, vocab]`` at each row's last new token when
    ``last_only`` (what greedy decoding needs; padding rows give garbage). Jit it with
    ``cfg`` and ``last_only`` static and the cache donated.
    """
    x = params["embed"][tokens]
    cos, sin = rope_tables(metadata.positions, rope_inv_freq(cfg))
    views = []
    for i, layer in enumerate(params["layers"]):
        x, view = _layer(cfg, layer, x, cos, sin, lambda q, k, v, view=cache[i]: attention(view, q, k, v, metadata))
        views.append(view)
    if last_only:
        last = jnp.maximum(metadata.query_lens - 1, 0)
        x = jnp.take_along_axis(x, last[:, None, None], axis=1)[:, 0]
    return _logits(cfg, params, x), PagedKVCache(tuple(views))


def forward_contiguous(cfg: LlamaConfig, params: dict, tokens: jax.Array):
    """A prefill with no cache: ``tokens [B, T]`` (padding after each prompt is harmless:
    attention is causal) -> float32 logits ``[B, T, vocab]`` and each layer's rotated
    keys and values ``[B, T, kv_heads, head_dim]``: the contiguous cache a separate
    prefill worker hands over (`paged_kv.insert_prefill` writes it into blocks).
    """
    t = tokens.shape[1]
    s = jnp.arange(t)
    mask = s[None, :] <= s[:, None]
    if cfg.sliding_window is not None:
        mask &= s[None, :] > s[:, None] - cfg.sliding_window
    mask = jnp.broadcast_to(mask, (tokens.shape[0], t, t))
    x = params["embed"][tokens]
    cos, sin = rope_tables(jnp.broadcast_to(s, tokens.shape), rope_inv_freq(cfg))
    keys, values = [], []
    for layer in params["layers"]:
        x, (k, v) = _layer(cfg, layer, x, cos, sin, lambda q, k, v: (dense_attention(q, k, v, mask), (k, v)))
        keys.append(k)
        values.append(v)
    return _logits(cfg, params, x), tuple(keys), tuple(values)


def cache_spec(cfg: LlamaConfig, *, num_blocks: int, block_size: int, max_seq_len: int, max_batch_slots: int,
               dtype: str = "float32", sliding_num_blocks: int | None = None) -> CacheSpec:
    """The `CacheSpec` this model's layers need.

    A ``sliding_window`` makes every layer a sliding layer (Mistral); a window no
    shorter than ``max_seq_len`` never masks anything, so those layers stay full.
    ``max_seq_len`` is rounded up to whole blocks.
    """
    window = cfg.sliding_window if cfg.sliding_window is not None and cfg.sliding_window < max_seq_len else None
    sliding = dict(sliding_window=window, sliding_layers=tuple(range(cfg.num_layers)),
                   sliding_num_blocks=sliding_num_blocks) if window is not None else {}
    return CacheSpec(num_layers=cfg.num_layers, num_blocks=num_blocks, block_size=block_size,
                     max_blocks_per_seq=-(-max_seq_len // block_size), max_batch_slots=max_batch_slots,
                     num_kv_heads=cfg.num_kv_heads, head_dim=cfg.head_dim, dtype=dtype, **sliding)


__all__ = ["LlamaConfig", "RopeScaling", "ROPE_TYPES", "attention", "cache_spec", "dense_attention", "forward",
           "forward_contiguous",
           "rope_inv_freq", "rms_norm"]
