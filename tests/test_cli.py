"""python -m mlx_mistral.generate end to end, and one-line errors for bad input."""

import io
import json
import os
import re
import shutil
import subprocess
import sys

import mlx.core as mx
import numpy as np
import pytest

from checkpoints import TOKENIZER_V3
from mlx_mistral.generate.__main__ import main


def run_cli(*args, env=None, stdin=None):
    proc = subprocess.run([sys.executable, "-m", "mlx_mistral.generate", *args], capture_output=True,
                          text=True, timeout=120, env={**os.environ, **(env or {})}, input=stdin)
    return proc.returncode, proc.stdout, proc.stderr


@pytest.mark.parametrize("model", ["tiny", "demo"])
def test_json_output(hf_checkpoint, model):
    path = str(hf_checkpoint[0]) if model == "tiny" else "demo"
    code, out, err = run_cli("--model", path, "--prompt", "Hello", "--max-tokens", "12", "--json")
    assert code == 0, err
    result = json.loads(out)
    assert len(result["tokens"]) == result["generation_tokens"] <= 12
    assert result["finish_reason"] in ("stop", "length")
    assert result["prompt_tokens"] > 5 and result["kv_cache_bytes"] > 0 and result["peak_memory"] > 0
    assert isinstance(result["text"], str)
    assert ("random weights" in err) == (model == "demo")


def test_streaming_output_and_stats_line(hf_checkpoint):
    code, out, err = run_cli("--model", str(hf_checkpoint[0]), "--prompt", "-", "--raw", "--max-tokens", "5",
                             "--temp", "0.7", "--seed", "1", "--top-k", "20", stdin="Once upon a time")
    assert code == 0, err
    assert "prompt:" in err and "tok/s" in err and "KV cache" in err and "peak memory" in err


def cli(capsys, *argv):
    code = main(list(argv))
    captured = capsys.readouterr()
    errors = [line for line in captured.err.splitlines() if line.startswith("error:")]
    assert "Traceback" not in captured.err
    return code, errors


@pytest.fixture
def broken(tmp_path, hf_checkpoint):
    """A fresh copy of the tiny checkpoint to break."""
    path = tmp_path / "model"
    shutil.copytree(hf_checkpoint[0], path)
    return path


def edit_config(path, **changes):
    config = json.loads((path / "config.json").read_text())
    config.update(changes)
    (path / "config.json").write_text(json.dumps(config))


BREAKAGES = {
    "missing directory": (lambda p: shutil.rmtree(p), "does not exist"),
    "no config": (lambda p: (p / "config.json").unlink(), "no config.json"),
    "no tokenizer": (lambda p: (p / "tokenizer.model").unlink(), "no tokenizer.model"),
    "bad tokenizer": (lambda p: (p / "tokenizer.model").write_bytes(b"\0junk"), "not a SentencePiece"),
    "config not json": (lambda p: (p / "config.json").write_text("{oops"), "not a valid JSON"),
    "unknown model_type": (lambda p: edit_config(p, model_type="llama4"),
                           "model_type must be one of mistral, ministral, ministral3, mixtral, llama, mistral3, llava, "
                           "got 'llama4'"),
    "heads not divisible": (lambda p: edit_config(p, num_key_value_heads=3), "multiple of n_kv_heads"),
    "negative window": (lambda p: edit_config(p, sliding_window=-4), "sliding_window"),
    "shape mismatch": (lambda p: edit_config(p, intermediate_size=96),
                       r"tensor 'model\.layers\.\d\.mlp\.\w+_proj\.weight' has shape \(\d+, \d+\), config expects"),
    "missing tensor": (lambda p: edit_config(p, num_hidden_layers=3), "missing tensor 'model.layers.2"),
    "truncated weights": (lambda p: (p / "model.safetensors").write_bytes(
        (p / "model.safetensors").read_bytes()[:100_000]), "model.safetensors: not a valid safetensors"),
    "a file, not a directory": (lambda p: (shutil.rmtree(p), p.write_text("x")),
                                "expected a directory or a .gguf file, found another file"),
    "config not an object": (lambda p: (p / "config.json").write_text("[1, 2]"),
                             "expected a JSON object, got list"),
    "rope scaling": (lambda p: edit_config(p, rope_scaling={"type": "linear", "factor": 2.0}),
                     r"config.json: rope_scaling.rope_type 'linear' is not supported \(only 'default' and 'yarn'\)"),
    "not silu": (lambda p: edit_config(p, hidden_act="gelu"), "hidden_act must be 'silu', got 'gelu'"),
    "rope_parameters not an object": (lambda p: edit_config(p, rope_parameters=[1]),
                                      "rope_parameters must be an object"),
    "bad quantization": (lambda p: edit_config(p, quantization={"bits": 7, "group_size": 64}),
                         "quantization must have bits in 2-6 or 8 and group_size 32/64/128"),
    "tokenizer too large": (lambda p: shutil.copy(TOKENIZER_V3, p / "tokenizer.model"),
                            "tokenizer has 32768 tokens, model vocab_size is 32000"),
    "unexpected tensor": (lambda p: edit_weights(p, lambda w: {**w, "extra.weight": mx.zeros((2,))}),
                          "unexpected tensor 'extra.weight'"),
    "integer weights": (lambda p: edit_weights(p, lambda w: {**w, "model.norm.weight":
                                                             w["model.norm.weight"].astype(mx.int32)}),
                        r"tensor 'model.norm.weight' has dtype .*int32, expected a float dtype"),
}


