"""Save a paged cache and its host allocator to one file, and restore both exactly.

Why both, in one file: a paged cache's pages mean nothing without the allocator
that says which block holds which sequence's tokens, and an allocator restored
without its exact free-list order would hand out different block ids than the
original, so a restored server would diverge from the one it replaces. EasyDeL's
``TransformerCache.to_pure`` / ``from_pure`` hand the caller raw tensors plus
metadata and leave writing them, and checking them on the way back, to the caller;
here the whole state is one verified file, and `load_checkpoint` builds and checks
everything before it returns anything, so a bad file never yields a half-restored
cache.

File format (``FORMAT_NAME``, version ``FORMAT_VERSION``): one uncompressed ``.npz``.

``header``
    uint8: UTF-8 JSON ``{"format", "version", "spec": {CacheSpec init fields},
    "layout": "split" | "unified", "slots": null | {"num_slots": n}, "arrays":
    [{"name", "shape", "dtype", "sha256"}, ...]}``. The manifest lists every other
    array with its shape, dtype (numpy ``dtype.str``) and the SHA-256 of its bytes.
``digest``
    uint8: the hex SHA-256 of the header's bytes. Since the header holds every
    array's digest, this one value covers the header and every array's bytes (a
    two-level digest: each byte is hashed once, and a mismatch names the array).
``layer{i}.key_pages``, ``layer{i}.value_pages`` (split) or ``layer{i}.kv_pages`` (unified)
    Each layer's pages in their *storage* dtype (the float's bits as uint, see
    `paged_kv.spec.storage_dtype`), so bfloat16 and fp8 round-trip bit for bit; an
    int8 layer (`paged_kv.quant`) adds ``layer{i}.key_scales``/``value_scales`` (or
    ``kv_scales``), its per-token scales' bits. Fixed fp8 scales are in the spec.
``group{g}.pool.*``, ``group{g}.table.*``, ``manager.rows``
    The manager's host state (`_manager_state`).
``slots.slot_of``
    Only when `DecodeSlots` were saved: ``[(seq_id, slot), ...]`` in insertion order.

The file is written to a temporary name in the target's directory and renamed over
the target (``os.replace``, atomic on POSIX and Windows), so a crash or a full disk
mid-write leaves the previous file at ``path`` (or none) and never half a checkpoint.

MAINTENANCE: `_manager_state` / `_restore_manager` (and `_slots_state` /
`_restore_slots`) are the only code that knows the allocator's internals. A new
piece of manager state (the prefix cache of a later issue, say) must be captured
and restored there, with ``FORMAT_VERSION`` bumped (keep reading older versions
where the new state has an obvious empty value). `_KNOWN_STATE` lists the attributes
this module captures; saving an object with any other attribute raises
`CheckpointError`, so forgetting this step fails loudly instead of writing a
checkpoint that silently drops state.
"""

from __future__ import annotations

import hashlib
import json
import os
import uuid
import zipfile
import zlib

import attrs
import jax
import numpy as np

from paged_kv.allocator.block_pool import BlockPool
from paged_kv.allocator.decode_slots import DecodeSlots
from paged_kv.allocator.manager import KVCacheManager, _Group
from paged_kv.allocator.page_table import PageTable
from paged_kv.allocator.prefix_cache import PrefixCache
from paged_kv.allocator.written import WrittenBlocks
from paged_kv.cache import _LAYOUTS, PagedKVCache
from paged_kv.errors import CheckpointError, PagedKVError, SpecError
from paged_kv.sharding import for_rank
from paged_kv.spec import CacheSpec

FORMAT_NAME = "paged_kv.checkpoint"
FORMAT_VERSION = 2
READABLE_VERSIONS = (1, 2)
"""Version 2 added the prefix cache's written-block state (``written.*``); a version 1
file restores with none (nothing uncommitted: its keyed blocks were keyed at admission)."""

