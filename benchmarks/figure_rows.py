"""The rows of the README's figures table, one function per group of benchmarks:
each reads its benchmarks' final JSON lines (as `run_all.py` collects them) and gives
``(what, figure, baseline in the same run)`` for every figure they hold. A benchmark
missing from the results gives no row."""

from __future__ import annotations

from _figure_format import Row, _pct, _x, get
from figure_rows_storage import storage_rows


_DRIVER_NAMES = {"batch": "persistent batch (`StepBatch`)", "plain": "plain path (`append` + `step_metadata` + `commit`)",
                 "async": "async steps (persistent batch, one step in flight, `commit(step)`)"}


def _drivers(d: dict, batch_key: str, fmt: str) -> str:
    """``batch **x**, plain **x**, async **x**`` where the results have the three drivers
    (`fmt` formats a driver's key), else just the persistent batch's ratio."""
    if fmt.format("plain") not in d:
        return _x(d[batch_key])
    return ", ".join(f"{n} {_x(d[batch_key] if n == 'batch' else d[fmt.format(n)])}" for n in ("batch", "plain", "async"))


def _aim(ok) -> str:
    return "—" if ok is None else ("met" if ok else "**not met**")


def _vs_vllm_rows(r: dict) -> list[Row]:
    out, vs = [], "bench_vs_vllm:"
    for b in ("1", "4", "16", "64", "256"):
        d = get(r, vs + f"decode_step.{b}")
        if d:
            extra = (f", plain {d['plain_us']:,} µs, async {d['async_us']:,} µs" if "plain_us" in d else "")
            out.append((f"host decode step, {b} running (grow one token + metadata + commit) vs vLLM v1 "
                        "`KVCacheManager` (`bench_vs_vllm.py`)",
                        f"vLLM ÷ paged_kv {_drivers(d, 'ratio', '{}_ratio')}",
                        f"vLLM {d['vllm_us']:,} µs, paged_kv {d['paged_kv_us']:,} µs{extra}"))
    for mode, label in (("offline", "all queued at once"), ("arrival", "by arrival, 20 ms a step"),
                        ("sparse_arrival", "every 6th request, by arrival"),
                        ("sparser_arrival", "every 20th request, by arrival")):
        d = get(r, vs + f"replay.{mode}")
        if d:
            extra = (f", plain {d['paged_kv_plain']['manager_s']} s, async {d['paged_kv_async']['manager_s']} s"
                     if "paged_kv_plain" in d else "")
            out.append((f"manager time of a replay of the Azure trace ({d['requests']:,} requests, {label}, "
                        f"~{d['mean_running']:.0f} running), identical schedules",
                        f"vLLM ÷ paged_kv {_drivers(d, 'ratio', 'ratio_{}')}",
                        f"vLLM {d['vllm']['manager_s']} s, paged_kv {d['paged_kv']['manager_s']} s{extra}"))
    d = get(r, vs + "replay.churn_arrival")
    if d:
        where = (f"churn replay of the Azure trace: {d['requests']:,} requests with long prompts and short outputs "
                 f"(mean {d['prompt_mean']:,.0f} / {d['output_mean']:.0f} tokens), by arrival compressed "
                 f"×{d['arrival_scale']} to ~{d['mean_running']:.0f} running ({d['joins_leaves_per_step']} joins + "
                 f"leaves a step), identical schedules, median of {d['rounds']} rounds")
        for n, key in (("batch", "paged_kv"), ("plain", "paged_kv_plain"), ("async", "paged_kv_async")):
            ratio = d["ratio"] if n == "batch" else d[f"ratio_{n}"]
            figure = f"vLLM ÷ paged_kv {_x(ratio)}"
            if n == "async":
                figure += f"; async ÷ sync time {d['async_over_sync']:.2f}"
            out.append((f"{where}: {_DRIVER_NAMES[n]}" if n == "batch" else f"the same churn replay: {_DRIVER_NAMES[n]}",
                        figure,
                        f"vLLM {d['vllm']['manager_s']} s, paged_kv {d[key]['manager_s']} s"))
    a = get(r, vs + "aims")
    if a:
        parts = [("persistent batch ≥ 5× vLLM on every replay", "batch_replay_ge_5x", "batch on a replay", "{:.2f}×"),
                 ("≥ 10× per decode step at every B", "batch_decode_step_ge_10x", "batch per decode step", "{:.2f}×"),
                 ("plain path ≥ 2× on every replay and decode step", "plain_ge_2x_everywhere", "plain", "{:.2f}×"),
                 ("async no slower than sync", "async_no_slower_than_sync", "async ÷ sync time", "{:.2f}")]
        parts = [p for p in parts if p[1] in a]
        tol = a.get("async_no_slower_than_sync", {}).get("tolerance")
        out.append(("issue 22 aims (item 5), vLLM ÷ paged_kv over this run's figures",
                    "; ".join(f"{what}: {_aim(a[k]['met'])}" for what, k, _, _ in parts),
                    "worst: " + "; ".join(f"{short} {fmt.format(a[k]['worst'])}" for _, k, short, fmt in parts)
                    + (f" (async counts as no slower up to {1 + tol:.2f}, the rounds' noise)" if tol is not None else "")))
    d = get(r, vs + "admit_release")
    if d:
        out.append(("admit / release of a 1,024-token sequence", f"vLLM ÷ paged_kv {_x(d['admit_ratio'])} / {_x(d['release_ratio'])}",
                    f"vLLM {d['vllm']['admit_us']} / {d['vllm']['release_us']} µs, paged_kv "
                    f"{d['paged_kv']['admit_us']} / {d['paged_kv']['release_us']} µs"))
    d = get(r, vs + "prefix_admit")
    if d:
        out.append(("prefix admit, 4 shared 2,048-token system prompts (cache warm, same hits)",
                    f"vLLM ÷ paged_kv {_x(d['ratio'])}", f"vLLM {d['vllm_us']} µs, paged_kv {d['paged_kv_us']} µs"))
    return out


