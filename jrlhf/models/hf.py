"""Hugging Face checkpoints in and out: the only place transformers' parameter names appear.

Weights are read from safetensors only (never unpickled). `hf_name_table` lists, for a config,
every `(our_path, hf_name, transform)`; loading and saving both walk that one table.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import numpy as np

from jrlhf import paths
from jrlhf.models.config import ModelConfig, from_hf_config, to_hf_config

# Buffers some checkpoints carry that are not parameters.
_IGNORED_SUFFIXES = (".attn.bias", ".attn.masked_bias", ".rotary_emb.inv_freq")
_PREFIXES = ("transformer.", "model.")


def _layer_entries(cfg: ModelConfig) -> list[tuple[str, str, str]]:
    """`(our_suffix, hf_suffix, transform)` for one layer; transform is "" or "T" (transpose)."""
    if cfg.family == "gpt2":
        rows = [
            ("attn_norm/scale", "ln_1.weight", ""), ("attn_norm/bias", "ln_1.bias", ""),
            ("attn/qkv", "attn.c_attn", "qkv"),  # fused in GPT-2 checkpoints, see below
            ("attn/o_proj/kernel", "attn.c_proj.weight", ""),
            ("attn/o_proj/bias", "attn.c_proj.bias", ""),
            ("mlp_norm/scale", "ln_2.weight", ""), ("mlp_norm/bias", "ln_2.bias", ""),
            ("mlp/fc_in/kernel", "mlp.c_fc.weight", ""), ("mlp/fc_in/bias", "mlp.c_fc.bias", ""),
            ("mlp/fc_out/kernel", "mlp.c_proj.weight", ""),
            ("mlp/fc_out/bias", "mlp.c_proj.bias", ""),
        ]
        return rows
    if cfg.sandwich_norms:  # Gemma 2 / 3: post_attention_layernorm is the post-attention norm
        rows = [("attn_norm/scale", "input_layernorm.weight", ""),
                ("attn_post_norm/scale", "post_attention_layernorm.weight", ""),
                ("mlp_norm/scale", "pre_feedforward_layernorm.weight", ""),
                ("mlp_post_norm/scale", "post_feedforward_layernorm.weight", "")]
    else:
        rows = [("attn_norm/scale", "input_layernorm.weight", ""),
                ("mlp_norm/scale", "post_attention_layernorm.weight", "")]
    for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
        rows.append((f"attn/{proj}/kernel", f"self_attn.{proj}.weight", "T"))
        if cfg.output_bias if proj == "o_proj" else cfg.attention_bias:
            rows.append((f"attn/{proj}/bias", f"self_attn.{proj}.bias", ""))
    if cfg.qk_norm:
        rows += [("attn/q_norm/scale", "self_attn.q_norm.weight", ""),
                 ("attn/k_norm/scale", "self_attn.k_norm.weight", "")]
    for proj in ("gate_proj", "up_proj", "down_proj"):
        rows.append((f"mlp/{proj}/kernel", f"mlp.{proj}.weight", "T"))
        if cfg.mlp_bias:
            rows.append((f"mlp/{proj}/bias", f"mlp.{proj}.bias", ""))
    return rows


def hf_name_table(cfg: ModelConfig) -> list[tuple[str, str, str]]:
    """Every `(our_path, hf_name, transform)` for `cfg`, HF names without the model prefix."""
    gpt2 = cfg.family == "gpt2"
    table = [("embed/embedding", "wte.weight" if gpt2 else "embed_tokens.weight", "")]
    if gpt2:
        table.append(("pos_embed/embedding", "wpe.weight", ""))
    layer = "h" if gpt2 else "layers"
    for i in range(cfg.num_layers):
        for ours, theirs, tf in _layer_entries(cfg):
            table.append((f"layers/{i}/{ours}", f"{layer}.{i}.{theirs}", tf))
    table.append(("final_norm/scale", "ln_f.weight" if gpt2 else "norm.weight", ""))
    if gpt2:
        table.append(("final_norm/bias", "ln_f.bias", ""))
    if cfg.lm_head and not cfg.tie_word_embeddings:
        table.append(("lm_head/kernel", "lm_head.weight", "T"))
    if cfg.scalar_head:
        table.append(("score/kernel", "score.weight", "T"))
    return table


def _strip_prefix(name: str) -> str:
    for prefix in _PREFIXES:
        if name.startswith(prefix):
            return name[len(prefix):]
    return name


def params_from_hf_tensors(cfg: ModelConfig, tensors: dict[str, np.ndarray], *,
                           source: str = "checkpoint", dtype=np.float32) -> dict:
    """Our nested params from a `{hf_name: array}` state dict (torch layout).

    A scalar head missing from the checkpoint starts at zero (a fresh reward/value head).
    Unknown tensors are an error: they mean the checkpoint is not the architecture we think.
    """
    named = {_strip_prefix(k): v for k, v in tensors.items()
             if not k.endswith(_IGNORED_SUFFIXES)}
    used: set[str] = set()
    flat: dict[str, np.ndarray] = {}

    def take(name: str) -> np.ndarray:
        if name not in named:
            raise KeyError(f"{source}: tensor {name!r} is missing (config: {cfg.hf_model_type}, "
                           f"{cfg.num_layers} layers)")
        used.add(name)
        return np.asarray(named[name])

    for ours, theirs, tf in hf_name_table(cfg):
        if tf == "qkv":
            weight, bias = take(theirs + ".weight"), take(theirs + ".bias")
            for j, proj in enumerate(("q_proj", "k_proj", "v_proj")):
                base = ours.replace("qkv", proj)
                flat[f"{base}/kernel"] = np.split(weight, 3, axis=1)[j]
                flat[f"{base}/bias"] = np.split(bias, 3)[j]
            continue
        if ours == "score/kernel" and theirs not in named:
            flat[ours] = np.zeros((cfg.hidden_size, 1), np.float32)
            continue
        array = take(theirs)
        flat[ours] = array.T if tf == "T" else array
    # A checkpoint may carry an lm_head copy of tied embeddings, or an LM head we don't want.
    leftover = sorted(set(named) - used - {"lm_head.weight"})
    if leftover:
        raise ValueError(f"{source}: unexpected tensors {leftover[:5]} (and {len(leftover)} in all)"
                         f" for a {cfg.hf_model_type} model")
    return paths.unflatten({k: np.ascontiguousarray(v, dtype=dtype) for k, v in flat.items()})


def hf_tensors_from_params(cfg: ModelConfig, params: dict, prefix: str | None = None,
                           dtype=np.float32) -> dict[str, np.ndarray]:
    """The transformers state dict (with the model prefix) for our params."""
    flat = {k: np.asarray(v, dtype=dtype) for k, v in paths.flatten(params).items()}
    prefix = prefix if prefix is not None else ("transformer." if cfg.family == "gpt2" else "model.")
    out = {}
    for ours, theirs, tf in hf_name_table(cfg):
        if tf == "qkv":
            base = ours.replace("/qkv", "")
            out[prefix + theirs + ".weight"] = np.concatenate(
                [flat[f"{base}/{p}/kernel"] for p in ("q_proj", "k_proj", "v_proj")], axis=1)
            out[prefix + theirs + ".bias"] = np.concatenate(
                [flat[f"{base}/{p}/bias"] for p in ("q_proj", "k_proj", "v_proj")])
            continue
        top_level = theirs.startswith(("lm_head.", "score."))
        out[("" if top_level else prefix) + theirs] = flat[ours].T if tf == "T" else flat[ours]
    return {k: np.ascontiguousarray(v) for k, v in out.items()}


def read_safetensors_folder(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """All tensors of a local HF model folder (single file or sharded with an index)."""
    from safetensors.numpy import load_file

    folder = Path(path)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: not a model folder (expected config.json + *.safetensors)")
    index = folder / "model.safetensors.index.json"
    if index.exists():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    else:
        files = sorted(p.name for p in folder.glob("*.safetensors"))
    if not files:
        pickled = [p.name for p in folder.glob("*.bin")] + [p.name for p in folder.glob("*.pt")]
        why = (f"it holds only {pickled}: pickle-based weights are never loaded (unpickling runs "
               "arbitrary code). Convert them to safetensors first.") if pickled else "no weights"
        raise FileNotFoundError(f"{folder}: no *.safetensors files; {why}")
    tensors: dict[str, np.ndarray] = {}
    for name in files:
        tensors.update(_load_safetensors_file(folder / name, load_file))
    return tensors


def _load_safetensors_file(file: Path, load_file) -> dict[str, np.ndarray]:
    from safetensors import SafetensorError

    try:
        return load_file(str(file))
    except SafetensorError as err:
        raise ValueError(f"{file}: not a readable safetensors file ({err})") from err
    except TypeError:
        # numpy has no bfloat16: read through the torch-free flax reader then.
        from safetensors.flax import load_file as load_flax

        return {k: np.asarray(v, dtype=np.float32) for k, v in load_flax(str(file)).items()}


# model_type -> (causal LM class, sequence-classification class) that `save_pretrained` names.
HF_CLASSES = {
    "gpt2": ("GPT2LMHeadModel", "GPT2ForSequenceClassification"),
    "llama": ("LlamaForCausalLM", "LlamaForSequenceClassification"),
    "mistral": ("MistralForCausalLM", "MistralForSequenceClassification"),
    "qwen2": ("Qwen2ForCausalLM", "Qwen2ForSequenceClassification"),
    "qwen3": ("Qwen3ForCausalLM", "Qwen3ForSequenceClassification"),
    "gemma2": ("Gemma2ForCausalLM", "Gemma2ForSequenceClassification"),
    "gemma3_text": ("Gemma3ForCausalLM", "Gemma3TextForSequenceClassification"),
}

REMOTE_CODE_FILES = ("config.json", "tokenizer_config.json")


def refuse_remote_code(folder: str | os.PathLike) -> None:
    """Raise if a model folder asks for its own Python code (`auto_map` in its config or
    tokenizer config): jrlhf never runs code that comes with weights."""
    folder = Path(folder)
    for name in REMOTE_CODE_FILES:
        path = folder / name
        if not path.is_file():
            continue
        try:
            auto_map = json.loads(path.read_text()).get("auto_map")
        except (json.JSONDecodeError, AttributeError, UnicodeDecodeError) as err:
            raise ValueError(f"{path}: not a JSON object ({err})") from None
        if auto_map:
            entry = next(iter(auto_map.items())) if isinstance(auto_map, dict) else auto_map
            raise ValueError(f"{folder}: {name} asks for remote code (auto_map {entry}); jrlhf "
                             "loads only architectures it implements and never runs a model "
                             "folder's own Python")


def load_pretrained(path: str | os.PathLike, dtype=np.float32, *, lm_head: bool | None = None,
                    scalar_head: bool | None = None):
    """Load a local HF model folder. Returns `(ModelConfig, params)`.

    Args:
        path: folder with `config.json` and `*.safetensors` (sharded folders included).
        dtype: parameter dtype (float32 master weights by default).
        lm_head / scalar_head: which heads to build; by default what the checkpoint has
            (a `*ForSequenceClassification` checkpoint gives a scalar head, no LM head).
    """
    import transformers

    folder = Path(path)
    if not (folder / "config.json").exists():
        raise FileNotFoundError(f"{folder}: no config.json (expected a local Hugging Face model folder)")
    refuse_remote_code(folder)
    hf_config = transformers.AutoConfig.from_pretrained(str(folder), local_files_only=True,
                                                        trust_remote_code=False)
    try:  # refuse an unsupported architecture before reading weights, naming the folder
        from_hf_config(hf_config)
    except NotImplementedError as err:
        raise NotImplementedError(f"{folder}: {err}") from None
    tensors = read_safetensors_folder(folder)
    has_score = any(_strip_prefix(k) == "score.weight" for k in tensors)
    arch = " ".join(getattr(hf_config, "architectures", None) or [])
    is_classifier = has_score or "SequenceClassification" in arch
    cfg = from_hf_config(
        hf_config,
        lm_head=(not is_classifier) if lm_head is None else lm_head,
        scalar_head=is_classifier if scalar_head is None else scalar_head,
    )
    params = params_from_hf_tensors(cfg, tensors, source=str(folder), dtype=np.dtype(dtype))
    return cfg, params


def save_pretrained(path: str | os.PathLike, cfg: ModelConfig, params: dict, *,
                    tokenizer=None, dtype=np.float32) -> Path:
    """Write an HF folder that `transformers.AutoModelForCausalLM.from_pretrained` loads.

    A model with only a scalar head is written as `*ForSequenceClassification` (num_labels=1).
    """
    from safetensors.numpy import save_file

    folder = Path(path)
    folder.mkdir(parents=True, exist_ok=True)
    if cfg.lm_head and cfg.scalar_head:  # a policy's shared value head is training-only
        cfg = dataclasses.replace(cfg, scalar_head=False)
    hf_config = to_hf_config(cfg)
    if cfg.lm_head:
        hf_config.architectures = [HF_CLASSES[cfg.hf_model_type][0]]
    else:
        hf_config.architectures = [HF_CLASSES[cfg.hf_model_type][1]]
        hf_config.num_labels = 1
    tensors = hf_tensors_from_params(cfg, params, dtype=dtype)
    tmp = folder / "model.safetensors.tmp"
    save_file(tensors, str(tmp), metadata={"format": "pt"})
    os.replace(tmp, folder / "model.safetensors")
    hf_config.save_pretrained(str(folder))
    if tokenizer is not None:
        tokenizer.save_pretrained(str(folder))
    return folder
