"""Quantized pages: accuracy, memory, concurrency and speed of int8 and fp8 against bf16.

What is measured, and why:

(a) Accuracy: the attention output a model gets (`view.attend`, pages read in place,
    dequantized in float32, rotated query and un-rotated output where the pages are
    rotated) of 8 queries x 32 heads over one sequence whose keys and values went
    through the cache (`insert_prefill` of all but the last token, a decode write of
    the last), against the same with bf16 pages: relative L2 and max abs error, at
    contexts of 1k, 4k and 8k tokens (2k too without --quick), for each format with
    the Hadamard rotation (the default, ``kv_rotation="auto"``) and without it.
    Keys/values (`outlier_kv`): no outlier channels ("gaussian"); 4 key channels per
    head 10-50x the rest holding a consistent magnitude ("offset", as observed in LLM
    keys: KIVI, "massive activations"); and 4 zero-mean key channels 10-50x noisier
    ("zero_mean": outliers dominate both the scales and the logits' spread). Values
    get 2 such channels of 10-20x. Logit spread: the queries (Gaussian) are scaled so
    that the logits ``q . k / sqrt(D)`` of a query head over the context's tokens have
    a standard deviation of 1 (a flat softmax) or 3 (a peaked one), averaged over
    queries and heads; the median effective number of tokens a query attends to,
    1 / sum(p^2), is reported beside it. A logit error moves the output in
    proportion to the spread. fp8 runs with the default scale 1.0 and with
    per-head scales calibrated on a separate sample (absmax x 1.25 / 448, in the
    rotated basis when rotated). float32 against bf16 pages is given for scale, and
    each format's own floor: the same keys and values rounded as the format rounds
    them (rotated), in numpy outside the cache, attention in float64
    (``*_format_floor``; fp8's with calibrated scales, ``fp8_scale_1_format_floor``
    with scale 1). A cache that adds no error of its own matches its floor.
    With calibrated key offsets (``*_key_offsets``, `paged_kv.key_offsets`: each head's
    mean key over the calibration sample, pages holding ``k - mu``; fp8 scales then
    calibrated on ``k - mu``), and their floors.
    Aims: int8 <= 1 %, fp8 <= 3 % relative L2 (the better fp8 scale), met or not per
    kind and spread, for the default pages and with key offsets. ``accuracy_fp8_shown``
    names, per kind and spread, which fp8 scales gave the better (worst-context) figure
    and gives that configuration's own floor beside it: the figure to quote, and the
    floor to quote with it.
(b) Memory: bytes per token of an 8B-class model (32 layers, 8 KV heads x 128) per
    format, scales included, and the sequences running at once when the bundled
    Azure conversation trace is replayed (`paged_kv.sim.simulate`) at equal memory
    (16 GiB pools sized by `CacheSpec.for_memory`, batch limit 1024 so memory binds).
(c) Speed: one jitted decode step (write, read, attention) of B sequences x 1,024
    tokens, one layer, per format (int8 also without rotation), timed interleaved against bf16 pages in the same
    process (medians), through the gathered view (`concatenate_to_cache` + dense
    attention) and through `view.attention` (pages read in place, dequantized chunk
    by chunk); and the quantized decode write into a 1 GiB vs a 64 MiB pool:
    a ratio near 1 means the write is still in place, O(tokens).
(d) Greedy decode of the real-model fixtures (tests/fixtures/hf: tiny random Llama
    and Mistral checkpoints made by transformers, through `paged_kv.models`) for 64
    steps: token agreement of int8 and fp8 pages (with and without rotation, and with
    key offsets calibrated on the model's own keys) with bf16 pages, the first step's
    logit error, and how close the bf16 run's top two logits are (the margin a rounding
    error must cross to flip a token).

Usage: PYTHONPATH=. python benchmarks/bench_quant.py [--quick]. Prints a final JSON line.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from functools import lru_cache, partial

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(__file__))
from _report import finish_report, start_report  # noqa: E402

import paged_kv as pk  # noqa: E402
from paged_kv import key_offsets, quant  # noqa: E402
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
def _write(cache, k, v, meta):
    return pk.PagedKVCache((cache[0].write(k, v, meta),))


@jax.jit
def _attend_queries(cache, qs, meta):
    """Each of ``qs`` ``[n, Hq, D]`` (float32) as the decode query of row 0, attending in
    place (`view.attend`: the path a model takes) -> ``[n, Hq, D]`` float32."""
    return jax.vmap(lambda q: cache[0].attend(q[None, None], meta)[0, 0])(qs)


def attention_through_cache(spec, keys, values, qs) -> np.ndarray:
    """Prefill all but the last token (`insert_prefill`), write the last one as a decode
    step, then attend in place with each query: the output a model would get."""
    m = pk.KVCacheManager(spec)
    cache = pk.PagedKVCache.init(spec)
    dt = pk.spec.compute_dtype(spec)
    cache = insert_prefill(cache, m, 0, keys[None, :-1].astype(dt), values[None, :-1].astype(dt))
    m.append([0], 1)
    meta = m.step_metadata([0], 1).to_device()
    cache = _write(cache, jnp.asarray(keys[None, None, -1], dt), jnp.asarray(values[None, None, -1], dt), meta)
    return np.asarray(_attend_queries(cache, qs, meta))


SPREADS = (1.0, 3.0)
ROTATIONS = {"": "auto", "_no_rotation": "none"}  # name suffix -> kv_rotation ("auto": Hadamard here)


@lru_cache(maxsize=None)
def calibration_sample(kind: str) -> tuple:
    """4k other tokens of the same "model" (its outlier channels), as a serving stack
    calibrates on a sample of traffic."""
    return outlier_kv(np.random.default_rng(99), 4096, kind)


@lru_cache(maxsize=None)
def key_offsets_calibrated(kind: str) -> list:
    """`paged_kv.key_offsets.calibrate` of the calibration sample: each head's mean key."""
    return list(key_offsets.calibrate([calibration_sample(kind)[0]]))


