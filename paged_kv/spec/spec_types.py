"""Types of the spec for a type checker: what `CacheSpec`'s constructor takes
(`CacheSpecFields`, so ``CacheSpec(**fields)`` with a misspelt field or a wrong type is
a type error), and the read-only fields the spec's helpers read (`SpecFields`, which
`CacheSpec` satisfies; the helpers cannot import `CacheSpec`, whose module imports them).

Nothing here runs on the spec's path: modules import it under ``TYPE_CHECKING``.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, Protocol, TypedDict, Union

import numpy as np

Count = Union[int, np.integer[Any]]
"""A count a field accepts: a Python or numpy integer (stored as a Python int)."""

Indices = Iterable[Union[int, np.integer[Any]]]
"""Layer indices a field accepts: any collection of integers (stored as a sorted tuple)."""

DTypeLike = Union[str, np.dtype[Any], type[Any]]
"""A dtype a field accepts: a name (``"bfloat16"``), a numpy dtype or a scalar type."""

FP8Scale = Union[float, tuple[float, ...]]
"""One fp8 scale of a layer's keys or values: per tensor, or one per head."""

FP8Scales = Union[float, tuple[tuple[FP8Scale, FP8Scale], ...], None]
"""``kv_fp8_scales`` once built: None (1.0), one float, or per layer a (key, value) pair."""

LayerKeyOffsets = tuple[tuple[float, ...], ...]
"""One layer's key offsets: ``key_heads x key_dim`` floats."""

KeyOffsets = Union[tuple[Union[LayerKeyOffsets, None], ...], None]
"""``kv_key_offsets`` once built: None, or per layer None or `LayerKeyOffsets`."""


class _ShapeFields(TypedDict):
    num_layers: Count
    block_size: Count


class _OptionalFields(TypedDict, total=False):
    max_batch_slots: Count
    dtype: DTypeLike
    num_kv_heads: Count | None
    head_dim: Count | None
    key_heads: Count | None
    value_heads: Count | None
    key_dim: Count | None
    value_dim: Count | None
    sliding_window: Count | None
    sliding_layers: Indices
    sliding_num_blocks: Count | None
    attention_chunk_size: Count | None
    chunked_layers: Indices
    chunked_num_blocks: Count | None
    page_storage: str
    kv_format: str
    kv_scale_dtype: str
    kv_fp8_scales: float | Iterable[Any] | None
    kv_full_precision_layers: Indices | str
    kv_rotation: str
    kv_key_offsets: Iterable[Any] | None


class CacheSpecFields(_ShapeFields, _OptionalFields):
    """The keyword fields of ``CacheSpec(...)``: the four required ones and the optional
    rest, each with the types its converter accepts (see `CacheSpec`)."""

    num_blocks: Count
    max_blocks_per_seq: Count


class MemoryFields(_ShapeFields, _OptionalFields, total=False):
    """The fields of ``CacheSpec.for_memory(pool_bytes, ...)``: all but ``num_blocks``,
    which it derives; ``max_blocks_per_seq`` is optional there."""

    max_blocks_per_seq: Count


class SpecFields(Protocol):
    """What the spec's helpers (`paged_kv.spec.fields`, ``formats``, ``key_offsets``,
    ``dtypes``) read of a spec, as a built `CacheSpec` holds it."""

    @property
    def num_layers(self) -> int: ...
    @property
    def num_blocks(self) -> int: ...
    @property
    def block_size(self) -> int: ...
    @property
    def max_blocks_per_seq(self) -> int: ...
    @property
    def max_batch_slots(self) -> int: ...
    @property
    def dtype(self) -> str: ...
    @property
    def key_heads(self) -> int: ...
    @property
    def value_heads(self) -> int: ...
    @property
    def key_dim(self) -> int: ...
    @property
    def value_dim(self) -> int: ...
    @property
    def sliding_layers(self) -> tuple[int, ...]: ...
    @property
    def sliding_num_blocks(self) -> int | None: ...
    @property
    def chunked_layers(self) -> tuple[int, ...]: ...
    @property
    def chunked_num_blocks(self) -> int | None: ...
    @property
    def page_storage(self) -> str: ...
    @property
    def kv_format(self) -> str: ...
    @property
    def kv_scale_dtype(self) -> str: ...
    @property
    def kv_fp8_scales(self) -> FP8Scales: ...
    @property
    def kv_full_precision_layers(self) -> tuple[int, ...]: ...
    @property
    def kv_rotation(self) -> str: ...
    @property
    def kv_key_offsets(self) -> KeyOffsets: ...
    @property
    def itemsize(self) -> int: ...
    def layer_format(self, layer: int) -> str: ...


__all__ = ["CacheSpecFields", "Count", "DTypeLike", "FP8Scale", "FP8Scales", "Indices", "KeyOffsets",
           "LayerKeyOffsets", "MemoryFields", "SpecFields"]