def edit_weights(path, change):
    file = str(path / "model.safetensors")
    mx.save_safetensors(file, change(mx.load(file)))


@pytest.mark.parametrize("case", BREAKAGES)
def test_broken_checkpoints(capsys, broken, case):
    breakage, message = BREAKAGES[case]
    breakage(broken)
    code, errors = cli(capsys, "--model", str(broken), "--prompt", "hi")
    assert code == 2 and len(errors) == 1
    assert re.search(message, errors[0]), errors[0]


@pytest.mark.parametrize("flags,message", [
    (["--temp", "-1"], "temp must be >= 0"),
    (["--top-p", "0"], r"top_p must be in \(0, 1\]"),
    (["--top-p", "1.5"], r"top_p must be in \(0, 1\]"),
    (["--max-tokens", "0"], "max_tokens must be a positive integer"),
    (["--prompt", ""], "prompt is empty"),
    (["--prompt", "  \n"], "prompt is empty"),
    (["--max-kv-size", "-3"], "max_kv_size"),
])
def test_bad_arguments(capsys, flags, message):
    code, errors = cli(capsys, "--model", "demo", "--prompt", "hi", *flags)
    assert code == 2 and len(errors) == 1
    assert re.search(message, errors[0]), errors[0]


def test_unreachable_repo_while_offline():
    code, out, err = run_cli("--model", "mistralai/no-such-model-here", "--prompt", "hi", env={"HF_HUB_OFFLINE": "1"})
    assert code == 2 and "Traceback" not in err
    assert err.strip().startswith("error: model 'mistralai/no-such-model-here'") and "Hugging Face Hub" in err
    assert len(err.strip().splitlines()) == 1


def test_prompts_file_batch_matches_single_runs(tmp_path, hf_checkpoint):
    path = str(hf_checkpoint[0])
    jsonl = tmp_path / "prompts.jsonl"
    jsonl.write_text('{"prompt": "Hello", "max_tokens": 4}\n\n{"prompt": "A longer question about caches?"}\n')
    code, out, err = run_cli("--model", path, "--prompts-file", str(jsonl), "--max-tokens", "7", "--json")
    assert code == 0, err
    batch = json.loads(out)
    assert [r["index"] for r in batch["results"]] == [0, 1]
    assert [r["generation_tokens"] for r in batch["results"]] == [4, 7]
    assert batch["stats"]["generation_tokens"] == 11 and batch["stats"]["kv_cache_bytes"] > 0
    for prompt, result, limit in (("Hello", batch["results"][0], 4), ("A longer question about caches?",
                                                                       batch["results"][1], 7)):
        code, out, _ = run_cli("--model", path, "--prompt", prompt, "--max-tokens", str(limit), "--json")
        assert json.loads(out)["tokens"] == result["tokens"]


@pytest.mark.parametrize("content,message", [
    ('{"prompt": "ok"}\n{"prompt": ""}\n', "prompt 1 of --prompts-file is empty"),
    ('{"prompt": "ok"}\n\n{"prompt": oops}\n', r"line 3: not valid JSON"),
    ('{"prompt": "ok"}\n["not", "an object"]\n', r'line 2: expected an object with a "prompt" string'),
    ('{"prompt": "ok", "max_tokens": -1}\n', "max_tokens must be a positive integer"),
    ("\n\n", "no prompts in it"),
])
def test_bad_prompts_files(capsys, tmp_path, content, message):
    path = tmp_path / "p.jsonl"
    path.write_text(content)
    code, errors = cli(capsys, "--model", "demo", "--prompts-file", str(path))
    assert code == 2 and len(errors) == 1
    assert re.search(message, errors[0]), errors[0]


