"""A Hugging Face ``config.json`` read into a `ModelConfig`, family by family, as transformers reads it.

Which family a directory is comes from ``model_type`` (`paged_kv.models.families`); each
family's defaults and its rule for the sliding window are transformers' (see that
module): a Llama ``config.json`` with a stray ``sliding_window`` is served without a
window, as transformers' Llama serves it. Anything the decoder does not compute (another
architecture, a RoPE type, an activation, bidirectional attention, quantized weights) is
a `ModelLoadError` naming the key, never a model that silently computes something else.

The file is untrusted input (issue 23): numbers must be finite and in range (JSON's NaN
and Infinity, or 1e999, are refused) and the model must fit in this machine's memory
before any per-layer structure is built.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import pathlib
from typing import Any, NoReturn

import numpy as np

from paged_kv.errors import CheckpointError, SpecError
from paged_kv.models.decoder import ACTIVATIONS, ROPE_TYPES, ModelConfig, RopeScaling
from paged_kv.models.families import FAMILIES, MODEL_TYPES, Family, parameter_count, tensors_per_layer
from paged_kv.spec.fields import check_host_bytes

MAX_JSON_BYTES = 64 * 2**20
"""A config or index larger than this is not one (an index of a 400B model is ~100 KiB)."""
MAX_INT = 2**31
"""Config integers are sizes and token ids, all int32 on the device."""
_FLOAT32_MAX = float(np.finfo(np.float32).max)  # the model computes in float32
HOST_BYTES_PER_TENSOR = 4 * 2**10
"""Host bytes a loaded tensor costs beyond its data (array objects, names, dict entries)."""
LAYER_TYPES = ("full_attention", "sliding_attention")

JSON = dict[str, Any]
"""A JSON object as read: values are checked where they are used (`field`)."""
Where = pathlib.Path | str


class ModelLoadError(CheckpointError):
    """A model checkpoint directory that cannot be loaded: a missing or malformed
    ``config.json`` key, an unsupported architecture or option, a missing, unexpected or
    misshapen weight. The message names the file and the key."""


# ---- JSON files ------------------------------------------------------------------------------
def is_file(path: pathlib.Path) -> bool:
    """``path.is_file()``, False where the name itself is unusable (too long, a NUL byte),
    for which pathlib raises instead of answering."""
    try:
        return path.is_file()
    except (OSError, ValueError):
        return False


def read_json(path: pathlib.Path) -> JSON:
    if not is_file(path):  # also refuses a named pipe, which would block the read
        raise ModelLoadError(f"{path}: not found (a Hugging Face checkpoint directory has config.json)")
    try:
        size = path.stat().st_size
    except OSError as exc:
        raise ModelLoadError(f"{path}: cannot be read ({exc})") from None
    if size > MAX_JSON_BYTES:
        raise ModelLoadError(f"{path}: {size:,} bytes, more than the {MAX_JSON_BYTES:,} a config or index holds")

    def not_a_number(word: str) -> NoReturn:  # json accepts NaN and Infinity, which no config field may be
        raise ModelLoadError(f"{path}: holds {word}, which is not a JSON number; give a finite value")

    try:
        data = json.loads(path.read_text(), parse_constant=not_a_number)
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as exc:  # ValueError: JSON, digit limit
        raise ModelLoadError(f"{path}: not readable JSON ({type(exc).__name__}: {exc})") from None
    if not isinstance(data, dict):
        raise ModelLoadError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def field(data: JSON, key: str, kind: type, path: Where, default: Any = None, required: bool = False,
          minimum: int = 1) -> Any:
    """``data[key]`` checked to be a ``kind`` (ints accepted for floats), or ``default``
    when absent or null. Numbers must be positive (integers at least ``minimum``)."""
    if key not in data or data[key] is None:
        if required:
            raise ModelLoadError(f"{path}: missing key {key!r} (a config.json of this model_type has it)")
        return default
    value = data[key]
    ok = isinstance(value, kind) and not isinstance(value, bool) if kind is not bool else isinstance(value, bool)
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        ok = True
        try:
            value = float(value)
        except OverflowError:  # an integer literal past any float: 1 followed by 400 zeros
            raise ModelLoadError(f"{path}: key {key!r} is an integer of {len(str(value))} digits; expected a "
                                 "finite number") from None
    if not ok:
        raise ModelLoadError(f"{path}: key {key!r} is {value!r}; expected a {kind.__name__}")
    if (kind is float and value <= 0) or (kind is int and value < minimum):
        low = "a positive number" if kind is float or minimum == 1 else f"an integer >= {minimum}"
        raise ModelLoadError(f"{path}: key {key!r} is {value!r}; expected {low}")
    # 1e999 parses as inf; a float past float32 is inf where the model computes.
    if kind is float and not (math.isfinite(value) and value <= _FLOAT32_MAX):
        raise ModelLoadError(f"{path}: key {key!r} is {value!r}; expected a finite number float32 holds")
    if kind is int and value >= MAX_INT:
        raise ModelLoadError(f"{path}: key {key!r} is {value!r}; expected a positive integer below 2**31")
    return value


def _nullable(data: JSON, key: str, kind: type, path: Where, absent: Any) -> Any:
    """transformers' distinction: an absent key takes the family's default (``absent``),
    an explicit null turns the feature off (None)."""
    if key not in data:
        return absent
    return field(data, key, kind, path)


# ---- RoPE ------------------------------------------------------------------------------------
def _rope_entry(params: object, where: str, theta: float, data: JSON | None = None) -> tuple[float, RopeScaling | None]:
    """Theta and scaling of one RoPE parameter object (``rope_type`` or legacy ``type``).
    ``data``: the whole config, whose ``original_max_position_embeddings`` (Phi-3 style)
    or else ``max_position_embeddings`` is the pretraining length when the object has none,
    as transformers reads it."""
    if not isinstance(params, dict):
        raise ModelLoadError(f"{where}: is {params!r}; expected an object")
    theta = field(params, "rope_theta", float, where, theta)
    rope_type = params.get("rope_type", params.get("type", "default"))
    if not isinstance(rope_type, str) or rope_type not in ROPE_TYPES:
        raise ModelLoadError(f"{where}: rope_type={rope_type!r} is not supported (supported: {ROPE_TYPES})")
    if rope_type == "default":
        return theta, None
    top = data or {}
    original = field(top, "original_max_position_embeddings", int, where) or field(
        params, "original_max_position_embeddings", int, where) or field(top, "max_position_embeddings", int, where)
    if rope_type == "yarn":
        return theta, _yarn(params, where, top, original)
    factor = field(params, "factor", float, where, required=True)
    if rope_type == "linear":
        return theta, RopeScaling("linear", factor)
    low = field(params, "low_freq_factor", float, where, required=True)
    high = field(params, "high_freq_factor", float, where, required=True)
    if not high > low:  # Llama 3 interpolates between the two: divides by their difference
        raise ModelLoadError(f"{where}: high_freq_factor={high!r} must exceed low_freq_factor={low!r}")
    if original is None:
        raise ModelLoadError(f"{where}: missing key 'original_max_position_embeddings' (a llama3 rope has it)")
    return theta, RopeScaling("llama3", factor, low_freq_factor=low, high_freq_factor=high,
                              original_max_position_embeddings=original)


def _yarn(params: JSON, where: str, top: JSON, original: int | None) -> RopeScaling:
    """YaRN's parameters by transformers' rules: ``factor`` defaults to the context's
    growth (max over original positions), ``attention_factor`` to ``0.1 ln(factor) + 1``
    (or the ratio of the two ``mscale`` terms when both are given), ``beta_fast`` /
    ``beta_slow`` to 32 / 1 (also when 0), ``truncate`` to true."""
    if original is None:
        raise ModelLoadError(f"{where}: missing key 'original_max_position_embeddings' (yarn needs the pretraining "
                             "length)")
    factor = field(params, "factor", float, where)
    if factor is None:
        factor = field(top, "max_position_embeddings", int, where, required=True) / original

    def mscale(scale: float, m: float = 1.0) -> float:
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    attention = field(params, "attention_factor", float, where)
    if attention is None:
        m, m_all = field(params, "mscale", float, where), field(params, "mscale_all_dim", float, where)
        attention = mscale(factor, m) / mscale(factor, m_all) if m and m_all else mscale(factor)
    truncate = params.get("truncate", True)
    if not isinstance(truncate, bool):
        raise ModelLoadError(f"{where}: key 'truncate' is {truncate!r}; expected true or false")
    return RopeScaling("yarn", factor, original_max_position_embeddings=original,
                       beta_fast=field(params, "beta_fast", float, where) or 32.0,
                       beta_slow=field(params, "beta_slow", float, where) or 1.0, truncate=truncate,
                       attention_factor=float(attention))


def _rope(data: JSON, path: Where, family: Family) -> tuple[float, RopeScaling | None]:
    """Theta and scaling from ``rope_parameters`` (transformers >= 5) or ``rope_theta`` + ``rope_scaling``."""
    params = data.get("rope_parameters") or data.get("rope_scaling") or {}
    where = "rope_parameters" if data.get("rope_parameters") else "rope_scaling"
    if not isinstance(params, dict):
        raise ModelLoadError(f"{path}: key {where!r} is {params!r}; expected an object")
    theta = field(data, "rope_theta", float, path, family.rope_theta)
    return _rope_entry(params, f"{path} [{where}]", theta, data)


def _local_global_rope(data: JSON, path: Where) -> tuple[tuple[float, RopeScaling | None], tuple[float, RopeScaling | None]]:
    """Gemma 3's (global, local) RoPE: ``rope_parameters`` keyed by layer type
    (transformers >= 5), or ``rope_theta`` (default 1e6) and ``rope_scaling`` for the full
    layers and ``rope_local_base_freq`` (default 1e4) for the sliding ones."""
    per_type = data.get("rope_parameters")
    if per_type is None:
        per_type = {}
    if not isinstance(per_type, dict) or not set(per_type) <= set(LAYER_TYPES):
        raise ModelLoadError(f"{path}: key 'rope_parameters' is {per_type!r}; a gemma3 config keys it by layer type "
                             f"({LAYER_TYPES})")
    full = per_type.get("full_attention") or {"rope_type": "default"}
    legacy = data.get("rope_scaling")
    if legacy is not None:  # transformers applies it to the full layers only
        if not isinstance(legacy, dict) or not isinstance(full, dict):
            raise ModelLoadError(f"{path}: key 'rope_scaling' is {legacy!r}; expected an object")
        full = {**full, **legacy}
    local = per_type.get("sliding_attention") or {"rope_type": "default"}
    return (_rope_entry(full, f"{path} [rope_parameters.full_attention]",
                        field(data, "rope_theta", float, path, 1_000_000.0), data),
            _rope_entry(local, f"{path} [rope_parameters.sliding_attention]",
                        field(data, "rope_local_base_freq", float, path, 10_000.0), data))


# ---- which layers slide ------------------------------------------------------------------------
def _sliding(data: JSON, path: Where, family: Family) -> tuple[int | None, tuple[int, ...] | None]:
    """``(window, sliding layer indices or None for every layer)`` by the family's rule;
    the indices are built by the caller's `_pattern` once the model is known to fit."""
    if family.window == "none":
        return None, ()
    window = _nullable(data, "sliding_window", int, path, family.sliding_window)
    if family.window == "every_layer":
        return window, None
    if family.window == "use_sliding_window" and not field(data, "use_sliding_window", bool, path, False):
        window = None  # transformers' Qwen2/Qwen3 configs drop the window unless it is switched on
    return window, ()


