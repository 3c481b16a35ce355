"""FP8 checkpoints (per-tensor weight_scale_inv, as the official Ministral 3 / Devstral ones):
dequantized at load to the same model as their float copy; convert turns them into 4-bit MLX."""

import json

import mlx.core as mx
import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import Mistral3ForConditionalGeneration

from checkpoints import oracle_logits
from family_checkpoints import ministral3_text, to_fp8, write_wrapper, yarn
from mlx_mistral import MistralError, load
from mlx_mistral.loading import read_checkpoint
from test_family import IDS, N
from test_model import run_chunks


@pytest.fixture(scope="module")
def fp8(tmp_path_factory):
    """(FP8 directory, its dequantized bfloat16 copy, oracle on that copy): a Ministral 3 layout."""
    src = tmp_path_factory.mktemp("src")
    write_wrapper(src, ministral3_text(yarn()), seed=6)
    base = tmp_path_factory.mktemp("fp8")
    to_fp8(src, base / "fp8", base / "float")
    hf = Mistral3ForConditionalGeneration.from_pretrained(base / "float", dtype=torch.float32).eval()
    return base / "fp8", base / "float", hf


def test_fp8_loads_as_its_dequantized_copy(fp8, loader):
    quantized, plain, hf = fp8
    header = load_file(str(quantized / "model.safetensors"))
    assert header["language_model.model.layers.0.self_attn.q_proj.weight"].dtype == torch.float8_e4m3fn
    decoded, copied = read_checkpoint(quantized)[1], read_checkpoint(plain)[1]
    assert decoded.keys() == copied.keys()  # the same weights, bit for bit (scales and vision gone)
    assert all(mx.array_equal(decoded[k], copied[k].astype(decoded[k].dtype)).item() for k in decoded)
    # (the logits of two loads are not compared bit for bit: on the CPU backend each load times
    # whether a transposed layout pays, so two loads may multiply in a different order)
    ours, _ = loader(quantized)
    a = run_chunks(ours, IDS, [5, 7, 2, 6], N)
    diff = np.abs(a - oracle_logits(hf, IDS)).max()
    print(f"FP8 vs transformers on its dequantized copy: max abs logit diff {diff:.2e}")
    assert diff <= 1e-4


def test_fp8_converts_to_4_bit_that_mlx_lm_loads(fp8, tmp_path):
    from mlx_lm import load as mlx_lm_load

    from convert.__main__ import main

    quantized, plain, _ = fp8
    assert main(["--model", str(quantized), "--out", str(tmp_path / "q4"), "--quantize"]) == 0
    assert main(["--model", str(plain), "--out", str(tmp_path / "q4 from float"), "--quantize"]) == 0
    config = json.loads((tmp_path / "q4" / "config.json").read_text())
    assert config["quantization"] == {"group_size": 64, "bits": 4} and config["torch_dtype"] == "bfloat16"
    ours, _ = load(str(tmp_path / "q4"))
    theirs, _ = mlx_lm_load(str(tmp_path / "q4"))
    theirs.set_dtype(mx.float32)  # as ours runs on the CPU (scales and norms in float32)
    mine = run_chunks(ours, IDS, [10_000], N)
    np.testing.assert_allclose(np.array(theirs(mx.array([IDS]))[0]), mine, atol=1e-4)
    # straight from FP8 = through the dequantized copy: the same 4-bit tensors, bit for bit
    a, b = (mx.load(str(tmp_path / d / "model.safetensors")) for d in ("q4", "q4 from float"))
    assert a.keys() == b.keys() and all(mx.array_equal(a[k], b[k]).item() for k in a)


def rewrite(path, change):
    file = str(path / "model.safetensors")
    save_file(change(load_file(file)), file)


@pytest.mark.parametrize("case,change,message", [
    ("block-wise scales", lambda w: {**w, "language_model.model.layers.0.mlp.up_proj.weight_scale_inv":
                                     torch.ones(2, 2)},
     "up_proj.weight_scale_inv' has shape (2, 2): only per-tensor FP8 scales are supported"),
    ("e5m2 weights", lambda w: {**w, "language_model.model.layers.0.mlp.up_proj.weight":
                                w["language_model.model.layers.0.mlp.up_proj.weight"].float().to(torch.float8_e5m2)},
     "model.safetensors: not a valid safetensors file ([safetensor] unsupported dtype F8_E5M2)"),  # mx.load's
    ("u8 weights", lambda w: {**w, "language_model.model.norm.weight": torch.ones(64, dtype=torch.uint8)},
     "tensor 'language_model.model.norm.weight' has dtype U8, expected a float dtype (8-bit: F8_E4M3)"),
    ("scale without weight", lambda w: {**w, "language_model.model.layers.0.mlp.extra.weight_scale_inv":
                                        torch.tensor(1.0)},
     "has no weight 'model.layers.0.mlp.extra.weight'"),
])
def test_unsupported_fp8_is_refused(fp8, tmp_path, case, change, message):
    import shutil

    shutil.copytree(fp8[0], tmp_path / "m")
    rewrite(tmp_path / "m", change)
    with pytest.raises(MistralError) as e:
        load(str(tmp_path / "m"))
    assert message in str(e.value) and "\n" not in str(e.value)
