"""``paged-kv generate``'s sampling, stop, chat and compilation-cache flags
(`paged_kv.cli.generate_options`), run in-process on the tiny Llama fixture."""

from __future__ import annotations

import json
import os
import pathlib

import jax
import pytest

from paged_kv.cli import main

LLAMA = pathlib.Path(__file__).parent / "fixtures" / "hf" / "llama"
BASE = ["generate", "--checkpoint", str(LLAMA), "--max-new-tokens", "10", "--ignore-eos", "--progress", "off",
        "--json", "--no-compile-cache"]


def run(capsys, *argv, base=BASE) -> dict:
    assert main([*base, *argv]) == 0
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def refused(capsys, *argv, base=BASE) -> str:
    """The error of a refused run: exit status 2 from the command or from argparse."""
    try:
        status = main([*base, *argv])
    except SystemExit as exc:
        status = exc.code
    assert status == 2
    return capsys.readouterr().err


def test_sampling_flags_reach_every_request(capsys):
    greedy = run(capsys, "--prompt-ids", "5,6,7", "--prompt-ids", "5,6,7")
    sampled = run(capsys, "--prompt-ids", "5,6,7", "--prompt-ids", "5,6,7", "--temperature", "1.5", "--seed", "3",
                  "--top-k", "40", "--top-p", "0.95", "--min-p", "0.01", "--repetition-penalty", "1.1",
                  "--presence-penalty", "0.2", "--logprobs", "2")
    again = run(capsys, "--prompt-ids", "5,6,7", "--prompt-ids", "5,6,7", "--temperature", "1.5", "--seed", "3",
                "--top-k", "40", "--top-p", "0.95", "--min-p", "0.01", "--repetition-penalty", "1.1",
                "--presence-penalty", "0.2", "--logprobs", "2")
    g, s, a = (r["completions"] for r in (greedy, sampled, again))
    assert g[0]["tokens"] == g[1]["tokens"] and "logprobs" not in g[0]  # greedy: equal prompts, equal tokens
    assert [c["tokens"] for c in s] == [c["tokens"] for c in a]  # a seed repeats
    assert s[0]["tokens"] != s[1]["tokens"]  # request i draws with seed + i
    assert len(s[0]["logprobs"]) == 10 and all(len(top) == 2 for top in s[0]["top_logprobs"])
    assert 0 < greedy["stats"]["first_token_seconds"] <= greedy["stats"]["seconds"]


def test_stop_strings_and_ids_end_completions(capsys):
    ref = run(capsys, "--prompt", "paged")["completions"][0]
    text, tokens = ref["text"], ref["tokens"]
    stop = text[3:5]
    got = run(capsys, "--prompt", "paged", "--stop", stop)["completions"][0]
    assert got["finish_reason"] == "stop" and got["stop_reason"] == stop
    assert got["text"] == text[: text.find(stop)] and got["tokens"] == tokens[: len(got["tokens"])]
    # stop strings need the tokenizer even for prompts given as ids
    by_ids = run(capsys, "--prompt-ids", ",".join(map(str, ref["prompt"])), "--stop", stop)["completions"][0]
    assert by_ids["text"] == got["text"]
    ids = run(capsys, "--prompt", "paged", "--stop-token-ids", f"{tokens[2]},{tokens[2]}")["completions"][0]
    assert ids["tokens"] == tokens[: tokens.index(tokens[2]) + 1] and ids["stop_reason"] == tokens[2]


@pytest.mark.parametrize("flag,value", [("--temperature", "-1"), ("--top-p", "0"), ("--top-p", "1.5"),
                                        ("--min-p", "2"), ("--repetition-penalty", "0"), ("--presence-penalty", "inf"),
                                        ("--top-k", "-3"), ("--seed", "x"), ("--logprobs", "-1"),
                                        ("--stop-token-ids", "a")])
def test_bad_sampling_flags_are_refused_by_name(capsys, flag, value):
    assert flag in refused(capsys, "--prompt-ids", "1,2", flag, value)


@pytest.fixture
def chat_checkpoint(tmp_path):
    """The Llama fixture with a tokenizer_config.json holding a chat template."""
    for name in ("config.json", "model.safetensors", "tokenizer.json"):
        (tmp_path / name).symlink_to(LLAMA / name)

    def with_template(template, **extra) -> pathlib.Path:
        config = dict(chat_template=template, bos_token="<s>", eos_token={"content": "</s>"}, **extra)
        (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
        return tmp_path

    return with_template


TEMPLATE = ("{{ bos_token }}{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}{{ eos_token }}{% endfor %}"
            "{% if add_generation_prompt %}[assistant] {% endif %}")


def test_chat_formats_text_prompts_with_the_checkpoints_template(capsys, chat_checkpoint):
    from tokenizers import Tokenizer

    directory = chat_checkpoint(TEMPLATE)
    base = [*BASE[:2], str(directory), *BASE[3:]]
    out = run(capsys, "--prompt", "hello there", "--chat", base=base)
    want = Tokenizer.from_file(str(LLAMA / "tokenizer.json")).encode(
        "<s>[user] hello there</s>[assistant] ", add_special_tokens=False).ids
    assert out["completions"][0]["prompt"] == want
    assert "--chat formats text prompts" in refused(capsys, "--prompt-ids", "1,2", "--chat", base=base)
    # named templates: the default one
    chat_checkpoint([{"name": "tool_use", "template": "x"}, {"name": "default", "template": TEMPLATE}])
    assert run(capsys, "--prompt", "hello there", "--chat", base=base)["completions"][0]["prompt"] == want


@pytest.mark.parametrize("template,error", [
    ("{{ ''.__class__.__mro__ }}", "failed on this prompt"),  # the sandbox refuses Python internals
    ("{% if %}", "does not compile"),
    ("{{ raise_exception('no system role') }}", "no system role"),
    (None, "has no chat_template"),
])
def test_a_bad_or_missing_chat_template_is_refused(capsys, chat_checkpoint, template, error):
    directory = chat_checkpoint(template)
    assert error in refused(capsys, "--prompt", "hi", "--chat", base=[*BASE[:2], str(directory), *BASE[3:]])


def test_compiled_steps_are_kept_in_the_cache_dir_and_settings_restored(capsys, tmp_path):
    before = jax.config.jax_compilation_cache_dir
    base = [b for b in BASE if b != "--no-compile-cache"]
    first = run(capsys, "--prompt-ids", "1,2,3", "--compile-cache", str(tmp_path / "cc"), base=base)
    assert jax.config.jax_compilation_cache_dir == before  # an in-process caller keeps its settings
    # The steps as executables (paged_kv.models.programs, compiled by XLA rather than read from
    # JAX's cache, which holds the smaller programs): the next run reads them back, no tracing.
    stored = os.listdir(tmp_path / "cc" / "paged_kv-programs")
    assert first["stats"]["compilations"] >= 2 and len(stored) == first["stats"]["compilations"]
    second = run(capsys, "--prompt-ids", "1,2,3", "--compile-cache", str(tmp_path / "cc"), base=base)
    assert second["stats"]["compilations"] == 0 and second["stats"]["loaded_programs"] >= 2
    assert second["completions"][0]["tokens"] == first["completions"][0]["tokens"]
    run(capsys, "--prompt-ids", "1,2,3", "--compile-cache", str(tmp_path / "off"))  # BASE: --no-compile-cache
    assert not (tmp_path / "off").exists()
    (tmp_path / "file").write_text("x")
    assert "--compile-cache" in refused(capsys, "--prompt-ids", "1", "--compile-cache", str(tmp_path / "file" / "d"),
                                        base=base)
