"""The continuous-batching simulator: scheduler, backends, fragmentation profile."""

from __future__ import annotations

import json

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from paged_kv import CacheSpec
from paged_kv.allocator.manager import KVCacheManager
from paged_kv.cli import main
from paged_kv.sim import (
    PROGRESS_EVERY,
    ContiguousMaxLenBackend,
    FirstFitArena,
    FirstFitBackend,
    SchedulerConfig,
    SimulationError,
    StepSeries,
    Trace,
    compare,
    equal_memory_slots,
    run_schedule,
    simulate,
    synthetic_trace,
    write_series,
)
from paged_kv.sim.profile import weighted_quantile


def small_spec(num_blocks: int, max_blocks_per_seq: int, block_size: int = 16, max_batch_slots: int = 64,
               **extra) -> CacheSpec:
    return CacheSpec(num_layers=2, num_kv_heads=1, head_dim=8, dtype="float32", num_blocks=num_blocks,
                     block_size=block_size, max_blocks_per_seq=max_blocks_per_seq, max_batch_slots=max_batch_slots,
                     **extra)


@pytest.fixture
def spy_manager(monkeypatch):
    """Capture the managers the paged backend builds, recording admit and append calls."""
    instances = []

    class SpyManager(KVCacheManager):
        def __init__(self, spec, **options):
            super().__init__(spec, **options)
            self.admits, self.appends = [], []
            instances.append(self)

        def admit(self, seq_id, num_tokens):
            self.admits.append((seq_id, num_tokens))
            return super().admit(seq_id, num_tokens)

        def append(self, seq_ids, num_tokens=1):
            self.appends.append((list(seq_ids), np.broadcast_to(num_tokens, (len(seq_ids),)).copy()))
            return super().append(seq_ids, num_tokens)

    monkeypatch.setattr("paged_kv.sim.backends.paged.KVCacheManager", SpyManager)
    return instances


