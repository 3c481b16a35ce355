"""Tensor parallelism over 2 local processes (ring backend on 127.0.0.1), against one process.

Every multi-process run has a hard timeout: on expiry all ranks are killed and the test fails
with their output.
"""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten

from checkpoints import tiny_config, write_hf
from test_moe import mixtral_config, write_mixtral
from distributed_rank import observe
from mlx_mistral import distributed, load, make_sampler, shard
from mlx_mistral.config import ModelArgs, Quantization
from mlx_mistral.convert import convert
from mlx_mistral.errors import MistralError
from mlx_mistral.loading import build_model
from mlx_mistral.model import Mistral
from mlx_mistral.memory import MISTRAL_7B, kv_bytes_per_token, per_rank, weight_bytes
from mlx_mistral.memory import main as memory_main

TESTS = Path(__file__).parent
MLX_LAUNCH = str(Path(sys.executable).parent / "mlx.launch")  # the launcher mlx installs beside python
MODELS = ["windowed", "windowless", "windowed-4bit", "windowless-4bit", "windowed-8bit", "mixtral", "mixtral-4bit"]


def free_ports(n: int) -> list[int]:
    """n consecutive free TCP ports on 127.0.0.1 (mlx.launch numbers them from its -p)."""
    for _ in range(50):
        start = int.from_bytes(os.urandom(2), "big") % 20000 + 30000
        try:
            socks = []
            for port in range(start, start + n):
                socks.append(socket.socket())
                socks[-1].bind(("127.0.0.1", port))
            return list(range(start, start + n))
        except OSError:
            continue
        finally:
            for s in socks:
                s.close()
    raise RuntimeError("no free ports")


def run_all(commands: list[list[str]], envs: list[dict], timeout: float) -> list[tuple[int, str, str]]:
    """Run the commands at once; (returncode, stdout, stderr) each. Past `timeout` seconds every
    process (and its children) is killed and the test fails with what they printed."""
    procs = [subprocess.Popen(cmd, env={**os.environ, **env}, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True, start_new_session=True, cwd=TESTS.parent)
             for cmd, env in zip(commands, envs)]
    deadline, results = time.monotonic() + timeout, []
    try:
        for p in procs:
            out, err = p.communicate(timeout=max(0.1, deadline - time.monotonic()))
            results.append((p.returncode, out, err))
    except subprocess.TimeoutExpired:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
        dumps = [f"--- process {i}: {' '.join(c[-4:])}\n" + "".join(x or "" for x in p.communicate())
                 for i, (p, c) in enumerate(zip(procs, commands))]
        pytest.fail(f"processes still running after {timeout} s, killed:\n" + "\n".join(dumps))
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
    return results


def rank_envs(n: int, tmp_path: Path) -> list[dict]:
    """What mlx.launch sets for each of n ranks of a ring on 127.0.0.1."""
    ports = free_ports(n)
    hostfile = tmp_path / f"hosts-{ports[0]}.json"
    hostfile.write_text(json.dumps([[f"127.0.0.1:{p}"] for p in ports]))
    return [{"MLX_RANK": str(r), "MLX_HOSTFILE": str(hostfile)} for r in range(n)]


def cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "mlx_mistral.generate", *args]


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    """Tiny windowed (W = 8) and windowless models, float32, 4-bit and 8-bit (group 32: o_proj's
    64 input columns split into one whole group per rank), and a tiny Mixtral (W = 8; 4 experts
    whose down_proj's 128 input columns split into two groups per rank)."""
    root = tmp_path_factory.mktemp("dist")
    out = {"windowed": root / "windowed", "windowless": root / "windowless"}
    write_hf(out["windowed"], tiny_config(sliding_window=8))
    write_hf(out["windowless"], tiny_config(sliding_window=None), seed=1)
    out["mixtral"] = root / "mixtral"
    write_mixtral(out["mixtral"], mixtral_config(sliding_window=8))
    for name, bits in (("windowed", 4), ("windowless", 4), ("windowed", 8), ("mixtral", 4)):
        out[f"{name}-{bits}bit"] = root / f"{name}-{bits}bit"
        convert(str(out[name]), out[f"{name}-{bits}bit"], quantization=Quantization(group_size=32, bits=bits))
    return out


@pytest.fixture(scope="module")
def two_ranks(models, tmp_path_factory) -> list[list[dict]]:
    """What each of 2 ranks observed, per model (one pair of processes for all of them)."""
    out = tmp_path_factory.mktemp("ranks")
    envs = rank_envs(2, out)
    command = [sys.executable, str(TESTS / "distributed_rank.py"), str(out), *(str(models[m]) for m in MODELS)]
    for code, stdout, stderr in run_all([command, command], envs, timeout=120):
        assert code == 0, stderr
    return [[dict(np.load(out / f"rank{r}-{i}.npz")) for r in range(2)] for i in range(len(MODELS))]


