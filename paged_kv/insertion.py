"""`insert_prefill`: bring a sequence prefilled elsewhere into the paged cache.

A prefill server (or a prefill pass that ran without this cache) leaves a
sequence's keys and values in a contiguous per-layer cache: ``[L, heads, dim]``
per layer. EasyDeL's contiguous ``TransformerCache.insert(other, slot)`` copies
such a cache into a decode slot's ``max_seq_len`` rows. Here the sequence is
admitted (blocks for its ``L`` tokens in every layer group) and its tokens are
scattered into those blocks: O(L) bytes written, in place, all layers in one
jitted call. Binding it to a decode slot is then bookkeeping only
(`paged_kv.batch.DecodeSlots.insert`; `insert_prefill_slot` does both).

Shapes: ``L`` is padded to a bucket (`paged_kv.metadata.bucket`) with write slots
the scatter drops, so prompts of different lengths in one bucket share one
compilation. The padding is done on the host for host (numpy or CPU) arrays;
arrays already on an accelerator are padded there by a small jitted pad, which
compiles once per distinct ``L`` (the write itself still compiles per bucket).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from functools import partial
from typing import TYPE_CHECKING, Union

import jax
import jax.numpy as jnp
import numpy as np

from paged_kv.binding import bind_blocks
from paged_kv.cache import PagedKVCache
from paged_kv.errors import InvalidTokenCountError, SequenceTooLongError, ShapeError
from paged_kv.metadata import bucket, pad_slot

if TYPE_CHECKING:  # annotations only
    from jax.typing import DTypeLike

    from paged_kv.allocator.manager import KVCacheManager
    from paged_kv.batch.decode_slots import DecodeSlots

LayerArrays = Union[Sequence[Union[jax.Array, np.ndarray]], jax.Array, np.ndarray]
"""One ``[L, heads, dim]`` array per layer, or one stacked ``[num_layers, L, heads, dim]`` array."""
from paged_kv.spec import compute_dtype, require_same_spec


@partial(jax.jit, donate_argnums=0)
def _write_prefill(cache: PagedKVCache, keys: jax.Array, values: jax.Array, slots: jax.Array, gens: jax.Array,
                   tag: jax.Array) -> PagedKVCache:
    """keys/values ``[num_layers, Lp, H, D]``; slots ``[num_groups, Lp]`` (padding dropped);
    gens: the generation of each slot's block (`paged_kv.binding.bind_blocks`: pages of
    another manager write nothing)."""
    views = []
    for i, view in enumerate(cache.views):
        g, bs = view.group, view.spec.block_size
        # A cache's views carry their binding arrays (`PagedKVCache.init`).
        ok, generations, owner = bind_blocks(view.generations, view.owner, tag, slots[g] // bs, gens[g])  # type: ignore[arg-type]
        mine = jnp.where(ok, slots[g], view.generations.shape[0] * bs)  # type: ignore[union-attr]
        view = view.write_slots(keys[i][None], values[i][None], mine[None])
        views.append(dataclasses.replace(view, generations=generations, owner=owner))
    return PagedKVCache(tuple(views))


@partial(jax.jit, static_argnums=1)
def _pad_stack_on_device(layers: tuple[jax.Array, ...], padded_len: int) -> jax.Array:
    stacked = jnp.stack(layers)
    return jnp.pad(stacked, ((0, 0), (0, padded_len - stacked.shape[1]), (0, 0), (0, 0)))


def _on_host(x: object) -> bool:
    if isinstance(x, np.ndarray):
        return True
    return isinstance(x, jax.Array) and all(d.platform == "cpu" for d in x.devices())


def _layers(x: LayerArrays, name: str, num_layers: int, heads_dim: tuple[int, int], dtype: DTypeLike) -> LayerArrays:
    """Per-layer arrays of ``x`` (a sequence of ``[L, H, D]`` or one ``[num_layers, L, H, D]``),
    checked for count, shape, a common ``L`` and dtype; raises `ShapeError` naming them."""
    want = f"[L, {heads_dim[0]}, {heads_dim[1]}] {np.dtype(dtype).name}"
    if hasattr(x, "ndim") and hasattr(x, "shape"):
        if x.ndim != 4 or x.shape[0] != num_layers:
            raise ShapeError(f"{name} is one array of shape {tuple(x.shape)}; expected [{num_layers}, L, "
                             f"{heads_dim[0]}, {heads_dim[1]}] or a sequence of {num_layers} arrays {want}")
        layers = [x[i] for i in range(num_layers)] if isinstance(x, np.ndarray) else None
        shapes = [tuple(x.shape[1:])] * num_layers
        dtypes = [x.dtype] * num_layers  # type: ignore[union-attr]  # one array (it has ndim and shape)
    else:
        try:
            layers = list(x)
        except TypeError:
            raise ShapeError(
                f"{name} is a {type(x).__name__}; expected a sequence of {num_layers} arrays {want}"
            ) from None
        if len(layers) != num_layers:
            raise ShapeError(f"{name} has {len(layers)} layers; the cache has num_layers={num_layers}")
        bad = [i for i, a in enumerate(layers) if not (hasattr(a, "shape") and hasattr(a, "dtype"))]
        if bad:
            raise ShapeError(f"{name}[{bad[0]}] is a {type(layers[bad[0]]).__name__}, not an array {want}")
        shapes = [tuple(a.shape) for a in layers]
        dtypes = [a.dtype for a in layers]
    for i, (shape, dt) in enumerate(zip(shapes, dtypes)):
        if len(shape) != 3 or shape[1:] != heads_dim or shape[0] != shapes[0][0] or np.dtype(dt) != np.dtype(dtype):
            raise ShapeError(
                f"{name}[{i}] has shape {shape} {np.dtype(dt).name}; expected {want} with the same L in every "
                f"layer ({name}[0] has shape {shapes[0]}). Cast with .astype() if only the dtype differs"
            )
    return layers if layers is not None else x


def _padded(x: LayerArrays, layers: LayerArrays, padded_len: int, dtype: DTypeLike) -> jax.Array | np.ndarray:
    """``[num_layers, padded_len, H, D]`` with the rows past L zero."""
    if isinstance(x, jax.Array) and not _on_host(x):  # one stacked array on an accelerator
        return jnp.pad(x, ((0, 0), (0, padded_len - x.shape[1]), (0, 0), (0, 0)))
    if isinstance(x, (np.ndarray, jax.Array)) and _on_host(x):
        x = np.asarray(x)
        out = np.zeros((x.shape[0], padded_len, *x.shape[2:]), dtype)
        out[:, : x.shape[1]] = x
        return out
    if all(_on_host(a) for a in layers):
        first = np.asarray(layers[0])
        out = np.zeros((len(layers), padded_len, *first.shape[1:]), dtype)
        for i, a in enumerate(layers):
            out[i, : a.shape[0]] = np.asarray(a)
        return out
    return _pad_stack_on_device(tuple(jnp.asarray(a) for a in layers), padded_len)  # type: ignore[no-any-return]  # jit's wrapper


def insert_prefill(cache: PagedKVCache, manager: KVCacheManager, seq_id: int, keys: LayerArrays,
                   values: LayerArrays) -> PagedKVCache:
    """Admit ``seq_id`` with the ``L`` tokens of ``keys``/``values`` and write them into its blocks.

    ``keys``: one ``[L, key_heads, key_dim]`` array per layer (or one stacked
    ``[num_layers, L, key_heads, key_dim]`` array), in the spec's dtype; ``values``
    likewise with ``value_heads``/``value_dim``. Keys are stored as given (already
    rotated, if the model uses RoPE). Every layer uses the slot mapping of its own
    group (`CacheSpec.group_of`), so full-attention and sliding-window layers each
    get their own blocks.

    Returns the new cache; the pages of ``cache`` are donated (written in place) and
    must not be used again. Raises `ShapeError` / `SpecError` /
    `InvalidTokenCountError` before admitting anything, and the manager's
    `DuplicateSequenceError`, `SequenceTooLongError` or `OutOfBlocksError` from
    `KVCacheManager.admit`, which changes nothing either.
    """
    if not isinstance(cache, PagedKVCache):
        raise ShapeError(f"cache is a {type(cache).__name__}; expected a PagedKVCache")
    spec = cache.spec
    require_same_spec(manager, cache, "manager", "cache")
    if len(cache) != spec.num_layers:
        raise ShapeError(f"cache has {len(cache)} layers; its spec has num_layers={spec.num_layers}")
    dt = compute_dtype(spec)
    k_layers = _layers(keys, "keys", spec.num_layers, (spec.key_heads, spec.key_dim), dt)
    v_layers = _layers(values, "values", spec.num_layers, (spec.value_heads, spec.value_dim), dt)
    # hasattr: one stacked array, else one array per layer.
    length = int(keys.shape[1]) if hasattr(keys, "ndim") else int(k_layers[0].shape[0])  # type: ignore[union-attr]
    v_length = int(values.shape[1]) if hasattr(values, "ndim") else int(v_layers[0].shape[0])  # type: ignore[union-attr]
    if length != v_length:
        raise ShapeError(f"keys hold L={length} tokens but values hold L={v_length}")
    if length < 1:
        raise InvalidTokenCountError(f"insert_prefill(seq_id={seq_id!r}) got L=0 tokens; a sequence starts with >= 1")
    for i, view in enumerate(cache.views):
        view.check_pages()
        if any(leaf.is_deleted() for leaf in jax.tree_util.tree_leaves(view)):
            raise ShapeError(f"layer {i} pages were donated to an earlier call; pass the cache that call returned")

    if length > spec.max_seq_len:
        raise SequenceTooLongError(
            f"insert_prefill(seq_id={seq_id!r}) of L={length} tokens > max_seq_len={spec.max_seq_len}"
        )
    padded_len = bucket(length, spec.max_seq_len)
    k = _padded(keys, k_layers, padded_len, dt)
    v = _padded(values, v_layers, padded_len, dt)
    slot_rows = manager.admit(seq_id, length)  # the first state change
    slots = np.empty((len(spec.groups), padded_len), np.int32)
    for g in range(len(spec.groups)):
        slots[g] = pad_slot(spec, g)  # dropped by the scatter
    slots[:, :length] = slot_rows
    # Each written block's generation, as step metadata carries it (0 for padding: past the pool).
    gens = np.stack([group.pool.generations_of(slots[g] // spec.block_size) for g, group in enumerate(manager.groups)])
    try:
        cache = _write_prefill(cache, k, v, slots, gens, manager.steps.tag)
    except Exception:
        manager.release(seq_id)
        raise
    manager.commit([seq_id], length)  # written: JAX orders every later read after this write
    return cache


def insert_prefill_slot(cache: PagedKVCache, slots: DecodeSlots, seq_id: int, keys: LayerArrays,
                        values: LayerArrays, slot: int | None = None) -> tuple[PagedKVCache, int]:
    """`insert_prefill` into ``slots.manager``, then ``slots.insert`` into ``slot`` (default:
    the lowest free one); returns ``(new cache, slot)``. The slot is checked first
    (`DecodeSlots.slot_for`), so nothing changes on failure."""
    slot = slots.slot_for(seq_id, slot)
    cache = insert_prefill(cache, slots.manager, seq_id, keys, values)
    return cache, slots.insert(seq_id, slot)


__all__ = ["insert_prefill", "insert_prefill_slot"]
