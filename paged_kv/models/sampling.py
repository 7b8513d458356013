"""Per-request sampling for `paged_kv.models.generate.Generator`.

`sampling_params` checks a `Request`'s sampling fields (`GenerationError` naming the
field); `Sampler.pick` chooses the next token of a batch of sequences in one jitted
program (`sample_logits`): per-row parameters are arrays, so a batch compiles once per
(rows bucket, vocabulary, top-n) shape. Rows that are all plain greedy (temperature 0,
no penalties, no logprobs) take ``argmax`` on the host, exactly as before sampling existed.

Order of the logits processors (as transformers' warpers): repetition penalty (prompt
and generated tokens: a positive logit divided by it, a negative one multiplied),
presence penalty (subtracted from tokens generated so far), then temperature, top-k,
top-p (the smallest set of most likely tokens whose probability reaches ``top_p``),
min-p (tokens whose probability is below ``min_p`` times the most likely's are dropped).
Temperature 0 is greedy: argmax of the penalised logits. A sampled token is the argmax
of the filtered logits plus Gumbel noise from the key ``fold_in(fold_in(key(seed_lo),
seed_hi), position)``, ``position`` the token's index in its sequence: the same seed
gives the same tokens whatever else is in the batch, and a preempted sequence that
recomputes draws the same tokens. Logprobs are those of the model's distribution
(``log_softmax`` of the raw logits), for the chosen token and the ``logprobs`` most likely.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, Protocol

import jax
import jax.numpy as jnp
import numpy as np

from paged_kv.models.requests import GenerationError

if TYPE_CHECKING:
    from paged_kv.models.requests import Completion, Request

Pick = tuple[int, float | None, list[tuple[int, float]] | None]
"""A picked token, with its logprob and top tokens when the request asked for logprobs."""

_MASK = 1  # seen-mask bits: the token is in the prompt / has been generated
_OUT = 2


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    seed: int = 0
    stop_token_ids: frozenset[int] = frozenset()
    logprobs: int | None = None

    @property
    def plain_greedy(self) -> bool:
        return (self.temperature == 0 and self.repetition_penalty == 1 and self.presence_penalty == 0
                and self.logprobs is None)

    @property
    def penalised(self) -> bool:
        return self.repetition_penalty != 1 or self.presence_penalty != 0


GREEDY = SamplingParams()


class Sampled(Protocol):
    """What `Sampler.pick` reads of a sequence (`paged_kv.models.sequences.Seq`)."""

    @property
    def tokens(self) -> list[int]: ...  # prompt, then generated

    @property
    def prompt(self) -> list[int]: ...

    @property
    def sampling(self) -> SamplingParams: ...


def _number(rid: int, name: str, value: object, ok: Callable[[Any], bool], want: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)) \
            or not math.isfinite(value) or not ok(value):
        raise GenerationError(f"request {rid}: {name}={value!r} must be {want}")
    return float(value)


def _int(rid: int, name: str, value: object, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or not low <= value <= high:
        raise GenerationError(f"request {rid}: {name}={value!r} must be an int in [{low}, {high}]")
    return int(value)


def sampling_params(request: Request, rid: int, vocab_size: int) -> SamplingParams:
    """The checked sampling fields of ``request`` (`GenerationError` naming a bad one).
    A sampled request without a seed gets a random one (fixed for the request)."""
    r = request
    temperature = _number(rid, "temperature", r.temperature, lambda v: v >= 0, "a finite number >= 0 (0: greedy)")
    top_k = _int(rid, "top_k", r.top_k, 0, vocab_size)
    top_p = _number(rid, "top_p", r.top_p, lambda v: 0 < v <= 1, "a number in (0, 1]")
    min_p = _number(rid, "min_p", r.min_p, lambda v: 0 <= v <= 1, "a number in [0, 1]")
    rep = _number(rid, "repetition_penalty", r.repetition_penalty, lambda v: v > 0, "a finite number > 0 (1: off)")
    pres = _number(rid, "presence_penalty", r.presence_penalty, lambda v: True, "a finite number (0: off)")
    seed = r.seed
    if seed is None:
        seed = int(np.random.SeedSequence().generate_state(1, np.uint64)[0]) if temperature else 0
    seed = _int(rid, "seed", seed, 0, 2 ** 64 - 1)
    stops = r.stop_token_ids
    if isinstance(stops, (str, bytes)) or not hasattr(stops, "__iter__"):
        raise GenerationError(f"request {rid}: stop_token_ids={stops!r} must be a sequence of token ids")
    stops = list(stops)
    if not all(isinstance(t, (int, np.integer)) and not isinstance(t, bool) and 0 <= t < vocab_size for t in stops):
        raise GenerationError(f"request {rid}: stop_token_ids={stops[:8]!r} must be token ids in [0, {vocab_size})")
    logprobs = None if r.logprobs is None else _int(rid, "logprobs", r.logprobs, 0, vocab_size)
    return SamplingParams(temperature, top_k, top_p, min_p, rep, pres, seed, frozenset(int(t) for t in stops),
                          logprobs)


def filter_logits(logits: jax.Array, temperature: jax.Array, top_k: jax.Array, top_p: jax.Array, min_p: jax.Array,
                  repetition_penalty: jax.Array, presence_penalty: jax.Array, seen: jax.Array) -> jax.Array:
    """Penalties, temperature, top-k, top-p and min-p over ``logits`` [B, V] (float32):
    the logits to sample from, dropped tokens at -inf (greedy rows: the penalised logits
    unscaled, nothing dropped). Per-row parameters are [B] arrays; ``seen`` is [B, V] or
    [B, 1] (no penalties) uint8 with bit 1 for prompt tokens and bit 2 for generated ones."""
    x = logits.astype(jnp.float32)
    rep = repetition_penalty[:, None]
    x = jnp.where(seen > 0, jnp.where(x > 0, x / rep, x * rep), x)
    x = x - jnp.where((seen & _OUT) > 0, presence_penalty[:, None], 0.0)
    greedy = (temperature == 0)[:, None]
    x = x / jnp.where(greedy, 1.0, temperature[:, None])
    vocab = x.shape[-1]
    ordered = -jnp.sort(-x, axis=-1)  # descending
    kth = jnp.take_along_axis(ordered, jnp.clip(top_k - 1, 0, vocab - 1)[:, None], axis=-1)
    keep = (top_k[:, None] == 0) | (x >= kth)
    ordered = jnp.where(jnp.arange(vocab)[None] < jnp.where(top_k == 0, vocab, top_k)[:, None], ordered, -jnp.inf)
    probs = jax.nn.softmax(ordered, axis=-1)
    before = jnp.cumsum(probs, axis=-1) - probs  # mass of the more likely tokens
    last = jnp.sum(before < top_p[:, None], axis=-1) - 1  # index of the least likely token kept
    keep &= x >= jnp.take_along_axis(ordered, jnp.maximum(last, 0)[:, None], axis=-1)
    keep &= jnp.exp(x - ordered[:, :1]) >= min_p[:, None]
    return jnp.where(greedy | keep, x, -jnp.inf)


@functools.partial(jax.jit, static_argnames="top_n")
def sample_logits(logits: jax.Array, temperature: jax.Array, top_k: jax.Array, top_p: jax.Array, min_p: jax.Array,
                  repetition_penalty: jax.Array, presence_penalty: jax.Array, seen: jax.Array,
                  seed: jax.Array, position: jax.Array, *, top_n: int = 0,
                  ) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """The next token of every row of ``logits`` [B, V], with its logprob and the
    ``top_n`` most likely tokens and their logprobs (all under the raw logits).
    ``seed``: [B, 2] uint32 (low, high words); ``position``: [B] int32."""
    x = filter_logits(logits, temperature, top_k, top_p, min_p, repetition_penalty, presence_penalty, seen)

    def noise(seed: jax.Array, position: jax.Array) -> jax.Array:
        key = jax.random.fold_in(jax.random.fold_in(jax.random.key(seed[0]), seed[1]), position)
        return jax.random.gumbel(key, (x.shape[-1],), jnp.float32)

    gumbel = jax.vmap(noise)(seed, position)
    tokens = jnp.argmax(jnp.where((temperature == 0)[:, None], x, x + gumbel), axis=-1).astype(jnp.int32)
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    chosen = jnp.take_along_axis(logp, tokens[:, None], axis=-1)[:, 0]
    top_lp, top_ids = jax.lax.top_k(logp, top_n) if top_n else (logp[:, :0], tokens[:, None][:, :0])
    return tokens, chosen, top_ids, top_lp


def record_logprobs(completion: Completion, params: SamplingParams, logprob: float | None,
                    top: list[tuple[int, float]] | None) -> None:
    """Append a generated token's logprobs to ``completion`` if its request asked for them
    (NaN and no top tokens for a token that came without: a `Prefilled` request's first)."""
    if params.logprobs is not None:
        completion.logprobs = (completion.logprobs or []) + [math.nan if logprob is None else logprob]
        completion.top_logprobs = (completion.top_logprobs or []) + [top or []]


class Sampler:
    """Picks the next tokens of a batch of sequences (objects with ``tokens``, ``prompt``
    and ``sampling``); see the module's docstring."""

    def pick(self, seqs: Sequence[Sampled], logits: np.ndarray | Sequence[np.ndarray]) -> list[Pick]:
        """``(token, logprob, top)`` for each sequence, from its row of ``logits`` ([n, V]
        or n rows); ``logprob``/``top`` are None unless the request asked for logprobs."""
        params = [s.sampling for s in seqs]
        if all(p.plain_greedy for p in params):
            return [(int(np.argmax(row)), None, None) for row in logits]
        logits = np.stack(logits)  # type: ignore[arg-type]  # an array or rows: numpy's stubs take only a sequence
        n, vocab = len(seqs), logits.shape[-1]
        rows = 1 << (n - 1).bit_length()  # a power-of-two bucket: few shapes compile
        pad = np.zeros((rows, vocab), np.float32)
        pad[:n] = logits

        def col(name: str, dtype: type[np.generic], fill: float) -> np.ndarray:
            return np.array([getattr(p, name) for p in params] + [fill] * (rows - n), dtype)

        seen = np.zeros((rows, vocab if any(p.penalised for p in params) else 1), np.uint8)
        if seen.shape[1] > 1:
            for b, s in enumerate(seqs):
                if s.sampling.penalised:
                    seen[b, s.prompt] |= _MASK
                    seen[b, s.tokens[len(s.prompt):]] |= _OUT
        seeds = np.zeros((rows, 2), np.uint32)
        seeds[:n, 0] = [p.seed & 0xFFFFFFFF for p in params]
        seeds[:n, 1] = [p.seed >> 32 for p in params]
        position = np.zeros(rows, np.int32)
        position[:n] = [len(s.tokens) for s in seqs]
        top_n = max(p.logprobs or 0 for p in params)
        top_n = 0 if not top_n else min(1 << (top_n - 1).bit_length(), vocab)
        out = sample_logits(pad, col("temperature", np.float32, 0.0), col("top_k", np.int32, 0),
                            col("top_p", np.float32, 1.0), col("min_p", np.float32, 0.0),
                            col("repetition_penalty", np.float32, 1.0), col("presence_penalty", np.float32, 0.0),
                            seen, seeds, position, top_n=top_n)
        tokens, chosen, top_ids, top_lp = (np.asarray(a) for a in out)
        picks: list[Pick] = []
        for b, p in enumerate(params):
            if p.logprobs is None:
                picks.append((int(tokens[b]), None, None))
            else:
                top = [(int(t), float(v)) for t, v in zip(top_ids[b, :p.logprobs], top_lp[b, :p.logprobs])]
                picks.append((int(tokens[b]), float(chosen[b]), top))
        return picks


__all__ = ["GREEDY", "Sampler", "record_logprobs", "SamplingParams", "filter_logits", "sample_logits", "sampling_params"]
