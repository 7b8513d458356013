"""Stop strings: a completion ends where its text first contains one of its request's
``stop`` strings.

The generator works on token ids; text exists only through the ``detokenize``
function it was given (e.g. ``tokenizers.Tokenizer.decode``). A stop string can be
split over several tokens and a token can decode to nothing on its own (a partial
UTF-8 sequence), so each new token's check decodes the completion so far and looks
for a stop string only where a new match can start: no earlier than the longest stop
string's length before the end of the text already searched. The completion's text
is then cut before the stop string (as vLLM and transformers do by default); its
tokens keep the one that completed it, so that they are exactly what the model
produced and what the pages hold.
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


class StopStrings:
    """One request's stop strings over its generated tokens (see the module docstring)."""

    __slots__ = ("stops", "detokenize", "longest", "searched")
    # A preempted sequence keeps its generated tokens (it recomputes their keys and
    # values), so what was searched stays searched.

    def __init__(self, stops: tuple[str, ...], detokenize: Detokenize):
        self.stops, self.detokenize = stops, detokenize
        self.longest = max(map(len, stops))
        self.searched = 0  # characters of the text searched by earlier checks

    def check(self, generated: Sequence[int]) -> tuple[str, str] | None:
        """``(stop string, text before it)`` when the text of ``generated`` (every token
        generated so far) contains a stop string, the earliest in the text; else None."""
        text = self.detokenize(list(generated))
        start = max(0, self.searched - self.longest + 1)
        self.searched = len(text)
        found = [(i, s) for s in self.stops if (i := text.find(s, start)) >= 0]
        if not found:
            return None
        i, s = min(found, key=lambda f: (f[0], -len(f[1])))
        return s, text[:i]


__all__ = ["Detokenize", "StopStrings", "checked_stops"]
