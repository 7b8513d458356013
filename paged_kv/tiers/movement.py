"""Device side of the tiers: the pending moves of a `CacheTiers`, one jitted call each way.

`flush(cache, tiers)` runs after the host has allocated a step (admissions, appends,
`prepare`) and before the step runs:

* down: one jitted gather of every block the device evicted (or, write-through,
  keyed) since the last flush, every layer and leaf (keys, values, scales), all
  groups at once. Each block is checked on the device against the generation it had
  when it was evicted and the pages' owner: a block rewritten since (its step ran
  before this flush) or pages of another manager give ``ok = False`` and the copy is
  refused, so a tier never stores bytes under a key they do not hold. The gather is
  dispatched and its copy to the host started; it lands (`finish`) at the next flush
  or when asked, off the step's critical path (``wait=True``: at once).
* up: the blocks `CacheTiers.prepare` allocated, staged from the host slots (or the
  disk pages read) into one array per leaf, and written by one jitted scatter that
  stamps each block with its new generation (`binding.bind_blocks`, as `swap_in`
  does), the cache donated. Counted in the step's time: the step reads them.

Shapes: counts are padded to a power of two shared by the groups (padding gathers the
null block and is dropped on landing; padding scatters to an id past the pool,
dropped), so a serving loop compiles a few programs each way.
"""

from __future__ import annotations

import dataclasses
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np

from paged_kv.binding import bind_blocks
from paged_kv.cache import PagedKVCache
from paged_kv.errors import ShapeError, TierError
from paged_kv.spec import NULL_BLOCK, require_same_spec
from paged_kv.tiers.tiers import CacheTiers
from paged_kv.views import UnifiedCacheView


@jax.jit
def _gather(cache: PagedKVCache, ids: tuple, gens: tuple, tag: jax.Array) -> tuple:
    oks = []
    for g, (i, e) in enumerate(zip(ids, gens)):
        ok = jnp.ones(i.shape, bool)
        for view in cache.views:
            if view.group == g:  # every layer of the group must still hold that generation
                ok = ok & (view.generations[i] == e) & (view.owner == tag)
        oks.append(ok)
    pages = tuple(tuple(leaf[ids[view.group]] for leaf in jax.tree_util.tree_leaves(view.pages()))
                  for view in cache.views)
    return tuple(oks), pages


@partial(jax.jit, donate_argnums=0)
def _scatter(cache: PagedKVCache, ids: tuple, gens: tuple, pages: tuple, tag: jax.Array) -> PagedKVCache:
    views = []
    for view, data in zip(cache.views, pages):
        ok, generations, owner = bind_blocks(view.generations, view.owner, tag, ids[view.group], gens[view.group])
        leaves, treedef = jax.tree_util.tree_flatten(view.pages())
        at = jnp.where(ok, ids[view.group], view.generations.shape[0])  # another manager's pages: nothing written
        leaves = [leaf.at[at].set(d, mode="drop") for leaf, d in zip(leaves, data)]
        view = jax.tree_util.tree_unflatten(treedef, leaves)
        views.append(dataclasses.replace(view, generations=generations, owner=owner))
    return PagedKVCache(tuple(views))


def _check(cache: PagedKVCache, tiers: CacheTiers) -> None:
    if not isinstance(cache, PagedKVCache):
        raise ShapeError(f"cache is a {type(cache).__name__}; expected a PagedKVCache")
    if not isinstance(tiers, CacheTiers):
        raise TierError(f"tiers is a {type(tiers).__name__}; expected a paged_kv.tiers.CacheTiers")
    require_same_spec(tiers.manager, cache, "manager", "cache")
    layout = "unified" if isinstance(cache.views[0], UnifiedCacheView) else "split"
    if layout != tiers.layout:
        raise TierError(f"the cache's pages are {layout}, the tiers were opened for layout={tiers.layout!r}: pages "
                        "of one layout are other bytes in the other; build CacheTiers(..., layout="
                        f"{layout!r})")


