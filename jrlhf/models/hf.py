"""Hugging Face checkpoints in and out: the only place transformers' parameter names appear.

Weights are read from safetensors only (never unpickled). `hf_name_table` lists, for a config,
every `(our_path, hf_name, transform)`; loading and saving both walk that one table.
"""

from __future__ import annotations

import ctypes
import dataclasses
import errno
import json
import os
import re
import secrets
import shutil
from pathlib import Path, PurePosixPath

import numpy as np

from jrlhf import paths
from jrlhf.models.config import (
    ModelConfig,
    check_hf_sizes,
    check_memory,
    from_hf_config,
    quant_method,
    to_hf_config,
)

# Buffers some checkpoints carry that are not parameters.
_IGNORED_SUFFIXES = (".attn.bias", ".attn.masked_bias", ".rotary_emb.inv_freq")
_PREFIXES = ("transformer.", "model.")


def _sparse_mlp_entries(cfg: ModelConfig) -> list[tuple[str, str, str]]:
    """A mixture-of-experts MLP's rows. Checkpoints hold one `[F, D]` / `[D, F]` matrix per
    expert (`{e}` in the name); we stack them `[E, D, F]` / `[E, F, D]` (transform "ET").
    GPT-OSS's hold them stacked already, gate and up fused with interleaved columns (`[E, D, 2F]`
    and `[E, 2F]`: gate at 0, 2, 4, ..., up at 1, 3, 5, ...; transform "GU", our path a
    template `{}` of "gate" / "up")."""
    if cfg.hf_model_type == "gpt_oss":
        return [("mlp/router/kernel", "mlp.router.weight", "T"),
                ("mlp/router/bias", "mlp.router.bias", ""),
                ("mlp/experts/{}_proj", "mlp.experts.gate_up_proj", "GU"),
                ("mlp/experts/{}_bias", "mlp.experts.gate_up_proj_bias", "GU"),
                ("mlp/experts/down_proj", "mlp.experts.down_proj", ""),
                ("mlp/experts/down_bias", "mlp.experts.down_proj_bias", "")]
    if cfg.hf_model_type == "mixtral":
        return [("mlp/router/kernel", "block_sparse_moe.gate.weight", "T")] + [
            (f"mlp/experts/{ours}", f"block_sparse_moe.experts.{{e}}.{theirs}.weight", "ET")
            for ours, theirs in (("gate_proj", "w1"), ("up_proj", "w3"), ("down_proj", "w2"))]
    rows = [("mlp/router/kernel", "mlp.gate.weight", "T")]
    rows += [(f"mlp/experts/{proj}", f"mlp.experts.{{e}}.{proj}.weight", "ET")
             for proj in ("gate_proj", "up_proj", "down_proj")]
    if cfg.shared_expert_size:
        rows += [(f"mlp/shared/{proj}/kernel", f"mlp.shared_expert.{proj}.weight", "T")
                 for proj in ("gate_proj", "up_proj", "down_proj")]
        rows.append(("mlp/shared_gate/kernel", "mlp.shared_expert_gate.weight", "T"))
    return rows


def _layer_entries(cfg: ModelConfig, layer: int = 0) -> list[tuple[str, str, str]]:
    """`(our_suffix, hf_suffix, transform)` for layer `layer`; transform is "" or "T"
    (transpose), "ET" (per-expert matrices, each transposed, stacked), GPT-OSS's "GU" (gate
    and up interleaved in one tensor) or GPT-2's "qkv"."""
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
    if cfg.attention_sinks:
        rows.append(("attn/sinks", "self_attn.sinks", ""))
    if cfg.layer_is_sparse(layer):
        return rows + _sparse_mlp_entries(cfg)
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
        for ours, theirs, tf in _layer_entries(cfg, i):
            table.append((f"layers/{i}/{ours}", f"{layer}.{i}.{theirs}", tf))
    table.append(("final_norm/scale", "ln_f.weight" if gpt2 else "norm.weight", ""))
    if gpt2:
        table.append(("final_norm/bias", "ln_f.bias", ""))
    if cfg.lm_head and not cfg.tie_word_embeddings:
        table.append(("lm_head/kernel", "lm_head.weight", "T"))
    if cfg.scalar_head:
        table.append(("score/kernel", "score.weight", "T"))
    return table


