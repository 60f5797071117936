"""`jrlhf plan`: will a config fit a mesh? Compile its step for the mesh without any weights.

The state comes from the same `setups.make_setup` training calls, on abstract weights
(`jax.ShapeDtypeStruct`s with shardings), so parameter and optimizer bytes are those of the
state the training loop builds (LoRA adapters, frozen leaves without moments, a separate critic,
the reference copy). The step is lowered and compiled for the requested mesh and XLA's memory
and cost analyses are read back.

What the activation and peak figures are depends on where the step was compiled, and the output
says which (`memory_basis`):
- "compiled": on the attached accelerators (`--on-device`): XLA's buffer assignment for them.
- "estimate": on fake CPU devices standing in for the accelerators. XLA:CPU's buffer
  assignment is not the accelerator's (it fuses less, keeps float32 temporaries), so the
  activations are an analytic estimate from the model's shape (`activation_estimate`) and
  XLA:CPU's figure is reported beside it, labelled as such.
"""

from __future__ import annotations

import math
import re

import jax
import numpy as np

from jrlhf import algorithms, optim, sharding
from jrlhf.config import Config, MeshConfig
from jrlhf.hardware import device_memory, xla_flops
from jrlhf.models.attention import resolve_implementation
from jrlhf.models.config import ModelConfig
from jrlhf.models.sources import model_config
from jrlhf.models.transformer import abstract_params
from jrlhf.setups import Setup, batch_shapes, initial_weights, make_setup
from jrlhf.steps.common import state_shardings

COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute")


def parse_mesh(text: str) -> MeshConfig:
    """`"data=2,fsdp=4,tensor=1,expert=1"` -> MeshConfig (missing axes are 1)."""
    sizes = {}
    for part in filter(None, text.split(",")):
        name, sep, value = part.partition("=")
        if not sep or name.strip() not in sharding.AXES or not value.isdigit():
            raise ValueError(f"--mesh {text!r}: expected e.g. data=2,fsdp=4,tensor=1,expert=1")
        sizes[name.strip()] = int(value)
    return MeshConfig(**sizes)


def bytes_per_device(tree, shardings) -> int:
    """Bytes one device holds of `tree` under `shardings` (the largest shard per leaf)."""
    total = 0
    for x, s in zip(jax.tree.leaves(tree), jax.tree.leaves(
            shardings, is_leaf=lambda v: isinstance(v, jax.sharding.Sharding))):
        total += math.prod(s.shard_shape(x.shape)) * np.dtype(x.dtype).itemsize
    return total


def count_collectives(hlo_text: str) -> dict[str, int]:
    return {op: len(re.findall(rf"\b{op}(-start)?\(", hlo_text)) for op in COLLECTIVES}


_DTYPE_BYTES = {"f64": 8, "f32": 4, "bf16": 2, "f16": 2, "s64": 8, "s32": 4, "u32": 4, "s16": 2,
                "s8": 1, "u8": 1, "pred": 1}


def collective_bytes(hlo_text: str) -> dict[str, int]:
    """Bytes of the results of each collective kind in a compiled HLO module's text (one
    device's program; a tuple-valued collective counts every element)."""
    pattern = re.compile(rf"= \(?((?:[a-z0-9]+\[[0-9,]*\][^ ]*(?:, )?)+)\)? "
                         rf"({'|'.join(COLLECTIVES)})(?:-start)?\(")
    totals: dict[str, int] = {}
    for shapes, kind in pattern.findall(hlo_text):
        for dtype, dims in re.findall(r"([a-z0-9]+)\[([0-9,]*)\]", shapes):
            n = math.prod(int(d) for d in dims.split(",") if d)
            totals[kind] = totals.get(kind, 0) + n * _DTYPE_BYTES.get(dtype, 4)
    return totals


def flash_attention(cfg: ModelConfig, device: str) -> bool:
    """Whether `cfg`'s attention runs as cuDNN flash attention on the named `device` kind."""
    gpu = any(name in device.lower() for name in ("h100", "h200", "a100"))
    return resolve_implementation(cfg.attention, cfg.dtype, cfg.head_dim,
                                  on="gpu" if gpu else "tpu", softcap=cfg.attn_softcap,
                                  sinks=cfg.attention_sinks) == "cudnn"


def mlp_width(cfg: ModelConfig, layer: int) -> int:
    """Per-token width of decoder layer `layer`'s MLP hidden activations: `intermediate_size`
    for a dense MLP; for a mixture of experts the k routed experts' and the shared expert's,
    `experts_per_token · expert_size + shared_expert_size`."""
    if not cfg.layer_is_sparse(layer):
        return cfg.intermediate_size
    return cfg.experts_per_token * cfg.expert_size + cfg.shared_expert_size


