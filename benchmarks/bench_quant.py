"""Quantized pages: accuracy, memory, concurrency and speed of int8 and fp8 against bf16.

What is measured, and why:

(a) Accuracy: the keys and values attention sees after a prefill (`insert_prefill`)
    and one decode write (`concatenate_to_cache`), pages read back and dequantized,
    and the attention output of 8 queries x 32 heads over them, against the same
    with bf16 pages: relative L2 and max abs error, at contexts of 1k to 8k tokens.
    Three key/value distributions (`outlier_kv`): no outlier channels; outlier
    channels 10-50x the rest holding a consistent magnitude (as observed in LLM
    keys); and zero-mean outlier channels 10-50x noisier (the worst case). Queries
    are scaled so that logits vary from token to token with a standard deviation of
    1 (flat softmax) or 3 (peaked): a logit error moves the output in proportion to
    that spread, so the figures are given for both. fp8 is run with the default
    scale 1.0 and with per-head scales calibrated on a separate sample (absmax x
    1.25 / 448). bf16 pages against float32 pages are given for scale.
(b) Memory: bytes per token of an 8B-class model (32 layers, 8 KV heads x 128) per
    format, scales included, and the sequences running at once when the bundled
    Azure conversation trace is replayed (`paged_kv.sim.simulate`) at equal memory
    (16 GiB pools sized by `CacheSpec.for_memory`, batch limit 1024 so memory binds).
(c) Speed: one jitted decode step (write, read, attention) of B sequences x 1,024
    tokens, one layer, per format, timed interleaved against bf16 pages in the same
    process (medians), through the gathered view (`concatenate_to_cache` + dense
    attention) and through `view.attention` (pages read in place, dequantized chunk
    by chunk); and the quantized decode write into a 1 GiB vs a 64 MiB pool:
    a ratio near 1 means the write is still in place, O(tokens).
(d) Greedy decode of the real-model fixtures (tests/fixtures/hf: tiny random Llama
    and Mistral checkpoints made by transformers, through `paged_kv.models`) for 64
    steps: token agreement of int8 and fp8 pages with bf16 pages.

Usage: PYTHONPATH=. python benchmarks/bench_quant.py [--quick]. Prints a final JSON line.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(__file__))
from _report import finish_report, start_report  # noqa: E402

import paged_kv as pk  # noqa: E402
from paged_kv import quant  # noqa: E402
from paged_kv.insertion import insert_prefill  # noqa: E402
from paged_kv.sim import load_trace, simulate  # noqa: E402

HEADS, DIM, Q_PER_KV, BLOCK = 8, 128, 4, 16
MODEL = dict(num_layers=32, block_size=BLOCK, num_kv_heads=HEADS, head_dim=DIM, dtype="bfloat16")


# ---- data --------------------------------------------------------------------------------
KINDS = ("gaussian", "offset", "zero_mean")


def outlier_kv(rng, length: int, kind: str = "offset", model_seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Keys with 4 outlier channels per head (10-50x the rest), values with 2 (10-20x), float32.

    Which channels, and how large, is fixed by ``model_seed`` (a model's outlier
    channels are a property of its weights); the tokens come from ``rng``. ``kind``:
    "offset" -- an outlier channel holds a consistent magnitude (random sign) that
    varies +-10 % from token to token, as observed in LLM keys (KIVI; "massive
    activations"); "zero_mean" -- the worst case: the channel is 10-50x noisier
    than the rest, so outliers dominate both the scales and the logits' spread;
    "gaussian" -- no outlier channels (for reference).
    """
    model = np.random.default_rng(model_seed)

    def draw(n_out, lo, hi):
        x = rng.normal(size=(length, HEADS, DIM)).astype(np.float32)
        for h in range(HEADS):
            ch = model.choice(DIM, n_out, replace=False)
            mag = (model.uniform(lo, hi, size=n_out) * model.choice([-1, 1], size=n_out)).astype(np.float32)
            if kind == "offset":
                x[:, h, ch] = mag * (1 + 0.1 * x[:, h, ch])
            elif kind == "zero_mean":
                x[:, h, ch] *= np.abs(mag)
        return x
    return draw(4, 10, 50), draw(2, 10, 20)


