"""An image model's vision tower and projector, from its checkpoint: VisionArgs from config.json
(transformers' Mistral3Config or LlavaConfig) or params.json (Mistral's `vision_encoder`), and
the weights under Vision's names from any of the three layouts (transformers, Mistral's
consolidated.safetensors, mlx-vlm's conversions)."""

import mlx.core as mx

from ..errors import MistralError
from ..vision import VisionArgs


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
    vision = params.get("vision_encoder")
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


PREFIXES = ("model.vision_tower.", "vision_tower.", "model.multi_modal_projector.", "multi_modal_projector.")
NATIVE_PREFIXES = ("vision_encoder.", "vision_language_adapter.", "patch_merger.", "pre_mm_projector_norm.")
# Mistral's names -> HF's (convert_mistral3_weights_to_hf's mapping), applied in order
NATIVE_NAMES = (("vision_encoder.", "vision_tower."), (".attention.wq.", ".attention.q_proj."),
                (".attention.wk.", ".attention.k_proj."), (".attention.wv.", ".attention.v_proj."),
                (".attention.wo.", ".attention.o_proj."), (".feed_forward.w1.", ".feed_forward.gate_proj."),
                (".feed_forward.w2.", ".feed_forward.down_proj."),
                (".feed_forward.w3.", ".feed_forward.up_proj."),
                ("pre_mm_projector_norm.", "multi_modal_projector.norm."),
                ("patch_merger.", "multi_modal_projector.patch_merger."),
                ("vision_language_adapter.w_in.", "multi_modal_projector.linear_1."),
                ("vision_language_adapter.w_out.", "multi_modal_projector.linear_2."))


def vision_weights(weights: dict[str, mx.array], args: VisionArgs) -> dict[str, mx.array]:
    """The tower's and projector's weights out of a checkpoint's (removed from `weights`), named as
    Vision's: from HF names (transformers' on disk or in memory, mlx-vlm's `vision_model.` level)
    or Mistral's, whose q/k rows pair dimensions (2j, 2j + 1) where ours pair (j, j + d/2); the
    patch convolution as MLX's [out, kh, kw, in]."""
    out = {}
    for name in [n for n in weights if n.startswith(PREFIXES + NATIVE_PREFIXES)]:
        w = weights.pop(name)
        if name.startswith(NATIVE_PREFIXES):
            for theirs, ours in NATIVE_NAMES:
                name = name.replace(theirs, ours)
            if name.endswith(("q_proj.weight", "k_proj.weight")):
                h, d = args.n_heads, args.head_dim
                w = w.reshape(h, d // 2, 2, -1).transpose(0, 2, 1, 3).reshape(h * d, -1)
        name = name.removeprefix("model.").replace("vision_tower.vision_model.", "vision_tower.")
        if name.endswith("patch_conv.weight") and w.shape[1] == args.num_channels:
            w = w.transpose(0, 2, 3, 1)
        out[name] = w
    return out
