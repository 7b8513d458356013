"""Rerun every benchmark and regenerate the README's figures from what they print.

Each benchmark prints a final JSON line; this runs them one after another (quick
settings where a benchmark has them, so the whole run stays within minutes on
2 cores), collects those lines into one JSON file with the CPU model and the load
average before and after each, and renders the README's figures table (the section
between ``<!-- figures:begin -->`` and ``<!-- figures:end -->``) from it. Every
speed figure there is a ratio against a baseline or peer measured in the same
process, with the machine and its load beside it, so a rerun on another machine
reproduces the ratios rather than the absolute times.

Reproducing a figure touches no tracked file: by default the results and the
rendered table go to ``run_all-results.json`` and ``run_all-figures.md`` in the
current folder (``--out``). A partial run (``--only``) starts from the last results
(that file, else the shipped ``benchmarks/results.json``) and replaces only the rows
it measured; a benchmark that fails keeps its earlier rows (the failure is listed
beside them), and the header keeps the full run's total time. ``--update-readme``
writes ``benchmarks/results.json`` and the README's section instead: what a
maintainer does to publish new figures.

    python benchmarks/run_all.py --only bench_sliding    # one figure, into ./run_all-*.{json,md}
    python benchmarks/run_all.py --render-only           # the table from the last results
    python benchmarks/run_all.py --update-readme         # run all, rewrite results.json and README.md
    python benchmarks/run_all.py --only bench_vs_vllm --vllm-python /opt/vllm-peer/bin/python

``bench_vs_vllm.py`` needs vLLM v1 importable (a benchmark-only dependency;
benchmarks/PEERS.md says how to install its CPU build): give its interpreter with
``--vllm-python`` (or the ``VLLM_PYTHON`` environment variable); without one it
records why it was skipped. ``bench_generate.py`` compares against transformers
(torch and transformers, which that venv has too) run by the same interpreter
(``--peer-python``); without it, it reports paged_kv's side alone.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
if str(HERE) not in sys.path:  # loaded by path (the tests) rather than run as a script
    sys.path.insert(0, str(HERE))

from figure_rows import rows  # noqa: E402
BEGIN, END = "<!-- figures:begin -->", "<!-- figures:end -->"
OUT_NAME = "run_all-results.json"
"""The default output, in the current folder: not a tracked file."""

# name -> extra arguments (quick settings). Order: host benchmarks first.
BENCHMARKS = {
    "bench_vs_vllm": ["--quick"],
    "bench_allocator": ["--quick"],
    "bench_prefix": ["--quick"],
    "bench_multiturn": ["--quick"],
    "bench_fragmentation": ["--quick"],
    "bench_preemption": ["--quick"],
    "bench_sliding": ["--limit", "3000"],
    "bench_device_ops": [],
    "bench_decode_step": ["--quick"],
    "bench_generate": ["--quick"],
    "bench_quant": ["--quick"],
    "bench_transfer": ["--quick"],  # two processes on 127.0.0.1 (`paged_kv.transfer`)
    "bench_tiers": ["--quick"],  # host and disk tiers below the pool (`paged_kv.tiers`)
}


PEER_FLAGS = {"bench_generate": "--peer-python"}
"""Benchmarks that run in this interpreter and drive a peer in another one: the flag that
names it, given the ``--vllm-python`` interpreter (that venv has torch and transformers
too; benchmarks/PEERS.md). Without one the benchmark looks in its own interpreter and
reports the peer's side as skipped when it is not there."""


def benchmark_args(name: str, vllm_python: str) -> list[str]:
    """The arguments ``name`` runs with: its quick settings, and the peer's interpreter where it takes one."""
    args = list(BENCHMARKS[name])
    if name in PEER_FLAGS and vllm_python and vllm_python != sys.executable:
        args += [PEER_FLAGS[name], vllm_python]
    return args


