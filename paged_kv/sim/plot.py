"""PNG plot of a replay's profile: utilization, blocks in use and running sequences
over time, one line per backend. matplotlib is an optional extra (``pip install
'paged_kv[plot]'``); nothing else in paged_kv imports it."""

from __future__ import annotations

import os

import numpy as np

from paged_kv.errors import PagedKVError
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


def plot_series(series: dict[str, StepSeries], path: str | os.PathLike, title: str = "") -> None:
    """Write a three-panel PNG to ``path``: utilization (tokens ÷ slots allocated),
    memory in use (in blocks of the paged block size; a contiguous cache's slots ÷
    block size) and running sequences.

    The x axis is each replay's progress (step ÷ its last step), not raw steps: a
    contiguous cache can take ten times the steps to serve the same trace, which
    would squash the others into a sliver. Each legend entry gives its step count.
    """
    plt = require_matplotlib()
    fig, axes = plt.subplots(3, 1, figsize=(10, 8), sharex=True, constrained_layout=True)
    for name, s in series.items():
        if len(s) == 0:
            continue
        # A row may stand for a span of steps; draw it as a step to the next row.
        x = np.append(s["step"], s["step"][-1] + s["steps"][-1]).astype(np.float64)
        x = (x - x[0]) / max(x[-1] - x[0], 1.0)
        label = f"{name} ({int(s['steps'].sum()):,} steps)"

        def draw(ax, y, x=x, label=label):
            ax.plot(x, np.append(y, y[-1]), drawstyle="steps-post", linewidth=0.8, label=label)
        draw(axes[0], s.utilization)
        draw(axes[1], s["slots_allocated"] / s.block_size)
        draw(axes[2], s["running"])
    capacity = max(s.capacity_slots / s.block_size for s in series.values())
    axes[1].axhline(capacity, color="grey", linestyle=":", linewidth=0.8, label="capacity")
    axes[0].set_ylabel("utilization\n(tokens / slots)")
    axes[0].set_ylim(0, 1.02)
    axes[1].set_ylabel("blocks in use")
    axes[2].set_ylabel("running sequences")
    axes[2].set_xlabel("progress through the replay (step / last step)")
    axes[0].legend(loc="lower right", fontsize="small")
    axes[1].legend(loc="lower right", fontsize="small")
    if title:
        axes[0].set_title(title, fontsize="medium")
    fig.savefig(os.fspath(path), dpi=110)
    plt.close(fig)


__all__ = ["INSTALL_HINT", "PlotUnavailableError", "plot_series", "require_matplotlib"]
