"""What a transfer moves on the device: one sequence's blocks of every layer (page and
scale arrays alike), gathered in one jitted call on the sender and written in place
in one jitted call on the receiver, and the checks that both caches store them alike.

Block counts are padded to a power of two (the gather reads the null block, the
write drops out-of-range ids), so sequences of similar lengths share one
compilation on each side. Slots past the sequence's length -- the tail of its last
block, the padding -- are zeroed before anything is sent: a reused block's stale
bytes (another sequence's keys) never leave the sender.
"""

from __future__ import annotations

import dataclasses
import json
from functools import partial

import attrs
import jax
import jax.numpy as jnp
import numpy as np

from paged_kv.binding import bind_blocks
from paged_kv.cache import PagedKVCache
from paged_kv.errors import TransferSpecError
from paged_kv.metadata import bucket
from paged_kv.spec import CacheSpec

POOL_FIELDS = frozenset({"num_blocks", "sliding_num_blocks", "chunked_num_blocks", "max_blocks_per_seq",
                         "max_batch_slots", "page_storage"})
"""Spec fields two caches may differ in and still exchange pages: the pool sizes and
limits (checked against the sequence itself), and how floats are stored (the pages'
dtypes are compared leaf by leaf instead)."""


def spec_fields(spec: CacheSpec) -> dict:
    """The fields of ``spec`` that decide what a page's bytes mean, as JSON values."""
    fields = attrs.asdict(spec, filter=lambda a, _: a.init and a.name not in POOL_FIELDS)
    return json.loads(json.dumps(fields, default=_json_default))


def _json_default(value):
    if isinstance(value, (np.integer, np.floating)):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    raise TypeError(f"{type(value).__name__} is not JSON")


def leaves_of(cache: PagedKVCache) -> list[list]:
    """Per layer, per page array: ``[shape after the block axis, dtype]``."""
    return [[[list(leaf.shape[1:]), np.dtype(leaf.dtype).str] for leaf in jax.tree_util.tree_leaves(view.pages())]
            for view in cache.views]


def check_compatible(offered_spec: dict, offered_leaves: list, spec: CacheSpec, cache: PagedKVCache) -> None:
    """`TransferSpecError` unless pages described by ``offered_spec`` / ``offered_leaves``
    mean the same in ``cache`` (built for ``spec``): same layers and kinds, heads, dims,
    dtype, block size, page format, scales, rotation, key offsets and layout."""
    mine = spec_fields(spec)
    diffs = [f"{k}={offered_spec.get(k)!r:.60} vs {mine[k]!r:.60}" for k in sorted(set(mine) | set(offered_spec))
             if offered_spec.get(k) != mine.get(k)]
    if diffs:
        raise TransferSpecError(f"the sender's cache stores pages otherwise (sender vs receiver: {', '.join(diffs)}); "
                                "transfer between caches of one spec (pool sizes may differ)", "spec")
    have = leaves_of(cache)
    if offered_leaves != have:
        layer = next((i for i, (a, b) in enumerate(zip(offered_leaves, have)) if a != b),
                     min(len(offered_leaves), len(have)))
        raise TransferSpecError(
            f"layer {layer}: the sender's page arrays are {offered_leaves[layer] if layer < len(offered_leaves) else None}, "
            f"this cache's {have[layer] if layer < len(have) else None} (another layout or page storage)", "spec")


def padded_ids(blocks: tuple[np.ndarray, ...], fill: tuple[int, ...], sizes: tuple[int, ...]) -> tuple[np.ndarray, ...]:
    """Each group's block ids padded with ``fill[g]`` to ``sizes[g]`` entries (int32)."""
    out = []
    for ids, f, n in zip(blocks, fill, sizes):
        padded = np.full(n, f, np.int32)
        padded[: ids.size] = ids
        out.append(padded)
    return tuple(out)


def padded_sizes(counts: tuple[int, ...], cap: int) -> tuple[int, ...]:
    """The padded block count of each group: the next power of two, at most ``cap``
    (never below the count itself)."""
    return tuple(max(bucket(max(n, 1), max(cap, 1)), n) for n in counts)


