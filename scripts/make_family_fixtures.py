"""Create the tiny Qwen2, Qwen3 (also with YaRN), Gemma 2, Gemma 3 and stray-window Llama checkpoints under
tests/fixtures/hf/.

As `scripts/make_hf_fixtures.py` makes the Llama and Mistral ones (whose helpers this
script uses): built and run by `transformers` itself (eager attention, its own KV
cache), weights drawn so logits spread, rounded to bfloat16 for storage, the reference
run in float32 on the rounded weights. Each directory gets ``config.json``,
``model.safetensors``, ``reference.npz`` (per prompt the prompt + 20 greedy tokens and
float32 logits at every position: one prefill, 19 decode steps through transformers'
cache) and ``reference.json`` (prompts, versions, transformers' cached-vs-recomputed
difference, the logits' standard deviation, the smallest top-2 margin of a greedy step).

The configs exercise what differs between the families, at sizes that keep each
directory under ~450 KB:

- ``qwen2``: q/k/v biases, tied embeddings, ``use_sliding_window`` with
  ``max_window_layers=1`` (layer 0 full, layers 1-2 sliding, window 12);
- ``qwen3``: q/k RMSNorm, ``head_dim`` 24 (not hidden / heads), no window;
- ``gemma2``: sliding / full alternation (window 10), attention and final logit soft
  caps small enough to bind (2 and 4; Gemma 2's own 50 and 30 would not at this size),
  ``query_pre_attn_scalar`` 24 (not head_dim), ``(1 + w)`` norms, GeGLU, scaled
  embeddings, norms after attention and MLP;
- ``gemma3_text``: 5 sliding : 1 full (window 10), local RoPE base 1e4 beside a global
  1e6 with linear scaling x8, q/k norms (also checked: a ``Gemma3ForConditionalGeneration``
  holding the same text weights gives the same text logits, ``multimodal_max_abs``);
- ``qwen3_yarn``: Qwen3 with YaRN RoPE (factor 4 over an original context of 16, base
  1e4, so the ramp between extrapolated and interpolated dimensions has a midpoint, and
  positions run well past 16; cos and sin scaled by 0.1 ln 4 + 1);
- ``llama_window``: a Llama whose config.json carries a stray ``sliding_window`` of 8
  (transformers' Llama attention ignores it) and ``attention_bias`` (q/k/v/o biases). The
  reference runs without the key (see `make`: transformers' own cache would trim to it).

Run (needs torch and transformers): ``python scripts/make_family_fixtures.py [OUT_DIR]``.
"""

from __future__ import annotations

import json
import math
import pathlib
import sys

import numpy as np
import torch
import transformers

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from make_hf_fixtures import GENERATE, greedy_with_cache, prompts, recompute  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parents[1]
COMMON = dict(vocab_size=256, max_position_embeddings=256, bos_token_id=1, eos_token_id=2, pad_token_id=0)

