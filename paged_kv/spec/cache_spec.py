"""`CacheSpec`: the one frozen description of a paged cache, and its memory arithmetic.

The host allocator, the device pages and the views are all built from the same
spec, so a mismatch between them is caught where it is made (see `ShapeError`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import attrs
import numpy as np

from paged_kv.errors import SpecError
from paged_kv.spec import fields, formats, key_offsets
from paged_kv.spec.dtypes import resolve_dtype
from paged_kv.spec.layer_group import LayerGroup

if TYPE_CHECKING:
    from typing_extensions import Never, Unpack

    from paged_kv.spec.spec_types import CacheSpecFields, FP8Scales, KeyOffsets, MemoryFields

NULL_BLOCK = 0
"""Block id 0 is reserved: padding entries of block tables point at it and it is never
handed out, so its page stays all zeros and a padded read can never see a real token."""


@attrs.frozen(kw_only=True, init=False)
class CacheSpec:
    """Shape, dtype and limits of a paged KV cache.

    Heads and dims may be given once as ``num_kv_heads`` / ``head_dim`` or separately
    as ``key_heads``/``value_heads`` and ``key_dim``/``value_dim`` (MLA-style models
    have key_dim != value_dim). ``num_blocks`` counts the reserved null block, so
    ``num_blocks - 1`` blocks are usable. ``page_storage``: how pages hold the floats
    (see `storage_dtype`): ``"bits"`` (default: unsigned ints of the same width),
    ``"float"`` (the dtype itself, what Pallas kernels read), ``"auto"`` (bits on CPU,
    float on TPU/GPU).

    Quantized pages (codecs: `paged_kv.quant`; rules: `paged_kv.spec.formats`):
    ``kv_format="int8"`` stores int8 keys/values with a per-token, per-head absmax
    scale (``kv_scale_dtype`` "float32" or "bfloat16") beside the pages;
    ``kv_format="fp8"`` stores float8_e4m3fn with fixed per-head scales
    ``kv_fp8_scales`` (None: 1.0; one float: per-tensor; per layer a ``(key, value)``
    pair of a float or one float per head). ``dtype`` stays the compute dtype. Layers
    in ``kv_full_precision_layers`` (indices, or "sliding" for every sliding-window
    layer; chunked layers do not count as sliding: list their indices to keep them
    too) keep ``dtype`` pages. ``kv_rotation``: "auto" (the default: quantized pages
    hold each head vector times a normalized Hadamard matrix, which spreads outlier
    channels before the scale is taken; fp8 scales apply to the rotated values),
    "hadamard" (the same, required), or "none" (see `paged_kv.quant`).
    ``kv_key_offsets``: per layer None or ``key_heads x key_dim`` floats that quantized
    keys hold on every token, calibrated (`paged_kv.key_offsets.calibrate`; rules:
    `paged_kv.spec.key_offsets`): pages hold ``k - mu`` and reads add ``mu`` back, so
    rounding is relative to what varies from token to token.

    Local attention: layers in ``sliding_layers`` see the last ``sliding_window``
    positions; layers in ``chunked_layers`` (Llama 4's ``attention_chunk_size``) see,
    causally, only the positions of their own chunk: position ``p`` sees ``s`` iff
    ``s // attention_chunk_size == p // attention_chunk_size``. Either kind forms its
    own layer group with its own pool (``sliding_num_blocks`` / ``chunked_num_blocks``
    blocks, default ``num_blocks``) whose blocks behind what any query can still see
    go back to the pool as sequences grow. A chunk may be any positive size: the mask
    and the host rule are exact whether or not it is a multiple of ``block_size`` (a
    block straddling a chunk edge is kept while the chunk it ends in is current).
    """

    # The constructor is typed by `CacheSpecFields` (the ``__init__`` below), not by the attrs
    # plugin, which cannot read converters made by a factory (``fields.positive(name)``):
    # those lines ignore its "unsupported converter" [misc] error.
    num_layers: int = attrs.field(converter=fields.positive("num_layers"))  # type: ignore[misc]
    num_blocks: int = attrs.field(converter=fields.positive("num_blocks"))  # type: ignore[misc]
    block_size: int = attrs.field(converter=fields.positive("block_size"))  # type: ignore[misc]
    max_blocks_per_seq: int = attrs.field(converter=fields.positive("max_blocks_per_seq"))  # type: ignore[misc]
    max_batch_slots: int = attrs.field(default=256, converter=fields.positive("max_batch_slots"))  # type: ignore[misc]
    dtype: str = attrs.field(default="bfloat16", converter=fields.canonical_dtype)
    num_kv_heads: int | None = attrs.field(default=None, converter=fields.positive("num_kv_heads", optional=True))  # type: ignore[misc]
    head_dim: int | None = attrs.field(default=None, converter=fields.positive("head_dim", optional=True))  # type: ignore[misc]
    key_heads: int = attrs.field(default=None, converter=fields.or_shortcut("key_heads", "num_kv_heads"))  # type: ignore[misc]
    value_heads: int = attrs.field(default=None, converter=fields.or_shortcut("value_heads", "num_kv_heads"))  # type: ignore[misc]
    key_dim: int = attrs.field(default=None, converter=fields.or_shortcut("key_dim", "head_dim"))  # type: ignore[misc]
    value_dim: int = attrs.field(default=None, converter=fields.or_shortcut("value_dim", "head_dim"))  # type: ignore[misc]
    sliding_window: int | None = attrs.field(default=None, converter=fields.positive("sliding_window", optional=True))  # type: ignore[misc]
    sliding_layers: tuple[int, ...] = attrs.field(default=(), converter=fields.indices("sliding_layers"))  # type: ignore[misc]
    sliding_num_blocks: int | None = attrs.field(default=None,
                                                 converter=fields.positive("sliding_num_blocks", optional=True))  # type: ignore[misc]
    attention_chunk_size: int | None = attrs.field(default=None,
                                                   converter=fields.positive("attention_chunk_size", optional=True))  # type: ignore[misc]
    chunked_layers: tuple[int, ...] = attrs.field(default=(), converter=fields.indices("chunked_layers"))  # type: ignore[misc]
    chunked_num_blocks: int | None = attrs.field(default=None,
                                                 converter=fields.positive("chunked_num_blocks", optional=True))  # type: ignore[misc]
    page_storage: str = attrs.field(default="bits", validator=fields.page_storage)
    kv_format: str = attrs.field(default="none")
    kv_scale_dtype: str = attrs.field(default="float32")
    kv_fp8_scales: FP8Scales = attrs.field(default=None, converter=fields.fp8_scales)
    # Indices or "sliding" as given; sorted indices once built (`_check_format`).
    kv_full_precision_layers: tuple[int, ...] = attrs.field(default=(), converter=fields.full_precision)
    kv_rotation: str = attrs.field(default="auto")
    kv_key_offsets: KeyOffsets = attrs.field(default=None, converter=key_offsets.converter,
                                  hash=False)  # in eq, not in the hash: a spec is hashed at every jit call
    _groups: tuple[LayerGroup, ...] = attrs.field(init=False, default=(), eq=False, repr=False, hash=False)
    _layer_bytes: tuple[int, ...] = attrs.field(init=False, default=(), eq=False, repr=False, hash=False)

    def __init__(self, *args: Never, **fields: Unpack[CacheSpecFields]) -> None:
        """Keyword fields only (see the class docstring); unknown or positional ones are a `SpecError`
        (and, to a type checker, an error: `paged_kv.spec.spec_types.CacheSpecFields`)."""
        if args:
            raise SpecError(f"CacheSpec takes keyword fields only; got positional {args!r}")
        known = {a.name for a in attrs.fields(type(self)) if a.init}
        unknown = sorted(set(fields) - known)
        if unknown:
            raise SpecError(f"CacheSpec has no field(s) {unknown}; known fields: {sorted(known)}")
        missing = sorted(a.name for a in attrs.fields(type(self))
                         if a.init and a.default is attrs.NOTHING and a.name not in fields)
        if missing:
            raise SpecError(f"CacheSpec needs field(s) {missing}")
        self.__attrs_init__(**fields)

    def __attrs_post_init__(self) -> None:
        if self.num_blocks < 2:
            raise SpecError(f"num_blocks={self.num_blocks} leaves no usable block (block 0 is the null block)")
        if self.num_blocks * self.block_size >= 2**31:
            raise SpecError(
                f"num_blocks={self.num_blocks} x block_size={self.block_size} token slots overflow the int32 "
                "slot mapping; use fewer, larger blocks"
            )
        if self.max_blocks_per_seq > self.num_blocks - 1:
            raise SpecError(
                f"max_blocks_per_seq={self.max_blocks_per_seq} exceeds the {self.num_blocks - 1} "
                f"usable blocks of num_blocks={self.num_blocks}"
            )
        self._check_sliding()
        self._check_chunked()
        # Before the groups, whose per-layer tuples are the first host structures built.
        fields.check_host_bytes(
            fields.spec_host_bytes(self),
            f"num_layers={self.num_layers}, num_blocks={self.num_blocks}, max_batch_slots={self.max_batch_slots} "
            f"and max_blocks_per_seq={self.max_blocks_per_seq} (the allocator's tables and the cache's "
            "per-layer objects, pages not counted)",
            hint="check these fields for a typo, or size the pool with CacheSpec.for_memory(bytes, ...)")
        object.__setattr__(self, "_groups", self._make_groups())
        self._check_format()
        if self.pool_bytes > fields.MAX_POOL_BYTES:
            raise SpecError(
                f"this spec's pages take {self.pool_bytes:,} bytes ({self.pool_bytes / 2**40:,.1f} TiB), more than any "
                f"accelerator holds (limit {fields.MAX_POOL_BYTES / 2**40:.0f} TiB): check num_kv_heads/head_dim/num_blocks, "
                "or size the pool with CacheSpec.for_memory(bytes, ...)"
            )

    def _check_indices(self, name: str) -> tuple[int, ...]:
        layers: tuple[int, ...] = getattr(self, name)
        if any(isinstance(x, bool) or not isinstance(x, (int, np.integer)) for x in layers):
            raise SpecError(f"{name}={layers!r} must be layer indices")
        if len(set(layers)) != len(layers) or any(not 0 <= x < self.num_layers for x in layers):
            raise SpecError(f"{name}={layers!r} must be distinct indices in [0, {self.num_layers})")
        return layers

    def _check_pool_size(self, name: str, kind: str, layers: tuple[int, ...]) -> None:
        value = getattr(self, name)
        if value is not None:
            if not layers:
                raise SpecError(f"{name}={value} given but no layer is {kind}")
            if value < 2 or value * self.block_size >= 2**31:
                raise SpecError(f"{name}={value} must be in [2, 2**31 / block_size)")

    def _check_sliding(self) -> None:
        layers = self._check_indices("sliding_layers")
        if layers and self.sliding_window is None:
            raise SpecError(f"sliding_layers={layers!r} given without sliding_window")
        if self.sliding_window is not None and not layers:
            raise SpecError(f"sliding_window={self.sliding_window} given but sliding_layers is empty")
        if self.sliding_window is not None and self.sliding_window < self.block_size:
            raise SpecError(
                f"sliding_window={self.sliding_window} is smaller than block_size={self.block_size}; "
                "a window must span at least one block"
            )
        self._check_pool_size("sliding_num_blocks", "sliding", layers)
        object.__setattr__(self, "sliding_layers", tuple(sorted(int(x) for x in layers)))

    def _check_chunked(self) -> None:
        # Any chunk size >= 1 is accepted (unlike a window, which must span a block):
        # a chunk smaller than a block only means one block holds several chunk edges,
        # and the group keeps the block holding the current chunk's first position.
        layers = self._check_indices("chunked_layers")
        chunk = self.attention_chunk_size
        if layers and chunk is None:
            raise SpecError(f"chunked_layers={layers!r} given without attention_chunk_size")
        if chunk is not None and not layers:
            raise SpecError(f"attention_chunk_size={chunk} given but chunked_layers is empty")
        both = sorted(set(layers) & set(self.sliding_layers))
        if both:
            raise SpecError(
                f"layers {both} are in both sliding_layers and chunked_layers; a layer has one attention kind: "
                "drop them from one of the two"
            )
        self._check_pool_size("chunked_num_blocks", "chunked", layers)
        object.__setattr__(self, "chunked_layers", tuple(sorted(int(x) for x in layers)))

    def _check_format(self) -> None:
        formats.check_format(self)
        # Set once, here, while the spec is built (like the sorted layer indices above).
        object.__setattr__(self, "kv_full_precision_layers", formats.full_precision_layers(self))
        formats.check_values(self)
        # Per-layer bytes per token, once: the simulator asks for group sizes every step.
        object.__setattr__(self, "_layer_bytes", tuple(formats.bytes_per_token(self, self.layer_format(i))
                                                        for i in range(self.num_layers)))

    # ---- layer groups ------------------------------------------------------------------
    @property
    def groups(self) -> tuple["LayerGroup", ...]:
        """Layers that share block tables: full-attention layers first (if any), then the
        sliding-window layers (if any), then the chunked layers (if any). Each group has
        its own pool of blocks and page table."""
        return self._groups

    def _make_groups(self) -> tuple["LayerGroup", ...]:
        local = set(self.sliding_layers) | set(self.chunked_layers)
        full = tuple(i for i in range(self.num_layers) if i not in local)
        out = []
        if full:
            out.append(LayerGroup(layers=full, window=None, num_blocks=self.num_blocks))
        if self.sliding_layers:
            out.append(LayerGroup(layers=self.sliding_layers, window=self.sliding_window,
                                  num_blocks=self.sliding_num_blocks or self.num_blocks))
        if self.chunked_layers:
            out.append(LayerGroup(layers=self.chunked_layers, window=None, chunk=self.attention_chunk_size,
                                  num_blocks=self.chunked_num_blocks or self.num_blocks))
        return tuple(out)

    def group_of(self, layer: int) -> int:
        """Index into `groups` (and into `StepMetadata.groups`) of ``layer``'s group."""
        for g, group in enumerate(self.groups):
            if layer in group.layers:
                return g
        raise SpecError(f"layer={layer} out of range for num_layers={self.num_layers}")

    def window_blocks(self, num_new_tokens: int = 1) -> int:
        """Most blocks a sliding layer holds per sequence while writing ``num_new_tokens``:
        ceil(W / block_size) + 1 for decode."""
        if self.sliding_window is None:
            raise SpecError("window_blocks() asked of a spec with no sliding layers")
        num_new_tokens = fields.count(num_new_tokens, "num_new_tokens")
        return -(-(self.sliding_window - 1 + num_new_tokens) // self.block_size) + 1

    # ---- memory arithmetic ------------------------------------------------------
    @property
    def itemsize(self) -> int:
        """Bytes of one key or value element in ``dtype``."""
        return np.dtype(resolve_dtype(self.dtype)).itemsize

    @property
    def bytes_per_token_per_layer(self) -> int:
        """Key and value bytes (scales included) one token occupies in one layer stored in
        ``kv_format``; a layer in ``kv_full_precision_layers`` costs `layer_bytes_per_token`."""
        return self._format_bytes_per_token(self.kv_format)

    def layer_bytes_per_token(self, layer: int) -> int:
        """Key and value bytes, scales included, one token occupies in layer ``layer``."""
        self.layer_format(layer)  # checks the index
        return self._layer_bytes[layer]

    def _format_bytes_per_token(self, fmt: str) -> int:
        return formats.bytes_per_token(self, fmt)

    def layer_format(self, layer: int) -> str:
        """How layer ``layer``'s pages are stored: ``"none"`` (``dtype``), ``"int8"`` or ``"fp8"``."""
        if not (isinstance(layer, (int, np.integer)) and 0 <= layer < self.num_layers):
            raise SpecError(f"layer={layer!r} out of range for num_layers={self.num_layers}")
        return "none" if layer in self.kv_full_precision_layers else self.kv_format

    @property
    def bytes_per_token(self) -> int:
        """Key and value bytes (scales included) one token occupies across all layers."""
        return sum(self._layer_bytes)

    @property
    def bytes_per_block(self) -> int:
        """Bytes of one block of ``block_size`` tokens across all layers."""
        return self.bytes_per_token * self.block_size

    @property
    def pool_bytes(self) -> int:
        """Device bytes of every group's pages, null blocks included."""
        return sum(self.group_bytes_per_block(g) * grp.num_blocks for g, grp in enumerate(self.groups))

    @property
    def binding_bytes(self) -> int:
        """Device bytes of the binding arrays beside the pages (`paged_kv.binding`): per
        layer, an int32 generation per block of its group and an int32 owner."""
        return sum(4 * self.groups[self.group_of(i)].num_blocks + 4 for i in range(self.num_layers))

    @property
    def device_bytes(self) -> int:
        """Everything `PagedKVCache.init` allocates: `pool_bytes` + `binding_bytes`."""
        return self.pool_bytes + self.binding_bytes

    def group_bytes_per_block(self, group: int) -> int:
        """Bytes one block of ``group`` holds across that group's layers, scales included."""
        return sum(self._layer_bytes[i] for i in self.groups[group].layers) * self.block_size

    @property
    def usable_blocks(self) -> int:
        """Blocks sequences can hold: ``num_blocks`` less the null block."""
        return self.num_blocks - 1

    @property
    def max_seq_len(self) -> int:
        """Most tokens one sequence may hold: ``max_blocks_per_seq * block_size``."""
        return self.max_blocks_per_seq * self.block_size

    def blocks_for(self, num_tokens: int) -> int:
        """Blocks needed to hold ``num_tokens`` tokens of one sequence."""
        return -(-fields.count(num_tokens, "num_tokens") // self.block_size)

    def pool_signature(self) -> tuple[int, tuple[tuple[int, int | None, int | None], ...]]:
        """What step metadata must have been built for to address these pages: the
        block size and each group's block count, window and chunk. Views refuse metadata
        whose signature differs (a write would be dropped, a read undefined off CPU; a
        chunk or window the tables were not trimmed for would read freed blocks)."""
        return (self.block_size, tuple((g.num_blocks, g.window, g.chunk) for g in self.groups))

    @classmethod
    def for_memory(cls, pool_bytes: float | np.integer[Any] | np.floating[Any],
                   **fields: Unpack[MemoryFields]) -> CacheSpec:
        """A spec whose pool fits in ``pool_bytes`` (pages and binding arrays: `device_bytes`):
        ``num_blocks`` is derived, the rest given."""
        if isinstance(pool_bytes, bool) or not isinstance(pool_bytes, (int, np.integer, float, np.floating)) \
                or (isinstance(pool_bytes, (float, np.floating)) and not np.isfinite(pool_bytes)) or pool_bytes <= 0:
            raise SpecError(f"pool_bytes={pool_bytes!r} must be a positive finite number of bytes, e.g. 16 * 2**30")
        if "num_blocks" in fields:
            raise SpecError("for_memory derives num_blocks from pool_bytes; do not pass num_blocks")
        given: dict[str, Any] = dict(fields)  # checked by the signature; the keys are picked below
        probe = cls(num_blocks=2, max_blocks_per_seq=1, **{k: v for k, v in given.items() if k != "max_blocks_per_seq"})
        # Each block also costs an int32 generation per layer (`binding_bytes`), each layer an owner.
        per_block = probe.bytes_per_block + 4 * probe.num_layers
        num_blocks = (int(pool_bytes) - 4 * probe.num_layers) // per_block
        if num_blocks < 2:
            raise SpecError(f"pool_bytes={pool_bytes} holds {num_blocks} blocks of {per_block} bytes; need >= 2")
        max_blocks = given.pop("max_blocks_per_seq", num_blocks - 1)
        return cls(num_blocks=num_blocks, max_blocks_per_seq=min(max_blocks, num_blocks - 1), **given)

    def describe(self) -> str:
        """One line: layers (and their local-attention kinds), blocks, heads, dtype, bytes
        per block and of the pool."""
        kinds = "".join(f", {len(layers)} {what}" for layers, what in (
            (self.sliding_layers, f"sliding (window {self.sliding_window})"),
            (self.chunked_layers, f"chunked (chunk {self.attention_chunk_size})")) if layers)
        return (
            f"{self.num_layers} layers{kinds} x {self.num_blocks} blocks x {self.block_size} tokens, "
            f"K {self.key_heads}x{self.key_dim} V {self.value_heads}x{self.value_dim} {self.dtype}"
            f"{'' if self.kv_format == 'none' else ' in ' + self.kv_format + ' pages' + self._rotation_note()}: "
            f"{self.bytes_per_block / 2**10:.1f} KiB/block, {self.pool_bytes / 2**20:.1f} MiB pool"
        )

    def _rotation_note(self) -> str:
        blocks = formats.rotation_blocks(self)
        return f" (Hadamard-rotated, blocks K {blocks[0]} V {blocks[1]})" if max(blocks) > 1 else " (not rotated)"


def spec_difference(a: CacheSpec, b: CacheSpec, a_name: str, b_name: str) -> str:
    """``"a_name vs b_name: field=x vs y, ..."`` for every constructor field that differs."""
    fa, fb = (attrs.asdict(s, filter=lambda f, _: f.init) for s in (a, b))
    diffs = [f"{k}={fa[k]!r} vs {fb[k]!r}" for k in fa if fa[k] != fb[k]]
    return f"{a_name} vs {b_name}: {', '.join(diffs) or 'equal fields'}"


def require_same_spec(a: object, b: object, a_name: str, b_name: str, error: type[Exception] = SpecError) -> None:
    """Raise ``error`` unless ``a`` and ``b`` (specs, or objects with a ``spec``) are equal specs.

    The one agreement check between a manager and the pages it addresses (insert_prefill,
    swap, checkpoints): a table built for other pages writes into blocks that do not
    exist there or reads another layout. The message names every field that differs."""
    sa, sb = (x if isinstance(x, CacheSpec) else getattr(x, "spec", None) for x in (a, b))
    for name, s in ((a_name, sa), (b_name, sb)):
        if not isinstance(s, CacheSpec):
            raise error(f"the {name} has no CacheSpec (got {type(s).__name__}); pass the object paged_kv built")
    if sa != sb:
        assert isinstance(sa, CacheSpec) and isinstance(sb, CacheSpec)  # checked above; for the type checker
        raise error(f"the {a_name} and the {b_name} were built for different specs "
                    f"({spec_difference(sa, sb, a_name, b_name)}); build both from one CacheSpec")


__all__ = ["CacheSpec", "NULL_BLOCK", "require_same_spec", "spec_difference"]
