"""Quantized pages: int8 with per-token, per-head scales, and fp8 with fixed per-head scales.

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

Key offsets (``CacheSpec.kv_key_offsets``, `paged_kv.key_offsets`): a layer's key codec
may subtract a calibrated per-head vector ``mu`` before rotating, and adds ``mu H``
back when dequantizing, so rounding is relative to what varies from token to token.

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

import attrs
import ml_dtypes
import numpy as np

from paged_kv import key_offsets
from paged_kv.errors import SpecError
from paged_kv.spec import _resolve  # dtype names (ml_dtypes or numpy), resolved one way everywhere

# JAX is imported inside the device functions: building a spec (which checks the
# format and counts its bytes here) must not import JAX in a host-only process.

FORMATS = ("none", "int8", "fp8")
ROTATIONS = ("auto", "hadamard", "none")
MIN_ROTATION_BLOCK = 8
"""Fewest channels a Hadamard block may mix: smaller blocks barely spread an outlier
(its magnitude drops by sqrt(block)), so "auto" leaves such dims unrotated and an
explicit "hadamard" is refused. Every common head dim (64, 80, 96, 128, 192, 256, 576)
has a block of 16 or more."""
SCALE_DTYPES = ("float32", "bfloat16")
COMPUTE_DTYPES = ("bfloat16", "float16", "float32")
INT8_MAX = 127
FP8 = ml_dtypes.float8_e4m3fn
FP8_MAX = float(ml_dtypes.finfo(FP8).max)  # 448
FP8_MIN_NORMAL = float(ml_dtypes.finfo(FP8).smallest_normal)  # 2**-6


# ---- pure functions ----------------------------------------------------------------------
def quantize_int8(x: jax.Array, scale_dtype=None) -> tuple[jax.Array, jax.Array]:
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


def dequantize_int8(q: jax.Array, scale: jax.Array, dtype) -> jax.Array:
    """``q [..., D]`` int8 times ``scale [...]``, in float32, returned in ``dtype``."""
    import jax.numpy as jnp

    return (q.astype(jnp.float32) * scale.astype(jnp.float32)[..., None]).astype(dtype)


def quantize_fp8(x: jax.Array, head_scale: jax.Array) -> jax.Array:
    """``x [..., H, D]`` -> float8_e4m3fn of ``x / head_scale[h]``, saturated at +-448."""
    import jax.numpy as jnp

    y = x.astype(jnp.float32) / head_scale.astype(jnp.float32)[:, None]
    return jnp.clip(y, -FP8_MAX, FP8_MAX).astype(FP8)


def dequantize_fp8(q: jax.Array, head_scale: jax.Array, dtype) -> jax.Array:
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


def rotation_block(dim: int) -> int:
    """The Hadamard block for a head dim: the largest power of two dividing ``dim``
    (``dim`` itself when it is a power of two; 32 for 96; 64 for 192 and 576)."""
    return dim & -dim


@functools.lru_cache(maxsize=None)
def hadamard_matrix(block: int) -> np.ndarray:
    """The normalized Sylvester Hadamard matrix of a power-of-two ``block``, float32:
    ``H[i, j] = (-1) ** popcount(i & j) / sqrt(block)``; symmetric and orthogonal."""
    if block < 1 or block & (block - 1):
        raise SpecError(f"a Hadamard block must be a power of two; got {block}")
    h = np.ones((1, 1))
    while h.shape[0] < block:
        h = np.kron(np.array([[1.0, 1.0], [1.0, -1.0]]), h)
    out = (h / np.sqrt(block)).astype(np.float32)
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


def _bits(dtype) -> np.dtype:
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
    offset: tuple | None = None
    """Keys only: ``heads x dim`` floats every token holds (`paged_kv.key_offsets`):
    pages hold ``x - offset``, and reads add it back."""

    @property
    def compute_dtype(self) -> np.dtype:
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
        return _bits(_resolve(self.scale_dtype)) if self.fmt == "int8" else None

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
            q, scale = quantize_int8(self.rotate(x), _resolve(self.scale_dtype))
            return lax.bitcast_convert_type(q, jnp.uint8), lax.bitcast_convert_type(scale, self.scale_storage)
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
        (the offset, for keys with one: `paged_kv.key_offsets`)."""
        import jax.numpy as jnp
        from jax import lax

        if self.fmt == "int8":
            q = lax.bitcast_convert_type(bits, jnp.int8)
            x = dequantize_int8(q, lax.bitcast_convert_type(scale_bits, _resolve(self.scale_dtype)), jnp.float32)
        elif self.fmt == "fp8":
            x = dequantize_fp8(lax.bitcast_convert_type(bits, FP8), jnp.asarray(self.head_scales, jnp.float32),
                               jnp.float32)
        else:
            return lax.bitcast_convert_type(bits, self.compute_dtype)
        if self.offset is not None:
            x = x + jnp.asarray(key_offsets.stored(self.offset, self.rotation_block))
        return x

    def decode(self, bits: jax.Array, scale_bits: jax.Array | None = None) -> jax.Array:
        """Page bits ``[..., H, D]`` (and scale bits ``[..., H]``) -> values in the compute
        dtype, un-rotated: what was written, up to the format's rounding. Zeroed bits and
        scales decode to exact zeros (to the offset, for keys with one)."""
        return self.unrotate(self.dequantize(bits, scale_bits)).astype(self.compute_dtype)


