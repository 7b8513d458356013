"""`AttentionMask`: what a view tells attention about the keys it returns."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class AttentionMask:
    """Lengths and positions from which causal (and windowed) masks follow.

    ``kv_lens[b]``: keys of row ``b`` that hold tokens, counted from the first key the
    view returns. ``positions[b, t]``: the key index query ``t`` sits at. ``window``:
    keys further than this behind the query are masked (``None``: full attention).
    Kernels that take lengths (flash/splash/ragged attention) use the arrays; plain
    attention calls `dense`.
    """

    kv_lens: jax.Array  # int32 [B]
    positions: jax.Array  # int32 [B, T]
    query_lens: jax.Array  # int32 [B]
    window: int | None = None

    def dense(self, num_keys: int) -> jax.Array:
        """bool ``[B, T, num_keys]``: True where query ``t`` may attend key ``s``."""
        s = jnp.arange(num_keys, dtype=jnp.int32)[None, None, :]
        q = self.positions[:, :, None]
        ok = (s <= q) & (s < self.kv_lens[:, None, None])
        if self.window is not None:
            ok &= s > q - self.window
        return ok


jax.tree_util.register_dataclass(
    AttentionMask, data_fields=["kv_lens", "positions", "query_lens"], meta_fields=["window"]
)

__all__ = ["AttentionMask"]
