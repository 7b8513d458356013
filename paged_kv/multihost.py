"""One cache over several JAX processes (`jax.distributed`): agreement checks and
sharded checkpoints.

A mesh may span processes: ``PagedKVCache.init(spec, mesh=mesh, head_axis="tp")`` over
``jax.devices()`` (every process's devices) gives each process the pages of its own
KV heads only. The step metadata is replicated, so every process must feed the jitted
step the same metadata. Here every process runs its own `KVCacheManager` over the
same inputs: the allocator is deterministic (no randomness, no clocks, no hash
seeds), so identical calls give identical block ids, and nothing sends metadata
between processes (docs/multi_device.md says why this design and not a leader that
broadcasts it). What this module adds:

* `check_same`: a SHA-256 of host values (a step's metadata and tokens, a manager's
  `state`) gathered from every process and compared. JAX does not check that an
  input placed "replicated" is the same on every process: divergent metadata would
  write each process's heads into different blocks, silently. Every process sees the
  same gathered digests, so every process raises the same `ProcessesDisagreeError`
  and none is left waiting in a collective.
* `save_sharded_checkpoint` / `load_sharded_checkpoint`: `save_checkpoint` fetches
  whole arrays (``jax.device_get``), which a page array spread over processes is not
  on any one of them. Here each process writes one file of the page shards it holds
  (``{path}.{i}-of-{n}``) with the manager's host state (the same on every process),
  and a load assembles each device's shard from the file set: its own process's file
  first, other processes' files only for what that one lacks (a load on another
  device layout, e.g. the whole set onto one device, reads them all).

File ``{path}.{i}-of-{n}``: an ``.npz`` written and verified like a checkpoint
(`paged_kv.checkpoint_files`: atomic write, a SHA-256 per array and over the header),
its ``format``/``version`` the checkpoint's, then ``shard_format`` (``SHARD_FORMAT``)
and ``shard_version`` (``SHARD_VERSION``). Header: ``{"format", "version",
"shard_format", "shard_version", "spec", "layout", "prefix_cache", "save_id", "process_index", "process_count",
"shapes": {leaf: global shape}, "pieces": [{"array", "leaf", "index": [[start, stop],
...]}], "arrays": manifest}``. ``piece{k}`` holds the bits of one shard (the page
arrays' storage dtype, as `save_checkpoint` stores them); the manager's arrays are
`KVCacheManager.state`'s. ``save_id`` (random, the same in every file of one save) keeps
a load from mixing files of two saves. The binding arrays (`paged_kv.binding`) are not
saved: a load binds the pages to the manager it restores, as `load_checkpoint` does.
`DecodeSlots` are not saved.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import re
import uuid
from collections.abc import Callable
from typing import Any

import jax
import numpy as np

from paged_kv.allocator.manager import KVCacheManager
from paged_kv.cache import _LAYOUTS, PagedKVCache
from paged_kv.checkpoint import Checkpoint, expected_pages, pages_of, spec_fields, spec_from_header
from paged_kv.checkpoint_files import FORMAT_NAME, FORMAT_VERSION, atomic_write, fspath, json_default, read, sha256
from paged_kv.errors import CheckpointError, PagedKVError, SpecError, StateError
from paged_kv.sharding import for_rank, page_sharding
from paged_kv.spec import CacheSpec, require_same_spec, spec_difference

SHARD_FORMAT = "paged_kv.sharded-checkpoint"
SHARD_VERSION = 1
_BINDING = (".generations", ".owner")
_Ranges = tuple[tuple[int, int], ...]  # a shard's (start, stop) over every axis
_ReadFile = tuple[str, dict[str, Any], dict[str, np.ndarray]]  # a file of the set read: name, header, arrays


class ProcessesDisagreeError(StateError):
    """Processes that must hold the same host values (a step's metadata, a manager's
    state) hold different ones: raised on every process alike."""


# ---- agreement -------------------------------------------------------------------------
def digest(value: object) -> bytes:
    """SHA-256 of a pytree of arrays and scalars (a `StepMetadata`, a dict of arrays, a
    token array): its structure, then each leaf's dtype, shape and bytes."""
    leaves, treedef = jax.tree_util.tree_flatten(value)
    h = hashlib.sha256(str(treedef).encode())
    for leaf in leaves:
        a = np.asarray(leaf)
        h.update(f"{a.dtype.str}{a.shape}".encode())
        h.update(np.ascontiguousarray(a).tobytes())
    return h.digest()


