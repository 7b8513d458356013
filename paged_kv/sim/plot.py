"""PNG plot of a replay's profile: utilization, blocks in use and running sequences
over time, one line per backend. matplotlib is an optional extra (``pip install
'paged_kv[plot]'``); nothing else in paged_kv imports it."""

from __future__ import annotations

import os

import numpy as np

from paged_kv.errors import PagedKVError
from paged_kv.sim.output_path import OutputPathError, check_writable
from paged_kv.sim.profile import StepSeries

INSTALL_HINT = "pip install 'paged_kv[plot]'  (or: pip install matplotlib)"


class PlotUnavailableError(PagedKVError, ImportError):
    """matplotlib is not installed."""


def require_matplotlib():
    """Import matplotlib with a non-interactive backend, or say how to install it."""
    try:
        import matplotlib
    except ImportError:
        raise PlotUnavailableError(f"plotting needs matplotlib, which is not installed: {INSTALL_HINT}") from None
    matplotlib.use("Agg")  # files only: no display on a server
    import matplotlib.pyplot as plt

    return plt


def check_plot_path(path: str | os.PathLike) -> None:
    """Raise before any work if ``path`` cannot take the plot: matplotlib missing
    (`PlotUnavailableError`), a format matplotlib cannot write, or a folder that is
    missing or read-only (`OutputPathError`). A path with no suffix is written as PNG."""
    require_matplotlib()
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    check_writable(path, "--plot")
    suffix = os.path.splitext(os.fspath(path))[1].lstrip(".").lower()
    formats = FigureCanvasAgg.get_supported_filetypes()
    if suffix and suffix not in formats:
        raise OutputPathError(f"--plot {os.fspath(path)}: matplotlib cannot write .{suffix} files; "
                              f"use one of {', '.join('.' + f for f in sorted(formats))}")


def plot_series(series: dict[str, StepSeries], path: str | os.PathLike, title: str = "") -> None:
    """Write a three-panel PNG to ``path``: utilization (tokens ÷ slots allocated),
    memory in use (in blocks of the paged block size; a contiguous cache's slots ÷
    block size) and running sequences, against the scheduler step.

    Every replay is drawn on one step axis, so a cache that needs more steps to
    serve the same trace visibly takes longer (its line runs further right); each
    legend entry repeats the step count. Legends sit to the right of their panel,
    off the data.
    """
    plt = require_matplotlib()
    fig, axes = plt.subplots(3, 1, figsize=(11, 8), sharex=True, constrained_layout=True)
    for name, s in series.items():
        if len(s) == 0:
            continue
        # A row may stand for a span of steps; draw it as a step to the next row.
        x = np.append(s["step"], s["step"][-1] + s["steps"][-1]).astype(np.float64)
        label = f"{name}\n({int(s['steps'].sum()):,} steps)"
        for ax, y in zip(axes, (s.utilization, s["slots_allocated"] / s.block_size, s["running"])):
            ax.plot(x, np.append(y, y[-1]), drawstyle="steps-post", linewidth=0.8, label=label)
    capacity = max(s.capacity_slots / s.block_size for s in series.values())
    axes[1].axhline(capacity, color="grey", linestyle=":", linewidth=0.8, label="capacity")
    axes[0].set_ylabel("utilization\n(tokens / slots)")
    axes[0].set_ylim(0, 1.02)
    axes[1].set_ylabel("blocks in use")
    axes[2].set_ylabel("running sequences")
    axes[2].set_xlabel("scheduler step")
    axes[2].set_xlim(left=0)
    axes[2].xaxis.set_major_formatter(lambda value, _pos: f"{value:,.0f}")
    for ax in axes:
        ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize="small", frameon=False)
    if title:
        axes[0].set_title(title, fontsize="medium")
    fig.savefig(os.fspath(path), dpi=110)
    plt.close(fig)


__all__ = ["INSTALL_HINT", "PlotUnavailableError", "check_plot_path", "plot_series", "require_matplotlib"]
