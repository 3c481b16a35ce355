"""convert/: round trips, quantization quality, mlx-lm interop both ways, shards, bad input."""

import mlx_mistral  # noqa: F401  (before mlx: fast BLAS on Linux)

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import mlx_lm
import numpy as np
import pytest
import torch
from mlx_lm.convert import convert as mlx_lm_convert
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import AutoTokenizer

import mlx_mistral.convert as convert_module
from checkpoints import DATA, TOKENIZER_TEKKEN, TOKENIZER_V1, TOKENIZER_V3, oracle_logits, tiny_config, write_hf
from convert.__main__ import main
from mlx_mistral import Mistral, MistralError, Tokenizer, load, make_cache
from mlx_mistral.config import Quantization
from mlx_mistral.cpu import cpu_paths_on, prepare_for_cpu
from mlx_mistral.convert import convert
from mlx_mistral.loading import read_checkpoint
from test_tokenizer import CONVERSATIONS, TOOL_REQUESTS

REPO = Path(__file__).resolve().parents[1]
IDS = np.random.default_rng(0).integers(3, 32000, 40).tolist()
MiB = 2**20


def logits(model, ids: list[int]) -> np.ndarray:
    """Our logits [L, vocab] of one prefill."""
    return np.array(model(mx.array([ids]), make_cache(model.args, len(ids)))[0])


def converted(src: Path, tmp_path: Path, name: str = "out", **kwargs) -> Path:
    convert(str(src), tmp_path / name, **kwargs)
    return tmp_path / name


def tensors(path: Path) -> dict[str, mx.array]:
    out = {}
    for file in sorted(path.glob("*.safetensors")):
        out.update(mx.load(str(file)))
    return out


# 1. Round trips


def test_fp32_round_trip_is_exact(hf_checkpoint, tmp_path):
    src, hf = hf_checkpoint
    dst = converted(src, tmp_path)
    assert sorted(p.name for p in dst.iterdir()) == [
        "config.json", "model.safetensors", "model.safetensors.index.json", "tokenizer.model", "tokenizer_config.json"]
    ours = logits(load(str(dst))[0], IDS)
    assert np.array_equal(ours, logits(load(str(src))[0], IDS))
    assert np.abs(ours - oracle_logits(hf, IDS)).max() <= 1e-4


def test_a_versioned_tokenizer_keeps_its_version(tmp_path):
    """tokenizer.model.v7 (Mistral Large 2411) is written as tokenizer.model for transformers and mlx-lm,
    and as itself, which the loader prefers: the bare name would be guessed v3."""
    src = tmp_path / "src"
    write_hf(src, tiny_config(vocab_size=32768), tokenizer=DATA / "mistral_instruct_tokenizer_241114.model.v7")
    (src / "tokenizer.model").rename(src / "tokenizer.model.v7")
    dst = converted(src, tmp_path)
    assert {"tokenizer.model", "tokenizer.model.v7"} <= {p.name for p in dst.iterdir()}
    assert load(str(dst))[1].version == "v7" and Tokenizer(dst / "tokenizer.model").version == "v3"


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_half_precision_round_trip(hf_checkpoint, tmp_path, dtype):
    src, hf = hf_checkpoint
    dst = converted(src, tmp_path, dtype=dtype)
    assert json.loads((dst / "config.json").read_text())["torch_dtype"] == dtype
    stored, source = tensors(dst), tensors(src)
    assert stored.keys() == source.keys()
    for name, w in source.items():
        assert stored[name].dtype == getattr(mx, dtype)
        assert mx.array_equal(stored[name], w.astype(getattr(mx, dtype))).item(), name
    diff = np.abs(logits(load(str(dst))[0], IDS) - oracle_logits(hf, IDS)).max()
    print(f"{dtype}: max abs logit diff vs fp32 oracle {diff:.2e}")
    assert diff <= 0.05


