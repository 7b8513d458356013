"""Device views of the pages that a model's attention layer calls each step."""

from paged_kv.views.mask import AttentionMask
from paged_kv.views.sliding import SlidingWindowCacheView
from paged_kv.views.transformer import PagedLayerView, TransformerCacheView
from paged_kv.views.unified import UnifiedCacheView

__all__ = ["AttentionMask", "PagedLayerView", "SlidingWindowCacheView", "TransformerCacheView", "UnifiedCacheView"]