def _layer_types(data: JSON, path: Where, num_layers: int) -> tuple[int, ...] | None:
    """Sliding layers named by ``layer_types`` (None when absent)."""
    types = data.get("layer_types")
    if types is None:
        return None
    if not isinstance(types, list) or len(types) != num_layers:
        raise ModelLoadError(f"{path}: key 'layer_types' must list one type per layer ({num_layers}); got "
                             f"{types!r:.200}")
    bad = [t for t in types if not isinstance(t, str) or t not in LAYER_TYPES]
    if bad:
        raise ModelLoadError(f"{path}: layer_types holds {bad[0]!r}, which is not supported (supported: {LAYER_TYPES})")
    return tuple(i for i, t in enumerate(types) if t == "sliding_attention")


def _pattern(data: JSON, path: Where, family: Family, num_layers: int, window: int | None) -> tuple[int, ...]:
    """Sliding layers when ``layer_types`` is absent, as transformers' config computes them."""
    if family.pattern == "max_window_layers":
        first = field(data, "max_window_layers", int, path, 28, minimum=0)
        return tuple(range(first, num_layers)) if window is not None else ()
    if family.pattern == "alternate":
        return tuple(range(0, num_layers, 2))
    every = field(data, "sliding_window_pattern", int, path, 6)
    return tuple(i for i in range(num_layers) if (i + 1) % every)


