"""`paged_attention`: one layer's attention over its pages, choosing the kernel.

``impl="auto"`` picks, in order: jax's TPU ``ragged_paged_attention`` when running
on a TPU with a unified, interleaved layout (its native page layout) and float
pages, for full and sliding layers (it has no chunked mask); otherwise the XLA online-softmax path (`paged_kv.attention.reference`), which
runs everywhere and is what the kernels are tested against.
"""

from __future__ import annotations

from functools import partial

import jax
from jax import lax

from paged_kv.binding import bind_step
from paged_kv.attention.layer import PagedLayer, check_attention_query
from paged_kv.attention.pallas_tpu import ragged_paged_attention_tpu
from paged_kv.attention.reference import DEFAULT_CHUNK_BLOCKS, paged_attention_xla
from paged_kv.errors import ShapeError
from paged_kv.metadata import StepMetadata
from paged_kv.spec import compute_dtype

IMPLS = ("auto", "xla", "pallas_tpu_ragged")


def paged_attention(
    query: jax.Array,
    view: PagedLayer,
    metadata: StepMetadata,
    *,
    scale: float | None = None,
    soft_cap: float | None = None,
    impl: str = "auto",
    chunk_blocks: int = DEFAULT_CHUNK_BLOCKS,
    bound: bool = False,
) -> jax.Array:
    """Attention of ``query`` ``[B, T, q_heads, key_dim]`` over layer ``view``'s pages
    (any `PagedLayer`, such as a `paged_kv.views.PagedLayerView`) for the step ``metadata`` describes; returns
    ``[B, T, q_heads, value_dim]`` in ``query.dtype``. Reads the pages in place.

    Causal inside the step's new tokens, bounded by each row's kv length, windowed for
    sliding layers, within the query's chunk for chunked layers (lengths and positions
    relative to the group's ``start``). GQA/MQA:
    query head ``h`` uses key head ``h // (q_heads // key_heads)``. ``scale`` defaults to
    ``1/sqrt(key_dim)``; ``soft_cap`` caps logits as ``cap * tanh(logit / cap)``.
    Blocks that changed hands since ``metadata`` was built, or all of another
    manager's metadata, read as the null block (`paged_kv.binding`); ``bound=True``
    skips that check for metadata a write to ``view`` has just bound (what
    `PagedLayerView.attention` passes), which it leaves unchanged.
    """
    s = view.spec
    check_attention_query(query, view, metadata)
    group = metadata.groups[view.group]
    if not bound and getattr(view, "generations", None) is not None:
        # Blocks that changed hands since the metadata was built, or metadata of another
        # manager: the null block (see `paged_kv.binding`).
        group = bind_step(view.generations, view.owner, metadata, view.group,  # type: ignore[attr-defined]  # checked above
                          s.block_size, write=False)[0]
    kv_lens = metadata.kv_lens - group.start
    chosen = _choose(view, impl)
    if chosen == "pallas_tpu_ragged":
        pages = view.kv_pages  # type: ignore[attr-defined]  # the ragged kernel's layout has them
        if pages.dtype != compute_dtype(s):
            pages = lax.bitcast_convert_type(pages, compute_dtype(s))
        return ragged_paged_attention_tpu(query, pages, group.block_tables, kv_lens, metadata.query_lens,  # type: ignore[arg-type]  # metadata arrays: numpy on the host, jax arrays under jit
                                          window=view.window, scale=scale, soft_cap=soft_cap)
    positions = metadata.positions - group.start[:, None]
    # Rotated pages (`paged_kv.quant`): logits are the same in the rotated basis, so the
    # query is rotated once and the output un-rotated once, never the keys or values.
    kc, vc = view.codecs
    out = paged_attention_xla(kc.rotate(query), partial(view.read_blocks, rotated=True), group.block_tables,  # type: ignore[arg-type]  # metadata arrays: numpy on the host, jax arrays under jit
                              kv_lens, positions, block_size=s.block_size, window=view.window, chunk=view.chunk,
                              start=group.start, scale=scale, soft_cap=soft_cap, chunk_blocks=chunk_blocks)  # type: ignore[arg-type]  # metadata arrays: numpy on the host, jax arrays under jit
    result: jax.Array = vc.unrotate(out).astype(query.dtype)
    return result


def ragged_kernel_fits(view: PagedLayer) -> bool:
    """True when ``view``'s pages are the TPU ragged kernel's layout: unified, keys and
    values interleaved by head, in full precision (quantized pages are dequantized by
    the XLA path, chunk by chunk)."""
    return (getattr(view, "interleaved", False) and hasattr(view, "kv_pages")
            and view.spec.layer_format(view.layer_index) == "none")


def _choose(view: PagedLayer, impl: str) -> str:
    if impl not in IMPLS:
        raise ShapeError(f"impl={impl!r} is not one of {IMPLS}")
    if impl == "auto":
        # The ragged kernel knows windows, not chunks: chunked layers take the XLA path.
        # Nor is it chosen for pages stored as unsigned-int bits: it would bit-cast the
        # whole pool every layer and step, which XLA may copy (O(pool) on the hot path).
        on_tpu = jax.default_backend() == "tpu"
        fits = ragged_kernel_fits(view) and view.chunk is None and view.codecs[0].float_pages
        return "pallas_tpu_ragged" if on_tpu and fits else "xla"
    if impl != "xla" and view.chunk is not None:
        raise ShapeError(
            f"impl={impl!r} has no chunked local attention; layer {view.layer_index} is chunked "
            f"(attention_chunk_size={view.chunk}): use impl='xla' or 'auto'"
        )
    if impl == "pallas_tpu_ragged" and not ragged_kernel_fits(view):
        raise ShapeError(
            f"impl='pallas_tpu_ragged' needs a unified, interleaved, full-precision layout; layer {view.layer_index} is "
            f"{type(view).__name__} (use PagedKVCache.init(spec, layout='unified') with key/value shapes equal and kv_format='none')"
        )
    return impl


__all__ = ["IMPLS", "paged_attention", "ragged_kernel_fits"]
