"""The generator's request checks, EOS handling, and ``paged-kv generate`` end to end."""

from __future__ import annotations

import functools
import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import paged_kv as pk
from paged_kv.cli import main
from paged_kv.models import llama
from paged_kv.models.generate import GenerationError, Generator, Request
from paged_kv.models.loader import load_model

FIXTURES = pathlib.Path(__file__).parent / "fixtures" / "hf"
# Compile time dominates: the step of each shape, at no backend optimization and with
# XLA:CPU's older emitters (a third faster to compile; tests/test_hf_equality.py).
FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_cpu_use_fusion_emitters": False}


def reference_tokens(name: str, i: int) -> tuple[list[int], list[int]]:
    prompt = json.loads((FIXTURES / name / "reference.json").read_text())["prompts"][i]
    tokens = np.load(FIXTURES / name / "reference.npz")[f"tokens_{i}"].tolist()
    return prompt, tokens[len(prompt):]


@pytest.fixture(scope="module")
def model():
    return load_model(FIXTURES / "llama")


def generator(model, **kw) -> Generator:
    cfg, params = model
    spec = llama.cache_spec(cfg, num_blocks=20, block_size=4, max_seq_len=40, max_batch_slots=2)
    return Generator(cfg, params, spec, compiler_options=FAST_COMPILE, **kw)


@pytest.mark.parametrize("request_,error,named", [
    (Request([], 4), GenerationError, "prompt must be 1+ integer token ids"),
    (Request([1, 2.5], 4), GenerationError, "prompt must be 1+ integer token ids"),
    (Request([True], 4), GenerationError, "prompt must be 1+ integer token ids"),
    (Request([1, 256], 4), GenerationError, "in [0, 256)"),
    (Request([1, -1], 4), GenerationError, "in [0, 256)"),
    (Request([1, 2], 0), GenerationError, "max_new_tokens=0"),
    (Request([1, 2], 4, arrival_step=-1), GenerationError, "arrival_step=-1"),
    (Request([1, 2], 4, request_id="a"), GenerationError, "request_id='a' must be an int >= 0"),
    (Request([1] * 30, 11), pk.SequenceTooLongError, "41 tokens > max_seq_len=40"),
])
def test_bad_requests_raise_before_anything_runs(model, request_, error, named):
    gen = generator(model)
    before = gen.manager.snapshot()
    with pytest.raises(error) as err:
        gen.generate([Request([5, 6, 7], 2), request_])
    assert named in str(err.value)
    assert gen.manager.snapshot() == before and len(gen.manager) == 0


def test_duplicate_ids_and_a_pool_too_small_for_one_request(model):
    gen = generator(model)
    with pytest.raises(GenerationError, match="request_id=3 appears twice"):
        gen.generate([Request([1], 2, request_id=3), Request([2], 2, request_id=3)])
    # A sliding pool smaller than one prompt: its prefill needs every prompt block at once.
    cfg, params = load_model(FIXTURES / "mistral")
    tiny = llama.cache_spec(cfg, num_blocks=11, sliding_num_blocks=5, block_size=4, max_seq_len=40, max_batch_slots=2)
    with pytest.raises(pk.OutOfBlocksError, match=r"need 8 free blocks for request 0 alone \(30 tokens\)"):
        Generator(cfg, params, tiny).generate([Request([1] * 22, 8)])
    with pytest.raises(GenerationError, match="headroom=-1"):
        generator(model, headroom=-1)


def test_eos_ends_a_sequence_and_frees_its_blocks(model):
    prompt, want = reference_tokens("llama", 2)
    never = next(t for t in range(256) if t not in want)
    gen = generator(model, eos_token_ids=[never, want[3]], prefix_cache=False)
    (done,), stats = gen.generate([Request(prompt, 20)])
    assert done.tokens == want[: want.index(want[3]) + 1] and done.finish_reason == "eos"
    assert gen.manager.num_used_blocks == 0 and stats.generated_tokens == len(done.tokens)


def test_a_second_run_of_the_same_shapes_compiles_nothing(model):
    """Step shapes depend on buckets, not on how many sequences run or which slots they hold."""
    rng = np.random.default_rng(0)
    lengths = [3, 9, 5, 14, 2]

    def run(gen):
        reqs = [Request(rng.integers(3, 256, n).tolist(), 6, arrival_step=i) for i, n in enumerate(lengths)]
        return gen.generate(reqs)[1]

    gen = generator(model, prefix_cache=False)
    first = run(gen)
    assert first.compilations >= 2 and run(gen).compilations == 0


def test_cli_generate_on_a_fixture_gives_transformers_tokens(capsys):
    prompts = [reference_tokens("mistral", i) for i in (0, 3)]
    argv = ["generate", "--checkpoint", str(FIXTURES / "mistral"), "--max-new-tokens", "20", "--ignore-eos",
            "--block-size", "4", "--max-batch", "2", "--prefill-chunk", "7", "--json", "--progress", "off"]
    for prompt, _ in prompts:
        argv += ["--prompt-ids", ",".join(map(str, prompt))]
    assert main(argv) == 0
    out = json.loads(capsys.readouterr().out)
    assert [c["tokens"] for c in out["completions"]] == [want for _, want in prompts]
    stats = out["stats"]
    assert stats["generated_tokens"] == 40 and stats["tokens_per_s"] > 0 and 0 < stats["kv_usage_peak"] <= 1