# Attributes captured per class. Anything else on a saved object is state this
# module would drop: `save_checkpoint` refuses it (see MAINTENANCE above).
_KNOWN_STATE: dict[type, frozenset[str]] = {
    # _copies (pending copy-on-write copies): saving requires none, and a restored
    # manager starts with none. _forked is derived on restore (any block with two
    # holders); _slotted is rebuilt by restoring the slots. _written: the written.* arrays.
    # _descriptions/_described only order pending copies, so with none they are moot.
    KVCacheManager: frozenset({"spec", "groups", "_rows", "_copies", "_forked", "_written", "_slotted",
                               "_descriptions", "_described"}),
    # issued: what the last step described but nobody committed; dropped (a restored
    # manager keys those blocks at their next committed step instead).
    WrittenBlocks: frozenset({"issued", "written", "hashes", "keyed"}),
    _Group: frozenset({"window", "pool", "table", "pad_slot"}),  # window, pad_slot follow from the spec
    # cache: the prefix cache (or None), captured as the prefix.* arrays.
    BlockPool: frozenset({"num_blocks", "ref_counts", "_free", "_num_free", "cache"}),
    # epoch is transient (a change counter for cached batch layouts): a restored table starts at 0.
    PageTable: frozenset(
        {"max_blocks_per_seq", "block_tables", "kv_lens", "num_blocks", "first_block", "in_use", "_free_rows", "epoch"}
    ),
    DecodeSlots: frozenset({"manager", "_seqs", "_slot_of"}),
    # _events and _subscribers belong to the running process: not saved.
    PrefixCache: frozenset({"block_of", "hash_of", "parent_of", "evictable", "queries", "query_tokens", "hit_tokens",
                            "blocks_reused", "blocks_stored", "blocks_evicted", "_events", "_subscribers"}),
}

_RESERVED = ("header", "digest")


@attrs.frozen(eq=False)
class Checkpoint:
    """What `load_checkpoint` restores: continue serving with ``cache`` and ``manager``
    (and ``slots``, ``None`` if none were saved) exactly where the saver stopped."""

    spec: CacheSpec
    cache: PagedKVCache
    manager: KVCacheManager
    slots: DecodeSlots | None = None
    layout: str = "split"


# ---- public API ------------------------------------------------------------------------
def save_checkpoint(path: str | os.PathLike, cache: PagedKVCache, manager: KVCacheManager, slots: DecodeSlots | None = None) -> None:
    """Write ``cache``'s pages, ``manager``'s host state and (optionally) ``slots`` to ``path``.

    ``path`` is used as given (no ``.npz`` is appended). Everything is checked
    before the file is touched: the cache must be built for the manager's spec, the
    slots must belong to ``manager``, the allocator must pass ``check_integrity``.
    The write is atomic (temporary file, then ``os.replace``): on any failure the
    file previously at ``path``, if any, is unchanged. Raises `CheckpointError`.

    The cache is only read (one ``jax.device_get`` of every page array), so it stays
    usable. Call this between steps, not while a donated step is in flight.
    """
    path = _fspath(path, "save")
    if not isinstance(manager, KVCacheManager):
        raise CheckpointError(f"cannot save {path!r}: manager is a {type(manager).__name__}, not a KVCacheManager")
    if not isinstance(cache, PagedKVCache):
        raise CheckpointError(f"cannot save {path!r}: cache is a {type(cache).__name__}, not a PagedKVCache")
    spec = manager.spec
    if cache.spec != spec:
        raise CheckpointError(
            f"cannot save {path!r}: the cache was built for a different spec than the manager "
            f"({_spec_diff(cache.spec, spec, 'cache', 'manager')}); save the cache its manager allocates for"
        )
    if slots is not None:
        if not isinstance(slots, DecodeSlots):
            raise CheckpointError(f"cannot save {path!r}: slots is a {type(slots).__name__}, not DecodeSlots")
        if slots.manager is not manager:
            raise CheckpointError(
                f"cannot save {path!r}: the DecodeSlots belong to another KVCacheManager; pass the slots "
                "built on this manager (DecodeSlots(manager)), or slots=None"
            )
    for obj in _state_objects(manager, slots):
        _check_known_state(obj, path)
    if manager.num_pending_copies:
        raise CheckpointError(
            f"cannot save {path!r}: {manager.num_pending_copies} copy-on-write block copies are pending; run the "
            "step that carries them and commit it (manager.commit) before saving, so the pages hold what the tables say"
        )
    try:
        manager.check_integrity()
        if slots is not None:
            slots.check_integrity()
    except AssertionError as exc:
        raise CheckpointError(f"refusing to save {path!r}: the allocator state is inconsistent ({exc})") from exc

    layout, names, leaves = _pages_of(cache, spec, path)
    arrays = dict(zip(names, (np.asarray(a) for a in jax.device_get(leaves))))
    try:
        arrays.update(_manager_state(manager))
        if slots is not None:
            arrays.update(_slots_state(slots))
    except OverflowError as exc:  # a seq_id outside int64
        raise CheckpointError(f"cannot save {path!r}: a sequence id does not fit in int64 ({exc})") from exc

    header = {
        "format": FORMAT_NAME,
        "version": FORMAT_VERSION,
        "spec": _spec_fields(spec),
        "layout": layout,
        "prefix_cache": manager.prefix_cache is not None,
        "slots": None if slots is None else {"num_slots": slots.num_slots},
        "arrays": [
            {"name": n, "shape": list(a.shape), "dtype": a.dtype.str, "sha256": _sha256(a)} for n, a in arrays.items()
        ],
    }
    header_bytes = json.dumps(header, sort_keys=True, default=_json_default).encode("utf-8")
    digest = hashlib.sha256(header_bytes).hexdigest().encode("ascii")
    _atomic_write(path, {
        "header": np.frombuffer(header_bytes, np.uint8),
        "digest": np.frombuffer(digest, np.uint8),
        **arrays,
    })


