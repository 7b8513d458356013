"""Load a local Hugging Face Llama/Mistral checkpoint directory into `paged_kv.models.llama`.

The directory holds ``config.json`` and one or more ``*.safetensors`` files (with a
``model.safetensors.index.json`` when sharded). Tensors are read through the
``safetensors`` package's numpy API; bfloat16 tensors, which numpy cannot name,
are read as raw bytes (``safetensors.deserialize``) and viewed as ``ml_dtypes.bfloat16``.
Every problem raises `ModelLoadError` naming the file and the key.

The directory is untrusted input (issue 23): numbers must be finite and in range (JSON's
NaN and Infinity, or 1e999, are refused), weights must be stored as floats and hold
finite values, an index may only name files inside the directory, and the model the
config describes must fit in this machine's memory before any tensor is read.
"""

from __future__ import annotations

import json
import math
import pathlib

import jax.numpy as jnp
import numpy as np

from paged_kv.errors import CheckpointError, SpecError
from paged_kv.models.llama import ROPE_TYPES, LlamaConfig, RopeScaling
from paged_kv.spec.fields import check_host_bytes

MODEL_TYPES = ("llama", "mistral")
DTYPES = ("float32", "bfloat16")
# Buffers some older checkpoints carry: recomputed from the config, never loaded.
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)
FLOAT_TENSOR_DTYPES = ("F16", "BF16", "F32", "F64")
"""safetensors dtypes a weight may be stored in. Integers, bools and complex numbers are
not weights of this model (cast, they would be silently wrong), and fp8 checkpoints need
per-tensor scales this loader does not apply (safetensors' numpy API cannot read them)."""
MAX_JSON_BYTES = 64 * 2**20
"""A config or index larger than this is not one (an index of a 400B model is ~100 KiB)."""
MAX_INT = 2**31
"""Config integers are sizes and token ids, all int32 on the device."""
_FLOAT32_MAX = float(np.finfo(np.float32).max)  # the model computes in float32
HOST_BYTES_PER_TENSOR = 4 * 2**10
"""Host bytes a loaded tensor costs beyond its data (array objects, names, dict entries)."""


class ModelLoadError(CheckpointError):
    """A model checkpoint directory that cannot be loaded: a missing or malformed
    ``config.json`` key, an unsupported architecture, a missing, unexpected or
    misshapen weight. The message names the file and the key."""


def _require_safetensors():
    try:
        import safetensors
    except ImportError:
        raise ModelLoadError(
            "loading a checkpoint needs the safetensors package: pip install 'paged_kv[models]'"
        ) from None
    return safetensors


# ---- config.json ---------------------------------------------------------------------------
def _is_file(path: pathlib.Path) -> bool:
    """``path.is_file()``, False where the name itself is unusable (too long, a NUL byte),
    for which pathlib raises instead of answering."""
    try:
        return path.is_file()
    except (OSError, ValueError):
        return False


def _read_json(path: pathlib.Path) -> dict:
    if not _is_file(path):  # also refuses a named pipe, which would block the read
        raise ModelLoadError(f"{path}: not found (a Hugging Face checkpoint directory has config.json)")
    try:
        size = path.stat().st_size
    except OSError as exc:
        raise ModelLoadError(f"{path}: cannot be read ({exc})") from None
    if size > MAX_JSON_BYTES:
        raise ModelLoadError(f"{path}: {size:,} bytes, more than the {MAX_JSON_BYTES:,} a config or index holds")

    def not_a_number(word: str):  # json accepts NaN and Infinity, which no config field may be
        raise ModelLoadError(f"{path}: holds {word}, which is not a JSON number; give a finite value")

    try:
        data = json.loads(path.read_text(), parse_constant=not_a_number)
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as exc:  # ValueError: JSON, digit limit
        raise ModelLoadError(f"{path}: not readable JSON ({type(exc).__name__}: {exc})") from None
    if not isinstance(data, dict):
        raise ModelLoadError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def _field(data: dict, key: str, kind: type, path, default=None, required: bool = False):
    """``data[key]`` checked to be a ``kind`` (ints accepted for floats), or ``default``."""
    if key not in data or data[key] is None:
        if required:
            raise ModelLoadError(f"{path}: missing key {key!r} (a Llama/Mistral config.json has it)")
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
    if kind in (int, float) and value <= 0:
        raise ModelLoadError(f"{path}: key {key!r} is {value!r}; expected a positive number")
    # 1e999 parses as inf; a float past float32 is inf where the model computes.
    if kind is float and not (math.isfinite(value) and value <= _FLOAT32_MAX):
        raise ModelLoadError(f"{path}: key {key!r} is {value!r}; expected a finite number float32 holds")
    if kind is int and value >= MAX_INT:
        raise ModelLoadError(f"{path}: key {key!r} is {value!r}; expected a positive integer below 2**31")
    return value


