"""`AttentionMask`: what a view tells attention about the keys it returns."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from paged_kv.attention.local_mask import lowest_key


@dataclasses.dataclass(frozen=True)
class AttentionMask:
    """Lengths and positions from which causal (and windowed or chunked) masks follow.

    ``kv_lens[b]``: keys of row ``b`` that hold tokens, counted from the first key the
    view returns. ``positions[b, t]``: the key index query ``t`` sits at. ``window``:
    keys further than this behind the query are masked (``None``: full attention).
    ``chunk``: chunked local attention; a query sees only the keys of its own chunk of
    ``chunk`` sequence positions. Chunk edges are multiples of ``chunk`` in *sequence*
    positions, and key 0 is sequence position ``start[b]`` (None: 0), which need not
    sit on a chunk edge: ``start`` is where the view's first block begins. Kernels that
    take lengths (flash/splash/ragged attention) use the arrays; plain attention calls
    `dense`.
    """

    kv_lens: jax.Array  # int32 [B]
    positions: jax.Array  # int32 [B, T]
    query_lens: jax.Array  # int32 [B]
    window: int | None = None
    chunk: int | None = None
    start: jax.Array | None = None  # int32 [B]: sequence position of key 0

    def lowest_key(self) -> jax.Array | None:
        """int32 ``[B, T]``: the first key each query may see (window or chunk), or None."""
        return lowest_key(self.positions, self.window, self.chunk, self.start)

    def dense(self, num_keys: int) -> jax.Array:
        """bool ``[B, T, num_keys]``: True where query ``t`` may attend key ``s``."""
        s = jnp.arange(num_keys, dtype=jnp.int32)[None, None, :]
        q = self.positions[:, :, None]
        ok = (s <= q) & (s < self.kv_lens[:, None, None])
        lowest = self.lowest_key()
        if lowest is not None:
            ok &= s >= lowest[:, :, None]
        return ok


jax.tree_util.register_dataclass(
    AttentionMask, data_fields=["kv_lens", "positions", "query_lens", "start"], meta_fields=["window", "chunk"]
)

__all__ = ["AttentionMask"]
