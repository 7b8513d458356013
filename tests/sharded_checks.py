"""Run on 8 fake CPU devices (a subprocess of tests/test_sharding.py): the same serving
steps on pages sharded over a mesh and on one device, compared bit for bit.

Prints one JSON line of findings; the test asserts them. Kept out of the main test
process because the device count must be set before jax is imported.
"""

from __future__ import annotations

import os

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import json  # noqa: E402
import re  # noqa: E402
from functools import partial  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import Mesh, NamedSharding, PartitionSpec  # noqa: E402

import paged_kv as pk  # noqa: E402
from paged_kv import sequence_pages, swap as swap_module  # noqa: E402
from paged_kv.sharding import replicated  # noqa: E402

HEADS, DIM = 8, 4
SPEC = pk.CacheSpec(num_layers=3, num_blocks=32, block_size=4, max_blocks_per_seq=8, max_batch_slots=8,
                    num_kv_heads=HEADS, head_dim=DIM, dtype="bfloat16", sliding_window=6, sliding_layers=(1,),
                    sliding_num_blocks=24)
COLLECTIVES = ("all-gather", "all-to-all", "all-reduce", "reduce-scatter", "collective-permute")


@partial(jax.jit, donate_argnums=0)
def step(cache, k, v, meta):
    outs, views = [], []
    for i, view in enumerate(cache.views):
        keys, values, _, new = view.concatenate_to_cache(None, k[i], v[i], meta)
        outs.append((keys, values))
        views.append(new)
    return pk.PagedKVCache(tuple(views)), tuple(outs)


@partial(jax.jit, donate_argnums=0)
def attention_step(cache, q, k, v, meta):
    """Every layer's fused write + in-place attention (`view.attention`)."""
    outs, views = [], []
    for i, view in enumerate(cache.views):
        out, new = view.attention(q[i], k[i], v[i], meta)
        outs.append(out)
        views.append(new)
    return pk.PagedKVCache(tuple(views)), tuple(outs)


def collectives(hlo: str) -> list[str]:
    return sorted({c for c in COLLECTIVES if re.search(rf"\b{c}(-start)?\(", hlo) or f" {c}" in hlo})


class Run:
    """One replica: a manager and a cache, sharded over ``mesh`` or on ``device``."""

    def __init__(self, layout: str, mesh: Mesh | None = None, device=None):
        self.manager = pk.KVCacheManager(SPEC)
        self.mesh = mesh
        self.cache = pk.PagedKVCache.init(SPEC, layout=layout, mesh=mesh, head_axis="tp" if mesh else None,
                                          device=None if mesh else device)
        self.meta_place = replicated(mesh) if mesh else device
        # Keys/values as a tensor-parallel model would hand them over: split by head.
        self.kv_place = NamedSharding(mesh, PartitionSpec(None, None, None, "tp", None)) if mesh else device
        self.donated = True
        self.hlo: list[str] = []

    def run(self, seq_ids, counts, bits):
        meta = self.manager.step_metadata(seq_ids, counts)
        B, T = meta.batch_size, meta.query_len
        kb = jnp.asarray(bits["k"][:, :B, :T])
        vb = jnp.asarray(bits["v"][:, :B, :T])
        k = jax.device_put(jax.lax.bitcast_convert_type(kb, jnp.bfloat16), self.kv_place)
        v = jax.device_put(jax.lax.bitcast_convert_type(vb, jnp.bfloat16), self.kv_place)
        dmeta = meta.to_device(self.meta_place)
        if self.mesh is not None and len(self.hlo) < 1:
            self.hlo.append(step.lower(self.cache, k, v, dmeta).compile().as_text())
        old = jax.tree_util.tree_leaves(self.cache)
        self.cache, outs = step(self.cache, k, v, dmeta)
        self.donated &= all(x.is_deleted() for x in old)
        return [np.asarray(x).view(np.uint16) for pair in jax.device_get(outs) for x in pair]

    def pages(self):
        return [np.asarray(x).view(np.uint16) for x in jax.device_get(jax.tree_util.tree_leaves(self.cache)) if x.ndim >= 3]


