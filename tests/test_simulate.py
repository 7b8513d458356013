"""Trace loading and the command line (the replay itself: tests/test_scheduler.py)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from paged_kv import CacheSpec, TraceError
from paged_kv.cli import main
from paged_kv.sim import Trace, load_trace

HEADER = "TIMESTAMP,ContextTokens,GeneratedTokens\n"


def small_spec(num_blocks: int, max_blocks_per_seq: int, block_size: int = 16, max_batch_slots: int = 64) -> CacheSpec:
    return CacheSpec(num_layers=1, num_kv_heads=1, head_dim=8, dtype="float32", num_blocks=num_blocks,
                     block_size=block_size, max_blocks_per_seq=max_blocks_per_seq, max_batch_slots=max_batch_slots)


# ---- trace -----------------------------------------------------------------------

def test_bundled_trace_loads(bundled):
    assert len(bundled) > 19000
    assert (bundled.context_tokens[0], bundled.generated_tokens[0]) == (374, 44)
    assert bundled.arrival_s[0] == 0.0
    assert bundled.context_tokens.dtype == np.int64 and bundled.arrival_s.dtype == np.float64
    # Timestamps have 7 fractional digits: rows 1 and 2 are 4.3145790 s apart.
    assert bundled.arrival_s[1] == pytest.approx(4.314579, abs=1e-9)
    assert np.all(np.diff(bundled.arrival_s) >= 0)


def test_head(bundled):
    head = bundled.head(10)
    assert len(head) == 10
    np.testing.assert_array_equal(head.context_tokens, bundled.context_tokens[:10])
    assert len(bundled.head(10**9)) == len(bundled)
    with pytest.raises(TraceError):
        bundled.head(-1)


def test_csv_round_trip(bundled, tmp_path):
    path = tmp_path / "trace.csv"
    bundled.head(500).to_csv(path)
    back = load_trace(path)
    assert path.read_text().splitlines()[1] == "2023-11-16 18:15:46.6805900,374,44"
    np.testing.assert_array_equal(back.arrival_s, bundled.arrival_s[:500])
    np.testing.assert_array_equal(back.context_tokens, bundled.context_tokens[:500])
    np.testing.assert_array_equal(back.generated_tokens, bundled.generated_tokens[:500])
    assert back.start == bundled.start


@pytest.mark.parametrize(
    "body, expected",
    [
        ("TIMESTAMP,ContextTokens\n2023-11-16 18:15:46.6805900,374\n", ["line 1", "GeneratedTokens"]),
        (HEADER + "2023-11-16 18:15:46.6805900,374,44\n2023-11-16 18:15:47.0000000,-5,10\n",
         ["line 3", "ContextTokens", "'-5'"]),
        (HEADER + "2023-11-16 18:15:46.6805900,374,NaN\n", ["line 2", "GeneratedTokens", "'NaN'"]),
        (HEADER + "2023-11-16 18:15:46.6805900,374,4.5\n", ["line 2", "GeneratedTokens", "'4.5'"]),
        (HEADER + "2023-11-16 18:15:46.6805900,374,44\n2023-11-16 18:15:4", ["line 3", "1 fields", "truncated"]),
        (HEADER + "2023-11-16 18:15:46.6805900,374,44\n2023-11-16 18:15:4,1,2\n", ["line 3", "TIMESTAMP"]),
        (HEADER + "2023-11-16 18:15:46.6805900,0,44\n", ["line 2", "ContextTokens", ">= 1"]),
        ("", ["empty file"]),
    ],
    ids=["missing-column", "negative", "nan", "non-integer", "truncated-row", "bad-timestamp", "no-prompt", "empty"],
)
def test_bad_trace_files(tmp_path, body, expected):
    path = tmp_path / "bad.csv"
    path.write_text(body)
    with pytest.raises(TraceError) as info:
        load_trace(path)
    message = str(info.value)
    assert str(path) in message
    for part in expected:
        assert part in message


def test_empty_trace_round_trip(tmp_path):
    path = tmp_path / "empty.csv"
    Trace([], [], []).to_csv(path)
    assert len(load_trace(path)) == 0


def test_missing_trace_file(tmp_path):
    path = tmp_path / "nope.csv"
    with pytest.raises(TraceError, match="nope.csv"):
        load_trace(path)


def test_trace_arrays_must_match():
    with pytest.raises(TraceError, match="one length"):
        Trace([0.0, 1.0], [1, 2], [1])


# ---- command line ----------------------------------------------------------------

def test_cli_json(capsys):
    assert main(["simulate", "--limit", "200", "--json"]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1
    result = json.loads(out[0])
    assert result["requests"] == 200 and result["requests_served"] == 200
    assert result["pool_bytes"] == 8192 * 16 * 32 * 2 * 8 * 128 * 2
    assert 0.0 < result["time_avg_utilization"] <= 1.0


def test_cli_table_has_attribution(capsys):
    assert main(["simulate", "--limit", "50"]) == 0
    out = capsys.readouterr().out
    assert "CC-BY 4.0" in out and "Splitwise" in out
    assert "requests served" in out and "GiB" in out


def test_cli_bad_trace_exits_2(tmp_path, capsys):
    path = tmp_path / "bad.csv"
    path.write_text(HEADER + "2023-11-16 18:15:46.6805900,374,-1\n")
    assert main(["simulate", "--trace", str(path)]) == 2
    err = capsys.readouterr().err
    assert "line 2" in err and "GeneratedTokens" in err


@pytest.mark.parametrize("argv", [["simulate", "--limit", "0"], ["simulate", "--num-blocks", "100"], []])
def test_cli_bad_arguments(argv):
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 2
