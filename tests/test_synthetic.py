"""Synthetic stress traces, and the cancellation column they add to `Trace`."""

from __future__ import annotations

import numpy as np
import pytest

from paged_kv import TraceError
from paged_kv.sim.synthetic import synthetic_trace
from paged_kv.sim.trace import CANCEL_COLUMN, COLUMNS, NOT_CANCELLED, Trace, load_trace

HEADER = "TIMESTAMP,ContextTokens,GeneratedTokens,CancelAfterTokens\n"


@pytest.fixture(scope="module")
def big() -> Trace:
    # 100k rows: enough calm/burst cycles that the gap statistics settle, and
    # still only milliseconds to draw.
    return synthetic_trace(100_000, seed=0)


def assert_same(a: Trace, b: Trace) -> None:
    np.testing.assert_array_equal(a.arrival_s, b.arrival_s)
    np.testing.assert_array_equal(a.context_tokens, b.context_tokens)
    np.testing.assert_array_equal(a.generated_tokens, b.generated_tokens)
    np.testing.assert_array_equal(a.cancel_after, b.cancel_after)
    assert a.start == b.start


# ---- synthetic_trace -------------------------------------------------------------

def test_deterministic_per_seed_and_different_across_seeds():
    a, b = synthetic_trace(2000, seed=7), synthetic_trace(2000, seed=7)
    assert_same(a, b)
    c = synthetic_trace(2000, seed=8)
    for column in ("arrival_s", "context_tokens", "generated_tokens", "cancel_after"):
        assert not np.array_equal(getattr(a, column), getattr(c, column)), column


def test_knobs_only_change_their_own_columns():
    base = synthetic_trace(2000, seed=3)
    fewer_cancels = synthetic_trace(2000, seed=3, cancel_fraction=0.0)
    np.testing.assert_array_equal(base.arrival_s, fewer_cancels.arrival_s)
    np.testing.assert_array_equal(base.context_tokens, fewer_cancels.context_tokens)
    np.testing.assert_array_equal(base.generated_tokens, fewer_cancels.generated_tokens)
    assert fewer_cancels.num_cancelled == 0 < base.num_cancelled


def test_shape_and_dtypes(big):
    assert len(big) == 100_000
    assert big.arrival_s.dtype == np.float64 and big.context_tokens.dtype == np.int64
    assert big.cancel_after.dtype == np.int64
    assert big.arrival_s[0] == 0.0 and np.all(np.diff(big.arrival_s) >= 0)
    assert big.context_tokens.min() >= 1 and big.generated_tokens.min() >= 1


def test_medians_near_configured(big):
    # 1% outliers shift the context median up only a little.
    assert np.median(big.context_tokens) == pytest.approx(1000, rel=0.05)
    assert np.median(big.generated_tokens) == pytest.approx(200, rel=0.05)
    custom = synthetic_trace(20_000, seed=1, context_median=50, context_sigma=0.5, generated_median=10,
                             generated_sigma=0.0, outlier_fraction=0.0)
    assert np.median(custom.context_tokens) == pytest.approx(50, rel=0.05)
    assert np.all(custom.generated_tokens == 10)  # sigma 0: no spread at all


def test_arrivals_are_bursty(big):
    gaps = np.diff(big.arrival_s)
    assert gaps.std() / gaps.mean() > 1.5  # Poisson arrivals give 1
    # Long-run mean rate: 10/s outside bursts, 16x that for 10% of the time.
    assert len(big) / big.arrival_s[-1] == pytest.approx(10 * (1 + 0.1 * 15), rel=0.1)


def test_no_bursts_is_poisson():
    trace = synthetic_trace(50_000, seed=2, burst_fraction=0.0, rate_per_s=4.0)
    gaps = np.diff(trace.arrival_s)
    assert gaps.std() / gaps.mean() == pytest.approx(1.0, abs=0.05)
    assert 1 / gaps.mean() == pytest.approx(4.0, rel=0.05)


def test_outliers_at_the_fraction():
    # Outliers draw from their own stream: the rows that differ from an
    # outlier-free trace of the same seed are exactly the outliers.
    with_outliers = synthetic_trace(20_000, seed=4, outlier_fraction=0.02, outlier_tokens=(30_000, 40_000))
    without = synthetic_trace(20_000, seed=4, outlier_fraction=0.0)
    changed = with_outliers.context_tokens != without.context_tokens
    assert changed.sum() == 400
    assert with_outliers.context_tokens[changed].min() >= 30_000
    assert with_outliers.context_tokens[changed].max() <= 40_000


