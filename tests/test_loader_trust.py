"""Issue 23 items 5, 8 and 9 at the model loader: a checkpoint directory is untrusted input.

Non-finite or out-of-range config numbers, weights that are not floats (or not finite),
an index naming files outside the directory, and a model larger than the machine are
each a `ModelLoadError` naming the file and the key, raised before any tensor is read
where it can be, and ``paged-kv generate`` turns each into exit status 2, not a traceback.
"""

from __future__ import annotations

import json
import math
import pathlib
import shutil

import ml_dtypes
import numpy as np
import pytest
from safetensors.numpy import save_file

import paged_kv.spec.fields as spec_fields
from paged_kv.cli import main
from paged_kv.models import loader
from paged_kv.models.loader import ModelLoadError, _read_file, expected_shapes, load_config, load_model

FIXTURES = pathlib.Path(__file__).parent / "fixtures" / "hf"


@pytest.fixture
def llama(tmp_path) -> pathlib.Path:
    """A writable copy of the llama fixture (Llama 3 RoPE scaling, tied embeddings)."""
    out = tmp_path / "llama"
    out.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(FIXTURES / "llama" / name, out / name)
    return out


def config(directory: pathlib.Path) -> dict:
    return json.loads((directory / "config.json").read_text())


def write_config(directory: pathlib.Path, data: dict) -> None:
    (directory / "config.json").write_text(json.dumps(data))  # json.dumps writes NaN / Infinity as such


def tensors(directory: pathlib.Path) -> dict[str, np.ndarray]:
    return _read_file(directory / "model.safetensors", list(expected_shapes(load_config(directory))))


def load_error(directory: pathlib.Path, match: str) -> str:
    with pytest.raises(ModelLoadError, match=match) as info:
        load_model(directory)
    return str(info.value)


# ---- item 5: config numbers ---------------------------------------------------------------------
@pytest.mark.parametrize("where", ["rms_norm_eps", "rope_parameters.rope_theta", "rope_parameters.factor",
                                   "rope_parameters.low_freq_factor", "rope_parameters.high_freq_factor"])
@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
def test_nan_and_infinity_in_config_are_refused(llama, where, value):
    data = config(llama)
    target = data
    *outer, key = where.split(".")
    for k in outer:
        target = target[k]
    target[key] = value
    write_config(llama, data)
    load_error(llama, r"config\.json: holds (NaN|Infinity|-Infinity), which is not a JSON number")


@pytest.mark.parametrize("literal, match", [
    ("1e999", "expected a finite number"),  # parses as inf without any NaN/Infinity word
    ("1e39", "expected a finite number float32 holds"),  # finite in float64, inf where the model computes
    ("1" + "0" * 400, "an integer of 401 digits; expected a finite number"),  # OverflowError from float()
    ("1" + "0" * 5000, "not readable JSON"),  # past Python's int digit limit: a ValueError, not a JSONDecodeError
])
def test_numbers_no_float32_holds_are_refused(llama, literal, match):
    text = (llama / "config.json").read_text().replace('"rms_norm_eps": 1e-05', f'"rms_norm_eps": {literal}')
    (llama / "config.json").write_text(text)
    load_error(llama, match)


@pytest.mark.parametrize("key, value, match", [
    ("num_hidden_layers", 2**31, "'num_hidden_layers' is 2147483648; expected a positive integer below 2\\*\\*31"),
    ("vocab_size", 2**63, "'vocab_size'"),
    ("eos_token_id", 2**40, "'eos_token_id'"),
    ("bos_token_id", [2**31], "'bos_token_id'"),
])
def test_integers_past_int32_are_refused(llama, key, value, match):
    data = config(llama)
    data[key] = value
    write_config(llama, data)
    load_error(llama, match)


def test_llama3_rope_needs_high_above_low_frequency_factor(llama):
    data = config(llama)
    data["rope_parameters"]["high_freq_factor"] = data["rope_parameters"]["low_freq_factor"]
    write_config(llama, data)
    load_error(llama, "high_freq_factor=1.0 must exceed low_freq_factor=1.0")


def test_deeply_nested_json_is_a_load_error(llama):
    (llama / "config.json").write_text("[" * 100_000 + "]" * 100_000)
    load_error(llama, r"config\.json: not readable JSON \(RecursionError")


# ---- items 5 and 8: weights ----------------------------------------------------------------------
@pytest.mark.parametrize("dtype, stored", [(np.bool_, "BOOL"), (np.int8, "I8"), (np.uint8, "U8"), (np.int64, "I64"),
                                           (np.complex64, "C64"), (ml_dtypes.float8_e4m3fn, "F8_E4M3"),
                                           (ml_dtypes.float8_e5m2, "F8_E5M2")])
