"""README.md works as written.

Every ```python block runs, in order, in one fresh interpreter (one namespace, so a
block may use what an earlier one defined; its own process, so JAX starts clean), in
a scratch folder, and leaves nothing there; a failure's traceback names the README
line. Every ```bash block is checked command by command without installing anything:
``pip install`` names only extras pyproject.toml defines, the ``paged-kv`` /
``python -m paged_kv`` arguments parse, ``python -m pytest`` selects only registered
markers, and scripts it runs exist. Then every bash command that needs no network
and names no placeholder runs, in a scratch folder, and must leave every tracked
file as it was. CI (``.ci/run``) must run the README's test command verbatim.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from paged_kv.cli import build_parser

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"


def code_blocks(lang: str) -> list[tuple[int, str]]:
    """``(first line number, text)`` of every fenced block of ``lang`` in README.md."""
    text = README.read_text(encoding="utf-8")
    found = []
    for match in re.finditer(rf"^```{lang}\n(.*?)^```", text, re.S | re.M):
        found.append((text.count("\n", 0, match.start()) + 2, match.group(1)))
    return found


def pyproject() -> dict:
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
    return tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))


# Runs the blocks in one namespace; each is compiled as README.md with its real line
# numbers, so a traceback points at the README line that failed.
RUNNER = """
import json, sys
namespace = {"__name__": "__main__"}
for line, code in json.load(open(sys.argv[1])):
    exec(compile("\\n" * (line - 1) + code, "README.md", "exec"), namespace)
