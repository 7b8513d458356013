"""Fragmentation profiler: a per-step record of what memory holds, and its summary.

One row per scheduler step, or per span of steps in which only decoding happened
(backends that reserve ahead are skipped over such spans; the row's ``steps`` is
its weight and its ``tokens_stored`` the mean over the span, so every average below
is exact). Rows are appended to Python lists, one tuple per step, and turned into
numpy columns once at the end: cheaper per step than growing arrays.
"""

from __future__ import annotations

import csv
import json
import os
from typing import TYPE_CHECKING, Any

import attrs
import numpy as np

if TYPE_CHECKING:
    from paged_kv.spec import LayerGroup

Row = tuple[float, ...]
"""One profiler row: numbers (ints and floats), in column order."""

COLUMNS = (
    "step",  # scheduler clock at the row's first step
    "steps",  # steps the row stands for (1, or a skipped-over decode span)
    "running",
    "waiting",
    "tokens_stored",  # tokens held by running sequences (mean over the span)
    "slots_allocated",  # token slots reserved: blocks x block_size when paged
    "free_slots",
    "largest_free_run",  # biggest reservation possible now, in slots
    "sliding_blocks",  # blocks held by sliding-window layer groups
    "used_bytes",  # device bytes of everything reserved, all layers
)

DERIVED = ("utilization", "internal_fragmentation", "blocks_used", "blocks_free")
"""Columns `StepSeries.derived` computes and the output files carry after `COLUMNS`."""

GROUP_COLUMNS = ("blocks", "cached", "tokens", "utilization")
"""Per layer group g, written as ``blocks_g0``, ...: blocks held by running sequences,
blocks the prefix cache keeps that no one holds, tokens the group keeps live (all of
a sequence's for full attention, its last ``window`` for a sliding group; a shared
block counts for each sharer), and tokens / (blocks x block_size)."""


def weighted_quantile(values: np.ndarray, weights: np.ndarray, q: float) -> float:
    """The ``q`` quantile of ``values`` where each counts ``weights`` times (lower value, no interpolation)."""
    if values.size == 0:
        return 0.0
    order = np.argsort(values, kind="stable")
    cum = np.cumsum(weights[order])
    i = int(np.searchsorted(cum, q * cum[-1], side="left"))
    return float(values[order][min(i, values.size - 1)])


def group_kind(group: LayerGroup) -> str:
    """What a layer group's queries read: ``"full"``, ``"sliding:W"`` (the last W
    positions) or ``"chunked:C"`` (their own chunk of C positions), from a
    `paged_kv.spec.LayerGroup`."""
    chunk = getattr(group, "chunk", None)
    return f"sliding:{group.window}" if group.window is not None else f"chunked:{chunk}" if chunk else "full"


def live_tokens(held: np.ndarray, kind: str, span: int, full_tokens: float) -> float:
    """Tokens a group of ``kind`` keeps live for sequences holding ``held`` tokens: all
    of them for full attention (``full_tokens``, the row's own figure), the last W
    for a sliding group, the current chunk's for a chunked one. Over a decode span of
    ``span`` steps (every sequence one more token a step), the mean of steps 1..span."""
    if kind == "full":
        return full_tokens
    name: str
    size: Any  # the window or chunk: its text, then the int it names
    name, size = kind.split(":")
    size = int(size)
    if name == "sliding" and span:
        # sum_{j=1..span} min(h + j, W) = m*h + m(m+1)/2 + (span - m)*W, m = clip(W - h, 0, span)
        m = np.clip(size - held, 0, span)
        return float((m * held + m * (m + 1) / 2 + (span - m) * size).sum() / span)
    if span:
        lengths = held[:, None] + np.arange(1, span + 1)[None, :]
        return float(((lengths - 1) % size + 1).sum() / span)
    if name == "sliding":
        return float(np.minimum(held, size).sum())
    return float(np.where(held > 0, (held - 1) % size + 1, 0).sum())


