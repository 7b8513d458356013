"""The simulator's token-id workloads: multi-turn sessions through the prefix cache,
parallel sampling through fork, and the per-layer-group fragmentation profile."""

from __future__ import annotations

import json

import numpy as np
import pytest

from paged_kv import CacheSpec, TraceError
from paged_kv.cli import main
from paged_kv.errors import SpecError
from paged_kv.sim import (
    ContiguousMaxLenBackend,
    PagedBackend,
    SchedulerConfig,
    Trace,
    Workload,
    compare,
    demand_share,
    multiturn_workload,
    run_schedule,
    simulate,
    sliding_layers,
    spec_at_memory,
)
from paged_kv.sim.models import ModelShape
from paged_kv.sim.profile import live_tokens


def tiny_spec(num_blocks: int = 2000, max_blocks_per_seq: int = 256, **extra) -> CacheSpec:
    return CacheSpec(num_layers=2, num_kv_heads=1, head_dim=8, dtype="float32", num_blocks=num_blocks, block_size=16,
                     max_blocks_per_seq=max_blocks_per_seq, max_batch_slots=64, **extra)


# ---- the workload ---------------------------------------------------------------------

def test_turns_continue_the_conversation(bundled):
    work = multiturn_workload(5, turns=4, seed=3, max_total_tokens=4096, trace=bundled)
    t = work.trace
    turns = 0
    for i in range(len(work)):
        j = int(work.follows[i])
        if j < 0:
            continue
        turns += 1
        conversation = int(t.context_tokens[j] + t.generated_tokens[j])
        user = int(t.context_tokens[i]) - conversation
        assert user >= 1 and t.context_tokens[i] + t.generated_tokens[i] <= 4096
        # The prompt starts with the previous turn's prompt and output, token for token.
        np.testing.assert_array_equal(work.token_ids(i, conversation), work.token_ids(j, conversation))
        # Its new user tokens and its output are one trace row's context and output lengths.
        assert np.any((bundled.context_tokens == user) & (np.maximum(bundled.generated_tokens, 1) == t.generated_tokens[i]))
    assert turns > 5
    # Sessions do not share tokens.
    first = np.flatnonzero(work.follows < 0)
    assert not np.array_equal(work.token_ids(int(first[0]), 64), work.token_ids(int(first[1]), 64))


def test_workload_is_deterministic_under_a_seed(bundled):
    a = multiturn_workload(6, turns=3, seed=7, trace=bundled)
    b = multiturn_workload(6, turns=3, seed=7, trace=bundled)
    c = multiturn_workload(6, turns=3, seed=8, trace=bundled)
    for name in ("follows", "think_s", "stream", "shared_len"):
        np.testing.assert_array_equal(getattr(a, name), getattr(b, name))
    np.testing.assert_array_equal(a.trace.context_tokens, b.trace.context_tokens)
    np.testing.assert_array_equal(a.token_ids(len(a) - 1, 500), b.token_ids(len(b) - 1, 500))
    assert not np.array_equal(a.trace.context_tokens, c.trace.context_tokens)
    assert a.think_s[a.follows < 0].max() == 0 and a.think_s[a.follows >= 0].min() > 0


@pytest.mark.parametrize("kwargs, match", [
    (dict(num_sessions=0), "num_sessions"), (dict(num_sessions=2, turns=0), "turns"),
    (dict(num_sessions=2, think_s=-1.0), "think_s"), (dict(num_sessions=2, max_total_tokens=1), "max_total_tokens"),
    (dict(num_sessions=2, sessions_per_s=0), "sessions_per_s"),
])
def test_multiturn_rejects(kwargs, match):
    with pytest.raises(TraceError, match=match):
        multiturn_workload(**kwargs)


def test_workload_rejects_bad_arrays(bundled):
    t = bundled.head(3)
    good = Workload.from_trace(t)
    with pytest.raises(TraceError, match=r"follows\[1\]=1"):
        Workload(**{**_fields(good), "follows": [-1, 1, -1]})
    with pytest.raises(TraceError, match="samples"):
        Workload(**{**_fields(good), "samples": [1, 0, 1]})
    with pytest.raises(TraceError, match="shape"):
        Workload(**{**_fields(good), "think_s": [0.0]})


def _fields(w: Workload) -> dict:
    return dict(trace=w.trace, follows=w.follows, think_s=w.think_s, samples=w.samples, stream=w.stream,
                shared_len=w.shared_len)


# ---- the prefix cache in the scheduler --------------------------------------------------