def _allocator_rows(r: dict) -> list[Row]:
    out = []
    d = get(r, "bench_allocator:decode")
    if d:
        out.append(("host decode step of 256 sequences: one batched `append` (`bench_allocator.py`)",
                    f"{_x(d['ratio_per_seq_api_over_batched'])} cheaper than `append([s], 1)` once per sequence",
                    f"append {d['us']['batched']} µs; with fresh `step_metadata` arrays {d['us']['batched_meta']} µs "
                    f"(table width {d['table_widths']})"))
    d = get(r, "bench_allocator:sweep.by_block_size")
    if d:
        sizes = sorted(d, key=int)
        out.append(("decode step (append + metadata, 256 sequences) by block size " + " / ".join(sizes),
                    " / ".join(f"{d[b]['step_us']:.0f}" for b in sizes) + " µs", "same token capacity (2^20 slots)"))
    d = get(r, "bench_device_ops:")
    if d:
        out.append(("decode write of 256 tokens, bf16, pool 1 GiB ÷ pool 64 MiB (`bench_device_ops.py`)",
                    f"{_x(d['write_ratio_1g_over_64m'])} ({d['write_us_1g']} vs {d['write_us_64m']} µs): in place, O(tokens)",
                    f"naive bf16-stored, undonated write: {d['naive_bf16_write_ms']} ms, {d['naive_over_ours_write']:,.0f}× slower"))
        out.append((f"gather of a {d['gather_view_mib']:.0f} MiB view into a donated workspace / a fresh output",
                    f"{_x(d['gather_into_over_memcpy'])} / {_x(d['gather_fresh_over_memcpy'])} numpy memcpy speed",
                    f"memcpy {d['memcpy_ms']} ms; `np.take` {_x(d['np_take_over_memcpy'])}"))
    return out