# ---- the config ------------------------------------------------------------------------------
def _token_ids(data: JSON, key: str, path: Where) -> tuple[int, ...]:
    """An id or a list of ids (Llama 3 lists several end-of-turn ids) as a tuple."""
    value = data.get(key)
    values = value if isinstance(value, list) else [] if value is None else [value]
    if not all(isinstance(v, int) and not isinstance(v, bool) and 0 <= v < MAX_INT for v in values):
        raise ModelLoadError(f"{path}: key {key!r} is {value!r}; expected a token id in [0, 2**31) or a list of them")
    return tuple(values)


def _eos_ids(directory: pathlib.Path, sources: list[tuple[JSON, str]]) -> tuple[int, ...]:
    """End-of-sequence ids: generation_config.json's when it has them (chat models
    list their end-of-turn ids there), else config.json's."""
    gen_path = directory / "generation_config.json"
    if is_file(gen_path):
        ids = _token_ids(read_json(gen_path), "eos_token_id", gen_path)
        if ids:
            return ids
    for data, where in sources:
        ids = _token_ids(data, "eos_token_id", where)
        if ids:
            return ids
    return ()


def _flag(data: JSON, spec: str | bool, path: Where) -> bool:
    return spec if isinstance(spec, bool) else field(data, spec, bool, path, False)