@pytest.mark.parametrize("layers", [{}, dict(sliding_window=64, sliding_layers=(1,))], ids=["full", "hybrid"])
def test_sessions_hit_their_previous_turns(bundled, layers):
    """With room to spare nothing is evicted, so every later turn hits exactly the
    full blocks of the conversation before it, and nothing else is ever hit; a
    sliding group keeps the window tails a hit needs."""
    spec = tiny_spec(**layers)
    work = multiturn_workload(6, turns=3, seed=1, think_s=2.0, max_total_tokens=spec.max_seq_len, trace=bundled)
    backend = PagedBackend(spec, prefix_cache=True)
    result = run_schedule(work, backend, SchedulerConfig(max_batch=16), spec.max_seq_len, check=True)
    t, bs = work.trace, spec.block_size
    later = work.follows >= 0
    conversation = (t.context_tokens + t.generated_tokens)[work.follows[later]]
    assert result.preemptions == 0 and result.requests_served == len(work)
    assert result.cached_prompt_tokens == int((conversation // bs * bs).sum()) > 0
    assert result.prompt_tokens == int(t.context_tokens.sum())
    assert result.prefill_tokens == result.prompt_tokens - result.cached_prompt_tokens
    assert result.tokens_generated == int(t.generated_tokens.sum())
    # A turn arrives only after the turn it follows has finished.
    assert len(backend.manager) == 0 and backend.manager.prefix_cache.stats().blocks_reused > 0


def test_pressure_evicts_and_hits_stay_consistent(bundled):
    spec = tiny_spec(num_blocks=700)
    work = multiturn_workload(12, turns=3, seed=2, think_s=5.0, max_total_tokens=spec.max_seq_len, trace=bundled)
    roomy = simulate(work, tiny_spec(), max_batch=16, prefix_cache=True)
    tight = simulate(work, spec, max_batch=16, prefix_cache=True, check=True)
    assert tight.requests_served == roomy.requests_served == len(work)
    assert 0 < tight.token_hit_rate < roomy.token_hit_rate
    assert tight.prefill_tokens_saved >= tight.cached_prompt_tokens
    assert tight.mean_group_cached[0] > 0 and tight.peak_group_blocks[0] <= spec.usable_blocks


# ---- fork --------------------------------------------------------------------------------------

def test_parallel_samples_fork(bundled):
    t = bundled.head(40)
    spec = tiny_spec(num_blocks=4000, max_blocks_per_seq=400)
    shared = simulate(Workload.from_trace(t, samples=3), spec, max_batch=64, check=True)
    assert shared.forks > 0 and shared.requests_served == 40
    # The samples share the prompt and the first output token, then each decodes its own.
    assert shared.tokens_generated == int(3 * t.generated_tokens.sum() - 2 * len(t))
    copies = Trace(np.repeat(t.arrival_s, 3), np.repeat(t.context_tokens, 3), np.repeat(t.generated_tokens, 3))
    alone = simulate(copies, spec, max_batch=64)
    assert shared.mean_blocks_in_use < 0.8 * alone.mean_blocks_in_use
    # A cache that cannot share copies (or refills) each sample; the same tokens come out.
    contiguous = run_schedule(Workload.from_trace(t, samples=3), ContiguousMaxLenBackend(spec, 64 * spec.max_seq_len),
                              SchedulerConfig(max_batch=64), spec.max_seq_len, check=True)
    assert contiguous.tokens_generated == shared.tokens_generated


def test_fork_with_prefix_cache_and_pressure(bundled):
    head = bundled.head(400)
    rows = np.flatnonzero((head.context_tokens < 600) & (head.generated_tokens > 100))[:16]
    t = Trace(head.arrival_s[rows], head.context_tokens[rows], head.generated_tokens[rows])
    spec = tiny_spec(num_blocks=150, max_blocks_per_seq=64)
    report = simulate(Workload.from_trace(t, samples=4), spec, max_batch=32, prefix_cache=True, check=True)
    assert report.requests_served == 16 and report.preemptions > 0 and report.forks > 0
    assert report.tokens_generated == int(4 * t.generated_tokens.sum() - 3 * len(t))
    # Preempted sequences come back through the cache: their keyed blocks are hits.
    assert report.prefill_tokens_saved > 0


# ---- per-group fragmentation ------------------------------------------------------------------------

def test_group_profile_on_a_tiny_hybrid():
    """One sequence, prompt 40, 30 outputs, W=32, blocks of 16: every row's blocks per
    group and live tokens follow from its length alone."""
    spec = tiny_spec(num_blocks=64, max_blocks_per_seq=8, sliding_window=32, sliding_layers=(1,))
    trace = Trace([0.0], [40], [30])
    report = simulate(trace, spec, max_batch=4, check=True)
    s = report.series
    held = np.arange(41, 71)  # prompt + first output token at step 0, then one a step
    assert len(s) == 30
    full_blocks = -(-held // 16)
    # The sliding group keeps the blocks from the one holding position (newest - W + 1).
    first_kept = np.maximum(held - 1 - 32 + 1, 0) // 16
    first_kept[0] = 0  # admission holds the whole prompt; blocks return at the first append
    np.testing.assert_array_equal(s.group_columns["blocks"][:, 0], full_blocks)
    np.testing.assert_array_equal(s.group_columns["blocks"][:, 1], full_blocks - first_kept)
    np.testing.assert_array_equal(s.group_columns["tokens"][:, 0], held)
    np.testing.assert_array_equal(s.group_columns["tokens"][:, 1], np.minimum(held, 32))
    util = s.group_utilization
    np.testing.assert_allclose(util[:, 1], np.minimum(held, 32) / (16 * (full_blocks - first_kept)))
    assert report.group_kinds == ("full", "sliding:32")
    assert report.mean_group_blocks == pytest.approx((full_blocks.mean(), (full_blocks - first_kept).mean()))
    assert report.peak_group_blocks == (5, 3)
    assert report.group_utilization[0] == pytest.approx(held.sum() / (16 * full_blocks.sum()))
    table = s.group_table()
    assert set(table) >= {"blocks_g1", "cached_g1", "tokens_g1", "utilization_g1"}


def test_live_tokens_over_a_span_is_the_mean_of_its_steps():
    held = np.array([5, 30, 31, 100])
    for kind in ("sliding:32", "chunked:8"):
        steps = [live_tokens(held + j, kind, 0, 0.0) for j in range(1, 12)]
        assert live_tokens(held, kind, 11, 0.0) == pytest.approx(np.mean(steps))
    assert live_tokens(held, "full", 3, 7.5) == 7.5
    assert live_tokens(held, "chunked:8", 0, 0.0) == 5 + 6 + 7 + 4


# ---- layouts at equal memory -------------------------------------------------------------------------

def test_layouts_at_equal_memory():
    shape = ModelShape(num_layers=12, num_kv_heads=2, head_dim=64)
    assert sliding_layers(12, "hybrid") == (0, 1, 2, 3, 4, 6, 7, 8, 9, 10)
    budget = 2**30
    specs = {layout: spec_at_memory(shape, layout, budget, window=256, sliding_share=0.3, max_seq_len=4096)
             for layout in ("full", "hybrid", "sliding")}
    for spec in specs.values():
        assert 0.99 * budget < spec.pool_bytes <= budget
    hybrid = specs["hybrid"]
    sliding_bytes = hybrid.groups[1].num_blocks * hybrid.group_bytes_per_block(1)
    assert sliding_bytes / hybrid.pool_bytes == pytest.approx(0.3, abs=0.01)
    assert demand_share(hybrid, (100.0, 20.0)) == pytest.approx(20 * 5 / (100 * 1 + 20 * 5))
    with pytest.raises(SpecError, match="sliding_share"):
        spec_at_memory(shape, "hybrid", budget, sliding_share=1.0)
    with pytest.raises(SpecError, match="layout"):
        sliding_layers(12, "striped")


# ---- the command line -------------------------------------------------------------------------------

def test_cli_multiturn(capsys):
    assert main(["simulate", "--workload", "multiturn", "--sessions", "4", "--turns", "2", "--json",
                 "--progress", "off"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["workload"] == "multiturn" and out["prefix_cache"] is True and out["requests"] == 8
    assert 0 < out["token_hit_rate"] < 1 and out["prefill_tokens_saved"] > 0
    assert "Multi-turn sessions" in out["trace"] and "CC-BY 4.0" in out["trace"]


def test_compare_with_samples_runs_every_backend(bundled):
    t = bundled.head(20)
    spec = tiny_spec(num_blocks=1500, max_blocks_per_seq=400)
    reports = compare(Workload.from_trace(t, samples=2), spec, SchedulerConfig(max_batch=32))
    assert [r.tokens_generated for r in reports] == [int(2 * t.generated_tokens.sum() - len(t))] * 3
    assert reports[0].forks > 0


def test_cli_hybrid_layout(capsys):
    assert main(["simulate", "--limit", "20", "--model", "gemma3-12b", "--layout", "hybrid", "--sliding-blocks",
                 "2048", "--json", "--progress", "off"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["layout"] == "hybrid" and out["group_kinds"] == ["full", "sliding:1024"]
    per_token_layer = 2 * 8 * 256 * 2
    assert out["pool_bytes"] == 16 * per_token_layer * (8192 * 8 + 2048 * 40)
    assert out["mean_group_blocks"][1] < out["mean_group_blocks"][0]
    with pytest.raises(SystemExit) as exit_:  # only a hybrid has a second pool
        main(["simulate", "--sliding-blocks", "64"])
    assert exit_.value.code == 2 and "--layout hybrid" in capsys.readouterr().err