"""


def test_python_blocks_run_as_written(tmp_path):
    blocks = code_blocks("python")
    assert len(blocks) >= 5, "README.md lost its python examples"
    (tmp_path / "blocks.json").write_text(json.dumps(blocks), encoding="utf-8")
    # A newcomer runs the blocks from the checkout's root; the files they write go to
    # a scratch directory that sees the checkout's fixtures under the same name.
    (tmp_path / "tests").symlink_to(ROOT / "tests", target_is_directory=True)
    env = {**os.environ, "JAX_PLATFORMS": "cpu",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    result = subprocess.run([sys.executable, "-c", RUNNER, "blocks.json"], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, f"README python blocks failed:\n{result.stderr[-6000:]}"
    # A newcomer pastes the blocks into a shell in the checkout: whatever they write
    # (a checkpoint, say) must go to a temporary folder, not where they stand.
    left = sorted(p.name for p in tmp_path.iterdir())
    assert left == ["blocks.json", "tests"], f"README python blocks left {left} in the folder they ran in"


def _check_pip(args: list[str]) -> None:
    assert args[:1] == ["install"] and len(args) == 2, f"pip {shlex.join(args)}: expected 'pip install .[extras]'"
    match = re.fullmatch(r"\.(?:\[([\w,-]+)\])?", args[1])
    assert match, f"pip install {args[1]}: the README installs this checkout ('.' or '.[extra]')"
    extras = set(filter(None, (match.group(1) or "").split(",")))
    defined = set(pyproject()["project"].get("optional-dependencies", {}))
    assert extras <= defined, f"pip install {args[1]}: extras {sorted(extras - defined)} not in pyproject.toml"


def _check_pytest(args: list[str]) -> None:
    registered = {line.split(":")[0].strip()
                  for line in pyproject()["tool"]["pytest"]["ini_options"].get("markers", [])}
    words = iter(args)
    for word in words:
        if word == "-m":
            expression = next(words)
            used = set(re.findall(r"[A-Za-z_]\w*", expression)) - {"and", "or", "not"}
            assert used <= registered, f"pytest -m {expression!r}: markers {sorted(used - registered)} not registered"
        elif not word.startswith("-"):
            assert (ROOT / word.split("::")[0]).exists(), f"pytest {word}: no such test path"


def _check_command(command: str) -> None:
    words = shlex.split(command)
    if words[:3] == ["python", "-m", "pytest"]:
        _check_pytest(words[3:])
    elif words[:3] == ["python", "-m", "paged_kv"] or words[:1] == ["paged-kv"]:
        assert "paged-kv" in pyproject()["project"]["scripts"]
        build_parser().parse_args(words[3:] if words[0] == "python" else words[1:])  # SystemExit(2) if bad
    elif words[:1] == ["pip"]:
        _check_pip(words[1:])
    elif words[:1] == ["python"] and len(words) >= 2 and words[1].endswith(".py"):
        assert (ROOT / words[1]).is_file(), f"{command}: no such script"
    else:
        raise AssertionError(f"README bash command {command!r}: this test does not know how to check it")


def test_bash_blocks_name_real_commands():
    blocks = code_blocks("bash")
    assert blocks, "README.md lost its commands"
    for _, code in blocks:
        for line in code.splitlines():
            line = line.split(" #", 1)[0].strip()
            if line:
                for command in line.split("&&"):
                    _check_command(command.strip())


def test_ci_runs_the_readme_test_command():
    commands = [line.strip() for _, code in code_blocks("bash") for line in code.splitlines()]
    ci = [line.strip() for line in (ROOT / ".ci" / "run").read_text().splitlines()
          if line.strip() and not line.lstrip().startswith("#")]
    assert ci[-1] in commands, f".ci/run's test command {ci[-1]!r} is not one of the README's"
    assert ci[-1].endswith("python -m pytest -q"), "CI must run the whole suite, unfiltered"


# ---- the bash blocks, run -------------------------------------------------------------

PLACEHOLDER = re.compile(r"^[A-Z][A-Z_]+$")
"""A word the reader replaces (``DIR``, ``PATH``): its command cannot run as written."""

SLOW_COMMANDS = {
    "python -m paged_kv simulate --compare": "replays the whole bundled trace three times (~10 s CPU)",
    "python benchmarks/run_all.py --only": "runs a benchmark in a subprocess (~6 s CPU and its start-up)",
}
"""Commands (by prefix) that run in the slow tier only: the quick tier stays quick."""


def runnable_commands() -> list[str]:
    """The README's bash commands that run offline as written: not ``pip install``
    (the network), not ``python -m pytest`` (the suite itself), none with a placeholder."""
    out = []
    for _, code in code_blocks("bash"):
        for line in code.splitlines():
            line = line.split(" #", 1)[0].strip()
            for command in filter(None, (c.strip() for c in line.split("&&"))):
                words = shlex.split(command)
                if words[0] == "pip" or words[:3] == ["python", "-m", "pytest"]:
                    continue
                if any(PLACEHOLDER.match(w) for w in words):
                    continue
                out.append(command)
    return out


def _params() -> list:
    return [pytest.param(c, marks=[pytest.mark.slow] if any(c.startswith(k) for k in SLOW_COMMANDS) else [], id=c)
            for c in runnable_commands()]


def _tracked_changes() -> str:
    """``git status`` of the tracked files: which differ from the last commit."""
    result = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                            capture_output=True, text=True, timeout=60)
    if result.returncode:
        pytest.skip(f"not a git checkout ({result.stderr.strip()}): cannot tell whether tracked files changed")
    return result.stdout


def test_slow_commands_name_readme_commands():
    commands = runnable_commands()
    assert len(commands) >= 3, "README.md lost the commands a newcomer runs"
    stale = [k for k in SLOW_COMMANDS if not any(c.startswith(k) for c in commands)]
    assert not stale, f"SLOW_COMMANDS names no README command: {stale}"


@pytest.mark.parametrize("command", _params())
def test_bash_command_runs_and_changes_no_tracked_file(command, tmp_path):
    if shutil.which("git") is None:
        pytest.skip("git is not installed: cannot tell whether tracked files changed")
    before = _tracked_changes()
    # The commands name checkout paths (fixtures, scripts) as seen from its root; a
    # scratch folder that shows those under the same names catches anything they write.
    for name in ("tests", "benchmarks", "examples", "scripts"):
        if (ROOT / name).is_dir():
            (tmp_path / name).symlink_to(ROOT / name, target_is_directory=True)
    words = shlex.split(command)
    argv = ([sys.executable, "-m", "paged_kv", *words[1:]] if words[0] == "paged-kv"
            else [sys.executable, *words[1:]] if words[0] == "python" else words)
    env = {**os.environ, "JAX_PLATFORMS": "cpu",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    result = subprocess.run(argv, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, f"{command}: exit {result.returncode}\n{(result.stdout + result.stderr)[-4000:]}"
    assert _tracked_changes() == before, f"{command} changed tracked files:\n{_tracked_changes()}"


def test_the_model_size_comment_is_right():
    """The README's rule of thumb for a 1B model is `CacheSpec.for_memory`'s answer."""
    from paged_kv import CacheSpec
    from paged_kv.sim.models import MODELS

    match = re.search(r"1B in bf16 \(([\d.]+) KiB a token\): num_blocks ~ ([\d,]+) per 8 GiB",
                      README.read_text(encoding="utf-8"))
    assert match, "README.md lost its 1B-model sizing comment"
    shape = MODELS["llama3.2-1b"]
    spec = CacheSpec.for_memory(8 * 2**30, block_size=16, **shape.spec_fields())
    assert float(match.group(1)) == shape.bytes_per_token / 2**10
    said = int(match.group(2).replace(",", ""))
    assert abs(said - spec.num_blocks) <= 0.01 * spec.num_blocks, (said, spec.num_blocks)
