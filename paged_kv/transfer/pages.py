"""What a transfer moves on the device: one sequence's blocks of every layer (page and
scale arrays alike), gathered in one jitted call on the sender and written in place
in one jitted call on the receiver (`paged_kv.sequence_pages`, which swapping shares),
the shapes a receiver pulls, and the checks that both caches store them alike.

Slots past the sequence's length -- the tail of its last block, the padding -- are
zeroed by the gather, before anything is sent: a reused block's stale bytes
(another sequence's keys) never leave the sender.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

import attrs
import jax
import numpy as np

from paged_kv.cache import PagedKVCache
from paged_kv.errors import TransferSpecError
from paged_kv.spec import CacheSpec

if TYPE_CHECKING:
    from jax.experimental.transfer import TransferConnection, TransferServer

    from paged_kv.sequence_pages import Pages

Leaves = list[list[list[Any]]]
"""Per layer, per page array: ``[shape after the block axis, dtype string]`` (as JSON holds it)."""

POOL_FIELDS = frozenset({"num_blocks", "sliding_num_blocks", "chunked_num_blocks", "max_blocks_per_seq",
                         "max_batch_slots", "page_storage"})
"""Spec fields two caches may differ in and still exchange pages: the pool sizes and
limits (checked against the sequence itself), and how floats are stored (the pages'
dtypes are compared leaf by leaf instead)."""


def spec_fields(spec: CacheSpec) -> dict[str, Any]:
    """The fields of ``spec`` that decide what a page's bytes mean, as JSON values."""
    fields = attrs.asdict(spec, filter=lambda a, _: a.init and a.name not in POOL_FIELDS)
    return json.loads(json.dumps(fields, default=_json_default))  # type: ignore[no-any-return]  # a JSON object


def _json_default(value: object) -> Any:
    if isinstance(value, (np.integer, np.floating)):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    raise TypeError(f"{type(value).__name__} is not JSON")


def leaves_of(cache: PagedKVCache) -> Leaves:
    """Per layer, per page array: ``[shape after the block axis, dtype]``."""
    return [[[list(leaf.shape[1:]), np.dtype(leaf.dtype).str] for leaf in jax.tree_util.tree_leaves(view.pages())]
            for view in cache.views]


def check_compatible(offered_spec: dict[str, Any], offered_leaves: Leaves, spec: CacheSpec, cache: PagedKVCache) -> None:
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


def pull_shapes(cache: PagedKVCache, padded: tuple[int, ...]) -> list[jax.ShapeDtypeStruct]:
    """``jax.ShapeDtypeStruct`` of every array a transfer of ``padded`` blocks per group
    pulls into ``cache``'s device, flat in `paged_kv.sequence_pages.gather_sequence`'s order."""
    out = []
    for view in cache.views:
        for leaf in jax.tree_util.tree_leaves(view.pages()):
            device = next(iter(leaf.devices()))
            out.append(jax.ShapeDtypeStruct((padded[view.group], *leaf.shape[1:]), leaf.dtype,  # type: ignore[no-untyped-call]  # jax's constructor is unannotated
                                            sharding=jax.sharding.SingleDeviceSharding(device)))
    return out


def nest(cache: PagedKVCache, flat: list[jax.Array]) -> Pages:
    """``flat`` arrays regrouped per layer as `paged_kv.sequence_pages.gather_sequence` returns them."""
    out: list[tuple[jax.Array, ...]] = []
    i = 0
    for view in cache.views:
        k = len(jax.tree_util.tree_leaves(view.pages()))
        out.append(tuple(flat[i: i + k]))
        i += k
    return tuple(out)


__all__ = ["POOL_FIELDS", "check_compatible", "leaves_of", "nest", "pull_shapes", "spec_fields"]


def transfer_server(device: jax.Device | None = None) -> TransferServer:
    """A `jax.experimental.transfer` server on 127.0.0.1 (a free port) for ``device``'s
    client (default: JAX's first device): it serves the pages a sender posts, and makes
    the connections a receiver pulls through."""
    from jax.experimental import transfer

    device = device or jax.devices()[0]
    return transfer.start_transfer_server(device.client, "127.0.0.1:0", ["127.0.0.1:0"])  # type: ignore[no-any-return]  # jaxlib: untyped


def abandon(connection: TransferConnection) -> None:
    """Fail every pull still waiting on ``connection`` (its arrays become errors), so a
    dead peer cannot hold them forever; the connection is unusable afterwards.
    (jax 0.10.2 offers this only as ``_poison_connection``; without it the pulls are
    left pending.)"""
    poison = getattr(connection, "_poison_connection", None)
    if poison is not None:
        poison()


__all__ += ["abandon", "transfer_server"]