def _memory_rows(r: dict) -> list[Row]:
    out = []
    d = get(r, "bench_fragmentation:")
    if d:
        o, n = d["offline"], d["requests"]
        out.append((f"utilization on the Azure trace ({n:,} requests), block 16 (`bench_fragmentation.py`)",
                    f"paged **{_pct(o['paged']['time_avg_utilization'])}** of allocated slots hold a token",
                    f"max-length buffers {_pct(o['contiguous-max-len']['time_avg_utilization'])}; exact-length "
                    f"first-fit arena {_pct(o['contiguous-first-fit']['time_avg_utilization'])}"))
        out.append(("sequences running at once, equal memory, offline load",
                    f"{_x(d['ratios']['concurrency_paged_over_max_len'])} max-length buffers, "
                    f"{_x(d['ratios']['concurrency_paged_over_first_fit'])} first-fit arena "
                    f"(paged {o['paged']['mean_running']:.1f})", "same trace and scheduler; the arena knows every output length"))
        q = d["online_3x"]
        out.append(("queueing delay at 3× the trace's arrival rate, p50 / p99 steps",
                    f"paged {q['paged']['queue_delay_p50']:.0f} / {q['paged']['queue_delay_p99']:.0f}",
                    f"first-fit {q['contiguous-first-fit']['queue_delay_p50']:,.0f} / "
                    f"{q['contiguous-first-fit']['queue_delay_p99']:,.0f}; max-length "
                    f"{q['contiguous-max-len']['queue_delay_p50']:,.0f} / {q['contiguous-max-len']['queue_delay_p99']:,.0f}"))
    d = get(r, "bench_preemption:")
    if d:
        out.append((f"preemption, {d['requests']:,} requests, 16 GiB / 8 GiB pool (`bench_preemption.py`)",
                    f"recompute: {d['16gib_recompute']['preemptions']} / {d['8gib_recompute']['preemptions']} "
                    f"preemptions, {d['16gib_recompute']['recomputed_prefill_tokens']:,} / "
                    f"{d['8gib_recompute']['recomputed_prefill_tokens']:,} prompt tokens prefilled again",
                    f"swap: {d['16gib_swap']['preemptions']} / {d['8gib_swap']['preemptions']} preemptions, "
                    f"{d['16gib_swap']['gib_swapped_out']} / {d['8gib_swap']['gib_swapped_out']} GiB moved each way"))
        s = d["device_swap_1024_tokens"]
        out.append((f"swap of one 1,024-token sequence ({s['mib']:.0f} MiB)",
                    f"out {_x(s['swap_out_over_memcpy'])}, in {_x(s['swap_in_over_memcpy'])} numpy memcpy speed",
                    f"out {s['swap_out_ms']} ms, in {s['swap_in_ms']} ms, memcpy {s['numpy_copy_ms']} ms"))
    d = get(r, "bench_sliding:")
    if d:
        out.append((f"half the layers sliding at W = {d['window']:,} vs all full (`bench_sliding.py`)",
                    f"{_x(d['bytes_held_hybrid_over_full_mean'])} the KV bytes held; at equal memory "
                    f"{_x(d['concurrency_hybrid_over_full'])} the running sequences", "same trace, same schedule"))
    return out


def _sharing_rows(r: dict) -> list[Row]:
    out = []
    d = get(r, "bench_prefix:")
    if d:
        sp, ps = d["system_prompts"], d["parallel_sampling_n4"]
        out.append(("requests sharing 4 system prompts of 2,048 tokens (`bench_prefix.py`)",
                    f"prefix cache: hit rate {_pct(sp['shared']['hit_rate'])}, "
                    f"{_x(sp['requests_running_shared_over_plain'])} the requests running at once",
                    "no sharing, same scheduler (`run_schedule`) and pool"))
        out.append(("parallel sampling n = 4 on the Azure trace",
                    f"fork: {_x(ps['requests_running_shared_over_plain'])} the requests running",
                    f"4 independent sequences per request ({ps['plain']['steps']:,} vs {ps['shared']['steps']:,} steps)"))
        lk = d["lookup"]
        out.append((f"prefix lookup of a {lk['prompt_tokens']:,}-token prompt, {lk['cached_tokens']:,} cached",
                    f"{lk['admit_prompt_us']} µs ({lk['admit_prompt_ns_per_token']} ns per prompt token)",
                    f"plain `admit` of the same length: {lk['admit_us']} µs"))
    return out


