"""Device side of the tiers: the pending moves of a `CacheTiers`, each way at once.

`flush(cache, tiers)` runs after the host has allocated a step (admissions, appends,
`prepare`) and before the step runs:

* down: every block the device evicted (or, write-through, keyed) since the last
  flush, every layer and leaf (keys, values, scales), all groups at once. Each block
  is checked against the generation it had when it was evicted and the pages' owner:
  a block rewritten since (its step ran before this flush) or pages of another
  manager give ``ok = False`` and the copy is refused, so a tier never stores bytes
  under a key they do not hold. Two ways:

  - a pool in host memory (a CPU device: `paged_kv.host_pool.host_memory`) whose steps have all run
    (`_written`; a serving loop has read the last step's output by then): read in
    place, the checks on the host, each block's rows copied once straight into the
    host slots (`_land_direct`), landed before `flush` returns. One copy.
  - otherwise: one jitted gather (the device's snapshot: the pool is donated to the
    next step and rewritten), its copy to the host started; it lands (`finish`) at
    the next flush or when asked, off the step's critical path (``wait=True``: at once).
* up: the blocks `CacheTiers.prepare` allocated, each stamped with its new generation
  (`binding.bind_blocks`, as `swap_in` does). On a CPU device written in place: the
  cache made this caller's alone (one jitted call that donates it and computes
  nothing), then generations and owners set and rows copied from the host slots (or
  the disk pages read) straight into the pool (`_upload_in_place`). Elsewhere staged in one array per leaf and written by one
  jitted scatter, the cache donated. Counted in the step's time: the step reads them.

Shapes: jitted counts are padded to a power of two shared by the groups (padding
gathers the null block and is dropped on landing; padding scatters to an id past the
pool, dropped), so a serving loop compiles a few programs each way.
"""

from __future__ import annotations

import dataclasses
import math
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from numpy.typing import DTypeLike

from paged_kv.host_pool import in_host_memory, pointer_view
from paged_kv.binding import bind_blocks
from paged_kv.cache import PagedKVCache
from paged_kv.errors import ShapeError, TierError
from paged_kv.spec import NULL_BLOCK, require_same_spec
from paged_kv.tiers.copies import Copy, start
from paged_kv.tiers.host import RowsOf, row_runs
from paged_kv.tiers.tiers import CacheTiers, Download, Upload
from paged_kv.views import UnifiedCacheView


def _word_rows(shape: tuple[int, ...], dtype: DTypeLike) -> tuple[np.dtype, int]:
    """How a leaf's block rows are gathered: ``(dtype, elements per row)``. As uint32
    words where a row's bytes allow it -- XLA:CPU gathers 32-bit elements several times
    faster than 16- or 8-bit ones, and the bytes are the same -- else as the leaf's own
    elements. (Scatters stay in the leaf's dtype: turning words back into 16-bit
    elements is not free on XLA:CPU, measured slower than the native scatter.)"""
    itemsize, per_row = np.dtype(dtype).itemsize, math.prod(shape[1:])
    if itemsize <= 4 and (per_row * itemsize) % 4 == 0:
        return np.dtype(np.uint32), per_row * itemsize // 4
    return np.dtype(dtype), per_row