def _gather(ok: bool, value: bytes) -> tuple[list[bool], list[bytes]]:
    """Every process's ``(ok, 32-byte value)``, in process order (one collective; none
    with a single process)."""
    row = np.zeros(33, np.uint8)
    row[0] = ok
    row[1:] = np.frombuffer(value.ljust(32, b"\0")[:32], np.uint8)
    if jax.process_count() == 1:
        rows = row[None]
    else:
        from jax.experimental import multihost_utils

        rows = np.asarray(multihost_utils.process_allgather(row)).reshape(jax.process_count(), 33)
    return [bool(r[0]) for r in rows], [r[1:].tobytes() for r in rows]


def check_same(value: object, what: str = "value") -> None:
    """Raise `ProcessesDisagreeError` (on every process) unless ``value`` (see `digest`)
    is the same on every process. A collective: every process must call it, in the
    same order as its other collectives. Cheap (32 bytes per process); call it on each
    step's metadata and tokens where divergence is possible, or every N steps."""
    _, digests = _gather(True, digest(value))
    odd = [i for i, d in enumerate(digests) if d != digests[0]]
    if odd:
        raise ProcessesDisagreeError(
            f"the {what} differs between processes: processes {odd} hold another {what} than process 0; every "
            "process must make the same manager calls from the same inputs (see docs/multi_device.md)"
        )


def _as_checkpoint_error(exc: Exception, what: str) -> Exception:
    """``exc`` as a `CheckpointError` (a malformed header surfaces as a KeyError or
    TypeError from deep inside the load), chained to the original."""
    if isinstance(exc, CheckpointError):
        return exc
    error = CheckpointError(f"{what}: {type(exc).__name__}: {exc}")
    error.__cause__ = exc
    return error


def _agree(error: BaseException | None, value: bytes, what: str) -> None:
    """After local work that may have failed: raise on every process if any process
    failed (its own error where it failed) or if the values differ."""
    oks, values = _gather(error is None, value)
    if error is not None:
        raise error
    failed = [i for i, ok in enumerate(oks) if not ok]
    if failed:
        raise CheckpointError(f"{what} failed on processes {failed} (their error says why); nothing was returned here")
    odd = [i for i, v in enumerate(values) if v != values[0]]
    if odd:
        raise CheckpointError(f"{what}: processes {odd} hold another allocator state or save than process 0")


# ---- saving ----------------------------------------------------------------------------
def shard_path(path: str | os.PathLike[str], process_index: int, process_count: int) -> str:
    """The file process ``process_index`` of ``process_count`` writes for ``path``."""
    return f"{fspath(path, 'save')}.{process_index}-of-{process_count}"


def _ranges(index: tuple[slice, ...], shape: tuple[int, ...]) -> _Ranges:
    """A shard's index (slices) as ``((start, stop), ...)`` over every axis of ``shape``."""
    out = []
    for axis, n in enumerate(shape):
        s = index[axis] if axis < len(index) else slice(None)
        start, stop, step = s.indices(n)
        if step != 1:
            raise CheckpointError(f"a shard with stride {step} cannot be saved")
        out.append((start, stop))
    return tuple(out)


