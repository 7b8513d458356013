"""Create the tiny Hugging Face checkpoints and reference logits under tests/fixtures/hf/.

The only place torch and transformers are used: the checkpoints are built and run by
`transformers` itself (eager attention, its own KV cache), so the test that compares
paged_kv against them checks paged_kv against an implementation written elsewhere.

For each model (a Llama-3-style one with llama3 RoPE scaling and tied embeddings, a
Mistral-style one with a sliding window of 10 tokens, not a multiple of the test's
block size) it writes:

- ``config.json`` and ``model.safetensors`` (bfloat16 weights), via ``save_pretrained``;
- ``tokenizer.json`` (llama only): a byte-level tokenizer over the 256-token vocabulary,
  so the CLI's text prompts can be tried on it;
- ``reference.npz``: per prompt the token ids (prompt + greedy continuation) and
  transformers' float32 logits at every position, from one prefill and ``GENERATE - 1``
  greedy decode steps through transformers' KV cache;
- ``reference.json``: the prompts, the versions of torch/transformers used, and the
  largest difference between the cached decode and a no-cache recomputation (how
  consistent transformers is with itself).

Weights are drawn at scale 1/sqrt(fan_in) (not transformers' 0.02 init), RMSNorm
weights around 1, so logits spread and greedy choices are not near-ties. They are
rounded to bfloat16 for storage and the reference runs in float32 on the rounded
weights, so a float32 load of the checkpoint reproduces it exactly.

Run (needs torch and transformers): ``python scripts/make_hf_fixtures.py [OUT_DIR]``.
"""

from __future__ import annotations

import json
import math
import pathlib
import sys

import numpy as np
import torch
import transformers
from transformers import LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM

ROOT = pathlib.Path(__file__).resolve().parents[1]
GENERATE = 20  # greedy tokens per prompt: 1 from the prefill, 19 decode steps
SHAPE = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, head_dim=16, rms_norm_eps=1e-5, max_position_embeddings=256,
             bos_token_id=1, eos_token_id=2, attention_bias=False)


def prompts(seed: int, lengths: tuple[int, ...], shared: int) -> list[list[int]]:
    """Random prompts; the second repeats the first's first ``shared`` tokens (a prefix-cache hit)."""
    rng = np.random.default_rng(seed)
    out = [rng.integers(3, 256, n).tolist() for n in lengths]
    out[1][:shared] = out[0][:shared]
    return out


MODELS = {
    "llama": dict(
        cls=LlamaForCausalLM,
        config=LlamaConfig(**SHAPE, tie_word_embeddings=True, mlp_bias=False,
                           rope_parameters=dict(rope_type="llama3", rope_theta=50000.0, factor=8.0,
                                                low_freq_factor=1.0, high_freq_factor=4.0,
                                                original_max_position_embeddings=64)),
        prompts=prompts(1, (13, 15, 7, 21, 9, 11), shared=9),
        seed=11,
    ),
    "mistral": dict(
        cls=MistralForCausalLM,
        config=MistralConfig(**{k: v for k, v in SHAPE.items() if k != "attention_bias"}, tie_word_embeddings=False,
                             sliding_window=10, rope_parameters=dict(rope_type="default", rope_theta=10000.0)),
        prompts=prompts(2, (13, 15, 7, 23, 11, 12), shared=9),
        seed=12,
    ),
}


