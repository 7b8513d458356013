"""Sampling (`paged_kv.models.sampling`): the distribution (seeded chi-square against the
softmax), the top-k / top-p / min-p masks and the penalties exactly, logprobs, and through
the `Generator` on the tiny Llama fixture: batch-independence of seeded requests, stop
tokens, temperature 0 equal to greedy, parameter checks."""

from __future__ import annotations

import dataclasses
import pathlib

import numpy as np
import pytest

from paged_kv.models import llama
from paged_kv.models.generate import GenerationError, Generator, Request
from paged_kv.models.loader import load_model
from paged_kv.models.sampling import filter_logits, sample_logits

FIXTURES = pathlib.Path(__file__).parent / "fixtures" / "hf"
FAST_COMPILE = {"xla_backend_optimization_level": 0}


def rows(n, **kw):
    """Per-row parameter arrays for ``n`` rows (defaults: everything off, temperature 1)."""
    spec = dict(temperature=(1.0, np.float32), top_k=(0, np.int32), top_p=(1.0, np.float32),
                min_p=(0.0, np.float32), repetition_penalty=(1.0, np.float32), presence_penalty=(0.0, np.float32))
    return {k: np.full(n, kw.get(k, d), t) for k, (d, t) in spec.items()}


def draw(logits, n, seed=7, seen=None, **kw):
    """``n`` seeded draws from one row of logits (positions 0..n-1 of one seed)."""
    batch = np.repeat(np.asarray(logits, np.float32)[None], n, 0)
    seeds = np.tile(np.array([[seed, 0]], np.uint32), (n, 1))
    seen = np.zeros((n, 1), np.uint8) if seen is None else np.repeat(seen[None], n, 0)
    out = sample_logits(batch, **rows(n, **kw), seen=seen, seed=seeds, position=np.arange(n, dtype=np.int32))
    return np.asarray(out[0])


def softmax(x):
    e = np.exp(x - np.max(x))
    return e / e.sum()


def chi_square(tokens, probs):
    counts = np.bincount(tokens, minlength=len(probs))
    expected = probs * len(tokens)
    assert np.all(counts[expected == 0] == 0), "a token of probability 0 was drawn"
    keep = expected > 0
    return float(np.sum((counts[keep] - expected[keep]) ** 2 / expected[keep])), int(keep.sum()) - 1


LOGITS = np.array([2.0, 1.0, 0.5, 0.0, -0.5, -1.0, 1.5, -2.0], np.float32)
N = 40_000
# chi-square with 7 degrees of freedom: P(X > 24.3) = 1e-3. The seeds are fixed, so the
# statistic is the same on every run; the threshold only says the draws fit the softmax.
CRIT = {7: 24.3, 3: 16.3, 2: 13.8, 1: 10.8}


@pytest.mark.parametrize("temperature", [1.0, 0.6, 2.0])
def test_draws_follow_the_softmax(temperature):
    tokens = draw(LOGITS, N, temperature=temperature)
    stat, dof = chi_square(tokens, softmax(LOGITS / temperature))
    assert stat < CRIT[dof], stat
    # ...and the test has power: the same draws against another temperature's softmax fail.
    wrong, _ = chi_square(tokens, softmax(LOGITS / (temperature * 1.3)))
    assert wrong > 10 * CRIT[dof]


@pytest.mark.parametrize("kw,kept", [
    (dict(top_k=3), [0, 6, 1]),
    (dict(top_p=0.7), [0, 6, 1]),  # probabilities .33 .20 .12 .. : .33 + .20 < .7 <= .33 + .20 + .12
    (dict(min_p=0.3), [0, 6, 1]),  # p / p_max: 1, .61, .37, .22, ...
])
def test_filtered_draws_follow_the_renormalised_softmax(kw, kept):
    tokens = draw(LOGITS, N, seed=11, **kw)
    probs = np.zeros(len(LOGITS))
    probs[kept] = softmax(LOGITS[kept])
    stat, dof = chi_square(tokens, probs)
    assert dof == 2 and stat < CRIT[dof], stat


