"""The Hugging Face checkpoint loader: every layout it accepts gives the same model, and
every bad directory raises `ModelLoadError` naming the file and the key."""

from __future__ import annotations

import json
import pathlib
import shutil

import jax
import numpy as np
import pytest
from safetensors.numpy import save_file

import paged_kv as pk
from paged_kv.models.loader import ModelLoadError, _read_file, expected_shapes, load_config, load_model, load_params

FIXTURES = pathlib.Path(__file__).parent / "fixtures" / "hf"


@pytest.fixture(params=["llama", "mistral"])
def checkpoint(request, tmp_path) -> pathlib.Path:
    """A writable copy of a fixture checkpoint (config.json + model.safetensors)."""
    out = tmp_path / request.param
    out.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(FIXTURES / request.param / name, out / name)
    return out


def edit_config(directory: pathlib.Path, **changes) -> None:
    path = directory / "config.json"
    data = json.loads(path.read_text())
    for key, value in changes.items():
        if value is None:
            data.pop(key, None)
        else:
            data[key] = value
    path.write_text(json.dumps(data))


def float32_tensors(directory: pathlib.Path) -> dict[str, np.ndarray]:
    """The fixture's tensors as float32 numpy arrays (the loader's own reading of them)."""
    cfg = load_config(directory)
    return {k: v.astype(np.float32) for k, v in _read_file(directory / "model.safetensors", list(expected_shapes(cfg))).items()}


