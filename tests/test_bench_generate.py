"""benchmarks/bench_generate.py's comparison with transformers (issue 26 item 4), without
running it: the benchmark model the loader reads, the token comparison that reports
mismatches, the peer skipped with a reason, run_all's peer flag, and the README rows.
No timings are asserted; no torch is needed."""

from __future__ import annotations

import json
import pathlib
import sys

import pytest

from paged_kv.models.loader import expected_shapes, load_config

ROOT = pathlib.Path(__file__).resolve().parents[1]

BENCH = ROOT / "benchmarks"


@pytest.fixture(scope="module")
def bench():
    sys.path.insert(0, str(BENCH))
    try:
        import bench_generate
        import figure_rows
        import make_bench_model
        import run_all

        yield bench_generate, make_bench_model, run_all, figure_rows
    finally:
        sys.path.remove(str(BENCH))


def test_the_benchmark_model_is_what_the_loader_expects(bench, tmp_path):
    _, make_bench_model, _, _ = bench
    (tmp_path / "config.json").write_text(json.dumps(make_bench_model.CONFIG))
    cfg = load_config(tmp_path)
    assert (cfg.model_type, cfg.num_layers, cfg.hidden_size, cfg.vocab_size) == ("llama", 8, 512, 32000)
    assert cfg.sliding_window is None and cfg.tie_word_embeddings
    weights = make_bench_model.weights()
    assert {k: v.shape for k, v in weights.items()} == expected_shapes(cfg)
    assert sum(v.size for v in weights.values()) == make_bench_model.parameters()
    assert 25e6 < make_bench_model.parameters() < 40e6
    assert make_bench_model.default_dir().is_relative_to(ROOT) is False  # never written into the checkout


def test_prompts_cover_the_prefill_buckets_and_sets_hold_the_longest(bench):
    bench_generate, *_ = bench
    warm = bench_generate.prompts(32000, 32, 1032, cover=True)
    assert [len(p) for p in warm[:4]] == list(bench_generate.COVER)
    timed = bench_generate.prompts(32000, 32, 320, longest=True)
    assert max(map(len, timed)) == bench_generate.PROMPT_LENGTHS[1]
    assert all(8 <= len(p) <= 40 and min(p) >= 3 for p in timed)
    assert timed == bench_generate.prompts(32000, 32, 320, longest=True)  # seeded: both sides get the same


def test_a_mismatch_is_reported_with_its_position(bench):
    bench_generate, *_ = bench
    mine = [[[5, 6, 7, 8], [1, 2, 3]]]
    theirs = [[[5, 6, 9, 9], [1, 2, 3]]]
    equal, total, diffs = bench_generate._compare(mine, theirs)
    assert (equal, total) == (1, 2)
    assert diffs == [{"set": 0, "request": 0, "position": 2, "paged_kv": [7, 8], "other": [9, 9], "lengths": [4, 4]}]
    assert bench_generate._compare([[[1, 2]]], [[[1]]])[2][0]["position"] == 1  # a shorter answer differs too


def test_without_torch_the_peer_is_skipped_with_a_reason(bench, monkeypatch):
    bench_generate, *_ = bench
    real = bench_generate.importlib.util.find_spec
    monkeypatch.setattr(bench_generate.importlib.util, "find_spec", lambda m: None if m == "torch" else real(m))
    python, why = bench_generate.find_peer(None)
    assert python is None and "torch" in why and "--peer-python" in why and "PEERS.md" in why
    assert bench_generate.find_peer("/some/python") == ("/some/python", None)


def test_run_all_gives_the_peer_interpreter_to_bench_generate(bench):
    _, _, run_all, _ = bench
    assert run_all.BENCHMARKS["bench_generate"] == ["--quick"]
    assert run_all.benchmark_args("bench_generate", "/venv/bin/python") == ["--quick", "--peer-python",
                                                                            "/venv/bin/python"]
    assert run_all.benchmark_args("bench_generate", sys.executable) == ["--quick"]  # the default: look in its own
    assert "--peer-python" not in run_all.benchmark_args("bench_prefix", "/venv/bin/python")


def _result(batches: dict, transformers: dict | None = None, ttft: dict | None = None) -> dict:
    vs = {"parameters": 32_121_344, "new_tokens": 64, "transformers": transformers or {}, "batches": batches}
    return {"bench_generate": {"result": {"vs_transformers": vs, **({"ttft": ttft} if ttft else {})}}}


def test_the_figures_rows(bench):
    *_, figure_rows = bench
    row = {"paged_kv_tokens_per_s": 500.0, "continuous_tokens_per_s": 200.0, "ratio_continuous": 2.5,
           "continuous_manager_tokens_per_s": 250.0, "ratio_continuous_manager": 2.0, "padded_tokens_per_s": 100.0,
           "ratio_padded": 5.0, "equal_continuous": "64/64", "equal_continuous_manager": "64/64",
           "equal_padded": "63/64", "aim_ratio_continuous": 2.0, "aim_met": True, "torch_threads": {"threads": 1}}
    ttft = {"warm_s": 2.1, "cold_s": 6.0, "aim_warm_s": 1.5, "aim_met": False, "warm": {"marks_s": {"imported_jax": 1.0}}}
    rows = figure_rows.rows(_result({"32": row, "1": {**row, "aim_ratio_continuous": 1.0}},
                                    {"versions": {"transformers": "5.19.0"}}, ttft))
    assert len(rows) == 3
    what, figure, base = rows[0]
    assert "32M-parameter" in what and "batch 32" in what
    assert "**2.50×** `generate_batch`" in figure and "**2.00×** one running manager" in figure and "met" in figure
    assert "generate 63/64" in base and "5.19.0" in base
    assert "batch 1" in rows[1][0]
    assert "**2.10 s**" in rows[2][1] and "**not met**" in rows[2][1] and "6.00 s" in rows[2][2]
    skipped = figure_rows.rows(_result({"32": {"paged_kv_tokens_per_s": 500.0}}, {"error": "torch not importable"}))
    assert skipped[0][1] == "—" and "torch not importable" in skipped[0][2]
