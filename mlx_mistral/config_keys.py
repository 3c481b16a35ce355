"""Which config keys change the computation: every key of config.json and params.json is
implemented (config.py reads it), harmless (listed here), or refused with one line naming it.
Unknown means refused: a key we have not read may change the maths, so it is never guessed."""

from typing import Any

from .errors import MistralError

# config.json keys that do not change the computation we run. A wrapper's vision keys are among
# them: we run its text model only (and say so). Every key not listed here or implemented is refused.
HF_IGNORED = {
    "architectures", "attention_dropout", "bos_token_id", "eos_token_id", "pad_token_id",
    "initializer_range", "torch_dtype", "dtype", "transformers_version", "use_cache",
    "_name_or_path", "output_attentions", "output_hidden_states", "return_dict", "is_decoder",
    "max_window_layers", "use_sliding_window",  # Qwen2's: transformers' Mistral/Ministral never read them
    "chunk_size_feed_forward", "id2label", "label2id", "problem_type", "tokenizer_class",
    "_attn_implementation_autoset",
    "is_llama_config",  # SmolLM2's (nanotron's) marker; transformers never reads it
    "output_router_logits", "router_aux_loss_coef", "router_jitter_noise",  # training only
}
LAYER_TYPES = {"sliding_attention", "full_attention"}  # config.json's layer_types entries
# Keys harmless at one value (the one transformers' Mistral runs), refused at any other.
HF_ONLY = {"hidden_act": "silu", "attention_bias": False, "mlp_bias": False, "is_encoder_decoder": False,
           "pretraining_tp": 1, "rope_interleaved": False}  # llama's: a split matmul, SmolLM2's RoPE layout
HF_TEXT_KEYS = {
    "model_type", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
    "head_dim", "intermediate_size", "vocab_size", "rms_norm_eps", "rope_theta", "rope_parameters",
    "rope_scaling", "sliding_window", "layer_types", "max_position_embeddings", "tie_word_embeddings",
    "quantization", "quantization_config", "num_local_experts", "num_experts_per_tok",
}
# llama (LlamaForCausalLM: SmolLM2) is Mistral's maths without a window
TEXT_TYPES = ("mistral", "ministral", "ministral3", "mixtral", "llama")
# Mistral3ForConditionalGeneration / LlavaForConditionalGeneration: the language model is text_config.
WRAPPER_TYPES = ("mistral3", "llava")
WRAPPER_IGNORED = HF_IGNORED | {
    "vision_config", "image_token_index", "image_token_id", "image_seq_length", "projector_hidden_act",
    "vision_feature_layer", "vision_feature_select_strategy", "multimodal_projector_bias",
    "spatial_merge_size", "tie_word_embeddings", "ignore_index",  # tied or not: the weights say
}
# params.json: keys we do not need, and those we implement.
PARAMS_IGNORED = {"max_batch_size", "max_seq_len", "model_type", "dtype"}
PARAMS_KEYS = {"dim", "n_layers", "n_heads", "n_kv_heads", "head_dim", "hidden_dim", "vocab_size", "norm_eps",
               "rope_theta", "sliding_window", "yarn", "llama_4_scaling", "tied_embeddings",
               "max_position_embeddings", "vision_encoder", "multimodal", "quantization", "moe"}
PARAMS_ONLY = {"activation": "silu", "use_biases": False}
IMAGES_UNSUPPORTED = "{}: a vision-language model; only its text model is loaded (image input is not supported)"


def check_keys(config: dict[str, Any], known: set[str], only: dict[str, Any], file: str) -> None:
    """Refuse, naming it, the first key that is neither known nor at its one harmless value."""
    for key in sorted(config):
        if key in only and config[key] != only[key]:
            raise MistralError(f"{file}: {key} must be {only[key]!r}, got {config[key]!r}")
        if key not in known and key not in only:
            raise MistralError(f"{file}: unknown key {key!r} (it may change the computation; refused)")