def test_ctrl_c_stops_cleanly_with_stats():
    proc = subprocess.Popen([sys.executable, "-m", "mlx_mistral.generate", "--model", "demo", "--prompt", "go",
                             "--max-tokens", "100000"], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stdout.read(20)  # generation has started
    proc.send_signal(__import__("signal").SIGINT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130
    err = err.decode()
    assert "[interrupted] prompt:" in err and "generation:" in err and "Traceback" not in err


# Each flag's observable effect, in-process on the tiny checkpoint (W = 8).
def json_run(capsys, *argv):
    code = main(["--json", *argv])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    return json.loads(captured.out)


def test_stop_cuts_the_text_before_the_stop_string(capsys, hf_checkpoint):
    base = ["--model", str(hf_checkpoint[0]), "--prompt", "Tell me about caches", "--max-tokens", "24"]
    full = json_run(capsys, *base)["text"]
    stop = full[len(full) // 2: len(full) // 2 + 2]
    cut = full.find(stop)
    assert cut > 0 and stop.strip(), full
    stopped = json_run(capsys, *base, "--stop", "not in it", "--stop", stop)
    assert stopped["text"] == full[:cut] and stopped["finish_reason"] == "stop"
    assert stopped["generation_tokens"] < len(json_run(capsys, *base)["tokens"])


def test_system_prompt_gives_mistral_commons_tokens(capsys, monkeypatch, hf_checkpoint):
    from mistral_common.protocol.instruct.messages import SystemMessage, UserMessage
    from mistral_common.protocol.instruct.request import ChatCompletionRequest
    from mistral_common.tokens.tokenizers.mistral import MistralTokenizer

    cli_module = sys.modules[main.__module__]
    seen = []
    real = cli_module.stream_generate
    monkeypatch.setattr(cli_module, "stream_generate",
                        lambda m, t, tokens, **kw: seen.append(tokens) or real(m, t, tokens, **kw))
    base = ["--model", str(hf_checkpoint[0]), "--prompt", "hello", "--max-tokens", "1"]
    json_run(capsys, *base)
    json_run(capsys, *base, "--system", "Be brief.")
    oracle = MistralTokenizer.from_file(str(hf_checkpoint[0] / "tokenizer.model"))
    expected = oracle.encode_chat_completion(ChatCompletionRequest(
        messages=[SystemMessage(content="Be brief."), UserMessage(content="hello")])).tokens
    assert seen[1] == expected != seen[0]


def test_min_p_removes_the_tokens_below_it(capsys, hf_checkpoint):
    """At temp 1 the tiny model's draws differ from greedy; min-p 0.999 keeps only the most likely
    token (every other one is less than 0.999 times as likely), so the draws become greedy."""
    base = ["--model", str(hf_checkpoint[0]), "--prompt", "hello", "--max-tokens", "16", "--seed", "0"]
    greedy = json_run(capsys, *base)["tokens"]
    assert json_run(capsys, *base, "--temp", "1")["tokens"] != greedy
    assert json_run(capsys, *base, "--temp", "1", "--min-p", "0.999")["tokens"] == greedy


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_dtype_sets_the_model_dtype(capsys, hf_checkpoint, dtype):
    base = ["--model", str(hf_checkpoint[0]), "--prompt", "hello", "--max-tokens", "2"]
    float32 = json_run(capsys, *base)["kv_cache_bytes"]  # the CPU default
    assert json_run(capsys, *base, "--dtype", dtype)["kv_cache_bytes"] * 2 == float32  # 2 bytes per value


def test_prefill_chunk_changes_the_calls_not_the_logits(capsys, monkeypatch, hf_checkpoint):
    from mlx_mistral import Mistral

    generation = sys.modules["mlx_mistral.generate"]  # the package (its name is also a function's)

    calls, logits = [], []
    model_call, real_prefill = Mistral.__call__, generation.prefill
    monkeypatch.setattr(Mistral, "__call__", lambda self, x, cache, *images: calls.append(x.shape[1])
                        or model_call(self, x, cache, *images))
    monkeypatch.setattr(generation, "prefill",
                        lambda *a, **k: logits.append(real_prefill(*a, **k)) or logits[-1])
    prompt = "The rolling buffer keeps the last window of keys and values, so memory stays flat."
    counts = {}
    for chunk in ("512", "3"):
        calls.clear()
        out = json_run(capsys, "--model", str(hf_checkpoint[0]), "--prompt", prompt, "--raw",
                       "--max-tokens", "1", "--prefill-chunk", chunk)
        n = out["prompt_tokens"]
        counts[chunk] = len(calls) - 1  # the last call is the first decode step (scheduled ahead)
        step = min(int(chunk), 8)  # chunks are at most the cache's capacity, the window
        assert counts[chunk] == -(-(n - 1) // step) + 1  # chunks of the first n - 1 tokens, then the last one
    assert counts["3"] > counts["512"]
    np.testing.assert_allclose(np.array(logits[0]), np.array(logits[1]), atol=1e-5, rtol=1e-5)


def test_debug_prints_a_traceback_and_the_same_exit_code(capsys, broken):
    (broken / "config.json").write_text("{oops")
    code, errors = cli(capsys, "--model", str(broken), "--prompt", "hi")
    assert main(["--model", str(broken), "--prompt", "hi", "--debug"]) == code == 2
    err = capsys.readouterr().err
    assert "Traceback (most recent call last)" in err and err.strip().splitlines()[-1] == errors[0]


def test_unknown_config_keys_are_refused_in_one_line(capsys, broken):
    """An unknown key may change the computation (a new RoPE, a bias): refused, never guessed."""
    edit_config(broken, brand_new_key=1)
    code, errors = cli(capsys, "--model", str(broken), "--prompt", "hi", "--max-tokens", "1")
    assert code == 2
    assert errors == ["error: config.json: unknown key 'brand_new_key' (it may change the computation; refused)"]


def test_invalid_utf8_on_stdin(capsys, monkeypatch):
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(b"caf\xe9 au lait")))
    code, errors = cli(capsys, "--model", "demo", "--prompt", "-")
    assert code == 2
    assert errors == ["error: prompt from stdin is not valid UTF-8 (invalid continuation byte at byte 3)"]


# Structured output: --json-schema, --json-object, --tool-choice (structured.py; tests/test_structured.py has the rest).
SCHEMA = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 8},
                                           "temp": {"type": "integer", "minimum": -50, "maximum": 50}},
          "required": ["city", "temp"], "additionalProperties": False}


