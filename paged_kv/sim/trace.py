"""Request traces: one row per request with its arrival time, prompt and output lengths.

The format is the Azure LLM inference trace's (``TIMESTAMP,ContextTokens,
GeneratedTokens``); a copy of its 2023 conversation trace ships in `paged_kv.data`
so the simulator has realistic length distributions with no download.

One optional column extends it: ``CancelAfterTokens``, the number of tokens a
request generates before its client disconnects (empty or -1: it runs to
completion). Real traces record only finished requests, but a serving engine
also has to free the blocks of requests abandoned mid-decode, so stress traces
(`paged_kv.sim.synthetic`) carry cancellations and the column keeps them in CSV.

Parsing is column-wise numpy: the csv module splits the text, numpy converts each
whole column in one call. Only when a conversion fails does a per-row scan run,
to name the first bad row, so the common path stays around 10 ms for 19k rows.
"""

from __future__ import annotations

import csv
import importlib.resources
import os
from collections.abc import Sequence
from typing import Any

import attrs
import numpy as np

from paged_kv.errors import TraceError

BUNDLED_TRACE = "azure_llm_conv_2023.csv"
"""File name of the trace shipped in `paged_kv.data`."""

BUNDLED_ATTRIBUTION = (
    "Trace: Azure LLM inference trace 2023 (conversation), Azure/AzurePublicDataset, CC-BY 4.0; "
    "Patel et al., \"Splitwise: Efficient generative LLM inference using phase splitting\", ISCA 2024."
)
"""The credit CC-BY 4.0 asks for wherever results computed from the bundled trace are shown."""

COLUMNS = ("TIMESTAMP", "ContextTokens", "GeneratedTokens")
"""The columns every trace file has, in the order `Trace.to_csv` writes them."""

CANCEL_COLUMN = "CancelAfterTokens"
"""Optional fourth column: tokens generated before the client cancels; empty or -1 = not cancelled."""

NOT_CANCELLED = -1
"""`Trace.cancel_after` value of a request that runs to completion."""

# The trace's timestamps have 100 ns resolution (7 fractional digits); writing them
# back at that resolution makes `to_csv` -> `load_trace` an exact round trip.
_TICKS_PER_S = 10_000_000
_NS_PER_TICK = 100

