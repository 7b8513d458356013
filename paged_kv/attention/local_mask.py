"""Where local attention starts: the first key a query of a sliding-window or chunked
layer may see.

Shared by the dense mask (`paged_kv.views.mask.AttentionMask.dense`) and the
in-place attention (`paged_kv.attention.reference`), so the two cannot disagree.
The host rule that frees blocks no query can see is the same arithmetic on
sequence positions (`paged_kv.spec.LayerGroup.first_visible`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def lowest_key(positions: jax.Array, window: int | None, chunk: int | None,
               start: jax.Array | None = None) -> jax.Array | None:
    """The first key each query ``positions`` ``[B, T]`` (relative to key 0, which is
    sequence position ``start`` ``[B]``) may see: ``positions - window + 1`` for a
    window, the first key of the query's chunk for chunked attention; None for full
    attention. The one definition the dense mask and the in-place attention share."""
    lowest = None if window is None else positions - (window - 1)
    if chunk is not None:
        offset = jnp.zeros(positions.shape[:1], jnp.int32) if start is None else start.astype(jnp.int32)
        chunk_first = (positions + offset[:, None]) // chunk * chunk - offset[:, None]
        lowest = chunk_first if lowest is None else jnp.maximum(lowest, chunk_first)
    return lowest


__all__ = ["lowest_key"]