def random_bits(rng, B=8, T=16):
    shape = (SPEC.num_layers, B, T, HEADS, DIM)
    return {"k": rng.integers(0x3C00, 0x4700, shape, dtype=np.uint16),
            "v": rng.integers(0x3C00, 0x4700, shape, dtype=np.uint16)}


def scenario(runs: list[Run], rng) -> dict:
    """Apply one serving history to every run; count steps whose outputs all agree."""
    agree = steps = 0

    def both(ids, counts):
        nonlocal agree, steps
        bits = random_bits(rng)
        results = [r.run(ids, counts, bits) for r in runs]
        steps += 1
        agree += all(all(np.array_equal(a, b) for a, b in zip(results[0], res)) for res in results[1:])

    lengths = {0: 1, 1: 3, 2: 4, 3: 5}  # block edges at block size 4
    for r in runs:
        for s, n in lengths.items():
            r.manager.admit(s, n)
    both(list(lengths), list(lengths.values()))
    for _ in range(5):
        for r in runs:
            r.manager.append(list(lengths), 1)
        both(list(lengths), 1)
    for r in runs:  # fork, then both write into the shared partial block: copy-on-write
        r.manager.fork(1, 10)
        r.manager.append([1, 10], 1)
    both([1, 10], 1)
    prefill = rng.integers(0x3C00, 0x4700, (SPEC.num_layers, 7, HEADS, DIM), dtype=np.uint16)
    keys = np.asarray(jax.lax.bitcast_convert_type(jnp.asarray(prefill), jnp.bfloat16))
    def donating(r: Run, call) -> None:
        old = jax.tree_util.tree_leaves(r.cache)
        r.cache = call()
        r.donated &= all(x.is_deleted() for x in old)

    for r in runs:  # slot insertion of a sequence prefilled elsewhere
        donating(r, lambda r=r: pk.insert_prefill(r.cache, r.manager, 20, keys, keys[::-1].copy()))
    both([20], 0)  # read the inserted sequence back
    gone = [swap_module.swap_out(r.cache, r.manager, 2) for r in runs]
    for r in runs:
        r.manager.admit(30, 9)  # takes blocks seq 2 left
    both([30], 9)
    for r, g in zip(runs, gone):
        donating(r, lambda r=r, g=g: swap_module.swap_in(r.cache, r.manager, g))
    live = [0, 1, 2, 3, 10, 20, 30]
    for _ in range(3):
        for r in runs:
            r.manager.append(live, 1)
        both(live, 1)
    pages = [r.pages() for r in runs]
    same_pages = all(all(np.array_equal(a, b) for a, b in zip(pages[0], p)) for p in pages[1:])
    return {"steps": steps, "steps_bit_equal": agree, "pages_bit_equal": same_pages}


def shard_report(run: Run, layout: str) -> dict:
    leaves = [x for x in jax.tree_util.tree_leaves(run.cache) if x.ndim >= 3]  # the pages (not the binding arrays)
    want = PartitionSpec(None, None, "tp", None)
    head_axis = 2
    full = leaves[0].shape[head_axis]
    local = {s.data.shape[head_axis] for x in leaves for s in x.addressable_shards}
    swap_hlo = sequence_pages.gather_sequence.lower(  # what swap_out (and a transfer's sender) runs
        run.cache, tuple(jnp.zeros(4, jnp.int32) for _ in SPEC.groups), jnp.zeros(len(SPEC.groups), jnp.int32),
        jnp.int32(9), run.manager.steps.tag).compile().as_text()
    from paged_kv.insertion import _write_prefill

    kv = jnp.zeros((SPEC.num_layers, 8, HEADS, DIM), jnp.bfloat16)
    slots = jnp.zeros((len(SPEC.groups), 8), jnp.int32)
    insert_hlo = _write_prefill.lower(run.cache, kv, kv, slots, slots, run.manager.steps.tag).compile().as_text()
    return {
        "insert_collectives": collectives(insert_hlo),
        "page_specs_ok": all(isinstance(x.sharding, NamedSharding) and x.sharding.spec == want for x in leaves),
        "devices_per_page": sorted({len(x.sharding.device_set) for x in leaves}),
        "full_head_axis": full,
        "local_head_axis": sorted(local),
        "donated": run.donated,
        "step_collectives": collectives(run.hlo[0]),
        "swap_gather_collectives": collectives(swap_hlo),
    }


