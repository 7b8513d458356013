"""Preemption without loss: move a sequence's blocks to host memory and back.

Recompute preemption throws a sequence's keys and values away and prefills them
again later; swapping keeps them, at the cost of a device -> host copy out and a
host -> device copy back in, and of host memory while the sequence waits. Both
copies are one jitted call over every layer's pages (keys and values, any layout),
and they move the pages' storage bits, so a round trip is bit-exact for every
dtype, bfloat16 included.

The bytes move through `paged_kv.sequence_pages` (as a transfer's do): block counts
padded to a power of two, so sequences of similar lengths share one compilation;
slots past the sequence's length zeroed by the read; generations stamped by the write.

Trust: a `SwappedSequence` is what `swap_out` made, or it is refused. Its host copy
holds zeros past the sequence's length (a block is copied whole, and the slots
after the last token still held the block's previous owner's keys and values: the
read zeroes them), and it is sealed: a keyed BLAKE2b digest, under a key this
process drew at import, of its record, spec, page shapes and written length.
`swap_in` recomputes the seal, so a record edited after the fact (``num_tokens``
raised within the same block count would read those dead slots as the sequence's
own), a hand-built one, or one with no spec (its fp8 pages would move between
caches of other scales) is an `InvalidArgumentError`. A swapped sequence therefore
comes back only in the process that swapped it out.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os

import attrs
import jax
import numpy as np

from paged_kv.allocator.manager import KVCacheManager
from paged_kv.allocator.swap_record import SwapRecord, check_record
from paged_kv.cache import PagedKVCache
from paged_kv.errors import InvalidArgumentError, ShapeError, SpecError
from paged_kv.quant import codecs
from paged_kv.sequence_pages import padded_sizes, read_sequence, write_back
from paged_kv.spec import CacheSpec, require_same_spec


@attrs.frozen(eq=False)
class SwappedSequence:
    """A sequence in host memory: its `SwapRecord` and, per layer, the host copy of
    each page array's blocks (``pages[layer][k]``: ``[blocks of the layer's group,
    block_size, ...]`` in the pages' storage dtype)."""

    record: SwapRecord
    pages: tuple[tuple[np.ndarray, ...], ...]
    spec: CacheSpec | None = None
    """The spec of the cache the pages were copied from (`swap_out` sets it): `swap_in`
    refuses them into a cache of another spec, where the same bytes would mean other
    values (another format, fp8 scales or rotation) even with matching shapes, and
    refuses a sequence without one."""
    written: int = 0
    """Tokens the device had written (committed) when it left; `swap_in` marks only
    these written again, so tokens allocated but never written never become hittable."""
    seal: bytes = b""
    """`swap_out`'s keyed digest of everything above but the page bytes (module doc)."""

    @property
    def seq_id(self) -> int:
        """The sequence swapped out; `swap_in` brings it back under the same id."""
        return self.record.seq_id

    @property
    def nbytes(self) -> int:
        """Host bytes held, which is also the bytes each direction of the swap moves."""
        return sum(a.nbytes for layer in self.pages for a in layer)


_SEAL_KEY = os.urandom(32)  # per process: a seal cannot be recomputed by hand, nor carried to another process


def _seal(record: SwapRecord, spec: CacheSpec, pages: tuple[tuple[np.ndarray, ...], ...], written: int) -> bytes:
    """The keyed digest binding a swapped sequence's parts (checked fields only: call it
    on a record `check_record` passed and pages whose shapes were checked)."""
    fields = {
        "record": [int(record.seq_id), int(record.num_tokens), [int(f) for f in record.first_blocks],
                   [int(np.asarray(b).size) for b in record.blocks]],
        "spec": attrs.asdict(spec, filter=lambda a, _: a.init),
        "pages": [[[list(a.shape), a.dtype.str] for a in layer] for layer in pages],
        "written": int(written),
    }
    text = json.dumps(fields, sort_keys=True, default=repr).encode()  # spec fields: str, int, float, tuples
    return hashlib.blake2b(text, digest_size=32, key=_SEAL_KEY, person=b"paged_kv/swap/v1").digest()


def _check_spec(cache: PagedKVCache, manager: KVCacheManager) -> None:
    if not isinstance(cache, PagedKVCache):
        raise ShapeError(f"cache is a {type(cache).__name__}; expected a PagedKVCache")
    if not isinstance(manager, KVCacheManager):
        raise SpecError(f"manager is a {type(manager).__name__}; expected a KVCacheManager")
    require_same_spec(manager, cache, "manager", "cache")


def _check_encoding(swapped: SwappedSequence, spec: CacheSpec) -> None:
    """`SpecError` when ``swapped``'s bytes were written by another encoding than ``spec``'s
    (format, scales, fp8 scales, rotation or compute dtype of some layer)."""
    if swapped.spec is None:  # hand-built: only its shapes can be checked
        return
    there, here = (tuple(codecs(s, i) for i in range(s.num_layers)) for s in (swapped.spec, spec))
    if there != here:
        layer = next((i for i, (a, b) in enumerate(zip(there, here)) if a != b), min(len(there), len(here)))
        raise SpecError(f"seq_id={swapped.record.seq_id} was swapped out of a cache for {swapped.spec.describe()}; "
                        f"this cache is for {spec.describe()}, which stores layer {layer} otherwise, so its bytes "
                        "would be read as other values: swap it into a cache of the spec it came from")


