"""tokenizer.json-only directories (mlx-lm 0.32's output): Hugging Face `tokenizers` with
SentencePiece's ids, and mistral-common's chat encoding."""

import pytest
from transformers import LlamaTokenizerFast

from checkpoints import TOKENIZER_V1, TOKENIZER_V3
from mlx_mistral import MistralError, StreamingDetokenizer, Tokenizer
from test_tokenizer import CONVERSATIONS, TOOL_REQUESTS

STRINGS = [
    "hello", "Hello, world!", " leading space", "trailing space ", "  two leading", "a  b   c    d", "     ",
    " ", "", "\n", "\n\n", "line one\nline two", "tab\tseparated\tvalues", "\r\nwindows", "mixed \t \n spaces",
    "0", "123", "3.14159", "1,000,000", "2024-06-01T12:00:00Z", "phone: +33 6 12 34 56 78",
    "é", "café crème brûlée", "Zürich, München, Köln", "naïve façade", "日本語の文章", "龘", "中文 和 English",
    "Привет, мир", "مرحبا بالعالم", "नमस्ते", "🎉", "👋🏽 hi", "🇫🇷🇯🇵", "👨‍👩‍👧‍👦 family", "𝔘𝔫𝔦𝔠𝔬𝔡𝔢",
    "<s>", "</s>", "<unk>", "[INST]", "[/INST] x", "[TOOL_CALLS] [{}]", "<s>[INST] hi [/INST]</s>",
    "[AVAILABLE_TOOLS]", "<0x0A>", "▁underscore▁lookalike", "def f(x):\n    return x ** 2\n",
    '{"name": "get_weather", "arguments": {"city": "Paris"}}', "\u00a0nbsp\u00a0 zero\u200bwidth", "   \n  \t  x",
]


@pytest.fixture(scope="module", params=[TOKENIZER_V1, TOKENIZER_V3], ids=["v1", "v3"])
def pair(request, tmp_path_factory):
    """(tokenizer.json-only Tokenizer, SentencePiece Tokenizer) of the same vocabulary; the json
    made as mlx-lm makes it (transformers' conversion of tokenizer.model)."""
    src, only_json = tmp_path_factory.mktemp("spm"), tmp_path_factory.mktemp("json")
    (src / "tokenizer.model").write_bytes(request.param.read_bytes())
    LlamaTokenizerFast.from_pretrained(str(src)).backend_tokenizer.save(str(only_json / "tokenizer.json"))
    return Tokenizer(only_json / "tokenizer.json"), Tokenizer(request.param)


def test_ids_equal_sentencepiece(pair):
    ours, sp = pair
    assert len(STRINGS) == 50 and (ours.version, ours.vocab_size) == (sp.version, sp.vocab_size)
    assert (ours.bos_id, ours.eos_id, ours.control_ids) == (sp.bos_id, sp.eos_id, sp.control_ids)
    for text in STRINGS:
        ids = ours.encode(text, bos=True)
        assert ids == sp.encode(text, bos=True), text
        assert ours.decode(ids) == sp.decode(ids), text
        detok = StreamingDetokenizer(ours)
        assert "".join([detok.add(i) for i in ids] + [detok.flush()]) == sp.decode(ids), text
    assert ours.piece_bytes == sp.piece_bytes


def test_chat_tokens_equal_sentencepiece(pair):
    ours, sp = pair
    for messages in CONVERSATIONS:
        assert ours.chat_tokens(messages) == sp.chat_tokens(messages)
    if sp.version != "v1":
        for messages, tools in TOOL_REQUESTS.values():
            assert ours.chat_tokens(messages, tools=tools) == sp.chat_tokens(messages, tools=tools)


def test_tokenizer_json_that_is_not_sentencepiece(tmp_path):
    (tmp_path / "tokenizer.json").write_text('{"model": {"type": "WordPiece", "vocab": {}}}')
    with pytest.raises(MistralError, match="not a SentencePiece-style BPE"):
        Tokenizer(tmp_path / "tokenizer.json")
    (tmp_path / "tokenizer.json").write_text("{oops")
    with pytest.raises(MistralError, match="not a Hugging Face tokenizer.json"):
        Tokenizer(tmp_path / "tokenizer.json")
