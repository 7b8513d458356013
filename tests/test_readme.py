"""README.md works as written.

Every ```python block runs, in order, in one fresh interpreter (one namespace, so a
block may use what an earlier one defined; its own process, so JAX starts clean), in
a scratch folder; a failure's traceback names the README line. Every ```bash block is checked command by command without
installing anything: ``pip install`` names only extras pyproject.toml defines, the
``paged-kv`` / ``python -m paged_kv`` arguments parse, ``python -m pytest`` selects
only registered markers, and scripts it runs exist. CI (``.ci/run``) must run the
README's test command verbatim.
"""

from __future__ import annotations

import json
import os
import re
import shlex
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
