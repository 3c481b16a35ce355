"""A Tekken (tekken.json) directory with a NeMo-like config (n_heads x head_dim != hidden size),
end to end against mistral-common's encoding and the transformers oracle."""

import mlx.core as mx
import numpy as np
import pytest
from mistral_common.protocol.instruct.request import ChatCompletionRequest
from mistral_common.tokens.tokenizers.mistral import MistralTokenizer

from checkpoints import TOKENIZER_TEKKEN, oracle_logits, tiny_config, write_hf
from mlx_mistral import load, make_cache, make_sampler, stream_generate

CONVERSATION = [{"role": "system", "content": "Réponds en français."}, {"role": "user", "content": "Bonjour 👋"},
                {"role": "assistant", "content": "Salut ! Ça va ?"}, {"role": "user", "content": "Oui, 東京 est loin."}]


@pytest.fixture(scope="module")
def nemo_like(tmp_path_factory):
    """(directory, oracle) of a tiny model with Tekken's 131072-token vocabulary and no window."""
    path = tmp_path_factory.mktemp("tekken")
    config = tiny_config(sliding_window=None, vocab_size=131072, hidden_size=32, intermediate_size=64,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=16, rope_theta=1e6)
    return path, write_hf(path, config, tokenizer=TOKENIZER_TEKKEN)


def test_tekken_directory_chats_like_the_oracle(nemo_like):
    path, hf = nemo_like
    model, tok = load(str(path))
    assert tok.tekken and tok.path.name == "tekken.json" and (tok.bos_id, tok.eos_id) == (1, 2)
    assert model.args.n_heads * model.args.head_dim != model.args.dim
    ids = tok.chat_tokens(CONVERSATION)
    reference = MistralTokenizer.from_file(str(TOKENIZER_TEKKEN))
    assert ids == reference.encode_chat_completion(ChatCompletionRequest.from_openai(CONVERSATION)).tokens
    cache = make_cache(model.args, len(ids))
    ours = np.array(model(mx.array([ids]), cache)[0])
    diff = np.abs(ours - oracle_logits(hf, ids)).max()
    print(f"tekken NeMo-like: max abs logit diff {diff:.2e}")
    assert diff <= 1e-4
    # greedy answer: the oracle's argmax token by token, streamed as the tokenizer decodes it
    responses = list(stream_generate(model, tok, ids, max_tokens=6, sampler=make_sampler(0.0)))
    answer = [r.token for r in responses]
    for n, token in enumerate(answer):
        assert token == oracle_logits(hf, ids + answer[:n])[-1].argmax()
    assert "".join(r.text for r in responses) == tok.decode([t for t in answer if t != tok.eos_id])


def test_convert_keeps_tekken_json(nemo_like, tmp_path):
    from mlx_mistral.convert import convert

    convert(str(nemo_like[0]), tmp_path / "out")
    assert (tmp_path / "out" / "tekken.json").exists() and not (tmp_path / "out" / "tokenizer.model").exists()
    assert load(str(tmp_path / "out"))[1].tekken


@pytest.mark.parametrize("version", ["v3", "v7", "v11", "v13", "v15"])
def test_every_tekken_version_chats_as_mistral_common(tmp_path, version):
    """tekken.json of each version mistral-common 1.13 has (TokenizerVersion): the two shipped files
    are v3; the others are written by checkpoints.write_tekken."""
    from mistral_common.tokens.tokenizers.base import TokenizerVersion

    from checkpoints import write_tekken
    from mlx_mistral.tokenizer import Tokenizer

    assert {v.value for v in TokenizerVersion} - {"v1", "v2"} == {"v3", "v7", "v11", "v13", "v15"}  # SentencePiece only
    path = write_tekken(tmp_path / "tekken.json", version, think=version in ("v13", "v15"))
    tok = Tokenizer(path)
    reference = MistralTokenizer.from_file(str(path))
    for messages in (CONVERSATION, CONVERSATION[1:]):
        assert tok.version == version and tok.chat_tokens(messages) == \
            reference.encode_chat_completion(ChatCompletionRequest.from_openai(messages)).tokens


@pytest.mark.parametrize("name", ["tekken_240718.json", "tekken_240911.json"])
def test_every_shipped_tekken_file_loads(name):
    from checkpoints import DATA
    from mlx_mistral.tokenizer import Tokenizer

    tok = Tokenizer(DATA / name)
    reference = MistralTokenizer.from_file(str(DATA / name))
    assert tok.tekken and tok.chat_tokens(CONVERSATION) == \
        reference.encode_chat_completion(ChatCompletionRequest.from_openai(CONVERSATION)).tokens


def test_mlx_lm_convert_output_loads_and_a_bare_tokenizer_json_is_refused(nemo_like, tmp_path):
    """mlx_lm.convert (0.32.2, transformers 5) of a Tekken model writes tekken.json (transformers
    loads it with mistral-common); a directory with only a Tekken tokenizer.json (older conversions)
    cannot say its chat format version: refused in one line."""
    import shutil

    from mlx_lm import convert as mlx_lm_convert
    from transformers.integrations.mistral.tokenizer import convert_tekken_tokenizer

    from mlx_mistral import MistralError

    source = tmp_path / "source"
    shutil.copytree(nemo_like[0], source)
    convert_tekken_tokenizer(str(source / "tekken.json")).save_pretrained(source)  # as HF repos have both
    mlx_lm_convert(str(source), str(tmp_path / "mlx"))
    assert (tmp_path / "mlx" / "tekken.json").exists()
    model, tok = load(str(tmp_path / "mlx"))
    assert tok.path.name == "tekken.json" and tok.chat_tokens(CONVERSATION) == load(str(source))[1].chat_tokens(
        CONVERSATION)
    (tmp_path / "mlx" / "tekken.json").unlink()
    shutil.copy(source / "tokenizer.json", tmp_path / "mlx")
    with pytest.raises(MistralError, match="tokenizer.json: a byte-level BPE .* put the model's tekken.json beside it$"):
        load(str(tmp_path / "mlx"))