def filtered(logits, seen=None, **kw):
    x = np.asarray(logits, np.float32)[None]
    seen = np.zeros((1, 1), np.uint8) if seen is None else np.asarray(seen, np.uint8)[None]
    return np.asarray(filter_logits(x, **{k: v for k, v in rows(1, **kw).items()}, seen=seen))[0]


def test_masks_are_exact_on_constructed_logits():
    x = np.log(np.array([0.4, 0.1, 0.25, 0.05, 0.2], np.float32))
    inf = -np.inf
    np.testing.assert_array_equal(filtered(x, top_k=2), [x[0], inf, x[2], inf, inf])
    np.testing.assert_array_equal(filtered(x, top_k=5), x)
    # top-p: .4 < .6 -> keep .25 too (.65 >= .6); 0.65 exactly reached: nothing more
    np.testing.assert_array_equal(filtered(x, top_p=0.6), [x[0], inf, x[2], inf, inf])
    np.testing.assert_array_equal(filtered(x, top_p=0.3), [x[0], inf, inf, inf, inf])
    np.testing.assert_array_equal(filtered(x, top_p=0.9), [x[0], x[1], x[2], inf, x[4]])
    # min-p: p >= 0.45 * 0.4 = 0.18
    np.testing.assert_array_equal(filtered(x, min_p=0.45), [x[0], inf, x[2], inf, x[4]])
    np.testing.assert_array_equal(filtered(x, min_p=0.55), [x[0], inf, x[2], inf, inf])
    # top-k then top-p over the renormalised top-k (.4/.65 = .615 >= .6)
    np.testing.assert_array_equal(filtered(x, top_k=2, top_p=0.6), [x[0], inf, inf, inf, inf])
    # temperature scales the kept logits; greedy rows are neither scaled nor masked
    np.testing.assert_allclose(filtered(x, temperature=0.5, top_k=1), [x[0] / 0.5, inf, inf, inf, inf])
    np.testing.assert_array_equal(filtered(x, temperature=0.0, top_k=1, min_p=0.9), x)


def test_penalties_are_exact():
    x = np.array([2.0, -1.0, 0.5, -0.25, 3.0], np.float32)
    seen = np.array([1, 1, 2, 3, 0], np.uint8)  # 1: in the prompt, 2: generated, 3: both
    np.testing.assert_allclose(filtered(x, seen=seen, repetition_penalty=2.0), [1.0, -2.0, 0.25, -0.5, 3.0])
    np.testing.assert_allclose(filtered(x, seen=seen, presence_penalty=0.75), [2.0, -1.0, -0.25, -1.0, 3.0])
    np.testing.assert_allclose(filtered(x, seen=seen, repetition_penalty=0.5, presence_penalty=1.0,
                                        temperature=0.0), [4.0, -0.5, 0.0, -1.125, 3.0])
    # greedy with a repetition penalty: the penalised argmax
    tokens = draw(x, 1, seen=seen, temperature=0.0, repetition_penalty=4.0)
    assert tokens.tolist() == [4]
    tokens = draw(x, 1, seen=np.array([0, 0, 0, 0, 1], np.uint8), temperature=0.0, repetition_penalty=4.0)
    assert tokens.tolist() == [0]


def test_logprobs_match_log_softmax():
    x = np.random.default_rng(0).normal(size=(4, 16)).astype(np.float32)
    out = sample_logits(x, **rows(4, temperature=0.8), seen=np.zeros((4, 1), np.uint8),
                        seed=np.arange(8, dtype=np.uint32).reshape(4, 2), position=np.zeros(4, np.int32), top_n=3)
    tokens, chosen, top_ids, top_lp = (np.asarray(a) for a in out)
    logp = x - np.log(np.exp(x).sum(-1, keepdims=True))
    np.testing.assert_allclose(chosen, logp[np.arange(4), tokens], atol=1e-5)
    np.testing.assert_array_equal(top_ids, np.argsort(-logp, -1)[:, :3])
    np.testing.assert_allclose(top_lp, np.sort(logp, -1)[:, ::-1][:, :3], atol=1e-5)


