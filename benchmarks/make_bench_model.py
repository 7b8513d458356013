"""Write the ~32M-parameter Llama that `bench_generate.py` serves, from a seeded config.

A Hugging Face checkpoint directory (``config.json`` + ``model.safetensors``, float32)
that both paged_kv's loader and transformers' ``LlamaForCausalLM`` read: hidden 512,
8 layers, 8 query heads and 4 KV heads of 64, MLP 768, vocabulary 32,000, tied
embeddings. Weights are drawn with numpy from a fixed seed (no torch needed), at scale
1/sqrt(fan_in) with RMSNorm weights around 1 and the tied embedding at 0.1 (as
`scripts/make_hf_fixtures.py` draws its fixtures), so logits spread and greedy choices
are rarely near-ties and a random model does not just repeat its last token.

It is written outside the repository (default ``~/.cache/paged_kv/bench-llama-30m``,
or ``$XDG_CACHE_HOME/paged_kv/...``) and never committed. A directory written by the
same recipe is reused; a different or half-written one is rewritten (the files go
into a temporary folder first, renamed into place when complete).

    python benchmarks/make_bench_model.py [OUT_DIR]
"""

from __future__ import annotations

import hashlib
import json
import os
import pathlib
import shutil
import tempfile

import numpy as np

SEED = 20260
SHAPE = dict(vocab_size=32000, hidden_size=512, intermediate_size=768, num_hidden_layers=8,
             num_attention_heads=8, num_key_value_heads=4, head_dim=64)
CONFIG = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", **SHAPE,
    "hidden_act": "silu", "rms_norm_eps": 1e-5, "max_position_embeddings": 2048,
    "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0},
    "attention_bias": False, "attention_dropout": 0.0, "mlp_bias": False, "tie_word_embeddings": True,
    "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0, "initializer_range": 0.02,
    "use_cache": True, "dtype": "float32",
}
RECIPE = hashlib.sha256(json.dumps({"config": CONFIG, "seed": SEED, "version": 1}, sort_keys=True).encode()
                        ).hexdigest()[:16]
MARKER = "paged_kv_bench_recipe.txt"


def default_dir() -> pathlib.Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return pathlib.Path(base) / "paged_kv" / "bench-llama-30m"


def weights(seed: int = SEED) -> dict[str, np.ndarray]:
    """HF tensor name -> float32 array (linear weights ``[out, in]``, as HF stores them)."""
    rng = np.random.default_rng(seed)
    h, f, v = SHAPE["hidden_size"], SHAPE["intermediate_size"], SHAPE["vocab_size"]
    hd, nq, nkv = SHAPE["head_dim"], SHAPE["num_attention_heads"], SHAPE["num_key_value_heads"]

    def linear(out: int, inp: int) -> np.ndarray:
        return (rng.standard_normal((out, inp), dtype=np.float32) / np.float32(np.sqrt(inp)))

    def norm() -> np.ndarray:
        return (1.0 + 0.2 * rng.standard_normal(h, dtype=np.float32)).astype(np.float32)

    out = {"model.embed_tokens.weight": 0.1 * rng.standard_normal((v, h), dtype=np.float32)}
    for i in range(SHAPE["num_hidden_layers"]):
        p = f"model.layers.{i}."
        out.update({
            p + "input_layernorm.weight": norm(),
            p + "self_attn.q_proj.weight": linear(nq * hd, h),
            p + "self_attn.k_proj.weight": linear(nkv * hd, h),
            p + "self_attn.v_proj.weight": linear(nkv * hd, h),
            p + "self_attn.o_proj.weight": linear(h, nq * hd),
            p + "post_attention_layernorm.weight": norm(),
            p + "mlp.gate_proj.weight": linear(f, h),
            p + "mlp.up_proj.weight": linear(f, h),
            p + "mlp.down_proj.weight": linear(h, f),
        })
    out["model.norm.weight"] = norm()
    return {k: np.ascontiguousarray(a, dtype=np.float32) for k, a in out.items()}


def parameters() -> int:
    """The model's parameter count (tied embeddings: counted once)."""
    h, f, v = SHAPE["hidden_size"], SHAPE["intermediate_size"], SHAPE["vocab_size"]
    hd, nq, nkv = SHAPE["head_dim"], SHAPE["num_attention_heads"], SHAPE["num_key_value_heads"]
    layer = 2 * h * nq * hd + 2 * h * nkv * hd + 3 * h * f + 2 * h
    return v * h + SHAPE["num_hidden_layers"] * layer + h


def is_current(directory: pathlib.Path) -> bool:
    marker = directory / MARKER
    return (marker.is_file() and marker.read_text().strip() == RECIPE and (directory / "config.json").is_file()
            and (directory / "model.safetensors").is_file())


def make(directory: pathlib.Path | str | None = None) -> pathlib.Path:
    """The checkpoint directory, written unless the same recipe is there already."""
    from safetensors.numpy import save_file

    directory = pathlib.Path(directory) if directory is not None else default_dir()
    if is_current(directory):
        return directory
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = pathlib.Path(tempfile.mkdtemp(prefix=directory.name + ".", dir=directory.parent))
    try:
        (tmp / "config.json").write_text(json.dumps(CONFIG, indent=2) + "\n")
        (tmp / "generation_config.json").write_text(json.dumps(
            {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0, "do_sample": False}, indent=2) + "\n")
        save_file(weights(), str(tmp / "model.safetensors"), metadata={"format": "pt"})
        (tmp / MARKER).write_text(RECIPE + "\n")
        if directory.exists():
            shutil.rmtree(directory)
        tmp.rename(directory)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return directory


def main(argv: list[str] | None = None) -> None:
    import argparse

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out_dir", nargs="?", help=f"where to write it (default {default_dir()})")
    args = ap.parse_args(argv)
    print(f"{make(args.out_dir)} ({parameters():,} parameters)")


if __name__ == "__main__":
    main()
