"""Models: a Flax NNX decoder (GPT-2 / Llama families), HF safetensors and GGUF checkpoints."""

from jrlhf.models.config import ModelConfig, from_hf_config, to_hf_config
from jrlhf.models.gguf_loader import load_gguf, load_gguf_tokenizer, smollm2_gguf_path
from jrlhf.models.hf import load_pretrained, save_pretrained
from jrlhf.models.transformer import (
    KVCache,
    TokenOutputs,
    Transformer,
    abstract_params,
    bind,
    forward,
    graphdef,
    init_params,
    last_token_index,
    positions_from_mask,
    positions_from_segments,
    reward_scores,
    token_outputs,
    token_scores,
)

__all__ = [
    "KVCache", "ModelConfig", "TokenOutputs", "Transformer", "abstract_params", "bind",
    "forward", "from_hf_config", "graphdef", "init_params", "last_token_index", "load_gguf",
    "load_gguf_tokenizer", "load_pretrained", "positions_from_mask", "positions_from_segments",
    "reward_scores", "save_pretrained", "smollm2_gguf_path", "to_hf_config", "token_outputs",
    "token_scores",
]
