"""`jrlhf bench`: step throughput, FLOPs, MFU and memory of the compiled steps.

Every step is the one training runs: its state, reference and jitted update come from
`setups.make_setup` with the same config, and `ppo_iteration` runs the training loop's own
`RolloutLoop`. Each step is compiled once, warmed up, then timed `steps` times with
`block_until_ready`. Batches are random with the config's shapes (`setups.batch_shapes`);
token ids are never the pad/EOS id, so every sequence has its full length.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import json
import random
import time

import jax
import jax.numpy as jnp
import numpy as np

from jrlhf.config import Config
from jrlhf.envs import ended_by
from jrlhf.hardware import device_bandwidth, device_peak, memory, xla_flops
from jrlhf.models.config import ModelConfig
from jrlhf.models.sources import load_policy
from jrlhf import algorithms
from jrlhf.rollouts import Reward, RolloutLoop, make_sampler
from jrlhf.setups import Setup, batch_shapes, initial_weights, make_setup
from jrlhf.tasks import TASKS

GENERATE = "generate"  # the sampler alone, on the PPO setup's policy and prompts
ITERATION = "_iteration"  # `<algorithm>_iteration`: a whole rollout iteration (3 dispatches)


def step_kinds() -> tuple[str, ...]:
    """What `jrlhf bench --step` takes: every algorithm's update, `generate`, and
    `<algorithm>_iteration` for each algorithm that samples."""
    return (*algorithms.names(), GENERATE,
            *(r.name + ITERATION for r in algorithms.records() if r.rollout is not None))


def matmul_params(cfg: ModelConfig, active: bool = True) -> int:
    """Parameters that take part in matmuls per token (no embedding lookup; LM head counted).

    `active`: a mixture-of-experts layer counts what one token computes with, its router
    `[D, E]`, its k routed experts (gate, up `[D, expert_size]`, down `[expert_size, D]`) and
    the shared expert; otherwise every expert. A dense model gives the same count either way."""
    n = cfg.param_count(active) - cfg.vocab_size * cfg.hidden_size
    if cfg.family == "gpt2":
        n -= cfg.max_position_embeddings * cfg.hidden_size
    if cfg.lm_head and cfg.tie_word_embeddings:
        n += cfg.vocab_size * cfg.hidden_size
    return n


def model_flops(cfg: ModelConfig, tokens: int, seq_len: int, backward: bool,
                lm_tokens: int | None = None, read_tokens: int | None = None) -> float:
    """Analytic FLOPs: (2 or 6)·N·tokens plus attention (2 or 6)·2·L·T·H·Dh per token, N the
    active matmul parameters (`matmul_params`: a mixture of experts counts each token's k
    experts, not all E, so MFU is on the FLOPs the tokens need).

    `lm_tokens`: positions that go through the LM head (default: all `tokens`); the PPO
    update and scoring only compute response positions' logits, the sampler's prefill only the
    last prompt position's. `read_tokens`: positions whose final hidden state is read (a reward
    model's last token of each row, `Transformer.__call__(read=...)`): the last layer runs its
    queries, attention and MLP there only, its key / value projections on every token.
    """
    mult = 6 if backward else 2
    attn = 2 * cfg.num_layers * seq_len * cfg.num_heads * cfg.head_dim
    head = cfg.vocab_size * cfg.hidden_size if cfg.lm_head else 0
    lm_tokens = tokens if lm_tokens is None else lm_tokens
    flops = mult * ((matmul_params(cfg) - head + attn) * tokens + head * lm_tokens)
    if read_tokens is not None:
        last = cfg.layer_param_count(cfg.num_layers - 1, active=True)
        query_side = last - cfg.kv_projection_params + attn // cfg.num_layers
        flops -= mult * query_side * (tokens - read_tokens)
    return flops


def random_ids(rng, shape, vocab, avoid: tuple[int, ...]):
    ids = rng.randint(0, vocab, shape).astype(np.int32)
    for a in avoid:
        ids = np.where(ids == a, (a + 1) % vocab, ids)
    return ids


def random_batch(shapes: dict, cfg: ModelConfig, rng) -> dict:
    """A batch for `shapes` (`setups.batch_shapes`): random token ids that avoid EOS/pad, all
    masks 1, ranks 1 > 2, log-probs ≤ 0, temperatures 1, other floats standard normal."""
    avoid = tuple(i for i in (cfg.eos_token_id, cfg.pad_token_id) if i is not None)
    batch = {}
    for key, spec in shapes.items():
        if key == "segment_ids":  # packed rows: two sequences filling each row
            half = spec.shape[-1] // 2
            x = np.where(np.arange(spec.shape[-1]) < half, 1, 2).astype(np.int32)
            x = np.broadcast_to(x, spec.shape).copy()
        elif key == "positions":
            half = spec.shape[-1] // 2
            x = np.arange(spec.shape[-1], dtype=np.int32) % max(half, 1)
            x = np.broadcast_to(x, spec.shape).copy()
        elif key.endswith("ids"):
            x = random_ids(rng, spec.shape, cfg.vocab_size, avoid)
        elif key.endswith("mask"):
            x = np.ones(spec.shape, np.int32)
        elif key == "ranks":
            x = np.tile(np.arange(1, spec.shape[1] + 1, dtype=np.int32), (spec.shape[0], 1))
        elif key == "temperature":  # the rows' sampling temperature
            x = np.ones(spec.shape, np.float32)
        elif "logp" in key:
            x = -np.abs(rng.randn(*spec.shape)).astype(np.float32)
        else:
            x = rng.randn(*spec.shape).astype(np.float32)
        batch[key] = x if spec.sharding is None else jax.device_put(x, spec.sharding)
    return batch


@dataclasses.dataclass
class Workload:
    """The config and the policy weights (random for `model.source="random"`) to benchmark."""

    config: Config
    policy_cfg: ModelConfig
    params: dict
    tokenizer: object = None  # only for multi-turn episodes (`env.enabled`)

    @classmethod
    def from_config(cls, config: Config):
        policy_cfg, params, tokenizer = load_policy(config.model, config.run.seed,
                                                    tokenizer=config.env.enabled)
        return cls(config, policy_cfg, params, tokenizer)

    def setup(self, algorithm: str) -> Setup:
        """The setup training builds for `algorithm` from these weights."""
        cfg, params = initial_weights(algorithm, self.config, self.policy_cfg, self.params)
        return make_setup(algorithm, self.config, cfg, params)


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


def _carry_state(step, state):
    """Run a donating `(state, batch)` step repeatedly, threading the state through."""
    box = {"state": state}

    def run(batch):
        box["state"], metrics = step(box["state"], batch)
        return metrics

    return run


def _compile(step, *args):
    jitted = getattr(step, "jitted", step)
    start = time.perf_counter()
    compiled = jitted.lower(*args).compile()
    return compiled, time.perf_counter() - start


def update_flops(setup: Setup, config: Config) -> tuple[float, int, int]:
    """`(analytic FLOPs, tokens, samples)` of one `setup.step` on a `batch_shapes` batch, from
    its algorithm's `cost`: every model pass forward and backward; the tokens of the first."""
    cost = setup.algorithm.cost(setup, config)
    flops = sum(model_flops(
        p.cfg, p.tokens(p.rows), p.length, True,
        lm_tokens=None if p.lm_positions is None else p.rows * p.lm_positions,
        read_tokens=None if p.read_positions is None else p.rows * p.read_positions)
        for p in cost.passes)
    first = cost.passes[0]
    return flops, first.rows * first.length, cost.samples


