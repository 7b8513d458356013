"""`SlidingWindowCacheView`: a layer that attends to the last ``W`` tokens only.

What differs from full attention lives in three places, each doing one thing:
- the host (`KVCacheManager`, sliding group): each append returns the blocks that
  lie wholly behind the window of the step's first query to the group's pool, so a
  decoding sequence holds at most ceil(W / block_size) + 1 blocks of this layer;
- the step metadata (`GroupMetadata`): the block table starts at the first block
  this step's queries can reach (``start``), so the gather reads O(W) tokens per
  row, not O(length), and a prefill chunk of T tokens gets the W - 1 + T it needs;
- this view: the mask carries the window, with lengths and positions relative to
  ``start``, so causal+window attention over the returned keys equals windowed
  attention over the whole history.
"""

from __future__ import annotations

import jax

from paged_kv.errors import SpecError
from paged_kv.spec import CacheSpec
from paged_kv.views.transformer import _FIELDS, TransformerCacheView


class SlidingWindowCacheView(TransformerCacheView):
    """`TransformerCacheView` of a layer in ``spec.sliding_layers``."""

    @classmethod
    def init(cls, spec: CacheSpec, layer_index: int = 0, device: jax.Device | jax.sharding.Sharding | None = None) -> "SlidingWindowCacheView":
        if layer_index not in spec.sliding_layers:
            raise SpecError(
                f"layer {layer_index} is not in sliding_layers={spec.sliding_layers}; use TransformerCacheView"
            )
        return super().init(spec, layer_index, device)


jax.tree_util.register_dataclass(SlidingWindowCacheView, data_fields=_FIELDS, meta_fields=["spec", "layer_index"])

__all__ = ["SlidingWindowCacheView"]
