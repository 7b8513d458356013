"""Calibrated key offsets for quantized pages: what a layer's keys hold on every token.

Real LLM keys have a few channels whose magnitude is about the same on every token
(10-50x the other channels: KIVI; "massive values", mostly in RoPE's low-frequency
channels, which barely rotate over a context). Quantization error is relative to a
head vector's magnitude (int8: its absmax; fp8: each element), so that constant part
decides the rounding, while attention only sees how keys differ from token to token:
a query's logits over its context move together when every key moves by the same
``mu``, and softmax is shift-invariant. So pages of a layer with offsets hold
``k - mu`` (then rotated and quantized as usual), and every read adds ``mu`` back: the
keys a model gets, and attention with sinks or a soft cap, are unchanged; only the
rounding is now relative to what varies. Measured (`benchmarks/bench_quant.py`), keys
with consistent outlier channels at a peaked softmax: about 3x less attention-output
error for fp8 and int8; keys without such channels gain nothing.

``CacheSpec.kv_key_offsets``: None, or one entry per layer, each None (no offset) or
``key_heads x key_dim`` floats, e.g. the mean key of each head over a calibration
sample (`calibrate`). They are fixed, like fp8 scales, for the same reason: changing
``mu`` after tokens were written would shift every earlier key. A full-precision layer
(``kv_full_precision_layers``) ignores its entry: its pages are exact anyway. They
live in the spec, not the pages: nothing that moves pages (swap, fork, checkpoints,
sharding) moves them, and a swap or checkpoint between specs with other offsets is
refused like any other spec difference.

This module is the host side: converting the field (nested tuples of floats, what a
JSON round trip of a checkpoint header gives back), its rules, a layer's entry, and
`calibrate` (numpy). The device side, the offset in the basis the pages are stored in
that a read adds back, is `paged_kv.quant.stored_offsets`.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

import numpy as np

from paged_kv.errors import SpecError

if TYPE_CHECKING:
    from paged_kv.spec.spec_types import LayerKeyOffsets, SpecFields


def converter(value: Any) -> Any:
    """``kv_key_offsets`` with arrays and lists made nested tuples of floats (hashable,
    and what a JSON round trip of a checkpoint header gives back); checked in `check`."""
    if value is None or isinstance(value, (str, bytes, bool)):
        return value
    if isinstance(value, np.ndarray) and value.ndim == 3:
        return tuple(_layer(x) for x in value)
    if hasattr(value, "__iter__"):
        return tuple(x if x is None or isinstance(x, (str, bytes, bool)) else _layer(x) for x in value)
    return value


def _layer(x: Any) -> Any:
    try:
        a = np.asarray(x)
    except (TypeError, ValueError):
        return x  # ragged: `check` names it
    if a.ndim != 2 or a.dtype.kind not in "fiu":  # no strings, bools or objects posing as numbers
        return x
    return tuple(tuple(float(v) for v in row) for row in a.astype(np.float64))


def check(spec: SpecFields, rotation_block: int) -> None:
    """Raise `SpecError` unless ``spec.kv_key_offsets`` is None or one entry per layer,
    each None or ``key_heads x key_dim`` finite floats, with a quantized ``kv_format``,
    that stay finite once rotated by a Hadamard block of ``rotation_block`` channels
    (`paged_kv.spec.formats.rotation_blocks`, whose module calls this one: it is passed
    in rather than imported)."""
    given: object = spec.kv_key_offsets  # as given: checked here
    if given is None:
        return
    hint = (f"kv_key_offsets must be None or one entry per layer ({spec.num_layers}), each None or "
            f"{spec.key_heads} x {spec.key_dim} finite floats (key heads x key dim), e.g. "
            "paged_kv.key_offsets.calibrate(sample_keys)")
    if spec.kv_format == "none":
        raise SpecError("kv_key_offsets given with kv_format='none': offsets only change how quantized keys round "
                        "(full-precision pages are exact); give kv_format='int8' or 'fp8', or drop them")
    if not isinstance(given, tuple) or len(given) != spec.num_layers:
        got = f"{len(given)} entries" if isinstance(given, tuple) else f"a {type(given).__name__}"
        raise SpecError(f"kv_key_offsets is {got}: {hint}")
    for layer, entry in enumerate(given):
        if entry is None:
            continue
        shape_ok = (isinstance(entry, tuple) and len(entry) == spec.key_heads
                    and all(isinstance(r, tuple) and len(r) == spec.key_dim for r in entry))
        if not shape_ok:
            raise SpecError(f"kv_key_offsets[{layer}] is not {spec.key_heads} x {spec.key_dim} floats: {hint}")
        with np.errstate(over="ignore"):
            values = np.asarray(entry, dtype=np.float64).astype(np.float32)  # what the codec subtracts
        if not np.isfinite(values).all():
            raise SpecError(f"kv_key_offsets[{layer}] holds a value that is not finite in float32: {hint}")
        _check_range(spec, layer, entry, hint, rotation_block)


def _check_range(spec: SpecFields, layer: int, entry: tuple[object, ...], hint: str, block: int) -> None:
    """Finite is not enough (issue 23 item 6): a read adds the offset back in the basis the
    pages are stored in, ``mu H`` (float32, `paged_kv.quant.stored_offsets`), which a
    Hadamard block of ``b`` channels can make up to ``sqrt(b)`` times larger than ``mu``:
    3e38 becomes inf there and every key of the layer reads NaN. And an offset is what
    every key holds, so it must also fit the compute dtype the keys are written in
    (float16: 65504). Both are checked in float64, before anything is rounded."""
    import ml_dtypes

    from paged_kv.spec.dtypes import resolve_dtype

    mu = np.asarray(entry, dtype=np.float64)
    rotated = mu
    if block > 1:  # `paged_kv.quant.hadamard_matrix`, in float64 (the spec never imports the codecs)
        h = np.ones((1, 1))
        while h.shape[0] < block:
            h = np.kron(np.array([[1.0, 1.0], [1.0, -1.0]]), h)
        rotated = (mu.reshape(mu.shape[0], -1, block) @ (h / np.sqrt(block))).reshape(mu.shape)

    compute = float(ml_dtypes.finfo(resolve_dtype(spec.dtype)).max)  # type: ignore[no-untyped-call]  # ml_dtypes' finfo is unannotated
    stored = float(np.finfo(np.float32).max)
    worst, worst_rotated = float(np.abs(mu).max()), float(np.abs(rotated).max())
    if worst > compute:
        raise SpecError(f"kv_key_offsets[{layer}] holds {worst:.3g}, beyond the largest {spec.dtype} "
                        f"({compute:.3g}) the keys it is subtracted from can hold: {hint}")
    if worst_rotated > stored:
        raise SpecError(f"kv_key_offsets[{layer}] reaches {worst_rotated:.3g} once rotated by the {block}-channel "
                        f"Hadamard block the pages are stored in, beyond float32 ({stored:.3g}): every key of the "
                        f"layer would read back NaN; {hint}")


def of_layer(spec: SpecFields, layer: int) -> LayerKeyOffsets | None:
    """Layer ``layer``'s key offsets (``key_heads x key_dim`` nested tuples) or None."""
    given = spec.kv_key_offsets
    if given is None or spec.layer_format(layer) == "none":
        return None
    return given[layer]


def calibrate(keys_per_layer: Iterable[Any]) -> tuple[LayerKeyOffsets | None, ...]:
    """Key offsets from a calibration sample: for each layer, the mean key of each head
    over the sample's tokens (``keys_per_layer[i]``: ``[..., key_heads, key_dim]``
    keys as the model writes them, after RoPE; None: no offset for that layer).
    Pass the result as ``CacheSpec(kv_key_offsets=...)``."""
    out: list[LayerKeyOffsets | None] = []
    for keys in keys_per_layer:
        if keys is None:
            out.append(None)
            continue
        k = np.asarray(keys, dtype=np.float64)
        out.append(_layer(k.reshape(-1, *k.shape[-2:]).mean(axis=0)))
    return tuple(out)


__all__ = ["calibrate", "check", "converter", "of_layer"]