class WeightsMismatch(ValueError):
    """A checkpoint's tensors do not fit its config: a missing, unknown or wrong-shape tensor."""


def param_shape(cfg: ModelConfig, path: str) -> tuple[int, ...]:
    """Shape of our parameter at `path` (e.g. `layers/0/attn/q_proj/kernel`) for `cfg`."""
    d, f, vocab = cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size
    q, kv = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
    *_, module, leaf = path.split("/")
    if leaf == "sinks":
        return (cfg.num_heads,)
    if module == "experts":  # stacked [E, D, F] (gate, up) or [E, F, D] (down), biases [E, .]
        fe = cfg.expert_size
        if leaf.endswith("_bias"):
            return (cfg.num_experts, d if leaf == "down_bias" else fe)
        return (cfg.num_experts, *((fe, d) if leaf == "down_proj" else (d, fe)))
    if module == "router":
        return (cfg.num_experts,) if leaf == "bias" else (d, cfg.num_experts)
    if module == "shared_gate":
        return (d, 1)
    if "/shared/" in path:
        f = cfg.shared_expert_size
    if module in ("embed", "pos_embed"):
        return (vocab if module == "embed" else cfg.max_position_embeddings, d)
    if module in ("q_norm", "k_norm"):
        return (cfg.head_dim,)
    if module.endswith("norm"):
        return (d,)
    d_in, d_out = {"q_proj": (d, q), "k_proj": (d, kv), "v_proj": (d, kv), "o_proj": (q, d),
                   "gate_proj": (d, f), "up_proj": (d, f), "down_proj": (f, d),
                   "fc_in": (d, f), "fc_out": (f, d), "lm_head": (d, vocab),
                   "score": (d, 1)}[module]
    return (d_in, d_out) if leaf == "kernel" else (d_out,)


def expected_hf_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """`{hf_name: shape}` (names without the model prefix, torch layout) a checkpoint of `cfg`
    holds."""
    shapes = {}
    for ours, theirs, tf in hf_name_table(cfg):
        if tf == "qkv":  # GPT-2's fused Conv1D: [d, q + 2 kv] and its bias
            width = sum(param_shape(cfg, ours.replace("qkv", f"{p}/kernel"))[1]
                        for p in ("q_proj", "k_proj", "v_proj"))
            shapes[theirs + ".weight"] = (cfg.hidden_size, width)
            shapes[theirs + ".bias"] = (width,)
            continue
        if tf == "GU":  # gate and up [..., F] fused: [..., 2F]
            shape = param_shape(cfg, ours.format("gate"))
            shapes[theirs] = (*shape[:-1], 2 * shape[-1])
            continue
        shape = param_shape(cfg, ours)
        if tf == "ET":
            for e in range(shape[0]):
                shapes[theirs.format(e=e)] = shape[:0:-1]
            continue
        shapes[theirs] = shape[::-1] if tf == "T" else shape
    return shapes


def _describe(cfg: ModelConfig) -> str:
    return (f"{cfg.hf_model_type}: vocab_size {cfg.vocab_size}, hidden_size {cfg.hidden_size}, "
            f"{cfg.num_layers} layers, {cfg.num_heads} heads x {cfg.head_dim}, "
            f"{cfg.num_kv_heads} kv heads, intermediate_size {cfg.intermediate_size}")