@lru_cache(maxsize=None)  # a 4k-token calibration per (kind, rotation), asked for per context and spread
def fp8_calibrated_scales(kind: str, rotation: str, offsets: bool = False) -> list:
    """Per-head fp8 scales calibrated on the calibration sample, absmax x 1.25 / 448, in
    the basis the pages hold (rotated, when they are; less the key offsets with them)."""
    cal = list(calibration_sample(kind))
    if offsets:
        cal[0] = cal[0] - np.asarray(key_offsets_calibrated(kind)[0], np.float32)
    if rotation != "none":
        cal = [np.asarray(quant.hadamard_transform(jnp.asarray(x), quant.rotation_block(DIM))) for x in cal]
    k, v = (tuple(float(s) for s in np.abs(x).max((0, 2)) * 1.25 / quant.FP8_MAX) for x in cal)
    return [(k, v)]


def accuracy_specs(nb: int, kind: str) -> dict:
    """Name -> spec of every configuration measured against bf16 pages: each format
    with and without rotation, int8 with bfloat16 scales, and float32 pages for scale."""
    out = {"f32_pages": layer_spec("none", nb, "float32")}
    for suffix, rot in ROTATIONS.items():
        out["int8" + suffix] = layer_spec("int8", nb, kv_rotation=rot)
        out["fp8_scale_1" + suffix] = layer_spec("fp8", nb, kv_rotation=rot)
        out["fp8_calibrated" + suffix] = layer_spec("fp8", nb, kv_rotation=rot,
                                                    kv_fp8_scales=fp8_calibrated_scales(kind, rot))
    out["int8_bf16_scales"] = layer_spec("int8", nb, kv_scale_dtype="bfloat16")
    offsets = key_offsets_calibrated(kind)
    out["int8_key_offsets"] = layer_spec("int8", nb, kv_key_offsets=offsets)
    out["fp8_calibrated_key_offsets"] = layer_spec("fp8", nb, kv_key_offsets=offsets,
                                                   kv_fp8_scales=fp8_calibrated_scales(kind, "auto", True))
    return out


