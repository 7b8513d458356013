"""One sequence's pages of every layer (page and scale arrays alike), read out of a
cache in one jitted call and written back in place in one jitted call: what a swap to
host memory (`paged_kv.swap`) and a transfer to another process (`paged_kv.transfer`)
move. Both sides of both live here, once.

Shapes: each group's block count is padded (`padded_sizes`: the next power of two,
at most ``max_blocks_per_seq``), so sequences of similar lengths share one
compilation. A read pads with the null block (zeros); a write pads with an id past
the pool, which the scatter drops.

Trust: the read zeroes every slot at or past the sequence's length -- the tail of
its last block still holds whatever the block's previous owner wrote there (another
sequence's keys), and neither a host copy nor another process may see it. Pages
that serve another manager (`paged_kv.binding`) read as zeros and are not written.
A write stamps each block with its generation in the writing manager's pool, as
step metadata would (`paged_kv.binding.bind_blocks`).
"""

from __future__ import annotations

import dataclasses
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np

from paged_kv.allocator.manager import KVCacheManager
from paged_kv.binding import bind_blocks
from paged_kv.cache import PagedKVCache
from paged_kv.metadata import bucket
from paged_kv.spec import NULL_BLOCK

Pages = tuple[tuple[jax.Array, ...], ...]
"""A sequence's pages: per layer, each page array's blocks (`gather_sequence`)."""
PagesIn = tuple[tuple[jax.Array | np.ndarray, ...], ...]
"""Pages to write back: on the device, or on the host (a swapped-out sequence's)."""


def padded_sizes(counts: tuple[int, ...], cap: int) -> tuple[int, ...]:
    """The padded block count of each group: the next power of two, at most ``cap``
    (never below the count itself)."""
    return tuple(max(bucket(max(n, 1), max(cap, 1)), n) for n in counts)


def padded_ids(blocks: tuple[np.ndarray, ...], fill: tuple[int, ...], sizes: tuple[int, ...]) -> tuple[np.ndarray, ...]:
    """Each group's block ids padded with ``fill[g]`` to ``sizes[g]`` entries (int32)."""
    out = []
    for ids, f, n in zip(blocks, fill, sizes):
        padded = np.full(n, f, np.int32)
        padded[: ids.size] = ids
        out.append(padded)
    return tuple(out)


@jax.jit
def gather_sequence(cache: PagedKVCache, ids: tuple[jax.Array, ...], firsts: jax.Array, length: jax.Array,
                    tag: jax.Array) -> Pages:
    """Per layer, per page array: the blocks ``ids[group]`` (logical blocks ``firsts[group]``
    on), with every slot at or past ``length`` zeroed. Pages that serve another manager
    than ``tag``'s give zeros (their ids name other blocks here)."""
    out: list[tuple[jax.Array, ...]] = []
    for view in cache.views:
        g, bs = view.group, view.spec.block_size
        n = ids[g].shape[0]
        mine = view.owner == tag
        pos = (firsts[g] + jnp.arange(n, dtype=jnp.int32))[:, None] * bs + jnp.arange(bs, dtype=jnp.int32)[None, :]
        live = mine & (pos < length)
        rows = jnp.where(mine, ids[g], NULL_BLOCK)
        layer = []
        for leaf in jax.tree_util.tree_leaves(view.pages()):
            got = leaf[rows]
            keep = live.reshape(live.shape + (1,) * (got.ndim - 2))
            layer.append(jnp.where(keep, got, jnp.zeros((), got.dtype)))
        out.append(tuple(layer))
    return tuple(out)


@partial(jax.jit, donate_argnums=0)
def write_sequence(cache: PagedKVCache, ids: tuple[jax.Array, ...], gens: tuple[np.ndarray, ...], pages: PagesIn,
                   tag: jax.Array) -> PagedKVCache:
    """Write ``pages`` (as `gather_sequence` returns them) into blocks ``ids[group]`` of
    every layer, in place (the cache is donated), stamping each block with
    ``gens[group]``; out-of-range ids (padding) write nothing, and pages that serve
    another manager than ``tag``'s are left alone."""
    views = []
    for view, data in zip(cache.views, pages):
        # A cache's views carry their binding arrays (`PagedKVCache.init`).
        ok, generations, owner = bind_blocks(view.generations, view.owner, tag, ids[view.group], gens[view.group])  # type: ignore[arg-type]
        leaves, treedef = jax.tree_util.tree_flatten(view.pages())
        at = jnp.where(ok, ids[view.group], view.generations.shape[0])  # type: ignore[union-attr]  # refused: past the pool, dropped
        leaves = [leaf.at[at].set(d, mode="drop") for leaf, d in zip(leaves, data)]
        view = jax.tree_util.tree_unflatten(treedef, leaves)
        views.append(dataclasses.replace(view, generations=generations, owner=owner))
    return PagedKVCache(tuple(views))


def read_sequence(cache: PagedKVCache, blocks: tuple[np.ndarray, ...], first_blocks: tuple[int, ...],
                  num_tokens: int, sizes: tuple[int, ...], tag: jax.Array | np.ndarray) -> Pages:
    """`gather_sequence` of a sequence held in ``blocks`` (per group, its first logical
    block ``first_blocks[g]``) with ``num_tokens`` tokens, padded to ``sizes``: device
    arrays, ``[sizes[group], block_size, ...]`` per layer and page array."""
    ids = padded_ids(blocks, (NULL_BLOCK,) * len(blocks), sizes)
    return gather_sequence(cache, tuple(jnp.asarray(i) for i in ids), jnp.asarray(first_blocks, jnp.int32),  # type: ignore[no-any-return]  # jit's wrapper
                           jnp.int32(num_tokens), tag)


def write_back(cache: PagedKVCache, manager: KVCacheManager, blocks: tuple[np.ndarray, ...],
               sizes: tuple[int, ...], pages: PagesIn) -> PagedKVCache:
    """`write_sequence` of ``pages`` (padded to ``sizes``) into ``blocks``, blocks of
    ``manager`` (its pools say their generations); returns the new cache (donated)."""
    past_pool = tuple(g.num_blocks for g in manager.spec.groups)
    ids = padded_ids(blocks, past_pool, sizes)
    gens = tuple(g.pool.generations_of(i) for g, i in zip(manager.groups, ids))
    return write_sequence(cache, tuple(jnp.asarray(i) for i in ids), gens, pages, manager.steps.tag)  # type: ignore[no-any-return]  # jit's wrapper


__all__ = ["gather_sequence", "padded_ids", "padded_sizes", "read_sequence", "write_back", "write_sequence"]