def check_hf_tensors(cfg: ModelConfig, shapes: dict[str, tuple[int, ...]], *,
                     source: str = "checkpoint") -> None:
    """Refuse tensors that do not fit `cfg`, before any array is built from them.

    Args:
        cfg: the config the tensors must fit.
        shapes: `{hf_name without the model prefix: shape}` of every tensor.
        source: the file or folder, for the message.

    Raises:
        WeightsMismatch: one line naming the tensor, and for a wrong shape the shape found and
            the shape the config expects. A scalar head may be absent (it starts at zero); an
            `lm_head.weight` beside tied embeddings is ignored; any other tensor is unknown.
    """
    expected = expected_hf_shapes(cfg)
    for name, shape in expected.items():
        if name not in shapes:
            if name == "score.weight":
                continue
            raise WeightsMismatch(f"{source}: tensor {name!r} is missing (config: "
                                  f"{cfg.hf_model_type}, {cfg.num_layers} layers)")
        found = tuple(shapes[name])
        if found != shape:
            raise WeightsMismatch(f"{source}: tensor {name!r} has shape {list(found)}; the config "
                                  f"({_describe(cfg)}) expects {list(shape)}")
    leftover = sorted(set(shapes) - set(expected) - {"lm_head.weight"})
    if leftover:
        raise WeightsMismatch(f"{source}: unexpected tensors {leftover[:5]} (and {len(leftover)} "
                              f"in all) for a {cfg.hf_model_type} model")


def _strip_prefix(name: str) -> str:
    for prefix in _PREFIXES:
        if name.startswith(prefix):
            return name[len(prefix):]
    return name


def _named(names) -> dict[str, str]:
    """`{name without the model prefix: name}` of the tensors that are parameters."""
    return {_strip_prefix(k): k for k in names if not k.endswith(_IGNORED_SUFFIXES)}


def params_from_hf_tensors(cfg: ModelConfig, tensors: dict[str, np.ndarray], *,
                           source: str = "checkpoint", dtype=np.float32) -> dict:
    """Our nested params from a `{hf_name: array}` state dict (torch layout).

    The names and shapes are checked first (`check_hf_tensors`). A scalar head missing from
    the checkpoint starts at zero (a fresh reward/value head).
    """
    named = {short: tensors[name] for short, name in _named(tensors).items()}
    check_hf_tensors(cfg, {k: np.shape(v) for k, v in named.items()}, source=source)
    flat: dict[str, np.ndarray] = {}
    for ours, theirs, tf in hf_name_table(cfg):
        if tf == "qkv":
            weight, bias = (np.asarray(named[theirs + suffix]) for suffix in (".weight", ".bias"))
            for j, proj in enumerate(("q_proj", "k_proj", "v_proj")):  # GPT-2: q, k, v all [d, d]
                base = ours.replace("qkv", proj)
                flat[f"{base}/kernel"] = np.split(weight, 3, axis=1)[j]
                flat[f"{base}/bias"] = np.split(bias, 3)[j]
            continue
        if ours == "score/kernel" and theirs not in named:
            flat[ours] = np.zeros(param_shape(cfg, ours), np.float32)
            continue
        if tf == "ET":
            flat[ours] = np.stack([np.asarray(named[theirs.format(e=e)]).T
                                   for e in range(cfg.num_experts)])
            continue
        if tf == "GU":
            fused = np.asarray(named[theirs])
            flat[ours.format("gate")], flat[ours.format("up")] = fused[..., ::2], fused[..., 1::2]
            continue
        array = np.asarray(named[theirs])
        flat[ours] = array.T if tf == "T" else array
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
        if tf == "ET":
            for e, matrix in enumerate(flat[ours]):
                out[prefix + theirs.format(e=e)] = matrix.T
            continue
        if tf == "GU":  # interleave: gate, up, gate, up, ... along the last axis
            gate, up = flat[ours.format("gate")], flat[ours.format("up")]
            out[prefix + theirs] = np.stack([gate, up], axis=-1).reshape(*gate.shape[:-1], -1)
            continue
        top_level = theirs.startswith(("lm_head.", "score."))
        out[("" if top_level else prefix) + theirs] = flat[ours].T if tf == "T" else flat[ours]
    return {k: np.ascontiguousarray(v) for k, v in out.items()}


# MXFP4 (the expert matrices of GPT-OSS checkpoints on the hub; transformers'
# `integrations/mxfp4.py`): a matrix `{name}` is stored as `{name}_blocks [..., R, G, 16]` uint8,
# two FP4 (E2M1) codes per byte, the low nibble first, and `{name}_scales [..., R, G]` uint8, one
# power of two 2^(scale − 127) per block of 32 values along the contracted axis. Dequantized it
# is `{name} [..., G·32, R]` (blocks run along the rows of the matrix the forward multiplies by).
_FP4_VALUES = np.array([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0,
                        -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0], np.float32)
