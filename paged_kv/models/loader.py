"""Load a local Hugging Face checkpoint directory into `paged_kv.models.decoder`.

Llama, Mistral, Qwen2/2.5, Qwen3, Gemma 2 and Gemma 3 (text; a multimodal Gemma 3
checkpoint's text model, its vision tower skipped): ``config.json`` is read family by
family as transformers reads it (`paged_kv.models.hf_config`), the tensor names come
from the family's table (`paged_kv.models.families`).

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

import os
import pathlib
import types

import jax
import jax.numpy as jnp
import numpy as np

from paged_kv.errors import SpecError
from paged_kv.models.decoder import ModelConfig, Params
from paged_kv.models.families import (
    MODEL_TYPES,
    MULTIMODAL_PREFIXES,
    MULTIMODAL_SKIPPED,
    layer_weights,
    parameter_count,
)
from paged_kv.models.hf_config import (
    HOST_BYTES_PER_TENSOR,  # noqa: F401 - re-exported
    MAX_INT,
    MAX_JSON_BYTES,
    ModelLoadError,
    check_fits,
    is_file,
    load_config,
    read_json,
)

DTYPES = ("float32", "bfloat16")
# Buffers some older checkpoints carry: recomputed from the config, never loaded.
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)
FLOAT_TENSOR_DTYPES = ("F16", "BF16", "F32", "F64")
"""safetensors dtypes a weight may be stored in. Integers, bools and complex numbers are
not weights of this model (cast, they would be silently wrong), and fp8 checkpoints need
per-tensor scales this loader does not apply (safetensors' numpy API cannot read them)."""


def _require_safetensors() -> types.ModuleType:
    try:
        import safetensors
    except ImportError:
        raise ModelLoadError(
            "loading a checkpoint needs the safetensors package: pip install 'paged_kv[models]'"
        ) from None
    return safetensors


# ---- weights -------------------------------------------------------------------------------
def expected_shapes(cfg: ModelConfig, prefix: str = "model.") -> dict[str, tuple[int, ...]]:
    """HF tensor name -> shape (HF stores linear weights as ``[out, in]``); ``prefix``: where
    the text model's tensors are (a multimodal Gemma 3 keeps them elsewhere)."""
    h = cfg.hidden_size
    shapes = {prefix + "embed_tokens.weight": (cfg.vocab_size, h), prefix + "norm.weight": (h,)}
    per_layer = [(name, shape) for name, shape, _ in layer_weights(cfg).values()]
    for i in range(cfg.num_layers):
        shapes.update((f"{prefix}layers.{i}.{name}", shape) for name, shape in per_layer)
    if not cfg.tie_word_embeddings:
        shapes[_head_name(prefix)] = (cfg.vocab_size, h)
    return shapes


def _head_name(prefix: str) -> str:
    return MULTIMODAL_PREFIXES.get(prefix, "lm_head.weight")


def _weight_files(directory: pathlib.Path) -> list[pathlib.Path]:
    index = directory / "model.safetensors.index.json"
    if is_file(index):
        weight_map = read_json(index).get("weight_map")
        if not isinstance(weight_map, dict):
            raise ModelLoadError(f"{index}: missing key 'weight_map'")
        for tensor, name in weight_map.items():
            _check_shard_name(index, tensor, name)
        files = [directory / name for name in sorted(set(weight_map.values()))]
        missing = [f for f in files if not is_file(f)]
        if missing:
            raise ModelLoadError(f"{index}: names shard {missing[0].name!r}, which is not in {directory}")
        return files
    files = sorted(f for f in directory.glob("*.safetensors") if is_file(f))  # not a pipe: opening one blocks
    if not files:
        raise ModelLoadError(f"{directory}: no *.safetensors file (only safetensors checkpoints are supported)")
    return files


def _check_shard_name(index: pathlib.Path, tensor: str, name: object) -> None:
    """A shard the index names: a file name inside the checkpoint directory. Checked by
    name, not by resolving it: a Hugging Face cache's shards are symlinks into a blob
    store outside the directory, which is fine; ``../x`` and absolute paths are not."""
    if not isinstance(name, str) or not name or "\x00" in name:
        raise ModelLoadError(f"{index}: weight_map[{tensor!r}] is {name!r}; expected a shard file name")
    parts = pathlib.PurePosixPath(name).parts + pathlib.PureWindowsPath(name).parts
    if pathlib.PurePosixPath(name).is_absolute() or pathlib.PureWindowsPath(name).anchor or ".." in parts:
        raise ModelLoadError(f"{index}: weight_map[{tensor!r}] names {name!r}, outside the checkpoint directory; "
                             "an index may only name files inside it")


def _index(files: list[pathlib.Path], shapes: dict[str, tuple[int, ...]], prefix: str = "model.",
           skipped: tuple[str, ...] = ()) -> dict[str, pathlib.Path]:
    """Which file holds each tensor; checks names and shapes before any tensor is read.
    Tensors whose names start with one of ``skipped`` (a vision tower) are not read."""
    st = _require_safetensors()
    where: dict[str, pathlib.Path] = {}
    for f in files:
        try:
            with st.safe_open(str(f), framework="np") as handle:
                for key in handle.keys():
                    if key.endswith(_IGNORED_SUFFIXES) or key.startswith(skipped) or (
                            key == _head_name(prefix) and key not in shapes):
                        continue  # a tied checkpoint that also stores lm_head: the embedding is used
                    if key in where:
                        raise ModelLoadError(f"{f}: tensor {key!r} is also in {where[key]}")
                    if key not in shapes:
                        raise ModelLoadError(f"{f}: unexpected tensor {key!r} (not part of the model "
                                             "this config.json describes)")
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


def _read_tensors(st: types.ModuleType, path: pathlib.Path, keys: list[str]) -> dict[str, np.ndarray]:
    out: dict[str, np.ndarray] = {}
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


def _keys(files: list[pathlib.Path]) -> set[str]:
    """Every tensor name the files hold (their headers only)."""
    st = _require_safetensors()
    names: set[str] = set()
    for f in files:
        try:
            with st.safe_open(str(f), framework="np") as handle:
                names.update(handle.keys())
        except (st.SafetensorError, OSError) as exc:
            raise ModelLoadError(f"{f}: not a readable safetensors file ({exc})") from None
    return names


def _text_prefix(cfg: ModelConfig, files: list[pathlib.Path]) -> tuple[str, tuple[str, ...]]:
    """Where the text model's tensors are, and which tensors to skip: ``model.`` for a
    text model; for a multimodal Gemma 3 checkpoint whichever layout it was saved in."""
    if cfg.model_type != "gemma3":
        return "model.", ()
    names = _keys(files)
    found = [p for p in MULTIMODAL_PREFIXES if p + "embed_tokens.weight" in names]
    return (found or list(MULTIMODAL_PREFIXES))[0], MULTIMODAL_SKIPPED


def load_params(checkpoint_dir: str | os.PathLike[str], cfg: ModelConfig, dtype: str = "float32") -> Params:
    """The model's parameters from the directory's safetensors files, cast to ``dtype``.

    Linear weights are transposed to ``[in, out]``. Names and shapes are checked
    against ``cfg`` before any tensor is read.
    """
    if dtype not in DTYPES:
        raise SpecError(f"dtype={dtype!r} is not one of {DTYPES}")
    directory = pathlib.Path(checkpoint_dir)
    check_fits(directory, cfg, jnp.dtype(dtype).itemsize)
    files = _weight_files(directory)
    prefix, skipped = _text_prefix(cfg, files)
    shapes = expected_shapes(cfg, prefix)  # after the check: it builds entries per layer
    where = _index(files, shapes, prefix, skipped)
    tensors: dict[str, np.ndarray] = {}
    for f in sorted(set(where.values())):
        tensors.update(_read_file(f, [k for k, v in where.items() if v == f]))
    target = jnp.dtype(dtype)

    def get(name: str, transpose: bool = False) -> jax.Array:
        x = tensors[name].astype(np.float32, copy=False)
        if not np.isfinite(x).all():  # a NaN weight makes every logit NaN: generation would be noise
            bad = np.flatnonzero(~np.isfinite(x.ravel()))
            raise ModelLoadError(f"{where[name]}: tensor {name!r} holds {bad.size:,} values that are not finite "
                                 f"(the first, {float(x.ravel()[bad[0]])!r}, at flat index {int(bad[0])}); the "
                                 "checkpoint is corrupt")
        x = np.ascontiguousarray((x.T if transpose else x).astype(target, copy=False))
        # A transfer, not a computation: jnp.asarray of a transposed (strided) array compiles a
        # copy program per shape, which a second process then reads from the compilation
        # cache one by one before its first token.
        put: jax.Array = jax.device_put(x)
        return put

    table = layer_weights(cfg)
    layers = tuple({key: get(f"{prefix}layers.{i}.{name}", transpose) for key, (name, _, transpose) in table.items()}
                   for i in range(cfg.num_layers))
    params: Params = dict(embed=get(prefix + "embed_tokens.weight"), norm=get(prefix + "norm.weight"), layers=layers)
    if not cfg.tie_word_embeddings:
        params["lm_head"] = get(_head_name(prefix), True)
    return params


def load_model(checkpoint_dir: str | os.PathLike[str], dtype: str = "float32") -> tuple[ModelConfig, Params]:
    """``(config, params)`` of a Hugging Face checkpoint directory of a supported family."""
    cfg = load_config(checkpoint_dir)
    return cfg, load_params(checkpoint_dir, cfg, dtype)


__all__ = ["DTYPES", "FLOAT_TENSOR_DTYPES", "MAX_INT", "MAX_JSON_BYTES", "MODEL_TYPES", "ModelLoadError",
           "expected_shapes", "load_config", "load_model", "load_params", "parameter_count"]