def load_checkpoint(path: str | os.PathLike, device: jax.Device | jax.sharding.Sharding | None = None, *, spec: CacheSpec | None = None) -> Checkpoint:
    """Restore what `save_checkpoint` wrote to ``path``.

    ``device``: where the pages go (a device or a sharding, as for
    `PagedKVCache.init`; default: JAX's default device). ``spec``: if given, the
    checkpoint must have been saved with exactly this spec.

    Nothing is returned until everything is verified: format and version, the header
    and every array's digest, the manifest, the spec, page shapes and dtypes, and the
    restored manager's ``check_integrity``. Any failure raises `CheckpointError`
    naming ``path`` and the problem.
    """
    path = _fspath(path, "load")
    if spec is not None and not isinstance(spec, CacheSpec):
        raise CheckpointError(f"load_checkpoint(spec=...) must be a CacheSpec or None; got {type(spec).__name__}")
    header, arrays = _read(path)
    saved_spec = _spec_from_header(header, path)
    if spec is not None and spec != saved_spec:
        raise CheckpointError(
            f"checkpoint {path!r} was saved for a different spec: {_spec_diff(saved_spec, spec, 'checkpoint', 'expected')}; "
            "build the cache with the checkpoint's spec (load without spec= to see it) or load another checkpoint"
        )
    layout = header.get("layout")
    if layout not in _LAYOUTS:
        raise CheckpointError(f"checkpoint {path!r}: layout={layout!r} is not one of {_LAYOUTS}")
    slots_info = header.get("slots")
    has_slots = slots_info is not None

    expected, treedef = _expected_pages(saved_spec, layout)
    prefix = header.get("prefix_cache", False)
    if not isinstance(prefix, bool):
        raise CheckpointError(f"checkpoint {path!r}: prefix_cache={prefix!r} is not true or false")
    wanted = set(expected) | set(_manager_names(saved_spec, prefix)) | ({"slots.slot_of"} if has_slots else set())
    if header.get("version") == 1:
        wanted = {n for n in wanted if not n.startswith("written.")}
    missing = [n for n in sorted(wanted) if n not in arrays]
    if missing:
        raise CheckpointError(f"checkpoint {path!r} lacks arrays {missing}; it was written by another tool or edited")
    unknown = sorted(set(arrays) - wanted)
    if unknown:
        raise CheckpointError(
            f"checkpoint {path!r} holds arrays version {FORMAT_VERSION} does not know: {unknown}; "
            "it was written by another tool or edited"
        )
    for name, want in expected.items():
        got = arrays[name]
        if got.shape != want.shape or got.dtype != want.dtype:
            raise CheckpointError(
                f"checkpoint {path!r}: {name} is {got.shape} {got.dtype.name} but its spec "
                f"({saved_spec.describe()}, layout={layout!r}) needs {want.shape} {np.dtype(want.dtype).name}"
            )

    manager = _restore_manager(saved_spec, arrays, path, prefix)
    slots = _restore_slots(manager, slots_info, arrays, path) if has_slots else None

    # One placement per array: a page sharding given as ``device`` fits int8 scales
    # (one axis fewer) only once cut to their rank (`paged_kv.sharding.for_rank`).
    pages = [arrays[n] for n in expected]
    pages = jax.device_put(pages, [for_rank(device, a.ndim) for a in pages]) if device is not None \
        else jax.device_put(pages)
    cache = jax.tree_util.tree_unflatten(treedef, pages)
    try:
        for view in cache.views:
            view.check_pages()
    except PagedKVError as exc:  # unreachable after the checks above, kept as the final guard
        raise CheckpointError(f"checkpoint {path!r}: restored pages do not match the spec: {exc}") from exc
    return Checkpoint(spec=saved_spec, cache=cache, manager=manager, slots=slots, layout=layout)


