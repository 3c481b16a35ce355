"""Fuzzing the loaders: whatever the bytes or config values, only MistralError comes out."""

import json
import os
import shutil
import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from checkpoints import tiny_config
from mlx_mistral import MistralError, ModelArgs, load

# CI: 40 fixed examples per test. A deeper local run: FUZZ_EXAMPLES=1000 (random examples).
EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", 0))
FUZZ = settings(max_examples=EXAMPLES or 40, deadline=10_000, derandomize=not EXAMPLES,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
values = st.one_of(st.none(), st.booleans(), st.integers(-2**40, 2**40), st.floats(allow_nan=True),
                   st.text(max_size=8), st.lists(st.integers(), max_size=3), st.dictionaries(st.text(max_size=3), st.integers(), max_size=2))


@FUZZ
@given(changes=st.dictionaries(st.sampled_from(sorted(tiny_config()) + ["model_type", "quantization",
                                                                         "rope_parameters", "rope_scaling"]),
                               values, min_size=1, max_size=3))
def test_config_values(changes):
    config = {**tiny_config(), "model_type": "mistral", **changes}
    try:
        ModelArgs.from_hf(config)
    except MistralError as e:
        assert "\n" not in str(e)


@pytest.fixture(scope="module")
def weights_bytes(hf_checkpoint):
    return (hf_checkpoint[0] / "model.safetensors").read_bytes()


def try_load(tmp_path, hf_checkpoint, data: bytes):
    path = tmp_path / "m"
    if not path.exists():
        shutil.copytree(hf_checkpoint[0], path)
    (path / "model.safetensors").write_bytes(data)
    try:
        load(str(path))
    except MistralError as e:
        assert "\n" not in str(e)


@FUZZ
@given(cut=st.integers(0, 10_000_000))
def test_truncated_weights(tmp_path, hf_checkpoint, weights_bytes, cut):
    try_load(tmp_path, hf_checkpoint, weights_bytes[: cut % len(weights_bytes)])


@FUZZ
@given(data=st.binary(max_size=4096))
def test_random_bytes(tmp_path, hf_checkpoint, data):
    try_load(tmp_path, hf_checkpoint, data)


@FUZZ
@given(edit=st.tuples(st.integers(0, 40), st.sampled_from(["dtype", "shape", "data_offsets"]), values))
def test_lying_headers(tmp_path, hf_checkpoint, weights_bytes, edit):
    """Rewrite one tensor's dtype, shape or offsets in the header; keep the data."""
    n = struct.unpack("<Q", weights_bytes[:8])[0]
    header = json.loads(weights_bytes[8:8 + n])
    names = sorted(k for k in header if k != "__metadata__")
    index, field, value = edit
    header[names[index % len(names)]][field] = value
    blob = json.dumps(header).encode()
    blob += b" " * (-len(blob) % 8)
    try_load(tmp_path, hf_checkpoint, struct.pack("<Q", len(blob)) + blob + weights_bytes[8 + n:])