MODELS = {
    "qwen2": dict(
        cls=transformers.Qwen2ForCausalLM,
        config=transformers.Qwen2Config(**COMMON, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
                                        num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-6,
                                        tie_word_embeddings=True, use_sliding_window=True, sliding_window=12,
                                        max_window_layers=1,
                                        rope_parameters=dict(rope_type="default", rope_theta=1_000_000.0)),
        prompts=prompts(3, (13, 15, 7, 21, 9, 11), shared=12),
        seed=13,
    ),
    "qwen3": dict(
        cls=transformers.Qwen3ForCausalLM,
        config=transformers.Qwen3Config(**COMMON, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, head_dim=24, rms_norm_eps=1e-6,
                                        tie_word_embeddings=False,
                                        rope_parameters=dict(rope_type="default", rope_theta=1_000_000.0)),
        prompts=prompts(4, (13, 15, 7, 21, 9, 11), shared=9),
        seed=21,
    ),
    "gemma2": dict(
        cls=transformers.Gemma2ForCausalLM,
        config=transformers.Gemma2Config(**COMMON, hidden_size=64, intermediate_size=64, num_hidden_layers=4,
                                         num_attention_heads=4, num_key_value_heads=2, head_dim=16, rms_norm_eps=1e-6,
                                         sliding_window=10, query_pre_attn_scalar=24, attn_logit_softcapping=2.0,
                                         final_logit_softcapping=4.0,
                                         rope_parameters=dict(rope_type="default", rope_theta=10000.0)),
        prompts=prompts(5, (13, 15, 7, 21, 9, 11), shared=13),
        seed=15,
    ),
    "gemma3_text": dict(
        cls=transformers.Gemma3ForCausalLM,
        config=transformers.Gemma3TextConfig(**COMMON, hidden_size=32, intermediate_size=64, num_hidden_layers=6,
                                             num_attention_heads=2, num_key_value_heads=1, head_dim=16,
                                             rms_norm_eps=1e-6, sliding_window=10, query_pre_attn_scalar=16,
                                             rope_scaling=dict(rope_type="linear", factor=8.0)),
        prompts=prompts(6, (13, 15, 7, 21, 9, 11), shared=13),
        seed=16,
    ),
    "qwen3_yarn": dict(
        cls=transformers.Qwen3ForCausalLM,
        config=transformers.Qwen3Config(**COMMON, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, head_dim=24, rms_norm_eps=1e-6,
                                        tie_word_embeddings=False,
                                        rope_parameters=dict(rope_type="yarn", rope_theta=10000.0, factor=4.0,
                                                             original_max_position_embeddings=16)),
        prompts=prompts(8, (13, 15, 7, 21, 9, 11), shared=9),
        seed=27,
    ),
    "llama_window": dict(
        cls=transformers.LlamaForCausalLM,
        config=transformers.LlamaConfig(**COMMON, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-5,
                                        attention_bias=True, mlp_bias=False, tie_word_embeddings=False,
                                        rope_parameters=dict(rope_type="default", rope_theta=10000.0)),
        stray=dict(sliding_window=8),  # written into config.json after the reference runs
        prompts=prompts(7, (13, 15, 7, 21, 9, 11), shared=9),
        seed=17,
    ),
}


def init_weights(model: torch.nn.Module, seed: int) -> None:
    """Weights that make a tiny random model's logits spread, rounded to bfloat16.

    Norm weights scale by ~1: ``1 + 0.2 n`` for Llama-style norms, ``0.2 n`` for Gemma's
    ``(1 + w)`` ones; biases ``0.5 n``; embeddings at unit scale, or small when tied (they
    also unembed, and a token's own embedding would dominate); linear weights
    ``n / sqrt(fan_in)``."""
    gen = torch.Generator().manual_seed(seed)
    gemma = model.config.model_type.startswith("gemma")
    with torch.no_grad():
        for name, p in model.named_parameters():
            n = torch.randn(p.shape, generator=gen)
            if name.endswith("norm.weight") or "layernorm" in name:
                p.copy_(0.2 * n if gemma else 1.0 + 0.2 * n)
            elif name.endswith(".bias"):
                p.copy_(0.5 * n)
            elif "embed_tokens" in name:
                tied = model.config.tie_word_embeddings
                p.copy_((0.25 if gemma else 0.1) * n if tied else n)
            else:
                p.copy_(n / math.sqrt(p.shape[1]))
            p.copy_(p.to(torch.bfloat16).float())


@torch.no_grad()
def multimodal_difference(model, spec: dict) -> float:
    """A Gemma3ForConditionalGeneration whose text model holds ``model``'s weights: its
    text-only logits against ``model``'s (the loader reads such checkpoints' text part)."""
    text = model.config.to_dict()
    vision = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, image_size=28,
                  patch_size=14)
    mm = transformers.Gemma3ForConditionalGeneration(
        transformers.Gemma3Config(text_config=text, vision_config=vision, mm_tokens_per_image=4)).eval()
    mm.config._attn_implementation = "eager"
    mm.config.text_config._attn_implementation = "eager"
    missing = mm.model.language_model.load_state_dict(model.model.state_dict(), strict=True)
    assert not missing.missing_keys, missing
    tokens = torch.tensor([spec["prompts"][3]])
    return float((mm(input_ids=tokens).logits - model(tokens).logits).abs().max())


