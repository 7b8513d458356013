"""PNG plot of a replay's profile: utilization, blocks in use and running sequences
over time, one column of panels per backend. matplotlib is an optional extra (``pip install
'paged_kv[plot]'``); nothing else in paged_kv imports it."""

from __future__ import annotations

import os
import types
from typing import TYPE_CHECKING

import numpy as np

from paged_kv.errors import PagedKVError
from paged_kv.sim.output_path import OutputPathError, check_writable
from paged_kv.sim.profile import StepSeries

if TYPE_CHECKING:
    from matplotlib.figure import Figure

INSTALL_HINT = "pip install 'paged_kv[plot]'  (or: pip install matplotlib)"


class PlotUnavailableError(PagedKVError, ImportError):
    """matplotlib is not installed."""


def require_matplotlib() -> types.ModuleType:
    """Import matplotlib with a non-interactive backend, or say how to install it."""
    try:
        import matplotlib
    except ImportError:
        raise PlotUnavailableError(f"plotting needs matplotlib, which is not installed: {INSTALL_HINT}") from None
    matplotlib.use("Agg")  # files only: no display on a server
    import matplotlib.pyplot as plt

    return plt


def check_plot_path(path: str | os.PathLike[str]) -> None:
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


def plot_series(series: dict[str, StepSeries], path: str | os.PathLike[str], title: str = "") -> None:
    """Write a PNG to ``path``: per backend, a column of three panels -- utilization
    (tokens ÷ slots allocated), memory in use (in blocks of the paged block size; a
    contiguous cache's slots ÷ block size) and running sequences -- against that
    backend's scheduler steps."""
    plt = require_matplotlib()
    fig = figure(series, title)
    fig.savefig(os.fspath(path), dpi=110)
    plt.close(fig)


def figure(series: dict[str, StepSeries], title: str = "") -> Figure:
    """The matplotlib figure `plot_series` writes (the caller closes it).

    Each backend gets its own column, so its own step axis: on one shared axis the
    max-length baseline's hundreds of thousands of steps squeezed the paged and
    first-fit replays into the left tenth of the plot. Rows share their y axis, so
    utilization, blocks and running sequences still compare across columns at a
    glance; each column's title gives its step count, so a cache that needs more
    steps to serve the same trace still shows it.
    """
    plt = require_matplotlib()
    drawn = {name: s for name, s in series.items() if len(s)}
    if not drawn:
        drawn = dict(list(series.items())[:1])
    cols = max(1, len(drawn))
    fig, axes = plt.subplots(3, cols, figsize=(4.2 * cols + 1.5, 8), sharey="row", squeeze=False,
                             constrained_layout=True)
    capacity = max((s.capacity_slots / s.block_size for s in series.values()), default=None)
    for col, (name, s) in enumerate(drawn.items()):
        column = axes[:, col]
        if len(s):
            # A row may stand for a span of steps; draw it as a step to the next row.
            x = np.append(s["step"], s["step"][-1] + s["steps"][-1]).astype(np.float64)
            for ax, y in zip(column, (s.utilization, s["slots_allocated"] / s.block_size, s["running"])):
                ax.plot(x, np.append(y, y[-1]), drawstyle="steps-post", linewidth=0.8, color=f"C{col}")
            steps = int(s["steps"].sum())
        else:
            steps = 0
        column[0].set_title(f"{name}\n({steps:,} steps)", fontsize="medium")
        if capacity is not None:
            column[1].axhline(capacity, color="grey", linestyle=":", linewidth=0.8, label="capacity")
        column[2].set_xlabel("scheduler step")
        for ax in column:
            ax.set_xlim(left=0)
            ax.xaxis.set_major_formatter(lambda value, _pos: f"{value:,.0f}")
    axes[0, 0].set_ylabel("utilization\n(tokens / slots)")
    axes[0, 0].set_ylim(0, 1.02)
    axes[1, 0].set_ylabel("blocks in use")
    axes[1, 0].legend(loc="lower right", fontsize="small", frameon=False)
    axes[2, 0].set_ylabel("running sequences")
    if title:
        fig.suptitle(title, fontsize="medium")
    return fig  # type: ignore[no-any-return]  # pyplot is reached through require_matplotlib's module: Any


__all__ = ["INSTALL_HINT", "PlotUnavailableError", "check_plot_path", "figure", "plot_series", "require_matplotlib"]
