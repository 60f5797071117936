"""The long-tail rollout workload of shared/BENCHMARK.md: 256 sequences (64 prompts x 4
samples) of a random-weight GPT-2 shape, each with its own length budget and no EOS stop — 28 of
224 tokens, the rest 8-32.

    PYTHONPATH=. python benchmarks/long_tail.py [--repeats 3] [--json out.json] [--grpo]

Measures, in one run: static batching (`sampling.generate`) — (a) all 256 rows in one call,
(b) four calls of 64 rows (the KV memory of 64 slots), each call decoding until its longest
budget — and continuous batching (`continuous.generate_continuous`) with 64 and 32 slots
refilled as rows end: wall time to produce all 256 sequences (median of `--repeats` after one
warm-up), decode steps, slot utilisation (useful tokens / (rows or slots x decode steps)) and
KV-cache bytes (continuous: the slots plus the prompt store, every prompt's prefill once).
Beside them, a first-in-first-out simulation of the slots: the steps an ideal refill takes.

`--grpo`: the GRPO variant instead — the same prompts and budgets as GRPO iterations of 16
prompts x 4 samples (the 64 prompts in turn, each sampled row with its workload budget; reward:
how often a response says token 3, on device), one warm-up iteration then 5 measured, static
batching (today's loop) beside partial rollouts (64 slots, `rollout.max_staleness`): generated
tokens per second of the generate phase, iteration wall time (generate + score + update), slot
utilisation.
"""

from __future__ import annotations

import argparse
import heapq
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from jrlhf.bench import long_tail_budgets  # noqa: E402
from jrlhf.config import load_config  # noqa: E402
from jrlhf.continuous import generate_continuous  # noqa: E402
from jrlhf.models import init_params  # noqa: E402
from jrlhf.sampling import generate  # noqa: E402

PROMPTS, SAMPLES, PROMPT_LENGTH, LONG, VOCAB_TOP = 64, 4, 32, 224, 50256


def workload():
    """`(prompt_ids [64, 32], budgets [256])`: sequence i samples prompt i // 4."""
    prompt_ids = np.random.default_rng(0).integers(0, VOCAB_TOP, (PROMPTS, PROMPT_LENGTH))
    return prompt_ids.astype(np.int32), long_tail_budgets(PROMPTS * SAMPLES, LONG, seed=0)


def kv_bytes(cfg, rows: int, positions: int) -> int:
    itemsize = jnp.dtype(cfg.dtype).itemsize
    return rows * positions * cfg.num_layers * 2 * cfg.num_kv_heads * cfg.head_dim * itemsize


def simulate_slots(budgets, slots: int) -> int:
    """Decode steps for `slots` slots over the queue of `budgets` in order: a freed slot takes
    the next sequence at once (first in, first out)."""
    free_at = [0] * slots  # the step at which each slot is free again
    for b in budgets:
        heapq.heappush(free_at, heapq.heappop(free_at) + int(b))
    return max(free_at)


def static(cfg, params, prompt_ids, budgets, prompts_per_call: int, repeats: int) -> dict:
    """All sequences by calls of `prompts_per_call` prompts x 4 samples, one after another."""
    calls = []
    for start in range(0, PROMPTS, prompts_per_call):
        ids = jnp.asarray(prompt_ids[start:start + prompts_per_call])
        rows = slice(start * SAMPLES, (start + prompts_per_call) * SAMPLES)
        calls.append((ids, jnp.ones_like(ids), jnp.asarray(budgets[rows]),
                      jax.random.key(start)))

    def run():
        outs = [generate(cfg, params, ids, mask, key, max_new_tokens=LONG, temperature=1.0,
                         num_samples=SAMPLES, budgets=b, pad_token_id=0)
                for ids, mask, b, key in calls]
        return jax.block_until_ready(outs)

    outs = run()  # warm-up (compilation)
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        outs = run()
        times.append(time.perf_counter() - started)
    useful = sum(int(o.mask.sum()) for o in outs)
    steps = sum(int(o.steps) for o in outs)
    rows = prompts_per_call * SAMPLES
    return {"mode": f"static, {len(calls)} call(s) of {rows} rows", "seconds": float(
        np.median(times)), "decode_steps": steps, "useful_tokens": useful,
        "slot_utilisation": useful / (rows * steps),
        "kv_bytes": kv_bytes(cfg, rows, PROMPT_LENGTH + LONG)}