def _rope(data: dict, path) -> tuple[float, RopeScaling | None]:
    """Theta and scaling from ``rope_parameters`` (transformers >= 5) or ``rope_theta`` + ``rope_scaling``."""
    params = data.get("rope_parameters") or data.get("rope_scaling") or {}
    where = "rope_parameters" if data.get("rope_parameters") else "rope_scaling"
    if not isinstance(params, dict):
        raise ModelLoadError(f"{path}: key {where!r} is {params!r}; expected an object")
    theta = _field(params, "rope_theta", float, f"{path} [{where}]") or _field(data, "rope_theta", float, path, 10000.0)
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type not in ROPE_TYPES:
        raise ModelLoadError(f"{path}: {where}.rope_type={rope_type!r} is not supported (supported: {ROPE_TYPES})")
    if rope_type == "default":
        return theta, None
    where = f"{path} [{where}]"
    factor = _field(params, "factor", float, where, required=True)
    if rope_type == "linear":
        return theta, RopeScaling("linear", factor)
    low = _field(params, "low_freq_factor", float, where, required=True)
    high = _field(params, "high_freq_factor", float, where, required=True)
    if not high > low:  # Llama 3 interpolates between the two: divides by their difference
        raise ModelLoadError(f"{where}: high_freq_factor={high!r} must exceed low_freq_factor={low!r}")
    return theta, RopeScaling(
        "llama3", factor, low_freq_factor=low, high_freq_factor=high,
        original_max_position_embeddings=_field(params, "original_max_position_embeddings", int, where,
                                                required=True),
    )


def _check_supported(data: dict, path) -> None:
    model_type = data.get("model_type")
    if model_type not in MODEL_TYPES:
        raise ModelLoadError(f"{path}: model_type={model_type!r} is not supported (supported: {MODEL_TYPES})")
    if data.get("hidden_act", "silu") != "silu":
        raise ModelLoadError(f"{path}: hidden_act={data['hidden_act']!r} is not supported (Llama/Mistral use 'silu')")
    for key in ("attention_bias", "mlp_bias"):
        if data.get(key):
            raise ModelLoadError(f"{path}: {key}=true is not supported (Llama/Mistral projections have no bias)")


def _token_ids(data: dict, key: str, path) -> tuple[int, ...]:
    """An id or a list of ids (Llama 3 lists several end-of-turn ids) as a tuple."""
    value = data.get(key)
    values = value if isinstance(value, list) else [] if value is None else [value]
    if not all(isinstance(v, int) and not isinstance(v, bool) and 0 <= v < MAX_INT for v in values):
        raise ModelLoadError(f"{path}: key {key!r} is {value!r}; expected a token id in [0, 2**31) or a list of them")
    return tuple(values)


def _eos_ids(directory: pathlib.Path, data: dict, path) -> tuple[int, ...]:
    """End-of-sequence ids: generation_config.json's when it has them (chat models
    list their end-of-turn ids there), else config.json's."""
    gen_path = directory / "generation_config.json"
    if _is_file(gen_path):
        ids = _token_ids(_read_json(gen_path), "eos_token_id", gen_path)
        if ids:
            return ids
    return _token_ids(data, "eos_token_id", path)