@pytest.mark.parametrize("bits", [4, 8])
def test_quantized_round_trip(hf_checkpoint, tmp_path, bits):
    """Loading a quantized DST == nn.quantize on the fp32 model in memory (mlx-lm's recipe)."""
    src, _ = hf_checkpoint
    dst = converted(src, tmp_path, quantization=Quantization(group_size=64, bits=bits))
    config = json.loads((dst / "config.json").read_text())
    assert config["quantization"] == config["quantization_config"] == {"group_size": 64, "bits": bits}
    model = load(str(dst))[0]
    assert isinstance(model.model.embed_tokens, nn.QuantizedEmbedding)
    assert isinstance(model.lm_head, nn.QuantizedLinear) and model.lm_head.bits == bits
    assert isinstance(model.model.layers[1].mlp.down_proj, nn.QuantizedLinear)
    assert "model.norm.scales" not in tensors(dst)
    args, weights, _ = read_checkpoint(src)
    reference = Mistral(args)  # plain nn.Linear layers (build_model transposes them on CPU)
    reference.load_weights(list(weights.items()))
    nn.quantize(reference, 64, bits)
    if cpu_paths_on():  # the loaded model runs the CPU backend's paths (prompt chunks through BLAS): so does this
        prepare_for_cpu(reference)
    assert np.array_equal(logits(model, IDS), logits(reference, IDS))


def test_original_layout_matches_the_hf_oracle(hf_checkpoint, original_checkpoint, tmp_path):
    """The q/k permutation: original layout -> convert gives the HF tensors and the oracle's logits."""
    src, hf = hf_checkpoint
    dst = converted(original_checkpoint, tmp_path)
    stored, source = tensors(dst), tensors(src)
    assert stored.keys() == source.keys()
    assert all(mx.array_equal(stored[k], source[k]).item() for k in source)
    assert np.abs(logits(load(str(dst))[0], IDS) - oracle_logits(hf, IDS)).max() <= 1e-4


def test_original_pth_bfloat16(hf_checkpoint, original_checkpoint, tmp_path):
    """consolidated.00.pth in bfloat16 (read with torch) -> the bfloat16 of the HF tensors."""
    src = tmp_path / "pth"
    src.mkdir()
    for name in ("params.json", "tokenizer.model"):
        shutil.copy(original_checkpoint / name, src / name)
    state = load_file(str(original_checkpoint / "consolidated.safetensors"))
    torch.save({k: v.to(torch.bfloat16) for k, v in state.items()}, src / "consolidated.00.pth")
    stored, source = tensors(converted(src, tmp_path)), tensors(hf_checkpoint[0])
    assert stored.keys() == source.keys()
    for name, w in source.items():
        assert stored[name].dtype == mx.bfloat16
        assert mx.array_equal(stored[name], w.astype(mx.bfloat16)).item(), name


def test_pth_without_torch_is_one_line(original_checkpoint, tmp_path, monkeypatch):
    src = tmp_path / "pth"
    src.mkdir()
    for name in ("params.json", "tokenizer.model"):
        shutil.copy(original_checkpoint / name, src / name)
    torch.save(load_file(str(original_checkpoint / "consolidated.safetensors")), src / "consolidated.00.pth")
    monkeypatch.setitem(sys.modules, "torch", None)  # `import torch` raises ImportError
    with pytest.raises(MistralError, match=r"consolidated\.00\.pth: reading \.pth needs PyTorch: pip install"):
        load(str(src))


# 2. Quantization quality


def kl_and_top1(reference: np.ndarray, other: np.ndarray) -> tuple[float, float]:
    """Mean KL(reference || other) of next-token distributions, and top-1 agreement."""
    p = reference.astype(np.float64) - np.logaddexp.reduce(reference, axis=-1, keepdims=True)
    q = other.astype(np.float64) - np.logaddexp.reduce(other, axis=-1, keepdims=True)
    kl = (np.exp(p) * (p - q)).sum(-1).mean()
    return float(kl), float((reference.argmax(-1) == other.argmax(-1)).mean())


