"""The frame every benchmark's final JSON line shares: what ran, on what machine,
under how much load (the machines are shared, so load is part of the figures)."""

from __future__ import annotations

import json
import os
import time


def start_report(**fields) -> dict:
    """A report dict with ``fields``, the CPU count and the load average now; its
    ``_started`` entry times the run (removed by `finish_report`)."""
    return {**fields, "host": {"cpus": os.cpu_count(), "loadavg_start": os.getloadavg()},
            "_started": time.perf_counter()}


def finish_report(report: dict) -> None:
    """Add the closing load average and the wall time, then print the final JSON line."""
    report["host"]["loadavg_end"] = os.getloadavg()
    report["wall_s"] = round(time.perf_counter() - report.pop("_started"), 1)
    print(json.dumps(report))