def load_config(checkpoint_dir) -> LlamaConfig:
    """`LlamaConfig` from ``checkpoint_dir/config.json``; `ModelLoadError` naming the key on a bad one."""
    directory = pathlib.Path(checkpoint_dir)
    path = directory / "config.json"
    data = _read_json(path)
    _check_supported(data, path)
    hidden = _field(data, "hidden_size", int, path, required=True)
    heads = _field(data, "num_attention_heads", int, path, required=True)
    theta, scaling = _rope(data, path)
    try:
        return LlamaConfig(
            vocab_size=_field(data, "vocab_size", int, path, required=True),
            hidden_size=hidden,
            intermediate_size=_field(data, "intermediate_size", int, path, required=True),
            num_layers=_field(data, "num_hidden_layers", int, path, required=True),
            num_heads=heads,
            num_kv_heads=_field(data, "num_key_value_heads", int, path, heads),
            head_dim=_field(data, "head_dim", int, path, hidden // heads),
            rms_norm_eps=_field(data, "rms_norm_eps", float, path, 1e-6),
            rope_theta=theta,
            rope_scaling=scaling,
            sliding_window=_field(data, "sliding_window", int, path) if data.get("use_sliding_window", True) else None,
            tie_word_embeddings=_field(data, "tie_word_embeddings", bool, path, False),
            bos_token_id=(_token_ids(data, "bos_token_id", path) or (None,))[0],
            eos_token_ids=_eos_ids(directory, data, path),
        )
    except SpecError as exc:
        raise ModelLoadError(f"{path}: {exc}") from None


# ---- weights -------------------------------------------------------------------------------
def expected_shapes(cfg: LlamaConfig) -> dict[str, tuple[int, ...]]:
    """HF tensor name -> shape (HF stores linear weights as ``[out, in]``)."""
    h, q, kv = cfg.hidden_size, cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
    shapes = {"model.embed_tokens.weight": (cfg.vocab_size, h), "model.norm.weight": (h,)}
    for i in range(cfg.num_layers):
        p = f"model.layers.{i}."
        shapes.update({
            p + "input_layernorm.weight": (h,), p + "post_attention_layernorm.weight": (h,),
            p + "self_attn.q_proj.weight": (q, h), p + "self_attn.k_proj.weight": (kv, h),
            p + "self_attn.v_proj.weight": (kv, h), p + "self_attn.o_proj.weight": (h, q),
            p + "mlp.gate_proj.weight": (cfg.intermediate_size, h), p + "mlp.up_proj.weight": (cfg.intermediate_size, h),
            p + "mlp.down_proj.weight": (h, cfg.intermediate_size),
        })
    if not cfg.tie_word_embeddings:
        shapes["lm_head.weight"] = (cfg.vocab_size, h)
    return shapes


def _weight_files(directory: pathlib.Path) -> list[pathlib.Path]:
    index = directory / "model.safetensors.index.json"
    if _is_file(index):
        weight_map = _read_json(index).get("weight_map")
        if not isinstance(weight_map, dict):
            raise ModelLoadError(f"{index}: missing key 'weight_map'")
        for tensor, name in weight_map.items():
            _check_shard_name(index, tensor, name)
        files = [directory / name for name in sorted(set(weight_map.values()))]
        missing = [f for f in files if not _is_file(f)]
        if missing:
            raise ModelLoadError(f"{index}: names shard {missing[0].name!r}, which is not in {directory}")
        return files
    files = sorted(f for f in directory.glob("*.safetensors") if _is_file(f))  # not a pipe: opening one blocks
    if not files:
        raise ModelLoadError(f"{directory}: no *.safetensors file (only safetensors checkpoints are supported)")
    return files


def _check_shard_name(index: pathlib.Path, tensor: str, name) -> None:
    """A shard the index names: a file name inside the checkpoint directory. Checked by
    name, not by resolving it: a Hugging Face cache's shards are symlinks into a blob
    store outside the directory, which is fine; ``../x`` and absolute paths are not."""
    if not isinstance(name, str) or not name or "\x00" in name:
        raise ModelLoadError(f"{index}: weight_map[{tensor!r}] is {name!r}; expected a shard file name")
    parts = pathlib.PurePosixPath(name).parts + pathlib.PureWindowsPath(name).parts
    if pathlib.PurePosixPath(name).is_absolute() or pathlib.PureWindowsPath(name).anchor or ".." in parts:
        raise ModelLoadError(f"{index}: weight_map[{tensor!r}] names {name!r}, outside the checkpoint directory; "
                             "an index may only name files inside it")


def _index(files: list[pathlib.Path], shapes: dict) -> dict[str, pathlib.Path]:
    """Which file holds each tensor; checks names and shapes before any tensor is read."""
    st = _require_safetensors()
    where: dict[str, pathlib.Path] = {}
    for f in files:
        try:
            with st.safe_open(str(f), framework="np") as handle:
                for key in handle.keys():
                    if key.endswith(_IGNORED_SUFFIXES) or (key == "lm_head.weight" and key not in shapes):
                        continue  # a tied checkpoint that also stores lm_head: the embedding is used
                    if key in where:
                        raise ModelLoadError(f"{f}: tensor {key!r} is also in {where[key]}")
                    if key not in shapes:
                        raise ModelLoadError(f"{f}: unexpected tensor {key!r} (not part of a Llama/Mistral model "
                                             "with this config.json)")
                    tensor = handle.get_slice(key)
                    shape, dtype = tuple(tensor.get_shape()), tensor.get_dtype()
                    if shape != shapes[key]:
                        raise ModelLoadError(f"{f}: tensor {key!r} has shape {shape}; config.json implies "
                                             f"{shapes[key]}")
                    if dtype not in FLOAT_TENSOR_DTYPES:
                        raise ModelLoadError(f"{f}: tensor {key!r} is stored as {dtype}; weights must be one of "
                                             f"{FLOAT_TENSOR_DTYPES} (convert the checkpoint, e.g. to bfloat16)")
                    where[key] = f
        except (st.SafetensorError, OSError) as exc:
            raise ModelLoadError(f"{f}: not a readable safetensors file ({exc})") from None
    missing = [k for k in shapes if k not in where]
    if missing:
        raise ModelLoadError(f"{files[0].parent}: tensor {missing[0]!r} is in none of "
                             f"{[f.name for f in files]} ({len(missing)} missing)")
    return where


def _read_file(path: pathlib.Path, keys: list[str]) -> dict[str, np.ndarray]:
    """The named tensors of one file as numpy arrays (bfloat16 through raw bytes)."""
    st = _require_safetensors()
    try:
        return _read_tensors(st, path, keys)
    except (st.SafetensorError, OSError) as exc:  # e.g. the file changed or vanished since it was indexed
        raise ModelLoadError(f"{path}: not a readable safetensors file ({exc})") from None


def _read_tensors(st, path: pathlib.Path, keys: list[str]) -> dict[str, np.ndarray]:
    out = {}
    with st.safe_open(str(path), framework="np") as handle:
        raw = [k for k in keys if handle.get_slice(k).get_dtype() == "BF16"]
        for k in keys:
            if k not in raw:
                out[k] = handle.get_tensor(k)
    if raw:
        import ml_dtypes

        for name, info in st.deserialize(path.read_bytes()):
            if name in raw:
                flat = np.frombuffer(bytes(info["data"]), dtype=np.uint16).view(ml_dtypes.bfloat16)
                out[name] = flat.reshape(info["shape"])
    return out


def load_params(checkpoint_dir, cfg: LlamaConfig, dtype: str = "float32") -> dict:
    """The model's parameters from the directory's safetensors files, cast to ``dtype``.

    Linear weights are transposed to ``[in, out]``. Names and shapes are checked
    against ``cfg`` before any tensor is read.
    """
    if dtype not in DTYPES:
        raise SpecError(f"dtype={dtype!r} is not one of {DTYPES}")
    directory = pathlib.Path(checkpoint_dir)
    _check_fits(directory, cfg, jnp.dtype(dtype).itemsize)
    shapes = expected_shapes(cfg)  # after the check: it builds nine entries per layer
    where = _index(_weight_files(directory), shapes)
    tensors: dict[str, np.ndarray] = {}
    for f in sorted(set(where.values())):
        tensors.update(_read_file(f, [k for k, v in where.items() if v == f]))
    target = jnp.dtype(dtype)

    def get(name: str, transpose: bool = False):
        x = tensors[name].astype(np.float32)
        if not np.isfinite(x).all():  # a NaN weight makes every logit NaN: generation would be noise
            bad = np.flatnonzero(~np.isfinite(x.ravel()))
            raise ModelLoadError(f"{where[name]}: tensor {name!r} holds {bad.size:,} values that are not finite "
                                 f"(the first, {float(x.ravel()[bad[0]])!r}, at flat index {int(bad[0])}); the "
                                 "checkpoint is corrupt")
        x = x.astype(target)
        return jnp.asarray(x.T if transpose else x)

    layers = []
    for i in range(cfg.num_layers):
        p = f"model.layers.{i}."
        layers.append(dict(
            attn_norm=get(p + "input_layernorm.weight"), mlp_norm=get(p + "post_attention_layernorm.weight"),
            wq=get(p + "self_attn.q_proj.weight", True), wk=get(p + "self_attn.k_proj.weight", True),
            wv=get(p + "self_attn.v_proj.weight", True), wo=get(p + "self_attn.o_proj.weight", True),
            w_gate=get(p + "mlp.gate_proj.weight", True), w_up=get(p + "mlp.up_proj.weight", True),
            w_down=get(p + "mlp.down_proj.weight", True),
        ))
    params = dict(embed=get("model.embed_tokens.weight"), norm=get("model.norm.weight"), layers=tuple(layers))
    if not cfg.tie_word_embeddings:
        params["lm_head"] = get("lm_head.weight", True)
    return params


def parameter_count(cfg: LlamaConfig) -> int:
    """Elements of every weight `expected_shapes` lists, by arithmetic (no per-layer Python)."""
    h, q, kv, inter = cfg.hidden_size, cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim, \
        cfg.intermediate_size
    per_layer = 2 * h + 2 * q * h + 2 * kv * h + 3 * inter * h
    return cfg.num_layers * per_layer + h + cfg.vocab_size * h * (1 if cfg.tie_word_embeddings else 2)


def _check_fits(directory: pathlib.Path, cfg: LlamaConfig, itemsize: int) -> None:
    """`ModelLoadError` when the model ``cfg`` describes could not be held in host memory:
    the tensors as read (counted at 4 bytes, float32) and as loaded (``itemsize``)."""
    elements = parameter_count(cfg)
    tensors = 9 * cfg.num_layers + 3
    check_host_bytes(elements * (4 + itemsize) + tensors * HOST_BYTES_PER_TENSOR,
                     f"{directory / 'config.json'}: a model of {cfg.num_layers:,} layers and {elements:,} parameters",
                     ModelLoadError, hint="check num_hidden_layers, hidden_size, intermediate_size and vocab_size")


def load_model(checkpoint_dir, dtype: str = "float32") -> tuple[LlamaConfig, dict]:
    """``(config, params)`` of a Hugging Face Llama/Mistral checkpoint directory."""
    cfg = load_config(checkpoint_dir)
    return cfg, load_params(checkpoint_dir, cfg, dtype)


__all__ = ["FLOAT_TENSOR_DTYPES", "ModelLoadError", "expected_shapes", "load_config", "load_model", "load_params",
           "parameter_count"]
