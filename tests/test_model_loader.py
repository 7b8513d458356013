"""The Hugging Face checkpoint loader: every layout it accepts gives the same model, each
model_type's config.json is read by transformers' rules (its defaults, which layers slide),
and every bad directory or unsupported option raises `ModelLoadError` naming the file and
the key."""

from __future__ import annotations

import dataclasses
import json
import pathlib
import shutil

import jax
import numpy as np
import pytest
from safetensors.numpy import save_file

import paged_kv as pk
from hf_fixtures import JSON_WEIRD, weird_configs
from paged_kv.models import loader
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
    (dict(quantization_config={"quant_method": "awq", "bits": 4}), "quantization_config (quant_method='awq')"),
    (dict(model_type="qwen2_moe"), "model_type='qwen2_moe'"),
    (dict(model_type="gemma3"), "needs a 'text_config' object"),
    (dict(rope_parameters={"rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0, "truncate": "yes"}), "'truncate'"),
    (dict(rope_parameters={"rope_type": "longrope", "rope_theta": 1e4}), "'longrope'"),
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


def test_attention_bias_follows_each_model_type(checkpoint):
    """Llama's ``attention_bias`` adds q/k/v/o biases (the checkpoint must hold them);
    transformers' Mistral has no biases and ignores the key. Llama's ``mlp_bias`` is refused."""
    edit_config(checkpoint, attention_bias=True)
    if checkpoint.name == "mistral":
        assert not load_config(checkpoint).qkv_bias
        load_model(checkpoint)
        return
    assert load_config(checkpoint).qkv_bias and load_config(checkpoint).o_bias
    with pytest.raises(ModelLoadError, match=r"'model\.layers\.0\.self_attn\.q_proj\.bias' is in none of"):
        load_model(checkpoint)
    edit_config(checkpoint, attention_bias=None, mlp_bias=True)
    with pytest.raises(ModelLoadError, match=r"config\.json: mlp_bias=true is not supported"):
        load_model(checkpoint)


# ---- the other families ----------------------------------------------------------------------
FAMILY_FIXTURES = ["qwen2", "qwen3", "qwen3_yarn", "gemma2", "gemma3_text", "llama_window"]


@pytest.fixture(params=FAMILY_FIXTURES)
def family(request, tmp_path) -> pathlib.Path:
    out = tmp_path / request.param
    out.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(FIXTURES / request.param / name, out / name)
    return out


def test_each_family_loads_with_its_switches():
    """What each fixture's config.json switches on in the one decoder."""
    cfgs = {name: load_config(FIXTURES / name) for name in FAMILY_FIXTURES}
    q2, q3, q3y, g2, g3, lw = (cfgs[n] for n in FAMILY_FIXTURES)
    scaling = q3y.rope_scaling  # YaRN: factor 4 over 16 positions, cos and sin times 0.1 ln 4 + 1
    assert (scaling.rope_type, scaling.factor, scaling.original_max_position_embeddings) == ("yarn", 4.0, 16)
    assert (scaling.beta_fast, scaling.beta_slow, scaling.truncate) == (32.0, 1.0, True)
    assert abs(scaling.attention_factor - (0.1 * np.log(4.0) + 1)) < 1e-12 and q3y.rope_theta == 1e4
    assert (q2.qkv_bias, q2.o_bias, q2.qk_norm, q2.tie_word_embeddings) == (True, False, False, True)
    assert (q2.sliding_window, q2.layers_sliding, q2.rope_theta) == (12, (1, 2), 1e6)
    assert (q3.qkv_bias, q3.qk_norm, q3.head_dim, q3.num_heads * q3.head_dim, q3.sliding_window) == (
        False, True, 24, 96, None)
    for g in (g2, g3):
        assert g.norm_unit_offset and g.embed_scale and g.post_norms and g.tie_word_embeddings
        assert g.hidden_act == "gelu_pytorch_tanh" and g.sliding_window == 10
    assert (g2.attn_logit_softcap, g2.final_logit_softcap, g2.query_pre_attn_scalar, g2.layers_sliding) == (
        2.0, 4.0, 24.0, (0, 2))
    assert not g2.qk_norm and g2.local_rope_theta is None
    assert g3.qk_norm and g3.layers_sliding == (0, 1, 2, 3, 4) and g3.attn_logit_softcap is None
    assert (g3.rope_theta, g3.rope_scaling.rope_type, g3.rope_scaling.factor) == (1e6, "linear", 8.0)
    assert (g3.local_rope_theta, g3.local_rope_scaling) == (1e4, None)
    assert lw.qkv_bias and lw.o_bias and lw.sliding_window is None and lw.layers_sliding == ()


def test_family_checkpoints_load_sharded_and_count_their_parameters(family, tmp_path):
    cfg, params = load_model(family)
    tensors = float32_tensors(family)
    assert sum(t.size for t in tensors.values()) == loader.parameter_count(cfg)
    assert sum(np.asarray(x).size for x in jax.tree.leaves(params)) == loader.parameter_count(cfg)
    sharded = tmp_path / "sharded"
    sharded.mkdir()
    shutil.copy(family / "config.json", sharded)
    names = sorted(tensors)
    save_file({k: tensors[k] for k in names[::2]}, str(sharded / "a.safetensors"))
    save_file({k: tensors[k] for k in names[1::2]}, str(sharded / "b.safetensors"))
    assert same_params(params, load_model(sharded)[1])


LAYERS = {"qwen2": 3, "qwen3": 2, "qwen3_yarn": 2, "gemma2": 4, "gemma3_text": 6, "llama_window": 2}


@pytest.mark.parametrize("name,changes,window,sliding", [
    # Llama: never a window, whatever the config says.
    ("llama_window", dict(use_sliding_window=True, layer_types=["sliding_attention"] * 2), None, ()),
    # Qwen2/3: only with use_sliding_window, on the layers from max_window_layers on.
    ("qwen2", dict(use_sliding_window=False, layer_types=None), None, ()),
    ("qwen2", dict(layer_types=None, max_window_layers=2), 12, (2,)),
    ("qwen2", dict(layer_types=None, max_window_layers=0), 12, (0, 1, 2)),
    ("qwen2", dict(layer_types=None, max_window_layers=None), None, ()),  # default 28: no layer slides
    ("qwen2", dict(layer_types=None, use_sliding_window=False, sliding_window=32768, max_window_layers=21), None, ()),
    ("qwen2", dict(layer_types=["sliding_attention"] * 3), 12, (0, 1, 2)),
    ("qwen3", dict(use_sliding_window=True, sliding_window=16, max_window_layers=1, layer_types=None), 16, (1,)),
    # Gemma 2: every other layer, the first sliding; Gemma 3: five sliding to one full.
    ("gemma2", dict(layer_types=None), 10, (0, 2)),
    ("gemma2", dict(layer_types=None, sliding_window=None), 4096, (0, 2)),  # transformers' default
    ("gemma3_text", dict(layer_types=None), 10, (0, 1, 2, 3, 4)),
    ("gemma3_text", dict(layer_types=None, sliding_window_pattern=3), 10, (0, 1, 3, 4)),
    ("gemma3_text", dict(layer_types=["full_attention"] * 6), None, ()),
])
def test_sliding_layers_follow_transformers_rules(tmp_path, name, changes, window, sliding):
    directory = tmp_path / name
    shutil.copytree(FIXTURES / name, directory)
    edit_config(directory, **changes)
    cfg = load_config(directory)
    assert (cfg.sliding_window, cfg.layers_sliding) == (window, sliding)


def test_mistral_window_defaults_and_null(checkpoint):
    if checkpoint.name != "mistral":
        return
    edit_config(checkpoint, use_sliding_window=False)  # not a Mistral key: transformers ignores it
    assert load_config(checkpoint).sliding_window == 10
    edit_config(checkpoint, sliding_window=None)  # absent: MistralConfig's default
    assert load_config(checkpoint).sliding_window == 4096
    data = json.loads((checkpoint / "config.json").read_text())
    data["sliding_window"] = None  # null: no window
    (checkpoint / "config.json").write_text(json.dumps(data))
    assert load_config(checkpoint).sliding_window is None


def test_gemma_soft_caps_absent_take_defaults_null_turns_off(tmp_path):
    directory = tmp_path / "gemma2"
    shutil.copytree(FIXTURES / "gemma2", directory)
    edit_config(directory, attn_logit_softcapping=None, final_logit_softcapping=None)
    cfg = load_config(directory)
    assert (cfg.attn_logit_softcap, cfg.final_logit_softcap) == (50.0, 30.0)  # Gemma2Config's defaults
    data = json.loads((directory / "config.json").read_text())
    data.update(attn_logit_softcapping=None, final_logit_softcapping=None)
    (directory / "config.json").write_text(json.dumps(data))
    cfg = load_config(directory)
    assert (cfg.attn_logit_softcap, cfg.final_logit_softcap) == (None, None)


def test_gemma3_legacy_rope_keys_read_like_rope_parameters(tmp_path):
    """transformers 4.x Gemma 3 files: rope_theta (global), rope_local_base_freq, rope_scaling
    (the global layers'), sliding_window_pattern instead of layer_types."""
    directory = tmp_path / "gemma3_text"
    shutil.copytree(FIXTURES / "gemma3_text", directory)
    edit_config(directory, rope_parameters=None, layer_types=None, rope_theta=1e6, rope_local_base_freq=1e4,
                rope_scaling={"rope_type": "linear", "factor": 8.0}, sliding_window_pattern=6)
    assert load_config(directory) == load_config(FIXTURES / "gemma3_text")


@pytest.mark.parametrize("prefix", ["language_model.model.", "model.language_model."])
def test_a_multimodal_gemma3_checkpoint_serves_its_text_model(tmp_path, prefix):
    """model_type "gemma3": the text model from text_config and the tensors under the
    language model's prefix (either layout transformers uses); the vision tower and the
    projector are skipped. (scripts/make_family_fixtures.py checks transformers'
    Gemma3ForConditionalGeneration gives Gemma3ForCausalLM's text logits: multimodal_max_abs.)"""
    source = FIXTURES / "gemma3_text"
    text = json.loads((source / "config.json").read_text())
    directory = tmp_path / "gemma3"
    directory.mkdir()
    top = {"model_type": "gemma3", "architectures": ["Gemma3ForConditionalGeneration"], "text_config": text,
           "vision_config": {"model_type": "siglip_vision_model", "hidden_size": 16}, "tie_word_embeddings": True,
           "eos_token_id": [1, 106], "image_token_index": 262144}
    (directory / "config.json").write_text(json.dumps(top))
    tensors = {prefix + k[len("model."):]: v for k, v in float32_tensors(source).items()}
    tensors["vision_tower.vision_model.post_layernorm.weight"] = np.ones(16, np.float32)
    tensors["multi_modal_projector.mm_input_projection_weight"] = np.ones((16, 32), np.float32)
    save_file(tensors, str(directory / "model.safetensors"))
    cfg, params = load_model(directory)
    want_cfg, want = load_model(source)
    assert cfg.model_type == "gemma3" and cfg.eos_token_ids == (1, 106)
    assert dataclasses.replace(cfg, model_type="gemma3_text", eos_token_ids=want_cfg.eos_token_ids) == want_cfg
    assert same_params(params, want)
    top["text_config"]["model_type"] = "gemma2"
    (directory / "config.json").write_text(json.dumps(top))
    with pytest.raises(ModelLoadError, match=r"\[text_config\]: model_type='gemma2' is not supported"):
        load_config(directory)


@pytest.mark.parametrize("name,changes,named", [
    ("gemma3_text", dict(attn_logit_softcapping=50.0), "attn_logit_softcapping=50.0 is not supported for model_type "
                                                        "'gemma3_text': transformers' gemma3_text ignores it"),
    ("gemma2", dict(use_bidirectional_attention=True), "use_bidirectional_attention=true is not supported"),
    ("gemma3_text", dict(use_bidirectional_attention=True), "use_bidirectional_attention=true is not supported"),
    ("gemma2", dict(hidden_activation="gelu"), "hidden_activation='gelu' is not supported"),
    ("qwen2", dict(hidden_act="relu"), "hidden_act='relu' is not supported"),
    ("qwen2", dict(rope_parameters={"rope_type": "longrope", "rope_theta": 1e6, "factor": 4.0}), "rope_type='longrope'"),
    ("qwen3", dict(rope_parameters={"rope_type": "dynamic", "rope_theta": 1e6, "factor": 2.0}), "rope_type='dynamic'"),
    ("gemma3_text", dict(rope_parameters={"rope_type": "default", "rope_theta": 1e4}), "keys it by layer type"),
    ("gemma3_text", dict(rope_parameters={"full_attention": {"rope_type": "dynamic", "factor": 2.0}}), "'dynamic'"),
    ("qwen2", dict(layer_types=["sliding_attention"] * 3, use_sliding_window=False),
     "layer_types makes layers [0, 1, 2] sliding but there is no window"),
    ("gemma2", dict(layer_types=["chunked_attention", "full_attention"] * 2), "layer_types holds 'chunked_attention'"),
    ("gemma2", dict(layer_types=["full_attention"] * 3), "must list one type per layer (4)"),
    ("qwen2", dict(max_window_layers=-1, layer_types=None), "'max_window_layers' is -1"),
    ("qwen3", dict(head_dim=16), "'model.layers.0.self_attn.k_norm.weight' has shape (24,); config.json implies "
                                 "(16,)"),
])
def test_unsupported_family_options_are_refused_naming_them(tmp_path, name, changes, named):
    directory = tmp_path / name
    shutil.copytree(FIXTURES / name, directory)
    edit_config(directory, **changes)
    with pytest.raises(ModelLoadError) as err:
        load_model(directory)
    assert named in str(err.value)


@pytest.mark.parametrize("name", ["qwen2", "gemma3_text"])
def test_every_family_config_key_with_weird_json_loads_or_raises_model_load_error(tmp_path, name):
    """As tests/test_input_fuzz.py does for Llama and Mistral, over the keys the other
    families add (use_sliding_window, max_window_layers, layer_types and its entries,
    per-layer-type rope_parameters, soft caps, query_pre_attn_scalar, ...). Configs only:
    a config that loads is checked to build and its weights are not read."""
    directory = tmp_path / name
    shutil.copytree(FIXTURES / name, directory)
    original = json.loads((FIXTURES / name / "config.json").read_text())
    for path, literal, text in weird_configs(original, JSON_WEIRD, list_heads=True):
        (directory / "config.json").write_text(text)
        try:
            cfg = load_config(directory)
        except ModelLoadError:
            continue
        except Exception as exc:  # noqa: BLE001 - the point: no builtin error escapes
            pytest.fail(f"config {path}={literal}: {type(exc).__name__}: {exc}")
        for value in (cfg.rms_norm_eps, cfg.rope_theta, cfg.local_rope_theta or 1.0, cfg.attention_scale,
                      cfg.attn_logit_softcap or 1.0, cfg.final_logit_softcap or 1.0):
            assert np.isfinite(np.float32(value)) and value > 0, (path, literal)


# Published config.json files (weights not needed: the config alone decides the model).
PUBLISHED = {
    "Qwen2.5-0.5B-Instruct": {
        "architectures": ["Qwen2ForCausalLM"], "attention_dropout": 0.0, "bos_token_id": 151643,
        "eos_token_id": 151645, "hidden_act": "silu", "hidden_size": 896, "initializer_range": 0.02,
        "intermediate_size": 4864, "max_position_embeddings": 32768, "max_window_layers": 21, "model_type": "qwen2",
        "num_attention_heads": 14, "num_hidden_layers": 24, "num_key_value_heads": 2, "rms_norm_eps": 1e-06,
        "rope_theta": 1000000.0, "sliding_window": 32768, "tie_word_embeddings": True, "torch_dtype": "bfloat16",
        "transformers_version": "4.43.1", "use_cache": True, "use_sliding_window": False, "vocab_size": 151936},
    "Qwen3-0.6B": {
        "architectures": ["Qwen3ForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
        "bos_token_id": 151643, "eos_token_id": 151645, "head_dim": 128, "hidden_act": "silu", "hidden_size": 1024,
        "initializer_range": 0.02, "intermediate_size": 3072, "max_position_embeddings": 40960,
        "max_window_layers": 28, "model_type": "qwen3", "num_attention_heads": 16, "num_hidden_layers": 28,
        "num_key_value_heads": 8, "rms_norm_eps": 1e-06, "rope_scaling": None, "rope_theta": 1000000,
        "sliding_window": None, "tie_word_embeddings": True, "torch_dtype": "bfloat16", "use_cache": True,
        "use_sliding_window": False, "vocab_size": 151936},
    "gemma-2-2b-it": {
        "architectures": ["Gemma2ForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
        "attn_logit_softcapping": 50.0, "bos_token_id": 2, "cache_implementation": "hybrid", "eos_token_id": [1, 107],
        "final_logit_softcapping": 30.0, "head_dim": 256, "hidden_act": "gelu_pytorch_tanh",
        "hidden_activation": "gelu_pytorch_tanh", "hidden_size": 2304, "initializer_range": 0.02,
        "intermediate_size": 9216, "max_position_embeddings": 8192, "model_type": "gemma2", "num_attention_heads": 8,
        "num_hidden_layers": 26, "num_key_value_heads": 4, "pad_token_id": 0, "query_pre_attn_scalar": 256,
        "rms_norm_eps": 1e-06, "rope_theta": 10000.0, "sliding_window": 4096, "torch_dtype": "float32",
        "use_cache": True, "vocab_size": 256000},
    "gemma-3-1b-it": {
        "architectures": ["Gemma3ForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
        "attn_logit_softcapping": None, "bos_token_id": 2, "cache_implementation": "hybrid", "eos_token_id": [1, 106],
        "final_logit_softcapping": None, "head_dim": 256, "hidden_activation": "gelu_pytorch_tanh",
        "hidden_size": 1152, "initializer_range": 0.02, "intermediate_size": 6912, "max_position_embeddings": 32768,
        "model_type": "gemma3_text", "num_attention_heads": 4, "num_hidden_layers": 26, "num_key_value_heads": 1,
        "pad_token_id": 0, "query_pre_attn_scalar": 256, "rms_norm_eps": 1e-06, "rope_local_base_freq": 10000,
        "rope_scaling": None, "rope_theta": 1000000, "sliding_window": 512, "sliding_window_pattern": 6,
        "torch_dtype": "bfloat16", "use_cache": True, "vocab_size": 262144},
    "gemma-3-4b-it": {  # multimodal: the text_config gives only what differs from Gemma3TextConfig's defaults
        "architectures": ["Gemma3ForConditionalGeneration"], "boi_token_index": 255999, "eoi_token_index": 256000,
        "eos_token_id": [1, 106], "image_token_index": 262144, "initializer_range": 0.02, "mm_tokens_per_image": 256,
        "model_type": "gemma3",
        "text_config": {"hidden_size": 2560, "intermediate_size": 10240, "model_type": "gemma3_text",
                        "num_hidden_layers": 34, "rope_scaling": {"factor": 8.0, "rope_type": "linear"},
                        "sliding_window": 1024},
        "torch_dtype": "bfloat16",
        "vision_config": {"hidden_size": 1152, "image_size": 896, "intermediate_size": 4304,
                          "model_type": "siglip_vision_model", "num_attention_heads": 16, "num_hidden_layers": 27,
                          "patch_size": 14, "vision_use_head": False}},
}


@pytest.mark.parametrize("name", list(PUBLISHED))
def test_published_configs_read_as_transformers_reads_them(tmp_path, name):
    (tmp_path / "config.json").write_text(json.dumps(PUBLISHED[name]))
    cfg = load_config(tmp_path)
    if name == "Qwen2.5-0.5B-Instruct":  # sliding_window 32768 but use_sliding_window false: no window
        assert (cfg.qkv_bias, cfg.o_bias, cfg.tie_word_embeddings, cfg.head_dim) == (True, False, True, 64)
        assert cfg.sliding_window is None and cfg.layers_sliding == ()
    elif name == "Qwen3-0.6B":
        assert (cfg.qk_norm, cfg.qkv_bias, cfg.head_dim, cfg.num_heads * cfg.head_dim) == (True, False, 128, 2048)
        assert cfg.sliding_window is None and cfg.eos_token_ids == (151645,)
    elif name == "gemma-2-2b-it":
        assert (cfg.attn_logit_softcap, cfg.final_logit_softcap, cfg.query_pre_attn_scalar) == (50.0, 30.0, 256.0)
        assert cfg.layers_sliding == tuple(range(0, 26, 2)) and cfg.sliding_window == 4096
        assert cfg.eos_token_ids == (1, 107) and cfg.tie_word_embeddings
    else:
        full = (5, 11, 17, 23, 29) if name == "gemma-3-4b-it" else (5, 11, 17, 23)
        assert cfg.layers_sliding == tuple(i for i in range(cfg.num_layers) if i not in full)
        assert cfg.local_rope_theta == 1e4 and cfg.rope_theta == 1e6 and cfg.attn_logit_softcap is None
        assert cfg.eos_token_ids == (1, 106) and cfg.qk_norm and cfg.tie_word_embeddings
    if name == "gemma-3-4b-it":  # Gemma3TextConfig's defaults fill the rest
        assert (cfg.vocab_size, cfg.hidden_size, cfg.num_layers, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim) == (
            262208, 2560, 34, 8, 4, 256)
        assert cfg.sliding_window == 1024 and cfg.rope_scaling.factor == 8.0 and cfg.local_rope_scaling is None
        assert expected_shapes(cfg, "language_model.model.")["language_model.model.embed_tokens.weight"] == (
            262208, 2560)
