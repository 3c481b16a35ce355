"""The Pixtral vision tower and both projectors against transformers (tiny random models it writes):
image features equal within 1e-4 (float32), one image and two of different sizes in one forward."""

import json
import re
import shutil
from dataclasses import replace

import mlx.core as mx
import numpy as np
import pytest
import torch
from safetensors.numpy import load_file

from checkpoints import TOKENIZER_V1
from mlx_mistral import make_cache
from mlx_mistral.errors import MistralError
from mlx_mistral.loading import build_model
from mlx_mistral.loading.hf import read_checkpoint
from mlx_mistral.model import Mistral
from mlx_mistral.config import ModelArgs
from mlx_mistral.loading.vision import NATIVE_NAMES, vision_weights
from mlx_mistral.vision import native_vision_args, vision_args

VISION = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
              num_channels=3, patch_size=16, image_size=256, hidden_act="silu",
              rope_parameters={"rope_type": "axial", "rope_theta": 10000.0})
TEXT = dict(vocab_size=1024, hidden_size=48, intermediate_size=96, num_hidden_layers=1, num_attention_heads=4,
            num_key_value_heads=2, head_dim=12, rms_norm_eps=1e-5, sliding_window=None,
            max_position_embeddings=4096, tie_word_embeddings=False)


def oracle(kind: str, path, vocab_size: int = TEXT["vocab_size"]):
    """A random Mistral3ForConditionalGeneration or LlavaForConditionalGeneration saved at `path`."""
    from transformers import (LlavaConfig, LlavaForConditionalGeneration, Mistral3Config,
                              Mistral3ForConditionalGeneration, MistralConfig, PixtralVisionConfig)

    torch.manual_seed(0)
    common = dict(vision_config=PixtralVisionConfig(**VISION), text_config=MistralConfig(**TEXT | dict(
                  vocab_size=vocab_size)),
                  image_token_index=10, vision_feature_layer=-1, projector_hidden_act="gelu",
                  tie_word_embeddings=False)
    if kind == "mistral3":
        config = Mistral3Config(**common, spatial_merge_size=2, multimodal_projector_bias=False)
        model = Mistral3ForConditionalGeneration(config)
    else:
        config = LlavaConfig(**common, vision_feature_select_strategy="full", multimodal_projector_bias=True)
        model = LlavaForConditionalGeneration(config)
    with torch.no_grad():  # larger than the default init, so that every layer shows in the features
        for name, p in model.named_parameters():
            if "norm" not in name:
                p.normal_(0.0, 0.1)
    model.eval().save_pretrained(path)
    return model


@pytest.fixture(scope="module", params=["mistral3", "llava"])
def models(request, tmp_path_factory):
    path = tmp_path_factory.mktemp(request.param)
    theirs = oracle(request.param, path)
    shutil.copy(TOKENIZER_V1, path / "tokenizer.model")  # a checkpoint directory needs one; unused here
    args, weights, _ = read_checkpoint(path)  # as the loader reads it: the text model and the vision tower
    return theirs, build_model(args, weights, mx.float32), path


def features(model, images: list[np.ndarray]) -> list[np.ndarray]:
    """transformers' image features: the images zero-padded bottom and right into one batch."""
    H, W = max(i.shape[0] for i in images), max(i.shape[1] for i in images)
    batch = np.zeros((len(images), 3, H, W), dtype=np.float32)
    for b, image in enumerate(images):
        batch[b, :, :image.shape[0], :image.shape[1]] = image.transpose(2, 0, 1)
    sizes = torch.tensor([i.shape[:2] for i in images])
    with torch.no_grad():
        out = model.model.get_image_features(pixel_values=torch.from_numpy(batch), image_sizes=sizes)
    return [f.numpy() for f in out.pooler_output]


@pytest.mark.parametrize("shapes", [[(64, 64)], [(96, 64), (32, 128)]])
def test_features_equal_transformers(models, shapes):
    theirs, ours, _ = models
    rng = np.random.default_rng(1)
    images = [rng.standard_normal((h, w, 3)).astype(np.float32) for h, w in shapes]
    expected = features(theirs, images)
    got = ours.image_features([mx.array(i) for i in images])
    assert [g.shape for g in got] == [e.shape for e in expected]
    for g, e in zip(got, expected):
        assert np.abs(np.array(g) - e).max() < 1e-4


