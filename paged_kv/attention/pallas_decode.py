"""Decode-only Pallas kernels (TPU ``paged_attention``, GPU ``paged_attention``):
argument packing for pages laid out head-major.

Both of jax's decode kernels read ``k_pages``/``v_pages`` as ``[kv_heads,
total_pages, page_size, head_dim]``, one query token per row, masked by length
only (no window, no chunk, no causal mask inside the step: with one new token
per row there is nothing to mask; do not use them for sliding or chunked layers). paged_kv's pools are token-major (``[total_pages,
page_size, heads, dim]``) because every other device op (scatter, copy-on-write,
swap, checkpoint, sharding) is written for it; transposing the pool per step would
cost more than the attention saves, so `paged_kv.attention.paged_attention` does
not route the views here. These adapters are for a caller whose pool is head-major
already (e.g. a model ported from a kernel-first codebase), and they let the tests
check jax's kernels, in interpret mode on CPU, against the XLA path.

What the adapters do: scale the query (neither kernel does), drop the T axis,
pick block sizes that divide the table width, and give rows with ``kv_len == 0``
zeros (the kernels average masked keys there).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from paged_kv.errors import ShapeError
from paged_kv.ops import in_pool_blocks


def _check(query: jax.Array, k_pages: jax.Array, v_pages: jax.Array) -> None:
    if query.ndim != 4 or query.shape[1] != 1:
        raise ShapeError(f"query {tuple(query.shape)}: the decode kernels take one token per row, [B, 1, Hq, D]")
    if k_pages.shape != v_pages.shape or k_pages.ndim != 4 or k_pages.shape[3] != query.shape[3]:
        raise ShapeError(
            f"k_pages {tuple(k_pages.shape)} / v_pages {tuple(v_pages.shape)}: expected equal head-major "
            f"[kv_heads, pages, page_size, {query.shape[3]}]"
        )


def _finish(out: jax.Array, kv_lens: jax.Array, query: jax.Array) -> jax.Array:
    out = jnp.where((kv_lens > 0)[:, None, None], out, jnp.zeros((), out.dtype))
    return out[:, None].astype(query.dtype)


def paged_decode_tpu(query: jax.Array, k_pages: jax.Array, v_pages: jax.Array, block_tables: jax.Array,
                     kv_lens: jax.Array, *, scale: float | None = None, soft_cap: float | None = None,
                     pages_per_compute_block: int = 8) -> jax.Array:
    """jax's TPU ``paged_attention`` for ``query`` ``[B, 1, Hq, D]``; returns ``[B, 1, Hq, D]``.

    The kernel computes in bfloat16 internally (its K/V loads are cast), so expect
    bf16-level agreement with the XLA path even for float32 pages."""
    from jax.experimental.pallas.ops.tpu.paged_attention import paged_attention

    _check(query, k_pages, v_pages)
    scale = query.shape[-1] ** -0.5 if scale is None else scale
    ppcb = _divisor(block_tables.shape[1], pages_per_compute_block)
    out = paged_attention(
        (query[:, 0] * scale).astype(query.dtype), k_pages, v_pages, kv_lens.astype(jnp.int32),
        in_pool_blocks(block_tables.astype(jnp.int32), k_pages.shape[1]), attn_logits_soft_cap=soft_cap, pages_per_compute_block=ppcb,
    )
    return _finish(out, kv_lens, query)


def paged_decode_gpu(query: jax.Array, k_pages: jax.Array, v_pages: jax.Array, block_tables: jax.Array,
                     kv_lens: jax.Array, *, scale: float | None = None, soft_cap: float | None = None,
                     pages_per_compute_block: int = 8, k_splits: int = 16, interpret: bool = False) -> jax.Array:
    """jax's GPU (Triton) ``paged_attention`` for ``query`` ``[B, 1, Hq, D]``; returns
    ``[B, 1, Hq, D]``. ``interpret=True`` runs it on CPU (tests)."""
    from jax.experimental.pallas.ops.gpu.paged_attention import paged_attention

    _check(query, k_pages, v_pages)
    scale = query.shape[-1] ** -0.5 if scale is None else scale
    w = block_tables.shape[1]
    splits = _divisor(w, k_splits)
    ppcb = _divisor(w // splits, pages_per_compute_block)
    out = paged_attention(
        (query[:, 0] * scale).astype(query.dtype), k_pages, v_pages, in_pool_blocks(block_tables.astype(jnp.int32), k_pages.shape[1]),
        kv_lens.astype(jnp.int32), block_h=16, pages_per_compute_block=ppcb, k_splits=splits,
        interpret=interpret, attn_logits_soft_cap=soft_cap,
    )
    return _finish(out, kv_lens, query)


def _divisor(n: int, most: int) -> int:
    """Largest divisor of ``n`` that is at most ``most``."""
    return max(d for d in range(1, max(1, min(n, most)) + 1) if n % d == 0)


__all__ = ["paged_decode_gpu", "paged_decode_tpu"]