def _family(data: JSON, path: Where) -> tuple[Family, JSON, str, list[tuple[JSON, str]]]:
    """The family, the config object its fields are read from (a Gemma 3 checkpoint's
    ``text_config``), how messages name it, and where token ids may be."""
    model_type = data.get("model_type")
    if not isinstance(model_type, str) or model_type not in MODEL_TYPES:
        raise ModelLoadError(f"{path}: model_type={model_type!r} is not supported (supported: {MODEL_TYPES})")
    if data.get("quantization_config") is not None:
        method = data["quantization_config"].get("quant_method") if isinstance(data["quantization_config"], dict) \
            else data["quantization_config"]
        raise ModelLoadError(f"{path}: quantization_config (quant_method={method!r}) is not supported: weights are "
                             "loaded as floats; use an unquantized checkpoint")
    if model_type != "gemma3":
        return FAMILIES[model_type], data, str(path), [(data, str(path))]
    text = data.get("text_config")
    where = f"{path} [text_config]"
    if not isinstance(text, dict):
        raise ModelLoadError(f"{path}: model_type='gemma3' needs a 'text_config' object (the language model's "
                             f"config); got {text!r:.100}")
    inner = text.get("model_type") or "gemma3_text"
    if inner != "gemma3_text":
        raise ModelLoadError(f"{where}: model_type={inner!r} is not supported (a gemma3 text_config is 'gemma3_text')")
    return FAMILIES["gemma3_text"], text, where, [(data, str(path)), (text, where)]


def _check_options(data: JSON, path: Where, family: Family) -> str:
    """Refuse what the decoder does not compute; returns the activation."""
    act = data.get(family.activation_key)
    act = family.activation if act is None else act
    if not isinstance(act, str) or act not in ACTIVATIONS:
        raise ModelLoadError(f"{path}: {family.activation_key}={act!r} is not supported (supported: {ACTIVATIONS})")
    if family.mlp_bias_key and field(data, "mlp_bias", bool, path, False):
        raise ModelLoadError(f"{path}: mlp_bias=true is not supported (the MLP projections have no bias here)")
    if family.bidirectional_key and field(data, "use_bidirectional_attention", bool, path, False):
        raise ModelLoadError(f"{path}: use_bidirectional_attention=true is not supported (an encoder's attention; "
                             "this decoder is causal)")
    if not family.attn_softcap_applies and data.get("attn_logit_softcapping") is not None:
        raise ModelLoadError(f"{path}: attn_logit_softcapping={data['attn_logit_softcapping']!r} is not supported for "
                             f"model_type {family.model_type!r}: transformers' {family.model_type} ignores it, "
                             "so what it should compute is ambiguous")
    return act