def save_sharded_checkpoint(path: str | os.PathLike[str], cache: PagedKVCache, manager: KVCacheManager) -> str:
    """Write this process's page shards and ``manager``'s host state to
    ``shard_path(path, jax.process_index(), jax.process_count())``; returns that path.

    Every process of the mesh must call it (it is collective). Before anything is
    written, every process checks its own cache and manager (as `save_checkpoint`
    does) and the processes compare their managers' state: if any check fails
    anywhere, every process raises `CheckpointError` and no file is written. Each
    file is written atomically; every process returns only when all files are
    written (or raises, naming the processes whose write failed). A shard held on
    several devices (replicated there) is written once, by the process holding its
    first replica."""
    path = fspath(path, "save")
    error, state_digest, work = None, b"", None
    try:
        work = _prepare_save(path, cache, manager)
        state_digest = digest((json.dumps(work["header"], sort_keys=True, default=json_default), work["state"]))
    except Exception as exc:  # noqa: BLE001 - raised below, after every process has reported
        error = _as_checkpoint_error(exc, f"cannot save {path!r}") if isinstance(exc, PagedKVError) else exc
    _agree(error, state_digest, f"saving {path!r}")
    save_id = _shared_save_id()
    target = shard_path(path, jax.process_index(), jax.process_count())
    error = None
    try:
        _write(target, work, save_id)  # type: ignore[arg-type]  # _agree raised unless every process prepared it
    except Exception as exc:  # noqa: BLE001 - raised below, after every process has reported
        error = exc
    _agree(error, b"", f"writing {path!r}")
    return target


def _prepare_save(path: str, cache: PagedKVCache, manager: KVCacheManager) -> dict[str, Any]:
    """This process's checks and host arrays for `save_sharded_checkpoint`."""
    if not isinstance(manager, KVCacheManager):
        raise CheckpointError(f"cannot save {path!r}: manager is a {type(manager).__name__}, not a KVCacheManager")
    if not isinstance(cache, PagedKVCache):
        raise CheckpointError(f"cannot save {path!r}: cache is a {type(cache).__name__}, not a PagedKVCache")
    require_same_spec(manager, cache, "manager", "cache", CheckpointError)
    if manager.num_pending_copies:
        raise CheckpointError(f"cannot save {path!r}: {manager.num_pending_copies} copy-on-write copies are pending; "
                              "run and commit the step that carries them first")
    try:
        manager.check_integrity()
    except AssertionError as exc:
        raise CheckpointError(f"refusing to save {path!r}: the allocator state is inconsistent ({exc})") from exc
    spec = manager.spec
    state = manager.state()
    layout, names, leaves = pages_of(cache, spec, path)
    pieces, shapes = [], {}
    for name, leaf in zip(names, leaves):
        if name.endswith(_BINDING):
            continue
        shapes[name] = list(leaf.shape)
        seen = set()
        for shard in leaf.addressable_shards:
            where = _ranges(shard.index, leaf.shape)
            if shard.replica_id != 0 or where in seen:
                continue
            seen.add(where)
            pieces.append((name, where, np.asarray(shard.data)))
    # The checkpoint reader's format and version (it verifies the file), then this
    # file's own: a shard of a set.
    header = {"format": FORMAT_NAME, "version": FORMAT_VERSION, "shard_format": SHARD_FORMAT,
              "shard_version": SHARD_VERSION, "spec": spec_fields(spec), "layout": layout,
              "prefix_cache": manager.prefix_cache is not None, "shapes": shapes}
    return {"header": header, "state": state, "pieces": pieces}


def _shared_save_id() -> str:
    """One random id for this save, the same on every process (process 0's)."""
    raw = np.frombuffer(uuid.uuid4().bytes, np.uint8)
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        raw = np.asarray(multihost_utils.broadcast_one_to_all(raw)).astype(np.uint8)
    return raw.tobytes().hex()


