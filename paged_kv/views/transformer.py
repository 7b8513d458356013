"""`TransformerCacheView`: one layer's pages, full causal attention.

The drop-in for EasyDeL's ``TransformerCacheView.concatenate_to_cache``: the model
hands it this step's keys and values and gets back contiguous keys and values for
attention, a mask, and the view to keep for the next step. Unlike the contiguous
cache, memory is held per block actually used, not per ``max_seq_len``.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from paged_kv.errors import ShapeError
from paged_kv.metadata import StepMetadata
from paged_kv.ops import gather_blocks, scatter_tokens
from paged_kv.spec import CacheSpec, compute_dtype, storage_dtype
from paged_kv.views.mask import AttentionMask


@dataclasses.dataclass(frozen=True)
class TransformerCacheView:
    """Key and value pages of one layer: ``[num_blocks, block_size, heads, dim]`` each."""

    key_pages: jax.Array
    value_pages: jax.Array
    spec: CacheSpec
    layer_index: int = 0

    @classmethod
    def init(cls, spec: CacheSpec, layer_index: int = 0, device=None) -> "TransformerCacheView":
        """Zeroed pages (the null block must start at zero), placed on ``device`` or a sharding."""
        store = storage_dtype(spec)
        kshape = (spec.num_blocks, spec.block_size, spec.key_heads, spec.key_dim)
        vshape = (spec.num_blocks, spec.block_size, spec.value_heads, spec.value_dim)
        return cls(jnp.zeros(kshape, store, device=device), jnp.zeros(vshape, store, device=device), spec, layer_index)

    def check_pages(self) -> None:
        """Raise `ShapeError` if the pages do not match the spec (e.g. a restored or foreign array)."""
        s = self.spec
        want = {
            "key_pages": (s.num_blocks, s.block_size, s.key_heads, s.key_dim),
            "value_pages": (s.num_blocks, s.block_size, s.value_heads, s.value_dim),
        }
        for name, shape in want.items():
            arr = getattr(self, name)
            if tuple(arr.shape) != shape or arr.dtype != storage_dtype(s):
                raise ShapeError(
                    f"layer {self.layer_index} {name} is {tuple(arr.shape)} {arr.dtype}; spec wants {shape} {storage_dtype(s)}"
                )

    def write(self, key: jax.Array, value: jax.Array, metadata: StepMetadata) -> "TransformerCacheView":
        """Scatter this step's ``key``/``value`` ``[B, T, heads, dim]`` into the pages."""
        dt = compute_dtype(self.spec)
        return dataclasses.replace(
            self,
            key_pages=scatter_tokens(self.key_pages, key, metadata.slot_mapping, dt),
            value_pages=scatter_tokens(self.value_pages, value, metadata.slot_mapping, dt),
        )

    def read(self, metadata: StepMetadata) -> tuple[jax.Array, jax.Array]:
        """Contiguous keys and values ``[B, W*block_size, heads, dim]``, zero past each length."""
        dt = compute_dtype(self.spec)
        keys = gather_blocks(self.key_pages, metadata.block_tables, metadata.kv_lens, dt)
        values = gather_blocks(self.value_pages, metadata.block_tables, metadata.kv_lens, dt)
        return keys, values

    def concatenate_to_cache(
        self,
        query: jax.Array | None,
        key: jax.Array,
        value: jax.Array,
        metadata: StepMetadata,
    ) -> tuple[jax.Array, jax.Array, AttentionMask, "TransformerCacheView"]:
        """Write this step's keys/values, then return (keys, values, mask, new view).

        ``key``/``value``: ``[B, T, heads, dim]`` laid out like ``metadata`` (row b is
        the b-th sequence given to `KVCacheManager.step_metadata`, token t its t-th new
        token). Keys and values come back in ``query.dtype`` when a query is given, as
        EasyDeL's cache does, else in the spec's dtype. Works for prefill (T > 1) and
        decode (T == 1) alike.
        """
        view = self.write(key, value, metadata)
        keys, values = view.read(metadata)
        if query is not None:
            keys, values = keys.astype(query.dtype), values.astype(query.dtype)
        mask = AttentionMask(metadata.kv_lens, metadata.positions, metadata.query_lens)
        return keys, values, mask, view


jax.tree_util.register_dataclass(
    TransformerCacheView, data_fields=["key_pages", "value_pages"], meta_fields=["spec", "layer_index"]
)

__all__ = ["TransformerCacheView"]
