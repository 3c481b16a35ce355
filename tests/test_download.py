"""Hub downloads (huggingface_hub mocked: no network) fetch one copy of the weights, and a local
directory holding both layouts loads the Hugging Face one."""

import json
import shutil

import huggingface_hub
import pytest

from checkpoints import to_original
from mlx_mistral import MistralError, load
from mlx_mistral.loading import download, read_checkpoint, resolve

TOKENIZERS = ["tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"]
# mistralai/Mistral-Small-Instruct-2409's files (both layouts: 89 GB if all are fetched)
SMALL_2409 = ["config.json", "generation_config.json", "params.json", "consolidated.safetensors",
              "model-00001-of-00009.safetensors", "model-00009-of-00009.safetensors",
              "model.safetensors.index.json", "tokenizer.model.v3", "README.md", ".gitattributes", *TOKENIZERS]
MAGISTRAL = ["params.json", "consolidated.safetensors", "tekken.json", "SYSTEM_PROMPT.txt", "README.md",
             "config.json", "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors",
             "model.safetensors.index.json", "original/consolidated.safetensors"]


@pytest.fixture
def hub(monkeypatch, tmp_path):
    """The repo's file list, and the allow_patterns each snapshot_download got (None: from the cache)."""
    calls, files = [], []

    def snapshot(repo_id, allow_patterns=None, local_files_only=False):
        calls.append(None if local_files_only else allow_patterns)
        if local_files_only:
            raise huggingface_hub.errors.LocalEntryNotFoundError("not in the cache")
        return str(tmp_path)

    def list_files(self, repo_id):
        if not files:
            raise huggingface_hub.errors.OfflineModeIsEnabled("offline")
        return files
    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot)
    monkeypatch.setattr(huggingface_hub.HfApi, "list_repo_files", list_files)
    return files, calls


@pytest.mark.parametrize("repo, expected", [
    (SMALL_2409, ["config.json", "generation_config.json", "model-00001-of-00009.safetensors",
                  "model-00009-of-00009.safetensors", "model.safetensors.index.json", "params.json",
                  "special_tokens_map.json", "tokenizer.json", "tokenizer.model.v3", "tokenizer_config.json"]),
    (MAGISTRAL, ["SYSTEM_PROMPT.txt", "config.json", "model-00001-of-00002.safetensors",
                 "model-00002-of-00002.safetensors", "model.safetensors.index.json", "params.json", "tekken.json"]),
    (["params.json", "consolidated.safetensors", "tekken.json", "README.md"],
     ["consolidated.safetensors", "params.json", "tekken.json"]),  # the original layout alone
    (["config.json", "model.safetensors", *TOKENIZERS], ["config.json", "model.safetensors", *sorted(TOKENIZERS)]),
])
def test_a_repo_downloads_one_copy_of_the_weights(hub, repo, expected):
    files, calls = hub
    files.extend(repo)
    download("org/model")
    assert calls == [expected]


def test_a_repo_without_loadable_weights_is_refused(hub):
    files, calls = hub
    files.extend(["config.json", "pytorch_model.bin", "tokenizer.json"])
    with pytest.raises(MistralError, match="^model 'org/model': the Hub repo has no weights this loads"):
        download("org/model")
    assert calls == []


def test_offline_uses_the_cache_or_fails_in_one_line(hub):
    with pytest.raises(MistralError) as e:
        resolve("org/model")
    assert hub[1] == [None]  # the cache was tried
    assert str(e.value).startswith("model 'org/model' is not a local path and could not be downloaded")
    assert "\n" not in str(e.value)


def test_a_hub_gguf_file_offline_fails_in_one_line(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(MistralError) as e:
        resolve("org/model-GGUF/model-Q4_0.gguf")
    assert str(e.value).startswith("model 'org/model-GGUF/model-Q4_0.gguf' is not a local path and could not be "
                                   "downloaded from the Hugging Face Hub (offline or unreachable?")
    assert "\n" not in str(e.value)


def test_a_repo_of_gguf_files_asks_for_one_by_name(hub):
    hub[0].extend(["README.md", "model-Q4_0.gguf", "model-Q8_0.gguf"])
    with pytest.raises(MistralError, match=r"^model 'org/model': a Hub repo of GGUF files: name one as "
                                           r"org/model/FILE.gguf \(model-Q4_0.gguf, model-Q8_0.gguf\)$"):
        download("org/model")


@pytest.mark.parametrize("index", [False, True])
def test_a_directory_with_both_layouts_loads_the_hf_one(tmp_path, hf_checkpoint, index):
    path = tmp_path / "both"
    shutil.copytree(hf_checkpoint[0], path)
    to_original(hf_checkpoint[1], tmp_path / "original")
    for name in ("consolidated.safetensors", "params.json"):
        shutil.copy(tmp_path / "original" / name, path / name)
    (path / "consolidated.safetensors").write_bytes(b"not read")  # the HF copy is the one read
    if index:
        names = {k: "model.safetensors" for k in read_checkpoint(hf_checkpoint[0])[1]}
        (path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": names}))
    args, weights, _ = read_checkpoint(path)
    assert "lm_head.weight" in weights and args.n_layers == 2
    assert load(str(path))[0] is not None