def _write(target: str, work: dict[str, Any], save_id: str) -> None:
    arrays = dict(work["state"])
    entries = []
    for k, (name, where, data) in enumerate(work["pieces"]):
        arrays[f"piece{k}"] = data
        entries.append({"array": f"piece{k}", "leaf": name, "index": [list(r) for r in where]})
    header = {**work["header"], "save_id": save_id, "process_index": jax.process_index(),
              "process_count": jax.process_count(), "pieces": entries,
              "arrays": [{"name": n, "shape": list(a.shape), "dtype": a.dtype.str, "sha256": sha256(a)}
                         for n, a in arrays.items()]}
    raw = json.dumps(header, sort_keys=True, default=json_default).encode("utf-8")
    atomic_write(target, {"header": np.frombuffer(raw, np.uint8),
                          "digest": np.frombuffer(hashlib.sha256(raw).hexdigest().encode("ascii"), np.uint8),
                          **arrays})


# ---- loading ---------------------------------------------------------------------------
def load_sharded_checkpoint(path: str | os.PathLike[str], device: jax.Device | jax.sharding.Sharding | None = None, *,
                            mesh: jax.sharding.Mesh | None = None, head_axis: str | None = None,
                            spec: CacheSpec | None = None) -> Checkpoint:
    """Restore what `save_sharded_checkpoint` wrote for ``path``.

    Pages go where ``PagedKVCache.init`` would put them: ``mesh`` and ``head_axis``
    (heads sharded over that axis, the mesh may span processes), or ``device`` (a
    device or a sharding; default: this process's first device). Every process of the
    mesh must call it (it is collective). Each process reads its own file of the set
    and others only for shards its own file lacks. Everything is verified before
    anything is returned (the digests, one save id over every file read, the spec, the
    pieces covering every shard this process needs, the manager's integrity) and the
    processes compare the managers they restored: a failure anywhere raises
    `CheckpointError` on every process."""
    path = fspath(path, "load")
    error, state_digest, work = None, b"", None
    try:
        work = _prepare_load(path, device, mesh, head_axis, spec)
        state_digest = digest((work["save_id"], work["manager"].state()))
    except Exception as exc:  # noqa: BLE001 - raised below, after every process has reported
        error = _as_checkpoint_error(exc, f"sharded checkpoint {path!r} cannot be restored")
    _agree(error, state_digest, f"loading {path!r}")
    # _agree raised unless every process prepared its work.
    manager, expected, treedef = work["manager"], work["expected"], work["treedef"]  # type: ignore[index]
    leaves = []
    for name, want in expected.items():
        sharding = work["shardings"][name]  # type: ignore[index]
        if name.endswith(_BINDING):  # replaced by bind() below
            leaves.append(jax.device_put(np.zeros(want.shape, want.dtype), sharding))
            continue
        data = work["data"][name]  # type: ignore[index]
        leaves.append(jax.make_array_from_callback(want.shape, sharding,  # a lambda's bound defaults: untyped
                                                   lambda index, d=data, s=want.shape: d[_ranges(index, s)]))  # type: ignore[misc]
    cache = jax.tree_util.tree_unflatten(treedef, leaves).bind(manager)
    for view in cache.views:
        view.check_pages()
    return Checkpoint(spec=manager.spec, cache=cache, manager=manager, slots=None, layout=work["layout"])  # type: ignore[index]


_SHARD_NAME = re.compile(r"\.(\d+)-of-(\d+)$")


def _shard_files(path: str) -> list[str]:
    """The files of ``path``'s set, in process order: the set of this process count if
    there is one, else the only set there is."""
    sets: dict[int, dict[int, str]] = {}
    for name in glob.glob(glob.escape(path) + ".*-of-*"):
        m = _SHARD_NAME.search(name)
        if m and name[: m.start()] == path:
            sets.setdefault(int(m.group(2)), {})[int(m.group(1))] = name
    if not sets:
        raise CheckpointError(f"sharded checkpoint {path!r}: no files {path}.<i>-of-<n>; check the path")
    n = jax.process_count() if jax.process_count() in sets else (next(iter(sets)) if len(sets) == 1 else None)
    if n is None:
        raise CheckpointError(f"sharded checkpoint {path!r}: files of several saves ({sorted(sets)} processes) and "
                              f"none of {jax.process_count()}; remove the stale ones")
    return [sets[n].get(i, shard_path(path, i, n)) for i in range(n)]


