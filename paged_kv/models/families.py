"""The supported model families as data: what each ``model_type`` switches on in the one
decoder (`paged_kv.models.decoder.ModelConfig`), its ``config.json`` defaults, the rule
that decides which layers slide, and the Hugging Face tensor names of its weights.

The defaults are transformers' own (its ``*Config`` classes: a key absent from
``config.json`` means what it means there), so a checkpoint loads here as it loads there.
How a window is decided differs by family, and follows transformers' modelling code:

- ``llama``: never a window. A ``sliding_window`` (or ``layer_types``) in a Llama
  ``config.json`` is ignored by transformers' Llama, so it is ignored here.
- ``mistral``: ``sliding_window`` (default 4096; null: none) on every layer.
- ``qwen2`` / ``qwen3``: ``sliding_window`` only when ``use_sliding_window`` is true; the
  layers from ``max_window_layers`` (default 28) on slide, unless ``layer_types`` says.
- ``gemma2``: ``sliding_window`` (default 4096) on every other layer, the first sliding
  (or as ``layer_types`` says).
- ``gemma3_text`` (and ``gemma3``'s ``text_config``): five sliding layers to one full
  (``sliding_window_pattern``, default 6) unless ``layer_types`` says; the sliding layers
  use their own RoPE base (``rope_local_base_freq`` or ``rope_parameters.sliding_attention``).
"""

from __future__ import annotations

import dataclasses

from paged_kv.models.decoder import ModelConfig


@dataclasses.dataclass(frozen=True)
class Family:
    """One ``model_type``: its switches in the decoder and its ``config.json`` defaults."""

    model_type: str
    window: str  # "none", "every_layer", "use_sliding_window", "layer_types"
    # Which layers slide when config.json has no layer_types: "max_window_layers", "alternate", "every_nth".
    pattern: str = ""
    head_dim: int | None = None  # default when absent; None: hidden_size // num_attention_heads
    num_kv_heads: int | None = None  # default when absent; None: num_attention_heads
    tie_word_embeddings: bool = False
    activation_key: str = "hidden_act"
    activation: str = "silu"
    qkv_bias: str | bool = False  # True: always (Qwen2); a key name: that config.json flag
    o_bias: str | bool = False
    mlp_bias_key: bool = False  # a Llama config's mlp_bias (refused when true)
    qk_norm: bool = False
    gemma: bool = False  # (1 + w) RMSNorm, embeddings x sqrt(hidden), norms after attention and MLP, scalars below
    query_pre_attn_scalar: float | None = None  # default when absent (Gemma)
    attn_logit_softcap: float | None = None  # default when absent (Gemma 2)
    final_logit_softcap: float | None = None  # default when absent (Gemma 2)
    attn_softcap_applies: bool = True  # False: transformers ignores attn_logit_softcapping (Gemma 3): refused
    sliding_window: int | None = None  # default when absent
    local_rope: bool = False  # per-layer-type RoPE (Gemma 3)
    rope_theta: float = 10000.0  # default when absent (Gemma 3: the global layers')
    bidirectional_key: bool = False  # use_bidirectional_attention exists (refused when true)
    sizes: tuple[tuple[str, int], ...] = ()
    """Defaults of the size keys (vocab_size, hidden_size, ...) where the family's published
    configs rely on them (Gemma 3's multimodal checkpoints give only what differs from
    Gemma3TextConfig's defaults in their text_config); elsewhere an absent size is refused."""


