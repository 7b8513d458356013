"""`TransformerCacheView`: one layer's pages, full causal attention.

The drop-in for EasyDeL's ``TransformerCacheView.concatenate_to_cache``: the model
hands it this step's keys and values and gets back contiguous keys and values for
attention, a mask, and the view to keep for the next step. Unlike the contiguous
cache, memory is held per block actually used, not per ``max_seq_len``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, ClassVar

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from paged_kv.attention import DEFAULT_CHUNK_BLOCKS, check_attention_query, paged_attention
from paged_kv.errors import ShapeError
from paged_kv.metadata import StepMetadata
from paged_kv.ops import gather_blocks, scatter_tokens, take_blocks
from paged_kv.quant import PageCodec, codecs
from paged_kv.sharding import zeros
from paged_kv.spec import CacheSpec
from paged_kv.binding import bind_step
from paged_kv.views.mask import AttentionMask

if TYPE_CHECKING:
    from typing_extensions import Self


class PagedLayerView:
    """What every paged layer view shares, whatever its page layout.

    A subclass is a frozen dataclass pytree with ``spec`` and ``layer_index`` fields, its
    page arrays (and, for int8 layers, scale arrays) as leaves, the binding arrays
    ``generations`` and ``owner`` (`paged_kv.binding`) as leaves, and its own
    ``write_slots(key, value, slot_mapping)`` and ``decode_gathered(gathered)``; the
    reads (`read`, `read_blocks`), group, window, mask, `write`,
    `concatenate_to_cache`, `attend` and `attention` follow from those and are
    defined once, here.
    """

    # Declared for the type checker (each subclass defines them as dataclass fields).
    spec: CacheSpec
    layer_index: int
    generations: jax.Array | None
    owner: jax.Array | None

    if TYPE_CHECKING:
        __dataclass_fields__: ClassVar[dict[str, dataclasses.Field[Any]]]

        def __init__(self, *, spec: CacheSpec, layer_index: int = 0, **arrays: jax.Array | None) -> None: ...

        def write_slots(self, key: jax.Array, value: jax.Array, slots: jax.Array) -> PagedLayerView: ...

        def decode_gathered(self, gathered: Any, rotated: bool = False) -> tuple[jax.Array, jax.Array]: ...

    @staticmethod
    def page_arrays(spec: CacheSpec, layer: int) -> dict[str, Any]:
        """Name -> (shape, dtype) of each page leaf of this layout, None where absent."""
        raise NotImplementedError

    @staticmethod
    def binding_arrays(spec: CacheSpec, layer: int) -> dict[str, Any]:
        """Name -> (shape, dtype) of the binding leaves (`paged_kv.binding`):
        each block's generation, and the serial of the manager the pages serve."""
        return {"generations": ((spec.groups[spec.group_of(layer)].num_blocks,), np.int32), "owner": ((), np.int32)}

    @classmethod
    def init(cls, spec: CacheSpec, layer_index: int = 0,
             device: jax.Device | jax.sharding.Sharding | None = None) -> Self:
        """Zeroed pages (the null block must start at zero), placed on ``device`` or a
        sharding (the binding arrays: replicated), unbound (owner 0)."""
        wanted = {**cls.page_arrays(spec, layer_index), **cls.binding_arrays(spec, layer_index)}
        arrays = {name: None if want is None else zeros(*want, device)  # type: ignore[call-arg]  # want: (shape, dtype)
                  for name, want in wanted.items()}
        return cls(spec=spec, layer_index=layer_index, **arrays)

    def check_pages(self) -> None:
        """Raise `ShapeError` if the pages (or the binding arrays) do not match the spec
        (e.g. a restored or foreign array)."""
        wanted = {**self.page_arrays(self.spec, self.layer_index), **self.binding_arrays(self.spec, self.layer_index)}
        for name, want in wanted.items():
            _check_array(self, name, getattr(self, name), want)

    def pages(self) -> "PagedLayerView":
        """This view without its binding arrays: the pytree of page (and scale) arrays
        only, which the gathers, copies and swaps map over block by block."""
        return dataclasses.replace(self, generations=None, owner=None)

    def map_pages(self, fn: Callable[[jax.Array], jax.Array]) -> "PagedLayerView":
        """``fn`` applied to every page (and scale) array, the binding arrays kept."""
        mapped = jax.tree_util.tree_map(fn, self.pages())
        kept: PagedLayerView = dataclasses.replace(mapped, generations=self.generations, owner=self.owner)
        return kept

    def bound(self, metadata: StepMetadata, write: bool) -> tuple["PagedLayerView", StepMetadata]:
        """``metadata`` as these pages may serve it (refused blocks: the null block;
        refused writes: dropped) and, for a write, the view with the blocks recorded:
        see `paged_kv.binding.bind_step`."""
        g = self.group
        gm, generations, owner = bind_step(self.generations, self.owner, metadata, g,  # type: ignore[arg-type]  # views hold them
                                           self.spec.block_size, write)
        groups = (*metadata.groups[:g], gm, *metadata.groups[g + 1:])
        meta = metadata.replace(groups=groups)
        return dataclasses.replace(self, generations=generations, owner=owner), meta

    @property
    def codecs(self) -> tuple[PageCodec, PageCodec]:
        """How this layer stores keys and values (`paged_kv.quant.PageCodec`): plain bits
        of the compute dtype, int8 with per-token scales, or fp8 with fixed scales."""
        return codecs(self.spec, self.layer_index)

    def gather(self, block_tables: jax.Array, kv_lens: jax.Array) -> "PagedLayerView":
        """This view's pytree with every page (and scale) array replaced by the blocks of
        ``block_tables`` ``[B, W]`` laid end to end, ``[B, W*block_size, *row]`` storage
        bits, zero at and past ``kv_lens`` ``[B]``: what `decode_gathered` takes. An
        attention kernel may gather chunks of blocks the same way and decode each."""
        gathered: PagedLayerView = jax.tree_util.tree_map(lambda p: gather_blocks(p, block_tables, kv_lens, p.dtype),
                                                          self.pages())
        return gathered

    def read(self, metadata: StepMetadata) -> tuple[jax.Array, jax.Array]:
        """Contiguous keys and values ``[B, W*block_size, heads, dim]`` in the compute dtype
        (dequantized for int8/fp8 layers), zero past each length.

        Key ``s`` of row ``b`` is the sequence's token ``mask.start[b] + s``: 0 for full
        attention, the first block the window (or the step's first chunk) can reach for a
        sliding (chunked) layer.
        """
        self.check_pages()
        self.check_metadata(metadata)
        return self._read(self.bound(metadata, write=False)[1])

    def _read(self, metadata: StepMetadata) -> tuple[jax.Array, jax.Array]:
        """`read` of metadata bound already."""
        tables = metadata.groups[self.group]
        lens = metadata.kv_lens - tables.start
        keys, values = self.decode_gathered(self.gather(tables.block_tables, lens))  # type: ignore[arg-type]  # metadata arrays: numpy on the host, jax arrays under jit
        if self.codecs[0].offset is not None:  # zeroed slots decode to the offset: zero them again
            live = jnp.arange(keys.shape[1])[None, :] < lens[:, None]
            keys = jnp.where(live[:, :, None, None], keys, jnp.zeros((), keys.dtype))
        return keys, values

    def read_blocks(self, block_ids: jax.Array, rotated: bool = False) -> tuple[jax.Array, jax.Array]:
        """Keys ``[B, C*block_size, key_heads, key_dim]`` and values of blocks ``block_ids``
        ``[B, C]`` in the compute dtype, not zeroed (the attention masks by length): each
        page (and scale) array's blocks taken as stored, then decoded (dequantized for an
        int8/fp8 layer) by `decode_gathered`, so an attention loop dequantizes one chunk
        at a time. Slots past a row's length may decode to garbage or NaN (stale bits,
        stale scales): the attention must select them away, never multiply them by 0.

        ``rotated=True``: as stored instead (`paged_kv.quant.PageCodec.dequantize`:
        float32, still Hadamard-rotated when the spec rotates), for an attention that
        rotates its query and un-rotates its output once rather than every key."""
        taken = jax.tree_util.tree_map(lambda p: take_blocks(p, block_ids, p.dtype), self.pages())
        return self.decode_gathered(taken, rotated=rotated)

    def _check_step(self, key: object, value: object, slots: object) -> None:
        """Raise `ShapeError` unless ``key``/``value`` are float arrays ``[B, T, heads, dim]``
        with ``[B, T]`` the shape of ``slots``. Shapes and dtypes are static, so under jit
        this raises at trace time, before any write."""
        s = self.spec
        bt = tuple(slots if isinstance(slots, tuple) else getattr(slots, "shape", ()))
        checks = (("keys", key, s.key_heads, s.key_dim), ("values", value, s.value_heads, s.value_dim))
        for name, x, heads, dim in checks:
            want = (*bt, heads, dim)
            if not (hasattr(x, "shape") and hasattr(x, "dtype")):
                raise ShapeError(f"layer {self.layer_index}: {name} is a {type(x).__name__}; expected an array {want}")
            if tuple(x.shape) != want:
                raise ShapeError(
                    f"layer {self.layer_index}: {name} have shape {tuple(x.shape)}; expected {want} "
                    f"(slot_mapping {bt}, then {heads} heads x {dim} dims)"
                )
            if not jnp.issubdtype(x.dtype, jnp.floating):
                raise ShapeError(
                    f"layer {self.layer_index}: {name} have dtype {x.dtype}; "
                    f"expected a float dtype (pages hold {s.dtype})"
                )

    def check_metadata(self, metadata: StepMetadata) -> None:
        """Raise `ShapeError` unless ``metadata`` is a `StepMetadata` built (by a manager's
        `step_metadata` or `DecodeSlots`) for pages of this spec: same block size, same
        groups, same blocks per group. Static, so under jit it raises at trace time."""
        if not isinstance(metadata, StepMetadata):
            raise ShapeError(
                f"layer {self.layer_index}: metadata is a {type(metadata).__name__}; pass the StepMetadata from "
                "KVCacheManager.step_metadata or DecodeSlots.decode_step"
            )
        want = self.spec.pool_signature()
        _check_generation_shapes(self.layer_index, metadata)
        if metadata.built_for != want:
            raise ShapeError(
                f"layer {self.layer_index}: metadata was built for pages {metadata.built_for} (block_size, "
                f"(num_blocks, window, chunk) per group), these pages are {want}; use the metadata of the manager "
                "built from this cache's spec"
            )

    def check_query(self, query: jax.Array, metadata: StepMetadata) -> None:
        """Raise `ShapeError` unless ``query`` is a float array ``[B, T, q_heads, key_dim]``
        laid out like ``metadata``, with ``q_heads`` a multiple of the key heads (GQA/MQA)."""
        s = self.spec
        bt = (metadata.batch_size, metadata.query_len)
        if not (hasattr(query, "shape") and hasattr(query, "dtype")):
            raise ShapeError(f"layer {self.layer_index}: query is a {type(query).__name__}; expected an array [B, T, heads, dim]")
        shape = tuple(query.shape)
        if len(shape) != 4 or shape[:2] != bt or shape[3] != s.key_dim or shape[2] % s.key_heads:
            raise ShapeError(
                f"layer {self.layer_index}: query has shape {shape}; expected ({bt[0]}, {bt[1]}, q_heads, {s.key_dim}) "
                f"with q_heads a multiple of the {s.key_heads} key heads"
            )
        if not jnp.issubdtype(query.dtype, jnp.floating):
            raise ShapeError(f"layer {self.layer_index}: query has dtype {query.dtype}; expected a float dtype")

    def write(self, key: jax.Array, value: jax.Array, metadata: StepMetadata) -> "PagedLayerView":
        """Scatter this step's ``key``/``value`` ``[B, T, heads, dim]`` into the pages,
        after the step's copy-on-write block copies (what binding refuses is dropped:
        `paged_kv.binding`)."""
        return self._write(key, value, metadata)[0]

    def _write(self, key: jax.Array, value: jax.Array, metadata: StepMetadata) -> tuple["PagedLayerView", StepMetadata]:
        """`write`, and the metadata as bound (what the step's reads then use)."""
        self.check_pages()
        self.check_metadata(metadata)
        self._check_step(key, value, (metadata.batch_size, metadata.query_len))
        view, metadata = self.bound(metadata, write=True)
        group = metadata.groups[self.group]
        view = view.copy_blocks(group.copy_src, group.copy_dst, group.copy_len)  # type: ignore[arg-type]  # metadata arrays: numpy on the host, jax arrays under jit
        return view.write_slots(key, value, group.slot_mapping), metadata  # type: ignore[arg-type]  # metadata arrays: numpy on the host, jax arrays under jit

    def copy_blocks(self, src: jax.Array, dst: jax.Array, length: jax.Array) -> "PagedLayerView":
        """Copy the first ``length[i]`` token slots of block ``src[i]`` into block ``dst[i]``,
        one copy after another, in every page array of this layer (a ``src`` or ``dst``
        outside the pool, or a ``dst`` of the null block, copies nothing: metadata is
        caller-constructible). Slots past ``length[i]`` keep what the writer put there,
        so running a copy twice changes nothing. O(blocks copied), in place when the
        pages are donated."""
        if src.shape[0] == 0:
            return self
        bs = self.spec.block_size
        # Host (numpy) metadata in an eager call: the loop indexes by a traced counter.
        src, dst, length = jnp.asarray(src), jnp.asarray(dst), jnp.asarray(length)

        def copy_all(pages: jax.Array) -> jax.Array:
            def copy_one(i: jax.Array, pages: jax.Array) -> jax.Array:
                nb = pages.shape[0]
                inside = (dst[i] >= 1) & (dst[i] < nb) & (src[i] >= 0) & (src[i] < nb)
                d = jnp.where(inside, dst[i], 0)  # not inside: block 0 written back unchanged
                old = lax.dynamic_index_in_dim(pages, d, keepdims=False)
                new = lax.dynamic_index_in_dim(pages, jnp.where(inside, src[i], 0), keepdims=False)
                take = (jnp.arange(bs) < length[i]) & inside
                merged = jnp.where(take.reshape(bs, *([1] * (pages.ndim - 2))), new, old)
                updated: jax.Array = lax.dynamic_update_index_in_dim(pages, merged, d, 0)
                return updated

            copied: jax.Array = lax.fori_loop(0, src.shape[0], copy_one, pages)
            return copied

        return self.map_pages(copy_all)

    @property
    def group(self) -> int:
        """Index of this layer's group in `CacheSpec.groups` and `StepMetadata.groups`."""
        return self.spec.group_of(self.layer_index)

    @property
    def window(self) -> int | None:
        """Sliding window of this layer's group, or None."""
        return self.spec.groups[self.group].window

    @property
    def chunk(self) -> int | None:
        """Chunk size of this layer's group (chunked local attention), or None."""
        return self.spec.groups[self.group].chunk

    def mask(self, metadata: StepMetadata) -> AttentionMask:
        """Lengths and query positions relative to the keys `read` returns; a chunked
        layer's mask also carries ``start``, where its chunk edges are measured from."""
        start = metadata.groups[self.group].start
        return AttentionMask(
            metadata.kv_lens - start, metadata.positions - start[:, None], metadata.query_lens, self.window,  # type: ignore[arg-type]  # metadata arrays: numpy on the host, jax arrays under jit
            self.chunk, None if self.chunk is None else start,  # type: ignore[arg-type]  # metadata arrays: numpy on the host, jax arrays under jit
        )

    def attention(
        self,
        query: jax.Array,
        key: jax.Array,
        value: jax.Array,
        metadata: StepMetadata,
        *,
        scale: float | None = None,
        soft_cap: float | None = None,
        impl: str = "auto",
        chunk_blocks: int = DEFAULT_CHUNK_BLOCKS,
    ) -> tuple[jax.Array, "PagedLayerView"]:
        """Write this step's keys/values, then attend to the pages in place: returns
        ``(output [B, T, q_heads, value_dim], new view)``.

        The hot path of a model layer: no contiguous copy of the sequences is made
        (`paged_kv.attention.paged_attention` reads the blocks through the table a
        chunk at a time). Causal within the step's new tokens, so prefill, decode and
        mixed chunked-prefill batches share it; sliding layers apply their window,
        chunked layers their chunk.
        ``scale`` defaults to ``1/sqrt(key_dim)``; ``soft_cap`` caps the logits;
        ``impl``: ``"auto"`` (a Pallas kernel where the platform and layout have one,
        else XLA), ``"xla"``, or a kernel name (see `paged_kv.attention`);
        ``chunk_blocks``: blocks per iteration of the XLA path.
        """
        check_attention_query(query, self, metadata)  # before the write: a bad call writes nothing
        view, bound = self._write(key, value, metadata)
        out = paged_attention(query, view, bound, scale=scale, soft_cap=soft_cap, impl=impl, chunk_blocks=chunk_blocks,
                              bound=True)
        return out, view

    def attend(
        self,
        query: jax.Array,
        metadata: StepMetadata,
        *,
        scale: float | None = None,
        soft_cap: float | None = None,
        impl: str = "auto",
        chunk_blocks: int = DEFAULT_CHUNK_BLOCKS,
    ) -> jax.Array:
        """Attention of ``query`` ``[B, T, q_heads, key_dim]`` over what the pages hold
        now (no write): ``[B, T, q_heads, value_dim]`` in ``query.dtype``. Blocks the
        metadata names that are another generation now read as the null block."""
        return paged_attention(query, self, metadata, scale=scale, soft_cap=soft_cap, impl=impl,
                               chunk_blocks=chunk_blocks)

    def concatenate_to_cache(
        self,
        query: jax.Array | None,
        key: jax.Array,
        value: jax.Array,
        metadata: StepMetadata,
    ) -> tuple[jax.Array, jax.Array, AttentionMask, "PagedLayerView"]:
        """Write this step's keys/values, then return (keys, values, mask, new view).

        The seed-compatible path: it gathers every live token of every row into a
        contiguous ``[B, W*block_size, heads, dim]`` copy. A model that only needs the
        attention output should call `attention`, which reads the pages in place.

        ``key``/``value``: ``[B, T, heads, dim]`` laid out like ``metadata`` (row b is
        the b-th sequence given to `KVCacheManager.step_metadata`, token t its t-th new
        token). Keys and values come back in ``query.dtype`` when a query is given, as
        EasyDeL's cache does, else in the spec's dtype. Works for prefill (T > 1) and
        decode (T == 1) alike, and for sliding-window and chunked layers, whose keys
        start at the first block the window or the step's first chunk reaches (the
        mask's lengths and positions are relative to it and carry the window or chunk).
        """
        if query is not None:
            self.check_query(query, metadata)
        view, bound = self._write(key, value, metadata)
        keys, values = view._read(bound)
        if query is not None:
            keys, values = keys.astype(query.dtype), values.astype(query.dtype)
        return keys, values, view.mask(metadata), view


