"""One decoder-only transformer in plain JAX over the paged cache, for every supported family.

Llama 2/3, Mistral, Qwen2/2.5, Qwen3, Gemma 2 and Gemma 3 (text) are the same network
with different switches; `ModelConfig` holds them as data (`paged_kv.models.families`
says which family sets which), and `forward` reads them while tracing, so one jitted
step is specialised to one model with no per-family copy of the code:

- **projections**: q/k/v biases (``qkv_bias``: Qwen2, or ``attention_bias``), an
  output-projection bias (``o_bias``); an RMSNorm over each head of q and k before
  RoPE (``qk_norm``: Qwen3, Gemma 3);
- **norms**: RMSNorm computed in float32 as transformers does, either ``w * x`` (Llama)
  or ``(1 + w) * x`` (``norm_unit_offset``: Gemma); ``post_norms`` adds Gemma's norms
  after the attention and after the MLP (transformers' ``post_attention_layernorm`` /
  ``pre_feedforward_layernorm`` / ``post_feedforward_layernorm``);
- **embeddings** times ``sqrt(hidden_size)`` rounded to the weights' dtype
  (``embed_scale``: Gemma), tied or separate unembedding;
- **MLP**: gated, with ``hidden_act`` "silu" (SwiGLU) or "gelu_pytorch_tanh" (GeGLU);
- **attention**: grouped-query, softmax scale ``query_pre_attn_scalar ** -0.5`` (default
  ``head_dim ** -0.5``), an optional logit soft cap ``cap * tanh(x / cap)``
  (``attn_logit_softcap``: Gemma 2) and a final-logit soft cap (``final_logit_softcap``);
- **layers**: ``sliding_window`` applies to ``sliding_layers`` (None: every layer,
  Mistral); those become the cache's sliding layer group (`cache_spec`), and a sliding
  layer may use its own RoPE (``local_rope_theta`` / ``local_rope_scaling``: Gemma 3's
  10k local base beside a 1M global base with linear scaling).

Each layer's attention goes through the cache in one function, `attention`, exactly as
the README tells users to.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar

import jax
import jax.numpy as jnp
import numpy as np

from paged_kv.cache import PagedKVCache
from paged_kv.errors import SpecError
from paged_kv.metadata import StepMetadata
from paged_kv.spec import CacheSpec

if TYPE_CHECKING:
    from paged_kv.views.transformer import PagedLayerView

ROPE_TYPES = ("default", "linear", "llama3", "yarn")
ACTIVATIONS = ("silu", "gelu_pytorch_tanh", "gelu_new")
"""``hidden_act`` / ``hidden_activation`` values the MLP computes (transformers' ACT2FN
names): SiLU, and GELU's tanh approximation (Gemma's ``gelu_pytorch_tanh``; GPT-2's
``gelu_new`` is the same formula)."""

Params = dict[str, Any]
"""A model's weights by name (``layers``: one such dict per layer), as the loader builds them."""
_Aux = TypeVar("_Aux")