def swap_out(cache: PagedKVCache, manager: KVCacheManager, seq_id: int) -> SwappedSequence:
    """Copy ``seq_id``'s blocks (every layer, keys and values) to host memory in one
    jitted gather, then release its device blocks. Returns what `swap_in` needs.

    The copy completes before the release, so a failure leaves the manager as it
    was. The cache itself is not changed (the freed blocks keep their bytes until
    reused, and views never show bytes past a sequence's length).
    """
    _check_spec(cache, manager)
    record = manager.swap_record(seq_id)
    sizes = padded_sizes(record.num_blocks, manager.spec.max_blocks_per_seq)
    fetched = jax.device_get(read_sequence(cache, record.blocks, record.first_blocks, record.num_tokens, sizes,
                                           manager.steps.tag))
    pages = tuple(
        tuple(np.array(a[: record.blocks[view.group].size]) for a in layer)  # owned, padding cut
        for view, layer in zip(cache.views, fetched)
    )
    written = manager.committed_tokens(seq_id)
    manager.swap_out(seq_id)
    return SwappedSequence(record, pages, manager.spec, written, _seal(record, manager.spec, pages, written))


def swap_in(cache: PagedKVCache, manager: KVCacheManager, swapped: SwappedSequence) -> PagedKVCache:
    """Allocate fresh blocks for a swapped-out sequence, scatter its pages back in one
    jitted call (the cache is donated: pass it and keep the one returned), and
    rebind the sequence under its id. Raises `OutOfBlocksError` (see
    `KVCacheManager.can_swap_in`) or `ShapeError`, changing nothing."""
    _check_spec(cache, manager)
    if not isinstance(swapped, SwappedSequence):
        raise InvalidArgumentError(f"swap_in needs the SwappedSequence swap_out returned; got {type(swapped).__name__}")
    record = swapped.record
    if swapped.spec is not None and not isinstance(swapped.spec, CacheSpec):
        raise InvalidArgumentError(f"swapped.spec is a {type(swapped.spec).__name__}; swap_in takes what swap_out made")
    _check_encoding(swapped, manager.spec)
    check_record(record, manager.spec)  # a record from another spec must not index past its groups
    if swapped.spec is None:  # hand-built: nothing says what its bytes encode (fp8 scales, rotation)
        raise InvalidArgumentError(f"swapped seq_id={record.seq_id} has no spec: swap_in takes only the "
                                   "SwappedSequence swap_out returned (it records the spec its bytes were written in)")
    _check_pages(swapped, cache, record)
    if not isinstance(swapped.seal, bytes) or not hmac.compare_digest(
            swapped.seal, _seal(record, swapped.spec, swapped.pages, _int(swapped.written))):
        raise InvalidArgumentError(
            f"swapped seq_id={record.seq_id} does not match what swap_out made (its record, spec, page shapes or "
            "written length were changed, or it was built by hand or in another process): swap in the "
            "SwappedSequence swap_out returned, unchanged"
        )
    new_ids = manager.swap_in(record)  # validates and allocates, all or nothing
    sizes = padded_sizes(tuple(i.size for i in new_ids), manager.spec.max_blocks_per_seq)

    def pad(a: np.ndarray, n: int) -> np.ndarray:
        return a if a.shape[0] == n else np.concatenate([a, np.zeros((n - a.shape[0], *a.shape[1:]), a.dtype)])

    pages = tuple(
        tuple(pad(a, sizes[view.group]) for a in layer) for view, layer in zip(cache.views, swapped.pages)
    )
    cache = write_back(cache, manager, new_ids, sizes, pages)
    if swapped.written:  # the tokens written before are back; the rest are still to be written
        manager.commit([record.seq_id], swapped.written)
    return cache


def _int(value: object) -> int:
    return int(value) if isinstance(value, (int, np.integer)) and not isinstance(value, bool) else -1


def _check_pages(swapped: SwappedSequence, cache: PagedKVCache, record: SwapRecord) -> None:
    """`ShapeError` unless ``swapped.pages`` holds, per layer of ``cache``, one numpy
    array per page array of the record's block count, shape and storage dtype."""
    pages = swapped.pages
    if not isinstance(pages, (tuple, list)) or len(pages) != len(cache.views):
        n = len(pages) if isinstance(pages, (tuple, list)) else type(pages).__name__
        raise ShapeError(f"swapped seq_id={record.seq_id} has pages for {n} layers, the cache {len(cache.views)}")
    for layer, (view, data) in enumerate(zip(cache.views, pages)):
        leaves = jax.tree_util.tree_leaves(view.pages())
        if not isinstance(data, (tuple, list)) or not all(isinstance(a, np.ndarray) for a in data):
            raise ShapeError(f"swapped seq_id={record.seq_id} layer {layer}: pages must be a tuple of numpy arrays "
                             f"(swap_out's host copy); got {type(data).__name__}")
        want = [(record.blocks[view.group].size, *leaf.shape[1:]) for leaf in leaves]
        got = [tuple(a.shape) for a in data]
        if got != want or any(a.dtype != leaf.dtype for a, leaf in zip(data, leaves)):
            raise ShapeError(f"swapped seq_id={record.seq_id} layer {layer}: pages {got} "
                             f"{[a.dtype.name for a in data]}, the cache needs {want} {[leaf.dtype.name for leaf in leaves]}")


__all__ = ["SwappedSequence", "swap_in", "swap_out"]
