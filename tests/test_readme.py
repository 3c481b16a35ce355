"""The README's commands, run as a user pastes them.

Every line of the README's ```bash / ```sh blocks is a command (a line ending in a backslash
continues on the next). This test runs the ones that need no real model, no network and no
server: `python -m mlx_mistral.generate` and `python -m mlx_mistral.memory` commands whose
`--model`, if they name one, is the built-in `demo` or the installed `smollm2`. Leading
`pip install ... &&` steps are dropped
(the test runs in the installed environment), and lines that only write a file for a later
command (`printf ... > FILE`) run first, in the same scratch directory. Everything else is
skipped: real models, `python -m app` and the server (tests/test_app.py, tests/test_server.py),
`mlx.launch` (tests/test_distributed.py), `python -m convert` (tests/test_convert.py), `curl`.
"""

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
RUN = re.compile(r"^python -m mlx_mistral\.(generate|memory)\b")
SETUP = re.compile(r"^(printf|echo) .* > [\w.-]+$")
MIN_RUN = 5  # the README has more; fewer means the rule or the README broke
QUICK_START = 'python -m mlx_mistral.generate --model smollm2 --prompt "What is the capital of France?"'


def commands(text: str) -> list[str]:
    """The commands of the ```bash / ```sh blocks, continuation lines joined, comments dropped."""
    out, block, pending = [], None, ""
    for line in text.splitlines():
        if block is None:
            if re.match(r"^```(bash|sh)\s*$", line):
                block = []
            continue
        if line.startswith("```"):
            block = None
            continue
        line = pending + line
        if line.endswith("\\"):
            pending = line[:-1].rstrip() + " "
            continue
        pending = ""
        code = without_comment(line).strip()
        if code:
            out.append(code)
    return out


def without_comment(line: str) -> str:
    """`line` up to a `#` that starts a shell comment (outside quotes, at a word's start)."""
    quote = None
    for i, c in enumerate(line):
        if quote:
            quote = None if c == quote else quote
        elif c in "'\"":
            quote = c
        elif c == "#" and (i == 0 or line[i - 1].isspace()):
            return line[:i]
    return line


def runnable(command: str) -> str | None:
    """The command to run, or None to skip it (see the module docstring)."""
    command = re.sub(r"^(pip install [^&]*&&\s*)+", "", command)
    if not RUN.match(command) or "&&" in command or "|" in command:
        return None
    model = re.search(r"--model\s+(\S+)", command)
    return command if model is None or model.group(1) in ("demo", "smollm2") else None


ALL = commands((ROOT / "README.md").read_text())
SETUPS = [c for c in ALL if SETUP.match(c)]
TO_RUN = [c for c in map(runnable, ALL) if c]


def test_the_rule_runs_enough_commands():
    assert len(TO_RUN) >= MIN_RUN, TO_RUN
    assert QUICK_START in TO_RUN
    assert "bash .ci/run" in ALL  # the test command is what CI runs


@pytest.fixture(scope="module")
def scratch(tmp_path_factory):
    """A directory with the README's setup files, and an environment whose `python` is this
    interpreter and whose mlx_mistral is this checkout's."""
    where = tmp_path_factory.mktemp("readme")
    bin_dir = where / "bin"
    bin_dir.mkdir()
    # a script, not a symlink: a venv's python run through a link elsewhere misses its pyvenv.cfg
    (bin_dir / "python").write_text(f'#!/bin/sh\nexec {shlex.quote(sys.executable)} "$@"\n')
    (bin_dir / "python").chmod(0o755)
    env = dict(os.environ, PATH=f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}", HF_HUB_OFFLINE="1",
               PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    for command in SETUPS:
        subprocess.run(["bash", "-c", command], cwd=where, env=env, check=True, timeout=10)
    return where, env


@pytest.mark.parametrize("command", TO_RUN)
def test_readme_command_runs(scratch, command):
    cwd, env = scratch
    result = subprocess.run(["bash", "-c", command], cwd=cwd, env=env, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, f"{command}\n{result.stdout[-2000:]}\n{result.stderr[-2000:]}"
    assert result.stdout.strip(), command
    if command == QUICK_START:  # the trained model answers
        assert "Paris" in result.stdout, result.stdout


def test_the_agent_setup_is_the_tested_one():
    """The README's Codex config.toml and Claude Code variables are the ones tests/test_agent_clients.py
    runs the real clients with (agent_clients.py), with the README's port and model name."""
    from agent_clients import claude_env, codex_config

    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    [toml] = re.findall(r"```toml\n(.*?)```", readme, re.S)
    assert toml == codex_config("http://127.0.0.1:8080/v1", "local")
    [claude] = [c for c in commands(readme) if c.endswith(" claude")]
    given = dict(word.split("=", 1) for word in shlex.split(claude)[:-1])
    expected = {k: v for k, v in claude_env(Path("/h"), "http://127.0.0.1:8080", "local").items()
                if k.startswith(("ANTHROPIC_", "CLAUDE_", "DISABLE_"))}
    assert given == expected | {"ANTHROPIC_AUTH_TOKEN": "unused"}