def effective_tokens(qs: np.ndarray, keys: np.ndarray) -> float:
    """Median over queries and heads of 1 / sum(p^2), p the softmax: how many tokens a
    query effectively attends to (the context length for a uniform softmax)."""
    logits = np.einsum("qhd,shd->qhs", qs, np.repeat(keys, Q_PER_KV, axis=1)) / np.sqrt(DIM)
    p = np.exp(logits - logits.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    return float(np.median(1 / (p**2).sum(-1)))


def accuracy(contexts, rng, kind: str) -> dict:
    """Per context, configuration and logit spread: the in-place attention output's
    error against bf16 pages, and how many tokens the queries effectively attend to."""
    results = {}
    nb = max(contexts) // BLOCK + 2  # one pool size for every context and kind: compiled once per shape
    specs = accuracy_specs(nb, kind)
    for n in contexts:
        k, v = outlier_kv(np.random.default_rng(n), n, kind)
        qs = {std: queries(rng, k, std) for std in SPREADS}
        ref = {std: attention_through_cache(layer_spec("none", nb), k, v, jnp.asarray(q)) for std, q in qs.items()}
        row = {"effective_tokens": {f"logit_std_{std:g}": round(effective_tokens(q, k), 1) for std, q in qs.items()}}
        for name, spec in specs.items():
            row[name] = {f"logit_std_{std:g}": errors(attention_through_cache(spec, k, v, jnp.asarray(q)), ref[std])
                         for std, q in qs.items()}
        floors = {  # the same rounding outside the cache: each configuration's own error
            "int8_format_floor": dict(fmt="int8"), "int8_key_offsets_format_floor": dict(fmt="int8", offsets=True),
            "fp8_format_floor": dict(fmt="fp8"),  # calibrated scales: `fp8_calibrated`'s floor
            "fp8_scale_1_format_floor": dict(fmt="fp8", fp8_scales="scale_1"),  # `fp8_scale_1`'s floor
            "fp8_key_offsets_format_floor": dict(fmt="fp8", offsets=True)}
        for name, kw in floors.items():
            row[name] = {f"logit_std_{std:g}": errors(format_floor(k, v, q, kind=kind, **kw), ref[std])
                         for std, q in qs.items()}
        results[str(n)] = row
        print(f"{kind} context {n}: " + ", ".join(
            f"{f} " + "/".join(f"{r['rel_l2']:.2%}" for r in e.values()) for f, e in row.items()
            if f != "effective_tokens"), file=sys.stderr)
    return results


# ---- the formats' own floor: the same rounding in numpy, no cache --------------------------
def _hadamard(n: int) -> np.ndarray:
    """Normalized Sylvester Hadamard matrix of order ``n`` (a power of two)."""
    h = np.ones((1, 1))
    while h.shape[0] < n:
        h = np.block([[h, h], [h, -h]])
    return h / np.sqrt(n)


def _rounded(x: np.ndarray, fmt: str, head_scale: np.ndarray | None, offset=None) -> np.ndarray:
    """``x`` [S, H, D] through ``fmt``'s rounding in the rotated basis, back in the
    original one: int8 per token and head (absmax / 127), fp8 e4m3 per head; with
    ``offset`` [H, D], of ``x - offset`` (added back), as key offsets do."""
    import ml_dtypes

    block = quant.rotation_block(DIM)
    rot = np.kron(np.eye(DIM // block), _hadamard(block)) if block > 1 else np.eye(DIM)
    mu = 0.0 if offset is None else np.asarray(offset, np.float64)
    r = (x.astype(jnp.bfloat16).astype(np.float64) - mu) @ rot.T  # pages are written from bf16 keys/values
    if fmt == "int8":
        scale = np.abs(r).max(-1, keepdims=True) / 127
        scale[scale == 0] = 1
        r = np.clip(np.round(r / scale), -127, 127) * scale
    else:
        s = head_scale[None, :, None]
        r = np.clip(r / s, -quant.FP8_MAX, quant.FP8_MAX).astype(ml_dtypes.float8_e4m3fn).astype(np.float64) * s
    return r @ rot + mu


def format_floor(k: np.ndarray, v: np.ndarray, q: np.ndarray, fmt: str, kind: str, offsets: bool = False,
                 fp8_scales: str = "calibrated") -> np.ndarray:
    """The attention output a perfect implementation of ``fmt`` gives: keys and values
    rounded as the format rounds them (rotated, as ``kv_rotation="auto"`` does; keys less
    their calibrated offsets with ``offsets``, added back after), attention in float64.
    fp8 per-head scales: ``"calibrated"`` (`fp8_calibrated_scales`, as the
    ``fp8_calibrated*`` configurations) or ``"scale_1"`` (the default 1.0, as
    ``fp8_scale_1``). What the cache adds to the format's error is the distance to this."""
    if fmt != "fp8":
        scales = (None, None)
    elif fp8_scales == "scale_1":
        scales = np.ones((2, HEADS))
    else:
        scales = np.asarray(fp8_calibrated_scales(kind, "auto", offsets)[0])
    mu = np.asarray(key_offsets_calibrated(kind)[0], np.float32) if offsets else None
    kr, vr = _rounded(k, fmt, scales[0], mu), _rounded(v, fmt, scales[1])
    kq, vq = np.repeat(kr, Q_PER_KV, axis=1), np.repeat(vr, Q_PER_KV, axis=1)
    logits = np.einsum("qhd,shd->qhs", q.astype(np.float64), kq) / np.sqrt(DIM)
    p = np.exp(logits - logits.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    return np.einsum("qhs,shd->qhd", p, vq)


def errors(got: np.ndarray, ref: np.ndarray) -> dict:
    return {"rel_l2": float(np.linalg.norm(got - ref) / np.linalg.norm(ref)),
            "max_abs": float(np.abs(got - ref).max()), "ref_max_abs": float(np.abs(ref).max())}


AIMS = {"int8": 0.01, "fp8": 0.03}
FP8_FLOORS = {"fp8_scale_1": "fp8_scale_1_format_floor", "fp8_calibrated": "fp8_format_floor"}
"""Each rotated fp8 configuration's own floor (`format_floor` with the same scales)."""


def summarize(acc: dict) -> tuple[dict, dict]:
    """Worst context per (kind, spread, configuration), and whether each format meets
    its aim (fp8: the better of scale 1 and calibrated) with and without rotation."""
    worst, met = {}, {}
    for kind, by_context in acc.items():
        for std in SPREADS:
            key = f"{kind}/logit_std_{std:g}"
            names = [n for n in next(iter(by_context.values())) if n != "effective_tokens"]
            w = worst[key] = {n: round(max(r[n][f"logit_std_{std:g}"]["rel_l2"] for r in by_context.values()), 6)
                              for n in names}
            met[key] = {}
            for suffix in ROTATIONS:
                label = "rotated" if not suffix else "not_rotated"
                met[key][f"int8_{label}_le_1pct"] = w["int8" + suffix] <= AIMS["int8"]
                met[key][f"fp8_{label}_le_3pct"] = min(w["fp8_scale_1" + suffix], w["fp8_calibrated" + suffix]) <= AIMS["fp8"]
            met[key]["int8_key_offsets_le_1pct"] = w["int8_key_offsets"] <= AIMS["int8"]
            met[key]["fp8_key_offsets_le_3pct"] = w["fp8_calibrated_key_offsets"] <= AIMS["fp8"]
    return worst, met


def fp8_shown(worst: dict) -> dict:
    """Per (kind, spread): the fp8 figure the summary quotes, the better (worst-context)
    of scale 1 and calibrated scales, with the floor of that same configuration, rotated
    (the default) and not rotated (no floor: the floors are computed rotated)."""
    out = {}
    for key, w in worst.items():
        out[key] = {}
        for suffix in ROTATIONS:
            config = min(("fp8_scale_1", "fp8_calibrated"), key=lambda c: w[c + suffix])
            shown = {"config": config + suffix, "rel_l2": w[config + suffix]}
            if not suffix:
                shown["floor"] = FP8_FLOORS[config]
                shown["floor_rel_l2"] = w[FP8_FLOORS[config]]
            out[key]["rotated" if not suffix else "not_rotated"] = shown
    return out


def accuracy_table(acc: dict) -> str:
    """Markdown: format x rotation x kind x spread x context, relative L2 (max abs)."""
    cols = ["int8", "int8_format_floor", "int8_key_offsets", "int8_key_offsets_format_floor", "int8_no_rotation",
            "fp8_calibrated", "fp8_format_floor", "fp8_calibrated_key_offsets", "fp8_key_offsets_format_floor",
            "fp8_calibrated_no_rotation", "fp8_scale_1", "fp8_scale_1_format_floor", "fp8_scale_1_no_rotation",
            "int8_bf16_scales", "f32_pages"]
    lines = ["| keys | spread | context | eff. tokens | " + " | ".join(cols) + " |", "|---" * (len(cols) + 4) + "|"]
    for kind, by_context in acc.items():
        for std in SPREADS:
            key = f"logit_std_{std:g}"
            for n, row in by_context.items():
                cells = [f"{row[c][key]['rel_l2']:.2%} ({row[c][key]['max_abs']:.2g})" for c in cols]
                lines.append(f"| {kind} | {std:g} | {n} | {row['effective_tokens'][key]:g} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


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
SPEED_FORMATS = {**FORMATS, "int8_no_rotation": dict(kv_format="int8", kv_rotation="none")}


SPEED_PASSES = 3


def step_speed(batch: int, context: int, repeats: int, rng) -> dict:
    """Median decode-step time per format and path (gathered view + dense attention, or
    attention in place), timed interleaved in one process, in ``SPEED_PASSES`` passes
    on fresh caches: a figure is the fastest median over the passes (int8's in-place
    ratio read 1.30x in one call and 0.93x in the next on these shared cores;
    `bench_decode_step` saw such spells too)."""
    k_all, _ = outlier_kv(rng, context)
    q = jnp.asarray(queries(rng, k_all, 3.0, batch), jnp.bfloat16)
    kv = jnp.asarray(rng.normal(size=(batch, 1, HEADS, DIM)), jnp.bfloat16)
    steps = {"gathered": decode_step, "in_place": decode_step_in_place}
    passes = [_timed_pass(batch, context, repeats, k_all, q, kv, steps) for _ in range(SPEED_PASSES)]
    med = {key: min(p[key] for p in passes) for key in passes[0]}
    out = {"batch": batch, "context": context, "layers": 1, "passes": SPEED_PASSES}
    for path in steps:
        base = med[("bf16", path)]
        out[path] = {"median_ms": {n: round(med[(n, path)], 3) for n in SPEED_FORMATS},
                     "over_bf16": {n: round(med[(n, path)] / base, 3) for n in SPEED_FORMATS},
                     "median_ms_per_pass": [{n: round(p[(n, path)], 3) for n in SPEED_FORMATS} for p in passes]}
    return out


def _timed_pass(batch: int, context: int, repeats: int, k_all, q, kv, steps) -> dict:
    """(format, path) -> median ms of ``repeats`` decode steps, interleaved, fresh caches."""
    nb = batch * (context // BLOCK + 1) + 1
    state = {}
    for name, kw in SPEED_FORMATS.items():
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
    return {key: statistics.median(t) * 1e3 for key, t in times.items()}


@partial(jax.jit, donate_argnums=0)
def _write_slots(view, k, v, slots):
    return view.write_slots(k, v, slots)


def write_in_place(small_mib: int, big_mib: int, tokens: int, repeats: int, rng) -> dict:
    """int8 decode write of ``tokens`` tokens into a key+value pool of each size."""
    per_block = layer_spec("int8", 2).bytes_per_token_per_layer * BLOCK
    state = {}
    for mib in (small_mib, big_mib):
        nb = mib * 2**20 // per_block
        view = pk.views.TransformerCacheView.init(layer_spec("int8", nb, batch=tokens))
        view = jax.tree_util.tree_map(lambda a: jax.jit(lambda x: x + 1, donate_argnums=0)(a), view)  # touch every page
        k = jnp.asarray(rng.normal(size=(tokens, 1, HEADS, DIM)), jnp.bfloat16)
        slots = [jnp.asarray(rng.choice(nb * BLOCK, tokens, replace=False).reshape(tokens, 1), jnp.int32) for _ in range(4)]
        for i in range(3):
            view = _write_slots(view, k, k, slots[i % 4])
        state[mib] = [jax.block_until_ready(view), k, slots, []]
    for i in range(repeats):
        for mib in (state if i % 2 else reversed(list(state))):
            view, k, slots, times = state[mib]
            t0 = time.perf_counter()
            view = jax.block_until_ready(_write_slots(view, k, k, slots[i % 4]))
            times.append(time.perf_counter() - t0)
            state[mib][0] = view
    med = {mib: statistics.median(s[3]) * 1e6 for mib, s in state.items()}
    return {"tokens": tokens, f"write_us_{small_mib}mib": round(med[small_mib], 1),
            f"write_us_{big_mib}mib": round(med[big_mib], 1), "big_over_small": round(med[big_mib] / med[small_mib], 3)}


# ---- (d) real model --------------------------------------------------------------------------
FIXTURES = os.path.join(os.path.dirname(__file__), "..", "tests", "fixtures", "hf")


REAL_MODEL_FORMATS = {"bf16": {}, "int8": dict(kv_format="int8"), "int8_no_rotation": dict(kv_format="int8", kv_rotation="none"),
                      "fp8": dict(kv_format="fp8"), "fp8_no_rotation": dict(kv_format="fp8", kv_rotation="none")}


def model_key_offsets(cfg, params, vocab: int, seed: int = 11) -> tuple:
    """Key offsets calibrated on the model's own keys (after RoPE, as pages hold them):
    `paged_kv.key_offsets.calibrate` of 4 random-token prompts of 256 tokens, prefilled
    with no cache (`llama.forward_contiguous`); not the prompts decoded below."""
    from paged_kv.models import llama

    tokens = jnp.asarray(np.random.default_rng(seed).integers(0, vocab, size=(4, 256)), jnp.int32)
    _, keys, _ = jax.jit(llama.forward_contiguous, static_argnums=0)(cfg, params, tokens)
    return key_offsets.calibrate([np.asarray(k, np.float32) for k in keys])


QUICK_FIXTURES = ("llama", "mistral", "gemma3_text")
"""--quick's real models: full attention, a window, and a hybrid with its own RoPE per
layer type (every fixture family took ~8 minutes, near run_all's 10-minute limit)."""


def real_model_agreement(steps: int, only: tuple[str, ...] | None = None) -> dict:
    """Greedy decode of the fixtures' prompts (tiny random checkpoints; ``only``: these
    fixtures, None: every one) for ``steps`` tokens with bf16 pages and with each quantized format (and with key
    offsets calibrated on the model's own keys, `model_key_offsets`): the fraction of
    generated tokens equal to bf16's, and the step of the first difference."""
    try:
        import attrs

        from paged_kv.models import llama
        from paged_kv.models.generate import Generator, Request
        from paged_kv.models.loader import load_model
    except ImportError as exc:
        return {"skipped": f"real-model code unavailable: {exc}"}
    out = {}
    for fixture in sorted(os.listdir(FIXTURES)) if os.path.isdir(FIXTURES) else []:
        if only is not None and fixture not in only:
            continue
        import json

        path = os.path.join(FIXTURES, fixture)
        prompts = json.load(open(os.path.join(path, "reference.json")))["prompts"]
        cfg, params = load_model(path, "bfloat16")
        base = llama.cache_spec(cfg, num_blocks=256, block_size=8, max_seq_len=max(map(len, prompts)) + steps,
                                max_batch_slots=8, dtype="bfloat16")
        runs, first_logits = {}, {}
        mu = model_key_offsets(cfg, params, int(params["embed"].shape[0]))
        formats = {**REAL_MODEL_FORMATS, "int8_key_offsets": dict(kv_format="int8", kv_key_offsets=mu),
                   "fp8_key_offsets": dict(kv_format="fp8", kv_key_offsets=mu)}
        for name, kw in formats.items():
            done, _ = Generator(cfg, params, attrs.evolve(base, **kw), prefix_cache=False,
                                record_logits=True).generate([Request(p, max_new_tokens=steps) for p in prompts])
            runs[name] = [c.tokens[len(c.prompt):] for c in done]
            # The logits of the first generated token: same inputs for every format.
            first_logits[name] = np.stack([c.logits[len(c.prompt) - 1] for c in done])
        ref = first_logits["bf16"]
        top2 = np.sort(ref, axis=-1)[:, -2:]
        row = {"bf16_top2_margin_over_logit_std": round(float(np.median((top2[:, 1] - top2[:, 0]) / ref.std(-1))), 4)}
        for name in list(formats)[1:]:
            rel = float(np.linalg.norm(first_logits[name] - ref) / np.linalg.norm(ref - ref.mean(-1, keepdims=True)))
            same = [np.mean(np.equal(a, b)) for a, b in zip(runs[name], runs["bf16"])]
            first = [next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), steps)
                     for a, b in zip(runs[name], runs["bf16"])]
            row[name] = {"first_logits_rel_l2": round(rel, 5), "token_agreement": round(float(np.mean(same)), 4),
                         "first_difference_steps": first}
        out[fixture] = {"prompts": len(prompts), "steps": steps, **row}
        print(f"{fixture}: top-2 margin {row['bf16_top2_margin_over_logit_std']} logit std; " + ", ".join(
            f"{f} logits rel {r['first_logits_rel_l2']:.2%} agreement {r['token_agreement']:.1%} "
            f"first diff {r['first_difference_steps']}" for f, r in row.items() if isinstance(r, dict)), file=sys.stderr)
    return out or {"skipped": "no fixtures under tests/fixtures/hf"}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="two contexts, a small decode step and pools (~2-3 min)")
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    report = start_report(benchmark="bench_quant", quick=args.quick, jax=jax.__version__)
    contexts = [1024, 4096, 8192] if args.quick else [1024, 2048, 4096, 8192]
    report["accuracy"] = {kind: accuracy(contexts, rng, kind) for kind in KINDS}
    report["accuracy_worst_rel_l2"], report["accuracy_aims_met"] = summarize(report["accuracy"])
    report["accuracy_fp8_shown"] = fp8_shown(report["accuracy_worst_rel_l2"])
    print(accuracy_table(report["accuracy"]), file=sys.stderr)
    report["memory"] = memory(None, 16.0, 1024)  # the whole trace even when quick: it is the headline figure
    report["speed"] = step_speed(8 if args.quick else 16, 512 if args.quick else 1024, 15 if args.quick else 30, rng)
    report["write_in_place"] = write_in_place(64, 512 if args.quick else 1024, 256, 20 if args.quick else 40, rng)
    report["real_model"] = real_model_agreement(64, QUICK_FIXTURES if args.quick else None)
    finish_report(report)


if __name__ == "__main__":
    main()
