"""`UnifiedCacheView`: a layer's keys and values in ONE page tensor.

EasyDeL's ``LightningCache`` promised a fused K/V cache and never built one; this is
it. Each token slot of a block holds the token's keys and values side by side, so a
step costs one scatter (not two) and a read one gather (not two), and the layer's
pages are a single buffer to donate, shard, copy-on-write or swap.

Layout, chosen from the spec (`UnifiedCacheView.interleaved`):

- ``key_heads == value_heads`` and ``key_dim == value_dim`` (ordinary MHA/GQA):
  ``[num_blocks, block_size, 2*heads, dim]`` with the heads interleaved
  ``k0, v0, k1, v1, ...``, as vLLM's TPU backend lays out its KV cache. Why
  interleaved rather than ``[K heads | V heads]``: head ``h``'s keys and values are
  one contiguous ``2*dim`` run, so an attention kernel that walks heads fetches both
  with one DMA, and sharding the head axis over a tensor-parallel mesh (``2*heads``
  split into contiguous pieces) gives every device whole (k, v) pairs of its own
  query-head group. With ``[K | V]`` the same split would put all keys on one half of
  the devices and all values on the other.
- otherwise (MLA-style ``key_dim != value_dim``, or ``key_heads != value_heads``):
  ``[num_blocks, block_size, key_heads*key_dim + value_heads*value_dim]``, K then V
  flattened on the last axis. Heads of different widths cannot be interleaved into
  one rectangular head axis; flattening keeps each token's K and V one contiguous
  row with no padding, so the pool costs exactly `CacheSpec.bytes_per_token_per_layer`
  per token, the same as the split layout. (Sharding this layout over heads does not
  split on head boundaries in general; shard it over blocks instead.)

Both layouts hold the same bits as `TransformerCacheView`'s two tensors: combining
and splitting only move data, so `read` returns arrays bit-identical to the split
layout's. The group, window, mask and `concatenate_to_cache` are shared with
`TransformerCacheView` through `PagedLayerView`, so sliding-window layers work the
same way (the block tables of ``metadata.groups[view.group]``, offsets ``start``).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from paged_kv.errors import ShapeError
from paged_kv.metadata import StepMetadata
from paged_kv.ops import scatter_tokens
from paged_kv.quant import codecs
from paged_kv.spec import CacheSpec
from paged_kv.views.transformer import PagedLayerView


def is_interleaved(spec: CacheSpec) -> bool:
    """True when keys and values have the same heads and dim: the ``[.., 2H, D]`` layout."""
    return spec.key_heads == spec.value_heads and spec.key_dim == spec.value_dim


def unified_page_shape(spec: CacheSpec, layer: int) -> tuple[int, ...]:
    """Shape of layer ``layer``'s unified pages (its group's ``num_blocks``)."""
    nb = spec.groups[spec.group_of(layer)].num_blocks
    if is_interleaved(spec):
        return (nb, spec.block_size, 2 * spec.key_heads, spec.key_dim)
    return (nb, spec.block_size, spec.key_heads * spec.key_dim + spec.value_heads * spec.value_dim)


def _page_arrays(spec: CacheSpec, layer: int) -> dict[str, Any]:
    """``{field: (shape, storage dtype) or None}``: the pages, and an int8 layer's scales
    ``[num_blocks, block_size, 2H]`` (interleaved like the heads) or ``[.., Hk + Hv]``."""
    kc, _ = codecs(spec, layer)
    shape = unified_page_shape(spec, layer)
    scales = None
    if kc.scale_storage is not None:
        scales = ((*shape[:2], 2 * spec.key_heads if is_interleaved(spec) else spec.key_heads + spec.value_heads),
                  kc.scale_storage)
    return {"kv_pages": (shape, kc.page_storage), "kv_scales": scales}


@dataclasses.dataclass(frozen=True)
class UnifiedCacheView(PagedLayerView):
    """Keys and values of one layer in one page tensor ``kv_pages`` (layout: module doc);
    an int8 layer's per-token scales in ``kv_scales`` (None otherwise), laid out alike."""

    kv_pages: jax.Array
    spec: CacheSpec
    layer_index: int = 0
    kv_scales: jax.Array | None = None
    generations: jax.Array | None = None  # see `PagedLayerView.binding_arrays`
    owner: jax.Array | None = None

    @staticmethod
    def page_arrays(spec: CacheSpec, layer: int) -> dict[str, Any]:
        """Name -> (shape, dtype) of each page leaf of the unified layout, None where absent."""
        return _page_arrays(spec, layer)

    @property
    def interleaved(self) -> bool:
        """True: ``[num_blocks, block_size, 2H, D]`` (k0, v0, k1, v1, ...); False: ``[.., Hk*Dk + Hv*Dv]``."""
        return is_interleaved(self.spec)

    def write_slots(self, key: jax.Array, value: jax.Array, slots: jax.Array) -> "UnifiedCacheView":
        """Scatter ``key`` ``[B, T, key_heads, key_dim]`` and ``value`` ``[B, T, value_heads,
        value_dim]`` into flat page slots ``slots`` ``[B, T]`` with a single scatter (two for
        an int8 layer: pages and scales)."""
        self._check_step(key, value, slots)
        self._check_shapes(key, value, slots.shape)
        kc, vc = self.codecs
        (kbits, kscale), (vbits, vscale) = kc.encode(key), vc.encode(value)
        rows = self._combine(kbits, vbits)
        out = {"kv_pages": scatter_tokens(self.kv_pages, rows, slots, rows.dtype)}
        if kscale is not None:
            scales = self._combine(kscale[..., None], vscale[..., None])  # type: ignore[index]  # both or neither
            out["kv_scales"] = scatter_tokens(self.kv_scales, scales.reshape(scales.shape[:3]), slots,  # type: ignore[arg-type]  # int8: scales
                                               scales.dtype)
        return dataclasses.replace(self, **out)  # type: ignore[arg-type]  # page and scale fields

    def decode_gathered(self, gathered: "UnifiedCacheView", rotated: bool = False) -> tuple[jax.Array, jax.Array]:
        """Split, then decode: keys ``[B, S, key_heads, key_dim]`` and values ``[B, S,
        value_heads, value_dim]`` in the compute dtype from `gather`'s result (or a chunk
        of it), exactly as `TransformerCacheView` returns them; ``rotated=True``: as
        stored (see `PagedLayerView.read_blocks`)."""
        (kc, vc), part = self.codecs, ("dequantize" if rotated else "decode")
        kbits, vbits = self._split(gathered.kv_pages)
        kscale = vscale = None
        if gathered.kv_scales is not None:
            kscale, vscale = self._split_scales(gathered.kv_scales)
        return getattr(kc, part)(kbits, kscale), getattr(vc, part)(vbits, vscale)

    def _check_shapes(self, key: jax.Array, value: jax.Array, bt: tuple[int, ...]) -> None:
        s = self.spec
        bt = tuple(bt)
        want_k, want_v = (*bt, s.key_heads, s.key_dim), (*bt, s.value_heads, s.value_dim)
        if tuple(key.shape) != want_k or tuple(value.shape) != want_v:
            raise ShapeError(
                f"layer {self.layer_index}: keys {tuple(key.shape)} and values {tuple(value.shape)} do not fit "
                f"slot_mapping {bt}; expected keys {want_k} and values {want_v}"
            )

    def _combine(self, key: jax.Array, value: jax.Array) -> jax.Array:
        """Storage bits ``[B, T, Hk, X]`` and ``[B, T, Hv, Y]`` as unified rows: ``[B, T, 2H, X]``
        interleaved (k0, v0, k1, v1, ...), else ``[B, T, Hk*X + Hv*Y]``. Bits, not floats:
        XLA on CPU canonicalizes NaN payloads when it stacks or concatenates bfloat16,
        which would break bit-identity with the split layout."""
        bt = key.shape[:2]
        if self.interleaved:
            return jnp.stack([key, value], axis=3).reshape(*bt, 2 * key.shape[2], key.shape[3])
        return jnp.concatenate([key.reshape(*bt, -1), value.reshape(*bt, -1)], axis=-1)

    def _split(self, rows: jax.Array) -> tuple[jax.Array, jax.Array]:
        """Inverse of `_combine` on gathered rows ``[B, S, ...]``: keys, values ``[B, S, H, X]``."""
        s = self.spec
        b, n = rows.shape[:2]
        if self.interleaved:
            pairs = rows.reshape(b, n, s.key_heads, 2, rows.shape[-1])
            return pairs[:, :, :, 0], pairs[:, :, :, 1]
        split = s.key_heads * s.key_dim
        return rows[:, :, :split].reshape(b, n, s.key_heads, -1), rows[:, :, split:].reshape(b, n, s.value_heads, -1)

    def _split_scales(self, scales: jax.Array) -> tuple[jax.Array, jax.Array]:
        """Gathered scales ``[B, S, 2H]`` (or ``[B, S, Hk + Hv]``) -> key and value scales ``[B, S, H]``."""
        s = self.spec
        if self.interleaved:
            pairs = scales.reshape(*scales.shape[:2], s.key_heads, 2)
            return pairs[..., 0], pairs[..., 1]
        return scales[..., : s.key_heads], scales[..., s.key_heads:]


jax.tree_util.register_dataclass(UnifiedCacheView, data_fields=["kv_pages", "kv_scales", "generations", "owner"],
                                 meta_fields=["spec", "layer_index"])

__all__ = ["UnifiedCacheView", "is_interleaved", "unified_page_shape"]
