"""`CacheSpec`'s field converters and validators: what each field accepts, and the
canonical value it holds (ints as Python ints, collections as tuples, dtypes as names).

Converters, not validators that write back: a frozen spec's fields are set once, by
attrs, to what these return.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import attrs
import numpy as np

from paged_kv.errors import InvalidTokenCountError, SpecError

if TYPE_CHECKING:
    from paged_kv.spec.spec_types import SpecFields

MAX_POOL_BYTES = 2**47
"""128 TiB: more than any accelerator system holds. A larger pool is a typo in a head
count or dimension, refused when the spec is built rather than as an out-of-memory
error deep inside JAX when the pages are allocated."""

PAGE_STORAGE = ("auto", "bits", "float")

# ---- host memory ---------------------------------------------------------------------------
# Sizes that drive host memory (layers, blocks, batch slots, requests, tensors) are checked
# against what they would take before anything is allocated: past the machine's memory,
# the process would die or swap for hours instead of raising (issue 23 item 9). The
# per-item costs are measured upper estimates (tracemalloc), rounded up.

HOST_BYTES_PER_LAYER = 16 * 2**10
"""Host bytes one layer costs beside its pages: the spec's per-layer entries, the cache's
view object and page-array handles (about 4 KiB measured), with room for what a jitted
step keeps per layer."""

HOST_BYTES_PER_BLOCK = 256
"""Host bytes one block of a group's pool costs: free stack, reference count and
generation (12 B) and, with a prefix cache, two list entries holding 128-bit Python ints
and an index entry (about 250 B when every block is keyed)."""

HOST_BYTES_PER_TABLE_ENTRY = 12
"""Host bytes per block-table entry of a running sequence: the page table's int32, and
the step metadata and batch buffers built from it."""

FALLBACK_HOST_BYTES = 2**40
"""Host memory assumed where the machine does not say (no ``sysconf``): 1 TiB."""


@functools.lru_cache(maxsize=1)  # every spec asks; the answer does not change while a process runs
def host_memory_bytes() -> int:
    """This machine's memory: physical RAM, or the container's (cgroup) limit when lower."""
    import os

    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):
        total = FALLBACK_HOST_BYTES
    for limit_file in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            with open(limit_file) as f:
                text = f.read().strip()
        except OSError:
            continue
        if text.isdigit():
            total = min(total, int(text))
    return int(total) if total > 0 else FALLBACK_HOST_BYTES


def check_host_bytes(needed: int, what: str, error: type[Exception] = SpecError, hint: str = "") -> None:
    """``error`` when ``needed`` bytes of host memory (for ``what``) exceed the machine's."""
    have = host_memory_bytes()
    if needed > have:
        raise error(f"{what} would take about {needed / 2**30:,.1f} GiB of host memory, more than this machine's "
                    f"{have / 2**30:,.1f} GiB" + (f"; {hint}" if hint else ""))


def spec_host_bytes(spec: SpecFields) -> int:
    """Host bytes a manager, its decode slots and the cache's views of ``spec`` take beside
    the pages, with every batch slot running a longest sequence. Needs only the fields
    (not the layer groups, which are what it guards)."""
    local = len(spec.sliding_layers) + len(spec.chunked_layers)
    pools = [spec.num_blocks] if spec.num_layers > local else []
    if spec.sliding_layers:
        pools.append(spec.sliding_num_blocks or spec.num_blocks)
    if spec.chunked_layers:
        pools.append(spec.chunked_num_blocks or spec.num_blocks)
    rows = max(64, spec.max_batch_slots)  # a page table starts with 64 rows
    return (spec.num_layers * HOST_BYTES_PER_LAYER + sum(pools) * HOST_BYTES_PER_BLOCK
            + len(pools) * rows * spec.max_blocks_per_seq * HOST_BYTES_PER_TABLE_ENTRY)