def test_cli_text_prompts_and_errors(capsys, tmp_path):
    assert main(["generate", "--checkpoint", str(FIXTURES / "llama"), "--prompt", "paged", "--prompt", "kv",
                 "--max-new-tokens", "3", "--progress", "off"]) == 0
    out = capsys.readouterr().out
    assert "[0] 5 prompt tokens -> 3" in out and "[1] 2 prompt tokens -> " in out and "tokens/s" in out
    assert main(["generate", "--checkpoint", str(FIXTURES / "mistral"), "--prompt", "x"]) == 2
    assert "tokenizer.json; give --prompt-ids instead" in capsys.readouterr().err
    assert main(["generate", "--checkpoint", str(tmp_path), "--prompt-ids", "1"]) == 2
    assert "config.json: not found" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_:
        main(["generate", "--checkpoint", str(tmp_path), "--prompt-ids", "1,x"])
    assert exit_.value.code == 2 and "not a list of integer token ids" in capsys.readouterr().err


def test_chunked_prefill_into_full_attention_gives_transformers_tokens(model):
    """Two Llama prompts (full attention) prefilled together 5 tokens a step: chunks not
    a multiple of the block, each later chunk attending to the earlier ones in the pages.
    Every greedy token is transformers'. The quick tier's chunked prefill of full
    attention; random schedules of it (preemptions, prefix hits, inserted prefills, every
    logit) are the `slow` Llama case below, the quick Mistral case running them on
    sliding layers."""
    prompts = {i: reference_tokens("llama", i) for i in (3, 1)}  # 21 and 15 tokens
    gen = generator(model, prefill_chunk=5)
    done, stats = gen.generate([Request(prompt, 8, request_id=i) for i, (prompt, _) in prompts.items()])
    assert {c.request_id: c.tokens for c in done} == {i: want[:8] for i, (_, want) in prompts.items()}
    assert stats.prefill_steps >= 5 and stats.prefill_tokens == 21 + 15  # ceil(21 / 5) chunks of the longer prompt
    gen.manager.check_integrity()


@pytest.mark.parametrize("name,pool,chunk", [
    # ~14 s of CPU cold (16 step shapes compiled): in the full suite only. The quick tier
    # runs the Mistral case and, for Llama's full attention, the chunked prefill above
    # and tests/test_hf_equality.py's schedule (batching, prefix hits, a preemption).
    pytest.param("llama", dict(num_blocks=14, max_batch_slots=4), 6, marks=pytest.mark.slow),
    ("mistral", dict(num_blocks=13, sliding_num_blocks=12, max_batch_slots=4), 5),
])
def test_random_schedules_equal_a_cacheless_recompute(name, pool, chunk):
    """Two rounds of random requests on one generator (its prefix cache and pages
    carry over): prompts sharing random prefixes, random arrivals, some prefilled
    elsewhere, chunked prefill (chunks not a multiple of the block), a pool that
    forces preemptions. Every logit it computed equals a cacheless forward over the
    sequence's final tokens. (Whole-prompt prefill: the transformers test.)"""
    cfg, params = load_model(FIXTURES / name)
    spec = llama.cache_spec(cfg, block_size=4, max_seq_len=40, **pool)
    gen = Generator(cfg, params, spec, record_logits=True, compiler_options=FAST_COMPILE, headroom=0,
                    prefill_chunk=chunk)
    full = jax.jit(functools.partial(llama.forward_contiguous, cfg), compiler_options=FAST_COMPILE)
    rng = np.random.default_rng(7)
    stem = rng.integers(3, 256, 16).tolist()
    preempted = inserted = 0
    for round_ in range(2):
        reqs = []
        for i in range(6):
            shared = int(rng.integers(0, 13))
            prompt = stem[:shared] + rng.integers(3, 256, int(rng.integers(1, 12))).tolist()
            reqs.append(Request(prompt, int(rng.integers(1, 40 - len(prompt) + 1)), request_id=10 * round_ + i,
                                arrival_step=int(rng.integers(0, 8)), prefill_elsewhere=bool(rng.random() < 0.3)))
        completions, stats = gen.generate(reqs)
        preempted += stats.preemptions
        inserted += stats.inserted_prefills
        for c in completions:
            tokens = np.zeros((1, spec.max_seq_len), np.int32)
            seq = c.prompt + c.tokens
            tokens[0, : len(seq)] = seq
            want = np.asarray(full(params, jnp.asarray(tokens))[0])[0]
            tol = 1e-4 * float(want.std())
            for p, token in enumerate(c.tokens, start=len(c.prompt) - 1):
                assert want[p, token] >= want[p].max() - tol, f"request {c.request_id}: token {token} not greedy"
            for p, row in list(c.logits.items()) + c.recomputed:
                np.testing.assert_allclose(row, want[p], atol=tol, rtol=0,
                                           err_msg=f"{name} round {round_} request {c.request_id} position {p}")
        gen.manager.check_integrity()
    assert preempted >= 1 and inserted >= 1 and gen.manager.prefix_cache.stats().hit_tokens > 0
    assert not gen._prefilling and len(gen.manager) == 0


def test_cache_spec_slides_only_when_the_window_can_bind():
    cfg, _ = load_model(FIXTURES / "mistral")  # sliding_window=10
    spec = llama.cache_spec(cfg, num_blocks=20, block_size=4, max_seq_len=40, max_batch_slots=2)
    assert spec.sliding_window == 10 and spec.sliding_layers == (0, 1) and len(spec.groups) == 1
    short = llama.cache_spec(cfg, num_blocks=20, block_size=4, max_seq_len=10, max_batch_slots=2)
    assert short.sliding_layers == () and short.groups[0].window is None