_MXFP4 = ("_blocks", "_scales")


def dequantize_mxfp4(blocks: np.ndarray, scales: np.ndarray) -> np.ndarray:
    """One MXFP4 matrix in float32: `blocks [..., R, G, B]` (uint8), `scales [..., R, G]` (uint8)
    -> `[..., G·2B, R]`, exactly transformers' `convert_moe_packed_tensors`."""
    blocks = np.asarray(blocks).astype(np.uint8)
    exponents = np.asarray(scales).astype(np.int32) - 127
    values = np.empty((*blocks.shape[:-1], 2 * blocks.shape[-1]), np.float32)
    values[..., 0::2] = _FP4_VALUES[blocks & 0x0F]
    values[..., 1::2] = _FP4_VALUES[blocks >> 4]
    values = np.ldexp(values, exponents[..., None]).astype(np.float32)
    return values.reshape(*values.shape[:-2], -1).swapaxes(-1, -2)


def _mxfp4_pairs(names, source: str) -> dict[str, tuple[str, str]]:
    """`{matrix name: (blocks name, scales name)}` of the MXFP4 tensors among `names`.

    Raises:
        WeightsMismatch: a `*_blocks` without its `*_scales` or the other way round.
    """
    names = set(names)
    pairs = {}
    for name in sorted(names):
        for suffix, other in (_MXFP4, _MXFP4[::-1]):
            base = name[:-len(suffix)]
            if name.endswith(suffix) and base + other not in names:
                raise WeightsMismatch(f"{source}: MXFP4 tensor {name!r} has no {other[1:]} "
                                      f"tensor {base + other!r} beside it")
        if name.endswith(_MXFP4[0]):
            pairs[name[:-len(_MXFP4[0])]] = (name, name[:-len(_MXFP4[0])] + _MXFP4[1])
    return pairs


def mxfp4_shapes(shapes: dict[str, tuple[int, ...]], source: str = "checkpoint"
                 ) -> dict[str, tuple[int, ...]]:
    """`shapes` with each MXFP4 pair replaced by its dequantized matrix's shape."""
    out = dict(shapes)
    for name, (blocks, scales) in _mxfp4_pairs(shapes, source).items():
        *lead, rows, groups, width = out.pop(blocks)
        if tuple(out.pop(scales)) != (*lead, rows, groups):
            raise WeightsMismatch(f"{source}: MXFP4 scales {scales!r} have shape "
                                  f"{list(shapes[scales])}; its blocks {list(shapes[blocks])} "
                                  f"need {[*lead, rows, groups]}")
        out[name] = (*lead, groups * 2 * width, rows)
    return out


def dequantize_mxfp4_tensors(tensors: dict[str, np.ndarray], source: str = "checkpoint"
                             ) -> dict[str, np.ndarray]:
    """`tensors` with each MXFP4 pair replaced by its float32 matrix (`dequantize_mxfp4`)."""
    out = dict(tensors)
    mxfp4_shapes({k: np.shape(v) for k, v in tensors.items()}, source)  # pairs and shapes
    for name, (blocks, scales) in _mxfp4_pairs(tensors, source).items():
        out[name] = dequantize_mxfp4(out.pop(blocks), out.pop(scales))
    return out


INDEX_FILE = "model.safetensors.index.json"


def _inside(name) -> bool:
    """Whether an index entry names a path inside its folder (relative, no `..`)."""
    if not isinstance(name, str) or not name or "\\" in name:
        return False
    path = PurePosixPath(name)
    return not path.is_absolute() and ".." not in path.parts