# ---- through the Generator -----------------------------------------------------------
@pytest.fixture(scope="module")
def model():
    return load_model(FIXTURES / "llama")


def generator(model, slots=4, **kw) -> Generator:
    cfg, params = model
    spec = llama.cache_spec(cfg, num_blocks=40, block_size=4, max_seq_len=40, max_batch_slots=slots)
    return Generator(cfg, params, spec, compiler_options=FAST_COMPILE, **kw)


PROMPTS = [[5, 17, 42, 9, 100], [3, 3, 8], [200, 1, 77, 31, 12, 6, 2], [64, 65]]
SAMPLED = dict(temperature=1.0, top_k=50, top_p=0.95, min_p=0.02, repetition_penalty=1.1, presence_penalty=0.3)


def test_a_seeded_request_gives_the_same_tokens_alone_or_batched(model):
    gen = generator(model)
    mine = Request(PROMPTS[0], 12, seed=1234, logprobs=2, **SAMPLED)
    (alone,), _ = gen.generate([mine])
    others = [Request(p, 10, seed=i, temperature=1.5) for i, p in enumerate(PROMPTS[1:])]
    batched, _ = gen.generate(others[:2] + [dataclasses.replace(mine, request_id=9)] + others[2:])
    assert batched[2].tokens == alone.tokens and len(alone.tokens) == 12
    np.testing.assert_allclose(batched[2].logprobs, alone.logprobs, atol=1e-4)
    # joining mid-run, in a smaller batch (preempted and recomputed too: 2 slots, a tight pool)
    cfg, params = model
    spec = llama.cache_spec(cfg, num_blocks=7, block_size=4, max_seq_len=24, max_batch_slots=2)
    late = Generator(cfg, params, spec, compiler_options=FAST_COMPILE)
    done, stats = late.generate(others + [dataclasses.replace(mine, request_id=9, arrival_step=3)])
    assert done[-1].tokens == alone.tokens and stats.preemptions, stats.preemptions
    # another seed gives other tokens; an unseeded sampled request runs
    (other,), _ = gen.generate([dataclasses.replace(mine, seed=99)])
    assert other.tokens != alone.tokens
    (free,), _ = gen.generate([Request(PROMPTS[0], 4, temperature=1.0)])
    assert len(free.tokens) == 4


def test_temperature_zero_is_greedy_and_logprobs_match_log_softmax(model):
    gen = generator(model, record_logits=True)
    plain, _ = gen.generate([Request(p, 6) for p in PROMPTS])
    asked, _ = gen.generate([Request(p, 6, temperature=0.0, logprobs=3, seed=5) for p in PROMPTS])
    for a, b in zip(plain, asked):
        assert a.tokens == b.tokens and a.logprobs is None
        for i, (token, lp, top) in enumerate(zip(b.tokens, b.logprobs, b.top_logprobs)):
            row = b.logits[len(b.prompt) + i - 1].astype(np.float64)
            logp = row - np.log(np.exp(row - row.max()).sum()) - row.max()
            assert token == int(np.argmax(row)) and abs(lp - logp[token]) < 1e-4
            assert [t for t, _ in top] == np.argsort(-logp)[:3].tolist()
            np.testing.assert_allclose([v for _, v in top], np.sort(logp)[::-1][:3], atol=1e-4)


def test_stop_tokens_end_a_completion(model):
    gen = generator(model)
    (ref,), _ = gen.generate([Request(PROMPTS[2], 10, seed=3, temperature=0.9)])
    stop = ref.tokens[4]
    (done,), _ = gen.generate([Request(PROMPTS[2], 10, seed=3, temperature=0.9, stop_token_ids=[stop, 255])])
    assert done.tokens == ref.tokens[: ref.tokens.index(stop) + 1] and done.finish_reason == "stop"
    assert gen.manager.num_used_blocks == 0