# ---- manager and slot state (the only code that knows the allocator's internals) --------
def _manager_state(manager: KVCacheManager) -> dict[str, np.ndarray]:
    """Every piece of host state a restored manager needs to continue exactly (copies).

    The free stack is saved whole with its top so the next ``allocate`` pops the same
    ids in the same order; the page table's free rows likewise (as a list, in order).
    ``window`` and ``pad_slot`` of a group follow from the spec and are not saved.
    """
    state: dict[str, np.ndarray] = {}
    for g, group in enumerate(manager.groups):
        pool, table = group.pool, group.table
        pre = f"group{g}."
        state[pre + "pool.ref_counts"] = pool.ref_counts.copy()
        state[pre + "pool.free_stack"] = pool._free.copy()
        state[pre + "pool.num_free"] = np.array(pool._num_free, np.int64)
        state[pre + "table.block_tables"] = table.block_tables.copy()
        state[pre + "table.kv_lens"] = table.kv_lens.copy()
        state[pre + "table.num_blocks"] = table.num_blocks.copy()
        state[pre + "table.first_block"] = table.first_block.copy()
        state[pre + "table.in_use"] = table.in_use.copy()
        state[pre + "table.free_rows"] = np.array(table._free_rows, np.int64)
    # (seq_id, row) in admission order: `seq_ids` reports sequences in that order.
    state["manager.rows"] = np.array(list(manager._rows.items()), np.int64).reshape(-1, 2)
    cache = manager.prefix_cache
    if cache is not None:
        # 128-bit keys as (low, high) uint64 pairs; the evictable blocks in LRU order,
        # so eviction after a restore picks the same blocks; the counters. Events and
        # subscribers belong to the running process and are not saved.
        state["prefix.hash"] = _u128(cache.hash_of)
        state["prefix.parent"] = _u128(cache.parent_of)
        state["prefix.evictable"] = np.array(list(cache.evictable), np.int64)
        state["prefix.stats"] = np.array([cache.queries, cache.query_tokens, cache.hit_tokens, cache.blocks_reused,
                                          cache.blocks_stored, cache.blocks_evicted], np.int64)
        state.update(_written_state(manager._written))
    return state


def _written_state(written: WrittenBlocks) -> dict[str, np.ndarray]:
    """Per row: tokens committed, blocks keyed, and the chain hashes still to key."""
    hashes = [(row, i, h) for row, chain in written.hashes.items() for i, h in enumerate(chain)]
    return {
        "written.lengths": np.array(sorted(written.written.items()), np.int64).reshape(-1, 2),
        "written.keyed": np.array(sorted(written.keyed.items()), np.int64).reshape(-1, 2),
        "written.hash_index": np.array([(r, i) for r, i, _ in hashes], np.int64).reshape(-1, 2),
        "written.hash_value": _u128([h for *_, h in hashes]),
    }


def _restore_written(manager: KVCacheManager, take, path: str) -> None:
    """Inverse of `_written_state`, every row checked to be a row in use."""
    written = manager._written
    lengths, keyed = take("written.lengths", np.int64, (None, 2)), take("written.keyed", np.int64, (None, 2))
    index, values = take("written.hash_index", np.int64, (None, 2)), take("written.hash_value", np.uint64, (None, 2))
    if index.shape[0] != values.shape[0]:
        raise CheckpointError(f"checkpoint {path!r}: written.hash_index and written.hash_value differ in length")
    live = set(manager._rows.values())
    rows = set(lengths[:, 0].tolist()) | set(keyed[:, 0].tolist()) | set(index[:, 0].tolist())
    if not rows <= live:
        raise CheckpointError(f"checkpoint {path!r}: written.* names rows {sorted(rows - live)} no sequence holds")
    written.written = {int(r): int(n) for r, n in lengths.tolist()}
    written.keyed = {int(r): int(n) for r, n in keyed.tolist()}
    for (row, i), h in zip(index.tolist(), _from_u128(values)):
        chain = written.hashes.setdefault(int(row), [])
        if i != len(chain):
            raise CheckpointError(f"checkpoint {path!r}: written.hash_index row {row} skips to index {i}")
        chain.append(h)


def _u128(values: list[int]) -> np.ndarray:
    return np.array([[v & 0xFFFFFFFFFFFFFFFF, v >> 64] for v in values], np.uint64).reshape(-1, 2)


def _from_u128(pairs: np.ndarray) -> list[int]:
    return [int(lo) | (int(hi) << 64) for lo, hi in pairs.tolist()]


def _manager_names(spec: CacheSpec, prefix: bool = False) -> list[str]:
    """Array names `_manager_state` writes for ``spec`` (what a loader must find)."""
    fields = ("pool.ref_counts", "pool.free_stack", "pool.num_free", "table.block_tables", "table.kv_lens",
              "table.num_blocks", "table.first_block", "table.in_use", "table.free_rows")
    names = [f"group{g}.{f}" for g in range(len(spec.groups)) for f in fields] + ["manager.rows"]
    written = ["written.lengths", "written.keyed", "written.hash_index", "written.hash_value"]
    return names + (["prefix.hash", "prefix.parent", "prefix.evictable", "prefix.stats"] + written if prefix else [])


