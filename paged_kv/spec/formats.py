"""The page formats' spec rules and memory arithmetic (host side, numpy only).

What ``kv_format``, ``kv_scale_dtype``, ``kv_fp8_scales``, ``kv_rotation`` and
``kv_full_precision_layers`` may be, alone and together; how many bytes a token takes
in each format; which Hadamard blocks a spec rotates by and which fp8 scales a layer
has. The device codecs that implement the formats (`paged_kv.quant`) read these; the
spec never imports the codecs.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from paged_kv.errors import SpecError
from paged_kv.spec import key_offsets
from paged_kv.spec.dtypes import resolve_dtype

if TYPE_CHECKING:
    from paged_kv.spec.spec_types import FP8Scale, SpecFields

FORMATS = ("none", "int8", "fp8")
ROTATIONS = ("auto", "hadamard", "none")
MIN_ROTATION_BLOCK = 8
"""Fewest channels a Hadamard block may mix: smaller blocks barely spread an outlier
(its magnitude drops by sqrt(block)), so "auto" leaves such dims unrotated and an
explicit "hadamard" is refused. Every common head dim (64, 80, 96, 128, 192, 256, 576)
has a block of 16 or more."""
SCALE_DTYPES = ("float32", "bfloat16")
COMPUTE_DTYPES = ("bfloat16", "float16", "float32")


# ---- memory arithmetic -------------------------------------------------------------------
def bytes_per_token(spec: SpecFields, fmt: str) -> int:
    """Bytes one token takes in one layer stored in ``fmt``, scales included."""
    elems = spec.key_heads * spec.key_dim + spec.value_heads * spec.value_dim
    if fmt == "none":
        return elems * spec.itemsize
    scales: int = (spec.key_heads + spec.value_heads) * np.dtype(resolve_dtype(spec.kv_scale_dtype)).itemsize
    return elems + (scales if fmt == "int8" else 0)


# ---- what the codecs are built from ------------------------------------------------------
def rotation_block(dim: int) -> int:
    """The Hadamard block for a head dim: the largest power of two dividing ``dim``
    (``dim`` itself when it is a power of two; 32 for 96; 64 for 192 and 576)."""
    return dim & -dim


def rotation_blocks(spec: SpecFields) -> tuple[int, int]:
    """The Hadamard blocks of ``spec``'s quantized layers, (keys, values); 1: not rotated.

    ``kv_rotation="none"``: neither; ``"hadamard"``: both (checked to be at least
    `MIN_ROTATION_BLOCK`); ``"auto"`` (the default): for a quantized ``kv_format``,
    each head dim whose block has at least `MIN_ROTATION_BLOCK` channels, else none.
    Full-precision layers are never rotated (`paged_kv.quant.codecs`)."""
    if spec.kv_rotation == "none" or spec.kv_format == "none":
        return 1, 1
    k, v = (b if b >= MIN_ROTATION_BLOCK else 1 for b in (rotation_block(spec.key_dim), rotation_block(spec.value_dim)))
    return k, v


def fp8_head_scales(spec: SpecFields, layer: int) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Layer ``layer``'s fixed fp8 scales: (one per key head, one per value head)."""
    given = spec.kv_fp8_scales
    if given is None or isinstance(given, float):
        s = 1.0 if given is None else given
        return (s,) * spec.key_heads, (s,) * spec.value_heads
    k, v = given[layer]
    return _per_head(k, spec.key_heads), _per_head(v, spec.value_heads)


def _per_head(x: FP8Scale, heads: int) -> tuple[float, ...]:
    return (x,) * heads if isinstance(x, float) else tuple(x)


# ---- spec rules --------------------------------------------------------------------------
def check_format(spec: SpecFields) -> None:
    """Raise `SpecError` for a format field or combination that is not supported, naming
    what is. ``kv_full_precision_layers`` is checked by `full_precision_layers`."""
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


def check_values(spec: SpecFields) -> None:
    """The format fields that hold numbers: ``kv_fp8_scales`` (with ``kv_format="fp8"``)
    and ``kv_key_offsets``; `SpecError` naming what they must be."""
    if spec.kv_format == "fp8":
        _check_fp8_scales(spec)
    key_offsets.check(spec, rotation_blocks(spec)[0])


def _check_rotation(spec: SpecFields) -> None:
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


def full_precision_layers(spec: SpecFields) -> tuple[int, ...]:
    """``spec.kv_full_precision_layers`` checked and resolved: sorted layer indices
    (``"sliding"``: the sliding layers), what the spec holds once built."""
    layers: tuple[int, ...] | str = spec.kv_full_precision_layers  # as given: `full_precision_layers` resolves it
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
    return tuple(sorted(int(x) for x in layers))


def _check_fp8_scales(spec: SpecFields) -> None:
    given: object = spec.kv_fp8_scales  # as given: checked here
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


def _check_scale_values(values: tuple[object, ...], hint: str) -> None:
    for x in values:
        if not isinstance(x, float) or not np.isfinite(x) or x <= 0:
            raise SpecError(f"kv_fp8_scales: {x!r} is not a positive finite scale; {hint}")


__all__ = ["COMPUTE_DTYPES", "FORMATS", "MIN_ROTATION_BLOCK", "ROTATIONS", "SCALE_DTYPES", "bytes_per_token",
           "check_format", "check_values", "fp8_head_scales", "full_precision_layers", "rotation_block",
           "rotation_blocks"]
