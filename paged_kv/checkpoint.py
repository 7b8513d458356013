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
    "layout": "split" | "unified", "prefix_cache": bool, "slots": null |
    {"num_slots": n}, "arrays": [{"name", "shape", "dtype", "sha256"}, ...]}``. The
    manifest lists every other array with its shape, dtype (numpy ``dtype.str``) and
    the SHA-256 of its bytes.
``digest``
    uint8: the hex SHA-256 of the header's bytes. Since the header holds every
    array's digest, this one value covers the header and every array's bytes (a
    two-level digest: each byte is hashed once, and a mismatch names the array).
``layer{i}.key_pages``, ``layer{i}.value_pages`` (split) or ``layer{i}.kv_pages`` (unified)
    Each layer's pages in their *storage* dtype (the float's bits as uint, see
    `paged_kv.spec.storage_dtype`), so bfloat16 and fp8 round-trip bit for bit; an
    int8 layer (`paged_kv.quant`) adds ``layer{i}.key_scales``/``value_scales`` (or
    ``kv_scales``), its per-token scales' bits. Fixed fp8 scales are in the spec.
``group{g}.pool.*``, ``group{g}.table.*``, ``group{g}.prefix.*``, ``manager.rows``, ``written.*``
    The manager's host state: `KVCacheManager.state`, which asks each layer group,
    pool, table and prefix cache for its own (``group{g}.prefix.*`` only with the
    prefix cache on).
``slots.slot_of``
    Only when `DecodeSlots` were saved: `DecodeSlots.state`.

The file is written to a temporary name in the target's directory and renamed over
the target (``os.replace``, atomic on POSIX and Windows), so a crash or a full disk
mid-write leaves the previous file at ``path`` (or none) and never half a checkpoint.

MAINTENANCE: this module knows the file format only; every object saves and
restores its own fields (``state()`` / ``from_state()``). An object with an
attribute its ``state()`` does not cover refuses to be saved
(`paged_kv.allocator.saved_state.check_captured`), so new allocator state fails
loudly until it is saved; a change of the arrays' names or meaning bumps
``FORMAT_VERSION``, and `_upgrade` maps older files onto the current names.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import attrs
import jax
import numpy as np

from paged_kv.batch.decode_slots import DecodeSlots
from paged_kv.allocator.manager import KVCacheManager
from paged_kv.allocator.saved_state import prefixed, scoped
from paged_kv.cache import _LAYOUTS, PagedKVCache
from paged_kv.errors import CheckpointError, PagedKVError, SpecError
from paged_kv.sharding import for_rank
from paged_kv.checkpoint_files import FORMAT_NAME, FORMAT_VERSION, READABLE_VERSIONS  # noqa: F401 (public)
from paged_kv.checkpoint_files import atomic_write as _atomic_write, fspath as _fspath, json_default as _json_default
from paged_kv.checkpoint_files import read as _read, sha256 as _sha256
from paged_kv.spec import CacheSpec, require_same_spec, spec_difference