def pressure_spec(trace: Trace, num_blocks: int, **extra) -> CacheSpec:
    longest = int((trace.context_tokens + trace.generated_tokens).max())
    return small_spec(num_blocks=num_blocks, max_blocks_per_seq=-(-longest // 16), **extra)


# ---- the paged replay ---------------------------------------------------------------

def test_replay_under_memory_pressure(bundled, spy_manager):
    trace = bundled.head(300)
    spec = pressure_spec(trace, 600)
    seen = []
    report = simulate(trace, spec, check=True, progress=lambda done, total: seen.append((done, total)))

    assert report.requests_served == 300 and report.skipped == 0 and report.truncated == 0
    assert report.preemptions > 0
    assert report.tokens_generated == int(trace.generated_tokens.sum())
    # Recompute re-prefills preempted sequences, so prefill exceeds the prompts.
    assert report.prefill_tokens > int(trace.context_tokens.sum())
    assert report.admissions == 300 + report.preemptions
    assert 0.9 < report.time_avg_utilization <= 1.0
    assert report.p1_utilization <= report.p50_utilization <= report.p99_utilization <= 1.0
    assert 0 < report.peak_blocks_in_use <= spec.usable_blocks
    assert 0 < report.mean_blocks_in_use <= report.peak_blocks_in_use
    assert 0 < report.mean_running <= report.peak_running <= spec.max_batch_slots
    # Every request decodes one token a step, so the run takes at least its longest output.
    assert report.steps >= int(trace.generated_tokens.max())
    assert seen[-1] == (300, 300) and len(seen) >= report.steps // PROGRESS_EVERY

    (manager,) = spy_manager
    assert len(manager) == 0 and manager.num_used_blocks == 0
    assert manager.num_free_blocks == spec.usable_blocks
    manager.check_integrity()
    # One batched append per step that had running sequences, plus one retry per preemption.
    assert len(manager.appends) <= report.steps + report.preemptions


def test_series_matches_the_manager(bundled):
    """Every profiled row satisfies what paging promises: tokens never exceed slots,
    and the empty slots are less than one block per running sequence."""
    trace = bundled.head(200)
    report = simulate(trace, pressure_spec(trace, 500))
    s = report.series
    assert len(s) == report.steps and (s["steps"] == 1).all()
    assert (s["tokens_stored"] <= s["slots_allocated"]).all()
    assert (s["slots_allocated"] - s["tokens_stored"] < 16 * s["running"]).all()
    assert (s["slots_allocated"] + s["free_slots"] == 499 * 16).all()
    assert (s["largest_free_run"] == s["free_slots"]).all()  # paging has no external fragmentation
    assert np.isclose(report.time_avg_utilization, s["tokens_stored"].sum() / s["slots_allocated"].sum())


def test_chunked_prefill_respects_the_token_budget(spy_manager):
    spec = small_spec(num_blocks=64, max_blocks_per_seq=32)
    trace = Trace(np.zeros(2), context_tokens=[200, 30], generated_tokens=[3, 2])
    report = simulate(trace, spec, check=True, config=SchedulerConfig(max_batch=4, token_budget=64))
    (m,) = spy_manager
    # Step 0: the 200-token prompt is admitted with one 64-token chunk, the budget's all.
    assert m.admits[0] == (0, 64)
    # Steps 1-2: 64-token chunks; step 3: the last 8 plus its first output token,
    # and the second request is admitted with the budget left.
    assert [c.tolist() for _, c in m.appends[:3]] == [[64], [64], [9]]
    assert m.admits[1] == (1, 31)  # its whole 30-token prompt and its first output token
    assert report.requests_served == 2 and report.tokens_generated == 5
    assert report.prefill_tokens == 230
    for seqs, counts in m.appends:
        assert counts.sum() <= 64 + len(seqs)  # chunks within budget (+1 first token each)


def test_truncates_skips_and_prefill_only(spy_manager):
    # max_seq_len = 4 blocks x 4 tokens = 16.
    spec = small_spec(num_blocks=64, max_blocks_per_seq=4, block_size=4)
    trace = Trace(np.zeros(4), context_tokens=[10, 20, 5, 16], generated_tokens=[10, 3, 0, 0])
    report = simulate(trace, spec, check=True)
    assert report.truncated == 1  # 10 + 10 > 16: output cut to 6 tokens
    assert report.skipped == 1  # a 20-token prompt cannot be held at all
    assert report.requests_served == 3  # the two prefill-only requests included
    assert report.tokens_generated == 6
    assert report.steps == 6
    assert spy_manager[0].num_used_blocks == 0


def test_prefill_only_requests_take_their_prefill_steps():
    # Alone in the trace, a request with no output still costs the steps that
    # prefill it: one, or one per prompt chunk when the prompt exceeds the budget.
    spec = small_spec(num_blocks=64, max_blocks_per_seq=16)
    one = simulate(Trace([0.0], [40], [0]), spec, check=True)
    assert (one.steps, one.prefill_tokens, one.requests_served, one.tokens_generated) == (1, 40, 1, 0)
    assert one.series["tokens_stored"].tolist() == [40]  # its blocks are held during that step
    chunked = simulate(Trace([0.0], [100], [0]), spec, check=True,
                       config=SchedulerConfig(max_batch=4, token_budget=32))
    assert (chunked.steps, chunked.prefill_tokens) == (4, 100)


def test_cancellations_release_early(spy_manager):
    spec = small_spec(num_blocks=64, max_blocks_per_seq=16)
    trace = Trace(np.zeros(3), [20, 20, 20], [50, 50, 50], cancel_after=[-1, 10, 0])
    report = simulate(trace, spec, check=True)
    assert report.requests_served == 1 and report.cancelled == 2
    assert report.tokens_generated == 50 + 10 + 0
    assert report.steps == 50
    assert spy_manager[0].num_used_blocks == 0


def test_trace_arrivals_idle_and_queue(spy_manager):
    spec = small_spec(num_blocks=64, max_blocks_per_seq=16, max_batch_slots=1)
    # Two requests 10 s apart (400 steps at 25 ms) and a third arriving with the second.
    trace = Trace([0.0, 10.0, 10.0], [16, 16, 16], [5, 5, 5])
    report = simulate(trace, spec, check=True, config=SchedulerConfig(max_batch=1, token_budget=16, arrivals="trace"))
    assert report.steps == 15
    assert report.idle_steps == 400 - 5 + 0
    # The third waits for the second's 5 steps: delays 0, 0, 5.
    assert report.queue_delay_p99 == pytest.approx(np.percentile([0, 0, 5], 99))
    assert report.queue_delay_mean == pytest.approx(5 / 3)
    fast = simulate(trace, spec, config=SchedulerConfig(max_batch=1, token_budget=16, arrivals="trace", speedup=100))
    assert fast.idle_steps == 0 and fast.steps == 15


def test_empty_trace():
    report = simulate(Trace([], [], []), small_spec(num_blocks=8, max_blocks_per_seq=4))
    assert report.steps == 0 and report.requests_served == 0 and report.time_avg_utilization == 0.0


@pytest.mark.parametrize("kwargs, match", [
    (dict(max_batch=0), "max_batch=0"),
    (dict(max_batch=True), "max_batch=True"),
    (dict(token_budget=8, max_batch=16), "token_budget=8"),
    (dict(watermark=1.0), "watermark=1.0"),
    (dict(watermark=-0.1), "watermark=-0.1"),
    (dict(arrivals="online"), "arrivals='online'"),
    (dict(step_s=0.0), "step_s=0.0"),
    (dict(speedup=float("nan")), "speedup=nan"),
])
def test_scheduler_config_rejects(kwargs, match):
    with pytest.raises(SimulationError, match=match):
        SchedulerConfig(**kwargs)


def test_simulate_rejects_bad_settings(bundled):
    spec = small_spec(num_blocks=64, max_blocks_per_seq=16, max_batch_slots=8)
    with pytest.raises(SimulationError, match="max_batch=9"):
        simulate(bundled.head(5), spec, max_batch=9)
    with pytest.raises(SimulationError, match="watermark"):
        simulate(bundled.head(5), spec, watermark=1.0)
    with pytest.raises(SimulationError, match="max_batch_slots=8"):
        simulate(bundled.head(5), spec, config=SchedulerConfig(max_batch=16))


def test_report_format_and_dict(bundled):
    report = simulate(bundled.head(20), small_spec(num_blocks=1024, max_blocks_per_seq=512))
    d = report.as_dict()
    assert d["requests_served"] == 20 and "series" not in d
    json.dumps(d)
    lines = report.format().splitlines()
    assert len(lines) == len(report.rows())
    assert len({len(line) for line in lines}) == 1  # aligned


# ---- stress: synthetic admit/evict traces --------------------------------------------

@pytest.mark.parametrize("seed", [0, 1, 2])
def test_synthetic_stress_with_integrity_checks(seed, spy_manager):
    """Thousands of random admit/append/evict steps (bursts, long outliers,
    cancellations, preemptions) with the manager's integrity check after each."""
    spec = small_spec(num_blocks=400, max_blocks_per_seq=256, block_size=16, max_batch_slots=64)
    trace = synthetic_trace(400, seed=seed, context_median=300, generated_median=60,
                            outlier_tokens=(1000, 4000), cancel_fraction=0.1, max_total_tokens=spec.max_seq_len)
    report = simulate(trace, spec, check=True, config=SchedulerConfig(max_batch=64, token_budget=512,
                                                                      arrivals="trace", speedup=4.0))
    assert report.steps >= 1000
    assert report.preemptions > 0 and report.cancelled == trace.num_cancelled > 0
    assert report.requests_served + report.cancelled == len(trace)
    expected = np.where(trace.cancel_after >= 0, trace.cancel_after, trace.generated_tokens).sum()
    assert report.tokens_generated == expected
    (m,) = spy_manager
    assert len(m) == 0 and m.num_used_blocks == 0
    m.check_integrity()


def test_sliding_layers_hold_fewer_blocks(bundled):
    trace = bundled.head(150)
    full = pressure_spec(trace, 700)
    hybrid = pressure_spec(trace, 700, sliding_window=256, sliding_layers=(1,), sliding_num_blocks=700)
    a, b = simulate(trace, full, check=True), simulate(trace, hybrid, check=True)
    assert len(b.mean_group_blocks) == 2 and b.mean_group_blocks[1] < b.mean_group_blocks[0]
    assert b.mean_used_bytes < a.mean_used_bytes
    assert (b.series["sliding_blocks"] > 0).any() and (a.series["sliding_blocks"] == 0).all()


# ---- baselines ------------------------------------------------------------------------

def test_compare_at_equal_memory(bundled):
    trace = bundled.head(400)
    spec = small_spec(num_blocks=1024, max_blocks_per_seq=1024 - 1)  # max_seq_len 16,368
    paged, maxlen, firstfit = compare(trace, spec, check=True)
    assert [r.backend for r in (paged, maxlen, firstfit)] == ["paged", "contiguous-max-len", "contiguous-first-fit"]
    for r in (paged, maxlen, firstfit):
        assert r.requests_served == 400 and r.tokens_generated == int(trace.generated_tokens.sum())
        assert r.capacity_slots == 1023 * 16
    # Max-length buffers: 16,368 slots / 16,368 = one sequence at a time.
    assert maxlen.peak_running == 1 and maxlen.preemptions == 0
    assert maxlen.time_avg_utilization < 0.2
    assert firstfit.preemptions == 0 and firstfit.mean_free_run_ratio < 1.0
    assert paged.mean_running > firstfit.mean_running > maxlen.mean_running
    assert paged.time_avg_utilization > firstfit.time_avg_utilization > maxlen.time_avg_utilization


def test_equal_memory_slots_counts_sliding_bytes():
    spec = small_spec(num_blocks=101, max_blocks_per_seq=10)
    assert equal_memory_slots(spec) == 100 * 16
    hybrid = small_spec(num_blocks=101, max_blocks_per_seq=10, sliding_window=32, sliding_layers=(1,),
                        sliding_num_blocks=21)
    # One full layer of 100 blocks plus one sliding layer of 20, at two layers per slot.
    assert equal_memory_slots(hybrid) == (100 + 20) * 16 // 2


class _NoSkip:
    reserves_ahead = False


@pytest.mark.parametrize("backend_cls", [ContiguousMaxLenBackend, FirstFitBackend])
def test_skipping_decode_spans_is_exact(backend_cls, bundled):
    """Backends that reserve ahead are replayed a span of steps per row; every
    figure must equal the step-by-step replay's."""
    trace = synthetic_trace(150, seed=3, context_median=200, generated_median=80, outlier_tokens=(800, 1500),
                            max_total_tokens=2048)
    spec = small_spec(num_blocks=400, max_blocks_per_seq=128)
    config = SchedulerConfig(max_batch=32, token_budget=256, arrivals="trace", speedup=3.0)
    slow_cls = type("Slow" + backend_cls.__name__, (_NoSkip, backend_cls), {})
    fast = run_schedule(trace, backend_cls(spec, equal_memory_slots(spec)), config, spec.max_seq_len, check=True)
    slow = run_schedule(trace, slow_cls(spec, equal_memory_slots(spec)), config, spec.max_seq_len, check=True)
    assert len(fast.series) < len(slow.series)
    assert fast.steps == slow.steps and fast.idle_steps == slow.idle_steps
    assert fast.tokens_generated == slow.tokens_generated
    np.testing.assert_array_equal(np.sort(fast.queue_delay_steps), np.sort(slow.queue_delay_steps))
    a, b = fast.series.summary(), slow.series.summary()
    for key in a:
        assert a[key] == pytest.approx(b[key], rel=1e-12), key


def test_contiguous_max_len_buffers():
    spec = small_spec(num_blocks=65, max_blocks_per_seq=16)  # 1024 slots, max_seq_len 256
    b = ContiguousMaxLenBackend(spec, equal_memory_slots(spec))
    assert b.num_slots == 4
    for i in range(4):
        assert b.can_admit(i, 10, 20, busy=True)
        b.admit(i, 10, 20)
    assert not b.can_admit(9, 10, 20, busy=True)
    s = b.sample()
    assert (s.slots_allocated, s.free_slots, s.largest_free_run) == (1024, 0, 0)
    b.release(2)
    assert b.can_admit(9, 10, 20, busy=True) and b.sample().largest_free_run == 256
    assert not b.can_admit(9, 10, 257, busy=True)  # longer than a buffer


def test_first_fit_arena_places_and_merges():
    a = FirstFitArena(100)
    assert [a.allocate(n) for n in (10, 20, 30)] == [0, 10, 30]
    a.release(10, 20)
    assert a.largest_free_run == 40 and a.free == 60
    assert a.allocate(15) == 10  # first fit: the hole, not the tail
    assert a.allocate(25) == 60
    assert not a.can_allocate(16) and a.free == 20  # 5 + 15 free, in two runs
    with pytest.raises(MemoryError, match="no free run of 16 slots"):
        a.allocate(16)
    a.release(0, 10)
    a.release(10, 15)
    a.release(30, 30)
    a.release(60, 25)
    a.check_integrity()
    assert a.starts.tolist() == [0] and a.lengths.tolist() == [100]


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.booleans(), st.integers(1, 40), st.integers(0, 10**6)), max_size=80))
def test_first_fit_arena_matches_a_bitmap(ops):
    """Against a brute-force model: a bitmap scanned for the lowest free run."""
    cap = 128
    arena, used = FirstFitArena(cap), np.zeros(cap, dtype=bool)
    held: list[tuple[int, int]] = []
    for is_alloc, n, pick in ops:
        if is_alloc:
            free_runs = [s for s in range(cap - n + 1) if not used[s : s + n].any()]
            assert arena.can_allocate(n) == bool(free_runs)
            if free_runs:
                start = arena.allocate(n)
                assert start == free_runs[0]
                used[start : start + n] = True
                held.append((start, n))
        elif held:
            start, n = held.pop(pick % len(held))
            arena.release(start, n)
            used[start : start + n] = False
        arena.check_integrity()
        assert arena.free == int((~used).sum())
        runs = np.diff(np.flatnonzero(np.diff(np.concatenate([[1], used.astype(int), [1]])) != 0))[::2]
        assert arena.largest_free_run == (int(runs.max()) if runs.size else 0)


