"""Attention that reads the pages in place (no gathered copy on the hot path).

- `paged_attention(query, view, metadata)`: the entry point; picks a kernel by
  platform and layout, with the XLA path as reference and fallback. ``view`` is any
  `PagedLayer` (`layer`: what attention needs of a layer's pages; the views implement
  it and import this package, never the reverse).
- `reference.paged_attention_xla`: online softmax over chunks of the block table.
- `pallas_tpu.ragged_paged_attention_tpu`: jax's TPU ragged kernel on the unified,
  interleaved layout.
- `pallas_decode`: jax's TPU and GPU decode kernels for head-major pools.
"""

from paged_kv.attention.dispatch import IMPLS, paged_attention, ragged_kernel_fits
from paged_kv.attention.layer import PagedLayer, check_attention_query
from paged_kv.attention.pallas_decode import paged_decode_gpu, paged_decode_tpu
from paged_kv.attention.pallas_tpu import ragged_paged_attention_tpu
from paged_kv.attention.reference import DEFAULT_CHUNK_BLOCKS, paged_attention_xla

__all__ = [
    "DEFAULT_CHUNK_BLOCKS",
    "IMPLS",
    "PagedLayer",
    "check_attention_query",
    "paged_attention",
    "paged_attention_xla",
    "paged_decode_gpu",
    "paged_decode_tpu",
    "ragged_kernel_fits",
    "ragged_paged_attention_tpu",
]
