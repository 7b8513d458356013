"""Quantized pages (int8 with per-token scales, fp8 with fixed per-head scales).

Tolerances come from the formats, not from measurements: int8 absmax rounding is off
by at most half a scale step per element; float8_e4m3fn keeps 3 mantissa bits, so
rounding is off by at most 2**-4 of the value (normal range) or 2**-10 of the scale
(subnormals). Movement of pages (swap, checkpoints, copy-on-write, insertion) must
be bit-exact for pages and scales alike, and no read may expose an old value or an
old scale of a reused block.
"""

from __future__ import annotations

import json
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import paged_kv as pk
from paged_kv import quant
from paged_kv.insertion import insert_prefill
from test_transformer_model import LAYOUTS, Driver
from tiny_model import TinyConfig, forward_full

BS, H, D = 4, 2, 8
EDGES = [1, BS - 1, BS, BS + 1, 2 * BS]


def outlier_values(rng, shape, outliers=2, factor=30.0) -> np.ndarray:
    """Normal values with a few channels ``factor`` times larger, as real LLM keys have."""
    x = rng.normal(size=shape).astype(np.float32)
    x[..., rng.choice(shape[-1], outliers, replace=False)] *= factor
    return x


def int8_bound(x: np.ndarray, scale_dtype: str) -> np.ndarray:
    """Per-element bound: half the step of the stored scale (bf16 scales may be
    rounded up by 2**-8), plus float32 rounding."""
    step = np.abs(x).max(-1, keepdims=True) / 127 * (1 + (2**-8 if scale_dtype == "bfloat16" else 0))
    return 0.5 * step * (1 + 1e-5) + 1e-6 * np.abs(x)


def fp8_bound(x: np.ndarray, head_scale: np.ndarray) -> np.ndarray:
    s = head_scale[:, None]
    return np.maximum(2**-4 * np.abs(x), 2**-10 * s) * (1 + 1e-6)


@partial(jax.jit, static_argnums=0)
def _roundtrip(codec, x):
    return codec.decode(*codec.encode(x))


def roundtrip(codec, x):
    """``decode(encode(x))``, jitted (one compilation per codec and shape)."""
    return np.asarray(_roundtrip(codec, jnp.asarray(x)))


_hadamard = jax.jit(quant.hadamard_transform, static_argnums=1)


