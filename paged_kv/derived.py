"""Positions and slots derived from a step's lengths, tables and starts.

The two rules every `paged_kv.metadata.StepMetadata` follows, whether it carries its
``[B, T]`` arrays or leaves them to be derived where they are read: numpy on the host,
jax.numpy under jit (or on device arrays). Step metadata of a prompt joining a batch
then costs the host O(B x W) -- lengths and tables -- instead of O(B x T).
"""

from __future__ import annotations

from typing import Any, overload

import numpy as np


@overload
def slot(block: int, position: int, block_size: int) -> int: ...
@overload
def slot(block: np.ndarray, position: np.ndarray | int, block_size: int) -> np.ndarray: ...
@overload
def slot(block: Any, position: np.ndarray, block_size: int) -> np.ndarray: ...
def slot(block: Any, position: Any, block_size: int) -> Any:
    """The slot rule, written once: the flat page slot of the token at logical ``position``
    of a row whose block ``position // block_size`` is ``block``. Ints, or numpy or JAX
    arrays elementwise (the host's builders and `derive_slots` alike)."""
    return block * block_size + position % block_size


def _xp(array: Any) -> Any:
    """numpy for host arrays, jax.numpy for device arrays and tracers (a device module
    has imported JAX by then: only metadata that reached JAX holds its arrays)."""
    if isinstance(array, np.ndarray):
        return np
    import jax.numpy as jnp  # only reached with JAX arrays in hand: JAX is imported already

    return jnp


def derive_positions(kv_lens: Any, query_lens: Any, T: int) -> Any:
    """``positions [B, T]`` of rows holding ``kv_lens`` tokens whose last ``query_lens``
    are new: new token ``t`` of a row sits at ``kv - q + t``; padding tokens sit at the
    row's last real position (so a causal mask never leaves a padding query with
    nothing to attend to), padding rows at 0. numpy or jax.numpy, as the inputs are."""
    xp = _xp(kv_lens)
    t = xp.arange(T, dtype=xp.int32)[None, :]
    last = xp.maximum(kv_lens - 1, 0)[:, None]
    return xp.minimum((kv_lens - query_lens)[:, None] + t, last).astype(xp.int32)


def derive_slots(query_lens: Any, positions: Any, block_tables: Any, start: Any, pad: int, block_size: int) -> Any:
    """``slot_mapping [B, T]``: new token ``t < query_lens[b]`` at ``positions[b, t]`` goes
    to its block -- the table's column ``positions // block_size - start // block_size``
    -- at the position's offset in it; every other token (padding, a column outside the
    table, the null block) to ``pad``, which the write drops."""
    xp = _xp(block_tables)
    B, T = positions.shape
    W = block_tables.shape[1]
    if W == 0:
        return xp.full((B, T), pad, dtype=xp.int32)
    t = xp.arange(T, dtype=xp.int32)[None, :]
    col = positions // block_size - (start // block_size)[:, None]
    block = xp.take_along_axis(block_tables, xp.clip(col, 0, W - 1), axis=1)
    ok = (t < query_lens[:, None]) & (col >= 0) & (col < W) & (block != 0)
    return xp.where(ok, slot(block, positions, block_size), pad).astype(xp.int32)


__all__ = ["derive_positions", "derive_slots", "slot"]
