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
    # Each block also costs an int32 generation per layer, each layer an int32 owner (`paged_kv.binding`).
    assert s.num_blocks == (2**20 - 2 * 4) // (s.bytes_per_block + 2 * 4)
    assert s.device_bytes <= 2**20 < s.device_bytes + s.bytes_per_block + 2 * 4  # one block more would not fit
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


def test_chunked_layers_form_the_third_group():
    s = make(num_layers=5, sliding_window=32, sliding_layers=(3, 1), attention_chunk_size=24, chunked_layers=(4, 2),
             chunked_num_blocks=20)
    assert [g.kind for g in s.groups] == ["full", "sliding", "chunked"]
    assert [g.layers for g in s.groups] == [(0,), (1, 3), (2, 4)]
    assert s.groups[2].chunk == 24 and s.groups[2].window is None and s.groups[1].chunk is None
    assert [s.group_of(i) for i in range(5)] == [0, 1, 2, 1, 2]
    assert s.pool_signature() == (16, ((64, None, None), (64, 32, None), (20, None, 24)))
    assert s.pool_bytes == s.bytes_per_token_per_layer * 16 * (64 * 1 + 64 * 2 + 20 * 2)
    assert "2 chunked (chunk 24)" in s.describe() and "2 sliding (window 32)" in s.describe()
    only = make(attention_chunk_size=5, chunked_layers=(0, 1))  # a chunk smaller than a block is exact too
    assert [g.kind for g in only.groups] == ["chunked"]
    assert make().pool_signature() != make(attention_chunk_size=16, chunked_layers=(1,)).pool_signature()


def test_a_group_is_never_both_sliding_and_chunked():
    with pytest.raises(pk.SpecError, match="sliding or chunked, not both"):
        pk.LayerGroup(layers=(0,), window=8, num_blocks=4, chunk=8)


def test_chunked_spec_round_trips_through_the_checkpoint_header():
    """The checkpoint header stores the spec's init fields as JSON: a chunked spec comes
    back equal, and a header written before the chunk fields existed still loads."""
    import json

    import paged_kv.checkpoint as ckpt

    s = make(num_layers=3, attention_chunk_size=24, chunked_layers=(2,), chunked_num_blocks=10)
    header = json.loads(json.dumps({"spec": ckpt.spec_fields(s)}))
    assert ckpt.spec_from_header(header, "x") == s
    old = {k: v for k, v in ckpt.spec_fields(make()).items()
           if k not in ("attention_chunk_size", "chunked_layers", "chunked_num_blocks")}
    assert ckpt.spec_from_header({"spec": old}, "x") == make()
