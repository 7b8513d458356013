"""`paged-kv simulate` as a new user meets it: presets, --version, and refusals of bad
input before any long work, each with exit status 2 and a message naming the flag."""

from __future__ import annotations

import io
import json
import os

import pytest

import paged_kv
from paged_kv.cli import main
from paged_kv.cli.simulate import MAX_POOL_BYTES
from paged_kv.sim.models import DEFAULT_MODEL, MODELS, model_shape
from paged_kv.sim.output_path import OutputPathError, check_writable
from paged_kv.sim.progress import ProgressLog
from paged_kv.spec import CacheSpec

HEADER = "TIMESTAMP,ContextTokens,GeneratedTokens\n"


def run_json(capsys, *argv: str) -> dict:
    assert main(["simulate", "--json", "--progress", "off", *argv]) == 0
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def usage_error(capsys, *argv: str) -> str:
    with pytest.raises(SystemExit) as info:
        main(["simulate", *argv])
    assert info.value.code == 2
    return capsys.readouterr().err


def test_version(capsys):
    with pytest.raises(SystemExit) as info:
        main(["--version"])
    assert info.value.code == 0
    assert capsys.readouterr().out.strip() == f"paged-kv {paged_kv.__version__}"


def test_help_states_the_default_shape(capsys):
    with pytest.raises(SystemExit):
        main(["simulate", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert f"By default that is {DEFAULT_MODEL} (32 layers, 8 KV heads x 128, bfloat16: 128 KiB per token)" in out
    assert "16 GiB" in out and "--num-kv-heads" in out and "llama3-70b" in out


@pytest.mark.parametrize("name", ["llama3-70b", "qwen2-7b", "llama2-7b"])
def test_model_presets_size_the_pool(capsys, name):
    shape = MODELS[name]
    result = run_json(capsys, "--limit", "20", "--model", name)
    assert result["model"] == name
    assert result["pool_bytes"] == 8192 * 16 * 2 * shape.num_layers * shape.num_kv_heads * shape.head_dim * 2


def test_explicit_shape_flags_override_the_preset(capsys):
    result = run_json(capsys, "--limit", "20", "--model", "llama3-70b", "--num-layers", "4",
                      "--num-kv-heads", "2", "--head-dim", "64", "--kv-dtype", "float32")
    assert result["pool_bytes"] == 8192 * 16 * 2 * 4 * 2 * 64 * 4
    assert model_shape("llama3-8b", head_dim=None).head_dim == 128  # None keeps the preset's value


def test_preset_bytes_per_token_matches_cache_spec():
    for shape in MODELS.values():
        spec = CacheSpec(num_blocks=2, block_size=1, max_blocks_per_seq=1, **shape.spec_fields())
        assert shape.bytes_per_token == spec.bytes_per_token
    assert MODELS[DEFAULT_MODEL].bytes_per_token == 128 * 2**10


def test_implausible_pool_is_refused_unless_forced(capsys):
    # 8192 blocks x 4096 tokens x 128 KiB = 4 TiB.
    err = usage_error(capsys, "--block-size", "4096", "--max-seq-len", "65536")
    assert "4,096 GiB" in err and "--block-size 4096" in err and "--force" in err
    assert 8192 * 4096 * 128 * 2**10 > MAX_POOL_BYTES
    # Sized down so that the forced replay stays quick; still above the limit.
    result = run_json(capsys, "--block-size", "4096", "--max-seq-len", "65536", "--num-blocks", "2100",
                      "--limit", "5", "--force")
    assert result["pool_bytes"] > MAX_POOL_BYTES and result["requests_served"] == 5


def test_block_larger_than_a_sequence_is_refused(capsys):
    err = usage_error(capsys, "--block-size", "100000")
    assert "--block-size 100000 exceeds --max-seq-len 16384" in err


def test_too_few_blocks_names_the_flags(capsys):
    err = usage_error(capsys, "--num-blocks", "2")
    assert "--num-blocks 2" in err and "--max-seq-len 16384" in err and "--num-blocks 1025" in err
    assert "max_blocks_per_seq" not in err


def test_header_only_trace_is_an_error(tmp_path, capsys):
    path = tmp_path / "empty.csv"
    path.write_text(HEADER)
    assert main(["simulate", "--trace", str(path)]) == 2
    captured = capsys.readouterr()
    assert "no requests" in captured.err and str(path) in captured.err and captured.out == ""


def test_no_request_fits_is_an_error(tmp_path, capsys):
    path = tmp_path / "long.csv"
    path.write_text(HEADER + "2024-01-01 00:00:00.0000000,500,10\n")
    assert main(["simulate", "--trace", str(path), "--max-seq-len", "256", "--num-blocks", "64"]) == 2
    assert "--max-seq-len 256" in capsys.readouterr().err


def test_prefill_only_request_counts_its_step(tmp_path, capsys):
    path = tmp_path / "zero.csv"
    path.write_text(HEADER + "2024-01-01 00:00:00.0000000,374,0\n")
    result = run_json(capsys, "--trace", str(path))
    assert (result["steps"], result["prefill_tokens"], result["tokens_generated"]) == (1, 374, 0)


@pytest.mark.parametrize("flag", ["--plot", "--series"])
def test_bad_output_paths_fail_before_the_replay(tmp_path, capsys, monkeypatch, flag):
    def no_replay(*args, **kwargs):
        raise AssertionError("replayed before checking the output path")

    monkeypatch.setattr("paged_kv.cli.simulate.simulate", no_replay)
    missing = tmp_path / "no-such-folder" / "out.png"
    assert main(["simulate", flag, str(missing)]) == 2
    err = capsys.readouterr().err
    assert f"{flag} {missing}" in err and "does not exist" in err
    assert main(["simulate", flag, str(tmp_path)]) == 2
    assert "is a folder" in capsys.readouterr().err


def test_unknown_plot_format_fails_before_the_replay(tmp_path, capsys):
    assert main(["simulate", "--plot", str(tmp_path / "out.xyz")]) == 2
    err = capsys.readouterr().err
    assert ".xyz" in err and ".png" in err


def test_read_only_folder_is_refused(tmp_path, capsys, monkeypatch):
    """A read-only folder (and a read-only file in it) is refused, with the system's reason,
    before the replay. Root writes there anyway (CI runs as root), so the write probes
    (`open` for an existing file, a scratch file otherwise) are made to fail as the kernel
    fails them for any other user: with EACCES when the folder or file has no write bit."""
    import errno
    import re
    import stat
    import tempfile
    import types

    from paged_kv.sim import output_path

    def refuse_if_read_only(path) -> None:
        if not os.stat(path).st_mode & (stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH):
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), os.fspath(path))

    def scratch_file(*args, dir=None, **kwargs):
        refuse_if_read_only(dir)
        return tempfile.NamedTemporaryFile(*args, dir=dir, **kwargs)

    def open_file(name, mode="r", *args, **kwargs):
        if any(c in mode for c in "wax+"):
            refuse_if_read_only(name if os.path.exists(name) else os.path.dirname(os.path.abspath(name)))
        return open(name, mode, *args, **kwargs)

    monkeypatch.setattr(output_path, "tempfile", types.SimpleNamespace(NamedTemporaryFile=scratch_file))
    monkeypatch.setattr(output_path, "open", open_file, raising=False)
    monkeypatch.setattr("paged_kv.cli.simulate.simulate", lambda *a, **k: pytest.fail("replayed before the check"))
    folder = tmp_path / "ro"
    folder.mkdir()
    (folder / "old.csv").write_text("data")
    (folder / "old.csv").chmod(0o444)
    folder.chmod(0o555)
    try:
        for name in ("x.csv", "old.csv"):
            refusal = f"--series {folder / name}: cannot write there: Permission denied"
            with pytest.raises(OutputPathError, match=re.escape(refusal)):
                check_writable(folder / name, "--series")
            assert main(["simulate", "--series", str(folder / name)]) == 2
            assert refusal in capsys.readouterr().err
        check_writable(tmp_path / "x.csv", "--series")  # a writable folder still passes the probes
    finally:
        folder.chmod(0o755)
    assert sorted(p.name for p in folder.iterdir()) == ["old.csv"] and (folder / "old.csv").read_text() == "data"


