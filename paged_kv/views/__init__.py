"""Device views of the pages that a model's attention layer calls each step."""

from paged_kv.views.mask import AttentionMask
from paged_kv.views.sliding import SlidingWindowCacheView
from paged_kv.views.transformer import TransformerCacheView

__all__ = ["AttentionMask", "SlidingWindowCacheView", "TransformerCacheView"]
