"""TPU Pallas kernels over paged_kv's pages: argument packing and unpacking only.

`ragged_paged_attention` (jax.experimental.pallas.ops.tpu.ragged_paged_attention)
reads ``kv_pages [total_pages, page_size, 2*kv_heads, head_dim]`` with keys and
values interleaved by head (k0, v0, k1, v1, ...): exactly the unified layout of
`paged_kv.views.unified.UnifiedCacheView` when key and value shapes agree, so the
pool is handed over as it is, no transpose. It serves mixed prefill/decode batches
and sliding windows. What the adapter does:

- queries: our ``[B, T, Hq, D]`` with ``query_lens[b]`` real tokens per row become the
  kernel's ragged ``[B*T, Hq, D]`` with ``cu_q_lens`` (padding tokens dropped), and
  the output is put back, each padding token getting its row's last real output
  (what the XLA path gives a padding token, which sits at that position);
- lengths: the kernel places a row's queries at the last ``q_len`` of its
  ``kv_len`` keys, which is where `KVCacheManager.step_metadata` puts them; lengths
  are relative to the table's first block (a sliding group's ``start``);
- scale: the kernel's ``sm_scale``; soft cap and window pass through;
- pages: the kernel needs them in the float dtype. With `CacheSpec(page_storage=
  "float")` (or "auto" off CPU) they are; with unsigned-int bits (the default) they
  are bit-cast first, which XLA may materialise as a copy of the pool, so
  ``impl="auto"`` picks this kernel only for float pages.

`paged_attention` (jax.experimental.pallas.ops.tpu.paged_attention) is decode-only
and wants head-major pages ``[kv_heads, total_pages, page_size, head_dim]``; see
`paged_kv.attention.pallas_decode`.

In jax 0.10.2 the ragged kernel does not run under TPU interpret mode on CPU (its
``ref.reshape`` has no interpret rule), so the tests check this adapter with the
kernel swapped for jax's own ``ref_ragged_paged_attention`` and leave the kernel
itself to ``benchmarks/bench_kernels.py`` on a TPU.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp

from paged_kv.errors import ShapeError
from paged_kv.ops import in_pool_blocks


def ragged_kernel() -> Callable[..., Any]:
    """jax's TPU ``ragged_paged_attention`` (imported lazily: it pulls in Mosaic)."""
    from jax.experimental.pallas.ops.tpu.ragged_paged_attention import ragged_paged_attention

    return ragged_paged_attention


def ragged_paged_attention_tpu(
    query: jax.Array,
    kv_pages: jax.Array,
    block_tables: jax.Array,
    kv_lens: jax.Array,
    query_lens: jax.Array,
    *,
    window: int | None = None,
    scale: float | None = None,
    soft_cap: float | None = None,
    kernel: Callable[..., Any] | None = None,
    **kernel_kwargs: Any,
) -> jax.Array:
    """Attention of ``query`` ``[B, T, Hq, D]`` over interleaved ``kv_pages`` through
    ``block_tables`` ``[B, W]``; returns ``[B, T, Hq, D]``.

    ``kv_lens``/``query_lens`` ``[B]`` int32 (relative to the table's first key);
    ``kernel`` defaults to jax's TPU kernel (tests pass its reference);
    ``kernel_kwargs`` go to it (block sizes, ``vmem_limit_bytes``).
    """
    b, t, hq, d = query.shape
    if kv_pages.ndim != 4 or kv_pages.shape[2] % 2 or kv_pages.shape[3] != d:
        raise ShapeError(
            f"kv_pages {tuple(kv_pages.shape)} are not interleaved [pages, page_size, 2*kv_heads, {d}] for query {query.shape}"
        )
    if not jnp.issubdtype(kv_pages.dtype, jnp.floating):
        raise ShapeError(f"kv_pages are {kv_pages.dtype}; the kernel reads float pages (bit-cast storage bits first)")
    scale = d**-0.5 if scale is None else float(scale)
    qlen = query_lens.astype(jnp.int32)
    cu = jnp.concatenate([jnp.zeros(1, jnp.int32), jnp.cumsum(qlen, dtype=jnp.int32)])
    tok = jnp.arange(t, dtype=jnp.int32)[None, :]
    dst = jnp.where(tok < qlen[:, None], cu[:-1, None] + tok, b * t)  # padding tokens: dropped
    ragged = jnp.zeros((b * t, hq, d), query.dtype).at[dst.reshape(-1)].set(query.reshape(b * t, hq, d), mode="drop")
    run = kernel or ragged_kernel()
    out = run(
        ragged, kv_pages, kv_lens.astype(jnp.int32), in_pool_blocks(block_tables.astype(jnp.int32), kv_pages.shape[0]), cu,
        jnp.array([b], jnp.int32), sm_scale=scale, sliding_window=window, soft_cap=soft_cap, **kernel_kwargs,
    )
    src = cu[:-1, None] + jnp.minimum(tok, jnp.maximum(qlen[:, None] - 1, 0))
    got = out[jnp.clip(src, 0, out.shape[0] - 1)]  # [B, T, Hq, D]
    return jnp.where((qlen > 0)[:, None, None, None], got, jnp.zeros((), got.dtype)).astype(query.dtype)


__all__ = ["ragged_kernel", "ragged_paged_attention_tpu"]
