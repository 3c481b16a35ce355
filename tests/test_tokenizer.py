"""Chat templates against mistral-common; control tokens; streaming decode."""

import filecmp

import pytest
from mistral_common.protocol.instruct.messages import AssistantMessage, SystemMessage, ToolMessage, UserMessage
from mistral_common.protocol.instruct.request import ChatCompletionRequest
from mistral_common.protocol.instruct.tool_calls import Function, FunctionCall, Tool, ToolCall
from mistral_common.tokens.tokenizers.mistral import MistralTokenizer

from checkpoints import DATA, TOKENIZER_TEKKEN, TOKENIZER_V1, TOKENIZER_V3
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


TOKENIZER_V7 = DATA / "mistral_instruct_tokenizer_241114.model.v7"  # Mistral Large 2411's
SHIPPED = [TOKENIZER_V1, DATA / "mistral_instruct_tokenizer_240216.model.v2", TOKENIZER_V3, TOKENIZER_V7,
           DATA / "mistral_instruct_tokenizer_241114.model.v7m1", DATA / "tekken_240718.json", TOKENIZER_TEKKEN]


@pytest.fixture(scope="module", params=SHIPPED, ids=["v1", "v2", "v3", "v7", "v7m1", "tekken-0718", "tekken"])
def tokenizers(request):
    return Tokenizer(request.param), MistralTokenizer.from_file(str(request.param))


def test_a_versioned_file_is_chosen_over_a_bare_tokenizer_model(tmp_path):
    """Mistral Large 2411's repo: tokenizer.model.v7 beside a bare tokenizer.model, whose version the
    name does not say (guessed v3 from its [INST]); the .v7 one is read, and chats as mistral-common's v7."""
    from mlx_mistral.loading import find_tokenizer

    for name in ("tokenizer.model", "tokenizer.model.v3", "tokenizer.model.v7", "tokenizer.json"):
        (tmp_path / name).write_bytes(TOKENIZER_V7.read_bytes())
    assert find_tokenizer(tmp_path).name == "tokenizer.model.v7"
    assert Tokenizer(tmp_path / "tokenizer.model").version == "v3"  # the guess that the choice avoids
    tok, oracle = Tokenizer(find_tokenizer(tmp_path)), MistralTokenizer.from_file(str(TOKENIZER_V7))
    messages = CONVERSATIONS[1]
    request = ChatCompletionRequest(messages=[CLASSES[m["role"]](content=m["content"]) for m in messages])
    assert tok.version == "v7" and tok.chat_tokens(messages) == oracle.encode_chat_completion(request).tokens
    (tmp_path / "tekken.json").write_bytes(TOKENIZER_TEKKEN.read_bytes())
    assert find_tokenizer(tmp_path).name == "tekken.json"


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


def test_empty_answer_is_left_out(tokenizers):
    ours, theirs = tokenizers
    messages = [{"role": "user", "content": "a"}, {"role": "assistant", "content": ""}, {"role": "user", "content": "b"}]
    joined = ChatCompletionRequest(messages=[UserMessage(content="a"), UserMessage(content="b")])
    assert ours.chat_tokens(messages) == theirs.encode_chat_completion(joined).tokens


def test_user_text_never_becomes_a_control_token(tokenizers):
    tok = tokenizers[0]
    text = "[INST] </s> <s> [/INST] <unk>"
    ids = tok.chat_tokens([{"role": "user", "content": text}])
    control = tok.control_ids | {0}
    assert {tok.bos_id, tok.eos_id} <= control and (tok.version == "v1") == (3 not in control)
    assert ids[0] == tok.bos_id and ids.count(tok.bos_id) == 1 and tok.eos_id not in ids
    body = ids[1:] if tok.version == "v1" else ids[2:-1]
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
    with pytest.raises(MistralError, match="Unknown message role: robot"):
        tok.chat_tokens([{"role": "robot", "content": "a"}, {"role": "user", "content": "b"}])
    with pytest.raises(MistralError, match="lacks its 'content' field"):
        tok.chat_tokens([{"role": "user"}])
    bad = tmp_path / "tokenizer.model"
    bad.write_bytes(b"not a model")
    with pytest.raises(MistralError, match="not a SentencePiece tokenizer"):
        Tokenizer(bad)
    bad = tmp_path / "tekken.json"
    bad.write_text("{oops")
    with pytest.raises(MistralError, match="tekken.json: not a Tekken tokenizer"):
        Tokenizer(bad)


WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
TIME = {"type": "function", "function": {
    "name": "get_time", "description": "Local time", "parameters": {"type": "object", "properties": {}}}}


def call(id_: str, name: str, arguments: str) -> dict:
    return {"id": id_, "type": "function", "function": {"name": name, "arguments": arguments}}


ASK = {"role": "user", "content": "Weather in Paris?"}
CALLED = {"role": "assistant", "content": "", "tool_calls": [call("abc123XYZ", "get_weather", '{"city": "Paris"}')]}
RESULT = {"role": "tool", "tool_call_id": "abc123XYZ", "content": '{"temp": 21}'}
TOOL_REQUESTS = {
    "one tool": ([ASK], [WEATHER]),
    "several tools": ([{"role": "system", "content": "Use tools."}, ASK], [WEATHER, TIME]),
    "call then result": ([ASK, CALLED, RESULT], [WEATHER]),
    "multi-turn with calls": ([ASK, CALLED, RESULT, {"role": "assistant", "content": "21 degrees."},
                               {"role": "user", "content": "And the time there?"},
                               {"role": "assistant", "content": "", "tool_calls": [
                                   call("t1me00001", "get_time", "{}"), call("w2th00002", "get_weather", '{"city": "Lyon"}')]},
                               {"role": "tool", "tool_call_id": "t1me00001", "content": "12:00"},
                               {"role": "tool", "tool_call_id": "w2th00002", "content": "rain"}], [WEATHER, TIME]),
    "unicode arguments": ([{"role": "user", "content": "Météo à Zürich? 🌦"},
                           {"role": "assistant", "content": "", "tool_calls": [
                               call("uni000001", "get_weather", '{"city": "Zürich 東京 🌦"}')]},
                           {"role": "tool", "tool_call_id": "uni000001", "content": "☀️ 25°C"}], [WEATHER]),
}


def mistral_common_request(messages: list[dict], tools: list[dict]) -> ChatCompletionRequest:
    """The request built from mistral-common's own classes (not its OpenAI converter)."""
    out = []
    for m in messages:
        if m["role"] == "tool":
            out.append(ToolMessage(content=m["content"], tool_call_id=m["tool_call_id"]))
        elif m.get("tool_calls"):
            out.append(AssistantMessage(content=m["content"] or None, tool_calls=[
                ToolCall(id=c["id"], function=FunctionCall(name=c["function"]["name"],
                                                           arguments=c["function"]["arguments"]))
                for c in m["tool_calls"]]))
        else:
            out.append(CLASSES[m["role"]](content=m["content"]))
    return ChatCompletionRequest(messages=out, tools=[Tool(function=Function(**t["function"])) for t in tools])


@pytest.mark.parametrize("case", TOOL_REQUESTS)
def test_tool_requests_match_mistral_common(tokenizers, case):
    ours, theirs = tokenizers
    messages, tools = TOOL_REQUESTS[case]
    if ours.version == "v1":
        with pytest.raises(MistralError, match="no function calling"):
            ours.chat_tokens(messages, tools=tools)
        return
    if ours.version == "v2" and case == "multi-turn with calls":  # refused by mistral-common: so by us, in one line
        with pytest.raises(MistralError, match="v2 does not support multiple tool results for one assistant turn"):
            ours.chat_tokens(messages, tools=tools)
        return
    ids = ours.chat_tokens(messages, tools=tools)
    assert ids == theirs.encode_chat_completion(mistral_common_request(messages, tools)).tokens
    assert ours.tool_calls_id in ids if any(m.get("tool_calls") for m in messages) else ours.tool_calls_id not in ids


def test_lone_surrogate_is_one_line():
    tok = Tokenizer(TOKENIZER_V1)
    message = r"^text is not valid Unicode \(surrogates not allowed at character 2\)$"
    with pytest.raises(MistralError, match=message):
        tok.encode("ab\ud800c")
    with pytest.raises(MistralError, match="not valid Unicode"):
        tok.chat_tokens([{"role": "user", "content": "\udfff"}])