def bench_step(work: Workload, kind: str, *, steps: int = 5, warmup: int = 1,
               long_tail: bool = False) -> dict:
    """Benchmark one step kind (`step_kinds()`); returns a dict of measurements.
    `long_tail`: generate gives each row its own length budget (`long_tail_budgets`)."""
    known = step_kinds()
    if kind not in known:
        raise ValueError(f"unknown step {kind!r}; choose from {', '.join(known)}")
    c = work.config
    iteration = kind.endswith(ITERATION) and kind not in algorithms.names()
    algorithm = (kind.removesuffix(ITERATION) if iteration else
                 algorithms.PPO.name if kind == GENERATE else kind)
    setup = work.setup(algorithm)
    result = {"step": kind, "device": jax.devices()[0].device_kind, "jax": jax.__version__,
              "devices": jax.device_count(), "mesh": list(c.mesh.shape),
              "model_params": work.policy_cfg.num_params,
              "active_params": work.policy_cfg.active_params, "dispatches_per_step": 1}
    rng = np.random.RandomState(0)
    if kind == GENERATE:
        return _bench_generate(work, setup, result, steps, warmup, rng, long_tail)
    if iteration:
        return _bench_iteration(work, setup, result, steps, warmup, rng)
    batch = random_batch(batch_shapes(setup, c), setup.model_cfg, rng)
    compiled, result["compile_s"] = _compile(setup.step, setup.state, batch)
    result.update(setup.algorithm.cost(setup, c).details)
    times = _time(_carry_state(setup.step, setup.state), lambda: (batch,), steps, warmup)
    return _finish(result, compiled, times, *update_flops(setup, c))