def _pow2(n: int) -> int:
    return 1 << (max(n, 1) - 1).bit_length()


def _layers(cache: PagedKVCache, group: int) -> list[int]:
    return [i for i, view in enumerate(cache.views) if view.group == group]


def finish(tiers: CacheTiers) -> None:
    """Land the copies down in flight (wait for their bytes): into the host tier, or
    refused where the device said the block had changed hands."""
    flights, tiers.in_flight = tiers.in_flight or [], None
    for downloads, oks, pages, layers in flights:
        oks = [np.asarray(ok) for ok in oks]
        pages = [[np.asarray(a) for a in layer] for layer in pages]
        index = [0] * len(oks)
        for d in downloads:
            i = index[d.group]
            index[d.group] += 1
            page = [[a[i] for a in pages[layer]] for layer in layers[d.group]] if oks[d.group][i] else None
            tiers.landed(d, page)


def flush(cache: PagedKVCache, tiers: CacheTiers, wait: bool = False) -> PagedKVCache:
    """Run every pending move of ``tiers`` (module doc); returns the cache (donated:
    keep the one returned). ``wait=True`` lands the copies down before returning."""
    _check(cache, tiers)
    finish(tiers)
    spec, manager = tiers.spec, tiers.manager
    tag = manager.steps.tag
    groups = range(len(spec.groups))
    layers = [_layers(cache, g) for g in groups]
    downloads, tiers.downloads = tiers.downloads, []
    if downloads:
        n = _pow2(max(sum(d.group == g for d in downloads) for g in groups))
        ids = [np.full(n, NULL_BLOCK, np.int32) for _ in groups]
        gens = [np.zeros(n, np.int32) for _ in groups]
        fill = [0] * len(ids)
        for d in downloads:
            ids[d.group][fill[d.group]], gens[d.group][fill[d.group]] = d.block, d.generation
            fill[d.group] += 1
        oks, pages = _gather(cache, tuple(ids), tuple(gens), tag)
        for leaf in jax.tree_util.tree_leaves((oks, pages)):
            leaf.copy_to_host_async()  # the device -> host copy runs while the host goes on
        tiers.in_flight = [(downloads, oks, pages, layers)]
    uploads, tiers.uploads = list(tiers.uploads.values()), {}
    if uploads:
        cache = _upload(cache, tiers, uploads, layers, tag)
    if wait:
        finish(tiers)
    return cache


def _upload(cache, tiers: CacheTiers, uploads: list, layers: list[list[int]], tag) -> PagedKVCache:
    spec = tiers.spec
    groups = range(len(spec.groups))
    n = _pow2(max(sum(u.group == g for u in uploads) for g in groups))
    ids = [np.full(n, gr.num_blocks, np.int32) for gr in spec.groups]  # past the pool: dropped
    gens = [np.zeros(n, np.int32) for _ in groups]
    staged = []
    for view in cache.views:
        staged.append([np.zeros((n, *leaf.shape[1:]), leaf.dtype) for leaf in jax.tree_util.tree_leaves(view.pages())])
    fill = [0] * len(ids)
    for u in uploads:
        g, i = u.group, fill[u.group]
        fill[g] += 1
        ids[g][i], gens[g][i] = u.block, u.generation
        host = tiers.host[g]
        for k, layer in enumerate(layers[g]):
            if u.pages is not None:
                src = u.pages[k]
            else:
                slot = host.slot_of[u.key]
                src = [buf[slot] for buf in host.buffers[k]]
            for dst, a in zip(staged[layer], src):
                if a.shape != dst.shape[1:] or a.dtype != dst.dtype:
                    raise TierError(f"a tier page of layer {layer} is {a.shape} {a.dtype}; the cache's pages are "
                                    f"{dst.shape[1:]} {dst.dtype}: the tier was written for other pages")
                dst[i] = a
        if u.pages is None:
            host.unpin(u.key)
    return _scatter(cache, tuple(ids), tuple(gens), tuple(tuple(layer) for layer in staged), tag)


__all__ = ["finish", "flush"]