# ---- profile output -------------------------------------------------------------------

def test_weighted_quantile():
    v, w = np.array([0.5, 0.9, 1.0]), np.array([1, 8, 1])
    assert weighted_quantile(v, w, 0.05) == 0.5
    assert weighted_quantile(v, w, 0.5) == 0.9
    assert weighted_quantile(v, w, 0.99) == 1.0
    assert weighted_quantile(np.array([]), np.array([]), 0.5) == 0.0


def test_series_files(bundled, tmp_path):
    reports = compare(bundled.head(30), small_spec(num_blocks=2048, max_blocks_per_seq=1024))
    series = {r.backend: r.series for r in reports}
    write_series(tmp_path / "s.json", series)
    loaded = json.loads((tmp_path / "s.json").read_text())
    assert set(loaded) == set(series)
    assert loaded["paged"]["running"] == series["paged"]["running"].tolist()
    write_series(tmp_path / "s.csv", series)
    lines = (tmp_path / "s.csv").read_text().splitlines()
    assert lines[0].startswith("backend,step,steps,running")
    assert len(lines) == 1 + sum(len(s) for s in series.values())
    assert isinstance(series["paged"], StepSeries)


# ---- command line ---------------------------------------------------------------------

def test_cli_compare_plot_and_series(tmp_path, capsys):
    png, csv_path = tmp_path / "p.png", tmp_path / "s.csv"
    assert main(["simulate", "--limit", "150", "--compare", "--plot", str(png), "--series", str(csv_path)]) == 0
    out = capsys.readouterr().out
    assert "CC-BY 4.0" in out and "contiguous-first-fit" in out and "paged / contiguous-max-len" in out
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    assert csv_path.read_text().count("\ncontiguous-max-len,") > 0