def _prompts(work: Workload, rng, rows: int):
    c = work.config
    B, P = rows, c.data.max_prompt_length
    cfg = work.policy_cfg
    ids = random_ids(rng, (B, P), cfg.vocab_size,
                     tuple(i for i in (cfg.eos_token_id, cfg.pad_token_id) if i is not None))
    return {"input_ids": ids, "attention_mask": np.ones_like(ids)}


def _task_prompts(work: Workload, rng, rows: int):
    """`rows` problems of `data.task` (its `problem(random.Random)`), encoded as the training
    stage encodes prompts (chat template, left-padded to `data.max_prompt_length`): episodes
    need prompts their environment understands."""
    from jrlhf.data.pipeline import Encoder  # data's readers (TFDS, grain) only when needed

    d = work.config.data
    task = TASKS[d.task]
    if not hasattr(task, "problem"):
        raise ValueError(f"jrlhf bench on episodes (env.enabled) draws prompts from the task's "
                         f"problem generator; data.task={d.task!r} has none")
    encoder = Encoder(work.tokenizer, d.max_prompt_length, d.max_response_length,
                      d.chat_template)
    draw = random.Random(int(rng.randint(2**31)))
    examples = [encoder.prompt_example({"prompt": task.problem(draw)[0]}) for _ in range(rows)]
    return {k: np.stack([e[k] for e in examples]) for k in ("input_ids", "attention_mask")}


def _generation_flops(cfg: ModelConfig, B: int, P: int, N: int) -> float:
    """Prefill of B·P tokens with one LM-head position per row, then B·N single-token steps."""
    return model_flops(cfg, B * P, P, False, lm_tokens=B) + model_flops(cfg, B * N, P + N, False)


def decode_weight_params(cfg: ModelConfig, rows: int) -> int:
    """Matmul parameters one decode step of `rows` tokens reads: every dense weight, and in
    each sparse layer the experts some row is routed to, at most min(E, rows·k) of them (all E
    once rows·k >= E). A dense model: `matmul_params(cfg)`."""
    k = cfg.experts_per_token
    extra = min(cfg.num_experts, rows * k) - k  # experts read beyond one token's k
    active = matmul_params(cfg)
    if extra <= 0:
        return active
    inactive = matmul_params(cfg, active=False) - active  # E − k experts per sparse layer
    return active + inactive * extra // (cfg.num_experts - k)


def decode_bytes_per_step(cfg: ModelConfig, rows: int, cached_tokens: float,
                          cache_dtype: str = "") -> float:
    """Bytes one decode step must read from memory: every matmul weight the step uses once in
    the compute dtype (the LM head included; `decode_weight_params`), plus the keys and values
    of `cached_tokens` per row."""
    weights = decode_weight_params(cfg, rows) * jnp.dtype(cfg.dtype).itemsize
    kv_item = jnp.dtype(cache_dtype or cfg.dtype).itemsize
    kv = rows * cached_tokens * cfg.num_layers * 2 * cfg.num_kv_heads * cfg.head_dim * kv_item
    return weights + kv


