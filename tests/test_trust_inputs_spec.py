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


# ---- item 9: sizes that drive host memory ----------------------------------------------------
def small_spec(**kw):
    return pk.CacheSpec(**{**dict(num_layers=2, num_blocks=64, block_size=4, max_blocks_per_seq=8, max_batch_slots=8,
                                  num_kv_heads=1, head_dim=2, dtype="float32"), **kw})


@pytest.mark.parametrize("field, value", [("num_layers", 20_000), ("num_blocks", 400_000),
                                          ("max_batch_slots", 1_000_000), ("sliding_num_blocks", 400_000)])
def test_sizes_past_host_memory_are_refused_before_anything_is_built(monkeypatch, field, value):
    """With 64 MiB of host memory, 20k layers (16 KiB each), 400k blocks (256 B each) or
    a million batch slots of 8-block tables are refused; the same spec at its own sizes is not."""
    from paged_kv.spec import fields

    monkeypatch.setattr(fields, "host_memory_bytes", lambda: 64 * 2**20)
    extra = dict(sliding_window=8, sliding_layers=(1,)) if field == "sliding_num_blocks" else {}
    small_spec(**extra)
    with pytest.raises(pk.SpecError, match=rf"{field if field != 'sliding_num_blocks' else 'num_blocks'}.* would take "
                                           r"about .* GiB of host memory, more than this machine's 0\.1 GiB"):
        small_spec(**extra, **{field: value})


def test_two_billion_layers_are_refused_at_once():
    """A per-layer tuple of 2**31 - 1 entries would exhaust host RAM before the pool cap was
    even looked at: the check is arithmetic on the fields."""
    with pytest.raises(pk.SpecError, match="num_layers=2147483647.* of host memory"):
        small_spec(num_layers=2**31 - 1)


def test_spec_host_bytes_bounds_what_a_manager_and_cache_take():
    """The estimate is an upper bound of what the host structures measure (tracemalloc)."""
    import tracemalloc

    from paged_kv.spec import fields

    spec = small_spec(num_layers=200, num_blocks=4000, max_batch_slots=64, max_blocks_per_seq=64)
    tracemalloc.start()
    manager = pk.KVCacheManager(spec, prefix_cache=True)
    slots = pk.DecodeSlots(manager)
    cache = pk.PagedKVCache.init(spec)
    used = tracemalloc.get_traced_memory()[0]
    tracemalloc.stop()
    assert None not in (manager, slots, cache)
    assert used < fields.spec_host_bytes(spec), (used, fields.spec_host_bytes(spec))


def test_host_memory_is_the_machines():
    from paged_kv.spec import fields

    have = fields.host_memory_bytes()
    assert 2**28 <= have <= 2**50
