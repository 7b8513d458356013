"""Issue 23 items 6 and 9 at the spec: key offsets bounded by what the pages' basis can
hold, and sizes that drive host memory checked before anything is allocated."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

import paged_kv as pk
from paged_kv import quant

H, D = 2, 8


def offsets_spec(value, fmt="int8", dtype="bfloat16", **kw):
    return pk.CacheSpec(num_layers=1, num_blocks=4, block_size=4, max_blocks_per_seq=2, num_kv_heads=H, head_dim=D,
                        dtype=dtype, kv_format=fmt, kv_key_offsets=[np.full((H, D), value)], **kw)


# ---- item 6: key offsets ---------------------------------------------------------------------
@pytest.mark.parametrize("fmt", ["int8", "fp8"])
@pytest.mark.parametrize("value", [3e38, -3e38, 2e38])
def test_offsets_that_overflow_once_rotated_are_refused(fmt, value):
    """Finite in float32, but the Hadamard block of 8 channels the keys are stored in makes
    them sqrt(8) times larger: inf there, and every key would read back NaN."""
    with pytest.raises(pk.SpecError, match="once rotated.*beyond float32"):
        offsets_spec(value, fmt)


def test_offsets_beyond_the_compute_dtype_are_refused():
    with pytest.raises(pk.SpecError, match="beyond the largest float16"):
        offsets_spec(1e5, dtype="float16")
    offsets_spec(6e4, dtype="float16")  # a float16 key can hold it


@pytest.mark.parametrize("fmt,rotation", [("int8", "auto"), ("fp8", "auto"), ("int8", "none")])
def test_the_largest_accepted_offsets_read_keys_back_finite(fmt, rotation):
    """Just inside the bound (rotated: 1e38 x sqrt(8) < 3.4e38; unrotated: 3e38), keys that
    hold the offset decode finite, and close to it."""
    value = 1e38 if rotation == "auto" else 3e38
    spec = offsets_spec(value, fmt, dtype="float32", kv_rotation=rotation)
    key_codec, _ = quant.codecs(spec, 0)
    keys = np.float32(value) + np.zeros((3, H, D), np.float32)
    bits, scales = key_codec.encode(jnp.asarray(keys))
    got = np.asarray(key_codec.decode(bits, scales))
    assert np.isfinite(got).all()
    np.testing.assert_allclose(got, keys, rtol=1e-5)