def queries(rng, keys: np.ndarray, logit_std: float, n: int = 8) -> np.ndarray:
    """``[n, heads*Q_PER_KV, dim]`` queries whose logits against ``keys`` vary from token
    to token with a standard deviation of ``logit_std`` (1: a flat softmax, 3: peaked)."""
    q = rng.normal(size=(n, HEADS * Q_PER_KV, DIM)).astype(np.float32)
    logits = np.einsum("qhd,khd->hqk", q[:, ::Q_PER_KV], keys[:1024]) / np.sqrt(DIM)
    return q * (logit_std / np.mean(np.std(logits, axis=-1)))


@jax.jit
def attend_all(q, keys, values):
    """q ``[n, Hq, D]`` against one sequence's keys/values ``[S, H, D]``, float32."""
    k = jnp.repeat(keys.astype(jnp.float32), Q_PER_KV, axis=1)
    v = jnp.repeat(values.astype(jnp.float32), Q_PER_KV, axis=1)
    s = jnp.einsum("qhd,shd->qhs", q, k) / np.sqrt(q.shape[-1])
    return jnp.einsum("qhs,shd->qhd", jax.nn.softmax(s, axis=-1), v)


def attention(q, keys, values, kv_len):
    """q [B, Hq, D]; keys/values [B, S, H, D] -> [B, Hq, D] in float32, masked at kv_len."""
    k = jnp.repeat(keys.astype(jnp.float32), Q_PER_KV, axis=2)
    v = jnp.repeat(values.astype(jnp.float32), Q_PER_KV, axis=2)
    s = jnp.einsum("bhd,bshd->bhs", q.astype(jnp.float32), k) / np.sqrt(q.shape[-1])
    s = jnp.where(jnp.arange(k.shape[1])[None, None] < kv_len[:, None, None], s, -jnp.inf)
    return jnp.einsum("bhs,bshd->bhd", jax.nn.softmax(s, axis=-1), v)


@partial(jax.jit, donate_argnums=0)
def decode_step(cache, q, k, v, meta):
    """One layer's decode step: write the new token, read the pages, attend."""
    keys, values, mask, view = cache[0].concatenate_to_cache(q[:, None], k, v, meta)
    return attention(q, keys, values, meta.kv_lens), pk.PagedKVCache((view,))


@partial(jax.jit, donate_argnums=0)
def decode_step_in_place(cache, q, k, v, meta):
    """The same step through `view.attention`: the pages read in place, chunk by chunk."""
    out, view = cache[0].attention(q[:, None], k, v, meta)
    return out[:, 0], pk.PagedKVCache((view,))


# ---- (a) accuracy --------------------------------------------------------------------------
def layer_spec(fmt: str, num_blocks: int, dtype="bfloat16", batch=1, **kw) -> pk.CacheSpec:
    return pk.CacheSpec(num_layers=1, num_blocks=num_blocks, block_size=BLOCK, max_blocks_per_seq=num_blocks - 1,
                        max_batch_slots=batch, num_kv_heads=HEADS, head_dim=DIM, dtype=dtype, kv_format=fmt, **kw)


@jax.jit
def _write_read(cache, k, v, meta):
    keys, values, _, _ = cache[0].concatenate_to_cache(None, k, v, meta)
    return keys[0], values[0]


def through_cache(spec, keys, values) -> tuple[np.ndarray, np.ndarray]:
    """Prefill all but the last token (`insert_prefill`), write the last one as a decode
    step and read the pages back: the keys and values attention sees, dequantized."""
    m = pk.KVCacheManager(spec)
    cache = pk.PagedKVCache.init(spec)
    dt = pk.spec.compute_dtype(spec)
    cache = insert_prefill(cache, m, 0, keys[None, :-1].astype(dt), values[None, :-1].astype(dt))
    m.append([0], 1)
    meta = m.step_metadata([0], 1)
    k, v = _write_read(cache, jnp.asarray(keys[None, None, -1], dt), jnp.asarray(values[None, None, -1], dt),
                       meta.to_device())
    n = keys.shape[0]
    return k[:n], v[:n]


LOGIT_STDS = (1.0, 3.0)


