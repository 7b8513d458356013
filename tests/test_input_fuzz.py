"""Every host entry point, fed values of the wrong type or range: a typed error or a
success, never a builtin exception, and a failed call changes nothing.

The bad-input table (`test_bad_input.py`) pins the exact error and message of named
cases; this sweep covers the class: each argument of each call takes every value of
`WEIRD` (None, bools, floats, NaN, strings, nested lists, float arrays, numpy
integers that overflow int64, huge Python ints, objects).
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest

import paged_kv as pk
from paged_kv import DecodeSlots

WEIRD = [None, -1, True, 1.5, "x", [], [[1]], np.array([1.0]), 2**70, float("nan"), {}, (1,), np.int64(-5),
         np.uint64(2**64 - 1), object(), 0, 10**9]
SECOND = [None, 1, -1, "x", [1, 1]]


def env():
    spec = pk.CacheSpec(num_layers=2, num_blocks=17, block_size=4, max_blocks_per_seq=6, max_batch_slots=4,
                        num_kv_heads=2, head_dim=4, dtype="float32", sliding_window=8, sliding_layers=(1,))
    m = pk.KVCacheManager(spec)
    m.admit(1, 5)
    m.admit(2, 3)
    slots = DecodeSlots(m)
    slots.insert(1, 0)
    pspec = pk.CacheSpec(num_layers=1, num_blocks=17, block_size=4, max_blocks_per_seq=6, num_kv_heads=1,
                         head_dim=2, dtype="float32")
    pm = pk.KVCacheManager(pspec, prefix_cache=True)
    pm.admit_prompt(1, np.arange(5))
    return spec, m, slots, pm


CALLS = {
    "admit": lambda e, a, b: e[1].admit(a, b),
    "append": lambda e, a, b: e[1].append(a, b),
    "can_admit": lambda e, a, b: e[1].can_admit(a),
    "can_append": lambda e, a, b: e[1].can_append(a, b),
    "release": lambda e, a, b: e[1].release(a),
    "kv_len": lambda e, a, b: e[1].kv_len(a),
    "block_table": lambda e, a, b: e[1].block_table(b, a),
    "step_metadata": lambda e, a, b: e[1].step_metadata(a, b),
    "commit": lambda e, a, b: e[1].commit(a, b),
    "fork": lambda e, a, b: e[1].fork(a, b),
    "swap_out": lambda e, a, b: e[1].swap_out(a),
    "swap_in": lambda e, a, b: e[1].swap_in(a),
    "can_swap_in": lambda e, a, b: e[1].can_swap_in(a),
    "admit_prompt": lambda e, a, b: e[3].admit_prompt(9, a, chunk=b),
    "admit_prompt_cache_key": lambda e, a, b: e[3].admit_prompt(b, [1, 2, 3], cache_key=a),
    "can_admit_prompt": lambda e, a, b: e[3].can_admit_prompt(a, chunk=b),
    "cache_tokens": lambda e, a, b: e[3].cache_tokens(a, b),
    "slots.insert": lambda e, a, b: e[2].insert(a, b),
    "slots.remove": lambda e, a, b: e[2].remove(a),
    "slots.release": lambda e, a, b: e[2].release(a),
    "slots.slot_of": lambda e, a, b: e[2].slot_of(a),
    "slots.seq_at": lambda e, a, b: e[2].seq_at(a),
    "slots.step_metadata": lambda e, a, b: e[2].step_metadata(a),
    "slots.can_insert": lambda e, a, b: e[2].can_insert(a, b),
    "DecodeSlots": lambda e, a, b: DecodeSlots(e[1], a),
    "slot_step_metadata": lambda e, a, b: pk.slot_step_metadata(e[1], a, b),
    "spec.blocks_for": lambda e, a, b: e[0].blocks_for(a),
    "spec.group_of": lambda e, a, b: e[0].group_of(a),
    "spec.window_blocks": lambda e, a, b: e[0].window_blocks(a),
    "CacheSpec.for_memory": lambda e, a, b: pk.CacheSpec.for_memory(a, num_layers=2, block_size=4, num_kv_heads=1,
                                                                    head_dim=2),
    "CacheSpec.num_blocks": lambda e, a, b: pk.CacheSpec(num_layers=2, num_blocks=a, block_size=4,
                                                         max_blocks_per_seq=2, num_kv_heads=1, head_dim=2),
    "CacheSpec.window": lambda e, a, b: pk.CacheSpec(num_layers=2, num_blocks=9, block_size=4, max_blocks_per_seq=2,
                                                     num_kv_heads=1, head_dim=2, sliding_window=a, sliding_layers=b),
    "CacheSpec.dtype": lambda e, a, b: pk.CacheSpec(num_layers=2, num_blocks=9, block_size=4, max_blocks_per_seq=2,
                                                    num_kv_heads=1, head_dim=2, dtype=a),
    "KVCacheManager": lambda e, a, b: pk.KVCacheManager(a, b),
    "PagedKVCache.init.layout": lambda e, a, b: pk.PagedKVCache.init(e[0], layout=a),
    "bucket": lambda e, a, b: pk.bucket(a, b),
}


def _state(e):
    return e[1].snapshot(), e[2].snapshot(), e[3].snapshot()


@pytest.mark.parametrize("name", sorted(CALLS))
def test_weird_arguments_raise_typed_errors_and_change_nothing(name):
    call = CALLS[name]
    for a, b in itertools.product(WEIRD, SECOND):
        e = env()
        before = _state(e)
        try:
            call(e, a, b)
        except pk.PagedKVError:
            assert _state(e) == before, f"{name}({a!r}, {b!r}) raised but changed state"
        except Exception as exc:  # noqa: BLE001 - the point: no builtin error escapes
            pytest.fail(f"{name}({a!r}, {b!r}) raised {type(exc).__name__}: {exc}")
        e[1].check_integrity()
        e[2].check_integrity()
        e[3].check_integrity()


# ---- files and flags from outside (issue 23): by construction over what each entry point reads ----
# Each class enumerates its entry point's inputs from the thing itself (every key of a real
# config.json, every int flag of the parsers, every column of a trace, every member of a
# saved checkpoint), so a key, flag, column or member added later is fuzzed without an edit.
import io  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import pathlib  # noqa: E402
import shutil  # noqa: E402
import zipfile  # noqa: E402

import paged_kv.spec.fields as spec_fields  # noqa: E402
from hf_fixtures import JSON_WEIRD, weird_configs  # noqa: E402

FIXTURES = pathlib.Path(__file__).parent / "fixtures" / "hf"
@pytest.mark.parametrize("model", ["llama", "mistral"])
def test_every_config_key_with_weird_json_loads_or_raises_model_load_error(tmp_path, model):
    from paged_kv.models.loader import ModelLoadError, load_model

    directory = tmp_path / model
    shutil.copytree(FIXTURES / model, directory)
    original = json.loads((FIXTURES / model / "config.json").read_text())
    for path, literal, text in weird_configs(original, JSON_WEIRD):
        (directory / "config.json").write_text(text)
        try:
            cfg, params = load_model(directory)
        except ModelLoadError:
            continue
        except Exception as exc:  # noqa: BLE001 - the point: no builtin error escapes
            pytest.fail(f"config {'.'.join(path)}={literal}: {type(exc).__name__}: {exc}")
        for name in ("rms_norm_eps", "rope_theta"):  # a model that loads computes with finite numbers
            assert np.isfinite(np.float32(getattr(cfg, name))), (path, literal)


@pytest.mark.parametrize("value", [7, None, [], "", "../model.safetensors", "/etc/passwd", "a\x00b", "x" * 5000])
def test_weird_index_file_names_raise_model_load_error(tmp_path, value):
    from paged_kv.models.loader import ModelLoadError, load_model

    directory = tmp_path / "llama"
    shutil.copytree(FIXTURES / "llama", directory)
    (directory / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"model.norm.weight": value}}))
    with pytest.raises(ModelLoadError):
        load_model(directory)


# Int flags that size nothing by themselves: huge values of these run (they reach the
# tripwire). Every other int flag sizes memory and must be refused with status 2 where it
# applies (--requests with a synthetic trace, --sessions with the multi-turn workload).
SIZELESS_FLAGS = {"--seed", "--limit", "--sliding-window", "--full-every", "--token-budget", "--prefill-chunk"}
CONTEXTS = {"simulate": [["--trace", "synthetic"], ["--workload", "multiturn"], []], "generate": [[]]}


def _int_flags(command: str) -> list[str]:
    from paged_kv.cli import build_parser
    from paged_kv.cli.arguments import positive_int

    sub = next(a for a in build_parser()._actions if a.dest == "command").choices[command]
    return [a.option_strings[-1] for a in sub._actions if a.type in (int, positive_int)]


@pytest.mark.parametrize("command", ["simulate", "generate"])
def test_every_int_flag_at_huge_values_is_refused_or_sizes_nothing(command, monkeypatch, capsys):
    import paged_kv.cli.simulate as simulate
    import paged_kv.models.generate as generate
    from paged_kv.cli import main

    class Tripped(Exception):
        pass

    def tripwire(*args, **kwargs):
        raise Tripped

    monkeypatch.setattr(spec_fields, "host_memory_bytes", lambda: 2**30)
    for module, name in ((simulate, "_workload"), (simulate, "_replay"), (generate.Generator, "__init__")):
        monkeypatch.setattr(module, name, tripwire)
    base = ["simulate", "--progress", "off"] if command == "simulate" else \
        ["generate", "--checkpoint", str(FIXTURES / "llama"), "--prompt-ids", "1,2", "--progress", "off"]
    flags = _int_flags(command)
    assert "--num-blocks" in flags and "--max-batch" in flags
    for flag in flags:
        for value in (2**31 - 1, 10**12, 10**30):
            statuses = []
            for context in CONTEXTS[command]:
                try:
                    status = main([*base, *context, flag, str(value)])
                except SystemExit as exc:
                    status = exc.code
                except Tripped:
                    status = "ran"
                except Exception as exc:  # noqa: BLE001
                    pytest.fail(f"{command} {context} {flag} {value}: {type(exc).__name__}: {exc}")
                capsys.readouterr()
                assert status in (2, "ran"), (flag, value, context, status)
                statuses.append(status)
            if flag in SIZELESS_FLAGS:
                assert set(statuses) == {"ran"}, (flag, value, statuses)
            else:
                assert 2 in statuses, (flag, value, "ran everywhere: a size flag nothing checks")


TRACE_WEIRD = ["", "NaT", "2500-01-01", "1600-01-01 00:00:00", "9999-12-31 23:59:59.9999999", "-1", "1e400",
               "99999999999999999999", "nan", "inf", "\x00", "2023-13-45", "0x10", " 5 ", "\u0661\u0662", "2262-04-12"]


def test_every_trace_column_with_weird_values_loads_or_raises_trace_error(tmp_path):
    from paged_kv.sim.trace import CANCEL_COLUMN, COLUMNS, Trace, load_trace

    good = {"TIMESTAMP": "2023-11-16 18:15:46.6805900", "ContextTokens": "5", "GeneratedTokens": "3",
            CANCEL_COLUMN: "-1"}
    header = [*COLUMNS, CANCEL_COLUMN]
    assert set(header) == set(good)
    path = tmp_path / "t.csv"
    for column in header:
        for value in TRACE_WEIRD:
            row = [good[c] if c != column else value for c in header]
            path.write_text(",".join(header) + "\n" + ",".join(good[c] for c in header) + "\n" + ",".join(row) + "\n",
                            encoding="utf-8")
            try:
                trace = load_trace(path)
            except pk.PagedKVError:
                continue
            except Exception as exc:  # noqa: BLE001
                pytest.fail(f"{column}={value!r}: {type(exc).__name__}: {exc}")
            back = tmp_path / "back.csv"
            trace.to_csv(back)  # a trace that loads writes back the times it read, never wrapped ones
            again = load_trace(back)
            assert again.start == trace.start and np.array_equal(again.arrival_s, trace.arrival_s)
            assert np.datetime64("1677-09-22") < trace.start < np.datetime64("2262-04-11")
    for start in TRACE_WEIRD + [10**30, -(10**30), 1.5, object()]:
        try:
            Trace([0.0], [5], [3], start)
        except pk.PagedKVError:
            pass
        except Exception as exc:  # noqa: BLE001
            pytest.fail(f"Trace(start={start!r}): {type(exc).__name__}: {exc}")


def _member_variants(data: bytes) -> dict[str, bytes]:
    """Ways one .npy member of a checkpoint can be damaged or forged."""
    def header(shape, descr):
        out = io.BytesIO()
        np.lib.format.write_array_header_1_0(out, {"descr": descr, "fortran_order": False, "shape": shape})
        return out.getvalue()

    return {"truncated": data[: len(data) // 2], "empty": b"", "garbage": b"\x93NUMPY\x07\x00" + data[8:],
            "32 TiB": header((2**45,), "|u1") + data[-16:], "int64 overflow": header((2**62, 8), "<f8"),
            "object dtype": header((2,), "|O") + b"\0" * 16, "negative": header((-1,), "<i8")}


def test_every_checkpoint_member_damaged_raises_checkpoint_error(tmp_path):
    spec = pk.CacheSpec(num_layers=1, num_blocks=9, block_size=4, max_blocks_per_seq=4, max_batch_slots=2,
                        num_kv_heads=1, head_dim=4, dtype="float32")
    m = pk.KVCacheManager(spec, prefix_cache=True)
    m.admit_prompt(1, np.arange(9))
    slots = DecodeSlots(m)
    slots.insert(1, 0)
    src = tmp_path / "ck.npz"
    pk.save_checkpoint(src, pk.PagedKVCache.init(spec), m, slots)
    with zipfile.ZipFile(src) as z:
        members = {info.filename: z.read(info) for info in z.infolist()}
    assert len(members) > 10
    dst = tmp_path / "bad.npz"
    for name, data in members.items():
        for what, forged in _member_variants(data).items():
            with zipfile.ZipFile(dst, "w") as z:
                for other, content in members.items():
                    z.writestr(other, forged if other == name else content)
            try:
                pk.load_checkpoint(dst)
            except pk.CheckpointError:
                continue
            except Exception as exc:  # noqa: BLE001
                pytest.fail(f"member {name} {what}: {type(exc).__name__}: {exc}")
            pytest.fail(f"member {name} {what}: loaded")


@pytest.mark.parametrize("path", [None, 1, 1.5, b"x\x00y", "x\x00y", "", "/nonexistent-dir/x.npz", object(),
                                  ["x"], pathlib.Path("a\x00b")])
def test_weird_checkpoint_paths_raise_checkpoint_error_and_write_nothing(tmp_path, path, monkeypatch):
    spec = pk.CacheSpec(num_layers=1, num_blocks=9, block_size=4, max_blocks_per_seq=4, num_kv_heads=1, head_dim=4,
                        dtype="float32")
    monkeypatch.chdir(tmp_path)
    for call in (lambda: pk.save_checkpoint(path, pk.PagedKVCache.init(spec), pk.KVCacheManager(spec)),
                 lambda: pk.load_checkpoint(path)):
        try:
            call()
        except pk.CheckpointError:
            pass
        except Exception as exc:  # noqa: BLE001
            pytest.fail(f"path {path!r}: {type(exc).__name__}: {exc}")
        assert os.listdir(tmp_path) == []