def _restore_manager(spec: CacheSpec, arrays: dict[str, np.ndarray], path: str, prefix: bool = False) -> KVCacheManager:
    """A `KVCacheManager` holding the saved state, checked by ``check_integrity``.

    Shapes and dtypes are checked per array first so that a forged or mis-written
    file fails with a message naming the array, not an IndexError deep inside.
    """

    def take(name: str, dtype, shape: tuple) -> np.ndarray:
        a = arrays[name]
        ok = a.ndim == len(shape) and all(w is None or w == s for w, s in zip(shape, a.shape))
        if a.dtype != np.dtype(dtype) or not ok:
            want = tuple("*" if w is None else w for w in shape)
            raise CheckpointError(
                f"checkpoint {path!r}: {name} is {a.shape} {a.dtype.name}; expected {want} {np.dtype(dtype).name}"
            )
        return np.array(a, dtype=dtype, copy=True)  # owned and writable: the manager mutates it

    try:
        manager = KVCacheManager(spec, prefix_cache=prefix)
    except SpecError as exc:
        raise CheckpointError(f"checkpoint {path!r}: {exc}") from exc
    capacity = None
    for g, group in enumerate(manager.groups):
        nb, pre = spec.groups[g].num_blocks, f"group{g}."
        ref_counts = take(pre + "pool.ref_counts", np.int32, (nb,))
        free_stack = take(pre + "pool.free_stack", np.int32, (nb - 1,))
        num_free = int(take(pre + "pool.num_free", np.int64, ()))
        if not 0 <= num_free <= nb - 1:
            raise CheckpointError(f"checkpoint {path!r}: {pre}pool.num_free={num_free} is outside [0, {nb - 1}]")
        block_tables = take(pre + "table.block_tables", np.int32, (None, spec.max_blocks_per_seq))
        rows = block_tables.shape[0]
        if capacity is not None and rows != capacity:
            raise CheckpointError(
                f"checkpoint {path!r}: group {g}'s page table has {rows} rows, group 0's {capacity}; "
                "the groups' tables grow in lockstep"
            )
        capacity = rows
        pool, table = group.pool, group.table
        pool.ref_counts, pool._free, pool._num_free = ref_counts, free_stack, num_free
        table.block_tables = block_tables
        table.kv_lens = take(pre + "table.kv_lens", np.int32, (rows,))
        table.num_blocks = take(pre + "table.num_blocks", np.int32, (rows,))
        table.first_block = take(pre + "table.first_block", np.int32, (rows,))
        table.in_use = take(pre + "table.in_use", np.bool_, (rows,))
        table._free_rows = [int(r) for r in take(pre + "table.free_rows", np.int64, (None,))]

    seq_rows = take("manager.rows", np.int64, (None, 2))
    manager._rows = {int(s): int(r) for s, r in seq_rows}
    if len(manager._rows) != seq_rows.shape[0]:
        raise CheckpointError(f"checkpoint {path!r}: manager.rows names a sequence id twice")
    bad = [int(r) for r in seq_rows[:, 1] if not 0 <= r < capacity]
    if bad:
        raise CheckpointError(f"checkpoint {path!r}: manager.rows points at rows {bad} outside [0, {capacity})")
    manager._forked = any(bool((g.pool.ref_counts > 1).any()) for g in manager.groups)
    if prefix:
        nb = spec.groups[0].num_blocks
        cache = manager.prefix_cache
        cache.hash_of = _from_u128(take("prefix.hash", np.uint64, (nb, 2)))
        cache.parent_of = _from_u128(take("prefix.parent", np.uint64, (nb, 2)))
        cache.block_of = {h: b for b, h in enumerate(cache.hash_of) if h != 0}
        evictable = take("prefix.evictable", np.int64, (None,))
        if np.any((evictable < 1) | (evictable >= nb)):
            raise CheckpointError(f"checkpoint {path!r}: prefix.evictable names blocks outside [1, {nb})")
        cache.evictable.update((int(b), None) for b in evictable)
        (cache.queries, cache.query_tokens, cache.hit_tokens, cache.blocks_reused, cache.blocks_stored,
         cache.blocks_evicted) = (int(x) for x in take("prefix.stats", np.int64, (6,)))
        if "written.lengths" in arrays:  # absent from version 1 files
            _restore_written(manager, take, path)
    try:
        manager.check_integrity()
    except (AssertionError, IndexError, ValueError) as exc:
        raise CheckpointError(f"checkpoint {path!r}: the restored allocator state is inconsistent: {exc}") from exc
    return manager


def _slots_state(slots: DecodeSlots) -> dict[str, np.ndarray]:
    """``(seq_id, slot)`` pairs in insertion order; ``num_slots`` goes in the header."""
    return {"slots.slot_of": np.array(list(slots._slot_of.items()), np.int64).reshape(-1, 2)}


