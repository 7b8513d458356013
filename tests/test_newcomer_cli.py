"""What a new user hit on the command line (issue 27 items 3, 4, 5, 7, 8, 9): defaults
that fail on a shipped fixture, refusals in the API's words, sizes in blocks only,
flags accepted and ignored, a progress bar that did not move, help that said
"(default: None)", and a hub id that read as a missing config.json."""

from __future__ import annotations

import io
import json
import pathlib
import re
import types

import pytest

import paged_kv as pk
from paged_kv.cli import build_parser, main
from paged_kv.cli.arguments import plural
from paged_kv.sim.models import MODELS
from paged_kv.sim.progress import ProgressBar
from paged_kv.spec import fields as spec_fields

FIXTURES = pathlib.Path(__file__).parent / "fixtures" / "hf"
MISTRAL, LLAMA = str(FIXTURES / "mistral"), str(FIXTURES / "llama")
API_WORDS = re.compile(r"\b[a-z]+(?:_[a-z]+)+=|CacheSpec|for_memory")
"""A `CacheSpec` field as the API spells it (``sliding_num_blocks=``) or its class."""


def status_and_err(capsys, *argv: str) -> tuple[int, str]:
    try:
        status = main(list(argv))
    except SystemExit as exc:  # argparse's error(): usage line, status 2
        status = exc.code
    return status, capsys.readouterr().err


def the_error(err: str) -> str:
    """The one error line (argparse puts its usage lines before it)."""
    lines = [line for line in err.splitlines() if "error:" in line]
    assert len(lines) == 1, err
    return lines[0]


def simulate_json(capsys, *argv: str) -> dict:
    assert main(["simulate", "--json", "--progress", "off", "--limit", "20", *argv]) == 0
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


@pytest.fixture
def small_host(monkeypatch):
    """256 MiB of host memory, as tests/test_trust_inputs_cli.py pins it, so the same
    sizes are refused on any machine; a replay or generator that got through fails at
    once instead of allocating."""
    import paged_kv.cli.simulate as simulate
    import paged_kv.models.generate as generate

    def tripped(*args, **kwargs):
        raise AssertionError("ran past the size check")

    monkeypatch.setattr(spec_fields, "host_memory_bytes", lambda: 256 * 2**20)
    monkeypatch.setattr(simulate, "_replay", tripped)
    monkeypatch.setattr(generate.Generator, "__init__", tripped)


def reference(name: str, i: int) -> tuple[list[int], list[int]]:
    import numpy as np

    prompt = json.loads((FIXTURES / name / "reference.json").read_text())["prompts"][i]
    tokens = np.load(FIXTURES / name / "reference.npz")[f"tokens_{i}"].tolist()
    return prompt, tokens[len(prompt):]


# ---- item 3: the Mistral fixture with default flags; flags, not API names ----------