# bits -> (max mean KL, min top-1 agreement), from measurement with margin. Over 300 positions
# (5 id seeds): 4-bit KL 0.018-0.020, top-1 0.42-0.49; 8-bit KL 6.1e-5-7.4e-5, top-1 0.95-0.97.
# Random weights give near-flat distributions (mean top probability 0.0004 of 32000 tokens), so
# near-ties make top-1 a weak signal here; a trained model agrees far more often.
QUALITY = {4: (0.03, 0.35), 8: (2e-4, 0.9)}


@pytest.mark.parametrize("bits", [4, 8])
def test_quantization_quality(hf_checkpoint, tmp_path, bits):
    src, _ = hf_checkpoint
    ids = np.random.default_rng(1).integers(3, 32000, 300).tolist()
    fp32 = logits(load(str(src))[0], ids)
    dst = converted(src, tmp_path, quantization=Quantization(group_size=64, bits=bits))
    kl, top1 = kl_and_top1(fp32, logits(load(str(dst))[0], ids))
    print(f"{bits}-bit group 64 vs fp32, {len(ids)} positions: mean KL {kl:.2e}, top-1 agreement {top1:.3f}")
    max_kl, min_top1 = QUALITY[bits]
    assert kl <= max_kl and top1 >= min_top1


# 3. mlx-lm interop


def mlx_lm_logits(model, ids: list[int]) -> np.ndarray:
    return np.array(model(mx.array([ids]))[0])


@pytest.mark.parametrize("quantize", [False, True])
def test_mlx_lm_loads_our_output(windowless, tmp_path, quantize, monkeypatch):
    src, _ = windowless  # mlx-lm 0.32 ignores sliding_window: compare a windowless model
    monkeypatch.setenv("MLX_MISTRAL_CPU_PATHS", "0")  # the Mac's path: MLX's quantized matmul, as mlx-lm's
    dst = converted(src, tmp_path, quantization=Quantization(64, 4) if quantize else None)
    theirs = mlx_lm_logits(mlx_lm.load(str(dst))[0], IDS)
    diff = np.abs(theirs - logits(load(str(dst))[0], IDS)).max()
    print(f"mlx_lm.load of our {'4-bit' if quantize else 'fp32'} output: max abs logit diff {diff:.2e}")
    assert diff == 0 if quantize else diff <= 1e-4  # measured: 0 for both


@pytest.fixture(scope="module")
def mlx_lm_dirs(windowless, tmp_path_factory):
    """Directories written by mlx_lm.convert: fp16, and 4-bit group 64 with float32 scales."""
    src, root = windowless[0], tmp_path_factory.mktemp("mlx_lm")
    dirs = {"float16": root / "fp16", "4-bit": root / "q4"}
    mlx_lm_convert(str(src), str(dirs["float16"]), dtype="float16")
    mlx_lm_convert(str(src), str(dirs["4-bit"]), quantize=True, q_group_size=64, q_bits=4, dtype="float32")
    for path in dirs.values():  # mlx-lm 0.32 with transformers 5 writes tokenizer.json only
        assert (path / "tokenizer.json").exists() and not list(path.glob("tokenizer.model*"))
    return dirs


@pytest.mark.parametrize("kind", ["float16", "4-bit"])
def test_we_load_mlx_lm_output(mlx_lm_dirs, kind, monkeypatch):
    monkeypatch.setenv("MLX_MISTRAL_CPU_PATHS", "0")  # the Mac's path: MLX's quantized matmul, as mlx-lm's
    path = mlx_lm_dirs[kind]
    theirs = mlx_lm.load(str(path))[0]
    theirs.set_dtype(mx.float32)  # fp16 weights, fp32 compute on both sides (what we do on CPU)
    model, tokenizer = load(str(path))
    diff = np.abs(mlx_lm_logits(theirs, IDS) - logits(model, IDS)).max()
    print(f"our load of mlx_lm.convert {kind}: max abs logit diff {diff:.2e}")
    messages = [{"role": "user", "content": "Hello  there, 1234 🎉"}]
    assert tokenizer.path.name == "tokenizer.json"
    assert tokenizer.chat_tokens(messages) == Tokenizer(TOKENIZER_V1).chat_tokens(messages)
    assert diff == 0 if kind == "4-bit" else diff <= 1e-4  # measured: 0 for both