def same_params(a, b) -> bool:
    return all(np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


# ---- layouts that must load identically --------------------------------------------------------
def test_float32_and_sharded_checkpoints_load_the_same_weights(checkpoint, tmp_path):
    cfg, params = load_model(checkpoint)
    tensors = float32_tensors(checkpoint)
    sharded = tmp_path / "sharded"
    sharded.mkdir()
    shutil.copy(checkpoint / "config.json", sharded)
    names = sorted(tensors)
    halves = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    for file, keys in halves.items():
        save_file({k: tensors[k] for k in keys}, str(sharded / file))
    weight_map = {k: f for f, keys in halves.items() for k in keys}
    (sharded / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    cfg2, params2 = load_model(sharded)
    assert cfg2 == cfg and same_params(params, params2)
    assert params["layers"][0]["wq"].shape == (cfg.hidden_size, cfg.num_heads * cfg.head_dim)  # [in, out]


def test_bfloat16_load_keeps_the_stored_bits(checkpoint):
    _, p32 = load_model(checkpoint, dtype="float32")
    _, p16 = load_model(checkpoint, dtype="bfloat16")
    assert all(x.dtype == jax.numpy.bfloat16 for x in jax.tree.leaves(p16))
    # The fixture is stored in bfloat16: the float32 load is exact, so casting back is too.
    assert same_params(jax.tree.map(lambda x: x.astype(jax.numpy.bfloat16), p32), p16)


def test_legacy_rope_fields_read_like_rope_parameters(tmp_path):
    directory = tmp_path / "legacy"
    shutil.copytree(FIXTURES / "llama", directory)
    data = json.loads((directory / "config.json").read_text())
    rope = data.pop("rope_parameters")
    data["rope_theta"] = rope.pop("rope_theta")
    data["rope_scaling"] = {"type": rope.pop("rope_type"), **rope}  # transformers 4.x, Llama 3.1 files
    (directory / "config.json").write_text(json.dumps(data))
    assert load_config(directory) == load_config(FIXTURES / "llama")


# ---- bad directories ----------------------------------------------------------------------------
@pytest.mark.parametrize("changes,named", [
    (dict(hidden_size=None), "'hidden_size'"),
    (dict(num_hidden_layers="two"), "'num_hidden_layers'"),
    (dict(num_attention_heads=0), "'num_attention_heads'"),
    (dict(num_key_value_heads=3), "num_key_value_heads=3"),
    (dict(model_type="gpt2"), "model_type='gpt2'"),
    (dict(hidden_act="gelu"), "hidden_act='gelu'"),
    (dict(attention_bias=True), "attention_bias"),
    (dict(rope_parameters={"rope_type": "yarn", "rope_theta": 1e4}), "'yarn'"),
    (dict(rope_parameters={"rope_type": "llama3", "rope_theta": 1e4, "factor": 8.0}), "'low_freq_factor'"),
])
def test_bad_config_names_the_key(checkpoint, changes, named):
    edit_config(checkpoint, **changes)
    with pytest.raises(ModelLoadError) as err:
        load_model(checkpoint)
    assert "config.json" in str(err.value) and named in str(err.value)


def test_bad_weights_name_the_file_and_tensor(checkpoint):
    edit_config(checkpoint, intermediate_size=96)
    with pytest.raises(ModelLoadError, match=r"model\.safetensors.*'model\.layers\.0\.mlp\.down_proj\.weight' has shape "
                       r"\(64, 128\); config\.json implies \(64, 96\)"):
        load_model(checkpoint)


def test_missing_unexpected_and_duplicate_tensors(checkpoint, tmp_path):
    tensors = float32_tensors(checkpoint)
    (checkpoint / "model.safetensors").unlink()
    gone = "model.layers.1.self_attn.k_proj.weight"
    save_file({k: v for k, v in tensors.items() if k != gone}, str(checkpoint / "a.safetensors"))
    with pytest.raises(ModelLoadError, match=f"'{gone}' is in none of \\['a.safetensors'\\]"):
        load_model(checkpoint)
    save_file({gone: tensors[gone], "model.layers.0.self_attn.q_proj.bias": np.zeros(64, np.float32)},
              str(checkpoint / "b.safetensors"))
    with pytest.raises(ModelLoadError, match=r"b\.safetensors: unexpected tensor 'model\.layers\.0\.self_attn\.q_proj\.bias'"):
        load_model(checkpoint)
    save_file({gone: tensors[gone], "model.norm.weight": tensors["model.norm.weight"]}, str(checkpoint / "b.safetensors"))
    with pytest.raises(ModelLoadError, match=r"'model\.norm\.weight' is also in .*a\.safetensors"):
        load_model(checkpoint)


@pytest.mark.parametrize("damage", ["no config", "bad json", "no weights", "truncated weights", "index names a missing shard"])
def test_unreadable_directories(checkpoint, damage):
    weights = checkpoint / "model.safetensors"
    if damage == "no config":
        (checkpoint / "config.json").unlink()
        named = r"config\.json: not found"
    elif damage == "bad json":
        (checkpoint / "config.json").write_text("{not json")
        named = r"config\.json: not readable JSON"
    elif damage == "no weights":
        weights.unlink()
        named = r"no \*\.safetensors file"
    elif damage == "truncated weights":
        weights.write_bytes(weights.read_bytes()[:1000])
        named = r"model\.safetensors: not a readable safetensors file"
    else:
        (checkpoint / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"x": "gone.safetensors"}}))
        named = r"names shard 'gone\.safetensors'"
    with pytest.raises(ModelLoadError, match=named) as err:
        load_model(checkpoint)
    assert isinstance(err.value, (pk.CheckpointError, ValueError))


def test_eos_ids_from_generation_config(checkpoint):
    assert load_config(checkpoint).eos_token_ids == (2,)
    (checkpoint / "generation_config.json").write_text(json.dumps({"eos_token_id": [7, 9]}))
    assert load_config(checkpoint).eos_token_ids == (7, 9)
    (checkpoint / "generation_config.json").write_text(json.dumps({"eos_token_id": "x"}))
    with pytest.raises(ModelLoadError, match=r"generation_config\.json: key 'eos_token_id' is 'x'"):
        load_config(checkpoint)


def test_bad_dtype_is_a_spec_error(checkpoint):
    cfg = load_config(checkpoint)
    with pytest.raises(pk.SpecError, match="dtype='float16'"):
        load_params(checkpoint, cfg, dtype="float16")
