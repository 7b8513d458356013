"""The spec: `CacheSpec`, the one frozen description of a paged cache, its rules and its
memory arithmetic (host side: numpy, never JAX).

- `cache_spec`: `CacheSpec` (shapes, dtype, limits, layer kinds, bytes), `NULL_BLOCK`,
  `require_same_spec` / `spec_difference`.
- `layer_group`: `LayerGroup`, layers sharing one pool and page table.
- `fields`: what each field accepts and the canonical value it holds.
- `formats`: the page formats' rules (int8, fp8, rotation, full-precision layers),
  bytes per token, the Hadamard blocks and fp8 scales the codecs are built from.
- `key_offsets`: ``kv_key_offsets``: conversion, rules, ``calibrate``.
- `dtypes`: the compute dtype and the dtype pages are stored in.

The device codecs (`paged_kv.quant`) import the spec; the spec never imports them.
"""

from paged_kv.spec.cache_spec import NULL_BLOCK, CacheSpec, require_same_spec, spec_difference
from paged_kv.spec.dtypes import bits_dtype, compute_dtype, resolve_dtype, storage_dtype
from paged_kv.spec.fields import MAX_POOL_BYTES, PAGE_STORAGE
from paged_kv.spec.layer_group import LayerGroup

__all__ = ["CacheSpec", "LayerGroup", "MAX_POOL_BYTES", "NULL_BLOCK", "PAGE_STORAGE", "bits_dtype", "compute_dtype",
           "require_same_spec", "resolve_dtype", "spec_difference", "storage_dtype"]
