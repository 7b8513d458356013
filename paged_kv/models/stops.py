"""Stop strings: a completion ends where its text first contains one of its request's
``stop`` strings.

The generator works on token ids; text exists only through the ``detokenize``
function it was given (e.g. ``tokenizers.Tokenizer.decode``). A stop string can be
split over several tokens and a token can decode to nothing on its own (a partial
UTF-8 sequence), so the text grows incrementally, as vLLM's detokenizer does: each
check decodes only a short window, from a few tokens before the last confirmed text
(``prefix``) to the end, and keeps what that window adds beyond the same window's
confirmed part; decoding both from the same first token keeps context-dependent
decoding (a sentencepiece leading space, a byte sequence split over tokens) out of
the difference, and a window ending in an incomplete character (U+FFFD) waits for the
next token. A check therefore costs O(window), not O(completion): decoding the whole
completion at every token made a long generation with stop strings quadratic. Each
check looks for a stop string only where a new match can start: no earlier than the
longest stop string's length before the end of the text already searched. The
completion's text is then cut before the stop string (as vLLM and transformers do by
default); its tokens keep the one that completed it, so that they are exactly what
the model produced and what the pages hold.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from paged_kv.models.requests import GenerationError

Detokenize = Callable[[Sequence[int]], str]


def checked_stops(stop: object, rid: int, detokenize: Detokenize | None) -> tuple[str, ...]:
    """A request's ``stop`` as a tuple of non-empty strings (`GenerationError` naming
    what is wrong: not a sequence of strings, an empty string, no ``detokenize``)."""
    if isinstance(stop, str):
        stop = (stop,)
    if isinstance(stop, bytes) or not hasattr(stop, "__iter__"):
        raise GenerationError(f"request {rid}: stop={stop!r} must be a sequence of strings")
    stops = tuple(stop)
    if not all(isinstance(s, str) and s for s in stops):
        raise GenerationError(f"request {rid}: stop={list(stops)[:8]!r} must be non-empty strings")
    if stops and detokenize is None:
        raise GenerationError(f"request {rid}: stop strings need text: build the Generator with "
                              "detokenize= (e.g. tokenizers.Tokenizer.from_file('tokenizer.json').decode)")
    return stops


CONTEXT_TOKENS = 5
"""Tokens before the confirmed text each window starts from (vLLM's detokenizer keeps
as many): enough for a tokenizer's decoding of the first new token to see its left
context."""


class StopStrings:
    """One request's stop strings over its generated tokens (see the module docstring)."""

    __slots__ = ("stops", "detokenize", "longest", "searched", "text", "prefix", "read")
    # A preempted sequence keeps its generated tokens (it recomputes their keys and
    # values), so what was searched stays searched, and the text stays confirmed.

    def __init__(self, stops: tuple[str, ...], detokenize: Detokenize):
        self.stops, self.detokenize = stops, detokenize
        self.longest = max(map(len, stops))
        self.searched = 0  # characters of the text searched by earlier checks
        self.text = ""  # the confirmed text of generated[:read]
        self.prefix = 0  # where the next window starts (tokens)
        self.read = 0  # tokens whose text is confirmed

    def _grow(self, generated: Sequence[int]) -> None:
        """Extend the confirmed text with what ``generated[read:]`` adds."""
        if len(generated) <= self.read:
            return
        start = max(0, min(self.prefix, self.read - CONTEXT_TOKENS))
        window = self.detokenize(list(generated[start:]))
        if window.endswith("\ufffd"):
            return  # an incomplete character: wait for the token that completes it
        confirmed = self.detokenize(list(generated[start:self.read])) if self.read > start else ""
        if window.startswith(confirmed):
            self.text += window[len(confirmed):]
        else:  # the tokenizer decodes this window unlike its prefix: decode the whole completion once
            self.text = self.detokenize(list(generated))
        self.prefix, self.read = self.read, len(generated)

    def check(self, generated: Sequence[int]) -> tuple[str, str] | None:
        """``(stop string, text before it)`` when the text of ``generated`` (every token
        generated so far) contains a stop string, the earliest in the text; else None."""
        self._grow(generated)
        text = self.text
        start = max(0, self.searched - self.longest + 1)
        self.searched = len(text)
        found = [(i, s) for s in self.stops if (i := text.find(s, start)) >= 0]
        if not found:
            return None
        i, s = min(found, key=lambda f: (f[0], -len(f[1])))
        return s, text[:i]


__all__ = ["CONTEXT_TOKENS", "Detokenize", "StopStrings", "checked_stops"]