def data_parallel(rng) -> dict:
    """Two replicas, each its own manager and pool on 4 devices, one scheduler loop;
    each compared with the same replica run on one device."""
    devs = jax.devices()
    meshes = [Mesh(np.array(devs[:4]), ("tp",)), Mesh(np.array(devs[4:]), ("tp",))]
    replicas = [Run("split", mesh=m) for m in meshes]
    references = [Run("split", device=devs[0]) for _ in meshes]
    requests = [5, 9, 2, 13, 7, 4]
    placed: list[list[int]] = [[], []]
    agree = steps = 0
    for seq, n in enumerate(requests):  # the scheduler puts each request where most blocks are free
        i = max(range(2), key=lambda r: (replicas[r].manager.num_free_blocks, -r))
        for r in (replicas[i], references[i]):
            r.manager.admit(seq, n)
        bits = random_bits(rng)
        agree += all(np.array_equal(a, b) for a, b in zip(replicas[i].run([seq], [n], bits),
                                                          references[i].run([seq], [n], bits)))
        steps += 1
        placed[i].append(seq)
    for _ in range(3):
        for i in range(2):
            for r in (replicas[i], references[i]):
                r.manager.append(placed[i], 1)
            bits = random_bits(rng)
            agree += all(np.array_equal(a, b) for a, b in zip(replicas[i].run(placed[i], 1, bits),
                                                              references[i].run(placed[i], 1, bits)))
            steps += 1
    homes = [sorted(d.id for x in jax.tree_util.tree_leaves(r.cache) for d in x.sharding.device_set) for r in replicas]
    return {"steps": steps, "steps_bit_equal": agree, "placed": placed,
            "replica_devices": [sorted(set(h)) for h in homes]}


def normal_kv(rng, B=8, T=16) -> dict:
    """Keys and values drawn N(0, 1) and rounded to the pages' bfloat16: logits of order
    one, so attention is a real softmax over many keys (saturated bit patterns, as
    `random_bits` draws for the steps that only move bits, make it one-hot)."""
    shape = (SPEC.num_layers, B, T, HEADS, DIM)
    return {n: rng.normal(size=shape).astype(jnp.bfloat16) for n in ("k", "v")}