def test_write_check_leaves_nothing_behind(tmp_path):
    existing = tmp_path / "keep.csv"
    existing.write_text("data")
    check_writable(existing, "--series")
    check_writable(tmp_path / "new.csv", "--series")
    assert [p.name for p in tmp_path.iterdir()] == ["keep.csv"] and existing.read_text() == "data"


def test_progress_log_prints_plain_lines(monkeypatch):
    clock = iter([0.0, 5.0, 11.0, 12.0, 25.0, 25.5, 26.0])
    monkeypatch.setattr("paged_kv.sim.progress.time.perf_counter", lambda: next(clock))
    out = io.StringIO()
    log = ProgressLog("paged", stream=out, every_s=10.0)  # started at 0
    log(10, 100)  # 5 s: quiet
    log(40, 100)  # 11 s: a line
    log(50, 100)  # 12 s: quiet
    log(90, 100)  # 25 s: a line
    log(100, 100)  # 25.5 s: quiet
    log.close()  # 26 s: the final count
    assert out.getvalue().splitlines() == [
        "paged: 40/100 requests (40%), 11.0 s, ETA 16.5 s",  # 40 in 11 s: 60 more take 16.5 s
        "paged: 90/100 requests (90%), 25.0 s, ETA 2.8 s",
        "paged: 100/100 requests (100%), 26.0 s",
    ]


def test_progress_lines_when_stderr_is_not_a_terminal(monkeypatch, capsys):
    monkeypatch.setattr("paged_kv.cli.simulate.PROGRESS_LOG_S", 0.0)  # a line at every progress call
    assert main(["simulate", "--limit", "60", "--compare", "--json"]) == 0
    lines = capsys.readouterr().err.splitlines()
    for backend in ("paged", "contiguous-max-len", "contiguous-first-fit"):
        mine = [line for line in lines if line.startswith(f"paged-kv simulate: {backend}: ")]
        assert mine and mine[-1].startswith(f"paged-kv simulate: {backend}: 60/60 requests (100%)")
    assert not any("\r" in line for line in lines)  # plain lines, no redrawn bar


def test_short_replay_with_stderr_not_a_terminal_says_once_that_it_ran(capsys):
    """Under PROGRESS_LOG_S a replay writes no periodic line, but its final count once
    (it used to print nothing, which cannot be told from a replay that never started)."""
    assert main(["simulate", "--limit", "30", "--json"]) == 0
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("paged-kv simulate: paged: 30/30 requests (100%), ")