def safetensors_files(path: str | os.PathLike) -> list[Path]:
    """The weight files of a local HF model folder: those its shard index names, else every
    `*.safetensors` in it.

    Every index entry must name a path inside the folder (relative, no `..`; symbolic links
    inside it are followed, as in the Hugging Face cache's snapshot folders) and exist.

    Raises:
        FileNotFoundError: no folder, no weights (naming pickle-only weights), a missing shard.
        ValueError: an index that is not `{"weight_map": {tensor: file}}`, an entry outside.
    """
    folder = Path(path)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: not a model folder (expected config.json + "
                                "*.safetensors)")
    index = folder / INDEX_FILE
    if index.exists():
        try:
            names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError,
                AttributeError) as err:
            raise ValueError(f"{index}: not a shard index ({type(err).__name__}: {err}); expected "
                             '{"weight_map": {tensor: file}}') from None
        for name in names:
            if not _inside(name):
                raise ValueError(f"{index}: shard {name!r} is outside {folder}; an index may name "
                                 "only files inside its folder")
            if not (folder / name).is_file():
                raise FileNotFoundError(f"{index}: shard {name!r} is not a file in {folder}")
        return [folder / name for name in names]
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        pickled = [p.name for p in folder.glob("*.bin")] + [p.name for p in folder.glob("*.pt")]
        why = (f"it holds only {pickled}: pickle-based weights are never loaded (unpickling runs "
               "arbitrary code). Convert them to safetensors first.") if pickled else "no weights"
        raise FileNotFoundError(f"{folder}: no *.safetensors files; {why}")
    return files


def safetensors_shapes(files: list[Path]) -> dict[str, tuple[int, ...]]:
    """`{tensor name: shape}` from the headers of safetensors files (no tensor data read)."""
    from safetensors import SafetensorError, safe_open

    shapes = {}
    for file in files:
        try:
            with safe_open(str(file), framework="numpy") as f:
                names = f.keys()  # a safetensors handle, not a dict
                shapes.update({k: tuple(f.get_slice(k).get_shape()) for k in names})
        except SafetensorError as err:
            raise ValueError(f"{file}: not a readable safetensors file ({err})") from None
    return shapes