def _restore_slots(manager: KVCacheManager, info, arrays: dict[str, np.ndarray], path: str) -> DecodeSlots:
    num_slots = info.get("num_slots") if isinstance(info, dict) else None
    if isinstance(num_slots, bool) or not isinstance(num_slots, int):
        # Never fall back to DecodeSlots' default size: that would change the batch shape.
        raise CheckpointError(f"checkpoint {path!r}: the header's slots entry {info!r} has no integer num_slots")
    try:
        slots = DecodeSlots(manager, num_slots)
    except PagedKVError as exc:
        raise CheckpointError(f"checkpoint {path!r}: saved slots num_slots={num_slots!r} are invalid: {exc}") from exc
    pairs = arrays["slots.slot_of"]
    if pairs.ndim != 2 or pairs.shape[1] != 2 or pairs.dtype != np.int64:
        raise CheckpointError(f"checkpoint {path!r}: slots.slot_of is {pairs.shape} {pairs.dtype.name}; expected (*, 2) int64")
    for seq_id, slot in pairs.tolist():
        if not 0 <= slot < slots.num_slots or slots._seqs[slot] is not None or seq_id in slots._slot_of:
            raise CheckpointError(
                f"checkpoint {path!r}: slots.slot_of puts seq_id={seq_id} in slot {slot}, which is out of range "
                f"[0, {slots.num_slots}), taken, or a second slot of that sequence"
            )
        try:
            slots.insert(seq_id, slot)
        except PagedKVError as exc:
            raise CheckpointError(f"checkpoint {path!r}: slots.slot_of cannot be restored: {exc}") from exc
    try:
        slots.check_integrity()
    except AssertionError as exc:
        raise CheckpointError(f"checkpoint {path!r}: the restored decode slots are inconsistent: {exc}") from exc
    return slots


def _state_objects(manager: KVCacheManager, slots: DecodeSlots | None) -> list:
    objs = [manager]
    for group in manager.groups:
        objs += [group, group.pool, group.table] + ([group.pool.cache] if group.pool.cache is not None else [])
    return objs + ([slots] if slots is not None else [])


def _check_known_state(obj, path: str) -> None:
    known = next((names for cls, names in _KNOWN_STATE.items() if isinstance(obj, cls)), None)
    extra = sorted(set(vars(obj)) - known) if known is not None else sorted(vars(obj))
    if extra:
        raise CheckpointError(
            f"cannot save {path!r}: {type(obj).__name__} has state paged_kv.checkpoint does not capture: {extra}; "
            "add it to _manager_state/_restore_manager (and _KNOWN_STATE) and bump FORMAT_VERSION"
        )


# ---- pages -----------------------------------------------------------------------------
def _expected_pages(spec: CacheSpec, layout: str):
    """``({name: ShapeDtypeStruct}, treedef)`` of ``PagedKVCache.init(spec, layout=layout)``,
    traced (``eval_shape``) so no memory is allocated."""
    abstract = jax.eval_shape(lambda: PagedKVCache.init(spec, layout=layout))
    with_path, treedef = jax.tree_util.tree_flatten_with_path(abstract)
    return {_leaf_name(p): leaf for p, leaf in with_path}, treedef


def _leaf_name(key_path) -> str:
    """``(.views, [i], .key_pages)`` -> ``"layer{i}.key_pages"``."""
    _, layer, field = key_path
    return f"layer{layer.idx}.{field.name}"


def _pages_of(cache: PagedKVCache, spec: CacheSpec, path: str):
    """The layout, names and page arrays of ``cache``; refuses a cache `load_checkpoint`
    could not rebuild as it is (a structure `PagedKVCache.init` does not produce)."""
    with_path, treedef = jax.tree_util.tree_flatten_with_path(cache)
    for layout in _LAYOUTS:
        expected, want_def = _expected_pages(spec, layout)
        if treedef == want_def:
            break
    else:
        kinds = [type(v).__name__ for v in cache.views]
        raise CheckpointError(
            f"cannot save {path!r}: the cache's views {kinds} are not what PagedKVCache.init(spec, layout=...) "
            f"builds for any layout in {_LAYOUTS}, so a load could not rebuild them"
        )
    names, leaves = [], []
    for key_path, leaf in with_path:
        name = _leaf_name(key_path)
        want = expected[name]
        if isinstance(leaf, jax.Array) and leaf.is_deleted():
            raise CheckpointError(
                f"cannot save {path!r}: {name} was donated to an earlier jitted call; save the cache that call returned"
            )
        if tuple(leaf.shape) != want.shape or leaf.dtype != want.dtype:
            raise CheckpointError(
                f"cannot save {path!r}: {name} is {tuple(leaf.shape)} {leaf.dtype}; the spec needs {want.shape} {want.dtype}"
            )
        names.append(name)
        leaves.append(leaf)
    return layout, names, leaves