def continuous(cfg, params, prompt_ids, budgets, slots: int, repeats: int) -> dict:
    ids = jnp.asarray(prompt_ids)
    args = (cfg, params, ids, jnp.ones_like(ids), jax.random.key(0))
    kwargs = dict(max_new_tokens=LONG, slots=slots, temperature=1.0, num_samples=SAMPLES,
                  budgets=jnp.asarray(budgets), pad_token_id=0)
    out = jax.block_until_ready(generate_continuous(*args, **kwargs))  # warm-up
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        out = jax.block_until_ready(generate_continuous(*args, **kwargs))
        times.append(time.perf_counter() - started)
    useful, steps = int(out.mask.sum()), int(out.steps)
    return {"mode": f"continuous, {slots} slots", "seconds": float(np.median(times)),
            "decode_steps": steps, "useful_tokens": useful,
            "slot_utilisation": useful / (slots * steps),
            "kv_bytes": kv_bytes(cfg, slots, PROMPT_LENGTH + LONG)
            + kv_bytes(cfg, PROMPTS, PROMPT_LENGTH)}


class PromptBatches:
    """GRPO prompt batches of `per_batch` workload prompts in turn, with their rows' budgets."""

    def __init__(self, prompt_ids, budgets, per_batch: int):
        self.prompt_ids, self.budgets, self.per_batch, self.i = prompt_ids, budgets, per_batch, 0

    def __iter__(self):
        return self

    def __next__(self):
        start = self.i * self.per_batch % PROMPTS
        self.i += 1
        rows = slice(start * SAMPLES, (start + self.per_batch) * SAMPLES)
        ids = self.prompt_ids[start:start + self.per_batch]
        return {"input_ids": ids, "attention_mask": np.ones_like(ids),
                "max_new_tokens": self.budgets[rows]}


def says_token_3(_, prompt_ids, prompt_mask, response_ids, response_mask):
    return jnp.sum((response_ids == 3) & (response_mask > 0), axis=1).astype(jnp.float32)


def grpo(cfg, params, prompt_ids, budgets, *, slots: int, max_staleness: int,
         iterations: int = 5, per_batch: int = 16) -> dict:
    """`iterations` GRPO iterations (after one warm-up) through the rollout loop."""
    from jrlhf.config import Config, DataConfig, GRPOConfig, RolloutConfig, RunConfig
    from jrlhf.rollouts import Reward, RolloutLoop
    from jrlhf.setups import make_setup

    config = Config(
        data=DataConfig(max_prompt_length=PROMPT_LENGTH),
        grpo=GRPOConfig(group_size=SAMPLES, prompts_per_iteration=per_batch,
                        iterations=iterations + 1, tis_cap=2.0),
        rollout=RolloutConfig(max_new_tokens=LONG, slots=slots, max_staleness=max_staleness),
        run=RunConfig(progress=False, out_dir="runs/long_tail"))
    setup = make_setup("grpo", config, cfg, params)
    batches = PromptBatches(prompt_ids, budgets, per_batch)
    loop = RolloutLoop(setup, config, Reward(fn=says_token_3), eos_token_id=None,
                       more_prompts=batches)
    state, rows = setup.state, per_batch * SAMPLES
    mode = (f"GRPO, partial rollouts, {slots} slots, max_staleness {max_staleness}"
            if max_staleness else "GRPO, static batching (today)")
    state, _ = loop(state, next(batches))  # warm-up: compiles, and fills the pool
    tokens = generate_s = wall = slot_steps = trained = dropped = 0.0
    seconds = []
    for _ in range(iterations):
        prompts = next(batches)
        started = time.perf_counter()
        state, m = jax.block_until_ready(loop(state, prompts))
        wall += time.perf_counter() - started
        generated = m["tokens_per_s/generate"] * m["time/generate"]
        tokens += generated
        generate_s += m["time/generate"]
        slot_steps += (generated / m["partial/slot_utilisation"] if max_staleness
                       else rows * int(prompts["max_new_tokens"].max()))  # no EOS: exact
        trained += float(np.sum(m["response_length"])) * rows
        dropped += m.get("partial/dropped_groups", 0.0)
        print(f"  {mode}: iteration {len(seconds) + 1}: generate {m['time/generate']:.1f} s, "
              f"score {m['time/score']:.1f} s, update {m['time/update']:.1f} s", flush=True)
        seconds.append(m["time/generate"])
    return {"mode": mode, "trained_tokens": int(round(trained)), "dropped_groups": dropped, "iterations": iterations, "generated_tokens": int(round(tokens)),
            "generate_seconds": generate_s, "tokens_per_s": tokens / generate_s,
            "iteration_seconds": wall / iterations, "slot_utilisation": tokens / slot_steps}