def long_tail_budgets(rows: int, max_new_tokens: int, seed: int = 0) -> np.ndarray:
    """`[rows]` length budgets as the long-tail workload of shared/BENCHMARK.md draws them: a
    tenth of the rows (at random) get `max_new_tokens`, the rest between N/28 and N/7 (8–32
    for N = 224)."""
    N = max_new_tokens
    rng = np.random.default_rng(seed)
    long = rng.random(rows) < 0.1
    return np.where(long, N, rng.integers(max(1, N // 28), N // 7 + 1, rows)).astype(np.int32)


def _bench_generate(work, setup, result, steps, warmup, rng, long_tail=False):
    """The sampler on the PPO prompts; the decode step time is the difference between a run of
    N new tokens and a prefill-only run (1 token), over N − 1 steps. Slot utilisation: useful
    tokens ÷ (rows × decode steps), what rows that stop early leave unused; `long_tail` gives
    each row its own budget (`long_tail_budgets`) and no EOS."""
    c = work.config
    prompts = _prompts(work, rng, c.ppo.prompts_per_iteration)
    ids, mask = jnp.asarray(prompts["input_ids"]), jnp.asarray(prompts["attention_mask"])
    B, P = ids.shape
    N = c.rollout.max_new_tokens
    budgets = jnp.asarray(long_tail_budgets(B, N) if long_tail else np.full(B, N, np.int32))
    sample = jax.jit(functools.partial(make_sampler(setup.model_cfg, c.rollout, None, 0),
                                       budgets=budgets))
    policy = setup.policy_params(setup.state.params)
    key = jax.random.key(0)
    compiled, result["compile_s"] = _compile(sample, policy, ids, mask, key)
    times = _time(sample, lambda: (policy, ids, mask, key), steps, warmup)
    out = sample(policy, ids, mask, key)
    useful, decode_steps = int(out.mask.sum()), int(out.steps)
    result.update({"useful_tokens": useful, "decode_steps": decode_steps,
                   "slot_utilisation": useful / (B * decode_steps), "long_tail": long_tail})
    if N > 1:
        one = dataclasses.replace(c.rollout, max_new_tokens=1)
        prefill = jax.jit(make_sampler(setup.model_cfg, one, None, 0))
        prefill_s = float(np.median(_time(prefill, lambda: (policy, ids, mask, key), steps,
                                          warmup)))
        step_s = (float(np.median(times)) - prefill_s) / (N - 1)
        # Rows hold P + t tokens at step t: on average P + N / 2.
        nbytes = decode_bytes_per_step(setup.model_cfg, B, P + N / 2, c.rollout.kv_cache_dtype)
        bandwidth = device_bandwidth()
        result.update({"prefill_s": prefill_s, "decode_step_s": step_s,
                       "decode_bytes_per_step": nbytes,
                       "decode_bytes_per_s": nbytes / step_s if step_s > 0 else None,
                       "hbm_bandwidth": bandwidth,
                       "decode_roofline": (nbytes / step_s / bandwidth
                                           if bandwidth and step_s > 0 else None)})
    return _finish(result, compiled, times, _generation_flops(setup.model_cfg, B, P, N), useful,
                   B)


def _bench_iteration(work, setup, result, steps, warmup, rng):
    """A whole rollout iteration of the training loop (its algorithm's loader batch of
    prompts, `group_size` samples each), split into its three dispatches."""
    c = work.config
    rm_cfg, rm_params = initial_weights(algorithms.REWARD, c, work.policy_cfg, work.params)
    episodes = c.env.enabled
    loop = RolloutLoop(setup, c, Reward.from_model(rm_cfg, jax.tree.map(jnp.asarray, rm_params)),
                       eos_token_id=None, pad_token_id=0, tokenizer=work.tokenizer)
    n = setup.algorithm.batch_size(c)
    prompts = _task_prompts(work, rng, n) if episodes else _prompts(work, rng, n)
    state = setup.state
    for _ in range(warmup):
        state, _ = loop(state, prompts)
    phases = {"generate": [], "score": [], "update": []}
    ends, env_wait = collections.Counter(), []
    for _ in range(steps):
        state, metrics = loop(state, prompts)
        for name in phases:
            phases[name].append(metrics[f"time/{name}"])
        ends.update({k[len("env/"):]: v for k, v in metrics.items() if k.startswith("env/")})
        env_wait.append(metrics.get("time/env_wait", 0.0))
    if episodes:  # the generate phase played episodes: host environment calls included
        result["episodes"] = {k: v / steps for k, v in ends.items()}
        result["env_wait_s"] = float(np.median(env_wait))
    B, P = prompts["input_ids"].shape
    rows, N, E = B * loop.group, c.rollout.max_new_tokens, loop.spec.update_epochs
    T = P + N
    backbone = dataclasses.replace(setup.model_cfg, lm_head=False, scalar_head=True)
    cfg = setup.model_cfg
    flops = {"generate": model_flops(cfg, B * P, P, False, lm_tokens=B)  # one shared prefill
             + model_flops(cfg, rows * N, P + N, False),
             # policy (unless the update's own forward gives its log-probs) and reference
             # (unless the update has none) with LM heads on response positions, then backbones
             "score": (loop.spec.score_reference + loop.spec.score_policy)
             * model_flops(cfg, rows * T, T, False, lm_tokens=rows * N)
             + model_flops(backbone, rows * T, T, False, read_tokens=rows)  # the reward model
             + (setup.value_cfg is not None) * model_flops(backbone, rows * T, T, False),
             "update": update_flops(setup, c)[0]}
    tokens = {"generate": rows * N, "score": rows * T, "update": rows * T * E}
    result.update({"dispatches_per_step": 3, **setup.algorithm.cost(setup, c).details,
                   "phases": {}})
    for name, ts in phases.items():
        med = float(np.median(ts))
        result["phases"][name] = {"median_s": med, "tokens_per_s": tokens[name] / med,
                                  "flops_per_s": flops[name] / med}
    total = [sum(ts) for ts in zip(*phases.values())]
    return _finish(result, None, total, sum(flops.values()), rows * T, rows)


def _finish(result, compiled, times, flops, tokens, samples):
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


def format_params(r: dict) -> str:
    """`r["model_params"]` in millions, with `r["active_params"]` beside it where they differ
    (a mixture of experts): `"30.5M parameters (3.3M active)"`."""
    total, active = r["model_params"], r.get("active_params", r["model_params"])
    text = f"{total / 1e6:.1f}M parameters"
    return text if active == total else f"{text} ({active / 1e6:.1f}M active)"


def format_result(r: dict) -> str:
    lines = [f"jrlhf bench: {r['step']} on {r['devices']} x {r['device']} (mesh {r['mesh']}), "
             f"{format_params(r)}"]
    rows = [
        ("step time (median)", f"{r['median_s'] * 1e3:.1f} ms  (min {r['min_s'] * 1e3:.1f}, "
                               f"max {r['max_s'] * 1e3:.1f}, n={r['steps_timed']})"),
        ("tokens / s", f"{r['tokens_per_s']:,.0f}  ({r['tokens_per_step']:,} tokens per step)"),
        ("samples / s", f"{r['samples_per_s']:.2f}"),
        ("model FLOPs / step", f"{r['model_flops_per_step'] / 1e9:,.2f} GFLOP (analytic)"),
    ]
    if r.get("xla_flops_per_step"):
        note = (" (XLA counts a loop body once: PPO's epoch/minibatch scan, the chunked LM "
                "head's blocks)")
        rows.append(("XLA cost_analysis", f"{r['xla_flops_per_step'] / 1e9:,.2f} GFLOP{note}"))
    rows += [("achieved", f"{r['achieved_flops_per_s'] / 1e9:,.1f} GFLOP/s"),
             ("MFU", f"{100 * r['mfu']:.1f}% of {r['peak_flops_per_s'] / 1e9:,.0f} GFLOP/s "
                     f"({r['peak_source']})"),
             ("dispatches / step", str(r["dispatches_per_step"]))]
    if "compile_s" in r:
        rows.append(("compile", f"{r['compile_s']:.1f} s"))
    for k, v in (r.get("memory_per_device") or {}).items():
        rows.append((f"memory: {k}", f"{v / 2**20:,.1f} MiB"))
    if r.get("decode_step_s"):
        roofline = (f", {100 * r['decode_roofline']:.0f}% of the {r['hbm_bandwidth'] / 1e12:.2f} "
                    "TB/s memory roofline" if r.get("decode_roofline") else "")
        rows.append(("decode step", f"{r['decode_step_s'] * 1e3:.2f} ms (prefill "
                                    f"{r['prefill_s'] * 1e3:.1f} ms), "
                                    f"{r['decode_bytes_per_step'] / 1e9:.3f} GB read{roofline}"))
    if "slot_utilisation" in r:
        tail = ", long-tail budgets" if r["long_tail"] else ""
        rows.append(("slot utilisation", f"{100 * r['slot_utilisation']:.1f}% "
                                         f"({r['useful_tokens']:,} useful tokens ÷ rows × "
                                         f"{r['decode_steps']} decode steps{tail})"))
    for name, p in (r.get("phases") or {}).items():
        rows.append((f"  {name}", f"{p['median_s'] * 1e3:.1f} ms, {p['tokens_per_s']:,.0f} tok/s"))
    if r.get("episodes"):
        e = r["episodes"]
        rows.append(("episodes / step", f"{e.get('episodes', 0):g}, {e.get('turns', 0):g} policy "
                                        f"turns (ends: {ended_by(e)}; generate includes the "
                                        f"environment calls, {r.get('env_wait_s', 0):.1f} s "
                                        f"of it blocked on them)"))
    width = max(len(k) for k, _ in rows)
    return "\n".join(lines + [f"  {k:<{width}}  {v}" for k, v in rows])


def to_json(result) -> str:
    return json.dumps(result, indent=2, default=float)
