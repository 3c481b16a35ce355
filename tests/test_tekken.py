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
