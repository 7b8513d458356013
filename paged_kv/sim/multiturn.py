"""Multi-turn chat sessions: the workload a prefix cache is for.

A session is a conversation of several turns. Turn k's prompt is the whole
conversation so far -- every earlier turn's prompt and output -- plus the user's new
message, so with a prefix cache it only computes the new message, provided the
previous turn's blocks survived in the cache while the user was thinking and other
sessions were served. Each turn's new user-input length and output length are one
row of a request trace (by default the bundled Azure LLM conversation trace),
drawn with replacement from a seeded stream. That trace records whole prompts,
which probably include earlier turns, so its ``ContextTokens`` as a turn's *new*
message (median ~1,000 tokens) makes conversations grow fast, about 1,400 tokens a
turn: a demanding case for the cache rather than a typical chat.

Sessions interleave: their first turns arrive together (offline) or at a Poisson
rate (``--arrivals trace``), and a session's next turn arrives a think time after its
previous turn finished (`Workload.follows`), so at any moment many sessions are
between turns and compete for the cache. A conversation never exceeds
``max_total_tokens``: a session ends before the turn that would (its first turn is
clipped to fit instead).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from paged_kv.errors import TraceError
from paged_kv.sim.synthetic import _check_int as check_int, _check_real as check_real
from paged_kv.sim.trace import BUNDLED_ATTRIBUTION, Trace, load_trace
from paged_kv.sim.workload import ALL_POSITIONS, SESSION, Workload, stream_key

_STREAMS = ("rows", "think", "starts")


def multiturn_workload(
    num_sessions: int,
    *,
    turns: int = 6,
    seed: int = 0,
    think_s: float = 10.0,
    sessions_per_s: float = 1.0,
    max_total_tokens: int | None = None,
    trace: Trace | None = None,
    source: str | None = None,
) -> Workload:
    """``num_sessions`` chat sessions of up to ``turns`` turns each, rows session by session.

    Args:
        num_sessions: Sessions (>= 1).
        turns: Turns per session (>= 1), fewer when the conversation would pass
            ``max_total_tokens``.
        seed: Non-negative seed; the same arguments give the same workload, and each
            aspect (length rows, think times, session starts) has its own stream.
        think_s: Mean think time in seconds between a turn's answer and the next
            turn (exponential; 0: the next turn arrives at once).
        sessions_per_s: Rate at which sessions start under ``arrivals="trace"``
            (Poisson; ignored offline, where every session starts at step 0).
        max_total_tokens: Longest conversation (a cache's ``max_seq_len``), >= 2.
        trace: Where the (user-input, output) lengths come from: one row per turn,
            ``ContextTokens`` as the new user tokens, ``GeneratedTokens`` (at least 1)
            as the output. Default: the bundled Azure conversation trace.
        source: The credit line of ``trace`` (default: the bundled trace's, or
            "Trace: user-given").

    Raises:
        TraceError: a parameter out of range, naming it.
    """
    _check_int("num_sessions", num_sessions, 1)
    _check_int("turns", turns, 1)
    _check_int("seed", seed, 0)
    _check_real("think_s", think_s, strict=False)
    _check_real("sessions_per_s", sessions_per_s, strict=True)
    if max_total_tokens is not None:
        _check_int("max_total_tokens", max_total_tokens, 2)
    if trace is None:
        trace, source = load_trace(), source or BUNDLED_ATTRIBUTION
    else:
        source = source or "Trace: user-given"
    if len(trace) == 0:
        raise TraceError("multiturn_workload: the trace has no rows to draw lengths from")
    rng = dict(zip(_STREAMS, (np.random.default_rng(s) for s in np.random.SeedSequence(seed).spawn(len(_STREAMS)))))
    rows = rng["rows"].integers(0, len(trace), size=(num_sessions, turns))
    user = trace.context_tokens[rows]
    output = np.maximum(trace.generated_tokens[rows], 1)
    prompt, output, keep = _conversations(user, output, max_total_tokens)

    sessions, turn = np.nonzero(keep)  # row-major: session by session, turns in order
    n = sessions.size
    starts = np.concatenate(([0.0], np.cumsum(rng["starts"].exponential(1.0 / sessions_per_s, num_sessions - 1))))
    think = rng["think"].exponential(think_s, size=(num_sessions, turns)) if think_s > 0 else np.zeros((num_sessions, turns))
    index = np.arange(n)
    workload_trace = Trace(starts[sessions], prompt[keep], output[keep])
    return Workload(
        trace=workload_trace,
        follows=np.where(turn > 0, index - 1, -1),
        think_s=np.where(turn > 0, think[keep], 0.0),
        samples=np.ones(n, np.int64),
        stream=np.array([stream_key(SESSION, seed, s) for s in range(num_sessions)], np.uint64)[sessions],
        shared_len=np.full(n, ALL_POSITIONS),
        seed=seed,
        source=f"{source} Multi-turn sessions: {num_sessions} sessions x up to {turns} turns, seed {seed}.",
    )


def _conversations(user: np.ndarray, output: np.ndarray, limit: int | None,
                   ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per session and turn: the prompt (conversation so far + new user tokens), the
    output, and whether the turn is kept (the conversation stays within ``limit``)."""
    if limit is not None:
        # The first turn is clipped to fit, so every session has at least one turn.
        user[:, 0] = np.minimum(user[:, 0], limit - 1)
        output[:, 0] = np.minimum(output[:, 0], limit - user[:, 0])
    grown = np.cumsum(user + output, axis=1)  # conversation length after each turn
    prompt = grown - output
    keep = np.ones(user.shape, bool) if limit is None else np.cumsum(grown > limit, axis=1) == 0
    return prompt, output, keep


def _check_int(name: str, value: Any, minimum: int) -> None:
    check_int(name, value, minimum, where="multiturn_workload")


def _check_real(name: str, value: Any, strict: bool) -> None:
    check_real(name, value, 0, strict=strict, where="multiturn_workload")


__all__ = ["multiturn_workload"]
