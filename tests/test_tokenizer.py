"""Chat templates against mistral-common; control tokens; streaming decode."""

import filecmp

import pytest
from mistral_common.protocol.instruct.messages import AssistantMessage, SystemMessage, UserMessage
from mistral_common.protocol.instruct.request import ChatCompletionRequest
from mistral_common.tokens.tokenizers.mistral import MistralTokenizer

from checkpoints import TOKENIZER_V1, TOKENIZER_V3
from mlx_mistral import MistralError, StreamingDetokenizer, Tokenizer
from mlx_mistral.demo import TOKENIZER_V1 as SHIPPED_V1

CONVERSATIONS = [
    [{"role": "user", "content": "hello"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hello"},
     {"role": "assistant", "content": "Hi! How can I help?"}, {"role": "user", "content": "Tell me a joke"}],
    [{"role": "system", "content": "S"}, {"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
     {"role": "user", "content": "c"}, {"role": "assistant", "content": "d"}, {"role": "user", "content": "é 🎉"}],
]
CLASSES = {"system": SystemMessage, "user": UserMessage, "assistant": AssistantMessage}


@pytest.fixture(scope="module", params=[TOKENIZER_V1, TOKENIZER_V3], ids=["v1", "v3"])
def tokenizers(request):
    return Tokenizer(request.param), MistralTokenizer.from_file(str(request.param))


def test_design_vectors():
    v1, v3 = Tokenizer(TOKENIZER_V1), Tokenizer(TOKENIZER_V3)
    assert (v1.version, v3.version) == ("v1", "v3")
    msgs = [{"role": "user", "content": "hello"}, {"role": "assistant", "content": "yes"},
            {"role": "user", "content": "again"}]
    # V1: <s>[INST] user [/INST] answer</s>[INST] user2 [/INST], [INST] as plain text.
    assert v1.chat_tokens(msgs) == ([1] + v1.encode("[INST] hello [/INST]") + v1.encode("yes") + [2]
                                    + v1.encode("[INST] again [/INST]"))
    # V3: [1, 3] + enc(user) + [4] + enc(answer) + [2] ...
    assert v3.chat_tokens(msgs) == [1, 3, *v3.encode("hello"), 4, *v3.encode("yes"), 2, 3, *v3.encode("again"), 4]
    assert v1.chat_tokens(msgs[:1]) == [1, 733, 16289, 28793, 6312, 28709, 733, 28748, 16289, 28793]
    assert v3.chat_tokens(msgs[:1]) == [1, 3, 7080, 29477, 4]


@pytest.mark.parametrize("messages", CONVERSATIONS)
def test_chat_tokens_match_mistral_common(tokenizers, messages):
    ours, theirs = tokenizers
    request = ChatCompletionRequest(messages=[CLASSES[m["role"]](content=m["content"]) for m in messages])
    assert ours.chat_tokens(messages) == theirs.encode_chat_completion(request).tokens


def test_user_text_never_becomes_a_control_token(tokenizers):
    tok = tokenizers[0]
    text = "[INST] </s> <s> [/INST] <unk>"
    ids = tok.chat_tokens([{"role": "user", "content": text}])
    control = {tok.bos_id, tok.eos_id, 0} | set(tok.inst_ids or ())
    assert ids[0] == tok.bos_id and ids.count(tok.bos_id) == 1 and tok.eos_id not in ids
    body = ids[1:] if tok.inst_ids is None else ids[2:-1]
    assert not control & set(body)
    assert not control & set(tok.encode(text))


def test_streaming_decode_equals_full_decode(tokenizers):
    tok = tokenizers[0]
    text = "Héllo wörld! 🎉🇫🇷 ça va? 日本語の文章、龘 𝔘𝔫𝔦𝔠𝔬𝔡𝔢  two  spaces\n\tnew line  "
    ids = tok.encode(text)
    assert any(tok.piece_bytes[i] and len(tok.piece_bytes[i]) == 1 and tok.piece_bytes[i][0] >= 0x80
               for i in ids)  # byte-fallback pieces are exercised
    detok = StreamingDetokenizer(tok)
    pieces = [detok.add(i) for i in ids] + [detok.flush()]
    assert "".join(pieces) == tok.decode(ids) == text
    assert all("\ufffd" not in p for p in pieces)  # never half a character


def test_shipped_tokenizer_is_mistral_common_v1():
    assert filecmp.cmp(SHIPPED_V1, TOKENIZER_V1, shallow=False)


def test_bad_chat_and_files(tmp_path):
    tok = Tokenizer(TOKENIZER_V1)
    with pytest.raises(MistralError, match="end with a user message"):
        tok.chat_tokens([{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}])
    with pytest.raises(MistralError, match="chat message 1"):
        tok.chat_tokens([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}])
    bad = tmp_path / "tokenizer.model"
    bad.write_bytes(b"not a model")
    with pytest.raises(MistralError, match="not a SentencePiece tokenizer"):
        Tokenizer(bad)


def test_lone_surrogate_is_one_line():
    tok = Tokenizer(TOKENIZER_V1)
    message = r"^text is not valid Unicode \(surrogates not allowed at character 2\)$"
    with pytest.raises(MistralError, match=message):
        tok.encode("ab\ud800c")
    with pytest.raises(MistralError, match="not valid Unicode"):
        tok.chat_tokens([{"role": "user", "content": "\udfff"}])
