"""The vision tower on a Mistral Small 3.1-shaped model: encoder time, prefill and time to first token.

    python benchmarks/bench_vision.py [--text-layers 1] [--size 1024x768] [--repeat 3]

Random weights in float32 (the CPU's fast dtype): the real vision tower's dimensions (hidden 1024,
24 layers, 16 heads, MLP 4096, patch 14, a 2x2 merger) and the real text width (5120, 32 heads of
128, 8 KV heads, MLP 32768, Tekken's 131072 tokens) with fewer text layers. The image is
mistral-common's resize of a random RGB picture of --size (to the 28-pixel grid, at most 1540 a
side), in one chat turn. Reported: the tower's seconds (patches through 24 blocks and the
projector), the prefill of the whole prompt with the image features in place, the time to the
first token, and the peak memory. Not measured yet: mlx-vlm side by side, and the server with
image and text clients together (issue #33).
"""

import argparse
import base64
import io
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import mlx_mistral  # noqa: E402,F401  (OpenBLAS before mlx)
import mlx.core as mx  # noqa: E402
import mlx.utils  # noqa: E402
import numpy as np  # noqa: E402

from mlx_mistral import make_cache  # noqa: E402
from mlx_mistral.config import ModelArgs  # noqa: E402
from mlx_mistral.generate import prefill  # noqa: E402
from mlx_mistral.model import Mistral  # noqa: E402
from mlx_mistral.vision import VisionArgs, image_slots  # noqa: E402

SMALL_31_VISION = VisionArgs(dim=1024, hidden_dim=4096, n_layers=24, n_heads=16, patch_size=14,
                             merge=2, text_dim=5120, act="silu")


def chat_inputs(size: tuple[int, int]) -> tuple[list[int], list[np.ndarray]]:
    """A question about a random picture of `size` (width, height), as mistral-common encodes it
    for a Small 3.1 tokenizer's image settings (patch 14, merge 2, at most 1540 pixels a side)."""
    import mistral_common
    from PIL import Image

    from mlx_mistral.tokenizer import Tokenizer

    data = json.loads((Path(mistral_common.__file__).parent / "data" / "tekken_240911.json").read_text())
    data["image"] = {"image_patch_size": 14, "max_image_size": 1540, "spatial_merge_size": 2}
    path = Path("/tmp/bench_vision_tekken.json")
    path.write_text(json.dumps(data))
    pixels = np.random.default_rng(0).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format="PNG")
    url = "data:image/png;base64," + base64.b64encode(out.getvalue()).decode()
    content = [{"type": "text", "text": "Describe this picture in one sentence."},
               {"type": "image_url", "image_url": {"url": url}}]
    return Tokenizer(path).chat_inputs([{"role": "user", "content": content}])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--text-layers", type=int, default=1)
    p.add_argument("--size", default="1024x768", help="the picture's WIDTHxHEIGHT before resizing")
    p.add_argument("--repeat", type=int, default=3)
    a = p.parse_args()
    width, height = map(int, a.size.split("x"))
    args = ModelArgs(dim=5120, n_layers=a.text_layers, n_heads=32, n_kv_heads=8, head_dim=128,
                     hidden_dim=32768, vocab_size=131072, rope_theta=1e9, max_position_embeddings=131072,
                     tie_word_embeddings=True, vision=SMALL_31_VISION)
    model = Mistral(args)
    model.update(mlx.utils.tree_map(lambda w: (mx.random.normal(w.shape) * 0.02).astype(mx.float32),
                                   model.parameters()))
    mx.eval(model.parameters())
    ids, images = chat_inputs((width, height))
    grid = images[0].shape[:2]
    print(f"Small 3.1-shaped, {a.text_layers} text layer(s), float32, {mx.default_device()}: a "
          f"{width}x{height} picture -> {grid[1]}x{grid[0]} pixels, {grid[0] // 14 * grid[1] // 14} patches, "
          f"{ids.count(10)} image tokens, {len(ids)} prompt tokens")
    for run in range(a.repeat):
        mx.reset_peak_memory()
        start = time.perf_counter()
        slots = image_slots(model, ids, images)
        tower = time.perf_counter() - start
        cache = make_cache(args, len(ids) + 8)
        logits = prefill(model, ids, cache, 512, slots)
        first = mx.argmax(logits, axis=-1)
        mx.eval(first)
        ttft = time.perf_counter() - start
        print(f"run {run}: vision tower {tower:.2f} s, prefill {ttft - tower:.2f} s, time to first "
              f"token {ttft:.2f} s, peak memory {mx.get_peak_memory() / 2**30:.2f} GiB", flush=True)


if __name__ == "__main__":
    main()