SETTLE_S = {"bench_device_ops": 30}
"""Seconds to wait after a benchmark before the next one. Measured: for some tens of
seconds after `bench_device_ops` (GiB pools allocated and freed), the in-place attention
of `bench_decode_step` -- scattered block reads -- ran 2.7x slower while its interleaved
baselines did not (a rerun of the ratio then read 0.85x instead of 0.32x); after 30 s,
not. The kernel settling its memory is the likely cause, not confirmed."""


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def run_one(name: str, args: list[str], python: str, timeout: int) -> dict:
    """Run one benchmark; its last JSON line, or why there is none."""
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    load_before = os.getloadavg()
    t0 = time.perf_counter()
    try:
        out = subprocess.run([python, str(HERE / f"{name}.py"), *args], capture_output=True, text=True,
                             cwd=ROOT, env=env, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout} s", "args": args}
    meta = {"args": args, "python": python, "run_s": round(time.perf_counter() - t0, 1),
            "loadavg_before": [round(x, 2) for x in load_before],
            "loadavg_after": [round(x, 2) for x in os.getloadavg()]}
    for line in reversed(out.stdout.strip().splitlines()):
        if line.startswith("{"):
            return {**meta, "result": json.loads(line)}
    tail = (out.stdout + out.stderr).strip().splitlines()[-3:]
    return {**meta, "error": f"exit {out.returncode}, no JSON line: {' | '.join(tail)}"[:400]}


def _partial_note(p: dict) -> str:
    failed = "".join(f"; `{name}` failed ({why}), its rows are from the run before"
                     for name, why in p.get("failed", {}).items())
    took = f", {p['run_s']:.0f} s" if "run_s" in p else ""
    return (f" Rerun since with `--only {' '.join(p['only'])}`: {p['when']}, load {p['loadavg_start']} "
            f"→ {p['loadavg_end']}{took}{failed}.")


def render(results: dict) -> str:
    host = results["host"]
    # A partial rerun's time is its own (in its note): the header keeps the full run's.
    total = host.get("total_s", sum(v.get("run_s", 0) for v in results["benchmarks"].values()))
    lines = [BEGIN, "",
             f"Generated by `python benchmarks/run_all.py` ({host['when']}; CPU: {host['cpu_model']}, "
             f"{host['cpus']} cores; load average {host['loadavg_start']} at the start, "
             f"{host['loadavg_end']} at the end). Ratios are against a baseline or the peer measured in the "
             f"same process; absolute times are this machine's. The run took {total:.0f} s."
             + "".join(_partial_note(p) for p in host.get("partial_runs", [])), "",
             "| what | figure | baseline in the same run |", "| --- | --- | --- |"]
    lines += [f"| {a} | {b} | {c} |" for a, b, c in rows(results["benchmarks"])]
    skipped = [f"`{k}` ({v['error']})" for k, v in results["benchmarks"].items() if "error" in v]
    if skipped:
        lines += ["", "Not in this run: " + "; ".join(skipped)]
    return "\n".join(lines + ["", END])


def write_readme(results: dict, readme: Path) -> bool:
    text = readme.read_text()
    if BEGIN not in text or END not in text:
        return False
    pattern = re.compile(re.escape(BEGIN) + ".*?" + re.escape(END), re.S)
    readme.write_text(pattern.sub(lambda _: render(results), text, count=1))
    return True


def merge(results: dict, name: str, result: dict, failed: dict) -> None:
    """Put one benchmark's fresh ``result`` into ``results``, unless it failed where the
    results hold an earlier success: a run without the peer (vLLM not installed) once
    replaced all eleven peer rows with "Not in this run". The failure goes to ``failed``."""
    earlier = results["benchmarks"].get(name)
    if "error" in result and earlier is not None and "error" not in earlier:
        failed[name] = result["error"]
        return
    results["benchmarks"][name] = result


