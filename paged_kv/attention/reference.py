"""Paged attention in plain XLA: online softmax over chunks of the block table.

The reference and fallback for every kernel in this package. Nothing the size of a
sequence is ever built: each iteration gathers ``chunk`` columns of the block table,
``[B, chunk*block_size, heads, dim]``, scores them against the step's queries and
folds them into a running max ``m``, normaliser ``l`` and accumulator (all f32), as
flash attention does. The loop runs only as many chunks as the longest row of the
batch needs (a dynamic trip count from ``kv_lens``), so a batch whose rows are short
reads few blocks even when its table bucket is wide.

Mask (the contract of `paged_kv.views.mask.AttentionMask.dense`): key ``s`` is
visible to query ``t`` of row ``b`` iff ``s <= positions[b, t]``, ``s < kv_lens[b]``
and, with a window, ``s > positions[b, t] - window``; with a chunk, ``s`` lies in the
chunk of ``positions[b, t]`` (chunk edges at multiples of ``chunk`` in sequence
positions; key 0 is sequence position ``start[b]``). Lengths and positions are
relative to the first key of the table (a sliding or chunked group's ``start``). A query that
sees no key (a padding row, ``kv_len == 0``) gets zeros, never NaN; a query that sees a
NaN key (or is NaN itself) gets NaN, as a dense softmax does: the zero is decided by
whether any key was visible, never by the normaliser, which NaN also fails to exceed 0.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
from jax import lax

from paged_kv.attention.local_mask import lowest_key


DEFAULT_CHUNK_BLOCKS = 8
"""Blocks per iteration: large enough that each step's matmuls amortise the loop,
small enough that the chunk stays O(B x chunk x heads x dim) (benchmarks/bench_decode_step.py)."""


ReadBlocks = Callable[[jax.Array], tuple[jax.Array, jax.Array]]
"""``read(block_ids [B, C]) -> (keys [B, C*bs, Hk, Dk], values [B, C*bs, Hv, Dv])``."""


def paged_attention_xla(
    query: jax.Array,
    read: ReadBlocks,
    block_tables: jax.Array,
    kv_lens: jax.Array,
    positions: jax.Array,
    *,
    block_size: int,
    window: int | None = None,
    chunk: int | None = None,
    start: jax.Array | None = None,
    scale: float | None = None,
    soft_cap: float | None = None,
    chunk_blocks: int = DEFAULT_CHUNK_BLOCKS,
    live_bound: bool = True,
) -> jax.Array:
    """Attention of ``query`` ``[B, T, Hq, Dk]`` over the blocks ``block_tables`` ``[B, W]``
    name, read through ``read``; returns ``[B, T, Hq, Dv]`` in ``query.dtype``.

    ``kv_lens`` ``[B]`` and ``positions`` ``[B, T]`` are relative to the table's first
    key, which is sequence position ``start`` ``[B]`` (None: 0; chunked attention needs
    it to find chunk edges). ``scale`` defaults to ``1/sqrt(Dk)``; ``soft_cap`` caps logits as
    ``cap * tanh(logit / cap)``. ``live_bound=False`` loops over the whole table
    instead of stopping at the longest row (for the benchmark's comparison).
    """
    b, w = block_tables.shape
    c = max(1, min(int(chunk_blocks), w))
    if w % c:  # pad the table with null blocks: they sit past every length
        block_tables = jnp.pad(block_tables, ((0, 0), (0, c - w % c)))
        w = block_tables.shape[1]
    span = c * block_size
    scale = query.shape[-1] ** -0.5 if scale is None else scale
    q = query.astype(jnp.float32) * scale
    needed = (jnp.max(kv_lens, initial=0) + span - 1) // span  # chunks the longest row reaches
    state = (*_init_state(query, read, block_tables[:, :c]), jnp.zeros(positions.shape, bool))
    lowest = lowest_key(positions, window, chunk, start)

    def body(i: Any, state: Any) -> Any:
        ids = lax.dynamic_slice_in_dim(block_tables, i * c, c, axis=1)
        keys, values = read(ids)
        return _fold(state, q, keys, values, i * span, kv_lens, positions, lowest, soft_cap)

    if w == c:  # one chunk: no loop (simpler to compile; nothing to skip)
        _, l, acc, seen = body(0, state)
    else:
        trips = jnp.minimum(needed, w // c) if live_bound else w // c
        _, l, acc, seen = lax.fori_loop(0, trips, body, state)
    # Zeros only where a query saw no key. A test on ``l > 0`` would also zero a NaN
    # normaliser, turning a NaN key or query into a plausible 0 (issue 23 item 4).
    seen = seen[:, None, :, None]  # [B, 1, T, 1]
    out = jnp.where(seen, acc / jnp.where(seen, l[..., None], 1.0), 0.0)  # [B, Hq, T, Dv]
    return out.transpose(0, 2, 1, 3).astype(query.dtype)


def _init_state(query: jax.Array, read: Callable[..., Any], ids: jax.Array) -> Any:
    """Running max, normaliser and accumulator, shaped from one chunk's abstract read."""
    b, t, hq, _ = query.shape
    _, values = jax.eval_shape(read, ids)
    dv = values.shape[-1]
    return (
        jnp.full((b, hq, t), -jnp.inf, jnp.float32),
        jnp.zeros((b, hq, t), jnp.float32),
        jnp.zeros((b, hq, t, dv), jnp.float32),
    )


def _fold(state: Any, q: jax.Array, keys: jax.Array, values: jax.Array, first: Any, kv_lens: jax.Array,
          positions: jax.Array, lowest: Any, soft_cap: float | None) -> Any:
    """One online-softmax update with keys ``first .. first + S - 1``; ``lowest``
    ``[B, T]`` (or None): each query's first visible key (window or chunk). ``seen``
    ``[B, T]``: whether the query has had a visible key so far."""
    m, l, acc, seen = state
    b, t, hq, dk = q.shape
    hk, hv, s = keys.shape[2], values.shape[2], keys.shape[1]
    idx = first + jnp.arange(s, dtype=jnp.int32)
    live = idx[None, :] < kv_lens[:, None]  # [B, S]
    ok = live[:, None, :] & (idx[None, None, :] <= positions[:, :, None])  # [B, T, S]
    if lowest is not None:
        ok &= idx[None, None, :] >= lowest[:, :, None]
    qg = q.reshape(b, t, hk, hq // hk, dk)
    logits = jnp.einsum("btkgd,bskd->bkgts", qg, keys.astype(jnp.float32)).reshape(b, hq, t, s)
    if soft_cap is not None:
        logits = soft_cap * jnp.tanh(logits / soft_cap)
    seen = seen | ok.any(-1)
    ok = ok[:, None]  # [B, 1, T, S]
    m_new = jnp.maximum(m, jnp.max(jnp.where(ok, logits, -jnp.inf), axis=-1))
    # The running max starts at -inf, not at a finite stand-in (a finite floor would drop
    # every key whose logits all lie below it). While a row's max is still -inf, shift by
    # 0 instead, so that -inf - -inf never makes a NaN out of a row that saw nothing.
    shift = jnp.where(m_new == -jnp.inf, 0.0, m_new)
    p = jnp.where(ok, jnp.exp(logits - shift[..., None]), 0.0)
    corr = jnp.exp(m - shift)
    # Keys past a row's length may hold a previous owner's bytes, NaN or inf included:
    # zero them so that 0 * stale never reaches the accumulator.
    values = jnp.where(live[:, :, None, None], values.astype(jnp.float32), 0.0)
    pv = jnp.einsum("bvgts,bsvd->bvgtd", p.reshape(b, hv, hq // hv, t, s), values).reshape(b, hq, t, -1)
    return m_new, l * corr + p.sum(-1), acc * corr[..., None] + pv, seen


__all__ = ["DEFAULT_CHUNK_BLOCKS", "ReadBlocks", "paged_attention_xla"]
