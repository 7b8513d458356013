"""What a `paged_kv.models.generate.Generator` is asked and what it returns: `Request`,
`Completion`, `GenerationStats`, and `GenerationError` for a request it cannot serve.
Plain data (no JAX); `paged_kv.models.generate` re-exports every name."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import numpy as np

from paged_kv.errors import PagedKVError
from paged_kv.words import plural


class GenerationError(PagedKVError, ValueError):
    """A request the generator cannot serve: an empty prompt, a token id outside the
    vocabulary, a non-positive ``max_new_tokens``, a duplicate request id."""


@dataclasses.dataclass(frozen=True)
class Request:
    """A prompt (token ids) to extend by up to ``max_new_tokens`` greedy tokens.

    ``arrival_step``: the loop iteration before which the request is not admitted
    (requests joining a running batch); requests are served first come, first served.
    ``prefill_elsewhere``: prefill the prompt outside the paged cache (a contiguous
    forward, as a separate prefill worker would) and insert its keys and values into
    fresh blocks (`paged_kv.insertion.insert_prefill_slot`); it takes no prefix-cache hit.

    Sampling (`paged_kv.models.sampling`): ``temperature`` 0 (the default) is greedy;
    ``top_k`` (0: off), ``top_p`` (1: off), ``min_p`` (0: off); ``repetition_penalty``
    (1: off; prompt and generated tokens) and ``presence_penalty`` (0: off; generated
    tokens); ``seed`` (None: a random one): the same seed gives the same tokens in any
    batch. ``stop_token_ids`` end the completion (``finish_reason`` "stop", the token
    kept); ``stop`` strings end it where its text first contains one (the text is cut
    before it; needs the generator's ``detokenize``, see `paged_kv.models.stops`).
    ``logprobs``: None, or n >= 0: record the chosen token's logprob and the n most
    likely tokens' (`Completion.logprobs`, `Completion.top_logprobs`).
    """

    prompt: Sequence[int]
    max_new_tokens: int
    request_id: int | None = None  # default: the request's index
    arrival_step: int = 0
    prefill_elsewhere: bool = False
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    seed: int | None = None
    stop_token_ids: Sequence[int] = ()
    stop: Sequence[str] = ()
    logprobs: int | None = None


def checked_prompt(r: Request, rid: int, vocab_size: int, first_token: object = None) -> list[int]:
    """``r``'s prompt as a list of ints after checking it, ``max_new_tokens``,
    ``arrival_step`` and a `Prefilled` request's ``first_token`` (`GenerationError`)."""
    prompt = list(r.prompt)
    ints = all(isinstance(t, (int, np.integer)) and not isinstance(t, bool) for t in prompt)
    if not prompt or not ints or min(prompt) < 0 or max(prompt) >= vocab_size:
        raise GenerationError(f"request {rid}: prompt must be 1+ integer token ids in [0, "
                              f"{vocab_size}); got {prompt[:8]}{'...' if len(prompt) > 8 else ''}")
    for name in ("max_new_tokens", "arrival_step"):
        value, low = getattr(r, name), 1 if name == "max_new_tokens" else 0
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise GenerationError(f"request {rid}: {name}={value!r} must be an int >= {low}")
    if first_token is not None and (isinstance(first_token, bool) or not isinstance(first_token, (int, np.integer))
                                    or not 0 <= first_token < vocab_size):
        raise GenerationError(f"request {rid}: first_token={first_token!r} must be a token id in [0, {vocab_size})")
    return [int(t) for t in prompt]


@dataclasses.dataclass
class Completion:
    """What one request produced. ``logits[p]``: float32 logits at position ``p`` as
    first computed (recorded only with ``record_logits``); ``recomputed``: ``(p,
    logits)`` for positions computed again after a preemption. ``logprobs`` (requests
    asking for them): each generated token's log-probability under the model
    (``log_softmax`` of its logits; NaN for a `Prefilled` request's first token), and
    ``top_logprobs`` the ``(token, logprob)`` of the request's ``logprobs`` most likely.
    ``text``: the tokens' text when the generator has a ``detokenize`` (cut before a
    stop string); ``stop_reason``: the stop token id or string that ended it;
    ``first_token_seconds``: from the `Generator.generate` call to its first token."""

    request_id: int
    prompt: list[int]
    tokens: list[int]
    finish_reason: str  # "length", "eos" or "stop" (one of the request's stop_token_ids or stop strings)
    preemptions: int = 0
    cached_tokens: int = 0  # prompt tokens served by the prefix cache, summed over admissions
    logits: dict[int, np.ndarray] = dataclasses.field(default_factory=dict)
    recomputed: list[tuple[int, np.ndarray]] = dataclasses.field(default_factory=list)
    logprobs: list[float] | None = None
    top_logprobs: list[list[tuple[int, float]]] | None = None
    text: str | None = None
    stop_reason: int | str | None = None
    first_token_seconds: float | None = None


@dataclasses.dataclass
class GenerationStats:
    """Counters and figures of one `Generator.generate` call."""

    requests: int = 0
    generated_tokens: int = 0
    prefill_tokens: int = 0  # tokens the prefill computed (recomputations included)
    cached_tokens: int = 0  # prompt tokens the prefix cache served instead
    prefill_steps: int = 0  # paged prefill steps and contiguous prefills inserted
    inserted_prefills: int = 0  # prompts prefilled elsewhere and inserted into blocks
    decode_steps: int = 0
    preemptions: int = 0
    seconds: float = 0.0
    first_token_seconds: float = 0.0  # from the call to the first generated token (compilation included)
    decode_seconds: float = 0.0  # decode steps that neither compiled nor read back their program
    decode_tokens: int = 0  # tokens those steps produced
    compilations: int = 0
    loaded_programs: int = 0  # compiled steps read back from the Generator's program_cache instead
    kv_usage_sum: float = 0.0
    kv_usage_samples: int = 0  # paged steps sampled (an inserted prefill runs no paged step)
    kv_usage_peak: float = 0.0
    joined_mid_run: int = 0  # requests admitted while others were decoding

    @property
    def tokens_per_s(self) -> float:
        """Generated tokens per wall-clock second, compilation included."""
        return self.generated_tokens / self.seconds if self.seconds else 0.0

    @property
    def decode_tokens_per_s(self) -> float:
        """Tokens per second of the decode steps that did not compile (the steady state)."""
        return self.decode_tokens / self.decode_seconds if self.decode_seconds else 0.0

    @property
    def kv_usage_mean(self) -> float:
        """Mean over steps of the fraction of the pool's usable blocks in use."""
        return self.kv_usage_sum / self.kv_usage_samples if self.kv_usage_samples else 0.0

    def summary(self) -> str:
        return (f"{plural(self.requests, 'request')}, {plural(self.generated_tokens, 'token')} generated in "
                f"{self.seconds:.2f} s: first token after {self.first_token_seconds:.2f} s, "
                f"{self.decode_tokens_per_s:.1f} tokens/s in decode steps after compilation "
                f"({self.tokens_per_s:.1f} tokens/s over the whole call); KV cache usage mean "
                f"{self.kv_usage_mean:.1%}, peak {self.kv_usage_peak:.1%}; "
                f"{plural(self.prefill_steps, 'prefill step')} / {plural(self.decode_steps, 'decode step')}, "
                f"{plural(self.compilations, 'compilation')}"
                + (f" ({plural(self.loaded_programs, 'compiled step')} read back)" if self.loaded_programs else "")
                + "; prefill computed "
                f"{plural(self.prefill_tokens, 'token')} ({plural(self.inserted_prefills, 'prompt')} prefilled "
                f"elsewhere and inserted), prefix cache served {plural(self.cached_tokens, 'token')}; "
                f"{plural(self.preemptions, 'preemption')}; {plural(self.joined_mid_run, 'request')} joined mid-run")

    def as_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out.update(tokens_per_s=self.tokens_per_s, decode_tokens_per_s=self.decode_tokens_per_s,
                   kv_usage_mean=self.kv_usage_mean)
        return out


__all__ = ["Completion", "GenerationError", "GenerationStats", "Request"]
