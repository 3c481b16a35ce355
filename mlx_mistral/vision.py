"""The Pixtral vision encoder and the projectors that turn its patches into text embeddings.

One tower for every multimodal Mistral (Pixtral 12B, Small 3.x, Magistral 1.2, Ministral 3): a
patch convolution without bias, an RMSNorm (`ln_pre`), then pre-norm blocks (RMSNorm, attention
without biases, a SiLU-gated MLP), no final norm. Positions are 2D: axial RoPE rotates half of
each head by the patch's row and half by its column. Several images go through one forward as
one sequence, each attending only to itself (a block-diagonal mask, one fused attention call).

The projector maps the tower's last layer to the text model's width: `llava` (Pixtral 12B:
linear, GELU, linear, with biases) or `mistral3` (RMSNorm, a 2x2 patch merger, linear, GELU,
linear). The features replace the [IMG] token embeddings of the prompt, in order.
"""

from collections.abc import Sequence
from dataclasses import dataclass

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from .errors import MistralError

ACTIVATIONS = {"silu": nn.silu, "gelu": nn.gelu}


@dataclass(frozen=True)
class VisionArgs:
    """The tower's shape and the projector's (`projector`: "mistral3" or "llava")."""

    dim: int = 1024
    hidden_dim: int = 4096
    n_layers: int = 24
    n_heads: int = 16
    patch_size: int = 14
    num_channels: int = 3
    rope_theta: float = 10000.0
    act: str = "silu"
    projector: str = "mistral3"
    text_dim: int = 5120
    merge: int = 2  # patches merged per side (mistral3); 1 for llava
    projector_bias: bool = False
    projector_act: str = "gelu"
    text_norm_eps: float = 1e-5
    image_token_id: int = 10

    def __post_init__(self):
        if self.dim % self.n_heads or (self.dim // self.n_heads) % 4:
            raise MistralError(f"vision config: hidden_size {self.dim} must split into {self.n_heads} heads "
                               "of a size divisible by 4 (2D RoPE)")
        for name in ("act", "projector_act"):
            if getattr(self, name) not in ACTIVATIONS:
                raise MistralError(f"vision config: {name} must be one of {sorted(ACTIVATIONS)}, "
                                   f"got {getattr(self, name)!r}")
        if self.projector not in ("mistral3", "llava"):
            raise MistralError(f"vision config: projector must be mistral3 or llava, got {self.projector!r}")

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @property
    def cell(self) -> int:
        """Pixels per side of one image token: patch x merge."""
        return self.patch_size * self.merge


def axial_rope(grids: list[tuple[int, int]], head_dim: int, theta: float) -> tuple[mx.array, mx.array]:
    """cos, sin [S, head_dim] for the patches of every grid (rows x cols, row-major, one after the
    other): frequencies f_j = theta^(-2j / head_dim); the first quarter of the angles is row * f[0::2],
    the second col * f[1::2], and the second half repeats the first (rotate-half pairs)."""
    f = theta ** (-mx.arange(0, head_dim, 2, dtype=mx.float32) / head_dim)
    angles = []
    for rows, cols in grids:
        r = mx.repeat(mx.arange(rows, dtype=mx.float32), cols)
        c = mx.tile(mx.arange(cols, dtype=mx.float32), rows)
        angles.append(mx.concatenate([r[:, None] * f[None, 0::2], c[:, None] * f[None, 1::2]], axis=-1))
    a = mx.concatenate(angles)
    a = mx.concatenate([a, a], axis=-1)
    return mx.cos(a), mx.sin(a)


def rotate(x: mx.array, cos: mx.array, sin: mx.array) -> mx.array:
    half = x.shape[-1] // 2
    return x * cos + mx.concatenate([-x[..., half:], x[..., :half]], axis=-1) * sin


class Attention(nn.Module):
    def __init__(self, args: VisionArgs):
        super().__init__()
        self.n_heads, self.scale = args.n_heads, args.head_dim ** -0.5
        self.q_proj, self.k_proj, self.v_proj, self.o_proj = (nn.Linear(args.dim, args.dim, bias=False)
                                                              for _ in range(4))

    def __call__(self, x: mx.array, cos: mx.array, sin: mx.array, mask: mx.array | None) -> mx.array:
        S = x.shape[0]
        q, k, v = (p(x).reshape(S, self.n_heads, -1).transpose(1, 0, 2)[None]
                   for p in (self.q_proj, self.k_proj, self.v_proj))
        q, k = rotate(q, cos, sin), rotate(k, cos, sin)
        out = mx.fast.scaled_dot_product_attention(q, k, v, scale=self.scale, mask=mask)
        return self.o_proj(out[0].transpose(1, 0, 2).reshape(S, -1))


class FeedForward(nn.Module):
    def __init__(self, args: VisionArgs):
        super().__init__()
        self.gate_proj = nn.Linear(args.dim, args.hidden_dim, bias=False)
        self.up_proj = nn.Linear(args.dim, args.hidden_dim, bias=False)
        self.down_proj = nn.Linear(args.hidden_dim, args.dim, bias=False)
        self.act = ACTIVATIONS[args.act]

    def __call__(self, x: mx.array) -> mx.array:
        return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    def __init__(self, args: VisionArgs):
        super().__init__()
        self.attention_norm, self.ffn_norm = nn.RMSNorm(args.dim, eps=1e-5), nn.RMSNorm(args.dim, eps=1e-5)
        self.attention, self.feed_forward = Attention(args), FeedForward(args)

    def __call__(self, x: mx.array, cos: mx.array, sin: mx.array, mask: mx.array | None) -> mx.array:
        x = x + self.attention(self.attention_norm(x), cos, sin, mask)
        return x + self.feed_forward(self.ffn_norm(x))


class Transformer(nn.Module):
    def __init__(self, args: VisionArgs):
        super().__init__()
        self.layers = [Block(args) for _ in range(args.n_layers)]


class VisionTower(nn.Module):
    """Images [H, W, C] (normalized pixels, sides multiples of the patch) -> patches [S, dim]."""

    def __init__(self, args: VisionArgs):
        super().__init__()
        self.args = args
        self.patch_conv = nn.Conv2d(args.num_channels, args.dim, args.patch_size, stride=args.patch_size,
                                    bias=False)
        self.ln_pre = nn.RMSNorm(args.dim, eps=1e-5)
        self.transformer = Transformer(args)

    def __call__(self, images: list[mx.array]) -> tuple[mx.array, list[tuple[int, int]]]:
        """Every image's patches, one sequence (image after image, each row-major), and the grids."""
        p, dtype = self.args.patch_size, self.patch_conv.weight.dtype
        grids = [(image.shape[0] // p, image.shape[1] // p) for image in images]
        x = mx.concatenate([self.patch_conv(image[None].astype(dtype)).reshape(-1, self.args.dim)
                            for image in images])
        x = self.ln_pre(x)
        cos, sin = axial_rope(grids, self.args.head_dim, self.args.rope_theta)
        mask = None
        if len(images) > 1:  # each image attends to itself only
            segment = mx.concatenate([mx.full((h * w,), i) for i, (h, w) in enumerate(grids)])
            mask = segment[:, None] == segment[None, :]
        cos, sin = cos.astype(x.dtype), sin.astype(x.dtype)
        for layer in self.transformer.layers:
            x = layer(x, cos, sin, mask)
        return x, grids


class PatchMerger(nn.Module):
    """Each merge x merge square of patches -> one (their channels side by side, channel-major)."""

    def __init__(self, args: VisionArgs):
        super().__init__()
        self.merge = args.merge
        self.merging_layer = nn.Linear(args.dim * args.merge ** 2, args.dim, bias=False)

    def __call__(self, x: mx.array, grids: list[tuple[int, int]]) -> mx.array:
        s, out, start = self.merge, [], 0
        for h, w in grids:
            grid = x[start:start + h * w].reshape(h // s, s, w // s, s, -1)
            out.append(grid.transpose(0, 2, 4, 1, 3).reshape((h // s) * (w // s), -1))
            start += h * w
        return self.merging_layer(mx.concatenate(out))


class Projector(nn.Module):
    """Patches [S, dim] -> image features [tokens, text_dim]: mistral3 (norm, merger, MLP) or llava (MLP)."""

    def __init__(self, args: VisionArgs):
        super().__init__()
        if args.projector == "mistral3":
            self.norm = nn.RMSNorm(args.dim, eps=args.text_norm_eps)
            self.patch_merger = PatchMerger(args)
        self.linear_1 = nn.Linear(args.dim, args.text_dim, bias=args.projector_bias)
        self.linear_2 = nn.Linear(args.text_dim, args.text_dim, bias=args.projector_bias)
        self.act = ACTIVATIONS[args.projector_act]

    def __call__(self, x: mx.array, grids: list[tuple[int, int]]) -> mx.array:
        if "patch_merger" in self:
            x = self.patch_merger(self.norm(x), grids)
        return self.linear_2(self.act(self.linear_1(x)))


def image_features(tower: VisionTower, projector: Projector, images: list[mx.array]) -> list[mx.array]:
    """Each image's features [its tokens, text_dim], in order: one forward of the tower for them all
    (MistralError for an image that is not [H, W, C] with sides multiples of patch x merge: a grid
    the merger cannot divide is refused, never truncated)."""
    args = tower.args
    for image in images:
        if image.ndim != 3 or image.shape[0] % args.cell or image.shape[1] % args.cell:
            raise MistralError(f"an image must be [height, width, {args.num_channels}] with sides "
                               f"multiples of {args.cell} pixels (patch x merge), got {tuple(image.shape)}")
    patches, grids = tower(images)
    features = projector(patches, grids)
    cuts = [0]
    for h, w in grids:
        cuts.append(cuts[-1] + (h // args.merge) * (w // args.merge))
    return [features[a:b] for a, b in zip(cuts, cuts[1:])]


def image_slots(model, tokens: Sequence[int], images: Sequence) -> tuple[np.ndarray, mx.array]:
    """For `model` (a Mistral with a vision tower): (the positions of the prompt's [IMG] tokens,
    their features [n, dim] in that order, evaluated: the vision tower runs here); MistralError
    unless the images give as many features as there are [IMG] tokens."""
    features = mx.concatenate(model.image_features([mx.array(image) for image in images]))
    mx.eval(features)
    at = np.flatnonzero(np.asarray(tokens) == model.args.vision.image_token_id)
    if len(at) != features.shape[0]:
        raise MistralError(f"the prompt has {len(at)} [IMG] tokens, its {len(images)} images give "
                           f"{features.shape[0]} features: the image tokens must be the images' own")
    return at, features


def vision_args(config: dict) -> VisionArgs:
    """VisionArgs of an HF Mistral3Config or LlavaConfig (config.json), checked: a one-line
    MistralError naming the field that is missing or unsupported."""
    vision, text = config.get("vision_config"), config.get("text_config") or {}
    if not isinstance(vision, dict):
        raise MistralError("config.json: an image model needs a vision_config object")
    kind = config.get("model_type")
    if kind not in ("mistral3", "llava"):
        raise MistralError(f"config.json: model_type {kind!r} is not an image model this runtime knows "
                           "(mistral3, llava)")
    layer = config.get("vision_feature_layer", -1)
    if layer != -1:
        raise MistralError(f"config.json: vision_feature_layer must be -1 (the last layer), got {layer!r}")
    if kind == "llava" and config.get("vision_feature_select_strategy", "default") != "full":
        raise MistralError("config.json: a llava (Pixtral) model needs vision_feature_select_strategy "
                           "\"full\"")
    rope = vision.get("rope_parameters") or {}
    if rope.get("rope_type", "axial") != "axial":
        raise MistralError(f"config.json: vision_config rope_type must be \"axial\" (2D RoPE), "
                           f"got {rope['rope_type']!r}")
    try:
        return VisionArgs(
            dim=vision["hidden_size"], hidden_dim=vision["intermediate_size"],
            n_layers=vision["num_hidden_layers"], n_heads=vision["num_attention_heads"],
            patch_size=vision["patch_size"],
            num_channels=vision.get("num_channels", 3),
            rope_theta=float(rope.get("rope_theta", vision.get("rope_theta", 10000.0))),
            act=vision.get("hidden_act", "gelu"), projector=kind, text_dim=text["hidden_size"],
            merge=config.get("spatial_merge_size", 2) if kind == "mistral3" else 1,
            projector_bias=config.get("multimodal_projector_bias", kind == "llava"),
            projector_act=config.get("projector_hidden_act", "gelu"),
            text_norm_eps=text.get("rms_norm_eps", 1e-5),
            image_token_id=config.get("image_token_index", config.get("image_token_id", 10)))
    except KeyError as e:
        raise MistralError(f"config.json: vision_config or text_config lacks {e.args[0]!r}") from None


def native_vision_args(params: dict) -> VisionArgs:
    """VisionArgs of Mistral's params.json (its `vision_encoder`; the tower always SiLU)."""
    vision = params.get("vision_encoder") or (params.get("multimodal") or {}).get("vision_encoder_args")
    if not isinstance(vision, dict):
        raise MistralError("params.json: an image model needs a vision_encoder object")
    merge = vision.get("spatial_merge_size", 1)
    merged = merge > 1 or vision.get("mm_projector_id") == "patch_merge"
    if merged != bool(vision.get("add_pre_mm_projector_layer_norm", merged)):
        raise MistralError("params.json: vision_encoder's patch merger and pre-projector norm come "
                           "together (mistral3) or not at all (Pixtral)")
    try:
        return VisionArgs(
            dim=vision["hidden_size"], hidden_dim=vision["intermediate_size"],
            n_layers=vision["num_hidden_layers"], n_heads=vision["num_attention_heads"],
            patch_size=vision["patch_size"], num_channels=vision.get("num_channels", 3),
            rope_theta=float(vision.get("rope_theta", 10000.0)), act="silu",
            projector="mistral3" if merged else "llava", text_dim=params["dim"],
            merge=merge if merged else 1, projector_bias=vision.get("adapter_bias", not merged),
            text_norm_eps=params.get("norm_eps", 1e-5), image_token_id=vision.get("image_token_id", 10))
    except KeyError as e:
        raise MistralError(f"params.json: vision_encoder lacks {e.args[0]!r}") from None