# The whole seconds that datetime64[ns] (int64 nanoseconds since 1970, NaT at the int64
# minimum) holds with every fraction: outside them numpy's ns parse and cast wrap
# silently (2500-01-01 reads as 1915), so times are bounded at second resolution first,
# where nothing wraps. The two partial seconds at the ends are refused too.
_FIRST_S = np.datetime64(-(2**63) // 10**9 + 1, "s")  # 1677-09-21T00:12:44
_LAST_S = np.datetime64((2**63 - 1) // 10**9 - 1, "s")  # 2262-04-11T23:47:15
_RANGE = f"[{_FIRST_S}, {_LAST_S}]"
_MAX_SPAN_S = (2**63 - 1) // 10**9 - 1
"""Seconds between two requests that a timedelta64[ns] holds (about 292 years): arrival
times are differences of nanosecond stamps, in `load_trace` and back in `Trace.to_csv`."""


def _in_range(seconds: np.ndarray | np.datetime64) -> np.ndarray | np.bool_:
    """Which of ``seconds`` (datetime64[s]) a datetime64[ns] holds whatever their fraction."""
    return (seconds >= _FIRST_S) & (seconds <= _LAST_S)


def _start_time(value: Any) -> np.datetime64:
    """``Trace.start`` as datetime64[ns]; `TraceError` for a time it cannot hold (it would wrap)."""
    if isinstance(value, bool):
        raise TraceError(f"start={value!r} is not a time")
    try:
        ns = np.datetime64(value, "ns")
        # An integer is nanoseconds (what it always meant here), within range by its type;
        # anything else is parsed again at seconds, where a year like 2500 cannot wrap.
        integer = isinstance(value, (int, np.integer))
        seconds = ns.astype("datetime64[s]") if integer else np.datetime64(value, "s")
    except (TypeError, ValueError, OverflowError) as exc:
        raise TraceError(f"start={value!r} is not a time ({exc})") from None
    if np.isnat(ns) or not _in_range(seconds):
        raise TraceError(f"start={value!r} is outside {_RANGE}, the times a nanosecond trace clock holds")
    return ns


def _int64_array(value: Any) -> np.ndarray:
    return np.asarray(value, dtype=np.int64)


def _float64_array(value: Any) -> np.ndarray:
    return np.asarray(value, dtype=np.float64)


def _optional_int64_array(value: Any) -> np.ndarray | None:
    # None stays None here: the trace length is only known once every field is
    # converted, so `__attrs_post_init__` expands it to "nobody cancels".
    return None if value is None else _int64_array(value)


@attrs.frozen(eq=False)
class Trace:
    """Requests in trace order, as parallel numpy arrays.

    ``arrival_s`` is seconds since ``start``, the first request's wall-clock time
    (kept so that `to_csv` writes the original timestamps back). It must be finite
    and non-decreasing: the simulator replays requests in array order, so an
    out-of-order row would silently arrive "in the past".

    ``cancel_after[i]`` is -1 (`NOT_CANCELLED`) when request ``i`` runs to
    completion, or ``k`` with ``0 <= k < generated_tokens[i]`` when its client
    disconnects after ``k`` generated tokens, so the engine must evict it before it
    finishes. It is keyword-only (``Trace(a, c, g, start, cancel_after=...)``) so the
    positional form ``Trace(arrival_s, context_tokens, generated_tokens[, start])``
    keeps its meaning; leaving it out means no request is cancelled.
    """

    arrival_s: np.ndarray = attrs.field(converter=_float64_array)
    context_tokens: np.ndarray = attrs.field(converter=_int64_array)
    generated_tokens: np.ndarray = attrs.field(converter=_int64_array)
    cancel_after: np.ndarray = attrs.field(default=None, kw_only=True, converter=_optional_int64_array)
    start: np.datetime64 = attrs.field(default=np.datetime64("1970-01-01T00:00:00", "ns"), converter=_start_time)

    def __attrs_post_init__(self) -> None:
        shapes = {a.shape for a in (self.arrival_s, self.context_tokens, self.generated_tokens)}
        if len(shapes) != 1 or len(next(iter(shapes))) != 1:
            raise TraceError(
                f"arrival_s, context_tokens and generated_tokens must be 1-D and of one length; got shapes "
                f"{self.arrival_s.shape}, {self.context_tokens.shape}, {self.generated_tokens.shape}"
            )
        if self.cancel_after is None:
            # Frozen class: the generated __setattr__ refuses, so go around it once, here.
            object.__setattr__(self, "cancel_after", np.full(self.arrival_s.shape, NOT_CANCELLED, dtype=np.int64))
        elif self.cancel_after.shape != self.arrival_s.shape:
            raise TraceError(
                f"cancel_after must have the shape of the other arrays, {self.arrival_s.shape}; "
                f"got {self.cancel_after.shape}"
            )

        arrival = self.arrival_s
        bad = np.flatnonzero(~np.isfinite(arrival))
        if bad.size:
            i = int(bad[0])
            raise TraceError(f"arrival_s[{i}]={float(arrival[i])!r} is not a finite time in seconds")
        back = np.flatnonzero(np.diff(arrival) < 0)
        if back.size:
            i = int(back[0]) + 1
            raise TraceError(
                f"arrival_s[{i}]={float(arrival[i])!r} is earlier than arrival_s[{i - 1}]={float(arrival[i - 1])!r}; "
                "requests must be in arrival order because the simulator replays them in array order"
            )
        # start + arrival_s must stay a time the clock holds, or `to_csv` writes wrapped stamps.
        start_s = int(self.start.astype("datetime64[s]").astype(np.int64))
        low = max(int(_FIRST_S.astype(np.int64)) - start_s, -_MAX_SPAN_S)
        high = min(int(_LAST_S.astype(np.int64)) + 1 - start_s, _MAX_SPAN_S + 1)  # the last second's fractions
        far = np.flatnonzero((arrival < low) | (arrival >= high))
        if far.size:
            i = int(far[0])
            raise TraceError(f"arrival_s[{i}]={float(arrival[i])!r} puts request {i} outside {_RANGE}, the times a "
                             f"nanosecond trace clock holds (start {self.start})")

        cancel, generated = self.cancel_after, self.generated_tokens
        bad = np.flatnonzero((cancel != NOT_CANCELLED) & ((cancel < 0) | (cancel >= generated)))
        if bad.size:
            i = int(bad[0])
            raise TraceError(
                f"cancel_after[{i}]={int(cancel[i])} must be -1 (runs to completion) or in "
                f"[0, generated_tokens[{i}]={int(generated[i])}): a request is cancelled before it finishes"
            )

    def __len__(self) -> int:
        return int(self.context_tokens.shape[0])

    @property
    def num_cancelled(self) -> int:
        """How many requests are cancelled before they finish (``cancel_after >= 0``)."""
        return int(np.count_nonzero(self.cancel_after >= 0))

    def head(self, n: int) -> "Trace":
        """The first ``n`` requests (all of them if there are fewer)."""
        if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 0:
            raise TraceError(f"head(n={n!r}): n must be a non-negative integer")
        return Trace(self.arrival_s[:n], self.context_tokens[:n], self.generated_tokens[:n], self.start,
                     cancel_after=self.cancel_after[:n])

    def to_csv(self, path: str | os.PathLike[str]) -> None:
        """Write the trace in the format `load_trace` reads, timestamps at 100 ns resolution.

        The ``CancelAfterTokens`` column (-1 for requests that finish) is written only
        when some request is cancelled, so a trace without cancellations, such as the
        bundled one, keeps the three-column Azure format other tools expect.
        """
        ticks = np.round(self.arrival_s * _TICKS_PER_S).astype(np.int64)
        stamps = self.start + (ticks * _NS_PER_TICK).astype("timedelta64[ns]")
        # datetime_as_string gives 'YYYY-MM-DDTHH:MM:SS.fffffffff'; the trace uses a
        # space separator and 7 digits, and the last two digits are zero by construction.
        text = (s.replace("T", " ", 1)[:-2] for s in np.datetime_as_string(stamps, unit="ns").tolist())
        columns = [text, self.context_tokens.tolist(), self.generated_tokens.tolist()]
        header = list(COLUMNS)
        if self.num_cancelled:
            columns.append(self.cancel_after.tolist())
            header.append(CANCEL_COLUMN)
        with open(path, "w", newline="", encoding="utf-8") as f:
            writer = csv.writer(f, lineterminator="\n")
            writer.writerow(header)
            writer.writerows(zip(*columns))


def load_trace(path: str | os.PathLike[str] | None = None) -> Trace:
    """Read a trace CSV; ``path=None`` reads the bundled Azure conversation trace.

    Raises `TraceError` naming the file, the line (1 = header) and the bad value
    for a missing file or column, a row with the wrong number of fields (a truncated
    file), an unparsable timestamp, or a token count that is not a non-negative
    integer. ``ContextTokens`` must be >= 1: a request without a prompt cannot be
    admitted. Timestamps must not decrease from one row to the next.

    The optional ``CancelAfterTokens`` column is read when the header has it: an
    empty field or -1 means the request runs to completion, ``k`` means it is
    cancelled after ``k`` generated tokens and must satisfy
    ``0 <= k < GeneratedTokens`` on its line.
    """
    if path is None:
        with importlib.resources.as_file(importlib.resources.files("paged_kv.data") / BUNDLED_TRACE) as bundled:
            return _load(bundled)
    return _load(path)


def _load(path: str | os.PathLike[str]) -> Trace:
    name = os.fspath(path)
    try:
        # utf-8-sig: spreadsheet exports often start with a byte-order mark, which
        # would otherwise glue itself onto the first column name.
        with open(name, newline="", encoding="utf-8-sig") as f:
            rows = list(csv.reader(f))
    except OSError as exc:
        raise TraceError(f"{name}: cannot read trace: {exc.strerror or exc}") from exc
    except (UnicodeDecodeError, csv.Error) as exc:
        raise TraceError(f"{name}: not a CSV text file: {exc}") from exc
    if not rows:
        raise TraceError(f"{name}: empty file; expected a header line {','.join(COLUMNS)}")

    header = [h.strip() for h in rows[0]]
    missing = [c for c in COLUMNS if c not in header]
    if missing:
        raise TraceError(f"{name}: line 1: header {header} lacks column(s) {missing}; expected {list(COLUMNS)}")
    body = rows[1:]
    width = len(header)
    for i, row in enumerate(body):
        if len(row) != width:
            raise TraceError(
                f"{name}: line {i + 2}: {len(row)} fields {row!r}, header has {width} (truncated or malformed row)"
            )

    cols = list(zip(*body)) if body else [() for _ in header]
    stamps = _timestamps(name, cols[header.index("TIMESTAMP")])
    context = _counts(name, "ContextTokens", cols[header.index("ContextTokens")], minimum=1)
    generated = _counts(name, "GeneratedTokens", cols[header.index("GeneratedTokens")], minimum=0)
    cancel = None
    if CANCEL_COLUMN in header:
        cancel = _cancel_after(name, cols[header.index(CANCEL_COLUMN)], generated)
    if stamps.size == 0:
        return Trace(np.empty(0), context, generated, cancel_after=cancel)
    arrival = (stamps - stamps[0]).astype(np.int64) / 1e9
    return Trace(arrival, context, generated, stamps[0], cancel_after=cancel)


def _timestamps(name: str, values: Sequence[str]) -> np.ndarray:
    try:
        stamps = np.array(values, dtype="datetime64[ns]")
    except ValueError:
        stamps = None
    if stamps is not None:
        bad = np.flatnonzero(np.isnat(stamps))  # numpy reads 'NaT' and '' as not-a-time
        if bad.size == 0:
            # Checked here, not only in `Trace`, so the error names the line.
            back = np.flatnonzero(np.diff(stamps) < np.timedelta64(0, "ns"))
            seconds = np.array(values, dtype="datetime64[s]")
            far = np.flatnonzero(~_in_range(seconds))
            if far.size:  # numpy's ns parse wrapped these silently: check first, the order is garbage
                i = int(far[0])
                raise TraceError(f"{name}: line {i + 2}: TIMESTAMP={values[i]!r} is outside {_RANGE}, the times a "
                                 "nanosecond trace clock holds")
            # Differences of ns stamps wrap too (the order check just made, the arrival times):
            # every two rows must lie within what a timedelta64[ns] holds.
            first, last = (int(np.argmin(seconds)), int(np.argmax(seconds))) if seconds.size else (0, 0)
            if seconds.size and (seconds[last] - seconds[first]).astype(np.int64) > _MAX_SPAN_S:
                i, j = max(first, last), min(first, last)
                raise TraceError(f"{name}: line {i + 2}: TIMESTAMP={values[i]!r} is more than {_MAX_SPAN_S:,} s "
                                 f"(292 years) from line {j + 2}'s {values[j]!r}, more than a nanosecond "
                                 "arrival time holds")
            if back.size:
                i = int(back[0]) + 1
                raise TraceError(
                    f"{name}: line {i + 2}: TIMESTAMP={values[i]!r} is earlier than the line before "
                    f"({values[i - 1]!r}); rows must be in arrival order"
                )
            return stamps
        i = int(bad[0])
    else:
        i = next(i for i, v in enumerate(values) if not _parses_as_datetime(v))
    raise TraceError(f"{name}: line {i + 2}: TIMESTAMP={values[i]!r} is not a 'YYYY-MM-DD HH:MM:SS.fffffff' time")


def _parses_as_datetime(value: str) -> bool:
    try:
        return not np.isnat(np.datetime64(value, "ns"))
    except ValueError:
        return False


def _ints(name: str, column: str, values: Sequence[str]) -> np.ndarray:
    try:
        return np.array(values, dtype=np.int64)
    except (ValueError, OverflowError):
        i = next(i for i, v in enumerate(values) if not _parses_as_int(v))
        raise TraceError(f"{name}: line {i + 2}: {column}={values[i]!r} is not an integer token count") from None


def _counts(name: str, column: str, values: Sequence[str], minimum: int) -> np.ndarray:
    counts = _ints(name, column, values)
    low = np.flatnonzero(counts < minimum)
    if low.size:
        i = int(low[0])
        raise TraceError(f"{name}: line {i + 2}: {column}={values[i]!r} must be >= {minimum}")
    return counts


def _cancel_after(name: str, values: Sequence[str], generated: np.ndarray) -> np.ndarray:
    # An empty field is how a spreadsheet or pandas writes "no value"; read it as
    # "not cancelled" so hand-edited files need not spell out -1 on every row.
    filled = [str(NOT_CANCELLED) if not v.strip() else v for v in values]
    cancel = _ints(name, CANCEL_COLUMN, filled)
    low = np.flatnonzero(cancel < NOT_CANCELLED)
    if low.size:
        i = int(low[0])
        raise TraceError(
            f"{name}: line {i + 2}: {CANCEL_COLUMN}={values[i]!r} must be empty or -1 (not cancelled) "
            "or a token count >= 0"
        )
    late = np.flatnonzero((cancel >= 0) & (cancel >= generated))
    if late.size:
        i = int(late[0])
        raise TraceError(
            f"{name}: line {i + 2}: {CANCEL_COLUMN}={values[i]!r} must be less than GeneratedTokens="
            f"{int(generated[i])}: a request is cancelled before it finishes"
        )
    return cancel


def _parses_as_int(value: str) -> bool:
    try:
        np.array([value], dtype=np.int64)
    except (ValueError, OverflowError):
        return False
    return True


__all__ = [
    "BUNDLED_ATTRIBUTION",
    "BUNDLED_TRACE",
    "CANCEL_COLUMN",
    "COLUMNS",
    "NOT_CANCELLED",
    "Trace",
    "load_trace",
]
