"""The memory table: the Mistral paper's figures, and formulas equal to real allocations."""

import json

import mlx.core as mx
import mlx.nn as nn
import pytest
from mlx.utils import tree_flatten

from mlx_mistral import Mistral, make_cache
from mlx_mistral.memory import MISTRAL_7B, kv_bytes, kv_bytes_per_token, main, weight_bytes
from test_cache import ARGS


def test_mistral_7b_paper_figures():
    assert kv_bytes_per_token(MISTRAL_7B) == 128 * 1024  # fp16, GQA
    assert kv_bytes_per_token(MISTRAL_7B, heads=32) == 4 * 128 * 1024  # MHA
    at_8k = kv_bytes(MISTRAL_7B, 8192)
    assert round(at_8k["gqa"] / 1e9, 1) == 1.1 and round(at_8k["mha"] / 1e9, 1) == 4.3
    at_32k = kv_bytes(MISTRAL_7B, 32768)
    assert at_32k["gqa"] / at_32k["gqa_rolling"] == 8
    assert 3.7 < weight_bytes(MISTRAL_7B, 4) / 2**30 < 4.0  # ~3.8 GiB at 4-bit with scales


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
    assert report["cross_check"]["allocated"] == report["cross_check"]["formula"]
    assert report["max_batch"]["4bit"]["gqa_rolling"] > report["max_batch"]["4bit"]["gqa"]
    assert main(["--model", "/no/such/dir"]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["--lengths", "x"]) == 2