@jax.jit
def gather_pages(cache: PagedKVCache, ids: tuple, firsts: jax.Array, length: jax.Array, tag: jax.Array) -> tuple:
    """Per layer, per page array: the blocks ``ids[group]`` (logical blocks ``firsts[group]``
    on), with every slot at or past ``length`` zeroed. Pages that serve another manager
    give zeros."""
    out = []
    for view in cache.views:
        g, bs = view.group, view.spec.block_size
        n = ids[g].shape[0]
        mine = view.owner == tag
        pos = (firsts[g] + jnp.arange(n, dtype=jnp.int32))[:, None] * bs + jnp.arange(bs, dtype=jnp.int32)[None, :]
        live = mine & (pos < length)
        rows = jnp.where(mine, ids[g], 0)
        layer = []
        for leaf in jax.tree_util.tree_leaves(view.pages()):
            got = leaf[rows]
            keep = live.reshape(live.shape + (1,) * (got.ndim - 2))
            layer.append(jnp.where(keep, got, jnp.zeros((), got.dtype)))
        out.append(tuple(layer))
    return tuple(out)


@partial(jax.jit, donate_argnums=0)
def write_pages(cache: PagedKVCache, ids: tuple, gens: tuple, pages: tuple, tag: jax.Array) -> PagedKVCache:
    """Write ``pages`` (as `gather_pages` returns them) into blocks ``ids[group]`` of every
    layer, in place (the cache is donated), stamping each block with ``gens[group]``
    (`paged_kv.binding.bind_blocks`); out-of-range ids (padding) write nothing, and
    pages that serve another manager are left alone."""
    views = []
    for view, data in zip(cache.views, pages):
        ok, generations, owner = bind_blocks(view.generations, view.owner, tag, ids[view.group], gens[view.group])
        leaves, treedef = jax.tree_util.tree_flatten(view.pages())
        at = jnp.where(ok, ids[view.group], view.generations.shape[0])
        leaves = [leaf.at[at].set(d, mode="drop") for leaf, d in zip(leaves, data)]
        view = jax.tree_util.tree_unflatten(treedef, leaves)
        views.append(dataclasses.replace(view, generations=generations, owner=owner))
    return PagedKVCache(tuple(views))


def pull_shapes(cache: PagedKVCache, padded: tuple[int, ...]) -> list:
    """``jax.ShapeDtypeStruct`` of every array a transfer of ``padded`` blocks per group
    pulls into ``cache``'s device, flat in `gather_pages`' order."""
    out = []
    for view in cache.views:
        for leaf in jax.tree_util.tree_leaves(view.pages()):
            device = next(iter(leaf.devices()))
            out.append(jax.ShapeDtypeStruct((padded[view.group], *leaf.shape[1:]), leaf.dtype,
                                            sharding=jax.sharding.SingleDeviceSharding(device)))
    return out


def nest(cache: PagedKVCache, flat: list) -> tuple:
    """``flat`` arrays regrouped per layer as `gather_pages` returns them."""
    out, i = [], 0
    for view in cache.views:
        k = len(jax.tree_util.tree_leaves(view.pages()))
        out.append(tuple(flat[i: i + k]))
        i += k
    return tuple(out)


__all__ = ["POOL_FIELDS", "check_compatible", "gather_pages", "leaves_of", "nest", "padded_ids", "padded_sizes",
           "pull_shapes", "spec_fields", "write_pages"]


def transfer_server(device: jax.Device | None = None):
    """A `jax.experimental.transfer` server on 127.0.0.1 (a free port) for ``device``'s
    client (default: JAX's first device): it serves the pages a sender posts, and makes
    the connections a receiver pulls through."""
    from jax.experimental import transfer

    device = device or jax.devices()[0]
    return transfer.start_transfer_server(device.client, "127.0.0.1:0", ["127.0.0.1:0"])


def abandon(connection) -> None:
    """Fail every pull still waiting on ``connection`` (its arrays become errors), so a
    dead peer cannot hold them forever; the connection is unusable afterwards.
    (jax 0.10.2 offers this only as ``_poison_connection``; without it the pulls are
    left pending.)"""
    poison = getattr(connection, "_poison_connection", None)
    if poison is not None:
        poison()


__all__ += ["abandon", "transfer_server"]