def layer_activation_bytes(cfg: ModelConfig, tokens: int, seq_len: int, tensor: int = 1,
                           flash: bool = False, layer: int | None = None) -> int:
    """Bytes decoder layer `layer` (default: the last) keeps for its backward pass over
    `tokens` tokens of sequences of `seq_len`: the inputs of its norms and matmuls in the
    compute dtype (residual, normed input, q/k/v, attention output, gate/up/activation/product
    of the MLP, `mlp_width` wide) and the float32 attention probabilities `[heads, seq_len]`
    per token (XLA's attention materialises them; a flash kernel keeps one float32
    log-sum-exp per head instead). Head and MLP terms are split over `tensor` devices.

    A mixture-of-experts layer also keeps, per token, its k dispatched copies into and out of
    the grouped matmuls (`moe.grouped_mlp`'s `[N·k, D]` inputs and expert outputs, compute
    dtype), the router's float32 probabilities `[E]`, and the shared expert's output `[D]`
    (its sigmoid gate's gradient needs it) where there is one."""
    c = np.dtype(cfg.dtype).itemsize
    layer = cfg.num_layers - 1 if layer is None else layer
    d, f, hd = cfg.hidden_size, mlp_width(cfg, layer), cfg.head_dim
    heads = cfg.num_heads + 2 * cfg.num_kv_heads
    per_token = c * (4 * d + (heads + 2 * cfg.num_heads) * hd // tensor + 4 * f // tensor)
    per_token += 4 * cfg.num_heads * (1 if flash else seq_len) // tensor
    if cfg.layer_is_sparse(layer):
        shared = d if cfg.shared_expert_size else 0
        per_token += c * (2 * cfg.experts_per_token * d + shared) + 4 * cfg.num_experts
    return tokens * per_token


def activation_estimate(cfg: ModelConfig, tokens: int, seq_len: int, lm_tokens: int,
                        tensor: int = 1, flash: bool = False) -> int:
    """Analytic bytes of a training step's activations on one device (`tokens` of its batch
    shard): every layer's `layer_activation_bytes` (with `remat="full"` only each layer's input,
    plus the largest layer recomputed), and the LM head's float32 logits and their gradient on
    `lm_tokens` positions — one `cfg.logits_chunk_size` block of them when chunked."""
    layers = [layer_activation_bytes(cfg, tokens, seq_len, tensor, flash, i)
              for i in range(cfg.num_layers)]
    if cfg.remat == "full":
        kept = cfg.num_layers * tokens * cfg.hidden_size * np.dtype(cfg.dtype).itemsize
        kept += max(layers)
    elif cfg.remat == "dots":  # matmul outputs kept, elementwise work recomputed
        kept = sum(layers) * 2 // 3
    else:
        kept = sum(layers)
    if cfg.logits_chunk_size:
        lm_tokens = min(lm_tokens, cfg.logits_chunk_size)
    head = 2 * 4 * lm_tokens * cfg.vocab_size // tensor if cfg.lm_head else 0
    return int(kept + head)


def step_activations(setup: Setup, config: Config, device: str = "h100") -> int:
    """`activation_estimate` for one optimizer step of `setup` per device (a `device` kind):
    each model pass of its algorithm's `cost` (a separate critic too) on the rows it holds at
    once, split over the mesh's batch axes."""
    c = config
    ways = c.mesh.batch_ways
    total = 0
    for p in setup.algorithm.cost(setup, config).passes:
        tokens = p.tokens(p.live_rows) // ways
        lm_tokens = p.live_rows * (p.length if p.lm_positions is None else p.lm_positions)
        total += activation_estimate(p.cfg, tokens, p.length, lm_tokens // ways, c.mesh.tensor,
                                     flash_attention(p.cfg, device))
    return total


def gradient_bytes(setup: Setup, state_sh) -> int:
    """Bytes per device of one gradient copy: the trainable parameters' shards."""
    trainable = [(x, s) for x, s, label in zip(
        jax.tree.leaves(setup.state.params),
        jax.tree.leaves(state_sh.params, is_leaf=lambda v: isinstance(v, jax.sharding.Sharding)),
        jax.tree.leaves(setup.labels)) if label == optim.TRAINABLE]
    return bytes_per_device(*zip(*trainable)) if trainable else 0


def plan(config: Config, step: str = "sft", device: str = "h100", *,
         on_device: bool = False) -> dict:
    """Per-device memory, FLOPs and collectives of `step` compiled for `config.mesh`.

    `on_device`: the attached devices are the target (their compiler's memory figures are
    reported); otherwise they stand in for `device` and activations are estimated.
    """
    if step not in algorithms.names():
        raise ValueError(f"jrlhf plan: unknown step {step!r}; choose from "
                         f"{', '.join(algorithms.names())}")
    capacity = device_memory(device)
    n = math.prod(config.mesh.shape)
    devices = jax.devices()
    if len(devices) < n:
        raise ValueError(
            f"mesh of {n} devices, but only {len(devices)} are attached" + (
                "" if on_device else f" (JAX started before plan could add {n} fake CPU "
                "devices: run `jrlhf plan` in a fresh process, or set XLA_FLAGS="
                f"--xla_force_host_platform_device_count={n})"))
    mesh = sharding.make_mesh(config.mesh, devices[:n])
    policy_cfg = model_config(config.model)
    model_cfg, params = initial_weights(step, config, policy_cfg, abstract_params(policy_cfg))
    setup = make_setup(step, config, model_cfg, params, mesh=mesh)
    state_sh = state_shardings(setup.state, mesh)
    batch = batch_shapes(setup, config)
    jitted = getattr(setup.step, "jitted", setup.step)
    compiled = jitted.lower(setup.state, batch).compile()
    mem = compiled.memory_analysis()
    params_bytes = bytes_per_device(setup.state.params, state_sh.params)
    opt_bytes = bytes_per_device(setup.state.opt_state, state_sh.opt_state)
    ref_bytes = 0
    if setup.ref_params is not None:
        ref_bytes = bytes_per_device(setup.ref_params,
                                     sharding.param_shardings(setup.ref_params, mesh))
    args = mem.argument_size_in_bytes if mem else params_bytes + opt_bytes
    result = {
        "step": step, "mesh": dict(zip(sharding.AXES, config.mesh.shape)),
        "quantize": config.model.quantize, "device": device, "device_memory_bytes": capacity,
        "model_params": policy_cfg.num_params, "active_params": policy_cfg.active_params,
        "params_bytes_per_device": params_bytes, "optimizer_bytes_per_device": opt_bytes,
        "reference_bytes_per_device": ref_bytes, "argument_bytes_per_device": args,
        "output_bytes_per_device": mem.output_size_in_bytes if mem else 0,
        "xla_flops_per_step": xla_flops(compiled),
        "collectives": count_collectives(compiled.as_text()),
    }
    xla_temp = mem.temp_size_in_bytes if mem else 0
    if on_device:
        alias = mem.alias_size_in_bytes if mem else 0
        result.update({"memory_basis": f"compiled for {devices[0].device_kind}",
                       "temp_bytes_per_device": xla_temp,
                       "peak_bytes_per_device": args + result["output_bytes_per_device"]
                       - alias + xla_temp + ref_bytes})
    else:
        activations = step_activations(setup, config, device)
        grads = gradient_bytes(setup, state_sh)
        result.update({"memory_basis": "estimate", "xla_cpu_temp_bytes_per_device": xla_temp,
                       "activation_estimate_bytes_per_device": activations,
                       "temp_bytes_per_device": activations + grads,
                       "peak_bytes_per_device": params_bytes + opt_bytes + ref_bytes + grads
                       + activations})
    result["fits"] = result["peak_bytes_per_device"] <= capacity
    return result


def format_plan(r: dict) -> str:
    gib = lambda b: f"{b / 2**30:,.3f} GiB"  # noqa: E731
    mesh = ",".join(f"{k}={v}" for k, v in r["mesh"].items())
    flops = r["xla_flops_per_step"]
    estimate = r["memory_basis"] == "estimate"
    total, active = r["model_params"], r.get("active_params", r["model_params"])
    params = f"{total / 1e6:.1f}M parameters" + (
        f" ({active / 1e6:.1f}M active)" if active != total else "")
    lines = [
        f"jrlhf plan: {r['step']} step, {params}, mesh {mesh}",
        f"  memory basis             {r['memory_basis'] if not estimate else 'analytic estimate (compiled on CPU stand-ins)'}",
        f"  parameters / device      {gib(r['params_bytes_per_device'])}"
        + (f"  (frozen base {r['quantize']})" if r.get("quantize", "none") != "none" else ""),
        f"  optimizer state / device {gib(r['optimizer_bytes_per_device'])}",
    ]
    if r["reference_bytes_per_device"]:
        lines.append(f"  frozen reference / dev   {gib(r['reference_bytes_per_device'])}")
    if estimate:
        lines += [
            f"  activations / device     {gib(r['activation_estimate_bytes_per_device'])}"
            "  (analytic estimate from the model shape)",
            f"  XLA:CPU temps / device   {gib(r['xla_cpu_temp_bytes_per_device'])}"
            "  (CPU buffer assignment, not the accelerator's)",
            f"  peak / device            {gib(r['peak_bytes_per_device'])}"
            "  (state + gradients + estimated activations)",
        ]
    else:
        lines += [f"  activations+temps / dev  {gib(r['temp_bytes_per_device'])}",
                  f"  peak / device            {gib(r['peak_bytes_per_device'])}"]
    lines += [
        f"  FLOPs / step (XLA)       {flops / 1e12:,.3f} TFLOP" if flops else
        "  FLOPs / step (XLA)       n/a",
        "  collectives              " + (", ".join(f"{k} x{v}" for k, v in
                                                   r["collectives"].items() if v) or "none"),
        f"  fits {r['device']} ({gib(r['device_memory_bytes'])})?  "
        + ("yes" if r["fits"] else "NO"),
    ]
    return "\n".join(lines)
