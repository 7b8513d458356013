"""Check and time the Pallas kernels against the XLA path on whatever accelerator runs
this (one call), and check that float pages are written in place there.

- TPU: jax's ``ragged_paged_attention`` on a unified, interleaved bf16 pool
  (`impl="pallas_tpu_ragged"`) for a decode step and a mixed prefill+decode step,
  and the decode-only ``paged_attention`` on a head-major copy of the same pages.
- GPU: jax's Triton ``paged_attention`` (decode) on a head-major copy.
- CPU (no accelerator): the decode kernels in interpret mode, small shapes only.

Each kernel's output is compared with `paged_kv.attention.paged_attention_xla` on
the same pages (max abs difference; bf16 tolerance), then both are timed
(medians of interleaved runs). In-place check: writing 256 tokens into a float
pool of 1 GiB vs 64 MiB takes the same time when the scatter is in place
(``page_storage="float"``; ratio near 1), ~16x when it copies the pool.

Prints a final JSON line.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import paged_kv as pk  # noqa: E402
from _report import finish_report, start_report  # noqa: E402
from paged_kv.attention import paged_decode_gpu, paged_decode_tpu  # noqa: E402
from paged_kv.ops import write_pages  # noqa: E402

BLOCK = 16


def timed(fn, *args, reps: int) -> float:
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def filled_cache(batch: int, max_len: int, heads: int, dim: int, lengths: np.ndarray, rng):
    """A unified float pool holding random keys/values for ``lengths`` tokens per row."""
    spec = pk.CacheSpec(num_layers=1, num_blocks=batch * max_len // BLOCK + 1, block_size=BLOCK,
                        max_blocks_per_seq=max_len // BLOCK, max_batch_slots=batch, num_kv_heads=heads,
                        head_dim=dim, dtype="bfloat16", page_storage="float")
    manager = pk.KVCacheManager(spec)
    for s, n in enumerate(lengths):
        manager.admit(s, int(n))
    view = pk.PagedKVCache.init(spec, layout="unified")[0]
    pages = jnp.asarray(rng.normal(size=view.kv_pages.shape), jnp.bfloat16).at[0].set(0)
    return spec, manager, type(view)(pages, spec, 0)


def compare(name, kernel, reference, args, reps, tol) -> dict:
    got, want = kernel(*args), reference(*args)
    diff = float(jnp.max(jnp.abs(got.astype(jnp.float32) - want.astype(jnp.float32))))
    k_s, x_s = timed(kernel, *args, reps=reps), timed(reference, *args, reps=reps)
    print(f"{name}: max |kernel - xla| {diff:.2e}; kernel {1e3 * k_s:.3f} ms, xla {1e3 * x_s:.3f} ms", flush=True)
    return dict(max_abs_diff=diff, ok=diff <= tol, kernel_ms=round(1e3 * k_s, 3), xla_ms=round(1e3 * x_s, 3),
                kernel_over_xla=round(k_s / x_s, 3))


def ragged_checks(batch, max_len, heads, dim, reps, rng) -> dict:
    out = {}
    lengths = rng.integers(max_len // 5, max_len - 8, size=batch)
    spec, manager, view = filled_cache(batch, max_len, heads, dim, lengths, rng)
    for label, counts in (("decode", [1] * batch), ("mixed", [8 if b % 4 == 0 else 1 for b in range(batch)])):
        manager.append(list(range(batch)), counts)
        meta = manager.step_metadata(list(range(batch)), counts).to_device()
        q = jnp.asarray(rng.normal(size=(batch, meta.query_len, 2 * heads, dim)), jnp.bfloat16)
        run = {impl: jax.jit(lambda q, v, m, impl=impl: v.attend(q, m, impl=impl))
               for impl in ("pallas_tpu_ragged", "xla")}
        out[label] = compare(f"tpu ragged {label}", run["pallas_tpu_ragged"], run["xla"], (q, view, meta), reps, 3e-2)
    return out


def decode_checks(platform, batch, max_len, heads, dim, reps, rng) -> dict:
    lengths = rng.integers(max_len // 5, max_len - 8, size=batch)
    spec, manager, view = filled_cache(batch, max_len, heads, dim, lengths, rng)
    manager.append(list(range(batch)), 1)
    meta = manager.step_metadata(list(range(batch)), 1).to_device()
    kv = view.kv_pages
    # Head-major copies, made once here, as a pool kept in that layout would hold them.
    k_hm, v_hm = kv[:, :, 0::2].transpose(2, 0, 1, 3), kv[:, :, 1::2].transpose(2, 0, 1, 3)
    q = jnp.asarray(rng.normal(size=(batch, 1, 2 * heads, dim)), jnp.bfloat16)
    interpret = platform == "cpu"
    if platform == "gpu" or interpret:
        gpu = jax.jit(lambda q, v, m: paged_decode_gpu(q, k_hm, v_hm, m.block_tables, m.kv_lens, interpret=interpret))
    xla = jax.jit(lambda q, v, m: v.attend(q, m, impl="xla"))
    out = {}
    if platform == "gpu" or interpret:
        out["gpu_paged_attention"] = compare("gpu decode", gpu, xla, (q, view, meta), reps, 3e-2)
    if platform == "tpu" or interpret:
        from jax.experimental.pallas import tpu as pltpu

        def tpu(q, v, m):
            if interpret:
                with pltpu.force_tpu_interpret_mode():
                    return paged_decode_tpu(q, k_hm, v_hm, m.block_tables, m.kv_lens)
            return paged_decode_tpu(q, k_hm, v_hm, m.block_tables, m.kv_lens)

        out["tpu_paged_attention"] = compare("tpu decode", jax.jit(tpu) if not interpret else tpu, xla,
                                             (q, view, meta), reps, 3e-2)
    return out


def in_place_write(reps: int) -> dict:
    """Write 256 bf16 tokens into float pools of 64 MiB and 1 GiB (pages donated)."""
    rng = np.random.default_rng(0)
    row = (8, 128)
    new = jnp.asarray(rng.normal(size=(256, 1, *row)), jnp.bfloat16)
    slots = jnp.arange(256, dtype=jnp.int32)[:, None] * 3 + BLOCK
    times = {}
    for mib in (64, 1024):
        nb = mib * 2**20 // (BLOCK * 8 * 128 * 2)
        pages = jnp.zeros((nb, BLOCK, *row), jnp.bfloat16)
        pages = write_pages(pages, new, slots, jnp.bfloat16)  # compile
        samples = []
        for _ in range(reps):
            t0 = time.perf_counter()
            pages = write_pages(pages, new, slots, jnp.bfloat16)
            pages.block_until_ready()
            samples.append(time.perf_counter() - t0)
        times[mib] = statistics.median(samples)
        del pages
    return dict(ms_64mib=round(1e3 * times[64], 3), ms_1gib=round(1e3 * times[1024], 3),
                ratio=round(times[1024] / times[64], 2))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=20)
    args = ap.parse_args()
    platform = jax.default_backend()
    report = start_report(benchmark="kernels", platform=platform, device=str(jax.devices()[0]))
    rng = np.random.default_rng(0)
    if platform == "cpu":  # interpret mode: small shapes, few reps
        report["decode"] = decode_checks("cpu", 4, 128, 2, 64, 2, rng)
        report["note"] = "no accelerator: decode kernels in interpret mode only; timings are not kernel speed"
    else:
        report["decode"] = decode_checks(platform, 32, 2048, 8, 128, args.reps, rng)
        if platform == "tpu":
            report["ragged"] = ragged_checks(32, 2048, 8, 128, args.reps, rng)
        report["float_write_in_place"] = in_place_write(args.reps)
    checks = [c for group in ("decode", "ragged") for c in report.get(group, {}).values()]
    report["all_ok"] = all(c["ok"] for c in checks)
    finish_report(report)


if __name__ == "__main__":
    main()