def canonical_dtype(value: Any) -> str:
    """``dtype`` as the name of a float dtype of at most 32 bits, or `SpecError`."""
    import ml_dtypes  # ships with jax; knows bfloat16 and the fp8 types

    if value is None:  # np.dtype(None) is float64: never a silent default
        raise SpecError("dtype=None is not a dtype; use e.g. 'bfloat16', 'float16' or 'float32'")

    try:
        dt = np.dtype(getattr(ml_dtypes, value) if isinstance(value, str) and hasattr(ml_dtypes, value) else value)
    except TypeError as exc:
        raise SpecError(f"dtype={value!r} is not a dtype; use e.g. 'bfloat16', 'float16' or 'float32'") from exc
    if not (np.issubdtype(dt, np.floating) or dt.name in {"bfloat16"} or dt.name.startswith("float8")):
        raise SpecError(f"dtype={dt.name!r} is not a floating dtype; keys and values are floats "
                        "(dtype is the compute dtype; for int8 or fp8 pages give e.g. dtype='bfloat16', "
                        "kv_format='int8' or kv_format='fp8')")
    if dt.itemsize > 4:
        # JAX without jax_enable_x64 silently stores float64 as float32, so the pages
        # would hold half the bits `pool_bytes` counts and values would be cut.
        raise SpecError(
            f"dtype={dt.name!r}: pages hold at most 32-bit floats (JAX stores float64 as float32 unless "
            "jax_enable_x64 is set, which paged_kv does not support); use 'float32', 'bfloat16' or 'float16'"
        )
    name: str = dt.name
    return name


def count(value: object, name: str) -> int:
    """A token count as a Python int in ``[0, 2**31)``, or `InvalidTokenCountError`."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or not 0 <= value < 2**31:
        raise InvalidTokenCountError(f"{name}={value!r} must be an integer in [0, 2**31)")
    return int(value)


def positive(name: str, optional: bool = False) -> Callable[[object], int | None]:
    """A converter: field ``name`` as a Python int in ``[1, 2**31)`` (or None when ``optional``)."""

    def convert(value: object) -> int | None:
        if value is None and optional:
            return None
        # < 2**31: every count here ends up in int32 tables or slot ids, and numpy integers
        # past that would overflow silently in the spec's arithmetic.
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or not 0 < value < 2**31:
            raise SpecError(f"{name}={value!r} must be a positive integer below 2**31")
        return int(value)

    return convert


def or_shortcut(name: str, shortcut: str) -> attrs.Converter[Any, int]:
    """A converter: ``key_heads``-like field ``name`` as a positive int, given or else the
    value of the field ``shortcut`` (``num_kv_heads`` / ``head_dim``), set before it."""
    check = positive(name, optional=True)

    def convert(value: object, spec: object) -> int:
        given: int | None = check(value)
        if given is None:
            given = getattr(spec, shortcut)
            if given is None:
                raise SpecError(f"{name} is not set: give {name}= or the shortcut {shortcut}=")
        return given

    return attrs.Converter(convert, takes_self=True)


def indices(name: str) -> Callable[[object], tuple[Any, ...]]:
    """A converter: field ``name`` as a tuple; anything that is not a collection of indices
    is a `SpecError` (the indices themselves are checked against the spec's layers)."""

    def convert(value: Any) -> tuple[Any, ...]:
        if isinstance(value, (str, bytes)) or not hasattr(value, "__iter__"):
            raise SpecError(f"{name}={value!r} must be a tuple of layer indices, e.g. (1, 3)")
        return tuple(value)

    return convert


def fp8_scales(value: Any) -> Any:
    """``kv_fp8_scales`` with lists made tuples and numbers made floats (a JSON round trip
    gives lists back); its shape is checked against the spec in `paged_kv.spec.formats`."""
    if value is None or isinstance(value, (str, bytes, bool)):
        return value
    if isinstance(value, (int, float, np.integer, np.floating)):
        return float(value)
    if hasattr(value, "__iter__"):
        return tuple(fp8_scales(x) for x in value)
    return value


def full_precision(value: Any) -> Any:
    """``kv_full_precision_layers`` as a tuple (or the word "sliding", resolved in
    `paged_kv.spec.formats.full_precision_layers`)."""
    if isinstance(value, str):
        return value
    if isinstance(value, bytes) or not hasattr(value, "__iter__"):
        raise SpecError(f"kv_full_precision_layers={value!r} must be a tuple of layer indices, e.g. (0, 5), or 'sliding'")
    return tuple(value)


def page_storage(instance: object, attribute: object, value: object) -> None:
    """Validator of ``page_storage``: one of `PAGE_STORAGE`."""
    if value not in PAGE_STORAGE:
        raise SpecError(f"page_storage={value!r} is not one of {PAGE_STORAGE}")


__all__ = ["FALLBACK_HOST_BYTES", "HOST_BYTES_PER_BLOCK", "HOST_BYTES_PER_LAYER", "HOST_BYTES_PER_TABLE_ENTRY",
           "MAX_POOL_BYTES", "PAGE_STORAGE", "canonical_dtype", "check_host_bytes", "count", "fp8_scales",
           "full_precision", "host_memory_bytes", "indices", "or_shortcut", "page_storage", "positive",
           "spec_host_bytes"]