def _multiturn_rows(r: dict) -> list[Row]:
    d = get(r, "bench_multiturn:")
    if not d:
        return []
    rate, run = d["mean_hit_rate"], d["runs"][0]
    models = run["models"]
    where = (f"multi-turn chat, {d['sessions']} sessions of ≤ {d['max_turns']} turns (Azure lengths), "
             f"{d['model']['layers']} layers, {d['pool_gib']:g} GiB, prefix cache (`bench_multiturn.py`)")
    if d.get("hybrid_not_run"):
        reason = d["hybrid_not_run"].split(":")[0]
        hybrid = f"hybrid (5 sliding W = {d['model']['window']:,} per full) not run ({reason}: see results.json)"
    else:
        hybrid = (f"hybrid (5 sliding W = {d['model']['window']:,} per full) {_pct(rate['hybrid'])}, "
                  f"{_x(d['hit_rate_hybrid_over_full'])} all-full's")
    roomy = d.get("roomy_mean_hit_rate") or {}
    out = [(where + ": token hit rate", hybrid,
            f"all-full {_pct(rate['full'])}, all-sliding {_pct(rate['sliding'])} at equal memory; with room for every "
            f"conversation ({d.get('roomy_gib', 0):g} GiB) all-full {_pct(roomy.get('full'))}, hybrid "
            f"{_pct(roomy.get('hybrid'))}")]
    frag = models["hybrid"] if "groups" in models["hybrid"] else models["full"]
    name = "hybrid" if frag is models["hybrid"] else "all-full (hybrid not run)"
    g = frag["groups"]
    out.append((f"fragmentation per layer group, {name}: live tokens / held slots ({' / '.join(g['kinds'])})",
                " / ".join(_pct(u) for u in g["utilization"]),
                "blocks held mean " + " / ".join(f"{b:,.0f}" for b in g["mean_blocks_held"]) + ", peak "
                + " / ".join(f"{b:,}" for b in g["peak_blocks_held"])))
    return out


def _model_rows(r: dict) -> list[Row]:
    out = []
    d = get(r, "bench_generate:runs")
    if d:
        top, base = d[-1], d[0]
        out.append((f"greedy generation, fixture Llama, decode batch {top['batch']} (`bench_generate.py`)",
                    f"{_x(top['speedup_tokens_per_s'])} the tokens/s of batch {base['batch']}; KV usage mean "
                    f"{_pct(top['kv_usage_mean'])}", f"{top['tokens_per_s']:,.0f} vs {base['tokens_per_s']:,.0f} "
                    "tokens/s (a tiny model: dispatch and host work per step, not FLOPs)"))
    return _vs_transformers_rows(r) + out


