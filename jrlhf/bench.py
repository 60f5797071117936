"""`jrlhf bench`: step throughput, FLOPs, MFU and memory of the compiled steps.

Each step is compiled once, warmed up, then timed `steps` times with `block_until_ready`.
The workload comes from the config (model, batch sizes, sequence lengths); token ids are random
and never the pad/EOS id, so every sequence has its full length.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import time

import jax
import jax.numpy as jnp
import numpy as np

from jrlhf import lora, optim, sharding
from jrlhf.config import Config
from jrlhf.models import transformer as tfm
from jrlhf.models.config import ModelConfig
from jrlhf.sampling import generate
from jrlhf.state import TrainState
from jrlhf.steps.common import place_state
from jrlhf.steps.ppo import make_ppo_step, score_rollout
from jrlhf.steps.reward import make_reward_step
from jrlhf.steps.sft import make_sft_step

STEPS = ("sft", "reward", "ppo", "generate", "ppo_iteration")

# Dense bf16 peak FLOP/s per chip (vendor figures, no sparsity).
PEAK_FLOPS = {
    "h100": 989e12, "h200": 989e12, "a100": 312e12, "tpu v4": 275e12, "tpu v5 lite": 197e12,
    "tpu v5e": 197e12, "tpu v5p": 459e12, "tpu v5": 459e12, "tpu v6 lite": 918e12,
    "tpu v6e": 918e12,
}
DEVICE_MEMORY = {"h100": 80e9, "h200": 141e9, "a100": 80e9, "a100-40gb": 40e9, "tpu v4": 32e9,
                 "tpu v5e": 16e9, "tpu v5p": 95e9, "tpu v6e": 32e9}


def matmul_peak(n: int = 1024, repeats: int = 5) -> float:
    """Measured float32 matmul FLOP/s of the default device (the CPU 'peak')."""
    a = jnp.ones((n, n), jnp.float32)
    f = jax.jit(lambda x: x @ x)
    jax.block_until_ready(f(a))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(f(a))
        times.append(time.perf_counter() - start)
    return 2 * n ** 3 / min(times)


def device_peak() -> tuple[float, str]:
    """(peak FLOP/s, where it comes from) for the default device."""
    kind = jax.devices()[0].device_kind.lower()
    for name, peak in PEAK_FLOPS.items():
        if name in kind:
            return peak, f"{jax.devices()[0].device_kind} bf16 peak"
    return matmul_peak(), f"measured float32 matmul on {jax.devices()[0].device_kind}"


def matmul_params(cfg: ModelConfig) -> int:
    """Parameters that take part in matmuls per token (no embedding lookup; LM head counted)."""
    n = cfg.num_params - cfg.vocab_size * cfg.hidden_size
    if cfg.family == "gpt2":
        n -= cfg.max_position_embeddings * cfg.hidden_size
    if cfg.lm_head and cfg.tie_word_embeddings:
        n += cfg.vocab_size * cfg.hidden_size
    return n


def model_flops(cfg: ModelConfig, tokens: int, seq_len: int, backward: bool,
                lm_tokens: int | None = None) -> float:
    """Analytic FLOPs: (2 or 6)·N·tokens plus attention (2 or 6)·2·L·T·H·Dh per token.

    `lm_tokens`: positions that go through the LM head (default: all `tokens`); the PPO
    update and scoring only compute response positions' logits, the sampler's prefill only the
    last prompt position's.
    """
    mult = 6 if backward else 2
    attn = 2 * cfg.num_layers * seq_len * cfg.num_heads * cfg.head_dim
    head = cfg.vocab_size * cfg.hidden_size if cfg.lm_head else 0
    lm_tokens = tokens if lm_tokens is None else lm_tokens
    return mult * ((matmul_params(cfg) - head + attn) * tokens + head * lm_tokens)


def xla_flops(compiled) -> float | None:
    cost = compiled.cost_analysis()
    if isinstance(cost, list):
        cost = cost[0] if cost else {}
    flops = (cost or {}).get("flops")
    return float(flops) if flops is not None else None


def memory(compiled) -> dict:
    m = compiled.memory_analysis()
    if m is None:
        return {}
    return {"argument_bytes": m.argument_size_in_bytes, "output_bytes": m.output_size_in_bytes,
            "temp_bytes": m.temp_size_in_bytes, "alias_bytes": m.alias_size_in_bytes,
            "code_bytes": m.generated_code_size_in_bytes}


def random_ids(rng, shape, vocab, avoid: tuple[int, ...]):
    ids = rng.randint(0, vocab, shape).astype(np.int32)
    for a in avoid:
        ids = np.where(ids == a, (a + 1) % vocab, ids)
    return ids


@dataclasses.dataclass
class Workload:
    """Everything a benchmarked step needs, built from a config with random weights."""

    config: Config
    policy_cfg: ModelConfig
    params: dict
    mesh: object

    @classmethod
    def from_config(cls, config: Config, params=None, policy_cfg=None):
        if policy_cfg is None and config.model.source == "random":
            policy_cfg = dataclasses.replace(config.model.arch, dtype=config.model.dtype)
            params = tfm.init_params(policy_cfg, config.run.seed)
        elif policy_cfg is None:
            from jrlhf.pipeline import load_policy

            policy_cfg, params, _ = load_policy(config)
        mesh = None if config.mesh.shape == (1, 1, 1) else sharding.make_mesh(config.mesh)
        return cls(config, policy_cfg, params, mesh)

    @property
    def avoid(self):
        return tuple(i for i in (self.policy_cfg.eos_token_id, self.policy_cfg.pad_token_id)
                     if i is not None)

    def state(self, params, steps, lr, kl_coef=None, use_lora=False):
        if use_lora:
            params = lora.add_lora(params, self.config.lora, jax.random.key(1))
            labels = optim.trainable_labels(params, self.config.optim.freeze,
                                            train_only=lora.LORA_TRAINABLE)
        else:
            labels = optim.trainable_labels(params, self.config.optim.freeze)
        ocfg = dataclasses.replace(self.config.optim, learning_rate=lr, total_steps=steps)
        st = TrainState.create(jax.tree.map(jnp.array, params),
                               optim.make_optimizer(ocfg, labels), 0, kl_coef)
        return (place_state(st, self.mesh) if self.mesh else st), labels


def _time(fn, args_fn, steps: int, warmup: int):
    for _ in range(warmup):
        jax.block_until_ready(fn(*args_fn()))
    times = []
    for _ in range(steps):
        args = args_fn()
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return times


def _carry_state(step):
    """Run a donating `(state, batch)` step repeatedly, threading the state through."""
    box = {}

    def run(state_holder, batch):
        box["state"], metrics = step(box.get("state", state_holder), batch)
        return metrics

    return run


def bench_step(work: Workload, kind: str, *, steps: int = 5, warmup: int = 1) -> dict:
    """Benchmark one step kind; returns a dict of measurements."""
    if kind not in STEPS:
        raise ValueError(f"unknown step {kind!r}; choose from {', '.join(STEPS)}")
    c = work.config
    cfg = work.policy_cfg
    rng = np.random.RandomState(0)
    P, R = c.data.max_prompt_length, c.data.max_response_length
    T = P + R
    use_lora = c.lora.enabled
    result = {"step": kind, "device": jax.devices()[0].device_kind,
              "devices": jax.device_count(), "mesh": list(c.mesh.shape),
              "model_params": cfg.num_params, "dispatches_per_step": 1}
    if kind == "sft":
        B = c.sft.batch_size
        state, labels = work.state(work.params, steps + warmup, c.sft.learning_rate,
                                   use_lora=use_lora)
        step = make_sft_step(cfg, labels=labels, lora_scale=c.lora.scale,
                             grad_accum_steps=c.optim.grad_accum_steps, state=state,
                             mesh=work.mesh)
        ids = random_ids(rng, (B, T), cfg.vocab_size, work.avoid)
        batch = {"input_ids": ids, "attention_mask": np.ones_like(ids),
                 "loss_mask": np.ones_like(ids)}
        tokens, samples, flops = B * T, B, model_flops(cfg, B * T, T, True)
    elif kind == "reward":
        G = c.reward.batch_size
        rm_cfg = dataclasses.replace(cfg, lm_head=False, scalar_head=True)
        rm_params = {k: v for k, v in work.params.items() if k not in ("lm_head", "score")}
        rm_params["score"] = {"kernel": jnp.zeros((cfg.hidden_size, 1))}
        state, labels = work.state(rm_params, steps + warmup, c.reward.learning_rate)
        step = make_reward_step(rm_cfg, labels=labels, state=state, mesh=work.mesh)
        ids = random_ids(rng, (G, 2, T), cfg.vocab_size, work.avoid)
        batch = {"input_ids": ids, "attention_mask": np.ones_like(ids),
                 "ranks": np.tile(np.array([[1, 2]], np.int32), (G, 1))}
        tokens, samples = 2 * G * T, G
        flops = model_flops(rm_cfg, tokens, T, True)
    elif kind in ("ppo", "generate", "ppo_iteration"):
        return _bench_ppo(work, kind, result, steps, warmup, rng)
    jitted = step.jitted if hasattr(step, "jitted") else step
    t0 = time.perf_counter()
    compiled = jitted.lower(state, batch).compile()
    result["compile_s"] = time.perf_counter() - t0
    times = _time(_carry_state(step), lambda: (state, batch), steps, warmup)
    return _finish(result, compiled, times, tokens, samples, flops)


def _bench_ppo(work, kind, result, steps, warmup, rng):
    from jrlhf.loops import prepare_ppo_params
    from jrlhf.steps.ppo import reward_model_fn

    c = work.config
    pc = c.ppo
    B, P, N = pc.rollout_batch_size, c.data.max_prompt_length, pc.max_new_tokens
    tree, ref, labels, cfg, value_cfg = prepare_ppo_params(c, work.policy_cfg, work.params,
                                                           jax.random.key(1))
    ocfg = dataclasses.replace(c.optim, learning_rate=pc.learning_rate)
    state = TrainState.create(tree, optim.make_optimizer(ocfg, labels), 0, pc.kl_coef)
    if work.mesh is not None:
        state = place_state(state, work.mesh)
    rm_cfg = dataclasses.replace(work.policy_cfg, lm_head=False, scalar_head=True)
    rm_params = {k: v for k, v in jax.tree.map(jnp.array, work.params).items()
                 if k not in ("lm_head", "score")}
    rm_params["score"] = {"kernel": jnp.zeros((cfg.hidden_size, 1))}
    prompt = random_ids(rng, (B, P), cfg.vocab_size, work.avoid)
    prompt_mask = np.ones_like(prompt)
    mb = pc.num_minibatches(B)
    lora_scale = c.lora.scale
    step = make_ppo_step(pc, cfg, value_cfg, labels=labels, lora_scale=lora_scale, state=state,
                         mesh=work.mesh)
    sample = jax.jit(functools.partial(generate, cfg, max_new_tokens=N, temperature=pc.temperature,
                                       eos_token_id=None, pad_token_id=0))
    scorer = jax.jit(functools.partial(score_rollout, cfg=pc, policy_cfg=cfg, value_cfg=value_cfg,
                                       reward_fn=reward_model_fn(rm_cfg), lora_scale=lora_scale))
    key = jax.random.key(0)
    policy = lambda s: lora.merge_lora(s.params["policy"], lora_scale)  # noqa: E731
    gen = sample(policy(state), prompt, prompt_mask, key)
    batch, _ = scorer(state.params, ref, rm_params, prompt, prompt_mask, gen.tokens, gen.mask)
    batch = dict(batch, scores=jnp.asarray(rng.randn(B), jnp.float32))
    models_in_update = 1 if value_cfg is None else 2  # policy (+ a separate value model)
    models_scored = 3 if value_cfg is None else 4  # policy, reference, reward (+ value)
    T = P + N
    fwd_tokens = B * T
    backbone = dataclasses.replace(cfg, lm_head=False, scalar_head=True)
    E = pc.ppo_epochs
    # Update: the policy's backbone on every position, its LM head on the response positions;
    # a separate value model as a backbone. Scoring: policy and reference likewise, plus the
    # reward model (and value model). Generation: prefill B·P tokens with one LM-head position
    # per row, then B·N single-token steps.
    update_flops = (model_flops(cfg, fwd_tokens * E, T, True, lm_tokens=B * N * E)
                    + (models_in_update - 1) * model_flops(backbone, fwd_tokens * E, T, True))
    score_flops = (2 * model_flops(cfg, fwd_tokens, T, False, lm_tokens=B * N)
                   + (models_scored - 2) * model_flops(backbone, fwd_tokens, T, False))
    gen_flops = (model_flops(cfg, B * P, P, False, lm_tokens=B)
                 + model_flops(cfg, B * N, T, False))
    result.update({"ppo_epochs": pc.ppo_epochs, "minibatches": mb})
    if kind == "ppo":
        t0 = time.perf_counter()
        compiled = step.jitted.lower(state, batch).compile() if hasattr(step, "jitted") else \
            step.lower(state, batch).compile()
        result["compile_s"] = time.perf_counter() - t0
        times = _time(_carry_state(step), lambda: (state, batch), steps, warmup)
        return _finish(result, compiled, times, fwd_tokens * pc.ppo_epochs, B, update_flops)
    if kind == "generate":
        t0 = time.perf_counter()
        compiled = sample.lower(policy(state), prompt, prompt_mask, key).compile()
        result["compile_s"] = time.perf_counter() - t0
        times = _time(sample, lambda: (policy(state), prompt, prompt_mask, key), steps, warmup)
        return _finish(result, compiled, times, B * N, B, gen_flops)
    # A whole iteration, with the time split into its three dispatches.
    phases = {"generate": [], "score": [], "update": []}
    box = {"state": state}

    def iteration():
        s = box["state"]
        t0 = time.perf_counter()
        g = jax.block_until_ready(sample(policy(s), prompt, prompt_mask, key))
        t1 = time.perf_counter()
        b, _ = jax.block_until_ready(scorer(s.params, ref, rm_params, prompt, prompt_mask,
                                            g.tokens, g.mask))
        t2 = time.perf_counter()
        b = dict(b, scores=batch["scores"])
        box["state"], m = step(s, b)
        jax.block_until_ready(m)
        t3 = time.perf_counter()
        return t1 - t0, t2 - t1, t3 - t2

    for _ in range(warmup):
        iteration()
    for _ in range(steps):
        for name, t in zip(phases, iteration()):
            phases[name].append(t)
    total = [sum(ts) for ts in zip(*phases.values())]
    result["dispatches_per_step"] = 3
    result["phases"] = {}
    for (name, ts), toks, fl in zip(phases.items(), (B * N, fwd_tokens, fwd_tokens * pc.ppo_epochs),
                                    (gen_flops, score_flops, update_flops)):
        med = float(np.median(ts))
        result["phases"][name] = {"median_s": med, "tokens_per_s": toks / med,
                                  "flops_per_s": fl / med}
    return _finish(result, None, total, B * T, B, gen_flops + score_flops + update_flops)


def _finish(result, compiled, times, tokens, samples, flops):
    med = float(np.median(times))
    peak, peak_source = device_peak()
    per_device_peak = peak * (jax.device_count() if "measured" not in peak_source else 1)
    result.update({
        "median_s": med, "min_s": float(np.min(times)), "max_s": float(np.max(times)),
        "steps_timed": len(times), "tokens_per_step": tokens, "tokens_per_s": tokens / med,
        "samples_per_s": samples / med, "model_flops_per_step": flops,
        "achieved_flops_per_s": flops / med, "peak_flops_per_s": per_device_peak,
        "peak_source": peak_source, "mfu": flops / med / per_device_peak,
    })
    if compiled is not None:
        result["xla_flops_per_step"] = xla_flops(compiled)
        result["memory_per_device"] = memory(compiled)
    return result


def format_result(r: dict) -> str:
    lines = [f"jrlhf bench: {r['step']} on {r['devices']} x {r['device']} (mesh {r['mesh']}), "
             f"{r['model_params'] / 1e6:.1f}M parameters"]
    rows = [
        ("step time (median)", f"{r['median_s'] * 1e3:.1f} ms  (min {r['min_s'] * 1e3:.1f}, "
                               f"max {r['max_s'] * 1e3:.1f}, n={r['steps_timed']})"),
        ("tokens / s", f"{r['tokens_per_s']:,.0f}  ({r['tokens_per_step']:,} tokens per step)"),
        ("samples / s", f"{r['samples_per_s']:.2f}"),
        ("model FLOPs / step", f"{r['model_flops_per_step'] / 1e9:,.2f} GFLOP (analytic)"),
    ]
    if r.get("xla_flops_per_step"):
        note = " (one scan iteration: XLA counts a loop body once)" if r["step"] == "ppo" else ""
        rows.append(("XLA cost_analysis", f"{r['xla_flops_per_step'] / 1e9:,.2f} GFLOP{note}"))
    rows += [("achieved", f"{r['achieved_flops_per_s'] / 1e9:,.1f} GFLOP/s"),
             ("MFU", f"{100 * r['mfu']:.1f}% of {r['peak_flops_per_s'] / 1e9:,.0f} GFLOP/s "
                     f"({r['peak_source']})"),
             ("dispatches / step", str(r["dispatches_per_step"]))]
    if "compile_s" in r:
        rows.append(("compile", f"{r['compile_s']:.1f} s"))
    for k, v in (r.get("memory_per_device") or {}).items():
        rows.append((f"memory: {k}", f"{v / 2**20:,.1f} MiB"))
    for name, p in (r.get("phases") or {}).items():
        rows.append((f"  {name}", f"{p['median_s'] * 1e3:.1f} ms, {p['tokens_per_s']:,.0f} tok/s"))
    width = max(len(k) for k, _ in rows)
    return "\n".join(lines + [f"  {k:<{width}}  {v}" for k, v in rows])


def to_json(result) -> str:
    return json.dumps(result, indent=2, default=float)
