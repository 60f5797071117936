"""jrlhf vs google-tunix 0.1.7 on the same GRPO and PPO iterations, measured in one run.

Run through benchmarks/compare_tunix.sh, which sets up tunix's own virtualenv
(benchmarks/.venv-tunix: google-tunix==0.1.7 with jax, flax and optax pinned to
constraints.txt's versions). For each algorithm, jrlhf's side (this file, `--side jrlhf`, in
jrlhf's venv) and then tunix's side (`tunix_side.py`, in tunix's venv) run in their own fresh
processes, one after the other; each times `BENCH_STEPS` iterations (default 5) after one
warm-up iteration (compilation) and reports the median wall time per iteration and its phases.
Prints a markdown table and writes it to benchmarks/tunix_results.md.

Workload (`configs/bench_qwen3_tiny.py`; tunix builds `tunix.models.qwen3.Qwen3` of the same
shape, 6,032,128 parameters on both sides): Qwen3-shaped, 4 layers, width 256, 4 query / 2
key-value heads of 64 with QK-norm, SiLU MLP 768, untied LM head, vocabulary 5632, random
weights, float32. Prompts: random ids of 64 tokens (`tunix_workload.prompt_ids`, the same ids on
both sides), 64 sampled tokens at temperature 1, no top-k / top-p, never stopped early by EOS.
GRPO: 4 prompts x 4 samples, 1 epoch of 1 minibatch (16 rows), k3 KL loss β 0.04, clip 0.2,
token-mean loss. PPO: 8 prompts, a separate critic, 4 epochs of 1 minibatch, k1 KL in the
reward β 0.05, GAE γ 1 λ 0.95, whitened advantages, clip 0.2, value clip 0.2. AdamW lr 1e-5,
betas (0.9, 0.999), eps 1e-8, no weight decay, grad-norm clip 1.0. Reward: one host function
over the decoded texts on both sides (`tunix_workload.reward_fn`), integer-valued.

What still differs (the two libraries allow no closer match):
- Reward: a host function, not a reward model, on both sides: tunix's GRPO learner takes only
  reward functions, and tunix's PPO scatters per-sequence scores into an int32 array
  (`jnp.zeros_like(completion_ids).at[...].add(scores)`, 0.7 -> 0), so the function returns
  integers, which pass exactly. (`jrlhf bench --step *_iteration` scores with a reward model,
  so its iteration times are not these.)
- PPO critic: tunix trains the critic as its own model with its own optimizer and its own
  jitted step (loss 0.5 x clipped value MSE, its own grad-norm clip, no vf_coef); jrlhf's
  separate critic is updated in the same jitted step as the policy (loss policy + 0.1 x value,
  one grad-norm clip over both).
- PPO epochs: tunix runs each epoch as one actor step and one critic step, each through its
  Python trainer loop (progress bar, metric buffering, checkpoint-manager call); jrlhf runs all
  4 epochs as one jitted `lax.scan`.
- Logits: tunix's scoring forwards and losses compute the LM head at all 128 positions and
  slice the 64 response positions; jrlhf computes it at the response positions only. tunix's
  GRPO loss also computes the per-token entropy of those full logits (an aux metric it always
  computes; jrlhf's single-pass GRPO update computes its entropy metric from the same forward).
  tunix's GRPO advantages divide by the sample std (ddof 1), jrlhf's by the population std.
- KL settings on tunix's side are set to jrlhf's, not left at tunix's defaults: GRPO
  `kl_loss_mode="low_var_kl"` (k3; tunix's default is k1), PPO `kl_method="kl"` (k1; default
  k3) and β 0.05 (default 0.04), GRPO `loss_agg_mode="token-mean"` (default
  sequence-mean-token-mean: the same number here, every response has all 64 tokens).
- Sampling: tunix's KV cache is sized to exactly 64 + 64 positions (`kv_cache_size=128`; its
  default 1024 would attend over 1024 cached positions each step). Its rollout seed is fixed
  (the same draws every iteration); jrlhf folds the iteration into its key. A sampled pad id
  (0, probability ~1/5632 per token) counts as padding on tunix's side only. Both draw as
  `jax.random.categorical(logits / T)` does (jrlhf: the same Gumbel draws, its argmax taken as
  a max and a first-index min, the same tokens); jrlhf's sampler also records each token's log-prob (a
  log-softmax over the vocabulary per step; tunix's runs with `return_logprobs=False`) and runs
  one decode forward more (64: its loop decodes after the last token; tunix 63). jrlhf
  prefills each GRPO prompt once for its 4 samples; tunix prefills all 16 rows. Likewise
  jrlhf's GRPO update and reference forward run each prompt once per group
  (`grpo.shared_prompt`, its default): 1,280 backbone tokens where tunix's run 2,048.
- Weights: random on both sides; tunix's matrices are redrawn N(0, 0.02) (tunix initialises
  its MLP kernels to zero), its critic is a copy of the actor with a new 1-wide head, its
  reference a copy of the actor. The numbers differ from jrlhf's random init; the arithmetic
  does not depend on them.
- Host allocator: jrlhf's side calls `keep_freed_memory("auto")` as `jrlhf`'s CLI does by
  default on CPU (`run.host_memory`); tunix's process runs with glibc's defaults, as its users'
  would (`TUNIX_MALLOPT=1` applies the same mallopt settings to tunix's process).
- Iteration time: jrlhf = wall time of one `RolloutLoop` call (generate, score, update);
  tunix = wall time between consecutive ends of `RLLearner._run_global_step` (data loading,
  rollout, scoring, all updates, metric logging).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
from tunix_workload import PAD, ids_to_text, prompt_ids, reward_fn

CONFIG = ROOT / "configs" / "bench_qwen3_tiny.py"
TUNIX_PYTHON = HERE / ".venv-tunix" / "bin" / "python"
GOAL = 1.5
PROMPT_SEEDS = {"grpo": 1, "ppo": 2}  # tunix_side.py draws the same
LABELS = {"grpo_iteration": "GRPO iteration (4 prompts x 4 samples x (64 + 64), 1 epoch)",
          "ppo_iteration": "PPO iteration (8 x (64 + 64), separate critic, 4 epochs)"}


def workload(steps: int, warmup: int) -> dict:
    """The shape and settings both sides run, from configs/bench_qwen3_tiny.py."""
    from jrlhf.config import load_config

    c = load_config(CONFIG)
    a = c.model.arch
    return {
        "vocab_size": a.vocab_size, "hidden_size": a.hidden_size, "num_layers": a.num_layers,
        "num_heads": a.num_heads, "num_kv_heads": a.num_kv_heads, "head_dim": a.head_dim,
        "intermediate_size": a.intermediate_size, "rope_theta": a.rope_theta,
        "norm_eps": a.norm_eps, "prompt_length": c.data.max_prompt_length,
        "new_tokens": c.rollout.max_new_tokens, "temperature": c.rollout.temperature,
        "max_grad_norm": c.optim.max_grad_norm,
        "steps": steps, "warmup": warmup,
        "grpo": {"prompts": c.grpo.prompts_per_iteration, "group_size": c.grpo.group_size,
                 "epochs": c.grpo.epochs, "kl_coef": c.grpo.kl_coef,
                 "clip_eps": c.grpo.clip_eps, "learning_rate": c.grpo.learning_rate,
                 "seed": PROMPT_SEEDS["grpo"]},
        "ppo": {"prompts": c.ppo.prompts_per_iteration, "epochs": c.ppo.epochs,
                "kl_coef": c.ppo.kl_coef, "clip_eps": c.ppo.clip_eps,
                "value_clip_eps": c.ppo.value_clip_eps, "gamma": c.ppo.gamma,
                "lam": c.ppo.lam, "learning_rate": c.ppo.learning_rate,
                "seed": PROMPT_SEEDS["ppo"]},
    }


def _decode(tokens, mask) -> list[str]:
    import numpy as np

    return [ids_to_text(t[m.astype(bool)]) for t, m in zip(np.asarray(tokens), np.asarray(mask))]


def jrlhf_side(w: dict, algorithm: str) -> dict:
    """`w["steps"]` timed iterations of jrlhf's own rollout loop (`RolloutLoop`, what training
    and `jrlhf bench --step <algorithm>_iteration` run) after `w["warmup"]` untimed ones, with
    the shared host reward."""
    from jrlhf.host_memory import keep_freed_memory

    keep_freed_memory("auto")  # as the jrlhf CLI does, before JAX starts a backend
    import jax
    import numpy as np

    from jrlhf.bench import Workload
    from jrlhf.config import load_config
    from jrlhf.rollouts import Reward, RolloutLoop

    config = load_config(CONFIG)
    work = Workload.from_config(config)
    setup = work.setup(algorithm)
    reward = Reward.host(reward_fn, _decode, name="tunix_workload.reward_fn")
    loop = RolloutLoop(setup, config, reward, eos_token_id=None, pad_token_id=PAD)
    spec = w[algorithm]
    n = w["warmup"] + w["steps"]
    ids = prompt_ids(w["vocab_size"], n, spec["prompts"], w["prompt_length"], spec["seed"])
    state, walls, phases, lengths = setup.state, [], [], []
    for batch in ids:
        prompts = {"input_ids": batch, "attention_mask": np.ones_like(batch)}
        start = time.perf_counter()
        state, metrics = loop(state, prompts)
        jax.block_until_ready(state)
        walls.append(time.perf_counter() - start)
        phases.append({k: metrics[f"time/{k}"] for k in ("generate", "score", "update")})
        lengths.append((metrics["response_length"], metrics["response_length_max"]))
    timed = phases[w["warmup"]:]
    return {"median_s": float(np.median(walls[w["warmup"]:])),
            "iteration_s": walls[w["warmup"]:], "first_iteration_s": walls[0],
            "phases": {k: {"median_s": float(np.median([p[k] for p in timed]))}
                       for k in ("generate", "score", "update")},
            "response_length": {"min": min(m for m, _ in lengths),  # of the rows' mean
                                "max": max(x for _, x in lengths)},
            "model_params": work.policy_cfg.num_params, "jax": jax.__version__}


def run(cmd: list) -> dict:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "JAX_PLATFORMS": "cpu"}
    out = subprocess.run([str(c) for c in cmd], check=False, cwd=ROOT, env=env,
                         capture_output=True, text=True)
    if out.returncode:
        sys.exit(f"{' '.join(map(str, cmd))} failed:\n{out.stderr[-4000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def _git_rev() -> str:
    try:
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], check=False, cwd=ROOT,
                             capture_output=True, text=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                               check=False, cwd=ROOT, capture_output=True,
                               text=True).stdout.strip()
        return rev + (" + uncommitted changes" if dirty else "")
    except OSError:
        return "?"


def table(w: dict, ours: dict, tunix: dict) -> str:
    cpu = platform.processor() or platform.machine()
    steps = [s for s in LABELS if s in ours]
    allocator = ("glibc mallopt as jrlhf's" if tunix.get("mallopt") else "glibc defaults")
    header = (
        f"Measured {datetime.date.today()} on {os.cpu_count()} CPU cores ({cpu}), float32, jax "
        f"{tunix['jax']} / flax {tunix['flax']} / optax {tunix['optax']} on both sides, "
        f"google-tunix {tunix['tunix']} (allocator: {allocator}) vs jrlhf ({_git_rev()}); "
        f"median of {w['steps']} iterations after {w['warmup']} warm-up; Qwen3-shaped "
        f"{ours[steps[0]]['model_params'] / 1e6:.2f}M model (configs/bench_qwen3_tiny.py), "
        "the same integer host reward on both sides (`benchmarks/compare_tunix.sh`).")
    lines = [
        header, "",
        "| iteration | tunix s | jrlhf s | tunix / jrlhf | goal |", "|---|---|---|---|---|"]
    for name in steps:
        t, j = tunix[name]["median_s"], ours[name]["median_s"]
        met = "met" if t / j >= GOAL else "**missed**"
        lines.append(f"| {LABELS[name]} | {t:.3f} | {j:.3f} | {t / j:.2f}x | ≥{GOAL}x {met} |")
    lines += ["", "| phase, median s | " + " | ".join(
        f"{n.split('_')[0].upper()} tunix | {n.split('_')[0].upper()} jrlhf | tunix / jrlhf"
        for n in steps) + " |", "|---" * (1 + 3 * len(steps)) + "|"]
    for phase in ("generate", "score", "update"):
        cells = []
        for name in steps:
            t = tunix[name]["phases"][phase]["median_s"]
            j = ours[name]["phases"][phase]["median_s"]
            cells += [f"{t:.3f}", f"{j:.3f}", f"{t / j:.2f}x"]
        lines.append(f"| {phase} | " + " | ".join(cells) + " |")
    cells = []
    for name in steps:
        t, j = tunix[name]["first_iteration_s"], ours[name]["first_iteration_s"]
        cells += [f"{t:.1f}", f"{j:.1f}", ""]
    lines.append("| first iteration (compile + run) | " + " | ".join(cells) + " |")
    lengths = {f"{side} {n.split('_')[0]}": (r[n]["response_length"]["min"],
                                              r[n]["response_length"]["max"])
               for side, r in (("tunix", tunix), ("jrlhf", ours)) for n in steps}
    lines += ["", "Response lengths (min, max): " + ", ".join(
        f"{k} {v[0]:g}-{v[1]:g}" for k, v in lengths.items()) + "."]
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=int(os.environ.get("BENCH_STEPS", "5")))
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--only", choices=("grpo", "ppo"), action="append",
                        help="run only this algorithm (repeatable; default both)")
    parser.add_argument("--side", choices=("jrlhf",), help=argparse.SUPPRESS)
    parser.add_argument("--workload", help=argparse.SUPPRESS)
    parser.add_argument("--algorithm", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.side == "jrlhf":  # a child process: one algorithm on jrlhf's side
        print(json.dumps(jrlhf_side(json.loads(args.workload), args.algorithm)))
        return
    w = workload(args.steps, args.warmup)
    ours, tunix = {}, {}
    for algorithm in args.only or ("grpo", "ppo"):
        name = f"{algorithm}_iteration"
        ours[name] = run([sys.executable, Path(__file__).resolve(), "--side", "jrlhf",
                          "--workload", json.dumps(w), "--algorithm", algorithm])
        print(f"[jrlhf] {name}: {ours[name]['median_s']:.3f} s", file=sys.stderr)
        result = run([TUNIX_PYTHON, HERE / "tunix_side.py",
                      json.dumps({**w, "steps_to_run": [name]})])
        tunix.update({k: v for k, v in result.items() if k != name} | {name: result[name]})
        print(f"[tunix] {name}: {tunix[name]['median_s']:.3f} s", file=sys.stderr)
    text = table(w, ours, tunix)
    (HERE / "tunix_results.md").write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
