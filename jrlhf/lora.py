"""LoRA: low-rank adapters stored beside the kernels they adapt.

A targeted kernel `W [in, out]` at path `.../q_proj/kernel` gets siblings `lora_a [in, r]`
(random) and `lora_b [r, out]` (zeros, so training starts at the base model). The forward pass
uses `W + scale · A·B` (`merge_lora`); the base model is the same tree without the adapters
(`base_params`) — no second copy of the weights is kept for the PPO reference. A mixture of
experts' stacked experts `W [E, in, out]` (`.../experts/gate_proj`) get one adapter per expert,
`gate_proj_lora_a [E, in, r]` and `gate_proj_lora_b [E, r, out]`, merged expert by expert. A
kernel stored
quantized (`jrlhf.quant`, `model.quantize`) is not merged: its adapters run beside it
(`quant.AdaptedKernel`, `x·W + scale · (x·A)·B`), so the forward still reads the quantized base.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jrlhf import paths, quant
from jrlhf.config import LoRAConfig

ADAPTER_KEYS = ("lora_a", "lora_b")
ADAPTER_SUFFIXES = ("_lora_a", "_lora_b")  # a stacked expert matrix's adapters
# Train-only rules for `optim.trainable_labels` when LoRA is on: adapters (and scalar heads).
LORA_TRAINABLE = (r".*/lora_[ab]", r".*/experts/\w+_lora_[ab]", r"score/kernel")


def _is_expert_stack(path: str, array) -> bool:
    return array.ndim == 3 and path.rsplit("/", 2)[-2] == "experts"


def add_lora(params, cfg: LoRAConfig, rng: jax.Array):
    """Return `params` with adapters next to every kernel matched by `cfg.targets`."""
    targets = paths.match_rules(params, [(rx, True) for rx in cfg.targets], what="LoRA target",
                                default=False)
    flat, flat_targets = paths.flatten(params), paths.flatten(targets)
    out = dict(flat)
    for i, (path, kernel) in enumerate(flat.items()):
        if not flat_targets[path]:
            continue
        key = jax.random.fold_in(rng, i)
        if _is_expert_stack(path, kernel):
            experts, d_in, d_out = kernel.shape
            out[path + "_lora_a"] = jax.random.normal(
                key, (experts, d_in, cfg.rank), kernel.dtype) / cfg.rank
            out[path + "_lora_b"] = jnp.zeros((experts, cfg.rank, d_out), kernel.dtype)
            continue
        if kernel.ndim != 2 or not path.endswith("/kernel"):
            raise ValueError(f"LoRA target {path!r} is neither a 2-D kernel nor a stack of "
                             f"experts (shape {kernel.shape})")
        d_in, d_out = kernel.shape
        stem = path[: -len("kernel")]
        out[stem + "lora_a"] = jax.random.normal(key, (d_in, cfg.rank), kernel.dtype) / cfg.rank
        out[stem + "lora_b"] = jnp.zeros((cfg.rank, d_out), kernel.dtype)
    return paths.unflatten(out)


def _is_adapted(node) -> bool:
    return isinstance(node, dict) and "lora_a" in node


def merge_lora(params, scale: float):
    """Params without adapters where each adapted kernel is `W + scale · A·B` (for forward
    passes and export), or for a quantized kernel `quant.AdaptedKernel` (applied unmerged;
    `quant.dequantize_params` merges it for export)."""
    if not isinstance(params, dict):
        return params
    if _is_adapted(params):
        merged = {k: v for k, v in params.items() if k not in ADAPTER_KEYS}
        if quant.is_quantized(params["kernel"]):
            merged["kernel"] = quant.AdaptedKernel(params["kernel"], params["lora_a"],
                                                   params["lora_b"], scale)
            return merged
        delta = params["lora_a"] @ params["lora_b"]
        merged["kernel"] = params["kernel"] + (scale * delta).astype(params["kernel"].dtype)
        return merged
    stacked = [k[:-len("_lora_a")] for k in params
               if isinstance(k, str) and k.endswith("_lora_a")]
    if stacked:  # a stack of experts: W_e + scale · A_e·B_e for each expert e
        merged = {k: v for k, v in params.items() if not _is_adapter(k)}
        for name in stacked:
            delta = params[name + "_lora_a"] @ params[name + "_lora_b"]  # [E, in, out]
            merged[name] = params[name] + (scale * delta).astype(params[name].dtype)
        return merged
    return {k: merge_lora(v, scale) for k, v in params.items()}


def _is_adapter(key) -> bool:
    return key in ADAPTER_KEYS or (isinstance(key, str) and key.endswith(ADAPTER_SUFFIXES))


def base_params(params):
    """The base model: `params` with the adapters dropped (shares the base arrays)."""
    if not isinstance(params, dict):
        return params
    return {k: base_params(v) for k, v in params.items() if not _is_adapter(k)}


def has_lora(params) -> bool:
    return any(p.endswith(("/lora_a", "/lora_b", *ADAPTER_SUFFIXES))
               for p in paths.flatten(params))
