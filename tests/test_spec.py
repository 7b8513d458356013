import pytest

import paged_kv as pk


def make(**kw):
    base = dict(num_layers=2, num_blocks=64, block_size=16, max_blocks_per_seq=8, num_kv_heads=2, head_dim=8)
    base.update(kw)
    return pk.CacheSpec(**base)


def test_memory_math():
    s = make(dtype="bfloat16")
    assert s.bytes_per_token_per_layer == (2 * 8 + 2 * 8) * 2
    assert s.bytes_per_token == 2 * 64
    assert s.bytes_per_block == 16 * 128
    assert s.pool_bytes == 64 * 16 * 128
    assert s.usable_blocks == 63 and s.max_seq_len == 128
    assert [s.blocks_for(n) for n in (0, 1, 15, 16, 17, 32, 33)] == [0, 1, 1, 1, 2, 2, 3]


def test_separate_key_and_value_shapes():
    s = make(num_kv_heads=None, head_dim=None, key_heads=4, value_heads=2, key_dim=16, value_dim=8, dtype="float32")
    assert s.bytes_per_token_per_layer == (4 * 16 + 2 * 8) * 4


def test_for_memory_derives_num_blocks():
    s = pk.CacheSpec.for_memory(2**20, num_layers=2, block_size=16, num_kv_heads=2, head_dim=8, dtype="float32")
    assert s.num_blocks == 2**20 // s.bytes_per_block
    assert s.pool_bytes <= 2**20


@pytest.mark.parametrize(
    "kw,fragment",
    [
        (dict(num_layers=0), "num_layers=0"),
        (dict(num_blocks=-3), "num_blocks=-3"),
        (dict(block_size=2.5), "block_size=2.5"),
        (dict(num_blocks=1), "num_blocks=1"),
        (dict(max_blocks_per_seq=64), "max_blocks_per_seq=64"),
        (dict(dtype="int8"), "int8"),
        (dict(dtype="nonsense"), "nonsense"),
        (dict(head_dim=None), "key_dim"),
        (dict(num_kv_heads=True), "num_kv_heads=True"),
        (dict(num_blocks=2**28, block_size=16, max_blocks_per_seq=8), "overflow"),
    ],
)
def test_invalid_spec_names_the_value(kw, fragment):
    with pytest.raises(pk.SpecError, match=fragment.replace(".", r"\.")):
        make(**kw)


def test_spec_is_frozen_and_hashable():
    s = make()
    with pytest.raises(Exception):
        s.num_layers = 3
    assert hash(s) == hash(make())
