"""Issue 23 item 9 at the command line: every size flag is checked against the memory it
would take before anything is built, and a refusal is exit status 2 naming the flag.

The machine is pinned to 256 MiB of host memory (`paged_kv.spec.fields.host_memory_bytes`)
so that the same flags are refused on any test host; the steps that would allocate
(the workload, the replay, the generator) are replaced by tripwires, so a flag that got
through fails the test at once instead of running for hours.
"""

from __future__ import annotations

import pathlib

import pytest

import paged_kv.spec.fields as spec_fields
from paged_kv.cli import main

FIXTURE = str(pathlib.Path(__file__).parent / "fixtures" / "hf" / "llama")


@pytest.fixture
def small_host(monkeypatch):
    monkeypatch.setattr(spec_fields, "host_memory_bytes", lambda: 256 * 2**20)


@pytest.fixture
def tripwires(monkeypatch):
    import paged_kv.cli.simulate as simulate
    import paged_kv.models.generate as generate
    import paged_kv.sim.synthetic as synthetic

    def tripped(*args, **kwargs):
        raise AssertionError("an allocation the size check should have prevented ran")

    for module, name in ((simulate, "_workload"), (simulate, "_replay"), (synthetic, "synthetic_trace")):
        monkeypatch.setattr(module, name, tripped)
    monkeypatch.setattr(generate.Generator, "__init__", tripped)


def exit_status(argv, capsys) -> tuple[int, str]:
    try:
        status = main(argv)
    except SystemExit as exc:  # argparse's error(): usage line, status 2
        status = exc.code
    return status, capsys.readouterr().err


SIMULATE = [
    (["--trace", "synthetic", "--requests", "10000000"], "--requests 10,000,000"),
    (["--samples", "100000"], "--samples 100,000"),
    (["--trace", "synthetic", "--requests", "1000", "--samples", "100000"], "--samples 100,000"),
    (["--workload", "multiturn", "--sessions", "1000000"], "--sessions 1,000,000 x --turns 6"),
    (["--workload", "multiturn", "--turns", "1000000"], "--sessions 64 x --turns 1,000,000"),
    (["--max-batch", "1000000"], "--max-batch 1000000: --num-layers 32"),
    (["--num-blocks", "2000000", "--block-size", "1", "--max-seq-len", "16"], "--num-blocks 2000000"),
    (["--num-blocks", "1200000", "--block-size", "2", "--max-seq-len", "16"], "--num-blocks 1200000, --block-size 2"),
]


@pytest.mark.parametrize("flags, named", SIMULATE)
def test_simulate_refuses_sizes_past_host_memory_with_status_2(small_host, tripwires, capsys, flags, named):
    status, err = exit_status(["simulate", "--progress", "off", *flags], capsys)
    assert status == 2, err
    assert named in err and "of host memory, more than this machine's 0.2 GiB" in err


def test_simulate_within_host_memory_still_runs(small_host, capsys):
    status, err = exit_status(["simulate", "--trace", "synthetic", "--requests", "20", "--samples", "2",
                               "--progress", "off", "--json"], capsys)
    assert status == 0, err


GENERATE = [
    (["--max-new-tokens", "10000000"], "--max-new-tokens 10000000, "),
    (["--num-blocks", "100000", "--block-size", "64"], "--num-blocks 100,000 x --block-size 64"),
    (["--block-size", "1048576"], "--block-size 1048576"),
    (["--max-batch", "1000000", "--max-new-tokens", "1000"], "--max-batch 1000000: the checkpoint's num_hidden_layers 2"),
]


@pytest.mark.parametrize("flags, named", GENERATE)
def test_generate_refuses_sizes_past_memory_with_status_2(small_host, tripwires, capsys, flags, named):
    status, err = exit_status(["generate", "--checkpoint", FIXTURE, "--prompt-ids", "1,2,3", "--progress", "off",
                               "--max-new-tokens", "2", *flags], capsys)
    assert status == 2, err
    assert named in err and "of host memory, more than this machine's 0.2 GiB" in err


def test_generate_refuses_before_reading_weights(small_host, monkeypatch, capsys):
    import paged_kv.models.loader as loader

    def tripped(*args, **kwargs):
        raise AssertionError("weights were read before the pool was sized")

    monkeypatch.setattr(loader, "load_params", tripped)
    status, err = exit_status(["generate", "--checkpoint", FIXTURE, "--prompt-ids", "1", "--num-blocks", "100000",
                               "--block-size", "64", "--progress", "off"], capsys)
    assert status == 2 and "KV pool" in err
