"""`Workload`: what the scheduler serves when token ids matter -- for the prefix cache
and for parallel sampling -- on top of a `Trace`'s lengths and arrival times.

A `Trace` only has lengths, which is all a paged allocator needs. The prefix cache
matches *tokens*, so a workload also says where each request's token ids come from:

* Every request reads its positions from token **streams**: positions below
  ``shared_len[i]`` from stream ``stream[i]``, the rest from the request's own
  stream. Streams are counter-based hashes (splitmix64 of a key and the position),
  so an id costs nothing to store and the same (stream, position) is the same id
  in every run. Turns of one chat session read one stream (``shared_len`` covers
  everything), so turn k's prompt starts with exactly the tokens of turn k-1's
  prompt and output; requests sharing a system prompt share a stream for its length.
* A request may **follow** an earlier one (``follows[i] >= 0``): it arrives
  ``think_s[i]`` seconds after that request finished (or at ``arrival_s``, if later).
  That is how a session's next turn waits for the answer to the previous one.
* ``samples[i] > 1`` asks for parallel sampling: the request is prefilled once and
  forked into ``samples[i]`` sequences when its prompt is done; they share the prompt
  and the first output token, then each decodes its own ``generated_tokens - 1``.
  Sample k > 0 reads positions after the first output token from its own stream.
"""

from __future__ import annotations

from typing import Any

import attrs
import numpy as np

from paged_kv.errors import TraceError
from paged_kv.sim.trace import Trace

VOCAB = 32_000
"""Token ids are drawn in ``[0, VOCAB)``; any vocabulary works, only equality matters."""

ALL_POSITIONS = 2**62
"""``shared_len`` of a request whose every position, outputs included, is its stream's."""

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_MASK = (1 << 64) - 1
# Key spaces, so a session stream never equals a request's own stream or a sample's.
OWN, SAMPLE, SESSION, SHARED = 1, 2, 3, 4


def _mix_int(x: int) -> int:
    """splitmix64's finalizer on a Python int (64-bit wraparound)."""
    x = (x + 0x9E3779B97F4A7C15) & _MASK
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK
    return x ^ (x >> 31)


def stream_key(*parts: int) -> int:
    """A 64-bit stream key from integers (a key space, a seed, indices): equal parts,
    equal key; any differing part gives an unrelated stream."""
    h = 0
    for p in parts:
        h = _mix_int(h ^ (int(p) & _MASK))
    return h


def stream_tokens(key: int, start: int, stop: int, vocab: int = VOCAB) -> np.ndarray:
    """Token ids at positions ``[start, stop)`` of stream ``key`` (int64)."""
    x = np.uint64(key) + np.arange(start, stop, dtype=np.uint64) * _GOLDEN
    x ^= x >> np.uint64(30)
    x *= np.uint64(0xBF58476D1CE4E5B9)
    x ^= x >> np.uint64(27)
    x *= np.uint64(0x94D049BB133111EB)
    x ^= x >> np.uint64(31)
    return (x % np.uint64(vocab)).astype(np.int64)


def _int_array(value: Any) -> np.ndarray:
    return np.asarray(value, dtype=np.int64)


def _float_array(value: Any) -> np.ndarray:
    return np.asarray(value, dtype=np.float64)


def _uint64_array(value: Any) -> np.ndarray:
    return np.asarray(value, dtype=np.uint64)


@attrs.frozen(eq=False, kw_only=True)
class Workload:
    """Requests with token ids, dependencies and sample counts; see the module docstring.

    ``trace`` holds the lengths, cancellations and arrival times (for a request that
    follows another, the earliest time it may arrive). The other arrays have one
    entry per request. Build one with `Workload.from_trace` (independent requests,
    every one its own tokens) or `paged_kv.sim.multiturn_workload`.
    """

    trace: Trace
    follows: np.ndarray = attrs.field(converter=_int_array)
    think_s: np.ndarray = attrs.field(converter=_float_array)
    samples: np.ndarray = attrs.field(converter=_int_array)
    stream: np.ndarray = attrs.field(converter=_uint64_array)
    shared_len: np.ndarray = attrs.field(converter=_int_array)
    seed: int = 0
    vocab: int = VOCAB
    source: str = ""
    """Where the lengths come from, with the credit a bundled trace asks for."""

    def __attrs_post_init__(self) -> None:
        n = len(self.trace)
        for name in ("follows", "think_s", "samples", "stream", "shared_len"):
            if getattr(self, name).shape != (n,):
                raise TraceError(f"Workload.{name} has shape {getattr(self, name).shape}; need ({n},), one per request")
        bad = np.flatnonzero((self.follows < -1) | (self.follows >= np.arange(n)))
        if bad.size:
            i = int(bad[0])
            raise TraceError(f"follows[{i}]={int(self.follows[i])} must be -1 or an earlier request's index (< {i})")
        for name, values, ok in (("think_s", self.think_s, np.isfinite(self.think_s) & (self.think_s >= 0)),
                                 ("samples", self.samples, self.samples >= 1),
                                 ("shared_len", self.shared_len, self.shared_len >= 0)):
            if not ok.all():
                i = int(np.flatnonzero(~ok)[0])
                raise TraceError(f"{name}[{i}]={values[i]!r} must be {'>= 1' if name == 'samples' else 'finite and >= 0'}")
        if isinstance(self.vocab, bool) or not isinstance(self.vocab, (int, np.integer)) or self.vocab < 2:
            raise TraceError(f"vocab={self.vocab!r} must be an integer >= 2")

    @classmethod
    def from_trace(cls, trace: Trace, seed: int = 0, samples: int = 1, source: str = "") -> "Workload":
        """Independent requests, each with its own tokens (no prefix shared by design)
        and ``samples`` parallel samples each."""
        n = len(trace)
        return cls(trace=trace, follows=np.full(n, -1), think_s=np.zeros(n), samples=np.full(n, samples),
                   stream=np.zeros(n, np.uint64), shared_len=np.zeros(n), seed=seed, source=source)

    def __len__(self) -> int:
        return len(self.trace)

    @property
    def num_sequences(self) -> int:
        """Sequences the requests become: one per sample."""
        return int(self.samples.sum())

    def token_ids(self, i: int, stop: int, sample: int = 0) -> np.ndarray:
        """The first ``stop`` token ids of request ``i`` (prompt, then output) as sample
        ``sample`` sees them: samples agree up to the first output token."""
        shared = min(int(self.shared_len[i]), stop)
        own = stream_key(OWN, self.seed, i)
        parts = [stream_tokens(int(self.stream[i]), 0, shared, self.vocab), stream_tokens(own, shared, stop, self.vocab)]
        if sample:
            fork_at = int(self.trace.context_tokens[i]) + 1  # prompt and first output token are shared
            if stop > fork_at:
                head = np.concatenate(parts)[:fork_at]
                return np.concatenate([head, stream_tokens(stream_key(SAMPLE, self.seed, i, sample), fork_at, stop,
                                                           self.vocab)])
        return np.concatenate(parts)

    def head(self, n: int) -> "Workload":
        """The first ``n`` requests (a request only follows earlier ones, so this is closed)."""
        t = self.trace.head(n)
        k = len(t)
        return attrs.evolve(self, trace=t, follows=self.follows[:k], think_s=self.think_s[:k],
                            samples=self.samples[:k], stream=self.stream[:k], shared_len=self.shared_len[:k])


__all__ = ["ALL_POSITIONS", "VOCAB", "Workload", "stream_key", "stream_tokens"]
