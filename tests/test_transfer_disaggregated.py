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


def test_prefilled_sequences_join_a_running_decode_batch():
    """The same flow in one process (the prefill side in a thread): sequences received by
    `TransferReceiver.poll` inside the generator's ``arrivals`` hook join as `Prefilled`
    requests beside a local one; greedy tokens equal one generator's."""
    import argparse
    import threading
    import time

    from paged_kv.models.generate import Generator, Prefilled, Request
    from paged_kv.transfer import TransferReceiver

    ex = load_example()
    cfg, params, spec = ex.model()
    gen = Generator(cfg, params, spec, compiler_options=ex.FAST_COMPILE)
    receiver = TransferReceiver(gen.manager)
    args = argparse.Namespace(requests=3, seed=2, gap=0.05, warmup=False, to=receiver.address, timeout=120.0)
    sent: dict = {}
    worker = threading.Thread(target=lambda: sent.update(ex.prefill(args)), daemon=True)
    worker.start()
    deadline, got = time.monotonic() + 120, []

    def arrivals(idle: bool):
        if len(got) == args.requests:
            return None
        assert time.monotonic() < deadline and worker.is_alive() or receiver.pending, "the prefill side stopped"
        gen.cache, received = receiver.poll(gen.cache, timeout=0.02 if idle else 0.0)
        got.extend(received)
        return [Prefilled(r.tokens.tolist(), r.info["max_new"], request_id=r.seq_id, first_token=r.info["first_token"])
                for r in received]

    local = Request([7, 8, 9, 10, 11], 6, request_id=1)
    completions, stats = gen.generate([local], arrivals=arrivals)
    worker.join(60)
    receiver.close()
    requests = ex.workload(args.requests, args.seed, args.gap)
    want, _ = Generator(cfg, params, spec, compiler_options=ex.FAST_COMPILE).generate(
        [local] + [Request(r["prompt"], r["max_new"], request_id=r["id"]) for r in requests])
    assert {c.request_id: c.tokens for c in completions} == {c.request_id: c.tokens for c in want}
    assert stats.inserted_prefills == args.requests and stats.requests == args.requests + 1
    assert sent["integrity"] == "ok" and sent["used_blocks"] == 0
    gen.manager.check_integrity()
    assert gen.manager.num_used_blocks == 0
