"""Dtypes a spec implies: the compute dtype, and the dtype its pages are stored in."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from paged_kv.spec.spec_types import SpecFields


def resolve_dtype(name: str) -> np.dtype[Any] | type[np.generic]:
    """A dtype name (``"bfloat16"``, ``"float8_e4m3fn"``: ml_dtypes; others: numpy) as the
    dtype object, resolved one way everywhere."""
    import ml_dtypes

    if hasattr(ml_dtypes, name):
        scalar: type[np.generic] = getattr(ml_dtypes, name)
        return scalar
    return np.dtype(name)


def storage_dtype(spec: SpecFields) -> np.dtype[Any]:
    """The dtype pages are stored in: the unsigned integer of ``spec.dtype``'s width
    (``page_storage="bits"``, the default), or ``spec.dtype`` itself (``"float"``;
    ``"auto"``: float on TPU and GPU, bits on CPU) of full-precision layers;
    quantized layers (`paged_kv.quant`) always store unsigned bits.

    Why bits on CPU: XLA on CPU lowers a bfloat16 scatter out of place (a full pool
    copy per write, ~220 ms for 134 MB) but an integer scatter in place (~50 us);
    bit-casting at the write and the read costs nothing there. Why floats elsewhere:
    TPU and GPU scatter floats in place, and a Pallas kernel reads the pool as it is
    (a bit-cast of the whole pool before a kernel call may be materialised as a
    copy). The default stays "bits" everywhere for now because checkpoints write
    pages with numpy, which cannot round-trip bfloat16/fp8 arrays (use "bits" for a
    cache you will checkpoint).
    """
    if spec.page_storage == "float" or (spec.page_storage == "auto" and _platform() != "cpu"):
        return np.dtype(resolve_dtype(spec.dtype))
    return bits_dtype(spec)


def bits_dtype(spec: SpecFields) -> np.dtype[Any]:
    """The unsigned integer of ``spec.dtype``'s width (what "bits" storage holds)."""
    return np.dtype(f"uint{8 * spec.itemsize}")


def _platform() -> str:
    import jax  # the host side of paged_kv does not need jax; only page storage asks

    backend: str = jax.default_backend()
    return backend


def compute_dtype(spec: SpecFields) -> np.dtype[Any] | type[np.generic]:
    """The float dtype keys and values have outside the pages."""
    return resolve_dtype(spec.dtype)


__all__ = ["bits_dtype", "compute_dtype", "resolve_dtype", "storage_dtype"]
