"""Issue 23 item 7: trace times a nanosecond clock cannot hold are refused, never wrapped
(numpy reads 2500-01-01 as datetime64[ns] 1915-06-14 without a word)."""

from __future__ import annotations

import numpy as np
import pytest

from paged_kv.errors import TraceError
from paged_kv.sim.trace import Trace, load_trace

HEADER = "TIMESTAMP,ContextTokens,GeneratedTokens\n"


def write(tmp_path, *stamps):
    path = tmp_path / "trace.csv"
    path.write_text(HEADER + "".join(f"{s},5,3\n" for s in stamps))
    return path


@pytest.mark.parametrize("stamps, line", [
    (("2023-11-16 18:15:46.6805900", "2500-01-01 00:00:00.0000000"), 3),  # wraps to 1915: "in the past"
    (("2500-01-01 00:00:00",), 2),  # alone: would load as a 1915 trace
    (("1600-01-01 00:00:00",), 2),  # before 1677: wraps to 2184
    (("2262-04-11 23:47:16.8547759",), 2),  # one tick past the last nanosecond
    (("1677-09-21 00:12:43.1452242",), 2),  # the partial first second
])
def test_times_outside_the_nanosecond_clock_are_refused(tmp_path, stamps, line):
    with pytest.raises(TraceError, match=rf"line {line}: TIMESTAMP=.* is outside \[1677-09-21T00:12:44, 2262"):
        load_trace(write(tmp_path, *stamps))


@pytest.mark.parametrize("stamps", [("1700-01-01 00:00:00", "2200-01-01 00:00:00"),
                                    ("2200-01-01 00:00:00", "1700-01-01 00:00:00"),  # its ns difference wraps > 0
                                    ("1950-01-01 00:00:00", "1700-01-01 00:00:00", "2200-01-01 00:00:00")])
def test_a_span_longer_than_a_nanosecond_arrival_time_is_refused(tmp_path, stamps):
    """1700 and 2200 are both times the clock holds, but 500 years of nanoseconds are not."""
    with pytest.raises(TraceError, match=r"line \d: .* more than .* \(292 years\) from line \d"):
        load_trace(write(tmp_path, *stamps))


def test_times_at_the_edges_of_the_clock_load_and_round_trip(tmp_path):
    path = write(tmp_path, "2262-01-01 00:00:00.0000000", "2262-04-11 23:47:15.9999999")
    trace = load_trace(path)
    assert trace.start == np.datetime64("2262-01-01", "ns")
    assert trace.arrival_s[1] == pytest.approx((np.datetime64("2262-04-11T23:47:15.9999999", "ns")
                                                - np.datetime64("2262-01-01", "ns")).astype(np.int64) / 1e9)
    out = tmp_path / "back.csv"
    trace.to_csv(out)
    assert out.read_text() == path.read_text()


@pytest.mark.parametrize("start", ["2500-01-01", np.datetime64("2500-01-01"), np.datetime64("1600-01-01T00:00"),
                                   "not a time", True])
def test_trace_start_outside_the_clock_is_refused(start):
    with pytest.raises(TraceError, match="start="):
        Trace([0.0], [5], [3], start)


@pytest.mark.parametrize("arrival", [[0.0, 1e12], [0.0, 9.3e9], [-9.3e9, 0.0]])
def test_arrivals_that_leave_the_clock_are_refused(arrival):
    """``start + arrival_s`` is what `to_csv` writes: it must be a time the clock holds."""
    with pytest.raises(TraceError, match=r"arrival_s\[\d\]=.* outside"):
        Trace(arrival, [5, 5], [3, 3], "2000-01-01")


def test_an_integer_start_still_counts_nanoseconds():
    assert Trace([0.0], [5], [3], 10**18).start == np.datetime64(10**18, "ns")
