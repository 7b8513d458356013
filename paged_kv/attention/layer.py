"""What attention needs of a layer's pages: `PagedLayer`, a structural protocol.

The views (`paged_kv.views`) call attention; attention never imports them. Any object
with these attributes can be attended over: `paged_kv.views.PagedLayerView` and its
layouts are the ones paged_kv builds. `check_attention_query` lives here so that both
the views (before a write) and `paged_attention` (before a read) run it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Protocol

from paged_kv.errors import ShapeError

if TYPE_CHECKING:  # annotations only
    import jax

    from paged_kv.metadata import StepMetadata
    from paged_kv.quant import PageCodec
    from paged_kv.spec import CacheSpec


class PagedLayer(Protocol):
    """One layer's pages as attention reads them.

    Optional, for the TPU ragged kernel (`paged_kv.attention.ragged_kernel_fits`):
    ``interleaved`` (keys and values interleaved by head in one page tensor) and
    ``kv_pages`` (that tensor)."""

    spec: CacheSpec
    layer_index: int

    @property
    def group(self) -> int:
        """Index of the layer's group in ``spec.groups`` and ``StepMetadata.groups``."""

    @property
    def window(self) -> int | None:
        """Sliding window of the layer, or None."""

    @property
    def chunk(self) -> int | None:
        """Attention chunk of the layer, or None."""

    @property
    def codecs(self) -> tuple[PageCodec, PageCodec]:
        """The key and value codecs of the layer's pages (`paged_kv.quant.codecs`)."""

    def read_blocks(self, block_ids: jax.Array, rotated: bool = False) -> tuple[jax.Array, jax.Array]:
        """Keys and values of blocks ``block_ids`` ``[B, C]``: ``[B, C*block_size, heads, dim]`` each."""

    def check_pages(self) -> None:
        """`ShapeError` unless the pages are what the spec describes."""

    def check_metadata(self, metadata: Any) -> None:
        """`ShapeError` unless ``metadata`` is a `StepMetadata` built for these pages."""

    def check_query(self, query: Any, metadata: StepMetadata) -> None:
        """`ShapeError` unless ``query`` is a float ``[B, T, q_heads, key_dim]`` for this step."""


def check_attention_query(query: jax.Array, view: PagedLayer, metadata: StepMetadata) -> None:
    """Raise `ShapeError` unless ``metadata`` was built for ``view``'s pages and ``query``
    is a float ``[B, T, q_heads, key_dim]`` for this step, with ``q_heads`` a multiple of
    the key and value heads, and ``view``'s own pages are what its spec describes
    (`check_pages`). Static: under jit it raises at trace time, before any write."""
    view.check_pages()
    view.check_metadata(metadata)
    view.check_query(query, metadata)
    heads = view.spec.value_heads
    if query.shape[2] % heads:
        raise ShapeError(
            f"layer {view.layer_index}: query has {query.shape[2]} heads; expected a multiple of the {heads} value heads"
        )


__all__ = ["PagedLayer", "check_attention_query"]