def read_safetensors_folder(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """All tensors of a local HF model folder (single file or sharded with an index)."""
    from safetensors.numpy import load_file

    tensors: dict[str, np.ndarray] = {}
    for file in safetensors_files(path):
        tensors.update(_load_safetensors_file(file, load_file))
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
    "qwen2_moe": ("Qwen2MoeForCausalLM", "Qwen2MoeForSequenceClassification"),
    "qwen3_moe": ("Qwen3MoeForCausalLM", "Qwen3MoeForSequenceClassification"),
    "mixtral": ("MixtralForCausalLM", "MixtralForSequenceClassification"),
    "gpt_oss": ("GptOssForCausalLM", "GptOssForSequenceClassification"),
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


def read_hf_config(path: str | os.PathLike):
    """The transformers config of a local HF model folder, checked before transformers builds it:
    no remote code, sizes that describe a model (`check_hf_sizes`).

    Raises:
        FileNotFoundError / ValueError: one line naming the folder or its config.json.
    """
    import transformers

    folder = Path(path)
    config = folder / "config.json"
    if not config.is_file():
        raise FileNotFoundError(f"{folder}: no config.json (expected a local Hugging Face model "
                                "folder)")
    refuse_remote_code(folder)  # also: config.json is a JSON object
    check_hf_sizes(json.loads(config.read_text()), str(config))
    try:
        return transformers.AutoConfig.from_pretrained(str(folder), local_files_only=True,
                                                       trust_remote_code=False)
    except Exception as err:  # noqa: BLE001 - transformers' validators raise their own types
        text = " ".join(str(err).split())
        raise ValueError(f"{config}: transformers cannot read it ({type(err).__name__}: "
                         f"{text})") from None


def load_pretrained(path: str | os.PathLike, dtype=np.float32, *, lm_head: bool | None = None,
                    scalar_head: bool | None = None):
    """Load a local HF model folder. Returns `(ModelConfig, params)`.

    Everything is checked before an array is built: the config's sizes, a memory estimate
    against this host's memory, that every shard is inside the folder, and every tensor's
    name and shape against the config. A folder whose config says `quantization_config:
    {"quant_method": "mxfp4"}` (GPT-OSS on the hub) has its MXFP4 expert matrices dequantized
    (`dequantize_mxfp4`); any other quantization is refused by `from_hf_config`.

    Args:
        path: folder with `config.json` and `*.safetensors` (sharded folders included).
        dtype: parameter dtype (float32 master weights by default).
        lm_head / scalar_head: which heads to build; by default what the checkpoint has
            (a `*ForSequenceClassification` checkpoint gives a scalar head, no LM head).
    """
    from safetensors.numpy import load_file

    folder = Path(path)
    hf_config = read_hf_config(folder)
    try:  # refuse an unsupported architecture before reading weights, naming the folder
        from_hf_config(hf_config)
    except (NotImplementedError, ValueError) as err:
        raise type(err)(f"{folder}: {err}") from None
    files = safetensors_files(folder)
    all_shapes = safetensors_shapes(files)
    mxfp4 = quant_method(getattr(hf_config, "quantization_config", None)) == "mxfp4"
    if mxfp4:  # GPT-OSS on the hub: expert matrices dequantized below
        all_shapes = mxfp4_shapes(all_shapes, str(folder))
    shapes = {short: all_shapes[name] for short, name in _named(all_shapes).items()}
    arch = " ".join(getattr(hf_config, "architectures", None) or [])
    is_classifier = "score.weight" in shapes or "SequenceClassification" in arch
    cfg = from_hf_config(
        hf_config,
        lm_head=(not is_classifier) if lm_head is None else lm_head,
        scalar_head=is_classifier if scalar_head is None else scalar_head,
    )
    check_memory(cfg, str(folder), bytes_per_param=np.dtype(dtype).itemsize)
    check_hf_tensors(cfg, shapes, source=str(folder))
    tensors: dict[str, np.ndarray] = {}
    for file in files:
        tensors.update(_load_safetensors_file(file, load_file))
    if mxfp4:
        tensors = dequantize_mxfp4_tensors(tensors, str(folder))
    params = params_from_hf_tensors(cfg, tensors, source=str(folder), dtype=np.dtype(dtype))
    return cfg, params


# What an export folder holds (our files, transformers' config and tokenizer files, and the
# temp file of exports before they were atomic). A folder holding anything else is not replaced.
_EXPORT_SUFFIXES = (".json", ".safetensors", ".txt", ".model", ".jinja", ".safetensors.tmp")


def _check_replaceable(folder: Path) -> None:
    """Refuse to replace an existing `folder` that is not a model export."""
    if not folder.exists():
        return
    if not folder.is_dir():
        raise FileExistsError(f"{folder}: exists and is not a folder; choose another export folder")
    for entry in sorted(folder.iterdir()):
        if entry.is_dir() or not entry.name.endswith(_EXPORT_SUFFIXES):
            raise FileExistsError(f"{folder}: holds {entry.name!r}, which no export writes; an "
                                  "export replaces its whole folder, so choose a new or empty "
                                  "folder or an earlier export")


def _sibling(folder: Path, kind: str) -> Path:
    """A fresh hidden path beside `folder` for an export being written ("tmp") or replaced."""
    return folder.with_name(f".{folder.name}.jrlhf-{kind}-{os.getpid()}-{secrets.token_hex(4)}")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _remove_stale(folder: Path) -> None:
    """Remove what killed exports to `folder` left beside it (unless their process still runs).

    A previous export set aside while a kill came between the two renames of a swap (only
    where the atomic exchange is unavailable) is put back first, if `folder` is missing.
    """
    pattern = re.compile(rf"\.{re.escape(folder.name)}\.jrlhf-(tmp|old)-(\d+)-[0-9a-f]+")
    if not folder.parent.is_dir():
        return
    for entry in sorted(folder.parent.iterdir()):
        match = pattern.fullmatch(entry.name)
        if not match or (int(match[2]) != os.getpid() and _alive(int(match[2]))):
            continue
        if match[1] == "old" and not folder.exists():
            os.rename(entry, folder)
        else:
            shutil.rmtree(entry)


def _exchange(a: Path, b: Path) -> bool:
    """Swap two existing paths in one step (Linux `renameat2(RENAME_EXCHANGE)`); False where
    the C library or the file system lacks it."""
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (AttributeError, OSError):
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p,
                          ctypes.c_uint]
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
        return False
    raise OSError(code, os.strerror(code), str(b))


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _move_into_place(tmp: Path, folder: Path) -> None:
    """Rename the complete export `tmp` to `folder`, replacing a previous export there: at any
    moment `folder` is the previous export or the new one."""
    if not folder.exists():
        os.rename(tmp, folder)
    elif _exchange(tmp, folder):
        shutil.rmtree(tmp)  # now the previous export
    else:
        old = _sibling(folder, "old")
        os.rename(folder, old)
        os.rename(tmp, folder)
        shutil.rmtree(old)
    _fsync(folder.parent)