# ---- spec ------------------------------------------------------------------------------
def _spec_fields(spec: CacheSpec) -> dict:
    """The constructor fields of ``spec`` (``CacheSpec(**fields) == spec``)."""
    return attrs.asdict(spec, filter=lambda a, _: a.init)


def _spec_from_header(header: dict, path: str) -> CacheSpec:
    fields = header.get("spec")
    if not isinstance(fields, dict):
        raise CheckpointError(f"checkpoint {path!r}: the header has no spec")
    if "kv_rotation" not in fields:  # written before rotation existed: its quantized pages are not rotated
        fields = {**fields, "kv_rotation": "none"}
    try:
        return CacheSpec(**fields)
    except (TypeError, PagedKVError) as exc:
        raise CheckpointError(f"checkpoint {path!r}: the saved spec {fields} is not a valid CacheSpec: {exc}") from exc


def _spec_diff(a: CacheSpec, b: CacheSpec, a_name: str, b_name: str) -> str:
    fa, fb = _spec_fields(a), _spec_fields(b)
    diffs = [f"{k}: {a_name} {fa[k]!r}, {b_name} {fb[k]!r}" for k in fa if fa[k] != fb[k]]
    return "; ".join(diffs) or "equal fields"


# ---- file I/O --------------------------------------------------------------------------
def _sha256(a: np.ndarray) -> str:
    """Hex SHA-256 of the array's bytes in C order (hashed in place: no copy of big pages)."""
    return hashlib.sha256(np.ascontiguousarray(a)).hexdigest()


def _json_default(value):
    if isinstance(value, np.integer):
        return int(value)
    raise TypeError(f"{type(value).__name__} is not JSON serializable")


def _write_npz(f, arrays: dict[str, np.ndarray]) -> None:
    """Uncompressed: pages are float bits that barely compress, and mmap-like reads stay cheap."""
    np.savez(f, **arrays)


def _atomic_write(path: str, arrays: dict[str, np.ndarray]) -> None:
    directory = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(directory):
        raise CheckpointError(f"cannot save {path!r}: directory {directory!r} does not exist; create it first")
    if os.path.isdir(path):
        raise CheckpointError(f"cannot save {path!r}: it is a directory; give a file name")
    # Same directory as the target so os.replace is a rename, never a cross-device copy.
    # os.open (not mkstemp) so the umask, not mode 0600, decides the final permissions.
    tmp = os.path.join(directory, f".{os.path.basename(path)}.{uuid.uuid4().hex}.tmp")
    try:
        with os.fdopen(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666), "wb") as f:
            _write_npz(f, arrays)
            f.flush()
            os.fsync(f.fileno())  # the data is on disk before the rename makes it visible
        os.replace(tmp, path)
    except BaseException as exc:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        if isinstance(exc, OSError):
            raise CheckpointError(
                f"could not write checkpoint {path!r}: {exc}; the file previously at {path!r} (if any) is unchanged"
            ) from exc
        raise
    try:  # make the rename itself durable; best effort (not possible on every OS)
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


# RuntimeError: zipfile's answer to a flipped flag bit ("File is encrypted");
# NotImplementedError: an unknown compression method; zlib.error: a corrupt stream.
_READ_ERRORS = (OSError, ValueError, EOFError, zipfile.BadZipFile, KeyError, RuntimeError, NotImplementedError,
                zlib.error)


def _fspath(path, what: str) -> str:
    """``path`` as a string, or `CheckpointError` for anything that is not a path."""
    try:
        return os.fspath(path)
    except TypeError:
        raise CheckpointError(f"cannot {what} checkpoint: path={path!r} is not a file path (str or os.PathLike)") from None