def test_cancellations_valid_and_at_the_fraction(big):
    cancelled = big.cancel_after >= 0
    assert big.num_cancelled == cancelled.sum() == 5000
    assert np.all(big.cancel_after[~cancelled] == NOT_CANCELLED)
    assert np.all(big.cancel_after[cancelled] < big.generated_tokens[cancelled])
    # Uniform in [0, generated): cancel points average about half of the output.
    ratio = big.cancel_after[cancelled] / big.generated_tokens[cancelled]
    assert ratio.mean() == pytest.approx(0.5, abs=0.05)
    assert synthetic_trace(100, cancel_fraction=1.0).num_cancelled == 100


def test_max_total_tokens_respected():
    trace = synthetic_trace(20_000, seed=5, max_total_tokens=4096, cancel_fraction=0.5)
    total = trace.context_tokens + trace.generated_tokens
    assert total.max() == 4096  # the outliers are clipped right to the limit
    assert trace.context_tokens.min() >= 1 and trace.generated_tokens.min() >= 1
    cancelled = trace.cancel_after >= 0
    assert np.all(trace.cancel_after[cancelled] < trace.generated_tokens[cancelled])
    tiny = synthetic_trace(50, max_total_tokens=2)
    assert np.all(tiny.context_tokens == 1) and np.all(tiny.generated_tokens == 1)


def test_empty_and_single():
    assert len(synthetic_trace(0)) == 0
    one = synthetic_trace(1)
    assert len(one) == 1 and one.arrival_s[0] == 0.0


def test_csv_round_trip_with_cancellations(tmp_path):
    trace = synthetic_trace(3000, seed=6, cancel_fraction=0.2)
    assert trace.num_cancelled == 600
    path = tmp_path / "synthetic.csv"
    trace.to_csv(path)
    assert path.read_text().splitlines()[0] == ",".join((*COLUMNS, CANCEL_COLUMN))
    assert_same(load_trace(path), trace)


def test_csv_without_cancellations_keeps_three_columns(tmp_path):
    path = tmp_path / "plain.csv"
    trace = synthetic_trace(100, cancel_fraction=0.0)
    trace.to_csv(path)
    assert path.read_text().splitlines()[0] == ",".join(COLUMNS)
    assert_same(load_trace(path), trace)


def test_head_keeps_cancellations(big):
    head = big.head(1000)
    np.testing.assert_array_equal(head.cancel_after, big.cancel_after[:1000])
    assert head.num_cancelled == int((big.cancel_after[:1000] >= 0).sum())


@pytest.mark.parametrize(
    "kwargs, value",
    [
        ({"num_requests": -1}, "num_requests=-1"),
        ({"num_requests": 2.5}, "num_requests=2.5"),
        ({"num_requests": True}, "num_requests=True"),
        ({"seed": -3}, "seed=-3"),
        ({"rate_per_s": 0.0}, "rate_per_s=0.0"),
        ({"rate_per_s": float("inf")}, "rate_per_s=inf"),
        ({"rate_per_s": "10"}, "rate_per_s='10'"),
        ({"burst_factor": 0.5}, "burst_factor=0.5"),
        ({"burst_fraction": 1.5}, "burst_fraction=1.5"),
        ({"burst_fraction": float("nan")}, "burst_fraction=nan"),
        ({"burst_mean_s": -1.0}, "burst_mean_s=-1.0"),
        ({"context_median": 0}, "context_median=0"),
        ({"context_sigma": -0.1}, "context_sigma=-0.1"),
        ({"generated_median": -5}, "generated_median=-5"),
        ({"generated_sigma": float("nan")}, "generated_sigma=nan"),
        ({"outlier_fraction": -0.01}, "outlier_fraction=-0.01"),
        ({"outlier_tokens": (16384, 8192)}, "outlier_tokens=(16384, 8192)"),
        ({"outlier_tokens": (0, 10)}, "outlier_tokens=(0, 10)"),
        ({"outlier_tokens": (100,)}, "outlier_tokens=(100,)"),
        ({"cancel_fraction": 2}, "cancel_fraction=2"),
        ({"max_total_tokens": 1}, "max_total_tokens=1"),
    ],
    ids=lambda v: v if isinstance(v, str) else None,
)
def test_bad_parameters(kwargs, value):
    kwargs = {"num_requests": 10, **kwargs}
    with pytest.raises(TraceError) as info:
        synthetic_trace(**kwargs)
    assert value in str(info.value)


