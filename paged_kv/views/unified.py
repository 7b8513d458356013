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

import jax
import jax.numpy as jnp
from jax import lax

from paged_kv.errors import ShapeError
from paged_kv.metadata import StepMetadata
from paged_kv.ops import gather_blocks, scatter_tokens, take_blocks
from paged_kv.sharding import zeros
from paged_kv.spec import CacheSpec, bits_dtype, compute_dtype, storage_dtype
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


@dataclasses.dataclass(frozen=True)
class UnifiedCacheView(PagedLayerView):
    """Keys and values of one layer in one page tensor ``kv_pages`` (layout: module doc)."""

    kv_pages: jax.Array
    spec: CacheSpec
    layer_index: int = 0

    @classmethod
    def init(cls, spec: CacheSpec, layer_index: int = 0, device: jax.Device | jax.sharding.Sharding | None = None) -> "UnifiedCacheView":
        """Zeroed pages (the null block must start at zero), placed on ``device`` or a sharding."""
        return cls(zeros(unified_page_shape(spec, layer_index), storage_dtype(spec), device), spec, layer_index)

    @property
    def interleaved(self) -> bool:
        """True: ``[num_blocks, block_size, 2H, D]`` (k0, v0, k1, v1, ...); False: ``[.., Hk*Dk + Hv*Dv]``."""
        return is_interleaved(self.spec)

    def check_pages(self) -> None:
        """Raise `ShapeError` if the pages do not match the spec (e.g. a restored or foreign array)."""
        s = self.spec
        shape, store = unified_page_shape(s, self.layer_index), storage_dtype(s)
        if tuple(self.kv_pages.shape) != shape or self.kv_pages.dtype != store:
            raise ShapeError(
                f"layer {self.layer_index} kv_pages is {tuple(self.kv_pages.shape)} {self.kv_pages.dtype}; "
                f"spec wants {shape} {store}"
            )

    def write_slots(self, key: jax.Array, value: jax.Array, slots: jax.Array) -> "UnifiedCacheView":
        """Scatter ``key`` ``[B, T, key_heads, key_dim]`` and ``value`` ``[B, T, value_heads,
        value_dim]`` into flat page slots ``slots`` ``[B, T]`` with a single scatter."""
        self._check_step(key, value, slots)
        dt = compute_dtype(self.spec)
        rows = self._combine(key, value, slots.shape, dt)
        return dataclasses.replace(self, kv_pages=scatter_tokens(self.kv_pages, rows, slots, dt))

    def read(self, metadata: StepMetadata) -> tuple[jax.Array, jax.Array]:
        """One gather, then split: keys ``[B, S, key_heads, key_dim]`` and values
        ``[B, S, value_heads, value_dim]`` with ``S = W*block_size``, zero past each
        length, exactly as `TransformerCacheView.read` returns them."""
        self.check_metadata(metadata)
        s = self.spec
        tables = metadata.groups[self.group]
        lens = metadata.kv_lens - tables.start
        return self._split(gather_blocks(self.kv_pages, tables.block_tables, lens, compute_dtype(s)))

    def read_blocks(self, block_ids: jax.Array) -> tuple[jax.Array, jax.Array]:
        """Keys and values of blocks ``block_ids`` ``[B, C]`` (one gather, then split), in
        the compute dtype, not zeroed (the attention masks by length)."""
        return self._split(take_blocks(self.kv_pages, block_ids, compute_dtype(self.spec)))

    def _split(self, kv: jax.Array) -> tuple[jax.Array, jax.Array]:
        """Unified rows ``[B, S, *row]`` -> keys ``[B, S, Hk, Dk]``, values ``[B, S, Hv, Dv]``."""
        s = self.spec
        b, n = kv.shape[:2]
        if self.interleaved:
            kv = kv.reshape(b, n, s.key_heads, 2, s.key_dim)
            return kv[:, :, :, 0], kv[:, :, :, 1]
        split = s.key_heads * s.key_dim
        keys = kv[:, :, :split].reshape(b, n, s.key_heads, s.key_dim)
        values = kv[:, :, split:].reshape(b, n, s.value_heads, s.value_dim)
        return keys, values

    def _combine(self, key: jax.Array, value: jax.Array, bt: tuple, dt) -> jax.Array:
        """This step's keys and values as unified rows ``[B, T, *row]`` in the compute dtype."""
        s = self.spec
        bt = tuple(bt)
        want_k, want_v = (*bt, s.key_heads, s.key_dim), (*bt, s.value_heads, s.value_dim)
        if tuple(key.shape) != want_k or tuple(value.shape) != want_v:
            raise ShapeError(
                f"layer {self.layer_index}: keys {tuple(key.shape)} and values {tuple(value.shape)} do not fit "
                f"slot_mapping {bt}; expected keys {want_k} and values {want_v}"
            )
        # Combine the storage bits, not the floats: XLA on CPU canonicalizes NaN payloads
        # when it stacks or concatenates bfloat16, which would break bit-identity with
        # the split layout.
        store = bits_dtype(s)
        key = lax.bitcast_convert_type(key.astype(dt), store)
        value = lax.bitcast_convert_type(value.astype(dt), store)
        if self.interleaved:
            # [B, T, H, 2, D] -> [B, T, 2H, D]: k0, v0, k1, v1, ...
            rows = jnp.stack([key, value], axis=3).reshape(*bt, 2 * s.key_heads, s.key_dim)
        else:
            rows = jnp.concatenate([key.reshape(*bt, -1), value.reshape(*bt, -1)], axis=-1)
        return lax.bitcast_convert_type(rows, dt)


jax.tree_util.register_dataclass(UnifiedCacheView, data_fields=["kv_pages"], meta_fields=["spec", "layer_index"])

__all__ = ["UnifiedCacheView", "is_interleaved", "unified_page_shape"]