def test_json_schema_and_json_object_answers_are_valid_json(capsys, tmp_path, hf_checkpoint):
    import jsonschema

    (tmp_path / "schema.json").write_text(json.dumps(SCHEMA))
    base = ["--model", str(hf_checkpoint[0]), "--prompt", "The weather?", "--max-tokens", "64"]
    for extra in ([], ["--temp", "1", "--seed", "3"]):
        answer = json_run(capsys, *base, "--json-schema", str(tmp_path / "schema.json"), *extra)
        assert answer["finish_reason"] == "stop", answer
        jsonschema.validate(json.loads(answer["text"]), SCHEMA)
    free = json_run(capsys, *base)["text"]
    with pytest.raises(json.JSONDecodeError):  # the random model's own answer is not JSON
        json.loads(free)
    answer = json_run(capsys, *base, "--json-object", "--max-tokens", "200", "--raw")
    assert answer["finish_reason"] == "length" or isinstance(json.loads(answer["text"]), dict)


@pytest.mark.parametrize("schema, flags, message", [
    ('{"type": "bogus"}', [], r"--json-schema \S+: failed to compile JSON schema: Invalid type: bogus$"),
    ('{"type": "array", "uniqueItems": true}', [], r"Unimplemented keys: \[\"uniqueItems\"\]"),
    ('[1, 2]', [], r"the JSON schema must be an object, got list"),
    ('{"type": ', [], r"--json-schema \S+: not valid JSON"),
    (None, ["--tool-choice", "required"], r"--tool-choice needs --tools"),
    (None, ["--json-schema", "/no/such/file.json"], r"--json-schema /no/such/file.json: cannot read it"),
])
def test_bad_structured_output_flags(capsys, tmp_path, schema, flags, message):
    if schema is not None:
        (tmp_path / "s.json").write_text(schema)
        flags = ["--json-schema", str(tmp_path / "s.json")]
    code, errors = cli(capsys, "--model", "demo", "--prompt", "hi", *flags)
    assert code == 2 and len(errors) == 1
    assert re.search(message, errors[0]), errors[0]


def test_tool_choice_required_on_a_v3_model_calls_the_named_tool(capsys, tmp_path):
    from checkpoints import tiny_config, write_hf

    write_hf(tmp_path / "m", tiny_config(vocab_size=32768), tokenizer=TOKENIZER_V3)
    tools = [{"type": "function", "function": {"name": name, "strict": True, "parameters": {
        "type": "object", "properties": {"q": {"type": "string", "maxLength": 6}}, "required": ["q"],
        "additionalProperties": False}}} for name in ("search", "lookup")]
    (tmp_path / "tools.json").write_text(json.dumps(tools))
    # a random model may go on adding calls: the grammar closes the array after MAX_PARALLEL_CALLS
    # (16) calls of at most ~40 tokens each, so 800 tokens always end in tool calls
    base = ["--model", str(tmp_path / "m"), "--prompt", "hi", "--tools", str(tmp_path / "tools.json"),
            "--max-tokens", "800"]
    for choice in ("required", "lookup"):
        answer = json_run(capsys, *base, "--tool-choice", choice)
        assert answer["finish_reason"] == "tool_calls", answer
        names = {call["function"]["name"] for call in answer["tool_calls"]}
        assert names <= {"search", "lookup"} and (choice == "required" or names == {"lookup"})
    code, errors = cli(capsys, *base, "--tool-choice", "fetch")
    assert code == 2 and errors == ["error: --tool-choice: no tool named 'fetch' among the tools offered"]