def codecs(spec, layer: int) -> tuple[PageCodec, PageCodec]:
    """The key and value `PageCodec` of layer ``layer`` of ``spec``. Quantized layers always
    store unsigned bits, whatever ``page_storage`` says of full-precision ones."""
    from paged_kv.spec import bits_dtype, storage_dtype

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


def rotation_blocks(spec) -> tuple[int, int]:
    """The Hadamard blocks of ``spec``'s quantized layers, (keys, values); 1: not rotated.

    ``kv_rotation="none"``: neither; ``"hadamard"``: both (checked to be at least
    `MIN_ROTATION_BLOCK`); ``"auto"`` (the default): for a quantized ``kv_format``,
    each head dim whose block has at least `MIN_ROTATION_BLOCK` channels, else none.
    Full-precision layers are never rotated (`codecs`)."""
    if spec.kv_rotation == "none" or spec.kv_format == "none":
        return 1, 1
    blocks = (rotation_block(spec.key_dim), rotation_block(spec.value_dim))
    return tuple(b if b >= MIN_ROTATION_BLOCK else 1 for b in blocks)


def fp8_head_scales(spec, layer: int) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Layer ``layer``'s fixed fp8 scales: (one per key head, one per value head)."""
    given = spec.kv_fp8_scales
    if given is None or isinstance(given, float):
        s = 1.0 if given is None else given
        return (s,) * spec.key_heads, (s,) * spec.value_heads
    k, v = given[layer]
    return _per_head(k, spec.key_heads), _per_head(v, spec.value_heads)


def _per_head(x, heads: int) -> tuple[float, ...]:
    return (x,) * heads if isinstance(x, float) else tuple(x)


# ---- spec rules and memory arithmetic ----------------------------------------------------
def bytes_per_token(spec, fmt: str) -> int:
    """Bytes one token takes in one layer stored in ``fmt``, scales included."""
    elems = spec.key_heads * spec.key_dim + spec.value_heads * spec.value_dim
    if fmt == "none":
        return elems * spec.itemsize
    scales = (spec.key_heads + spec.value_heads) * np.dtype(_resolve(spec.kv_scale_dtype)).itemsize
    return elems + (scales if fmt == "int8" else 0)


def check_spec_format(spec) -> None:
    """Raise `SpecError` for a format field or combination that is not supported, naming
    what is; resolve ``kv_full_precision_layers="sliding"`` to the sliding layers."""
    fmt = spec.kv_format
    if fmt not in FORMATS:
        raise SpecError(f"kv_format={fmt!r} is not supported; use one of {FORMATS}")
    if spec.kv_scale_dtype not in SCALE_DTYPES:
        raise SpecError(f"kv_scale_dtype={spec.kv_scale_dtype!r} is not supported; use one of {SCALE_DTYPES}")
    if fmt != "int8" and spec.kv_scale_dtype != "float32":
        raise SpecError(f"kv_scale_dtype={spec.kv_scale_dtype!r} is for kv_format='int8' (per-token scales); "
                        f"kv_format={fmt!r} stores none")
    if fmt != "fp8" and spec.kv_fp8_scales is not None:
        raise SpecError(f"kv_fp8_scales given with kv_format={fmt!r}; they are the fixed scales of kv_format='fp8'")
    _check_rotation(spec)
    if fmt != "none" and spec.dtype not in COMPUTE_DTYPES:
        raise SpecError(f"kv_format={fmt!r} with dtype={spec.dtype!r}: dtype is the compute dtype keys and values "
                        f"are dequantized to; use one of {COMPUTE_DTYPES}")
    _resolve_full_precision(spec)
    if fmt == "fp8":
        _check_fp8_scales(spec)
    key_offsets.check(spec)