def test_images_in_one_forward_do_not_see_each_other(models):
    _, ours, _ = models
    rng = np.random.default_rng(2)
    a, b = (mx.array(rng.standard_normal((64, 64 + 32 * i, 3)).astype(np.float32)) for i in range(2))
    together = ours.image_features([a, b])
    assert np.abs(np.array(together[1]) - np.array(ours.image_features([b])[0])).max() < 1e-5


def test_bad_images_and_configs_are_one_line_errors(models):
    _, ours, _ = models
    cell = ours.args.vision.cell
    with pytest.raises(MistralError, match=f"multiples of {cell} pixels"):
        ours.image_features([mx.zeros((cell + 8, cell, 3))])  # the merger cannot divide it: never truncated
    with pytest.raises(MistralError, match="vision_feature_select_strategy"):
        vision_args({"model_type": "llava", "vision_config": {}, "text_config": {}})
    with pytest.raises(MistralError, match="lacks 'hidden_size'"):
        vision_args({"model_type": "mistral3", "vision_config": {}, "text_config": {}})
    with pytest.raises(MistralError, match="rope_type must be"):
        vision_args({"model_type": "mistral3", "vision_config": {"rope_parameters": {"rope_type": "yarn"}}})


def image_tokens(rows: int, cols: int) -> list[int]:
    """An image's tokens: each row [IMG] x cols then [IMG_BREAK], the last one [IMG_END]."""
    tokens = ([10] * cols + [12]) * rows
    return tokens[:-1] + [13]