def init_weights(model: torch.nn.Module, seed: int) -> None:
    """Weights that make a tiny random model's logits spread, rounded to bfloat16."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight") or "layernorm" in name:
                p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=gen))
            elif "embed_tokens" in name:
                # Tied embeddings also unembed: at unit scale each token's own embedding
                # would dominate the residual stream and greedy decoding would only
                # repeat the last token.
                scale = 0.1 if model.config.tie_word_embeddings else 1.0
                p.copy_(scale * torch.randn(p.shape, generator=gen))
            else:
                p.copy_(torch.randn(p.shape, generator=gen) / math.sqrt(p.shape[1]))
            p.copy_(p.to(torch.bfloat16).float())


@torch.no_grad()
def greedy_with_cache(model, prompt: list[int]) -> tuple[list[int], np.ndarray]:
    """Prefill, then GENERATE - 1 greedy decode steps through transformers' own cache."""
    out = model(torch.tensor([prompt]), use_cache=True)
    logits = [out.logits[0].float()]
    past = out.past_key_values
    tokens = list(prompt) + [int(out.logits[0, -1].argmax())]
    for _ in range(GENERATE - 1):
        out = model(torch.tensor([[tokens[-1]]]), past_key_values=past, use_cache=True)
        past = out.past_key_values
        logits.append(out.logits[0].float())
        tokens.append(int(out.logits[0, -1].argmax()))
    return tokens, torch.cat(logits).numpy()


@torch.no_grad()
def recompute(model, tokens: list[int]) -> np.ndarray:
    return model(torch.tensor([tokens[:-1]]), use_cache=False).logits[0].float().numpy()


def byte_tokenizer(path: pathlib.Path) -> None:
    """A byte-level BPE with no merges: one token per byte, ids 0..255."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    byte_chars = sorted(alphabet, key=lambda c: _byte_of(c))
    tok = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(byte_chars)}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.save(str(path))


def _byte_of(char: str) -> int:
    """The byte GPT-2's byte-to-unicode table maps to ``char``."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    if ord(char) in printable:
        return ord(char)
    others = [b for b in range(256) if b not in printable]
    return others[ord(char) - 256]


def make(name: str, out_dir: pathlib.Path) -> dict:
    spec = MODELS[name]
    torch.manual_seed(0)
    model = spec["cls"](spec["config"]).eval()
    model.config._attn_implementation = "eager"
    init_weights(model, spec["seed"])
    target = out_dir / name
    target.mkdir(parents=True, exist_ok=True)
    arrays, worst = {}, 0.0
    for i, prompt in enumerate(spec["prompts"]):
        tokens, logits = greedy_with_cache(model, prompt)
        worst = max(worst, float(np.abs(logits - recompute(model, tokens)).max()))
        arrays[f"tokens_{i}"] = np.asarray(tokens, np.int32)
        arrays[f"logits_{i}"] = logits.astype(np.float32)
    np.savez_compressed(target / "reference.npz", **arrays)
    # Only after the reference: .to() also casts the rotary inv_freq buffer, which
    # would put bfloat16-rounded frequencies into a float32 reference.
    model.to(torch.bfloat16).save_pretrained(target, safe_serialization=True)
    for extra in target.iterdir():
        if extra.name not in ("config.json", "model.safetensors", "reference.npz"):
            extra.unlink()
    if name == "llama":
        byte_tokenizer(target / "tokenizer.json")
    info = dict(
        model=name, generated_tokens=GENERATE, prompts=spec["prompts"],
        torch=torch.__version__, transformers=transformers.__version__, weights_dtype="bfloat16",
        reference="float32 logits at every position: one prefill, then greedy decode steps through the HF cache",
        cached_vs_recompute_max_abs=worst,
        logit_scale=float(np.std(np.concatenate([arrays[k] for k in arrays if k.startswith("logits")]))),
    )
    (target / "reference.json").write_text(json.dumps(info, indent=1) + "\n")
    return info


def main() -> None:
    out_dir = pathlib.Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT / "tests" / "fixtures" / "hf"
    for name in MODELS:
        info = make(name, out_dir)
        size = sum(f.stat().st_size for f in (out_dir / name).iterdir())
        print(f"{name}: {size / 1024:.0f} KiB, HF cached vs recompute max |diff| "
              f"{info['cached_vs_recompute_max_abs']:.2e}, logit std {info['logit_scale']:.2f}")


if __name__ == "__main__":
    main()