def _check_rotation(spec) -> None:
    rot = spec.kv_rotation
    if rot not in ROTATIONS:
        raise SpecError(f"kv_rotation={rot!r} is not supported; use one of {ROTATIONS}")
    if rot != "hadamard":
        return
    if spec.kv_format == "none":
        raise SpecError("kv_rotation='hadamard' given with kv_format='none': the rotation is applied to quantized "
                        "pages only (full-precision pages are exact); give kv_format='int8' or 'fp8', or drop it")
    for name in ("key_dim", "value_dim"):
        dim = getattr(spec, name)
        if rotation_block(dim) < MIN_ROTATION_BLOCK:
            raise SpecError(
                f"kv_rotation='hadamard' with {name}={dim}: its largest power-of-two block is {rotation_block(dim)} "
                f"channels, fewer than {MIN_ROTATION_BLOCK}, too few to spread an outlier channel; use "
                "kv_rotation='none' (or 'auto', which rotates only dims with a block of 8 or more)")


def _resolve_full_precision(spec) -> None:
    layers = spec.kv_full_precision_layers
    if isinstance(layers, str):
        if layers != "sliding":
            raise SpecError(f"kv_full_precision_layers={layers!r}: give layer indices, e.g. (0, 5), or 'sliding'")
        layers = spec.sliding_layers
        if not layers:
            raise SpecError("kv_full_precision_layers='sliding' but the spec has no sliding_layers")
    if any(isinstance(x, bool) or not isinstance(x, (int, np.integer)) for x in layers) \
            or len(set(layers)) != len(layers) or any(not 0 <= x < spec.num_layers for x in layers):
        raise SpecError(f"kv_full_precision_layers={layers!r} must be distinct layer indices in [0, {spec.num_layers})")
    if layers and spec.kv_format == "none":
        raise SpecError(f"kv_full_precision_layers={layers!r} given with kv_format='none': every layer is full precision")
    object.__setattr__(spec, "kv_full_precision_layers", tuple(sorted(int(x) for x in layers)))


def _check_fp8_scales(spec) -> None:
    given = spec.kv_fp8_scales
    hint = ("kv_fp8_scales must be None (1.0), one positive float (per tensor), or one (key, value) pair per layer, "
            f"each a positive float or {spec.key_heads} key / {spec.value_heads} value per-head floats")
    if given is None:
        return
    if isinstance(given, float):
        _check_scale_values((given,), hint)
        return
    if not isinstance(given, tuple) or len(given) != spec.num_layers:
        raise SpecError(f"kv_fp8_scales={given!r}: {hint} ({spec.num_layers} layers)")
    for layer, pair in enumerate(given):
        if not isinstance(pair, tuple) or len(pair) != 2:
            raise SpecError(f"kv_fp8_scales[{layer}]={pair!r} is not a (key, value) pair; {hint}")
        for x, heads in zip(pair, (spec.key_heads, spec.value_heads)):
            if not isinstance(x, float) and not (isinstance(x, tuple) and len(x) == heads):
                raise SpecError(f"kv_fp8_scales[{layer}]={pair!r}: {hint}")
            _check_scale_values(x if isinstance(x, tuple) else (x,), hint)


def _check_scale_values(values, hint: str) -> None:
    for x in values:
        if not isinstance(x, float) or not np.isfinite(x) or x <= 0:
            raise SpecError(f"kv_fp8_scales: {x!r} is not a positive finite scale; {hint}")


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
]
