"""Stop strings over incremental text (`paged_kv.models.stops`): the text each check sees
equals the whole completion's decoding, for detokenizers whose output depends on context,
and a check decodes a window, not the completion so far."""

from __future__ import annotations

import random

import pytest

from paged_kv.models.stops import StopStrings

WORDS = ["▁the", "▁cat", "s", "▁sat", ".", "▁on", "▁a", "▁mat", "ing", "▁é"]


def sentencepiece_like(tokens) -> str:
    """Word pieces where "▁" is a space, stripped at the start of the text: a window's
    first piece decodes unlike the same piece inside the completion."""
    return "".join(WORDS[t] for t in tokens if t < len(WORDS)).replace("▁", " ").lstrip(" ")


def byte_level(tokens) -> str:
    """One UTF-8 byte per token: a character split over tokens decodes to U+FFFD until
    its last byte arrives."""
    return bytes(t % 256 for t in tokens).decode("utf-8", errors="replace")


def _utf8_stream(rng: random.Random, chars: int) -> list[int]:
    text = "".join(rng.choice("ab c€é😀\n") for _ in range(chars))
    return list(text.encode())


@pytest.mark.parametrize("detokenize,make", [
    (sentencepiece_like, lambda rng: [rng.randrange(len(WORDS)) for _ in range(300)]),
    (byte_level, lambda rng: _utf8_stream(rng, 150)),
])
def test_incremental_text_is_the_whole_decoding(detokenize, make):
    for seed in range(20):
        tokens = make(random.Random(seed))
        calls = []

        def counting(ids):
            calls.append(len(ids))
            return detokenize(ids)

        stops = StopStrings(("\x00never",), counting)
        for n in range(1, len(tokens) + 1):
            assert stops.check(tokens[:n]) is None
            full = detokenize(tokens[:n])
            # Confirmed text is a prefix of the whole decoding, short of at most one incomplete character.
            assert full.startswith(stops.text) and len(full) - len(stops.text) <= 1 + full.endswith("\ufffd")
        assert stops.text == detokenize(tokens)
        # Windows, not the completion: the tokens decoded grow linearly with its length.
        assert sum(calls) < 20 * len(tokens), (seed, sum(calls))


def test_a_stop_string_split_over_tokens_and_characters():
    text = "abc€déf STOP€ tail"
    tokens = list(text.encode())
    stops = StopStrings(("STOP€", "zz"), byte_level)
    for n in range(1, len(tokens) + 1):
        hit = stops.check(tokens[:n])
        if hit is not None:
            break
    assert hit == ("STOP€", "abc€déf ")
    assert byte_level(tokens[:n]).endswith("STOP€")  # found at the token that completed it, not later