def test_quantized_tensors_match_mlx_lm_bit_for_bit(windowless, mlx_lm_dirs, tmp_path):
    ours = tensors(converted(windowless[0], tmp_path, dtype="float32", quantization=Quantization(64, 4)))
    theirs = tensors(mlx_lm_dirs["4-bit"])
    assert ours.keys() == theirs.keys()
    for name, w in ours.items():
        assert w.dtype == theirs[name].dtype and mx.array_equal(w, theirs[name]).item(), name


# 4. Shards


def test_small_shard_limit(hf_checkpoint, tmp_path):
    src, _ = hf_checkpoint
    limit = 3 * MiB
    dst = converted(src, tmp_path, shard_bytes=limit)
    index = json.loads((dst / "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    assert len(files) >= 3 and files == sorted(p.name for p in dst.glob("*.safetensors"))
    assert files[0] == f"model-00001-of-{len(files):05d}.safetensors"
    for file in files:
        with safe_open(str(dst / file), "numpy") as f:
            assert f.metadata() == {"format": "mlx"}
            # A tensor larger than the limit (the 8 MB embedding) gets a shard of its own.
            assert len(f.keys()) == 1 or (dst / file).stat().st_size <= limit
    stored = tensors(dst)
    assert stored.keys() == index["weight_map"].keys()
    assert index["metadata"]["total_size"] == sum(w.nbytes for w in stored.values())
    assert np.array_equal(logits(load(str(dst))[0], IDS), logits(load(str(src))[0], IDS))


# 5. Bad input


def test_unknown_layout(tmp_path):
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "weights.bin").write_bytes(b"\0")
    with pytest.raises(MistralError, match=r"no config.json \(Hugging Face layout\) or params.json"):
        convert(str(tmp_path / "src"), tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_params_json_missing_a_field(original_checkpoint, tmp_path):
    src = tmp_path / "src"
    shutil.copytree(original_checkpoint, src)
    params = json.loads((src / "params.json").read_text())
    del params["hidden_dim"]
    (src / "params.json").write_text(json.dumps(params))
    with pytest.raises(MistralError, match="params.json: missing required key 'hidden_dim'"):
        convert(str(src), tmp_path / "out")


@pytest.mark.parametrize("fault", ["missing", "misshapen"])
def test_bad_tensor_is_named(hf_checkpoint, tmp_path, fault):
    src = tmp_path / "src"
    shutil.copytree(hf_checkpoint[0], src)
    state = load_file(str(src / "model.safetensors"))
    name = "model.layers.1.mlp.up_proj.weight"
    if fault == "missing":
        del state[name]
    else:
        state[name] = state[name][:, :-1].contiguous()
    save_file(state, str(src / "model.safetensors"))
    message = (f"missing tensor '{name}'" if fault == "missing"
               else f"tensor '{name}' has shape (128, 63), config expects (128, 64)")
    with pytest.raises(MistralError, match=re.escape(message)):
        convert(str(src), tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_bits_3_is_refused(hf_checkpoint, tmp_path, capsys):
    src, dst = str(hf_checkpoint[0]), str(tmp_path / "out")
    with pytest.raises(SystemExit) as e:
        main(["--model", src, "--out", dst, "--quantize", "--bits", "3"])
    assert e.value.code == 2 and "--bits: invalid choice: 3" in capsys.readouterr().err
    with pytest.raises(MistralError, match="bits must be 4 or 8"):
        convert(src, dst, quantization=Quantization(group_size=64, bits=3))


def test_group_size_must_divide_the_input_dimension(hf_checkpoint, tmp_path):
    layer = r"(lm_head|model\.embed_tokens|model\.layers\.\d\.\w+\.\w+_proj)$"
    with pytest.raises(MistralError, match="group size 128 does not divide the input dimension 64 of " + layer):
        convert(str(hf_checkpoint[0]), tmp_path / "out", quantization=Quantization(group_size=128, bits=4))
    assert list(tmp_path.iterdir()) == []


def test_existing_destination(hf_checkpoint, tmp_path):
    dst = tmp_path / "out"
    dst.mkdir()
    (dst / "keep.txt").write_text("mine")
    with pytest.raises(MistralError, match="exists and is not empty .*--force"):
        convert(str(hf_checkpoint[0]), dst)
    assert [p.name for p in dst.iterdir()] == ["keep.txt"]
    convert(str(hf_checkpoint[0]), dst, force=True)
    assert (dst / "config.json").exists() and not (dst / "keep.txt").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # nothing left beside it
    (tmp_path / "file").write_text("")
    with pytest.raises(MistralError, match="exists and is not a directory"):
        convert(str(hf_checkpoint[0]), tmp_path / "file", force=True)


def test_source_is_kept_and_not_requantized(hf_checkpoint, tmp_path):
    src = tmp_path / "src"
    shutil.copytree(hf_checkpoint[0], src)
    for dst in (src, tmp_path):
        with pytest.raises(MistralError, match="is or contains the source directory"):
            convert(str(src), dst, force=True)
    assert (src / "model.safetensors").exists()
    quantized = converted(src, tmp_path, "q4", quantization=Quantization(64, 4))
    with pytest.raises(MistralError, match="already quantized"):
        convert(str(quantized), tmp_path / "again", quantization=Quantization(64, 8))


@pytest.mark.parametrize("fault, old_dst", [(RuntimeError, False), (KeyboardInterrupt, True)])
def test_fault_after_the_first_shard_leaves_no_dst(hf_checkpoint, tmp_path, monkeypatch, fault, old_dst):
    """A failure or Ctrl-C mid-conversion leaves no DST (or the old one, untouched) and no temp dir."""
    real, written = convert_module.write_safetensors, []

    def fail_after_first_shard(path, shard, on_tensor):
        real(path, shard, on_tensor)
        written.append(path)
        raise fault("injected")

    monkeypatch.setattr(convert_module, "write_safetensors", fail_after_first_shard)
    dst = tmp_path / "out"
    if old_dst:
        dst.mkdir()
        (dst / "keep.txt").write_text("mine")
    with pytest.raises(fault, match="injected"):
        convert(str(hf_checkpoint[0]), dst, force=True, shard_bytes=3 * MiB)
    assert len(written) == 1 and written[0].parent.name.endswith(".partial")
    assert [p.name for p in tmp_path.iterdir()] == (["out"] if old_dst else [])
    if old_dst:
        assert [p.name for p in dst.iterdir()] == ["keep.txt"]


def test_cli_ctrl_c(hf_checkpoint, tmp_path, monkeypatch, capsys):
    def interrupt(*args):
        raise KeyboardInterrupt

    monkeypatch.setattr(convert_module, "write_safetensors", interrupt)
    assert main(["--model", str(hf_checkpoint[0]), "--out", str(tmp_path / "out")]) == 130
    assert "interrupted" in capsys.readouterr().err and list(tmp_path.iterdir()) == []


def test_cli(hf_checkpoint, tmp_path):
    cmd = [sys.executable, "-m", "convert", "--model", str(hf_checkpoint[0]), "--out", str(tmp_path / "out"),
           "--quantize", "--bits", "8", "--group-size", "32", "--dtype", "float16"]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    ok = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr
    assert "parameters" in ok.stdout and "bits per weight" in ok.stdout and "tensor" in ok.stderr  # tqdm
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["quantization"] == {"group_size": 32, "bits": 8} and config["torch_dtype"] == "float16"
    again = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    assert again.returncode == 2 and "Traceback" not in again.stderr
    assert again.stderr.strip().splitlines()[-1].startswith("error: output directory")


# A real process, killed with SIGKILL between two shards (after the first is written, it sleeps).
KILLED_RUN = """
import sys, time
import mlx_mistral.convert as c
real = c.write_safetensors
def slow(path, shard, on_tensor):
    real(path, shard, on_tensor)
    print(path, flush=True)
    time.sleep(120)
c.write_safetensors = slow
c.convert(sys.argv[1], sys.argv[2], force=sys.argv[3] == "True", shard_bytes=3 * 2**20)
"""


@pytest.mark.parametrize("force", [False, True])
def test_a_killed_runs_partial_dir_is_removed_by_the_next_run(hf_checkpoint, tmp_path, force):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    dst = tmp_path / "out"
    if force:
        dst.mkdir()
        (dst / "old.txt").write_text("replaced by the --force run")
    killed = subprocess.Popen([sys.executable, "-c", KILLED_RUN, str(hf_checkpoint[0]), str(dst), str(force)],
                              cwd=REPO, env=env, stdout=subprocess.PIPE, text=True)
    try:
        shard = Path(killed.stdout.readline().strip())  # the first shard is written: kill it mid-run
        killed.kill()
        killed.wait(timeout=30)
    finally:
        killed.kill()
        killed.wait()
    assert shard.parent.name.endswith(".partial") and shard.exists()  # what SIGKILL leaves behind
    cmd = [sys.executable, "-m", "convert", "--model", str(hf_checkpoint[0]), "--out", str(dst)]
    again = subprocess.run(cmd + ["--force"] * force, cwd=REPO, env=env, capture_output=True, text=True,
                           timeout=120)
    assert again.returncode == 0, again.stderr
    assert f"warning: removed {shard.parent}: left by a convert run that was killed" in again.stderr
    assert [p.name for p in tmp_path.iterdir()] == ["out"]
    assert (dst / "model.safetensors").exists() and not (dst / "old.txt").exists()


def test_a_live_runs_partial_dir_is_kept(tmp_path):
    live = tmp_path / f".other.{os.getpid()}-0123abcd.partial"
    live.mkdir()
    convert_module.remove_killed_runs(tmp_path)
    assert live.exists()


def test_mlx_lm_tokenizes_our_original_layout_output_like_us(original_checkpoint, tmp_path):
    dst = converted(original_checkpoint, tmp_path)
    ours = load(str(dst))[1]
    theirs = mlx_lm.load(str(dst))[1]
    assert theirs.encode("Hello") == ours.encode("Hello", bos=True)  # BOS, as Mistral was trained
    for messages in CONVERSATIONS:
        assert theirs.apply_chat_template(messages, tokenize=True, return_dict=False) == ours.chat_tokens(messages)


@pytest.mark.parametrize("tokenizer", [TOKENIZER_V1, TOKENIZER_V3], ids=["v1", "v3"])
def test_tokenizer_config_in_transformers(tmp_path, tokenizer):
    """The tokenizer_config.json convert writes, read by transformers beside tokenizer.model."""
    (tmp_path / "tokenizer.model").write_bytes(tokenizer.read_bytes())
    config = convert_module.hf_tokenizer_config(tmp_path / "tokenizer.model")
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    (tmp_path / "config.json").write_text('{"model_type": "mistral"}')  # as in our output: it picks the class
    ours, theirs = Tokenizer(tokenizer), AutoTokenizer.from_pretrained(str(tmp_path))
    assert theirs.encode("Hello") == ours.encode("Hello", bos=True)
    requests = [(m, None) for m in CONVERSATIONS]
    if ours.version == "v3":  # tool results that are JSON: mistral-common's encoder inlines them as
        # JSON, its own Jinja template as a string, so those two cases differ between its two halves
        requests += [r for r in TOOL_REQUESTS.values() if not any(m["role"] == "tool" and m["content"].startswith("{")
                                                                 for m in r[0])]
    for messages, tools in requests:
        rendered = theirs.apply_chat_template(messages, tools=tools, tokenize=True, return_dict=False)
        assert rendered == ours.chat_tokens(messages, tools=tools)
    assert len(requests) == (6 if ours.version == "v3" else 3)


def test_no_tokenizer_config_for_tekken(tmp_path):
    assert convert_module.hf_tokenizer_config(TOKENIZER_TEKKEN) is None