def make(name: str, out_dir: pathlib.Path) -> dict:
    spec = MODELS[name]
    torch.manual_seed(0)
    model = spec["cls"](spec["config"]).eval()
    model.config._attn_implementation = "eager"
    init_weights(model, spec["seed"])
    target = out_dir / name
    target.mkdir(parents=True, exist_ok=True)
    arrays, worst, margin = {}, 0.0, math.inf
    for i, prompt in enumerate(spec["prompts"]):
        tokens, logits = greedy_with_cache(model, prompt)
        worst = max(worst, float(np.abs(logits - recompute(model, tokens)).max()))
        steps = np.sort(logits[len(prompt) - 1:], axis=-1)
        margin = min(margin, float((steps[:, -1] - steps[:, -2]).min()))
        arrays[f"tokens_{i}"] = np.asarray(tokens, np.int32)
        arrays[f"logits_{i}"] = logits.astype(np.float32)
    extra = {}
    if name == "gemma3_text":
        extra["multimodal_max_abs"] = multimodal_difference(model, spec)
    np.savez_compressed(target / "reference.npz", **arrays)
    # Only after the reference: .to() also casts the rotary inv_freq buffers (and Gemma's
    # embedding scale), which would put bfloat16-rounded values into a float32 reference.
    for key, value in spec.get("stray", {}).items():
        # Not on the model while the reference runs: transformers' Llama attention ignores a
        # stray sliding_window, but DynamicCache(config=...) would trim its cache to it, so
        # its own cached decode would disagree with its recompute (by ~2x the logit std).
        # The reference is the model transformers defines: no window.
        setattr(model.config, key, value)
    model.to(torch.bfloat16).save_pretrained(target, safe_serialization=True)
    for f in target.iterdir():
        if f.name not in ("config.json", "model.safetensors", "reference.npz"):
            f.unlink()
    scale = float(np.std(np.concatenate([arrays[k] for k in arrays if k.startswith("logits")])))
    info = dict(
        model=name, generated_tokens=GENERATE, prompts=spec["prompts"],
        torch=torch.__version__, transformers=transformers.__version__, weights_dtype="bfloat16",
        reference="float32 logits at every position: one prefill, then greedy decode steps through the HF cache",
        cached_vs_recompute_max_abs=worst, logit_scale=scale, min_greedy_top2_margin=margin, **extra,
    )
    (target / "reference.json").write_text(json.dumps(info, indent=1) + "\n")
    return info


def main() -> None:
    out_dir = pathlib.Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT / "tests" / "fixtures" / "hf"
    names = sys.argv[2:] or list(MODELS)
    if len(sys.argv) > 2 and "=" in sys.argv[-1]:  # NAME seed=N: try another weight seed
        names, seed = sys.argv[2:-1], int(sys.argv[-1].split("=")[1])
        for name in names:
            MODELS[name]["seed"] = seed
    for name in names:
        info = make(name, out_dir)
        size = sum(f.stat().st_size for f in (out_dir / name).iterdir())
        print(f"{name}: {size / 1024:.0f} KiB, HF cached vs recompute max |diff| "
              f"{info['cached_vs_recompute_max_abs']:.2e}, logit std {info['logit_scale']:.2f}, smallest greedy "
              f"top-2 margin {info['min_greedy_top2_margin']:.3f}" + "".join(
                  f", {k} {v:.2e}" for k, v in info.items() if k == "multimodal_max_abs"))


if __name__ == "__main__":
    main()
