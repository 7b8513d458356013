"""KV shapes of common open models, for sizing a simulated pool.

The simulator allocates no device memory; a model's shape only says how many bytes
a block stands for (``2 x layers x kv_heads x head_dim x itemsize`` per token), and
so how many blocks a given amount of memory holds. The numbers are the models'
published ``config.json`` values (``num_hidden_layers``, ``num_key_value_heads``,
``hidden_size / num_attention_heads`` or ``head_dim``), stored in bfloat16.
"""

from __future__ import annotations

from typing import Any

import attrs

from paged_kv.errors import SpecError


@attrs.frozen(kw_only=True)
class ModelShape:
    """The part of a model's shape that sizes its KV cache."""

    num_layers: int
    num_kv_heads: int
    head_dim: int
    dtype: str = "bfloat16"
    kv_format: str = "none"
    """Pages stored as ``dtype`` ("none"), or quantized: "int8" (per-token scales
    counted) or "fp8" (`paged_kv.quant`); ``dtype`` stays the compute dtype."""

    def spec_fields(self) -> dict[str, Any]:
        """Keyword arguments for `paged_kv.CacheSpec`."""
        return attrs.asdict(self)

    @property
    def bytes_per_token(self) -> int:
        """Key and value bytes of one token over all layers."""
        from paged_kv.spec import CacheSpec

        return CacheSpec(num_blocks=2, block_size=1, max_blocks_per_seq=1, **self.spec_fields()).bytes_per_token

    def describe(self) -> str:
        """``32 layers, 8 KV heads x 128, bfloat16: 128 KiB per token`` (``int8 pages`` when quantized)."""
        pages = self.dtype if self.kv_format == "none" else f"{self.kv_format} pages"
        return (f"{self.num_layers} layers, {self.num_kv_heads} KV heads x {self.head_dim}, {pages}: "
                f"{self.bytes_per_token / 2**10:g} KiB per token")


MODELS: dict[str, ModelShape] = {
    "llama3-8b": ModelShape(num_layers=32, num_kv_heads=8, head_dim=128),  # also Llama 3.1 8B
    "llama3-70b": ModelShape(num_layers=80, num_kv_heads=8, head_dim=128),  # also 3.1 / 3.3 70B
    "llama3.1-405b": ModelShape(num_layers=126, num_kv_heads=8, head_dim=128),
    "llama3.2-1b": ModelShape(num_layers=16, num_kv_heads=8, head_dim=64),
    "llama3.2-3b": ModelShape(num_layers=28, num_kv_heads=8, head_dim=128),
    "llama2-7b": ModelShape(num_layers=32, num_kv_heads=32, head_dim=128),  # no GQA: 4x the KV of llama3-8b
    "llama2-13b": ModelShape(num_layers=40, num_kv_heads=40, head_dim=128),
    "mistral-7b": ModelShape(num_layers=32, num_kv_heads=8, head_dim=128),
    "mixtral-8x7b": ModelShape(num_layers=32, num_kv_heads=8, head_dim=128),
    "qwen2-7b": ModelShape(num_layers=28, num_kv_heads=4, head_dim=128),  # also Qwen2.5 7B
    "qwen2.5-72b": ModelShape(num_layers=80, num_kv_heads=8, head_dim=128),
    "phi3-mini": ModelShape(num_layers=32, num_kv_heads=32, head_dim=96),
    # Gemma 3 12B: five sliding layers (W = 1024) per full one; --layout hybrid gives that pattern.
    "gemma3-12b": ModelShape(num_layers=48, num_kv_heads=8, head_dim=256),
}
"""Preset shapes by name; `paged-kv simulate --model NAME` picks one."""

DEFAULT_MODEL = "llama3-8b"
"""The shape `paged-kv simulate` assumes unless told otherwise: 128 KiB of KV per token."""


def model_shape(name: str, **overrides: int | str | None) -> ModelShape:
    """Preset ``name`` with the given fields replaced (``None`` values keep the preset's).

    Raises `SpecError` naming the known presets for an unknown name.
    """
    if name not in MODELS:
        raise SpecError(f"model={name!r} is not a preset; known: {', '.join(MODELS)}")
    # Overrides name fields of their own types (the simulate command's flags); attrs does not check them.
    return attrs.evolve(MODELS[name], **{k: v for k, v in overrides.items() if v is not None})  # type: ignore[arg-type]


__all__ = ["DEFAULT_MODEL", "MODELS", "ModelShape", "model_shape"]