@dataclasses.dataclass(frozen=True)
class RopeScaling:
    """How rotary frequencies are rescaled (``rope_type`` "linear", "llama3" or "yarn").

    "linear" divides every frequency by ``factor``; "llama3" divides the low ones by
    ``factor``, keeps the high ones and interpolates between (Llama 3.1's scheme);
    "yarn" blends each frequency's divided and original values by a ramp over the
    dimensions that turn between ``beta_slow`` and ``beta_fast`` times within the
    original context, and scales cos and sin by ``attention_factor`` (YaRN, as
    transformers computes it).
    """

    rope_type: str
    factor: float
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    truncate: bool = True
    attention_factor: float = 1.0  # cos and sin are multiplied by it (1 but for yarn)


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """What the decoder needs of a model's ``config.json`` (hashable: a static jit argument).

    The defaults are a Llama; `paged_kv.models.loader.load_config` fills in each
    family's switches from its ``config.json`` by transformers' rules.
    """

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
    sliding_layers: tuple[int, ...] | None = None  # None: every layer slides when sliding_window is set
    local_rope_theta: float | None = None  # sliding layers' RoPE base (Gemma 3); None: rope_theta
    local_rope_scaling: RopeScaling | None = None  # sliding layers' scaling when local_rope_theta is set
    tie_word_embeddings: bool = False
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()  # any of them ends generation (Llama 3 lists several)
    model_type: str = "llama"
    hidden_act: str = "silu"
    qkv_bias: bool = False
    o_bias: bool = False
    qk_norm: bool = False
    norm_unit_offset: bool = False
    embed_scale: bool = False
    post_norms: bool = False
    query_pre_attn_scalar: float | None = None
    attn_logit_softcap: float | None = None
    final_logit_softcap: float | None = None

    def __post_init__(self) -> None:
        if self.num_heads % self.num_kv_heads:
            raise SpecError(
                f"num_attention_heads={self.num_heads} is not a multiple of num_key_value_heads={self.num_kv_heads}"
            )
        if self.hidden_act not in ACTIVATIONS:
            raise SpecError(f"hidden_act={self.hidden_act!r} is not supported (supported: {ACTIVATIONS})")
        if self.sliding_layers is not None and any(not 0 <= i < self.num_layers for i in self.sliding_layers):
            raise SpecError(f"sliding_layers={self.sliding_layers!r} must be layer indices in [0, {self.num_layers})")

    @property
    def layers_sliding(self) -> tuple[int, ...]:
        """Indices of the layers that attend through the sliding window (none without one)."""
        if self.sliding_window is None:
            return ()
        return tuple(range(self.num_layers)) if self.sliding_layers is None else tuple(self.sliding_layers)

    @property
    def attention_scale(self) -> float:
        """The softmax scale: ``query_pre_attn_scalar ** -0.5`` (Gemma), else ``head_dim ** -0.5``."""
        scale: float = (self.query_pre_attn_scalar if self.query_pre_attn_scalar is not None else self.head_dim) ** -0.5
        return scale


LlamaConfig = ModelConfig  # the name the Llama/Mistral-only model layer had


def rope_inv_freq(cfg: ModelConfig, local: bool = False) -> np.ndarray:
    """float32 ``[head_dim // 2]`` inverse frequencies, computed as transformers computes them
    (``local``: a sliding layer's, which differ where ``local_rope_theta`` is set)."""
    theta, s = cfg.rope_theta, cfg.rope_scaling
    if local and cfg.local_rope_theta is not None:
        theta, s = cfg.local_rope_theta, cfg.local_rope_scaling
    dim = cfg.head_dim
    inv = (1.0 / (np.float32(theta) ** (np.arange(0, dim, 2, dtype=np.float32) / np.float32(dim))))
    inv = inv.astype(np.float32)
    if s is None:
        return inv
    if s.rope_type == "linear":
        return (inv / np.float32(s.factor)).astype(np.float32)
    if s.rope_type == "yarn":
        return _yarn_inv_freq(inv, s, dim, theta)
    old = s.original_max_position_embeddings
    low_wavelen, high_wavelen = old / s.low_freq_factor, old / s.high_freq_factor
    wavelen = np.float32(2 * math.pi) / inv
    scaled = np.where(wavelen > low_wavelen, inv / np.float32(s.factor), inv).astype(np.float32)
    smooth = ((old / wavelen - s.low_freq_factor) / (s.high_freq_factor - s.low_freq_factor)).astype(np.float32)
    smoothed = (1 - smooth) * scaled / np.float32(s.factor) + smooth * scaled
    medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
    return np.where(medium, smoothed, scaled).astype(np.float32)