@attrs.frozen(eq=False)
class StepSeries:
    """The profiler's columns (see `COLUMNS`) as numpy arrays of equal length, and the
    per-layer-group ones (`GROUP_COLUMNS`) as ``[rows, groups]`` arrays."""

    columns: dict[str, np.ndarray]
    block_size: int
    capacity_slots: int
    group_columns: dict[str, np.ndarray] = attrs.field(factory=dict)
    kinds: tuple[str, ...] = ("full",)
    """Each group's attention (see `group_kind`)."""

    @classmethod
    def from_rows(cls, rows: list[Row], block_size: int, capacity_slots: int,
                  group_rows: list[Row] | None = None, kinds: tuple[str, ...] = ("full",)) -> "StepSeries":
        """Columns from the scheduler's row tuples (in `COLUMNS` order) and, per row, a
        tuple of each group's blocks held, then cached blocks, then live tokens."""
        data = np.array(rows, dtype=np.float64).reshape(len(rows), len(COLUMNS))
        cols = {name: data[:, i] if name == "tokens_stored" else data[:, i].astype(np.int64)
                for i, name in enumerate(COLUMNS)}
        g = len(kinds)
        if group_rows is None:  # one full group: the scalar columns say it all
            group_rows = [(r[5] / block_size, 0, r[4]) for r in rows]
        per = np.array(group_rows, dtype=np.float64).reshape(len(rows), 3 * g)
        groups = {"blocks": per[:, :g], "cached": per[:, g:2 * g], "tokens": per[:, 2 * g:]}
        return cls(cols, block_size, capacity_slots, groups, tuple(kinds))

    def __getitem__(self, name: str) -> np.ndarray:
        return self.columns[name]

    def __len__(self) -> int:
        return int(self.columns["step"].size)

    @property
    def utilization(self) -> np.ndarray:
        """Tokens stored / slots allocated per row (1.0 where nothing is allocated)."""
        slots = self["slots_allocated"]
        return np.divide(self["tokens_stored"], slots, out=np.ones(len(self)), where=slots > 0)  # type: ignore[no-any-return]  # numpy's stub: Any

    def step_utilization(self) -> np.ndarray:
        """Utilization of every single step, spans expanded (for exact percentiles).

        In a skipped span every running sequence decodes, so tokens grow by
        ``running`` per step around the stored mean; slots stay fixed.
        """
        k = self["steps"]
        n = self["running"].astype(np.float64)
        first = self["tokens_stored"] - n * (k - 1) / 2
        offsets = np.arange(int(k.sum())) - np.repeat(np.cumsum(k) - k, k)
        tokens = np.repeat(first, k) + np.repeat(n, k) * offsets
        slots = np.repeat(self["slots_allocated"], k)
        busy = slots > 0
        return tokens[busy] / slots[busy]  # type: ignore[no-any-return]  # numpy's stub: Any

    @property
    def group_utilization(self) -> np.ndarray:
        """``[rows, groups]``: live tokens / (blocks held x block_size), 1.0 where a group holds nothing."""
        slots = self.group_columns["blocks"] * self.block_size
        return np.divide(self.group_columns["tokens"], slots, out=np.ones_like(slots), where=slots > 0)  # type: ignore[no-any-return]  # numpy's stub: Any

    def group_summary(self) -> dict[str, Any]:
        """Per layer group, time-averaged (each step weighted equally): blocks held (mean
        and peak), cached blocks no one holds (mean), live tokens and utilization
        (total tokens / total slots over the run)."""
        w = self["steps"].astype(np.float64)
        total = w.sum() or 1.0
        blocks, cached, tokens = (self.group_columns[k] for k in ("blocks", "cached", "tokens"))
        slots = (w[:, None] * blocks).sum(axis=0) * self.block_size
        live = (w[:, None] * tokens).sum(axis=0)
        return dict(
            kinds=list(self.kinds),
            mean_blocks=((w[:, None] * blocks).sum(axis=0) / total).tolist(),
            peak_blocks=[int(np.ceil(x)) for x in blocks.max(axis=0, initial=0)],
            mean_cached_blocks=((w[:, None] * cached).sum(axis=0) / total).tolist(),
            mean_live_tokens=(live / total).tolist(),
            utilization=np.divide(live, slots, out=np.zeros_like(live), where=slots > 0).tolist(),
        )

    def summary(self) -> dict[str, Any]:
        """Time-averaged figures, each step weighted equally."""
        w = self["steps"].astype(np.float64)
        total = w.sum()
        if total == 0:
            return dict(time_avg_utilization=0.0, p1_utilization=0.0, p50_utilization=0.0, p99_utilization=0.0,
                        mean_slots_allocated=0.0, peak_slots_allocated=0, mean_internal_fragmentation=0.0,
                        mean_free_run_ratio=1.0, min_free_run_ratio=1.0, mean_running=0.0, peak_running=0,
                        mean_waiting=0.0, mean_used_bytes=0.0, peak_used_bytes=0, mean_sliding_blocks=0.0)
        slots = self["slots_allocated"]
        tokens = self["tokens_stored"]
        busy = slots > 0
        util = self.step_utilization()
        ones = np.ones(util.size)
        free = self["free_slots"]
        has_free = free > 0
        ratio = np.divide(self["largest_free_run"], free, out=np.ones(len(self)), where=has_free)
        return dict(
            time_avg_utilization=float((w * tokens).sum() / (w * slots).sum()) if busy.any() else 0.0,
            p1_utilization=weighted_quantile(util, ones, 0.01),
            p50_utilization=weighted_quantile(util, ones, 0.50),
            p99_utilization=weighted_quantile(util, ones, 0.99),
            mean_slots_allocated=float((w * slots).sum() / total),
            peak_slots_allocated=int(slots.max()),
            mean_internal_fragmentation=float((w * (slots - tokens)).sum() / total),
            mean_free_run_ratio=float((w * ratio)[has_free].sum() / w[has_free].sum()) if has_free.any() else 1.0,
            min_free_run_ratio=float(ratio[has_free].min()) if has_free.any() else 1.0,
            mean_running=float((w * self["running"]).sum() / total),
            peak_running=int(self["running"].max()),
            mean_waiting=float((w * self["waiting"]).sum() / total),
            mean_used_bytes=float((w * self["used_bytes"]).sum() / total),
            peak_used_bytes=int(self["used_bytes"].max()),
            mean_sliding_blocks=float((w * self["sliding_blocks"]).sum() / total),
        )

    def derived(self) -> dict[str, np.ndarray]:
        """Columns computed from `COLUMNS`, written beside them: utilization, internal
        fragmentation (slots allocated that hold no token) and blocks used / free."""
        bs = self.block_size
        return {
            "utilization": self.utilization.round(6),
            "internal_fragmentation": np.round(self["slots_allocated"] - self["tokens_stored"], 3),
            "blocks_used": -(-self["slots_allocated"] // bs),
            "blocks_free": self["free_slots"] // bs,
        }

    def group_table(self) -> dict[str, np.ndarray]:
        """The per-group columns flattened to ``blocks_g0``, ``cached_g0``, ... (`GROUP_COLUMNS`)."""
        util = self.group_utilization.round(6)
        out = {}
        for g in range(len(self.kinds)):
            out[f"blocks_g{g}"] = self.group_columns["blocks"][:, g].round(3)
            out[f"cached_g{g}"] = self.group_columns["cached"][:, g].round(3)
            out[f"tokens_g{g}"] = self.group_columns["tokens"][:, g].round(3)
            out[f"utilization_g{g}"] = util[:, g]
        return out

    def as_lists(self) -> dict[str, Any]:
        """Every column, derived and per-group ones included, as plain lists (for JSON)."""
        out = {name: col.tolist() for name, col in self.columns.items()}
        out.update({name: col.tolist() for name, col in self.derived().items()})
        out.update({name: col.tolist() for name, col in self.group_table().items()})
        return out


def write_series(path: str | os.PathLike[str], series: dict[str, StepSeries]) -> None:
    """Write the series of several backends to ``path``: JSON (``{backend: {column:
    [...]}}``) if it ends in ``.json``, else CSV in long form (a ``backend`` column
    first, then `COLUMNS`, `DERIVED` and the per-group columns of the backend with the
    most groups; empty where a backend has fewer)."""
    path = os.fspath(path)
    if path.endswith(".json"):
        with open(path, "w", encoding="utf-8") as f:
            json.dump({name: s.as_lists() for name, s in series.items()}, f)
        return
    groups = max((len(s.kinds) for s in series.values()), default=1)
    group_names = [f"{c}_g{g}" for g in range(groups) for c in GROUP_COLUMNS]
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f, lineterminator="\n")
        writer.writerow(("backend", *COLUMNS, *DERIVED, *group_names))
        for name, s in series.items():
            cols = [s[c] for c in COLUMNS]
            cols[COLUMNS.index("tokens_stored")] = np.round(cols[COLUMNS.index("tokens_stored")], 3)
            cols += list(s.derived().values())
            table = s.group_table()
            blank = [""] * len(s)
            cols += [table.get(c, blank) for c in group_names]  # type: ignore[arg-type]  # blanks where a backend has fewer groups
            writer.writerows(zip([name] * len(s), *(c if isinstance(c, list) else c.tolist() for c in cols)))


__all__ = ["COLUMNS", "DERIVED", "GROUP_COLUMNS", "StepSeries", "group_kind", "live_tokens", "weighted_quantile", "write_series"]