def accuracy(contexts, rng, kind: str) -> dict:
    """Per context, format and logit spread: the attention output's error against bf16 pages."""
    # fp8 per-head scales calibrated on other tokens of the same "model" (its outlier
    # channels), as a serving stack calibrates on a sample of traffic.
    cal_k, cal_v = outlier_kv(np.random.default_rng(99), 4096, kind)
    scales = [(tuple(float(x) for x in np.abs(cal_k).max((0, 2)) * 1.25 / quant.FP8_MAX),
               tuple(float(x) for x in np.abs(cal_v).max((0, 2)) * 1.25 / quant.FP8_MAX))]
    results = {}
    nb = max(contexts) // BLOCK + 2  # one pool size for every context and kind: compiled once per shape
    for n in contexts:
        k, v = outlier_kv(np.random.default_rng(n), n, kind)
        qs = {std: jnp.asarray(queries(rng, k, std)) for std in LOGIT_STDS}
        ref_kv = through_cache(layer_spec("none", nb), k, v)
        ref = {std: np.asarray(attend_all(q, *ref_kv)) for std, q in qs.items()}
        specs = {"bf16_vs_f32": layer_spec("none", nb, "float32"), "int8": layer_spec("int8", nb),
                 "int8_bf16_scales": layer_spec("int8", nb, kv_scale_dtype="bfloat16"),
                 "fp8_scale_1": layer_spec("fp8", nb), "fp8_calibrated": layer_spec("fp8", nb, kv_fp8_scales=scales)}
        row = {}
        for name, spec in specs.items():
            kv = through_cache(spec, k, v)
            row[name] = {f"logit_std_{std:g}": errors(np.asarray(attend_all(q, *kv)), ref[std]) for std, q in qs.items()}
        results[str(n)] = row
        print(f"{kind} context {n}: " + ", ".join(
            f"{f} " + "/".join(f"{r['rel_l2']:.2%}" for r in e.values()) for f, e in row.items()), file=sys.stderr)
    return results


def errors(got: np.ndarray, ref: np.ndarray) -> dict:
    return {"rel_l2": float(np.linalg.norm(got - ref) / np.linalg.norm(ref)),
            "max_abs": float(np.abs(got - ref).max()), "ref_max_abs": float(np.abs(ref).max())}


# ---- (b) memory and concurrency -------------------------------------------------------------
FORMATS = {"bf16": {}, "int8": dict(kv_format="int8"), "int8_bf16_scales": dict(kv_format="int8", kv_scale_dtype="bfloat16"),
           "fp8": dict(kv_format="fp8")}


def memory(limit: int | None, pool_gib: float, max_batch: int) -> dict:
    trace = load_trace()
    if limit:
        trace = trace.head(limit)
    out = {"requests": len(trace), "pool_gib": pool_gib, "max_batch": max_batch, "formats": {}}
    for name, kw in FORMATS.items():
        spec = pk.CacheSpec.for_memory(int(pool_gib * 2**30), max_batch_slots=max_batch, max_blocks_per_seq=1024,
                                       **MODEL, **kw)
        r = simulate(trace, spec, max_batch=max_batch)
        out["formats"][name] = {"bytes_per_token": spec.bytes_per_token, "num_blocks": spec.num_blocks,
                                "pool_bytes": spec.pool_bytes, "mean_running": round(r.mean_running, 2),
                                "steps": r.steps, "preemptions": r.preemptions}
        print(f"{name}: {spec.bytes_per_token} B/token, {spec.num_blocks} blocks, mean running {r.mean_running:.1f}, "
              f"{r.steps} steps, {r.preemptions} preemptions", file=sys.stderr)
    base = out["formats"]["bf16"]
    out["concurrency_over_bf16"] = {n: round(f["mean_running"] / base["mean_running"], 3) for n, f in out["formats"].items()}
    out["tokens_over_bf16"] = {n: round(base["bytes_per_token"] / f["bytes_per_token"], 3) for n, f in out["formats"].items()}
    return out