# ---- cancellations in Trace and CSV ----------------------------------------------

@pytest.mark.parametrize(
    "cancel, expected",
    [
        ([-1, 5], ["cancel_after[1]=5", "generated_tokens[1]=5"]),
        ([-2, -1], ["cancel_after[0]=-2"]),
        ([0, 0, 0], ["shape", "(2,)", "(3,)"]),
    ],
    ids=["at-generated", "below-minus-one", "wrong-shape"],
)
def test_trace_rejects_bad_cancel_after(cancel, expected):
    with pytest.raises(TraceError) as info:
        Trace([0.0, 1.0], [10, 10], [4, 5], cancel_after=cancel)
    for part in expected:
        assert part in str(info.value)


def test_trace_positional_start_and_default_cancel():
    trace = Trace([0.0, 1.0], [10, 10], [4, 5], "2024-01-01T00:00:00")
    assert trace.start == np.datetime64("2024-01-01T00:00:00", "ns")
    np.testing.assert_array_equal(trace.cancel_after, [NOT_CANCELLED, NOT_CANCELLED])
    assert trace.num_cancelled == 0
    assert Trace([0.0, 1.0], [10, 10], [4, 5], cancel_after=[3, -1]).num_cancelled == 1


@pytest.mark.parametrize(
    "arrival, expected",
    [
        ([0.0, float("nan"), 2.0], "arrival_s[1]=nan"),
        ([0.0, 1.0, float("inf")], "arrival_s[2]=inf"),
        ([0.0, 2.0, 1.0], "arrival_s[2]=1.0"),
    ],
    ids=["nan", "inf", "decreasing"],
)
def test_trace_rejects_bad_arrivals(arrival, expected):
    with pytest.raises(TraceError) as info:
        Trace(arrival, [1, 1, 1], [1, 1, 1])
    assert expected in str(info.value)


def test_csv_empty_and_minus_one_mean_not_cancelled(tmp_path):
    path = tmp_path / "t.csv"
    path.write_text(HEADER + "2024-01-01 00:00:00.0000000,10,5,\n"
                             "2024-01-01 00:00:01.0000000,10,5,-1\n"
                             "2024-01-01 00:00:02.0000000,10,5,0\n"
                             "2024-01-01 00:00:03.0000000,10,5,4\n")
    trace = load_trace(path)
    np.testing.assert_array_equal(trace.cancel_after, [-1, -1, 0, 4])
    assert trace.num_cancelled == 2


@pytest.mark.parametrize(
    "rows, expected",
    [
        ("2024-01-01 00:00:00.0000000,10,5,-1\n2024-01-01 00:00:01.0000000,10,5,2.5\n",
         ["line 3", CANCEL_COLUMN, "'2.5'", "not an integer"]),
        ("2024-01-01 00:00:00.0000000,10,5,5\n", ["line 2", CANCEL_COLUMN, "'5'", "GeneratedTokens=5"]),
        ("2024-01-01 00:00:00.0000000,10,0,0\n", ["line 2", CANCEL_COLUMN, "'0'", "GeneratedTokens=0"]),
        ("2024-01-01 00:00:00.0000000,10,5,-7\n", ["line 2", CANCEL_COLUMN, "'-7'"]),
        ("2024-01-01 00:00:01.0000000,10,5,\n2024-01-01 00:00:00.0000000,10,5,\n",
         ["line 3", "TIMESTAMP", "earlier"]),
    ],
    ids=["non-integer", "at-generated", "nothing-generated", "below-minus-one", "out-of-order"],
)
def test_bad_cancel_column_in_csv(tmp_path, rows, expected):
    path = tmp_path / "bad.csv"
    path.write_text(HEADER + rows)
    with pytest.raises(TraceError) as info:
        load_trace(path)
    message = str(info.value)
    assert str(path) in message
    for part in expected:
        assert part in message