def load_config(checkpoint_dir: str | os.PathLike[str]) -> ModelConfig:
    """`ModelConfig` from ``checkpoint_dir/config.json``; `ModelLoadError` naming the key on a bad one."""
    directory = pathlib.Path(checkpoint_dir)
    path = directory / "config.json"
    top = read_json(path)
    family, data, where, id_sources = _family(top, path)
    act = _check_options(data, where, family)
    sizes = dict(family.sizes)

    def size(key: str) -> int:
        value: int = field(data, key, int, where, sizes.get(key), required=key not in sizes)
        return value

    hidden, heads, layers = size("hidden_size"), size("num_attention_heads"), size("num_hidden_layers")
    if family.local_rope:
        (theta, scaling), (local_theta, local_scaling) = _local_global_rope(data, where)
    else:
        (theta, scaling), local_theta, local_scaling = _rope(data, where, family), None, None
    window, sliding = _sliding(data, where, family)
    kv_heads = _nullable(data, "num_key_value_heads", int, where, family.num_kv_heads)
    # Gemma 3's multimodal config ties at its top level (its text_config also says).
    tie_source, tie_where = (top, str(path)) if "tie_word_embeddings" in top else (data, where)
    bos = [ids[0] for d, w in id_sources for ids in [_token_ids(d, "bos_token_id", w)] if ids]
    gemma = family.gemma
    try:
        cfg = ModelConfig(
            vocab_size=size("vocab_size"),
            hidden_size=hidden,
            intermediate_size=size("intermediate_size"),
            num_layers=layers,
            num_heads=heads,
            num_kv_heads=heads if kv_heads is None else kv_heads,
            head_dim=field(data, "head_dim", int, where, family.head_dim or hidden // heads),
            rms_norm_eps=field(data, "rms_norm_eps", float, where, 1e-6),
            rope_theta=theta,
            rope_scaling=scaling,
            sliding_window=window,
            sliding_layers=None if sliding is None else (),
            local_rope_theta=local_theta,
            local_rope_scaling=local_scaling,
            tie_word_embeddings=field(tie_source, "tie_word_embeddings", bool, tie_where, family.tie_word_embeddings),
            bos_token_id=bos[0] if bos else None,
            eos_token_ids=_eos_ids(directory, id_sources),
            model_type=top["model_type"],
            hidden_act=act,
            qkv_bias=_flag(data, family.qkv_bias, where),
            o_bias=_flag(data, family.o_bias, where),
            qk_norm=family.qk_norm,
            norm_unit_offset=gemma,
            embed_scale=gemma,
            post_norms=gemma,
            query_pre_attn_scalar=field(data, "query_pre_attn_scalar", float, where, family.query_pre_attn_scalar)
            if gemma else None,
            attn_logit_softcap=_nullable(data, "attn_logit_softcapping", float, where, family.attn_logit_softcap)
            if gemma and family.attn_softcap_applies else None,
            final_logit_softcap=_nullable(data, "final_logit_softcapping", float, where, family.final_logit_softcap)
            if gemma else None,
        )
        if sliding is None or family.window == "none":
            return cfg
        # Per-layer structures only once the layers' own host structures fit (a config may
        # claim 2**31 layers); the weights are checked when they are loaded (`check_fits`).
        check_host_bytes(tensors_per_layer(cfg) * layers * HOST_BYTES_PER_TENSOR,
                         f"{path}: a model of {layers:,} layers (its per-layer structures)", ModelLoadError,
                         hint="check num_hidden_layers")
        named = _layer_types(data, where, layers)
        sliding = named if named is not None else _pattern(data, where, family, layers, window)
        if sliding and window is None:  # transformers raises building the sliding mask
            raise ModelLoadError(f"{where}: layer_types makes layers {list(sliding)[:8]} sliding but there is no "
                                 "window (sliding_window is null, or use_sliding_window is false)")
        return dataclasses.replace(cfg, sliding_window=window if sliding else None, sliding_layers=sliding)
    except SpecError as exc:
        raise ModelLoadError(f"{where}: {exc}") from None


def check_fits(directory: pathlib.Path, cfg: ModelConfig, itemsize: int) -> None:
    """`ModelLoadError` when the model ``cfg`` describes could not be held in host memory:
    the tensors as read (counted at 4 bytes, float32) and as loaded (``itemsize``)."""
    elements = parameter_count(cfg)
    tensors = tensors_per_layer(cfg) * cfg.num_layers + 3
    check_host_bytes(elements * (4 + itemsize) + tensors * HOST_BYTES_PER_TENSOR,
                     f"{directory / 'config.json'}: a model of {cfg.num_layers:,} layers and {elements:,} parameters",
                     ModelLoadError, hint="check num_hidden_layers, hidden_size, intermediate_size and vocab_size")


__all__ = ["MAX_INT", "MAX_JSON_BYTES", "ModelLoadError", "check_fits", "field", "is_file", "load_config",
           "read_json"]