def _yarn_inv_freq(inv: np.ndarray, s: RopeScaling, dim: int, theta: float) -> np.ndarray:
    """YaRN's frequencies: ``inv`` (unscaled) where a dimension turns more than
    ``beta_fast`` times over the original context, ``inv / factor`` where it turns fewer
    than ``beta_slow`` times, a linear ramp between (over dimension indices)."""
    def turns_to_dim(turns: float) -> float:  # the dimension that turns ``turns`` times in the original context
        return dim * math.log(s.original_max_position_embeddings / (turns * 2 * math.pi)) / (2 * math.log(theta))

    low, high = turns_to_dim(s.beta_fast), turns_to_dim(s.beta_slow)
    if s.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # as transformers: a ramp of zero width would divide by zero
    ramp = np.clip((np.arange(dim // 2, dtype=np.float32) - np.float32(low)) / np.float32(high - low), 0, 1)
    keep = (1 - ramp).astype(np.float32)  # 1: extrapolate (the original frequency), 0: interpolate
    out: np.ndarray = ((inv / np.float32(s.factor)) * (1 - keep) + inv * keep).astype(np.float32)
    return out


def rope_tables(positions: jax.Array | np.ndarray, inv_freq: np.ndarray, scale: float = 1.0) -> tuple[jax.Array, jax.Array]:
    """cos, sin float32 ``[B, T, head_dim]`` for integer ``positions [B, T]`` (halves repeated, as HF),
    times ``scale`` (YaRN's attention factor)."""
    freqs = positions[..., None].astype(jnp.float32) * jnp.asarray(inv_freq)
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    if scale == 1.0:
        return jnp.cos(emb), jnp.sin(emb)
    return jnp.cos(emb) * np.float32(scale), jnp.sin(emb) * np.float32(scale)


def _rope_scale(cfg: ModelConfig, local: bool = False) -> float:
    s = cfg.local_rope_scaling if local and cfg.local_rope_theta is not None else cfg.rope_scaling
    return 1.0 if s is None else s.attention_factor


def _layer_ropes(cfg: ModelConfig, positions: jax.Array | np.ndarray) -> list[tuple[jax.Array, jax.Array]]:
    """Each layer's (cos, sin): one table, or a second for the sliding layers when their
    RoPE differs (Gemma 3)."""
    full = rope_tables(positions, rope_inv_freq(cfg), _rope_scale(cfg))
    if cfg.local_rope_theta is None or not cfg.layers_sliding:
        return [full] * cfg.num_layers
    local = rope_tables(positions, rope_inv_freq(cfg, local=True), _rope_scale(cfg, local=True))
    sliding = set(cfg.layers_sliding)
    return [local if i in sliding else full for i in range(cfg.num_layers)]


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """``x * cos + rotate_half(x) * sin`` over ``x [B, T, heads, head_dim]``."""
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    cos, sin = cos[:, :, None].astype(x.dtype), sin[:, :, None].astype(x.dtype)
    return x * cos + rotated * sin


def rms_norm(x: jax.Array, weight: jax.Array, eps: float, unit_offset: bool = False) -> jax.Array:
    """RMSNorm over the last axis as transformers computes it: normalized in float32;
    Llama's then cast back and scaled by ``weight``, Gemma's (``unit_offset``) scaled by
    ``1 + weight`` in float32 and then cast back."""
    x32 = x.astype(jnp.float32)
    normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    if unit_offset:
        return (normed * (1.0 + weight.astype(jnp.float32))).astype(x.dtype)
    return weight * normed.astype(x.dtype)


def _act(name: str, x: jax.Array) -> jax.Array:
    return jax.nn.silu(x) if name == "silu" else jax.nn.gelu(x, approximate=True)


def soft_cap(x: jax.Array, cap: float | None) -> jax.Array:
    """``cap * tanh(x / cap)`` (None: ``x``)."""
    return x if cap is None else cap * jnp.tanh(x / cap)


def dense_attention(q: jax.Array, keys: jax.Array, values: jax.Array, mask: jax.Array, *,
                    scale: float | None = None, logit_cap: float | None = None) -> jax.Array:
    """Grouped-query attention: ``q [B, T, H, D]``, keys/values ``[B, S, KVH, D]``, mask bool ``[B, T, S]``.

    Query head ``h`` reads KV head ``h // (H // KVH)``, as HF's ``repeat_kv``. ``scale``
    defaults to ``1/sqrt(D)``; ``logit_cap`` soft-caps the scaled logits. Masked scores
    take the float32 minimum (not -inf) so an all-masked padding row yields finite
    garbage rather than NaN; its output is never read.
    """
    b, t, h, d = q.shape
    kvh = keys.shape[2]
    qg = q.reshape(b, t, kvh, h // kvh, d)
    scale = d ** -0.5 if scale is None else scale
    scores = jnp.einsum("btgrd,bsgd->bgrts", qg, keys, preferred_element_type=jnp.float32) * scale
    scores = soft_cap(scores, logit_cap)
    scores = jnp.where(mask[:, None, None], scores, jnp.finfo(jnp.float32).min)  # type: ignore[no-untyped-call]  # jax's finfo is unannotated
    probs = jax.nn.softmax(scores, axis=-1).astype(values.dtype)
    out = jnp.einsum("bgrts,bsgd->btgrd", probs, values)
    return out.reshape(b, t, h, d)


def attention(view: PagedLayerView, q: jax.Array, k: jax.Array, v: jax.Array, metadata: StepMetadata, *,
              scale: float | None = None, logit_cap: float | None = None) -> tuple[jax.Array, PagedLayerView]:
    """One layer's attention through its cache view: returns (out ``[B, T, H, D]``, new view).

    The single place the model touches the cache: `view.attention` writes this step's
    keys/values and attends to the pages in place (no gathered copy; sliding layers
    apply their window). ``scale`` (default ``1/sqrt(head_dim)``) and ``logit_cap``
    (a soft cap on the scaled logits) are the view's ``scale`` and ``soft_cap``.
    """
    out, view = view.attention(q, k, v, metadata, scale=scale, soft_cap=logit_cap)
    return out, view


def _norm(cfg: ModelConfig, x: jax.Array, weight: jax.Array) -> jax.Array:
    return rms_norm(x, weight, cfg.rms_norm_eps, cfg.norm_unit_offset)


def _layer(cfg: ModelConfig, layer: Params, x: jax.Array, cos: jax.Array, sin: jax.Array,
           attend: Callable[[jax.Array, jax.Array, jax.Array], tuple[jax.Array, _Aux]]) -> tuple[jax.Array, _Aux]:
    """One decoder layer; ``attend(q, k, v) -> (out, aux)`` does the attention (through
    the cache, or over the step's own keys); returns the new residual stream and ``aux``."""
    b, t, _ = x.shape
    h = _norm(cfg, x, layer["attn_norm"])
    q, k, v = h @ layer["wq"], h @ layer["wk"], h @ layer["wv"]
    if cfg.qkv_bias:
        q, k, v = q + layer["bq"], k + layer["bk"], v + layer["bv"]
    q = q.reshape(b, t, cfg.num_heads, cfg.head_dim)
    k = k.reshape(b, t, cfg.num_kv_heads, cfg.head_dim)
    v = v.reshape(b, t, cfg.num_kv_heads, cfg.head_dim)
    if cfg.qk_norm:
        q, k = _norm(cfg, q, layer["q_norm"]), _norm(cfg, k, layer["k_norm"])
    out, aux = attend(apply_rope(q, cos, sin), apply_rope(k, cos, sin), v)
    out = out.reshape(b, t, -1) @ layer["wo"]
    if cfg.o_bias:
        out = out + layer["bo"]
    if cfg.post_norms:
        out = _norm(cfg, out, layer["post_attn_norm"])
    x = x + out
    h = _norm(cfg, x, layer["mlp_norm"])
    out = (_act(cfg.hidden_act, h @ layer["w_gate"]) * (h @ layer["w_up"])) @ layer["w_down"]
    if cfg.post_norms:
        out = _norm(cfg, out, layer["post_mlp_norm"])
    return x + out, aux


def _embed(cfg: ModelConfig, params: Params, tokens: jax.Array) -> jax.Array:
    x: jax.Array = params["embed"][tokens]
    if cfg.embed_scale:  # transformers: a float32 scalar cast to the weights' dtype, then multiplied
        x = x * jnp.asarray(np.float32(math.sqrt(cfg.hidden_size))).astype(x.dtype)
    return x


def _logits(cfg: ModelConfig, params: Params, x: jax.Array) -> jax.Array:
    x = _norm(cfg, x, params["norm"])
    head = params["embed"].T if cfg.tie_word_embeddings else params["lm_head"]
    return soft_cap((x @ head).astype(jnp.float32), cfg.final_logit_softcap)


def _greedy(cfg: ModelConfig, params: Params, x: jax.Array) -> jax.Array:
    """The argmax token of each row of ``x [B, D]``'s logits, without returning them. A
    tied head is multiplied as ``embed @ x.T`` (``[vocab, B]``): XLA:CPU runs that product
    about 1.5x faster than ``x @ embed.T``, and the argmax needs no transpose back. The
    soft cap stays: monotonic, but it saturates, and saturated logits tie."""
    x = _norm(cfg, x, params["norm"])
    if cfg.tie_word_embeddings:
        return _first_max(soft_cap((params["embed"] @ x.T).astype(jnp.float32), cfg.final_logit_softcap), axis=0)
    return _first_max(soft_cap((x @ params["lm_head"]).astype(jnp.float32), cfg.final_logit_softcap), axis=1)


def _first_max(logits: jax.Array, axis: int) -> jax.Array:
    """``np.argmax`` along ``axis`` (the first maximum; the first NaN where there is one), as
    two plain reductions: XLA:CPU runs jnp.argmax's paired (value, index) reduction
    several times slower, ~2.7 ms of a 32M model's batch-32 step."""
    top = jnp.max(logits, axis=axis, keepdims=True)
    index = jax.lax.broadcasted_iota(jnp.int32, logits.shape, axis)
    hit = (logits == top) | jnp.isnan(logits)
    return jnp.min(jnp.where(hit, index, logits.shape[axis]), axis=axis)


def forward(cfg: ModelConfig, params: Params, cache: PagedKVCache, tokens: jax.Array, metadata: StepMetadata,
            last_only: bool = False, greedy: bool = False) -> tuple[jax.Array, PagedKVCache]:
    """One step: ``tokens [B, T]`` laid out like ``metadata`` -> float32 logits and the new cache.

    Logits are ``[B, T, vocab]``, or ``[B, vocab]`` at each row's last new token when
    ``last_only`` (padding rows give garbage). ``greedy`` (implies ``last_only``): int32
    ``[B]``, the argmax token of each row's last new token, instead of its logits (what
    greedy decoding needs: no ``[B, vocab]`` array leaves the device). Jit it with
    ``cfg``, ``last_only`` and ``greedy`` static and the cache donated.
    """
    x = _embed(cfg, params, tokens)
    ropes = _layer_ropes(cfg, metadata.positions)
    scale, cap = cfg.attention_scale, cfg.attn_logit_softcap
    views: list[PagedLayerView] = []
    for i, layer in enumerate(params["layers"]):
        cos, sin = ropes[i]
        # mypy cannot type a lambda's bound default: the attend callable is checked by `_layer`'s signature.
        x, view = _layer(cfg, layer, x, cos, sin,
                         lambda q, k, v, view=cache[i]: attention(view, q, k, v, metadata, scale=scale, logit_cap=cap))  # type: ignore[misc]
        views.append(view)
    if last_only or greedy:
        last = jnp.maximum(metadata.query_lens - 1, 0)
        x = jnp.take_along_axis(x, last[:, None, None], axis=1)[:, 0]
    if greedy:
        return _greedy(cfg, params, x), PagedKVCache(tuple(views))
    return _logits(cfg, params, x), PagedKVCache(tuple(views))


def forward_contiguous(cfg: ModelConfig, params: Params, tokens: jax.Array,
                       ) -> tuple[jax.Array, tuple[jax.Array, ...], tuple[jax.Array, ...]]:
    """A prefill with no cache: ``tokens [B, T]`` (padding after each prompt is harmless:
    attention is causal) -> float32 logits ``[B, T, vocab]`` and each layer's rotated
    keys and values ``[B, T, kv_heads, head_dim]``: the contiguous cache a separate
    prefill worker hands over (`paged_kv.insert_prefill` writes it into blocks).
    """
    t = tokens.shape[1]
    s = jnp.arange(t)
    causal = s[None, :] <= s[:, None]
    masks = {False: jnp.broadcast_to(causal, (tokens.shape[0], t, t))}
    if cfg.layers_sliding:
        windowed = causal & (s[None, :] > s[:, None] - cfg.sliding_window)  # type: ignore[operator]  # sliding layers: a window
        masks[True] = jnp.broadcast_to(windowed, (tokens.shape[0], t, t))
    sliding = set(cfg.layers_sliding)
    x = _embed(cfg, params, tokens)
    ropes = _layer_ropes(cfg, jnp.broadcast_to(s, tokens.shape))
    scale, cap = cfg.attention_scale, cfg.attn_logit_softcap
    keys: list[jax.Array] = []
    values: list[jax.Array] = []
    for i, layer in enumerate(params["layers"]):
        cos, sin = ropes[i]
        mask = masks[i in sliding]
        x, (k, v) = _layer(cfg, layer, x, cos, sin, lambda q, k, v, mask=mask: (  # type: ignore[misc]  # a bound default
            dense_attention(q, k, v, mask, scale=scale, logit_cap=cap), (k, v)))
        keys.append(k)
        values.append(v)
    return _logits(cfg, params, x), tuple(keys), tuple(values)


def cache_spec(cfg: ModelConfig, *, num_blocks: int, block_size: int, max_seq_len: int, max_batch_slots: int,
               dtype: str = "float32", sliding_num_blocks: int | None = None, **spec_fields: Any) -> CacheSpec:
    """The `CacheSpec` this model's layers need.

    The model's sliding layers (every layer for Mistral, Gemma's local layers, Qwen2's
    layers from ``max_window_layers`` on) form the spec's sliding group; a window no
    shorter than ``max_seq_len`` never masks anything, so those layers stay full.
    ``max_seq_len`` is rounded up to whole blocks. ``spec_fields``: other `CacheSpec`
    fields (``kv_format="int8"``, ``page_storage``, ...).
    """
    layers = cfg.layers_sliding
    window = cfg.sliding_window if layers and cfg.sliding_window < max_seq_len else None  # type: ignore[operator]  # layers: a window
    sliding: dict[str, Any] = dict(sliding_window=window, sliding_layers=layers,
                   sliding_num_blocks=sliding_num_blocks) if window is not None else {}
    return CacheSpec(num_layers=cfg.num_layers, num_blocks=num_blocks, block_size=block_size,
                     max_blocks_per_seq=-(-max_seq_len // block_size), max_batch_slots=max_batch_slots,
                     num_kv_heads=cfg.num_kv_heads, head_dim=cfg.head_dim, dtype=dtype, **sliding, **spec_fields)


__all__ = ["ACTIVATIONS", "LlamaConfig", "ModelConfig", "ROPE_TYPES", "RopeScaling", "attention", "cache_spec",
           "dense_attention", "forward", "forward_contiguous", "rms_norm", "rope_inv_freq", "soft_cap"]