def angle_text(ids) -> str:
    """A stand-in detokenizer: ``<5><17>``; a stop string can then span tokens."""
    return "".join(f"<{t}>" for t in ids)


def test_stop_strings_end_a_completion_where_its_text_first_holds_one(model):
    gen = generator(model, detokenize=angle_text)
    (ref,), stats = gen.generate([Request(PROMPTS[2], 10, seed=3, temperature=0.9)])
    assert ref.text == angle_text(ref.tokens) and ref.stop_reason is None
    assert 0 < ref.first_token_seconds <= stats.seconds and stats.first_token_seconds == ref.first_token_seconds
    full = ref.text
    for stop in (f"{ref.tokens[3]}><{ref.tokens[4]}", f"<{ref.tokens[6]}>", ">"):  # across tokens, one, the first
        at = full.find(stop)
        # the completion ends with the token that completes the string's first occurrence
        k = next(k for k in range(1, 11) if len(angle_text(ref.tokens[:k])) >= at + len(stop))
        (done,), _ = gen.generate([Request(PROMPTS[2], 10, seed=3, temperature=0.9, stop=["never", stop])])
        assert done.tokens == ref.tokens[:k] and done.finish_reason == "stop", stop
        assert done.stop_reason == stop and done.text == full[:at]
    (tok,), _ = gen.generate([Request(PROMPTS[2], 10, seed=3, temperature=0.9, stop_token_ids=[ref.tokens[2]])])
    assert tok.stop_reason == ref.tokens[2] and tok.text == angle_text(tok.tokens)
    assert gen.manager.num_used_blocks == 0


def test_stop_strings_need_text_and_strings(model):
    plain = generator(model)
    with pytest.raises(GenerationError, match="request 0: stop strings need text.*detokenize="):
        plain.generate([Request([1, 2], 2, stop=["x"])])
    gen = generator(model, detokenize=angle_text)
    for bad in ([""], [1], b"x", 3):
        with pytest.raises(GenerationError, match="request 1: stop="):
            gen.generate([Request([1, 2], 2), Request([1, 2], 2, stop=bad)])
    (one,), _ = gen.generate([Request([1, 2], 3, stop="<")])  # one string alone is a list of one
    assert one.finish_reason == "stop" and one.tokens and one.text == ""
    assert len(gen.manager) == 0 and len(plain.manager) == 0


@pytest.mark.parametrize("field,value", [
    ("temperature", -0.1), ("temperature", float("nan")), ("temperature", "1"), ("top_k", -1), ("top_k", 257),
    ("top_k", 2.0), ("top_p", 0.0), ("top_p", 1.5), ("min_p", -0.1), ("min_p", 1.1), ("repetition_penalty", 0.0),
    ("presence_penalty", float("inf")), ("seed", -1), ("seed", 2 ** 64), ("seed", True),
    ("stop_token_ids", [256]), ("stop_token_ids", "ab"), ("stop_token_ids", 3), ("logprobs", -1),
    ("logprobs", 1.0),
])
def test_bad_sampling_parameters_are_named(model, field, value):
    gen = generator(model)
    with pytest.raises(GenerationError, match=f"request 1: {field}="):
        gen.generate([Request([1, 2], 2), Request([1, 2], 2, **{field: value})])
    assert len(gen.manager) == 0


def test_one_program_per_shape_whatever_the_parameters():
    x = np.random.default_rng(1).normal(size=(4, 16)).astype(np.float32)
    seen = np.zeros((4, 1), np.uint8)
    seeds, pos = np.zeros((4, 2), np.uint32), np.zeros(4, np.int32)
    sample_logits(x, **rows(4), seen=seen, seed=seeds, position=pos)
    before = sample_logits._cache_size()
    for kw in (dict(temperature=0.0), dict(top_k=3, top_p=0.5), dict(min_p=0.2, repetition_penalty=1.3)):
        sample_logits(x, **rows(4, **kw), seen=seen, seed=seeds + 1, position=pos + 2)
    assert sample_logits._cache_size() == before