def test_weights_stored_as_anything_but_floats_are_refused(llama, dtype, stored):
    t = tensors(llama)
    t["model.norm.weight"] = np.ones(t["model.norm.weight"].shape).astype(dtype)
    save_file(t, str(llama / "model.safetensors"))
    load_error(llama, rf"model\.safetensors: tensor 'model\.norm\.weight' is stored as {stored}; weights must be")


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_weights_that_are_not_finite_are_refused(llama, bad):
    """A NaN weight makes every logit NaN; generate would print tokens from argmax of noise."""
    t = tensors(llama)
    w = t["model.layers.1.mlp.up_proj.weight"].astype(np.float32)
    w[3, 5] = bad
    t["model.layers.1.mlp.up_proj.weight"] = w
    save_file(t, str(llama / "model.safetensors"))
    load_error(llama, r"'model\.layers\.1\.mlp\.up_proj\.weight' holds 1 values that are not finite")


def shard(llama: pathlib.Path, weight_map_value) -> None:
    """An index naming ``weight_map_value`` for one tensor and the real file for the rest."""
    names = list(tensors(llama))
    weight_map = {k: "model.safetensors" for k in names}
    weight_map[names[0]] = weight_map_value
    (llama / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))


@pytest.mark.parametrize("name", ["../outside.safetensors", "sub/../../outside.safetensors", "..", "OUTSIDE",
                                  "..\\outside.safetensors", "C:\\outside.safetensors", "a\x00b"])
def test_an_index_naming_files_outside_the_directory_is_refused(llama, tmp_path, name):
    outside = tmp_path / "outside.safetensors"
    shutil.copy(llama / "model.safetensors", outside)  # a real, loadable file: only its place is wrong
    shard(llama, str(outside) if name == "OUTSIDE" else name)
    load_error(llama, r"model\.safetensors\.index\.json: weight_map\[.*\] (names .*outside the checkpoint "
                      r"directory|is .*expected a shard file name)")


@pytest.mark.parametrize("value", [7, None, ["model.safetensors"], {"a": 1}, ""])
def test_an_index_whose_file_names_are_not_strings_is_refused(llama, value):
    shard(llama, value)
    load_error(llama, r"weight_map\[.*\] is .*; expected a shard file name")


def test_an_index_naming_a_file_in_the_directory_still_loads(llama):
    shard(llama, "model.safetensors")
    cfg, params = load_model(llama)
    assert cfg.num_layers == 2 and len(params["layers"]) == 2


# ---- item 9: a model larger than the machine -----------------------------------------------------
def test_a_model_larger_than_host_memory_is_refused_before_anything_is_read(llama, monkeypatch):
    cfg = load_config(llama)
    per_param = 4 + 4  # read as float32, loaded as float32
    need = loader.parameter_count(cfg) * per_param
    monkeypatch.setattr(spec_fields, "host_memory_bytes", lambda: need // 2)
    load_error(llama, r"config\.json: a model of 2 layers and .* parameters would take about .* GiB of host "
                      r"memory, more than this machine's")
    monkeypatch.setattr(spec_fields, "host_memory_bytes", lambda: 4 * need)
    load_model(llama)


def test_two_billion_layers_of_a_tiny_model_are_refused_at_once(llama):
    """Nine tensor names per layer would be 19 billion dict entries: refused by arithmetic."""
    data = config(llama)
    data["num_hidden_layers"] = 2**31 - 1
    write_config(llama, data)
    load_error(llama, "a model of 2,147,483,647 layers")


def test_parameter_count_is_what_expected_shapes_lists(llama):
    for tie in (True, False):
        data = config(llama)
        data["tie_word_embeddings"] = tie
        write_config(llama, data)
        cfg = load_config(llama)
        assert loader.parameter_count(cfg) == sum(math.prod(s) for s in expected_shapes(cfg).values())


# ---- the CLI: exit status 2, no traceback ----------------------------------------------------------
def test_generate_reports_fp8_weights_bad_index_and_huge_integers_with_exit_status_2(llama, capsys):
    argv = ["generate", "--checkpoint", str(llama), "--prompt-ids", "1,2", "--max-new-tokens", "2",
            "--progress", "off"]
    t = tensors(llama)
    t["model.norm.weight"] = t["model.norm.weight"].astype(np.float32).astype(ml_dtypes.float8_e4m3fn)
    save_file(t, str(llama / "fp8.safetensors"))
    (llama / "model.safetensors").rename(llama / "model.bak")
    assert main(argv) == 2
    assert "stored as F8_E4M3" in capsys.readouterr().err
    (llama / "fp8.safetensors").unlink()
    (llama / "model.bak").rename(llama / "model.safetensors")
    shard(llama, 12)
    assert main(argv) == 2
    assert "expected a shard file name" in capsys.readouterr().err
    (llama / "model.safetensors.index.json").unlink()
    text = (llama / "config.json").read_text().replace('"rms_norm_eps": 1e-05', '"rms_norm_eps": 1' + "0" * 400)
    (llama / "config.json").write_text(text)
    assert main(argv) == 2
    assert "'rms_norm_eps' is an integer of 401 digits" in capsys.readouterr().err