_T = TypeVar("_T")


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
def save_checkpoint(path: str | os.PathLike[str], cache: PagedKVCache, manager: KVCacheManager, slots: DecodeSlots | None = None) -> None:
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
    try:
        require_same_spec(manager, cache, "manager", "cache", CheckpointError)
    except CheckpointError as exc:
        raise CheckpointError(f"cannot save {path!r}: {exc}; save the cache its manager allocates for") from None
    if slots is not None:
        if not isinstance(slots, DecodeSlots):
            raise CheckpointError(f"cannot save {path!r}: slots is a {type(slots).__name__}, not DecodeSlots")
        if slots.manager is not manager:
            raise CheckpointError(
                f"cannot save {path!r}: the DecodeSlots belong to another KVCacheManager; pass the slots "
                "built on this manager (DecodeSlots(manager)), or slots=None"
            )
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
    try:
        state = manager.state()
        if slots is not None:
            state.update(prefixed("slots.", slots.state()))
    except CheckpointError as exc:
        raise CheckpointError(f"cannot save {path!r}: {exc}") from None
    except OverflowError as exc:  # a seq_id outside int64
        raise CheckpointError(f"cannot save {path!r}: a sequence id does not fit in int64 ({exc})") from exc

    layout, names, leaves = pages_of(cache, spec, path)
    _check_fetchable(path, names, leaves)
    arrays = dict(zip(names, (np.asarray(a) for a in jax.device_get(leaves))))
    arrays.update(state)
    header = {
        "format": FORMAT_NAME,
        "version": FORMAT_VERSION,
        "spec": spec_fields(spec),
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


def load_checkpoint(path: str | os.PathLike[str], device: jax.Device | jax.sharding.Sharding | None = None, *, spec: CacheSpec | None = None) -> Checkpoint:
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
    saved_spec = spec_from_header(header, path)
    if spec is not None and spec != saved_spec:
        raise CheckpointError(
            f"checkpoint {path!r} was saved for a different spec ({spec_difference(saved_spec, spec, 'checkpoint', 'expected')}); "
            "build the cache with the checkpoint's spec (load without spec= to see it) or load another checkpoint"
        )
    layout = header.get("layout")
    if layout not in _LAYOUTS:
        raise CheckpointError(f"checkpoint {path!r}: layout={layout!r} is not one of {_LAYOUTS}")
    slots_info = header.get("slots")
    prefix = header.get("prefix_cache", False)
    if not isinstance(prefix, bool):
        raise CheckpointError(f"checkpoint {path!r}: prefix_cache={prefix!r} is not true or false")
    expected, treedef = expected_pages(saved_spec, layout)
    # The version was checked as the file was read (one of READABLE_VERSIONS).
    arrays = _with_binding(_upgrade(arrays, header.get("version"), prefix, saved_spec.block_size), saved_spec, expected)  # type: ignore[arg-type]
    manager = _restore(path, "manager", lambda: _manager_of(saved_spec, prefix, arrays, expected, slots_info, path))
    slots = None
    if slots_info is not None:
        num_slots = slots_info.get("num_slots") if isinstance(slots_info, dict) else None
        # from_state refuses a num_slots that is not an int (CheckpointError).
        slots = _restore(path, "slots", lambda: DecodeSlots.from_state(manager, num_slots, scoped(arrays, "slots.")))  # type: ignore[arg-type]

    # One placement per array: a page sharding given as ``device`` fits int8 scales
    # (one axis fewer) only once cut to their rank (`paged_kv.sharding.for_rank`).
    pages = [arrays[n] for n in expected]
    pages = jax.device_put(pages, [for_rank(device, a.ndim) for a in pages]) if device is not None \
        else jax.device_put(pages)
    # The restored manager is a new one (a new serial): the pages serve it, with its
    # blocks' generations (`paged_kv.binding`).
    cache = jax.tree_util.tree_unflatten(treedef, pages).bind(manager)
    try:
        for view in cache.views:
            view.check_pages()
    except PagedKVError as exc:  # unreachable after the checks above, kept as the final guard
        raise CheckpointError(f"checkpoint {path!r}: restored pages do not match the spec: {exc}") from exc
    return Checkpoint(spec=saved_spec, cache=cache, manager=manager, slots=slots, layout=layout)


# ---- the allocator's arrays ------------------------------------------------------------
def _upgrade(arrays: dict[str, np.ndarray], version: int, prefix: bool, block_size: int) -> dict[str, np.ndarray]:
    """Arrays of a version 1 or 2 file under the current names: the one prefix cache
    (``prefix.*``) becomes group 0's, with an empty ``behind`` tier; version 1 files
    kept no written-block state (`_v1_written` rebuilds what their keys imply)."""
    if version == FORMAT_VERSION or not prefix:
        return arrays
    arrays = {("group0." + k if k.startswith("prefix.") else k): v for k, v in arrays.items()}
    arrays["group0.prefix.behind"] = np.zeros(0, np.int64)
    if version == 1:
        arrays.update(_v1_written(arrays, block_size))
    return arrays


def _v1_written(arrays: dict[str, np.ndarray], block_size: int) -> dict[str, np.ndarray]:
    """``written.*`` for a version 1 file, whose keys were all committed: per row in use,
    the leading blocks that carry a key are written and keyed, and their keys are the
    row's chain. Nothing more is claimed written, so the restore's check that a held
    block carries a key only below its row's keyed end still holds (a row with a keyed
    block after an unkeyed one is refused by it: nothing says that block was written)."""
    try:
        tables, in_use = arrays["group0.table.block_tables"], arrays["group0.table.in_use"]
        keys, num_blocks = arrays["group0.prefix.hash"], arrays["group0.table.num_blocks"]
        lengths, index, values = [], [], []
        for row in np.flatnonzero(in_use).tolist():
            chain = 0
            while chain < int(num_blocks[row]) and 0 <= tables[row, chain] < len(keys) and keys[tables[row, chain]].any():
                index.append((row, chain))
                values.append(keys[tables[row, chain]])
                chain += 1
            lengths.append((row, chain))
        keyed = np.array(lengths, np.int64).reshape(-1, 2)
        return {"written.keyed": keyed, "written.lengths": keyed * np.array([1, block_size], np.int64),
                "written.hash_index": np.array(index, np.int64).reshape(-1, 2),
                "written.hash_value": np.array(values, np.uint64).reshape(-1, 2)}
    except (KeyError, IndexError, TypeError, ValueError, AttributeError):
        # Malformed arrays: claim nothing written; `take` and the restore checks then
        # name the bad array with the file's path.
        empty = {"lengths": (0, 2), "keyed": (0, 2), "hash_index": (0, 2)}
        return {**{f"written.{k}": np.zeros(shape, np.int64) for k, shape in empty.items()},
                "written.hash_value": np.zeros((0, 2), np.uint64)}


def _with_binding(arrays: dict[str, np.ndarray], spec: CacheSpec,
                  expected: dict[str, jax.ShapeDtypeStruct]) -> dict[str, np.ndarray]:
    """Arrays of a file written before block generations (`paged_kv.binding`), with
    them at 0 (nothing of the file changes: `load_checkpoint` binds the restored pages
    to the restored manager, whose blocks are then all at generation 0)."""
    added = {}
    for name, want in expected.items():
        if name.endswith((".generations", ".owner")) and name not in arrays:
            added[name] = np.zeros(want.shape, want.dtype)
    for g, group in enumerate(spec.groups):
        name = f"group{g}.pool.generation"
        if name not in arrays and f"group{g}.pool.ref_counts" in arrays:
            added[name] = np.zeros(group.num_blocks, np.int32)
    return {**arrays, **added} if added else arrays


def _manager_of(spec: CacheSpec, prefix: bool, arrays: dict[str, np.ndarray], expected: dict[str, jax.ShapeDtypeStruct],
                slots_info: object, path: str) -> KVCacheManager:
    """The manager the arrays describe, after checking the file holds exactly the arrays
    this spec's pages, manager and slots need (`KVCacheManager.state` names them)."""
    try:
        wanted = set(KVCacheManager(spec, prefix_cache=prefix).state())
    except SpecError as exc:
        raise CheckpointError(str(exc)) from exc
    wanted |= set(expected) | ({"slots.slot_of"} if slots_info is not None else set())
    missing = [n for n in sorted(wanted) if n not in arrays]
    if missing:
        raise CheckpointError(f"lacks arrays {missing}; it was written by another tool or edited")
    unknown = sorted(set(arrays) - wanted)
    if unknown:
        raise CheckpointError(f"holds arrays version {FORMAT_VERSION} does not know: {unknown}; "
                              "it was written by another tool or edited")
    for name, want in expected.items():
        got = arrays[name]
        if got.shape != want.shape or got.dtype != want.dtype:
            raise CheckpointError(f"{name} is {got.shape} {got.dtype.name} but its spec ({spec.describe()}) needs "
                                  f"{want.shape} {np.dtype(want.dtype).name}")
    return KVCacheManager.from_state(spec, prefix, arrays)


def _restore(path: str, what: str, build: Callable[[], _T]) -> _T:
    """``build()``, with a `CheckpointError` it raises naming ``path``."""
    try:
        return build()
    except CheckpointError as exc:
        raise CheckpointError(f"checkpoint {path!r} ({what}): {exc}") from exc


# ---- pages -----------------------------------------------------------------------------
def expected_pages(spec: CacheSpec, layout: str) -> tuple[dict[str, jax.ShapeDtypeStruct], jax.tree_util.PyTreeDef]:
    """``({name: ShapeDtypeStruct}, treedef)`` of ``PagedKVCache.init(spec, layout=layout)``,
    traced (``eval_shape``) so no memory is allocated: the arrays a checkpoint of
    ``spec`` holds for the pages, by name, and how they make a cache again."""
    abstract = jax.eval_shape(lambda: PagedKVCache.init(spec, layout=layout))
    with_path, treedef = jax.tree_util.tree_flatten_with_path(abstract)
    return {_leaf_name(p): leaf for p, leaf in with_path}, treedef


def _leaf_name(key_path: Sequence[Any]) -> str:
    """``(.views, [i], .key_pages)`` -> ``"layer{i}.key_pages"``."""
    _, layer, field = key_path
    return f"layer{layer.idx}.{field.name}"


def pages_of(cache: PagedKVCache, spec: CacheSpec, path: str) -> tuple[str, list[str], list[jax.Array]]:
    """The layout, names and page arrays of ``cache``, as a checkpoint of ``spec`` stores
    them; `CheckpointError` (naming ``path``, the file being saved) for a cache
    `load_checkpoint` could not rebuild as it is (a structure `PagedKVCache.init` does
    not produce, another shape, a donated array)."""
    with_path, treedef = jax.tree_util.tree_flatten_with_path(cache)
    for layout in _LAYOUTS:
        expected, want_def = expected_pages(spec, layout)
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


def _check_fetchable(path: str, names: list[str], leaves: list[jax.Array]) -> None:
    """`CheckpointError` unless this process can fetch every page array whole: pages
    sharded over the devices of several processes (`paged_kv.multihost`) are not, and
    jax would refuse mid-save with a bare RuntimeError."""
    for name, leaf in zip(names, leaves):
        if getattr(leaf, "is_fully_addressable", True):
            continue
        processes = sorted({d.process_index for d in leaf.sharding.device_set})  # type: ignore[attr-defined]  # jaxlib's Device stub
        raise CheckpointError(
            f"cannot save {path!r}: {name} is sharded over the devices of processes {processes}, and this one "
            f"(process {jax.process_index()}) holds only its own shards, so no one file can be written here; "
            "save with paged_kv.multihost.save_sharded_checkpoint (every process writes the shards it holds), or "
            "gather the cache onto one device first (paged_kv.multihost.load_sharded_checkpoint(path, device=...)) "
            "and save that")


# ---- spec ------------------------------------------------------------------------------
def spec_fields(spec: CacheSpec) -> dict[str, Any]:
    """The constructor fields of ``spec`` (``CacheSpec(**fields) == spec``)."""
    return attrs.asdict(spec, filter=lambda a, _: a.init)


def spec_from_header(header: dict[str, Any], path: str) -> CacheSpec:
    """The spec a checkpoint's header records (`spec_fields`; older files lack newer
    fields, read at what they meant then); `CheckpointError` naming ``path`` if none
    is there or it is not a valid `CacheSpec`."""
    fields = header.get("spec")
    if not isinstance(fields, dict):
        raise CheckpointError(f"checkpoint {path!r}: the header has no spec")
    if "kv_rotation" not in fields:  # written before rotation existed: its quantized pages are not rotated
        fields = {**fields, "kv_rotation": "none"}
    try:
        return CacheSpec(**fields)
    except (TypeError, PagedKVError) as exc:
        raise CheckpointError(f"checkpoint {path!r}: the saved spec {fields} is not a valid CacheSpec: {exc}") from exc


__all__ = ["Checkpoint", "FORMAT_NAME", "FORMAT_VERSION", "expected_pages", "load_checkpoint", "pages_of",
           "save_checkpoint", "spec_fields", "spec_from_header"]