def reference_attention(q, keys, values, pos, window) -> tuple[np.ndarray, np.ndarray]:
    """numpy (float64) softmax attention of q [Hq, D] at ``pos`` over keys/values [L, H, D]
    (the last ``window`` positions for a sliding layer); also each head's largest weight."""
    lo = 0 if window is None else max(0, pos - window + 1)
    k, v = keys[lo : pos + 1], values[lo : pos + 1]
    group = q.shape[0] // k.shape[1]
    logits = np.einsum("hd,lhd->hl", q, np.repeat(k, group, axis=1)) * DIM**-0.5
    p = np.exp(logits - logits.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    return np.einsum("hl,lhd->hd", p, np.repeat(v, group, axis=1)), p.max(-1)


def attention_check(layout: str, mesh: Mesh, rng) -> dict:
    """The fused attention step on sharded pages (queries split by head like the pages)
    and on one device: outputs compared with each other and with a numpy softmax over
    every sequence's keys so far, and the compiled step searched for collectives."""
    runs = [Run(layout, mesh=mesh), Run(layout, device=jax.devices()[0])]
    q_place = [NamedSharding(mesh, PartitionSpec(None, None, None, "tp", None)), jax.devices()[0]]
    hlo, steps, bit_equal, max_diff, max_ref_err, top = None, 0, 0, 0.0, 0.0, []
    windows = [SPEC.sliding_window if i in SPEC.sliding_layers else None for i in range(SPEC.num_layers)]
    hist: dict[tuple[int, int], tuple[np.ndarray, np.ndarray]] = {}  # (seq, layer) -> keys, values so far
    history = [({0: 1, 1: 3, 2: 4, 3: 5, 4: 9}, None), ({s: 1 for s in range(5)}, None), ({1: 1, 10: 1}, (1, 10))]
    for new, fork in history:
        qb = rng.normal(size=(SPEC.num_layers, 8, 16, 2 * HEADS, DIM)).astype(np.float32)
        kv = normal_kv(rng)
        outs = []
        for r, qp in zip(runs, q_place):
            if fork is not None:
                r.manager.fork(*fork)
            known = [s for s in new if s in r.manager]
            for s in new:
                if s not in r.manager:
                    r.manager.admit(s, new[s])
            if known:
                r.manager.append(known, [new[s] for s in known])
            meta = r.manager.step_metadata(list(new), list(new.values()))
            b, t = meta.batch_size, meta.query_len
            q = jax.device_put(jnp.asarray(qb[:, :b, :t]), qp)
            k = jax.device_put(jnp.asarray(kv["k"][:, :b, :t]), r.kv_place)
            v = jax.device_put(jnp.asarray(kv["v"][:, :b, :t]), r.kv_place)
            dmeta = meta.to_device(r.meta_place)
            if r.mesh is not None and hlo is None:
                hlo = attention_step.lower(r.cache, q, k, v, dmeta).compile().as_text()
            r.cache, out = attention_step(r.cache, q, k, v, dmeta)
            outs.append([np.asarray(o) for o in out])
        steps += 1
        bit_equal += all(np.array_equal(a, b) for a, b in zip(*outs))
        max_diff = max(max_diff, max(float(np.abs(a - b).max() / max(np.abs(b).max(), 1.0)) for a, b in zip(*outs)))
        if fork is not None:
            for layer in range(SPEC.num_layers):
                hist[(fork[1], layer)] = hist[(fork[0], layer)]
        for layer in range(SPEC.num_layers):
            for row, (seq, n) in enumerate(new.items()):
                old_k, old_v = hist.get((seq, layer), (np.zeros((0, HEADS, DIM)), np.zeros((0, HEADS, DIM))))
                keys = np.concatenate([old_k, kv["k"][layer, row, :n].astype(np.float64)])
                values = np.concatenate([old_v, kv["v"][layer, row, :n].astype(np.float64)])
                hist[(seq, layer)] = (keys, values)
                for tok in range(n):
                    want, weight = reference_attention(qb[layer, row, tok].astype(np.float64), keys, values,
                                                       len(old_k) + tok, windows[layer])
                    top.extend(weight.tolist())
                    for out in outs:
                        max_ref_err = max(max_ref_err, float(np.abs(out[layer][row, tok] - want).max()))
    sharded_out = runs[0].cache.views[0]
    return {"steps": steps, "steps_bit_equal": bit_equal, "max_rel_diff": max_diff, "max_ref_err": max_ref_err,
            "mean_top_weight": float(np.mean(top)), "max_top_weight": float(np.max(top)),
            "collectives": collectives(hlo), "finite": bool(np.isfinite(max_diff)),
            "pages_sharded": len(jax.tree_util.tree_leaves(sharded_out)[0].sharding.device_set) == 8}


def main() -> None:
    assert jax.device_count() == 8, jax.devices()
    mesh = Mesh(np.array(jax.devices()), ("tp",))
    out = {"device_count": jax.device_count()}
    for layout in ("split", "unified"):
        sharded = Run(layout, mesh=mesh)
        single = Run(layout, device=jax.devices()[0])
        out[layout] = scenario([sharded, single], np.random.default_rng(7))
        out[layout].update(shard_report(sharded, layout))
        sharded.manager.check_integrity()
    out["data_parallel"] = data_parallel(np.random.default_rng(11))
    out["attention"] = {layout: attention_check(layout, mesh, np.random.default_rng(13)) for layout in ("split", "unified")}
    # The detector itself: gathering sharded pages onto every device must show up.
    pages = jax.tree_util.tree_leaves(Run("split", mesh=mesh).cache)[0]
    gathered = jax.jit(lambda x: x * 1, out_shardings=replicated(mesh)).lower(pages).compile().as_text()
    out["detector_sees"] = collectives(gathered)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
