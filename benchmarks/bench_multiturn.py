"""Prefix caching on multi-turn chat sessions: a Gemma-3-like hybrid (5 sliding layers
at W = 1024 per full layer) against the same model with every layer full, and with
every layer sliding, at equal memory.

Workload (`paged_kv.sim.multiturn_workload`): sessions of up to 6 turns; turn k's
prompt is the whole conversation so far plus the user's new tokens, and each turn's
new user-input and output lengths are a row of the bundled Azure conversation trace.
Sessions interleave round-robin: every session's first turn waits at step 0, and a
session's next turn arrives a think time (exponential, mean 10 s at 25 ms a step)
after its previous turn finished. Seeded: the same flags give the same figures.

Model: 48 layers, 8 KV heads x 256, bfloat16 (Gemma 3 12B's KV shape: 384 KiB per
token with every layer full), block 16, max_seq_len 16,384, batch <= 64, token
budget 8,192, a 48 GiB pool (an 80 GB accelerator less a 12B model's weights). The
hybrid's pool is split between its full and sliding groups in proportion to what
each held in an unconstrained replay without the cache (its sliding blocks cost 40
layers' bytes, its full blocks 8). Every model runs with `prefix_cache=True`; a
model the manager refuses is reported with the error's text.

48 sessions per run; three seeds (one with ``--quick``), hit rates averaged over
them. The same comparison at 1 TiB, where every conversation fits and nothing is
evicted, shows what the layouts' hit rules alone allow. Reported per model and seed: token hit rate (cached prompt tokens / prompt
tokens, first admissions), prefill tokens saved (cached tokens over all
admissions), prefill tokens computed, preemptions, steps, blocks held per group
(mean, peak), cached blocks no one holds per group, and utilization per group (the
tokens a group keeps live -- a sliding group only each sequence's last W -- over
its held slots).
Prints a final JSON line. Trace: Azure/AzurePublicDataset (CC-BY 4.0), Patel et al., ISCA 2024.
"""

from __future__ import annotations

import argparse

from _report import finish_report, start_report

from paged_kv import SpecError
from paged_kv.sim import SchedulerConfig, multiturn_workload, simulate
from paged_kv.sim.layouts import LAYOUTS, demand_share, spec_at_memory
from paged_kv.sim.models import MODELS

SHAPE = MODELS["gemma3-12b"]  # Gemma 3 12B's KV shape
WINDOW, FULL_EVERY, BLOCK, MAX_LEN, MAX_BATCH = 1024, 6, 16, 16384, 64


def model_figures(report) -> dict:
    """The figures of one replay that the comparison reports."""
    return dict(
        token_hit_rate=round(report.token_hit_rate, 4),
        prompt_tokens=report.prompt_tokens,
        cached_prompt_tokens=report.cached_prompt_tokens,
        prefill_tokens_saved=report.prefill_tokens_saved,
        prefill_tokens_computed=report.prefill_tokens,
        preemptions=report.preemptions,
        steps=report.steps,
        mean_running=round(report.mean_running, 2),
        groups=dict(
            kinds=list(report.group_kinds),
            mean_blocks_held=[round(b, 1) for b in report.mean_group_blocks],
            peak_blocks_held=list(report.peak_group_blocks),
            mean_cached_blocks=[round(b, 1) for b in report.mean_group_cached],
            utilization=[round(u, 4) for u in report.group_utilization],
        ),
        wall_s=round(report.wall_s, 1),
    )


def hybrid_share(work, config: SchedulerConfig) -> float:
    """The sliding group's share of the hybrid's bytes: what each group held, in
    bytes, in a replay with memory to spare and no prefix cache."""
    roomy = spec_at_memory(SHAPE, "hybrid", 2**40, window=WINDOW, full_every=FULL_EVERY, block_size=BLOCK,
                           max_seq_len=MAX_LEN, max_batch_slots=MAX_BATCH)
    demand = simulate(work, roomy, config=config)
    return demand_share(roomy, demand.mean_group_blocks)


