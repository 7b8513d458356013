"""The model layer's first name, kept for its users: `paged_kv.models.decoder` is the
decoder of every supported family (Llama, Mistral, Qwen2, Qwen3, Gemma 2, Gemma 3), and
``LlamaConfig`` is its `ModelConfig`."""

from __future__ import annotations

from paged_kv.models.decoder import (  # noqa: F401 - re-exported
    ACTIVATIONS,
    ROPE_TYPES,
    LlamaConfig,
    ModelConfig,
    RopeScaling,
    apply_rope,
    attention,
    cache_spec,
    dense_attention,
    forward,
    forward_contiguous,
    rms_norm,
    rope_inv_freq,
    rope_tables,
    soft_cap,
)

__all__ = ["ACTIVATIONS", "LlamaConfig", "ModelConfig", "ROPE_TYPES", "RopeScaling", "apply_rope", "attention",
           "cache_spec", "dense_attention", "forward", "forward_contiguous", "rms_norm", "rope_inv_freq", "rope_tables",
           "soft_cap"]