def run_benchmarks(results: dict, only: list[str] | None, vllm_python: str, timeout: int) -> None:
    """Run ``only`` (every benchmark when None) and fold what they print into ``results``."""
    names = list(only or BENCHMARKS)
    run = {"when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
           "loadavg_start": [round(x, 2) for x in os.getloadavg()]}
    if only:  # before any row changes: the total the header shows stays the full run's
        host = results.setdefault("host", {})
        host.setdefault("total_s", round(sum(v.get("run_s", 0) for v in results["benchmarks"].values()), 1))
    else:
        results["benchmarks"] = {}  # a full run stands alone
    failed: dict = {}
    took = 0.0
    for name in names:
        python = vllm_python if name == "bench_vs_vllm" else sys.executable
        args = benchmark_args(name, vllm_python)
        print(f"running {name} {' '.join(args)} ...", flush=True)
        res = run_one(name, args, python, timeout)
        took += res.get("run_s", 0)
        print(f"    {res.get('error') or 'ok'} ({res.get('run_s', '?')} s)", flush=True)
        merge(results, name, res, failed)
        if name in SETTLE_S and names[-1] != name:
            time.sleep(SETTLE_S[name])
    run["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]
    machine = {"cpu_model": cpu_model(), "cpus": os.cpu_count(), "python": platform.python_version()}
    if only:  # the header keeps the last full run; a partial rerun is listed beside it
        for key, value in {**machine, **run}.items():
            results["host"].setdefault(key, value)
        note = {**run, "only": names, "run_s": round(took, 1)}
        if failed:
            note["failed"] = failed
        results["host"].setdefault("partial_runs", []).append(note)
    else:
        results["host"] = {**machine, **run, "total_s": round(took, 1)}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--only", nargs="+", choices=sorted(BENCHMARKS), metavar="NAME",
                    help="run only these benchmarks; the other rows are kept from the last results "
                    f"(choices: {', '.join(sorted(BENCHMARKS))})")
    ap.add_argument("--out", type=Path,
                    help=f"results file (default: ./{OUT_NAME}; with --update-readme, benchmarks/results.json); the "
                    "rendered table goes beside it as .md")
    ap.add_argument("--update-readme", action="store_true",
                    help="write benchmarks/results.json and rewrite the README's figures section (tracked files)")
    ap.add_argument("--readme", type=Path, default=ROOT / "README.md", help="the README --update-readme rewrites")
    ap.add_argument("--vllm-python", default=os.environ.get("VLLM_PYTHON", sys.executable),
                    help="interpreter that can import vLLM, for bench_vs_vllm.py, and torch + transformers, for "
                    "bench_generate.py's peer (benchmarks/PEERS.md)")
    ap.add_argument("--render-only", action="store_true", help="render the table from the last results; run nothing")
    ap.add_argument("--timeout", type=int, default=600, help="seconds per benchmark")
    args = ap.parse_args(argv)
    shipped = HERE / "results.json"
    out = args.out or (shipped if args.update_readme else Path.cwd() / OUT_NAME)
    # Start from the last results: this output's, else the shipped ones (never written
    # without --update-readme), so a partial run's table still has every row.
    source = out if out.exists() else shipped
    results = json.loads(source.read_text()) if source.exists() else {"benchmarks": {}}
    if not args.render_only:
        run_benchmarks(results, args.only, args.vllm_python, args.timeout)
        out.write_text(json.dumps(results, indent=1) + "\n")
        print(f"wrote {out}")
    if "host" not in results:
        raise SystemExit(f"{source}: no results to render; run the benchmarks first (without --render-only)")
    if args.update_readme:
        if write_readme(results, args.readme):
            print(f"rewrote the figures section of {args.readme}")
        else:
            raise SystemExit(f"{args.readme} has no {BEGIN} ... {END} section; nothing rewritten")
    else:
        table = out.with_name("run_all-figures.md") if out.name == OUT_NAME else out.with_suffix(".md")
        table.write_text(render(results) + "\n")
        print(f"wrote the figures table to {table} (README.md unchanged; --update-readme rewrites it)")


if __name__ == "__main__":
    main()
