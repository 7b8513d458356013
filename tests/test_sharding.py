"""Pages sharded over 8 fake CPU devices behave exactly like pages on one device.

The checks run in a subprocess (tests/sharded_checks.py), because the fake device
count must be set before jax is imported and the rest of the suite runs on one.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from jax.sharding import Mesh

import paged_kv as pk
from paged_kv.sharding import page_sharding

HERE = Path(__file__).parent


@pytest.fixture(scope="module")
def report() -> dict:
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    done = subprocess.run([sys.executable, str(HERE / "sharded_checks.py")], capture_output=True, text=True,
                          timeout=600, env=env, cwd=HERE.parent)
    assert done.returncode == 0, done.stderr[-4000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("layout, local_heads", [("split", 1), ("unified", 2)])
def test_sharded_pages_equal_single_device_bit_for_bit(report, layout, local_heads):
    r = report[layout]
    assert report["device_count"] == 8
    # Every step (prefill at block edges, decode, fork + copy-on-write, slot insertion,
    # swap out / reuse / swap in) returned the same key and value bits, and the pages match.
    assert r["steps"] == r["steps_bit_equal"] >= 10
    assert r["pages_bit_equal"]
    # Each page tensor is split over all 8 devices on its head axis (unified: whole
    # (key, value) pairs), and the jitted step consumed the donated pages.
    assert r["page_specs_ok"] and r["devices_per_page"] == [8]
    assert r["local_head_axis"] == [local_heads] and r["full_head_axis"] == 8 * local_heads
    assert r["donated"]


def test_no_collective_touches_the_pages(report):
    assert report["detector_sees"] == ["all-gather"]  # the HLO check can see one
    for layout in ("split", "unified"):
        assert report[layout]["step_collectives"] == []
        assert report[layout]["swap_gather_collectives"] == []
        assert report[layout]["insert_collectives"] == []


@pytest.mark.parametrize("layout", ["split", "unified"])
def test_in_place_attention_on_sharded_pages(report, layout):
    """`view.attention` (write + attend to the pages in place) with pages and queries
    split by head over 8 devices: the same outputs as on one device, and no
    collective in the compiled step (each device attends with its own heads)."""
    r = report["attention"][layout]
    assert r["steps"] == 3 and r["pages_sharded"] and r["finite"]
    assert r["max_rel_diff"] <= 1e-6, r  # per-device shapes may reassociate sums: not always bit-equal
    # Keys and values N(0, 1): a real softmax (the largest weight 0.6 on average, where
    # saturated inputs give 1), which both runs compute as numpy does (outputs of order one).
    assert r["mean_top_weight"] < 0.75 and r["max_ref_err"] <= 1e-5, r
    assert r["collectives"] == []


def test_two_data_parallel_replicas(report):
    dp = report["data_parallel"]
    assert dp["steps"] == dp["steps_bit_equal"] > 0
    assert dp["replica_devices"] == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert all(dp["placed"]) and sorted(sum(dp["placed"], [])) == list(range(6))


def test_bad_shardings_are_refused():
    import jax

    mesh = Mesh(np.array(jax.devices()[:1]), ("tp",))
    spec = pk.CacheSpec(num_layers=1, num_blocks=4, block_size=4, max_blocks_per_seq=2, num_kv_heads=2,
                        head_dim=4, dtype="float32")
    with pytest.raises(pk.SpecError, match="head_axis='model' is not an axis"):
        page_sharding(spec, mesh, "model")
    with pytest.raises(pk.SpecError, match="give both"):
        pk.PagedKVCache.init(spec, mesh=mesh)
    with pytest.raises(pk.SpecError, match="not both"):
        pk.PagedKVCache.init(spec, device=jax.devices()[0], mesh=mesh, head_axis="tp")
    mla = pk.CacheSpec(num_layers=1, num_blocks=4, block_size=4, max_blocks_per_seq=2, key_heads=2, key_dim=8,
                       value_heads=2, value_dim=4, dtype="float32")
    with pytest.raises(pk.SpecError, match="no head axis"):
        page_sharding(mla, mesh, "tp", layout="unified")
    fake3 = type("M", (), {})()
    with pytest.raises(pk.SpecError, match="must be a jax.sharding.Mesh"):
        page_sharding(spec, fake3, "tp")
    # One-device mesh: sharded init works and equals the plain one.
    cache = pk.PagedKVCache.init(spec, mesh=mesh, head_axis="tp")
    assert cache.views[0].key_pages.shape == (4, 4, 2, 4)