@pytest.mark.parametrize("name", MODELS)
def test_two_ranks_equal_one_process(models, two_ranks, name):
    """Greedy tokens (single and batch) equal the one-process run; logits within 1e-4 (float32);
    both ranks see the very same logits; each rank holds exactly half of the attention and MLP
    bytes and half of the KV cache; embeddings and lm_head stay whole on each rank."""
    model, tokenizer = load(str(models[name]))
    one = observe(model, tokenizer, make_sampler())
    rank0, rank1 = two_ranks[MODELS.index(name)]
    diff = np.abs(rank0["logits"] - one["logits"]).max()
    print(f"{name}: max |logit difference| 2 ranks vs 1 process = {diff:.2e}")
    assert diff <= 1e-4  # float32 activations, quantized weights included (measured ~2e-6)
    assert np.array_equal(rank0["logits"], rank1["logits"])
    for rank in (rank0, rank1):
        assert rank["tokens"].tolist() == one["tokens"].tolist()
        assert rank["batch"].tolist() == one["batch"].tolist()
        assert 2 * rank["sharded_bytes"] == one["sharded_bytes"]
        assert 2 * rank["kv_bytes"] == one["kv_bytes"]
        assert rank["other_bytes"] == one["other_bytes"]  # embeddings, norms, lm_head: whole


def test_cli_under_mlx_launch(models, tmp_path):
    """The documented command: rank 0 prints the one JSON object, rank 1 nothing; its tokens
    are the one-process CLI's; --prompts-file too."""
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("Hello there\nWho are you, my friend?\n")
    port = free_ports(2)[0]
    for flags in (["--prompt", "Hello there"], ["--prompts-file", str(prompts)]):
        args = ["--model", str(models["windowed"]), *flags, "--max-tokens", "10", "--raw", "--json"]
        launch = [MLX_LAUNCH, "-n", "2", "--backend", "ring", "-p", str(port), "--", *cli(*args)]
        (code, out, err), (_, single, _) = run_all([launch], [{}], timeout=90) + run_all([cli(*args)], [{}], 60)
        assert code == 0 and "error" not in err, err
        assert out.count("\n") == 1, out  # one JSON line, from rank 0 only
        distributed_result, one_result = json.loads(out), json.loads(single)
        if "results" in one_result:
            distributed_result, one_result = distributed_result["results"], one_result["results"]
            assert [r["tokens"] for r in distributed_result] == [r["tokens"] for r in one_result]
        else:
            assert distributed_result["tokens"] == one_result["tokens"]
            assert 2 * distributed_result["kv_cache_bytes"] == one_result["kv_cache_bytes"]


def test_three_ranks_for_two_kv_heads(models, tmp_path):
    command = cli("--model", str(models["windowed"]), "--prompt", "Hi", "--max-tokens", "2")
    for code, _, err in run_all([command] * 3, rank_envs(3, tmp_path), timeout=60):
        assert code == 2
        assert "cannot split 2 K/V heads over 3 ranks" in err


def test_checkpoint_missing_on_one_rank(models, tmp_path):
    """Rank 1 names its missing directory; rank 0 says that rank 1 failed; neither waits."""
    commands = [cli("--model", str(path), "--prompt", "Hi", "--max-tokens", "2")
                for path in (models["windowed"], tmp_path / "not-here")]
    (code0, _, err0), (code1, _, err1) = run_all(commands, rank_envs(2, tmp_path), timeout=60)
    assert code1 == 2 and "rank 1 of 2: model " in err1 and "does not exist" in err1
    assert code0 == 2 and "rank 1 of 2 could not load the model" in err0


def test_a_rank_that_cannot_reach_the_others_ends(models, tmp_path):
    """Rank 0 alone (it waits for a peer to connect) and rank 1 alone (it connects to a peer
    that is not there): each ends after --connect-timeout with one error line."""
    envs = [rank_envs(2, tmp_path)[0], rank_envs(2, tmp_path)[1]]
    command = cli("--model", str(models["windowed"]), "--prompt", "Hi", "--connect-timeout", "2")
    start = time.monotonic()
    results = run_all([command, command], envs, timeout=30)
    assert time.monotonic() - start < 20
    for rank, (code, _, err) in enumerate(results):
        assert code != 0
        assert f"error: rank {rank}: the other ranks did not connect within 2 s" in err, err