@dataclasses.dataclass(frozen=True)
class TransformerCacheView(PagedLayerView):
    """Key and value pages of one layer: ``[num_blocks, block_size, heads, dim]`` each;
    for an int8 layer also ``key_scales``/``value_scales`` ``[num_blocks, block_size,
    heads]`` (None otherwise), leaves of the pytree so they move with the pages."""

    key_pages: jax.Array
    value_pages: jax.Array
    spec: CacheSpec
    layer_index: int = 0
    key_scales: jax.Array | None = None
    value_scales: jax.Array | None = None
    generations: jax.Array | None = None  # see `PagedLayerView.binding_arrays`
    owner: jax.Array | None = None

    @staticmethod
    def page_arrays(spec: CacheSpec, layer: int) -> dict[str, Any]:
        """Name -> (shape, dtype) of each page leaf of the split layout, None where absent."""
        return _page_arrays(spec, layer)

    def write_slots(self, key: jax.Array, value: jax.Array, slots: jax.Array) -> "TransformerCacheView":
        """Scatter ``key``/``value`` ``[B, T, heads, dim]`` into flat page slots ``slots`` ``[B, T]``
        (quantized first for an int8/fp8 layer; scales go to the same slots)."""
        self._check_step(key, value, slots)
        (kc, vc), out = self.codecs, {}
        for part, codec, x in (("key", kc, key), ("value", vc, value)):
            bits, scales = codec.encode(x)
            out[f"{part}_pages"] = scatter_tokens(getattr(self, f"{part}_pages"), bits, slots, bits.dtype)
            if scales is not None:
                out[f"{part}_scales"] = scatter_tokens(getattr(self, f"{part}_scales"), scales, slots, scales.dtype)
        return dataclasses.replace(self, **out)  # type: ignore[arg-type]  # page and scale fields

    def decode_gathered(self, gathered: "TransformerCacheView", rotated: bool = False) -> tuple[jax.Array, jax.Array]:
        """Keys and values in the compute dtype from `gather`'s result (or a chunk of it);
        ``rotated=True``: as stored (see `read_blocks`)."""
        (kc, vc), part = self.codecs, ("dequantize" if rotated else "decode")
        return (getattr(kc, part)(gathered.key_pages, gathered.key_scales),
                getattr(vc, part)(gathered.value_pages, gathered.value_scales))


