"""A quantized frozen base on SmolLM2-135M: parameter memory and logit error vs float32.

    HF_HUB_OFFLINE=1 JAX_PLATFORMS=cpu .venv/bin/python benchmarks/quantized_base.py

Loads the embedded SmolLM2-135M-Instruct (`model.source="smollm2"`), stores its frozen base as
`make_setup` does with `model.quantize` (`jrlhf.quant.quantize_params`: every kernel and the
embedding table; norms stay float32) and prints, per quantization, the bytes of the base ÷
float32, the logit error against the float32 model on a few prompts (max and mean absolute, over
every real token's logits) and how often the top-1 token agrees, and the greedy completion of
one prompt. Prints a markdown table (add `--json` for the rows as JSON).
"""

from __future__ import annotations

import json
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from jrlhf import optim, quant
from jrlhf.config import ModelSection
from jrlhf.models import transformer as tfm
from jrlhf.models.sources import load_policy
from jrlhf.sampling import generate

PROMPTS = [
    "The capital of France is",
    "Write a short poem about the sea.",
    "def fibonacci(n):\n    ",
    "Explain why the sky is blue in one sentence.",
    "1, 2, 3, 4, 5,",
    "Reinforcement learning from human feedback trains a policy to",
]


def left_padded(tokenizer, texts, pad_id):
    rows = [tokenizer(t)["input_ids"] for t in texts]
    width = max(map(len, rows))
    ids = np.full((len(rows), width), pad_id, np.int32)
    mask = np.zeros((len(rows), width), np.int32)
    for i, r in enumerate(rows):
        ids[i, width - len(r):], mask[i, width - len(r):] = r, 1
    return jnp.asarray(ids), jnp.asarray(mask)


def main():
    cfg, params, tokenizer = load_policy(ModelSection(source="smollm2"))
    params = jax.tree.map(jnp.asarray, params)
    pad = cfg.pad_token_id if cfg.pad_token_id is not None else 0
    ids, mask = left_padded(tokenizer, PROMPTS, pad)
    forward = jax.jit(lambda p: tfm.forward(cfg, p, ids, mask))
    real = np.asarray(mask, bool)
    ref = np.asarray(forward(params))[real]
    f32_bytes = optim.tree_bytes(params)
    greedy_ids, greedy_mask = left_padded(tokenizer, PROMPTS[:1], pad)

    def complete(p):
        out = generate(cfg, p, greedy_ids, greedy_mask, jax.random.key(0), max_new_tokens=8,
                       temperature=0.0, eos_token_id=cfg.eos_token_id, pad_token_id=pad)
        return tokenizer.decode(np.asarray(out.tokens[0])[np.asarray(out.mask[0]) > 0])

    rows = [{"quantize": "none (float32)", "bytes": f32_bytes, "ratio": 1.0, "max_err": 0.0,
             "mean_err": 0.0, "top1": 1.0, "completion": complete(params)}]
    for qtype in quant.QTYPES:
        start = time.perf_counter()
        q = jax.block_until_ready(quant.quantize_params(params, qtype))
        seconds = time.perf_counter() - start
        logits = np.asarray(forward(q))[real]
        err = np.abs(logits - ref)
        rows.append({"quantize": qtype, "bytes": optim.tree_bytes(q),
                     "ratio": optim.tree_bytes(q) / f32_bytes, "max_err": float(err.max()),
                     "mean_err": float(err.mean()),
                     "top1": float(np.mean(logits.argmax(-1) == ref.argmax(-1))),
                     "completion": complete(q), "quantize_s": seconds})
    if "--json" in sys.argv:
        print(json.dumps(rows, indent=1))
        return
    spread = float(ref.max() - ref.min())
    print(f"SmolLM2-135M-Instruct, {len(PROMPTS)} prompts, {int(real.sum())} token positions x "
          f"{cfg.vocab_size} logits (float32 logits span {spread:.1f}); greedy completion of "
          f"{PROMPTS[0]!r}\n")
    print("| model.quantize | base bytes | ÷ float32 | max abs logit error | mean abs error "
          "| top-1 agreement | completion |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['quantize']} | {r['bytes']:,} | {r['ratio']:.3f} | {r['max_err']:.3f} | "
              f"{r['mean_err']:.4f} | {r['top1']:.1%} | {r['completion']!r} |")


if __name__ == "__main__":
    main()
