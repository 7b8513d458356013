"""Quantized pages: the device codecs of int8 with per-token, per-head scales, and fp8 with
fixed per-head scales. Their spec rules and bytes per token are the spec's
(`paged_kv.spec.formats`); this module imports the spec, never the reverse.

A layer's keys and values may be stored narrower than the compute dtype (the
spec's ``dtype``), which roughly doubles the tokens a pool holds:

- ``"int8"``: each token's head vector is divided by its own absmax scale
  ``s = max|x| / 127`` and rounded to int8, the convention of JAX's Pallas
  ``paged_attention`` (a scale per token and head stored beside the page). The scale
  is stored in ``kv_scale_dtype`` (float32: 4 bytes per token and head; bfloat16: 2),
  in a scale array ``[num_blocks, block_size, heads]`` that is one more leaf of the
  layer view's pytree, under the same block ids as the pages. So everything that
  moves pages (swap, prefill insertion, copy-on-write, checkpoints, sharding over
  heads, the zeroing past each length) moves the scales with no code of its own.
  Error per element: at most ``s / 2``, an outlier channel only coarsens its own
  token's head, never a neighbour's.
- ``"fp8"``: ``float8_e4m3fn`` of ``x / s_h`` with a scale fixed per layer, K or V,
  and head (``CacheSpec.kv_fp8_scales``; one float: per-tensor; default 1.0). Why
  fixed and not a running max: a scale that grows after tokens were written would
  silently re-scale (corrupt) every earlier token of that head, and rewriting them
  costs O(pool). Why not per token like int8: e4m3's relative error (<= 2**-4 of the
  value) does not depend on the scale; the scale only places the value range
  ``[2**-6 s, 448 s]``, 15 binades wide, which a calibrated per-head scale covers,
  so a per-token scale would spend bytes (3 % of the page) for no precision. Values
  beyond ``448 s`` saturate (they are clipped, never turned into NaN).

Rotation (``CacheSpec.kv_rotation``, QuaRot/SpinQuant style): before quantizing, each
key (value) head vector is multiplied by a normalized Hadamard matrix ``H`` (``D x D``,
block-diagonal with blocks of the largest power of two dividing ``D``, the same for
every layer and head). ``H`` is orthogonal, so attention can run in the rotated basis
as is: ``(q H) . (k H) = q . k``, and the output of attention over rotated values is
the rotated output, un-rotated by one more ``H`` (``H`` is symmetric: ``H H = I``).
Only the write, the query, the attention output and the gathered reads see ``H``;
pages are still just bytes to everything that moves them. Why: a few key channels
10-50x the rest (real LLM keys) make per-token absmax spend int8's range on them and
round every other channel coarsely; ``H`` spreads each outlier over all channels of
its block, so the scale tracks the head's norm, not its largest channel (and fp8
saturates and underflows less). Rounding error stays per token and head, bounded in
L2: ``||decode(x) - x||_2 = ||decode'(x H) - x H||_2`` (``H`` preserves norms). The
transform is a float32 matmul at ``Precision.HIGHEST`` with each block of ``H``.

Key offsets (``CacheSpec.kv_key_offsets``, `paged_kv.spec.key_offsets`): a layer's key
codec may subtract a calibrated per-head vector ``mu`` before rotating, and adds ``mu H``
(`stored_offsets`) back when dequantizing, so rounding is relative to what varies from token to token.

Pages of a quantized layer are stored as ``uint8`` bits and int8 scales as unsigned
ints of their width, for the same reason every page is stored as unsigned bits
(`paged_kv.spec.storage_dtype`): XLA on CPU scatters floats out of place.

`PageCodec` is the whole contract between the formats and the views: ``encode`` a
step's keys (or values) into page bits and scale bits, ``decode`` gathered bits and
scales back to the compute dtype (dequantizing and un-rotating in float32), or
``dequantize`` them into the stored (rotated) basis in float32, what the in-place
attention folds in after ``rotate``-ing the query. Views call it in ``write_slots``
and on whatever they gathered (`PagedLayerView.decode_gathered`), so an attention
kernel that gathers chunks of pages itself decodes them the same way.
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING, Any

import attrs
import ml_dtypes
import numpy as np

from paged_kv.errors import SpecError
from paged_kv.spec import bits_dtype, key_offsets, storage_dtype
from paged_kv.spec import resolve_dtype as _resolve  # dtype names (ml_dtypes or numpy), resolved one way everywhere
from paged_kv.spec.formats import (  # the spec's rules the codecs are built from; re-exported
    FORMATS,
    MIN_ROTATION_BLOCK,
    ROTATIONS,
    fp8_head_scales,
    rotation_block,
    rotation_blocks,
)

if TYPE_CHECKING:
    import jax
    from jax.typing import DTypeLike

    from paged_kv.spec import CacheSpec
    from paged_kv.spec.spec_types import LayerKeyOffsets

# JAX is imported inside the device functions: importing the codecs (the views, swap and
# checkpoints do) must not import JAX before a device function runs.

INT8_MAX = 127
FP8 = ml_dtypes.float8_e4m3fn
FP8_MAX = float(ml_dtypes.finfo(FP8).max)  # type: ignore[no-untyped-call]  # 448 (ml_dtypes' finfo is unannotated)
FP8_MIN_NORMAL = float(ml_dtypes.finfo(FP8).smallest_normal)  # type: ignore[no-untyped-call]  # 2**-6


# ---- pure functions ----------------------------------------------------------------------
def quantize_int8(x: jax.Array, scale_dtype: DTypeLike | None = None) -> tuple[jax.Array, jax.Array]:
    """``x [..., D]`` -> (int8 ``[..., D]``, scale ``[...]`` in ``scale_dtype``) with
    ``x ~= q * scale`` and ``scale = max|x| / 127`` over the last axis.

    The int8 values are computed against the scale as stored (rounded to
    ``scale_dtype``), so ``|x - q * scale| <= scale / 2`` holds for the stored scale; an
    all-zero vector gets scale 0 and q 0."""
    import jax.numpy as jnp

    scale_dtype = jnp.float32 if scale_dtype is None else scale_dtype
    xf = x.astype(jnp.float32)
    scale = (jnp.max(jnp.abs(xf), axis=-1) / INT8_MAX).astype(scale_dtype)
    sf = scale.astype(jnp.float32)[..., None]
    safe = jnp.where(sf > 0, sf, 1.0)
    q = jnp.clip(jnp.round(xf / safe), -INT8_MAX, INT8_MAX)
    return jnp.where(sf > 0, q, 0).astype(jnp.int8), scale


def dequantize_int8(q: jax.Array, scale: jax.Array, dtype: DTypeLike) -> jax.Array:
    """``q [..., D]`` int8 times ``scale [...]``, in float32, returned in ``dtype``."""
    import jax.numpy as jnp

    return (q.astype(jnp.float32) * scale.astype(jnp.float32)[..., None]).astype(dtype)


def quantize_fp8(x: jax.Array, head_scale: jax.Array) -> jax.Array:
    """``x [..., H, D]`` -> float8_e4m3fn of ``x / head_scale[h]``, saturated at +-448."""
    import jax.numpy as jnp

    y = x.astype(jnp.float32) / head_scale.astype(jnp.float32)[:, None]
    return jnp.clip(y, -FP8_MAX, FP8_MAX).astype(FP8)


def dequantize_fp8(q: jax.Array, head_scale: jax.Array, dtype: DTypeLike) -> jax.Array:
    """float8 ``q [..., H, D]`` times ``head_scale[h]``, in float32, returned in ``dtype``
    (converted by `fp8_bits_to_float32`)."""
    import jax.numpy as jnp
    from jax import lax

    x = fp8_bits_to_float32(lax.bitcast_convert_type(q, jnp.uint8))
    return (x * head_scale.astype(jnp.float32)[:, None]).astype(dtype)


def fp8_bits_to_float32(bits: jax.Array) -> jax.Array:
    """``float8_e4m3fn`` bits (uint8) -> float32, exactly ``bits.view(e4m3).astype(f32)``.

    On CPU this is integer arithmetic, because XLA's CPU convert from e4m3 runs about 3x
    slower than these few element-wise ops, and in-place attention dequantizes every
    page it reads each step. A normal code ``s eeee mmm`` is the float32 with mantissa
    ``mmm`` and exponent ``eeee - 7 + 127`` (``+120``); a subnormal (``eeee = 0``) is
    ``mmm * 2**-9``; ``x1111111`` is NaN (never written: writes saturate at +-448, but
    a page that was never written may hold anything, and NaN must stay NaN there).
    Elsewhere the native convert is used (GPUs and TPUs convert e4m3 in hardware)."""
    import jax
    import jax.numpy as jnp
    from jax import lax

    if jax.default_backend() != "cpu":
        return lax.bitcast_convert_type(bits, FP8).astype(jnp.float32)
    b = bits.astype(jnp.int32)
    magnitude, sign = b & 0x7F, (b & 0x80) << 24
    normal = lax.bitcast_convert_type(((magnitude << 20) + (120 << 23)) | sign, jnp.float32)
    subnormal = lax.bitcast_convert_type(sign | 0x3B000000, jnp.float32) * (b & 7).astype(jnp.float32)  # +-2**-9 m
    value = jnp.where(magnitude < 8, subnormal, normal)
    return jnp.where(magnitude == 0x7F, jnp.float32(np.nan), value)


@functools.lru_cache(maxsize=None)
def hadamard_matrix(block: int) -> np.ndarray:
    """The normalized Sylvester Hadamard matrix of a power-of-two ``block``, float32:
    ``H[i, j] = (-1) ** popcount(i & j) / sqrt(block)``; symmetric and orthogonal."""
    if block < 1 or block & (block - 1):
        raise SpecError(f"a Hadamard block must be a power of two; got {block}")
    h = np.ones((1, 1))
    while h.shape[0] < block:
        h = np.kron(np.array([[1.0, 1.0], [1.0, -1.0]]), h)
    out: np.ndarray = (h / np.sqrt(block)).astype(np.float32)
    out.flags.writeable = False
    return out


def hadamard_transform(x: jax.Array, block: int) -> jax.Array:
    """``x [..., D]`` times the block-diagonal matrix whose ``D / block`` blocks are
    `hadamard_matrix(block)` (``block`` a power of two dividing ``D``), in float32.

    Symmetric and orthogonal, so applying it twice returns ``x`` (to float32 rounding).
    A matmul at ``Precision.HIGHEST``: float32 products on every backend (TPU's
    default would round ``x`` to bfloat16 first); on CPU it measured ~2-3x faster
    than a ``D log D`` add/subtract butterfly, which XLA does not fuse."""
    import jax.numpy as jnp
    from jax import lax

    *lead, d = x.shape
    blocks = x.astype(jnp.float32).reshape(*lead, d // block, block)
    out = jnp.einsum("...nb,bc->...nc", blocks, jnp.asarray(hadamard_matrix(block)), precision=lax.Precision.HIGHEST)
    return out.reshape(*lead, d)


@functools.lru_cache(maxsize=256)
def stored_offsets(offsets: LayerKeyOffsets, rotation_block: int) -> np.ndarray:
    """Key ``offsets`` (``heads x dim`` nested tuples, `paged_kv.spec.key_offsets`) as
    float32 ``[heads, dim]`` in the basis the pages are stored in (times the Hadamard
    matrix when the codec rotates): what a read adds back to the dequantized keys before
    un-rotating them. Cached: a codec asks at every trace."""
    mu = np.asarray(offsets, dtype=np.float64)
    if rotation_block > 1:
        h = hadamard_matrix(rotation_block).astype(np.float64)
        heads, dim = mu.shape
        mu = (mu.reshape(heads, dim // rotation_block, rotation_block) @ h).reshape(heads, dim)
    return mu.astype(np.float32)


def _bits(dtype: DTypeLike) -> np.dtype:
    return np.dtype(f"uint{8 * np.dtype(dtype).itemsize}")


# ---- one layer's keys or values ----------------------------------------------------------
@attrs.frozen
class PageCodec:
    """How one layer's keys (or values) are stored; static (hashable), used under jit.

    ``fmt``: "none", "int8" or "fp8"; ``compute``: the dtype keys and values have
    outside the pages; ``scale_dtype``: int8's stored scale dtype; ``head_scales``:
    fp8's fixed per-head scales; ``rotation_block``: the Hadamard block the head
    vectors are rotated by before quantizing (1: not rotated)."""

    fmt: str
    compute: str
    scale_dtype: str | None = None
    head_scales: tuple[float, ...] | None = None
    float_pages: bool = False
    """Full precision only: pages hold the compute dtype itself (``page_storage="float"``)."""
    rotation_block: int = 1
    offset: LayerKeyOffsets | None = None
    """Keys only: ``heads x dim`` floats every token holds (`paged_kv.spec.key_offsets`):
    pages hold ``x - offset``, and reads add it back."""

    @property
    def compute_dtype(self) -> np.dtype[Any] | type[np.generic]:
        """The dtype keys and values are encoded from and decoded to."""
        return _resolve(self.compute)

    @property
    def rotated(self) -> bool:
        """True when the pages hold ``x H`` (see the module doc), not ``x``."""
        return self.rotation_block > 1

    @property
    def page_storage(self) -> np.dtype:
        """Dtype of the page array's elements: unsigned bits (uint8 when quantized), or
        the compute dtype for full-precision ``page_storage="float"`` pages."""
        if self.fmt != "none":
            return np.dtype(np.uint8)
        return np.dtype(self.compute_dtype) if self.float_pages else _bits(self.compute_dtype)

    @property
    def scale_storage(self) -> np.dtype | None:
        """Unsigned int dtype of the per-token scale array, or None when there is none."""
        return _bits(_resolve(self.scale_dtype)) if self.fmt == "int8" else None  # type: ignore[arg-type]  # int8: a scale dtype

    def rotate(self, x: jax.Array) -> jax.Array:
        """``x [..., D]`` into the basis the pages are stored in: ``x H`` in float32 when
        this codec rotates, else ``x`` unchanged. Attention rotates its query with the
        keys' codec so that the logits need no un-rotation."""
        return hadamard_transform(x, self.rotation_block) if self.rotated else x

    def unrotate(self, x: jax.Array) -> jax.Array:
        """Inverse of `rotate` (the same ``H``: it is symmetric and orthogonal). Attention
        un-rotates its output with the values' codec."""
        return self.rotate(x)

    def encode(self, x: jax.Array) -> tuple[jax.Array, jax.Array | None]:
        """``x [..., H, D]`` -> (page bits ``[..., H, D]``, scale bits ``[..., H]`` or None)."""
        import jax.numpy as jnp
        from jax import lax

        if self.offset is not None:
            x = x.astype(jnp.float32) - jnp.asarray(self.offset, jnp.float32)
        if self.fmt == "int8":
            # int8 codecs have a scale dtype (`codecs`), and so a scale storage.
            q, scale = quantize_int8(self.rotate(x), _resolve(self.scale_dtype))  # type: ignore[arg-type]
            return lax.bitcast_convert_type(q, jnp.uint8), lax.bitcast_convert_type(scale, self.scale_storage)  # type: ignore[arg-type]
        if self.fmt == "fp8":
            q = quantize_fp8(self.rotate(x), jnp.asarray(self.head_scales, jnp.float32))
            return lax.bitcast_convert_type(q, jnp.uint8), None
        # Bits even for float pages: the unified layout stacks them, and stacking floats
        # canonicalizes NaN payloads on CPU; the scatter casts them to the pages' dtype.
        return lax.bitcast_convert_type(x.astype(self.compute_dtype), _bits(self.compute_dtype)), None

    def dequantize(self, bits: jax.Array, scale_bits: jax.Array | None = None) -> jax.Array:
        """Page bits ``[..., H, D]`` (and scale bits ``[..., H]``) -> values in the basis they
        are stored in: float32 for a quantized layer (rotated when the codec rotates;
        not rounded to the compute dtype, what the in-place attention folds in), the
        compute dtype for a full-precision one. Zeroed bits and scales give exact zeros
        (the offset, for keys with one: `paged_kv.spec.key_offsets`)."""
        import jax.numpy as jnp
        from jax import lax

        if self.fmt == "int8":
            q = lax.bitcast_convert_type(bits, jnp.int8)
            # int8 pages come with their scales, and int8 codecs have a scale dtype.
            x = dequantize_int8(q, lax.bitcast_convert_type(scale_bits, _resolve(self.scale_dtype)), jnp.float32)  # type: ignore[arg-type]
        elif self.fmt == "fp8":
            x = dequantize_fp8(lax.bitcast_convert_type(bits, FP8), jnp.asarray(self.head_scales, jnp.float32),
                               jnp.float32)
        else:
            return lax.bitcast_convert_type(bits, self.compute_dtype)
        if self.offset is not None:
            x = x + jnp.asarray(stored_offsets(self.offset, self.rotation_block))
        return x

    def decode(self, bits: jax.Array, scale_bits: jax.Array | None = None) -> jax.Array:
        """Page bits ``[..., H, D]`` (and scale bits ``[..., H]``) -> values in the compute
        dtype, un-rotated: what was written, up to the format's rounding. Zeroed bits and
        scales decode to exact zeros (to the offset, for keys with one)."""
        return self.unrotate(self.dequantize(bits, scale_bits)).astype(self.compute_dtype)


