"""The memory table: the Mistral paper's figures, and formulas equal to real allocations."""

import json

import mlx.core as mx
import mlx.nn as nn
import pytest
from mlx.utils import tree_flatten

from mlx_mistral import Mistral, make_cache
from mlx_mistral.memory import MISTRAL_7B, kv_bytes, kv_bytes_per_token, main, weight_bytes
from test_cache import ARGS


# Independent of memory.py: Mistral-7B-v0.1's published parameter count (its model card; what
# transformers' num_parameters() gives), of which (2 x 32 layers + 1) x 4096 are RMSNorm weights.
PARAMS_7B = 7_241_732_096
NORMS_7B = (2 * 32 + 1) * 4096
KV_PER_TOKEN_7B = 2 * 32 * 8 * 128 * 2  # K and V x layers x KV heads x head_dim x fp16 bytes


def test_mistral_7b_paper_figures():
    assert kv_bytes_per_token(MISTRAL_7B) == KV_PER_TOKEN_7B == 128 * 1024  # fp16, GQA
    assert kv_bytes_per_token(MISTRAL_7B, heads=32) == 4 * KV_PER_TOKEN_7B  # MHA
    assert kv_bytes(MISTRAL_7B, 8192) == {"mha": 8192 * 4 * KV_PER_TOKEN_7B, "gqa": 8192 * KV_PER_TOKEN_7B,
                                          "gqa_rolling": 4096 * KV_PER_TOKEN_7B}  # 4.3 GB, 1.1 GB, 0.5 GB
    assert kv_bytes(MISTRAL_7B, 32768, batch=3)["gqa_rolling"] == 3 * 4096 * KV_PER_TOKEN_7B
    matrices = PARAMS_7B - NORMS_7B  # quantized; norms stay fp16
    assert weight_bytes(MISTRAL_7B) == 2 * PARAMS_7B == 14_483_464_192
    # b bits per weight, plus a 16-bit scale and a 16-bit bias per group of 64 weights
    for bits, expected in ((8, 7_694_589_952), (4, 4_073_857_024)):
        assert weight_bytes(MISTRAL_7B, bits) == matrices * bits // 8 + matrices // 64 * 4 + 2 * NORMS_7B == expected


@pytest.mark.parametrize("capacity,batch", [(8, 1), (5, 3)])
def test_kv_formula_equals_allocation(capacity, batch):
    cache = make_cache(ARGS, capacity, batch_size=batch, dtype=mx.float16)
    assert cache.nbytes == batch * capacity * kv_bytes_per_token(ARGS, 2)


@pytest.mark.parametrize("bits", [None, 8, 4])
def test_weight_formula_equals_real_parameters(bits):
    model = Mistral(ARGS)
    model.set_dtype(mx.float16)
    if bits:
        nn.quantize(model, group_size=64 if ARGS.dim % 64 == 0 else 32, bits=bits)
    real = sum(v.nbytes for _, v in tree_flatten(model.parameters()))
    assert weight_bytes(ARGS, bits) == real


def test_cli_json_and_errors(capsys):
    assert main(["--json", "--budget-gb", "16"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["parameters"] == PARAMS_7B
    assert report["cross_check"]["allocated"] == 4096 * KV_PER_TOKEN_7B  # a real 4096-slot cache
    assert report["by_length"]["32768"]["gqa"] == 32768 * KV_PER_TOKEN_7B
    budget = 16e9 - 4_073_857_024  # 16 GB less the 4-bit weights
    assert report["max_batch"]["4bit"] == {"mha": int(budget // (32768 * 4 * KV_PER_TOKEN_7B)),
                                           "gqa": int(budget // (32768 * KV_PER_TOKEN_7B)),
                                           "gqa_rolling": int(budget // (4096 * KV_PER_TOKEN_7B))} \
        == {"mha": 0, "gqa": 2, "gqa_rolling": 22}
    assert main(["--model", "/no/such/dir"]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["--lengths", "x"]) == 2