@pytest.mark.parametrize("chunk", [None, 5])
def test_logits_equal_transformers(models, chunk):
    """Two images of different sizes in one prompt (features in place of their [IMG] tokens), fed in
    one prefill and in chunks of 5 tokens that split the images' tokens."""
    theirs, ours, _ = models
    rng = np.random.default_rng(3)
    images = [rng.standard_normal((h, w, 3)).astype(np.float32) for h, w in ((64, 96), (32, 64))]
    cell = ours.args.vision.cell
    ids = [1, 5, 6]
    for image in images:
        ids += image_tokens(image.shape[0] // cell, image.shape[1] // cell) + [7, 8]
    H, W = 64, 96
    batch = np.zeros((2, 3, H, W), dtype=np.float32)
    for b, image in enumerate(images):
        batch[b, :, :image.shape[0], :image.shape[1]] = image.transpose(2, 0, 1)
    with torch.no_grad():
        expected = theirs(input_ids=torch.tensor([ids]), pixel_values=torch.from_numpy(batch),
                          image_sizes=torch.tensor([i.shape[:2] for i in images])).logits[0].numpy()
    features = mx.concatenate(ours.image_features([mx.array(i) for i in images]))
    at = [i for i, t in enumerate(ids) if t == 10]
    cache, got, fed = make_cache(ours.args), [], 0
    for start in range(0, len(ids), chunk or len(ids)):
        piece = ids[start:start + (chunk or len(ids))]
        mine = [i - start for i in at if start <= i < start + len(piece)]
        images_here = (mx.array(mine), features[fed:fed + len(mine)]) if mine else None
        got.append(ours(mx.array([piece]), cache, images_here)[0])
        fed += len(mine)
    assert fed == features.shape[0]
    assert np.abs(np.array(mx.concatenate(got)) - expected).max() < 1e-4


def other_layout(path, layout: str) -> tuple[dict, Mistral]:
    """The oracle's vision weights as Mistral's consolidated.safetensors names them (q/k rows in
    interleaved pairs, and params.json), or as mlx-vlm's conversions do (a `vision_model.` level,
    the convolution [out, kh, kw, in]); and a Vision for them."""
    config = json.loads((path / "config.json").read_text())
    weights = {k: mx.array(v) for k, v in load_file(path / "model.safetensors").items()
               if "vision_tower" in k or "multi_modal_projector" in k}
    args = vision_args(config)
    out = {}
    for name, w in weights.items():
        name = name.removeprefix("model.")
        if layout == "mlx-vlm":
            name = name.replace("vision_tower.", "vision_tower.vision_model.")
            out[name] = w.transpose(0, 2, 3, 1) if name.endswith("patch_conv.weight") else w
            continue
        if name.endswith(("q_proj.weight", "k_proj.weight")):
            h, d = args.n_heads, args.head_dim
            w = w.reshape(h, 2, d // 2, -1).transpose(0, 2, 1, 3).reshape(h * d, -1)
        for theirs, ours in reversed(NATIVE_NAMES):
            name = name.replace(ours, theirs)
        out[name] = w
    text = ModelArgs.from_hf(config["text_config"])
    if layout == "mlx-vlm":
        return out, Mistral(replace(text, vision=args))
    v = config["vision_config"]
    params = dict(dim=config["text_config"]["hidden_size"], norm_eps=1e-5, vision_encoder=dict(
        hidden_size=v["hidden_size"], intermediate_size=v["intermediate_size"],
        num_hidden_layers=v["num_hidden_layers"], num_attention_heads=v["num_attention_heads"],
        patch_size=v["patch_size"], num_channels=3, rope_theta=1e4, image_size=v["image_size"],
        adapter_bias=config["model_type"] == "llava", image_token_id=10,
        **(dict(spatial_merge_size=2, mm_projector_id="patch_merge", add_pre_mm_projector_layer_norm=True)
           if config["model_type"] == "mistral3" else {})))
    return out, Mistral(replace(text, vision=native_vision_args(params)))


@pytest.mark.parametrize("layout", ["native", "mlx-vlm"])
def test_other_layouts_give_the_same_features(models, layout):
    theirs, ours, path = models
    weights, model = other_layout(path, layout)
    assert model.args.vision == ours.args.vision
    model.load_weights(list(vision_weights(weights, model.args.vision).items()), strict=False)
    assert not weights  # every tensor taken
    rng = np.random.default_rng(4)
    images = [rng.standard_normal((64, 96, 3)).astype(np.float32)]
    got = model.image_features([mx.array(i) for i in images])[0]
    assert np.abs(np.array(got) - features(theirs, images)[0]).max() < 1e-4


@pytest.fixture(scope="module")
def image_model(tmp_path_factory):
    """A tiny Mistral3 with Tekken's vocabulary, saved by transformers with a tekken.json whose image
    settings are its own (patch 16, merge 2, at most 128 pixels a side)."""
    from checkpoints import TOKENIZER_TEKKEN

    path = tmp_path_factory.mktemp("mistral3-tekken")
    theirs = oracle("mistral3", path, vocab_size=131072)
    data = json.loads(TOKENIZER_TEKKEN.read_text(encoding="utf-8"))
    data["image"] = {"image_patch_size": 16, "max_image_size": 128, "spatial_merge_size": 2}
    (path / "tekken.json").write_text(json.dumps(data), encoding="utf-8")
    return theirs, path


def data_uri(height: int, width: int, seed: int) -> str:
    import base64
    import io

    from PIL import Image

    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format="PNG")
    return "data:image/png;base64," + base64.b64encode(out.getvalue()).decode()


@pytest.mark.parametrize("chunk", [512, 7])
def test_an_image_question_generates_as_transformers_does(image_model, chunk):
    """chat_inputs (mistral-common: an upscaled 40x70 image and a downscaled 300x150 one) -> the
    same greedy tokens as transformers' generate on the same ids and pixels, in one prefill and
    in chunks of 7 that split the images' tokens."""
    from mlx_mistral import load, make_sampler, stream_generate

    theirs, path = image_model
    model, tok = load(str(path))
    messages = [{"role": "user", "content": [
        {"type": "text", "text": "What is in these pictures?"},
        {"type": "image_url", "image_url": {"url": data_uri(40, 70, 0)}},
        {"type": "image_url", "image_url": {"url": data_uri(300, 150, 1)}}]}]
    ids, images = tok.chat_inputs(messages)
    assert [i.shape for i in images] == [(64, 96, 3), (128, 64, 3)]  # cells of 32: up to 2x3, down to 4x2
    assert ids.count(10) == 2 * 3 + 4 * 2 and ids.count(13) == 2
    H, W = 128, 96
    batch = np.zeros((2, 3, H, W), dtype=np.float32)
    for b, image in enumerate(images):
        batch[b, :, :image.shape[0], :image.shape[1]] = image.transpose(2, 0, 1)
    with torch.no_grad():
        expected = theirs.generate(input_ids=torch.tensor([ids]), pixel_values=torch.from_numpy(batch),
                                   image_sizes=torch.tensor([i.shape[:2] for i in images]), max_new_tokens=8,
                                   do_sample=False)[0, len(ids):].tolist()
    got = [r.token for r in stream_generate(model, tok, ids, max_tokens=8, sampler=make_sampler(),
                                            images=images, prefill_chunk=chunk)]
    assert got == expected
    with pytest.raises(MistralError, match="use Tokenizer.chat_inputs"):
        tok.chat_tokens(messages)
    with pytest.raises(MistralError, match=r"\[IMG\] tokens"):
        next(stream_generate(model, tok, ids, images=images[:1]))


def test_cli_answers_about_an_image(image_model, tmp_path, capsys):
    """--image: the same tokens as the Python API; bad files and text-only models are one line each."""
    import base64

    from mlx_mistral import load, make_sampler, stream_generate
    from mlx_mistral.generate.__main__ import main

    _, path = image_model
    png = tmp_path / "photo.png"
    png.write_bytes(base64.b64decode(data_uri(40, 70, 0).split(",", 1)[1]))
    argv = ["--model", str(path), "--prompt", "What is this?", "--image", str(png), "--max-tokens", "6",
            "--json"]
    assert main(argv) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["images"] == 1 and out["image_tokens"] == 6 and out["vision_seconds"] > 0
    assert main(argv[:-1]) == 0
    assert re.search(r"\| images: 1, 6 tokens, vision [\d.]+ s", capsys.readouterr().err)
    model, tok = load(str(path))
    content = [{"type": "text", "text": "What is this?"},
               {"type": "image_url", "image_url": {"url": data_uri(40, 70, 0)}}]
    ids, images = tok.chat_inputs([{"role": "user", "content": content}])
    assert out["tokens"] == [r.token for r in stream_generate(model, tok, ids, max_tokens=6, images=images,
                                                              sampler=make_sampler())]
    broken = tmp_path / "broken.png"
    broken.write_bytes(png.read_bytes()[:60])
    bad = ((tmp_path / "none.png", "no such file"), (broken, "not an image that can be decoded"))
    for image, message in bad:
        assert main(argv[:4] + ["--image", str(image)]) == 2
        err = capsys.readouterr().err.strip()
        assert message in err and str(image) in err and "\n" not in err
    assert main(["--model", "demo", "--prompt", "hi", "--image", str(png)]) == 2
    assert "takes text only" in capsys.readouterr().err


def test_image_rows_in_the_batch_equal_their_solo_runs(image_model):
    """The server's scheduler: 4 rows at once, 2 with images (of different sizes), prefilled side by
    side in chunks that split the images' tokens: every row equals its stream_generate run; image
    rows leave nothing in the prefix cache (their [IMG] ids do not say which image)."""
    from mlx_mistral import make_sampler, stream_generate
    from mlx_mistral.serve import Request, Scheduler

    _, path = image_model
    s = Scheduler(str(path), max_batch=4, prefill_chunk=24, max_idle=4)
    try:
        tok = s.tokenizer
        inputs = []
        for i in range(4):
            content = [{"type": "text", "text": f"Question {i}: what do you see?" + " Be brief." * i}]
            if i % 2:
                content.append({"type": "image_url", "image_url": {"url": data_uri(40 + 60 * i, 70, i)}})
            inputs.append(tok.chat_inputs([{"role": "user", "content": content}]))
        solo = [s.call(lambda ids=ids, images=images: [r.token for r in stream_generate(
                    s.model, tok, ids, max_tokens=12, sampler=make_sampler(), images=images)])
                for ids, images in inputs]
        before = s.stats()
        requests = [s.submit(Request(ids, max_tokens=12, images=images)) for ids, images in inputs]
        got = [[e.token for e in r.events() if e.token is not None] for r in requests]
        assert got == solo
        assert [len(images) for _, images in inputs] == [0, 1, 0, 1]
        assert s.stats()["max_prefill_rows"] >= 2 and s.stats()["idle_caches"] == before["idle_caches"] + 2
        with pytest.raises(MistralError, match="text only"):
            Request(inputs[1][0], images=inputs[1][1]).check(__import__("mlx_mistral").load("demo")[0], 10**6)
    finally:
        s.close()


def test_the_official_clients_ask_about_an_image(image_model):
    """The server on 127.0.0.1, the official clients: a data-URI image in an OpenAI chat and in a
    Responses input, and a base64 image block in an Anthropic message, answer as stream_generate
    does; an http URL, a file:// URL, bad base64, a corrupt image and one past the pixel limit each
    get a 400 naming the part, as do an Anthropic URL source and a Responses http URL."""
    import base64
    import io

    import anthropic
    import openai
    from PIL import Image

    from mlx_mistral import load, make_sampler, stream_generate
    from test_server import KEY, Server

    _, path = image_model
    server = Server("--model", str(path), "--api-key", KEY)
    try:
        client = openai.OpenAI(base_url=server.wait().url + "/v1", api_key=KEY, max_retries=0)
        name = client.models.list().data[0].id
        content = [{"type": "text", "text": "What is this?"},
                   {"type": "image_url", "image_url": {"url": data_uri(40, 70, 0)}}]
        answer = client.chat.completions.create(model=name, max_tokens=8, temperature=0,
                                                messages=[{"role": "user", "content": content}])
        model, tok = load(str(path))
        ids, images = tok.chat_inputs([{"role": "user", "content": content}])
        solo = "".join(r.text for r in stream_generate(model, tok, ids, max_tokens=8, images=images,
                                                       sampler=make_sampler()))
        assert answer.choices[0].message.content == solo and answer.usage.prompt_tokens == len(ids)
        metrics = server.metrics()
        assert metrics["mlx_mistral_images_total"] == 1 and metrics["mlx_mistral_image_tokens_total"] == 6
        assert metrics["mlx_mistral_vision_seconds_total"] > 0
        claude = anthropic.Anthropic(base_url=server.url, api_key=KEY, max_retries=0)
        image = {"type": "base64", "media_type": "image/png", "data": data_uri(40, 70, 0).split(",", 1)[1]}
        blocks = [{"type": "text", "text": "What is this?"}, {"type": "image", "source": image}]
        message = claude.messages.create(model=name, max_tokens=8, extra_body={"temperature": 0},
                                         messages=[{"role": "user", "content": blocks}])
        assert message.content[0].text == solo and message.usage.input_tokens == len(ids)
        with pytest.raises(anthropic.BadRequestError) as e:
            claude.messages.create(model=name, max_tokens=8, messages=[{"role": "user", "content": [
                {"type": "image", "source": {"type": "url", "url": "https://example.com/cat.png"}}]}])
        assert "messages.0.content.0.source: only base64" in str(e.value)
        response = client.responses.create(model=name, max_output_tokens=8, temperature=0, input=[
            {"role": "user", "content": [{"type": "input_text", "text": "What is this?"},
                                         {"type": "input_image", "image_url": data_uri(40, 70, 0)}]}])
        assert response.output_text == solo
        with pytest.raises(openai.BadRequestError) as e:
            client.responses.create(model=name, input=[{"role": "user", "content": [
                {"type": "input_image", "image_url": "https://example.com/cat.png"}]}])
        assert "input.0.content.0: image URLs are not fetched" in str(e.value)
        huge = io.BytesIO()
        Image.new("L", (8200, 8200)).save(huge, format="PNG")
        png = base64.b64decode(data_uri(40, 70, 0).split(",", 1)[1])
        bad = {"https://example.com/cat.png": "not fetched by this server",
               "file:///etc/passwd": "only data URIs",
               "data:image/png;base64," + base64.b64encode(png[:60]).decode(): "not an image that can be",
               data_uri(40, 70, 0)[:81]: "not valid base64",
               "data:image/png;base64," + base64.b64encode(huge.getvalue()).decode(): "past the limit"}
        for url, says in bad.items():
            parts = [{"type": "text", "text": "Hi"}, {"type": "image_url", "image_url": {"url": url}}]
            with pytest.raises(openai.BadRequestError) as e:
                client.chat.completions.create(model=name, max_tokens=4,
                                               messages=[{"role": "user", "content": parts}])
            assert says in str(e.value) and "messages[0].content[1]" in str(e.value)
    finally:
        server.stop()