def _read(path: str) -> tuple[dict, dict[str, np.ndarray]]:
    """The verified header and every manifest array of ``path``."""
    if not os.path.exists(path):
        raise CheckpointError(f"checkpoint {path!r} does not exist; check the path (no .npz is appended)")
    if os.path.isdir(path):
        raise CheckpointError(f"checkpoint {path!r} is a directory, not a checkpoint file")
    # Sniff the signature first: np.load would try anything else as a pickle and
    # answer with advice to allow pickles, which is the wrong fix for a bad file.
    try:
        with open(path, "rb") as f:
            magic = f.read(6)
    except OSError as exc:
        raise CheckpointError(f"checkpoint {path!r} cannot be opened: {exc}") from exc
    if magic.startswith(b"\x93NUMPY"):
        raise CheckpointError(f"checkpoint {path!r} holds a single .npy array, not an .npz checkpoint")
    if not magic.startswith(b"PK"):
        what = "is empty" if not magic else f"starts with {magic!r}, not the zip signature b'PK\\x03\\x04'"
        raise CheckpointError(
            f"checkpoint {path!r} is not a readable .npz file: it {what}; it is corrupt or not a checkpoint: "
            "restore it from another copy"
        )
    try:
        npz = np.load(path, allow_pickle=False)
    except _READ_ERRORS as exc:
        raise CheckpointError(
            f"checkpoint {path!r} is not a readable .npz file ({type(exc).__name__}: {exc}); it is truncated, "
            "corrupt, or not a checkpoint: restore it from another copy"
        ) from exc
    if not isinstance(npz, np.lib.npyio.NpzFile):  # unreachable after the sniff; kept as a guard
        raise CheckpointError(f"checkpoint {path!r} is not an .npz checkpoint")
    with npz:
        files = set(npz.files)
        missing = [n for n in _RESERVED if n not in files]
        if missing:
            raise CheckpointError(
                f"checkpoint {path!r} lacks arrays {missing}: it is an .npz but not a paged_kv checkpoint"
            )

        def read(name: str) -> np.ndarray:
            try:
                return npz[name]
            except _READ_ERRORS as exc:
                raise CheckpointError(
                    f"checkpoint {path!r}: array {name!r} cannot be read ({type(exc).__name__}: {exc}); "
                    "the file is corrupt: restore it from another copy"
                ) from exc

        header_arr, digest_arr = read("header"), read("digest")
        if header_arr.dtype != np.uint8 or header_arr.ndim != 1:
            raise CheckpointError(f"checkpoint {path!r}: header is {header_arr.shape} {header_arr.dtype.name}, not bytes")
        header_bytes = header_arr.tobytes()
        try:
            header = json.loads(header_bytes.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise CheckpointError(f"checkpoint {path!r}: the header is not valid JSON ({exc}); the file is corrupt") from exc
        if not isinstance(header, dict) or header.get("format") != FORMAT_NAME:
            fmt = header.get("format") if isinstance(header, dict) else None
            raise CheckpointError(f"checkpoint {path!r}: format={fmt!r} is not {FORMAT_NAME!r}; not a paged_kv checkpoint")
        # The version is checked before the digest: a later version may hash differently.
        version = header.get("version")
        if version not in READABLE_VERSIONS:
            raise CheckpointError(
                f"checkpoint {path!r} has format version {version!r}; this paged_kv reads version {FORMAT_VERSION}. "
                "Load it with the paged_kv release that wrote it"
            )
        recorded = digest_arr.tobytes().decode("ascii", errors="replace") if digest_arr.dtype == np.uint8 else repr(digest_arr)
        actual = hashlib.sha256(header_bytes).hexdigest()
        if recorded != actual:
            raise CheckpointError(
                f"checkpoint {path!r}: header digest mismatch (sha256 {actual}, recorded {recorded}); the header was "
                "changed after saving: restore the file from another copy"
            )

        manifest = header.get("arrays")
        if not isinstance(manifest, list) or not all(isinstance(e, dict) and "name" in e for e in manifest):
            raise CheckpointError(f"checkpoint {path!r}: the header's array manifest is malformed")
        names = [e["name"] for e in manifest]
        absent = [n for n in names if n not in files]
        if absent:
            raise CheckpointError(
                f"checkpoint {path!r} lacks arrays {absent} that its manifest lists; the file was truncated or "
                "edited: restore it from another copy"
            )
        extra = sorted(files - set(names) - set(_RESERVED))
        if extra:
            raise CheckpointError(f"checkpoint {path!r} holds arrays {extra} that its manifest does not list")
        arrays = {}
        for entry in manifest:
            name = entry["name"]
            a = read(name)
            if list(a.shape) != entry.get("shape") or a.dtype.str != entry.get("dtype"):
                raise CheckpointError(
                    f"checkpoint {path!r}: array {name!r} is {a.shape} {a.dtype.str} but the manifest records "
                    f"{entry.get('shape')} {entry.get('dtype')}; the file was edited: restore it from another copy"
                )
            digest = _sha256(a)
            if digest != entry.get("sha256"):
                raise CheckpointError(
                    f"checkpoint {path!r}: digest mismatch in array {name!r} (sha256 {digest}, recorded "
                    f"{entry.get('sha256')}); its bytes changed after saving: restore the file from another copy"
                )
            arrays[name] = a
    return header, arrays


__all__ = ["Checkpoint", "FORMAT_NAME", "FORMAT_VERSION", "load_checkpoint", "save_checkpoint"]