DIES_AFTER_LOADING = """import os, sys
from mlx_mistral import MistralError, distributed, generate, make_sampler
group = distributed.init(30)
model, tokenizer = distributed.load(sys.argv[1], group)
if group.rank() == 1:
    os._exit(3)
try:
    with distributed.rank_zero_output(group):
        generate(model, tokenizer, [1, 2, 3], max_tokens=50, sampler=distributed.shared_sampler(make_sampler(), group))
except MistralError as e:
    sys.exit(f"error: {e}")
"""


def test_a_rank_that_dies_mid_run_ends_the_others(models, tmp_path):
    command = [sys.executable, "-c", DIES_AFTER_LOADING, str(models["windowed"])]
    (code0, _, err0), (code1, _, _) = run_all([command, command], rank_envs(2, tmp_path), timeout=60)
    assert code1 == 3
    assert code0 == 1 and "error: rank 0 of 2: [ring]" in err0 and "did another rank fail?" in err0, err0

def test_shardable_checks():
    args = ModelArgs(dim=64, n_layers=1, n_heads=4, n_kv_heads=2, head_dim=16, hidden_dim=128, vocab_size=100,
                     quantization=Quantization(group_size=64, bits=4))
    shard.check_shardable(args, 1)
    with pytest.raises(MistralError, match="cannot split 2 K/V heads over 4 ranks"):
        shard.check_shardable(args, 4)
    with pytest.raises(MistralError, match="o_proj's 64 quantized input columns over 2 ranks: 32 per rank"):
        shard.check_shardable(args, 2)


def test_a_process_not_started_by_mlx_launch_runs_alone(monkeypatch):
    monkeypatch.delenv("MLX_RANK", raising=False)
    monkeypatch.delenv("OMPI_COMM_WORLD_SIZE", raising=False)
    assert distributed.init() is None


def test_memory_per_rank_matches_the_ranks(models, two_ranks):
    """memory.per_rank (fp16) is what a float32 rank holds, halved: layers and KV split, the rest whole."""
    args = ModelArgs.from_hf(json.loads((models["windowed"] / "config.json").read_text()))
    rank0 = two_ranks[MODELS.index("windowed")][0]
    two, one = per_rank(args, 2, 16), per_rank(args, 1, 16)
    assert 2 * two["sharded_weights"] == rank0["sharded_bytes"] and 2 * two["sharded_weights"] == one["sharded_weights"]
    assert two["whole_weights"] == one["whole_weights"] == weight_bytes(args) - one["sharded_weights"]
    assert 2 * two["kv"] == one["kv"] == 8 * kv_bytes_per_token(args)  # the window holds 8 of 16 tokens


def test_memory_ranks_command(capsys):
    assert memory_main(["--ranks", "2", "--mac-gb", "64", "--lengths", "32768", "--json"]) == 0
    fits = json.loads(capsys.readouterr().out)["fits"]["Mistral Large 123B"]
    assert fits["4bit"] <= 0.75 * 64e9 < fits["8bit"]  # 123B at 4 bits fits on two 64 GB Macs, at 8 not
    assert memory_main(["--ranks", "2", "--lengths", "32768", "--kv-bits", "4", "--json"]) == 0
    r = json.loads(capsys.readouterr().out)  # the KV cache per machine at 4 bits, cross-checked by a real cache
    held = 4096  # Mistral 7B v0.1's window of the 32768 tokens
    assert r["kv_bits"] == 4 and r["per_rank"]["4bit"]["kv"] == held * kv_bytes_per_token(MISTRAL_7B, bits=4) // 2
    assert r["per_rank"]["4bit"]["kv"] < per_rank(MISTRAL_7B, 2, 32768, 4)["kv"]  # fp16 KV
    assert memory_main(["--ranks", "3"]) == 2
    assert "cannot split 8 K/V heads over 3 ranks" in capsys.readouterr().err


def test_loading_holds_each_matrix_once():
    """build_model's peak stays near the model's own bytes: each checkpoint tensor is freed once
    the model holds its (sliced, on a rank; transposed, on the CPU backend) copy."""
    args = ModelArgs(dim=256, n_layers=8, n_heads=8, n_kv_heads=2, head_dim=32, hidden_dim=1024, vocab_size=256)
    weights = {name: mx.random.normal(p.shape) for name, p in tree_flatten(Mistral(args).parameters())}
    mx.eval(weights)
    total = sum(w.nbytes for w in weights.values())
    mx.reset_peak_memory()
    build_model(args, weights, mx.float32)
    assert not weights  # handed over to the model
    assert mx.get_peak_memory() < 1.2 * total  # was ~2x: every original kept beside its transposed copy
