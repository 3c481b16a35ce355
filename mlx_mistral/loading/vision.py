"""An image model's vision tower and projector weights, under our names (transformers' own) from
any of the three layouts: transformers', Mistral's consolidated.safetensors, mlx-vlm's conversions."""

import mlx.core as mx

from ..vision import VisionArgs


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