def _vs_transformers_rows(r: dict) -> list[Row]:
    """`bench_generate.py`'s comparison with transformers and its time to first token."""
    out = []
    vs = get(r, "bench_generate:vs_transformers") or {}
    params = f"{vs['parameters'] / 1e6:.0f}M-parameter" if vs.get("parameters") else "benchmark"
    versions = (vs.get("transformers") or {}).get("versions") or {}
    for b, d in sorted((vs.get("batches") or {}).items(), key=lambda kv: -int(kv[0])):
        what = (f"greedy generation, {params} Llama, decode batch {b}, {vs['new_tokens']} new tokens: paged_kv's "
                "`Generator` ÷ transformers' continuous batching (`bench_generate.py`)")
        if "ratio_continuous" not in d:
            why = (vs.get("transformers") or {}).get("error") or d.get("continuous_error") or "not run"
            out.append((what, "—", f"paged_kv {d['paged_kv_tokens_per_s']:,.0f} tokens/s; transformers: {why}"))
            continue
        aim = d.get("aim_ratio_continuous")
        figure = (f"{_x(d['ratio_continuous'])} `generate_batch`"
                  + (f", {_x(d['ratio_continuous_manager'])} one running manager" if "ratio_continuous_manager" in d
                     else "")
                  + (f"; aim ≥ {aim:g}×: {_aim(d.get('aim_met'))}" if aim is not None else ""))
        equal = ", ".join(f"{name} {d[key]}" for name, key in (("generate_batch", "equal_continuous"),
                          ("manager", "equal_continuous_manager"), ("generate", "equal_padded")) if key in d)
        threads = (d.get("torch_threads") or {}).get("threads")
        base = (f"paged_kv {d['paged_kv_tokens_per_s']:,.0f} tokens/s, transformers "
                f"{versions.get('transformers', '?')} {d['continuous_tokens_per_s']:,.0f}"
                + (f" / {d['continuous_manager_tokens_per_s']:,.0f}" if "continuous_manager_tokens_per_s" in d else "")
                + (f"; padded `generate` {d['padded_tokens_per_s']:,.0f} (paged_kv {_x(d['ratio_padded'])})"
                   if "ratio_padded" in d else "")
                + (f"; torch {threads} thread(s)" if threads else "")
                + f"; greedy tokens equal: {equal}")
        out.append((what, figure, base))
    t = get(r, "bench_generate:ttft") or {}
    if t.get("warm_s") is not None:
        cold = f"{t['cold_s']:.2f} s" if t.get("cold_s") is not None else "—"
        jax_s = (t["warm"].get("marks_s") or {}).get("imported_jax")
        out.append(("time to first token of a second process (from its start, the model loaded, JAX's "
                    "persistent compilation cache and the Generator's stored step programs filled by a first process, "
                    "as `paged-kv generate --compile-cache` keeps them; `bench_generate.py`)",
                    f"**{t['warm_s']:.2f} s**; aim ≤ {t['aim_warm_s']:g} s: {_aim(t.get('aim_met'))}",
                    f"the first process, empty cache: {cold}"
                    + (f"; the second spent {jax_s:.2f} s importing jax" if jax_s is not None else "")
                    + (f"; with JAX's cache alone {t['warm_jax_only_s']:.2f} s" if t.get("warm_jax_only_s") is not None
                       else "")))
    return out


def _attention_rows(r: dict) -> list[Row]:
    points = get(r, "bench_decode_step:points")
    if not points:
        return []
    big = max(points, key=lambda p: p["batch"] * p["max_len"])
    where = f"B={big['batch']}, context {big['max_len']}, {big['heads']}"
    ms, temp = big["ms"], big["temp_bytes"]
    seed_style = ("a seed-style dense cache: naive full-length attention, f32 conversion of the whole cache, "
                  "logits to max length")
    summary = get(r, "bench_decode_step:summary") or {}
    if "a_over_d" in big:
        aim = summary.get("a_over_d_aim")
        out = [(f"decode step, 4 layers: attention in place over the pages ÷ a dense max-length cache running the "
                f"same attention (online softmax over the same chunks, f32 state, stopping at the longest row), "
                f"~60 % full (`bench_decode_step.py`, {where})",
                f"{_x(big['a_over_d'])} ({ms['a_in_place']:.1f} vs {ms['d_dense_online']:.1f} ms); over all "
                f"{len(points)} points median {_x(summary.get('a_over_d_median'))}"
                + (f", aim ≤ {aim:.2f}: met at {summary['points_meeting_a_over_d_aim']} of {len(points)} points"
                   if aim is not None else ""),
                f"÷ {seed_style}: {_x(big['a_over_c'])} ({ms['c_dense']:.1f} ms; median "
                f"{_x(summary.get('a_over_c_median'))}); gathered view + the same naive attention: "
                f"{_x(big['b_over_c'])} the seed-style cache's time")]
    else:  # results from before the same-attention baseline: the seed-style comparison only
        out = [(f"decode step, 4 layers: attention in place over the pages ÷ {seed_style}, ~60 % full "
                f"(`bench_decode_step.py`, {where})",
                f"{_x(big['a_over_c'])} ({ms['a_in_place']:.1f} vs {ms['c_dense']:.1f} ms); over all "
                f"{len(points)} points median {_x(summary.get('a_over_c_median'))}",
                f"gathered view + the same naive attention: {_x(big['b_over_c'])} the seed-style cache's time")]
    if "binding_cost" in big:
        aim = summary.get("binding_cost_aim")
        out.append(("binding (`paged_kv/binding.py`: block generations checked per layer and step) ÷ the same step "
                    "on the metadata's raw tables",
                    f"median {_x(summary.get('binding_cost_median'))} over {len(points)} points, max "
                    f"{_x(summary.get('binding_cost_max'))}" + (f", aim ≤ {aim:.2f}" if aim is not None else ""),
                    f"{where}: {_x(big['binding_cost'])}"))
    out.append(("transient memory of that step, in place ÷ gathered view",
                f"{_x(big['temp_a_over_b'])} ({temp['a_in_place'] / 2**20:.1f} vs {temp['b_gathered'] / 2**20:.1f} MiB)",
                "XLA's compiled temp_size_in_bytes of each"))
    trip = get(r, "bench_decode_step:trip_count")
    if trip:
        out.append(("in-place attention stopping at the longest row vs looping over the whole table bucket "
                    f"(longest row {trip['longest']} of {trip['table_tokens']} table tokens)",
                    _x(trip["dynamic_over_static"]), f"{trip['ms']['a_static_trip']:.1f} ms looping over the table"))
    return out