def _page_arrays(spec: CacheSpec, layer: int) -> dict[str, Any]:
    """``{field: (shape, storage dtype) or None}`` of layer ``layer``'s split view."""
    nb = spec.groups[spec.group_of(layer)].num_blocks
    kc, vc = codecs(spec, layer)
    out: dict[str, Any] = {}
    for part, codec, heads, dim in (("key", kc, spec.key_heads, spec.key_dim), ("value", vc, spec.value_heads, spec.value_dim)):
        out[f"{part}_pages"] = ((nb, spec.block_size, heads, dim), codec.page_storage)
        out[f"{part}_scales"] = None if codec.scale_storage is None else ((nb, spec.block_size, heads), codec.scale_storage)
    return out


def _check_generation_shapes(layer: int, metadata: StepMetadata) -> None:
    """`ShapeError` unless every group's generations have the shapes of what they
    describe (block tables, copies) and the owner is a scalar: metadata is
    caller-constructible, and a mismatch would otherwise broadcast or fail deep in XLA."""
    if tuple(getattr(metadata.owner, "shape", (None,))) != ():
        raise ShapeError(f"layer {layer}: metadata.owner has shape {getattr(metadata.owner, 'shape', None)}; "
                         "expected a scalar (the manager's serial)")
    for g, gm in enumerate(metadata.groups):
        for name, of in (("block_gens", "block_tables"), ("copy_src_gen", "copy_src"), ("copy_dst_gen", "copy_src")):
            got, want = tuple(getattr(gm, name).shape), tuple(getattr(gm, of).shape)
            if got != want or (name != "block_gens" and tuple(gm.copy_dst.shape) + tuple(gm.copy_len.shape) != want * 2):
                raise ShapeError(f"layer {layer}: metadata group {g} has {name} {got} for {of} {want} "
                                 f"(copy_dst {tuple(gm.copy_dst.shape)}, copy_len {tuple(gm.copy_len.shape)}); "
                                 "build metadata with a manager, or give each its generations")


def _check_array(view: PagedLayerView, name: str, arr: Any, want: Any) -> None:
    """`ShapeError` unless ``arr`` has the ``(shape, dtype)`` ``want`` (or both are None)."""
    if want is None and arr is None:
        return
    got = None if arr is None else f"{tuple(arr.shape)} {arr.dtype}"
    expected = None if want is None else f"{want[0]} {np.dtype(want[1])}"
    if got != expected:
        raise ShapeError(f"layer {view.layer_index} {name} is {got}; spec wants {expected}")


_FIELDS = ["key_pages", "value_pages", "key_scales", "value_scales", "generations", "owner"]
jax.tree_util.register_dataclass(TransformerCacheView, data_fields=_FIELDS, meta_fields=["spec", "layer_index"])

__all__ = ["PagedLayerView", "TransformerCacheView"]
