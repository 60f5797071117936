"""`jrlhf plan`: will a config fit a mesh? Compile the step for it without allocating weights.

The state and batch are abstract (`jax.ShapeDtypeStruct` with shardings); the step is lowered
and compiled for the requested mesh — on fake CPU devices when the accelerators are not here —
and XLA's memory and cost analyses are read back.
"""

from __future__ import annotations

import dataclasses
import math
import re

import jax
import jax.numpy as jnp
import numpy as np

from jrlhf import optim, sharding
from jrlhf.bench import DEVICE_MEMORY, xla_flops
from jrlhf.config import Config, MeshConfig
from jrlhf.models import transformer as tfm
from jrlhf.models.config import ModelConfig
from jrlhf.state import TrainState
from jrlhf.steps.common import state_shardings
from jrlhf.steps.ppo import make_ppo_step
from jrlhf.steps.reward import make_reward_step
from jrlhf.steps.sft import make_sft_step

COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute")


def parse_mesh(text: str) -> MeshConfig:
    """`"data=2,fsdp=4,tensor=1"` -> MeshConfig (missing axes are 1)."""
    sizes = {}
    for part in filter(None, text.split(",")):
        name, sep, value = part.partition("=")
        if not sep or name.strip() not in ("data", "fsdp", "tensor") or not value.isdigit():
            raise ValueError(f"--mesh {text!r}: expected e.g. data=2,fsdp=4,tensor=1")
        sizes[name.strip()] = int(value)
    return MeshConfig(**sizes)


def _model_cfg(config: Config) -> ModelConfig:
    if config.model.arch is not None:
        return dataclasses.replace(config.model.arch, dtype=config.model.dtype)
    if config.model.source == "smollm2" or config.model.source.endswith(".gguf"):
        import gguf

        from jrlhf.models.gguf_loader import smollm2_gguf_path

        path = smollm2_gguf_path() if config.model.source == "smollm2" else config.model.source
        reader = gguf.GGUFReader(str(path))  # metadata only: no weights are dequantised
        f = lambda k: reader.fields[k].contents()  # noqa: E731
        vocab = len(reader.fields["tokenizer.ggml.tokens"].data)
        return ModelConfig(family="llama", vocab_size=vocab,
                           hidden_size=int(f("llama.embedding_length")),
                           num_layers=int(f("llama.block_count")),
                           num_heads=int(f("llama.attention.head_count")),
                           num_kv_heads=int(f("llama.attention.head_count_kv")),
                           head_dim=int(f("llama.rope.dimension_count")),
                           intermediate_size=int(f("llama.feed_forward_length")),
                           tie_word_embeddings=True, dtype=config.model.dtype)
    import transformers

    from jrlhf.models.config import from_hf_config

    hf = transformers.AutoConfig.from_pretrained(config.model.source, local_files_only=True)
    return from_hf_config(hf, dtype=config.model.dtype)


def _abstract(tree, shardings):
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                        tree, shardings)


def _bytes_per_device(tree, shardings) -> int:
    """Bytes one device holds of `tree` under `shardings` (the largest shard per leaf)."""
    total = 0
    for x, s in zip(jax.tree.leaves(tree), jax.tree.leaves(
            shardings, is_leaf=lambda v: isinstance(v, jax.sharding.Sharding))):
        shard = s.shard_shape(x.shape)
        total += math.prod(shard) * np.dtype(x.dtype).itemsize
    return total


def count_collectives(hlo_text: str) -> dict[str, int]:
    return {op: len(re.findall(rf"\b{op}(-start)?\(", hlo_text)) for op in COLLECTIVES}