def _to_words(leaf: jax.Array) -> jax.Array:
    """``leaf`` as ``[blocks, words]`` (`_word_rows`), a bitcast: no copy."""
    dtype, words = _word_rows(leaf.shape, leaf.dtype)
    n, itemsize = leaf.shape[0], leaf.dtype.itemsize
    if dtype == leaf.dtype:
        return leaf.reshape(n, words)
    return lax.bitcast_convert_type(leaf.reshape(n, words, 4 // itemsize) if itemsize < 4 else
                                    leaf.reshape(n, words), jnp.uint32)


def _host_rows(words: np.ndarray, shape: tuple[int, ...], dtype: DTypeLike) -> np.ndarray:
    """Host rows of words viewed as a leaf's ``[n, *shape[1:]]`` pages (a view, no copy)."""
    return words.view(np.dtype(dtype)).reshape(words.shape[0], *shape[1:])


@jax.jit
def _gather(cache: PagedKVCache, ids: tuple[jax.Array, ...], gens: tuple[jax.Array, ...],
            tag: jax.Array) -> tuple[tuple[jax.Array, ...], tuple[tuple[jax.Array, ...], ...]]:
    oks = []
    for g, (i, e) in enumerate(zip(ids, gens)):
        ok = jnp.ones(i.shape, bool)
        for view in cache.views:
            if view.group == g:  # every layer of the group must still hold that generation
                ok = ok & (view.generations[i] == e) & (view.owner == tag)  # type: ignore[index]  # a cache's views carry their binding arrays (`PagedKVCache.init`)
        oks.append(ok)
    pages = tuple(tuple(_to_words(leaf)[ids[view.group]] for leaf in jax.tree_util.tree_leaves(view.pages()))
                  for view in cache.views)
    return tuple(oks), pages


@partial(jax.jit, donate_argnums=0)
def _scatter(cache: PagedKVCache, ids: tuple[jax.Array, ...], gens: tuple[jax.Array, ...],
             words: tuple[tuple[jax.Array, ...], ...], tag: jax.Array) -> tuple[PagedKVCache, jax.Array]:
    views = []
    for view, data in zip(cache.views, words):
        ok, generations, owner = bind_blocks(view.generations, view.owner, tag, ids[view.group], gens[view.group])  # type: ignore[arg-type]  # a cache's views carry their binding arrays (`PagedKVCache.init`)
        leaves, treedef = jax.tree_util.tree_flatten(view.pages())
        at = jnp.where(ok, ids[view.group], view.generations.shape[0])  # type: ignore[union-attr]  # bound, as above; another manager's pages: nothing written
        leaves = [leaf.at[at].set(d.reshape(d.shape[0], *leaf.shape[1:]), mode="drop") for leaf, d in zip(leaves, data)]
        view = jax.tree_util.tree_unflatten(treedef, leaves)
        views.append(dataclasses.replace(view, generations=generations, owner=owner))
    # ids[0] comes out of the same program: once it is ready the staging buffers were read.
    return PagedKVCache(tuple(views)), ids[0] + 0


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


Shapes = list[list[tuple[tuple[int, ...], np.dtype]]]
"""Per layer, per page leaf: ``(shape, dtype)`` of the cache's page arrays."""


@dataclasses.dataclass(frozen=True)
class _Pool:
    """What a flush needs of a cache's structure, where its arrays sit in the cache's
    flat leaves (``jax.tree_util.tree_leaves``: every view's page leaves, generations,
    owner). Made once per structure (`_pool`): walking the views in Python each flush
    cost ~0.1 ms of a 16 MiB move on a slow host, which a copy at memcpy speed cannot
    hide."""

    layers: list[list[int]]  # per group: its layers
    shapes: Shapes
    slots: list[Shapes]  # per group, then layer and leaf: a host slot's shapes
    pages: list[list[int]]  # per layer: the leaves of its pages
    generations: list[int]  # per layer: its generations' leaf
    owner: list[int]  # per layer: its owner's leaf
    flat: list[tuple[tuple[int, ...], np.dtype]]  # per flat leaf: its shape and dtype (`_view`)


_POOLS: dict[Any, _Pool] = {}


def _pool(cache: PagedKVCache, groups: int) -> tuple[list[Any], _Pool]:
    """The cache's flat leaves and its `_Pool` (kept per tree structure and leaf shapes;
    a handful of entries at most in a serving process)."""
    leaves, treedef = jax.tree_util.tree_flatten(cache)
    flat = tuple((tuple(a.shape), np.dtype(a.dtype)) for a in leaves)
    key = (treedef, groups, flat)
    pool = _POOLS.get(key)
    if pool is None:
        at = {id(a): i for i, a in enumerate(leaves)}
        pages = [[at[id(leaf)] for leaf in jax.tree_util.tree_leaves(view.pages())] for view in cache.views]
        shapes = [[(tuple(leaves[i].shape), np.dtype(leaves[i].dtype)) for i in layer] for layer in pages]
        layers = [[i for i, view in enumerate(cache.views) if view.group == g] for g in range(groups)]
        pool = _Pool(layers, shapes, [[[(s[1:], d) for s, d in shapes[layer]] for layer in ls] for ls in layers],
                     pages, [at[id(view.generations)] for view in cache.views],
                     [at[id(view.owner)] for view in cache.views], list(flat))
        if len(_POOLS) > 16:
            _POOLS.clear()
        _POOLS[key] = pool
    return leaves, pool


def _ensure_buffers(tiers: CacheTiers, pool: _Pool) -> None:
    """Each group's host buffers made (once, before any copy lands) for these pages."""
    for g, host in enumerate(tiers.host):
        if tiers.keep_bytes and host.capacity:
            try:
                host.ensure_buffers(pool.slots[g])
            except AssertionError as exc:
                raise TierError(f"the host tier of layer group {g} holds other pages than this cache's ({exc}): the "
                                "tier was written for another cache") from None


def finish(tiers: CacheTiers) -> None:
    """Land the copies down in flight (`_land`) and wait until every block bound for
    the disk is in its file (`CacheTiers.sync_disk`)."""
    _land(tiers)
    tiers.sync_disk()


def _land(tiers: CacheTiers) -> None:
    """Land the copies down in flight (wait for their bytes): into the host tier (or
    staged for the disk), or refused where the device said the block had changed
    hands. One transfer of every array (`jax.device_get`; on CPU the arrays are
    viewed, not copied), then one fancy-index copy per leaf into the host buffers
    (`CacheTiers.land`)."""
    flights, tiers.in_flight = tiers.in_flight or [], None
    for per_group, oks, pages, layers, shapes in flights:
        oks, pages = jax.device_get((oks, pages))
        for g, downloads in enumerate(per_group):
            if downloads:
                rows = [[_host_rows(pages[layer][j], *shapes[layer][j]) for j in range(len(shapes[layer]))]
                        for layer in layers[g]]
                tiers.land(downloads, np.asarray(oks[g]), rows)


def flush(cache: PagedKVCache, tiers: CacheTiers, wait: bool = False) -> PagedKVCache:
    """Run every pending move of ``tiers`` (module doc); returns the cache (donated:
    keep the one returned). Blocks bound for the disk go to its background writer as
    one segment (`disk`). ``wait=True`` lands the copies down, on disk too, before
    returning."""
    _check(cache, tiers)
    _land(tiers)
    spec, manager = tiers.spec, tiers.manager
    tag = manager.steps.tag
    groups = range(len(spec.groups))
    leaves, pool = _pool(cache, len(groups))
    layers, shapes = pool.layers, pool.shapes
    _ensure_buffers(tiers, pool)
    downloads, tiers.downloads = tiers.downloads, []
    uploads, tiers.uploads = list(tiers.uploads.values()), {}
    in_place = host_reads and (downloads or uploads) and in_host_memory(leaves)
    if downloads:
        per_group = [[d for d in downloads if d.group == g] for g in groups] if len(groups) > 1 else [downloads]
        if in_place and _written(leaves, wait):
            _land_direct(leaves, pool, tiers, per_group, tag)  # landed now: one copy, nothing in flight
        else:
            n = _pow2(max(len(ds) for ds in per_group))
            ids = np.full((len(per_group), n), NULL_BLOCK, np.int32)  # padding gathers the null block: dropped
            gens = np.zeros((len(per_group), n), np.int32)
            for g, ds in enumerate(per_group):
                ids[g, : len(ds)] = [d.block for d in ds]
                gens[g, : len(ds)] = [d.generation for d in ds]
            oks, pages = _gather(cache, tuple(ids), tuple(gens), tag)
            for leaf in jax.tree_util.tree_leaves((oks, pages)):
                leaf.copy_to_host_async()  # the device -> host copy runs while the host goes on
            tiers.in_flight = [(per_group, oks, pages, layers, shapes)]
    if uploads:
        cache = _upload(cache, tiers, uploads, pool, tag, bool(in_place))
    if wait:
        finish(tiers)
    else:
        tiers.submit_disk()  # the fsync runs off the step's critical path
    return cache


host_reads = True
"""A pool in host memory (a CPU device) is read and written in place: copies down
straight from it where it is written (`_land_direct`), uploads straight into it
(`_upload_in_place`). False: always the jitted gather and scatter (the tests run both)."""


def _written(arrays: list[Any], wait: bool) -> bool:
    """Whether every step that writes the pool (its ``arrays``) has run (with ``wait``:
    waited for); `_land_direct` may then read a pool in host memory
    (`paged_kv.host_pool.host_memory`) in place."""
    if wait:
        jax.block_until_ready(arrays)  # type: ignore[no-untyped-call]  # jax's block_until_ready is unannotated
        return True
    return all(a.is_ready() for a in arrays)


def _land_direct(leaves: list[Any], pool: _Pool, tiers: CacheTiers, per_group: list[list[Download]],
                 tag: np.ndarray) -> None:
    """The copies down of a pool in host memory that every step before this flush has
    written (`paged_kv.host_pool.host_memory`, `_written`): the device's checks (generation and owner)
    read on the host, and each block's rows copied once, from the pool's arrays viewed
    in place (`_view`: plain pointers, no copy) straight into the host slots (`RowsOf`).
    No view outlives this call with a reference that a later donation sees (one would
    make it copy the pool)."""
    for g, ds in enumerate(per_group):
        if not ds:
            continue
        ids = np.fromiter((d.block for d in ds), np.intp, len(ds))
        gens = np.fromiter((d.generation for d in ds), np.int64, len(ds))
        ok = np.ones(len(ds), bool)
        rows: list[list[Any]] = []  # RowsOf stands for the rows' arrays (`HostTier.write_rows`)
        for layer in pool.layers[g]:
            # Small arrays, often new (a bind), read: np.asarray, whose view dies here.
            ok &= (np.asarray(leaves[pool.generations[layer]])[ids] == gens) & (
                np.asarray(leaves[pool.owner[layer]]) == tag)
            rows.append([RowsOf(_view(leaves, pool, i), ids) for i in pool.pages[layer]])
        tiers.land(ds, ok, rows, pool.slots[g])


def _aligned(shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
    """A 64-byte aligned array: on CPU, `jax.device_put` then aliases it (no copy)."""
    nbytes = math.prod(shape) * dtype.itemsize
    raw = np.empty(nbytes + 64, np.uint8)
    start = -raw.ctypes.data % 64
    return raw[start: start + nbytes].view(dtype).reshape(shape)


def _staging(tiers: CacheTiers, shapes: Shapes, n: int) -> list[list[np.ndarray]]:
    """Per layer, per leaf: ``[n, words]`` host rows to stage an upload in, kept between
    flushes (fresh memory would fault in every page again); the last upload that read
    them has finished first (on CPU the device arrays alias them)."""
    if tiers.staging_busy is not None:
        jax.block_until_ready(tiers.staging_busy)  # type: ignore[no-untyped-call]  # jax's block_until_ready is unannotated
        tiers.staging_busy = None
    have = tiers.staging
    if not have or have[0][0].shape[0] < n:
        have = tiers.staging = [[_aligned((n, _word_rows(s, d)[1]), _word_rows(s, d)[0]) for s, d in layer]
                                for layer in shapes]
    return [[a[:n] for a in layer] for layer in have]


@partial(jax.jit, donate_argnums=0)
def _own(leaves: list[jax.Array]) -> list[jax.Array]:
    """The pool's arrays, donated and returned: the same buffers (no copy: XLA aliases a
    donated input to its output), then held by this caller alone -- every program that
    read them has run (a donation waits for them) and no other view of them is alive
    (one would have made the donation a copy). Nothing is computed: `_upload_in_place`
    binds the blocks and writes their pages with numpy, which on a slow host costs less
    than a jitted scatter's dispatch (~35 against ~80 us a flush, measured here)."""
    return leaves


def _upload_in_place(cache: PagedKVCache, tiers: CacheTiers, uploads: list[Upload], pool: _Pool,
                     tag: np.ndarray) -> PagedKVCache:
    """The uploads of a pool in host memory (`paged_kv.host_pool.host_memory`): one jitted
    call makes the cache this caller's alone (`_own`: donated; waited for), then, before
    anyone else sees the cache, each layer's blocks are bound as `binding.bind_blocks`
    binds them (`_scatter` does the same on a device: an unowned pool takes ``tag``,
    the blocks their new generations) and their rows copied once from the host slots
    (or the disk pages) straight into the pool's buffers. Pages of another manager (the
    view's owner) are neither bound nor written, as `_scatter` drops them."""
    spec = tiers.spec
    for u in uploads:  # checked before the cache is donated: an error leaves the caller's cache whole
        if u.pages is not None:
            for layer, page in zip(pool.layers[u.group], u.pages):
                for (shape, dtype), a in zip(pool.shapes[layer], page):
                    if a.shape != shape[1:] or a.dtype != dtype:
                        raise TierError(f"a tier page of layer {layer} is {a.shape} {a.dtype}; the cache's pages "
                                        f"are {shape[1:]} {dtype}: the tier was written for other pages")
    per_group = [[u for u in uploads if u.group == g] for g in range(len(spec.groups))] if len(spec.groups) > 1 \
        else [uploads]
    leaves, treedef = jax.tree_util.tree_flatten(cache)
    leaves = _own(leaves)
    jax.block_until_ready(leaves)  # type: ignore[no-untyped-call]  # jax's block_until_ready is unannotated
    mine = []  # per layer: whether its pages serve this manager
    for at in pool.owner:
        owner = _view(leaves, pool, at)
        if owner[()] == 0:
            owner[()] = tag  # an unowned pool serves this manager from now on (every layer, as `_scatter` does)
        mine.append(bool(owner[()] == tag))
        del owner
    copies: list[Copy] = []  # every row copy listed first, then run in one go (`copies.start`)
    for g, ups in enumerate(per_group):
        if not ups:
            continue
        host = tiers.host[g]
        ids = np.fromiter((u.block for u in ups), np.intp, len(ups))
        gens = np.fromiter((u.generation for u in ups), np.int64, len(ups))
        from_host = [i for i, u in enumerate(ups) if u.pages is None]
        from_disk = [(u.block, u.pages) for u in ups if u.pages is not None]
        runs = row_runs(ids[from_host], np.fromiter((host.slot_of[ups[i].key] for i in from_host), np.intp,
                                                    len(from_host)))
        for k, layer in enumerate(pool.layers[g]):
            if not mine[layer]:  # another manager's pages: not bound, not written
                continue
            _view(leaves, pool, pool.generations[layer])[ids] = gens
            for j, i in enumerate(pool.pages[layer]):
                dst = _view(leaves, pool, i)
                if runs:
                    assert host.buffers is not None
                    copies.extend((dst, host.buffers[k][j], run) for run in runs)
                for block, pages in from_disk:
                    dst[block] = pages[k][j]
                del dst
    running = start(copies, tiers.copy_threads)
    del copies
    # While workers copy (one thread: before the copies). Unpinned here, read below: no
    # slot is evicted before `wait`, nothing runs in between that inserts into a tier.
    try:
        for g, ups in enumerate(per_group):
            if ups:
                tiers.host[g].unpin_all(u.key for u in ups if u.pages is None)
        out: PagedKVCache = jax.tree_util.tree_unflatten(treedef, leaves)
    finally:
        running.wait()  # the cache is the caller's once its pages are written (an error too: no write after)
    return out


def _view(leaves: list[Any], pool: _Pool, i: int) -> np.ndarray:
    """Flat leaf ``i`` of a pool in host memory as a numpy array of its shape
    (`paged_kv.host_pool.pointer_view`: a plain pointer, nothing a later donation sees,
    kept per buffer). Read only once the steps writing it have run (`_written`), written
    only while this caller holds the pool alone (`_own`)."""
    return pointer_view(leaves[i], *pool.flat[i])


def _upload(cache: PagedKVCache, tiers: CacheTiers, uploads: list[Upload], pool: _Pool, tag: np.ndarray,
            in_place: bool) -> PagedKVCache:
    if in_place:
        return _upload_in_place(cache, tiers, uploads, pool, tag)
    spec, layers, shapes = tiers.spec, pool.layers, pool.shapes
    # Per group, uploads from host slots first: their rows are one block of the staging
    # arrays, filled by one np.take per leaf; pages read from disk follow, one row each.
    per_group = [sorted((u for u in uploads if u.group == g), key=lambda u: u.pages is not None)
                 for g in range(len(spec.groups))]
    n = _pow2(max(len(ups) for ups in per_group))
    ids = np.stack([np.full(n, gr.num_blocks, np.int32) for gr in spec.groups])  # past the pool: dropped
    gens = np.zeros((len(per_group), n), np.int32)
    staged = _staging(tiers, shapes, n)
    for g, ups in enumerate(per_group):
        if not ups:
            continue
        ids[g, : len(ups)] = [u.block for u in ups]
        gens[g, : len(ups)] = [u.generation for u in ups]
        rows = [[_host_rows(staged[layer][j], *shapes[layer][j]) for j in range(len(shapes[layer]))]
                for layer in layers[g]]
        from_host = [u.key for u in ups if u.pages is None]
        if from_host:
            tiers.host[g].read_rows(from_host, [[a[: len(from_host)] for a in layer] for layer in rows])
        for i, u in enumerate(ups[len(from_host):], start=len(from_host)):
            assert u.pages is not None
            for k, layer in enumerate(layers[g]):
                for dst, a in zip(rows[k], u.pages[k]):
                    if a.shape != dst.shape[1:] or a.dtype != dst.dtype:
                        raise TierError(f"a tier page of layer {layer} is {a.shape} {a.dtype}; the cache's pages "
                                        f"are {dst.shape[1:]} {dst.dtype}: the tier was written for other pages")
                    dst[i] = a
        for key in from_host:
            tiers.host[g].unpin(key)
    # One call for every array; on CPU an alias of the staging rows, not a copy.
    words = jax.device_put(tuple(tuple(_host_rows(a, *shape) for a, shape in zip(layer, layer_shapes))
                                 for layer, layer_shapes in zip(staged, shapes)))
    cache, tiers.staging_busy = _scatter(cache, tuple(ids), tuple(gens), words, tag)
    return cache


__all__ = ["finish", "flush"]