def run_model(work, layout: str, pool_bytes: int, share: float, config: SchedulerConfig) -> dict:
    spec = spec_at_memory(SHAPE, layout, pool_bytes, window=WINDOW, full_every=FULL_EVERY, sliding_share=share,
                          block_size=BLOCK, max_seq_len=MAX_LEN, max_batch_slots=MAX_BATCH)
    pool = dict(pool_bytes=spec.pool_bytes, group_blocks=[g.num_blocks for g in spec.groups],
                group_layers=[len(g.layers) for g in spec.groups])
    try:
        report = simulate(work, spec, config=config, prefix_cache=True)
    except SpecError as exc:  # the manager refuses this layout with a prefix cache: say why
        return dict(pool, error=f"SpecError: {exc}")
    return dict(pool, **model_figures(report))


def compare_layouts(seed: int, sessions: int, args, config: SchedulerConfig) -> dict:
    """Every layout on one seed's workload, at ``--pool-gib`` and at ``--roomy-gib``:
    the hybrid's split and each model's figures."""
    work = multiturn_workload(sessions, turns=args.turns, seed=seed, think_s=args.think_s, max_total_tokens=MAX_LEN)
    share = hybrid_share(work, config)
    out = dict(seed=seed, turns=len(work), source=work.source, hybrid_sliding_share=round(share, 4))
    for key, gib in (("models", args.pool_gib), ("roomy_models", args.roomy_gib)):
        out[key] = models = {layout: run_model(work, layout, int(gib * 2**30), share, config) for layout in LAYOUTS}
        for layout, m in models.items():
            if "error" in m:
                print(f"seed {seed} {gib:g} GiB {layout:>8}: not run: {m['error']}")
                continue
            g = m["groups"]
            print(f"seed {seed} {gib:g} GiB {layout:>8}: hit rate {m['token_hit_rate']:.1%}, prefill saved "
                  f"{m['prefill_tokens_saved']:,} tokens, preemptions {m['preemptions']}, blocks held per group "
                  f"{g['mean_blocks_held']} (peak {g['peak_blocks_held']}), utilization {g['utilization']}")
    return out


def mean_hit_rates(runs: list[dict], key: str) -> tuple[dict, float | None]:
    """Per layout the token hit rate averaged over the seeds (None if a layout did not
    run), and hybrid / all-full."""
    mean = {}
    for layout in LAYOUTS:
        rates = [r[key][layout].get("token_hit_rate") for r in runs]
        mean[layout] = None if None in rates else round(sum(rates) / len(rates), 4)
    ratio = round(mean["hybrid"] / mean["full"], 4) if mean["hybrid"] is not None and mean["full"] else None
    return mean, ratio


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="one seed instead of three (< 60 s)")
    ap.add_argument("--sessions", type=int, default=48)
    ap.add_argument("--turns", type=int, default=6, help="most turns per session")
    ap.add_argument("--think-s", type=float, default=10.0, help="mean think time between turns")
    ap.add_argument("--pool-gib", type=float, default=48.0)
    ap.add_argument("--roomy-gib", type=float, default=1024.0,
                    help="a second pool every conversation fits in: the hit rates with nothing evicted")
    ap.add_argument("--seed", type=int, default=0, help="first seed")
    args = ap.parse_args()
    seeds = [args.seed] if args.quick else [args.seed + k for k in range(3)]
    config = SchedulerConfig(max_batch=MAX_BATCH)
    out = start_report(quick=args.quick, seeds=seeds, sessions=args.sessions, max_turns=args.turns,
                       think_s=args.think_s, pool_gib=args.pool_gib, roomy_gib=args.roomy_gib,
                       model=dict(layers=SHAPE.num_layers, kv_heads=SHAPE.num_kv_heads, head_dim=SHAPE.head_dim,
                                  window=WINDOW, full_every=FULL_EVERY, block_size=BLOCK, max_seq_len=MAX_LEN,
                                  max_batch=MAX_BATCH))
    runs = [compare_layouts(seed, args.sessions, args, config) for seed in seeds]
    out["trace"] = runs[0]["source"]
    out["runs"] = runs
    out["mean_hit_rate"], ratio = mean_hit_rates(runs, "models")
    out["roomy_mean_hit_rate"], out["roomy_hit_rate_hybrid_over_full"] = mean_hit_rates(runs, "roomy_models")
    out["hit_rate_hybrid_over_full"] = ratio
    out["hit_rate_aim_met"] = None if ratio is None else ratio >= 0.9
    out["hybrid_not_run"] = runs[0]["models"]["hybrid"].get("error")
    finish_report(out)


if __name__ == "__main__":
    main()