# ---- (c) speed ----------------------------------------------------------------------------
def step_speed(batch: int, context: int, repeats: int, rng) -> dict:
    """Median decode-step time per format and path (gathered view + dense attention, or
    attention in place), timed interleaved in one process."""
    nb = batch * (context // BLOCK + 1) + 1
    k_all, _ = outlier_kv(rng, context)
    q = jnp.asarray(queries(rng, k_all, 3.0, batch), jnp.bfloat16)
    kv = jnp.asarray(rng.normal(size=(batch, 1, HEADS, DIM)), jnp.bfloat16)
    steps = {"gathered": decode_step, "in_place": decode_step_in_place}
    state = {}
    for name, kw in FORMATS.items():
        spec = layer_spec(kw.get("kv_format", "none"), nb, batch=batch,
                          **{k: v for k, v in kw.items() if k != "kv_format"})
        for path, step in steps.items():
            m = pk.KVCacheManager(spec)
            cache = pk.PagedKVCache.init(spec)
            keys = k_all[None, :-1].astype(jnp.bfloat16)
            for s in range(batch):
                cache = insert_prefill(cache, m, s, keys, keys)
            m.append(list(range(batch)), 1)
            meta = m.step_metadata(list(range(batch)), 1).to_device()
            for _ in range(3):
                out, cache = step(cache, q, kv, kv, meta)
            jax.block_until_ready(out)
            state[(name, path)] = [cache, meta, step]
    times = {key: [] for key in state}
    keys_ = list(state)
    for i in range(repeats):
        for j in range(len(keys_)):  # rotate the order each round: none always runs first
            key = keys_[(i + j) % len(keys_)]
            cache, meta, step = state[key]
            t0 = time.perf_counter()
            out, cache = step(cache, q, kv, kv, meta)
            jax.block_until_ready((out, cache))
            times[key].append(time.perf_counter() - t0)
            state[key][0] = cache
    med = {key: statistics.median(t) * 1e3 for key, t in times.items()}
    out = {"batch": batch, "context": context, "layers": 1}
    for path in steps:
        base = med[("bf16", path)]
        out[path] = {"median_ms": {n: round(med[(n, path)], 3) for n in FORMATS},
                     "over_bf16": {n: round(med[(n, path)] / base, 3) for n in FORMATS}}
    return out


@partial(jax.jit, donate_argnums=0)
def _write(view, k, v, slots):
    return view.write_slots(k, v, slots)


def write_in_place(small_mib: int, big_mib: int, tokens: int, repeats: int, rng) -> dict:
    """int8 decode write of ``tokens`` tokens into a key+value pool of each size."""
    per_block = quant.bytes_per_token(layer_spec("int8", 2), "int8") * BLOCK
    state = {}
    for mib in (small_mib, big_mib):
        nb = mib * 2**20 // per_block
        view = pk.views.TransformerCacheView.init(layer_spec("int8", nb, batch=tokens))
        view = jax.tree_util.tree_map(lambda a: jax.jit(lambda x: x + 1, donate_argnums=0)(a), view)  # touch every page
        k = jnp.asarray(rng.normal(size=(tokens, 1, HEADS, DIM)), jnp.bfloat16)
        slots = [jnp.asarray(rng.choice(nb * BLOCK, tokens, replace=False).reshape(tokens, 1), jnp.int32) for _ in range(4)]
        for i in range(3):
            view = _write(view, k, k, slots[i % 4])
        state[mib] = [jax.block_until_ready(view), k, slots, []]
    for i in range(repeats):
        for mib in (state if i % 2 else reversed(list(state))):
            view, k, slots, times = state[mib]
            t0 = time.perf_counter()
            view = jax.block_until_ready(_write(view, k, k, slots[i % 4]))
            times.append(time.perf_counter() - t0)
            state[mib][0] = view
    med = {mib: statistics.median(s[3]) * 1e6 for mib, s in state.items()}
    return {"tokens": tokens, f"write_us_{small_mib}mib": round(med[small_mib], 1),
            f"write_us_{big_mib}mib": round(med[big_mib], 1), "big_over_small": round(med[big_mib] / med[small_mib], 3)}


# ---- (d) real model --------------------------------------------------------------------------
FIXTURES = os.path.join(os.path.dirname(__file__), "..", "tests", "fixtures", "hf")


def real_model_agreement(steps: int) -> dict:
    """Greedy decode of the fixtures' prompts (tiny random Llama and Mistral checkpoints)
    for ``steps`` tokens with bf16 pages and with each quantized format: the fraction
    of generated tokens equal to bf16's, and the step of the first difference."""
    try:
        import attrs

        from paged_kv.models import llama
        from paged_kv.models.generate import Generator, Request
        from paged_kv.models.loader import load_model
    except ImportError as exc:
        return {"skipped": f"real-model code unavailable: {exc}"}
    out = {}
    for name in sorted(os.listdir(FIXTURES)) if os.path.isdir(FIXTURES) else []:
        import json

        path = os.path.join(FIXTURES, name)
        prompts = json.load(open(os.path.join(path, "reference.json")))["prompts"]
        cfg, params = load_model(path, "bfloat16")
        base = llama.cache_spec(cfg, num_blocks=256, block_size=8, max_seq_len=max(map(len, prompts)) + steps,
                                max_batch_slots=8, dtype="bfloat16")
        runs = {}
        first_logits = {}
        for fmt in ("none", "int8", "fp8"):
            done, _ = Generator(cfg, params, attrs.evolve(base, kv_format=fmt), prefix_cache=False,
                                record_logits=True).generate([Request(p, max_new_tokens=steps) for p in prompts])
            runs[fmt] = [c.tokens[len(c.prompt):] for c in done]
            # The logits of the first generated token: same inputs for every format.
            first_logits[fmt] = np.stack([c.logits[len(c.prompt) - 1] for c in done])
        row = {}
        for fmt in ("int8", "fp8"):
            ref = first_logits["none"]
            rel = float(np.linalg.norm(first_logits[fmt] - ref) / np.linalg.norm(ref - ref.mean(-1, keepdims=True)))
            row[f"{fmt}_first_logits_rel_l2"] = round(rel, 5)
            same = [np.mean(np.equal(a, b)) for a, b in zip(runs[fmt], runs["none"])]
            first = [next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), steps)
                     for a, b in zip(runs[fmt], runs["none"])]
            row[fmt] = {"first_logits_rel_l2": row.pop(f"{fmt}_first_logits_rel_l2"), "token_agreement": round(float(np.mean(same)), 4), "first_difference_steps": first}
        out[name] = {"prompts": len(prompts), "steps": steps, **row}
        print(f"{name}: " + ", ".join(f"{f} logits rel {r['first_logits_rel_l2']:.2%} agreement {r['token_agreement']:.1%} "
                                      f"first diff {r['first_difference_steps']}"
                                      for f, r in row.items()), file=sys.stderr)
    return out or {"skipped": "no fixtures under tests/fixtures/hf"}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="two contexts, a small decode step and pools (~2-3 min)")
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    report = start_report(benchmark="bench_quant", quick=args.quick, jax=jax.__version__)
    contexts = [1024, 4096] if args.quick else [1024, 2048, 4096, 8192]
    report["accuracy"], report["accuracy_worst_rel_l2"], report["accuracy_aims_met"] = {}, {}, {}
    for kind in KINDS:
        acc = report["accuracy"][kind] = accuracy(contexts, rng, kind)
        for std in LOGIT_STDS:
            key = f"logit_std_{std:g}"
            worst = {f: round(max(r[f][key]["rel_l2"] for r in acc.values()), 6) for f in next(iter(acc.values()))}
            report["accuracy_worst_rel_l2"][f"{kind}/{key}"] = worst
            report["accuracy_aims_met"][f"{kind}/{key}"] = {
                "int8_le_1pct": worst["int8"] <= 0.01,
                "fp8_le_3pct": min(worst["fp8_scale_1"], worst["fp8_calibrated"]) <= 0.03}
    report["memory"] = memory(None, 16.0, 1024)  # the whole trace even when quick: it is the headline figure
    report["speed"] = step_speed(8 if args.quick else 16, 512 if args.quick else 1024, 15 if args.quick else 30, rng)
    report["write_in_place"] = write_in_place(64, 512 if args.quick else 1024, 256, 20 if args.quick else 40, rng)
    report["real_model"] = real_model_agreement(64)
    finish_report(report)


if __name__ == "__main__":
    main()