def codecs(spec: CacheSpec, layer: int) -> tuple[PageCodec, PageCodec]:
    """The key and value `PageCodec` of layer ``layer`` of ``spec``. Quantized layers always
    store unsigned bits, whatever ``page_storage`` says of full-precision ones."""
    fmt = spec.layer_format(layer)
    kr, vr = rotation_blocks(spec)
    mu = key_offsets.of_layer(spec, layer)
    if fmt == "int8":
        return (PageCodec("int8", spec.dtype, spec.kv_scale_dtype, rotation_block=kr, offset=mu),
                PageCodec("int8", spec.dtype, spec.kv_scale_dtype, rotation_block=vr))
    if fmt == "fp8":
        k, v = fp8_head_scales(spec, layer)
        return (PageCodec("fp8", spec.dtype, head_scales=k, rotation_block=kr, offset=mu),
                PageCodec("fp8", spec.dtype, head_scales=v, rotation_block=vr))
    floats = np.dtype(storage_dtype(spec)) != bits_dtype(spec)
    return PageCodec("none", spec.dtype, float_pages=floats), PageCodec("none", spec.dtype, float_pages=floats)


__all__ = [
    "FORMATS",
    "MIN_ROTATION_BLOCK",
    "PageCodec",
    "ROTATIONS",
    "codecs",
    "dequantize_fp8",
    "dequantize_int8",
    "fp8_bits_to_float32",
    "fp8_head_scales",
    "hadamard_matrix",
    "hadamard_transform",
    "quantize_fp8",
    "quantize_int8",
    "rotation_block",
    "rotation_blocks",
    "stored_offsets",
]