FAMILIES: dict[str, Family] = {f.model_type: f for f in (
    Family("llama", window="none", qkv_bias="attention_bias", o_bias="attention_bias", mlp_bias_key=True),
    Family("mistral", window="every_layer", num_kv_heads=8, sliding_window=4096),
    Family("qwen2", window="use_sliding_window", pattern="max_window_layers", num_kv_heads=32, qkv_bias=True,
           sliding_window=4096),
    Family("qwen3", window="use_sliding_window", pattern="max_window_layers", head_dim=128, num_kv_heads=32,
           qkv_bias="attention_bias", o_bias="attention_bias", qk_norm=True, sliding_window=4096),
    Family("gemma2", window="layer_types", pattern="alternate", head_dim=256, num_kv_heads=4, tie_word_embeddings=True,
           activation_key="hidden_activation", activation="gelu_pytorch_tanh", qkv_bias="attention_bias",
           o_bias="attention_bias", gemma=True, query_pre_attn_scalar=256.0, attn_logit_softcap=50.0,
           final_logit_softcap=30.0, sliding_window=4096, bidirectional_key=True),
    Family("gemma3_text", window="layer_types", pattern="every_nth", head_dim=256, num_kv_heads=4,
           tie_word_embeddings=True, activation_key="hidden_activation", activation="gelu_pytorch_tanh",
           qkv_bias="attention_bias", o_bias="attention_bias", qk_norm=True, gemma=True, query_pre_attn_scalar=256.0,
           attn_softcap_applies=False, sliding_window=4096, local_rope=True, rope_theta=1_000_000.0,
           bidirectional_key=True,
           sizes=(("vocab_size", 262_208), ("hidden_size", 2304), ("intermediate_size", 9216),
                  ("num_hidden_layers", 26), ("num_attention_heads", 8))),
)}
MODEL_TYPES = (*FAMILIES, "gemma3")
"""``model_type`` values `paged_kv.models.loader` loads ("gemma3": the text model of a
Gemma 3 checkpoint, from its ``text_config``; the vision tower's tensors are skipped)."""
MULTIMODAL_PREFIXES = {"language_model.model.": "language_model.lm_head.weight",
                       "model.language_model.": "lm_head.weight"}
"""Where a Gemma 3 multimodal checkpoint keeps the text model's tensors, and its unembedding
(transformers 4.x and 5 save the first layout; its in-memory names are the second)."""
MULTIMODAL_SKIPPED = ("vision_tower.", "multi_modal_projector.", "model.vision_tower.", "model.multi_modal_projector.")


# ---- weights -----------------------------------------------------------------------------------
def layer_weights(cfg: ModelConfig) -> dict[str, tuple[str, tuple[int, ...], bool]]:
    """One layer's parameters: param key -> (HF name after ``model.layers.{i}.``, HF shape,
    transposed when loaded). HF stores linear weights ``[out, in]``; the decoder uses
    ``[in, out]``. Gemma's ``post_attention_layernorm`` is the norm after the attention,
    Llama's the norm before the MLP."""
    h, q, kv, inter, d = (cfg.hidden_size, cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim,
                          cfg.intermediate_size, cfg.head_dim)
    out = {
        "attn_norm": ("input_layernorm.weight", (h,), False),
        "wq": ("self_attn.q_proj.weight", (q, h), True), "wk": ("self_attn.k_proj.weight", (kv, h), True),
        "wv": ("self_attn.v_proj.weight", (kv, h), True), "wo": ("self_attn.o_proj.weight", (h, q), True),
        "w_gate": ("mlp.gate_proj.weight", (inter, h), True), "w_up": ("mlp.up_proj.weight", (inter, h), True),
        "w_down": ("mlp.down_proj.weight", (h, inter), True),
    }
    if cfg.post_norms:
        out.update(post_attn_norm=("post_attention_layernorm.weight", (h,), False),
                   mlp_norm=("pre_feedforward_layernorm.weight", (h,), False),
                   post_mlp_norm=("post_feedforward_layernorm.weight", (h,), False))
    else:
        out["mlp_norm"] = ("post_attention_layernorm.weight", (h,), False)
    if cfg.qkv_bias:
        out.update(bq=("self_attn.q_proj.bias", (q,), False), bk=("self_attn.k_proj.bias", (kv,), False),
                   bv=("self_attn.v_proj.bias", (kv,), False))
    if cfg.o_bias:
        out["bo"] = ("self_attn.o_proj.bias", (h,), False)
    if cfg.qk_norm:
        out.update(q_norm=("self_attn.q_norm.weight", (d,), False), k_norm=("self_attn.k_norm.weight", (d,), False))
    return out


def parameter_count(cfg: ModelConfig) -> int:
    """Elements of every weight the model has, by arithmetic (no per-layer Python)."""
    per_layer = sum(_prod(shape) for _, shape, _ in layer_weights(cfg).values())
    return cfg.num_layers * per_layer + cfg.hidden_size + cfg.vocab_size * cfg.hidden_size * (
        1 if cfg.tie_word_embeddings else 2)


def tensors_per_layer(cfg: ModelConfig) -> int:
    return len(layer_weights(cfg))


def _prod(shape: tuple[int, ...]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


__all__ = ["FAMILIES", "Family", "MODEL_TYPES", "MULTIMODAL_PREFIXES", "MULTIMODAL_SKIPPED", "layer_weights",
           "parameter_count", "tensors_per_layer"]