def _prepare_load(path: str, device: jax.Device | jax.sharding.Sharding | None, mesh: jax.sharding.Mesh | None,
                  head_axis: str | None, spec: CacheSpec | None) -> dict[str, Any]:
    """Everything a load builds on the host (read, verified, assembled) before the
    processes agree and the device arrays are made."""
    if spec is not None and not isinstance(spec, CacheSpec):
        raise CheckpointError(f"load_sharded_checkpoint(spec=...) must be a CacheSpec or None; got {type(spec).__name__}")
    if (mesh is None) != (head_axis is None) or (mesh is not None and device is not None):
        raise CheckpointError("give mesh= and head_axis= together, or device=, not both")
    files = _shard_files(path)
    mine = jax.process_index() if jax.process_index() < len(files) else 0
    order = [files[mine]] + [f for i, f in enumerate(files) if i != mine]
    read_files: list[_ReadFile] = []

    def next_file() -> bool:
        if len(read_files) == len(order):
            return False
        name = order[len(read_files)]
        header, arrays = read(name)
        _check_header(name, header, len(files), read_files[0][1] if read_files else None)
        read_files.append((name, header, arrays))
        return True

    next_file()
    first_name, header, arrays = read_files[0]
    saved = spec_from_header(header, first_name)
    if spec is not None and spec != saved:
        raise CheckpointError(f"sharded checkpoint {path!r} was saved for a different spec "
                              f"({spec_difference(saved, spec, 'checkpoint', 'expected')})")
    layout, prefix = header["layout"], header["prefix_cache"]
    expected, treedef = expected_pages(saved, layout)
    for name, want in expected.items():
        if not name.endswith(_BINDING) and header["shapes"].get(name) != list(want.shape):
            raise CheckpointError(f"{first_name}: {name} is recorded as {header['shapes'].get(name)}; the spec "
                                  f"needs {list(want.shape)}")
    pieces = {a["array"] for a in header["pieces"]}
    state = {k: v for k, v in arrays.items() if k not in pieces}
    wanted = set(KVCacheManager(saved, prefix_cache=prefix).state())
    if set(state) != wanted:
        raise CheckpointError(f"{first_name}: the allocator arrays {sorted(set(state) ^ wanted)} are missing or "
                              "unknown; it was written by another tool or edited")
    try:
        manager = KVCacheManager.from_state(saved, prefix, state)
    except CheckpointError as exc:
        raise CheckpointError(f"{first_name}: {exc}") from exc

    base: jax.Device | jax.sharding.Sharding
    if mesh is not None:
        try:
            base = page_sharding(saved, mesh, head_axis, layout)  # type: ignore[arg-type]  # given with mesh (checked above)
        except SpecError as exc:
            raise CheckpointError(f"sharded checkpoint {path!r}: {exc}") from exc
    else:
        base = device if device is not None else jax.local_devices()[0]
        if not isinstance(base, (jax.Device, jax.sharding.Sharding)):
            raise CheckpointError(f"device={device!r} is not a JAX device or sharding")
    shardings: dict[str, jax.sharding.Sharding] = {}
    data: dict[str, dict[_Ranges, np.ndarray]] = {}
    for name, want in expected.items():
        s = for_rank(base, len(want.shape))
        shardings[name] = jax.sharding.SingleDeviceSharding(s) if isinstance(s, jax.Device) else s
        if name.endswith(_BINDING):
            continue
        data[name] = {}
        for index in shardings[name].addressable_devices_indices_map(want.shape).values():
            where = _ranges(index, want.shape)  # type: ignore[arg-type]  # a page array's shards have indices
            if where not in data[name]:
                data[name][where] = _assemble(path, name, where, want.dtype, read_files, next_file)
    return {"manager": manager, "expected": expected, "treedef": treedef, "shardings": shardings, "data": data,
            "layout": layout, "save_id": header["save_id"]}