def _write_export(folder: Path, cfg: ModelConfig, params: dict, tokenizer, dtype) -> None:
    """Weights, config.json, generation config (LM exports) and tokenizer files into `folder`,
    each file synced to disk."""
    import transformers
    from safetensors import SafetensorError
    from safetensors.numpy import save_file

    hf_config = to_hf_config(cfg)
    if cfg.lm_head:
        hf_config.architectures = [HF_CLASSES[cfg.hf_model_type][0]]
    else:
        hf_config.architectures = [HF_CLASSES[cfg.hf_model_type][1]]
        hf_config.num_labels = 1
        if hf_config.pad_token_id is None:
            # transformers' sequence classifiers find each row's last token as the last one
            # that is not the pad id, and refuse batches > 1 without one: the tokenizer's pad
            # token, else EOS (rows padded with it score their last non-EOS token there).
            pad = getattr(tokenizer, "pad_token_id", None)
            hf_config.pad_token_id = pad if pad is not None else cfg.eos_token_id
    tensors = hf_tensors_from_params(cfg, params, dtype=dtype)
    weights = folder / "model.safetensors"
    try:
        save_file(tensors, str(weights), metadata={"format": "pt"})
    except SafetensorError as err:  # an I/O error (disk full, ...) as the OSError it is
        found = re.search(r"\(os error (\d+)\)", str(err))
        if not found:
            raise
        number = int(found.group(1))
        raise OSError(number, os.strerror(number), str(weights)) from None
    hf_config.save_pretrained(str(folder))
    if cfg.lm_head:
        transformers.GenerationConfig.from_model_config(hf_config).save_pretrained(str(folder))
    if tokenizer is not None:
        tokenizer.save_pretrained(str(folder))
    for file in sorted(folder.rglob("*")):
        if file.is_file():
            _fsync(file)
    _fsync(folder)


def save_pretrained(path: str | os.PathLike, cfg: ModelConfig, params: dict, *,
                    tokenizer=None, dtype=np.float32) -> Path:
    """Write an HF folder that `transformers.AutoModelForCausalLM.from_pretrained` loads.

    A model with only a scalar head is written as `*ForSequenceClassification` (num_labels=1).
    The whole folder (weights, config.json, generation config, tokenizer files) is written
    into a hidden sibling folder and then renamed into place, so a kill at any moment leaves
    the previous export or the new one, never a mix; what a killed export left beside `path`
    is removed here. An existing `path` that holds other files than an export's is refused
    (FileExistsError), never replaced.

    Returns:
        `Path(path)`.
    """
    folder = Path(path)
    target = folder.resolve() if folder.is_symlink() else Path(os.path.abspath(folder))
    if not target.name:
        raise FileExistsError(f"{folder}: cannot be replaced by an export; choose a folder")
    target.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale(target)
    _check_replaceable(target)
    if cfg.lm_head and cfg.scalar_head:  # a policy's shared value head is training-only
        cfg = dataclasses.replace(cfg, scalar_head=False)
    tmp = _sibling(target, "tmp")
    tmp.mkdir()
    try:
        _write_export(tmp, cfg, params, tokenizer, dtype)
        _move_into_place(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return folder