def test_cli_compare_json_synthetic(capsys):
    assert main(["simulate", "--trace", "synthetic", "--requests", "120", "--compare", "--json",
                 "--arrivals", "trace", "--speedup", "20"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["requests"] == 120 and result["trace"].startswith("Trace: synthetic")
    assert set(result["baselines"]) == {"contiguous-max-len", "contiguous-first-fit"}
    assert result["ratios"]["mean_running_paged_over_contiguous-max-len"] > 1
    assert result["requests_served"] + result["cancelled"] == 120


def test_cli_plot_without_matplotlib(monkeypatch, tmp_path, capsys):
    import sys

    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import now raises ImportError
    assert main(["simulate", "--limit", "5", "--plot", str(tmp_path / "p.png")]) == 2
    err = capsys.readouterr().err
    assert "pip install 'paged_kv[plot]'" in err and not (tmp_path / "p.png").exists()


def test_cli_progress_bar(capsys):
    assert main(["simulate", "--limit", "60", "--progress", "on"]) == 0
    err = capsys.readouterr().err
    assert "paged [" in err and "60/60 requests" in err and err.endswith("\n")


def test_series_derived_columns(bundled):
    report = simulate(bundled.head(40), small_spec(num_blocks=2048, max_blocks_per_seq=1024))
    d = report.series.derived()
    s = report.series
    np.testing.assert_allclose(d["internal_fragmentation"], s["slots_allocated"] - s["tokens_stored"])
    np.testing.assert_array_equal(d["blocks_used"] + d["blocks_free"], 2047)
    assert (d["utilization"] > 0.5).all()


def test_swap_preemption_loses_nothing(bundled):
    trace = bundled.head(300)
    spec = pressure_spec(trace, 600)
    recompute = simulate(trace, spec, check=True)
    swapped = simulate(trace, spec, check=True, config=SchedulerConfig(max_batch=64, preemption="swap"))
    assert swapped.preemptions > 0 and swapped.swap_ins == swapped.preemptions
    # Nothing is prefilled twice: the prompts are all the prefill there is.
    assert swapped.prefill_tokens == int(trace.context_tokens.sum()) < recompute.prefill_tokens
    assert swapped.tokens_generated == recompute.tokens_generated == int(trace.generated_tokens.sum())
    assert swapped.bytes_swapped_out == swapped.bytes_swapped_in > 0
    assert swapped.bytes_swapped_out % spec.bytes_per_block == 0
    assert 0 < swapped.peak_swapped_bytes <= swapped.bytes_swapped_out
    assert recompute.bytes_swapped_out == 0 and recompute.preemption == "recompute"
    assert "swap" in swapped.format()


def test_cli_swap_preemption(capsys):
    assert main(["simulate", "--limit", "400", "--num-blocks", "1100", "--preemption", "swap", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["preemption"] == "swap" and result["preemptions"] > 0
    assert result["bytes_swapped_out"] == result["bytes_swapped_in"] > 0
