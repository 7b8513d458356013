"""Run on 8 fake CPU devices (a subprocess of tests/test_quant.py): int8 pages and their
per-token scales (and key offsets) sharded over heads behave exactly like pages on one device.

Reuses the serving history of `sharded_checks` (prefill at block edges, decode,
fork + copy-on-write, slot insertion, swap out / reuse / swap in) with an int8 spec.
Prints one JSON line of findings; the test asserts them.
"""

from __future__ import annotations

import sharded_checks as base  # first: it sets the fake device count before jax is imported

import json  # noqa: E402

import jax  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import Mesh, NamedSharding, PartitionSpec  # noqa: E402

import paged_kv as pk  # noqa: E402

base.SPEC = pk.CacheSpec(num_layers=3, num_blocks=32, block_size=4, max_blocks_per_seq=8, max_batch_slots=8,
                         num_kv_heads=base.HEADS, head_dim=base.DIM, dtype="bfloat16", sliding_window=6,
                         sliding_layers=(1,), sliding_num_blocks=24, kv_format="int8",
                         # key offsets (a replicated constant) must shard with the heads they add to
                         kv_key_offsets=np.random.default_rng(3).normal(0, 8, (3, base.HEADS, base.DIM)))


def main() -> None:
    mesh = Mesh(np.array(jax.devices()), ("tp",))
    out = {"device_count": jax.device_count()}
    for layout in ("split", "unified"):
        sharded = base.Run(layout, mesh=mesh)
        single = base.Run(layout, device=jax.devices()[0])
        r = out[layout] = base.scenario([sharded, single], np.random.default_rng(7))
        leaves = jax.tree_util.tree_flatten_with_path(sharded.cache)[0]
        scales = [x for p, x in leaves if "scales" in jax.tree_util.keystr(p)]
        r["scale_leaves"] = len(scales)
        r["scale_specs_ok"] = all(isinstance(x.sharding, NamedSharding)
                                  and x.sharding.spec == PartitionSpec(None, None, "tp") for x in scales)
        r["local_scale_heads"] = sorted({s.data.shape[2] for x in scales for s in x.addressable_shards})
        r["step_collectives"] = base.collectives(sharded.hlo[0])
        r["donated"] = sharded.donated
    print(json.dumps(out))


if __name__ == "__main__":
    main()
