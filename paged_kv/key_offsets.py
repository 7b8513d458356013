"""Calibrated key offsets for quantized pages (``CacheSpec.kv_key_offsets``): the public
entry point, ``paged_kv.key_offsets.calibrate(sample_keys)``.

What the offsets are and why: `paged_kv.spec.key_offsets` (with the field's conversion and
rules). The offset a read adds back, in the basis the pages are stored in:
`paged_kv.quant.stored_offsets`.
"""

from paged_kv.spec.key_offsets import calibrate

__all__ = ["calibrate"]
