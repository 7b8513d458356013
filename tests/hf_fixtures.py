"""What the model tests share about the Hugging Face fixtures under tests/fixtures/hf/:
transformers' reference run (`reference`) and the config.json fuzz (`weird_configs`)."""

from __future__ import annotations

import dataclasses
import json
import pathlib
from collections.abc import Iterator

import numpy as np

FIXTURES = pathlib.Path(__file__).parent / "fixtures" / "hf"

JSON_WEIRD = ["NaN", "Infinity", "-Infinity", "1e999", "1" + "0" * 400, "-1", "0", "1.5", str(2**31), str(2**63),
              '"x"', "[]", "{}", "null", "true", '[1, "a"]', '{"rope_type": "llama3"}']
"""JSON literals no config key should hold, as written into a config.json."""


@dataclasses.dataclass
class Reference:
    tokens: list[list[int]]  # prompt + transformers' greedy tokens
    logits: list[np.ndarray]  # [positions, vocab] float32
    info: dict

    @property
    def scale(self) -> float:
        return float(np.std(np.concatenate(self.logits)))


def reference(name: str) -> Reference:
    """Fixture ``name``'s transformers run (scripts/make_hf_fixtures.py, make_family_fixtures.py)."""
    data = np.load(FIXTURES / name / "reference.npz")
    n = len([k for k in data if k.startswith("tokens_")])
    info = json.loads((FIXTURES / name / "reference.json").read_text())
    return Reference([data[f"tokens_{i}"].tolist() for i in range(n)], [data[f"logits_{i}"] for i in range(n)], info)


def config_paths(data: dict, prefix: tuple = (), list_heads: bool = False) -> Iterator[tuple]:
    """Every key path of a config.json, nested objects included (``list_heads``: and the
    first entry of each list of strings, such as ``layer_types``)."""
    for key, value in data.items():
        yield prefix + (key,)
        if isinstance(value, dict):
            yield from config_paths(value, prefix + (key,), list_heads)
        elif list_heads and isinstance(value, list) and value and isinstance(value[0], str):
            yield prefix + (key, 0)


def weird_configs(original: dict, literals: list[str], list_heads: bool = False) -> Iterator[tuple[tuple, str, str]]:
    """``(path, literal, config.json text)`` for every key path of ``original`` holding
    each of ``literals`` in turn (the rest unchanged)."""
    for path in config_paths(original, list_heads=list_heads):
        for literal in literals:
            data = json.loads(json.dumps(original))
            target = data
            for key in path[:-1]:
                target = target[key]
            target[path[-1]] = "@@"
            yield path, literal, json.dumps(data).replace('"@@"', literal)
