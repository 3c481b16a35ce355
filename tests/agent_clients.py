"""The real agent clients the tests run: Claude Code and Codex CLI, pinned, installed from npm into
~/.cache/mlx-mistral/agents (`python tests/agent_clients.py` installs them; .ci/run does), and the
environments that keep their traffic on 127.0.0.1.

npm's native platform packages hold both binaries (no install scripts needed). Claude Code is told
by environment variables to send no telemetry, error reports or update checks; Codex by its
config.toml: `[analytics] enabled = false` (its OpenTelemetry metrics) and `[features] plugins =
false` (its curated-plugin sync, which fetches github.com, api.github.com, chatgpt.com), checked
with strace: with both its only connections are to 127.0.0.1.
"""

import os
import shutil
import subprocess
import sys
from pathlib import Path

CLAUDE_CODE, CODEX = "@anthropic-ai/claude-code@2.1.197", "@openai/codex@0.171.0"
HOME = Path.home() / ".cache" / "mlx-mistral" / "agents"
BINARIES = {"claude": HOME / "node_modules" / ".bin" / "claude", "codex": HOME / "node_modules" / ".bin" / "codex"}
REQUIRED = "MLX_MISTRAL_REQUIRE_AGENTS"  # set (by .ci/run): a missing client fails its tests, never skips them


def install() -> str | None:
    """Install the pinned clients unless they are there; the reason they cannot be, else None."""
    if all(path.exists() for path in BINARIES.values()):
        return None
    if shutil.which("npm") is None:
        return "npm is not installed (the agent-client tests need it to install Claude Code and Codex)"
    HOME.mkdir(parents=True, exist_ok=True)  # npm keeps the caller's HOME: its ~/.npmrc may name a CA file
    env = {key: value for key, value in os.environ.items() if key != "LD_PRELOAD"}
    subprocess.run(["npm", "install", "--prefix", str(HOME), "--no-audit", "--no-fund", "--loglevel=error",
                    CLAUDE_CODE, CODEX], check=True, env=env)
    return None


def clean_env(home: Path | None = None, **extra: str) -> dict:
    """An environment for a client: PATH and the locale only (never an LD_PRELOAD of OpenBLAS:
    node's and the clients' threads fail under it), HOME a temporary directory of its own."""
    env = {key: os.environ[key] for key in ("PATH", "LANG", "TERM") if key in os.environ}
    return env | {"SHELL": "/bin/bash"} | ({"HOME": str(home)} if home else {}) | extra


def claude_env(home: Path, base_url: str, model: str) -> dict:
    return clean_env(home, ANTHROPIC_BASE_URL=base_url, ANTHROPIC_AUTH_TOKEN="any", ANTHROPIC_MODEL=model,
                     CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC="1", DISABLE_TELEMETRY="1",
                     DISABLE_ERROR_REPORTING="1", DISABLE_AUTOUPDATER="1")


def codex_env(home: Path, base_url: str, model: str) -> dict:
    """Codex's environment, its config.toml written in CODEX_HOME (home/.codex)."""
    codex_home = home / ".codex"
    codex_home.mkdir(parents=True, exist_ok=True)
    (codex_home / "config.toml").write_text(codex_config(base_url, model), encoding="utf-8")
    return clean_env(home, CODEX_HOME=str(codex_home), OPENAI_API_KEY="any")


def codex_config(base_url: str, model: str) -> str:
    """The config.toml the README gives for Codex on this server (base_url ends in /v1)."""
    return f'''model = "{model}"
model_provider = "mlx-mistral"
check_for_update_on_startup = false

[analytics]
enabled = false

[features]
plugins = false

[model_providers.mlx-mistral]
name = "mlx-mistral"
base_url = "{base_url}"
wire_api = "responses"
'''


if __name__ == "__main__":
    reason = install()
    print(reason or f"{CLAUDE_CODE} and {CODEX} are in {HOME}")
    sys.exit(1 if reason else 0)