def _check_header(name: str, header: dict[str, Any], count: int, first: dict[str, Any] | None) -> None:
    if header.get("shard_format") != SHARD_FORMAT or header.get("shard_version") != SHARD_VERSION:
        raise CheckpointError(f"{name} is not a file of a sharded checkpoint of version {SHARD_VERSION} (shard_format "
                              f"{header.get('shard_format')!r}, shard_version {header.get('shard_version')!r}); "
                              "load a single-file checkpoint with load_checkpoint")
    if header.get("layout") not in _LAYOUTS or not isinstance(header.get("prefix_cache"), bool):
        raise CheckpointError(f"{name}: layout {header.get('layout')!r} or prefix_cache is malformed")
    if header.get("process_count") != count:
        raise CheckpointError(f"{name} was written by one of {header.get('process_count')} processes, in a set of {count}")
    pieces = header.get("pieces")
    if not isinstance(pieces, list) or not isinstance(header.get("shapes"), dict):
        raise CheckpointError(f"{name}: the header's pieces are malformed")
    if first is not None:
        for key in ("save_id", "spec", "layout", "prefix_cache", "shapes"):
            if header.get(key) != first.get(key):
                raise CheckpointError(f"{name} belongs to another save than the set's other files ({key} differs); "
                                      "every file of a set must come from one save_sharded_checkpoint call")


def _assemble(path: str, name: str, where: _Ranges, dtype: np.dtype, read_files: list[_ReadFile],
              next_file: Callable[[], bool]) -> np.ndarray:
    """The block ``where`` of leaf ``name``, from the pieces of the files read so far,
    reading further files of the set until it is covered."""
    shape = tuple(b - a for a, b in where)
    out = np.empty(shape, dtype)
    done, need, used = 0, int(np.prod(shape)), 0
    while True:
        for fname, header, arrays in read_files[used:]:
            for p in header["pieces"]:
                if p.get("leaf") != name:
                    continue
                src = tuple(tuple(r) for r in p["index"])
                if len(src) != len(where):
                    raise CheckpointError(f"{fname}: piece {p['array']} has {len(src)} axes; {name} has {len(where)}")
                lo = [max(a, c) for (a, _), (c, _) in zip(where, src)]
                hi = [min(b, d) for (_, b), (_, d) in zip(where, src)]
                if any(h <= l for l, h in zip(lo, hi)):
                    continue
                piece = arrays[p["array"]]
                if piece.shape != tuple(d - c for c, d in src) or piece.dtype != dtype:
                    raise CheckpointError(f"{fname}: piece {p['array']} of {name} is {piece.shape} {piece.dtype}, "
                                          f"not what its index and the spec say")
                out[tuple(slice(l - a, h - a) for l, h, (a, _) in zip(lo, hi, where))] = \
                    piece[tuple(slice(l - c, h - c) for l, h, (c, _) in zip(lo, hi, src))]
                done += int(np.prod([h - l for l, h in zip(lo, hi)]))
        used = len(read_files)
        if done == need:
            return out
        if done > need:
            raise CheckpointError(f"sharded checkpoint {path!r}: pieces of {name} overlap; the set was edited")
        if not next_file():
            raise CheckpointError(f"sharded checkpoint {path!r}: the files cover {done} of the {need} elements of "
                                  f"{name}{list(where)} this process needs; a file of the set is missing")


__all__ = ["ProcessesDisagreeError", "SHARD_FORMAT", "SHARD_VERSION", "check_same", "digest",
           "load_sharded_checkpoint", "save_sharded_checkpoint", "shard_path"]