def plan(config: Config, step: str = "sft", device: str = "h100") -> dict:
    """Per-device memory, FLOPs and collectives of `step` compiled for `config.mesh`."""
    cfg = _model_cfg(config)
    mesh = sharding.make_mesh(config.mesh, jax.devices()[: math.prod(config.mesh.shape)])
    c = config
    P, R = c.data.max_prompt_length, c.data.max_response_length
    T = P + R
    if step == "reward":
        cfg = dataclasses.replace(cfg, lm_head=False, scalar_head=True)
    if step == "ppo":
        cfg = dataclasses.replace(cfg, scalar_head=True)
    params = tfm.abstract_params(cfg)
    tree = {"policy": params} if step == "ppo" else params
    labels = optim.trainable_labels(tree, c.optim.freeze)
    tx = optim.make_optimizer(c.optim, labels)
    state = jax.eval_shape(lambda p: TrainState.create(p, tx, 0, c.ppo.kl_coef
                                                       if step == "ppo" else None), tree)
    state = state.replace(tx=tx)
    state_sh = state_shardings(state, mesh)
    abstract_state = _abstract(state, state_sh)
    batch_sh = sharding.batch_sharding(mesh)
    i32 = jnp.int32
    if step == "sft":
        B = c.sft.batch_size
        shapes = {"input_ids": (B, T), "attention_mask": (B, T), "loss_mask": (B, T)}
        dtypes = dict.fromkeys(shapes, i32)
        fn = make_sft_step(cfg, labels=labels, state=state, mesh=mesh)
    elif step == "reward":
        G = c.reward.batch_size
        shapes = {"input_ids": (G, 2, T), "attention_mask": (G, 2, T), "ranks": (G, 2)}
        dtypes = dict.fromkeys(shapes, i32)
        fn = make_reward_step(cfg, labels=labels, state=state, mesh=mesh)
    elif step == "ppo":
        B, N = c.ppo.rollout_batch_size, c.ppo.max_new_tokens
        shapes = {"input_ids": (B, P + N), "attention_mask": (B, P + N),
                  "response_mask": (B, N), "logprobs": (B, N), "ref_logprobs": (B, N),
                  "values": (B, N), "scores": (B,)}
        dtypes = {k: (i32 if k in ("input_ids", "attention_mask", "response_mask")
                      else jnp.float32) for k in shapes}
        fn = make_ppo_step(c.ppo, cfg, None, labels=labels, state=state, mesh=mesh)
    else:
        raise ValueError(f"jrlhf plan: unknown step {step!r}; choose sft, reward or ppo")
    batch = {k: jax.ShapeDtypeStruct(v, dtypes[k], sharding=batch_sh) for k, v in shapes.items()}
    jitted = fn.jitted if hasattr(fn, "jitted") else fn
    compiled = jitted.lower(abstract_state, batch).compile()
    mem = compiled.memory_analysis()
    params_bytes = _bytes_per_device(state.params, state_sh.params)
    opt_bytes = _bytes_per_device(state.opt_state, state_sh.opt_state)
    temp = mem.temp_size_in_bytes if mem else 0
    args = mem.argument_size_in_bytes if mem else params_bytes + opt_bytes
    out = mem.output_size_in_bytes if mem else 0
    alias = mem.alias_size_in_bytes if mem else 0
    peak = args + out - alias + temp
    capacity = DEVICE_MEMORY.get(device.lower())
    if capacity is None:
        raise ValueError(f"unknown device {device!r}; known: {', '.join(DEVICE_MEMORY)}")
    return {
        "step": step, "mesh": dict(zip(sharding.AXES, config.mesh.shape)),
        "model_params": cfg.num_params,
        "params_bytes_per_device": params_bytes, "optimizer_bytes_per_device": opt_bytes,
        "argument_bytes_per_device": args, "temp_bytes_per_device": temp,
        "output_bytes_per_device": out, "peak_bytes_per_device": peak,
        "xla_flops_per_step": xla_flops(compiled),
        "collectives": count_collectives(compiled.as_text()),
        "device": device, "device_memory_bytes": capacity, "fits": peak <= capacity,
    }


def format_plan(r: dict) -> str:
    gib = lambda b: f"{b / 2**30:,.3f} GiB"  # noqa: E731
    mesh = ",".join(f"{k}={v}" for k, v in r["mesh"].items())
    flops = r["xla_flops_per_step"]
    lines = [
        f"jrlhf plan: {r['step']} step, {r['model_params'] / 1e6:.1f}M parameters, mesh {mesh}",
        f"  parameters / device      {gib(r['params_bytes_per_device'])}",
        f"  optimizer state / device {gib(r['optimizer_bytes_per_device'])}",
        f"  activations+temps / dev  {gib(r['temp_bytes_per_device'])}",
        f"  peak / device            {gib(r['peak_bytes_per_device'])}",
        f"  FLOPs / step (XLA)       {flops / 1e12:,.3f} TFLOP" if flops else
        "  FLOPs / step (XLA)       n/a",
        "  collectives              " + ", ".join(f"{k} x{v}" for k, v in
                                                  r["collectives"].items() if v) or "none",
        f"  fits {r['device']} ({gib(r['device_memory_bytes'])})?  "
        + ("yes" if r["fits"] else "NO"),
    ]
    return "\n".join(lines)
