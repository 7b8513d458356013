"""Disaggregated serving end to end (examples/disaggregated.py): a prefill process and a
decode process on 127.0.0.1, requests arriving over time, pages moved by
`paged_kv.transfer`; the greedy tokens equal one process's generation, token for token,
and both managers end clean, holding nothing."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

pytest.importorskip("zmq")

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "disaggregated.py"


def load_example():
    spec = importlib.util.spec_from_file_location("disaggregated_example", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_disaggregated_greedy_tokens_equal_single_process():
    ex = load_example()
    requests = ex.workload(6, seed=1, gap=0.1)
    out = ex.serve(6, seed=1, gap=0.1, timeout=240.0, warmup=False)
    result = ex.summary(out, requests, ex.single_process(requests, warmup=False))
    assert result["tokens_equal"], (out["decode"]["tokens"], result)
    assert result["integrity"] == {"prefill": "ok", "decode": "ok", "blocks_held_after": [0, 0]}
    assert result["generated_tokens"] == sum(r["max_new"] for r in requests)
    assert out["decode"]["stats"]["joined_mid_run"] >= 1  # requests joined a running batch