def main_grpo(cfg, params, prompt_ids, budgets, args) -> None:
    results = [grpo(cfg, params, prompt_ids, budgets, slots=0, max_staleness=0),
               grpo(cfg, params, prompt_ids, budgets, slots=64,
                    max_staleness=args.max_staleness)]
    print("| mode | generated tokens | trained tokens | dropped groups | generate (s) | "
          "tokens/s | iteration (s) | slot utilisation |")
    print("|---|---|---|---|---|---|---|---|")
    for r in results:
        print(f"| {r['mode']} | {r['generated_tokens']:,} | {r['trained_tokens']:,} | "
              f"{r['dropped_groups']:.0f} | {r['generate_seconds']:.1f} | "
              f"{r['tokens_per_s']:.0f} | {r['iteration_seconds']:.1f} | "
              f"{r['slot_utilisation']:.1%} |")
    print(f"tokens/s ratio (partial / static): "
          f"{results[1]['tokens_per_s'] / results[0]['tokens_per_s']:.2f}x")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", help="also write the results here")
    parser.add_argument("--grpo", action="store_true",
                        help="the GRPO variant: 5 iterations, static beside partial rollouts")
    parser.add_argument("--max-staleness", type=int, default=8)
    args = parser.parse_args(argv)
    cfg = load_config(ROOT / "configs" / "bench_gpt2.py").model.arch
    params = init_params(cfg, 0)
    prompt_ids, budgets = workload()
    if args.grpo:
        return main_grpo(cfg, params, prompt_ids, budgets, args)
    total = int(budgets.sum())
    print(f"long-tail workload: {len(budgets)} sequences, {int((budgets == LONG).sum())} of "
          f"{LONG} tokens, {total:,} tokens in all; {jax.devices()[0].platform}")
    results = [static(cfg, params, prompt_ids, budgets, PROMPTS, args.repeats),
               static(cfg, params, prompt_ids, budgets, 16, args.repeats),
               continuous(cfg, params, prompt_ids, budgets, 64, args.repeats),
               continuous(cfg, params, prompt_ids, budgets, 32, args.repeats)]
    for slots in (64, 32):
        steps = simulate_slots(budgets, slots)
        results.append({"mode": f"slot refill, {slots} slots (simulated)", "seconds": None,
                        "decode_steps": steps, "useful_tokens": total,
                        "slot_utilisation": total / (slots * steps),
                        "kv_bytes": kv_bytes(cfg, slots, PROMPT_LENGTH + LONG)})
    print("| mode | wall time (s) | decode steps | slot utilisation | KV cache |")
    print("|---|---|---|---|---|")
    for r in results:
        seconds = "—" if r["seconds"] is None else f"{r['seconds']:.2f}"
        print(f"| {r['mode']} | {seconds} | {r['decode_steps']} | "
              f"{r['slot_utilisation']:.1%} | {r['kv_bytes'] / 2**20:.0f} MiB |")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