def _quant_rows(r: dict) -> list[Row]:
    out = []
    m = get(r, "bench_quant:memory")
    if m:
        c, f = m["concurrency_over_bf16"], m["formats"]
        out.append((f"quantized pages, sequences running at once on the Azure trace ({m['requests']:,} requests, "
                    f"{m['pool_gib']:g} GiB) (`bench_quant.py`)",
                    f"int8 {_x(c['int8'])}, fp8 {_x(c['fp8'])} bf16 pages",
                    f"bf16 {f['bf16']['mean_running']:.1f} running; {f['bf16']['bytes_per_token'] // 1024} KiB vs "
                    f"{f['int8']['bytes_per_token'] / 1024:.0f} / {f['fp8']['bytes_per_token'] // 1024} KiB per token, "
                    "int8 scales included"))
    a, met = get(r, "bench_quant:accuracy_worst_rel_l2"), get(r, "bench_quant:accuracy_aims_met")
    shown_fp8 = get(r, "bench_quant:accuracy_fp8_shown") or {}
    kinds = {"offset": "consistent outlier channels 10-50×", "zero_mean": "zero-mean outlier channels 10-50×",
             "gaussian": "no outlier channels (the rounding floor)"}
    for kind, label in kinds.items():
        if not a or f"{kind}/logit_std_3" not in a or "int8_no_rotation" not in a[f"{kind}/logit_std_3"]:
            continue
        flat, sharp = a[f"{kind}/logit_std_1"], a[f"{kind}/logit_std_3"]

        def both(name, flat=flat, sharp=sharp):  # two decimals: the aims sit at 1 % and 3 %
            return f"{_pct(flat[name], 2)} / {_pct(sharp[name], 2)}"

        def fp8_cell(w, suffix, key):
            """fp8 at one spread: the better of scale 1 and calibrated scales (as bench_quant's
            `accuracy_fp8_shown` names it), that configuration's floor (None where not
            reported, as in results from before the scale-1 floor), and which scales."""
            s = shown_fp8.get(key, {}).get("not_rotated" if suffix else "rotated")
            if s:
                return s["rel_l2"], s.get("floor_rel_l2"), s["config"]
            config = min(("fp8_scale_1", "fp8_calibrated"), key=lambda c: w[c + suffix])
            floor = {"fp8_scale_1": "fp8_scale_1_format_floor", "fp8_calibrated": "fp8_format_floor"}[config]
            return w[config + suffix], w.get(floor), config + suffix

        cells = {suffix: [fp8_cell(w, suffix, f"{kind}/logit_std_{s}") for w, s in ((flat, 1), (sharp, 3))]
                 for suffix in ("", "_no_rotation")}

        def fp8(suffix):
            which = " / ".join("calibrated" if "calibrated" in c else "scale 1" for _, _, c in cells[suffix])
            return f"{' / '.join(_pct(v, 2) for v, _, _ in cells[suffix])} ({which})"

        def fp8_floor():  # the floor of the configuration `fp8('')` shows, cell by cell
            return " / ".join(_pct(f, 2) for _, f, _ in cells[""])

        def aims(how, kind=kind):
            return ", ".join(f"{fmt} {' / '.join('yes' if met[f'{kind}/logit_std_{s}'].get(f'{fmt}_{how}_le_{p}pct') else 'no' for s in (1, 3))}"
                             for fmt, p in (("int8", 1), ("fp8", 3)))

        offsets = ""
        if "int8_key_offsets" in flat:
            offsets = (f"; with calibrated key offsets: int8 {both('int8_key_offsets')}, fp8 "
                       f"{both('fp8_calibrated_key_offsets')} (aims met: {aims('key_offsets')})")
        out.append((f"attention-output error vs bf16 pages (relative L2, worst of 1k-8k tokens), keys with {label}, "
                    "logit spread 1 / 3, Hadamard-rotated pages (the default)",
                    f"int8 {both('int8')}, fp8 {fp8('')}; aims (int8 ≤ 1 %, fp8 ≤ 3 %) met at spread 1 / 3: "
                    f"{aims('rotated')}{offsets}",
                    f"not rotated: int8 {both('int8_no_rotation')}, fp8 {fp8('_no_rotation')}; "
                    f"float32 vs bf16 pages {both('f32_pages')}"
                    + (f"; the formats' own rounding outside the cache (floor, of the configuration shown): int8 "
                       f"{both('int8_format_floor')}, fp8 {fp8_floor()}" if "int8_format_floor" in flat else "")
                    + (f"; with key offsets int8 {both('int8_key_offsets_format_floor')}, "
                       f"fp8 {both('fp8_key_offsets_format_floor')}" if "int8_key_offsets_format_floor" in flat else "")))
    sp, wr = get(r, "bench_quant:speed"), get(r, "bench_quant:write_in_place")
    if sp and wr and "in_place" in sp:
        ip, ga = sp["in_place"]["over_bf16"], sp["gathered"]["over_bf16"]
        plain = (f", int8 not rotated {_x(ip['int8_no_rotation'])} / {_x(ga['int8_no_rotation'])}"
                 if "int8_no_rotation" in ip else "")
        out.append((f"decode step with quantized pages, attention in place ({sp['batch']} × {sp['context']:,} tokens)",
                    f"int8 {_x(ip['int8'])}, fp8 {_x(ip['fp8'])} the time of bf16 pages",
                    f"through the gathered view: int8 {_x(ga['int8'])}, fp8 {_x(ga['fp8'])}{plain} (in place / "
                    f"gathered); int8 decode write, large ÷ small pool {_x(wr['big_over_small'])}: in place"))
    rm = get(r, "bench_quant:real_model")
    for name, d in sorted((rm or {}).items()):
        if isinstance(d, dict) and "int8" in d and "bf16_top2_margin_over_logit_std" in d:
            out.append((f"real-model fixture `{name}` (tiny random weights), first-step logits vs bf16 pages "
                        f"(relative L2 of the centred logits); greedy agreement over {d['steps']} steps",
                        f"int8 {_pct(d['int8']['first_logits_rel_l2'])}, fp8 {_pct(d['fp8']['first_logits_rel_l2'])}",
                        f"agreement int8 {_pct(d['int8']['token_agreement'])}, fp8 {_pct(d['fp8']['token_agreement'])}"
                        + (f"; with key offsets calibrated on the model's keys: logits int8 "
                           f"{_pct(d['int8_key_offsets']['first_logits_rel_l2'])}, fp8 "
                           f"{_pct(d['fp8_key_offsets']['first_logits_rel_l2'])}, agreement int8 "
                           f"{_pct(d['int8_key_offsets']['token_agreement'])}, fp8 "
                           f"{_pct(d['fp8_key_offsets']['token_agreement'])}" if "int8_key_offsets" in d else "")
                        + f"; bf16's top-2 logit margin: median {d['bf16_top2_margin_over_logit_std']:.2f} logit std"))
    return out


def rows(r: dict) -> list[Row]:
    """(what, figure, baseline in the same run) for every figure the results hold."""
    return (_vs_vllm_rows(r) + _allocator_rows(r) + _memory_rows(r) + _attention_rows(r) + _sharing_rows(r)
            + _multiturn_rows(r) + _model_rows(r) + _quant_rows(r) + storage_rows(r))


__all__ = ["Row", "get", "rows"]
