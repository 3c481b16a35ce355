"""Fuzzing the loaders: every example is refused with a MistralError that names the bad input,
or loads to exactly what the unmutated input gives (the mutation was harmless). Each test prints
how many examples ended each way."""

import dataclasses
import json
import os
import shutil
import struct
from collections import Counter

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from mlx.utils import tree_flatten

from checkpoints import tiny_config
from mlx_mistral import MistralError, ModelArgs, load
from mlx_mistral.config import Quantization

# CI: 40 fixed examples per test. A deeper local run: FUZZ_EXAMPLES=1000 (random examples).
EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", 0))
FUZZ = settings(max_examples=EXAMPLES or 40, deadline=10_000, derandomize=not EXAMPLES, database=None,
                suppress_health_check=[HealthCheck.too_slow])
values = st.one_of(st.none(), st.booleans(), st.integers(-2**40, 2**40), st.floats(allow_nan=True),
                   st.text(max_size=8), st.lists(st.integers(), max_size=3), st.dictionaries(st.text(max_size=3), st.integers(), max_size=2))
# config.json key -> the ModelArgs field it sets (None: checked, but no field of its own)
FIELDS = {"hidden_size": "dim", "num_hidden_layers": "n_layers", "num_attention_heads": "n_heads",
          "num_key_value_heads": "n_kv_heads", "head_dim": "head_dim", "intermediate_size": "hidden_dim",
          "vocab_size": "vocab_size", "rms_norm_eps": "norm_eps", "rope_theta": "rope_theta",
          "sliding_window": "sliding_window", "max_position_embeddings": "max_position_embeddings",
          "tie_word_embeddings": "tie_word_embeddings", "quantization": "quantization", "model_type": None,
          "hidden_act": None, "rope_parameters": None, "rope_scaling": None}
NAMED_AS = {"model_type": "model_type", "hidden_act": "hidden_act", "rope_parameters": "rope",
            "rope_scaling": "rope_scaling", "quantization": "quantization"}


def report(test: str, outcomes: Counter) -> None:
    print(f"{test}: {outcomes['refused']} refused, {outcomes['harmless']} loaded unchanged")
    assert sum(outcomes.values()) >= (EXAMPLES or 40)


def expected_args(base: ModelArgs, changes: dict) -> ModelArgs:
    """What a config with `changes` must give if it is accepted: each changed field as given."""
    fields = {FIELDS[k]: v for k, v in changes.items() if FIELDS[k] and FIELDS[k] != "quantization"}
    if "head_dim" in fields and not fields["head_dim"]:  # absent or 0: dim // n_heads
        fields["head_dim"] = fields.get("dim", base.dim) // fields.get("n_heads", base.n_heads)
    if "quantization" in changes:
        fields["quantization"] = Quantization(**changes["quantization"])
    return dataclasses.replace(base, **fields)


def test_config_values():
    base = ModelArgs.from_hf({**tiny_config(), "model_type": "mistral"})
    outcomes = Counter()

    @FUZZ
    @given(changes=st.dictionaries(st.sampled_from(sorted(FIELDS)), values, min_size=1, max_size=3))
    def check(changes):
        try:
            args = ModelArgs.from_hf({**tiny_config(), "model_type": "mistral", **changes})
        except MistralError as e:
            message = str(e)
            assert "\n" not in message
            named = [NAMED_AS.get(k) or FIELDS[k] for k in changes]
            assert any(n in message for n in named), (changes, message)
            outcomes["refused"] += 1
        else:
            assert args == expected_args(base, changes), changes
            outcomes["harmless"] += 1

    check()
    report("config values", outcomes)


@pytest.fixture(scope="module")
def weights_bytes(hf_checkpoint):
    return (hf_checkpoint[0] / "model.safetensors").read_bytes()


@pytest.fixture(scope="module")
def unmutated(hf_checkpoint):
    model, _ = load(str(hf_checkpoint[0]))
    return {k: np.array(v) for k, v in tree_flatten(model.parameters())}


def try_load(tmp_path, hf_checkpoint, unmutated, data: bytes, named: tuple[str, ...] = ()) -> str:
    """'refused' (a one-line MistralError naming model.safetensors or one of `named`) or
    'harmless' (it loaded, and every tensor equals the unmutated one)."""
    path = tmp_path / "m"
    if not path.exists():
        shutil.copytree(hf_checkpoint[0], path)
    (path / "model.safetensors").write_bytes(data)
    try:
        model, _ = load(str(path))
    except MistralError as e:
        message = str(e)
        assert "\n" not in message
        assert any(n in message for n in ("model.safetensors", *named)), message
        return "refused"
    params = dict(tree_flatten(model.parameters()))
    assert params.keys() == unmutated.keys()
    for name, value in params.items():
        assert np.array_equal(np.array(value), unmutated[name]), name
    return "harmless"


def test_truncated_weights(tmp_path, hf_checkpoint, weights_bytes, unmutated):
    outcomes = Counter()

    @FUZZ
    @given(cut=st.integers(0, 10_000_000))
    def check(cut):
        outcomes[try_load(tmp_path, hf_checkpoint, unmutated, weights_bytes[: cut % len(weights_bytes)])] += 1

    check()
    report("truncated weights", outcomes)
    assert outcomes["harmless"] == 0  # a cut file never loads


def test_random_bytes(tmp_path, hf_checkpoint, unmutated):
    outcomes = Counter()

    @FUZZ
    @given(data=st.binary(max_size=4096))
    def check(data):
        outcomes[try_load(tmp_path, hf_checkpoint, unmutated, data)] += 1

    check()
    report("random bytes", outcomes)
    assert outcomes["harmless"] == 0


def test_lying_headers(tmp_path, hf_checkpoint, weights_bytes, unmutated):
    """Rewrite one tensor's dtype, shape or offsets in the header; keep the data."""
    n = struct.unpack("<Q", weights_bytes[:8])[0]
    header = json.loads(weights_bytes[8:8 + n])
    names = sorted(k for k in header if k != "__metadata__")
    outcomes = Counter()

    @FUZZ
    @given(edit=st.tuples(st.integers(0, 40), st.sampled_from(["dtype", "shape", "data_offsets"]), values))
    def check(edit):
        index, field, value = edit
        lying = json.loads(json.dumps(header))
        name = names[index % len(names)]
        lying[name][field] = value
        blob = json.dumps(lying).encode()
        blob += b" " * (-len(blob) % 8)
        data = struct.pack("<Q", len(blob)) + blob + weights_bytes[8 + n:]
        outcomes[try_load(tmp_path, hf_checkpoint, unmutated, data, (f"'{name}'",))] += 1

    check()
    report("lying headers", outcomes)
