"""Device ops: pure functions over page arrays, plus jitted, donating entry points.

Pages are stored as unsigned integers of the float's width (see
`paged_kv.spec.storage_dtype`); these functions bit-cast at the boundary so callers
only ever see the compute dtype.

Cost model (the reason for each choice):
- `scatter_tokens` writes ``B*T`` rows into the flattened pages with ``mode='drop'``;
  padding tokens carry an out-of-range slot and vanish. With the pages donated the
  update is in place: O(tokens written), never O(pool).
- `gather_blocks` reads whole blocks by table, one contiguous ``block_size*H*D`` run
  each, and zeroes positions at or beyond each row's length so a view never shows
  bytes left in a reused block by its previous owner.
- On CPU a fresh multi-MiB output costs more in page faults than the copy itself;
  `gather_blocks_into` writes into a donated workspace instead (see the benchmark).
"""

from __future__ import annotations


import jax
import jax.numpy as jnp
from jax import lax
from jax.typing import DTypeLike

from paged_kv.errors import ShapeError
from paged_kv.metadata import register_pytrees

# Every device module reaches the ops: from here on `StepMetadata` is a pytree.
register_pytrees()


def _to_storage(x: jax.Array, storage: DTypeLike) -> jax.Array:
    return lax.bitcast_convert_type(x, storage)


# Metadata is caller-constructible, so its ids are untrusted on the device too. JAX
# index arithmetic wraps a negative index (slot -1 is the pool's last slot, another
# sequence's), and an out-of-range gather index is clamped on CPU and undefined on
# accelerators (bytes outside the pool). One element-wise select per id, on arrays the
# size of the tables, keeps every read inside the pool and every write where it was
# meant to go or nowhere.
def in_pool_blocks(block_ids: jax.Array, num_blocks: int) -> jax.Array:
    """``block_ids`` with every id outside ``[0, num_blocks)`` replaced by the null
    block (0), which is never written: a bad id reads zeros, never another block."""
    return jnp.where((block_ids >= 0) & (block_ids < num_blocks), block_ids, 0)


def in_pool_slots(slots: jax.Array, num_slots: int) -> jax.Array:
    """``slots`` with every slot outside ``[0, num_slots)`` replaced by ``num_slots``,
    which a ``mode="drop"`` scatter drops (a negative one would otherwise wrap)."""
    return jnp.where((slots >= 0) & (slots < num_slots), slots, num_slots)


def scatter_tokens(pages: jax.Array, new: jax.Array, slot_mapping: jax.Array, compute_dtype: DTypeLike) -> jax.Array:
    """Write ``new[b, t]`` into flat slot ``slot_mapping[b, t]`` of ``pages``.

    pages: [num_blocks, block_size, *row] (storage dtype), e.g. ``row = (H, D)``;
    new: [B, T, *row]; slot_mapping: [B, T] int32, out-of-range entries dropped.
    Any trailing row shape works: the unified layout stores ``(2H, D)`` or ``(F,)``.
    """
    nb, bs, *row_dims = pages.shape
    row = tuple(row_dims)
    if new.ndim != 2 + len(row) or tuple(new.shape[2:]) != row or new.shape[:2] != slot_mapping.shape:
        dims = ", ".join(str(x) for x in row)
        want = ", ".join(str(x) for x in (*slot_mapping.shape[:2], *row))
        raise ShapeError(
            f"new keys/values of shape {tuple(new.shape)} do not fit pages [*, *, {dims}] "
            f"with slot_mapping {tuple(slot_mapping.shape)}; expected [{want}]"
        )
    if new.dtype != compute_dtype:
        new = new.astype(compute_dtype)
    rows = _to_storage(new, pages.dtype).reshape(-1, *row)
    flat = pages.reshape(nb * bs, *row)
    flat = flat.at[in_pool_slots(slot_mapping.reshape(-1), nb * bs)].set(rows, mode="drop")
    return flat.reshape(pages.shape)


def gather_blocks(pages: jax.Array, block_tables: jax.Array, kv_lens: jax.Array, compute_dtype: DTypeLike) -> jax.Array:
    """Contiguous ``[B, W*block_size, *row]`` of each row's blocks, zero past ``kv_lens``.

    ``pages`` is ``[num_blocks, block_size, *row]`` for any trailing row shape (``(H, D)``
    for split pages, ``(2H, D)`` or ``(F,)`` for unified ones).
    """
    nb, bs, *row = pages.shape
    b, w = block_tables.shape
    blocks = pages.at[in_pool_blocks(block_tables, nb)].get(mode="promise_in_bounds")  # [B, W, bs, *row]
    view = blocks.reshape(b, w * bs, *row)
    # The zeroing does double duty: besides hiding a reused block's stale bytes, it
    # makes XLA on CPU fuse the gather into one loop that writes the output directly;
    # without it the same gather measured ~6x slower (benchmarks/bench_device_ops.py).
    live = jnp.arange(w * bs, dtype=jnp.int32)[None, :] < kv_lens[:, None]
    live = live.reshape(b, w * bs, *([1] * len(row)))
    view = jnp.where(live, view, jnp.zeros((), view.dtype))
    return lax.bitcast_convert_type(view, compute_dtype)


def take_blocks(pages: jax.Array, block_ids: jax.Array, compute_dtype: DTypeLike) -> jax.Array:
    """Blocks ``block_ids`` ``[B, C]`` of ``pages`` as ``[B, C*block_size, *row]`` in the
    compute dtype, NOT zeroed past any length: for attention that masks by length
    itself (`paged_kv.attention`), reading a chunk of the table at a time."""
    nb, bs, *row = pages.shape
    b, c = block_ids.shape
    blocks = pages.at[in_pool_blocks(block_ids, nb)].get(mode="promise_in_bounds")  # [B, C, bs, *row]
    return lax.bitcast_convert_type(blocks.reshape(b, c * bs, *row), compute_dtype)


def gather_blocks_into(out: jax.Array, pages: jax.Array, block_tables: jax.Array, kv_lens: jax.Array) -> jax.Array:
    """`gather_blocks` written into ``out`` (same shape and dtype as the result).

    Jitted with ``out`` donated, XLA writes the gather straight into its buffer.
    """
    view = gather_blocks(pages, block_tables, kv_lens, out.dtype)
    if view.shape != out.shape:
        raise ShapeError(f"workspace shape {tuple(out.shape)} != view shape {tuple(view.shape)}")
    return lax.dynamic_update_slice(out, view, (0,) * out.ndim)


# Jitted entry points for callers outside a model's own jit. Pages and workspaces are
# donated: the caller must use the returned arrays and drop the ones passed in.
write_pages = jax.jit(scatter_tokens, static_argnames="compute_dtype", donate_argnums=0)
gather_pages = jax.jit(gather_blocks, static_argnames="compute_dtype")
gather_pages_into = jax.jit(gather_blocks_into, donate_argnums=0)

__all__ = [
    "scatter_tokens",
    "gather_blocks",
    "gather_blocks_into",
    "take_blocks",
    "write_pages",
    "gather_pages",
    "gather_pages_into",
]
