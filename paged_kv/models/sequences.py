"""The requests a `paged_kv.models.generate.Generator` holds while it serves them: `Seq`
(one request in flight), `Prefilled` (a request whose prompt another process
prefilled), and `checked_sequences`, which checks requests before anything runs."""

from __future__ import annotations

import dataclasses
from collections.abc import Collection, Sequence

import numpy as np

from paged_kv.errors import OutOfBlocksError, SequenceTooLongError
from paged_kv.models.requests import Completion, GenerationError, Request, checked_prompt
from paged_kv.models.sampling import GREEDY, SamplingParams, sampling_params
from paged_kv.models.stops import Detokenize, StopStrings, checked_stops
from paged_kv.spec import CacheSpec


@dataclasses.dataclass
class Seq:
    """A request in flight: its tokens so far (prompt, then generated)."""

    request_id: int
    prompt: list[int]
    max_new_tokens: int
    tokens: list[int]
    arrival_step: int = 0
    elsewhere: bool = False
    first_token: int | None = None  # a `Prefilled` request's: its pages are in this generator's cache
    admitted_at: int = -1
    done: int = 0  # tokens whose keys and values are in the pages (this admission)
    completion: Completion | None = None
    sampling: SamplingParams = GREEDY
    stops: StopStrings | None = None

    @property
    def generated(self) -> int:
        return len(self.tokens) - len(self.prompt)


@dataclasses.dataclass(frozen=True)
class Prefilled(Request):
    """A request whose prompt was prefilled by another process: the generator's manager
    already holds ``request_id`` with the prompt's keys and values written in its cache
    (e.g. received by `paged_kv.transfer.TransferReceiver`), and ``first_token`` is the
    token that prefill produced. It joins the decode batch without computing anything
    (if preempted, it recomputes like any other request)."""

    first_token: int = 0


def checked_sequences(requests: Sequence[Request], taken: Collection[int], vocab_size: int, spec: CacheSpec,
                      detokenize: Detokenize | None) -> list[Seq]:
    """``requests`` as `Seq`s, every field checked (`GenerationError`,
    `SequenceTooLongError`, `OutOfBlocksError`); ``taken``: request ids in use."""
    seqs, seen = [], set(taken)
    for i, r in enumerate(requests):
        rid = i if r.request_id is None else r.request_id
        if isinstance(rid, bool) or not isinstance(rid, (int, np.integer)) or rid < 0:
            raise GenerationError(f"request_id={rid!r} must be an int >= 0 (it is the cache's sequence id)")
        if rid in seen:
            raise GenerationError(f"request_id={rid} appears twice")
        first = getattr(r, "first_token", None) if isinstance(r, Prefilled) else None
        prompt = checked_prompt(r, rid, vocab_size, first)  # and max_new_tokens, arrival_step
        _check_fits(spec, rid, len(prompt) + r.max_new_tokens)
        sampling = sampling_params(r, rid, vocab_size)
        stops = checked_stops(r.stop, rid, detokenize)
        seen.add(rid)
        seqs.append(Seq(rid, prompt, r.max_new_tokens, list(prompt), r.arrival_step, bool(r.prefill_elsewhere),
                        None if first is None else int(first), sampling=sampling,
                        stops=StopStrings(stops, detokenize) if stops and detokenize else None))
    return seqs


def _check_fits(spec: CacheSpec, rid: int, total: int) -> None:
    """A request longer than a sequence or the pool could never finish: refuse it up front."""
    if total > spec.max_seq_len:
        raise SequenceTooLongError(f"request {rid}: prompt + max_new_tokens = {total} tokens > max_seq_len="
                                   f"{spec.max_seq_len}; build the spec with a larger max_seq_len")
    blocks = spec.blocks_for(total)
    for g in spec.groups:
        if blocks > g.num_blocks - 1:
            raise OutOfBlocksError(blocks, g.num_blocks - 1, f"request {rid} alone ({total} tokens)")


__all__ = ["Prefilled", "Seq", "checked_sequences"]