def hadamard_matrix(dim: int, block: int) -> np.ndarray:
    """The normalized block-diagonal Sylvester Hadamard matrix, built here as a matrix
    (by block recursion, independently of `quant.hadamard_matrix`), float64."""
    h = np.ones((1, 1))
    while h.shape[0] < block:
        h = np.block([[h, h], [h, -h]])
    return np.kron(np.eye(dim // block), h / np.sqrt(block))


def stored_basis(codec, x: np.ndarray) -> np.ndarray:
    """``x`` in the basis ``codec``'s pages hold (``x H`` when it rotates), float64."""
    x = np.asarray(x, np.float64)
    return x @ hadamard_matrix(x.shape[-1], codec.rotation_block) if codec.rotated else x


def assert_within_format(codec, got: np.ndarray, x: np.ndarray, where: str = "") -> None:
    """``got`` (decoded) is within the format's per-element bound of ``x`` in the basis
    the pages hold; the rotation's float32 arithmetic may add ~1e-6 of the vector norm.
    Equivalently (H is orthogonal) the L2 error per token and head is bounded."""
    if codec.offset is not None:  # pages hold x - offset: the bound is on that
        got, x = got - np.asarray(codec.offset), x - np.asarray(codec.offset)
    gr, xr = stored_basis(codec, got), stored_basis(codec, x)
    bound = (int8_bound(xr, codec.scale_dtype) if codec.fmt == "int8"
             else fp8_bound(xr, np.asarray(codec.head_scales, np.float64)))
    if codec.rotated:
        bound = bound + 2e-6 * np.linalg.norm(xr, axis=-1, keepdims=True)
    assert (np.abs(gr - xr) <= bound).all(), f"{where}: error past the {codec.fmt} bound (rotated={codec.rotated})"


# ---- the pure functions ------------------------------------------------------------------
@pytest.mark.parametrize("scale_dtype", ["float32", "bfloat16"])
def test_int8_error_is_at_most_half_a_scale_step(scale_dtype):
    rng = np.random.default_rng(0)
    x = outlier_values(rng, (64, 4, 32))
    x[3, 1] = 0.0  # an all-zero head: scale 0, decodes to exact zeros
    codec = quant.PageCodec("int8", "float32", scale_dtype)
    bits, scales = codec.encode(jnp.asarray(x))
    assert bits.dtype == np.uint8 and bits.shape == x.shape and scales.shape == x.shape[:2]
    assert scales.dtype == codec.scale_storage
    got = np.asarray(codec.decode(bits, scales))
    assert (np.abs(got - x) <= int8_bound(x, scale_dtype)).all()
    assert not got[3, 1].any()
    q = np.asarray(bits).view(np.int8)
    assert q.min() >= -127 and (np.abs(q).max(-1)[x.any(-1)] >= 126).all()  # the range is used


def test_fp8_error_is_relative_and_saturates():
    rng = np.random.default_rng(1)
    head_scale = np.array([0.5, 4.0], np.float32)
    x = outlier_values(rng, (128, 2, 16))
    codec = quant.PageCodec("fp8", "float32", head_scales=tuple(float(s) for s in head_scale))
    got = roundtrip(codec, x)
    assert (np.abs(got - x) <= fp8_bound(x, head_scale)).all()
    big = np.full((1, 2, 16), 1e6, np.float32)  # beyond 448 * scale: clipped, never NaN
    np.testing.assert_array_equal(roundtrip(codec, big), np.broadcast_to(448 * head_scale[:, None], big.shape))
    # The scale places the range, not the precision (why fp8 scales can be fixed):
    # 1000 saturates at scale 1 but not at scale 4; 1e-4 is lost at scale 1 but not at
    # 2**-12; and a power-of-two scale rounds exactly as scale 1 does.
    unit, wide, narrow = (quant.PageCodec("fp8", "float32", head_scales=(s, s)) for s in (1.0, 4.0, 2.0**-12))
    assert roundtrip(unit, np.full((1, 2, 1), 1000.0, np.float32)).max() == 448
    assert abs(roundtrip(wide, np.full((1, 2, 1), 1000.0, np.float32)).max() - 1000) <= 1000 * 2**-4
    assert roundtrip(unit, np.full((1, 2, 1), 1e-4, np.float32)).max() == 0
    assert abs(roundtrip(narrow, np.full((1, 2, 1), 1e-4, np.float32)).max() - 1e-4) <= 1e-4 * 2**-4
    np.testing.assert_array_equal(roundtrip(wide, 4 * x[:, :, :4]), 4 * roundtrip(unit, x[:, :, :4]))


def test_fp8_bits_decode_like_the_native_convert_for_every_code():
    """The integer decode (CPU) equals e4m3's own convert for all 256 codes: normals,
    subnormals, both zeros (signs too), +-448 and NaN."""
    import ml_dtypes

    codes = np.arange(256, dtype=np.uint8)
    want = codes.view(ml_dtypes.float8_e4m3fn).astype(np.float32)
    got = np.asarray(jax.jit(quant.fp8_bits_to_float32)(jnp.asarray(codes)))
    np.testing.assert_array_equal(got, want)  # NaN where NaN
    finite = ~np.isnan(want)
    np.testing.assert_array_equal(np.signbit(got[finite]), np.signbit(want[finite]))


@pytest.mark.parametrize("dim", [8, 96, 128])
def test_hadamard_transform_is_the_orthogonal_block_matrix(dim):
    """The transform equals ``x H`` for the normalized block-diagonal Sylvester matrix
    (blocks: the largest power of two dividing ``dim``), preserves norms, and undoes
    itself (``H`` is symmetric and orthogonal)."""
    block = quant.rotation_block(dim)
    assert block == {8: 8, 96: 32, 128: 128}[dim]
    x = np.random.default_rng(dim).normal(size=(5, 3, dim)).astype(np.float32)
    hx = np.asarray(_hadamard(jnp.asarray(x), block))
    np.testing.assert_allclose(hx, x @ hadamard_matrix(dim, block), rtol=0, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(hx, axis=-1), np.linalg.norm(x, axis=-1), rtol=1e-6)
    np.testing.assert_allclose(np.asarray(_hadamard(jnp.asarray(hx), block)), x, rtol=0, atol=1e-5)


@pytest.mark.parametrize("fmt, scale_dtype", [("int8", "float32"), ("int8", "bfloat16"), ("fp8", None)])
def test_rotated_codec_keeps_the_format_bound_and_spreads_outliers(fmt, scale_dtype):
    """Rotated pages hold ``x H`` within the format's per-element bound (so the decoded
    error per token and head is bounded in L2), and on keys with outlier channels the
    rotation lowers int8's error: the scale follows the head's norm, not its outlier."""
    rng = np.random.default_rng(7)
    x = outlier_values(rng, (256, 2, 64), outliers=4, factor=30.0)
    kw = dict(head_scales=(0.25, 0.5)) if fmt == "fp8" else dict(scale_dtype=scale_dtype)
    rotated, plain = (quant.PageCodec(fmt, "float32", rotation_block=b, **kw) for b in (64, 1))
    got = roundtrip(rotated, x)
    assert_within_format(rotated, got, x)
    assert_within_format(plain, roundtrip(plain, x), x)
    if fmt == "int8":  # half a step of max|x H| / 127 per rotated channel, vs of max|x| / 127
        err_rot, err_plain = (np.linalg.norm(roundtrip(c, x) - x) for c in (rotated, plain))
        assert err_rot < 0.5 * err_plain, (err_rot, err_plain)


# ---- spec: memory arithmetic and typed errors ---------------------------------------------
def spec(**kw):
    base = dict(num_layers=4, num_blocks=33, block_size=BS, max_blocks_per_seq=8, max_batch_slots=8,
                num_kv_heads=H, head_dim=D, dtype="float32")
    base.update(kw)
    return pk.CacheSpec(**base)


@pytest.mark.parametrize("layout", ["split", "unified"])
@pytest.mark.parametrize("kw, per_layer", [
    (dict(), 2 * H * D * 4),
    (dict(kv_format="int8"), 2 * H * D + 2 * H * 4),
    (dict(kv_format="int8", kv_scale_dtype="bfloat16"), 2 * H * D + 2 * H * 2),
    (dict(kv_format="fp8"), 2 * H * D),
    (dict(kv_format="int8", num_kv_heads=None, head_dim=None, key_heads=2, value_heads=1, key_dim=8, value_dim=4),
     2 * 8 + 4 + 3 * 4),
])
def test_memory_arithmetic_counts_scales_as_allocated(layout, kw, per_layer):
    s = spec(**kw)
    assert s.bytes_per_token_per_layer == per_layer
    assert s.bytes_per_token == 4 * per_layer and s.pool_bytes == 33 * BS * 4 * per_layer
    assert s.binding_bytes == 4 * (4 * 33 + 4)  # an int32 generation per block and an owner, per layer
    assert pk.PagedKVCache.init(s, layout=layout).nbytes == s.device_bytes  # what is counted is what exists


def test_full_precision_layers_cost_full_precision():
    s = spec(kv_format="int8", sliding_window=8, sliding_layers=(1, 3), sliding_num_blocks=9,
             kv_full_precision_layers="sliding")
    assert s.kv_full_precision_layers == (1, 3)
    assert [s.layer_format(i) for i in range(4)] == ["int8", "none", "int8", "none"]
    full, q = 2 * H * D * 4, 2 * H * D + 2 * H * 4
    assert s.group_bytes_per_block(0) == 2 * q * BS and s.group_bytes_per_block(1) == 2 * full * BS
    assert s.pool_bytes == 33 * 2 * q * BS + 9 * 2 * full * BS
    assert pk.PagedKVCache.init(s).nbytes == s.device_bytes == s.pool_bytes + 4 * (2 * 33 + 2 * 9 + 4)


def test_for_memory_fits_twice_the_blocks_in_int8():
    model = dict(num_layers=32, block_size=16, num_kv_heads=8, head_dim=128, dtype="bfloat16")
    bf16 = pk.CacheSpec.for_memory(2**34, **model)
    int8 = pk.CacheSpec.for_memory(2**34, kv_format="int8", **model)
    fp8 = pk.CacheSpec.for_memory(2**34, kv_format="fp8", **model)
    assert int8.pool_bytes <= 2**34 and fp8.pool_bytes <= 2**34
    assert int8.device_bytes <= 2**34 and fp8.device_bytes <= 2**34
    assert int8.num_blocks == (2**34 - 32 * 4) // (16 * 32 * 2 * 8 * (128 + 4) + 32 * 4)
    assert 1.93 < int8.num_blocks / bf16.num_blocks < 1.94 and fp8.num_blocks // bf16.num_blocks == 2


@pytest.mark.parametrize("kw, fragment", [
    (dict(kv_format="int4"), r"kv_format='int4' is not supported; use one of \('none', 'int8', 'fp8'\)"),
    (dict(kv_format="int8", dtype="float8_e4m3fn"), r"dtype='float8_e4m3fn'.*use one of"),
    (dict(kv_format="int8", kv_scale_dtype="float16"), r"kv_scale_dtype='float16'.*'float32', 'bfloat16'"),
    (dict(kv_format="fp8", kv_scale_dtype="bfloat16"), r"kv_scale_dtype='bfloat16' is for kv_format='int8'"),
    (dict(kv_format="int8", kv_fp8_scales=2.0), r"kv_fp8_scales given with kv_format='int8'"),
    (dict(kv_format="fp8", kv_fp8_scales=-1.0), r"-1.0 is not a positive finite scale"),
    (dict(kv_format="fp8", kv_fp8_scales=[(1.0, 1.0)]), r"one \(key, value\) pair per layer"),
    (dict(kv_format="fp8", kv_fp8_scales=[(1.0, (1.0, 2.0, 3.0))] * 4), r"2 key / 2 value per-head"),
    (dict(kv_format="fp8", kv_fp8_scales="big"), r"kv_fp8_scales='big'"),
    (dict(kv_full_precision_layers=(0,)), r"kv_full_precision_layers=\(0,\) given with kv_format='none'"),
    (dict(kv_format="int8", kv_full_precision_layers=(4,)), r"kv_full_precision_layers=\(4,\).*\[0, 4\)"),
    (dict(kv_format="int8", kv_full_precision_layers="sliding"), r"no sliding_layers"),
    (dict(kv_format="int8", kv_full_precision_layers=3), r"kv_full_precision_layers=3"),
    (dict(dtype="int8"), r"kv_format='int8'"),
    (dict(kv_format="int8", kv_rotation="walsh"), r"kv_rotation='walsh' is not supported; use one of \('auto'"),
    (dict(kv_rotation="hadamard"), r"kv_rotation='hadamard' given with kv_format='none'"),
    (dict(kv_format="fp8", kv_rotation="hadamard", head_dim=12), r"key_dim=12: its largest power-of-two block is 4"),
    (dict(kv_format="int8", kv_rotation="hadamard", num_kv_heads=None, head_dim=None, key_heads=2, value_heads=2,
          key_dim=16, value_dim=6), r"value_dim=6: .* block is 2 channels, fewer than 8"),
])
def test_unsupported_combinations_are_typed_spec_errors(kw, fragment):
    with pytest.raises(pk.SpecError, match=fragment):
        spec(**kw)


@pytest.mark.parametrize("kw, blocks", [
    (dict(kv_format="int8"), (8, 8)),  # "auto": rotated
    (dict(kv_format="fp8", kv_rotation="hadamard"), (8, 8)),
    (dict(kv_format="int8", kv_rotation="none"), (1, 1)),
    (dict(), (1, 1)),  # full precision: nothing to rotate
    (dict(kv_format="int8", num_kv_heads=None, head_dim=None, key_heads=2, value_heads=1, key_dim=192, value_dim=128),
     (64, 128)),  # MLA-like: one block per dim
    (dict(kv_format="int8", head_dim=12), (1, 1)),  # "auto" leaves a block of 4 unrotated
])
def test_rotation_blocks_follow_the_spec(kw, blocks):
    s = spec(**kw)
    assert quant.rotation_blocks(s) == blocks
    k, v = quant.codecs(s, 0)
    assert (k.rotation_block, v.rotation_block) == (blocks if s.kv_format != "none" else (1, 1))
    full = spec(**kw, kv_full_precision_layers=(1,)) if s.kv_format != "none" else s
    assert all(c.rotation_block == 1 for c in quant.codecs(full, 1))  # full-precision layers: never rotated
    assert ("Hadamard" in s.describe()) == (max(blocks) > 1)


def test_fp8_scales_round_trip_through_json_fields():
    s = spec(kv_format="fp8", kv_fp8_scales=[(0.5, [1, 2]), (1, 1), (2.0, 2.0), (np.float32(0.25), 0.125)])
    assert s.kv_fp8_scales[0] == (0.5, (1.0, 2.0)) and quant.fp8_head_scales(s, 0) == ((0.5, 0.5), (1.0, 2.0))
    as_lists = [[0.5, [1.0, 2.0]], [1.0, 1.0], [2.0, 2.0], [0.25, 0.125]]
    assert spec(kv_format="fp8", kv_fp8_scales=as_lists) == s and hash(spec(kv_format="fp8", kv_fp8_scales=as_lists)) == hash(s)


# ---- key offsets ---------------------------------------------------------------------------
@pytest.mark.parametrize("fmt", ["int8", "fp8"])
def test_key_offsets_round_the_varying_part_and_give_the_keys_back(fmt):
    """Keys holding a constant per channel: with that constant as the offset, decode gives
    the keys back within the format's bound on ``k - mu`` (not on ``k``), which for fp8
    and int8 is several times smaller here; values are untouched."""
    from paged_kv import key_offsets

    rng = np.random.default_rng(4)
    mu = key_offsets_like(rng, 1)[0]
    keys = (rng.normal(size=(64, H, D)) + mu).astype(np.float32)
    base = dict(kv_format=fmt, kv_fp8_scales=0.05 if fmt == "fp8" else None)
    plain, centred = spec(**base), spec(**base, kv_key_offsets=key_offsets.calibrate([keys] * 4))
    (kc0, vc0), (kc1, vc1) = quant.codecs(plain, 0), quant.codecs(centred, 0)
    assert kc0.offset is None and vc1.offset is None and kc1.offset is not None
    got0, got1 = roundtrip(kc0, keys), roundtrip(kc1, keys)
    assert_within_format(kc1, got1, keys)
    err0, err1 = (np.linalg.norm(g - keys) for g in (got0, got1))
    assert err1 < err0 / 3, (err0, err1)
    zeros = np.zeros((1, H, D), np.uint8)  # a zeroed slot decodes to the offset
    scales = None if fmt == "fp8" else np.zeros((1, H), np.uint32)
    np.testing.assert_allclose(np.asarray(kc1.decode(jnp.asarray(zeros), None if scales is None else jnp.asarray(scales)))[0],
                               np.asarray(kc1.offset, np.float32), rtol=1e-6, atol=1e-5)


def test_key_offsets_spec_rules_and_json_round_trip():
    from paged_kv import key_offsets

    mu = key_offsets_like(np.random.default_rng(1), 4)
    s = spec(kv_format="int8", kv_key_offsets=[mu[0], None, mu[2], mu[3]])
    assert s.kv_key_offsets[1] is None and isinstance(s.kv_key_offsets[0][0][0], float)
    as_lists = json.loads(json.dumps(s.kv_key_offsets))
    assert spec(kv_format="int8", kv_key_offsets=as_lists) == s
    assert spec(kv_format="int8", kv_key_offsets=mu) != spec(kv_format="int8", kv_key_offsets=mu + 1)
    assert quant.codecs(s, 1)[0].offset is None and quant.codecs(s, 2)[0].offset == s.kv_key_offsets[2]
    full = spec(kv_format="int8", kv_key_offsets=mu, kv_full_precision_layers=(2,))
    assert quant.codecs(full, 2)[0].offset is None  # a full-precision layer ignores its entry
    assert s.bytes_per_token == spec(kv_format="int8").bytes_per_token  # the spec holds them, not the pages
    for bad, fragment in [(mu[:3], "3 entries"), ([mu[0][:, :4]] * 4, "not 2 x 8"), ("x", "a str"),
                          ([np.full((H, D), np.nan)] * 4, "not finite"), ([np.full((H, D), 1e39)] * 4, "not finite"), ([[["a"] * D] * H] * 4, "not 2 x 8")]:
        with pytest.raises(pk.SpecError, match=fragment):
            spec(kv_format="fp8", kv_key_offsets=bad)
    with pytest.raises(pk.SpecError, match="kv_format='none'"):
        spec(kv_key_offsets=mu)
    np.testing.assert_allclose(np.asarray(key_offsets.calibrate([mu[:1] + np.zeros((5, 1, 1))])[0]), mu[0])


# ---- through a model: dense reference ------------------------------------------------------
CFG = TinyConfig()


def codecs_of(spec_):
    return tuple(quant.codecs(spec_, i) for i in range(spec_.num_layers))


@pytest.mark.parametrize("fmt, layout, kw", [
    ("int8", "split", LAYOUTS["mixed"]),
    ("fp8", "unified", dict(LAYOUTS["mixed"], kv_full_precision_layers="sliding")),
])
def test_decode_equals_dense_reference_with_the_same_rounding(fmt, layout, kw):
    """Paging is exact: the logits equal a no-cache recompute whose keys and values go
    through the same quantization; and quantization costs what the format predicts."""
    d = Driver("float32", layout=layout, kv_format=fmt, **kw)
    live = [0, 1]
    d.step({0: d.random_tokens(13), 1: d.random_tokens(6)})  # a block-edge-crossing, chunked prefill
    d.step({0: d.random_tokens(1), 1: d.random_tokens(8)})
    for _ in range(4):
        d.step({s: d.random_tokens(1) for s in live})
    assert [len(d.tokens[s]) for s in live] == [18, 18]  # one length: one compilation of each reference
    d.assert_matches_recompute(live, codecs_of(d.spec), 2e-4)
    # Against unquantized keys/values: the per-element error bound of the format (the unit),
    # carried through attention, moves the logits (relative L2) by a fraction of it, errors
    # averaging out over tokens and channels. Measured over 200 draws of the tokens (400
    # sequences): int8 0.43-1.14 units (here 0.60 and 0.54), below 2; fp8, whose unit is a
    # worst-case relative rounding most values stay well inside, 0.13-0.44 units (here 0.24
    # and 0.17), below 0.5.
    unit = {"int8": 1 / 254, "fp8": 2**-4}[fmt]
    units = {"int8": 2.0, "fp8": 0.5}[fmt]
    for s in live:
        ref = np.asarray(forward_full(CFG, d.params, jnp.asarray([d.tokens[s]]), jnp.float32, d.windows))[0]
        got = np.stack([d.logits[s][p] for p in range(len(d.tokens[s]))])
        rel = np.linalg.norm(got - ref) / np.linalg.norm(ref)
        assert 0 < rel < units * unit, (s, rel / unit)


# ---- isolation, copy-on-write, swap, checkpoints: pages and scales -----------------------
@partial(jax.jit, donate_argnums=0)
def _step(cache, ks, vs, meta):
    outs, views = [], []
    for i, view in enumerate(cache.views):
        keys, values, _, new = view.concatenate_to_cache(None, ks[i], vs[i], meta)
        g = meta.groups[new.group]
        outs.append((keys, values, new.gather(g.block_tables, meta.kv_lens - g.start)))
        views.append(new)
    return tuple(outs), pk.PagedKVCache(tuple(views))


SENTINEL = {np.dtype(np.uint8): 0xA5, np.dtype(np.uint16): 0x7FA5, np.dtype(np.uint32): 0x7FA5A5A5}


def poisoned(cache: pk.PagedKVCache) -> pk.PagedKVCache:
    """Every block but the null block full of stale bits: NaN scales, garbage int8/fp8."""
    def fill(leaf):
        if np.dtype(leaf.dtype) == np.int32:  # block generations and owner (`paged_kv.binding`): kept
            return leaf
        a = np.full(leaf.shape, SENTINEL[np.dtype(leaf.dtype)], leaf.dtype)
        a[pk.NULL_BLOCK] = 0
        return jnp.asarray(a)
    return jax.tree_util.tree_map(fill, cache)


def key_offsets_like(rng, layers: int) -> np.ndarray:
    """``[layers, H, D]`` offsets: 2 channels per head of magnitude 10-40, the rest 0."""
    mu = np.zeros((layers, H, D), np.float32)
    for layer in range(layers):
        for h in range(H):
            mu[layer, h, rng.choice(D, 2, replace=False)] = rng.uniform(10, 40, 2) * rng.choice([-1, 1], 2)
    return mu


# The formats, layouts and key offsets the two World tests below run on. Each costs ~4 s
# cold (a compilation of every layer's quantized write and read per step shape), so two
# run in the full suite only (`slow`): fp8 in the split layout and int8 with offsets. The
# quick tier keeps int8 in both layouts (scale arrays split and interleaved) and fp8
# (unified, with offsets); int8 pages with offsets are written and read back there by
# test_insert_prefill_quantizes_like_the_write[unified-True].
WORLDS = [("int8", "split", False), ("int8", "unified", False),
          pytest.param("fp8", "split", False, marks=pytest.mark.slow), ("fp8", "unified", True),
          pytest.param("int8", "split", True, marks=pytest.mark.slow)]


class World:
    """Quantized cache + manager + the float values each live sequence was given."""

    def __init__(self, fmt: str, layout: str, offsets: bool = False):
        # With offsets: every key holds them (plus its noise), as calibrated offsets describe.
        self.mu = key_offsets_like(np.random.default_rng(9), 2) if offsets else np.zeros((2, H, D), np.float32)
        self.spec = pk.CacheSpec(num_layers=2, num_blocks=17, block_size=BS, max_blocks_per_seq=8, max_batch_slots=8,
                                 num_kv_heads=H, head_dim=D, dtype="float32", sliding_window=6, sliding_layers=(1,),
                                 kv_format=fmt, kv_fp8_scales=[(0.5, (0.25, 1.0)), (1.0, 2.0)] if fmt == "fp8" else None,
                                 kv_key_offsets=self.mu if offsets else None)
        self.m = pk.KVCacheManager(self.spec)
        self.cache = poisoned(pk.PagedKVCache.init(self.spec, layout=layout))
        self.ref: dict[int, list] = {}
        self.rng = np.random.default_rng(0)

    def step(self, ids, counts):
        meta = self.m.step_metadata(ids, counts)
        B, T = meta.batch_size, meta.query_len
        ks, vs = [], []
        for layer in range(2):
            k, v = np.full((2, B, T, H, D), np.nan, np.float32)  # padding tokens: NaN, must be dropped
            for b, (s, n) in enumerate(zip(ids, counts)):
                new = outlier_values(self.rng, (2, n, H, D), factor=20.0)
                new[0] += self.mu[layer]
                k[b, :n], v[b, :n] = new
                self.ref[s][layer] = [np.concatenate([old, x]) for old, x in zip(self.ref[s][layer], new)]
            ks.append(jnp.asarray(k))
            vs.append(jnp.asarray(v))
        outs, self.cache = _step(self.cache, tuple(ks), tuple(vs), meta.to_device())
        self.m.commit(ids)
        self.check(outs, meta, ids)
        return outs

    def admit(self, s, n):
        self.m.admit(s, n)
        self.ref[s] = [[np.zeros((0, H, D), np.float32)] * 2 for _ in range(2)]

    def check(self, outs, meta, ids):
        for layer, (keys, values, raw) in enumerate(outs):
            kc, vc = quant.codecs(self.spec, layer)
            start = meta.groups[self.spec.group_of(layer)].start
            for b in range(meta.batch_size):
                first, n = int(start[b]), int(meta.kv_lens[b])
                for part, (got, codec) in enumerate(((keys, kc), (values, vc))):
                    got = np.asarray(got)[b]
                    assert not np.isnan(got).any(), f"layer {layer}: a stale value or scale was exposed"
                    assert not got[n - first:].any(), f"layer {layer} row {b}: nonzero past its length"
                    if b >= len(ids):
                        continue
                    own = self.ref[ids[b]][layer][part][first:n]
                    assert_within_format(codec, got[: n - first], own, f"layer {layer} seq {ids[b]}")
            for leaf in jax.tree_util.tree_leaves(raw):  # gathered bits, scales included: zero past each length
                leaf = np.asarray(leaf)
                for b in range(meta.batch_size):
                    n = int(meta.kv_lens[b] - start[b]) if b < len(ids) else 0
                    assert not leaf[b, n:].any(), f"layer {layer}: stale bits past the length of row {b}"


def gathered_bits(w: World, seq_id) -> list:
    """The bits of every page and scale array in ``seq_id``'s blocks (whole blocks), per layer."""
    out = []
    for view in w.cache.views:
        table = w.m.block_table(seq_id, view.group)
        g = view.gather(jnp.asarray(table)[None], jnp.asarray([table.size * BS], jnp.int32))
        out.append([np.asarray(a) for a in jax.tree_util.tree_leaves(g)])
    return out


@pytest.mark.parametrize("fmt, layout, offsets", WORLDS)
def test_isolation_fork_swap_and_checkpoint_of_quantized_pages(fmt, layout, offsets, tmp_path):
    w = World(fmt, layout, offsets)
    ids = list(range(len(EDGES)))
    for s, n in zip(ids, EDGES):
        w.admit(s, n)
    w.step(ids, EDGES)  # prefill into blocks full of stale bits and NaN scales
    for s in (0, 2):
        w.m.release(s)
        del w.ref[s]
    w.admit(10, 2 * BS + 1)  # takes the released blocks, partly
    w.step([10], [2 * BS + 1])
    # Fork in a partly filled block, then both write: the copy-on-write copy moves the scales too.
    w.m.fork(3, 11)
    w.ref[11] = [list(x) for x in w.ref[3]]
    live = [1, 3, 4, 10, 11]
    w.m.append(live, 1)
    w.step(live, [1] * len(live))
    # Swap out, let another sequence reuse the blocks, swap back: bit for bit.
    before = gathered_bits(w, 4)
    gone = pk.swap_out(w.cache, w.m, 4)
    w.admit(12, 3 * BS)
    w.step([12], [3 * BS])
    w.cache = pk.swap_in(w.cache, w.m, gone)
    n = w.m.kv_len(4)
    for a, b in zip(sum(before, []), sum(gathered_bits(w, 4), []), strict=True):
        np.testing.assert_array_equal(a[:, :n], b[:, :n])  # its own tokens: bit for bit
        assert not b[:, n:].any()  # past its length: zeros, not the previous owner's bits
    live = [1, 3, 4, 10, 11, 12]
    w.m.append(live, 1)
    w.step(live, [1] * len(live))
    # Checkpoint: every leaf (pages and scales) bit for bit, and decoding goes on alike.
    pk.save_checkpoint(tmp_path / "q.ckpt", w.cache, w.m)
    ck = pk.load_checkpoint(tmp_path / "q.ckpt", spec=w.spec)
    names = [str(p) for p, _ in jax.tree_util.tree_flatten_with_path(w.cache)[0]]
    assert any("scales" in n for n in names) == (fmt == "int8")
    for view, back in zip(w.cache.views, ck.cache.views, strict=True):
        for a, b in zip(jax.tree_util.tree_leaves(view.pages()), jax.tree_util.tree_leaves(back.pages()), strict=True):
            assert a.dtype == b.dtype
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
        np.testing.assert_array_equal(np.asarray(view.generations), np.asarray(back.generations))
        assert int(back.owner) == ck.manager.steps.owner  # the restored pages serve the restored manager


@pytest.mark.parametrize("layout, offsets", [("split", False), ("unified", False), ("unified", True)])
def test_insert_prefill_quantizes_like_the_write(layout, offsets):
    mu = key_offsets_like(np.random.default_rng(2), 2) if offsets else None
    s = spec(kv_format="int8", num_layers=2, kv_key_offsets=mu)
    m = pk.KVCacheManager(s)
    cache = pk.PagedKVCache.init(s, layout=layout)
    rng = np.random.default_rng(3)
    keys, values = outlier_values(rng, (2, 7, H, D)), outlier_values(rng, (2, 7, H, D))
    cache = insert_prefill(cache, m, 5, keys, values)
    for layer, view in enumerate(cache.views):
        kc, vc = view.codecs
        got_k, got_v = view.decode_gathered(view.gather(jnp.asarray(m.block_table(5, 0))[None], jnp.asarray([7])))
        np.testing.assert_array_equal(np.asarray(got_k)[0, :7], roundtrip(kc, keys[layer]))
        np.testing.assert_array_equal(np.asarray(got_v)[0, :7], roundtrip(vc, values[layer]))


def test_int8_scales_shard_with_their_heads_over_8_devices():
    """Sharded over a mesh, scales split on the heads axis like the pages, no collective
    in a step, and every step's keys/values and the final pages equal one device's."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    here = Path(__file__).parent
    done = subprocess.run([sys.executable, str(here / "sharded_quant_checks.py")], capture_output=True, text=True,
                          timeout=600, env=dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(here.parent)),
                          cwd=here)
    assert done.returncode == 0, done.stderr[-4000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report["device_count"] == 8
    for layout, local, leaves in (("split", 1, 6), ("unified", 2, 3)):
        r = report[layout]
        assert r["steps"] == r["steps_bit_equal"] >= 10 and r["pages_bit_equal"], r
        assert r["scale_leaves"] == leaves and r["scale_specs_ok"] and r["local_scale_heads"] == [local], r
        assert r["step_collectives"] == [] and r["donated"], r


def test_simulator_sizes_pools_and_bytes_by_format():
    """At equal memory the simulator's int8 pool holds ~1.94x the blocks, its bytes in use
    count the scales, and the contiguous baselines get the same bytes in int8 tokens."""
    from paged_kv.sim import load_trace, simulate
    from paged_kv.sim.backends import equal_memory_slots

    model = dict(num_layers=4, block_size=16, num_kv_heads=8, head_dim=128, dtype="bfloat16", max_batch_slots=64,
                 max_blocks_per_seq=256)
    bf16, int8 = (pk.CacheSpec.for_memory(2**26, **model, **kw) for kw in ({}, dict(kv_format="int8")))
    assert equal_memory_slots(int8) == (int8.num_blocks - 1) * 16
    trace = load_trace().head(150)
    a, b = simulate(trace, bf16), simulate(trace, int8)
    assert b.peak_used_bytes <= int8.pool_bytes and b.peak_used_bytes % int8.bytes_per_block == 0
    assert b.mean_running > 1.5 * a.mean_running


def test_cli_kv_dtype_int8_sizes_the_pool_with_scales(capsys):
    import json

    from paged_kv.cli import main

    assert main(["simulate", "--limit", "20", "--kv-dtype", "int8", "--json", "--progress", "off"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["pool_bytes"] == 8192 * 16 * 32 * (2 * 8 * 128 + 2 * 8 * 4)  # llama3-8b, int8 + f32 scales


@partial(jax.jit, donate_argnums=0)
def _attend_step(cache, qs, ks, vs, meta):
    """Per layer: the in-place attention output, and the same attention over `read`."""
    from tiny_model import attention

    outs, views = [], []
    for i, view in enumerate(cache.views):
        out, new = view.attention(qs[i], ks[i], vs[i], meta, chunk_blocks=1)
        keys, values = new.read(meta)
        dense = attention(qs[i], keys, values, new.mask(meta).dense(keys.shape[1]))
        outs.append((out.reshape(dense.shape), dense))
        views.append(new)
    return tuple(outs), pk.PagedKVCache(tuple(views))


@pytest.mark.parametrize("fmt, layout, offsets", WORLDS)
def test_in_place_attention_dequantizes_each_chunk(fmt, layout, offsets):
    """`view.attention` (chunks gathered from the pages, decoded one by one, f32
    accumulation) equals attention over the dequantized `read`, in pools whose every
    stale slot holds garbage and NaN scales (and key offsets added back on both paths)."""
    w = World(fmt, layout, offsets)
    rng = np.random.default_rng(5)
    lengths = {0: 1, 1: BS + 1, 2: 2 * BS, 3: 3 * BS + 2}
    for s, n in lengths.items():
        w.admit(s, n)
    ids, counts = list(lengths), list(lengths.values())
    for step in range(3):
        meta = w.m.step_metadata(ids, counts)
        shape = (2, meta.batch_size, meta.query_len)
        qs = jnp.asarray(rng.normal(size=(*shape, 2 * H, D)) * 0.1, jnp.float32)  # logits O(1..10)
        ks, vs = (jnp.asarray(outlier_values(rng, (*shape, H, D))) for _ in range(2))
        ks = ks + jnp.asarray(w.mu)[:, None, None]  # the keys' constant part (zero without offsets)
        outs, w.cache = _attend_step(w.cache, tuple(qs), tuple(ks), tuple(vs), meta.to_device())
        w.m.commit(ids)
        for layer, (out, dense) in enumerate(outs):
            out, dense = np.asarray(out), np.asarray(dense)
            assert np.isfinite(out).all(), f"layer {layer}: a stale value or scale reached the output"
            for b, n in enumerate(counts):  # real queries only; padding queries are undefined in the reference
                # Same dequantized keys and values, float32 sums in another order.
                np.testing.assert_allclose(out[b, :n], dense[b, :n], rtol=1e-5, atol=1e-5 * np.abs(dense).max())
        w.m.append(ids, 1)
        counts = [1] * len(ids)


@pytest.mark.parametrize("layout", ["split", "unified"])
def test_rotated_attention_with_key_dim_not_value_dim(layout):
    """MLA-like shapes: keys and values rotated by Hadamard blocks of their own dims
    (16 and 8). In-place attention (rotated query, un-rotated output) equals attention
    over the un-rotated `read`, and `read` is within the format bound of what was written."""
    from tiny_model import attention

    s = pk.CacheSpec(num_layers=1, num_blocks=9, block_size=BS, max_blocks_per_seq=4, max_batch_slots=2,
                     key_heads=2, value_heads=2, key_dim=16, value_dim=8, dtype="float32", kv_format="int8")
    assert quant.rotation_blocks(s) == (16, 8)
    m = pk.KVCacheManager(s)
    cache = poisoned(pk.PagedKVCache.init(s, layout=layout))
    lengths = [5, 2 * BS + 1]
    for i, n in enumerate(lengths):
        m.admit(i, n)
    meta = m.step_metadata([0, 1], lengths)
    rng = np.random.default_rng(11)
    shape = (meta.batch_size, meta.query_len)
    q = jnp.asarray(rng.normal(size=(*shape, 4, 16)) * 0.2, jnp.float32)
    k, v = outlier_values(rng, (*shape, 2, 16)), outlier_values(rng, (*shape, 2, 8))

    @jax.jit
    def step(cache, q, k, v, meta):
        out, view = cache[0].attention(q, k, v, meta)
        keys, values = view.read(meta)
        return out, keys, values, attention(q, keys, values, view.mask(meta).dense(keys.shape[1]))

    out, keys, values, dense = (np.asarray(a) for a in step(cache, q, jnp.asarray(k), jnp.asarray(v), meta.to_device()))
    kc, vc = quant.codecs(s, 0)
    for b, n in enumerate(lengths):
        np.testing.assert_allclose(out[b, :n].reshape(n, -1), dense[b, :n], rtol=1e-5, atol=1e-5 * np.abs(dense).max())
        assert_within_format(kc, keys[b, :n], k[b, :n], f"keys of row {b}")
        assert_within_format(vc, values[b, :n], v[b, :n], f"values of row {b}")


def test_a_view_refuses_pages_its_spec_does_not_describe():
    """bf16 pages under an int8 spec (same block geometry, so metadata fits): every entry
    point refuses them before writing, instead of scattering uint8 bits into uint16 pages."""
    import dataclasses

    s8 = spec(kv_format="int8", num_layers=1)
    view = dataclasses.replace(pk.PagedKVCache.init(spec(num_layers=1))[0], spec=s8)
    m = pk.KVCacheManager(s8)
    m.admit(0, 3)
    meta = m.step_metadata([0], 3).to_device()
    k = jnp.zeros((1, meta.positions.shape[1], H, D), jnp.float32)
    q = jnp.zeros((1, meta.positions.shape[1], 2 * H, D), jnp.float32)
    for call in (lambda: view.write(k, k, meta), lambda: view.read(meta), lambda: view.attention(q, k, k, meta),
                 lambda: view.concatenate_to_cache(None, k, k, meta)):
        with pytest.raises(pk.ShapeError, match=r"key_pages is \(33, 4, 2, 8\) uint32; spec wants .* uint8"):
            call()


def test_checkpoints_written_before_rotation_load_unrotated(tmp_path, monkeypatch):
    """A file whose spec has no kv_rotation (written before it existed) holds unrotated
    pages: it loads with kv_rotation='none', and asking for the new default is refused."""
    import attrs

    from paged_kv import checkpoint as ckpt

    s = spec(kv_format="int8", kv_rotation="none", num_layers=1)
    m = pk.KVCacheManager(s)
    x = outlier_values(np.random.default_rng(2), (1, 6, H, D))
    cache = insert_prefill(pk.PagedKVCache.init(s), m, 0, x, x)
    fields = ckpt.spec_fields
    monkeypatch.setattr(ckpt, "spec_fields", lambda sp: {k: v for k, v in fields(sp).items() if k != "kv_rotation"})
    pk.save_checkpoint(tmp_path / "old.ckpt", cache, m)
    monkeypatch.undo()
    loaded = pk.load_checkpoint(tmp_path / "old.ckpt")
    assert loaded.spec == s and loaded.spec.kv_rotation == "none"
    with pytest.raises(pk.CheckpointError, match="kv_rotation='none' vs 'auto'"):
        pk.load_checkpoint(tmp_path / "old.ckpt", spec=attrs.evolve(s, kv_rotation="auto"))


def test_swap_in_refuses_pages_of_another_encoding():
    """Same geometry, other rotation: the swapped bytes would decode to other values, so
    `swap_in` refuses them and changes nothing; into an equal spec they round-trip."""
    import attrs

    s = spec(kv_format="int8", num_layers=1)
    x = outlier_values(np.random.default_rng(4), (1, 6, H, D))
    m = pk.KVCacheManager(s)
    cache = insert_prefill(pk.PagedKVCache.init(s), m, 0, x, x)

    def bits():
        view, table = cache[0], jnp.asarray(m.block_table(0, 0))[None]
        return [np.asarray(a) for a in jax.tree_util.tree_leaves(view.gather(table, jnp.asarray([6])))]

    before = bits()
    gone = pk.swap_out(cache, m, 0)
    other = attrs.evolve(s, kv_rotation="none")
    m2 = pk.KVCacheManager(other)
    with pytest.raises(pk.SpecError, match=r"swapped out of a cache for .*Hadamard.*\(not rotated\)"):
        pk.swap_in(pk.PagedKVCache.init(other), m2, gone)
    assert 0 not in m2 and m2.check_integrity() is None
    cache = pk.swap_in(cache, m, gone)
    for a, b in zip(before, bits(), strict=True):
        np.testing.assert_array_equal(a, b)