def test_mistral_fixture_generates_with_default_flags(capsys):
    """Window 10 < the default block of 16: the default block size becomes 8, and the
    tokens are transformers' own."""
    prompt, want = reference("mistral", 0)
    assert main(["generate", "--checkpoint", MISTRAL, "--prompt-ids", ",".join(map(str, prompt)),
                 "--max-new-tokens", str(len(want)), "--ignore-eos", "--json", "--progress", "off"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["completions"][0]["tokens"] == want
    assert "x 8 tokens" in out["kv_pool"]


def test_block_size_past_the_window_names_the_flag_that_fixes_it(capsys):
    status, err = status_and_err(capsys, "generate", "--checkpoint", MISTRAL, "--prompt-ids", "1,2,3",
                                 "--block-size", "16", "--progress", "off")
    line = the_error(err)
    assert status == 2 and "--block-size 16" in line and "sliding_window 10" in line and "--block-size 8" in line
    assert not re.search(r"\w=\d", line)


def test_simulate_spec_refusals_name_flags(capsys, small_host):
    status, err = status_and_err(capsys, "simulate", "--layout", "sliding", "--sliding-window", "4")
    line = the_error(err)
    assert status == 2 and "--sliding-window 4 is smaller than --block-size 16" in line
    assert not API_WORDS.search(line), line
    status, err = status_and_err(capsys, "simulate", "--layout", "hybrid", "--sliding-blocks", "1")
    line = the_error(err)
    assert status == 2 and "--sliding-blocks 1" in line and not API_WORDS.search(line), line
    status, err = status_and_err(capsys, "simulate", "--max-batch", "1000000", "--token-budget", "1000000")
    line = the_error(err)
    assert status == 2 and "--max-batch 1000000" in line and "size the pool with --pool-gib" in line
    assert not API_WORDS.search(line), line
    status, err = status_and_err(capsys, "simulate", "--max-batch", "300", "--token-budget", "200")
    assert status == 2 and "--token-budget 200 < --max-batch 300" in the_error(err)


def test_generate_spec_refusals_name_flags(capsys, small_host):
    status, err = status_and_err(capsys, "generate", "--checkpoint", LLAMA, "--prompt-ids", "1,2,3",
                                 "--max-batch", "1000000", "--max-new-tokens", "1000", "--progress", "off")
    line = the_error(err)
    assert status == 2 and "--max-batch 1000000" in line and "give fewer --num-blocks" in line
    assert not API_WORDS.search(line), line


# ---- item 4: --pool-gib -------------------------------------------------------------

def test_pool_gib_sizes_the_pool_from_memory_so_the_shape_decides_the_blocks(capsys):
    bf16 = simulate_json(capsys, "--pool-gib", "16")
    shape = MODELS["llama3-8b"].spec_fields()
    want = pk.CacheSpec.for_memory(16 * 2**30, block_size=16, max_blocks_per_seq=1024, **shape)
    assert bf16["num_blocks"] == want.num_blocks and bf16["pool_bytes"] <= 16 * 2**30
    int8 = simulate_json(capsys, "--pool-gib", "16", "--kv-dtype", "int8")
    assert int8["num_blocks"] >= 1.9 * bf16["num_blocks"] and int8["pool_bytes"] <= 16 * 2**30
    big = simulate_json(capsys, "--pool-gib", "16", "--model", "llama3-70b")
    assert big["num_blocks"] < bf16["num_blocks"] / 2
    hybrid = simulate_json(capsys, "--pool-gib", "16", "--layout", "hybrid")
    assert hybrid["num_blocks"] > bf16["num_blocks"] and hybrid["pool_bytes"] <= 16 * 2**30


def test_pool_gib_with_num_blocks_or_sliding_blocks_is_refused(capsys):
    status, err = status_and_err(capsys, "simulate", "--pool-gib", "16", "--num-blocks", "100")
    line = the_error(err)
    assert status == 2 and "--pool-gib 16 and --num-blocks 100" in line and "give one" in line
    status, err = status_and_err(capsys, "simulate", "--pool-gib", "16", "--layout", "hybrid",
                                 "--sliding-blocks", "100")
    assert status == 2 and "--sliding-blocks 100" in the_error(err)
    for bad in ("0", "-1", "inf", "nan", "x"):
        status, err = status_and_err(capsys, "simulate", "--pool-gib", bad)
        assert status == 2 and "--pool-gib" in the_error(err)


def test_pool_gib_too_small_for_one_sequence_says_what_fits(capsys):
    status, err = status_and_err(capsys, "simulate", "--pool-gib", "0.1")
    line = the_error(err)
    assert status == 2 and "fewer than the 1025" in line
    suggested = re.search(r"use --pool-gib ([\d.]+) or more", line).group(1)
    assert simulate_json(capsys, "--pool-gib", suggested)["num_blocks"] >= 1025
    status, err = status_and_err(capsys, "simulate", "--pool-gib", "2000")
    assert status == 2 and "--pool-gib 2000" in the_error(err) and "--force" in err


# ---- item 5: flags that were accepted and ignored -----------------------------------

def test_generate_refuses_a_pool_smaller_than_one_sequence(capsys):
    # 3 prompt tokens + 32 new = 35 tokens: 3 blocks of 16 and the null block.
    status, err = status_and_err(capsys, "generate", "--checkpoint", LLAMA, "--prompt-ids", "1,2,3",
                                 "--num-blocks", "1", "--progress", "off")
    line = the_error(err)
    assert status == 2 and "--num-blocks 1" in line and "use --num-blocks 4 or more" in line


def test_samples_with_multiturn_is_refused(capsys):
    status, err = status_and_err(capsys, "simulate", "--workload", "multiturn", "--samples", "4")
    line = the_error(err)
    assert status == 2 and "--samples 4" in line and "--workload multiturn" in line
    assert simulate_json(capsys, "--workload", "multiturn", "--sessions", "2", "--samples", "1")["requests"] > 0


# ---- item 7: progress ------------------------------------------------------------------

def test_generate_progress_counts_tokens():
    from paged_kv.cli.generate import _progress

    progress, bar = _progress(True, 64)
    bar.stream = out = io.StringIO()
    stats = types.SimpleNamespace(tokens_per_s=10.0, kv_usage_mean=0.5, generated_tokens=16)
    progress(0, 2, stats)  # no request finished yet, a quarter of the tokens generated
    assert "16/64 tokens" in out.getvalue() and " 25% " in out.getvalue()
    bar._last = -1.0  # the next call draws however soon it comes
    stats.generated_tokens = 40  # one request stopped early at EOS: the bar still ends full
    progress(2, 2, stats)
    assert out.getvalue().rsplit("\r", 1)[-1].count("64/64 tokens") == 1


def test_progress_bar_gives_the_time_left(monkeypatch):
    clock = iter([0.0, 10.0, 20.0])
    monkeypatch.setattr("paged_kv.sim.progress.time.perf_counter", lambda: next(clock))
    out = io.StringIO()
    bar = ProgressBar("paged", stream=out)  # started at 0
    bar(25, 100)  # 10 s for a quarter: 30 s to go
    assert "25/100 requests 10.0 s, ETA 30.0 s" in out.getvalue()
    bar(100, 100)
    assert out.getvalue().rsplit("\r", 1)[-1].rstrip().endswith("100/100 requests 20.0 s")


# ---- item 8: help, dir(pk), plurals ------------------------------------------------

@pytest.mark.parametrize("command", ["simulate", "generate"])
def test_help_shows_each_default_once_and_only_real_ones(command):
    sub = next(a for a in build_parser()._actions if a.dest == "command").choices[command]
    text = sub.format_help()
    assert "(default: None)" not in text and "(default: False)" not in text
    for action in sub._actions:
        if action.help and action.option_strings:
            shown = sub._get_formatter()._get_help_string(action)  # the help with what the formatter adds
            assert shown.count("default:") <= 1, (action.option_strings, shown)
            if action.required:
                assert "default" not in shown, (action.option_strings, shown)


def test_dir_of_the_package_hides_its_helpers():
    names = dir(pk)
    assert "_DEVICE_NAMES" not in names and not [n for n in names if n.startswith("_") and not n.startswith("__")]
    assert set(pk.__all__) <= set(names) and "__version__" in names


def test_plurals_agree(capsys):
    assert [plural(1, "request"), plural(2, "request"), plural(1_024, "block")] == \
        ["1 request", "2 requests", "1,024 blocks"]
    out = simulate_json(capsys, "--trace", "synthetic", "--requests", "1")
    assert out["trace"] == "Trace: synthetic (1 request, seed 0)"


# ---- item 9: hub ids and prompt files ------------------------------------------------

def test_a_hub_id_says_to_download_the_checkpoint_first(capsys, monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)  # no folder of that name here
    status, err = status_and_err(capsys, "generate", "--checkpoint", "meta-llama/Llama-3.2-1B", "--prompt-ids", "1")
    line = the_error(err)
    assert status == 2 and "huggingface-cli download meta-llama/Llama-3.2-1B --local-dir DIR" in line
    assert "--checkpoint DIR" in line and "config.json" not in line
    (tmp_path / "weights.bin").write_bytes(b"")
    status, err = status_and_err(capsys, "generate", "--checkpoint", "weights.bin", "--prompt-ids", "1")
    assert status == 2 and "is a file" in the_error(err)


def test_prompt_files_of_ids_and_text(capsys, tmp_path):
    from tokenizers import Tokenizer

    prompt, want = reference("llama", 0)
    ids, text = tmp_path / "ids.txt", tmp_path / "long.txt"
    ids.write_text("\n".join(" ".join(map(str, prompt[i:i + 4])) for i in range(0, len(prompt), 4)) + "\n")
    text.write_text("paged\nkv cache\n")
    assert main(["generate", "--checkpoint", LLAMA, "--prompt-file", str(ids), "--prompt-file", str(text),
                 "--max-new-tokens", str(len(want)), "--ignore-eos", "--json", "--progress", "off"]) == 0
    first, second = json.loads(capsys.readouterr().out)["completions"]
    assert first["prompt"] == prompt and first["tokens"] == want
    tokenizer = Tokenizer.from_file(str(FIXTURES / "llama" / "tokenizer.json"))
    assert second["prompt"] == tokenizer.encode("paged\nkv cache").ids and "text" in second


@pytest.mark.parametrize("content, said", [(None, "does not exist"), ("", "is empty"), (b"\xff\xfe", "not UTF-8")])
def test_bad_prompt_files_are_refused_before_loading(capsys, tmp_path, content, said):
    path = tmp_path / "prompt.txt"
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif content is not None:
        path.write_text(content)
    status, err = status_and_err(capsys, "generate", "--checkpoint", LLAMA, "--prompt-file", str(path))
    line = the_error(err)
    assert status == 2 and "--prompt-file" in line and said in line
